//! sqlite-writelock: serialized SQLite writers across processes.
//!
//! # What it is
//!
//! A VFS shim, loaded as an extension, that holds an exclusive `flock()` on
//! `<db>.lock` for exactly as long as a connection is a writer — rollback and
//! WAL modes alike. SQLite's own locks are POSIX `fcntl()` locks, which
//! vanish when *any* descriptor on the database file is closed inside a
//! process; a `flock` belongs to one open file description, survives such a
//! `close()`, excludes other processes and other connections of this one
//! alike, and dies with its process.
//!
//! # How it works
//!
//! * **A writer holds the flock.** A main-database handle is a writer while
//!   its `xLock` level is RESERVED or above, or while it holds the WAL write
//!   lock or the checkpoint lock (`xShmLock` slots 0 and 1). It takes the
//!   flock *before* SQLite's own lock, never blocking (contended is
//!   `SQLITE_BUSY`), and lets go *after* SQLite's unlock.
//! * **SQLite's other locks are shadowed** by open-file-description locks on
//!   bytes of `<db>.lock` that no stray `close()` can cancel: SHARED,
//!   PENDING, EXCLUSIVE, and a WAL connection's lifelong attachment.
//! * **A refused writer waits in its busy handler's sleep**, on its own
//!   thread, in a queue on a shared page (`<db>.lock-shm`), woken by the
//!   releaser; the lock it gets is kept for the retry as a write intent that
//!   the process timer releases if nobody uses it.
//! * **A process that holds `<db>.lock` itself** (the application-level fix,
//!   `flock(1)`) is not made to wait for itself: its connections borrow it.
//!
//! # Where things are
//!
//! * `writelock_core` (a crate with no SQLite in it) decides everything:
//!   `protocol` whether to take the lock, `wait` whether and how long to
//!   wait, `lockfile` whether to borrow. `docs/protocol.md` says why it is
//!   sound; `ARCHITECTURE.md` maps each decision to its place.
//! * This crate is the C side, shaped like SQLite's `ext/misc/cksumvfs.c`:
//!   `vfs` delegates to the VFS it wraps and turns C ints into typed values
//!   at one edge; `sql` adds `writelock_version()` and `writelock_status()`;
//!   this file has the entry point and [`register`].

#![deny(unsafe_op_in_unsafe_fn)]

use std::ffi::{c_char, c_int};

use libsqlite3_sys as ffi;

mod sql;
mod vfs;

pub use sql::VERSION;
pub use vfs::VFS_NAME;

/// Write `msg` to SQLite's error log (`sqlite3_log`, `SQLITE_CONFIG_LOG`)
/// and to `WRITELOCK_LOG`'s target, if one is set.
pub(crate) fn log_error(rc: c_int, msg: &str) {
    sqlite_log(rc, msg);
    log_write(rc, msg);
}

/// `msg` to `WRITELOCK_LOG`'s target; the first failed write is said through
/// SQLite's log (there is nowhere else).
fn log_write(rc: c_int, msg: &str) {
    if let Some(failed) = writelock_core::log::write(&level(rc), msg) {
        sqlite_log(ffi::SQLITE_WARNING, &failed);
    }
}

fn sqlite_log(rc: c_int, msg: &str) {
    let c = std::ffi::CString::new(msg.replace('\0', "?")).unwrap_or_default();
    // SAFETY: "%s" with one NUL-terminated argument that outlives the call.
    unsafe { ffi::sqlite3_log(rc, c"%s".as_ptr(), c.as_ptr()) }
}

/// What kind of message a result code makes it, for `WRITELOCK_LOG`.
fn level(rc: c_int) -> String {
    match rc & 0xff {
        ffi::SQLITE_WARNING => "warning".into(),
        ffi::SQLITE_NOTICE => "notice".into(),
        ffi::SQLITE_BUSY => "busy".into(),
        _ => format!("error ({rc})"),
    }
}

/// A message a person must see: `logged` to SQLite's log and
/// `WRITELOCK_LOG`, `shown` (longer: SQLite's log cuts a message at about 200
/// bytes) to standard error when a terminal or a pipe reads it — once, when
/// `WRITELOCK_LOG=stderr` too.
pub(crate) fn tell_user(rc: c_int, logged: &str, shown: &str) {
    sqlite_log(rc, logged);
    let seen = writelock_core::log::to_stderr_if_read(shown);
    if !(seen && writelock_core::log::goes_to_stderr()) {
        log_write(rc, logged);
    }
}

/// A copy of `msg` in memory from `sqlite3_malloc`, for SQLite to free
/// (NULL if out of memory).
pub(crate) fn sqlite_strdup(msg: &str) -> *mut c_char {
    let bytes = msg.as_bytes();
    let Ok(size) = c_int::try_from(bytes.len() + 1) else {
        return std::ptr::null_mut();
    };
    // SAFETY: sqlite3_malloc returns NULL or a block of `size` bytes; we
    // write exactly `len` bytes and the NUL into it.
    unsafe {
        let p = ffi::sqlite3_malloc(size) as *mut u8;
        if !p.is_null() {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
            *p.add(bytes.len()) = 0;
        }
        p as *mut c_char
    }
}

/// Put `msg` into an extension's `char **pzErrMsg`, allocated by SQLite.
///
/// # Safety
/// `slot` is NULL or the error-message slot SQLite passed to an entry point.
pub(crate) unsafe fn set_errmsg(slot: *mut *mut c_char, msg: &str) {
    if !slot.is_null() {
        // SAFETY: per the caller, a slot SQLite frees with sqlite3_free.
        unsafe { *slot = sqlite_strdup(msg) };
    }
}

/// Why [`register`] failed: the SQLite result code and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterError(pub c_int, pub String);

impl std::fmt::Display for RegisterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}
impl std::error::Error for RegisterError {}

/// Register VFS `writelock` over the current default VFS, make it the default,
/// and add the SQL functions to every connection opened from now on.
///
/// For programs that link SQLite themselves (build this crate with
/// `default-features = false`). Idempotent. Connections opened *before* the
/// call are not protected.
pub fn register() -> Result<(), RegisterError> {
    // Once per process: a bad WRITELOCK_LOG is said, never an error (the
    // extension works without it).
    if let Err(msg) = writelock_core::log::init_from_env() {
        tell_user(ffi::SQLITE_WARNING, &msg, &msg);
    }
    vfs::register_vfs().map_err(|(rc, msg)| RegisterError(rc, msg))?;
    type AutoInit = unsafe extern "C" fn(
        *mut ffi::sqlite3,
        *mut *mut c_char,
        *const ffi::sqlite3_api_routines,
    ) -> c_int;
    // SAFETY: sqlite3_auto_extension takes `void(*)(void)` and calls it with
    // the extension-entry signature that `auto_init` has; SQLite ignores a
    // second registration of the same pointer.
    let rc = unsafe {
        // The bindings type the argument as `void(*)(void)` (extension
        // build) or with the entry signature (linked build): same size,
        // inferred either way.
        #[allow(clippy::missing_transmute_annotations, clippy::useless_transmute)]
        let f = std::mem::transmute::<AutoInit, _>(sql::auto_init);
        ffi::sqlite3_auto_extension(Some(f))
    };
    if rc != ffi::SQLITE_OK {
        return Err(RegisterError(
            rc,
            format!("writelock: sqlite3_auto_extension failed with code {rc}"),
        ));
    }
    Ok(())
}

/// The `sqlite3_api_routines` of the first SQLite that loaded us.
#[cfg(feature = "loadable_extension")]
static HOST_API: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Report an init error through the *calling* library's allocator.
///
/// # Safety
/// `api` is the routines table SQLite passed to the entry point.
#[cfg(feature = "loadable_extension")]
unsafe fn init_error(
    api: *const ffi::sqlite3_api_routines,
    err: *mut *mut c_char,
    msg: &str,
) -> c_int {
    if !err.is_null() {
        // SAFETY: per the caller; the message goes through the calling
        // library's own allocator, which is the one that frees it.
        unsafe {
            if let Some(mprintf) = (*api).mprintf {
                let c = std::ffi::CString::new(msg).unwrap_or_default();
                *err = mprintf(c"%s".as_ptr(), c.as_ptr());
            }
        }
    }
    ffi::SQLITE_ERROR
}

/// The loading connection's databases that were opened before the
/// extension was loaded (`sqlite3 -cmd '.load …' app.db` opens app.db
/// first): nothing protects them, and nothing else would say so. Said
/// through `sqlite3_log` and, where someone reads it, standard error.
#[cfg(feature = "loadable_extension")]
fn warn_opened_before_loading(files: Vec<(String, String)>) {
    for (schema, file) in files {
        let (logged, shown) = if schema == "main" {
            (
                format!(
                    "writelock: {file} was opened before the extension was loaded: NOT \
                     protected; open it again after loading (shell: .open it again)"
                ),
                format!(
                    "writelock: WARNING: {file} was opened before the extension was loaded: \
                     it is NOT protected, this connection writes it without the lock \
                     (SELECT writelock_status() shows \"protected\": false).\n\
                     writelock: load first, then open: sqlite3 -cmd '.load …/libwritelock' \
                     -cmd '.open {file}' (not the database as the shell's first argument), or \
                     .open {file} again now."
                ),
            )
        } else {
            (
                format!(
                    "writelock: {file} (schema {schema}) was attached before the extension was \
                     loaded: NOT protected; DETACH it and ATTACH it again"
                ),
                format!(
                    "writelock: WARNING: {file} (schema {schema}) was attached before the \
                     extension was loaded: it is NOT protected, this connection writes it \
                     without the lock (SELECT writelock_status() shows \"protected\": false).\n\
                     writelock: DETACH {schema} and ATTACH it again now that the extension is \
                     loaded."
                ),
            )
        };
        tell_user(ffi::SQLITE_WARNING, &logged, &shown);
    }
}

/// The extension entry point: `.load ./target/release/libwritelock`.
///
/// Registers VFS `writelock` (default from now on), the auto-extension and the
/// SQL functions on `db`, and asks to stay loaded. Loading again into the same
/// SQLite is harmless; loading into a second, different SQLite library in the
/// same process is refused, because our calls would go to the first one.
///
/// # Safety
/// Called by SQLite's extension loader with a live `db` and its API table.
#[cfg(feature = "loadable_extension")]
#[no_mangle]
pub unsafe extern "C" fn sqlite3_writelock_init(
    db: *mut ffi::sqlite3,
    err: *mut *mut c_char,
    api: *mut ffi::sqlite3_api_routines,
) -> c_int {
    std::panic::catch_unwind(|| {
        // SAFETY: SQLite passes a valid API table and connection.
        unsafe {
            if api.is_null() {
                return ffi::SQLITE_ERROR;
            }
            let first = *HOST_API.get_or_init(|| api as usize);
            if first != api as usize {
                return init_error(
                    api,
                    err,
                    "writelock: already loaded into a different SQLite library in this process; \
                     one process can use the extension from one SQLite library only",
                );
            }
            if let Err(e) = ffi::rusqlite_extension_init2(api) {
                return init_error(api, err, &format!("writelock: cannot use this SQLite: {e}"));
            }
            if let Err(e) = register() {
                set_errmsg(err, &e.to_string());
                return e.0;
            }
            let rc = sql::register_functions(db);
            // SQLITE_BUSY: loaded again through load_extension() on a
            // connection that has the functions already (SQLite will not
            // redefine a function while a statement runs). They are there.
            if rc != ffi::SQLITE_OK && rc != ffi::SQLITE_BUSY {
                return rc;
            }
            // Only said, never an error: the VFS is registered by now and
            // protects every connection opened from here on; failing the load
            // would take this connection's functions away and fix nothing.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                warn_opened_before_loading(sql::unprotected_files(db))
            }));
            ffi::SQLITE_OK_LOAD_PERMANENTLY
        }
    })
    .unwrap_or(ffi::SQLITE_INTERNAL)
}
