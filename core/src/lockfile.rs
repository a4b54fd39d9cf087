//! The side file `<db>.lock` and the locks on it.
//!
//! Pure Rust, no SQLite: opening the file safely, the exclusive `flock()`
//! (the writer lock, the public contract), the OFD locks on single bytes
//! (the shadows of SQLite's own locks, see `docs/protocol.md`), borrowing the
//! process's own `flock`, and moving to a fresh file when `<db>.lock` was
//! deleted or replaced. Every error names the path and the cause.
//!
//! Bytes of `<db>.lock` (locks beyond the end of a file are fine; the file's
//! content is not used):
//!
//! | byte | lock | held by |
//! |---|---|---|
//! | 0 | OFD read / write | the shadow of SQLite's SHARED / EXCLUSIVE |
//! | 1 | OFD write | the shadow of PENDING: a writer waiting for EXCLUSIVE |
//! | 2 | OFD read | every descriptor the extension opens, for life: how any copy or version of the extension tells its descriptors from the application's |
//! | 3 | OFD write | a handle that borrows its process's own `flock` |

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use nix::errno::Errno;
use nix::libc;

use crate::page::{flags, Gate, HolderRecord, Liveness, Page};
use crate::process;

/// Why `<db>.lock` cannot serve as the writer lock. Every variant names the path.
#[derive(Debug)]
pub enum LockError {
    /// `open()` failed: read-only directory, permissions, a symlink (`O_NOFOLLOW`), …
    Open { path: PathBuf, source: io::Error },
    /// The path exists but is not a regular file (a directory, FIFO, socket, device).
    NotRegular { path: PathBuf, kind: &'static str },
    /// `flock()` or `fcntl(F_OFD_SETLK)` failed with something other than "held by someone else".
    Flock { path: PathBuf, errno: Errno },
    /// The handle was opened in another process (before a `fork()`): its lock
    /// descriptor is shared with the parent, so acting on it would act on the
    /// parent's lock.
    Forked {
        path: PathBuf,
        opened_in: u32,
        used_in: u32,
    },
}

impl LockError {
    /// The lock file this error is about.
    pub fn path(&self) -> &Path {
        match self {
            LockError::Open { path, .. }
            | LockError::NotRegular { path, .. }
            | LockError::Flock { path, .. }
            | LockError::Forked { path, .. } => path,
        }
    }
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.path().display();
        match self {
            LockError::Open { source, .. } => {
                let hint = match source.raw_os_error() {
                    Some(libc::ELOOP) => {
                        " (it is a symlink; writelock refuses to follow links at <db>.lock — remove it)"
                    }
                    Some(libc::EISDIR) => {
                        " (it is a directory, perhaps left by SQLite's unix-dotfile VFS — remove it if no process uses that VFS)"
                    }
                    Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                        " (the directory must be writable to create it, or the file must exist and be writable)"
                    }
                    _ => "",
                };
                write!(f, "writelock: cannot open lock file {p}: {source}{hint}")
            }
            LockError::NotRegular { kind, .. } => write!(
                f,
                "writelock: lock file {p} is a {kind}, not a regular file; remove it and retry"
            ),
            LockError::Flock { errno, .. } => {
                write!(f, "writelock: locking {p} failed: {}", errno.desc())
            }
            LockError::Forked {
                opened_in, used_in, ..
            } => write!(
                f,
                "writelock: connection opened in process {opened_in} used in process {used_in} \
                 after fork(); the lock on {p} belongs to the parent — open a new connection in the child"
            ),
        }
    }
}

impl std::error::Error for LockError {}

/// `<db>.lock` for a database path: the name is the contract.
pub fn lock_path_for(db_path: &Path) -> PathBuf {
    let mut s = db_path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// The database path as SQLite's unix VFS makes it before it opens a file:
/// absolute, `.` and `..` folded, every symlink resolved component by
/// component — a dangling one too: a link to a database that does not exist
/// yet names the file SQLite will create, and so the lock file the
/// connections will use (`<resolved path>.lock`). Components that do not
/// exist are kept as they are. Tools use this to name that lock file.
pub fn resolve_db_path(p: &Path) -> io::Result<PathBuf> {
    use std::path::Component;
    let mut out = if p.is_absolute() {
        PathBuf::from("/")
    } else {
        std::env::current_dir()?
    };
    // Components still to append, the next one last.
    let mut todo: Vec<std::ffi::OsString> = Vec::new();
    let push = |todo: &mut Vec<std::ffi::OsString>, path: &Path| {
        for c in path.components().rev() {
            match c {
                Component::Normal(n) => todo.push(n.to_owned()),
                Component::ParentDir => todo.push("..".into()),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
    };
    push(&mut todo, p);
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            out.pop();
            continue;
        }
        let next = out.join(&c);
        match std::fs::symlink_metadata(&next) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 100 {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(&next)?;
                if target.is_absolute() {
                    out = PathBuf::from("/");
                }
                push(&mut todo, &target);
            }
            _ => out = next,
        }
    }
    Ok(out)
}

/// What kind of file a path names, for messages ("a directory").
pub fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "regular file"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_symlink() {
        "symlink"
    } else {
        "special file"
    }
}

/// Byte of the shadow of SQLite's SHARED / EXCLUSIVE locks.
const SHADOW_BYTE: i64 = 0;
/// Byte of the shadow of SQLite's PENDING lock.
const PENDING_BYTE: i64 = 1;
/// Byte every descriptor of the extension holds a read lock on, for life.
pub const MARKER_BYTE: i64 = 2;
/// Byte a borrowing handle holds a write lock on while it borrows.
const BORROW_BYTE: i64 = 3;

/// Byte of the *database file* every writer of the extension holds an OFD
/// read lock on while it holds the flock: in SQLite's lock page, past the
/// 512 bytes SQLite locks there (a page nothing ever reads or writes as
/// data). It outlives `<db>.lock` and its page: when both are deleted in the
/// middle of a transaction, a writer of the fresh lock file still finds the
/// old file's writer here and waits for it. The application's stray
/// `close()` of the database cannot cancel it (an OFD lock belongs to the
/// extension's own open file description).
pub const DB_WRITER_BYTE: i64 = 0x4000_0000 + 0x300;

/// Byte of the database file a WAL connection holds an OFD read lock on
/// while it is attached (its shadow read lock held), for the same reason:
/// no shadow write lock — the last-connection checkpoint that deletes
/// `-wal`, a newcomer in `locking_mode=EXCLUSIVE` — is granted while
/// another connection is attached, even when `<db>.lock` and its page were
/// deleted and a stray `close()` cancelled SQLite's own locks.
pub const DB_ATTACHED_BYTE: i64 = 0x4000_0000 + 0x301;

/// The OFD shadow lock a handle holds (see [`LockFile::shadow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shadow {
    /// None held.
    Unlocked,
    /// Shared: this handle is attached/reading.
    Read,
    /// Exclusive: this handle writes the database file.
    Write,
}

/// How a handle holds the writer lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    No,
    /// Its own `flock` on its own description.
    Own,
    /// The process's own lock, taken by the application (see [`LockFile::try_lock`]).
    Borrowed,
}

/// Who opens the lock file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opener {
    /// A connection of the extension: its descriptor is marked as the
    /// extension's (byte 2) and dropped by forked children.
    Extension,
    /// A tool (`writelock run`): an unmarked descriptor that the command it
    /// runs inherits on purpose, so the command's connections borrow it.
    Tool,
}

/// Counters of one lock file handle.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LockCounters {
    /// Looks through this process's descriptors for its own `flock`.
    pub scans: u64,
    /// Times it borrowed that lock.
    pub borrows: u64,
    /// Times it moved to a fresh `<db>.lock` (the old one was deleted or replaced).
    pub reopens: u64,
    /// Times it got the fresh file's flock but waited for a writer still
    /// holding the old one.
    pub split_waits: u64,
    /// Times it found the lock free but reserved for an older waiter.
    pub yields: u64,
}

/// An open `<db>.lock`, with its own open file description: two handles in
/// one process exclude each other just as two processes do.
pub struct LockFile {
    path: PathBuf,
    file: File,
    /// (device, inode) of the file open now.
    key: (u64, u64),
    /// Permission bits and owner for a file created anew.
    mode: u32,
    owner: Option<(u32, u32)>,
    opener: Opener,
    hold: Hold,
    /// The OFD locks this description holds, to move them with a reopen.
    shadow: Shadow,
    pending: bool,
    page: Option<Arc<Page>>,
    /// The process that opened it (a forked child must not act on it).
    pid: u32,
    /// The holder record this handle set on the page while it holds.
    record: u64,
    counters: LockCounters,
    /// The waiter slot the handle owns while it queues (see `wait`).
    queue_slot: Option<usize>,
    /// How long the oldest waiter may wait before a release of this handle
    /// reserves the lock for it.
    handoff_after: std::time::Duration,
    /// When the current hold began (monotonic, and ms since the epoch), for
    /// the ring of recent holds.
    held_since: Option<(std::time::Instant, u64)>,
    /// The database file, read-only, for [`DB_WRITER_BYTE`]; opened at the
    /// first hold (readers never need it). Its path, to open it.
    db: Option<File>,
    db_path: PathBuf,
    /// [`DB_WRITER_BYTE`] is held now.
    db_marked: bool,
    /// [`DB_ATTACHED_BYTE`] is held now.
    db_attached: bool,
    /// The handle is in WAL mode: no [`DB_WRITER_BYTE`] (see [`Self::set_wal`]).
    wal: bool,
}

/// Identifies this copy of the extension in this process in the holder
/// record (16 random bits; 0 until first needed).
static TOKEN: AtomicU32 = AtomicU32::new(0);

fn token() -> u32 {
    let t = TOKEN.load(Ordering::Relaxed);
    if t != 0 {
        return t;
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(process::pid());
    let fresh = (h.finish() as u32 & 0xFFFF).max(1);
    match TOKEN.compare_exchange(0, fresh, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => fresh,
        Err(t) => t,
    }
}

use crate::sys;

/// Record this process as borrowing holder. The record seen before the look
/// through the descriptors may have changed since: a holder letting go
/// clears its marked record, a dead one's may be taken over. Either is
/// replaced; a live holder's unmarked record is not (the application let go
/// meanwhile and the extension elsewhere took the lock).
fn claim_borrowed(
    p: &Page,
    mut seen: Option<HolderRecord>,
    me: u32,
    file: (u64, u64),
) -> Option<u64> {
    for _ in 0..8 {
        if let Some(w) = p.claim(seen, me, token(), flags::BORROWED, file) {
            return Some(w);
        }
        seen = p.holder();
        if let Some(h) = seen {
            let letting_go = h.flags & flags::RELEASING != 0;
            if !letting_go && p.liveness(&h) != Liveness::Dead {
                return None;
            }
        }
    }
    None
}

/// What a look through this process's descriptors found on one lock file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// A descriptor that is not the extension's holds the `flock`: the
    /// application's own lock (or one inherited from `flock(1)`).
    pub application_holds: bool,
    /// A descriptor of the extension (any copy) holds it.
    pub extension_holds: bool,
    /// The application has a descriptor of the lock file open, locked or not.
    pub application_open: bool,
}

/// What the `lock:` lines of a descriptor's `/proc/<pid>/fdinfo/<fd>` say
/// about the open file description of a `<db>.lock`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FdLocks {
    /// It holds the exclusive `flock` (`LOCK_EX`).
    pub flock: bool,
    /// It is the extension's: it holds the OFD read lock on
    /// [`MARKER_BYTE`] that every descriptor of the extension holds for life.
    pub marked: bool,
}

/// Parse the `lock:` lines of an fdinfo text (any process's: tools read
/// other processes' with the same rule the extension applies to its own).
pub fn fd_locks(fdinfo: &str) -> FdLocks {
    let mut found = FdLocks::default();
    let m = MARKER_BYTE.to_string();
    for l in fdinfo.lines().filter_map(|l| l.strip_prefix("lock:")) {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK ADVISORY WRITE pid dev:ino 0 EOF"
        // "2: OFDLCK ADVISORY READ -1 dev:ino 2 2"
        match f.get(1..4) {
            Some(["FLOCK", _, "WRITE"]) => found.flock = true,
            Some(["OFDLCK", _, _])
                if f.get(6) == Some(&m.as_str()) && f.get(7) == Some(&m.as_str()) =>
            {
                found.marked = true
            }
            _ => {}
        }
    }
    found
}

/// Look through `/proc/self/fd` for descriptors on the file `key` whose open
/// file description holds `LOCK_EX`, telling the extension's (marked with a
/// read lock on [`MARKER_BYTE`]) from the application's. Descriptors in
/// `skip` (this copy's own, from the registry) are passed over unread. No
/// process-wide lock is held meanwhile: a descriptor closed or reused under
/// the look is at worst misjudged for an instant (and then found again on the
/// next look).
pub fn scan(key: (u64, u64), skip: &std::collections::HashSet<RawFd>) -> Scan {
    let mut found = Scan::default();
    let mut seen_app = false;
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return found;
    };
    for e in dir.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else {
            continue;
        };
        if skip.contains(&fd) || sys::fstat(fd).is_none_or(|(d, i, _)| (d, i) != key) {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
            continue;
        };
        let l = fd_locks(&info);
        if l.marked {
            found.extension_holds |= l.flock;
        } else {
            found.application_holds |= l.flock;
            seen_app = true;
        }
    }
    found.application_open = seen_app;
    found
}

fn ofd(byte: i64, l_type: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0, // F_OFD_* requires 0
    }
}

/// Open (creating) the lock file at `path` with `mode`: no symlinks
/// (`O_NOFOLLOW`), regular files only; a new file gets `mode` despite the
/// umask, and the database's owner when we are root. An extension's
/// descriptor is registered the moment it exists (see `process`): a `fork()`
/// right after would otherwise leave the child holding the description whose
/// locks the parent takes next.
fn open_file(
    path: &Path,
    mode: u32,
    owner: Option<(u32, u32)>,
    opener: Opener,
) -> Result<File, LockError> {
    let file = match open_beside(path, mode) {
        Ok(f) => f,
        // A tool may lock a file it can only read, as `flock(1)` does: a
        // backup run by a user who may read the database but not write it.
        // (`flock` needs no write access; a connection's OFD write locks do.)
        Err(e) if opener == Opener::Tool && read_only_would_do(&e) => open_existing_read_only(path)
            .map_err(|_| LockError::Open {
                path: path.to_path_buf(),
                source: e,
            })?,
        Err(source) => {
            return Err(LockError::Open {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if opener == Opener::Extension {
        process::register_fd(file.as_raw_fd());
    }
    match check_new_file(&file, path, mode, owner) {
        Ok(()) => Ok(file),
        Err(e) => {
            close_file(file, opener);
            Err(e)
        }
    }
}

/// Open one of our files beside the database (`<db>.lock`, its page) for
/// reading and writing, creating it with `mode`: never through a symlink
/// (`O_NOFOLLOW`), and never blocking on a FIFO someone put there
/// (`O_NONBLOCK`). The caller checks what it opened.
pub(crate) fn open_beside(path: &Path, mode: u32) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// Whether a failed read-write open of an existing lock file may be
/// retried read-only: no permission to write it, or a read-only filesystem.
fn read_only_would_do(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS)
    )
}

/// An existing lock file, read-only, with [`open_beside`]'s care (no
/// symlinks, no blocking on a FIFO); never created.
fn open_existing_read_only(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// What [`open_file`] checks and fixes once the file is open.
fn check_new_file(
    file: &File,
    path: &Path,
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), LockError> {
    let meta = file.metadata().map_err(|source| LockError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(LockError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(ft),
        });
    }
    // As SQLite does for journals: a new (empty) lock file gets the
    // database's mode despite the umask, and its owner when we are root,
    // so every user who may write the database may also lock it.
    if meta.len() == 0 && meta.mode() & 0o777 != mode {
        use std::os::unix::fs::PermissionsExt;
        let _ = file.set_permissions(std::fs::Permissions::from_mode(mode));
    }
    if let Some((uid, gid)) = owner {
        if nix::unistd::geteuid().is_root() && (meta.uid(), meta.gid()) != (uid, gid) {
            let _ = std::os::unix::fs::fchown(file, Some(uid), Some(gid));
        }
    }
    Ok(())
}

/// Close a descriptor of ours: let go of every OFD lock its description
/// holds, unregister it, close it — in that order, so that a `fork()` at any
/// moment leaves the child either an inert duplicate or a description
/// holding nothing.
fn close_file(f: File, opener: Opener) {
    if opener == Opener::Extension {
        unlock_all_ofd(&f);
        process::forget_fd(f.as_raw_fd());
    }
    drop(f);
}

/// Let go of every OFD lock `f`'s description holds (only ever on a
/// description this process opened: in a forked child it may be the
/// parent's).
fn unlock_all_ofd(f: &File) {
    let all = libc::flock {
        l_type: libc::F_UNLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0, // to the end, and beyond
        l_pid: 0,
    };
    let _ = nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_OFD_SETLK(&all));
}

impl LockFile {
    /// Open (creating if needed) the lock file for `db_path`, for a
    /// connection of the extension.
    pub fn open(db_path: &Path) -> Result<LockFile, LockError> {
        LockFile::open_as(db_path, Opener::Extension)
    }

    /// Open (creating if needed) the lock file for `db_path`.
    ///
    /// Refuses symlinks (`O_NOFOLLOW`) and anything that is not a regular file.
    /// A new file gets the permission bits of the database file, as SQLite does
    /// for its journals.
    pub fn open_as(db_path: &Path, opener: Opener) -> Result<LockFile, LockError> {
        let path = lock_path_for(db_path);
        let db_meta = std::fs::metadata(db_path).ok();
        let mode = db_meta.as_ref().map(|m| m.mode() & 0o777).unwrap_or(0o644);
        let owner = db_meta.as_ref().map(|m| (m.uid(), m.gid()));
        let file = open_file(&path, mode, owner, opener)?;
        let mut lf = LockFile {
            key: (0, 0),
            path,
            file,
            mode,
            owner,
            opener,
            hold: Hold::No,
            shadow: Shadow::Unlocked,
            pending: false,
            page: None,
            pid: process::pid(),
            record: 0,
            counters: LockCounters::default(),
            queue_slot: None,
            handoff_after: std::time::Duration::from_millis(crate::options::DEFAULT_HANDOFF_MS),
            held_since: None,
            db: None,
            db_path: db_path.to_path_buf(),
            db_marked: false,
            db_attached: false,
            wal: false,
        };
        lf.adopt()?;
        lf.page = Page::for_lock_file(&lf.path, mode);
        Ok(lf)
    }

    /// Make `self.file` ours: note its identity, mark it as the extension's
    /// and register it (see `process`).
    fn adopt(&mut self) -> Result<(), LockError> {
        let (dev, ino, _) = sys::fstat(self.file.as_raw_fd()).ok_or_else(|| LockError::Open {
            path: self.path.clone(),
            source: io::Error::last_os_error(),
        })?;
        self.key = (dev, ino);
        if self.opener == Opener::Extension {
            self.ofd_lock(MARKER_BYTE, libc::F_RDLCK)?;
        }
        Ok(())
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (device, inode) of the lock file this handle has open.
    pub fn key(&self) -> (u64, u64) {
        self.key
    }

    /// The shared page of this database, if it could be opened.
    pub fn page(&self) -> Option<&Arc<Page>> {
        self.page.as_ref()
    }

    /// Counters of this handle's lock file work.
    pub fn counters(&self) -> LockCounters {
        self.counters
    }

    /// Whether this handle holds the exclusive lock now (or borrows it).
    pub fn is_held(&self) -> bool {
        self.hold != Hold::No
    }

    /// Whether this handle holds the lock by borrowing the process's own.
    pub fn is_borrowed(&self) -> bool {
        self.hold == Hold::Borrowed
    }

    /// Let child processes inherit the descriptor (clear `FD_CLOEXEC`), as
    /// `flock(1)` does: a child's own connections then borrow the lock.
    pub fn inherit_to_children(&self) -> Result<(), LockError> {
        use nix::fcntl::{FcntlArg, FdFlag};
        nix::fcntl::fcntl(&self.file, FcntlArg::F_SETFD(FdFlag::empty()))
            .map(drop)
            .map_err(|errno| self.flock_error(errno))
    }

    fn flock_error(&self, errno: Errno) -> LockError {
        LockError::Flock {
            path: self.path.clone(),
            errno,
        }
    }

    fn check_pid(&self) -> Result<(), LockError> {
        if !process::forked() {
            return Ok(()); // no fork() in this process since it started
        }
        let now = process::pid();
        if now != self.pid {
            return Err(LockError::Forked {
                path: self.path.clone(),
                opened_in: self.pid,
                used_in: now,
            });
        }
        Ok(())
    }

    /// Whether the holder record names a live holder of *another* lock file
    /// than ours: `<db>.lock` was deleted or replaced while that holder was a
    /// writer, and it still is. Newcomers on the fresh file must wait for it
    /// (it cannot see them, nor they its flock), so every check that asks
    /// "is the lock held elsewhere" also asks this.
    fn split_holder(&self) -> bool {
        let Some(h) = self.page.as_ref().and_then(|p| p.holder()) else {
            return false;
        };
        h.flags & flags::RELEASING == 0
            && h.file != (0, 0)
            && h.file != self.key
            && self
                .page
                .as_ref()
                .is_some_and(|p| p.liveness(&h) != Liveness::Dead)
    }

    /// Whether the file open here is no longer linked anywhere: `<db>.lock`
    /// was deleted, or replaced by a rename over it. (Renaming it *away* keeps
    /// it linked and is not noticed: do not do that.)
    fn is_stale(&self) -> bool {
        sys::fstat(self.file.as_raw_fd()).is_some_and(|(_, _, nlink)| nlink == 0)
    }

    /// Move to a fresh `<db>.lock` at the path: open (creating) it, take the
    /// OFD locks held on the old one, then close the old one. Holds no flock.
    fn reopen(&mut self) -> Result<(), LockError> {
        debug_assert!(self.hold == Hold::No);
        let fresh = open_file(&self.path, self.mode, self.owner, self.opener)?;
        let (old_file, old_key) = (std::mem::replace(&mut self.file, fresh), self.key);
        if let Err(e) = self.adopt() {
            // Keep the old file (still a valid lock, if a stale one).
            close_file(std::mem::replace(&mut self.file, old_file), self.opener);
            self.key = old_key;
            return Err(e);
        }
        // Best effort: the fresh file's lock holders are the new domain's
        // writers, and a reader or an attached WAL connection keeps its read
        // lock while none of them writes the database file.
        if self.shadow != Shadow::Unlocked {
            let t = if self.shadow == Shadow::Write {
                libc::F_WRLCK
            } else {
                libc::F_RDLCK
            };
            if !matches!(self.ofd_lock(SHADOW_BYTE, t), Ok(true)) {
                self.shadow = Shadow::Unlocked;
            }
        }
        if self.pending && !matches!(self.ofd_lock(PENDING_BYTE, libc::F_WRLCK), Ok(true)) {
            self.pending = false;
        }
        close_file(old_file, self.opener);
        self.counters.reopens += 1;
        Ok(())
    }

    /// A reader's check before it takes its shadow read lock: move to a
    /// fresh `<db>.lock` if the one open here was deleted or replaced.
    pub fn refresh(&mut self) -> Result<(), LockError> {
        if self.hold == Hold::No && self.is_stale() {
            self.reopen()?;
        }
        Ok(())
    }

    /// Try to take `LOCK_EX` without blocking: `Ok(true)` taken (or already
    /// held by this handle), `Ok(false)` someone else holds it.
    ///
    /// After taking it, the file must still be the one at the path (see
    /// [`Self::refresh`]); if not, the handle moves to the fresh file and
    /// tries there, so no write begins under a lock nobody else can see.
    ///
    /// When the holder is this very process through a descriptor that is not
    /// the extension's — the application's own `flock` around its write
    /// transactions, or one inherited from `flock(1)` or `writelock run` —
    /// the handle *borrows* that lock instead of waiting for itself (see
    /// [`Self::borrow`]).
    pub fn try_lock(&mut self) -> Result<bool, LockError> {
        self.take(false)
    }

    /// Take `LOCK_EX` for a tool, waiting for it in the kernel's queue as
    /// `flock(1)` does: while it waits, `/proc/locks` lists it as a blocked
    /// (`->`) waiter, and the kernel wakes it when the holder lets go, with
    /// no polling. `Ok(true)` taken (or already held by this handle);
    /// `Ok(false)` not taken: a signal interrupted the wait (`EINTR`: how a
    /// caller's timeout ends it), or a holder of a deleted or replaced lock
    /// file is still in its transaction (rare: the caller tries again after
    /// a pause).
    ///
    /// Like `flock(1)` and an application's own lock, it is not bound by a
    /// hand-off reserved for the extension's oldest waiter (see
    /// [`crate::wait::policy`]). It never borrows, and it sets the holder
    /// record and writes the ring like any holder.
    pub fn lock_blocking(&mut self) -> Result<bool, LockError> {
        self.take(true)
    }

    /// [`Self::try_lock`] (`block` false) or [`Self::lock_blocking`].
    fn take(&mut self, block: bool) -> Result<bool, LockError> {
        self.check_pid()?;
        if self.hold != Hold::No {
            return Ok(true);
        }
        if let Some(p) = self.page.as_ref().filter(|_| !block) {
            if !p.may_take(self.queue_slot) && p.application_fds() == Some(false) {
                // Reserved for the oldest waiter, and this process has no
                // lock of its own to borrow: not even a try (a try that
                // takes the lock and lets go sends others looking).
                self.counters.yields += 1;
                return Ok(false);
            }
        }
        let (mut reopens, mut spins) = (0, 0);
        let op = if block {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        loop {
            match sys::flock(self.file.as_raw_fd(), op) {
                Ok(()) => {
                    if self.split_holder() || !self.mark_writer() {
                        // A live holder of the deleted or replaced lock file
                        // is still in its transaction: wait for it.
                        let _ = sys::flock(self.file.as_raw_fd(), libc::LOCK_UN);
                        self.counters.split_waits += 1;
                        return Ok(false);
                    }
                    if let Some(p) = &self.page {
                        if !block && !p.may_take(self.queue_slot) {
                            // Reserved for the oldest waiter: not ours to take.
                            self.unmark_writer();
                            let _ = sys::flock(self.file.as_raw_fd(), libc::LOCK_UN);
                            self.counters.yields += 1;
                            return Ok(false);
                        }
                        // The record first: a contender refused from now on
                        // reads who holds the lock instead of looking
                        // through its process's descriptors.
                        let f = if self.opener == Opener::Tool {
                            flags::TOOL
                        } else {
                            0
                        };
                        self.record = p.set_holder(process::pid(), token(), f, self.key);
                        p.took(self.queue_slot);
                    }
                    if self.is_stale() {
                        if let Some(p) = &self.page {
                            p.clear_holder(self.record);
                        }
                        self.unmark_writer();
                        let _ = sys::flock(self.file.as_raw_fd(), libc::LOCK_UN);
                        reopens += 1;
                        if reopens > 3 {
                            return Ok(false);
                        }
                        self.reopen()?;
                        continue;
                    }
                    self.hold = Hold::Own;
                    self.note_start();
                    return Ok(true);
                }
                // Contended: do not move even if stale — the holder may be a
                // writer of the old file, and waiting for it keeps us apart.
                Err(Errno::EWOULDBLOCK) => {
                    // A holder of the extension letting go: free in a moment.
                    let releasing = self
                        .page
                        .as_ref()
                        .and_then(|p| p.holder())
                        .is_some_and(|h| h.flags & flags::RELEASING != 0);
                    if releasing && spins < 20 {
                        spins += 1;
                        std::thread::yield_now();
                        continue;
                    }
                    return self.borrow();
                }
                Err(Errno::EINTR) => return Ok(false),
                Err(errno) => return Err(self.flock_error(errno)),
            }
        }
    }

    /// The `flock` is held by someone else: if that is this process, through
    /// a descriptor that is not the extension's, borrow it. Other processes
    /// stay excluded by the application's lock, and at most one handle (of
    /// any copy of the extension in the process) borrows at a time: the
    /// borrower holds an OFD write lock on [`BORROW_BYTE`].
    ///
    /// The holder record on the shared page saves the look through the
    /// process's descriptors in the common cases: a holder of this copy in
    /// this process, or a live holder of the extension in another process.
    fn borrow(&mut self) -> Result<bool, LockError> {
        if self.opener == Opener::Tool {
            return Ok(false);
        }
        let me = process::pid();
        let seen = self.page.as_ref().and_then(|p| p.holder());
        if let Some(h) = seen {
            // A tool's lock may be this process's to borrow; a record of a
            // holder letting go says nothing about who holds it now.
            if h.flags & (flags::TOOL | flags::RELEASING) == 0 {
                let page = self.page.as_ref().expect("a record comes from the page");
                match page.liveness(&h) {
                    // Another handle of this copy, or the extension in
                    // another process (or another copy here): not ours.
                    Liveness::Mine | Liveness::Alive => return Ok(false),
                    Liveness::Dead => {}
                }
            }
        }
        self.counters.scans += 1;
        let found = scan(self.key, &process::registered_fds());
        if let Some(p) = &self.page {
            p.note_application_fds(found.application_open);
        }
        if !found.application_holds {
            return Ok(false);
        }
        if self.ofd_lock(BORROW_BYTE, libc::F_WRLCK)? {
            if !self.mark_writer() {
                // A writer of a deleted lock file is still in its transaction.
                let _ = self.ofd_lock(BORROW_BYTE, libc::F_UNLCK);
                self.counters.split_waits += 1;
                return Ok(false);
            }
            let claimed = match &self.page {
                None => true,
                Some(p) => match claim_borrowed(p, seen, me, self.key) {
                    Some(w) => {
                        self.record = w;
                        true
                    }
                    None => false,
                },
            };
            if claimed {
                self.hold = Hold::Borrowed;
                self.note_start();
                self.counters.borrows += 1;
                return Ok(true);
            }
            self.unmark_writer();
            let _ = self.ofd_lock(BORROW_BYTE, libc::F_UNLCK);
        }
        Ok(false)
    }

    /// The database file, read-only, for [`DB_WRITER_BYTE`] (opened once,
    /// and registered so that a forked child makes its copy inert). None
    /// for tools, or if it cannot be opened: the flock stays the lock, this
    /// is the second check for the case where its files were deleted.
    fn db_file(&mut self) -> Option<&File> {
        if self.opener != Opener::Extension || self.check_pid().is_err() {
            return None;
        }
        if self.db.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.db_path)
                .ok()?;
            process::register_fd(f.as_raw_fd());
            self.db = Some(f);
        }
        self.db.as_ref()
    }

    /// Take [`DB_WRITER_BYTE`] beside the flock just taken: `false` when a
    /// writer of another `<db>.lock` (deleted, with its page, in the middle
    /// of its transaction) holds it — the caller lets go and waits. A read
    /// lock (the descriptor is read-only), so the check is a look after
    /// taking it: of two writers of different lock files that take it at
    /// the same moment, both see the other and both wait a round.
    fn mark_writer(&mut self) -> bool {
        if self.wal {
            return true;
        }
        if !self.db_lock(DB_WRITER_BYTE, libc::F_RDLCK) {
            return true; // nothing to check with; the flock stays the lock
        }
        self.db_marked = true;
        if self.writer_elsewhere() {
            self.unmark_writer();
            return false;
        }
        true
    }

    /// Hold (or let go of) [`DB_ATTACHED_BYTE`] with the WAL attachment.
    fn mark_attached(&mut self, on: bool) {
        if on != self.db_attached {
            let ok = self.db_lock(
                DB_ATTACHED_BYTE,
                if on { libc::F_RDLCK } else { libc::F_UNLCK },
            );
            self.db_attached = on && ok;
        }
    }

    /// Let go of [`DB_WRITER_BYTE`] if held.
    fn unmark_writer(&mut self) {
        if std::mem::take(&mut self.db_marked) {
            self.db_lock(DB_WRITER_BYTE, libc::F_UNLCK);
        }
    }

    /// Set (or clear) this handle's OFD lock on `byte` of the database:
    /// whether it was done (not without a descriptor of the database).
    fn db_lock(&mut self, byte: i64, l_type: libc::c_int) -> bool {
        let Some(f) = self.db_file() else {
            return false;
        };
        nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_OFD_SETLK(&ofd(byte, l_type))).is_ok()
    }

    /// Whether another open file description holds a lock on `byte` of the
    /// database (asked with `F_OFD_GETLK`, which takes nothing).
    fn db_held_elsewhere(&mut self, byte: i64) -> bool {
        let Some(f) = self.db_file() else {
            return false;
        };
        let mut fl = ofd(byte, libc::F_WRLCK);
        nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut fl))
            .is_ok_and(|_| fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    /// In WAL mode a writer takes no [`DB_WRITER_BYTE`]: SQLite's own write
    /// lock lives in the WAL index (`-shm`), which a stray `close()` of the
    /// database does not cancel, so a writer of a fresh lock file is still
    /// refused by SQLite there. Rollback modes need it (their locks are on
    /// the database file).
    pub fn set_wal(&mut self, wal: bool) {
        self.wal = wal;
        let attached = wal && self.shadow != Shadow::Unlocked;
        self.mark_attached(attached);
    }

    /// Whether another open file description holds [`DB_WRITER_BYTE`] of the
    /// database: a writer of the extension, whatever lock file it holds.
    fn writer_elsewhere(&mut self) -> bool {
        self.db_held_elsewhere(DB_WRITER_BYTE)
    }

    /// Note when the hold began, as the holder record says (tools match the
    /// ring's entry to the record they saw by it).
    fn note_start(&mut self) {
        let ms = self
            .page
            .as_ref()
            .map_or_else(crate::page::now_ms, |p| p.holder_since_ms());
        self.held_since = Some((std::time::Instant::now(), ms));
    }

    /// Drop the lock if held, clearing the holder record first and waking
    /// the oldest waiter after. In a forked child the descriptor is the
    /// parent's, so nothing is done.
    pub fn unlock(&mut self) {
        if self.check_pid().is_err() {
            return;
        }
        let was = std::mem::replace(&mut self.hold, Hold::No);
        if was == Hold::No {
            return;
        }
        self.unmark_writer();
        if let (Some(p), Some((t0, start_ms))) = (&self.page, self.held_since.take()) {
            // Still holding: holders write the ring one at a time.
            let f = match (was, self.opener) {
                (Hold::Borrowed, _) => flags::BORROWED,
                (_, Opener::Tool) => flags::TOOL,
                _ => 0,
            };
            p.ring_push(process::pid(), f, start_ms, t0.elapsed());
        }
        if was == Hold::Borrowed {
            // The application still holds its lock: nobody to wake.
            if let Some(p) = &self.page {
                p.clear_holder(self.record);
            }
            let _ = self.ofd_lock(BORROW_BYTE, libc::F_UNLCK);
            return;
        }
        // The record is marked as letting go before LOCK_UN and cleared
        // after (if nobody took the lock meanwhile): a contender that finds
        // the lock held and the record set, unmarked, knows the holder is no
        // application of its own without looking through its descriptors.
        // LOCK_UN on a valid descriptor does not fail; if it ever did,
        // close() releases it.
        let marked = self.page.as_ref().map(|p| p.releasing(self.record));
        let _ = sys::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        if let (Some(p), Some(w)) = (&self.page, marked) {
            p.clear_holder(w);
            p.wake_next(self.handoff_after.as_nanos() as u64);
        }
    }

    /// Let go as `flock(1)` does when its command inherited the descriptor:
    /// by closing it, not by `LOCK_UN`. The lock belongs to the open file
    /// description, which the command's children may share: a process the
    /// command left running (a daemon it started) keeps the lock until it
    /// exits or closes its copy, and its own connections, which may be
    /// borrowing the lock mid-transaction, are not robbed of it. With no
    /// copy left, the close releases it at once. The holder record and the
    /// ring are written as by [`Self::unlock`], and the oldest waiter is
    /// woken after the close.
    pub fn close(mut self) {
        if self.check_pid().is_err() || self.hold != Hold::Own {
            return; // dropped: unlocks as usual (or does nothing if forked)
        }
        self.hold = Hold::No;
        let pid = process::pid();
        let page = self.page.clone();
        let handoff = self.handoff_after;
        let mut marked = None;
        if let Some(p) = &page {
            if let Some((t0, start_ms)) = self.held_since.take() {
                let f = if self.opener == Opener::Tool {
                    flags::TOOL
                } else {
                    0
                };
                p.ring_push(pid, f, start_ms, t0.elapsed());
            }
            marked = Some(p.releasing(self.record));
        }
        // Holds nothing now as far as `Drop` knows: it only closes.
        drop(self);
        if let (Some(p), Some(w)) = (page, marked) {
            p.clear_holder(w);
            p.wake_next(handoff.as_nanos() as u64);
        }
    }

    /// Set the open-file-description lock on the shadow byte without
    /// blocking: `Ok(false)` when another handle's lock conflicts.
    ///
    /// OFD locks (`F_OFD_SETLK`, Linux) belong to this handle's own open file
    /// description: unlike SQLite's POSIX locks they survive `close()` of any
    /// other descriptor in the process, two handles in one process conflict
    /// like two processes, and on local filesystems they are independent of
    /// `flock()`, so the `flock(1)` contract on `<db>.lock` is unchanged. A
    /// failed upgrade leaves the read lock in place.
    pub fn shadow(&mut self, to: Shadow) -> Result<bool, LockError> {
        let l_type = match to {
            Shadow::Unlocked => libc::F_UNLCK,
            Shadow::Read => libc::F_RDLCK,
            Shadow::Write => libc::F_WRLCK,
        };
        // Whatever this handle's mode: a newcomer in `locking_mode=EXCLUSIVE`
        // never maps `-shm`, yet takes EXCLUSIVE on a WAL database.
        if to == Shadow::Write
            && self.shadow != Shadow::Write
            && self.db_held_elsewhere(DB_ATTACHED_BYTE)
        {
            return Ok(false);
        }
        let ok = self.ofd_lock(SHADOW_BYTE, l_type)?;
        if ok {
            if self.wal {
                self.mark_attached(to != Shadow::Unlocked);
            }
            let from = std::mem::replace(&mut self.shadow, to);
            if from == Shadow::Write && to < from {
                self.open_gate(Gate::Readers);
            } else if from == Shadow::Read && to == Shadow::Unlocked {
                self.open_gate(Gate::Writer);
            }
        }
        Ok(ok)
    }

    /// Take (`true`) or drop the OFD write lock on the pending byte.
    pub fn pending(&mut self, on: bool) -> Result<bool, LockError> {
        let ok = self.ofd_lock(PENDING_BYTE, if on { libc::F_WRLCK } else { libc::F_UNLCK })?;
        if ok {
            let dropped = self.pending && !on;
            self.pending = on;
            if dropped {
                self.open_gate(Gate::Readers);
            }
        }
        Ok(ok)
    }

    /// A shadow lock or the pending marker was let go: wake whoever waits
    /// at the page's gate for that.
    fn open_gate(&self, g: Gate) {
        if let Some(p) = &self.page {
            p.gate_open(g);
        }
    }

    /// Note the waiter slot the handle owns (None when it stops queueing).
    pub fn set_queue_slot(&mut self, slot: Option<usize>) {
        self.queue_slot = slot;
    }

    /// How long the oldest waiter may wait before a release of this handle
    /// reserves the lock for it (`writelock_handoff_ms`).
    pub fn set_handoff_after(&mut self, d: std::time::Duration) {
        self.handoff_after = d;
    }

    /// Whether another handle holds the pending byte (a writer waits for
    /// EXCLUSIVE). Asks with `F_OFD_GETLK`, which takes nothing. A writer of
    /// a deleted or replaced lock file counts too (see `split_holder`):
    /// readers wait for it.
    pub fn pending_elsewhere(&mut self) -> Result<bool, LockError> {
        Ok(self.ofd_conflicts(PENDING_BYTE)? || self.split_holder())
    }

    /// Whether a shadow read lock would be refused now: a writer waits for
    /// or holds EXCLUSIVE (pending byte or shadow write lock elsewhere).
    pub fn read_blocked(&mut self) -> Result<bool, LockError> {
        Ok(self.pending_elsewhere()? || self.ofd_conflicts(SHADOW_BYTE)?)
    }

    /// Whether another description's OFD lock on `byte` refuses a read lock.
    fn ofd_conflicts(&mut self, byte: i64) -> Result<bool, LockError> {
        self.check_pid()?;
        let mut fl = ofd(byte, libc::F_RDLCK);
        nix::fcntl::fcntl(&self.file, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut fl))
            .map(|_| fl.l_type != libc::F_UNLCK as libc::c_short)
            .map_err(|errno| self.flock_error(errno))
    }

    fn ofd_lock(&mut self, byte: i64, l_type: libc::c_int) -> Result<bool, LockError> {
        self.check_pid()?;
        let fl = ofd(byte, l_type);
        match nix::fcntl::fcntl(&self.file, nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)) {
            Ok(_) => Ok(true),
            Err(Errno::EAGAIN) | Err(Errno::EACCES) | Err(Errno::EINTR) => Ok(false),
            Err(errno) => Err(self.flock_error(errno)),
        }
    }

    /// Whether another open file description holds `LOCK_EX` now, or a
    /// writer of a deleted lock file is still in its transaction (it holds
    /// [`DB_WRITER_BYTE`]). Probes with `LOCK_SH|LOCK_NB`, released at once;
    /// used only on the rare hot-journal path.
    pub fn held_elsewhere(&mut self) -> Result<bool, LockError> {
        self.check_pid()?;
        if self.hold != Hold::No {
            return Ok(false);
        }
        let fd = self.file.as_raw_fd();
        match sys::flock(fd, libc::LOCK_SH | libc::LOCK_NB) {
            Ok(()) => {
                let _ = sys::flock(fd, libc::LOCK_UN);
                Ok(self.split_holder() || self.writer_elsewhere())
            }
            Err(Errno::EWOULDBLOCK) => Ok(true),
            Err(errno) => Err(self.flock_error(errno)),
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        let mine = self.check_pid().is_ok();
        if mine {
            self.unlock();
        }
        // Let go of the OFD locks, unregister, then close (when the field
        // drops): a fork at any moment leaves the child an inert duplicate
        // or a description holding nothing. In a forked child the
        // descriptor is an inert duplicate (see `process`), or the parent's
        // description, which it must not touch. The file itself is never
        // unlinked.
        if self.opener == Opener::Extension {
            if mine {
                unlock_all_ofd(&self.file);
            }
            process::forget_fd(self.file.as_raw_fd());
            if let Some(db) = self.db.take() {
                if mine {
                    unlock_all_ofd(&db);
                }
                process::forget_fd(db.as_raw_fd());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "wl-lockfile-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn app_lock(db: &Path) -> File {
        let f = File::open(lock_path_for(db)).unwrap();
        sys::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB).unwrap();
        f
    }

    #[test]
    fn two_handles_exclude_each_other() {
        let db = tmp().join("a.db");
        let mut a = LockFile::open(&db).unwrap();
        let mut b = LockFile::open(&db).unwrap();
        assert!(a.try_lock().unwrap());
        assert!(!b.try_lock().unwrap());
        assert!(b.held_elsewhere().unwrap());
        assert_eq!(b.counters().scans, 0, "the holder record said who holds it");
        a.unlock();
        assert!(!b.held_elsewhere().unwrap());
        assert!(b.try_lock().unwrap());
        drop(b);
        assert!(a.try_lock().unwrap());
        assert!(
            lock_path_for(&db).exists(),
            "the lock file is never deleted"
        );
    }

    #[test]
    fn a_tool_waits_in_the_kernels_queue_and_lets_go_by_closing() {
        let db = tmp().join("w.db");
        let mut a = LockFile::open(&db).unwrap();
        assert!(a.try_lock().unwrap());
        let name = crate::holder::kernel_name(&lock_path_for(&db)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let db2 = db.clone();
        let t = std::thread::spawn(move || {
            let mut b = LockFile::open_as(&db2, Opener::Tool).unwrap();
            let taken = b.lock_blocking().unwrap();
            tx.send(()).unwrap();
            (b, taken)
        });
        // Blocked in flock(2): the kernel lists it as a waiter.
        let t0 = std::time::Instant::now();
        loop {
            let text = crate::holder::read_proc_locks().unwrap();
            if crate::holder::flock_waiters_in(&text, &name).contains(&process::pid()) {
                break;
            }
            assert!(t0.elapsed().as_secs() < 10, "no blocked waiter:\n{text}");
            std::thread::yield_now();
        }
        assert!(rx.try_recv().is_err(), "still waiting");
        a.unlock();
        let (b, taken) = t.join().unwrap();
        assert!(taken && b.is_held());
        let rec = b.page().unwrap().holder().unwrap();
        assert_eq!(rec.flags & flags::TOOL, flags::TOOL, "{rec:?}");
        assert!(a.held_elsewhere().unwrap());
        b.close();
        assert!(!a.held_elsewhere().unwrap(), "closed: nothing else had it");
        let snap = crate::page::peek(&lock_path_for(&db)).unwrap();
        assert_eq!(snap.holder, None, "the record is cleared");
        let last = snap.recent.last().copied().unwrap();
        assert!(
            last.flags & flags::TOOL != 0 && last.pid == process::pid(),
            "the tool's hold is in the ring: {last:?}"
        );
    }

    #[test]
    fn new_lock_file_takes_the_database_mode_despite_umask() {
        use std::os::unix::fs::PermissionsExt;
        let db = tmp().join("m.db");
        std::fs::write(&db, b"").unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o664)).unwrap();
        let _l = LockFile::open(&db).unwrap();
        let m = std::fs::metadata(lock_path_for(&db)).unwrap().mode() & 0o777;
        assert_eq!(m, 0o664);
    }

    #[test]
    fn shadow_locks_conflict_between_handles() {
        let db = tmp().join("s.db");
        let mut a = LockFile::open(&db).unwrap();
        let mut b = LockFile::open(&db).unwrap();
        assert!(a.shadow(Shadow::Read).unwrap());
        assert!(b.shadow(Shadow::Read).unwrap());
        assert!(!a.shadow(Shadow::Write).unwrap(), "b reads");
        assert!(b.shadow(Shadow::Unlocked).unwrap());
        assert!(a.shadow(Shadow::Write).unwrap());
        assert!(!b.shadow(Shadow::Read).unwrap(), "a writes");
        // The pending byte: seen by others, not by its holder.
        assert!(a.pending(true).unwrap());
        assert!(b.pending_elsewhere().unwrap() && !a.pending_elsewhere().unwrap());
        assert!(a.pending(false).unwrap());
        assert!(!b.pending_elsewhere().unwrap());
        // Independent of flock: the flock(1) contract is untouched.
        assert!(b.try_lock().unwrap());
        // A close() of another descriptor on the file does not drop OFD locks.
        drop(File::open(lock_path_for(&db)).unwrap());
        assert!(!b.shadow(Shadow::Read).unwrap(), "a still writes");
    }

    #[test]
    fn borrows_the_process_own_flock_but_not_another_handles() {
        let db = tmp().join("b.db");
        let mut a = LockFile::open(&db).unwrap();
        let mut b = LockFile::open(&db).unwrap();
        let app = app_lock(&db);
        assert!(a.try_lock().unwrap(), "borrows the process's own lock");
        assert!(a.is_borrowed());
        assert!(!b.try_lock().unwrap(), "only one handle borrows at a time");
        a.unlock();
        assert!(b.try_lock().unwrap() && b.is_borrowed());
        b.unlock();
        drop(app);
        assert!(
            a.try_lock().unwrap() && !a.is_borrowed(),
            "a real lock once the app let go"
        );
        assert!(!b.try_lock().unwrap(), "a real holder is not borrowed from");
    }

    #[test]
    fn the_application_lock_is_found_whenever_it_is_taken() {
        let db = tmp().join("r.db");
        let mut c = LockFile::open(&db).unwrap();
        for _ in 0..5 {
            assert!(c.try_lock().unwrap() && !c.is_borrowed());
            c.unlock();
            let app = app_lock(&db);
            assert!(c.try_lock().unwrap() && c.is_borrowed());
            c.unlock();
            drop(app);
        }
        assert_eq!(c.counters().borrows, 5);
    }

    #[test]
    fn the_extensions_descriptors_are_marked() {
        let db = tmp().join("k.db");
        let mut a = LockFile::open(&db).unwrap();
        assert!(a.try_lock().unwrap());
        let none = Default::default();
        let s = scan(a.key(), &none);
        assert!(s.extension_holds && !s.application_holds, "{s:?}");
        let s = scan(a.key(), &process::registered_fds());
        assert_eq!(s, Scan::default(), "this copy's own are passed over");
        a.unlock();
        let app = app_lock(&db);
        let s = scan(a.key(), &none);
        assert!(!s.extension_holds && s.application_holds, "{s:?}");
        drop(app);
    }

    #[test]
    fn fdinfo_lock_lines_tell_the_extensions_descriptors() {
        let ours = "pos:\t0\nflags:\t02100002\nmnt_id:\t30\nino:\t77\n\
                    lock:\t1: FLOCK  ADVISORY  WRITE 42 fd:01:77 0 EOF\n\
                    lock:\t2: OFDLCK ADVISORY  READ  -1 fd:01:77 2 2\n";
        assert_eq!(
            fd_locks(ours),
            FdLocks {
                flock: true,
                marked: true
            }
        );
        let app = "flags:\t02\nlock:\t1: FLOCK  ADVISORY  WRITE 42 fd:01:77 0 EOF\n\
                   lock:\t2: OFDLCK ADVISORY  READ  -1 fd:01:77 0 0\n";
        assert_eq!(
            fd_locks(app),
            FdLocks {
                flock: true,
                marked: false
            },
            "a read lock on another byte is no marker"
        );
        assert_eq!(fd_locks("flags:\t02\n"), FdLocks::default());
    }

    #[test]
    fn a_deleted_or_replaced_lock_file_is_left_for_the_one_at_the_path() {
        let db = tmp().join("d.db");
        let lp = lock_path_for(&db);
        let mut a = LockFile::open(&db).unwrap();
        assert!(a.shadow(Shadow::Read).unwrap());
        std::fs::remove_file(&lp).unwrap();
        // A newcomer locks the new file (this process's application, so
        // the handle borrows it — on the new file, not the deleted one).
        let other = File::options()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&lp)
            .unwrap();
        sys::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB).unwrap();
        assert!(a.try_lock().unwrap() && a.is_borrowed());
        assert_eq!(a.counters().reopens, 1);
        let ino = std::fs::metadata(&lp).unwrap().ino();
        assert_eq!(a.key().1, ino, "moved to the file at the path");
        assert_eq!(a.shadow, Shadow::Read, "with its read lock");
        a.unlock();
        drop(other);
        assert!(a.try_lock().unwrap() && !a.is_borrowed());
        a.unlock();
        // Replaced by a rename over it.
        let tmpf = lp.with_extension("new");
        std::fs::write(&tmpf, b"").unwrap();
        std::fs::rename(&tmpf, &lp).unwrap();
        assert!(a.try_lock().unwrap());
        assert_eq!(a.key().1, std::fs::metadata(&lp).unwrap().ino());
        assert_eq!(a.counters().reopens, 2);
    }

    #[test]
    fn a_database_path_resolves_as_sqlite_resolves_it() {
        let d = tmp();
        std::fs::create_dir(d.join("real")).unwrap();
        std::fs::write(d.join("real/app.db"), b"").unwrap();
        std::os::unix::fs::symlink(d.join("real/app.db"), d.join("link.db")).unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("dirlink")).unwrap();
        let real = std::fs::canonicalize(d.join("real/app.db")).unwrap();
        assert_eq!(resolve_db_path(&d.join("link.db")).unwrap(), real);
        assert_eq!(resolve_db_path(&d.join("dirlink/app.db")).unwrap(), real);
        let new = resolve_db_path(&d.join("dirlink/new.db")).unwrap();
        assert_eq!(new, real.with_file_name("new.db"), "not created");
        assert!(!new.exists());
        // A link to a database that does not exist yet: where SQLite creates it.
        std::os::unix::fs::symlink("real/later.db", d.join("later.db")).unwrap();
        assert_eq!(
            resolve_db_path(&d.join("later.db")).unwrap(),
            real.with_file_name("later.db")
        );
        assert_eq!(
            resolve_db_path(&d.join("real/../link.db")).unwrap(),
            real,
            "dot-dot after a real directory"
        );
    }

    #[test]
    fn refuses_directory_symlink_and_fifo() {
        let d = tmp();
        std::fs::create_dir(d.join("dir.db.lock")).unwrap();
        let e = LockFile::open(&d.join("dir.db")).err().unwrap();
        assert!(e.to_string().contains("dir.db.lock"), "{e}");
        assert!(e.to_string().contains("directory"), "{e}");

        std::fs::write(d.join("target"), b"").unwrap();
        std::os::unix::fs::symlink(d.join("target"), d.join("ln.db.lock")).unwrap();
        let e = LockFile::open(&d.join("ln.db")).err().unwrap();
        assert!(e.to_string().contains("symlink"), "{e}");

        nix::unistd::mkfifo(&d.join("fifo.db.lock"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = LockFile::open(&d.join("fifo.db")).err().unwrap();
        assert!(e.to_string().contains("FIFO"), "{e}");
    }
}
