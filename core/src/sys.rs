//! Everything in this crate that needs `unsafe`, and why each use is sound.
//!
//! * System calls that `nix` does not wrap the way we need: `flock` on a
//!   borrowed descriptor (nix's `Flock` owns the file and unlocks on drop,
//!   which a forked child must never do), `fstat` on a descriptor number that
//!   may be closed meanwhile, `mmap`/`munmap` of the shared page, the shared
//!   (not private) futex, `pthread_atfork`, and what the fork handler does in
//!   the child (`open`, `pipe2`, `dup2`, `close`, `getpid`: async-signal-safe),
//!   and a `write` that never raises `SIGPIPE` in the host (signal masks).
//! * Atomics that live in a shared file mapping.
//! * Two lock-free structures the fork handler needs: the list of
//!   descriptors the extension owns (read by the handler in the child while
//!   another thread of the parent may have been halfway through changing
//!   it), and [`PerProcess`] values that a forked child replaces instead of
//!   waiting on a mutex whose holder does not exist in it. Both only ever
//!   grow or leak: nothing they hand out is freed.
//!
//! The rest of the crate is `#![deny(unsafe_code)]`.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;

// ---- system calls -----------------------------------------------------------

/// `flock(fd, op)` on a descriptor the extension owns (crate-only: safe code
/// elsewhere must not lock arbitrary descriptor numbers).
pub(crate) fn flock(fd: RawFd, op: libc::c_int) -> Result<(), Errno> {
    // SAFETY: flock takes a descriptor number and flags; no memory involved.
    Errno::result(unsafe { libc::flock(fd, op) }).map(drop)
}

/// `(dev, ino, nlink)` of whatever descriptor `fd` is now (None if closed).
pub fn fstat(fd: RawFd) -> Option<(u64, u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a whole `stat` on success; `fd` may be any number
    // (EBADF if closed), which touches no memory of ours.
    let rc = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: initialised by the successful call.
    let st = unsafe { st.assume_init() };
    Some((st.st_dev, st.st_ino, st.st_nlink))
}

/// A `MAP_SHARED` read-write mapping of the first `len` bytes of a file.
pub struct Mapping {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is only accessed through atomics (here and in every
// other process), so sharing it between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: as for Send.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map the first `len` bytes of `f`; an error if the file is shorter.
    /// (Should another process truncate the file later, touching the mapping
    /// faults with `SIGBUS`, as with SQLite's own `-shm`: the file must only
    /// ever grow.)
    pub fn new(f: &File, len: usize) -> std::io::Result<Mapping> {
        if f.metadata()?.len() < len as u64 {
            return Err(std::io::Error::other(format!(
                "shorter than the {len} bytes to map"
            )));
        }
        // SAFETY: a fresh shared mapping of a file we keep open; the kernel
        // picks the address and checks the descriptor and the length.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            base: p as *mut u8,
            len,
        })
    }

    /// The 32-bit atomic at byte `off` (aligned).
    pub fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(off.is_multiple_of(4) && off.checked_add(4).is_some_and(|end| end <= self.len));
        // SAFETY: in bounds, aligned (the mapping is page-aligned), and valid
        // while `self` lives; every party accesses it atomically.
        unsafe { AtomicU32::from_ptr(self.base.add(off) as *mut u32) }
    }

    /// The 64-bit atomic at byte `off` (aligned).
    pub fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off.is_multiple_of(8) && off.checked_add(8).is_some_and(|end| end <= self.len));
        // SAFETY: as `u32_at`.
        unsafe { AtomicU64::from_ptr(self.base.add(off) as *mut u64) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped; no reference outlives `self`
        // (all accessors borrow it).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// Sleep while `*word == expected`, at most `timeout` (a shared futex:
/// other processes mapping the same file wake it). Spurious returns are
/// fine: callers re-check.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT (not PRIVATE: the word is shared between processes)
    // on a valid, aligned u32 with a relative timeout that outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wake at most `n` sleepers on `word`.
pub fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n);
    }
}

/// Have `child` run in every child of a `fork()`; false if it cannot be.
///
/// `child` must do only async-signal-safe things (it runs between `fork()`
/// and whatever the child does next, possibly while the parent had locks
/// held by threads that do not exist in the child).
pub(crate) fn at_fork_child(child: extern "C" fn()) -> bool {
    // SAFETY: FFI into libc with a handler the caller keeps async-signal-
    // safe. The library is loaded for good (SQLITE_OK_LOAD_PERMANENTLY), so
    // the handler's code stays mapped for the life of the process.
    unsafe { libc::pthread_atfork(None, None, Some(child)) == 0 }
}

/// `getpid()`, async-signal-safe.
pub fn getpid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}

/// In a forked child: make each descriptor of `fds` refer to `/dev/null`
/// (or, without it, a pipe) instead of the description it shared with the
/// parent, keeping the number taken (and close-on-exec, so an `exec` does
/// not carry the duplicates along). Async-signal-safe.
pub(crate) fn make_inert(fds: &FdList) {
    // SAFETY: open and pipe2 are async-signal-safe; the path is a C string.
    let inert = unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            fd
        } else {
            let mut p = [-1; 2];
            if libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                return;
            }
            libc::close(p[1]);
            p[0]
        }
    };
    fds.drain(|fd| {
        // SAFETY: dup3 is a plain system call (async-signal-safe); `fd` is
        // a descriptor the extension opened and registered (and unregisters
        // before closing), so replacing it touches nothing of the
        // application's.
        unsafe { libc::dup3(inert, fd, libc::O_CLOEXEC) };
    });
    // SAFETY: `inert` is ours and no longer needed (its duplicates stay).
    unsafe { libc::close(inert) };
}

/// Write all of `buf` to `fd` without ever raising `SIGPIPE` in the process
/// (the host may not ignore it: the default action kills it). `SIGPIPE` is
/// blocked in this thread around the write; if the write failed with
/// `EPIPE` and no `SIGPIPE` was pending before, the one the write raised is
/// taken (it is directed at this thread) before the mask is restored. A
/// `SIGPIPE` of the host's own, pending before, is left alone. Interrupted
/// writes are retried; short ones continue.
pub fn write_all_no_sigpipe(fd: BorrowedFd<'_>, mut buf: &[u8]) -> Result<(), Errno> {
    let mut pipe = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    let mut pending = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset/sigaddset initialise the set they are given;
    // pthread_sigmask fills `old` on success (checked); sigpending fills
    // `pending` on success (checked). Only this thread's mask changes, and
    // it is restored below on every path.
    let (pipe, old, was_pending) = unsafe {
        libc::sigemptyset(pipe.as_mut_ptr());
        libc::sigaddset(pipe.as_mut_ptr(), libc::SIGPIPE);
        if libc::pthread_sigmask(libc::SIG_BLOCK, pipe.as_ptr(), old.as_mut_ptr()) != 0 {
            return Err(Errno::EINVAL);
        }
        let was_pending = libc::sigpending(pending.as_mut_ptr()) != 0
            || libc::sigismember(pending.as_ptr(), libc::SIGPIPE) == 1;
        (pipe.assume_init(), old.assume_init(), was_pending)
    };
    let mut result = Ok(());
    while !buf.is_empty() {
        // SAFETY: write reads at most `buf.len()` bytes of a live slice.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        match Errno::result(n) {
            Ok(0) => {
                result = Err(Errno::EIO);
                break;
            }
            Ok(n) => buf = &buf[(n as usize).min(buf.len())..],
            Err(Errno::EINTR) => {}
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result == Err(Errno::EPIPE) && !was_pending {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: takes a pending SIGPIPE (blocked here), if any, without
        // waiting; no siginfo wanted (NULL).
        unsafe { libc::sigtimedwait(&pipe, ptr::null_mut(), &zero) };
    }
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut()) };
    result
}

// ---- the descriptor list ------------------------------------------------------

/// Slots per chunk of an [`FdList`].
const CHUNK: usize = 64;

/// One chunk of descriptors (-1: an empty slot), linked into a list that
/// only grows; chunks are never freed, so a reader never sees one vanish.
struct Chunk {
    fds: [AtomicI32; CHUNK],
    next: AtomicPtr<Chunk>,
}

/// A lock-free set of descriptor numbers, safe to read in a forked child
/// whatever the parent's threads were doing at the fork.
pub struct FdList {
    first: AtomicPtr<Chunk>,
}

impl Default for FdList {
    fn default() -> Self {
        Self::new()
    }
}

impl FdList {
    /// An empty list (const, for statics).
    pub const fn new() -> FdList {
        FdList {
            first: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Walk the chunks, calling `f` on each until it returns true.
    fn chunks(&self, mut f: impl FnMut(&Chunk) -> bool) {
        let mut p = self.first.load(Ordering::Acquire);
        while !p.is_null() {
            // SAFETY: chunks come from Box::into_raw and are never freed.
            let c = unsafe { &*p };
            if f(c) {
                return;
            }
            p = c.next.load(Ordering::Acquire);
        }
    }

    /// Add `fd`.
    pub(crate) fn insert(&self, fd: RawFd) {
        loop {
            let mut placed = false;
            let mut last: *const Chunk = ptr::null();
            self.chunks(|c| {
                last = c;
                placed = c.fds.iter().any(|s| {
                    s.compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                });
                placed
            });
            if placed {
                return;
            }
            // Every slot taken: append a chunk and try again.
            let fresh = Box::into_raw(Box::new(Chunk {
                fds: std::array::from_fn(|_| AtomicI32::new(-1)),
                next: AtomicPtr::new(ptr::null_mut()),
            }));
            let link = if last.is_null() {
                &self.first
            } else {
                // SAFETY: `last` points to a live chunk (never freed).
                unsafe { &(*last).next }
            };
            if link
                .compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                // Someone else appended first: use theirs.
                // SAFETY: `fresh` was never shared.
                drop(unsafe { Box::from_raw(fresh) });
            }
        }
    }

    /// Remove `fd` (once).
    pub(crate) fn remove(&self, fd: RawFd) {
        self.chunks(|c| {
            c.fds.iter().any(|s| {
                s.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            })
        });
    }

    /// Every descriptor in the list now.
    pub fn snapshot(&self) -> std::collections::HashSet<RawFd> {
        let mut set = std::collections::HashSet::new();
        self.chunks(|c| {
            set.extend(
                c.fds
                    .iter()
                    .map(|s| s.load(Ordering::Acquire))
                    .filter(|&fd| fd >= 0),
            );
            false
        });
        set
    }

    /// Take every descriptor out of the list, calling `f` on each
    /// (async-signal-safe: atomics only).
    fn drain(&self, mut f: impl FnMut(RawFd)) {
        self.chunks(|c| {
            for slot in &c.fds {
                let fd = slot.swap(-1, Ordering::AcqRel);
                if fd >= 0 {
                    f(fd);
                }
            }
            false
        });
    }
}

// ---- values per process ---------------------------------------------------------

/// A process-wide value rebuilt in every forked child: [`Self::get`] returns
/// the value built in the current generation (see `process::generation`),
/// building it the first time. Values of an ancestor are leaked, never
/// dropped: their mutexes may be held by threads that do not exist here.
pub struct PerProcess<T: 'static> {
    cell: AtomicPtr<(u64, T)>,
    /// Shared between threads only if `T` may be: `get` hands every thread
    /// the same `&T` (an `AtomicPtr` alone would make it `Sync` for any `T`).
    _value: std::marker::PhantomData<T>,
}

impl<T: 'static> Default for PerProcess<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: 'static> PerProcess<T> {
    /// An empty cell (const, for statics).
    pub const fn new() -> Self {
        PerProcess {
            cell: AtomicPtr::new(ptr::null_mut()),
            _value: std::marker::PhantomData,
        }
    }

    /// The value of generation `gen`, made with `make` if there is none.
    pub fn get(&self, gen: u64, make: impl Fn() -> T) -> &'static T {
        loop {
            let cur = self.cell.load(Ordering::Acquire);
            if !cur.is_null() {
                // SAFETY: values are leaked boxes, never freed.
                let v = unsafe { &*cur };
                if v.0 == gen {
                    return &v.1;
                }
            }
            let fresh = Box::into_raw(Box::new((gen, make())));
            if self
                .cell
                .compare_exchange(cur, fresh, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // SAFETY: ours now, leaked for the life of the process.
                return unsafe { &(*fresh).1 };
            }
            // Another thread installed one first: use it (next round).
            // SAFETY: `fresh` was never shared.
            drop(unsafe { Box::from_raw(fresh) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_grows_and_forgets() {
        let list = FdList::new();
        let fds: Vec<RawFd> = (10_000..10_000 + 3 * CHUNK as RawFd).collect();
        for &fd in &fds {
            list.insert(fd);
        }
        assert_eq!(list.snapshot().len(), fds.len());
        for &fd in &fds[..10] {
            list.remove(fd);
        }
        assert_eq!(list.snapshot().len(), fds.len() - 10);
        let mut drained = Vec::new();
        list.drain(|fd| drained.push(fd));
        assert_eq!(drained.len(), fds.len() - 10);
        assert!(list.snapshot().is_empty());
    }

    #[test]
    fn a_mapping_is_never_longer_than_its_file_nor_read_outside_it() {
        let path = std::env::temp_dir().join(format!("wl-sys-map-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(4096).unwrap();
        assert!(Mapping::new(&f, 8192).is_err(), "past the end of the file");
        let m = Mapping::new(&f, 4096).unwrap();
        m.u64_at(4088).store(1, Ordering::Relaxed);
        for off in [4096, usize::MAX - 3, usize::MAX - 7] {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                m.u32_at(off & !3);
            }));
            assert!(r.is_err(), "offset {off} accepted");
        }
        drop(m);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_write_to_a_pipe_without_reader_is_epipe_and_no_signal() {
        use std::os::fd::AsFd;
        let (r, w) = std::io::pipe().unwrap();
        drop(r);
        // The test harness ignores SIGPIPE; a host may not: with the default
        // action the raised signal would stay pending here (blocked), so
        // check nothing is left pending after the call.
        assert_eq!(write_all_no_sigpipe(w.as_fd(), b"x\n"), Err(Errno::EPIPE));
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigpending fills the set on success (asserted).
        let set = unsafe {
            assert_eq!(libc::sigpending(set.as_mut_ptr()), 0);
            set.assume_init()
        };
        // SAFETY: a set initialised above.
        assert_eq!(unsafe { libc::sigismember(&set, libc::SIGPIPE) }, 0);
        let (r, w) = std::io::pipe().unwrap();
        assert_eq!(write_all_no_sigpipe(w.as_fd(), b"ok"), Ok(()));
        drop(w);
        assert_eq!(std::io::read_to_string(r).unwrap(), "ok");
    }

    #[test]
    fn a_value_per_generation() {
        static CELL: PerProcess<std::sync::atomic::AtomicU32> = PerProcess::new();
        let a = CELL.get(1, Default::default);
        a.store(7, Ordering::Relaxed);
        assert_eq!(CELL.get(1, Default::default).load(Ordering::Relaxed), 7);
        assert_eq!(CELL.get(2, Default::default).load(Ordering::Relaxed), 0);
    }
}
