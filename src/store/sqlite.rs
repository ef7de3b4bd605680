//! The embedded SQLite store.
//!
//! # One writer, group commit
//! All writes go through one thread that owns the only writing connection. It takes every
//! job waiting in its queue (up to [`MAX_BATCH`]), runs each in its own savepoint inside one
//! `BEGIN IMMEDIATE` transaction, commits once, and only then answers each job. With
//! `synchronous=FULL` a decision is on disk before its response leaves, yet one fsync covers
//! every decision that arrived while the previous commit was syncing.
//!
//! Reservation checks stay exact inside a batch: each job's conditional `UPDATE` sees the
//! jobs before it in the same transaction.
//!
//! # Readers
//! Reads (idempotency lookups and the agent's tools) use a small pool of read-only
//! connections; WAL mode lets them run beside the writer. They run inline on the async
//! worker: each is one indexed lookup of a few microseconds, cheaper than a thread hop.
//!
//! # Durability
//! WAL journal, `synchronous=FULL`: an answered decision survives a crash of the process and
//! of the machine. `busy_timeout` covers the rare checkpoint that makes a reader wait.
//!
//! # Checkpoints
//! A thread of its own copies the WAL back into the database file every
//! [`CHECKPOINT_EVERY`]. Left to the writer, the commit that crosses SQLite's threshold
//! would copy and sync a thousand pages while every decision of its batch waits; the
//! writer keeps only a far larger threshold as a bound on the WAL.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::RecvTimeoutError;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};
use tokio::sync::{mpsc, oneshot};

use super::{
    Account, Begin, Claim, CommitOutcome, Committed, DecisionRecord, IdempotencyScope, Lookup,
    PaymentReads, RiskProfile, Store, StoreError, StoredResponse, reasons_json,
};
use super::{
    Case, CaseResolution, CaseStatus, Reservation, ReservationStatus, Resolved, Settled,
    Settlement, refusal_reason,
};
use crate::domain::{Currency, CustomerId, Decision, Money, PayeeId, RequestId};
use crate::fixtures::CustomerFixture;

/// Most jobs committed in one transaction.
pub const MAX_BATCH: usize = 256;
/// Read connections kept open.
const READER_POOL: usize = 8;
const BUSY_TIMEOUT_MS: u32 = 5_000;
/// How often the checkpoint thread copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// WAL pages after which the writer checkpoints by itself (the checkpoint thread is behind).
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 16_384;

const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_init.sql"),
    include_str!("../../migrations/sqlite/0002_review.sql"),
];

/// What a job asks of its savepoint once it has run.
enum Savepointed<T> {
    Keep(T),
    /// Roll the savepoint back, but still answer with this value.
    Discard(T),
}

type Finish = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type Work = Box<dyn FnOnce(&mut Transaction<'_>) -> Finish + Send>;

pub struct SqliteStore {
    path: PathBuf,
    jobs: RwLock<Option<mpsc::Sender<Work>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Dropping the sender stops the checkpoint thread.
    checkpointer: Mutex<Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>>,
    readers: Mutex<Vec<Connection>>,
    /// Keys of requests being decided right now. The file belongs to this process alone, so
    /// this set is enough to answer a concurrent duplicate with 409; the unique key in the
    /// table stays the final guard.
    in_flight: Arc<Mutex<HashSet<String>>>,
}

/// `sqlite://paynow.db`, `sqlite:///var/lib/paynow.db`, `sqlite:paynow.db` → the file path.
pub fn path_from_url(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let rest = rest.split('?').next().unwrap_or(rest);
    Some(PathBuf::from(rest))
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn connect(path: &Path, writer: bool) -> rusqlite::Result<Connection> {
    let flags = if writer {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.pragma_update(None, "busy_timeout", BUSY_TIMEOUT_MS)?;
    if writer {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
    }
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database file, applies migrations and starts the writer.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if path.as_os_str().is_empty() || path == Path::new(":memory:") {
            anyhow::bail!("DATABASE_URL must name a SQLite file, e.g. sqlite://paynow.db");
        }
        let mut conn = connect(path, true)
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database {}: {e}", path.display()))?;
        migrate(&mut conn).map_err(|e| {
            anyhow::anyhow!("cannot migrate SQLite database {}: {e}", path.display())
        })?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)
            .map_err(|e| {
                anyhow::anyhow!("cannot configure SQLite database {}: {e}", path.display())
            })?;
        let checkpoint_conn = connect(path, true)
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database {}: {e}", path.display()))?;
        let (stop, stopped) = std::sync::mpsc::channel();
        let checkpointer = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpoint_conn, stopped))?;
        let (tx, rx) = mpsc::channel::<Work>(4 * MAX_BATCH);
        let writer = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx))?;
        Ok(SqliteStore {
            path: path.to_owned(),
            jobs: RwLock::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            checkpointer: Mutex::new(Some((stop, checkpointer))),
            readers: Mutex::new(Vec::new()),
            in_flight: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let pooled = self.readers.lock().pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => connect(&self.path, false).map_err(unavailable)?,
        };
        let result = f(&conn).map_err(unavailable);
        let mut pool = self.readers.lock();
        if pool.len() < READER_POOL {
            pool.push(conn);
        }
        result
    }

    /// Runs `f` in its own savepoint of the writer's next transaction; answers after commit.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<Savepointed<T>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let work: Work = Box::new(move |tx| {
            let result = run_in_savepoint(tx, f);
            Box::new(move |committed| {
                let _ = reply.send(committed.and(result));
            })
        });
        let jobs = self.jobs.read().clone();
        let jobs = jobs.ok_or_else(|| unavailable("store is closed"))?;
        jobs.send(work)
            .await
            .map_err(|_| unavailable("store is closed"))?;
        answer.await.map_err(|_| unavailable("writer stopped"))?
    }
}

fn run_in_savepoint<T>(
    tx: &mut Transaction<'_>,
    f: impl FnOnce(&Connection) -> rusqlite::Result<Savepointed<T>>,
) -> Result<T, StoreError> {
    let mut sp = tx.savepoint().map_err(unavailable)?;
    match f(&sp) {
        Ok(Savepointed::Keep(v)) => {
            sp.commit().map_err(unavailable)?;
            Ok(v)
        }
        Ok(Savepointed::Discard(v)) => {
            sp.rollback().map_err(unavailable)?;
            Ok(v)
        }
        Err(e) => {
            // Dropping the savepoint rolls it back; other jobs of the batch are unaffected.
            let _ = sp.rollback();
            Err(unavailable(e))
        }
    }
}

/// Checkpoints the WAL until the store closes (see the module doc). PASSIVE never waits for
/// the writer or readers: it copies what it can, and the writer goes on appending meanwhile.
fn checkpoint_loop(conn: Connection, stop: std::sync::mpsc::Receiver<()>) {
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(event = "store.checkpoint_failed", error = %e);
        }
    }
}

fn writer_loop(mut conn: Connection, mut jobs: mpsc::Receiver<Work>) {
    let mut batch: Vec<Work> = Vec::with_capacity(MAX_BATCH);
    let mut finishers: Vec<Finish> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let committed = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(mut tx) => {
                for work in batch.drain(..) {
                    finishers.push(work(&mut tx));
                }
                tx.commit().map_err(unavailable)
            }
            Err(e) => {
                for work in batch.drain(..) {
                    drop(work);
                }
                Err(unavailable(e))
            }
        };
        if let Err(e) = &committed {
            tracing::error!(event = "store.commit_failed", error = %e, "SQLite commit failed; batch answered 503");
        }
        for finish in finishers.drain(..) {
            finish(match &committed {
                Ok(()) => Ok(()),
                Err(e) => Err(unavailable(e)),
            });
        }
    }
    // Every sender is gone: leave the file tidy for the next start.
    let _ = conn.execute_batch("PRAGMA optimize; PRAGMA wal_checkpoint(TRUNCATE);");
}

const RESERVE: &str = "UPDATE accounts
    SET reserved_minor = reserved_minor + ?1,
        outflow_minor = CASE WHEN outflow_day = ?2 THEN outflow_minor + ?1 ELSE ?1 END,
        outflow_day = ?2
    WHERE customer_id = ?3 AND currency = ?4
      AND balance_minor - reserved_minor >= ?1
      AND (CASE WHEN outflow_day = ?2 THEN outflow_minor ELSE 0 END) + ?1 <= ?5";

const STORE_RESPONSE: &str = "INSERT INTO idempotency
        (caller, key, fingerprint, status_code, body, request_id, created_ms, expires_ms)
    VALUES (?1, ?2, ?3, 200, ?4, ?5, ?6, ?7)
    ON CONFLICT (caller, key) DO UPDATE SET
        fingerprint = excluded.fingerprint, status_code = excluded.status_code,
        body = excluded.body, request_id = excluded.request_id,
        created_ms = excluded.created_ms, expires_ms = excluded.expires_ms
    WHERE idempotency.expires_ms <= excluded.created_ms";

fn apply_decision(
    conn: &Connection,
    mut rec: DecisionRecord,
) -> rusqlite::Result<Savepointed<CommitOutcome>> {
    let customer = rec.payment.customer.as_str().to_owned();
    let payee = rec.payment.payee.as_str().to_owned();
    let amount = rec.payment.amount.minor();
    let currency = rec.payment.amount.currency();
    let day = rec.day();
    let mut reservation_id = None;
    let mut case_id = None;

    if rec.outcome.decision == Decision::Allow {
        let reserved = conn.prepare_cached(RESERVE)?.execute(params![
            amount,
            day,
            customer,
            currency.code(),
            rec.daily_limit_minor
        ])?;
        if reserved == 1 {
            conn.prepare_cached(
                "INSERT INTO reservations (id, customer_id, payee_id, amount_minor, currency, request_id, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                rec.reservation_id,
                customer,
                payee,
                amount,
                currency.code(),
                rec.request_id.as_str(),
                rec.now_ms
            ])?;
            conn.prepare_cached(
                "INSERT OR IGNORE INTO known_payees (customer_id, payee_id) VALUES (?1, ?2)",
            )?
            .execute(params![customer, payee])?;
            reservation_id = Some(rec.reservation_id.clone());
        } else {
            let now: Option<(i64, i64)> = conn
                .prepare_cached(
                    "SELECT balance_minor - reserved_minor,
                            CASE WHEN outflow_day = ?2 THEN outflow_minor ELSE 0 END
                     FROM accounts WHERE customer_id = ?1",
                )?
                .query_row(params![customer, day], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let (available, outflow) = now.unwrap_or((0, 0));
            rec.refuse_reservation(available, outflow);
        }
    }

    let reasons = reasons_json(&rec.outcome.reasons);
    if rec.outcome.decision != Decision::Allow {
        let trace = serde_json::to_string(&rec.outcome.trace).unwrap_or_else(|_| "[]".into());
        conn.prepare_cached(
            "INSERT INTO cases (id, customer_id, payee_id, amount_minor, currency, decision, reasons, trace, request_id, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?
        .execute(params![
            rec.case_id,
            customer,
            payee,
            amount,
            currency.code(),
            rec.outcome.decision.as_str(),
            reasons,
            trace,
            rec.request_id.as_str(),
            rec.now_ms
        ])?;
        case_id = Some(rec.case_id.clone());
    }

    conn.prepare_cached(
        "INSERT INTO decisions (request_id, customer_id, payee_id, amount_minor, currency, decision, reasons, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        rec.request_id.as_str(),
        customer,
        payee,
        amount,
        currency.code(),
        rec.outcome.decision.as_str(),
        reasons,
        rec.now_ms
    ])?;

    let body = rec.response_body();
    let stored = conn.prepare_cached(STORE_RESPONSE)?.execute(params![
        &*rec.scope.caller,
        rec.scope.key.as_str(),
        &rec.fingerprint[..],
        &body,
        rec.request_id.as_str(),
        rec.now_ms,
        rec.idempotency_expires_ms
    ])?;
    if stored == 0 {
        // A live answer exists for this key: this execution must leave no trace.
        return Ok(Savepointed::Discard(CommitOutcome::Duplicate));
    }
    Ok(Savepointed::Keep(CommitOutcome::Committed(Box::new(
        Committed {
            outcome: rec.outcome,
            body: body.into(),
            reservation_id,
            case_id,
        },
    ))))
}

#[async_trait]
impl Store for SqliteStore {
    fn engine(&self) -> &'static str {
        "sqlite"
    }

    async fn begin_idempotent(
        &self,
        scope: &IdempotencyScope,
        fingerprint: &[u8; 32],
        now_ms: i64,
    ) -> Result<Begin, StoreError> {
        let key = scope.local_key();
        if !self.in_flight.lock().insert(key.clone()) {
            return Ok(Begin::InProgress);
        }
        let in_flight = self.in_flight.clone();
        let claim = Claim::new(move || {
            in_flight.lock().remove(&key);
        });
        Ok(
            match self.find_response(scope, fingerprint, now_ms).await? {
                Some(Lookup::Replay(stored)) => Begin::Replay(stored),
                Some(Lookup::Mismatch) => Begin::Mismatch,
                None => Begin::Fresh(claim),
            },
        )
    }

    async fn find_response(
        &self,
        scope: &IdempotencyScope,
        fingerprint: &[u8; 32],
        now_ms: i64,
    ) -> Result<Option<Lookup>, StoreError> {
        let row = self.read(|conn| {
            conn.prepare_cached(
                "SELECT fingerprint, status_code, body, request_id FROM idempotency
                 WHERE caller = ?1 AND key = ?2 AND expires_ms > ?3",
            )?
            .query_row(params![&*scope.caller, scope.key.as_str(), now_ms], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, u16>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .optional()
        })?;
        Ok(row.map(|(stored_fingerprint, status, body, request_id)| {
            if stored_fingerprint[..] == fingerprint[..] {
                Lookup::Replay(StoredResponse {
                    status,
                    body: body.into(),
                    request_id: RequestId::from_stored(request_id),
                })
            } else {
                Lookup::Mismatch
            }
        }))
    }

    async fn payment_reads(
        &self,
        customer: &CustomerId,
        payee: &PayeeId,
        velocity_since_ms: i64,
    ) -> Result<PaymentReads, StoreError> {
        let row = self.read(|conn| {
            conn.prepare_cached(
                "SELECT a.currency, a.balance_minor, a.reserved_minor, a.outflow_day, a.outflow_minor,
                        a.recent_disputes, a.device_change, a.home_country,
                        EXISTS (SELECT 1 FROM known_payees k WHERE k.customer_id = ?1 AND k.payee_id = ?2),
                        (SELECT count(*) FROM decisions d WHERE d.customer_id = ?1 AND d.created_ms >= ?3)
                 FROM accounts a WHERE a.customer_id = ?1",
            )?
            .query_row(params![customer.as_str(), payee.as_str(), velocity_since_ms], |r| {
                Ok((
                    (
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ),
                    RiskProfile {
                        recent_disputes: r.get(5)?,
                        device_change: r.get(6)?,
                        home_country: r.get(7)?,
                        known_payee: r.get(8)?,
                        recent_payments: r.get(9)?,
                    },
                ))
            })
            .optional()
        })?;
        let Some(((currency, balance, reserved, day, outflow), risk)) = row else {
            return Ok(PaymentReads::default());
        };
        let currency = Currency::parse(&currency)
            .map_err(|_| StoreError::Internal(format!("account has bad currency {currency:?}")))?;
        Ok(PaymentReads {
            account: Some(Account {
                customer: customer.clone(),
                balance: Money::from_minor(balance, currency),
                reserved_minor: reserved,
                outflow_day: day,
                outflow_minor: outflow,
            }),
            risk: Some(risk),
        })
    }

    async fn commit_decision(&self, record: DecisionRecord) -> Result<CommitOutcome, StoreError> {
        self.write(move |conn| apply_decision(conn, record)).await
    }

    async fn purge_expired(&self, now_ms: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            // Small slices keep each transaction short, so decisions are not held up.
            let n = self
                .write(move |conn| {
                    conn.prepare_cached(
                        "DELETE FROM idempotency WHERE rowid IN
                         (SELECT rowid FROM idempotency WHERE expires_ms <= ?1 LIMIT 5000)",
                    )?
                    .execute([now_ms])
                    .map(Savepointed::Keep)
                })
                .await?;
            total += n as u64;
            if n < 5000 {
                return Ok(total);
            }
        }
    }

    async fn seed_if_empty(&self, customers: &[CustomerFixture]) -> Result<usize, StoreError> {
        let customers = customers.to_vec();
        self.write(move |conn| {
            let existing: i64 = conn.query_row("SELECT count(*) FROM accounts", [], |r| r.get(0))?;
            if existing > 0 {
                return Ok(Savepointed::Keep(0));
            }
            let mut account = conn.prepare(
                "INSERT INTO accounts (customer_id, currency, balance_minor, recent_disputes, device_change, home_country)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut payee =
                conn.prepare("INSERT OR IGNORE INTO known_payees (customer_id, payee_id) VALUES (?1, ?2)")?;
            for c in &customers {
                account.execute(params![
                    c.customer.as_str(),
                    c.balance.currency().code(),
                    c.balance.minor(),
                    c.recent_disputes,
                    c.device_change,
                    c.home_country
                ])?;
                for p in &c.known_payees {
                    payee.execute(params![c.customer.as_str(), p.as_str()])?;
                }
            }
            Ok(Savepointed::Keep(customers.len()))
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())))?;
        // Reads alone would not notice a writer that is gone: no decision could commit.
        match &*self.jobs.read() {
            Some(jobs) if !jobs.is_closed() => Ok(()),
            Some(_) => Err(unavailable("the writer has stopped")),
            None => Err(unavailable("store is closed")),
        }
    }

    async fn close(&self) {
        // The checkpoint thread stops first, so the writer's final TRUNCATE finds no
        // checkpoint in progress.
        let checkpointer = self.checkpointer.lock().take();
        if let Some((stop, thread)) = checkpointer {
            drop(stop);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.jobs.write().take();
        let writer = self.writer.lock().take();
        if let Some(writer) = writer {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
        self.readers.lock().clear();
    }

    async fn list_cases(
        &self,
        status: Option<CaseStatus>,
        limit: u32,
    ) -> Result<Vec<Case>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {CASE_COLUMNS} FROM cases
                 WHERE (?1 IS NULL OR status = ?1) ORDER BY created_ms DESC, id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(
                params![status.map(CaseStatus::as_str), limit],
                case_from_row,
            )?;
            rows.collect()
        })
    }

    async fn case(&self, id: &str) -> Result<Option<Case>, StoreError> {
        self.read(|conn| read_case(conn, id))
    }

    async fn resolve_case(&self, r: CaseResolution) -> Result<Resolved, StoreError> {
        self.write(move |conn| {
            let Some(case) = read_case(conn, &r.case_id)? else {
                return Ok(Savepointed::Keep(Resolved::NotFound));
            };
            if case.status != CaseStatus::Open {
                return Ok(Savepointed::Keep(Resolved::AlreadyResolved(Box::new(case))));
            }
            let amount = case.amount.minor();
            let currency = case.amount.currency();
            let mut reservation_id = None;
            if r.approve {
                let day = r.now_ms.div_euclid(86_400_000);
                let reserved = conn.prepare_cached(RESERVE)?.execute(params![
                    amount,
                    day,
                    case.customer,
                    currency.code(),
                    r.daily_limit_minor
                ])?;
                if reserved == 0 {
                    let account: Option<(String, i64)> = conn
                        .prepare_cached(
                            "SELECT currency, balance_minor - reserved_minor FROM accounts WHERE customer_id = ?1",
                        )?
                        .query_row([&case.customer], |row| Ok((row.get(0)?, row.get(1)?)))
                        .optional()?;
                    let reason = refusal_reason(
                        account.as_ref().map(|(c, a)| (c.as_str(), *a)),
                        currency.code(),
                        amount,
                    );
                    return Ok(Savepointed::Keep(Resolved::Refused(reason)));
                }
                conn.prepare_cached(
                    "INSERT INTO reservations (id, customer_id, payee_id, amount_minor, currency, request_id, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    r.reservation_id,
                    case.customer,
                    case.payee,
                    amount,
                    currency.code(),
                    case.request_id,
                    r.now_ms
                ])?;
                conn.prepare_cached(
                    "INSERT OR IGNORE INTO known_payees (customer_id, payee_id) VALUES (?1, ?2)",
                )?
                .execute(params![case.customer, case.payee])?;
                reservation_id = Some(r.reservation_id.clone());
            }
            let status = if r.approve { CaseStatus::Approved } else { CaseStatus::Declined };
            conn.prepare_cached(
                "UPDATE cases SET status = ?2, resolved_ms = ?3, resolution_note = ?4, reservation_id = ?5
                 WHERE id = ?1",
            )?
            .execute(params![r.case_id, status.as_str(), r.now_ms, r.note, reservation_id])?;
            let case = read_case(conn, &r.case_id)?;
            Ok(Savepointed::Keep(match case {
                Some(case) => Resolved::Done(Box::new(case)),
                None => Resolved::NotFound,
            }))
        })
        .await
    }

    async fn reservation(&self, id: &str) -> Result<Option<Reservation>, StoreError> {
        self.read(|conn| read_reservation(conn, id))
    }

    async fn settle_reservation(
        &self,
        id: &str,
        to: Settlement,
        now_ms: i64,
    ) -> Result<Settled, StoreError> {
        let id = id.to_owned();
        self.write(move |conn| {
            let Some(held) = read_reservation(conn, &id)? else {
                return Ok(Savepointed::Keep(Settled::NotFound));
            };
            if held.status != ReservationStatus::Held {
                return Ok(Savepointed::Keep(Settled::NotHeld(held)));
            }
            let status = match to {
                Settlement::Capture => ReservationStatus::Captured,
                Settlement::Release => ReservationStatus::Released,
            };
            settle(conn, &held, status, now_ms)?;
            Ok(Savepointed::Keep(match read_reservation(conn, &id)? {
                Some(r) => Settled::Done(r),
                None => Settled::NotFound,
            }))
        })
        .await
    }

    async fn expire_reservations(
        &self,
        created_before_ms: i64,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let ids: Vec<String> = conn
                .prepare_cached(
                    "SELECT id FROM reservations WHERE status = 'held' AND created_ms < ?1 LIMIT 5000",
                )?
                .query_map([created_before_ms], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for id in &ids {
                if let Some(held) = read_reservation(conn, id)? {
                    settle(conn, &held, ReservationStatus::Expired, now_ms)?;
                }
            }
            Ok(Savepointed::Keep(ids.len() as u64))
        })
        .await
    }
}

const CASE_COLUMNS: &str =
    "id, status, decision, reasons, customer_id, payee_id, amount_minor, currency,
    request_id, created_ms, trace, resolved_ms, resolution_note, reservation_id";

fn bad_row(what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(0, format!("{what} {value:?}"), rusqlite::types::Type::Text)
}

fn case_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Case> {
    let status: String = row.get(1)?;
    let decision: String = row.get(2)?;
    let reasons: String = row.get(3)?;
    let currency: String = row.get(7)?;
    let trace: String = row.get(10)?;
    let currency = Currency::parse(&currency).map_err(|_| bad_row("currency", &currency))?;
    Ok(Case {
        id: row.get(0)?,
        status: CaseStatus::parse(&status).ok_or_else(|| bad_row("case status", &status))?,
        decision: serde_json::from_value(serde_json::Value::String(decision.clone()))
            .map_err(|_| bad_row("decision", &decision))?,
        reasons: serde_json::from_str(&reasons).map_err(|_| bad_row("reasons", &reasons))?,
        customer: row.get(4)?,
        payee: row.get(5)?,
        amount: Money::from_minor(row.get(6)?, currency),
        request_id: row.get(8)?,
        created_ms: row.get(9)?,
        trace: serde_json::from_str(&trace).map_err(|_| bad_row("trace", "…"))?,
        resolved_ms: row.get(11)?,
        resolution_note: row.get(12)?,
        reservation_id: row.get(13)?,
    })
}

fn read_case(conn: &Connection, id: &str) -> rusqlite::Result<Option<Case>> {
    conn.prepare_cached(&format!("SELECT {CASE_COLUMNS} FROM cases WHERE id = ?1"))?
        .query_row([id], case_from_row)
        .optional()
}

fn read_reservation(conn: &Connection, id: &str) -> rusqlite::Result<Option<Reservation>> {
    conn.prepare_cached(
        "SELECT id, status, customer_id, payee_id, amount_minor, currency, request_id, created_ms, settled_ms
         FROM reservations WHERE id = ?1",
    )?
    .query_row([id], |row| {
        let status: String = row.get(1)?;
        let currency: String = row.get(5)?;
        let currency = Currency::parse(&currency).map_err(|_| bad_row("currency", &currency))?;
        Ok(Reservation {
            id: row.get(0)?,
            status: ReservationStatus::parse(&status).ok_or_else(|| bad_row("reservation status", &status))?,
            customer: row.get(2)?,
            payee: row.get(3)?,
            amount: Money::from_minor(row.get(4)?, currency),
            request_id: row.get(6)?,
            created_ms: row.get(7)?,
            settled_ms: row.get(8)?,
        })
    })
    .optional()
}

/// Moves a held reservation to `status` and gives its money back to the account: out of the
/// balance on capture, back to available otherwise. A release on the day it was made also
/// lowers that day's outflow.
fn settle(
    conn: &Connection,
    held: &Reservation,
    status: ReservationStatus,
    now_ms: i64,
) -> rusqlite::Result<()> {
    let amount = held.amount.minor();
    let day = held.created_ms.div_euclid(86_400_000);
    conn.prepare_cached(
        "UPDATE reservations SET status = ?2, settled_ms = ?3 WHERE id = ?1 AND status = 'held'",
    )?
    .execute(params![held.id, status.as_str(), now_ms])?;
    if status == ReservationStatus::Captured {
        conn.prepare_cached(
            "UPDATE accounts SET balance_minor = balance_minor - ?2, reserved_minor = reserved_minor - ?2
             WHERE customer_id = ?1",
        )?
        .execute(params![held.customer, amount])?;
    } else {
        conn.prepare_cached(
            "UPDATE accounts SET reserved_minor = reserved_minor - ?2,
                 outflow_minor = CASE WHEN outflow_day = ?3 THEN max(outflow_minor - ?2, 0) ELSE outflow_minor END
             WHERE customer_id = ?1",
        )?
        .execute(params![held.customer, amount, day])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_is_durable_wal_with_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let conn = connect(&dir.path().join("p.db"), true).unwrap();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        let sync: i64 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        let busy: i64 = conn
            .pragma_query_value(None, "busy_timeout", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(sync, 2, "synchronous=FULL");
        assert!(busy >= 1000);
    }

    #[test]
    fn urls_name_the_file() {
        assert_eq!(
            path_from_url("sqlite://paynow.db"),
            Some(PathBuf::from("paynow.db"))
        );
        assert_eq!(
            path_from_url("sqlite:///var/lib/p.db?mode=rwc"),
            Some(PathBuf::from("/var/lib/p.db"))
        );
        assert_eq!(path_from_url("postgres://x"), None);
    }
}
