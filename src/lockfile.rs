//! The side file `<db>.lock` and the exclusive `flock()` on it.
//!
//! Pure Rust, no SQLite: opening the file safely, taking and dropping the lock,
//! and errors that name the path and the cause. The name `<db>.lock` is a public
//! contract: `flock(1)` scripts and applications that lock it exclude, and are
//! excluded by, every connection of this extension.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, Once};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::libc;
use nix::unistd::Pid;

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
        opened_in: i32,
        used_in: i32,
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

/// Byte of `<db>.lock` that carries the OFD "shadow" of SQLite's SHARED /
/// EXCLUSIVE locks. The file stays empty; locks beyond EOF are fine.
const SHADOW_BYTE: i64 = 0;

/// Byte of `<db>.lock` that shadows SQLite's PENDING lock: held (OFD write
/// lock) by a writer waiting for EXCLUSIVE, so that new readers wait instead
/// of starving it.
const PENDING_BYTE: i64 = 1;

/// The OFD shadow lock a handle holds (see [`LockFile::shadow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shadow {
    /// None held.
    Unlocked,
    /// Shared: this handle is attached/reading.
    Read,
    /// Exclusive: this handle writes the database file.
    Write,
}

enum State {
    Unlocked(File),
    Locked(Flock<File>),
    /// Only while a state transition is in flight; never observed between calls.
    Transit,
}

/// An open `<db>.lock`, with its own open file description: two handles in
/// one process exclude each other just as two processes do.
pub struct LockFile {
    path: PathBuf,
    /// (device, inode): the key of [`OURS`].
    key: (u64, u64),
    state: State,
    /// Holding by borrowing the process's own lock (see [`LockFile::try_lock`]).
    borrowed: bool,
    /// When this handle last looked for the process's own lock (see
    /// [`BORROW_RESCAN`]).
    last_scan: Option<Instant>,
    pid: i32,
}

/// What this process's handles have: how many hold (or borrow) each lock
/// file now, and every descriptor they opened on lock files (their own and
/// waiter threads' duplicates), which a scan for the *application's* lock
/// must not mistake for it.
#[derive(Default)]
struct Ours {
    held: HashMap<(u64, u64), u32>,
    fds: HashSet<RawFd>,
}

static OURS: LazyLock<Mutex<Ours>> = LazyLock::new(Default::default);

fn ours() -> std::sync::MutexGuard<'static, Ours> {
    OURS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A contended handle looks for the process's own lock (a scan of
/// `/proc/self/fd`, tens of microseconds) at most this often. The first
/// contended attempt of a handle always looks; an application that takes its
/// own lock later is found within this long plus one busy-handler sleep.
pub const BORROW_RESCAN: Duration = Duration::from_millis(250);

/// Set in the child of a `fork()` (a `pthread_atfork` handler), so the fork
/// check costs an atomic load instead of a `getpid()` on every lock call.
static FORKED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_fork_child() {
    // Async-signal-safe: one atomic store.
    FORKED.store(true, Ordering::Relaxed);
}

fn watch_forks() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: FFI into libc with a handler that only stores an atomic.
        // The extension is loaded permanently (SQLITE_OK_LOAD_PERMANENTLY),
        // so the handler's code stays mapped for the life of the process.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(note_fork_child)) };
        if rc != 0 {
            // Without the handler, assume a fork may have happened: every
            // check then asks getpid(), as before.
            FORKED.store(true, Ordering::Relaxed);
        }
    });
}

/// A duplicate descriptor of a handle's lock file (see
/// [`LockFile::duplicate`]): registered as ours while open.
pub struct DupFd(Option<File>);

impl DupFd {
    /// Block in `flock(LOCK_EX)` until the description gets the lock. The
    /// lock then belongs to the handle too (same open file description);
    /// closing this duplicate later leaves it in place.
    pub fn lock_exclusive(&self) -> nix::Result<()> {
        #[allow(deprecated)] // nix's Flock would unlock on drop; we must not.
        nix::fcntl::flock(self.as_raw_fd(), FlockArg::LockExclusive)
    }

    /// `flock(LOCK_UN)`: release the description's lock (the handle's too).
    pub fn unlock(&self) {
        #[allow(deprecated)]
        let _ = nix::fcntl::flock(self.as_raw_fd(), FlockArg::Unlock);
    }
}

impl AsRawFd for DupFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_ref().map_or(-1, |f| f.as_raw_fd())
    }
}

impl Drop for DupFd {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            let fd = f.as_raw_fd();
            // Close first, then forget: a scan in between skips a number that
            // may be reused (misses a borrow for a moment — fails closed)
            // rather than seeing our own lock as the application's.
            drop(f);
            ours().fds.remove(&fd);
        }
    }
}

impl LockFile {
    /// Open (creating if needed) the lock file for `db_path`.
    ///
    /// Refuses symlinks (`O_NOFOLLOW`) and anything that is not a regular file.
    /// A new file gets the permission bits of the database file, as SQLite does
    /// for its journals.
    pub fn open(db_path: &Path) -> Result<LockFile, LockError> {
        watch_forks();
        let path = lock_path_for(db_path);
        let db_meta = std::fs::metadata(db_path).ok();
        let mode = db_meta.as_ref().map(|m| m.mode() & 0o777).unwrap_or(0o644);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(mode)
            // O_NONBLOCK: opening a FIFO someone put there must not hang us.
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|source| LockError::Open {
                path: path.clone(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| LockError::Open {
            path: path.clone(),
            source,
        })?;
        let ft = meta.file_type();
        if !ft.is_file() {
            let kind = if ft.is_dir() {
                "directory"
            } else if ft.is_fifo() {
                "FIFO"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_char_device() || ft.is_block_device() {
                "device"
            } else {
                "special file"
            };
            return Err(LockError::NotRegular { path, kind });
        }
        // As SQLite does for journals: a new (empty) lock file gets the
        // database's mode despite the umask, and its owner when we are root,
        // so every user who may write the database may also lock it.
        if meta.len() == 0 && meta.mode() & 0o777 != mode {
            use std::os::unix::fs::PermissionsExt;
            let _ = file.set_permissions(std::fs::Permissions::from_mode(mode));
        }
        if let Some(db) = &db_meta {
            if nix::unistd::geteuid().is_root() && (meta.uid(), meta.gid()) != (db.uid(), db.gid())
            {
                let _ = std::os::unix::fs::fchown(&file, Some(db.uid()), Some(db.gid()));
            }
        }
        ours().fds.insert(file.as_raw_fd());
        Ok(LockFile {
            path,
            key: (meta.dev(), meta.ino()),
            state: State::Unlocked(file),
            borrowed: false,
            last_scan: None,
            pid: std::process::id() as i32,
        })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this handle holds the exclusive lock now (or borrows it).
    pub fn is_held(&self) -> bool {
        self.borrowed || matches!(self.state, State::Locked(_))
    }

    /// A duplicate descriptor of the same open file description: a lock taken
    /// through it belongs to this handle too.
    pub fn duplicate(&self) -> std::io::Result<DupFd> {
        let mut o = ours();
        let f = self.file().try_clone()?;
        o.fds.insert(f.as_raw_fd());
        Ok(DupFd(Some(f)))
    }

    /// Let child processes inherit the descriptor (clear `FD_CLOEXEC`), as
    /// `flock(1)` does: a child's own connections then borrow the lock.
    pub fn inherit_to_children(&self) -> Result<(), LockError> {
        use nix::fcntl::{FcntlArg, FdFlag};
        nix::fcntl::fcntl(self.file(), FcntlArg::F_SETFD(FdFlag::empty()))
            .map(drop)
            .map_err(|errno| LockError::Flock {
                path: self.path.clone(),
                errno,
            })
    }

    /// Whether this handle holds the lock by borrowing the process's own.
    pub fn is_borrowed(&self) -> bool {
        self.borrowed
    }

    /// Whether another descriptor of *this process* holds `LOCK_EX` on the
    /// file: the application's own flock (a migration wrapping its writes in
    /// `flock(LOCK_EX)` while loading the extension), or one inherited from
    /// `flock(1)` running us. `/proc/self/fdinfo/N` lists the locks owned by
    /// the open file description behind descriptor N. Descriptors of our
    /// own handles (`ours`) are skipped: their lock is never the application's.
    fn process_holds_it(&self, ours: &HashSet<RawFd>) -> bool {
        let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
            return false;
        };
        fds.flatten().any(|e| {
            let name = e.file_name();
            let Some(fd) = name.to_str().and_then(|n| n.parse::<RawFd>().ok()) else {
                return false;
            };
            !ours.contains(&fd)
                && std::fs::metadata(e.path()).is_ok_and(|m| (m.dev(), m.ino()) == self.key)
                && std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).is_ok_and(|info| {
                    info.lines().any(|l| {
                        l.starts_with("lock:") && l.contains("FLOCK") && l.contains("WRITE")
                    })
                })
        })
    }

    /// Whether a contended attempt should look for the process's own lock now.
    fn scan_due(&mut self) -> bool {
        let now = Instant::now();
        if self.last_scan.is_some_and(|t| now - t < BORROW_RESCAN) {
            return false;
        }
        self.last_scan = Some(now);
        true
    }

    fn check_pid(&self) -> Result<(), LockError> {
        if !FORKED.load(Ordering::Relaxed) {
            return Ok(()); // no fork() in this process since the handler was set
        }
        let now = nix::unistd::getpid();
        if now != Pid::from_raw(self.pid) {
            return Err(LockError::Forked {
                path: self.path.clone(),
                opened_in: self.pid,
                used_in: now.as_raw(),
            });
        }
        Ok(())
    }

    /// Try to take `LOCK_EX` without blocking: `Ok(true)` taken (or already
    /// held by this handle), `Ok(false)` someone else holds it.
    ///
    /// When the holder is this very process through a descriptor that is not
    /// one of our handles (see `process_holds_it`), the handle *borrows* that
    /// lock instead of waiting for itself: other processes stay excluded by
    /// it, and at most one handle of this process borrows at a time.
    pub fn try_lock(&mut self) -> Result<bool, LockError> {
        self.check_pid()?;
        if self.is_held() {
            return Ok(true);
        }
        match std::mem::replace(&mut self.state, State::Transit) {
            State::Unlocked(file) => match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => {
                    crate::holder::write_record(&locked, self.pid as u32); // check_pid passed
                    self.state = State::Locked(locked);
                    *ours().held.entry(self.key).or_default() += 1;
                    Ok(true)
                }
                Err((file, errno)) => {
                    self.state = State::Unlocked(file);
                    if errno == Errno::EWOULDBLOCK {
                        let mut o = ours();
                        let free = o.held.get(&self.key).is_none_or(|&n| n == 0);
                        if free && self.scan_due() && self.process_holds_it(&o.fds) {
                            *o.held.entry(self.key).or_default() += 1;
                            self.borrowed = true;
                            return Ok(true);
                        }
                        Ok(false)
                    } else if errno == Errno::EINTR {
                        Ok(false)
                    } else {
                        Err(LockError::Flock {
                            path: self.path.clone(),
                            errno,
                        })
                    }
                }
            },
            held @ State::Locked(_) => {
                self.state = held;
                Ok(true)
            }
            State::Transit => unreachable!("lock file state left in transit"),
        }
    }

    fn forget_holding(&self) {
        let mut o = ours();
        if let Some(n) = o.held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                o.held.remove(&self.key);
            }
        }
    }

    /// Drop the lock if held. In a forked child the descriptor is shared with
    /// the parent, so nothing is done: unlocking would release the parent's lock.
    pub fn unlock(&mut self) {
        if self.check_pid().is_err() {
            return;
        }
        if self.borrowed {
            self.borrowed = false;
            self.forget_holding();
            return;
        }
        self.state = match std::mem::replace(&mut self.state, State::Transit) {
            State::Locked(locked) => match locked.unlock() {
                Ok(file) => {
                    self.forget_holding();
                    State::Unlocked(file)
                }
                // LOCK_UN on a valid descriptor does not fail; if it ever did,
                // keep believing we hold it (fail closed) — close() releases it.
                Err((locked, _)) => State::Locked(locked),
            },
            other => other,
        };
    }

    fn file(&self) -> &File {
        match &self.state {
            State::Unlocked(f) => f,
            State::Locked(l) => l,
            State::Transit => unreachable!("lock file state left in transit"),
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
        self.ofd_lock(SHADOW_BYTE, l_type)
    }

    /// Take (`true`) or drop the OFD write lock on the pending byte.
    pub fn pending(&mut self, on: bool) -> Result<bool, LockError> {
        self.ofd_lock(PENDING_BYTE, if on { libc::F_WRLCK } else { libc::F_UNLCK })
    }

    /// Whether another handle holds the pending byte (a writer waits for
    /// EXCLUSIVE). Asks with `F_OFD_GETLK`, which takes nothing.
    pub fn pending_elsewhere(&mut self) -> Result<bool, LockError> {
        self.ofd_conflicts(PENDING_BYTE)
    }

    /// Whether a shadow read lock would be refused now: a writer waits for
    /// or holds EXCLUSIVE (pending byte or shadow write lock elsewhere).
    pub fn read_blocked(&mut self) -> Result<bool, LockError> {
        Ok(self.ofd_conflicts(PENDING_BYTE)? || self.ofd_conflicts(SHADOW_BYTE)?)
    }

    /// Whether another description's OFD lock on `byte` refuses a read lock.
    fn ofd_conflicts(&mut self, byte: i64) -> Result<bool, LockError> {
        self.check_pid()?;
        let mut fl = Self::ofd_flock(byte, libc::F_RDLCK);
        nix::fcntl::fcntl(self.file(), nix::fcntl::FcntlArg::F_OFD_GETLK(&mut fl))
            .map(|_| fl.l_type != libc::F_UNLCK as libc::c_short)
            .map_err(|errno| LockError::Flock {
                path: self.path.clone(),
                errno,
            })
    }

    fn ofd_flock(byte: i64, l_type: libc::c_int) -> libc::flock {
        libc::flock {
            l_type: l_type as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: byte,
            l_len: 1,
            l_pid: 0, // F_OFD_* requires 0
        }
    }

    fn ofd_lock(&mut self, byte: i64, l_type: libc::c_int) -> Result<bool, LockError> {
        self.check_pid()?;
        let fl = Self::ofd_flock(byte, l_type);
        match nix::fcntl::fcntl(self.file(), nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)) {
            Ok(_) => Ok(true),
            Err(Errno::EAGAIN) | Err(Errno::EACCES) | Err(Errno::EINTR) => Ok(false),
            Err(errno) => Err(LockError::Flock {
                path: self.path.clone(),
                errno,
            }),
        }
    }

    /// Whether another open file description holds `LOCK_EX` now. Probes with
    /// `LOCK_SH|LOCK_NB`, released at once; used only on the rare hot-journal path.
    pub fn held_elsewhere(&mut self) -> Result<bool, LockError> {
        self.check_pid()?;
        match &self.state {
            State::Locked(_) => Ok(false),
            State::Unlocked(_) if self.borrowed => Ok(false),
            State::Unlocked(_) => {
                let State::Unlocked(file) = std::mem::replace(&mut self.state, State::Transit)
                else {
                    unreachable!()
                };
                match Flock::lock(file, FlockArg::LockSharedNonblock) {
                    Ok(shared) => {
                        self.state = match shared.unlock() {
                            Ok(file) => State::Unlocked(file),
                            Err((shared, _)) => State::Locked(shared),
                        };
                        Ok(false)
                    }
                    Err((file, errno)) => {
                        self.state = State::Unlocked(file);
                        if errno == Errno::EWOULDBLOCK {
                            Ok(true)
                        } else {
                            Err(LockError::Flock {
                                path: self.path.clone(),
                                errno,
                            })
                        }
                    }
                }
            }
            State::Transit => unreachable!("lock file state left in transit"),
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        if self.check_pid().is_err() {
            // In a forked child: Flock's Drop would LOCK_UN the description the
            // parent still uses. Leak this descriptor instead of unlocking it.
            if let State::Locked(locked) = std::mem::replace(&mut self.state, State::Transit) {
                std::mem::forget(locked);
            }
        } else if self.is_held() {
            self.forget_holding();
        }
        // Dropping the File/Flock closes the descriptor, which releases the
        // flock; then the number is no longer ours (see DupFd's Drop for the
        // order). The file itself is never unlinked.
        let fd = match &self.state {
            State::Unlocked(f) => f.as_raw_fd(),
            State::Locked(l) => l.as_raw_fd(),
            State::Transit => return,
        };
        drop(std::mem::replace(&mut self.state, State::Transit));
        ours().fds.remove(&fd);
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

    #[test]
    fn two_handles_exclude_each_other() {
        let db = tmp().join("a.db");
        let mut a = LockFile::open(&db).unwrap();
        let mut b = LockFile::open(&db).unwrap();
        assert!(a.try_lock().unwrap());
        assert!(!b.try_lock().unwrap());
        assert!(b.held_elsewhere().unwrap());
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
        drop(std::fs::File::open(lock_path_for(&db)).unwrap());
        assert!(!b.shadow(Shadow::Read).unwrap(), "a still writes");
    }

    #[test]
    fn borrows_the_process_own_flock_but_not_another_handles() {
        let db = tmp().join("b.db");
        let mut a = LockFile::open(&db).unwrap();
        let mut b = LockFile::open(&db).unwrap();
        // The application's own descriptor holds the lock.
        let app = std::fs::File::open(lock_path_for(&db)).unwrap();
        let app = Flock::lock(app, FlockArg::LockExclusiveNonblock)
            .map_err(|e| e.1)
            .unwrap();
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
    fn a_waiter_threads_grant_is_not_taken_for_the_applications_lock() {
        // A waiter thread blocks in flock on a duplicate of handle a's
        // descriptor; once granted, a's description holds the lock, and
        // /proc/self/fdinfo shows it on the duplicate too. Handle b must see
        // a holder, not the application's lock to borrow.
        let db = tmp().join("w.db");
        let a = LockFile::open(&db).unwrap();
        let mut b = LockFile::open(&db).unwrap();
        let dup = a.duplicate().unwrap();
        dup.lock_exclusive().unwrap(); // free: granted at once
        assert!(!b.try_lock().unwrap());
        assert!(!b.is_borrowed());
        drop(dup);
        drop(a); // closes the description: the grant goes with it
        assert!(b.try_lock().unwrap() && !b.is_borrowed());
    }

    #[test]
    fn the_application_lock_is_looked_for_at_most_every_rescan_interval() {
        let db = tmp().join("r.db");
        let mut b = LockFile::open(&db).unwrap();
        // b looked a moment ago (a contended attempt against another process).
        b.last_scan = Some(Instant::now());
        // The application takes its own lock now: b finds it on its next
        // look, not on every attempt.
        let app = std::fs::File::open(lock_path_for(&db)).unwrap();
        let app = Flock::lock(app, FlockArg::LockExclusiveNonblock)
            .map_err(|e| e.1)
            .unwrap();
        assert!(!b.try_lock().unwrap(), "within BORROW_RESCAN: no look");
        b.last_scan = b.last_scan.map(|t| t - BORROW_RESCAN);
        assert!(b.try_lock().unwrap() && b.is_borrowed());
        b.unlock();
        drop(app);
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
