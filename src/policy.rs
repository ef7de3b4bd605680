//! The decision policy: thresholds and lists, read from a TOML file at start-up.
//!
//! Amounts are exact decimals in the account's currency; rules convert them to the
//! currency's minor units when they compare.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::Deserialize;

/// The shipped default policy (`policy/default.toml`).
pub const DEFAULT_POLICY: &str = include_str!("../policy/default.toml");

/// Largest threshold a policy may set, in major units: far above any real limit, and small
/// enough that every currency's minor units fit in an `i64`.
const MAX_THRESHOLD: i64 = 1_000_000_000_000;

/// A threshold, read exactly: a decimal string (`"1000.00"`) or a whole number (`1000`). One
/// that a decimal cannot hold exactly is refused, not rounded (rounding up would raise a
/// limit), and so is a TOML float, which is binary.
fn exact_decimal<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
    struct Exact;
    impl serde::de::Visitor<'_> for Exact {
        type Value = Decimal;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a decimal string such as \"1000.00\", or a whole number")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Decimal, E> {
            Err(E::custom(format!(
                "{v} is a binary float: write it as a string, e.g. \"1000.00\""
            )))
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Decimal, E> {
            Decimal::from_str_exact(text).map_err(|_| {
                E::custom(format!(
                    "{text:?} is not an exact decimal such as \"1000.00\""
                ))
            })
        }
    }
    deserializer.deserialize_any(Exact)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(deserialize_with = "exact_decimal")]
    pub high_amount: Decimal,
    #[serde(deserialize_with = "exact_decimal")]
    pub per_payment_limit: Decimal,
    #[serde(deserialize_with = "exact_decimal")]
    pub daily_limit: Decimal,
    pub blocked_payees: HashSet<String>,
    pub recent_disputes_threshold: u32,
    pub velocity: Velocity,
    pub tools: ToolPolicy,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Velocity {
    pub max_payments: u32,
    pub window_secs: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolPolicy {
    pub deadline_ms: u64,
    pub max_attempts: u32,
    pub retry_backoff_ms: u64,
}

impl ToolPolicy {
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }
    pub fn backoff(&self) -> Duration {
        Duration::from_millis(self.retry_backoff_ms)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid policy: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid policy: {0}")]
    Invalid(&'static str),
}

impl Policy {
    /// The daily limit in `currency`'s minor units: what the rules and the commit-time
    /// reservation check compare today's outflow against.
    pub fn daily_limit_minor(&self, currency: crate::domain::Currency) -> i64 {
        crate::domain::Money::threshold_minor(self.daily_limit, currency)
    }

    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let policy: Policy = toml::from_str(text)?;
        policy.check()?;
        Ok(policy)
    }

    pub fn load(path: Option<&Path>) -> Result<Self, PolicyError> {
        match path {
            None => Self::parse(DEFAULT_POLICY),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                Self::parse(&text)
            }
        }
    }

    fn check(&self) -> Result<(), PolicyError> {
        let most = Decimal::from(MAX_THRESHOLD);
        for (value, what) in [
            (
                self.high_amount,
                "high_amount must be positive and at most 10^12",
            ),
            (
                self.per_payment_limit,
                "per_payment_limit must be positive and at most 10^12",
            ),
            (
                self.daily_limit,
                "daily_limit must be positive and at most 10^12",
            ),
        ] {
            if value <= Decimal::ZERO || value > most {
                return Err(PolicyError::Invalid(what));
            }
        }
        if self.tools.deadline_ms > 60_000 {
            return Err(PolicyError::Invalid(
                "tools.deadline_ms must be at most 60000",
            ));
        }
        if self.tools.retry_backoff_ms > 10_000 {
            return Err(PolicyError::Invalid(
                "tools.retry_backoff_ms must be at most 10000",
            ));
        }
        if self.velocity.window_secs > 31 * 86_400 {
            return Err(PolicyError::Invalid(
                "velocity.window_secs must be at most 31 days",
            ));
        }
        if self.tools.max_attempts == 0 || self.tools.max_attempts > 10 {
            return Err(PolicyError::Invalid("tools.max_attempts must be 1..=10"));
        }
        if self.tools.deadline_ms == 0 {
            return Err(PolicyError::Invalid("tools.deadline_ms must be positive"));
        }
        if self.velocity.window_secs == 0 {
            return Err(PolicyError::Invalid(
                "velocity.window_secs must be positive",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_policy_has_the_documented_defaults() {
        let p = Policy::parse(DEFAULT_POLICY).unwrap();
        assert_eq!(p.high_amount, Decimal::new(100000, 2));
        assert_eq!(p.per_payment_limit, Decimal::new(500000, 2));
        assert_eq!(p.daily_limit, Decimal::new(1000000, 2));
        assert!(p.blocked_payees.contains("p_blocked"));
        assert_eq!(p.recent_disputes_threshold, 2);
        assert_eq!(p.velocity.max_payments, 10);
        assert_eq!(p.velocity.window_secs, 600);
    }

    #[test]
    fn a_bad_policy_is_refused_at_load() {
        let bad = DEFAULT_POLICY.replace("\"5000.00\"", "\"-1\"");
        assert!(Policy::parse(&bad).is_err());
        let unknown = format!("{DEFAULT_POLICY}\nsurprise = 1\n");
        assert!(Policy::parse(&unknown).is_err());
        assert!(Policy::parse("high_amount = 1000.0").is_err());
        let huge = DEFAULT_POLICY.replace("\"10000.00\"", "\"79228162514264337593543950335\"");
        assert!(Policy::parse(&huge).is_err());
        let long = DEFAULT_POLICY.replace("window_secs = 600", "window_secs = 99999999999");
        assert!(Policy::parse(&long).is_err());
        // Rounded to fit a decimal, this would be a 5000.00 limit instead of 4999.99.
        let inexact =
            DEFAULT_POLICY.replace("\"5000.00\"", "\"4999.9999999999999999999999999999999\"");
        let err = Policy::parse(&inexact).unwrap_err().to_string();
        assert!(err.contains("not an exact decimal"), "{err}");
        let float = DEFAULT_POLICY.replace("\"5000.00\"", "5000.0");
        let err = Policy::parse(&float).unwrap_err().to_string();
        assert!(err.contains("binary float"), "{err}");
    }

    #[test]
    fn a_whole_number_threshold_needs_no_quotes() {
        let whole = DEFAULT_POLICY.replace("\"5000.00\"", "5000");
        let p = Policy::parse(&whole).unwrap();
        assert_eq!(p.per_payment_limit, Decimal::new(500000, 2));
    }
}
