//! Our `sqlite3_file`s: the layout, the one unsafe way to get at one, and
//! the io methods of main databases. Each method does one thing on top of
//! delegating to the inner file: the lock methods run the protocol, the
//! writing methods stop a checkpoint that has not got the flock (and a
//! connection inherited through `fork()`), `xFileControl` answers our PRAGMAs
//! and names the VFS.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use libsqlite3_sys as ffi;
use writelock_core::lockfile::{LockCounters, LockFile};
use writelock_core::options::{Options, Source};
use writelock_core::protocol::{Counters, Protocol, Refusal};

use super::edge::{self, code, inner, Shared};
use super::guard;

/// `SQLITE_FCNTL_LOCK_TIMEOUT` (sqlite3.h, 3.25+; newer than our bindings).
const SQLITE_FCNTL_LOCK_TIMEOUT: c_int = 34;

/// Our `sqlite3_file`: the base struct SQLite sees and what we keep; the
/// inner file follows at [`INNER_OFFSET`].
#[repr(C)]
pub(super) struct ShimFile {
    pub base: ffi::sqlite3_file,
    /// A main database's state (NULL for other files).
    pub state: *mut FileState,
    /// Another file's name as SQLite passed it to xOpen, valid until xClose
    /// (NULL for main databases and nameless temporary files).
    pub name: *const c_char,
    /// The process that opened it.
    pub pid: u32,
    /// Its `SQLITE_OPEN_…` kind flag.
    pub kind: c_int,
}

/// Where the inner `sqlite3_file` starts: after ours, 8-byte aligned.
pub(super) const INNER_OFFSET: usize = (std::mem::size_of::<ShimFile>() + 7) & !7;

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

/// A file of ours, as SQLite hands it to our methods: the only way the io
/// methods get at the struct, the state and the inner file.
#[derive(Clone, Copy)]
pub(super) struct Ours(*mut ffi::sqlite3_file);

impl Ours {
    /// # Safety
    /// `f` was opened by our `xOpen` and not closed yet: SQLite allocated
    /// `szOsFile` bytes for it (ours, then the inner file at
    /// [`INNER_OFFSET`]), and `state` is NULL or a live box.
    pub unsafe fn new(f: *mut ffi::sqlite3_file) -> Ours {
        Ours(f)
    }

    /// Start an xOpen: clear our part of the buffer (a failed open leaves
    /// `pMethods` NULL) and note the name, the opening process and the kind.
    ///
    /// # Safety
    /// `f` is the buffer SQLite passes to our xOpen (`szOsFile` bytes), and
    /// `name` stays valid until xClose.
    pub unsafe fn init(f: *mut ffi::sqlite3_file, name: *const c_char, flags: c_int) -> Ours {
        // SAFETY: per the caller, INNER_OFFSET bytes are ours to write.
        unsafe {
            ptr::write_bytes(f as *mut u8, 0, INNER_OFFSET);
            let sf = f as *mut ShimFile;
            (*sf).name = name;
            (*sf).pid = writelock_core::process::pid();
            (*sf).kind = flags & super::side::OPEN_KINDS;
        }
        Ours(f)
    }

    /// Give a main database its state (xClose takes it back); the methods
    /// to install: exactly what the inner file has (no xShm* without
    /// xShmMap).
    pub fn attach(self, state: FileState) -> &'static ffi::sqlite3_io_methods {
        // SAFETY: our struct, not yet seen by SQLite (pMethods is NULL).
        unsafe { (*self.shim_mut()).state = Box::into_raw(Box::new(state)) };
        let m = self.methods();
        let v = if m.xShmMap.is_none() {
            1
        } else {
            m.iVersion.clamp(1, 3)
        };
        &METHODS[(v - 1) as usize]
    }

    /// Finish an xOpen: SQLite calls `methods` on this file from now on.
    ///
    /// # Safety
    /// The inner file is open, and `methods` suit this file's kind.
    pub unsafe fn set_methods(self, methods: &'static ffi::sqlite3_io_methods) {
        // SAFETY: per the caller; our struct's first field.
        unsafe { (*self.0).pMethods = methods };
    }

    /// Our struct, to write (xOpen fills it, xClose takes the state back).
    pub fn shim_mut(&self) -> *mut ShimFile {
        self.0 as *mut ShimFile
    }

    pub fn shim(&self) -> &ShimFile {
        // SAFETY: per `new`, `self.0` points to our live ShimFile.
        unsafe { &*(self.0 as *const ShimFile) }
    }

    /// The main database's state (None for other files).
    pub fn state(&self) -> Option<&FileState> {
        // SAFETY: `state` is NULL or set by xOpen from a box that stays
        // valid until xClose takes it back.
        unsafe { self.shim().state.as_ref() }
    }

    /// The inner file.
    pub fn inner(&self) -> *mut ffi::sqlite3_file {
        // SAFETY: per `new`, the allocation is INNER_OFFSET + the inner
        // size long, so the offset stays inside it.
        unsafe { (self.0 as *mut u8).add(INNER_OFFSET) as *mut ffi::sqlite3_file }
    }

    /// The inner file's methods (it was opened successfully: every file
    /// with our methods has an inner file with its own).
    pub fn methods(&self) -> &'static ffi::sqlite3_io_methods {
        // SAFETY: the inner open succeeded, so pMethods points to the inner
        // VFS's static table.
        unsafe { &*(*self.inner()).pMethods }
    }

    /// Whether it was opened in another process (inherited through `fork()`).
    pub fn inherited(&self) -> bool {
        writelock_core::process::forked() && self.shim().pid != writelock_core::process::pid()
    }

    /// The lock state of a main database with one.
    pub fn handle(&self) -> Option<&Shared> {
        match &self.state()?.lock {
            Ok(Some(m)) => Some(m),
            _ => None,
        }
    }
}

/// Call an inner method that SQLite guarantees for this `iVersion`.
macro_rules! inner_call {
    ($f:expr, $m:ident $(, $arg:expr)*) => {
        match $f.methods().$m {
            // SAFETY: the inner VFS's own method on its own file, with
            // SQLite's arguments passed through unchanged.
            Some(m) => unsafe { m($f.inner() $(, $arg)*) },
            None => ffi::SQLITE_IOERR,
        }
    };
}
pub(super) use inner_call;

/// Run a protocol call when the file has a lock state; `pass` otherwise;
/// fail closed (`SQLITE_CANTOPEN`, logged once) when its lock file could
/// not be used.
fn with_proto(
    f: Ours,
    io_err: c_int,
    pass: impl FnOnce() -> c_int,
    op: impl FnOnce(&mut Protocol<LockFile>) -> Result<(), Refusal<c_int>>,
) -> c_int {
    let Some(st) = f.state() else {
        return pass();
    };
    match &st.lock {
        Ok(None) => pass(),
        Ok(Some(m)) => code(edge::step(m, op), io_err),
        Err(msg) => {
            if !st.logged.swap(true, Ordering::Relaxed) {
                crate::log_error(ffi::SQLITE_CANTOPEN, msg);
            }
            ffi::SQLITE_CANTOPEN
        }
    }
}

/// Before a write, truncate or sync of the database file: a connection
/// inherited through `fork()` never writes (the lock it may believe it holds
/// is its parent's), and a checkpoint that holds the checkpoint lock without
/// the flock must take it first or is refused (`SQLITE_BUSY`). One relaxed
/// load otherwise.
fn may_write(f: Ours, io_err: c_int) -> c_int {
    if f.inherited() {
        return io_err;
    }
    match f.handle() {
        Some(m) if m.ckpt_unlocked.load(Ordering::Relaxed) => code(
            edge::step(m, |p| p.checkpoint_write().map_err(|_| Refusal::Busy)),
            io_err,
        ),
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
    // SAFETY: SQLite calls xClose once, on a file of ours.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_CLOSE, || {
        let rc = inner_call!(f, xClose);
        // SAFETY: we own the box (set by xOpen); SQLite never uses the file
        // again after xClose, so nothing else reads `state` from now on.
        let st = unsafe {
            Box::from_raw(std::mem::replace(
                &mut (*f.shim_mut()).state,
                ptr::null_mut(),
            ))
        };
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
    })
}

unsafe extern "C" fn x_read(
    f: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    n: c_int,
    off: i64,
) -> c_int {
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_READ, || {
        if f.state().is_some_and(|s| s.not_regular) {
            // Read as empty (a FIFO would fail the read, a device give
            // anything): the open then reaches the check that names the
            // path, and nothing is read from it.
            // SAFETY: `buf` is SQLite's buffer of `n` bytes.
            unsafe { ptr::write_bytes(buf as *mut u8, 0, n.max(0) as usize) };
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
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_WRITE, || {
        match may_write(f, ffi::SQLITE_IOERR_WRITE) {
            ffi::SQLITE_OK => inner_call!(f, xWrite, buf, n, off),
            rc => rc,
        }
    })
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_TRUNCATE, || {
        match may_write(f, ffi::SQLITE_IOERR_TRUNCATE) {
            ffi::SQLITE_OK => inner_call!(f, xTruncate, size),
            rc => rc,
        }
    })
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_FSYNC, || {
        match may_write(f, ffi::SQLITE_IOERR_FSYNC) {
            ffi::SQLITE_OK => inner_call!(f, xSync, flags),
            rc => rc,
        }
    })
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, out: *mut i64) -> c_int {
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_FSTAT, || {
        if f.state().is_some_and(|s| s.not_regular) {
            // SAFETY: `out` is SQLite's, valid for one i64.
            unsafe { *out = 0 };
            return ffi::SQLITE_OK;
        }
        inner_call!(f, xFileSize, out)
    })
}

unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, l: c_int) -> c_int {
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_LOCK, || {
        let inner_lock = || inner_call!(f, xLock, l);
        with_proto(f, ffi::SQLITE_IOERR_LOCK, inner_lock, |p| {
            p.lock(edge::level(l), || inner(inner_lock()))
        })
    })
}

unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, l: c_int) -> c_int {
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_UNLOCK, || match f.handle() {
        // Inherited through fork(): unlock all the way. A downgrade to
        // SHARED would *take* a POSIX read lock for this child, which holds
        // none of its parent's, and keep writers out while the child lives.
        Some(m) if m.inherited_from().is_some() => {
            inner_call!(f, xUnlock, ffi::SQLITE_LOCK_NONE)
        }
        // Unlocking never fails closed: a handle whose lock file is unusable
        // never got past xLock, so there is nothing to release.
        Some(m) => code(
            edge::step(m, |p| {
                p.unlock(edge::level(l), || inner(inner_call!(f, xUnlock, l)))
            }),
            ffi::SQLITE_IOERR_UNLOCK,
        ),
        None => inner_call!(f, xUnlock, l),
    })
}

unsafe extern "C" fn x_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_CHECKRESERVEDLOCK, || {
        let ask_inner = || {
            let mut r: c_int = 0;
            inner(inner_call!(f, xCheckReservedLock, &mut r)).map(|()| r != 0)
        };
        let res = std::cell::Cell::new(false);
        let rc = with_proto(
            f,
            ffi::SQLITE_IOERR_CHECKRESERVEDLOCK,
            || match ask_inner() {
                Ok(r) => {
                    res.set(r);
                    ffi::SQLITE_OK
                }
                Err(rc) => rc,
            },
            |p| {
                let journal = f
                    .state()
                    .map(|s| s.journal_path.clone())
                    .unwrap_or_default();
                res.set(p.check_reserved(ask_inner, || looks_hot(&journal))?);
                Ok(())
            },
        );
        // SAFETY: `out` is SQLite's, valid for one int.
        unsafe { *out = res.get() as c_int };
        rc
    })
}

unsafe extern "C" fn x_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR, || match op {
        // Builds with SQLITE_ENABLE_SETLK_TIMEOUT take the WAL write lock
        // before any read lock once blocking locks are enabled, which this
        // shim would take for WAL recovery. Say "not supported" on protected
        // handles, so SQLite keeps the ordinary order.
        SQLITE_FCNTL_LOCK_TIMEOUT if f.handle().is_some() => ffi::SQLITE_NOTFOUND,
        // A checkpoint about to grow the file (with mmap on, the unix VFS
        // extends it here): only with the flock. It is a hint: dropping it
        // is harmless.
        ffi::SQLITE_FCNTL_SIZE_HINT
            if may_write(f, ffi::SQLITE_IOERR_TRUNCATE) != ffi::SQLITE_OK =>
        {
            ffi::SQLITE_OK
        }
        // SAFETY: for this op SQLite passes `char**` to a string it owns.
        ffi::SQLITE_FCNTL_VFSNAME => unsafe { vfs_name(f, arg as *mut *mut c_char) },
        // SAFETY: for this op SQLite passes `char*[3]`: [0] result/error
        // out, [1] the name, [2] the value or NULL.
        ffi::SQLITE_FCNTL_PRAGMA => unsafe { pragma_control(f, arg as *mut *mut c_char) },
        _ => inner_call!(f, xFileControl, op, arg),
    })
}

/// `SQLITE_FCNTL_VFSNAME`: `writelock/<inner>`, as cksumvfs and vfstrace
/// name themselves in front of the VFS they wrap.
///
/// # Safety
/// `out` is the `char**` SQLite passed with this op.
unsafe fn vfs_name(f: Ours, out: *mut *mut c_char) -> c_int {
    let rc = inner_call!(
        f,
        xFileControl,
        ffi::SQLITE_FCNTL_VFSNAME,
        out as *mut c_void
    );
    // SAFETY: per the caller. Only a successful inner call wrote a string
    // (from sqlite3_malloc) there, which we free after copying; otherwise
    // `*out` is whatever the caller left, neither read nor freed.
    unsafe {
        let below = if rc == ffi::SQLITE_OK {
            let b = (*out)
                .as_ref()
                .map(|p| CStr::from_ptr(p).to_string_lossy().into_owned());
            if !(*out).is_null() {
                ffi::sqlite3_free(*out as *mut c_void);
            }
            b
        } else {
            None
        };
        let name = match below {
            Some(b) => format!("writelock/{b}"),
            None => "writelock".into(),
        };
        *out = crate::sqlite_strdup(&name);
    }
    if rc == ffi::SQLITE_NOTFOUND {
        ffi::SQLITE_OK
    } else {
        rc
    }
}

/// `SQLITE_FCNTL_PRAGMA`: answer `writelock_…` PRAGMAs, pass the rest on.
///
/// # Safety
/// `a` is the `char*[3]` SQLite passed with this op.
unsafe fn pragma_control(f: Ours, a: *mut *mut c_char) -> c_int {
    // SAFETY: per the caller, [1] is the name and [2] the value or NULL.
    let (name, value) = unsafe {
        let v = *a.add(2);
        (
            CStr::from_ptr(*a.add(1)).to_string_lossy().into_owned(),
            (!v.is_null()).then(|| CStr::from_ptr(v).to_string_lossy().into_owned()),
        )
    };
    let Some(st) = f.state().filter(|_| Options::owns(&name)) else {
        return inner_call!(f, xFileControl, ffi::SQLITE_FCNTL_PRAGMA, a as *mut c_void);
    };
    let (rc, msg) = match pragma(st, &name, value.as_deref()) {
        Ok(v) => (ffi::SQLITE_OK, v),
        Err(e) => (ffi::SQLITE_ERROR, e),
    };
    // SAFETY: [0] is the result slot, which SQLite frees with sqlite3_free.
    unsafe { *a = crate::sqlite_strdup(&msg) };
    rc
}

unsafe extern "C" fn x_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(4096, || match f.methods().xSectorSize {
        // SAFETY: the inner method on the inner file.
        Some(m) => unsafe { m(f.inner()) },
        None => 4096,
    })
}

unsafe extern "C" fn x_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(0, || match f.methods().xDeviceCharacteristics {
        // SAFETY: the inner method on the inner file.
        Some(m) => unsafe { m(f.inner()) },
        None => 0,
    })
}

unsafe extern "C" fn x_shm_map(
    f: *mut ffi::sqlite3_file,
    pg: c_int,
    pgsz: c_int,
    extend: c_int,
    pp: *mut *mut c_void,
) -> c_int {
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_SHMMAP, || {
        let rc = inner_call!(f, xShmMap, pg, pgsz, extend, pp);
        if let (ffi::SQLITE_OK, Some(m)) = (rc, f.handle()) {
            if m.inherited_from().is_none() {
                m.lock().p.shm_mapped();
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
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_SHMLOCK, || {
        let io = ffi::SQLITE_IOERR_SHMLOCK;
        let inner_lock = || inner_call!(f, xShmLock, ofst, n, flags);
        let op = |p: &mut Protocol<LockFile>| {
            p.shm_lock(edge::shm_op(ofst, n, flags), || inner(inner_lock()))
        };
        let rc = with_proto(f, io, inner_lock, op);
        if rc != ffi::SQLITE_BUSY {
            return rc;
        }
        // A refused checkpoint queues for the flock (bounded), then
        // retries; still refused, it goes on without the flock.
        let Some(h) = f.handle() else { return rc };
        let Some(patience) = h.lock().p.take_checkpoint_wait() else {
            return rc;
        };
        let deadline = Instant::now() + patience;
        if !patience.is_zero() && writelock_core::wait::for_flock(h, deadline) == Some(true) {
            return code(edge::step(h, op), io);
        }
        let slots = match edge::shm_op(ofst, n, flags) {
            writelock_core::protocol::ShmOp::Lock(s, _) => s,
            writelock_core::protocol::ShmOp::Unlock(s, _) => s,
        };
        code(
            edge::step(h, |p| {
                p.checkpoint_without_flock(slots, || inner(inner_lock()))
            }),
            io,
        )
    })
}

unsafe extern "C" fn x_shm_barrier(f: *mut ffi::sqlite3_file) {
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard((), || {
        if let Some(m) = f.methods().xShmBarrier {
            // SAFETY: the inner method on the inner file.
            unsafe { m(f.inner()) }
        }
    })
}

unsafe extern "C" fn x_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_SHMMAP, || {
        let rc = inner_call!(f, xShmUnmap, delete);
        // All shared-memory locks go with the mapping.
        if let Some(m) = f.handle().filter(|m| m.inherited_from().is_none()) {
            m.lock().p.shm_unmap();
        }
        rc
    })
}

unsafe extern "C" fn x_fetch(
    f: *mut ffi::sqlite3_file,
    off: i64,
    n: c_int,
    pp: *mut *mut c_void,
) -> c_int {
    // SAFETY: SQLite calls our io methods on our files only (this one only
    // in tables of iVersion 3, like the inner's).
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_READ, || {
        inner_call!(f, xFetch, off, n, pp)
    })
}

unsafe extern "C" fn x_unfetch(f: *mut ffi::sqlite3_file, off: i64, p: *mut c_void) -> c_int {
    // SAFETY: SQLite calls our io methods on our files only.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_READ, || inner_call!(f, xUnfetch, off, p))
}

pub(super) const fn methods(version: c_int) -> ffi::sqlite3_io_methods {
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
pub(super) static METHODS: [ffi::sqlite3_io_methods; 3] = [methods(1), methods(2), methods(3)];

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

/// Report on a main-db file of SQLite's, or `None` if it is not ours.
///
/// # Safety
/// `f` is NULL or an open `sqlite3_file` of a connection the caller is inside.
pub(crate) unsafe fn report(f: *mut ffi::sqlite3_file) -> Option<HandleReport> {
    // SAFETY: per the caller, `f` is NULL or an open file; reading its
    // methods pointer is what SQLite itself does.
    let ours = !f.is_null() && unsafe { METHODS.iter().any(|t| ptr::eq(t, (*f).pMethods)) };
    if !ours {
        return None;
    }
    // SAFETY: its methods are ours, so we opened it (a main database).
    let f = unsafe { Ours::new(f) };
    let st = f.state()?;
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
