//! The FFI shim: VFS `writelock` over the VFS that was default at load time.
//!
//! Modelled on SQLite's `ext/misc/cksumvfs.c`: thin delegation, the inner
//! `sqlite3_file` placed right after ours, one idea per method. Only files
//! opened with `SQLITE_OPEN_MAIN_DB` get our methods; journals, WAL and temp
//! files are opened straight into the inner VFS, so they *are* inner files.
//!
//! Every `extern "C"` function catches panics and maps them to an SQLite error
//! code; all lock decisions live in [`crate::protocol`], all waiting in
//! [`crate::wait`].

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use libsqlite3_sys as ffi;

use crate::lockfile::{kind_of, lock_path_for, LockCounters, LockFile};
use crate::options::{Options, Source};
use crate::protocol::{event, Counters, Protocol};
use crate::wait::{Handle, Run, State};

/// `SQLITE_FCNTL_LOCK_TIMEOUT` (sqlite3.h, 3.25+; newer than our bindings).
const SQLITE_FCNTL_LOCK_TIMEOUT: c_int = 34;

/// The VFS name users see: `file:app.db?vfs=writelock`, `writelock_status()`.
pub const VFS_NAME: &CStr = c"writelock";

/// What a main-database handle carries besides the inner file.
pub(crate) struct FileState {
    /// `<db>.lock` (created only when a lock is needed: not for read-only
    /// or immutable connections).
    pub lock_path: Option<PathBuf>,
    /// `<db>-journal`, whose first byte tells a hot journal.
    pub journal_path: PathBuf,
    /// Whether the fail-closed error was already logged (log once per handle).
    pub logged: AtomicBool,
    /// The database path is a device, FIFO or socket: refused (`lock` holds
    /// why), and never read, so that the open gets as far as reporting it.
    pub not_regular: bool,
    /// The lock state, or why the lock file could not be used (fail closed).
    pub lock: Result<Option<Shared>, String>,
}

/// A snapshot of one handle for `writelock_status()`.
pub(crate) struct HandleReport {
    /// The lock file of the database (also for a read-only connection, which
    /// takes no lock and creates none).
    pub lock_path: Option<PathBuf>,
    /// This connection takes the lock when it writes.
    pub protected: bool,
    pub holding: bool,
    /// Holding by borrowing this process's own flock on `<db>.lock`.
    pub borrowed: bool,
    /// Options in force.
    pub options: Options,
    pub error: Option<String>,
    pub counters: Counters,
    pub lock_counters: LockCounters,
}

/// Our `sqlite3_file`: the base struct SQLite sees, then a pointer to our
/// state; the inner file follows at [`INNER_OFFSET`].
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    /// A main database's state (NULL for other files).
    state: *mut FileState,
    /// Another file's name as SQLite passed it to xOpen, valid until xClose
    /// (NULL for main databases and nameless temporary files).
    name: *const c_char,
    /// The process that opened it.
    pid: u32,
    /// Its `SQLITE_OPEN_…` kind flag.
    kind: c_int,
}

/// Where the inner `sqlite3_file` starts: after ours, 8-byte aligned.
const INNER_OFFSET: usize = (std::mem::size_of::<ShimFile>() + 7) & !7;

fn guard<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(on_panic)
}

/// A handle's lock state, shared with the thread-local refusal record and
/// the process timer.
pub(crate) type Shared = Arc<Handle>;
type WeakShared = Weak<Handle>;

thread_local! {
    /// The handle whose last escalation on this thread was refused, when,
    /// and what for: the busy handler's sleep that follows may wait for it.
    static WANTS_LOCK: RefCell<Option<(WeakShared, Instant, Want)>> = const { RefCell::new(None) };
}

/// What a refused handle waits for in its busy handler's sleep.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// The flock (queue as a write intent).
    Flock,
    /// Other handles' read locks to go (a RESERVED writer wanting EXCLUSIVE).
    Readers,
    /// A writer's pending marker or EXCLUSIVE to go (a reader wanting SHARED).
    Writer,
}

/// A refusal older than this is not the one the current sleep is for.
const INTENT_FRESH: Duration = Duration::from_millis(50);

/// Run one protocol step; act on what it asks for (log an error, say who
/// holds the lock off this path, arm the intent expiry and the long-hold
/// watch), and remember a refusal so the busy handler's sleep can wait.
fn step(m: &Shared, op: impl FnOnce(&mut Protocol<LockFile>) -> c_int) -> c_int {
    if let Some(parent) = m.inherited_from() {
        return refuse_inherited(m, parent);
    }
    let mut st = m.lock();
    let rc = op(&mut st.p);
    let want = match (
        st.p.take_intent_request(),
        st.p.take_exclusive_request(),
        st.p.take_shared_request(),
    ) {
        (true, _, _) => Some(Want::Flock),
        (_, true, _) => Some(Want::Readers),
        // A writer queued for the flock whose retry meets the committing
        // writer's pending marker keeps its place in the queue: it wants the
        // flock anyway, and the committer's release wakes the oldest waiter.
        (_, _, true) if st.queued() => Some(Want::Flock),
        (_, _, true) => Some(Want::Writer),
        _ => None,
    };
    if let (Some(want), ffi::SQLITE_BUSY) = (want, rc) {
        let w = Arc::downgrade(m);
        WANTS_LOCK.with(|c| *c.borrow_mut() = Some((w, Instant::now(), want)));
    }
    let events = st.p.take_events();
    if events & event::INTENT != 0 {
        crate::wait::arm_intent_expiry(m);
    }
    if events & event::ACQUIRED != 0 {
        crate::wait::arm_hold_watch(m, &mut st, crate::log_error);
    }
    st.settle(m);
    if rc == ffi::SQLITE_OK && st.p.writing() {
        crate::wait::forgive();
    }
    let unlogged = st.p.unlogged.take();
    let refused = (events & event::REFUSED != 0
        && st.p.flock().page().is_none_or(|p| p.may_log_busy()))
    .then(|| (st.p.label.clone(), st.p.flock().path().to_path_buf()));
    drop(st);
    if let Some((code, msg)) = unlogged {
        crate::log_error(code, &msg);
    }
    if let Some((label, lock_path)) = refused {
        // Who holds it takes a read of /proc/locks: never on the
        // connection's path (a busy_timeout 0 refusal costs what stock's does).
        crate::timer::at(Instant::now(), move || {
            let who = crate::holder::current_holder(&lock_path)
                .map(|h| {
                    let cmd = crate::holder::cmdline(h.pid).unwrap_or_else(|| "?".into());
                    match h.held_for {
                        Some(d) => format!("pid {} ({cmd}) for {} ms", h.pid, d.as_millis()),
                        None => format!("pid {} ({cmd})", h.pid),
                    }
                })
                .unwrap_or_else(|| "another process".into());
            crate::log_error(
                ffi::SQLITE_BUSY,
                &format!("writelock: {label} is locked by {who}; returning SQLITE_BUSY"),
            );
        });
    }
    rc
}

/// A connection inherited through `fork()` and used in the child: refused,
/// without touching its state (which belongs to the parent).
fn refuse_inherited(m: &Shared, parent: u32) -> c_int {
    if !m.child_warned.swap(true, Ordering::Relaxed) {
        crate::log_error(
            ffi::SQLITE_IOERR_LOCK,
            &format!(
                "writelock: connection opened in process {parent} used in process {} after \
                 fork(); its lock belongs to the parent — open a new connection in the child",
                crate::process::pid()
            ),
        );
    }
    ffi::SQLITE_IOERR_LOCK
}

/// The inner file of one of our files.
///
/// # Safety
/// `f` points to a file SQLite allocated with our `szOsFile`, so there are
/// `INNER_OFFSET + inner.szOsFile` bytes behind it.
unsafe fn inner(f: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    (f as *mut u8).add(INNER_OFFSET) as *mut ffi::sqlite3_file
}

/// The inner file's methods.
///
/// # Safety
/// As [`inner`], and the inner file was opened successfully (non-NULL methods),
/// which holds for every file whose `pMethods` is one of ours.
unsafe fn im(f: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    &*(*inner(f)).pMethods
}

/// Our state for a main-db file.
///
/// # Safety
/// `f` has one of our method tables, so `state` was set by `x_open` from a
/// `Box` and stays valid until `x_close`.
unsafe fn state<'a>(f: *mut ffi::sqlite3_file) -> &'a FileState {
    &*(*(f as *mut ShimFile)).state
}

/// Call an inner method that SQLite guarantees for this `iVersion`.
macro_rules! inner_call {
    ($f:expr, $m:ident $(, $arg:expr)*) => {
        match im($f).$m {
            Some(m) => m(inner($f) $(, $arg)*),
            None => ffi::SQLITE_IOERR,
        }
    };
}

/// Run `op` on the protocol when the handle has one; `pass` otherwise.
///
/// # Safety
/// As [`state`].
unsafe fn with_proto(
    f: *mut ffi::sqlite3_file,
    pass: impl FnOnce() -> c_int,
    op: impl FnOnce(&mut Protocol<LockFile>) -> c_int,
) -> c_int {
    match &state(f).lock {
        Ok(None) => pass(),
        Ok(Some(m)) => step(m, op),
        Err(msg) => {
            if !state(f).logged.swap(true, Ordering::Relaxed) {
                crate::log_error(ffi::SQLITE_CANTOPEN, msg);
            }
            ffi::SQLITE_CANTOPEN
        }
    }
}

/// Before a write, truncate or sync of the database file: a checkpoint that
/// holds the checkpoint lock without the flock must take it first, or the
/// write is refused with `SQLITE_BUSY` (see
/// [`Protocol::checkpoint_without_flock`]). One relaxed load otherwise.
///
/// # Safety
/// As [`state`].
unsafe fn checkpoint_may_write(f: *mut ffi::sqlite3_file) -> c_int {
    if inherited(f) {
        // A connection inherited through fork() never writes the database:
        // the lock it may believe it holds is its parent's.
        return ffi::SQLITE_IOERR_WRITE;
    }
    match &state(f).lock {
        Ok(Some(m)) if m.ckpt_unlocked.load(Ordering::Relaxed) => step(m, |p| p.checkpoint_write()),
        _ => ffi::SQLITE_OK,
    }
}

/// `PRAGMA writelock_…[=value]` on one handle: the value in force, or an
/// error naming the option and the cause.
fn pragma(st: &FileState, name: &str, value: Option<&str>) -> Result<String, String> {
    let Ok(Some(m)) = &st.lock else {
        // Validate all the same, so a typo is reported as such.
        let mut o = Options::default();
        if let Some(v) = value {
            o.set_from(Source::Pragma, name, v)?;
            return Err(format!(
                "writelock: {name} has no effect: this connection takes no write lock on this \
                 database (read-only, immutable, temporary, or a lock-file error)"
            ));
        }
        return o.get(name);
    };
    let mut s = m.lock();
    if let Some(v) = value {
        if name.eq_ignore_ascii_case("writelock_allow_network_fs") {
            return Err(format!(
                "writelock: {name} applies at open only: give it as a URI parameter"
            ));
        }
        s.p.options.set_from(Source::Pragma, name, v)?;
    }
    s.p.options.get(name)
}

/// Whether a rollback journal exists with a non-zero first byte — what SQLite
/// calls hot once no writer holds RESERVED. Opening and closing the journal
/// does not touch any lock on the database file.
fn looks_hot(journal: &Path) -> bool {
    use std::io::Read;
    let mut b = [0u8; 1];
    std::fs::File::open(journal)
        .and_then(|mut f| f.read(&mut b))
        .is_ok_and(|n| n == 1 && b[0] != 0)
}

// ---- io methods -------------------------------------------------------------

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    guard(ffi::SQLITE_IOERR_CLOSE, || {
        // SAFETY: SQLite calls xClose once, on a file we opened (our methods).
        unsafe {
            let rc = inner_call!(f, xClose);
            let sf = f as *mut ShimFile;
            let st = Box::from_raw((*sf).state);
            (*sf).state = ptr::null_mut();
            if let Ok(Some(m)) = &st.lock {
                if m.inherited_from().is_none() {
                    let mut s = m.lock();
                    s.p.close();
                    s.free_slot();
                }
            }
            // Closes <db>.lock's descriptor (after the inner unlock) once the
            // last reference goes (a sleep or the timer may hold one briefly).
            drop(st);
            rc
        }
    })
}

unsafe extern "C" fn x_read(
    f: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    n: c_int,
    off: i64,
) -> c_int {
    // SAFETY: delegation with SQLite's own arguments to the inner file; for
    // a refused non-regular path, `buf` is SQLite's buffer of `n` bytes.
    guard(ffi::SQLITE_IOERR_READ, || unsafe {
        if state(f).not_regular {
            // Read as empty (a FIFO would fail the read, a device give
            // anything): the open then reaches the check that names the
            // path, and nothing is read from it.
            ptr::write_bytes(buf as *mut u8, 0, n.max(0) as usize);
            return ffi::SQLITE_IOERR_SHORT_READ;
        }
        inner_call!(f, xRead, buf, n, off)
    })
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    n: c_int,
    off: i64,
) -> c_int {
    // SAFETY: our file; delegation with SQLite's own arguments.
    guard(ffi::SQLITE_IOERR_WRITE, || unsafe {
        match checkpoint_may_write(f) {
            ffi::SQLITE_OK => inner_call!(f, xWrite, buf, n, off),
            rc => rc,
        }
    })
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: our file; delegation.
    guard(ffi::SQLITE_IOERR_TRUNCATE, || unsafe {
        match checkpoint_may_write(f) {
            ffi::SQLITE_OK => inner_call!(f, xTruncate, size),
            rc => rc,
        }
    })
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: our file; delegation.
    guard(ffi::SQLITE_IOERR_FSYNC, || unsafe {
        match checkpoint_may_write(f) {
            ffi::SQLITE_OK => inner_call!(f, xSync, flags),
            rc => rc,
        }
    })
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, out: *mut i64) -> c_int {
    // SAFETY: delegation; `out` is SQLite's.
    guard(ffi::SQLITE_IOERR_FSTAT, || unsafe {
        if state(f).not_regular {
            *out = 0;
            return ffi::SQLITE_OK;
        }
        inner_call!(f, xFileSize, out)
    })
}

unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    guard(ffi::SQLITE_IOERR_LOCK, || {
        // SAFETY: our file (our methods); the closure only delegates.
        unsafe {
            with_proto(
                f,
                || inner_call!(f, xLock, level),
                |p| p.lock(level, || inner_call!(f, xLock, level)),
            )
        }
    })
}

unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    guard(ffi::SQLITE_IOERR_UNLOCK, || {
        // SAFETY: as x_lock. Unlocking never fails closed: a handle whose lock
        // file is unusable never got past xLock, so there is nothing to release.
        unsafe {
            match &state(f).lock {
                // Inherited through fork(): unlock all the way. A downgrade
                // to SHARED would *take* a POSIX read lock for this child,
                // which holds none of its parent's, and keep writers out for
                // as long as the child lives.
                Ok(Some(m)) if m.inherited_from().is_some() => {
                    inner_call!(f, xUnlock, ffi::SQLITE_LOCK_NONE)
                }
                Ok(Some(m)) => step(m, |p| p.unlock(level, || inner_call!(f, xUnlock, level))),
                _ => inner_call!(f, xUnlock, level),
            }
        }
    })
}

unsafe extern "C" fn x_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    guard(ffi::SQLITE_IOERR_CHECKRESERVEDLOCK, || {
        // SAFETY: our file; `out` is SQLite's and valid for one int.
        unsafe {
            with_proto(
                f,
                || inner_call!(f, xCheckReservedLock, out),
                |p| {
                    let journal = &state(f).journal_path;
                    let (rc, res) = p.check_reserved(
                        |r| inner_call!(f, xCheckReservedLock, r),
                        || looks_hot(journal),
                    );
                    *out = res;
                    rc
                },
            )
        }
    })
}

unsafe extern "C" fn x_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: our file (our methods). For SQLITE_FCNTL_PRAGMA, SQLite passes
    // `char*[3]`: [0] result/error out, [1] the name, [2] the value or NULL.
    guard(ffi::SQLITE_IOERR, || unsafe {
        let protected = matches!(state(f).lock, Ok(Some(_)));
        // Builds with SQLITE_ENABLE_SETLK_TIMEOUT take the WAL write lock
        // before any read lock once blocking locks are enabled, which this
        // shim would take for WAL recovery. Say "not supported" on protected
        // handles, so SQLite keeps the ordinary order.
        if op == SQLITE_FCNTL_LOCK_TIMEOUT && protected {
            return ffi::SQLITE_NOTFOUND;
        }
        // A checkpoint about to grow the file (with mmap on, the unix VFS
        // extends it here): only with the flock. It is a hint: dropping it
        // is harmless.
        if op == ffi::SQLITE_FCNTL_SIZE_HINT && checkpoint_may_write(f) != ffi::SQLITE_OK {
            return ffi::SQLITE_OK;
        }
        if op == ffi::SQLITE_FCNTL_PRAGMA {
            let a = arg as *mut *mut c_char;
            let name = CStr::from_ptr(*a.add(1)).to_string_lossy();
            if Options::owns(&name) {
                let v = *a.add(2);
                let value = (!v.is_null()).then(|| CStr::from_ptr(v).to_string_lossy());
                let (rc, msg) = match pragma(state(f), &name, value.as_deref()) {
                    Ok(v) => (ffi::SQLITE_OK, v),
                    Err(e) => (ffi::SQLITE_ERROR, e),
                };
                *a = crate::sqlite_strdup(&msg);
                return rc;
            }
        }
        inner_call!(f, xFileControl, op, arg)
    })
}

unsafe extern "C" fn x_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: delegation.
    guard(4096, || unsafe {
        match im(f).xSectorSize {
            Some(m) => m(inner(f)),
            None => 4096,
        }
    })
}

unsafe extern "C" fn x_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: delegation.
    guard(0, || unsafe {
        match im(f).xDeviceCharacteristics {
            Some(m) => m(inner(f)),
            None => 0,
        }
    })
}

unsafe extern "C" fn x_shm_map(
    f: *mut ffi::sqlite3_file,
    pg: c_int,
    pgsz: c_int,
    extend: c_int,
    pp: *mut *mut c_void,
) -> c_int {
    // SAFETY: our file; delegation (only in tables of iVersion >= 2).
    guard(ffi::SQLITE_IOERR_SHMMAP, || unsafe {
        let rc = inner_call!(f, xShmMap, pg, pgsz, extend, pp);
        if rc == ffi::SQLITE_OK {
            if let Ok(Some(m)) = &state(f).lock {
                if m.inherited_from().is_none() {
                    m.lock().p.shm_mapped();
                }
            }
        }
        rc
    })
}

unsafe extern "C" fn x_shm_lock(
    f: *mut ffi::sqlite3_file,
    ofst: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    guard(ffi::SQLITE_IOERR_SHMLOCK, || {
        // SAFETY: our file; the closures only delegate.
        unsafe {
            let op = |p: &mut Protocol<LockFile>| {
                p.shm_lock(ofst, n, flags, || inner_call!(f, xShmLock, ofst, n, flags))
            };
            let rc = with_proto(f, || inner_call!(f, xShmLock, ofst, n, flags), op);
            if rc != ffi::SQLITE_BUSY {
                return rc;
            }
            // A refused checkpoint queues for the flock (bounded), then
            // retries; still refused, it goes on without the flock.
            let Ok(Some(h)) = &state(f).lock else {
                return rc;
            };
            let Some(patience) = h.lock().p.take_checkpoint_wait() else {
                return rc;
            };
            let deadline = Instant::now() + patience;
            if !patience.is_zero() && crate::wait::for_flock(h, deadline) == Some(true) {
                return step(h, op);
            }
            step(h, |p| {
                p.checkpoint_without_flock(ofst, n, || inner_call!(f, xShmLock, ofst, n, flags))
            })
        }
    })
}

unsafe extern "C" fn x_shm_barrier(f: *mut ffi::sqlite3_file) {
    // SAFETY: delegation.
    guard((), || unsafe {
        if let Some(m) = im(f).xShmBarrier {
            m(inner(f))
        }
    })
}

unsafe extern "C" fn x_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    guard(ffi::SQLITE_IOERR_SHMMAP, || {
        // SAFETY: our file; all shm locks go with the mapping.
        unsafe {
            let rc = inner_call!(f, xShmUnmap, delete);
            if let Ok(Some(m)) = &state(f).lock {
                if m.inherited_from().is_none() {
                    m.lock().p.shm_unmap();
                }
            }
            rc
        }
    })
}

unsafe extern "C" fn x_fetch(
    f: *mut ffi::sqlite3_file,
    off: i64,
    n: c_int,
    pp: *mut *mut c_void,
) -> c_int {
    // SAFETY: delegation (only in tables of iVersion 3, like the inner's).
    guard(ffi::SQLITE_IOERR_READ, || unsafe {
        inner_call!(f, xFetch, off, n, pp)
    })
}

unsafe extern "C" fn x_unfetch(f: *mut ffi::sqlite3_file, off: i64, p: *mut c_void) -> c_int {
    // SAFETY: delegation.
    guard(ffi::SQLITE_IOERR_READ, || unsafe {
        inner_call!(f, xUnfetch, off, p)
    })
}

const fn methods(version: c_int) -> ffi::sqlite3_io_methods {
    ffi::sqlite3_io_methods {
        iVersion: version,
        xClose: Some(x_close),
        xRead: Some(x_read),
        xWrite: Some(x_write),
        xTruncate: Some(x_truncate),
        xSync: Some(x_sync),
        xFileSize: Some(x_file_size),
        xLock: Some(x_lock),
        xUnlock: Some(x_unlock),
        xCheckReservedLock: Some(x_check_reserved_lock),
        xFileControl: Some(x_file_control),
        xSectorSize: Some(x_sector_size),
        xDeviceCharacteristics: Some(x_device_characteristics),
        xShmMap: if version >= 2 { Some(x_shm_map) } else { None },
        xShmLock: if version >= 2 { Some(x_shm_lock) } else { None },
        xShmBarrier: if version >= 2 {
            Some(x_shm_barrier)
        } else {
            None
        },
        xShmUnmap: if version >= 2 {
            Some(x_shm_unmap)
        } else {
            None
        },
        xFetch: if version >= 3 { Some(x_fetch) } else { None },
        xUnfetch: if version >= 3 { Some(x_unfetch) } else { None },
    }
}

/// One table per inner `iVersion`, so we expose exactly what the inner file has.
static METHODS: [ffi::sqlite3_io_methods; 3] = [methods(1), methods(2), methods(3)];

// ---- journals, WAL and temporary files ---------------------------------------
//
// They get no lock logic, only the fork check: in a child forked without
// exec, a connection inherited from the parent may still believe it holds
// the parent's locks, and would write the parent's journal or WAL (and
// delete the journal of the parent's open transaction) without asking for
// any lock. So writes to such a file in another process than the one that
// opened it are refused, and a journal it closes is remembered so that the
// child's SQLite cannot delete it (`v_delete`).

/// The kind bits of xOpen's flags: `SQLITE_OPEN_MAIN_DB` (0x100) …
/// `SQLITE_OPEN_SUPER_JOURNAL` (0x4000), and `SQLITE_OPEN_WAL` (0x80000).
const SQLITE_OPEN_KINDS: c_int = 0x0000_7F00 | ffi::SQLITE_OPEN_WAL;

/// Open a journal, WAL or temporary file inside our wrapper.
///
/// # Safety
/// As `v_open`, whose arguments these are.
unsafe fn open_side(
    iv: *mut ffi::sqlite3_vfs,
    open: unsafe extern "C" fn(
        *mut ffi::sqlite3_vfs,
        *const c_char,
        *mut ffi::sqlite3_file,
        c_int,
        *mut c_int,
    ) -> c_int,
    name: *const c_char,
    f: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let fi = inner(f);
    (*fi).pMethods = ptr::null();
    let rc = open(iv, name, fi, flags, out_flags);
    if (*fi).pMethods.is_null() {
        return rc;
    }
    if rc != ffi::SQLITE_OK {
        inner_call!(f, xClose);
        return rc;
    }
    let v = (*(*fi).pMethods).iVersion.clamp(1, 3);
    (*f).pMethods = &SIDE_METHODS[(v - 1) as usize];
    ffi::SQLITE_OK
}

/// Whether a file of ours was opened in another process (inherited through
/// `fork()`).
///
/// # Safety
/// `f` is a file of ours.
unsafe fn inherited(f: *mut ffi::sqlite3_file) -> bool {
    crate::process::forked() && (*(f as *mut ShimFile)).pid != crate::process::pid()
}

/// Journals of the parent's connections that a forked child closed: the
/// child's SQLite must not delete them (see [`v_delete`]). Kept by path and
/// identity, so the child's own later journal at the same path is its to
/// delete.
type Kept = std::sync::Mutex<Vec<(PathBuf, (u64, u64))>>;
static KEPT: crate::process::PerProcess<Kept> = crate::process::PerProcess::new();

fn identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

unsafe extern "C" fn s_close(f: *mut ffi::sqlite3_file) -> c_int {
    guard(ffi::SQLITE_IOERR_CLOSE, || {
        // SAFETY: SQLite calls xClose once, on a file we opened; `name` is
        // valid until this call returns.
        unsafe {
            let sf = f as *mut ShimFile;
            let journal = ffi::SQLITE_OPEN_MAIN_JOURNAL | ffi::SQLITE_OPEN_WAL;
            if inherited(f) && (*sf).kind & journal != 0 && !(*sf).name.is_null() {
                let path = PathBuf::from(OsStr::from_bytes(CStr::from_ptr((*sf).name).to_bytes()));
                if let Some(id) = identity(&path) {
                    let kept = KEPT.get(Default::default);
                    kept.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((path, id));
                }
            }
            inner_call!(f, xClose)
        }
    })
}

/// A side file's write, truncate or sync: refused in a process that did not
/// open it.
macro_rules! side_write {
    ($name:ident, $m:ident, $err:expr, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name(f: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            // SAFETY: a file of ours; delegation with SQLite's own arguments.
            guard($err, || unsafe {
                if inherited(f) {
                    return $err;
                }
                inner_call!(f, $m $(, $arg)*)
            })
        }
    };
}
side_write!(s_write, xWrite, ffi::SQLITE_IOERR_WRITE, (buf: *const c_void, n: c_int, off: i64));
side_write!(s_truncate, xTruncate, ffi::SQLITE_IOERR_TRUNCATE, (size: i64));
side_write!(s_sync, xSync, ffi::SQLITE_IOERR_FSYNC, (flags: c_int));

/// A side file's other methods: plain delegation.
macro_rules! side_pass {
    ($name:ident, $m:ident, $err:expr, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name(f: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            // SAFETY: a file of ours; delegation with SQLite's own arguments.
            guard($err, || unsafe { inner_call!(f, $m $(, $arg)*) })
        }
    };
}
side_pass!(s_read, xRead, ffi::SQLITE_IOERR_READ, (buf: *mut c_void, n: c_int, off: i64));
side_pass!(s_file_size, xFileSize, ffi::SQLITE_IOERR_FSTAT, (out: *mut i64));
side_pass!(s_lock, xLock, ffi::SQLITE_IOERR_LOCK, (level: c_int));
side_pass!(s_unlock, xUnlock, ffi::SQLITE_IOERR_UNLOCK, (level: c_int));
side_pass!(s_check_reserved_lock, xCheckReservedLock, ffi::SQLITE_IOERR_CHECKRESERVEDLOCK, (out: *mut c_int));
side_pass!(s_file_control, xFileControl, ffi::SQLITE_NOTFOUND, (op: c_int, arg: *mut c_void));
side_pass!(s_shm_map, xShmMap, ffi::SQLITE_IOERR_SHMMAP, (pg: c_int, pgsz: c_int, extend: c_int, pp: *mut *mut c_void));
side_pass!(s_shm_lock, xShmLock, ffi::SQLITE_IOERR_SHMLOCK, (ofst: c_int, n: c_int, flags: c_int));
side_pass!(s_shm_unmap, xShmUnmap, ffi::SQLITE_IOERR_SHMMAP, (delete: c_int));

const fn side_methods(version: c_int) -> ffi::sqlite3_io_methods {
    let main = methods(version);
    ffi::sqlite3_io_methods {
        iVersion: version,
        xClose: Some(s_close),
        xRead: Some(s_read),
        xWrite: Some(s_write),
        xTruncate: Some(s_truncate),
        xSync: Some(s_sync),
        xFileSize: Some(s_file_size),
        xLock: Some(s_lock),
        xUnlock: Some(s_unlock),
        xCheckReservedLock: Some(s_check_reserved_lock),
        xFileControl: Some(s_file_control),
        xShmMap: if version >= 2 { Some(s_shm_map) } else { None },
        xShmLock: if version >= 2 { Some(s_shm_lock) } else { None },
        xShmUnmap: if version >= 2 {
            Some(s_shm_unmap)
        } else {
            None
        },
        ..main
    }
}

/// The side files' tables, one per inner `iVersion`.
static SIDE_METHODS: [ffi::sqlite3_io_methods; 3] =
    [side_methods(1), side_methods(2), side_methods(3)];

/// Whether `f` is a main-db file of ours (used by the SQL functions).
fn is_ours(f: *const ffi::sqlite3_file) -> bool {
    // SAFETY: `f` is a file SQLite handed out; reading its methods pointer is
    // what SQLite itself does.
    let m = unsafe { (*f).pMethods };
    METHODS.iter().any(|t| ptr::eq(t, m))
}

/// Report on a main-db file of SQLite's, or `None` if it is not ours.
///
/// # Safety
/// `f` is NULL or an open `sqlite3_file` of a connection the caller is inside.
pub(crate) unsafe fn report(f: *mut ffi::sqlite3_file) -> Option<HandleReport> {
    if f.is_null() || (*f).pMethods.is_null() || !is_ours(f) {
        return None;
    }
    let st = state(f);
    let mut r = HandleReport {
        lock_path: st.lock_path.clone(),
        protected: false,
        holding: false,
        borrowed: false,
        options: Options::default(),
        error: None,
        counters: Counters::default(),
        lock_counters: LockCounters::default(),
    };
    match &st.lock {
        Ok(Some(m)) if m.inherited_from().is_some() => {
            r.error =
                Some("writelock: connection inherited through fork(): not usable here".into());
        }
        Ok(Some(m)) => {
            let s = m.lock();
            r.protected = s.p.last_error.is_none();
            r.holding = s.p.holds();
            r.borrowed = s.p.flock().is_borrowed();
            r.error = s.p.last_error.clone();
            r.counters = s.p.counters;
            r.lock_counters = s.p.flock().counters();
            r.options = s.p.options;
        }
        Ok(None) => {}
        Err(e) => r.error = Some(e.clone()),
    }
    Some(r)
}

// ---- vfs methods ------------------------------------------------------------

/// The wrapped VFS. A raw pointer, never a reference: SQLite may use the
/// struct from other threads and writes its `pNext` when VFSes register.
///
/// # Safety
/// `vfs` is our registered VFS, whose `pAppData` is the inner VFS (set once in
/// [`register_vfs`], never freed).
unsafe fn ivfs(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    (*vfs).pAppData as *mut ffi::sqlite3_vfs
}

/// The URI parameters that follow a main-db filename as SQLite passes it to
/// xOpen: `key\0value\0` pairs after the name's NUL, ended by an empty key
/// (the layout `sqlite3_uri_parameter` walks; a name without parameters
/// ends with an empty key right away).
///
/// # Safety
/// `name` is a non-NULL main-db filename as SQLite passes it to xOpen.
unsafe fn uri_params(name: *const c_char) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut p = name.add(CStr::from_ptr(name).to_bytes().len() + 1);
    while *p != 0 {
        let k = CStr::from_ptr(p);
        p = p.add(k.to_bytes().len() + 1);
        let v = CStr::from_ptr(p);
        p = p.add(v.to_bytes().len() + 1);
        out.push((
            k.to_string_lossy().into_owned(),
            v.to_string_lossy().into_owned(),
        ));
    }
    out
}

/// Unknown `WRITELOCK_…` variables are warned about once per process.
static ENV_WARNED: AtomicBool = AtomicBool::new(false);

/// The options of a main db: environment defaults, then its URI parameters.
///
/// # Safety
/// As [`uri_params`].
unsafe fn open_options(name: *const c_char, db: &Path) -> Result<Options, String> {
    let (mut o, unknown) = Options::from_env()?;
    if let Some(w) = crate::options::unknown_env_warning(&unknown) {
        if !ENV_WARNED.swap(true, Ordering::Relaxed) {
            crate::log_error(ffi::SQLITE_WARNING, &w);
        }
    }
    let params = uri_params(name);
    o.apply_uri(
        &db.to_string_lossy(),
        params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )?;
    Ok(o)
}

fn needs_lock_file(name: *const c_char, out_flags: c_int) -> bool {
    if name.is_null() || out_flags & ffi::SQLITE_OPEN_READONLY != 0 {
        return false;
    }
    // SAFETY: `name` is the filename SQLite passed to xOpen for a main db,
    // which carries its URI parameters after it, as sqlite3_uri_boolean expects.
    let immutable = unsafe { ffi::sqlite3_uri_boolean(name, c"immutable".as_ptr(), 0) };
    immutable == 0
}

/// The lock state for a main db that needs one, or why it cannot have one:
/// the database must be a regular file (a device or FIFO gets no lock file
/// beside it), the filesystem local, the options valid, the lock file usable.
///
/// # Safety
/// As [`uri_params`].
unsafe fn lock_state(name: *const c_char, db: &Path) -> Result<Shared, String> {
    if let Ok(m) = std::fs::metadata(db) {
        if !m.file_type().is_file() {
            return Err(format!(
                "writelock: {} is a {}, not a regular file: refusing to open it as a database \
                 (nothing was created beside it)",
                db.display(),
                kind_of(m.file_type())
            ));
        }
    }
    let options = open_options(name, db)?;
    crate::netfs::check(db, options.allow_network_fs)?;
    let lf = LockFile::open(db).map_err(|e| e.to_string())?;
    let mut p = Protocol::new(lf);
    p.options = options;
    p.label = db.to_string_lossy().into_owned();
    Ok(Handle::new(p))
}

unsafe extern "C" fn v_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    f: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    guard(ffi::SQLITE_CANTOPEN, || {
        // SAFETY: SQLite allocated `f` with our szOsFile and passes a valid
        // VFS, name (or NULL) and out-flags pointer (or NULL).
        unsafe {
            let iv = ivfs(vfs);
            let Some(open) = (*iv).xOpen else {
                return ffi::SQLITE_CANTOPEN;
            };
            let sf = f as *mut ShimFile;
            (*sf).base.pMethods = ptr::null();
            (*sf).state = ptr::null_mut();
            (*sf).name = name;
            (*sf).pid = crate::process::pid();
            (*sf).kind = flags & SQLITE_OPEN_KINDS;
            if flags & ffi::SQLITE_OPEN_MAIN_DB == 0 {
                return open_side(iv, open, name, f, flags, out_flags);
            }
            let fi = inner(f);
            (*fi).pMethods = ptr::null();
            let db = if name.is_null() {
                PathBuf::new()
            } else {
                PathBuf::from(OsStr::from_bytes(CStr::from_ptr(name).to_bytes()))
            };
            let mut oflags = 0;
            let rc = open(iv, name, fi, flags, &mut oflags);
            if !out_flags.is_null() {
                *out_flags = oflags;
            }
            if rc != ffi::SQLITE_OK {
                if !(*fi).pMethods.is_null() {
                    inner_call!(f, xClose);
                }
                return rc;
            }
            let not_regular = std::fs::metadata(&db).is_ok_and(|m| !m.file_type().is_file());
            let needed = needs_lock_file(name, oflags);
            let lock = if needed {
                // Fail closed: the handle opens (so the connection can report
                // the message) but refuses every lock.
                lock_state(name, &db).map(Some).inspect_err(|e| {
                    crate::log_error(ffi::SQLITE_CANTOPEN, e);
                })
            } else {
                Ok(None)
            };
            // Expose exactly what the inner file has: no xShm* without xShmMap.
            let m = im(f);
            let version = if m.xShmMap.is_none() {
                1
            } else {
                m.iVersion.clamp(1, 3)
            };
            let mut journal = db.clone().into_os_string();
            journal.push("-journal");
            (*sf).state = Box::into_raw(Box::new(FileState {
                lock_path: (!db.as_os_str().is_empty()).then(|| lock_path_for(&db)),
                journal_path: PathBuf::from(journal),
                logged: AtomicBool::new(false),
                not_regular: not_regular && lock.is_err(),
                lock,
            }));
            (*sf).base.pMethods = &METHODS[(version - 1) as usize];
            ffi::SQLITE_OK
        }
    })
}

unsafe extern "C" fn v_delete(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync: c_int,
) -> c_int {
    // SAFETY: delegation to the inner VFS; `name` is a C string.
    guard(ffi::SQLITE_IOERR_DELETE, || unsafe {
        if crate::process::forked() && !name.is_null() {
            // A forked child's SQLite deleting the journal of its parent's
            // open transaction (closed here as an inherited file): refused.
            let path = PathBuf::from(OsStr::from_bytes(CStr::from_ptr(name).to_bytes()));
            let kept = KEPT.get(Default::default);
            let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = kept.iter().position(|(p, _)| *p == path) {
                if identity(&path) == Some(kept[i].1) {
                    return ffi::SQLITE_IOERR_DELETE;
                }
                kept.remove(i); // a newer file at that path: the child's own
            }
        }
        let iv = ivfs(vfs);
        (*iv)
            .xDelete
            .map_or(ffi::SQLITE_IOERR_DELETE, |m| m(iv, name, sync))
    })
}

unsafe extern "C" fn v_access(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    // SAFETY: delegation.
    guard(ffi::SQLITE_IOERR_ACCESS, || unsafe {
        let iv = ivfs(vfs);
        (*iv)
            .xAccess
            .map_or(ffi::SQLITE_IOERR_ACCESS, |m| m(iv, name, flags, out))
    })
}

unsafe extern "C" fn v_full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    // SAFETY: delegation.
    guard(ffi::SQLITE_CANTOPEN_FULLPATH, || unsafe {
        let iv = ivfs(vfs);
        (*iv)
            .xFullPathname
            .map_or(ffi::SQLITE_CANTOPEN, |m| m(iv, name, n, out))
    })
}

unsafe extern "C" fn v_dlopen(vfs: *mut ffi::sqlite3_vfs, name: *const c_char) -> *mut c_void {
    // SAFETY: delegation.
    guard(ptr::null_mut(), || unsafe {
        let iv = ivfs(vfs);
        (*iv).xDlOpen.map_or(ptr::null_mut(), |m| m(iv, name))
    })
}

unsafe extern "C" fn v_dlerror(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) {
    // SAFETY: delegation.
    guard((), || unsafe {
        let iv = ivfs(vfs);
        if let Some(m) = (*iv).xDlError {
            m(iv, n, out)
        }
    })
}

/// What the bindings call xDlSym's return type (an opaque function pointer).
type DlSymbol = Option<unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char)>;

unsafe extern "C" fn v_dlsym(
    vfs: *mut ffi::sqlite3_vfs,
    h: *mut c_void,
    sym: *const c_char,
) -> DlSymbol {
    // SAFETY: delegation.
    guard(None, || unsafe {
        let iv = ivfs(vfs);
        (*iv).xDlSym.and_then(|m| m(iv, h, sym))
    })
}

unsafe extern "C" fn v_dlclose(vfs: *mut ffi::sqlite3_vfs, h: *mut c_void) {
    // SAFETY: delegation.
    guard((), || unsafe {
        let iv = ivfs(vfs);
        if let Some(m) = (*iv).xDlClose {
            m(iv, h)
        }
    })
}

unsafe extern "C" fn v_randomness(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    // SAFETY: delegation.
    guard(0, || unsafe {
        let iv = ivfs(vfs);
        (*iv).xRandomness.map_or(0, |m| m(iv, n, out))
    })
}

/// The busy handler's sleep: when the refusal it sleeps for was ours, wait
/// for what was refused instead (see [`crate::wait`]). `None`: not ours, or
/// waiting is not possible now — sleep as asked.
fn sleep_for_lock(us: c_int) -> Option<c_int> {
    let (w, at, want) = WANTS_LOCK.with(|c| c.borrow_mut().take())?;
    if at.elapsed() > INTENT_FRESH {
        return None;
    }
    let h = w.upgrade()?;
    if h.inherited_from().is_some() {
        return None;
    }
    let start = Instant::now();
    let asked = Duration::from_micros(us.max(0) as u64);
    let deadline = {
        let mut st: std::sync::MutexGuard<'_, State> = h.lock();
        if !st.p.options.queue {
            return None;
        }
        let ahead = st.p.options.queue_ahead;
        Run::deadline(&mut st.w.run, start, asked, ahead) + crate::wait::take_debt()
    };
    let granted = match want {
        Want::Flock => crate::wait::for_flock(&h, deadline),
        Want::Readers => Some(crate::wait::for_readers(&h, deadline)),
        Want::Writer => Some(crate::wait::for_writer(&h, deadline)),
    };
    let slept = start.elapsed();
    Run::ended(&mut h.lock().w.run, granted == Some(true), Instant::now());
    if granted == Some(true) && want == Want::Flock {
        crate::wait::owe(asked.saturating_sub(slept));
    }
    granted?;
    Some(slept.as_micros().min(c_int::MAX as u128) as c_int)
}

unsafe extern "C" fn v_sleep(vfs: *mut ffi::sqlite3_vfs, us: c_int) -> c_int {
    // SAFETY: delegation when there is no refusal of ours to serve.
    guard(0, || unsafe {
        if let Some(slept) = sleep_for_lock(us) {
            return slept;
        }
        // Not a refusal of ours: sleep as asked, plus what an earlier sleep
        // of this thread's run owes (it got the flock early, and SQLite's
        // own lock then refused: see `wait::owe`).
        let owed = crate::wait::take_debt().as_micros().min(i32::MAX as u128) as c_int;
        let iv = ivfs(vfs);
        (*iv).xSleep.map_or(0, |m| m(iv, us.saturating_add(owed)))
    })
}

unsafe extern "C" fn v_current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    // SAFETY: delegation.
    guard(ffi::SQLITE_ERROR, || unsafe {
        let iv = ivfs(vfs);
        (*iv).xCurrentTime.map_or(ffi::SQLITE_ERROR, |m| m(iv, out))
    })
}

unsafe extern "C" fn v_get_last_error(
    vfs: *mut ffi::sqlite3_vfs,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    // SAFETY: delegation.
    guard(0, || unsafe {
        let iv = ivfs(vfs);
        (*iv).xGetLastError.map_or(0, |m| m(iv, n, out))
    })
}

unsafe extern "C" fn v_current_time_int64(vfs: *mut ffi::sqlite3_vfs, out: *mut i64) -> c_int {
    // SAFETY: delegation.
    guard(ffi::SQLITE_ERROR, || unsafe {
        let iv = ivfs(vfs);
        (*iv)
            .xCurrentTimeInt64
            .map_or(ffi::SQLITE_ERROR, |m| m(iv, out))
    })
}

unsafe extern "C" fn v_set_system_call(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    p: ffi::sqlite3_syscall_ptr,
) -> c_int {
    // SAFETY: delegation.
    guard(ffi::SQLITE_ERROR, || unsafe {
        let iv = ivfs(vfs);
        (*iv)
            .xSetSystemCall
            .map_or(ffi::SQLITE_NOTFOUND, |m| m(iv, name, p))
    })
}

unsafe extern "C" fn v_get_system_call(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
) -> ffi::sqlite3_syscall_ptr {
    // SAFETY: delegation.
    guard(None, || unsafe {
        let iv = ivfs(vfs);
        (*iv).xGetSystemCall.and_then(|m| m(iv, name))
    })
}

unsafe extern "C" fn v_next_system_call(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
) -> *const c_char {
    // SAFETY: delegation.
    guard(ptr::null(), || unsafe {
        let iv = ivfs(vfs);
        (*iv).xNextSystemCall.map_or(ptr::null(), |m| m(iv, name))
    })
}

/// The outcome of the one registration per process.
static REGISTERED: OnceLock<Result<(), (c_int, String)>> = OnceLock::new();

/// Register VFS `writelock` over the current default VFS and make it the
/// default. Idempotent: later calls return the first result and never wrap
/// `writelock` in itself.
pub(crate) fn register_vfs() -> Result<(), (c_int, String)> {
    REGISTERED
        .get_or_init(|| {
            // SAFETY: plain SQLite API calls; the struct we register is leaked
            // and so outlives every connection.
            crate::process::watch_forks();
            unsafe {
                let existing = ffi::sqlite3_vfs_find(VFS_NAME.as_ptr());
                if !existing.is_null() {
                    // Another copy of this library (a second .so file, e.g. the
                    // Python package's beside target/release's) registered it:
                    // two copies would each see the other's files as foreign.
                    return Err((
                    ffi::SQLITE_ERROR,
                    "writelock: another copy of the extension is already loaded in this process \
                     (VFS 'writelock' exists); load one copy only"
                        .to_string(),
                ));
                }
                let base = ffi::sqlite3_vfs_find(ptr::null());
                if base.is_null() {
                    return Err((
                        ffi::SQLITE_ERROR,
                        "writelock: SQLite has no default VFS to wrap".into(),
                    ));
                }
                let b = &*base;
                let v = Box::leak(Box::new(ffi::sqlite3_vfs {
                    iVersion: b.iVersion.min(3),
                    szOsFile: (INNER_OFFSET as c_int) + b.szOsFile,
                    mxPathname: b.mxPathname,
                    pNext: ptr::null_mut(),
                    zName: VFS_NAME.as_ptr(),
                    pAppData: base as *mut c_void,
                    xOpen: Some(v_open),
                    xDelete: Some(v_delete),
                    xAccess: Some(v_access),
                    xFullPathname: Some(v_full_pathname),
                    xDlOpen: Some(v_dlopen),
                    xDlError: Some(v_dlerror),
                    xDlSym: Some(v_dlsym),
                    xDlClose: Some(v_dlclose),
                    xRandomness: Some(v_randomness),
                    xSleep: Some(v_sleep),
                    xCurrentTime: Some(v_current_time),
                    xGetLastError: Some(v_get_last_error),
                    xCurrentTimeInt64: Some(v_current_time_int64),
                    xSetSystemCall: Some(v_set_system_call),
                    xGetSystemCall: Some(v_get_system_call),
                    xNextSystemCall: Some(v_next_system_call),
                }));
                let rc = ffi::sqlite3_vfs_register(v, 1);
                if rc != ffi::SQLITE_OK {
                    return Err((
                        rc,
                        format!("writelock: sqlite3_vfs_register failed with code {rc}"),
                    ));
                }
                Ok(())
            }
        })
        .clone()
}

/// The path shown for a database in reports.
pub(crate) fn display_path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
