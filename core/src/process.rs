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
//! Everything here is fork-safe: the registry is a lock-free list (the child
//! handler may run while another thread of the parent was halfway through
//! registering), and process-wide state that sits behind a mutex elsewhere is
//! a [`PerProcess`] of the current [`generation`], which the child handler
//! bumps, so the child builds fresh state instead of waiting on a mutex whose
//! owner does not exist in it.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::sys;

/// Set in the child of a `fork()`: the fork check then compares pids.
static FORKED: AtomicBool = AtomicBool::new(false);
/// Bumped in every forked child: state built in an ancestor is not ours.
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// This process's pid, kept current by the child handler.
static PID: AtomicU32 = AtomicU32::new(0);
/// Whether installing the handler was attempted (installing twice would run
/// it twice)…
static WATCHING: AtomicBool = AtomicBool::new(false);
/// …and whether it is in place, so that [`PID`] stays current.
static HANDLER: AtomicBool = AtomicBool::new(false);

/// The descriptors the extension owns now.
static OURS: sys::FdList = sys::FdList::new();

/// Install the fork handler (idempotent). Called when the extension
/// registers, and again by the first descriptor registered.
pub fn watch_forks() {
    if WATCHING.swap(true, Ordering::AcqRel) {
        return;
    }
    PID.store(std::process::id(), Ordering::Relaxed);
    if sys::at_fork_child(in_child) {
        HANDLER.store(true, Ordering::Release);
    } else {
        // Without the handler, assume a fork may have happened: every check
        // then asks getpid().
        FORKED.store(true, Ordering::Relaxed);
    }
}

/// The `pthread_atfork` child handler: runs in the child, single-threaded,
/// right after `fork()`; atomics and async-signal-safe calls only.
extern "C" fn in_child() {
    FORKED.store(true, Ordering::Relaxed);
    GENERATION.fetch_add(1, Ordering::AcqRel);
    PID.store(sys::getpid(), Ordering::Relaxed);
    sys::make_inert(&OURS);
}

/// Register a descriptor the extension opened, so a forked child drops its
/// reference to the description (see the module docs). Register right after
/// opening; [`forget_fd`] right *before* closing.
pub fn register_fd(fd: RawFd) {
    watch_forks();
    OURS.insert(fd);
}

/// Unregister a descriptor before closing it. Closing first would leave a
/// moment in which a fork could `dup2` over a number the application just got.
pub fn forget_fd(fd: RawFd) {
    OURS.remove(fd);
}

/// The descriptors registered now (a snapshot).
pub fn registered_fds() -> std::collections::HashSet<RawFd> {
    OURS.snapshot()
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

/// Whether process `pid` still runs: it exists ([`alive`]) and is not a
/// zombie. A killed process's files are closed and its locks gone the moment
/// it dies, but signal 0 still reaches it until its parent reaps it.
pub fn running(pid: u32) -> bool {
    alive(pid)
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            // "pid (comm) state …": comm may hold spaces and parentheses.
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "Z" || state == "X")
        })
}

/// A process-wide value rebuilt in every forked child (see the module docs).
pub struct PerProcess<T: 'static>(sys::PerProcess<T>);

impl<T: 'static> Default for PerProcess<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: 'static> PerProcess<T> {
    /// An empty cell (const, for statics).
    pub const fn new() -> Self {
        PerProcess(sys::PerProcess::new())
    }

    /// The value of this process's generation, made with `make` the first
    /// time it is asked for in this process.
    pub fn get(&self, make: impl Fn() -> T) -> &'static T {
        self.0.get(generation(), make)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_and_forgotten() {
        register_fd(20_001);
        assert!(registered_fds().contains(&20_001));
        forget_fd(20_001);
        assert!(!registered_fds().contains(&20_001));
    }

    #[test]
    fn pid_is_ours_and_we_are_alive() {
        assert_eq!(pid(), std::process::id());
        assert!(alive(pid()));
        assert!(!alive(0));
    }
}
