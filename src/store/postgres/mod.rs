//! The PostgreSQL store, for many instances sharing one database.
//!
//! # Money
//! A reservation is a conditional `UPDATE accounts … WHERE balance_minor - reserved_minor >=
//! amount` (and the daily limit). PostgreSQL re-checks that condition on the newest version of
//! the row after waiting for a concurrent writer (read committed), so payments racing on any
//! number of instances never reserve more than is available; the table's `CHECK`s are the
//! last line behind it.
//!
//! # One statement per decision
//! The common case, an `allow` whose funds are still there, is one statement: a chain of
//! CTEs that locks this request's idempotency claim, reserves, inserts the reservation, the
//! decision and the known payee, and completes the idempotency record. A single statement is
//! one transaction and one round trip: with pgbench on this schema (16 clients, 2 cores) it
//! carried about 1.6 times the decisions per second of the same writes sent as BEGIN,
//! SELECT … FOR UPDATE, UPDATE, INSERT…, COMMIT. Every step after the claim reads the
//! previous one's `RETURNING`, so when the claim is gone or the funds are not there, the
//! statement writes nothing. `review` and `block` are one statement too. Only an `allow`
//! refused at commit takes a transaction of its own: it reads the account under a row lock,
//! so the `commit` trace step states the balance that refused it, and writes the block and
//! its case.
//!
//! # Batches
//! Claims (with the tools' reads) and decision commits are not sent one statement per
//! request: requests that wait together go as one statement over arrays ([`batch`]), so
//! PostgreSQL parses, plans, runs and (for commits) flushes the WAL once for all of them.
//! `CLAIM_BATCH` claims every key of the batch and reads each fresh claim's account and risk;
//! `COMMIT_BATCH` writes every decision of the batch as the single-decision statements below
//! would, one after the other: it reserves funds for the allows whose claim still holds (a
//! batch never holds two allows of one account, so each conditional `UPDATE` sees the
//! account as the previous batch left it), and writes the case or reservation, the decision
//! and the stored response of each. An allow whose funds are gone is left to its own
//! transaction, as before. Each statement is atomic: if it fails, nothing of its batch is
//! written and every request in it gets the error.
//!
//! # Idempotency across instances
//! [`Store::begin_idempotent`] inserts the key as `in_progress` with a random owner token and
//! a lease. A duplicate on any instance then finds the row: `completed` → replay (or
//! mismatch), `in_progress` → 409. Commit only proceeds while this request still owns the
//! row (`owner = token`, locked `FOR UPDATE` in the same statement), so an execution whose
//! lease ran out and was taken over cannot write anything. A claim dropped without commit
//! deletes its row in the background; so does a claim whose caller gave up while its batch
//! was being written (the release then found no row yet, see [`batch`]). A claim left by a
//! crashed instance stops blocking its key when its lease expires.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use parking_lot::Mutex;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

mod batch;

use batch::{Answers, Batcher};

use super::{
    Account, Begin, Claim, CommitOutcome, Committed, DecisionRecord, IdempotencyScope, Lookup,
    PaymentReads, ReadsRequest, RiskProfile, Store, StoreError, StoredResponse, reasons_json,
};
use super::{
    Case, CaseResolution, CaseStatus, Reservation, ReservationStatus, Resolved, Settled,
    Settlement, refusal_reason,
};
use crate::domain::{Currency, CustomerId, Decision, Money, RequestId};
use crate::fixtures::CustomerFixture;

const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        include_str!("../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        include_str!("../../../migrations/postgres/0002_review.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/postgres/0003_hot_accounts.sql"),
    ),
];

/// Serialises migrations and seeding between instances starting at once (any constant will
/// do; it only has to be the same everywhere).
const SCHEMA_LOCK: i64 = 0x7061_796e_6f77; // "paynow"

/// How the pools and the idempotency claims behave.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// Connections kept by this instance for decision commits and everything else that must
    /// be durable when it answers.
    pub pool_size: usize,
    /// Connections kept by this instance for claims and reads, which need no durable commit
    /// (see [`PostgresStore`]'s `fast` pool).
    pub fast_pool_size: usize,
    /// How long an in-progress claim blocks its key if its instance dies without releasing
    /// it. Longer than any request may run (the request timeout stops them first).
    pub claim_lease: Duration,
    /// How long a request waits for a free connection (or to open one) before answering 503.
    pub connect_timeout: Duration,
}

/// The claim-and-read pool that goes with a commit pool of `pool_size`: claims and reads
/// hold a connection for one quick round trip each, commits for a WAL flush.
pub fn fast_pool_size(pool_size: usize) -> usize {
    (pool_size / 4).max(2)
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 32,
            fast_pool_size: fast_pool_size(32),
            claim_lease: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

pub struct PostgresStore {
    /// Connections with the server's `synchronous_commit` (on): decision commits wait for
    /// their WAL record to be flushed before anyone is answered.
    pool: Pool,
    /// Connections with `synchronous_commit=off`, for idempotency claims, their release and
    /// the tools' reads. A claim commit then costs no WAL flush of its own. That is safe: a
    /// claim lost in a server crash blocks nothing and fences nothing that was answered,
    /// because the decision that completes it is a durable commit, and flushing its WAL
    /// record flushes every earlier record, the claim's included. Reads write nothing, so
    /// the setting does not touch them; they simply stop queueing behind commits.
    fast: Pool,
    claim_lease_ms: i64,
    /// Owner tokens of the claims this instance holds, by scope. A duplicate arriving at the
    /// same instance is answered 409 without a round trip, and commit finds its token here.
    claims: Arc<Mutex<HashMap<String, String>>>,
    /// Claims (and the tools' reads) in batches, on the `fast` pool.
    claim_batches: Batcher<ClaimRow, ClaimAnswer>,
    /// Decision commits in batches, on the durable pool.
    commit_batches: Batcher<CommitRow, (bool, bool)>,
}

/// Most requests sent in one batched statement.
const MAX_BATCH: usize = 128;
/// Claim batches run at once. One: PostgreSQL's cost is mostly per statement, so the
/// requests that wait while a batch runs are worth more as the next, larger batch than as a
/// second statement beside it (measured: 1 in flight gave batches of 8 and 3.1k decisions/s;
/// 2 in flight, batches of 4.5 and 2.6k/s, on two cores shared with PostgreSQL).
const CLAIM_BATCHES_IN_FLIGHT: usize = 1;
/// Commit batches run at once, for the same reason.
const COMMIT_BATCHES_IN_FLIGHT: usize = 1;

/// One key to claim, with the payment the tools will read about if it is fresh.
struct ClaimRow {
    local_key: String,
    caller: Arc<str>,
    key: String,
    fingerprint: [u8; 32],
    owner: String,
    created_ms: i64,
    lease_until_ms: i64,
    reads: Option<ReadsRequest>,
}

/// The key's row as the claim left it, and the reads if the claim is ours.
struct ClaimAnswer {
    /// Set when the row is this claim's: what releasing it takes.
    ours: Option<HeldClaim>,
    state: String,
    fingerprint: Vec<u8>,
    status_code: Option<i32>,
    body: Option<Vec<u8>>,
    request_id: Option<String>,
    existed: bool,
    reads: Option<Result<PaymentReads, StoreError>>,
}

/// An `in_progress` row a claim wrote: its key and owner token.
struct HeldClaim {
    caller: Arc<str>,
    key: String,
    owner: String,
}

impl HeldClaim {
    /// Deletes the row in the background if it is still this claim's and still in progress,
    /// so a retry need not wait for the lease. Without a runtime (dropped outside async code,
    /// which is rare) the lease frees the key instead.
    fn release(self, pool: Pool) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let deleted = async {
                let client = pool.get().await.map_err(pool_error)?;
                client
                    .execute(
                        "DELETE FROM idempotency
                         WHERE caller = $1 AND key = $2 AND state = 'in_progress' AND owner = $3",
                        &[&&*self.caller, &self.key.as_str(), &self.owner.as_str()],
                    )
                    .await
                    .map_err(db_error)
            }
            .await;
            if let Err(e) = deleted {
                tracing::warn!(event = "idempotency.release_failed", error = %e,
                    "claim not released; it expires with its lease");
            }
        });
    }
}

/// One decision to commit, as `COMMIT_BATCH` takes it.
struct CommitRow {
    caller: String,
    key: String,
    owner: String,
    allow: bool,
    customer: String,
    payee: String,
    amount: i64,
    currency: String,
    day: i64,
    daily_limit: i64,
    /// The reservation's id for an allow, the case's for a review or block.
    record_id: String,
    decision: &'static str,
    reasons: String,
    /// The case's trace (empty for an allow).
    trace: String,
    request_id: String,
    now_ms: i64,
    body: Vec<u8>,
    expires_ms: i64,
}

impl CommitRow {
    fn new(rec: &DecisionRecord, owner: &str, body: &[u8]) -> Self {
        let allow = rec.outcome.decision == Decision::Allow;
        let currency = rec.payment.amount.currency();
        CommitRow {
            caller: rec.scope.caller.to_string(),
            key: rec.scope.key.as_str().to_owned(),
            owner: owner.to_owned(),
            allow,
            customer: rec.payment.customer.as_str().to_owned(),
            payee: rec.payment.payee.as_str().to_owned(),
            amount: rec.payment.amount.minor(),
            currency: currency.code().to_owned(),
            day: rec.day(),
            daily_limit: rec.daily_limit_minor,
            record_id: if allow {
                rec.reservation_id.clone()
            } else {
                rec.case_id.clone()
            },
            decision: rec.outcome.decision.as_str(),
            reasons: reasons_json(&rec.outcome.reasons),
            trace: if allow {
                String::new()
            } else {
                serde_json::to_string(&rec.outcome.trace).unwrap_or_else(|_| "[]".into())
            },
            request_id: rec.request_id.as_str().to_owned(),
            now_ms: rec.now_ms,
            body: body.to_vec(),
            expires_ms: rec.idempotency_expires_ms,
        }
    }
}

pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

fn db_error(e: tokio_postgres::Error) -> StoreError {
    // Without a SQLSTATE the connection failed; with one, only the classes that mean "the
    // server cannot serve now" are unavailability, the rest are our bugs.
    match e.code() {
        None => StoreError::Unavailable(causes(&e)),
        Some(code) => {
            let class = code.code().get(..2).unwrap_or_default();
            if matches!(class, "08" | "53" | "57" | "40") || code == &SqlState::LOCK_NOT_AVAILABLE {
                StoreError::Unavailable(causes(&e))
            } else {
                StoreError::Internal(causes(&e))
            }
        }
    }
}

/// An error and its causes on one line ("error connecting to server: Connection refused"):
/// the driver's own message alone rarely says what went wrong.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// Column `i` of `row`: a schema that does not match the code is an error, not a panic.
fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    i: usize,
) -> Result<T, StoreError> {
    row.try_get(i)
        .map_err(|e| StoreError::Internal(format!("column {i}: {}", causes(&e))))
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        // Whatever stops a new connection (refused, database closed to connections, auth) is
        // an outage from here, not a bug in a statement.
        deadpool_postgres::PoolError::Backend(e) => StoreError::Unavailable(causes(&e)),
        other => StoreError::Unavailable(causes(&other)),
    }
}

/// Appends session settings to the connection's startup options (after any the URL gave).
fn add_options(config: &mut tokio_postgres::Config, more: &str) {
    let options = match config.get_options() {
        Some(given) => format!("{given} {more}"),
        None => more.to_owned(),
    };
    config.options(&options);
}

/// Parses the URL and fills in what a service wants that URLs rarely say.
fn pg_config(url: &str, options: &PostgresOptions) -> anyhow::Result<tokio_postgres::Config> {
    let mut config = tokio_postgres::Config::from_str(url)
        .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a valid PostgreSQL URL: {e}"))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(options.connect_timeout);
    }
    if config.get_application_name().is_none() {
        config.application_name("paynow");
    }
    Ok(config)
}

fn make_pool(
    config: tokio_postgres::Config,
    size: usize,
    timeout: Duration,
) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            // A broken connection shows itself on first use and is replaced then; checking
            // each one on checkout would cost a round trip per request.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the PostgreSQL pool: {e}"))
}

/// Applies the migrations this database lacks, one transaction each, under an advisory lock
/// so that instances starting together do not race.
async fn migrate(client: &mut deadpool_postgres::Client) -> anyhow::Result<()> {
    client
        .batch_execute(&format!(
            "SELECT pg_advisory_lock({SCHEMA_LOCK});
             CREATE TABLE IF NOT EXISTS paynow_schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        ))
        .await?;
    let result = async {
        let applied: i32 = client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM paynow_schema_migrations",
                &[],
            )
            .await?
            .try_get(0)?;
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
            let tx = client.transaction().await?;
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO paynow_schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            tx.commit().await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    }
    .await;
    let unlocked = client
        .batch_execute(&format!("SELECT pg_advisory_unlock({SCHEMA_LOCK})"))
        .await;
    result?;
    unlocked?;
    Ok(())
}

impl PostgresStore {
    /// Connects, applies migrations, and keeps a pool of `options.pool_size` connections.
    pub async fn open(url: &str, options: PostgresOptions) -> anyhow::Result<Self> {
        let mut config = pg_config(url, &options)?;
        // Every statement this service runs finds its rows through an index. A plan cached
        // while a table was still small (a fresh database: the first seconds of traffic)
        // would otherwise keep its sequential scan, which becomes a full scan of the table
        // in every later batch, until an ANALYZE replaces the plan.
        add_options(&mut config, "-c enable_seqscan=off");
        let mut fast_config = config.clone();
        add_options(&mut fast_config, "-c synchronous_commit=off");
        let pool = make_pool(config, options.pool_size, options.connect_timeout)?;
        let fast = make_pool(fast_config, options.fast_pool_size, options.connect_timeout)?;
        let mut client = pool.get().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to PostgreSQL (DATABASE_URL): {}",
                causes(&e)
            )
        })?;
        migrate(&mut client)
            .await
            .map_err(|e| anyhow::anyhow!("cannot migrate the PostgreSQL database: {e:#}"))?;
        drop(client);
        // The claims pool sets a startup option that a pooler in front of PostgreSQL may
        // refuse: find that out now, not at the first payment.
        let probe = fast.get().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot open a PostgreSQL connection with synchronous_commit=off (DATABASE_URL): {}",
                causes(&e)
            )
        })?;
        drop(probe);
        let claim_batches = {
            let fast = fast.clone();
            Batcher::start(
                MAX_BATCH,
                CLAIM_BATCHES_IN_FLIGHT,
                |row: &ClaimRow| Some(row.local_key.as_str()),
                {
                    let fast = fast.clone();
                    move |rows| run_claims(fast.clone(), rows)
                },
                // The caller gave up while its claim was being written: its own release may
                // have run before the row existed, so the row is released here.
                move |answer: ClaimAnswer| {
                    if let Some(held) = answer.ours {
                        held.release(fast.clone());
                    }
                },
            )
        };
        let commit_batches = {
            let pool = pool.clone();
            Batcher::start(
                MAX_BATCH,
                COMMIT_BATCHES_IN_FLIGHT,
                // One statement cannot reserve twice on one account.
                |row: &CommitRow| row.allow.then_some(row.customer.as_str()),
                move |rows| run_commits(pool.clone(), rows),
                // A commit is the truth whoever waits for it: a retry replays it.
                |_| {},
            )
        };
        Ok(PostgresStore {
            pool,
            fast,
            claim_lease_ms: options.claim_lease.as_millis() as i64,
            claims: Arc::new(Mutex::new(HashMap::new())),
            claim_batches,
            commit_batches,
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// A connection that does not wait for WAL flushes: for claims and reads only.
    async fn fast_client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.fast.get().await.map_err(pool_error)
    }

    /// Forgets the local claim once its database row no longer needs releasing.
    fn settle_claim(&self, scope: &IdempotencyScope, token: &str) {
        let key = scope.local_key();
        let mut claims = self.claims.lock();
        if claims.get(&key).is_some_and(|t| t == token) {
            claims.remove(&key);
        }
    }

    fn claim_token(&self, scope: &IdempotencyScope) -> Option<String> {
        self.claims.lock().get(&scope.local_key()).cloned()
    }

    /// The claim's release: if commit did not settle it, delete the row it still owns, so a
    /// retry need not wait for the lease.
    fn release(&self, key: String, token: String, scope: IdempotencyScope) -> Claim {
        let claims = self.claims.clone();
        let pool = self.fast.clone();
        Claim::new(move || {
            let mut held = claims.lock();
            if held.get(&key) != Some(&token) {
                return;
            }
            held.remove(&key);
            drop(held);
            HeldClaim {
                caller: scope.caller,
                key: scope.key.as_str().to_owned(),
                owner: token,
            }
            .release(pool);
        })
    }

    /// Runs `ALLOW` on a pooled connection or in a transaction: (claim held, reserved and
    /// completed).
    async fn run_allow(
        client: &impl deadpool_postgres::GenericClient,
        rec: &DecisionRecord,
        token: &str,
        body: &[u8],
    ) -> Result<(bool, bool), StoreError> {
        let stmt = client.prepare_cached(ALLOW).await.map_err(db_error)?;
        let currency = rec.payment.amount.currency();
        let row = client
            .query_one(
                &stmt,
                &[
                    &&*rec.scope.caller,
                    &rec.scope.key.as_str(),
                    &token,
                    &rec.payment.amount.minor(),
                    &rec.day(),
                    &rec.payment.customer.as_str(),
                    &currency.code(),
                    &rec.daily_limit_minor,
                    &rec.reservation_id,
                    &rec.payment.payee.as_str(),
                    &rec.request_id.as_str(),
                    &rec.now_ms,
                    &reasons_json(&rec.outcome.reasons),
                    &body,
                    &rec.idempotency_expires_ms,
                ],
            )
            .await
            .map_err(db_error)?;
        Ok((col(&row, 0)?, col(&row, 1)?))
    }

    /// Runs `NOT_ALLOW`: the case, the decision, the stored response. False when the claim
    /// is lost (nothing written).
    async fn run_not_allow(
        client: &impl deadpool_postgres::GenericClient,
        rec: &DecisionRecord,
        token: &str,
        body: &[u8],
    ) -> Result<bool, StoreError> {
        let stmt = client.prepare_cached(NOT_ALLOW).await.map_err(db_error)?;
        let trace = serde_json::to_string(&rec.outcome.trace).unwrap_or_else(|_| "[]".into());
        let row = client
            .query_one(
                &stmt,
                &[
                    &&*rec.scope.caller,
                    &rec.scope.key.as_str(),
                    &token,
                    &rec.case_id,
                    &rec.payment.customer.as_str(),
                    &rec.payment.payee.as_str(),
                    &rec.payment.amount.minor(),
                    &rec.payment.amount.currency().code(),
                    &rec.outcome.decision.as_str(),
                    &reasons_json(&rec.outcome.reasons),
                    &trace,
                    &rec.request_id.as_str(),
                    &rec.now_ms,
                    &body,
                    &rec.idempotency_expires_ms,
                ],
            )
            .await
            .map_err(db_error)?;
        col(&row, 0)
    }

    /// The allow lost its funds (or the daily limit) between the agent's look and commit.
    /// Under the account's row lock, either it fits again (another payment was released) and
    /// is reserved, or it becomes a block whose trace states what refused it.
    async fn commit_refused(
        &self,
        mut rec: DecisionRecord,
        token: &str,
    ) -> Result<CommitOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        let currency = rec.payment.amount.currency();
        let amount = rec.payment.amount.minor();
        let day = rec.day();
        let now: Option<(i64, i64, String)> = tx
            .query_opt(
                "SELECT balance_minor - reserved_minor,
                        CASE WHEN outflow_day >= $2 THEN outflow_minor ELSE 0 END,
                        currency
                 FROM accounts WHERE customer_id = $1 FOR UPDATE",
                &[&rec.payment.customer.as_str(), &day],
            )
            .await
            .map_err(db_error)?
            .map(|r| Ok::<_, StoreError>((col(&r, 0)?, col(&r, 1)?, col(&r, 2)?)))
            .transpose()?;
        let (available, outflow, account_currency) =
            now.unwrap_or((0, 0, currency.code().to_owned()));
        let fits = account_currency == currency.code()
            && amount <= available
            && outflow + amount <= rec.daily_limit_minor;

        if fits {
            let body = rec.response_body();
            let (claimed, completed) = Self::run_allow(&tx, &rec, token, &body).await?;
            if claimed && completed {
                tx.commit().await.map_err(db_error)?;
                return Ok(committed(rec, body, true));
            }
            // Still refused or no longer ours: roll back and fall through to what follows.
            tx.rollback().await.map_err(db_error)?;
            if !claimed {
                return Ok(CommitOutcome::Duplicate);
            }
            return Err(StoreError::Internal(
                "reservation refused under the account's row lock".into(),
            ));
        }

        rec.refuse_reservation(available, outflow);
        let body = rec.response_body();
        if Self::run_not_allow(&tx, &rec, token, &body).await? {
            tx.commit().await.map_err(db_error)?;
            Ok(committed(rec, body, false))
        } else {
            tx.rollback().await.map_err(db_error)?;
            Ok(CommitOutcome::Duplicate)
        }
    }
}

fn committed(rec: DecisionRecord, body: Vec<u8>, reserved: bool) -> CommitOutcome {
    CommitOutcome::Committed(Box::new(Committed {
        reservation_id: reserved.then(|| rec.reservation_id.clone()),
        case_id: (!reserved).then(|| rec.case_id.clone()),
        outcome: rec.outcome,
        body: body.into(),
    }))
}

/// An allow, whole: every step after `claim` reads the previous one's rows, so if the claim
/// is lost or the reservation does not fit, nothing at all is written.
const ALLOW: &str = "
WITH claim AS MATERIALIZED (
    SELECT 1 FROM idempotency
    WHERE caller = $1::text AND key = $2::text AND state = 'in_progress' AND owner = $3::text
    FOR UPDATE
), reserved AS (
    UPDATE accounts SET
        reserved_minor = reserved_minor + $4::bigint,
        outflow_minor = CASE WHEN outflow_day >= $5::bigint THEN outflow_minor + $4::bigint ELSE $4::bigint END,
        outflow_day = greatest(outflow_day, $5::bigint)
    WHERE customer_id = $6::text AND currency = $7::text
      AND balance_minor - reserved_minor >= $4::bigint
      AND (CASE WHEN outflow_day >= $5::bigint THEN outflow_minor ELSE 0 END) + $4::bigint <= $8::bigint
      AND EXISTS (SELECT 1 FROM claim)
    RETURNING customer_id
), reservation AS (
    INSERT INTO reservations (id, customer_id, payee_id, amount_minor, currency, request_id, created_ms)
    SELECT $9::text, customer_id, $10::text, $4::bigint, $7::text, $11::text, $12::bigint FROM reserved
), payee AS (
    INSERT INTO known_payees (customer_id, payee_id)
    SELECT customer_id, $10::text FROM reserved
    ON CONFLICT DO NOTHING
), decision AS (
    INSERT INTO decisions (request_id, customer_id, payee_id, amount_minor, currency, decision, reasons, created_ms)
    SELECT $11::text, customer_id, $10::text, $4::bigint, $7::text, 'allow', $13::text::jsonb, $12::bigint FROM reserved
), done AS (
    UPDATE idempotency SET
        state = 'completed', owner = NULL, status_code = 200, body = $14::bytea,
        request_id = $11::text, created_ms = $12::bigint, expires_ms = $15::bigint
    WHERE caller = $1::text AND key = $2::text AND EXISTS (SELECT 1 FROM reserved)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM claim), EXISTS (SELECT 1 FROM done)";

/// A review or block: the case, the decision and the stored response, if the claim holds.
const NOT_ALLOW: &str = "
WITH claim AS MATERIALIZED (
    SELECT 1 FROM idempotency
    WHERE caller = $1::text AND key = $2::text AND state = 'in_progress' AND owner = $3::text
    FOR UPDATE
), opened AS (
    INSERT INTO cases (id, customer_id, payee_id, amount_minor, currency, decision, reasons, trace, request_id, created_ms)
    SELECT $4::text, $5::text, $6::text, $7::bigint, $8::text, $9::text, $10::text::jsonb, $11::text::jsonb, $12::text, $13::bigint
    FROM claim
), decision AS (
    INSERT INTO decisions (request_id, customer_id, payee_id, amount_minor, currency, decision, reasons, created_ms)
    SELECT $12::text, $5::text, $6::text, $7::bigint, $8::text, $9::text, $10::text::jsonb, $13::bigint
    FROM claim
), done AS (
    UPDATE idempotency SET
        state = 'completed', owner = NULL, status_code = 200, body = $14::bytea,
        request_id = $12::text, created_ms = $13::bigint, expires_ms = $15::bigint
    WHERE caller = $1::text AND key = $2::text AND EXISTS (SELECT 1 FROM claim)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM done)";

/// What both tools need about one payment, in one statement.
async fn read_payment(
    client: &deadpool_postgres::Client,
    request: &ReadsRequest,
) -> Result<PaymentReads, StoreError> {
    let stmt = client
        .prepare_cached(
            "SELECT a.currency, a.balance_minor, a.reserved_minor, a.outflow_day, a.outflow_minor,
                    a.recent_disputes, a.device_change, a.home_country,
                    EXISTS (SELECT 1 FROM known_payees k WHERE k.customer_id = $1 AND k.payee_id = $2),
                    (SELECT count(*) FROM (SELECT FROM decisions d
                                           WHERE d.customer_id = $1 AND d.created_ms >= $3
                                           LIMIT $4) v)
             FROM accounts a WHERE a.customer_id = $1",
        )
        .await
        .map_err(db_error)?;
    let row = client
        .query_opt(
            &stmt,
            &[
                &request.customer.as_str(),
                &request.payee.as_str(),
                &request.velocity_since_ms,
                &i64::from(request.velocity_cap),
            ],
        )
        .await
        .map_err(db_error)?;
    match row {
        Some(r) => reads_from_row(&r, 0, &request.customer),
        None => Ok(PaymentReads::default()),
    }
}

/// The account and risk columns of a row, from column `at` on: currency, balance, reserved,
/// outflow day and amount, disputes, device change, home country, known payee, recent
/// payments. A NULL currency means the customer has no account.
fn reads_from_row(
    r: &tokio_postgres::Row,
    at: usize,
    customer: &CustomerId,
) -> Result<PaymentReads, StoreError> {
    let Some(currency) = col::<Option<&str>>(r, at)? else {
        return Ok(PaymentReads::default());
    };
    let currency = Currency::parse(currency)
        .map_err(|_| StoreError::Internal(format!("account has bad currency {currency:?}")))?;
    Ok(PaymentReads {
        account: Some(Account {
            customer: customer.clone(),
            balance: Money::from_minor(col(r, at + 1)?, currency),
            reserved_minor: col(r, at + 2)?,
            outflow_day: col(r, at + 3)?,
            outflow_minor: col(r, at + 4)?,
        }),
        risk: Some(RiskProfile {
            recent_disputes: u32::try_from(col::<i32>(r, at + 5)?).unwrap_or(0),
            device_change: col(r, at + 6)?,
            home_country: col(r, at + 7)?,
            known_payee: col(r, at + 8)?,
            recent_payments: u32::try_from(col::<i64>(r, at + 9)?).unwrap_or(u32::MAX),
        }),
    })
}

/// Claims a batch of keys, or reports who has each, in one statement, with the tools' reads of
/// each payment whose key comes back ours (a row given no customer gets no reads). Keys are
/// claimed in key order, so batches from different instances lock shared keys in one order.
/// On conflict the row is always "updated" (to itself unless it may be taken over), which
/// locks it and returns its newest version: a concurrent commit is waited for and then replayed, and there is no window
/// between "insert failed" and "read what is there" for the row to change or vanish.
/// A row may be taken over once `expires_ms` has passed: a completed answer past retention,
/// or an in-progress claim whose instance died.
const CLAIM_BATCH: &str = "
WITH input AS (
    SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::bytea[], $5::text[],
                         $6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::bigint[],
                         $11::bigint[])
        AS t(ord, caller, key, fingerprint, owner, created_ms, expires_ms, customer, payee, since, cap)
), claimed AS (
    INSERT INTO idempotency AS i
        (caller, key, fingerprint, state, owner, status_code, body, request_id, created_ms, expires_ms)
    SELECT caller, key, fingerprint, 'in_progress', owner, NULL, NULL, NULL, created_ms, expires_ms
    FROM input ORDER BY caller, key
    ON CONFLICT (caller, key) DO UPDATE SET
        fingerprint = CASE WHEN i.expires_ms <= excluded.created_ms THEN excluded.fingerprint ELSE i.fingerprint END,
        state       = CASE WHEN i.expires_ms <= excluded.created_ms THEN excluded.state       ELSE i.state       END,
        owner       = CASE WHEN i.expires_ms <= excluded.created_ms THEN excluded.owner       ELSE i.owner       END,
        status_code = CASE WHEN i.expires_ms <= excluded.created_ms THEN NULL                 ELSE i.status_code END,
        body        = CASE WHEN i.expires_ms <= excluded.created_ms THEN NULL                 ELSE i.body        END,
        request_id  = CASE WHEN i.expires_ms <= excluded.created_ms THEN NULL                 ELSE i.request_id  END,
        created_ms  = CASE WHEN i.expires_ms <= excluded.created_ms THEN excluded.created_ms  ELSE i.created_ms  END,
        expires_ms  = CASE WHEN i.expires_ms <= excluded.created_ms THEN excluded.expires_ms  ELSE i.expires_ms  END
    RETURNING i.caller, i.key, i.state, i.owner, i.fingerprint, i.status_code, i.body, i.request_id,
              (i.xmax <> 0) AS existed
)
SELECT t.ord, c.state, c.owner, c.fingerprint, c.status_code, c.body, c.request_id, c.existed,
       t.customer IS NOT NULL AND c.owner IS NOT DISTINCT FROM t.owner AS wants_reads,
       a.currency, a.balance_minor, a.reserved_minor, a.outflow_day, a.outflow_minor,
       a.recent_disputes, a.device_change, a.home_country,
       EXISTS (SELECT 1 FROM known_payees k
               WHERE a.customer_id IS NOT NULL AND k.customer_id = t.customer AND k.payee_id = t.payee),
       (SELECT count(*) FROM (SELECT FROM decisions d
                              WHERE a.customer_id IS NOT NULL AND d.customer_id = t.customer
                                AND d.created_ms >= t.since
                              LIMIT t.cap) v)
FROM input t
JOIN claimed c ON c.caller = t.caller AND c.key = t.key
LEFT JOIN accounts a ON a.customer_id = t.customer AND c.owner IS NOT DISTINCT FROM t.owner";

/// `ALLOW` and `NOT_ALLOW` for a batch of decisions at once (see the module doc). Allows are
/// reserved in account order, so concurrent batches lock shared accounts in one order. Answers
/// each row with (claim held, written).
const COMMIT_BATCH: &str = "
WITH input AS (
    SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::boolean[],
                         $6::text[], $7::text[], $8::bigint[], $9::text[], $10::bigint[],
                         $11::bigint[], $12::text[], $13::text[], $14::text[], $15::text[],
                         $16::text[], $17::bigint[], $18::bytea[], $19::bigint[])
        AS t(ord, caller, key, owner, allow, customer, payee, amount, currency, day, daily_limit,
             record_id, decision, reasons, trace, request_id, now_ms, body, expires_ms)
), claimed AS MATERIALIZED (
    SELECT t.* FROM input t
    JOIN idempotency i ON i.caller = t.caller AND i.key = t.key
    WHERE i.state = 'in_progress' AND i.owner = t.owner
    ORDER BY t.caller, t.key
    FOR UPDATE OF i
), reserved AS (
    UPDATE accounts a SET
        reserved_minor = a.reserved_minor + c.amount,
        outflow_minor = CASE WHEN a.outflow_day >= c.day THEN a.outflow_minor + c.amount ELSE c.amount END,
        outflow_day = greatest(a.outflow_day, c.day)
    FROM (SELECT * FROM claimed WHERE allow ORDER BY customer) c
    WHERE a.customer_id = c.customer AND a.currency = c.currency
      AND a.balance_minor - a.reserved_minor >= c.amount
      AND (CASE WHEN a.outflow_day >= c.day THEN a.outflow_minor ELSE 0 END) + c.amount <= c.daily_limit
    RETURNING c.ord
), decided AS MATERIALIZED (
    SELECT * FROM claimed WHERE NOT allow OR ord IN (SELECT ord FROM reserved)
), reservation AS (
    INSERT INTO reservations (id, customer_id, payee_id, amount_minor, currency, request_id, created_ms)
    SELECT record_id, customer, payee, amount, currency, request_id, now_ms FROM decided WHERE allow
), payee AS (
    INSERT INTO known_payees (customer_id, payee_id)
    SELECT customer, payee FROM decided WHERE allow
    ON CONFLICT DO NOTHING
), opened AS (
    INSERT INTO cases (id, customer_id, payee_id, amount_minor, currency, decision, reasons, trace, request_id, created_ms)
    SELECT record_id, customer, payee, amount, currency, decision, reasons::jsonb, trace::jsonb, request_id, now_ms
    FROM decided WHERE NOT allow
), decision AS (
    INSERT INTO decisions (request_id, customer_id, payee_id, amount_minor, currency, decision, reasons, created_ms)
    SELECT request_id, customer, payee, amount, currency, decision, reasons::jsonb, now_ms FROM decided
), done AS (
    UPDATE idempotency i SET
        state = 'completed', owner = NULL, status_code = 200, body = d.body,
        request_id = d.request_id, created_ms = d.now_ms, expires_ms = d.expires_ms
    FROM decided d
    WHERE i.caller = d.caller AND i.key = d.key
    RETURNING d.ord
)
SELECT t.ord, EXISTS (SELECT 1 FROM claimed c WHERE c.ord = t.ord),
       EXISTS (SELECT 1 FROM done d WHERE d.ord = t.ord)
FROM input t";

/// Runs a batch of claims as one `CLAIM_BATCH`; answers in the order of `rows`.
async fn run_claims(pool: Pool, rows: Vec<ClaimRow>) -> Answers<ClaimAnswer> {
    let count = rows.len();
    let answered = async {
        let client = pool.get().await.map_err(pool_error)?;
        let stmt = client.prepare_cached(CLAIM_BATCH).await.map_err(db_error)?;
        let ord: Vec<i32> = (0..count as i32).collect();
        let caller: Vec<&str> = rows.iter().map(|r| &*r.caller).collect();
        let key: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        let fingerprint: Vec<&[u8]> = rows.iter().map(|r| &r.fingerprint[..]).collect();
        let owner: Vec<&str> = rows.iter().map(|r| r.owner.as_str()).collect();
        let created: Vec<i64> = rows.iter().map(|r| r.created_ms).collect();
        let expires: Vec<i64> = rows.iter().map(|r| r.lease_until_ms).collect();
        let reads = |f: fn(&ReadsRequest) -> &str| -> Vec<Option<&str>> {
            rows.iter().map(|r| r.reads.as_ref().map(f)).collect()
        };
        let customer = reads(|r| r.customer.as_str());
        let payee = reads(|r| r.payee.as_str());
        let since: Vec<i64> = rows
            .iter()
            .map(|r| r.reads.as_ref().map_or(0, |r| r.velocity_since_ms))
            .collect();
        let cap: Vec<i64> = rows
            .iter()
            .map(|r| r.reads.as_ref().map_or(0, |r| i64::from(r.velocity_cap)))
            .collect();
        let found = client
            .query(
                &stmt,
                &[
                    &ord,
                    &caller,
                    &key,
                    &fingerprint,
                    &owner,
                    &created,
                    &expires,
                    &customer,
                    &payee,
                    &since,
                    &cap,
                ],
            )
            .await
            .map_err(db_error)?;
        let mut answers: Vec<Option<ClaimAnswer>> = (0..count).map(|_| None).collect();
        for row in &found {
            let at = usize::try_from(col::<i32>(row, 0)?).unwrap_or(usize::MAX);
            let reads = match (
                col::<bool>(row, 8)?,
                rows.get(at).and_then(|r| r.reads.as_ref()),
            ) {
                (true, Some(asked)) => Some(reads_from_row(row, 9, &asked.customer)),
                _ => None,
            };
            if let Some(slot) = answers.get_mut(at) {
                let owner: Option<String> = col(row, 2)?;
                let ours = rows
                    .get(at)
                    .filter(|asked| owner.as_deref() == Some(asked.owner.as_str()))
                    .map(|asked| HeldClaim {
                        caller: asked.caller.clone(),
                        key: asked.key.clone(),
                        owner: asked.owner.clone(),
                    });
                *slot = Some(ClaimAnswer {
                    ours,
                    state: col(row, 1)?,
                    fingerprint: col(row, 3)?,
                    status_code: col(row, 4)?,
                    body: col(row, 5)?,
                    request_id: col(row, 6)?,
                    existed: col(row, 7)?,
                    reads,
                });
            }
        }
        Ok::<_, StoreError>(answers)
    }
    .await;
    batch::in_order(answered, count, "claim")
}

/// Runs a batch of decisions as one `COMMIT_BATCH`: (claim held, written) per row, in order.
async fn run_commits(pool: Pool, rows: Vec<CommitRow>) -> Answers<(bool, bool)> {
    let count = rows.len();
    let answered = async {
        let client = pool.get().await.map_err(pool_error)?;
        let stmt = client
            .prepare_cached(COMMIT_BATCH)
            .await
            .map_err(db_error)?;
        let ord: Vec<i32> = (0..count as i32).collect();
        let text = |f: fn(&CommitRow) -> &str| -> Vec<&str> { rows.iter().map(f).collect() };
        let number = |f: fn(&CommitRow) -> i64| -> Vec<i64> { rows.iter().map(f).collect() };
        let allow: Vec<bool> = rows.iter().map(|r| r.allow).collect();
        let body: Vec<&[u8]> = rows.iter().map(|r| r.body.as_slice()).collect();
        let found = client
            .query(
                &stmt,
                &[
                    &ord,
                    &text(|r| r.caller.as_str()),
                    &text(|r| r.key.as_str()),
                    &text(|r| r.owner.as_str()),
                    &allow,
                    &text(|r| r.customer.as_str()),
                    &text(|r| r.payee.as_str()),
                    &number(|r| r.amount),
                    &text(|r| r.currency.as_str()),
                    &number(|r| r.day),
                    &number(|r| r.daily_limit),
                    &text(|r| r.record_id.as_str()),
                    &text(|r| r.decision),
                    &text(|r| r.reasons.as_str()),
                    &text(|r| r.trace.as_str()),
                    &text(|r| r.request_id.as_str()),
                    &number(|r| r.now_ms),
                    &body,
                    &number(|r| r.expires_ms),
                ],
            )
            .await
            .map_err(db_error)?;
        let mut answers: Vec<Option<(bool, bool)>> = vec![None; count];
        for row in &found {
            let at = usize::try_from(col::<i32>(row, 0)?).unwrap_or(usize::MAX);
            if let Some(slot) = answers.get_mut(at) {
                *slot = Some((col(row, 1)?, col(row, 2)?));
            }
        }
        Ok::<_, StoreError>(answers)
    }
    .await;
    batch::in_order(answered, count, "commit")
}

#[async_trait]
impl Store for PostgresStore {
    fn engine(&self) -> &'static str {
        "postgres"
    }

    async fn begin_idempotent(
        &self,
        scope: &IdempotencyScope,
        fingerprint: &[u8; 32],
        now_ms: i64,
        reads: Option<&ReadsRequest>,
    ) -> Result<Begin, StoreError> {
        let key = scope.local_key();
        let token = uuid::Uuid::new_v4().simple().to_string();
        {
            let mut claims = self.claims.lock();
            if claims.contains_key(&key) {
                return Ok(Begin::InProgress);
            }
            claims.insert(key.clone(), token.clone());
        }
        // From here on the claim exists locally; dropping it (early return included)
        // releases whatever the database holds.
        let claim = self.release(key.clone(), token.clone(), scope.clone());
        let answer = self
            .claim_batches
            .call(ClaimRow {
                local_key: key,
                caller: scope.caller.clone(),
                key: scope.key.as_str().to_owned(),
                fingerprint: *fingerprint,
                owner: token.clone(),
                created_ms: now_ms,
                lease_until_ms: now_ms + self.claim_lease_ms,
                reads: reads.cloned(),
            })
            .await?;
        if answer.ours.is_some() {
            if answer.existed && answer.state == "in_progress" {
                tracing::debug!(event = "idempotency.claimed_expired_row");
            }
            return Ok(Begin::Fresh(claim, super::prefetched(answer.reads)));
        }
        // Someone else holds the key: nothing of ours to release.
        self.settle_claim(scope, &token);
        drop(claim);
        if answer.state != "completed" {
            return Ok(Begin::InProgress);
        }
        if answer.fingerprint[..] != fingerprint[..] {
            return Ok(Begin::Mismatch);
        }
        let (Some(status), Some(body), Some(request_id)) =
            (answer.status_code, answer.body, answer.request_id)
        else {
            return Err(StoreError::Internal(
                "a completed idempotency row lacks its response".into(),
            ));
        };
        Ok(Begin::Replay(StoredResponse {
            status: u16::try_from(status).unwrap_or(200),
            body: body.into(),
            request_id: RequestId::from_stored(request_id),
        }))
    }

    async fn find_response(
        &self,
        scope: &IdempotencyScope,
        fingerprint: &[u8; 32],
        now_ms: i64,
    ) -> Result<Option<Lookup>, StoreError> {
        let client = self.fast_client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT fingerprint, status_code, body, request_id FROM idempotency
                 WHERE caller = $1 AND key = $2 AND state = 'completed' AND expires_ms > $3",
            )
            .await
            .map_err(db_error)?;
        let row = client
            .query_opt(&stmt, &[&&*scope.caller, &scope.key.as_str(), &now_ms])
            .await
            .map_err(db_error)?;
        let Some(r) = row else {
            return Ok(None);
        };
        let stored_fingerprint: &[u8] = col(&r, 0)?;
        if stored_fingerprint != &fingerprint[..] {
            return Ok(Some(Lookup::Mismatch));
        }
        Ok(Some(Lookup::Replay(StoredResponse {
            status: u16::try_from(col::<i32>(&r, 1)?).unwrap_or(200),
            body: col::<Vec<u8>>(&r, 2)?.into(),
            request_id: RequestId::from_stored(col(&r, 3)?),
        })))
    }

    async fn payment_reads(&self, request: &ReadsRequest) -> Result<PaymentReads, StoreError> {
        let client = self.fast_client().await?;
        read_payment(&client, request).await
    }

    async fn commit_decision(&self, rec: DecisionRecord) -> Result<CommitOutcome, StoreError> {
        let scope = rec.scope.clone();
        // The handler always claims first; a caller that did not gets a claim here, so the
        // database's unique key still decides who commits.
        let (token, _claim) = match self.claim_token(&rec.scope) {
            Some(token) => (token, None),
            None => match self
                .begin_idempotent(&rec.scope, &rec.fingerprint, rec.now_ms, None)
                .await?
            {
                Begin::Fresh(claim, _) => match self.claim_token(&rec.scope) {
                    Some(token) => (token, Some(claim)),
                    None => return Ok(CommitOutcome::Duplicate),
                },
                _ => return Ok(CommitOutcome::Duplicate),
            },
        };

        let body = rec.response_body();
        let allow = rec.outcome.decision == Decision::Allow;
        let row = CommitRow::new(&rec, &token, &body);
        let outcome = match self.commit_batches.call(row).await? {
            (false, _) => CommitOutcome::Duplicate,
            (true, true) => committed(rec, body, allow),
            (true, false) if allow => self.commit_refused(rec, &token).await?,
            (true, false) => {
                return Err(StoreError::Internal(
                    "a claimed review or block was not written".into(),
                ));
            }
        };
        // Completed, or lost to another owner: either way the row needs no releasing.
        self.settle_claim(&scope, &token);
        Ok(outcome)
    }

    async fn purge_expired(&self, now_ms: i64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let mut total = 0;
        loop {
            // Small slices keep each statement short. Expired in-progress claims go too:
            // their lease is over, so nobody may rely on them any more.
            let n = client
                .execute(
                    "DELETE FROM idempotency WHERE ctid = ANY (ARRAY (
                         SELECT ctid FROM idempotency WHERE expires_ms <= $1 LIMIT 5000))",
                    &[&now_ms],
                )
                .await
                .map_err(db_error)?;
            total += n;
            if n < 5000 {
                return Ok(total);
            }
        }
    }

    async fn seed_if_empty(&self, customers: &[CustomerFixture]) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        // Instances starting together would otherwise both see an empty table.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(db_error)?;
        let existing: i64 = tx
            .query_one("SELECT count(*) FROM accounts", &[])
            .await
            .map_err(db_error)?
            .try_get(0)
            .map_err(db_error)?;
        if existing > 0 {
            return Ok(0);
        }
        let account = tx
            .prepare(
                "INSERT INTO accounts (customer_id, currency, balance_minor, recent_disputes, device_change, home_country)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await
            .map_err(db_error)?;
        let payee = tx
            .prepare("INSERT INTO known_payees (customer_id, payee_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .await
            .map_err(db_error)?;
        for c in customers {
            let disputes = i32::try_from(c.recent_disputes).unwrap_or(i32::MAX);
            tx.execute(
                &account,
                &[
                    &c.customer.as_str(),
                    &c.balance.currency().code(),
                    &c.balance.minor(),
                    &disputes,
                    &c.device_change,
                    &c.home_country,
                ],
            )
            .await
            .map_err(db_error)?;
            for p in &c.known_payees {
                tx.execute(&payee, &[&c.customer.as_str(), &p.as_str()])
                    .await
                    .map_err(db_error)?;
            }
        }
        tx.commit().await.map_err(db_error)?;
        Ok(customers.len())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Both pools: decisions need the claims pool as much as the commit pool.
        for client in [self.client().await?, self.fast_client().await?] {
            client.simple_query("SELECT 1").await.map_err(db_error)?;
        }
        Ok(())
    }

    async fn close(&self) {
        self.pool.close();
        self.fast.close();
    }

    async fn list_cases(
        &self,
        status: Option<CaseStatus>,
        limit: u32,
    ) -> Result<Vec<Case>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {CASE_COLUMNS} FROM cases
                     WHERE ($1::text IS NULL OR status = $1::text)
                     ORDER BY created_ms DESC, id LIMIT $2"
                ),
                &[&status.map(CaseStatus::as_str), &i64::from(limit)],
            )
            .await
            .map_err(db_error)?;
        rows.iter().map(case_from_row).collect()
    }

    async fn case(&self, id: &str) -> Result<Option<Case>, StoreError> {
        let client = self.client().await?;
        read_case(&client, id, false).await
    }

    async fn resolve_case(&self, r: CaseResolution) -> Result<Resolved, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        // The row lock makes two reviewers resolving one case take turns.
        let Some(case) = read_case(&tx, &r.case_id, true).await? else {
            return Ok(Resolved::NotFound);
        };
        if case.status != CaseStatus::Open {
            return Ok(Resolved::AlreadyResolved(Box::new(case)));
        }
        let amount = case.amount.minor();
        let currency = case.amount.currency();
        let mut reservation_id: Option<&str> = None;
        if r.approve {
            let day = r.now_ms.div_euclid(86_400_000);
            let reserved = tx
                .execute(
                    "UPDATE accounts SET
                         reserved_minor = reserved_minor + $1,
                         outflow_minor = CASE WHEN outflow_day >= $2 THEN outflow_minor + $1 ELSE $1 END,
                         outflow_day = greatest(outflow_day, $2)
                     WHERE customer_id = $3 AND currency = $4
                       AND balance_minor - reserved_minor >= $1
                       AND (CASE WHEN outflow_day >= $2 THEN outflow_minor ELSE 0 END) + $1 <= $5",
                    &[&amount, &day, &case.customer, &currency.code(), &r.daily_limit_minor],
                )
                .await
                .map_err(db_error)?;
            if reserved == 0 {
                let account = tx
                    .query_opt(
                        "SELECT currency, balance_minor - reserved_minor FROM accounts WHERE customer_id = $1",
                        &[&case.customer],
                    )
                    .await
                    .map_err(db_error)?;
                let account = match &account {
                    Some(row) => Some((col::<&str>(row, 0)?, col::<i64>(row, 1)?)),
                    None => None,
                };
                return Ok(Resolved::Refused(refusal_reason(
                    account,
                    currency.code(),
                    amount,
                )));
            }
            tx.execute(
                "INSERT INTO reservations (id, customer_id, payee_id, amount_minor, currency, request_id, created_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &r.reservation_id,
                    &case.customer,
                    &case.payee,
                    &amount,
                    &currency.code(),
                    &case.request_id,
                    &r.now_ms,
                ],
            )
            .await
            .map_err(db_error)?;
            tx.execute(
                "INSERT INTO known_payees (customer_id, payee_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&case.customer, &case.payee],
            )
            .await
            .map_err(db_error)?;
            reservation_id = Some(&r.reservation_id);
        }
        let status = if r.approve {
            CaseStatus::Approved
        } else {
            CaseStatus::Declined
        };
        tx.execute(
            "UPDATE cases SET status = $2, resolved_ms = $3, resolution_note = $4, reservation_id = $5
             WHERE id = $1",
            &[&r.case_id, &status.as_str(), &r.now_ms, &r.note, &reservation_id],
        )
        .await
        .map_err(db_error)?;
        let case = read_case(&tx, &r.case_id, false).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(match case {
            Some(case) => Resolved::Done(Box::new(case)),
            None => Resolved::NotFound,
        })
    }

    async fn reservation(&self, id: &str) -> Result<Option<Reservation>, StoreError> {
        let client = self.client().await?;
        read_reservation(&client, id, false).await
    }

    async fn settle_reservation(
        &self,
        id: &str,
        to: Settlement,
        now_ms: i64,
    ) -> Result<Settled, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        let Some(held) = read_reservation(&tx, id, true).await? else {
            return Ok(Settled::NotFound);
        };
        if held.status != ReservationStatus::Held {
            return Ok(Settled::NotHeld(held));
        }
        let status = match to {
            Settlement::Capture => ReservationStatus::Captured,
            Settlement::Release => ReservationStatus::Released,
        };
        settle(&tx, &held, status, now_ms).await?;
        let settled = read_reservation(&tx, id, false).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(match settled {
            Some(r) => Settled::Done(r),
            None => Settled::NotFound,
        })
    }

    async fn expire_reservations(
        &self,
        created_before_ms: i64,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        // SKIP LOCKED: another instance sweeping at the same time takes other rows. Settled
        // in customer order, the sweep locks accounts in the order decision batches do, so
        // the two never deadlock.
        let rows = tx
            .query(
                &format!(
                    "SELECT {RESERVATION_COLUMNS} FROM reservations
                     WHERE status = 'held' AND created_ms < $1
                     ORDER BY customer_id, id
                     LIMIT 5000 FOR UPDATE SKIP LOCKED"
                ),
                &[&created_before_ms],
            )
            .await
            .map_err(db_error)?;
        for row in &rows {
            let held = reservation_from_row(row)?;
            settle(&tx, &held, ReservationStatus::Expired, now_ms).await?;
        }
        tx.commit().await.map_err(db_error)?;
        Ok(rows.len() as u64)
    }
}

/// `url` with its database name replaced by `database`.
fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let Some(scheme_end) = base.find("://") else {
        anyhow::bail!("expected a postgres:// URL");
    };
    let authority_start = scheme_end + 3;
    let authority_end = base[authority_start..]
        .find('/')
        .map(|i| authority_start + i)
        .unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..authority_end], database);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

/// Test databases older than this are dropped by the next test run.
const STALE_TEST_DATABASE_SECS: u64 = 3_600;

/// Creates an empty database on the server of `base_url` and returns its URL. Databases
/// this made more than an hour ago are dropped on the way, so test runs do not pile up.
pub async fn create_test_database(base_url: &str) -> anyhow::Result<String> {
    let (client, connection) = tokio_postgres::connect(base_url, NoTls)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to PostgreSQL at the test URL: {}",
                causes(&e)
            )
        })?;
    let connection = tokio::spawn(connection);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = format!(
        "paynow_test_{now}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;

    let stale = client
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'paynow\\_test\\_%'",
            &[],
        )
        .await
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r.try_get::<_, String>(0).ok())
                .filter(|n| {
                    n.split('_')
                        .nth(2)
                        .and_then(|t| t.parse::<u64>().ok())
                        .is_some_and(|t| t + STALE_TEST_DATABASE_SECS < now)
                })
                .collect::<Vec<String>>()
        })
        .unwrap_or_default();
    for old in stale {
        // Best effort: another run may be dropping the same one.
        let _ = client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {old} WITH (FORCE)"))
            .await;
    }
    drop(client);
    let _ = connection.await;
    with_database(base_url, &name)
}

const CASE_COLUMNS: &str =
    "id, status, decision, reasons::text, customer_id, payee_id, amount_minor,
    currency, request_id, created_ms, trace::text, resolved_ms, resolution_note, reservation_id";

const RESERVATION_COLUMNS: &str =
    "id, status, customer_id, payee_id, amount_minor, currency, request_id, created_ms, settled_ms";

fn bad_row(what: &str, value: &str) -> StoreError {
    StoreError::Internal(format!("stored {what} is not valid: {value:?}"))
}

fn case_from_row(row: &tokio_postgres::Row) -> Result<Case, StoreError> {
    let status: &str = col(row, 1)?;
    let decision: &str = col(row, 2)?;
    let reasons: &str = col(row, 3)?;
    let currency: &str = col(row, 7)?;
    let trace: &str = col(row, 10)?;
    let currency = Currency::parse(currency).map_err(|_| bad_row("currency", currency))?;
    Ok(Case {
        id: col(row, 0)?,
        status: CaseStatus::parse(status).ok_or_else(|| bad_row("case status", status))?,
        decision: serde_json::from_value(serde_json::Value::String(decision.to_owned()))
            .map_err(|_| bad_row("decision", decision))?,
        reasons: serde_json::from_str(reasons).map_err(|_| bad_row("reasons", reasons))?,
        customer: col(row, 4)?,
        payee: col(row, 5)?,
        amount: Money::from_minor(col(row, 6)?, currency),
        request_id: col(row, 8)?,
        created_ms: col(row, 9)?,
        trace: serde_json::from_str(trace).map_err(|_| bad_row("trace", "…"))?,
        resolved_ms: col(row, 11)?,
        resolution_note: col(row, 12)?,
        reservation_id: col(row, 13)?,
    })
}

/// One row of `table` by id, optionally locked for the rest of the transaction.
async fn read_by_id<T>(
    client: &impl deadpool_postgres::GenericClient,
    columns: &str,
    table: &str,
    id: &str,
    for_update: bool,
    from_row: fn(&tokio_postgres::Row) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let lock = if for_update { " FOR UPDATE" } else { "" };
    let row = client
        .query_opt(
            &format!("SELECT {columns} FROM {table} WHERE id = $1{lock}"),
            &[&id],
        )
        .await
        .map_err(db_error)?;
    row.as_ref().map(from_row).transpose()
}

async fn read_case(
    client: &impl deadpool_postgres::GenericClient,
    id: &str,
    for_update: bool,
) -> Result<Option<Case>, StoreError> {
    read_by_id(client, CASE_COLUMNS, "cases", id, for_update, case_from_row).await
}

fn reservation_from_row(row: &tokio_postgres::Row) -> Result<Reservation, StoreError> {
    let status: &str = col(row, 1)?;
    let currency: &str = col(row, 5)?;
    let currency = Currency::parse(currency).map_err(|_| bad_row("currency", currency))?;
    Ok(Reservation {
        id: col(row, 0)?,
        status: ReservationStatus::parse(status)
            .ok_or_else(|| bad_row("reservation status", status))?,
        customer: col(row, 2)?,
        payee: col(row, 3)?,
        amount: Money::from_minor(col(row, 4)?, currency),
        request_id: col(row, 6)?,
        created_ms: col(row, 7)?,
        settled_ms: col(row, 8)?,
    })
}

async fn read_reservation(
    client: &impl deadpool_postgres::GenericClient,
    id: &str,
    for_update: bool,
) -> Result<Option<Reservation>, StoreError> {
    let columns = RESERVATION_COLUMNS;
    read_by_id(
        client,
        columns,
        "reservations",
        id,
        for_update,
        reservation_from_row,
    )
    .await
}

/// Moves a held (and locked) reservation to `status` and gives its money back to the account:
/// out of the balance on capture, back to available otherwise. A release on the day it was
/// made also lowers that day's outflow.
async fn settle(
    tx: &impl deadpool_postgres::GenericClient,
    held: &Reservation,
    status: ReservationStatus,
    now_ms: i64,
) -> Result<(), StoreError> {
    let amount = held.amount.minor();
    let day = held.created_ms.div_euclid(86_400_000);
    tx.execute(
        "UPDATE reservations SET status = $2, settled_ms = $3 WHERE id = $1 AND status = 'held'",
        &[&held.id, &status.as_str(), &now_ms],
    )
    .await
    .map_err(db_error)?;
    if status == ReservationStatus::Captured {
        tx.execute(
            "UPDATE accounts SET balance_minor = balance_minor - $2, reserved_minor = reserved_minor - $2
             WHERE customer_id = $1",
            &[&held.customer, &amount],
        )
        .await
    } else {
        tx.execute(
            "UPDATE accounts SET reserved_minor = reserved_minor - $2,
                 outflow_minor = CASE WHEN outflow_day = $3 THEN greatest(outflow_minor - $2, 0) ELSE outflow_minor END
             WHERE customer_id = $1",
            &[&held.customer, &amount, &day],
        )
        .await
    }
    .map_err(db_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgresql://u:p@h/db?sslmode=disable", "x").unwrap(),
            "postgresql://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5432", "x").unwrap(),
            "postgres://h:5432/x"
        );
    }

    #[tokio::test]
    async fn a_malformed_postgres_url_fails_at_start_naming_the_variable() {
        let err = crate::store::open("postgres://host:notaport/db")
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
        let err = crate::store::open("mysql://host/db")
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn only_postgres_schemes_are_postgres() {
        assert!(is_postgres_url("postgres://h/db"));
        assert!(is_postgres_url("postgresql://h/db"));
        assert!(!is_postgres_url("sqlite://paynow.db"));
    }
}
