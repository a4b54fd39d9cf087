//! The SQL surface: `writelock_version()` and `writelock_status()`, registered
//! on every connection opened after loading (auto-extension), and the
//! open-time check that turns an unusable lock file into a clear error.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr;

use libsqlite3_sys as ffi;
use std::time::Duration;

use serde::Serialize;

use crate::vfs;

/// This build's version, as `writelock_version()` returns it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn result_text(ctx: *mut ffi::sqlite3_context, s: &str) {
    // SAFETY: `ctx` is the live context of the current call; SQLITE_TRANSIENT
    // makes SQLite copy the bytes before we drop `s`.
    unsafe {
        ffi::sqlite3_result_text(
            ctx,
            s.as_ptr() as *const c_char,
            s.len() as c_int,
            ffi::SQLITE_TRANSIENT(),
        )
    }
}

unsafe extern "C" fn fn_version(
    ctx: *mut ffi::sqlite3_context,
    _n: c_int,
    _v: *mut *mut ffi::sqlite3_value,
) {
    if std::panic::catch_unwind(|| result_text(ctx, VERSION)).is_err() {
        // SAFETY: `ctx` is live; the message is a static C string.
        unsafe { ffi::sqlite3_result_error(ctx, c"writelock: internal error".as_ptr(), -1) }
    }
}

/// `(schema, file)` for every database of `db`, from `PRAGMA database_list`.
///
/// # Safety
/// `db` is a live connection the caller is inside of.
unsafe fn database_list(db: *mut ffi::sqlite3) -> Vec<(CString, String)> {
    let mut out = Vec::new();
    let mut stmt = ptr::null_mut();
    let sql = c"PRAGMA database_list";
    // SAFETY: `db` is live (per the caller); `stmt` is finalized below.
    if unsafe { ffi::sqlite3_prepare_v2(db, sql.as_ptr(), -1, &mut stmt, ptr::null_mut()) }
        != ffi::SQLITE_OK
    {
        return out;
    }
    // SAFETY: a prepared statement stepped until done; column texts are
    // copied before the next step.
    unsafe {
        while ffi::sqlite3_step(stmt) == ffi::SQLITE_ROW {
            let col = |i| {
                let p = ffi::sqlite3_column_text(stmt, i);
                if p.is_null() {
                    Vec::new()
                } else {
                    CStr::from_ptr(p as *const c_char).to_bytes().to_vec()
                }
            };
            let name = CString::new(col(1)).unwrap_or_default();
            let file = String::from_utf8_lossy(&col(2)).into_owned();
            out.push((name, file));
        }
        ffi::sqlite3_finalize(stmt);
    }
    out
}

/// The main-db `sqlite3_file` of one schema.
///
/// # Safety
/// `db` is live; `schema` names one of its databases.
unsafe fn file_of(db: *mut ffi::sqlite3, schema: &CStr) -> *mut ffi::sqlite3_file {
    let mut f: *mut ffi::sqlite3_file = ptr::null_mut();
    // SAFETY: `db` is live; this op writes one pointer to `f`.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            db,
            schema.as_ptr(),
            ffi::SQLITE_FCNTL_FILE_POINTER,
            &mut f as *mut _ as *mut c_void,
        )
    };
    if rc == ffi::SQLITE_OK {
        f
    } else {
        ptr::null_mut()
    }
}

/// The name of the VFS `schema` was opened with.
///
/// # Safety
/// As [`file_of`].
unsafe fn vfs_of(db: *mut ffi::sqlite3, schema: &CStr) -> Option<String> {
    let mut v: *mut ffi::sqlite3_vfs = ptr::null_mut();
    // SAFETY: `db` is live; this op writes one pointer to `v`.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            db,
            schema.as_ptr(),
            ffi::SQLITE_FCNTL_VFS_POINTER,
            &mut v as *mut _ as *mut c_void,
        )
    };
    if rc != ffi::SQLITE_OK || v.is_null() {
        return None;
    }
    // SAFETY: a registered VFS, which lives as long as the process; its
    // name is NULL or a C string.
    unsafe {
        (*v).zName
            .as_ref()
            .map(|n| CStr::from_ptr(n).to_string_lossy().into_owned())
    }
}

/// The databases of `db` that are files opened through a VFS other than
/// `writelock`, for writing: `(schema, file)`. Such a database was opened
/// before the extension was loaded (or named another VFS), and is not
/// protected. In-memory and temporary databases have no file; a read-only
/// one never writes.
///
/// # Safety
/// `db` is a live connection the caller is inside of.
#[cfg(feature = "loadable_extension")]
pub(crate) unsafe fn unprotected_files(db: *mut ffi::sqlite3) -> Vec<(String, String)> {
    let ours = vfs::VFS_NAME.to_str().unwrap_or_default();
    // SAFETY: per the caller.
    unsafe { database_list(db) }
        .into_iter()
        .filter(|(schema, file)| {
            // SAFETY: per the caller; `schema` names one of its databases.
            !file.is_empty()
                && unsafe { ffi::sqlite3_db_readonly(db, schema.as_ptr()) } == 0
                && unsafe { vfs_of(db, schema) }.is_some_and(|v| v != ours)
        })
        .map(|(schema, file)| (schema.to_string_lossy().into_owned(), file))
        .collect()
}

/// `writelock_status()`: the extension, the process, and every database of
/// the connection.
#[derive(Serialize)]
struct Status {
    version: &'static str,
    vfs: Option<String>,
    databases: Vec<Database>,
    process: ProcessStatus,
}

/// This process's counters over all its connections.
#[derive(Serialize)]
struct ProcessStatus {
    pid: u32,
    acquisitions: u64,
    busy: u64,
}

/// One database (schema) of the connection.
#[derive(Serialize)]
struct Database {
    schema: String,
    file: String,
    vfs: Option<String>,
    /// This connection takes the lock when it writes.
    protected: bool,
    lock_file: Option<String>,
    holding: bool,
    error: Option<String>,
    /// Only for files opened through this VFS.
    #[serde(flatten)]
    ours: Option<Details>,
}

/// What a file of ours adds: the holder now, the counters, the options.
#[derive(Serialize)]
struct Details {
    borrowed: bool,
    holder_pid: Option<u32>,
    held_for_ms: Option<u64>,
    acquisitions: u64,
    contended: u64,
    queued: u64,
    queue_granted: u64,
    busy: u64,
    wait_total_ms: f64,
    wait_max_ms: f64,
    hold_total_ms: f64,
    hold_max_ms: f64,
    scans: u64,
    borrows: u64,
    reopens: u64,
    split_waits: u64,
    yields: u64,
    options: OptionsStatus,
}

/// The options in force.
#[derive(Serialize)]
struct OptionsStatus {
    hold_warn_ms: u64,
    checkpoint_wait_ms: u64,
    queue: bool,
    queue_ahead_ms: u64,
    allow_network_fs: bool,
    handoff_ms: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Database {
    fn new(
        schema: String,
        file: String,
        vfs: Option<String>,
        r: Option<vfs::HandleReport>,
    ) -> Database {
        let Some(r) = r else {
            return Database {
                schema,
                file,
                vfs,
                protected: false,
                lock_file: None,
                holding: false,
                error: None,
                ours: None,
            };
        };
        let holder = r
            .lock_path
            .as_deref()
            .and_then(writelock_core::holder::current_holder);
        let (c, l, o) = (r.counters, r.lock_counters, r.options);
        Database {
            schema,
            file,
            vfs,
            protected: r.protected,
            lock_file: r
                .lock_path
                .as_deref()
                .map(|p| p.to_string_lossy().into_owned()),
            holding: r.holding,
            error: r.error,
            ours: Some(Details {
                borrowed: r.borrowed,
                holder_pid: holder.as_ref().map(|h| h.pid),
                held_for_ms: holder
                    .and_then(|h| h.held_for)
                    .map(|d| d.as_millis() as u64),
                acquisitions: c.acquisitions,
                contended: c.contended,
                queued: c.queued,
                queue_granted: c.queue_granted,
                busy: c.busy,
                wait_total_ms: ms(c.wait_total),
                wait_max_ms: ms(c.wait_max),
                hold_total_ms: ms(c.hold_total),
                hold_max_ms: ms(c.hold_max),
                scans: l.scans,
                borrows: l.borrows,
                reopens: l.reopens,
                split_waits: l.split_waits,
                yields: l.yields,
                options: OptionsStatus {
                    hold_warn_ms: o.hold_warn.as_millis() as u64,
                    checkpoint_wait_ms: o.checkpoint_wait.as_millis() as u64,
                    queue: o.queue,
                    queue_ahead_ms: o.queue_ahead.as_millis() as u64,
                    allow_network_fs: o.allow_network_fs,
                    handoff_ms: o.handoff.as_millis() as u64,
                },
            }),
        }
    }
}

/// The status document for `db`.
///
/// # Safety
/// `db` is a live connection the caller is inside of.
unsafe fn status(db: *mut ffi::sqlite3) -> Status {
    // SAFETY: per the caller.
    let databases = unsafe {
        database_list(db)
            .into_iter()
            .map(|(schema, file)| {
                let vfs_name = vfs_of(db, &schema);
                let r = vfs::report(file_of(db, &schema));
                Database::new(schema.to_string_lossy().into_owned(), file, vfs_name, r)
            })
            .collect()
    };
    let (acquisitions, busy) = writelock_core::stats::GLOBAL.snapshot();
    Status {
        version: VERSION,
        // SAFETY: per the caller.
        vfs: unsafe { vfs_of(db, c"main") },
        databases,
        process: ProcessStatus {
            pid: std::process::id(),
            acquisitions,
            busy,
        },
    }
}

unsafe extern "C" fn fn_status(
    ctx: *mut ffi::sqlite3_context,
    _n: c_int,
    _v: *mut *mut ffi::sqlite3_value,
) {
    let r = std::panic::catch_unwind(|| {
        // SAFETY: SQLite calls us inside a statement of this live connection.
        let doc = unsafe { status(ffi::sqlite3_context_db_handle(ctx)) };
        result_text(ctx, &serde_json::to_string(&doc).unwrap_or_default());
    });
    if r.is_err() {
        // SAFETY: `ctx` is live; the message is a static C string.
        unsafe { ffi::sqlite3_result_error(ctx, c"writelock: internal error".as_ptr(), -1) }
    }
}

/// Register the SQL functions on one connection.
///
/// # Safety
/// `db` is a live connection.
pub(crate) unsafe fn register_functions(db: *mut ffi::sqlite3) -> c_int {
    type F = unsafe extern "C" fn(*mut ffi::sqlite3_context, c_int, *mut *mut ffi::sqlite3_value);
    let fns: [(&CStr, F, c_int); 2] = [
        (c"writelock_version", fn_version, ffi::SQLITE_DETERMINISTIC),
        (c"writelock_status", fn_status, 0),
    ];
    for (name, f, extra) in fns {
        // SAFETY: `db` is live (per the caller); static names and functions.
        let rc = unsafe {
            ffi::sqlite3_create_function_v2(
                db,
                name.as_ptr(),
                0,
                ffi::SQLITE_UTF8 | extra,
                ptr::null_mut(),
                Some(f),
                None,
                None,
                None,
            )
        };
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    ffi::SQLITE_OK
}

/// The auto-extension: runs on every connection opened after loading.
/// Registers the functions and fails the open, with a message naming the lock
/// file and the cause, when `main`'s lock file is unusable.
pub(crate) unsafe extern "C" fn auto_init(
    db: *mut ffi::sqlite3,
    err: *mut *mut c_char,
    _api: *const ffi::sqlite3_api_routines,
) -> c_int {
    std::panic::catch_unwind(|| {
        // SAFETY: SQLite calls us with a live connection being opened and a
        // valid (or NULL) error-message slot.
        unsafe {
            let rc = register_functions(db);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
            if let Some(r) = vfs::report(file_of(db, c"main")) {
                if r.lock_path.is_some() {
                    if let Some(msg) = r.error {
                        crate::set_errmsg(err, &msg);
                        return ffi::SQLITE_CANTOPEN;
                    }
                }
            }
            ffi::SQLITE_OK
        }
    })
    .unwrap_or(ffi::SQLITE_INTERNAL)
}
