//! The SQLite store's writer: one thread that owns the only writing connection, one that
//! makes its commits durable, and one that checkpoints the WAL.
//!
//! # Group commit, synced off the write lock
//! The writer takes every job waiting in its queue (up to [`MAX_BATCH`]), runs the reads
//! first, then the writes one after the other inside one `BEGIN IMMEDIATE` transaction, and
//! commits once. The connection runs `synchronous=NORMAL`: `COMMIT` appends the batch's pages
//! to the WAL file and returns without waiting for the disk. The batch then goes to the sync
//! thread, which `fdatasync`s the WAL and only then answers its writes. Meanwhile the writer
//! is already running the next batch, so the disk's flush and the SQL of the next decisions
//! overlap, and one flush covers every batch that committed while the previous one was in
//! progress.
//!
//! This keeps the guarantee of `synchronous=FULL` (an answered decision survives a power
//! cut), with the sync moved out of the write lock:
//! * a write is answered only after an `fdatasync` of the WAL that began after its `COMMIT`
//!   returned, so its frames (and those of every earlier batch) are on disk;
//! * the WAL's checksums chain its frames, so after a crash recovery stops at the first frame
//!   that did not reach the disk: a later batch never survives without an earlier one;
//! * nothing that is not yet durable is shown to a client: batches are numbered, and a read
//!   whose answer leaves the process (a replay, a case listing) first waits for the sync of
//!   every batch it could have seen ([`Durability::wait`]). Reads that only feed the agent
//!   need not wait: the decision made from them is a later write, synced after;
//! * SQLite syncs the WAL before each checkpoint copies frames into the database file, and
//!   syncs the file before the WAL is started over, so a checkpoint never moves frames that
//!   are not on disk, nor drops frames whose copy is not;
//! * frames left by a process that was killed are synced once when the store opens, before
//!   any of them is read.
//!
//! Like `synchronous=FULL` itself, this relies on SQLite's default powersafe-overwrite
//! assumption about the disk.
//!
//! # Failures
//! A decision's write is arranged so that its expected outcomes (a key already answered,
//! funds gone) never fail a statement; what still fails is an I/O error or a violated
//! constraint, never a normal outcome. Such a failure fails its whole batch: the transaction
//! is rolled back and every write in it is answered 503, so no part of any of them stays
//! behind. That spares each decision a savepoint of its own (SQLite copies every page a
//! savepoint touches into a journal). Other writes (a reviewer's resolution, a settlement,
//! the background sweeps) are rare and may meet bad data; each runs in a savepoint, so it
//! fails alone ([`Writer::write_isolated`]).
//!
//! A job that panics is a bug of that job: it is answered with an internal error, and a
//! write that panics fails its batch as a failed one does.
//!
//! The store stops taking writes, and says so (`/readyz`), until it is restarted, if:
//! * an `fdatasync` fails (the disk may have dropped the pages it could not write);
//! * the WAL file is no longer the one SQLite writes;
//! * a rollback fails (the connection would carry half a batch into the next);
//! * a checkpoint fails, or a thread of the store stops.
//!
//! # Reads on the decision path
//! Read jobs run at the start of a batch, before its writes: they see exactly what earlier
//! batches committed and are answered at once. The writer's page cache stays valid from one
//! batch to the next (no other connection writes), so such a read rarely touches the file.
//!
//! A read can hand the writer a write to run right after it ([`Writer::read_then_write`]):
//! a decision's claim reads the key and the tools' data, the agent decides from them there
//! and then (microseconds), and the decision's write goes in the batch that follows. A
//! decision thus takes one trip to the writer, and commits in the first batch after its
//! reads.
//!
//! # Prepared once
//! Jobs run their statements through [`Db`], which prepares each one the first time and keeps
//! it for the life of the connection, found by its SQL text's address and length.
//!
//! # Checkpoints
//! A thread of its own copies the WAL back into the database file every
//! [`CHECKPOINT_EVERY`], and has the WAL started over once it is long (see
//! `checkpoint_loop`).
//! Left to the writer, the commit that crosses SQLite's threshold would copy and sync
//! thousands of pages while every decision of its batch waits; the writer keeps only a far
//! larger threshold, as a bound on the WAL should the checkpoint thread fall behind.

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rusqlite::{Connection, OptionalExtension, Params, Row, Statement};
use tokio::sync::{mpsc, oneshot, watch};

use super::unavailable;
use crate::store::StoreError;

/// Most jobs run in one batch.
pub const MAX_BATCH: usize = 256;
/// How often the checkpoint thread copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// WAL frames after which the checkpoint thread starts the WAL over (see `checkpoint_loop`):
/// 128 MiB of 4 KiB pages. Each start-over stalls the writer for a few milliseconds (its
/// checkpoint syncs the WAL and the database file), so they are kept to about one a second
/// at full load; at 8,192 frames, four times as many put the p99 latency at 17–20 ms against
/// 11–15 ms.
pub(super) const RESTART_AFTER_FRAMES: i64 = 32_768;

type Finish = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// The writer's connection, with the statements its jobs run prepared once (see the module
/// doc). Derefs to the connection for statements run rarely.
pub struct Db<'c> {
    conn: &'c Connection,
    /// Statements by their SQL text's (address, length); a handful, so a list is the fastest
    /// map.
    prepared: RefCell<Vec<((usize, usize), Statement<'c>)>>,
    /// The customers of the decisions made so far in this batch's reads, which its writes
    /// have not yet put where the velocity count looks (see [`Db::decided_in_batch`]).
    batch_decided: RefCell<Vec<String>>,
}

impl<'c> Db<'c> {
    fn new(conn: &'c Connection) -> Self {
        Db {
            conn,
            prepared: RefCell::new(Vec::new()),
            batch_decided: RefCell::new(Vec::new()),
        }
    }

    /// A decision for `customer` was made in this batch's reads and will be written with it.
    pub fn note_decided(&self, customer: &str) {
        self.batch_decided.borrow_mut().push(customer.to_owned());
    }

    /// How many decisions for `customer` this batch has made in its reads so far. A batch runs
    /// all its reads (each deciding) before any of its writes, so a customer's second payment
    /// in one batch would not see the first in the database: the velocity count adds these.
    /// If a write then fails, the count was one too high, never too low.
    pub fn decided_in_batch(&self, customer: &str) -> u32 {
        let decided = self.batch_decided.borrow();
        decided.iter().filter(|c| *c == customer).count() as u32
    }

    /// Runs `f` on the statement for `sql`, preparing it the first time. The statement is
    /// taken out of the list while `f` runs, so `f` may use other statements.
    fn with<T>(
        &self,
        sql: &'static str,
        f: impl FnOnce(&mut Statement<'c>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let key = (sql.as_ptr() as usize, sql.len());
        let found = {
            let mut prepared = self.prepared.borrow_mut();
            let at = prepared.iter().position(|(k, _)| *k == key);
            at.map(|i| prepared.swap_remove(i).1)
        };
        let mut stmt = match found {
            Some(stmt) => stmt,
            None => self.conn.prepare(sql)?,
        };
        let result = f(&mut stmt);
        self.prepared.borrow_mut().push((key, stmt));
        result
    }

    pub fn execute(&self, sql: &'static str, params: impl Params) -> rusqlite::Result<usize> {
        self.with(sql, |stmt| stmt.execute(params))
    }

    /// The first row, if any.
    pub fn query_opt<T>(
        &self,
        sql: &'static str,
        params: impl Params,
        row: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<Option<T>> {
        self.with(sql, |stmt| stmt.query_row(params, row).optional())
    }
}

impl std::ops::Deref for Db<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

/// A read job; it may hand over a write to run in the batch right after it.
type ReadJob = Box<dyn for<'a, 'c> FnOnce(&'a Db<'c>, u64) -> Option<WriteJob> + Send>;
type WriteJob = Box<dyn for<'a, 'c> FnOnce(Option<&'a Db<'c>>) -> Ran + Send>;

/// What the writer thread is asked to do.
enum Job {
    /// Reads what earlier batches committed, and answers by itself as soon as it has run. It
    /// is given the number of the last batch it could see.
    Read(ReadJob),
    /// Writes in the batch's transaction; given no connection, it does not run and only
    /// hands back how to answer it (when the batch cannot start, or failed before it).
    Write(WriteJob),
}

/// What a read made of [`Writer::read_then_write`] comes to: an answer now, or a write to
/// run in the batch right after the read, answered once that batch is on disk.
pub enum ReadThen<T> {
    Answer(Result<T, StoreError>),
    Write(HandedOver<T>),
}

/// A write a read hands over (see [`ReadThen`]).
pub type HandedOver<T> = Box<dyn for<'a, 'c> FnOnce(&'a Db<'c>) -> rusqlite::Result<T> + Send>;

/// The job that runs `f` in a batch and answers `reply` with its result once the batch is
/// committed and on disk (or with why not). A failure of `f` fails the batch.
fn write_job<T: Send + 'static>(
    f: impl FnOnce(&Db<'_>) -> rusqlite::Result<T> + Send + 'static,
    reply: oneshot::Sender<Result<T, StoreError>>,
) -> WriteJob {
    job(
        move |db| {
            let result = f(db).map_err(unavailable);
            let failed = result.is_err();
            (result, failed)
        },
        reply,
    )
}

/// The job that runs `run` in a batch (given the connection, unless the batch cannot run)
/// and answers `reply` once the batch is committed and on disk. `run` gives its result and
/// whether the batch must fail.
fn job<T: Send + 'static>(
    run: impl FnOnce(&Db<'_>) -> (Result<T, StoreError>, bool) + Send + 'static,
    reply: oneshot::Sender<Result<T, StoreError>>,
) -> WriteJob {
    Box::new(move |db| {
        let (result, failed) = match db {
            Some(db) => run(db),
            None => (Err(unavailable("not run")), false),
        };
        Ran {
            finish: Box::new(move |committed| {
                let _ = reply.send(committed.and(result));
            }),
            failed,
        }
    })
}

/// A write job after it ran: how to answer it, and whether it failed (which fails the batch).
struct Ran {
    finish: Finish,
    failed: bool,
}

/// A batch on its way from the writer to the sync thread.
struct Batch {
    seq: u64,
    /// `Err` if the batch was rolled back: nothing to sync, its writes fail.
    outcome: Result<(), StoreError>,
    finishers: Vec<Finish>,
}

/// How far the disk has caught up with the writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Synced {
    /// Every batch numbered up to this one is on disk (or was rolled back).
    UpTo(u64),
    /// The store stopped (see the module doc): what was written since the last good sync
    /// may be lost, and nothing more is taken.
    Failed,
}

/// Batch numbers: the writer's (begun) and the disk's (synced).
pub struct Durability {
    /// The number of the newest batch the writer has begun. It is raised before `BEGIN`, so
    /// whatever a reader sees was written by a batch numbered at most this.
    begun: AtomicU64,
    synced: watch::Sender<Synced>,
    /// Set by the checkpoint thread when the writer should finish a checkpoint between two
    /// batches (see `checkpoint_loop`).
    restart_wanted: AtomicBool,
}

impl Durability {
    fn new() -> Self {
        Durability {
            begun: AtomicU64::new(0),
            synced: watch::Sender::new(Synced::UpTo(0)),
            restart_wanted: AtomicBool::new(false),
        }
    }

    /// The newest batch whose writes a read starting now could see.
    pub fn newest(&self) -> u64 {
        self.begun.load(Ordering::Acquire)
    }

    /// Waits until every batch up to `seen` is on disk. Errs if the store stopped.
    pub async fn wait(&self, seen: u64) -> Result<(), StoreError> {
        let mut synced = self.synced.subscribe();
        let state = synced
            .wait_for(|s| match s {
                Synced::UpTo(n) => *n >= seen,
                Synced::Failed => true,
            })
            .await
            .map(|s| *s)
            .unwrap_or(Synced::Failed);
        match state {
            Synced::UpTo(_) => Ok(()),
            Synced::Failed => Err(stopped()),
        }
    }

    pub fn failed(&self) -> bool {
        *self.synced.borrow() == Synced::Failed
    }

    /// Stops the store: logged once, with why.
    fn fail(&self, why: &str) {
        if !self.failed() {
            tracing::error!(
                event = "store.stopped",
                why,
                "the SQLite store stops taking writes until PayNow is restarted"
            );
        }
        self.synced.send_replace(Synced::Failed);
    }
}

/// Stops the store if the thread holding it ends by a panic.
struct FailOnPanic<'a>(&'a Durability, &'static str);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail(self.1);
        }
    }
}

fn stopped() -> StoreError {
    unavailable(
        "the store stopped after a disk or database failure; restart PayNow once it is healthy",
    )
}

/// What makes a batch durable: `fdatasync` of the WAL ([`WalFile`]); tests put a gate here.
pub trait SyncWal: Send + 'static {
    fn sync(&mut self) -> std::io::Result<()>;
}

/// The WAL file, opened by us as well, to sync it.
///
/// `fsync` works on the file, not on the descriptor: syncing our descriptor flushes the
/// frames SQLite wrote through its own. SQLite keeps the same file while any connection is
/// open (it deletes it only when the last one closes, and the writer outlives the sync
/// thread). Should the name ever point at another file, SQLite would go on writing the one
/// its descriptor holds, which may no longer be ours: the sync then fails, and so does the
/// store.
pub struct WalFile {
    path: PathBuf,
    file: File,
}

impl WalFile {
    /// Opens the WAL of the database at `db`; the writer's connection must have created it.
    pub fn open(db: &Path) -> std::io::Result<Self> {
        let mut path = db.as_os_str().to_owned();
        path.push("-wal");
        let path = PathBuf::from(path);
        let file = File::open(&path)?;
        Ok(WalFile { path, file })
    }

    #[cfg(test)]
    fn inode(&self) -> u64 {
        self.file.metadata().map(|m| m.ino()).unwrap_or(0)
    }
}

impl SyncWal for WalFile {
    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        let ours = self.file.metadata()?;
        let named = std::fs::metadata(&self.path)?;
        if (ours.dev(), ours.ino()) != (named.dev(), named.ino()) {
            return Err(std::io::Error::other(format!(
                "{} is no longer the WAL file opened at start",
                self.path.display()
            )));
        }
        Ok(())
    }
}

/// The handle the store keeps: a queue to the writer thread, and the threads to stop.
pub struct Writer {
    jobs: RwLock<Option<mpsc::Sender<Job>>>,
    durable: Arc<Durability>,
    /// Dropping the sender stops the checkpoint thread.
    checkpointer: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
    /// The writer thread; it stops the sync thread itself, before it closes its connection.
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    /// Starts the writer on `conn` (which must run `synchronous=NORMAL` in WAL mode), the sync
    /// thread on `wal`, and the checkpoint thread on `checkpoints` and `db` (the database
    /// file, which it syncs before the WAL is started over). The WAL is synced first:
    /// frames a killed process committed may not have reached the disk yet.
    pub fn start(
        conn: Connection,
        wal: impl SyncWal,
        checkpoints: Connection,
        db: File,
    ) -> std::io::Result<Self> {
        Self::start_restarting_at(conn, wal, checkpoints, db, RESTART_AFTER_FRAMES)
    }

    /// [`Writer::start`], with the WAL started over after `restart_after_frames`.
    fn start_restarting_at(
        conn: Connection,
        mut wal: impl SyncWal,
        checkpoints: Connection,
        db: File,
        restart_after_frames: i64,
    ) -> std::io::Result<Self> {
        wal.sync()?;
        let durable = Arc::new(Durability::new());
        let (stop, stop_checkpoints) = std::sync::mpsc::channel();
        let checkpointer = {
            let durable = durable.clone();
            std::thread::Builder::new()
                .name("sqlite-checkpt".into())
                .spawn(move || {
                    checkpoint_loop(
                        checkpoints,
                        db,
                        restart_after_frames,
                        stop_checkpoints,
                        &durable,
                    )
                })?
        };
        let (to_sync, batches) = std::sync::mpsc::channel();
        let syncer = {
            let durable = durable.clone();
            std::thread::Builder::new()
                .name("sqlite-sync".into())
                .spawn(move || sync_loop(wal, batches, &durable))?
        };
        let (jobs, queue) = mpsc::channel::<Job>(4 * MAX_BATCH);
        let writer = {
            let durable = durable.clone();
            std::thread::Builder::new()
                .name("sqlite-writer".into())
                .spawn(move || writer_loop(conn, queue, (to_sync, syncer), &durable))?
        };
        Ok(Writer {
            jobs: RwLock::new(Some(jobs)),
            durable,
            checkpointer: Mutex::new(Some((stop, checkpointer))),
            writer: Mutex::new(Some(writer)),
        })
    }

    pub fn durability(&self) -> &Durability {
        &self.durable
    }

    async fn send(&self, job: Job) -> Result<(), StoreError> {
        let jobs = self.jobs.read().clone();
        let jobs = jobs.ok_or_else(|| unavailable("store is closed"))?;
        jobs.send(job)
            .await
            .map_err(|_| unavailable("store is closed"))
    }

    /// Why an answer never came: the store stopped, or the job panicked (a bug of that job,
    /// not an outage: an internal error, as a panic on the request's own task would be).
    fn lost(&self) -> StoreError {
        if self.durable.failed() {
            stopped()
        } else {
            StoreError::Internal("the job panicked in the writer".into())
        }
    }

    /// Runs `f` on the writer's connection before its next batch of writes: it sees every
    /// committed batch, and is answered without waiting for a commit. Also returns the
    /// number of the newest batch `f` could see, for [`Durability::wait`].
    pub async fn read_latest<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<(T, u64), StoreError> {
        self.read_then_write(move |db, seen| ReadThen::Answer(f(db).map(|v| (v, seen))))
            .await
    }

    /// Runs `f` like [`Writer::read_latest`] (given the number of the newest batch it could
    /// see); what it returns is answered at once, or is a write that runs in the batch right
    /// after the read, answered when [`Writer::write`] would answer it. If `f` panics, the
    /// answer is an internal error and nothing of it is written.
    pub async fn read_then_write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db<'_>, u64) -> ReadThen<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Read(Box::new(move |db, seen| match f(db, seen) {
            ReadThen::Answer(answer) => {
                let _ = reply.send(answer);
                None
            }
            ReadThen::Write(write) => Some(write_job(write, reply)),
        })))
        .await?;
        answer.await.map_err(|_| self.lost())?
    }

    /// Runs `f` in the writer's next transaction; answers once the transaction is committed
    /// and on disk. If `f` fails, so does the whole batch (see the module doc).
    pub async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db<'_>) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Write(write_job(f, reply))).await?;
        answer.await.map_err(|_| self.lost())?
    }

    /// [`Writer::write`] in a savepoint of its own: if `f` fails, only its own writes are
    /// rolled back, and the rest of the batch commits.
    pub async fn write_isolated<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db<'_>) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let run = move |db: &Db<'_>| in_savepoint(db, f);
        self.send(Job::Write(job(run, reply))).await?;
        answer.await.map_err(|_| self.lost())?
    }

    /// Stops taking jobs, finishes those queued, syncs and answers them, and stops the
    /// threads (the checkpoint thread first, so the writer's final checkpoint finds none in
    /// progress).
    pub async fn close(&self) {
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
    }
}

/// Runs `f` between `SAVEPOINT` and `RELEASE`, or rolls back to the savepoint if it fails.
/// The job's result, and whether the batch must fail (the savepoint could not be closed, so
/// part of the job may still be in the transaction).
fn in_savepoint<T>(
    db: &Db<'_>,
    f: impl FnOnce(&Db<'_>) -> rusqlite::Result<T>,
) -> (Result<T, StoreError>, bool) {
    if let Err(e) = db.execute("SAVEPOINT isolated", []) {
        return (Err(unavailable(e)), true);
    }
    match f(db) {
        Ok(v) => match db.execute("RELEASE isolated", []) {
            Ok(_) => (Ok(v), false),
            Err(e) => (Err(unavailable(e)), true),
        },
        Err(e) => {
            let closed = db
                .execute("ROLLBACK TO isolated", [])
                .and_then(|_| db.execute("RELEASE isolated", []));
            (Err(unavailable(e)), closed.is_err())
        }
    }
}

/// Checkpoints the WAL until the store closes (see the module doc).
///
/// PASSIVE never waits for the writer or readers: it copies what it can while the writer
/// goes on appending. Under steady load it never reaches the end of the WAL, and a WAL is
/// started over only after a checkpoint that does, so on its own the file would grow until
/// the writer's own, far larger threshold made it checkpoint inside a commit: measured, a
/// stall of 15 to 45 ms about once a second for every decision waiting on that commit. (A
/// RESTART checkpoint from this thread would have to win the write lock from a busy writer,
/// and SQLite's busy handler does not queue for it.)
///
/// So once the WAL passes [`RESTART_AFTER_FRAMES`], this thread syncs the database file
/// through a descriptor of its own (no lock held: the pages copied so far reach the disk
/// while the writer works), copies what arrived meanwhile, and asks the writer to finish
/// the job ([`finish_checkpoint`]): between two batches, with no writer to race, its own
/// PASSIVE checkpoint copies the few frames left and syncs little, and the next batch
/// starts the WAL over.
fn checkpoint_loop(
    conn: Connection,
    db: File,
    restart_after_frames: i64,
    stop: Receiver<()>,
    durable: &Durability,
) {
    let _guard = FailOnPanic(durable, "the checkpoint thread panicked");
    let passive = || -> rusqlite::Result<i64> {
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
    };
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        if durable.failed() {
            return;
        }
        if durable.restart_wanted.load(Ordering::Acquire) {
            continue;
        }
        let done = passive().map_err(|e| e.to_string()).and_then(|frames| {
            if frames < restart_after_frames {
                return Ok(());
            }
            db.sync_data().map_err(|e| e.to_string())?;
            passive().map_err(|e| e.to_string())?;
            durable.restart_wanted.store(true, Ordering::Release);
            Ok(())
        });
        if let Err(e) = done {
            // Its syncs are syncs of our files too: one that failed may have taken the
            // error ours would have seen.
            tracing::error!(event = "store.checkpoint_failed", error = %e);
            durable.fail("a checkpoint failed");
            return;
        }
    }
}

/// The writer's part of starting the WAL over (see `checkpoint_loop`): a checkpoint that,
/// with no other writer, copies the last frames and lets the next transaction restart.
fn finish_checkpoint(db: &Db<'_>, durable: &Durability) {
    if !durable.restart_wanted.swap(false, Ordering::AcqRel) {
        return;
    }
    if let Err(e) = db.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        tracing::error!(event = "store.checkpoint_failed", error = %e);
        durable.fail("a checkpoint failed");
    }
}

fn writer_loop(
    conn: Connection,
    mut jobs: mpsc::Receiver<Job>,
    (to_sync, syncer): (Sender<Batch>, JoinHandle<()>),
    durable: &Durability,
) {
    let guard = FailOnPanic(durable, "the writer thread panicked");
    let db = Db::new(&conn);
    let mut reads = Vec::with_capacity(MAX_BATCH);
    let mut writes = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = jobs.blocking_recv() {
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Read(read) => reads.push(read),
                Job::Write(write) => writes.push(write),
            }
            if reads.len() + writes.len() < MAX_BATCH {
                next = jobs.try_recv().ok();
            }
        }
        db.batch_decided.borrow_mut().clear();
        // Every batch so far is committed or rolled back: this is what the reads see. They
        // run in one transaction with the writes (or in one of their own): one read lock for
        // all of them instead of one per statement, a system call each. The writes they hand
        // over join the batch.
        let seen = durable.newest();
        let run_reads = |reads: &mut Vec<ReadJob>, writes: &mut Vec<WriteJob>| {
            for read in reads.drain(..) {
                // A read that panics loses only its own answer.
                match catch_unwind(AssertUnwindSafe(|| read(&db, seen))) {
                    Ok(Some(write)) => writes.push(write),
                    Ok(None) => {}
                    Err(_) => tracing::error!(event = "store.job_panicked", "a read job panicked"),
                }
            }
        };
        if writes.is_empty() {
            let begun = db.execute("BEGIN", []).is_ok();
            run_reads(&mut reads, &mut writes);
            if begun && db.execute("COMMIT", []).is_err() && !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            if writes.is_empty() {
                continue;
            }
        }
        let seq = seen + 1;
        durable.begun.store(seq, Ordering::Release);
        let mut outcome = if durable.failed() {
            Err(stopped())
        } else {
            db.execute("BEGIN IMMEDIATE", [])
                .map(drop)
                .map_err(unavailable)
        };
        // Before any write of this batch.
        run_reads(&mut reads, &mut writes);
        let mut finishers = Vec::with_capacity(writes.len());
        for write in writes.drain(..) {
            // After a failure the rest of the batch does not run: it is rolled back anyway.
            let db = outcome.is_ok().then_some(&db);
            match catch_unwind(AssertUnwindSafe(move || write(db))) {
                Ok(ran) => {
                    if ran.failed {
                        outcome = Err(unavailable("a write of the batch failed"));
                    }
                    finishers.push(ran.finish);
                }
                // Its answer is lost with it; its caller learns it failed.
                Err(_) => {
                    tracing::error!(event = "store.job_panicked", "a write job panicked");
                    outcome = Err(unavailable("a write of the batch panicked"));
                }
            }
        }
        if outcome.is_ok() {
            outcome = db.execute("COMMIT", []).map(drop).map_err(unavailable);
        }
        if outcome.is_err() && !conn.is_autocommit() {
            // Nothing of a failed batch may stay behind for the next one to commit.
            if conn.execute_batch("ROLLBACK").is_err() || !conn.is_autocommit() {
                durable.fail("a failed batch could not be rolled back");
            }
        }
        if let Err(e) = &outcome {
            tracing::error!(event = "store.commit_failed", error = %e, "SQLite batch rolled back; its writes answered 503");
        }
        let batch = Batch {
            seq,
            outcome,
            finishers,
        };
        if let Err(unsent) = to_sync.send(batch) {
            // The sync thread is gone: nothing can be made durable any more.
            durable.fail("the sync thread stopped");
            for finish in unsent.0.finishers {
                finish(Err(stopped()));
            }
        }
        finish_checkpoint(&db, durable);
    }
    // Every sender is gone. The sync thread answers what it holds, and stops, while this
    // connection still keeps the WAL file in place.
    drop(to_sync);
    if syncer.join().is_err() {
        durable.fail("the sync thread panicked");
    }
    drop(guard);
    drop(db);
    // Leave the file tidy for the next start; the checkpoint syncs the WAL and the database.
    let _ = conn.execute_batch("PRAGMA optimize; PRAGMA wal_checkpoint(TRUNCATE);");
}

fn sync_loop(mut wal: impl SyncWal, batches: Receiver<Batch>, durable: &Durability) {
    let _guard = FailOnPanic(durable, "the sync thread panicked");
    let mut waiting = Vec::new();
    while let Ok(first) = batches.recv() {
        waiting.push(first);
        while let Ok(batch) = batches.try_recv() {
            waiting.push(batch);
        }
        let newest = waiting.last().map_or(0, |b| b.seq);
        let synced = if durable.failed() {
            Err(stopped())
        } else if waiting.iter().all(|b| b.outcome.is_err()) {
            // Rolled back, all of them: nothing was written that needs the disk.
            Ok(())
        } else {
            wal.sync().map_err(|e| {
                tracing::error!(event = "store.sync_failed", error = %e);
                durable.fail("fdatasync of the WAL failed");
                stopped()
            })
        };
        if synced.is_ok() {
            durable.synced.send_replace(Synced::UpTo(newest));
        }
        for batch in waiting.drain(..) {
            let outcome = match (&synced, batch.outcome) {
                (Ok(()), outcome) => outcome,
                // Rolled back: nothing of it is anywhere, whatever the disk did.
                (Err(_), Err(own)) => Err(own),
                // In the WAL, but maybe not on disk: it may or may not survive.
                (Err(e), Ok(())) => Err(StoreError::OutcomeUnknown(e.to_string())),
            };
            for finish in batch.finishers {
                finish(outcome.clone());
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A sync the test opens and closes: each `sync` waits for a permit, or fails if told to.
    /// It also records how many rows of `t` another connection saw when it began, which
    /// shows what had been committed by then.
    #[derive(Clone)]
    pub struct Gate {
        permits: Arc<(std::sync::Mutex<u32>, std::sync::Condvar)>,
        fail: Arc<AtomicBool>,
        calls: Arc<AtomicU64>,
        watch: Option<(PathBuf, Arc<std::sync::Mutex<Vec<i64>>>)>,
    }

    impl Gate {
        /// A gate with one permit, for the sync the writer makes when it starts.
        pub fn new() -> Self {
            Gate {
                permits: Arc::new((std::sync::Mutex::new(1), std::sync::Condvar::new())),
                fail: Arc::new(AtomicBool::new(false)),
                calls: Arc::new(AtomicU64::new(0)),
                watch: None,
            }
        }

        fn watching(mut self, db: &Path) -> Self {
            self.watch = Some((db.to_owned(), Arc::default()));
            self
        }

        pub fn open(&self, n: u32) {
            *self.permits.0.lock().unwrap() += n;
            self.permits.1.notify_all();
        }

        fn calls(&self) -> u64 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl SyncWal for Gate {
        fn sync(&mut self) -> std::io::Result<()> {
            if let Some((db, seen)) = &self.watch {
                let other = Connection::open(db).unwrap();
                let rows = other
                    .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                    .unwrap_or(-1);
                seen.lock().unwrap().push(rows);
            }
            let (lock, ready) = &*self.permits;
            let mut permits = lock.lock().unwrap();
            while *permits == 0 {
                permits = ready.wait(permits).unwrap();
            }
            *permits -= 1;
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("injected fsync failure"));
            }
            Ok(())
        }
    }

    fn db_in(dir: &Path) -> PathBuf {
        let path = dir.join("w.db");
        let conn = super::super::connect(&path, true).unwrap();
        conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .unwrap();
        path
    }

    fn writer_on(path: &Path, sync: impl SyncWal) -> Arc<Writer> {
        let conn = super::super::connect(path, true).unwrap();
        let checkpoints = super::super::connect(path, true).unwrap();
        let db = File::open(path).unwrap();
        Arc::new(Writer::start(conn, sync, checkpoints, db).unwrap())
    }

    fn insert(k: i64) -> impl FnOnce(&Db<'_>) -> rusqlite::Result<usize> + Send + 'static {
        move |db| db.execute("INSERT INTO t (k, v) VALUES (?1, 'x')", [k])
    }

    fn spawn_insert(
        writer: &Arc<Writer>,
        k: i64,
    ) -> tokio::task::JoinHandle<Result<usize, StoreError>> {
        let writer = writer.clone();
        tokio::spawn(async move { writer.write(insert(k)).await })
    }

    async fn count(writer: &Writer) -> i64 {
        let (n, _) = writer
            .read_latest(|db| {
                db.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                    .map_err(unavailable)
            })
            .await
            .unwrap();
        n
    }

    /// Fails the test instead of hanging it when an answer never comes.
    async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"))
    }

    #[tokio::test]
    async fn a_write_is_answered_only_after_a_sync_that_began_after_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_in(dir.path());
        let gate = Gate::new().watching(&path);
        let writer = writer_on(&path, gate.clone());
        let pending = spawn_insert(&writer, 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!pending.is_finished(), "answered before its sync");
        // Committed and visible to reads already; durable only once the sync is through.
        assert_eq!(count(&writer).await, 1);
        let seen = writer.durability().newest();
        let durable =
            tokio::time::timeout(Duration::from_millis(100), writer.durability().wait(seen));
        assert!(
            durable.await.is_err(),
            "a read waiting for durability went through unsynced"
        );
        gate.open(1);
        assert_eq!(within("the write", pending).await.unwrap().unwrap(), 1);
        within("durability", writer.durability().wait(seen))
            .await
            .unwrap();
        let seen_by_syncs = gate.watch.as_ref().unwrap().1.lock().unwrap().clone();
        // The start's sync saw nothing; the batch's sync began with its row committed.
        assert_eq!(seen_by_syncs, vec![0, 1]);
        gate.open(100);
        writer.close().await;
    }

    #[tokio::test]
    async fn a_write_handed_over_by_a_read_commits_in_the_next_batch_and_waits_for_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Gate::new();
        let writer = writer_on(&db_in(dir.path()), gate.clone());
        let before = writer.durability().newest();
        let pending = {
            let writer = writer.clone();
            tokio::spawn(async move {
                writer
                    .read_then_write(|db, _| {
                        let n: i64 = db
                            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                            .unwrap();
                        // Decided from what the read saw, written right after it.
                        ReadThen::Write(Box::new(move |db| insert(n + 1)(db).map(|_| n + 1)))
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!pending.is_finished(), "answered before its sync");
        assert_eq!(count(&writer).await, 1);
        assert_eq!(writer.durability().newest(), before + 1);
        gate.open(1);
        assert_eq!(within("the write", pending).await.unwrap().unwrap(), 1);
        gate.open(100);
        writer.close().await;
    }

    #[tokio::test]
    async fn one_sync_covers_every_batch_committed_while_the_last_one_ran() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Gate::new();
        let writer = writer_on(&db_in(dir.path()), gate.clone());
        let first = spawn_insert(&writer, 1);
        // The first batch's sync is held; the next writes commit in batches meanwhile.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rest: Vec<_> = (2..=20).map(|k| spawn_insert(&writer, k)).collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(count(&writer).await, 20);
        gate.open(2);
        within("the first write", first).await.unwrap().unwrap();
        for w in rest {
            within("a later write", w).await.unwrap().unwrap();
        }
        // The start's, the first batch's, and one for all the batches that waited.
        assert_eq!(gate.calls(), 3);
        gate.open(100);
        writer.close().await;
    }

    #[tokio::test]
    async fn a_failed_sync_fails_its_writes_and_stops_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Gate::new();
        gate.open(100);
        let writer = writer_on(&db_in(dir.path()), gate.clone());
        gate.fail.store(true, Ordering::SeqCst);
        // Committed, but not known to be on disk: neither success nor "nothing written".
        assert!(matches!(
            writer.write(insert(1)).await,
            Err(StoreError::OutcomeUnknown(_))
        ));
        let calls = gate.calls();
        // The disk may have lost what it was given: nothing more is taken, even once the
        // sync would work again.
        gate.fail.store(false, Ordering::SeqCst);
        assert!(matches!(
            writer.write(insert(2)).await,
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(gate.calls(), calls, "no batch ran after the failure");
        let seen = writer.durability().newest();
        assert!(writer.durability().wait(seen).await.is_err());
        assert!(writer.durability().failed());
        writer.close().await;
    }

    /// Holds the writer in a batch of its own until released, so that the jobs queued
    /// meanwhile run together in the next one.
    fn hold(
        writer: &Arc<Writer>,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<usize, StoreError>>,
    ) {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let writer = writer.clone();
        let holding = tokio::spawn(async move {
            writer
                .write(move |db| {
                    let _ = held.recv();
                    db.execute("INSERT INTO t (k, v) VALUES (0, 'x')", [])
                })
                .await
        });
        (release, holding)
    }

    #[tokio::test]
    async fn a_failing_write_rolls_back_its_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Gate::new();
        gate.open(100);
        let writer = writer_on(&db_in(dir.path()), gate);
        let (release, holding) = hold(&writer);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let good = spawn_insert(&writer, 1);
        let bad = tokio::spawn({
            let writer = writer.clone();
            // NOT NULL violated: an error no decision ever expects.
            async move {
                writer
                    .write(|db| db.execute("INSERT INTO t (k, v) VALUES (2, NULL)", []))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        release.send(()).unwrap();
        within("the held write", holding).await.unwrap().unwrap();
        assert!(
            within("good", good).await.unwrap().is_err(),
            "its batch failed"
        );
        assert!(within("bad", bad).await.unwrap().is_err());
        assert_eq!(
            count(&writer).await,
            1,
            "only the held batch's row is there"
        );
        // The writer goes on with the next batch.
        writer.write(insert(3)).await.unwrap();
        writer.close().await;
    }

    #[tokio::test]
    async fn an_isolated_write_that_fails_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Gate::new();
        gate.open(100);
        let writer = writer_on(&db_in(dir.path()), gate);
        let (release, holding) = hold(&writer);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let good = spawn_insert(&writer, 1);
        let bad = tokio::spawn({
            let writer = writer.clone();
            async move {
                writer
                    .write_isolated(|db| {
                        db.execute("INSERT INTO t (k, v) VALUES (5, 'x')", [])?;
                        db.execute("INSERT INTO t (k, v) VALUES (6, NULL)", [])
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        release.send(()).unwrap();
        within("the held write", holding).await.unwrap().unwrap();
        within("good", good).await.unwrap().unwrap();
        assert!(within("bad", bad).await.unwrap().is_err());
        // Neither of the isolated job's rows, both of the others.
        assert_eq!(count(&writer).await, 2);
        writer.close().await;
    }

    #[tokio::test]
    async fn a_job_that_panics_fails_its_batch_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Gate::new();
        gate.open(100);
        let writer = writer_on(&db_in(dir.path()), gate);
        let (release, holding) = hold(&writer);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let good = spawn_insert(&writer, 1);
        let panics = tokio::spawn({
            let writer = writer.clone();
            async move {
                writer
                    .write(|db| -> rusqlite::Result<usize> {
                        db.execute("INSERT INTO t (k, v) VALUES (7, 'x')", [])?;
                        panic!("a bug in a job")
                    })
                    .await
            }
        });
        let read = tokio::spawn({
            let writer = writer.clone();
            async move {
                writer
                    .read_latest(|_| -> Result<(), StoreError> { panic!("a bug in a read") })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        release.send(()).unwrap();
        within("the held write", holding).await.unwrap().unwrap();
        // The panicking jobs are bugs (internal errors); the good write is an innocent
        // victim of its batch (unavailable: nothing written, retry).
        assert!(matches!(
            within("panicking", panics).await.unwrap(),
            Err(StoreError::Internal(_))
        ));
        assert!(
            matches!(
                within("good", good).await.unwrap(),
                Err(StoreError::Unavailable(_))
            ),
            "rolled back with the panic"
        );
        assert!(matches!(
            within("read", read).await.unwrap(),
            Err(StoreError::Internal(_))
        ));
        assert_eq!(count(&writer).await, 1);
        writer.write(insert(3)).await.unwrap();
        assert!(!writer.durability().failed());
        writer.close().await;
    }

    /// The real WAL file, synced slowly, so writes are still waiting for it at shutdown.
    struct SlowWal(WalFile);

    impl SyncWal for SlowWal {
        fn sync(&mut self) -> std::io::Result<()> {
            std::thread::sleep(Duration::from_millis(50));
            self.0.sync()
        }
    }

    #[tokio::test]
    async fn writes_still_syncing_at_shutdown_are_answered_once_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_in(dir.path());
        let conn = super::super::connect(&path, true).unwrap();
        let checkpoints = super::super::connect(&path, true).unwrap();
        let wal = SlowWal(WalFile::open(&path).unwrap());
        let db = File::open(&path).unwrap();
        let writer = Arc::new(Writer::start(conn, wal, checkpoints, db).unwrap());
        let writes: Vec<_> = (1..=40).map(|k| spawn_insert(&writer, k)).collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        within("close", writer.close()).await;
        for w in writes {
            within("a write", w).await.unwrap().unwrap();
        }
        assert!(!writer.durability().failed());
        let rows: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 40);
    }

    #[tokio::test]
    async fn under_steady_writes_the_wal_is_started_over_early() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_in(dir.path());
        let gate = Gate::new();
        gate.open(u32::MAX / 2);
        // The store's thresholds, scaled down: the writer alone would checkpoint, inside a
        // commit, only once the WAL is many times longer than the restart point.
        let restart_at = 256;
        let writers_own = 8 * restart_at;
        let conn = super::super::connect(&path, true).unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", writers_own)
            .unwrap();
        let checkpoints = super::super::connect(&path, true).unwrap();
        let db = File::open(&path).unwrap();
        let writer = Writer::start_restarting_at(conn, gate, checkpoints, db, restart_at).unwrap();
        // Rows of a page each, written without a stop (a pause between batches, as between
        // requests), for far longer than one restart cycle.
        let mut largest = 0;
        for batch in 0..(writers_own * 2 / 10) {
            writer
                .write(move |db| {
                    for i in 0..10 {
                        db.execute(
                            "INSERT INTO t (k, v) VALUES (?1, ?2)",
                            rusqlite::params![batch * 10 + i, "x".repeat(4000)],
                        )?;
                    }
                    Ok(())
                })
                .await
                .unwrap();
            let wal = std::fs::metadata(dir.path().join("w.db-wal"))
                .unwrap()
                .len();
            largest = largest.max(wal / (4096 + 24));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(
            largest < writers_own as u64,
            "the WAL grew to {largest} frames: it was not started over early"
        );
        writer.close().await;
    }

    #[test]
    fn the_wal_we_sync_is_the_file_sqlite_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let conn = super::super::connect(&path, true).unwrap();
        conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY)")
            .unwrap();
        let mut wal = WalFile::open(&path).unwrap();
        let named = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(wal.inode(), named(&wal.path));
        conn.execute_batch(
            "INSERT INTO t VALUES (1); PRAGMA wal_checkpoint(TRUNCATE); INSERT INTO t VALUES (2);",
        )
        .unwrap();
        // Checkpoints and restarts rewrite the file in place; it stays the one we hold.
        assert_eq!(wal.inode(), named(&wal.path));
        wal.sync().unwrap();
        // Were the name to point at another file, syncing ours would prove nothing.
        std::fs::rename(&wal.path, dir.path().join("moved")).unwrap();
        std::fs::write(&wal.path, b"").unwrap();
        assert!(wal.sync().is_err());
    }
}
