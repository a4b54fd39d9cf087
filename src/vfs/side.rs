//! Journals, WAL and temporary files: no lock logic, only the fork check.
//!
//! In a child forked without exec, a connection inherited from the parent may
//! still believe it holds the parent's locks, and would write the parent's
//! journal or WAL (and delete the journal of the parent's open transaction)
//! without asking for any lock. So writes to such a file in another process
//! than the one that opened it are refused, and a journal it closes is
//! remembered so that the child's SQLite cannot delete it ([`may_delete`]).

use std::ffi::{c_char, c_int, c_void, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use libsqlite3_sys as ffi;

use super::file::{inner_call, methods, Ours};
use super::guard;

/// The kind bits of xOpen's flags: `SQLITE_OPEN_MAIN_DB` (0x100) …
/// `SQLITE_OPEN_SUPER_JOURNAL` (0x4000), and `SQLITE_OPEN_WAL` (0x80000).
pub(super) const OPEN_KINDS: c_int = 0x0000_7F00 | ffi::SQLITE_OPEN_WAL;

/// Journals of the parent's connections that a forked child closed: the
/// child's SQLite must not delete them while the parent lives. Kept by path
/// and identity, so the child's own later journal at the same path is its to
/// delete, and with the process that opened them.
type Kept = std::sync::Mutex<Vec<(PathBuf, (u64, u64), u32)>>;
static KEPT: writelock_core::process::PerProcess<Kept> = writelock_core::process::PerProcess::new();

fn identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Whether this process may delete `path` (`xDelete`): not a journal of its
/// parent's open transaction that it closed as an inherited file. Once the
/// parent is gone, that journal is an ordinary hot journal: a connection of
/// the child that rolled it back (under the lock, as any process would)
/// deletes it. (The inherited connection itself cannot: its rollback's
/// writes are refused, and SQLite deletes no journal it failed to play back.)
pub(super) fn may_delete(path: &Path) -> bool {
    if !writelock_core::process::forked() {
        return true;
    }
    let kept = KEPT.get(Default::default);
    let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
    match kept.iter().position(|(p, _, _)| p == path) {
        Some(i)
            if identity(path) == Some(kept[i].1) && writelock_core::process::running(kept[i].2) =>
        {
            false
        }
        Some(i) => {
            // A newer file at that path (the child's own), or the parent died.
            kept.remove(i);
            true
        }
        None => true,
    }
}

/// Wrap a freshly opened side file (the inner open succeeded into `f`'s
/// inner part): our methods, matching the inner's `iVersion`.
pub(super) fn wrap(f: Ours) -> &'static ffi::sqlite3_io_methods {
    let v = f.methods().iVersion.clamp(1, 3);
    &SIDE_METHODS[(v - 1) as usize]
}

unsafe extern "C" fn s_close(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls xClose once, on a file of ours.
    let f = unsafe { Ours::new(f) };
    guard(ffi::SQLITE_IOERR_CLOSE, || {
        let sf = f.shim();
        let journal = ffi::SQLITE_OPEN_MAIN_JOURNAL | ffi::SQLITE_OPEN_WAL;
        if f.inherited() && sf.kind & journal != 0 && !sf.name.is_null() {
            // SAFETY: SQLite keeps the name passed to xOpen valid until
            // xClose returns.
            let name = unsafe { CStr::from_ptr(sf.name) };
            let path = PathBuf::from(OsStr::from_bytes(name.to_bytes()));
            if let Some(id) = identity(&path) {
                let kept = KEPT.get(Default::default);
                kept.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((path, id, sf.pid));
            }
        }
        inner_call!(f, xClose)
    })
}

/// A side file's write, truncate or sync: refused in a process that did not
/// open it.
macro_rules! side_write {
    ($name:ident, $m:ident, $err:expr, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name(f: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            // SAFETY: SQLite calls our io methods on our files only.
            let f = unsafe { Ours::new(f) };
            guard($err, || if f.inherited() { $err } else { inner_call!(f, $m $(, $arg)*) })
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
            // SAFETY: SQLite calls our io methods on our files only.
            let f = unsafe { Ours::new(f) };
            guard($err, || inner_call!(f, $m $(, $arg)*))
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
        // xSectorSize, xDeviceCharacteristics, xShmBarrier, xFetch and
        // xUnfetch delegate without touching any state: the main table's.
        ..main
    }
}

/// The side files' tables, one per inner `iVersion`.
static SIDE_METHODS: [ffi::sqlite3_io_methods; 3] =
    [side_methods(1), side_methods(2), side_methods(3)];

/// A side file's name as a path, for `xDelete` (None for NULL).
///
/// # Safety
/// `name` is NULL or a NUL-terminated string SQLite passed.
pub(super) unsafe fn path_of(name: *const c_char) -> Option<PathBuf> {
    // SAFETY: per the caller.
    (!name.is_null())
        .then(|| unsafe { PathBuf::from(OsStr::from_bytes(CStr::from_ptr(name).to_bytes())) })
}
