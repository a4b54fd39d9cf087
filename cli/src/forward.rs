//! `run`'s command and the signals sent to `run` while it runs.
//!
//! With -o only `run` holds the lock: were `run` to die of a SIGTERM (or
//! SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2) while the command goes on, the
//! lock would be free and writers would commit in the middle of the command.
//! So while the command runs, `run` catches those signals and passes each on
//! to the command's process, as timeout(1) and init shims do, keeps the lock
//! until the command exits, then exits with the command's status (128+N if
//! it died of signal N). Without -o the command holds the lock too, and
//! gets the signal all the same.
//!
//! A signal the kernel sends (si_code SI_KERNEL: Ctrl-C, Ctrl-\ or a hangup
//! of the terminal) went to the whole foreground process group, the command
//! included: it is not sent a second time. A signal the caller ignored stays
//! ignored, in `run` and in the command.
//!
//! The handler only writes the signal's number to a pipe; a thread reads it
//! and sends the signal with kill(2). The command starts with the caller's
//! signal mask and default dispositions: the signals are blocked across
//! fork, and the child puts the dispositions back, then the mask, before
//! exec.
//!
//! SIGKILL cannot be caught: with -o, `kill -9` of `run` frees the lock
//! while the command may go on (as with `flock -o`).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use nix::libc;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// The signals passed on to the command.
const FORWARDED: [Signal; 6] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// The write end of the pipe the handler writes to (-1: none).
static PIPE: AtomicI32 = AtomicI32::new(-1);

/// Write the signal's number, and whether the kernel sent it, to [`PIPE`].
/// Async-signal-safe: one write(2) of two bytes (atomic on a pipe), errno
/// kept.
extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: errno is thread-local; info is the kernel's, or null.
    unsafe {
        let errno = *libc::__errno_location();
        let by_kernel = !info.is_null() && (*info).si_code == libc::SI_KERNEL;
        let rec = [sig as u8, by_kernel as u8];
        let fd = PIPE.load(Ordering::Relaxed);
        if fd >= 0 {
            libc::write(fd, rec.as_ptr().cast(), rec.len());
        }
        *libc::__errno_location() = errno;
    }
}

/// Spawn `cmd` and wait for it, passing [`FORWARDED`] signals on to it
/// meanwhile. `caller_mask` is the signal mask `run` was started with: the
/// command gets it.
pub fn run_passing_signals(
    cmd: &mut Command,
    caller_mask: SigSet,
) -> io::Result<std::process::ExitStatus> {
    let mut fds = [0; 2];
    // SAFETY: a plain pipe2(2) into a local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        // Without the pipe, run as before rather than not at all.
        return cmd.spawn()?.wait();
    }
    let (rd, wr) = (fds[0], fds[1]);
    // The handler must never block.
    // SAFETY: fcntl on our own descriptor.
    unsafe {
        let fl = libc::fcntl(wr, libc::F_GETFL);
        libc::fcntl(wr, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    PIPE.store(wr, Ordering::SeqCst);

    // Block the signals across fork, so that the child never runs the
    // handler between fork and exec; pending ones reach the handler once
    // they are unblocked again below.
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    let ours = SigSet::thread_get_mask().unwrap_or(caller_mask);
    let _ = set.thread_block();
    let act = SigAction::new(
        SigHandler::SigAction(on_signal),
        SaFlags::SA_RESTART | SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    // The signals handled here; one the caller ignored stays ignored.
    let mut to_default: Vec<Signal> = Vec::new();
    for s in FORWARDED {
        // SAFETY: the handler is async-signal-safe (see on_signal).
        if let Ok(old) = unsafe { sigaction(s, &act) } {
            if matches!(old.handler(), SigHandler::SigIgn) {
                // SAFETY: puts back what was there.
                let _ = unsafe { sigaction(s, &old) };
            } else {
                to_default.push(s);
            }
        }
    }
    // SAFETY: between fork and exec the child only calls sigaction(2) and
    // pthread_sigmask(3), both async-signal-safe, on data made before fork.
    unsafe {
        cmd.pre_exec(move || {
            let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
            for s in &to_default {
                sigaction(*s, &dfl).map_err(io::Error::from)?;
            }
            caller_mask.thread_set_mask().map_err(io::Error::from)?;
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // Blocked only across fork: pending ones now reach the handler.
    let _ = ours.thread_set_mask();
    // The handlers stay until run exits: a signal after the command has
    // exited must not change run's status from the command's.
    let mut child = spawned?;

    // Passed on until the command has exited (a zombie: its pid is not
    // reused until it is reaped, after `exited` is set).
    let exited = Arc::new(Mutex::new(false));
    let pid = child.id() as libc::pid_t;
    {
        let exited = Arc::clone(&exited);
        std::thread::spawn(move || pass_on(rd, pid, &exited));
    }
    wait_exited(&mut child, &exited)
}

/// Read signals from the pipe and send each to `pid` until `exited`.
fn pass_on(rd: libc::c_int, pid: libc::pid_t, exited: &Mutex<bool>) {
    let mut rec = [0u8; 2];
    loop {
        // SAFETY: reads into a local buffer from our own descriptor.
        let n = unsafe { libc::read(rd, rec.as_mut_ptr().cast(), rec.len()) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n != 2 {
            return;
        }
        let (sig, by_kernel) = (rec[0] as libc::c_int, rec[1] != 0);
        if by_kernel {
            // The terminal sent it to the command's process group as well.
            continue;
        }
        let gone = exited.lock().unwrap_or_else(|e| e.into_inner());
        if *gone {
            return;
        }
        // SAFETY: kill(2) of our own child, not yet reaped.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Wait until the child has exited, mark it `exited` while it is still a
/// zombie, then reap it.
fn wait_exited(child: &mut Child, exited: &Mutex<bool>) -> io::Result<std::process::ExitStatus> {
    loop {
        // SAFETY: waitid(2) into a zeroed siginfo; WNOWAIT leaves the
        // child to be reaped by Child::wait.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                child.id() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    *exited.lock().unwrap_or_else(|e| e.into_inner()) = true;
    child.wait()
}
