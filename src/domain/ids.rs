//! Identifiers that cross the API, each parsed once at the edge.

use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("must be 1 to {max} characters")]
    Length { max: usize },
    #[error("may only contain letters, digits and _ . : -")]
    Charset,
    #[error("may only contain printable ASCII characters")]
    NotPrintable,
}

/// `[A-Za-z0-9_.:-]{1,64}`: the shape of customer and payee ids.
fn parse_entity_id(raw: &str) -> Result<String, IdError> {
    if raw.is_empty() || raw.len() > 64 {
        return Err(IdError::Length { max: 64 });
    }
    if !raw
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
    {
        return Err(IdError::Charset);
    }
    Ok(raw.to_owned())
}

macro_rules! entity_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, Debug)]
        pub struct $name(String);

        impl $name {
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                parse_entity_id(raw).map(Self)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

entity_id!(
    /// The bank's id of the paying customer.
    CustomerId
);
entity_id!(
    /// The bank's id of the payee.
    PayeeId
);

impl CustomerId {
    /// The id as logs may show it: two leading and two trailing characters,
    /// e.g. `c_***23`. Short ids are masked whole.
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

impl PayeeId {
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

fn mask(id: &str) -> String {
    // Ids are ASCII (checked in `parse`), so byte slicing is safe.
    if id.len() <= 4 {
        return "***".to_owned();
    }
    format!("{}***{}", &id[..2], &id[id.len() - 2..])
}

/// The client's idempotency key: 1–255 printable ASCII characters.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        if raw.is_empty() || raw.len() > 255 {
            return Err(IdError::Length { max: 255 });
        }
        if !raw.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(IdError::NotPrintable);
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The id of one request, echoed in `X-Request-Id` and in every body.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RequestId(String);

impl RequestId {
    pub fn generate() -> Self {
        Self(format!("req_{}", random_suffix()))
    }

    /// Keeps a caller's id if it is safe to echo and log: 1–64 chars of `[A-Za-z0-9_.:-]`.
    pub fn from_header(raw: &str) -> Option<Self> {
        parse_entity_id(raw).ok().map(Self)
    }

    /// A stored id, read back for a replay.
    pub fn from_stored(raw: String) -> Self {
        Self(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A new unique id with a type prefix, e.g. `res_…` for reservations, `case_…` for cases.
///
/// UUIDv7: a millisecond timestamp, then 74 random bits. Ids made close in time sort close
/// together, so each new row lands at the end of its table's primary-key index instead of
/// on a random page of it, which the writer would have to read, change and log again.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_ids_accept_the_documented_alphabet() {
        assert!(CustomerId::parse("c_123").is_ok());
        assert!(CustomerId::parse("A.b:c-d_9").is_ok());
        assert!(CustomerId::parse(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn entity_ids_refuse_odd_or_long_values() {
        assert_eq!(CustomerId::parse(""), Err(IdError::Length { max: 64 }));
        assert_eq!(
            PayeeId::parse(&"x".repeat(65)),
            Err(IdError::Length { max: 64 })
        );
        for bad in ["c 123", "c/1", "c_é", "c\n1", "c;drop", "<script>"] {
            assert_eq!(CustomerId::parse(bad), Err(IdError::Charset), "{bad:?}");
        }
    }

    #[test]
    fn customer_ids_are_masked_for_logs() {
        assert_eq!(CustomerId::parse("c_123").unwrap().masked(), "c_***23");
        assert_eq!(CustomerId::parse("c_1").unwrap().masked(), "***");
    }

    #[test]
    fn idempotency_keys_are_printable_ascii_up_to_255() {
        assert!(IdempotencyKey::parse("uuid-1").is_ok());
        assert!(IdempotencyKey::parse("a key with spaces ~!").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
        assert!(IdempotencyKey::parse("").is_err());
        assert_eq!(
            IdempotencyKey::parse("tab\there"),
            Err(IdError::NotPrintable)
        );
        assert_eq!(IdempotencyKey::parse("ключ"), Err(IdError::NotPrintable));
    }

    #[test]
    fn request_ids_are_generated_or_kept_when_safe() {
        assert!(RequestId::generate().as_str().starts_with("req_"));
        assert_eq!(
            RequestId::from_header("abc-123").unwrap().as_str(),
            "abc-123"
        );
        assert!(RequestId::from_header("bad id\r\n").is_none());
    }
}
