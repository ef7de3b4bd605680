//! The embedded SQLite store.
//!
//! # Writes
//! All writes go through one thread that owns the only writing connection and commits the
//! jobs that arrived together in one transaction (group commit); a thread of its own syncs
//! the WAL before any of them is answered. See [`writer`] for how that keeps every answered
//! decision on disk. Reservation checks stay exact inside a batch: each job's conditional
//! `UPDATE` sees the jobs before it in the same transaction.
//!
//! # Reads
//! The decision path's reads (the idempotency lookup, the tools' account and risk reads) are
//! jobs for the writer thread: they run at the start of a batch on the writer's warm page
//! cache and are answered at once. A separate read-only connection finds its cache outdated
//! after every commit and reads each page again from the file: measured, that was most of
//! the cost of a decision's reads.
//!
//! Listing and fetching cases and reservations use a small pool of read-only connections
//! beside the writer (WAL mode lets them run while it writes), so a reviewer's large listing
//! never holds up decisions. Their answers wait until what they read is on disk.
//!
//! # Durability
//! WAL journal; an answered decision survives a crash of the process and of the machine.
//! `busy_timeout` covers the rare checkpoint that makes a reader wait.

mod walbuf;
mod writer;

use writer::{Db, ReadThen};

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::{
    Account, Begin, Claim, CommitOutcome, Committed, DecideNow, DecisionRecord, IdempotencyScope,
    Lookup, PaymentReads, ReadsRequest, RiskProfile, Store, StoreError, StoredResponse,
    reasons_json,
};
use super::{
    Case, CaseResolution, CaseStatus, Reservation, ReservationStatus, Resolved, Settled,
    Settlement, refusal_reason,
};
use crate::domain::{Currency, Decision, Money, RequestId};
use crate::fixtures::CustomerFixture;

pub use writer::MAX_BATCH;

/// Read connections kept open.
const READER_POOL: usize = 8;
const BUSY_TIMEOUT_MS: u32 = 5_000;
/// WAL pages after which the writer checkpoints by itself: only if the checkpoint thread,
/// which starts the WAL over at half of this, has fallen behind.
const WRITER_AUTOCHECKPOINT_PAGES: i64 = 2 * writer::RESTART_AFTER_FRAMES;
/// The writer's page cache, in KiB: the decision path's reads are served from it.
const WRITER_CACHE_KIB: i64 = 2 * 1024;

const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/sqlite/0001_init.sql"),
    include_str!("../../../migrations/sqlite/0002_review.sql"),
    include_str!("../../../migrations/sqlite/0003_clustered.sql"),
    include_str!("../../../migrations/sqlite/0004_velocity_chain.sql"),
];

pub struct SqliteStore {
    path: PathBuf,
    writer: writer::Writer,
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
    let conn = match walbuf::register() {
        Ok(vfs) => Connection::open_with_flags_and_vfs(path, flags, vfs)?,
        Err(why) => {
            tracing::warn!(
                event = "store.vfs_unavailable",
                why,
                "WAL writes go frame by frame"
            );
            Connection::open_with_flags(path, flags)?
        }
    };
    conn.pragma_update(None, "busy_timeout", BUSY_TIMEOUT_MS)?;
    if writer {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Commits do not wait for the disk; the writer's sync thread does, before answering
        // (see `writer`). Checkpoints still sync the WAL before copying it, and the file after.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
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
        Self::open_syncing(path, |path| {
            writer::WalFile::open(path).map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the WAL of SQLite database {}: {e}",
                    path.display()
                )
            })
        })
    }

    /// [`SqliteStore::open`], with the WAL made durable by what `sync` gives (tests hold it).
    fn open_syncing<S: writer::SyncWal>(
        path: &Path,
        sync: impl FnOnce(&Path) -> anyhow::Result<S>,
    ) -> anyhow::Result<Self> {
        if path.as_os_str().is_empty() || path == Path::new(":memory:") {
            anyhow::bail!("DATABASE_URL must name a SQLite file, e.g. sqlite://paynow.db");
        }
        let mut conn = connect(path, true)
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database {}: {e}", path.display()))?;
        migrate(&mut conn).map_err(|e| {
            anyhow::anyhow!("cannot migrate SQLite database {}: {e}", path.display())
        })?;
        let configured = conn
            .pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)
            .and_then(|()| conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB));
        configured.map_err(|e| {
            anyhow::anyhow!("cannot configure SQLite database {}: {e}", path.display())
        })?;
        let checkpoints = connect(path, true)
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database {}: {e}", path.display()))?;
        let wal = sync(path)?;
        let db = std::fs::File::open(path)
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database {}: {e}", path.display()))?;
        Ok(SqliteStore {
            path: path.to_owned(),
            writer: writer::Writer::start(conn, wal, checkpoints, db)?,
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

    /// A read on a pool connection whose answer leaves the process: it waits until every
    /// batch it could have seen is on disk.
    async fn read_durable<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let value = self.read(f)?;
        let durability = self.writer.durability();
        durability.wait(durability.newest()).await?;
        Ok(value)
    }
}

/// Reserves `?1` on the account of customer `?3` in currency `?4`, on UTC day `?2`, if the
/// funds are available and the day's outflow stays within `?5`; `$also` are further
/// assignments of the same update. The counter never goes back a day: a payment stamped on a
/// day the account has already left counts toward the day it is on.
macro_rules! reserve_sql {
    ($also:literal) => {
        concat!(
            "UPDATE accounts
    SET reserved_minor = reserved_minor + ?1,
        outflow_minor = CASE WHEN outflow_day >= ?2 THEN outflow_minor + ?1 ELSE ?1 END,
        outflow_day = max(outflow_day, ?2)",
            $also,
            "
    WHERE customer_id = ?3 AND currency = ?4
      AND balance_minor - reserved_minor >= ?1
      AND (CASE WHEN outflow_day >= ?2 THEN outflow_minor ELSE 0 END) + ?1 <= ?5"
        )
    };
}

const RESERVE: &str = reserve_sql!("");

/// [`RESERVE`], and the account's link to its newest decision (`?6`, made at `?7`) for the
/// velocity count, in the same update: an allow's account row is written once.
const RESERVE_AND_LINK: &str = reserve_sql!(
    ",
        last_decision = ?6,
        last_decision_ms = max(coalesce(last_decision_ms, ?7), ?7)"
);

/// The account's link to its newest decision (`?2`, made at `?3`), for the velocity count.
const LINK: &str = "UPDATE accounts SET last_decision = ?2,
                             last_decision_ms = max(coalesce(last_decision_ms, ?3), ?3)
         WHERE customer_id = ?1";

const STORE_RESPONSE: &str = "INSERT INTO idempotency
        (caller, key, fingerprint, status_code, body, request_id, created_ms, expires_ms)
    VALUES (?1, ?2, ?3, 200, ?4, ?5, ?6, ?7)
    ON CONFLICT (caller, key) DO UPDATE SET
        fingerprint = excluded.fingerprint, status_code = excluded.status_code,
        body = excluded.body, request_id = excluded.request_id,
        created_ms = excluded.created_ms, expires_ms = excluded.expires_ms
    WHERE idempotency.expires_ms <= excluded.created_ms";

/// A decision ready for its write: its response body (and a case's trace) rendered before
/// it runs. A decision made on the async side is rendered there; one made in its claim's job
/// is rendered on the writer (microseconds, against a second trip to the writer).
struct Rendered {
    rec: DecisionRecord,
    body: Vec<u8>,
    /// The trace as stored with a case; `None` for an allow.
    trace: Option<String>,
    /// The payee was among the customer's known payees when the decision's reads were made
    /// in this transaction (they are never removed), so an allow need not add it.
    payee_known: bool,
}

impl Rendered {
    fn new(rec: DecisionRecord, payee_known: bool) -> Self {
        let body = rec.response_body();
        let trace = (rec.outcome.decision != Decision::Allow).then(|| trace_json(&rec));
        Rendered {
            rec,
            body,
            trace,
            payee_known,
        }
    }
}

fn trace_json(rec: &DecisionRecord) -> String {
    serde_json::to_string(&rec.outcome.trace).unwrap_or_else(|_| "[]".into())
}

/// Writes one decision. The idempotency record goes first: if the key already holds a live
/// answer, nothing at all is written. Then the audit row, linked to the customer's previous
/// decision; then the reservation, which also points the account at that row (or its
/// refusal, which turns the answer into a block and rewrites the stored body and the audit
/// row), and the case.
fn apply_decision(
    db: &Db<'_>,
    Rendered {
        mut rec,
        mut body,
        trace,
        payee_known,
    }: Rendered,
) -> rusqlite::Result<CommitOutcome> {
    let customer = rec.payment.customer.as_str();
    let payee = rec.payment.payee.as_str();
    let amount = rec.payment.amount.minor();
    let currency = rec.payment.amount.currency();
    let currency = currency.code();
    let day = rec.day();
    let (caller, key) = (&*rec.scope.caller, rec.scope.key.as_str());
    let mut reservation_id = None;
    let mut case_id = None;

    let stored = db.execute(
        STORE_RESPONSE,
        params![
            caller,
            key,
            &rec.fingerprint[..],
            &body,
            rec.request_id.as_str(),
            rec.now_ms,
            rec.idempotency_expires_ms
        ],
    )?;
    if stored == 0 {
        // A live answer exists for this key: this execution leaves no trace.
        return Ok(CommitOutcome::Duplicate);
    }

    let mut reasons = reasons_json(&rec.outcome.reasons);
    // Linked to the customer's previous decision, for the velocity count (migration 0004).
    db.execute(
        "INSERT INTO decisions (prev_id, newest_ms, request_id, customer_id, payee_id, amount_minor, currency, decision, reasons, created_ms)
         SELECT a.last_decision, max(?8, coalesce(a.last_decision_ms, ?8)), ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8
         FROM (SELECT 1) LEFT JOIN accounts a ON a.customer_id = ?2",
        params![
            rec.request_id.as_str(),
            customer,
            payee,
            amount,
            currency,
            rec.outcome.decision.as_str(),
            reasons,
            rec.now_ms
        ],
    )?;
    let decision_id = db.last_insert_rowid();

    let mut linked = false;
    let mut trace = trace;
    if rec.outcome.decision == Decision::Allow {
        let reserved = db.execute(
            RESERVE_AND_LINK,
            params![
                amount,
                day,
                customer,
                currency,
                rec.daily_limit_minor,
                decision_id,
                rec.now_ms
            ],
        )?;
        if reserved == 1 {
            linked = true;
            db.execute(
                "INSERT INTO reservations (id, customer_id, payee_id, amount_minor, currency, request_id, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    rec.reservation_id,
                    customer,
                    payee,
                    amount,
                    currency,
                    rec.request_id.as_str(),
                    rec.now_ms
                ],
            )?;
            if !payee_known {
                db.execute(
                    "INSERT OR IGNORE INTO known_payees (customer_id, payee_id) VALUES (?1, ?2)",
                    params![customer, payee],
                )?;
            }
            reservation_id = Some(rec.reservation_id.clone());
        } else {
            let now: Option<(i64, i64)> = db.query_opt(
                "SELECT balance_minor - reserved_minor,
                        CASE WHEN outflow_day >= ?2 THEN outflow_minor ELSE 0 END
                 FROM accounts WHERE customer_id = ?1",
                params![customer, day],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let (available, outflow) = now.unwrap_or((0, 0));
            super::refuse_reservation(&rec.payment, &mut rec.outcome, available, outflow);
            body = rec.response_body();
            trace = None;
            reasons = reasons_json(&rec.outcome.reasons);
            db.execute(
                "UPDATE idempotency SET body = ?3 WHERE caller = ?1 AND key = ?2",
                params![caller, key, &body],
            )?;
            db.execute(
                "UPDATE decisions SET decision = ?2, reasons = ?3 WHERE id = ?1",
                params![decision_id, rec.outcome.decision.as_str(), reasons],
            )?;
        }
    }
    if !linked {
        db.execute(LINK, params![customer, decision_id, rec.now_ms])?;
    }

    if rec.outcome.decision != Decision::Allow {
        let trace = trace.unwrap_or_else(|| trace_json(&rec));
        db.execute(
            "INSERT INTO cases (id, customer_id, payee_id, amount_minor, currency, decision, reasons, trace, request_id, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                rec.case_id,
                customer,
                payee,
                amount,
                currency,
                rec.outcome.decision.as_str(),
                reasons,
                trace,
                rec.request_id.as_str(),
                rec.now_ms
            ],
        )?;
        case_id = Some(rec.case_id.clone());
    }

    Ok(CommitOutcome::Committed(Box::new(Committed {
        outcome: rec.outcome,
        body: body.into(),
        reservation_id,
        case_id,
    })))
}

/// A stored response as read, before its fingerprint is compared.
struct Stored {
    fingerprint: Vec<u8>,
    response: StoredResponse,
}

impl Stored {
    fn matching(self, fingerprint: &[u8; 32]) -> Lookup {
        if self.fingerprint[..] == fingerprint[..] {
            Lookup::Replay(self.response)
        } else {
            Lookup::Mismatch
        }
    }
}

fn stored_response(
    db: &Db<'_>,
    caller: &str,
    key: &str,
    now_ms: i64,
) -> Result<Option<Stored>, StoreError> {
    db.query_opt(
        "SELECT fingerprint, status_code, body, request_id FROM idempotency
         WHERE caller = ?1 AND key = ?2 AND expires_ms > ?3",
        params![caller, key, now_ms],
        |r| {
            Ok(Stored {
                fingerprint: r.get(0)?,
                response: StoredResponse {
                    status: r.get(1)?,
                    body: r.get::<_, Vec<u8>>(2)?.into(),
                    request_id: RequestId::from_stored(r.get(3)?),
                },
            })
        },
    )
    .map_err(unavailable)
}

/// What both tools need about one payment: the account with its risk columns and this
/// payee's familiarity in one statement, then the velocity count.
fn read_payment(db: &Db<'_>, request: &ReadsRequest) -> Result<PaymentReads, StoreError> {
    let row = db
        .query_opt(
            "SELECT a.currency, a.balance_minor, a.reserved_minor, a.outflow_day, a.outflow_minor,
                    a.recent_disputes, a.device_change, a.home_country,
                    EXISTS (SELECT 1 FROM known_payees k WHERE k.customer_id = ?1 AND k.payee_id = ?2),
                    a.last_decision, a.last_decision_ms
             FROM accounts a WHERE a.customer_id = ?1",
            params![request.customer.as_str(), request.payee.as_str()],
            |r| {
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
                        recent_payments: 0,
                    },
                    Newest {
                        id: r.get(9)?,
                        at_ms: r.get(10)?,
                    },
                ))
            },
        )
        .map_err(unavailable)?;
    let Some(((currency, balance, reserved, day, outflow), mut risk, newest)) = row else {
        return Ok(PaymentReads::default());
    };
    let in_batch = db.decided_in_batch(request.customer.as_str());
    risk.recent_payments = recent_payments(db, newest, request)
        .map_err(unavailable)?
        .saturating_add(in_batch)
        .min(request.velocity_cap);
    let currency = Currency::parse(&currency)
        .map_err(|_| StoreError::Internal(format!("account has bad currency {currency:?}")))?;
    Ok(PaymentReads {
        account: Some(Account {
            customer: request.customer.clone(),
            balance: Money::from_minor(balance, currency),
            reserved_minor: reserved,
            outflow_day: day,
            outflow_minor: outflow,
        }),
        risk: Some(risk),
    })
}

/// The account's newest decision and the latest `created_ms` of all of its decisions.
struct Newest {
    id: Option<i64>,
    at_ms: Option<i64>,
}

/// The customer's decisions since the window's start, counted by walking back from the
/// newest along each one's link to the previous (migration 0004): one lookup by primary key
/// per step, no more steps than the rule's limit, and none once no earlier decision can be
/// in the window (`newest_ms`, the latest start among it and those before it, is older).
fn recent_payments(db: &Db<'_>, newest: Newest, request: &ReadsRequest) -> rusqlite::Result<u32> {
    let since = request.velocity_since_ms;
    if newest.at_ms.is_none_or(|at| at < since) {
        return Ok(0);
    }
    let mut count = 0;
    let mut next = newest.id;
    while count < request.velocity_cap {
        let Some(id) = next else { break };
        let step = db.query_opt(
            "SELECT prev_id, newest_ms, created_ms FROM decisions WHERE id = ?1 AND customer_id = ?2",
            params![id, request.customer.as_str()],
            |r| Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)),
        )?;
        let Some((prev, newest_ms, created_ms)) = step else {
            break;
        };
        if newest_ms < since {
            break;
        }
        if created_ms >= since {
            count += 1;
        }
        next = prev;
    }
    Ok(count)
}

/// Where a claim's trip to the writer ended.
enum Trip {
    /// The key holds an answer, as of batch `seen`.
    Stored(Stored, u64),
    /// The key is this request's, with the tools' reads if asked for.
    Fresh(Option<Result<PaymentReads, StoreError>>),
    /// The key was this request's, and the decision made from the reads is committed.
    Decided(CommitOutcome),
}

impl SqliteStore {
    /// One job for the writer: the lookup, the tools' reads when the key is free, and with
    /// `decide` the decision made from them, written in the batch right after the reads.
    async fn begin(
        &self,
        scope: &IdempotencyScope,
        fingerprint: &[u8; 32],
        now_ms: i64,
        reads: Option<&ReadsRequest>,
        decide: Option<DecideNow>,
    ) -> Result<Begin, StoreError> {
        let key = scope.local_key();
        if !self.in_flight.lock().insert(key.clone()) {
            return Ok(Begin::InProgress);
        }
        let in_flight = self.in_flight.clone();
        let claim = Claim::new(move || {
            in_flight.lock().remove(&key);
        });
        let (caller, key) = (scope.caller.clone(), scope.key.as_str().to_owned());
        let reads = reads.cloned();
        let trip = self
            .writer
            .read_then_write(move |db, seen| {
                match stored_response(db, &caller, &key, now_ms) {
                    Ok(Some(stored)) => return ReadThen::Answer(Ok(Trip::Stored(stored, seen))),
                    Ok(None) => {}
                    Err(e) => return ReadThen::Answer(Err(e)),
                }
                let fetched = reads.map(|reads| read_payment(db, &reads));
                // The agent runs here, on the writer (a panic in it answers this request
                // with an internal error, see `Writer::read_then_write`).
                if let (Some(Ok(fetched)), Some(decide)) = (&fetched, decide)
                    && let Some(record) = decide(fetched)
                {
                    db.note_decided(record.payment.customer.as_str());
                    let payee_known = fetched.risk.as_ref().is_some_and(|r| r.known_payee);
                    let rendered = Rendered::new(record, payee_known);
                    return ReadThen::Write(Box::new(move |db| {
                        apply_decision(db, rendered).map(Trip::Decided)
                    }));
                }
                ReadThen::Answer(Ok(Trip::Fresh(fetched)))
            })
            .await?;
        Ok(match trip {
            Trip::Stored(stored, seen) => {
                // A stored answer is replayed only once it is on disk, as it was when first
                // sent.
                self.writer.durability().wait(seen).await?;
                match stored.matching(fingerprint) {
                    Lookup::Replay(stored) => Begin::Replay(stored),
                    Lookup::Mismatch => Begin::Mismatch,
                }
            }
            Trip::Fresh(fetched) => Begin::Fresh(claim, super::prefetched(fetched)),
            Trip::Decided(outcome) => Begin::Decided(claim, outcome),
        })
    }
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
        reads: Option<&ReadsRequest>,
    ) -> Result<Begin, StoreError> {
        self.begin(scope, fingerprint, now_ms, reads, None).await
    }

    async fn begin_deciding(
        &self,
        scope: &IdempotencyScope,
        fingerprint: &[u8; 32],
        now_ms: i64,
        reads: &ReadsRequest,
        decide: DecideNow,
    ) -> Result<Begin, StoreError> {
        self.begin(scope, fingerprint, now_ms, Some(reads), Some(decide))
            .await
    }

    async fn find_response(
        &self,
        scope: &IdempotencyScope,
        fingerprint: &[u8; 32],
        now_ms: i64,
    ) -> Result<Option<Lookup>, StoreError> {
        let (caller, key) = (scope.caller.clone(), scope.key.as_str().to_owned());
        let (stored, seen) = self
            .writer
            .read_latest(move |db| stored_response(db, &caller, &key, now_ms))
            .await?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        self.writer.durability().wait(seen).await?;
        Ok(Some(stored.matching(fingerprint)))
    }

    async fn payment_reads(&self, request: &ReadsRequest) -> Result<PaymentReads, StoreError> {
        let request = request.clone();
        // Only the agent sees these; the decision made from them is a later, synced write.
        let (reads, _) = self
            .writer
            .read_latest(move |db| Ok(read_payment(db, &request)))
            .await?;
        reads
    }

    async fn commit_decision(&self, record: DecisionRecord) -> Result<CommitOutcome, StoreError> {
        let customer = record.payment.customer.as_str().to_owned();
        // What the reads found is not in the record: the payee is added unless it is there.
        let rendered = Rendered::new(record, false);
        // Handed over from the batch's reads, in the order it was queued, so that a decision
        // read later in the same batch counts it (see `Db::decided_in_batch`).
        self.writer
            .read_then_write(move |db, _| {
                db.note_decided(&customer);
                ReadThen::Write(Box::new(move |db| apply_decision(db, rendered)))
            })
            .await
    }

    async fn purge_expired(&self, now_ms: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            // Small slices keep each transaction short, so decisions are not held up.
            let n = self
                .writer
                .write_isolated(move |conn| {
                    conn.prepare_cached(
                        "DELETE FROM idempotency WHERE rowid IN
                         (SELECT rowid FROM idempotency WHERE expires_ms <= ?1 LIMIT 5000)",
                    )?
                    .execute([now_ms])
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
        self.writer.write(move |conn| {
            let existing: i64 = conn.query_row("SELECT count(*) FROM accounts", [], |r| r.get(0))?;
            if existing > 0 {
                return Ok(0);
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
            Ok(customers.len())
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())))?;
        // The writer answers too: it makes every decision, and serves their reads.
        self.writer
            .read_latest(|db| {
                db.query_row("SELECT 1", [], |_| Ok(()))
                    .map_err(unavailable)
            })
            .await?;
        // A store that stopped (see `writer`) is not ready until it is restarted.
        if self.writer.durability().failed() {
            return Err(unavailable(
                "the store stopped after a disk or database failure",
            ));
        }
        Ok(())
    }

    async fn close(&self) {
        self.writer.close().await;
        self.readers.lock().clear();
    }

    async fn list_cases(
        &self,
        status: Option<CaseStatus>,
        limit: u32,
    ) -> Result<Vec<Case>, StoreError> {
        self.read_durable(|conn| {
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
        .await
    }

    async fn case(&self, id: &str) -> Result<Option<Case>, StoreError> {
        self.read_durable(|conn| read_case(conn, id)).await
    }

    async fn resolve_case(&self, r: CaseResolution) -> Result<Resolved, StoreError> {
        self.writer.write_isolated(move |conn| {
            let Some(case) = read_case(conn, &r.case_id)? else {
                return Ok(Resolved::NotFound);
            };
            if case.status != CaseStatus::Open {
                return Ok(Resolved::AlreadyResolved(Box::new(case)));
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
                    return Ok(Resolved::Refused(reason));
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
            Ok(match case {
                Some(case) => Resolved::Done(Box::new(case)),
                None => Resolved::NotFound,
            })
        })
        .await
    }

    async fn reservation(&self, id: &str) -> Result<Option<Reservation>, StoreError> {
        self.read_durable(|conn| read_reservation(conn, id)).await
    }

    async fn settle_reservation(
        &self,
        id: &str,
        to: Settlement,
        now_ms: i64,
    ) -> Result<Settled, StoreError> {
        let id = id.to_owned();
        self.writer
            .write_isolated(move |conn| {
                let Some(held) = read_reservation(conn, &id)? else {
                    return Ok(Settled::NotFound);
                };
                if held.status != ReservationStatus::Held {
                    return Ok(Settled::NotHeld(held));
                }
                let status = match to {
                    Settlement::Capture => ReservationStatus::Captured,
                    Settlement::Release => ReservationStatus::Released,
                };
                settle(conn, &held, status, now_ms)?;
                Ok(match read_reservation(conn, &id)? {
                    Some(r) => Settled::Done(r),
                    None => Settled::NotFound,
                })
            })
            .await
    }

    async fn expire_reservations(
        &self,
        created_before_ms: i64,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        self.writer.write_isolated(move |conn| {
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
            Ok(ids.len() as u64)
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
    use std::time::Duration;

    use super::*;
    use crate::domain::{CustomerId, PayeeId};

    #[test]
    fn the_writer_journals_to_a_wal_it_syncs_itself() {
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
        // NORMAL: commits do not sync; the sync thread does before answering (`writer`).
        assert_eq!(sync, 1, "synchronous=NORMAL");
        assert!(busy >= 1000);
    }

    /// A review of a payment by the demo customer c_123 (two recent disputes), ready to commit.
    fn record(key: &str, amount: &str) -> (IdempotencyScope, [u8; 32], DecisionRecord) {
        use crate::domain::{IdempotencyKey, Payment};
        let payment = Payment {
            customer: CustomerId::parse("c_123").unwrap(),
            payee: PayeeId::parse("p_789").unwrap(),
            amount: Money::parse(amount, Currency::USD).unwrap(),
            device_id: None,
            ip_country: None,
        };
        let scope = IdempotencyScope {
            caller: "test".into(),
            key: IdempotencyKey::parse(key).unwrap(),
        };
        let fingerprint = payment.fingerprint();
        let outcome = crate::agent::Outcome {
            decision: Decision::Review,
            reasons: vec![crate::domain::Reason::RecentDisputes],
            trace: vec![crate::domain::TraceStep::new("plan", "test")],
            failed_tools: vec![],
        };
        let now = super::super::now_ms();
        let rec = DecisionRecord {
            scope: scope.clone(),
            fingerprint,
            request_id: RequestId::generate(),
            payment,
            outcome,
            reservation_id: crate::domain::new_id("res"),
            case_id: crate::domain::new_id("case"),
            now_ms: now,
            idempotency_expires_ms: now + 60_000,
            daily_limit_minor: 1_000_000,
        };
        (scope, fingerprint, rec)
    }

    async fn within<T>(task: tokio::task::JoinHandle<T>) -> Result<T, tokio::task::JoinError> {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("an answer within 10 s")
    }

    /// A store whose WAL syncs wait for the gate, seeded with the demo customers.
    async fn gated_store(dir: &Path) -> (Arc<SqliteStore>, writer::tests::Gate) {
        let gate = writer::tests::Gate::new();
        let store = Arc::new(
            SqliteStore::open_syncing(&dir.join("p.db"), {
                let gate = gate.clone();
                move |_| Ok(gate)
            })
            .unwrap(),
        );
        // Seeding is a write: let its sync through.
        gate.open(1);
        let fixtures = crate::fixtures::load(None).unwrap();
        store.seed_if_empty(&fixtures).await.unwrap();
        (store, gate)
    }

    #[tokio::test]
    async fn a_customers_decisions_in_one_batch_each_count_the_ones_before() {
        let dir = tempfile::tempdir().unwrap();
        let (store, gate) = gated_store(dir.path()).await;
        gate.open(100);
        // A job that holds the writer until the decisions below are queued behind it, so that
        // they are read, decided and written in one batch.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let blocker = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .writer
                    .read_latest(move |_| {
                        held.recv().unwrap();
                        Ok(())
                    })
                    .await
                    .map(drop)
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // First in the batch: a decision made outside the writer, committed.
        let committed = tokio::spawn({
            let store = store.clone();
            let (_, _, mut rec) = record("v-outside", "1.00");
            rec.payment.customer = CustomerId::parse("c_rich").unwrap();
            async move { store.commit_decision(rec).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let decisions: Vec<_> = (0..3)
            .map(|i| {
                let (scope, fingerprint, mut rec) = record(&format!("v-{i}"), "1.00");
                rec.payment.customer = CustomerId::parse("c_rich").unwrap();
                let reads = ReadsRequest {
                    customer: rec.payment.customer.clone(),
                    payee: rec.payment.payee.clone(),
                    velocity_since_ms: 0,
                    velocity_cap: 10,
                };
                let (store, seen) = (store.clone(), seen.clone());
                tokio::spawn(async move {
                    let decide: DecideNow = Box::new(move |reads: &PaymentReads| {
                        seen.lock()
                            .push(reads.risk.as_ref().unwrap().recent_payments);
                        Some(rec)
                    });
                    let now = super::super::now_ms();
                    store
                        .begin_deciding(&scope, &fingerprint, now, &reads, decide)
                        .await
                        .map(drop)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        committed.await.unwrap().unwrap();
        for decision in decisions {
            decision.await.unwrap().unwrap();
        }
        assert_eq!(
            *seen.lock(),
            [1, 2, 3],
            "each counts the ones decided before it"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn a_decision_made_in_its_claims_trip_is_written_only_if_made_and_answered_once_on_disk()
    {
        let dir = tempfile::tempdir().unwrap();
        let (store, gate) = gated_store(dir.path()).await;
        let (scope, fingerprint, rec) = record("k-2", "125.50");
        let reads = ReadsRequest {
            customer: rec.payment.customer.clone(),
            payee: rec.payment.payee.clone(),
            velocity_since_ms: 0,
            velocity_cap: u32::MAX,
        };
        let now = super::super::now_ms();

        // No decision made there: the claim comes back fresh, with the reads, and nothing is
        // written.
        let begun = store
            .begin_deciding(&scope, &fingerprint, now, &reads, Box::new(|_| None))
            .await
            .unwrap();
        let Begin::Fresh(claim, Some(fetched)) = begun else {
            panic!("expected a fresh claim with its reads");
        };
        assert!(fetched.account.is_some());
        drop(claim);
        let stored = store
            .find_response(&scope, &fingerprint, now)
            .await
            .unwrap();
        assert!(stored.is_none());

        // Made there: committed in the same trip, answered only once it is on disk.
        let deciding = tokio::spawn({
            let (store, scope) = (store.clone(), scope.clone());
            async move {
                store
                    .begin_deciding(&scope, &fingerprint, now, &reads, Box::new(|_| Some(rec)))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!deciding.is_finished(), "answered before its sync");
        gate.open(1);
        assert!(matches!(
            within(deciding).await.unwrap().unwrap(),
            Begin::Decided(_, CommitOutcome::Committed(_))
        ));
        assert!(matches!(
            store
                .find_response(&scope, &fingerprint, now)
                .await
                .unwrap(),
            Some(Lookup::Replay(_))
        ));
        gate.open(100);
        store.close().await;
    }

    #[tokio::test]
    async fn an_allow_links_its_account_to_its_audit_row_and_one_refused_at_commit_is_audited_as_a_block()
     {
        let dir = tempfile::tempdir().unwrap();
        let (store, gate) = gated_store(dir.path()).await;
        gate.open(100);
        // An allow of `amount` by `customer` to `payee`, decided in its claim's trip from the
        // reads made there.
        let allow = |key: &str, customer: &str, payee: &str, amount: &str| {
            let (scope, fingerprint, mut rec) = record(key, amount);
            rec.payment.customer = CustomerId::parse(customer).unwrap();
            rec.payment.payee = PayeeId::parse(payee).unwrap();
            rec.outcome.decision = Decision::Allow;
            rec.outcome.reasons.clear();
            let reads = ReadsRequest {
                customer: rec.payment.customer.clone(),
                payee: rec.payment.payee.clone(),
                velocity_since_ms: 0,
                velocity_cap: u32::MAX,
            };
            let store = store.clone();
            async move {
                let now = rec.now_ms;
                match store
                    .begin_deciding(&scope, &fingerprint, now, &reads, Box::new(|_| Some(rec)))
                    .await
                    .unwrap()
                {
                    Begin::Decided(_, CommitOutcome::Committed(c)) => c,
                    _ => panic!("expected a committed decision"),
                }
            }
        };
        // c_456 has 1000.00 and knows p_789 only; c_789 has 50.00.
        let to_known = allow("a-1", "c_456", "p_789", "10.00").await;
        let to_new = allow("a-2", "c_456", "p_new", "20.00").await;
        let refused = allow("a-3", "c_789", "p_789", "60.00").await;
        assert_eq!(to_known.outcome.decision, Decision::Allow);
        assert_eq!(to_new.outcome.decision, Decision::Allow);
        assert_eq!(refused.outcome.decision, Decision::Block);
        assert_eq!(
            refused.outcome.reasons,
            [crate::domain::Reason::InsufficientFunds]
        );
        assert!(refused.case_id.is_some());
        store.close().await;

        let conn = Connection::open(dir.path().join("p.db")).unwrap();
        let audit = |customer: &str| -> Vec<(i64, Option<i64>, String, String)> {
            conn.prepare(
                "SELECT id, prev_id, decision, reasons FROM decisions WHERE customer_id = ?1 ORDER BY id",
            )
            .unwrap()
            .query_map([customer], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
        };
        let account = |customer: &str| -> (i64, Option<i64>) {
            conn.query_row(
                "SELECT reserved_minor, last_decision FROM accounts WHERE customer_id = ?1",
                [customer],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
        };
        let allows = audit("c_456");
        assert_eq!(allows.len(), 2);
        assert_eq!(allows[0].1, None, "the customer's first decision");
        assert_eq!(allows[1].1, Some(allows[0].0), "linked to the one before");
        assert_eq!(account("c_456"), (3_000, Some(allows[1].0)));
        let payees: Vec<String> = conn
            .prepare(
                "SELECT payee_id FROM known_payees WHERE customer_id = 'c_456' ORDER BY payee_id",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(payees, ["p_789", "p_new"], "the new payee is known now");

        let blocked = audit("c_789");
        assert_eq!(blocked.len(), 1);
        assert_eq!(
            (blocked[0].2.as_str(), blocked[0].3.as_str()),
            ("block", r#"["insufficient_funds"]"#),
            "the audit row says what was answered"
        );
        assert_eq!(
            account("c_789"),
            (0, Some(blocked[0].0)),
            "nothing reserved, still linked"
        );
    }

    #[tokio::test]
    async fn replays_and_case_listings_wait_until_what_they_show_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (store, gate) = gated_store(dir.path()).await;

        let (scope, fingerprint, rec) = record("k-1", "125.50");
        let committing = tokio::spawn({
            let store = store.clone();
            async move { store.commit_decision(rec).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!committing.is_finished(), "answered before its sync");
        let now = super::super::now_ms();
        let replay = tokio::spawn({
            let (store, scope) = (store.clone(), scope.clone());
            async move { store.find_response(&scope, &fingerprint, now).await }
        });
        let listing = tokio::spawn({
            let store = store.clone();
            async move { store.list_cases(None, 10).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !replay.is_finished(),
            "a replay of an answer not yet on disk"
        );
        assert!(!listing.is_finished(), "a case listed before it is on disk");
        gate.open(1);
        assert!(matches!(
            within(committing).await.unwrap().unwrap(),
            CommitOutcome::Committed(_)
        ));
        assert!(matches!(
            within(replay).await.unwrap().unwrap(),
            Some(Lookup::Replay(_))
        ));
        assert_eq!(within(listing).await.unwrap().unwrap().len(), 1);
        gate.open(100);
        store.close().await;
    }

    #[tokio::test]
    async fn a_store_made_before_the_velocity_chain_links_its_decisions_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        {
            let conn = connect(&path, true).unwrap();
            for sql in &MIGRATIONS[..3] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 3).unwrap();
            conn.execute_batch(
                "INSERT INTO accounts (customer_id, currency, balance_minor)
                 VALUES ('c_123', 'USD', 100000), ('c_456', 'USD', 100000), ('c_rich', 'USD', 100000)",
            )
            .unwrap();
            let mut insert = conn
                .prepare(
                    "INSERT INTO decisions (request_id, customer_id, payee_id, amount_minor, currency, decision, reasons, created_ms)
                     VALUES ('req_old', ?1, 'p_789', 100, 'USD', 'allow', '[]', ?2)",
                )
                .unwrap();
            // c_123's second decision started before its first (it committed later).
            for (customer, at) in [
                ("c_123", 2000),
                ("c_456", 1500),
                ("c_123", 1000),
                ("c_456", 2500),
                ("c_123", 3000),
            ] {
                insert.execute(params![customer, at]).unwrap();
            }
        }
        let store = SqliteStore::open(&path).unwrap();
        let count = async |customer: &str, since: i64, cap: u32| {
            let reads = ReadsRequest {
                customer: CustomerId::parse(customer).unwrap(),
                payee: PayeeId::parse("p_789").unwrap(),
                velocity_since_ms: since,
                velocity_cap: cap,
            };
            store
                .payment_reads(&reads)
                .await
                .unwrap()
                .risk
                .unwrap()
                .recent_payments
        };
        assert_eq!(count("c_123", 0, 100).await, 3);
        assert_eq!(count("c_123", 2000, 100).await, 2);
        assert_eq!(count("c_123", 1500, 100).await, 2);
        assert_eq!(count("c_123", 999, 100).await, 3);
        assert_eq!(count("c_123", 3001, 100).await, 0);
        assert_eq!(count("c_123", 0, 2).await, 2);
        assert_eq!(count("c_456", 0, 100).await, 2);
        assert_eq!(count("c_rich", 0, 100).await, 0);
        // The old decisions are still there, with their ids, and the next one joins the chain.
        let (_, _, rec) = record("k-after", "1.00");
        assert!(matches!(
            store.commit_decision(rec).await.unwrap(),
            CommitOutcome::Committed(_)
        ));
        assert_eq!(count("c_123", 0, 100).await, 4);
        assert_eq!(count("c_123", 2500, 100).await, 2);
        let links: Vec<(i64, Option<i64>, i64)> = store
            .read(|c| {
                c.prepare("SELECT id, prev_id, newest_ms FROM decisions WHERE id <= 5 ORDER BY id")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .unwrap();
        assert_eq!(
            links,
            [
                (1, None, 2000),
                (2, None, 1500),
                (3, Some(1), 2000),
                (4, Some(2), 2500),
                (5, Some(3), 3000)
            ]
        );
        let newest: (Option<i64>, Option<i64>) = store
            .read(|c| {
                c.query_row(
                    "SELECT prev_id, (SELECT last_decision FROM accounts WHERE customer_id = 'c_123')
                     FROM decisions WHERE id = 6",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
            })
            .unwrap();
        assert_eq!(newest, (Some(5), Some(6)));
        // The rebuilt table keeps every column of the old rows: it is the audit log.
        let kept: Vec<String> = store
            .read(|c| {
                c.prepare(
                    "SELECT concat_ws(' ', request_id, customer_id, payee_id, amount_minor, currency,
                                      decision, reasons, created_ms)
                     FROM decisions WHERE id <= 5 ORDER BY id",
                )?
                .query_map([], |r| r.get(0))?
                .collect()
            })
            .unwrap();
        let old =
            |customer: &str, at: i64| format!("req_old {customer} p_789 100 USD allow [] {at}");
        assert_eq!(
            kept,
            [
                old("c_123", 2000),
                old("c_456", 1500),
                old("c_123", 1000),
                old("c_456", 2500),
                old("c_123", 3000)
            ]
        );
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
