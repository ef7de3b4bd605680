//! The vocabulary of a payment decision: exact money, checked ids, and the outcome.

mod decision;
mod ids;
mod money;

pub use decision::{Decision, Reason, StepData, TraceStep};
pub use ids::{CustomerId, IdError, IdempotencyKey, PayeeId, RequestId, new_id};
pub use money::{
    AmountError, Currency, CurrencyError, MAX_MAJOR_UNITS, MinorUnits, Money, format_minor,
};

/// A payment request after parsing: nothing past the HTTP layer sees raw input.
#[derive(Clone, Debug)]
pub struct Payment {
    pub customer: CustomerId,
    pub payee: PayeeId,
    pub amount: Money,
    pub device_id: Option<String>,
    pub ip_country: Option<String>,
}

impl Payment {
    /// A digest of everything that makes two requests "the same payment", used to tell a
    /// retry (same digest) from a reused idempotency key (different digest). `125.5` and
    /// `125.50` are the same amount and so the same payment.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [
            self.customer.as_str(),
            self.payee.as_str(),
            self.amount.currency().code(),
            &self.amount.minor().to_string(),
            self.device_id.as_deref().unwrap_or("\u{0}"),
            self.ip_country.as_deref().unwrap_or("\u{0}"),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().into()
    }
}
