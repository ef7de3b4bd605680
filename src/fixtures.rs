//! Customer fixtures: the accounts and risk profiles a fresh store is seeded with.

use std::path::Path;

use serde::Deserialize;

use crate::domain::{AmountError, Currency, CustomerId, Money, PayeeId};

/// The shipped demo customers (`fixtures/customers.json`).
pub const DEMO_CUSTOMERS: &str = include_str!("../fixtures/customers.json");

/// One customer, checked: ids are valid, the balance is exact in the account's currency.
#[derive(Clone, Debug)]
pub struct CustomerFixture {
    pub customer: CustomerId,
    pub balance: Money,
    pub recent_disputes: u32,
    pub device_change: bool,
    pub home_country: Option<String>,
    pub known_payees: Vec<PayeeId>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    customers: Vec<Row>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Row {
    customer_id: String,
    currency: String,
    balance: String,
    #[serde(default)]
    recent_disputes: u32,
    #[serde(default)]
    device_change: bool,
    #[serde(default)]
    home_country: Option<String>,
    #[serde(default)]
    known_payees: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("cannot read fixtures file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid fixtures: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("invalid fixtures: customer #{index}: {problem}")]
    Invalid { index: usize, problem: String },
}

pub fn parse(text: &str) -> Result<Vec<CustomerFixture>, FixtureError> {
    let file: FileFormat = serde_json::from_str(text)?;
    let customers: Vec<CustomerFixture> = file
        .customers
        .into_iter()
        .enumerate()
        .map(|(index, row)| {
            let invalid = |problem: String| FixtureError::Invalid { index, problem };
            let currency =
                Currency::parse(&row.currency).map_err(|e| invalid(format!("currency: {e}")))?;
            // A zero balance is a legitimate account ("0", "0.00"); amounts otherwise follow
            // the request rules.
            let balance = match Money::parse(&row.balance, currency) {
                Err(AmountError::NotPositive)
                    if row.balance.trim_start_matches(['0', '.']).is_empty() =>
                {
                    Money::from_minor(0, currency)
                }
                parsed => parsed.map_err(|e| invalid(format!("balance: {e}")))?,
            };
            Ok(CustomerFixture {
                customer: CustomerId::parse(&row.customer_id)
                    .map_err(|e| invalid(format!("customerId: {e}")))?,
                balance,
                recent_disputes: row.recent_disputes,
                device_change: row.device_change,
                home_country: row.home_country,
                known_payees: row
                    .known_payees
                    .iter()
                    .map(|p| PayeeId::parse(p))
                    .collect::<Result<_, _>>()
                    .map_err(|e| invalid(format!("knownPayees: {e}")))?,
            })
        })
        .collect::<Result<_, FixtureError>>()?;
    // Each customer is one account: a second entry would fail the seeding half-way.
    let mut first_at = std::collections::HashMap::new();
    for (index, fixture) in customers.iter().enumerate() {
        if let Some(first) = first_at.insert(fixture.customer.as_str(), index) {
            return Err(FixtureError::Invalid {
                index,
                problem: format!(
                    "customerId {} is given twice (first as customer #{first})",
                    fixture.customer.as_str()
                ),
            });
        }
    }
    Ok(customers)
}

pub fn load(path: Option<&Path>) -> Result<Vec<CustomerFixture>, FixtureError> {
    match path {
        None => parse(DEMO_CUSTOMERS),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| FixtureError::Read {
                path: path.display().to_string(),
                source,
            })?;
            parse(&text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_customers_are_shipped_with_the_documented_values() {
        let all = parse(DEMO_CUSTOMERS).unwrap();
        let get = |id: &str| all.iter().find(|c| c.customer.as_str() == id).unwrap();
        let c123 = get("c_123");
        assert_eq!(c123.balance.to_string(), "300.00");
        assert_eq!(c123.balance.currency().code(), "USD");
        assert_eq!(c123.recent_disputes, 2);
        assert!(c123.device_change);
        assert_eq!(get("c_456").balance.minor(), 100000);
        assert_eq!(get("c_789").balance.minor(), 5000);
        assert_eq!(get("c_eur").balance.currency().code(), "EUR");
        assert_eq!(get("c_rich").balance.minor(), 5000000);
        assert!(get("c_newdev").device_change);
        for c in &all {
            assert!(c.known_payees.iter().any(|p| p.as_str() == "p_789"));
        }
    }

    #[test]
    fn a_zero_balance_is_an_account_too() {
        for zero in ["0", "0.00", "0.0"] {
            let text = format!(
                r#"{{"customers":[{{"customerId":"c1","currency":"USD","balance":"{zero}"}}]}}"#
            );
            assert_eq!(parse(&text).unwrap()[0].balance.minor(), 0, "{zero}");
        }
        assert!(
            parse(r#"{"customers":[{"customerId":"c1","currency":"USD","balance":"-1"}]}"#)
                .is_err()
        );
    }

    #[test]
    fn a_customer_given_twice_is_refused_naming_both_entries() {
        let err = parse(
            r#"{"customers":[
                {"customerId":"c_1","currency":"USD","balance":"1"},
                {"customerId":"c_2","currency":"USD","balance":"1"},
                {"customerId":"c_1","currency":"EUR","balance":"2"}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("customer #2"), "{err}");
        assert!(
            err.contains("c_1 is given twice (first as customer #0)"),
            "{err}"
        );
    }

    #[test]
    fn bad_fixtures_name_the_customer_and_field() {
        let err = parse(r#"{"customers":[{"customerId":"c 1","currency":"USD","balance":"1"}]}"#)
            .unwrap_err();
        assert!(err.to_string().contains("customerId"), "{err}");
        let err =
            parse(r#"{"customers":[{"customerId":"c1","currency":"USD","balance":"1.001"}]}"#)
                .unwrap_err();
        assert!(err.to_string().contains("balance"), "{err}");
    }
}
