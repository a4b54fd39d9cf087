//! `writelock` — see and use the write lock of an SQLite database from the shell.
//!
//! ```text
//! writelock status DB [--json]          who holds DB's write lock, since when
//! writelock run DB [--timeout S] [-o] -- CMD  run CMD holding the write lock
//! writelock ps DB [--json]            which processes have DB open, protected or not
//! writelock watch DB [--for S]          print holder changes and hold times
//! ```
//! Exit codes: [`exit::EXIT_CODES`], printed by `--help` and in docs/cli.md.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

mod exit;
mod forward;
mod ps;
use nix::libc;
use writelock_core::holder::{cmdline, current_holder, holder_and_waiters};
use writelock_core::lockfile::{
    kind_of, lock_path_for, resolve_db_path, LockError, LockFile, Opener,
};
use writelock_core::page::{flags::RELEASING, mono_ns, now_ms, peek, RING};

/// After the verbs in `--help`: how the lock file is named, and
/// [`exit::help`].
fn after_help() -> String {
    format!(
        "The lock file is <resolved database path>.lock: symlinks are resolved as\n\
         SQLite resolves them before it opens the database.\n\n{}",
        exit::help()
    )
}

/// See and use the write lock (`<db>.lock`) that sqlite-writelock connections
/// hold while they write.
#[derive(Parser)]
#[command(version, about, after_help = after_help())]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show whether DB's write lock is held, by which process, for how long,
    /// and who waits for it.
    ///
    /// The holder is read from the kernel's lock table (/proc/locks), since
    /// when from the holder record on the shared page <db>.lock-shm. Waiters
    /// are the extension's connections queued on the shared page (oldest
    /// first, "extension"), then processes blocked in flock(2) on the lock
    /// file in the kernel's queue ("flock": flock(1), writelock run, an
    /// application's own lock). Creates nothing.
    #[command(after_help = exit::help_for("status"))]
    Status {
        /// The database file (its lock file is DB.lock).
        db: PathBuf,
        /// Print one JSON object: db, lock_file, exists, held, holder_pid,
        /// holder_cmdline, held_for_ms, waiters [{pid, cmdline, how, waiting_ms}].
        #[arg(long)]
        json: bool,
        /// Exit 1 when the lock is held, 0 when it is free (as `git diff
        /// --exit-code`); without it, status exits 0 either way.
        #[arg(long)]
        exit_code: bool,
    },
    /// Run a command while holding DB's write lock (no connection using the
    /// extension writes meanwhile): backups, file copies, migrations.
    ///
    /// The command inherits the locked descriptor, as under flock(1): its own
    /// connections of the extension borrow the lock. The lock is let go by
    /// closing the descriptor when the command exits, so a process the
    /// command leaves running keeps it until that process exits (use -o to
    /// prevent that). SIGTERM, SIGHUP, SIGINT, SIGQUIT, SIGUSR1 and SIGUSR2
    /// sent to run are passed on to the command, and run holds the lock
    /// until the command exits. Exits with the command's own status.
    #[command(after_help = exit::help_for("run"))]
    Run {
        /// The database file.
        db: PathBuf,
        /// Give up after this many seconds (default: wait as long as it
        /// takes). The wait is in flock(2), in the kernel's queue, as
        /// flock(1)'s: status and /proc/locks list it as a waiter.
        #[arg(long, value_name = "SECS", value_parser = seconds)]
        timeout: Option<f64>,
        /// Keep the locked descriptor from the command (as flock -o): a
        /// process the command starts and leaves running (a daemon) then
        /// does not keep the lock once the command exits. The command's own
        /// connections of the extension cannot borrow the lock then: they
        /// wait for writelock run like any other writer. The lock then lives
        /// as long as writelock run: kill -9 of run frees it while the
        /// command may go on.
        #[arg(short = 'o', long)]
        close: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List every process that has DB open, and whether its connections are
    /// protected: made by the extension.
    ///
    /// Each process with DB open for writing is "protected" when it has, for
    /// each writable descriptor on DB, a descriptor on DB.lock marked as the
    /// extension's (an OFD read lock on the marker byte, as /proc/PID/fdinfo
    /// shows it): one per connection. Else "NOT PROTECTED": a stock SQLite
    /// connection, which writes without the write lock. Processes that
    /// opened DB read-only (O_RDONLY) cannot write and are listed apart. The
    /// last line counts processes whose descriptors may not be read (other
    /// users' processes, unless run as root): they are not judged. Exit 1
    /// if any writable opener is not protected, else 0.
    #[command(after_help = exit::help_for("ps"))]
    Ps {
        /// The database file.
        db: PathBuf,
        /// Print one JSON object: db, lock_file, processes [{pid, cmdline,
        /// read_only, protected, db_fds_writable, db_fds_read_only,
        /// marker_fds, holds_lock}], not_inspectable.
        #[arg(long)]
        json: bool,
    },
    /// Print every change of holder and each hold's duration until
    /// interrupted (or for --for seconds).
    ///
    /// Holds by the extension's connections and by writelock run come from
    /// the ring of recent holds on the shared page <db>.lock-shm: none is
    /// missed, however short, and the times are the holder's own. Other
    /// holders (flock(1), an application's own flock) leave no record there:
    /// watch sees them in /proc/locks, read at most every 100 ms (every
    /// --interval-ms if that is longer, since each read stalls every lock call
    /// in the system), so such a hold shorter than that may be missed, and
    /// its times are those of the reads. Its lines end in "(seen in
    /// /proc/locks)".
    #[command(after_help = exit::help_for("watch"))]
    Watch {
        /// The database file.
        db: PathBuf,
        /// How often to read the shared page, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 20)]
        interval_ms: u64,
        /// Stop after this many seconds.
        #[arg(long = "for", value_name = "SECS", value_parser = seconds)]
        duration: Option<f64>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are "errors" on stdout.
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    match cli.cmd {
        Cmd::Status {
            db,
            json,
            exit_code,
        } => status(&db, json, exit_code),
        Cmd::Run {
            db,
            timeout,
            close,
            command,
        } => run(&db, timeout, close, &command),
        Cmd::Ps { db, json } => match lock_file_of(&db) {
            Ok((real, lock, _)) => ps::report(&real, &lock, json),
            Err(Fail(code)) => ExitCode::from(code),
        },
        Cmd::Watch {
            db,
            interval_ms,
            duration,
        } => watch(&db, Duration::from_millis(interval_ms.max(1)), duration),
    }
}

/// A number of seconds: finite, not negative, at most a year.
fn seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=31_536_000.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "'{s}' is not a number of seconds from 0 to 31536000"
        )),
    }
}

/// A failure with its exit code, already explained on stderr.
struct Fail(u8);

/// The lock file of an existing database, as the connections name it
/// (symlinks resolved), checked without creating anything: `Ok((db, lock,
/// exists))`. A missing database is exit 66; a lock file that is not a
/// regular file is exit 73 (every connection refuses to open then).
fn lock_file_of(db: &Path) -> Result<(PathBuf, PathBuf, bool), Fail> {
    let meta = std::fs::metadata(db).map_err(|e| {
        eprintln!("writelock: no database at {}: {e}", db.display());
        Fail(exit::NO_DB)
    })?;
    if !meta.file_type().is_file() {
        eprintln!(
            "writelock: {} is a {}, not a database file",
            db.display(),
            kind_of(meta.file_type())
        );
        return Err(Fail(exit::NO_DB));
    }
    let real = resolve_db_path(db).map_err(|e| {
        eprintln!("writelock: cannot resolve {}: {e}", db.display());
        Fail(exit::NO_DB)
    })?;
    let lock = lock_path_for(&real);
    match std::fs::symlink_metadata(&lock) {
        Err(_) => Ok((real, lock, false)),
        Ok(m) if m.file_type().is_file() => Ok((real, lock, true)),
        Ok(m) => {
            eprintln!(
                "writelock: lock file {} is a {}, not a regular file: every connection of the \
                 extension refuses to open {}; remove it",
                lock.display(),
                kind_of(m.file_type()),
                real.display()
            );
            Err(Fail(exit::LOCK_FILE))
        }
    }
}

fn status(db: &Path, json: bool, exit_code: bool) -> ExitCode {
    let (_, lock, exists) = match lock_file_of(db) {
        Ok(x) => x,
        Err(Fail(code)) => return ExitCode::from(code),
    };
    let (h, flock_waiters) = holder_and_waiters(&lock).unwrap_or_default();
    let waiters = waiters(&lock, flock_waiters);
    let pid = h.as_ref().map(|h| h.pid);
    let cmd = pid.and_then(cmdline);
    let held_for = h
        .as_ref()
        .and_then(|h| h.held_for)
        .map(|d| d.as_millis() as u64);
    let code = if exit_code && h.is_some() {
        ExitCode::from(exit::FOUND)
    } else {
        ExitCode::SUCCESS
    };
    if json {
        let v = serde_json::json!({
            "db": db.to_string_lossy(),
            "lock_file": lock.to_string_lossy(),
            "exists": exists,
            "held": h.is_some(),
            "holder_pid": pid,
            "holder_cmdline": cmd,
            "held_for_ms": held_for,
            "waiters": waiters.iter().map(|w| serde_json::json!({
                "pid": w.pid,
                "cmdline": cmdline(w.pid),
                "how": w.how,
                "waiting_ms": w.waiting_ms,
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        return code;
    }
    println!(
        "lock file: {}{}",
        lock.display(),
        if exists { "" } else { " (does not exist yet)" }
    );
    match pid {
        None => println!("state:     free"),
        Some(pid) => {
            println!("state:     held");
            println!("holder:    pid {pid} ({})", cmd.as_deref().unwrap_or("?"));
            match held_for {
                Some(ms) => println!("held for:  {ms} ms"),
                None => println!("held for:  unknown (the holder left no record, e.g. flock(1))"),
            }
        }
    }
    for (i, w) in waiters.iter().enumerate() {
        let since = w
            .waiting_ms
            .map_or_else(String::new, |ms| format!(", {ms} ms"));
        println!(
            "{:<10} pid {} ({}) [{}{since}]",
            if i == 0 { "waiting:" } else { "" },
            w.pid,
            cmdline(w.pid).unwrap_or_else(|| "?".into()),
            w.how
        );
    }
    code
}

/// One process waiting for the lock.
struct Waiter {
    pid: u32,
    /// "extension" (a connection queued on the shared page, oldest first)
    /// or "flock" (blocked in flock(2), in the kernel's queue: flock(1),
    /// `writelock run`, an application's own lock).
    how: &'static str,
    /// How long it has waited, when it says (the extension's waiters do).
    waiting_ms: Option<u64>,
}

/// Everyone waiting: the extension's queue first (in arrival order), then
/// the kernel's `flock` waiters.
fn waiters(lock: &Path, flock_waiters: Vec<u32>) -> Vec<Waiter> {
    let queued = peek(lock).map(|s| s.waiters).unwrap_or_default();
    let now = mono_ns();
    queued
        .into_iter()
        .map(|(pid, arrival_ns)| Waiter {
            pid,
            how: "extension",
            waiting_ms: Some(now.saturating_sub(arrival_ns) / 1_000_000),
        })
        .chain(flock_waiters.into_iter().map(|pid| Waiter {
            pid,
            how: "flock",
            waiting_ms: None,
        }))
        .collect()
}

fn run(db: &Path, timeout: Option<f64>, close: bool, command: &[String]) -> ExitCode {
    // The command starts with the signal mask run was given.
    let caller_mask = nix::sys::signal::SigSet::thread_get_mask()
        .unwrap_or_else(|_| nix::sys::signal::SigSet::empty());
    // The connections lock <resolved path>.lock: so must we.
    let real = resolve_db_path(db).unwrap_or_else(|_| db.to_path_buf());
    let mut lock = match LockFile::open_as(&real, Opener::Tool) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(exit::LOCK_FILE);
        }
    };
    match take_within(&mut lock, timeout) {
        Ok(true) => {}
        Ok(false) => {
            let who = current_holder(lock.path())
                .map(|h| {
                    format!(
                        " (held by pid {} {})",
                        h.pid,
                        cmdline(h.pid).unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            eprintln!(
                "writelock: {} was not free within {}s{who}",
                lock.path().display(),
                timeout.unwrap_or(0.0)
            );
            return ExitCode::from(exit::TIMEOUT);
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(exit::LOCK_FILE);
        }
    }
    // Without --close the command inherits the locked descriptor, as under
    // flock(1): a connection of its own then borrows the lock instead of
    // waiting for us, and a process it leaves running keeps the lock until
    // that process exits. With --close (flock -o) the descriptor is
    // close-on-exec, as it was opened: only this process holds the lock.
    if !close {
        if let Err(e) = lock.inherit_to_children() {
            eprintln!("writelock: {e}");
        }
    }
    // Signals sent to run while the command runs are passed on to it, and
    // run holds the lock until the command has exited.
    let status =
        forward::run_passing_signals(Command::new(&command[0]).args(&command[1..]), caller_mask);
    // Let go by closing, as flock(1) does: a copy the command's children
    // still have keeps the lock; with none, it is free at once.
    lock.close();
    match status {
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt;
            let code = st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!("writelock: cannot run {}: {e}", command[0]);
            ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound {
                exit::NOT_FOUND
            } else {
                exit::CANNOT_EXEC
            })
        }
    }
}

/// Set by the timer thread of [`take_within`] once the timeout has passed.
static TIMED_OUT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_alarm(_: libc::c_int) {}

/// Take the lock for `run`, waiting in flock(2) in the kernel's queue (a
/// `->` waiter in /proc/locks, woken by the kernel, as flock(1) is), for at
/// most `timeout` seconds: `Ok(false)` when it ran out.
///
/// The timeout is a thread that, once it has passed, sends SIGALRM to this
/// thread, whose handler (installed without SA_RESTART) does nothing but
/// make flock(2) fail with EINTR. It repeats every 10 ms until the wait has
/// ended: a signal that lands just before the wait enters flock(2) would
/// otherwise be lost. SIGALRM is unblocked in this thread for the wait,
/// whatever mask the caller passed down; its mask and SIGALRM's disposition
/// are put back afterwards.
fn take_within(lock: &mut LockFile, timeout: Option<f64>) -> Result<bool, LockError> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let Some(secs) = timeout else {
        return take_blocking(lock);
    };
    if secs == 0.0 {
        return lock.try_lock();
    }
    let act = SigAction::new(
        SigHandler::Handler(on_alarm),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing (async-signal-safe), and nothing else
    // in this program handles SIGALRM.
    let caller_alarm = match unsafe { sigaction(Signal::SIGALRM, &act) } {
        Ok(old) => old,
        Err(e) => {
            eprintln!("writelock: cannot set up --timeout: {e}");
            return Ok(false);
        }
    };
    // A caller may have SIGALRM blocked (the mask is inherited across exec):
    // the signal would then stay pending and never end the wait. Unblock it
    // in this thread, the one that waits; the caller's mask and disposition
    // come back once the wait is over, so the command starts with them.
    let caller_mask = SigSet::thread_get_mask().ok();
    let mut alarm = SigSet::empty();
    alarm.add(Signal::SIGALRM);
    let _ = alarm.thread_unblock();
    let me = nix::sys::pthread::pthread_self();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let limit = Duration::from_secs_f64(secs);
    let timer = std::thread::spawn(move || {
        use std::sync::mpsc::RecvTimeoutError::Timeout;
        if wait.recv_timeout(limit) != Err(Timeout) {
            return;
        }
        TIMED_OUT.store(true, Ordering::SeqCst);
        loop {
            let _ = nix::sys::pthread::pthread_kill(me, Signal::SIGALRM);
            if wait.recv_timeout(Duration::from_millis(10)) != Err(Timeout) {
                return;
            }
        }
    });
    let taken = take_blocking(lock);
    drop(done);
    let _ = timer.join();
    // Every SIGALRM the timer sent has been handled by now: it was sent to
    // this thread, unblocked, before the join returned.
    if let Some(mask) = caller_mask {
        let _ = mask.thread_set_mask();
    }
    // SAFETY: puts back what was there before; nothing else handles SIGALRM.
    let _ = unsafe { sigaction(Signal::SIGALRM, &caller_alarm) };
    taken
}

/// [`LockFile::lock_blocking`] until taken or [`TIMED_OUT`].
fn take_blocking(lock: &mut LockFile) -> Result<bool, LockError> {
    loop {
        if TIMED_OUT.load(Ordering::SeqCst) {
            return Ok(false);
        }
        if lock.lock_blocking()? {
            return Ok(true);
        }
        if !TIMED_OUT.load(Ordering::SeqCst) {
            // Not a timeout: a holder of a deleted or replaced lock file is
            // still in its transaction (rare). Try again after a pause.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// `HH:MM:SS.mmm` (UTC) of `ms` since the epoch, for log lines.
fn clock_at(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

/// `HH:MM:SS.mmm` (UTC) now.
fn clock() -> String {
    clock_at(now_ms())
}

/// How often `watch` at most asks the kernel about holders that leave no
/// record (`flock(1)`, an application's own flock): a read of `/proc/locks`
/// stalls every lock call in the system while it runs.
const KERNEL_EVERY: Duration = Duration::from_millis(100);

/// Appended to `watch`'s lines about holders seen only in the kernel's lock
/// table.
const FROM_KERNEL: &str = "(seen in /proc/locks)";

/// The hold `watch` last announced: pid, and when the holder record says it
/// began (None for holders without a record), and when it was seen.
type Shown = Option<(u32, Option<u64>, Instant)>;

fn watch(db: &Path, every: Duration, duration: Option<f64>) -> ExitCode {
    let (_, lock, _) = match lock_file_of(db) {
        Ok(x) => x,
        Err(Fail(code)) => return ExitCode::from(code),
    };
    let end = duration.map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let kernel_every = KERNEL_EVERY.max(every);
    println!(
        "{} watching {}: holds of the extension and of writelock run from the shared page, \
         every one; other holders (flock(1), an application's own flock) from /proc/locks \
         every {} ms, so shorter holds of theirs may be missed",
        clock(),
        lock.display(),
        kernel_every.as_millis()
    );
    let held = |pid: u32, since: Option<u64>| {
        let cmd = cmdline(pid).unwrap_or_else(|| "exited".into());
        match since {
            Some(ms) => println!("{} held  by pid {pid} ({cmd})", clock_at(ms)),
            None => println!("{} held  by pid {pid} ({cmd}) {FROM_KERNEL}", clock()),
        }
    };
    // Holds of the extension's connections come from the ring on the shared
    // page, however short; the holder now from the record, else the kernel.
    let mut seen = peek(&lock).map_or(0, |s| s.holds);
    let mut current: Shown = None;
    let mut kernel_at: Option<Instant> = None;
    let mut kernel_pid: Option<u32> = None;
    loop {
        let snap = peek(&lock).unwrap_or_default();
        if snap.holds > seen + RING as u64 {
            println!(
                "{} ({} holds too short to see were not shown)",
                clock(),
                snap.holds - seen - RING as u64
            );
        }
        let since_seen = seen;
        for h in snap.recent.iter().filter(|h| h.n > since_seen) {
            seen = h.n;
            let end_ms = h.start_ms + h.held.as_millis() as u64;
            if !matches!(current, Some((pid, Some(start), _)) if pid == h.pid && start == h.start_ms)
            {
                held(h.pid, Some(h.start_ms));
            }
            println!(
                "{} free  pid {} held it {} ms",
                clock_at(end_ms),
                h.pid,
                fmt_ms(h.held)
            );
            current = None;
        }
        let now = match snap.holder {
            Some(r) if r.flags & RELEASING == 0 => Some((r.pid, Some(r.since_ms))),
            // Letting go: its ring entry follows.
            Some(r) => current.filter(|c| c.0 == r.pid).map(|c| (c.0, c.1)),
            None => {
                if kernel_at.is_none_or(|t| t.elapsed() >= kernel_every) {
                    kernel_at = Some(Instant::now());
                    kernel_pid = current_holder(&lock).map(|h| h.pid);
                }
                match (kernel_pid, current) {
                    // The holder shown, its record just cleared: the same hold.
                    (Some(pid), Some(c)) if c.0 == pid => Some((c.0, c.1)),
                    // A holder of the extension that set its record since.
                    (Some(pid), _) => {
                        let rec = peek(&lock).and_then(|s| s.holder);
                        let since = rec
                            .filter(|r| r.pid == pid && r.flags & RELEASING == 0)
                            .map(|r| r.since_ms);
                        Some((pid, since))
                    }
                    (None, _) => None,
                }
            }
        };
        match (current, now) {
            (Some((pid, since, _)), Some(n)) if (pid, since) == n => {}
            (Some((pid, since, t0)), now) => {
                // Left without a ring entry (a holder without a record), or
                // replaced by the next holder before its entry was read.
                if since.is_none() {
                    println!(
                        "{} free  pid {pid} held it {} ms {FROM_KERNEL}",
                        clock(),
                        fmt_ms(t0.elapsed())
                    );
                }
                current = now.map(|(pid, since)| {
                    held(pid, since);
                    (pid, since, Instant::now())
                });
            }
            (None, Some((pid, since))) => {
                held(pid, since);
                current = Some((pid, since, Instant::now()));
            }
            (None, None) => {}
        }
        if end.is_some_and(|e| Instant::now() >= e) {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(every);
    }
}

/// A duration in ms: whole above 10 ms, else with one decimal.
fn fmt_ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 10.0 {
        format!("{ms:.0}")
    } else {
        format!("{ms:.1}")
    }
}
