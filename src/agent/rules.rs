//! The default policy's rules: a pure function of the payment, what the tools returned and
//! the policy. Same inputs, same reasons, in the same order.

use std::cmp::Reverse;

use crate::domain::{Decision, Money, Payment, Reason, format_minor};
use crate::policy::Policy;
use crate::store::{Account, RiskProfile};

/// What a tool gave the agent: data, "nothing there", or nothing at all (it failed).
pub enum Fetched<'a, T> {
    Found(&'a T),
    Missing,
    Unavailable,
}

pub struct Facts<'a> {
    pub payment: &'a Payment,
    pub account: Fetched<'a, Account>,
    pub risk: Fetched<'a, RiskProfile>,
    /// Today's UTC day number, for the daily limit.
    pub day: i64,
}

/// A rule that fired, with the numbers that made it fire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub reason: Reason,
    pub why: String,
}

/// Applies every rule; returns the findings ordered block first, then review, each group in
/// the policy's order.
pub fn evaluate(policy: &Policy, facts: &Facts<'_>) -> Vec<Finding> {
    let mut found = Vec::new();
    let mut fire = |reason: Reason, why: String| found.push(Finding { reason, why });
    let amount = facts.payment.amount;
    let currency = amount.currency();
    let exp = currency.exponent();
    let show = |minor: i64| format_minor(minor, exp);
    let high_amount = Money::threshold_minor(policy.high_amount, currency);

    match &facts.account {
        Fetched::Unavailable => fire(
            Reason::BalanceUnavailable,
            "balance could not be read; never allow on missing data".into(),
        ),
        Fetched::Missing => fire(
            Reason::UnknownCustomer,
            "no account for this customer".into(),
        ),
        Fetched::Found(account) if account.balance.currency() != currency => fire(
            Reason::CurrencyMismatch,
            format!(
                "payment in {currency}, account in {}",
                account.balance.currency()
            ),
        ),
        Fetched::Found(account) => {
            let available = account.available_minor();
            if amount.minor() > available {
                fire(
                    Reason::InsufficientFunds,
                    format!("amount {} > available {}", amount, show(available)),
                );
            }
            let per_payment = Money::threshold_minor(policy.per_payment_limit, currency);
            let daily = policy.daily_limit_minor(currency);
            let today = account.outflow_on(facts.day);
            if amount.minor() > per_payment {
                fire(
                    Reason::LimitExceeded,
                    format!(
                        "amount {} > per-payment limit {}",
                        amount,
                        show(per_payment)
                    ),
                );
            } else if today.saturating_add(amount.minor()) > daily {
                fire(
                    Reason::LimitExceeded,
                    format!(
                        "today's outflow {} + {} > daily limit {}",
                        show(today),
                        amount,
                        show(daily)
                    ),
                );
            }
        }
    }

    if policy.blocked_payees.contains(facts.payment.payee.as_str()) {
        fire(Reason::BlockedPayee, "payee is on the blocklist".into());
    }

    match &facts.risk {
        Fetched::Unavailable => fire(
            Reason::RiskSignalsUnavailable,
            "risk signals could not be read; never allow on missing data".into(),
        ),
        Fetched::Missing => {}
        Fetched::Found(risk) => {
            if risk.recent_disputes >= policy.recent_disputes_threshold {
                fire(
                    Reason::RecentDisputes,
                    format!(
                        "{} disputes in 90 days >= {}",
                        risk.recent_disputes, policy.recent_disputes_threshold
                    ),
                );
            }
            if risk.device_change && amount.minor() >= high_amount {
                fire(
                    Reason::NewDeviceHighAmount,
                    format!(
                        "device changed and amount {} >= {}",
                        amount,
                        show(high_amount)
                    ),
                );
            }
            if !risk.known_payee && amount.minor() >= high_amount {
                fire(
                    Reason::NewPayeeHighAmount,
                    format!(
                        "first payment to payee and amount {} >= {}",
                        amount,
                        show(high_amount)
                    ),
                );
            }
            if risk.recent_payments >= policy.velocity.max_payments {
                fire(
                    Reason::HighVelocity,
                    format!(
                        "at least {} payments in the last {} s; this one makes more than {}",
                        risk.recent_payments,
                        policy.velocity.window_secs,
                        policy.velocity.max_payments
                    ),
                );
            }
        }
    }

    // Stable: keeps the policy's order inside each severity.
    found.sort_by_key(|f| Reverse(f.reason.decision()));
    found
}

/// The most severe decision among the findings; `allow` when none fired.
pub fn decision_of(findings: &[Finding]) -> Decision {
    findings
        .iter()
        .map(|f| f.reason.decision())
        .max()
        .unwrap_or(Decision::Allow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Currency, CustomerId, PayeeId};
    use crate::policy::{DEFAULT_POLICY, Policy};

    fn policy() -> Policy {
        Policy::parse(DEFAULT_POLICY).unwrap()
    }

    fn payment(amount: &str, currency: &str, payee: &str) -> Payment {
        let currency = Currency::parse(currency).unwrap();
        Payment {
            customer: CustomerId::parse("c_1").unwrap(),
            payee: PayeeId::parse(payee).unwrap(),
            amount: Money::parse(amount, currency).unwrap(),
            device_id: None,
            ip_country: None,
        }
    }

    fn account(balance: &str, currency: &str) -> Account {
        let currency = Currency::parse(currency).unwrap();
        Account {
            customer: CustomerId::parse("c_1").unwrap(),
            balance: Money::parse(balance, currency).unwrap(),
            reserved_minor: 0,
            outflow_day: 0,
            outflow_minor: 0,
        }
    }

    fn clean_risk() -> RiskProfile {
        RiskProfile {
            recent_disputes: 0,
            device_change: false,
            home_country: None,
            known_payee: true,
            recent_payments: 0,
        }
    }

    fn reasons(p: &Payment, a: Fetched<Account>, r: Fetched<RiskProfile>) -> Vec<Reason> {
        let facts = Facts {
            payment: p,
            account: a,
            risk: r,
            day: 1,
        };
        evaluate(&policy(), &facts)
            .into_iter()
            .map(|f| f.reason)
            .collect()
    }

    #[test]
    fn a_clean_payment_within_funds_is_allowed() {
        let p = payment("600.00", "USD", "p_789");
        let r = reasons(
            &p,
            Fetched::Found(&account("1000.00", "USD")),
            Fetched::Found(&clean_risk()),
        );
        assert!(r.is_empty());
        assert_eq!(decision_of(&[]), Decision::Allow);
    }

    #[test]
    fn the_brief_example_goes_to_review_for_disputes_only() {
        let p = payment("125.50", "USD", "p_789");
        let risk = RiskProfile {
            recent_disputes: 2,
            device_change: true,
            ..clean_risk()
        };
        let r = reasons(
            &p,
            Fetched::Found(&account("300.00", "USD")),
            Fetched::Found(&risk),
        );
        assert_eq!(r, vec![Reason::RecentDisputes]);
    }

    #[test]
    fn one_cent_over_the_available_balance_is_insufficient() {
        let p = payment("300.01", "USD", "p_789");
        let r = reasons(
            &p,
            Fetched::Found(&account("300.00", "USD")),
            Fetched::Found(&clean_risk()),
        );
        assert_eq!(r, vec![Reason::InsufficientFunds]);
        let p = payment("300.00", "USD", "p_789");
        let r = reasons(
            &p,
            Fetched::Found(&account("300.00", "USD")),
            Fetched::Found(&clean_risk()),
        );
        assert!(r.is_empty());
    }

    #[test]
    fn reservations_reduce_what_is_available() {
        let mut a = account("1000.00", "USD");
        a.reserved_minor = 60000;
        let p = payment("600.00", "USD", "p_789");
        assert_eq!(
            reasons(&p, Fetched::Found(&a), Fetched::Found(&clean_risk())),
            vec![Reason::InsufficientFunds]
        );
    }

    #[test]
    fn limits_apply_per_payment_and_per_day() {
        let rich = account("50000.00", "USD");
        let p = payment("6000.00", "USD", "p_789");
        assert_eq!(
            reasons(&p, Fetched::Found(&rich), Fetched::Found(&clean_risk())),
            vec![Reason::LimitExceeded]
        );
        let mut spent = rich.clone();
        spent.outflow_day = 1;
        spent.outflow_minor = 900_000;
        let p = payment("1000.01", "USD", "p_789");
        let r = reasons(&p, Fetched::Found(&spent), Fetched::Found(&clean_risk()));
        assert_eq!(r, vec![Reason::LimitExceeded]);
        // Yesterday's outflow does not count today.
        spent.outflow_day = 0;
        let r = reasons(&p, Fetched::Found(&spent), Fetched::Found(&clean_risk()));
        assert!(r.is_empty(), "{r:?}");
    }

    #[test]
    fn unknown_customers_and_other_currencies_are_blocked() {
        let p = payment("10.00", "USD", "p_789");
        assert_eq!(
            reasons(&p, Fetched::Missing, Fetched::Missing),
            vec![Reason::UnknownCustomer]
        );
        let r = reasons(
            &p,
            Fetched::Found(&account("2000.00", "EUR")),
            Fetched::Found(&clean_risk()),
        );
        assert_eq!(r, vec![Reason::CurrencyMismatch]);
    }

    #[test]
    fn high_amounts_need_a_known_device_and_payee() {
        let a = account("5000.00", "USD");
        let p = payment("1200.00", "USD", "p_789");
        let moved = RiskProfile {
            device_change: true,
            ..clean_risk()
        };
        assert_eq!(
            reasons(&p, Fetched::Found(&a), Fetched::Found(&moved)),
            vec![Reason::NewDeviceHighAmount]
        );
        let stranger = RiskProfile {
            known_payee: false,
            ..clean_risk()
        };
        assert_eq!(
            reasons(&p, Fetched::Found(&a), Fetched::Found(&stranger)),
            vec![Reason::NewPayeeHighAmount]
        );
        // Just below the threshold nothing fires.
        let p = payment("999.99", "USD", "p_789");
        assert!(reasons(&p, Fetched::Found(&a), Fetched::Found(&stranger)).is_empty());
    }

    #[test]
    fn block_reasons_come_before_review_reasons() {
        let p = payment("1500.00", "USD", "p_blocked");
        let stranger = RiskProfile {
            known_payee: false,
            recent_disputes: 3,
            ..clean_risk()
        };
        let r = reasons(
            &p,
            Fetched::Found(&account("1000.00", "USD")),
            Fetched::Found(&stranger),
        );
        assert_eq!(
            r,
            vec![
                Reason::InsufficientFunds,
                Reason::BlockedPayee,
                Reason::RecentDisputes,
                Reason::NewPayeeHighAmount
            ]
        );
    }

    #[test]
    fn velocity_counts_the_window() {
        let p = payment("1.00", "USD", "p_789");
        let busy = RiskProfile {
            recent_payments: 10,
            ..clean_risk()
        };
        let a = account("100.00", "USD");
        assert_eq!(
            reasons(&p, Fetched::Found(&a), Fetched::Found(&busy)),
            vec![Reason::HighVelocity]
        );
        let calm = RiskProfile {
            recent_payments: 9,
            ..clean_risk()
        };
        assert!(reasons(&p, Fetched::Found(&a), Fetched::Found(&calm)).is_empty());
    }

    #[test]
    fn missing_data_never_allows() {
        let p = payment("1.00", "USD", "p_789");
        let r = reasons(&p, Fetched::Unavailable, Fetched::Unavailable);
        assert_eq!(
            r,
            vec![Reason::BalanceUnavailable, Reason::RiskSignalsUnavailable]
        );
        let findings = evaluate(
            &policy(),
            &Facts {
                payment: &p,
                account: Fetched::Found(&account("100.00", "USD")),
                risk: Fetched::Unavailable,
                day: 1,
            },
        );
        assert_eq!(decision_of(&findings), Decision::Review);
    }
}
