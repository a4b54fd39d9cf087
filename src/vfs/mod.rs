//! VFS `writelock`: a shim over the VFS that was default at load time.
//!
//! Modelled on SQLite's `ext/misc/cksumvfs.c`: thin delegation, the inner
//! `sqlite3_file` placed right after ours, one idea per method. Main
//! databases get the lock methods ([`file`]); journals, WAL and temporary
//! files only the fork check ([`side`]). C ints become typed values in
//! [`edge`] and nowhere else; every decision lives in `writelock_core`.
//!
//! Every `extern "C"` function catches panics ([`guard`]) and maps them to an
//! SQLite error code; `unsafe` blocks are as narrow as the pointer they
//! dereference, each with the reason it is sound.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use libsqlite3_sys as ffi;
use writelock_core::lockfile::{kind_of, lock_path_for, LockFile};
use writelock_core::options::{self, Options};
use writelock_core::protocol::Protocol;
use writelock_core::wait::Handle;

mod edge;
mod file;
mod side;

pub(crate) use file::{report, HandleReport};

use file::{FileState, Ours, INNER_OFFSET};

/// The VFS name users see: `file:app.db?vfs=writelock`, `writelock_status()`.
pub const VFS_NAME: &CStr = c"writelock";

/// Run `f`, turning a panic into `on_panic`: no panic crosses into C.
pub(crate) fn guard<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(on_panic)
}

/// A main database's name as xOpen gets it: the path, its URI parameters
/// (`key\0value\0` pairs after the name's NUL, ended by an empty key — the
/// layout `sqlite3_uri_parameter` walks), and whether it is `immutable`.
struct MainName {
    path: PathBuf,
    params: Vec<(String, String)>,
    immutable: bool,
}

impl MainName {
    /// # Safety
    /// `name` is NULL or a main-db filename as SQLite passes it to xOpen.
    unsafe fn read(name: *const c_char) -> MainName {
        if name.is_null() {
            return MainName {
                path: PathBuf::new(),
                params: Vec::new(),
                immutable: false,
            };
        }
        let mut params = Vec::new();
        // SAFETY: per the caller, `name` is NUL-terminated and followed by
        // NUL-terminated key/value strings ending with an empty one.
        let path = unsafe {
            let n = CStr::from_ptr(name);
            let mut p = name.add(n.to_bytes().len() + 1);
            while *p != 0 {
                let k = CStr::from_ptr(p);
                p = p.add(k.to_bytes().len() + 1);
                let v = CStr::from_ptr(p);
                p = p.add(v.to_bytes().len() + 1);
                params.push((
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                ));
            }
            use std::os::unix::ffi::OsStrExt;
            PathBuf::from(std::ffi::OsStr::from_bytes(n.to_bytes()))
        };
        // SAFETY: as above; SQLite's own reading of a boolean parameter.
        let immutable = unsafe { ffi::sqlite3_uri_boolean(name, c"immutable".as_ptr(), 0) } != 0;
        MainName {
            path,
            params,
            immutable,
        }
    }
}

/// Unknown `WRITELOCK_…` variables are warned about once per process.
static ENV_WARNED: AtomicBool = AtomicBool::new(false);

impl FileState {
    /// What a main database needs, decided once at open: a lock state when
    /// the connection may write, or why it cannot have one (fail closed: the
    /// connection opens and reports the reason, every lock is refused).
    fn open(name: &MainName, read_only: bool) -> FileState {
        let db = &name.path;
        let named = !db.as_os_str().is_empty();
        let not_regular = std::fs::metadata(db).is_ok_and(|m| !m.file_type().is_file());
        let lock = if named && !read_only && !name.immutable {
            lock_state(name).map(Some).inspect_err(|e| {
                crate::log_error(ffi::SQLITE_CANTOPEN, e);
            })
        } else {
            Ok(None)
        };
        let mut journal = db.clone().into_os_string();
        journal.push("-journal");
        FileState {
            lock_path: named.then(|| lock_path_for(db)),
            journal_path: PathBuf::from(journal),
            logged: AtomicBool::new(false),
            not_regular: not_regular && lock.is_err(),
            lock,
        }
    }
}

/// The lock state for a main database that may write: it must be a regular
/// file (a device or FIFO gets no lock file beside it), on a local
/// filesystem, with valid options and a usable lock file.
fn lock_state(name: &MainName) -> Result<edge::Shared, String> {
    let db = &name.path;
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
    let (mut o, unknown) = Options::from_env()?;
    if let Some(w) = options::unknown_env_warning(&unknown) {
        if !ENV_WARNED.swap(true, Ordering::Relaxed) {
            crate::log_error(ffi::SQLITE_WARNING, &w);
        }
    }
    let params = name.params.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    o.apply_uri(&db.to_string_lossy(), params)?;
    writelock_core::netfs::check(db, o.allow_network_fs)?;
    let lf = LockFile::open(db).map_err(|e| e.to_string())?;
    let mut p = Protocol::new(lf);
    p.options = o;
    p.label = db.to_string_lossy().into_owned();
    Ok(Handle::new(p))
}

/// The wrapped VFS. A raw pointer, never a reference: SQLite may use the
/// struct from other threads and writes its `pNext` when VFSes register.
///
/// # Safety
/// `vfs` is our registered VFS, whose `pAppData` is the inner VFS (set once in
/// [`register_vfs`], never freed).
unsafe fn ivfs(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    // SAFETY: per the caller.
    unsafe { (*vfs).pAppData as *mut ffi::sqlite3_vfs }
}

unsafe extern "C" fn v_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    f: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    guard(ffi::SQLITE_CANTOPEN, || {
        // SAFETY: SQLite passes our VFS, and `f` with our szOsFile bytes;
        // `name` stays valid until xClose.
        let (ours, iv) = unsafe { (Ours::init(f, name, flags), ivfs(vfs)) };
        let mut oflags = 0;
        // SAFETY: the inner VFS opens the inner part of the buffer.
        let rc = unsafe { open_inner(iv, name, ours, flags, &mut oflags) };
        if !out_flags.is_null() {
            // SAFETY: SQLite's out-parameter, when given.
            unsafe { *out_flags = oflags };
        }
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        let methods = if flags & ffi::SQLITE_OPEN_MAIN_DB == 0 {
            side::wrap(ours)
        } else {
            // SAFETY: a main database's name, with its parameters after it.
            let name = unsafe { MainName::read(name) };
            let state = FileState::open(&name, oflags & ffi::SQLITE_OPEN_READONLY != 0);
            ours.attach(state)
        };
        // SAFETY: from now on SQLite calls our methods on this file.
        unsafe { ours.set_methods(methods) };
        ffi::SQLITE_OK
    })
}

/// The inner VFS's xOpen into the inner part of `ours`. Not `SQLITE_OK`
/// unless the inner file is open (with methods of its own).
///
/// # Safety
/// `iv` is the inner VFS and `ours` a file being opened by our xOpen.
unsafe fn open_inner(
    iv: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    ours: Ours,
    flags: c_int,
    oflags: &mut c_int,
) -> c_int {
    // SAFETY: per the caller.
    let rc = unsafe { (*iv).xOpen }.map_or(ffi::SQLITE_CANTOPEN, |open| unsafe {
        open(iv, name, ours.inner(), flags, oflags)
    });
    // SAFETY: the inner file is either unopened (NULL methods) or open.
    if unsafe { (*ours.inner()).pMethods.is_null() } {
        return if rc == ffi::SQLITE_OK {
            ffi::SQLITE_CANTOPEN
        } else {
            rc
        };
    }
    if rc != ffi::SQLITE_OK {
        file::inner_call!(ours, xClose);
    }
    rc
}

unsafe extern "C" fn v_delete(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync: c_int,
) -> c_int {
    guard(ffi::SQLITE_IOERR_DELETE, || {
        // SAFETY: SQLite passes a file name (or NULL).
        if let Some(path) = unsafe { side::path_of(name) } {
            if !side::may_delete(&path) {
                // A forked child's SQLite deleting the journal of its
                // parent's open transaction: refused.
                return ffi::SQLITE_IOERR_DELETE;
            }
        }
        // SAFETY: delegation to the inner VFS with SQLite's arguments.
        unsafe {
            let iv = ivfs(vfs);
            (*iv)
                .xDelete
                .map_or(ffi::SQLITE_IOERR_DELETE, |m| m(iv, name, sync))
        }
    })
}

unsafe extern "C" fn v_sleep(vfs: *mut ffi::sqlite3_vfs, us: c_int) -> c_int {
    guard(0, || {
        if let Some(slept) = edge::sleep_for_lock(us) {
            return slept;
        }
        let us = edge::plain_sleep(us);
        // SAFETY: delegation to the inner VFS.
        unsafe {
            let iv = ivfs(vfs);
            (*iv).xSleep.map_or(0, |m| m(iv, us))
        }
    })
}

/// The other VFS methods: plain delegation to the inner VFS.
macro_rules! vfs_pass {
    ($name:ident, $m:ident, $ret:ty, $err:expr, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name(vfs: *mut ffi::sqlite3_vfs $(, $arg: $ty)*) -> $ret {
            // SAFETY: delegation to the inner VFS with SQLite's arguments.
            guard($err, || unsafe {
                let iv = ivfs(vfs);
                match (*iv).$m {
                    Some(m) => m(iv $(, $arg)*),
                    None => $err,
                }
            })
        }
    };
}
vfs_pass!(v_access, xAccess, c_int, ffi::SQLITE_IOERR_ACCESS, (name: *const c_char, flags: c_int, out: *mut c_int));
vfs_pass!(v_full_pathname, xFullPathname, c_int, ffi::SQLITE_CANTOPEN, (name: *const c_char, n: c_int, out: *mut c_char));
vfs_pass!(v_dlopen, xDlOpen, *mut c_void, ptr::null_mut(), (name: *const c_char));
vfs_pass!(v_dlerror, xDlError, (), (), (n: c_int, out: *mut c_char));
vfs_pass!(v_dlsym, xDlSym, DlSymbol, None, (h: *mut c_void, sym: *const c_char));
vfs_pass!(v_dlclose, xDlClose, (), (), (h: *mut c_void));
vfs_pass!(v_randomness, xRandomness, c_int, 0, (n: c_int, out: *mut c_char));
vfs_pass!(v_current_time, xCurrentTime, c_int, ffi::SQLITE_ERROR, (out: *mut f64));
vfs_pass!(v_get_last_error, xGetLastError, c_int, 0, (n: c_int, out: *mut c_char));
vfs_pass!(v_current_time_int64, xCurrentTimeInt64, c_int, ffi::SQLITE_ERROR, (out: *mut i64));
vfs_pass!(v_set_system_call, xSetSystemCall, c_int, ffi::SQLITE_NOTFOUND, (name: *const c_char, p: ffi::sqlite3_syscall_ptr));
vfs_pass!(v_get_system_call, xGetSystemCall, ffi::sqlite3_syscall_ptr, None, (name: *const c_char));
vfs_pass!(v_next_system_call, xNextSystemCall, *const c_char, ptr::null(), (name: *const c_char));

/// What the bindings call xDlSym's return type (an opaque function pointer).
type DlSymbol = Option<unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char)>;

/// The outcome of the one registration per process.
static REGISTERED: OnceLock<Result<(), (c_int, String)>> = OnceLock::new();

/// Register VFS `writelock` over the current default VFS and make it the
/// default. Idempotent: later calls return the first result and never wrap
/// `writelock` in itself.
pub(crate) fn register_vfs() -> Result<(), (c_int, String)> {
    REGISTERED
        .get_or_init(|| {
            writelock_core::process::watch_forks();
            // SAFETY: plain SQLite API calls.
            let (existing, base) = unsafe {
                (
                    ffi::sqlite3_vfs_find(VFS_NAME.as_ptr()),
                    ffi::sqlite3_vfs_find(ptr::null()),
                )
            };
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
            if base.is_null() {
                return Err((
                    ffi::SQLITE_ERROR,
                    "writelock: SQLite has no default VFS to wrap".into(),
                ));
            }
            // SAFETY: SQLite's default VFS lives as long as the process; its
            // fields are read through the raw pointer, never a reference
            // (SQLite writes its pNext when VFSes register).
            let (b_version, b_size, b_path) =
                unsafe { ((*base).iVersion, (*base).szOsFile, (*base).mxPathname) };
            // Leaked: SQLite keeps the pointer for the life of the process.
            let v = Box::leak(Box::new(ffi::sqlite3_vfs {
                iVersion: b_version.min(3),
                szOsFile: (INNER_OFFSET as c_int) + b_size,
                mxPathname: b_path,
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
            // SAFETY: a complete VFS that outlives every connection.
            let rc = unsafe { ffi::sqlite3_vfs_register(v, 1) };
            if rc != ffi::SQLITE_OK {
                return Err((
                    rc,
                    format!("writelock: sqlite3_vfs_register failed with code {rc}"),
                ));
            }
            Ok(())
        })
        .clone()
}
