//! The FFI shim: VFS `writelock` over the VFS that was default at load time.
//!
//! Modelled on SQLite's `ext/misc/cksumvfs.c`: thin delegation, the inner
//! `sqlite3_file` placed right after ours, one idea per method. Only files
//! opened with `SQLITE_OPEN_MAIN_DB` get our methods; journals, WAL and temp
//! files are opened straight into the inner VFS, so they *are* inner files.
//!
//! Every `extern "C"` function catches panics and maps them to an SQLite error
//! code; all lock decisions live in [`crate::protocol`].

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use libsqlite3_sys as ffi;

use crate::lockfile::{lock_path_for, DupFd, LockFile};
use crate::options::{Options, NAMES};
use crate::protocol::{Counters, Protocol, INTENT_TTL};

/// `SQLITE_FCNTL_LOCK_TIMEOUT` (sqlite3.h, 3.25+; newer than our bindings).
const SQLITE_FCNTL_LOCK_TIMEOUT: c_int = 34;

/// The VFS name users see: `file:app.db?vfs=writelock`, `writelock_status()`.
pub const VFS_NAME: &CStr = c"writelock";

/// What a main-database handle carries besides the inner file.
pub(crate) struct FileState {
    /// `<db>.lock`; `None` when no lock is needed (read-only, immutable).
    pub lock_path: Option<PathBuf>,
    /// `<db>-journal`, whose first byte tells a hot journal.
    pub journal_path: PathBuf,
    /// Whether the fail-closed error was already logged (log once per handle).
    pub logged: std::sync::atomic::AtomicBool,
    /// The protocol, or why the lock file could not be used (fail closed).
    pub lock: Result<Option<Shared>, String>,
}

/// A snapshot of one handle for `writelock_status()`.
pub(crate) struct HandleReport {
    pub lock_path: Option<PathBuf>,
    pub holding: bool,
    /// Holding by borrowing this process's own flock on `<db>.lock`.
    pub borrowed: bool,
    /// Options in force.
    pub options: Options,
    pub error: Option<String>,
    pub counters: Counters,
}

/// Our `sqlite3_file`: the base struct SQLite sees, then a pointer to our
/// state; the inner file follows at [`INNER_OFFSET`].
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    state: *mut FileState,
}

/// Where the inner `sqlite3_file` starts: after ours, 8-byte aligned.
const INNER_OFFSET: usize = (std::mem::size_of::<ShimFile>() + 7) & !7;

fn guard<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(on_panic)
}

/// A handle's protocol, shared with the thread-local write intent.
pub(crate) type Shared = Arc<Handle>;
type WeakShared = Weak<Handle>;

/// A main-db handle's lock state, the condition variable its busy-handler
/// sleep waits on while a waiter thread queues for the flock, and the one
/// that sends the waiter thread into the queue.
pub(crate) struct Handle {
    p: Mutex<Protocol<LockFile>>,
    granted: Condvar,
    work: Condvar,
}

/// An idle waiter thread stays this long for the handle's next wait before
/// it exits (so a contended handle does not start a thread per transaction).
const WAITER_LINGER: Duration = Duration::from_secs(1);

thread_local! {
    /// The handle whose last escalation on this thread was refused for the
    /// flock, and when: the busy handler's sleep that follows may wait for it.
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

fn lock_proto(h: &Handle) -> MutexGuard<'_, Protocol<LockFile>> {
    // A panic inside a lock call leaves the protocol state as it was between
    // two field updates at worst; keep serving (and failing closed) rather than abort.
    h.p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run one protocol step; write any error it hit to SQLite's log, and
/// remember a refusal for the flock so the busy handler's sleep can wait.
fn step(m: &Shared, op: impl FnOnce(&mut Protocol<LockFile>) -> c_int) -> c_int {
    let mut p = lock_proto(m);
    let rc = op(&mut p);
    let want = match (
        p.take_intent_request(),
        p.take_exclusive_request(),
        p.take_shared_request(),
    ) {
        (true, _, _) => Some(Want::Flock),
        (_, true, _) => Some(Want::Readers),
        (_, _, true) => Some(Want::Writer),
        _ => None,
    };
    if let (Some(want), ffi::SQLITE_BUSY) = (want, rc) {
        let w = Arc::downgrade(m);
        WANTS_LOCK.with(|c| *c.borrow_mut() = Some((w, Instant::now(), want)));
    }
    if let Some((code, msg)) = p.unlogged.take() {
        drop(p);
        crate::log_error(code, &msg);
    }
    rc
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
            if !state(f)
                .logged
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                crate::log_error(ffi::SQLITE_CANTOPEN, msg);
            }
            ffi::SQLITE_CANTOPEN
        }
    }
}

/// `PRAGMA writelock_…[=value]` on one handle: the value in force, or an
/// error naming the option and the cause.
fn pragma(st: &FileState, name: &str, value: Option<&str>) -> Result<String, String> {
    let Ok(Some(m)) = &st.lock else {
        // Validate all the same, so a typo is reported as such.
        let mut o = Options::default();
        if let Some(v) = value {
            o.set(name, v)?;
            return Err(format!(
                "writelock: {name} has no effect: this connection takes no write lock on this \
                 database (read-only, immutable, temporary, or a lock-file error)"
            ));
        }
        return o.get(name);
    };
    let mut p = lock_proto(m);
    if let Some(v) = value {
        if name.eq_ignore_ascii_case("writelock_allow_network_fs") {
            return Err(format!(
                "writelock: {name} applies at open only: give it as a URI parameter"
            ));
        }
        p.options.set(name, v)?;
    }
    p.options.get(name)
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
                lock_proto(m).close();
                m.work.notify_all(); // an idle waiter thread exits now
                m.granted.notify_all();
            }
            // Closes <db>.lock's descriptor (after the inner unlock), unless a
            // waiter thread still holds the state; it sees `closed` and lets go.
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
    // SAFETY: delegation with SQLite's own arguments to the inner file.
    guard(ffi::SQLITE_IOERR_READ, || unsafe {
        inner_call!(f, xRead, buf, n, off)
    })
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    n: c_int,
    off: i64,
) -> c_int {
    // SAFETY: delegation with SQLite's own arguments to the inner file.
    guard(ffi::SQLITE_IOERR_WRITE, || unsafe {
        inner_call!(f, xWrite, buf, n, off)
    })
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: delegation.
    guard(ffi::SQLITE_IOERR_TRUNCATE, || unsafe {
        inner_call!(f, xTruncate, size)
    })
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: delegation.
    guard(ffi::SQLITE_IOERR_FSYNC, || unsafe {
        inner_call!(f, xSync, flags)
    })
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, out: *mut i64) -> c_int {
    // SAFETY: delegation; `out` is SQLite's.
    guard(ffi::SQLITE_IOERR_FSTAT, || unsafe {
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
                lock_proto(m).shm_mapped();
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
            // A refused checkpoint queues for the flock (bounded), then retries.
            let Ok(Some(h)) = &state(f).lock else {
                return rc;
            };
            let Some(patience) = lock_proto(h).take_checkpoint_wait() else {
                return rc;
            };
            if patience.is_zero() || wait_for_lock(h, patience, false) != Some(true) {
                return rc;
            }
            step(h, op)
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
                lock_proto(m).shm_unmap();
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
    let (holding, borrowed, error, counters, options) = match &st.lock {
        Ok(Some(m)) => {
            let p = lock_proto(m);
            let borrowed = p.flock().is_borrowed();
            (
                p.holds(),
                borrowed,
                p.last_error.clone(),
                p.counters,
                p.options,
            )
        }
        Ok(None) => (false, false, None, Counters::default(), Options::default()),
        Err(e) => (
            false,
            false,
            Some(e.clone()),
            Counters::default(),
            Options::default(),
        ),
    };
    Some(HandleReport {
        lock_path: st.lock_path.clone(),
        holding,
        borrowed,
        options,
        error,
        counters,
    })
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

/// Options from the URI parameters of a main-db filename.
///
/// # Safety
/// `name` is a non-NULL main-db filename as SQLite passes it to xOpen.
unsafe fn uri_options(name: *const c_char) -> Result<Options, String> {
    let mut o = Options::from_env()?;
    for key in NAMES {
        let k = std::ffi::CString::new(key).expect("no NUL in option names");
        let v = ffi::sqlite3_uri_parameter(name, k.as_ptr());
        if !v.is_null() {
            o.set(key, &CStr::from_ptr(v).to_string_lossy())?;
        }
    }
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
            if flags & ffi::SQLITE_OPEN_MAIN_DB == 0 {
                // Journals, WAL, temp files: the outer buffer becomes the inner file.
                return open(iv, name, f, flags, out_flags);
            }
            let sf = f as *mut ShimFile;
            (*sf).base.pMethods = ptr::null();
            (*sf).state = ptr::null_mut();
            let fi = inner(f);
            (*fi).pMethods = ptr::null();
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
            let db_path = if name.is_null() {
                PathBuf::new()
            } else {
                PathBuf::from(OsStr::from_bytes(CStr::from_ptr(name).to_bytes()))
            };
            let (lock_path, lock) = if needs_lock_file(name, oflags) {
                let lp = lock_path_for(&db_path);
                let lock = match uri_options(name).and_then(|o| {
                    crate::netfs::check(&db_path, o.allow_network_fs)?;
                    LockFile::open(&db_path)
                        .map(|lf| (o, lf))
                        .map_err(|e| e.to_string())
                }) {
                    Ok((options, lf)) => {
                        let mut p = Protocol::new(lf);
                        p.options = options;
                        p.label = db_path.to_string_lossy().into_owned();
                        Ok(Some(Arc::new(Handle {
                            p: Mutex::new(p),
                            granted: Condvar::new(),
                            work: Condvar::new(),
                        })))
                    }
                    Err(e) => {
                        // Fail closed: the handle opens (so the connection can
                        // report this message) but refuses every lock.
                        crate::log_error(ffi::SQLITE_CANTOPEN, &e);
                        Err(e)
                    }
                };
                (Some(lp), lock)
            } else {
                (None, Ok(None))
            };
            // Expose exactly what the inner file has: no xShm* without xShmMap.
            let m = im(f);
            let version = if m.xShmMap.is_none() {
                1
            } else {
                m.iVersion.clamp(1, 3)
            };
            let mut journal = db_path.clone().into_os_string();
            journal.push("-journal");
            (*sf).state = Box::into_raw(Box::new(FileState {
                lock_path,
                journal_path: PathBuf::from(journal),
                logged: std::sync::atomic::AtomicBool::new(false),
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
    // SAFETY: delegation to the inner VFS.
    guard(ffi::SQLITE_IOERR_DELETE, || unsafe {
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

/// The write-intent wait (issue 7). SQLite's busy handler sleeps through the
/// connection's VFS *after* the connection released its locks. If the
/// refusal it is sleeping for was ours, the sleep instead waits — blocked,
/// not polling — for a waiter thread that queues in `flock(LOCK_EX)` on a
/// duplicate of the handle's descriptor; the lock it gets belongs to the
/// handle's open file description, and is kept as a write intent for the
/// retry, which then succeeds at once. Only while the handle holds nothing a
/// writer needs. How long: see [`Run`].
fn sleep_for_lock(us: c_int) -> Option<c_int> {
    let (w, at, want) = WANTS_LOCK.with(|c| c.borrow_mut().take())?;
    if at.elapsed() > INTENT_FRESH {
        return None;
    }
    let h = w.upgrade()?;
    let (queue, ahead) = {
        let p = lock_proto(&h);
        (p.options.queue, p.options.queue_ahead)
    };
    if !queue {
        return None;
    }
    let start = Instant::now();
    let deadline = Run::deadline(start, Duration::from_micros(us.max(0) as u64), ahead);
    let granted = match want {
        Want::Flock => wait_for_lock(&h, deadline - start, true),
        Want::Readers => Some(wait_for_readers(&h, deadline)),
        Want::Writer => Some(wait_for_writer(&h, deadline)),
    };
    Run::ended(granted == Some(true), Instant::now());
    granted?;
    Some(start.elapsed().as_micros().min(c_int::MAX as u128) as c_int)
}

/// One busy handler's run of sleeps for a refused lock. SQLite counts the
/// *requested* sleeps against `busy_timeout`, so a wait longer than asked
/// stretches it; but its first steps are short (1, 2, 5, 10 ms …), and
/// ending each on time means a retry that fails again while the queue moves.
/// So a sleep waits at least what was asked and at most until the run's
/// start plus everything requested so far plus `writelock_queue_ahead_ms`
/// (25 ms): the whole run never exceeds the busy timeout by more than that,
/// and most queued writers are served inside the first sleep.
#[derive(Clone, Copy)]
struct Run {
    start: Instant,
    requested: Duration,
    last_end: Instant,
}

/// Sleeps closer together than this belong to one run (the retry between
/// two sleeps of one busy handler takes microseconds).
const RUN_JOIN: Duration = Duration::from_millis(5);

thread_local! {
    static RUN: std::cell::Cell<Option<Run>> = const { std::cell::Cell::new(None) };
}

impl Run {
    /// The deadline of a sleep of `asked` starting `now`, counted into this
    /// thread's current run (or a new one).
    fn deadline(now: Instant, asked: Duration, ahead: Duration) -> Instant {
        let mut run = match RUN.get() {
            Some(r) if now.saturating_duration_since(r.last_end) < RUN_JOIN => r,
            _ => Run {
                start: now,
                requested: Duration::ZERO,
                last_end: now,
            },
        };
        run.requested += asked;
        RUN.set(Some(run));
        (run.start + run.requested + ahead).max(now + asked)
    }

    /// A sleep ended at `now`; a granted lock ends the run.
    fn ended(granted: bool, now: Instant) {
        let run = RUN.get().filter(|_| !granted).map(|mut r| {
            r.last_end = now;
            r
        });
        RUN.set(run);
    }
}

/// Check `done` every `every` until it holds (`true`) or `deadline` passes
/// (`false`).
fn poll_until(deadline: Instant, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep((deadline - now).min(every));
    }
}

/// A RESERVED writer whose EXCLUSIVE waits for readers: instead of sleeping
/// SQLite's whole backoff step, check every 200 us whether they are gone
/// (only the one flock holder can be here, and new readers are held off by
/// its pending marker), up to `deadline`. It holds RESERVED and the flock
/// meanwhile, exactly as in SQLite's own sleep. Whether they are gone.
fn wait_for_readers(h: &Shared, deadline: Instant) -> bool {
    poll_until(deadline, Duration::from_micros(200), || {
        lock_proto(h).try_shadow_write()
    })
}

/// A reader held off by a writer that waits for or holds EXCLUSIVE: check
/// every 100 us whether it is done, up to `deadline`, instead of SQLite's
/// growing backoff, whose 10–100 ms steps miss the short gaps between queued
/// writers' commits and starve readers. The handle holds no lock meanwhile
/// (its SHARED was refused). Whether the writer is done.
fn wait_for_writer(h: &Shared, deadline: Instant) -> bool {
    poll_until(deadline, Duration::from_micros(100), || {
        !lock_proto(h).read_blocked()
    })
}

/// Queue for the flock for at most `dur`, holding it as a write intent when
/// granted. `None` when waiting is not safe or possible now (the caller then
/// behaves as without the queue), else whether the lock was granted.
/// `retry_follows`: a busy handler retries right after its sleep, so a grant
/// just after a timed-out wait is still wanted; a checkpoint gives up.
fn wait_for_lock(h: &Shared, dur: Duration, retry_follows: bool) -> Option<bool> {
    let mut p = lock_proto(h);
    if p.has_pure_intent() {
        return Some(true); // granted between the last attempt and this wait
    }
    if !p.may_wait() {
        return None;
    }
    match p.try_intent() {
        Ok(true) => return Some(true),
        Ok(false) => {}
        Err(_) => return None,
    }
    if !p.waiter_running {
        let dup = p.flock().duplicate().ok()?;
        let h2 = Arc::clone(h);
        let spawned = std::thread::Builder::new()
            .name("writelock-wait".into())
            .spawn(move || waiter(h2, dup));
        if spawned.is_err() {
            return None;
        }
        p.waiter_running = true;
    }
    if !p.waiter_queued {
        p.queue_wanted = true;
        h.work.notify_all();
    }
    p.sleepers += 1;
    let (mut p, _) = h
        .granted
        .wait_timeout_while(p, dur, |p| !p.holds() && !p.closed)
        .unwrap_or_else(|e| e.into_inner());
    p.sleepers -= 1;
    let granted = p.holds();
    p.counters.queued += 1;
    p.counters.queue_granted += u64::from(granted);
    if retry_follows {
        p.last_sleep_end = Some(Instant::now());
    }
    Some(granted)
}

/// The queueing thread of one handle. Asked to (`queue_wanted`), it blocks
/// in `flock(LOCK_EX)` on a duplicate of the handle's descriptor (same open
/// file description), then hands the lock to a sleeping busy handler as a
/// write intent — or, when nobody wants it any more, releases it. While the
/// intent is unused it stays as a watchdog and drops it after `INTENT_TTL`,
/// so a connection the application stopped using never keeps the lock. It
/// then waits up to [`WAITER_LINGER`] for the handle's next wait, and exits
/// when there is none or the handle closes.
fn waiter(h: Shared, dup: DupFd) {
    loop {
        {
            let p = lock_proto(&h);
            let (mut p, idle) = h
                .work
                .wait_timeout_while(p, WAITER_LINGER, |p| !p.queue_wanted && !p.closed)
                .unwrap_or_else(|e| e.into_inner());
            if p.closed || idle.timed_out() {
                p.waiter_running = false;
                return;
            }
            p.queue_wanted = false;
            p.waiter_queued = true;
        }
        // A blocking flock with no timeout is what makes this a queue; the
        // thread is the only thing that waits, and it always ends by deciding.
        let got = dup.lock_exclusive();
        let mut p = lock_proto(&h);
        p.waiter_queued = false;
        if got.is_err() {
            p.waiter_running = false;
            return;
        }
        if p.holds() {
            if p.flock().is_borrowed() {
                // The handle borrows the application's lock, so this grant
                // (which came after the application let go) is nobody's.
                dup.unlock();
            }
            continue; // else the handle took it already (same description)
        }
        let wanted = p.sleepers > 0 || p.last_sleep_end.is_some_and(|t| t.elapsed() < INTENT_FRESH);
        if p.closed || !wanted || !p.may_wait() || p.try_intent() != Ok(true) {
            p.release_unowned();
            continue;
        }
        // Notify with the mutex released, so the woken sleeper does not
        // wake only to block on it.
        drop(p);
        h.granted.notify_all();
        let mut p = lock_proto(&h);
        let deadline = Instant::now() + INTENT_TTL;
        while p.has_pure_intent() && !p.queue_wanted {
            let now = Instant::now();
            if now >= deadline {
                p.drop_intent();
                break;
            }
            p = h
                .work
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

unsafe extern "C" fn v_sleep(vfs: *mut ffi::sqlite3_vfs, us: c_int) -> c_int {
    // SAFETY: delegation when there is no write intent to serve.
    guard(0, || unsafe {
        if let Some(slept) = sleep_for_lock(us) {
            return slept;
        }
        let iv = ivfs(vfs);
        (*iv).xSleep.map_or(0, |m| m(iv, us))
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// SQLite's default busy handler (sqliteDefaultBusyCallback) asks for
    /// these sleeps, then 100 ms each, until busy_timeout is used up.
    fn schedule(timeout_ms: u64) -> Vec<Duration> {
        let steps = [1u64, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100];
        let (mut out, mut total) = (Vec::new(), 0);
        for i in 0.. {
            let d = steps.get(i).copied().unwrap_or(100).min(timeout_ms - total);
            if d == 0 {
                break;
            }
            total += d;
            out.push(Duration::from_millis(d));
        }
        out
    }

    #[test]
    fn a_run_waits_at_least_what_was_asked_and_exceeds_busy_timeout_by_at_most_ahead() {
        for timeout in [1u64, 30, 300, 5000] {
            for ahead in [Duration::ZERO, 25 * MS, 100 * MS] {
                RUN.set(None);
                let t0 = Instant::now();
                let (mut now, mut retries) = (t0, Duration::ZERO);
                for asked in schedule(timeout) {
                    let end = Run::deadline(now, asked, ahead);
                    assert!(end >= now + asked, "never less than asked");
                    now = end; // never granted: each sleep runs to its deadline
                    Run::ended(false, now);
                    let retry = Duration::from_micros(20); // between two sleeps
                    now += retry;
                    retries += retry;
                }
                let waited = now - t0;
                // SQLite's own loop takes its retries on top of busy_timeout too.
                let bound = Duration::from_millis(timeout) + ahead + retries;
                assert!(waited <= bound, "{timeout} ms, ahead {ahead:?}: {waited:?}");
                assert!(
                    waited >= Duration::from_millis(timeout),
                    "{timeout} ms: {waited:?}"
                );
            }
        }
    }

    #[test]
    fn a_grant_ends_the_run_and_a_later_sleep_starts_a_new_one() {
        RUN.set(None);
        let t0 = Instant::now();
        assert_eq!(Run::deadline(t0, MS, 25 * MS), t0 + 26 * MS);
        Run::ended(true, t0 + 3 * MS);
        assert!(RUN.get().is_none());
        let t1 = t0 + 4 * MS;
        assert_eq!(Run::deadline(t1, MS, 25 * MS), t1 + 26 * MS);
        // Long after a run's last sleep, a new run starts too.
        Run::ended(false, t1 + 26 * MS);
        let t2 = t1 + 26 * MS + RUN_JOIN;
        assert_eq!(Run::deadline(t2, 2 * MS, 25 * MS), t2 + 27 * MS);
    }
}
