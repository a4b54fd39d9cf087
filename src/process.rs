//! What belongs to the whole process: its pid, `fork()`, and the descriptors
//! the extension owns.
//!
//! A child forked without exec inherits every open file description of its
//! parent, and with them the parent's `flock` and OFD locks on `<db>.lock`:
//! they would stay alive as long as the child lives, even after the parent
//! died mid-transaction. So the extension registers every descriptor it opens,
//! and a `pthread_atfork` child handler `dup2`s an inert descriptor
//! (`/dev/null`) over each of them in the child. The child then no longer
//! refers to the parent's descriptions, yet the descriptor *numbers* stay
//! taken: an inherited connection that the child closes later closes
//! `/dev/null`, never a file the child opened since.
//!
//! Everything here is fork-safe: the registry is a lock-free list of atomic
//! slots (the child handler may run while another thread of the parent was
//! halfway through registering), and process-wide state that sits behind a
//! mutex elsewhere is found through a [`generation`] that the child handler
//! bumps, so the child builds fresh state instead of waiting on a mutex whose
//! owner does not exist in it.

use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use nix::libc;

/// Set in the child of a `fork()`: the fork check then compares pids.
static FORKED: AtomicBool = AtomicBool::new(false);
/// Bumped in every forked child: state built in an ancestor is not ours.
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// This process's pid, kept current by the child handler (0: not read yet).
static PID: AtomicU32 = AtomicU32::new(0);
/// Whether installing the handler was attempted (installing twice would run
/// it twice)…
static WATCHING: AtomicBool = AtomicBool::new(false);
/// …and whether it is in place, so that [`PID`] stays current.
static HANDLER: AtomicBool = AtomicBool::new(false);

/// Slots per chunk of the descriptor registry.
const CHUNK: usize = 64;

/// One chunk of registered descriptors (-1: empty slot), linked into a list
/// that only grows; chunks are never freed, so a reader never sees one vanish.
struct Chunk {
    fds: [AtomicI32; CHUNK],
    next: AtomicPtr<Chunk>,
}

static FIRST: AtomicPtr<Chunk> = AtomicPtr::new(ptr::null_mut());

fn new_chunk() -> *mut Chunk {
    Box::into_raw(Box::new(Chunk {
        fds: std::array::from_fn(|_| AtomicI32::new(-1)),
        next: AtomicPtr::new(ptr::null_mut()),
    }))
}

/// Walk the chunks, calling `f` on each until it returns true.
fn for_each_chunk(mut f: impl FnMut(&Chunk) -> bool) {
    let mut p = FIRST.load(Ordering::Acquire);
    while !p.is_null() {
        // SAFETY: chunks come from Box::into_raw and are never freed.
        let c = unsafe { &*p };
        if f(c) {
            return;
        }
        p = c.next.load(Ordering::Acquire);
    }
}

/// Install the fork handler (idempotent). Called when the extension
/// registers, and again by the first descriptor registered.
pub fn watch_forks() {
    if WATCHING.swap(true, Ordering::AcqRel) {
        return;
    }
    PID.store(std::process::id(), Ordering::Relaxed);
    // SAFETY: FFI into libc with a handler that calls only async-signal-safe
    // functions (open, pipe2, dup2, close, getpid) and touches only atomics.
    // The library is loaded permanently (SQLITE_OK_LOAD_PERMANENTLY), so the
    // handler's code stays mapped for the life of the process.
    let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
    if rc == 0 {
        HANDLER.store(true, Ordering::Release);
    } else {
        // Without the handler, assume a fork may have happened: every check
        // then asks getpid().
        FORKED.store(true, Ordering::Relaxed);
    }
}

/// The `pthread_atfork` child handler. Runs in the child, single-threaded,
/// right after `fork()`: only async-signal-safe calls.
extern "C" fn in_child() {
    FORKED.store(true, Ordering::Relaxed);
    GENERATION.fetch_add(1, Ordering::AcqRel);
    // SAFETY: getpid is async-signal-safe.
    PID.store(unsafe { libc::getpid() } as u32, Ordering::Relaxed);
    let inert = inert_fd();
    if inert < 0 {
        return;
    }
    for_each_chunk(|c| {
        for slot in &c.fds {
            let fd = slot.swap(-1, Ordering::AcqRel);
            if fd >= 0 {
                // SAFETY: dup2 is async-signal-safe; `fd` is a descriptor we
                // opened and registered (unregistered before any close), so
                // replacing it touches nothing of the application's.
                unsafe { libc::dup2(inert, fd) };
            }
        }
        false
    });
    // SAFETY: `inert` is ours and no longer needed (its duplicates stay).
    unsafe { libc::close(inert) };
}

/// A descriptor that holds no lock and no file anyone cares about.
fn inert_fd() -> RawFd {
    // SAFETY: open and pipe2 are async-signal-safe; the path is a C string.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            return fd;
        }
        let mut p = [-1; 2];
        if libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) == 0 {
            libc::close(p[1]);
            return p[0];
        }
        -1
    }
}

/// Register a descriptor the extension opened, so a forked child drops its
/// reference to the description (see the module docs). Register right after
/// opening; [`forget_fd`] right *before* closing.
pub fn register_fd(fd: RawFd) {
    watch_forks();
    loop {
        let mut placed = false;
        let mut last: *const Chunk = ptr::null();
        for_each_chunk(|c| {
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
        let fresh = new_chunk();
        let link = if last.is_null() {
            &FIRST
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

/// Unregister a descriptor before closing it. Closing first would leave a
/// moment in which a fork could `dup2` over a number the application just got.
pub fn forget_fd(fd: RawFd) {
    for_each_chunk(|c| {
        c.fds.iter().any(|s| {
            s.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    });
}

/// The descriptors registered now (a snapshot).
pub fn registered_fds() -> std::collections::HashSet<RawFd> {
    let mut set = std::collections::HashSet::new();
    for_each_chunk(|c| {
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

/// This process's pid (cached; kept right across `fork()`).
pub fn pid() -> u32 {
    if HANDLER.load(Ordering::Acquire) {
        return PID.load(Ordering::Relaxed);
    }
    std::process::id()
}

/// Whether a `fork()` happened in this process's ancestry since the handler
/// was installed (or the handler could not be installed).
pub fn forked() -> bool {
    FORKED.load(Ordering::Relaxed)
}

/// Changes in every forked child; process-wide state records the generation
/// it was built in and is rebuilt when it differs.
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// Whether process `pid` exists (signal 0). A process in another pid
/// namespace may look dead or alive here; callers only use this to skip work.
pub fn alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None) {
        Ok(()) => true,
        Err(e) => e != nix::errno::Errno::ESRCH,
    }
}

/// A process-wide value rebuilt in every forked child: `get` returns the
/// value built in this process's generation, building it (with `make`) the
/// first time. Values of an ancestor are leaked, never dropped: their mutexes
/// may be held by threads that do not exist here.
pub struct PerProcess<T: 'static> {
    cell: AtomicPtr<(u64, T)>,
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
        }
    }

    /// The value of this process's generation.
    pub fn get(&self, make: impl Fn() -> T) -> &'static T {
        loop {
            let gen = generation();
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
    fn registry_grows_and_forgets() {
        let fds: Vec<RawFd> = (10_000..10_000 + 3 * CHUNK as RawFd).collect();
        for &fd in &fds {
            register_fd(fd);
        }
        let count = |fd: RawFd| {
            let mut n = 0;
            for_each_chunk(|c| {
                n += c
                    .fds
                    .iter()
                    .filter(|s| s.load(Ordering::Relaxed) == fd)
                    .count();
                false
            });
            n
        };
        assert!(fds.iter().all(|&fd| count(fd) == 1));
        for &fd in &fds {
            forget_fd(fd);
        }
        assert!(fds.iter().all(|&fd| count(fd) == 0));
    }

    #[test]
    fn pid_is_ours_and_we_are_alive() {
        assert_eq!(pid(), std::process::id());
        assert!(alive(pid()));
        assert!(!alive(0));
    }
}
