//! Storage: one trait, one method per use case, and the SQL lives only below this module.
//!
//! The embedded default is SQLite ([`sqlite::SqliteStore`]); many instances share PostgreSQL
//! ([`postgres::PostgresStore`]). The backend is picked once at start-up from the scheme of
//! `DATABASE_URL`.
//!
//! # Idempotency contract
//! A decision is stored together with its response body, under the caller's identity and the
//! client's idempotency key, in the same transaction as the reservation or the case it made.
//! * [`Store::begin_idempotent`] either claims the key for this request ([`Begin::Fresh`]),
//!   or returns the stored answer ([`Begin::Replay`]), or says the key belongs to another
//!   payment ([`Begin::Mismatch`]) or to a request still running ([`Begin::InProgress`]).
//!   Given the payment's [`ReadsRequest`], a fresh claim comes with what the tools will read
//!   ([`PaymentReads`]), fetched in the same round trip.
//! * The claim is released when the [`Claim`] is dropped, committed or not.
//! * The unique key in the database is the final word: if two executions ever reach commit
//!   with one key, the second is rolled back whole and answers with the first one's response
//!   ([`CommitOutcome::Duplicate`]).

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::agent::Outcome;
use crate::domain::{CustomerId, IdempotencyKey, Money, PayeeId, Payment, Reason, RequestId};
use crate::fixtures::CustomerFixture;

pub type DynStore = Arc<dyn Store>;

/// The balance side of an account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub customer: CustomerId,
    pub balance: Money,
    pub reserved_minor: i64,
    /// UTC day number (days since the epoch) that `outflow_minor` counts.
    pub outflow_day: i64,
    pub outflow_minor: i64,
}

impl Account {
    pub fn available_minor(&self) -> i64 {
        self.balance.minor() - self.reserved_minor
    }

    /// What counts against `day`'s limit: the counter of that day, or of a later one when the
    /// account has moved on (a request stamped before midnight that commits after one of the
    /// new day counts toward the new day); nothing if the counter belongs to an earlier day.
    pub fn outflow_on(&self, day: i64) -> i64 {
        if self.outflow_day >= day {
            self.outflow_minor
        } else {
            0
        }
    }
}

/// What the risk tool knows of a customer and this payee.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RiskProfile {
    pub recent_disputes: u32,
    pub device_change: bool,
    pub home_country: Option<String>,
    /// The customer has paid this payee before (or the bank told us they know each other).
    pub known_payee: bool,
    /// Decisions made for this customer since the start of the velocity window, counted up
    /// to the velocity rule's limit: the count never goes past `max_payments`.
    pub recent_payments: u32,
}

/// The account and risk profile of one payment's customer, read together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PaymentReads {
    pub account: Option<Account>,
    pub risk: Option<RiskProfile>,
}

/// What the tools will read about a payment: its customer's account and risk profile, this
/// payee's familiarity, and the customer's payments since `velocity_since_ms`, counted up to
/// `velocity_cap` (the velocity rule only asks whether there are that many).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadsRequest {
    pub customer: CustomerId,
    pub payee: PayeeId,
    pub velocity_since_ms: i64,
    pub velocity_cap: u32,
}

/// The tools' reads made alongside a claim, if they worked: a failed one is left to the
/// tools, which read again with their own deadlines and retries.
pub fn prefetched(fetched: Option<Result<PaymentReads, StoreError>>) -> Option<PaymentReads> {
    match fetched.transpose() {
        Ok(fetched) => fetched,
        Err(e) => {
            tracing::warn!(event = "store.prefetch_failed", error = %e);
            None
        }
    }
}

/// Who asked (the API key's identity) and under which key: the scope of idempotency.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyScope {
    pub caller: Arc<str>,
    pub key: IdempotencyKey,
}

impl IdempotencyScope {
    /// One string for the pair, for in-process maps of claims.
    pub fn local_key(&self) -> String {
        format!("{}\u{0}{}", self.caller, self.key.as_str())
    }
}

/// Reasons as stored: the JSON array of their wire names.
pub fn reasons_json(reasons: &[Reason]) -> String {
    serde_json::to_string(reasons).unwrap_or_else(|_| "[]".into())
}

/// A response kept for replay.
#[derive(Clone, Debug)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Bytes,
    pub request_id: RequestId,
}

/// Holds an idempotency key for one request; releases it when dropped.
pub struct Claim {
    release: Option<Box<dyn FnOnce() + Send>>,
}

impl Claim {
    pub fn new(release: impl FnOnce() + Send + 'static) -> Self {
        Claim {
            release: Some(Box::new(release)),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

pub enum Begin {
    /// The key is this request's; with the tools' reads when they were asked for and could
    /// be made alongside (`None`: the tools read for themselves).
    Fresh(Claim, Option<PaymentReads>),
    Replay(StoredResponse),
    Mismatch,
    InProgress,
    /// The key was free and the decision was made and committed in the same trip (see
    /// [`Store::begin_deciding`]).
    Decided(Claim, CommitOutcome),
}

/// Makes the decision from the tools' reads where they were made, at once; `None` if it
/// cannot be made that way (a tool has to run), or must not be committed any more (the
/// request timed out). See [`Store::begin_deciding`].
pub type DecideNow = Box<dyn FnOnce(&PaymentReads) -> Option<DecisionRecord> + Send>;

/// A stored answer found for a key.
pub enum Lookup {
    Replay(StoredResponse),
    Mismatch,
}

/// Everything one decision writes, in one transaction.
#[derive(Debug)]
pub struct DecisionRecord {
    pub scope: IdempotencyScope,
    pub fingerprint: [u8; 32],
    pub request_id: RequestId,
    pub payment: Payment,
    pub outcome: Outcome,
    /// Used if the decision is `allow` and the funds are reserved.
    pub reservation_id: String,
    /// Used if the decision is `review` or `block`.
    pub case_id: String,
    pub now_ms: i64,
    pub idempotency_expires_ms: i64,
    /// The daily limit in the payment currency's minor units, checked again at commit.
    pub daily_limit_minor: i64,
}

impl DecisionRecord {
    pub fn day(&self) -> i64 {
        self.now_ms.div_euclid(86_400_000)
    }

    /// The reservation did not fit at commit, with `available` and today's `outflow` (minor
    /// units) as the account has them now: see [`refuse_reservation`].
    pub fn refuse_reservation(&mut self, available: i64, outflow: i64) {
        refuse_reservation(&self.payment, &mut self.outcome, available, outflow);
    }

    pub fn response_body(&self) -> Vec<u8> {
        self.outcome.render(
            &self.request_id,
            &self.reservation_id,
            &self.case_id,
            &self.payment,
        )
    }
}

/// The reservation of `payment` did not fit at commit, with `available` and today's `outflow`
/// (minor units) as the account has them now: a concurrent payment took the funds or reached
/// the daily limit. The answer becomes a block, and the trace says why.
pub fn refuse_reservation(payment: &Payment, outcome: &mut Outcome, available: i64, outflow: i64) {
    let amount = payment.amount;
    let show = |minor| crate::domain::format_minor(minor, amount.currency().exponent());
    let (reason, detail) = if amount.minor() > available {
        (
            Reason::InsufficientFunds,
            format!(
                "reservation refused: a concurrent payment took the funds (available={})",
                show(available)
            ),
        )
    } else {
        (
            Reason::LimitExceeded,
            format!(
                "reservation refused: concurrent payments reached the daily limit (today's outflow={})",
                show(outflow)
            ),
        )
    };
    outcome.refuse_at_commit(reason, detail);
}

pub struct Committed {
    pub outcome: Outcome,
    pub body: Bytes,
    pub reservation_id: Option<String>,
    pub case_id: Option<String>,
}

pub enum CommitOutcome {
    Committed(Box<Committed>),
    /// Another execution already stored an answer for this key; nothing was written.
    Duplicate,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage error: {0}")]
    Internal(String),
    /// The write was committed but could not be made durable (a failed sync): it may or
    /// may not survive a restart.
    #[error("storage outcome unknown: {0}")]
    OutcomeUnknown(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which engine this is, for logs and `/readyz`.
    fn engine(&self) -> &'static str;

    /// Claims the key (see the module doc). With `reads`, a fresh claim also carries what
    /// the tools will read for the payment, read in the same round trip as the claim.
    async fn begin_idempotent(
        &self,
        scope: &IdempotencyScope,
        fingerprint: &[u8; 32],
        now_ms: i64,
        reads: Option<&ReadsRequest>,
    ) -> Result<Begin, StoreError>;

    /// [`Store::begin_idempotent`] with the tools' reads, and then, for a fresh claim whose
    /// reads worked, `decide` run on them and its decision committed, all in one trip to
    /// the database ([`Begin::Decided`]). A store that cannot do so, or a `decide` that
    /// gives no decision, leaves the claim to the caller ([`Begin::Fresh`]), as
    /// `begin_idempotent` does.
    async fn begin_deciding(
        &self,
        scope: &IdempotencyScope,
        fingerprint: &[u8; 32],
        now_ms: i64,
        reads: &ReadsRequest,
        _decide: DecideNow,
    ) -> Result<Begin, StoreError> {
        self.begin_idempotent(scope, fingerprint, now_ms, Some(reads))
            .await
    }

    async fn find_response(
        &self,
        scope: &IdempotencyScope,
        fingerprint: &[u8; 32],
        now_ms: i64,
    ) -> Result<Option<Lookup>, StoreError>;

    /// What both tools need about one payment, read in one snapshot and one round trip:
    /// the account's balance side and its risk profile, with this payee's familiarity and
    /// the payments since `velocity_since_ms` (up to `velocity_cap`). Both are `None` when
    /// there is no such account.
    async fn payment_reads(&self, request: &ReadsRequest) -> Result<PaymentReads, StoreError>;

    /// Writes the reservation (allow) or the case (review/block), the decision and the
    /// idempotent response atomically. An `allow` whose reservation no longer fits is turned
    /// into a `block` before anything is written.
    async fn commit_decision(&self, record: DecisionRecord) -> Result<CommitOutcome, StoreError>;

    /// Deletes idempotency records that expired before `now_ms`; returns how many.
    async fn purge_expired(&self, now_ms: i64) -> Result<u64, StoreError>;

    /// Loads customers if the store has none; returns how many were loaded.
    async fn seed_if_empty(&self, customers: &[CustomerFixture]) -> Result<usize, StoreError>;

    async fn ping(&self) -> Result<(), StoreError>;

    /// Finishes pending writes and closes connections.
    async fn close(&self);

    /// Cases, newest first, optionally of one status.
    async fn list_cases(
        &self,
        status: Option<CaseStatus>,
        limit: u32,
    ) -> Result<Vec<Case>, StoreError>;

    async fn case(&self, id: &str) -> Result<Option<Case>, StoreError>;

    /// Approves (reserving the funds if they are still there) or declines an open case.
    async fn resolve_case(&self, resolution: CaseResolution) -> Result<Resolved, StoreError>;

    async fn reservation(&self, id: &str) -> Result<Option<Reservation>, StoreError>;

    /// Captures (the money leaves the balance) or releases (it becomes available again) a
    /// held reservation.
    async fn settle_reservation(
        &self,
        id: &str,
        to: Settlement,
        now_ms: i64,
    ) -> Result<Settled, StoreError>;

    /// Releases reservations held since before `created_before_ms`; returns how many.
    async fn expire_reservations(
        &self,
        created_before_ms: i64,
        now_ms: i64,
    ) -> Result<u64, StoreError>;
}

/// Where a case stands in review.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum CaseStatus {
    Open,
    Approved,
    Declined,
}

impl CaseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CaseStatus::Open => "open",
            CaseStatus::Approved => "approved",
            CaseStatus::Declined => "declined",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(CaseStatus::Open),
            "approved" => Some(CaseStatus::Approved),
            "declined" => Some(CaseStatus::Declined),
            _ => None,
        }
    }
}

/// A payment sent to review or blocked, with everything a reviewer needs.
#[derive(Clone, Debug)]
pub struct Case {
    pub id: String,
    pub status: CaseStatus,
    pub decision: crate::domain::Decision,
    pub reasons: Vec<Reason>,
    pub customer: String,
    pub payee: String,
    pub amount: Money,
    pub request_id: String,
    pub created_ms: i64,
    /// The agent trace, as stored with the decision.
    pub trace: serde_json::Value,
    pub resolved_ms: Option<i64>,
    pub resolution_note: Option<String>,
    /// The reservation an approval made.
    pub reservation_id: Option<String>,
}

/// A reviewer's verdict on a case.
#[derive(Clone, Debug)]
pub struct CaseResolution {
    pub case_id: String,
    pub approve: bool,
    pub note: Option<String>,
    /// Used when an approval reserves the funds.
    pub reservation_id: String,
    pub now_ms: i64,
    /// The daily limit in the case currency's minor units, checked when approving.
    pub daily_limit_minor: i64,
}

pub enum Resolved {
    Done(Box<Case>),
    NotFound,
    /// The case was resolved before; it is returned as it stands.
    AlreadyResolved(Box<Case>),
    /// The approval could not reserve the funds; the case stays open.
    Refused(Reason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReservationStatus {
    Held,
    Captured,
    Released,
    Expired,
}

impl ReservationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Held => "held",
            ReservationStatus::Captured => "captured",
            ReservationStatus::Released => "released",
            ReservationStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "held" => Some(ReservationStatus::Held),
            "captured" => Some(ReservationStatus::Captured),
            "released" => Some(ReservationStatus::Released),
            "expired" => Some(ReservationStatus::Expired),
            _ => None,
        }
    }
}

/// Funds held for an allowed (or approved) payment.
#[derive(Clone, Debug)]
pub struct Reservation {
    pub id: String,
    pub status: ReservationStatus,
    pub customer: String,
    pub payee: String,
    pub amount: Money,
    pub request_id: String,
    pub created_ms: i64,
    pub settled_ms: Option<i64>,
}

/// What happens to a held reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    Capture,
    Release,
}

pub enum Settled {
    Done(Reservation),
    NotFound,
    /// Only held reservations can be settled; this one is not.
    NotHeld(Reservation),
}

/// Why an approval could not reserve: from the account as it is now.
pub fn refusal_reason(account: Option<(&str, i64)>, currency: &str, amount_minor: i64) -> Reason {
    match account {
        None => Reason::UnknownCustomer,
        Some((c, _)) if c != currency => Reason::CurrencyMismatch,
        Some((_, available)) if available < amount_minor => Reason::InsufficientFunds,
        Some(_) => Reason::LimitExceeded,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Opens the store named by `database_url`, with the default PostgreSQL options.
pub async fn open(database_url: &str) -> anyhow::Result<DynStore> {
    open_with(database_url, postgres::PostgresOptions::default()).await
}

/// Opens the store named by `database_url`; `options` apply to PostgreSQL.
pub async fn open_with(
    database_url: &str,
    options: postgres::PostgresOptions,
) -> anyhow::Result<DynStore> {
    if let Some(path) = sqlite::path_from_url(database_url) {
        let store = sqlite::SqliteStore::open(&path)?;
        return Ok(Arc::new(store));
    }
    if postgres::is_postgres_url(database_url) {
        let store = postgres::PostgresStore::open(database_url, options).await?;
        return Ok(Arc::new(store));
    }
    anyhow::bail!(
        "DATABASE_URL must start with sqlite:// or postgres:// (got scheme {:?})",
        database_url.split(':').next().unwrap_or("")
    )
}

/// Creates an empty PostgreSQL database next to `base_url` and returns its URL (for tests
/// and the benchmark, which want a fresh database each run).
pub async fn postgres_test_database(base_url: &str) -> anyhow::Result<String> {
    postgres::create_test_database(base_url).await
}
