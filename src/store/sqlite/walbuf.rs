//! A VFS over SQLite's default one that writes a commit's WAL frames in one system call.
//!
//! SQLite appends each frame to the WAL with two `pwrite`s, its 24-byte header and then its
//! page, so a batch that commits 35 pages makes 70 system calls. Their fixed cost, not the
//! bytes, is most of what a commit costs the writer thread (measured on the 2-core
//! development machine: 225–247 µs for the 70 calls against 26–33 µs for the same bytes in
//! one call). This VFS gathers a WAL file's contiguous writes in memory and writes them out
//! together. What makes that safe is when it writes them:
//!
//! * **At the end of every commit.** A commit's last frame carries the database size in its
//!   header (it is zero in every other frame). When that header is written, the page that
//!   follows it is the commit's last write, and everything gathered goes to the file with it,
//!   before SQLite publishes the commit in the WAL index. So no reader (the checkpoint thread,
//!   a pool connection) can find a committed frame that is not in the file yet, the sync
//!   thread's `fdatasync` after `COMMIT` returns covers every frame, and a failed write fails
//!   the commit with SQLite's own error, as a failed `pwrite` does. A commit header written
//!   on its own (a one-page commit, or SQLite rewriting the checksums of frames it wrote
//!   earlier in the transaction) goes to the file at once.
//! * **Before the connection takes or releases a lock on the WAL** (a lock on the database
//!   file's shared memory): frames of a transaction that was rolled back are written (past
//!   the end of the valid WAL, where they are garbage but harmless) before the write lock
//!   is released, never later, over frames another connection wrote meanwhile.
//! * **Before anything else is done with the WAL file**: a read (SQLite rereading a frame),
//!   a sync, a truncation, a size, a file control, closing it.
//! * **When a write does not continue the gathered ones**, and past [`MAX_GATHERED`] bytes.
//!
//! If gathered bytes cannot be written (a full disk), SQLite was already told their writes
//! succeeded, and the error may surface as a failed read, which does not stop a transaction
//! from committing. So the WAL file then fails every call until the transaction ends (the
//! connection gives up its WAL write lock), and the transaction cannot commit without them.
//! A lock is given up whatever a write at that moment does, or every writer would wait on it.
//!
//! On a disk without powersafe overwrite, SQLite pads each commit to a sector boundary and
//! syncs in the middle of its frames; this VFS passes such a WAL's writes straight through.
//! `locking_mode=EXCLUSIVE` is not supported: SQLite then never releases the write lock, so a
//! failed write would fail the connection until it is closed (nothing would be corrupted).
//!
//! WAL files and main database files are wrapped (the database file only to see those
//! locks); every call is otherwise handed to the default VFS unchanged, and other files
//! (journals, temporary files) are the default VFS's own objects.

use std::ffi::{CStr, c_int, c_void};
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicPtr, Ordering};

use rusqlite::ffi;

/// The VFS's registered name, for `Connection::open_with_flags_and_vfs`.
pub const NAME: &CStr = c"paynow-walbuf";

/// Gathered bytes past which they are written out even within a commit.
const MAX_GATHERED: usize = 4 << 20;

/// Most bytes handed to the default VFS in one write: the unix VFS writes at most
/// 0x1ffff bytes per call and reports a larger write as a full disk.
const MAX_WRITE: usize = 120 << 10;

/// Size of a WAL frame header; bytes 4..8 are the database size on a commit frame, else 0.
const FRAME_HEADER: c_int = 24;

/// The default VFS this one wraps.
static BASE: AtomicPtr<ffi::sqlite3_vfs> = AtomicPtr::new(ptr::null_mut());

/// Registers the VFS (once per process) and returns its name, or why it could not.
pub fn register() -> Result<&'static CStr, String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            // SAFETY: sqlite3_vfs_find and sqlite3_vfs_register are thread-safe once SQLite is
            // initialised (they initialise it themselves); the VFS is leaked, so it outlives
            // every connection that uses it. Its other methods are the default VFS's, which
            // do not depend on the VFS object they are given.
            unsafe {
                let base = ffi::sqlite3_vfs_find(ptr::null());
                if base.is_null() {
                    return Err("SQLite has no default VFS".into());
                }
                BASE.store(base, Ordering::Release);
                let mut vfs = *base;
                vfs.zName = NAME.as_ptr();
                vfs.szOsFile = (REAL_OFFSET + (*base).szOsFile as usize) as c_int;
                vfs.xOpen = Some(open);
                vfs.pNext = ptr::null_mut();
                let vfs = Box::leak(Box::new(vfs));
                match ffi::sqlite3_vfs_register(vfs, 0) {
                    ffi::SQLITE_OK => Ok(()),
                    rc => Err(format!("sqlite3_vfs_register failed ({rc})")),
                }
            }
        })
        .clone()
        .map(|()| NAME)
}

/// What SQLite sees of a wrapped file (`base`, first, as it expects), and the default VFS's
/// file object (`real`, in the same allocation, at [`REAL_OFFSET`]).
#[repr(C)]
struct Shim {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
}

/// A WAL file, and the bytes gathered for it.
#[repr(C)]
struct WalFile {
    shim: Shim,
    /// The connection's database file, while both are open.
    db: *mut DbFile,
    gathered: Vec<u8>,
    /// File offset of `gathered[0]`.
    start: i64,
    /// A commit header was gathered: the next write (its page) is written out with it.
    flush_next: bool,
    /// Writes go straight through, none gathered (see `open`).
    pass_through: bool,
    /// Why gathered bytes could not be written: every call on the file fails with it until
    /// the transaction ends (see `db_shm_lock`), so SQLite cannot commit without them.
    failed: c_int,
}

/// A main database file, and its connection's WAL file while both are open.
#[repr(C)]
struct DbFile {
    shim: Shim,
    wal: *mut WalFile,
}

/// Where the default VFS's file object starts in the allocation SQLite makes for a file.
const REAL_OFFSET: usize = {
    let (wal, db) = (size_of::<WalFile>(), size_of::<DbFile>());
    (if wal > db { wal } else { db }).next_multiple_of(16)
};

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: `file` is an allocation of this VFS's `szOsFile` bytes, enough for a WalFile
    // or a DbFile followed by the default VFS's file object (or for that object alone); BASE
    // was set before the VFS was registered.
    unsafe {
        let base = BASE.load(Ordering::Acquire);
        let Some(base_open) = (*base).xOpen else {
            return ffi::SQLITE_ERROR;
        };
        let wal = flags & ffi::SQLITE_OPEN_WAL != 0;
        if !wal && flags & ffi::SQLITE_OPEN_MAIN_DB == 0 {
            // Neither: the default VFS's own file object, in place.
            return base_open(base, name, file, flags, out_flags);
        }
        let real = file
            .cast::<u8>()
            .add(REAL_OFFSET)
            .cast::<ffi::sqlite3_file>();
        (*real).pMethods = ptr::null();
        (*file).pMethods = ptr::null();
        let rc = base_open(base, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            // SQLite closes nothing whose open failed: neither may we leave anything open.
            if let Some(close) = (*real).pMethods.as_ref().and_then(|m| m.xClose) {
                close(real);
            }
            return rc;
        }
        if !wal {
            let shim = Shim {
                base: ffi::sqlite3_file {
                    pMethods: &DB_METHODS,
                },
                real,
            };
            let wal = ptr::null_mut();
            ptr::write(file.cast::<DbFile>(), DbFile { shim, wal });
            return ffi::SQLITE_OK;
        }
        // The connection's database file, opened by this VFS before its WAL.
        let db = ffi::sqlite3_database_file_object(name).cast::<DbFile>();
        let db = if !db.is_null() && ptr::eq((*db).shim.base.pMethods, &DB_METHODS) {
            db
        } else {
            ptr::null_mut()
        };
        // Without powersafe overwrite, SQLite pads a commit to a sector and syncs in the
        // middle of its frames, a shape this VFS does not gather: it passes writes through.
        let pass_through = match db.as_ref() {
            Some(db) => {
                let methods = &*(*db.shim.real).pMethods;
                let device = methods
                    .xDeviceCharacteristics
                    .map_or(0, |f| f(db.shim.real));
                device & ffi::SQLITE_IOCAP_POWERSAFE_OVERWRITE == 0
            }
            None => true,
        };
        let shim = Shim {
            base: ffi::sqlite3_file {
                pMethods: &WAL_METHODS,
            },
            real,
        };
        let this = file.cast::<WalFile>();
        ptr::write(
            this,
            WalFile {
                shim,
                db,
                gathered: Vec::new(),
                start: 0,
                flush_next: false,
                pass_through,
                failed: ffi::SQLITE_OK,
            },
        );
        if let Some(db) = db.as_mut() {
            db.wal = this;
        }
        ffi::SQLITE_OK
    }
}

/// The wrapper behind `file` (a WalFile or a DbFile), and the default VFS's methods for its
/// real file object.
///
/// SAFETY: `file` must be a file that `open` wrapped as a `T` and `close` has not torn down.
unsafe fn parts<'a, T>(file: *mut ffi::sqlite3_file) -> (&'a mut T, &'a ffi::sqlite3_io_methods) {
    unsafe {
        let real = (*file.cast::<Shim>()).real;
        (&mut *file.cast::<T>(), &*(*real).pMethods)
    }
}

impl WalFile {
    /// Writes out what is gathered. If that fails, the bytes are dropped and the file fails
    /// every call until the transaction ends: SQLite was told those writes succeeded, and
    /// a failed read (which may be where the error surfaces) does not stop a transaction
    /// from committing, so its commit must fail instead.
    fn flush(&mut self, methods: &ffi::sqlite3_io_methods) -> c_int {
        if self.failed != ffi::SQLITE_OK {
            return self.failed;
        }
        if self.gathered.is_empty() {
            return ffi::SQLITE_OK;
        }
        let rc = self.write_gathered(methods);
        self.gathered.clear();
        if self.gathered.capacity() > MAX_GATHERED {
            // A transaction larger than commits usually are: give the memory back.
            self.gathered = Vec::new();
        }
        self.failed = rc;
        rc
    }

    fn write_gathered(&mut self, methods: &ffi::sqlite3_io_methods) -> c_int {
        #[cfg(test)]
        if tests::FAIL_NEXT_WRITE.with(|f| f.replace(false)) {
            return ffi::SQLITE_FULL;
        }
        let Some(write) = methods.xWrite else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        let mut rc = ffi::SQLITE_OK;
        let mut offset = self.start;
        for chunk in self.gathered.chunks(MAX_WRITE) {
            // SAFETY: `real` is the open file object of the default VFS; the bytes outlive
            // the call, and a chunk's length fits a c_int.
            rc = unsafe {
                write(
                    self.shim.real,
                    chunk.as_ptr().cast(),
                    chunk.len() as c_int,
                    offset,
                )
            };
            #[cfg(test)]
            tests::WRITES.with(|w| w.set(w.get() + 1));
            if rc != ffi::SQLITE_OK {
                break;
            }
            offset += chunk.len() as i64;
        }
        rc
    }
}

unsafe extern "C" fn wal_write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    if amount <= 0 || data.is_null() {
        return ffi::SQLITE_OK;
    }
    // SAFETY: SQLite calls this on a WAL file `open` wrapped, with `amount` readable bytes.
    let (wal, methods) = unsafe { parts::<WalFile>(file) };
    if wal.failed != ffi::SQLITE_OK {
        return wal.failed;
    }
    if wal.pass_through {
        return match methods.xWrite {
            // SAFETY: SQLite's own arguments, passed on unchanged.
            Some(write) => unsafe { write(wal.shim.real, data, amount, offset) },
            None => ffi::SQLITE_IOERR_WRITE,
        };
    }
    let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), amount as usize) };
    if !wal.gathered.is_empty() && offset != wal.start + wal.gathered.len() as i64 {
        let rc = wal.flush(methods);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    let alone = wal.gathered.is_empty();
    if alone {
        wal.start = offset;
    }
    wal.gathered.extend_from_slice(bytes);
    if amount == FRAME_HEADER && bytes[4..8] != [0; 4] {
        // A commit frame's header: its page comes next and ends the commit.
        wal.flush_next = true;
        return if alone {
            wal.flush(methods)
        } else {
            ffi::SQLITE_OK
        };
    }
    if wal.flush_next {
        wal.flush_next = false;
        return wal.flush(methods);
    }
    if wal.gathered.len() >= MAX_GATHERED {
        return wal.flush(methods);
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn wal_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes each file once; after this, nothing of the WalFile is used.
    unsafe {
        let (wal, methods) = parts::<WalFile>(file);
        let flushed = wal.flush(methods);
        if let Some(db) = wal.db.as_mut()
            && ptr::eq(db.wal, file.cast::<WalFile>())
        {
            db.wal = ptr::null_mut();
        }
        let closed = methods
            .xClose
            .map_or(ffi::SQLITE_OK, |close| close(wal.shim.real));
        ptr::drop_in_place(file.cast::<WalFile>());
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            closed
        }
    }
}

unsafe extern "C" fn db_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: as for `wal_close`; a WAL still open forgets this file.
    unsafe {
        let (db, methods) = parts::<DbFile>(file);
        if let Some(wal) = db.wal.as_mut() {
            wal.db = ptr::null_mut();
        }
        methods
            .xClose
            .map_or(ffi::SQLITE_OK, |close| close(db.shim.real))
    }
}

unsafe extern "C" fn db_shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: SQLite calls this on a database file `open` wrapped; its WAL, if linked, is
    // open (a closing WAL unlinks itself), and both belong to the connection making the call.
    let (db, methods) = unsafe { parts::<DbFile>(file) };
    if let Some(wal) = unsafe { db.wal.as_mut() } {
        let wal_methods = unsafe { &*(*wal.shim.real).pMethods };
        let rc = wal.flush(wal_methods);
        if flags & ffi::SQLITE_SHM_UNLOCK != 0 {
            // A lock is given up whatever happened: SQLite does not look at the answer, and
            // a lock kept would block every writer. Giving up the write lock (index 0) ends
            // the transaction, and with it a failure of its gathered bytes.
            if offset == 0 {
                wal.failed = ffi::SQLITE_OK;
            }
        } else if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    match methods.xShmLock {
        // SAFETY: SQLite's own arguments, passed on unchanged.
        Some(lock) => unsafe { lock(db.shim.real, offset, n, flags) },
        None => ffi::SQLITE_IOERR_SHMLOCK,
    }
}

/// What the two kinds of wrapped file do before a call is handed to the default VFS.
trait Wrapped {
    /// For a WAL: write out what is gathered (or the failure that lost it).
    fn before_call(&mut self, methods: &ffi::sqlite3_io_methods) -> c_int;
    #[cfg(test)]
    fn at_barrier(&self) {}
}

impl Wrapped for WalFile {
    fn before_call(&mut self, methods: &ffi::sqlite3_io_methods) -> c_int {
        self.flush(methods)
    }
}

impl Wrapped for DbFile {
    fn before_call(&mut self, _: &ffi::sqlite3_io_methods) -> c_int {
        ffi::SQLITE_OK
    }

    /// SQLite publishes a commit between two barriers on the database file's shared
    /// memory: the tests count any that finds WAL bytes still gathered.
    #[cfg(test)]
    fn at_barrier(&self) {
        // SAFETY: a linked WAL is open (see `db_shm_lock`).
        if unsafe { self.wal.as_ref() }.is_some_and(|wal| !wal.gathered.is_empty()) {
            tests::HELD_AT_BARRIER.with(|h| h.set(h.get() + 1));
        }
    }
}

/// Generates a method that does what `T` does before a call, then hands the call to the
/// default VFS, or answers `$missing` if it has no such method.
macro_rules! forward {
    ($name:ident, $field:ident, $missing:expr, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name<T: Wrapped>(
            file: *mut ffi::sqlite3_file,
            $($arg: $ty),*
        ) -> c_int {
            // SAFETY: SQLite calls this on a file `open` wrapped as a `T` (the methods table
            // it was given is `T`'s), and passes its own arguments on unchanged.
            let real = unsafe { (*file.cast::<Shim>()).real };
            let (wrapped, methods) = unsafe { parts::<T>(file) };
            let rc = wrapped.before_call(methods);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
            match methods.$field {
                Some(method) => unsafe { method(real, $($arg),*) },
                None => $missing,
            }
        }
    };
}

forward!(read, xRead, ffi::SQLITE_IOERR_READ,
    (buf: *mut c_void, amount: c_int, offset: ffi::sqlite3_int64));
forward!(write_through, xWrite, ffi::SQLITE_IOERR_WRITE,
    (data: *const c_void, amount: c_int, offset: ffi::sqlite3_int64));
forward!(truncate, xTruncate, ffi::SQLITE_IOERR_TRUNCATE, (size: ffi::sqlite3_int64));
forward!(sync, xSync, ffi::SQLITE_IOERR_FSYNC, (flags: c_int));
forward!(file_size, xFileSize, ffi::SQLITE_IOERR_FSTAT, (size: *mut ffi::sqlite3_int64));
forward!(lock, xLock, ffi::SQLITE_OK, (level: c_int));
forward!(unlock, xUnlock, ffi::SQLITE_OK, (level: c_int));
forward!(check_reserved_lock, xCheckReservedLock, ffi::SQLITE_OK, (out: *mut c_int));
forward!(file_control, xFileControl, ffi::SQLITE_NOTFOUND, (op: c_int, arg: *mut c_void));
forward!(shm_map, xShmMap, ffi::SQLITE_IOERR_SHMMAP,
    (page: c_int, size: c_int, extend: c_int, out: *mut *mut c_void));
forward!(shm_lock, xShmLock, ffi::SQLITE_IOERR_SHMLOCK, (offset: c_int, n: c_int, flags: c_int));
forward!(shm_unmap, xShmUnmap, ffi::SQLITE_OK, (delete: c_int));
forward!(fetch, xFetch, {
        // No memory map: SQLite reads the page instead.
        // SAFETY: `out` is SQLite's pointer to fill in.
        unsafe { *out = ptr::null_mut() };
        ffi::SQLITE_OK
    },
    (offset: ffi::sqlite3_int64, amount: c_int, out: *mut *mut c_void));
forward!(unfetch, xUnfetch, ffi::SQLITE_OK, (offset: ffi::sqlite3_int64, p: *mut c_void));

/// Properties of the file, not its contents: nothing to write out first.
unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls this on a file `open` wrapped.
    let (shim, methods) = unsafe { parts::<Shim>(file) };
    methods
        .xSectorSize
        .map_or(4096, |f| unsafe { f(shim.real) })
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls this on a file `open` wrapped.
    let (shim, methods) = unsafe { parts::<Shim>(file) };
    methods
        .xDeviceCharacteristics
        .map_or(0, |f| unsafe { f(shim.real) })
}

unsafe extern "C" fn shm_barrier<T: Wrapped>(file: *mut ffi::sqlite3_file) {
    // SAFETY: SQLite calls this on a file `open` wrapped as a `T`.
    #[cfg(test)]
    unsafe { parts::<T>(file) }.0.at_barrier();
    let (shim, methods) = unsafe { parts::<Shim>(file) };
    if let Some(barrier) = methods.xShmBarrier {
        unsafe { barrier(shim.real) }
    }
}

type Close = unsafe extern "C" fn(*mut ffi::sqlite3_file) -> c_int;
type Write =
    unsafe extern "C" fn(*mut ffi::sqlite3_file, *const c_void, c_int, ffi::sqlite3_int64) -> c_int;
type ShmLock = unsafe extern "C" fn(*mut ffi::sqlite3_file, c_int, c_int, c_int) -> c_int;

/// The methods table of a kind of file (version 3: with memory-mapped reads): the three
/// methods given, and every other one handed on after `T::before_call`.
const fn methods<T: Wrapped>(
    close: Close,
    write: Write,
    shm_lock: ShmLock,
) -> ffi::sqlite3_io_methods {
    ffi::sqlite3_io_methods {
        iVersion: 3,
        xClose: Some(close),
        xRead: Some(read::<T>),
        xWrite: Some(write),
        xTruncate: Some(truncate::<T>),
        xSync: Some(sync::<T>),
        xFileSize: Some(file_size::<T>),
        xLock: Some(lock::<T>),
        xUnlock: Some(unlock::<T>),
        xCheckReservedLock: Some(check_reserved_lock::<T>),
        xFileControl: Some(file_control::<T>),
        xSectorSize: Some(sector_size),
        xDeviceCharacteristics: Some(device_characteristics),
        xShmMap: Some(shm_map::<T>),
        xShmLock: Some(shm_lock),
        xShmBarrier: Some(shm_barrier::<T>),
        xShmUnmap: Some(shm_unmap::<T>),
        xFetch: Some(fetch::<T>),
        xUnfetch: Some(unfetch::<T>),
    }
}

static WAL_METHODS: ffi::sqlite3_io_methods =
    methods::<WalFile>(wal_close, wal_write, shm_lock::<WalFile>);

static DB_METHODS: ffi::sqlite3_io_methods =
    methods::<DbFile>(db_close, write_through::<DbFile>, db_shm_lock);

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::path::Path;

    use rusqlite::{Connection, OpenFlags};

    use super::*;

    thread_local! {
        /// Writes this thread's connections made to their WAL files (SQLite calls a VFS on
        /// the thread that runs the statement).
        pub static WRITES: Cell<u64> = const { Cell::new(0) };
        /// Set to make the next write of gathered bytes fail as a full disk would.
        pub static FAIL_NEXT_WRITE: Cell<bool> = const { Cell::new(false) };
        /// Barriers on a database file's shared memory that found bytes of its WAL still
        /// gathered: SQLite publishes a commit between two of them, so this must stay 0.
        pub static HELD_AT_BARRIER: Cell<u64> = const { Cell::new(0) };
    }

    fn writes() -> u64 {
        WRITES.with(Cell::get)
    }

    /// A connection as the store's writer opens one: this VFS, WAL, commits not synced.
    fn writer(path: &Path) -> Connection {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let conn = Connection::open_with_flags_and_vfs(path, flags, register().unwrap()).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
        conn.execute_batch("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")
            .unwrap();
        conn
    }

    /// What a connection of SQLite's own VFS finds: the number of rows and their checksum.
    fn seen(conn: &Connection) -> (i64, i64) {
        conn.query_row(
            "SELECT count(*), coalesce(sum(k * length(v) + unicode(v)), 0) FROM t",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    /// What a process killed right now would leave: the database and WAL files as the kernel
    /// holds them, copied and opened by SQLite's own VFS (which recovers the WAL).
    fn after_a_crash(db: &Path) -> (i64, i64) {
        let copy = tempfile::tempdir().unwrap();
        let to = copy.path().join("c.db");
        std::fs::copy(db, &to).unwrap();
        let wal = db.with_extension("db-wal");
        if wal.exists() {
            std::fs::copy(&wal, copy.path().join("c.db-wal")).unwrap();
        }
        let conn = Connection::open(&to).unwrap();
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        seen(&conn)
    }

    #[test]
    fn every_commit_is_in_the_file_when_it_returns_whatever_shape_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let conn = writer(&path);
        let other = Connection::open(&path).unwrap();
        // The files are copied first, before the writer's connection does anything more
        // that could write out what it still holds.
        let check = |what: &str| {
            let crashed = after_a_crash(&path);
            let elsewhere = seen(&other);
            let expected = seen(&conn);
            assert_eq!(crashed, expected, "a crash after {what}");
            assert_eq!(elsewhere, expected, "another connection after {what}");
        };

        // Small commits: a few pages each.
        for k in 0..20 {
            conn.execute("INSERT INTO t VALUES (?1, randomblob(100))", [k])
                .unwrap();
            check("a small commit");
        }
        // A commit larger than one write and than the cap on gathered bytes.
        conn.execute_batch(
            "BEGIN;
             WITH RECURSIVE s(k) AS (SELECT 100 UNION ALL SELECT k + 1 FROM s WHERE k < 1600)
             INSERT INTO t SELECT k, randomblob(3000) FROM s;
             COMMIT;",
        )
        .unwrap();
        check("a large commit");
        // A transaction that spills pages into the WAL before it commits, then writes some of
        // them again: SQLite overwrites those frames and rewrites their checksums at commit.
        conn.pragma_update(None, "cache_size", 10).unwrap();
        conn.execute_batch(
            "BEGIN;
             UPDATE t SET v = randomblob(2000) WHERE k >= 100;
             UPDATE t SET v = randomblob(10) WHERE k % 7 = 0;
             COMMIT;",
        )
        .unwrap();
        check("a spilled transaction");
        // A rolled-back transaction leaves nothing, and the next commit is whole.
        conn.execute_batch("BEGIN; DELETE FROM t; ROLLBACK;")
            .unwrap();
        conn.execute("UPDATE t SET v = x'00' WHERE k = 3", [])
            .unwrap();
        check("a rollback and a commit");
        // A checkpoint that starts the WAL over: the next frames overwrite it from its start.
        conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
            .unwrap();
        conn.execute("INSERT INTO t VALUES (-1, randomblob(50))", [])
            .unwrap();
        check("a WAL started over");
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        conn.execute("INSERT INTO t VALUES (-2, randomblob(50))", [])
            .unwrap();
        check("a WAL truncated");
        assert_eq!(
            HELD_AT_BARRIER.with(Cell::get),
            0,
            "a commit was published while some of its bytes were still gathered"
        );
    }

    #[test]
    fn frames_of_a_rolled_back_transaction_never_land_over_another_connections_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let first = writer(&path);
        let second = writer(&path);
        first
            .execute_batch(
                "WITH RECURSIVE s(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM s WHERE k < 300)
                 INSERT INTO t SELECT k, randomblob(3000) FROM s;
                 PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .unwrap();
        // Its pages are now read from the database file. The first connection rewrites every page once, spilling them into the WAL past its
        // end as its small cache fills (none is read again), and rolls back.
        first.pragma_update(None, "cache_size", 10).unwrap();
        first
            .execute_batch("BEGIN; UPDATE t SET v = randomblob(3000); ROLLBACK;")
            .unwrap();
        // The second commits frames at the same place in the WAL.
        second
            .execute_batch(
                "BEGIN;
                 WITH RECURSIVE s(k) AS (SELECT 1000 UNION ALL SELECT k + 1 FROM s WHERE k < 1040)
                 INSERT INTO t SELECT k, randomblob(500) FROM s;
                 COMMIT;",
            )
            .unwrap();
        // Whatever the first connection does next, the second's commit stays as it was.
        let expected = seen(&second);
        assert_eq!(expected.0, 341);
        assert_eq!(seen(&first), expected);
        drop(first);
        assert_eq!(seen(&second), expected);
        assert_eq!(after_a_crash(&path), expected);
    }

    /// `rows` rows of `size` random bytes from key `from` on, in one statement.
    fn insert(conn: &Connection, from: i64, rows: i64, size: i64) -> rusqlite::Result<usize> {
        conn.execute(
            "WITH RECURSIVE s(k) AS (SELECT ?1 UNION ALL SELECT k + 1 FROM s WHERE k < ?1 + ?2 - 1)
             INSERT INTO t SELECT k, randomblob(?3) FROM s",
            [from, rows, size],
        )
    }

    #[test]
    fn a_transaction_whose_gathered_bytes_could_not_be_written_cannot_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let conn = writer(&path);
        insert(&conn, 1, 50, 100).unwrap();
        // A transaction larger than the cache: pages go to the WAL early and are gathered.
        conn.pragma_update(None, "cache_size", 10).unwrap();
        conn.execute_batch("BEGIN").unwrap();
        insert(&conn, 1000, 301, 3000).unwrap();
        // As the writer runs an isolated job: a savepoint whose statement fails and is rolled
        // back alone. The disk is full when the gathered bytes are written out, which the
        // statement meets as a failed read.
        conn.execute_batch("SAVEPOINT isolated").unwrap();
        FAIL_NEXT_WRITE.with(|f| f.set(true));
        let failed = conn.execute(
            "INSERT INTO t SELECT k + 100000, v FROM t WHERE k >= 1000",
            [],
        );
        assert!(
            !FAIL_NEXT_WRITE.with(Cell::get),
            "the gathered bytes were written here"
        );
        assert_eq!(
            failed.unwrap_err().sqlite_error_code(),
            Some(rusqlite::ErrorCode::DiskFull)
        );
        let _ = conn.execute_batch("ROLLBACK TO isolated; RELEASE isolated");
        // SQLite rolled back the statement only: the rest of the transaction is still open,
        // and must not commit without the bytes that were lost.
        assert!(!conn.is_autocommit(), "the transaction is still open");
        assert!(
            conn.execute_batch("COMMIT").is_err(),
            "committed without its pages"
        );
        if !conn.is_autocommit() {
            conn.execute_batch("ROLLBACK").unwrap();
        }
        let expected = (50, seen(&conn).1);
        assert_eq!(seen(&conn).0, 50);
        assert_eq!(seen(&Connection::open(&path).unwrap()), expected);
        assert_eq!(after_a_crash(&path), expected);
        // The space is back: the next transaction commits as usual.
        insert(&conn, 5000, 10, 100).unwrap();
        assert_eq!(seen(&Connection::open(&path).unwrap()).0, 60);
        assert_eq!(after_a_crash(&path).0, 60);
    }

    #[test]
    fn a_failed_write_at_rollback_still_gives_up_the_write_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let first = writer(&path);
        let second = writer(&path);
        first.pragma_update(None, "busy_timeout", 200).unwrap();
        second.pragma_update(None, "busy_timeout", 200).unwrap();
        insert(&first, 1, 300, 3000).unwrap();
        first
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        // Pages spilled past the WAL's end and gathered, then rolled back while the disk is
        // full: the gathered bytes are lost, which is harmless, and the lock must go.
        first.pragma_update(None, "cache_size", 10).unwrap();
        first
            .execute_batch("BEGIN; UPDATE t SET v = randomblob(3000);")
            .unwrap();
        FAIL_NEXT_WRITE.with(|f| f.set(true));
        first.execute_batch("ROLLBACK").unwrap();
        assert!(
            !FAIL_NEXT_WRITE.with(Cell::get),
            "the gathered bytes were written here"
        );
        assert!(first.is_autocommit());
        insert(&second, 1000, 1, 10).expect("the other connection writes");
        insert(&first, 2000, 1, 10).expect("this connection writes again");
        let (busy, _, _): (i64, i64, i64) = second
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(busy, 0, "a checkpoint found the WAL still locked");
        assert_eq!(seen(&second).0, 302);
        assert_eq!(after_a_crash(&path).0, 302);
    }

    #[test]
    fn without_powersafe_overwrite_writes_go_straight_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        // Full syncs on a disk that may not overwrite a sector safely: SQLite pads each
        // commit to a sector and syncs inside its frames.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_URI;
        let uri = format!("file:{}?psow=0", path.display());
        let conn = Connection::open_with_flags_and_vfs(uri, flags, register().unwrap()).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")
            .unwrap();
        let before = writes();
        for k in 0..20 {
            insert(&conn, k * 100, 1 + k, 700).unwrap();
            assert_eq!(after_a_crash(&path), seen(&conn));
        }
        assert_eq!(writes(), before, "nothing was gathered");
        assert_eq!(HELD_AT_BARRIER.with(Cell::get), 0);
    }

    #[test]
    fn a_commit_of_many_pages_takes_a_few_writes_not_two_a_page() {
        let dir = tempfile::tempdir().unwrap();
        let conn = writer(&dir.path().join("w.db"));
        // About 40 pages, in a table and its index, as a batch of decisions writes.
        conn.execute_batch("CREATE INDEX t_v ON t (v); PRAGMA wal_checkpoint(TRUNCATE);")
            .unwrap();
        let before = writes();
        conn.execute_batch(
            "BEGIN;
             WITH RECURSIVE s(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM s WHERE k < 50)
             INSERT INTO t SELECT k, randomblob(1500) FROM s;
             COMMIT;",
        )
        .unwrap();
        let frames: i64 = conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
            .unwrap();
        let made = writes() - before;
        assert!(frames >= 40, "{frames} frames");
        assert!(
            (1..=4).contains(&made),
            "{made} writes for a commit of {frames} frames"
        );
    }
}
