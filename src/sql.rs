//! The SQL surface: `writelock_version()` and `writelock_status()`, registered
//! on every connection opened after loading (auto-extension), and the
//! open-time check that turns an unusable lock file into a clear error.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr;

use libsqlite3_sys as ffi;
use serde_json::{json, Value};

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
    if ffi::sqlite3_prepare_v2(db, sql.as_ptr(), -1, &mut stmt, ptr::null_mut()) != ffi::SQLITE_OK {
        return out;
    }
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
    out
}

/// The main-db `sqlite3_file` of one schema.
///
/// # Safety
/// `db` is live; `schema` names one of its databases.
unsafe fn file_of(db: *mut ffi::sqlite3, schema: &CStr) -> *mut ffi::sqlite3_file {
    let mut f: *mut ffi::sqlite3_file = ptr::null_mut();
    let rc = ffi::sqlite3_file_control(
        db,
        schema.as_ptr(),
        ffi::SQLITE_FCNTL_FILE_POINTER,
        &mut f as *mut _ as *mut c_void,
    );
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
    let rc = ffi::sqlite3_file_control(
        db,
        schema.as_ptr(),
        ffi::SQLITE_FCNTL_VFS_POINTER,
        &mut v as *mut _ as *mut c_void,
    );
    if rc != ffi::SQLITE_OK || v.is_null() || (*v).zName.is_null() {
        return None;
    }
    Some(CStr::from_ptr((*v).zName).to_string_lossy().into_owned())
}

/// The status document for `db`.
///
/// # Safety
/// `db` is a live connection the caller is inside of.
unsafe fn status(db: *mut ffi::sqlite3) -> Value {
    let mut dbs = Vec::new();
    for (schema, file) in database_list(db) {
        let vfs_name = vfs_of(db, &schema);
        let mut entry = json!({
            "schema": schema.to_string_lossy(),
            "file": file,
            "vfs": vfs_name,
        });
        let o = entry.as_object_mut().expect("object literal");
        match vfs::report(file_of(db, &schema)) {
            Some(r) => {
                o.insert("protected".into(), json!(r.protected));
                o.insert(
                    "lock_file".into(),
                    json!(r.lock_path.as_deref().map(vfs::display_path)),
                );
                o.insert("holding".into(), json!(r.holding));
                o.insert("borrowed".into(), json!(r.borrowed));
                o.insert("error".into(), json!(r.error));
                let c = r.counters;
                let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
                o.insert("acquisitions".into(), json!(c.acquisitions));
                o.insert("contended".into(), json!(c.contended));
                o.insert("queued".into(), json!(c.queued));
                o.insert("queue_granted".into(), json!(c.queue_granted));
                o.insert("busy".into(), json!(c.busy));
                o.insert("wait_total_ms".into(), json!(ms(c.wait_total)));
                o.insert("wait_max_ms".into(), json!(ms(c.wait_max)));
                o.insert("hold_total_ms".into(), json!(ms(c.hold_total)));
                o.insert("hold_max_ms".into(), json!(ms(c.hold_max)));
                let l = r.lock_counters;
                o.insert("scans".into(), json!(l.scans));
                o.insert("borrows".into(), json!(l.borrows));
                o.insert("reopens".into(), json!(l.reopens));
                o.insert("split_waits".into(), json!(l.split_waits));
                let holder = r
                    .lock_path
                    .as_deref()
                    .and_then(crate::holder::current_holder);
                o.insert("holder_pid".into(), json!(holder.as_ref().map(|h| h.pid)));
                o.insert(
                    "held_for_ms".into(),
                    json!(holder
                        .and_then(|h| h.held_for)
                        .map(|d| d.as_millis() as u64)),
                );
                o.insert(
                    "options".into(),
                    json!({
                        "hold_warn_ms": r.options.hold_warn.as_millis() as u64,
                        "checkpoint_wait_ms": r.options.checkpoint_wait.as_millis() as u64,
                        "queue": r.options.queue,
                        "queue_ahead_ms": r.options.queue_ahead.as_millis() as u64,
                        "allow_network_fs": r.options.allow_network_fs,
                    }),
                );
            }
            None => {
                o.insert("protected".into(), json!(false));
                o.insert("lock_file".into(), Value::Null);
                o.insert("holding".into(), json!(false));
                o.insert("error".into(), Value::Null);
            }
        }
        dbs.push(entry);
    }
    let main_vfs = vfs_of(db, c"main");
    let (acq, busy) = crate::stats::GLOBAL.snapshot();
    json!({
        "version": VERSION,
        "vfs": main_vfs,
        "databases": dbs,
        "process": { "pid": std::process::id(), "acquisitions": acq, "busy": busy },
    })
}

unsafe extern "C" fn fn_status(
    ctx: *mut ffi::sqlite3_context,
    _n: c_int,
    _v: *mut *mut ffi::sqlite3_value,
) {
    let r = std::panic::catch_unwind(|| {
        // SAFETY: SQLite calls us inside a statement of this live connection.
        let doc = unsafe { status(ffi::sqlite3_context_db_handle(ctx)) };
        result_text(ctx, &doc.to_string());
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
        let rc = ffi::sqlite3_create_function_v2(
            db,
            name.as_ptr(),
            0,
            ffi::SQLITE_UTF8 | extra,
            ptr::null_mut(),
            Some(f),
            None,
            None,
            None,
        );
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
