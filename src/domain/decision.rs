use serde::{Deserialize, Serialize};

/// The answer to a payment. Ordered by severity: `Block` > `Review` > `Allow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Review,
    Block,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Review => "review",
            Decision::Block => "block",
        }
    }
}

/// Why a rule fired. The wire name is stable: clients and dashboards key on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    UnknownCustomer,
    CurrencyMismatch,
    InsufficientFunds,
    LimitExceeded,
    BlockedPayee,
    RecentDisputes,
    NewDeviceHighAmount,
    NewPayeeHighAmount,
    HighVelocity,
    BalanceUnavailable,
    RiskSignalsUnavailable,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::UnknownCustomer,
        Reason::CurrencyMismatch,
        Reason::InsufficientFunds,
        Reason::LimitExceeded,
        Reason::BlockedPayee,
        Reason::RecentDisputes,
        Reason::NewDeviceHighAmount,
        Reason::NewPayeeHighAmount,
        Reason::HighVelocity,
        Reason::BalanceUnavailable,
        Reason::RiskSignalsUnavailable,
    ];

    pub fn decision(self) -> Decision {
        match self {
            Reason::UnknownCustomer
            | Reason::CurrencyMismatch
            | Reason::InsufficientFunds
            | Reason::LimitExceeded
            | Reason::BlockedPayee => Decision::Block,
            Reason::RecentDisputes
            | Reason::NewDeviceHighAmount
            | Reason::NewPayeeHighAmount
            | Reason::HighVelocity
            | Reason::BalanceUnavailable
            | Reason::RiskSignalsUnavailable => Decision::Review,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownCustomer => "unknown_customer",
            Reason::CurrencyMismatch => "currency_mismatch",
            Reason::InsufficientFunds => "insufficient_funds",
            Reason::LimitExceeded => "limit_exceeded",
            Reason::BlockedPayee => "blocked_payee",
            Reason::RecentDisputes => "recent_disputes",
            Reason::NewDeviceHighAmount => "new_device_high_amount",
            Reason::NewPayeeHighAmount => "new_payee_high_amount",
            Reason::HighVelocity => "high_velocity",
            Reason::BalanceUnavailable => "balance_unavailable",
            Reason::RiskSignalsUnavailable => "risk_signals_unavailable",
        }
    }
}

/// One line of the agent trace: what was checked and what came back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceStep {
    pub step: String,
    pub detail: String,
    /// Wall time of the step in microseconds, when it did any work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    /// Attempts made, for tool calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Structured facts behind the detail text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl TraceStep {
    pub fn new(step: impl Into<String>, detail: impl Into<String>) -> Self {
        TraceStep {
            step: step.into(),
            detail: detail.into(),
            duration_us: None,
            attempts: None,
            data: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_order_by_severity() {
        assert!(Decision::Block > Decision::Review);
        assert!(Decision::Review > Decision::Allow);
    }

    #[test]
    fn reason_wire_names_match_serde() {
        for r in Reason::ALL {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
    }
}
