use std::borrow::Cow;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use super::money::{Currency, MinorUnits};

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
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceStep {
    pub step: Cow<'static, str>,
    pub detail: Cow<'static, str>,
    /// Wall time of the step in microseconds, when it did any work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    /// Attempts made, for tool calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Structured facts behind the detail text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<StepData>,
}

impl TraceStep {
    pub fn new(step: impl Into<Cow<'static, str>>, detail: impl Into<Cow<'static, str>>) -> Self {
        TraceStep {
            step: step.into(),
            detail: detail.into(),
            duration_us: None,
            attempts: None,
            data: None,
        }
    }
}

/// The structured facts of a trace step, each kind a JSON object of its own. They are kept
/// as the values they are and written out only with the response: a decision is rendered
/// once, on the writer's thread when it is made in its claim's trip.
#[derive(Clone, Debug, PartialEq)]
pub enum StepData {
    /// What the balance tool read: `{"available","currency","reserved"}`, amounts in the
    /// account's currency.
    Balance {
        currency: Currency,
        available_minor: i64,
        reserved_minor: i64,
    },
    /// What the risk tool read: `{"knownPayee","recentPayments"}`.
    Risk {
        known_payee: bool,
        recent_payments: u32,
    },
    /// The rules that fired, each with the numbers that made it fire, in the order of the
    /// reasons: `{"findings":{reason: why}}`.
    Findings(Vec<(Reason, String)>),
}

impl Serialize for StepData {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            StepData::Balance {
                currency,
                available_minor,
                reserved_minor,
            } => {
                let exponent = currency.exponent();
                let mut map = serializer.serialize_map(Some(3))?;
                map.serialize_entry("available", &MinorUnits(*available_minor, exponent))?;
                map.serialize_entry("currency", currency.code())?;
                map.serialize_entry("reserved", &MinorUnits(*reserved_minor, exponent))?;
                map.end()
            }
            StepData::Risk {
                known_payee,
                recent_payments,
            } => {
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry("knownPayee", known_payee)?;
                map.serialize_entry("recentPayments", recent_payments)?;
                map.end()
            }
            StepData::Findings(findings) => {
                struct Whys<'a>(&'a [(Reason, String)]);
                impl Serialize for Whys<'_> {
                    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                        serializer.collect_map(self.0.iter().map(|(r, why)| (r.as_str(), why)))
                    }
                }
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("findings", &Whys(findings))?;
                map.end()
            }
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

    #[test]
    fn step_data_is_written_as_the_trace_shows_it() {
        let usd = Currency::parse("USD").unwrap();
        let jpy = Currency::parse("JPY").unwrap();
        let json = |d: StepData| serde_json::to_string(&d).unwrap();
        assert_eq!(
            json(StepData::Balance {
                currency: usd,
                available_minor: 30_000,
                reserved_minor: 5
            }),
            r#"{"available":"300.00","currency":"USD","reserved":"0.05"}"#
        );
        assert_eq!(
            json(StepData::Balance {
                currency: jpy,
                available_minor: 1_500,
                reserved_minor: 0
            }),
            r#"{"available":"1500","currency":"JPY","reserved":"0"}"#
        );
        assert_eq!(
            json(StepData::Risk {
                known_payee: false,
                recent_payments: 3
            }),
            r#"{"knownPayee":false,"recentPayments":3}"#
        );
        assert_eq!(
            json(StepData::Findings(vec![
                (
                    Reason::InsufficientFunds,
                    "amount 5.00 > available 1.00".into()
                ),
                (Reason::RecentDisputes, "say \"why\"".into()),
            ])),
            r#"{"findings":{"insufficient_funds":"amount 5.00 > available 1.00","recent_disputes":"say \"why\""}}"#
        );
    }
}
