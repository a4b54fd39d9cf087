//! Where the extension's messages go besides SQLite's own log
//! (`sqlite3_log`, which most programs never configure).
//!
//! * `WRITELOCK_LOG` ([`crate::options::parse_log`]) sends every warning and
//!   error the extension logs also to standard error or to a file: one line
//!   per message, with a UTC timestamp and the pid, appended with one
//!   `write` (so lines of several processes do not mix). It is read once per
//!   process, when the extension is loaded ([`init_from_env`]). A path must
//!   be a regular file: nothing the extension opens or writes may block or
//!   kill its host, and no write raises `SIGPIPE`
//!   ([`crate::sys::write_all_no_sigpipe`]).
//! * A warning the user must see — a database opened before the extension
//!   was loaded, and so not protected — is also written to standard error,
//!   but only when someone reads it there: a terminal or a pipe. In a daemon
//!   fd 2 may be a data file, a socket or `/dev/null`; the extension writes
//!   nothing unasked into those ([`to_stderr_if_read`]).

use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::SystemTime;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::libc;
use nix::sys::stat::{fstat, SFlag};

use crate::sys;

use crate::options::{parse_log, LogTarget, LOG_VAR};

/// Whether `fd` reaches a reader: a terminal (a character device that is a
/// tty, not `/dev/null`) or a pipe.
pub fn reaches_a_reader(fd: impl AsFd) -> bool {
    let fd = fd.as_fd();
    let Ok(st) = fstat(fd) else {
        return false;
    };
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    (kind == SFlag::S_IFCHR && fd.is_terminal()) || kind == SFlag::S_IFIFO
}

/// Write `text` (a newline added) to standard error if it
/// [reaches a reader](reaches_a_reader); whether it was written. Never
/// raises `SIGPIPE` (the reader of a pipe may be gone).
pub fn to_stderr_if_read(text: &str) -> bool {
    let err = std::io::stderr();
    if !reaches_a_reader(err.as_fd()) {
        return false;
    }
    let mut line = text.replace('\0', "?");
    line.push('\n');
    sys::write_all_no_sigpipe(err.as_fd(), line.as_bytes()).is_ok()
}

/// Where this process's messages go besides `sqlite3_log`.
enum Sink {
    Nowhere,
    Stderr,
    File(File),
}

static SINK: OnceLock<Sink> = OnceLock::new();
/// A write to the sink failed once: said once, through the caller.
static FAILED: AtomicBool = AtomicBool::new(false);
/// The sink's reader is gone (`EPIPE`): nothing more is written to it.
static GONE: AtomicBool = AtomicBool::new(false);

/// Read `WRITELOCK_LOG` and open its file, once per process. The call that
/// did it gets the error, if any — a bad value, a file that cannot be
/// opened, a path that is not a regular file — naming the variable, the
/// path and the cause; every later call gets `Ok`. Messages then go to
/// `sqlite3_log` only.
pub fn init_from_env() -> Result<(), String> {
    let mut error = Ok(());
    SINK.get_or_init(|| {
        let value = match std::env::var_os(LOG_VAR).map(|v| v.into_string()) {
            None => return Sink::Nowhere,
            Some(Ok(v)) => v,
            Some(Err(v)) => {
                error = Err(format!(
                    "writelock: bad value {v:?} for {LOG_VAR}: not UTF-8; messages go to \
                     sqlite3_log only"
                ));
                return Sink::Nowhere;
            }
        };
        match parse_log(&value).and_then(|t| open(t.as_ref())) {
            Ok(sink) => sink,
            Err(e) => {
                error = Err(e);
                Sink::Nowhere
            }
        }
    });
    error
}

/// Open `WRITELOCK_LOG`'s file. Only a regular file (created if missing,
/// appended to): a FIFO's open blocks until a reader comes, a device may
/// block or be a terminal, and the extension must never hang its host.
/// The open itself never blocks (`O_NONBLOCK`, cleared once the file is
/// known to be regular); `/dev/null` is accepted and means nowhere.
fn open(target: Option<&LogTarget>) -> Result<Sink, String> {
    let path = match target {
        None => return Ok(Sink::Nowhere),
        Some(LogTarget::Stderr) => return Ok(Sink::Stderr),
        Some(LogTarget::File(path)) => path,
    };
    let refuse = |why: String| {
        format!(
            "writelock: cannot open {LOG_VAR} file {}: {why}; messages go to sqlite3_log only",
            path.display()
        )
    };
    let not_regular = |t: std::fs::FileType| {
        refuse(format!(
            "not a regular file (a {}; {LOG_VAR}=stderr reaches a terminal or a pipe)",
            crate::lockfile::kind_of(t)
        ))
    };
    if let Ok(m) = std::fs::metadata(path) {
        if is_dev_null(&m) {
            return Ok(Sink::Nowhere);
        }
        if !m.is_file() {
            return Err(not_regular(m.file_type()));
        }
    }
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| refuse(e.to_string()))?;
    // Replaced since the check above: check what was opened.
    let m = f.metadata().map_err(|e| refuse(e.to_string()))?;
    if !m.is_file() {
        return Err(not_regular(m.file_type()));
    }
    let flags = fcntl(&f, FcntlArg::F_GETFL).map_err(|e| refuse(e.to_string()))?;
    let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
    fcntl(&f, FcntlArg::F_SETFL(flags)).map_err(|e| refuse(e.to_string()))?;
    Ok(Sink::File(f))
}

fn is_dev_null(m: &std::fs::Metadata) -> bool {
    m.file_type().is_char_device()
        && std::fs::metadata("/dev/null").is_ok_and(|n| (n.dev(), n.ino()) == (m.dev(), m.ino()))
}

/// Whether `WRITELOCK_LOG` sends messages to standard error.
pub fn goes_to_stderr() -> bool {
    matches!(SINK.get(), Some(Sink::Stderr))
}

/// Send one message to `WRITELOCK_LOG`'s target, if there is one: `level`
/// is what kind of message it is (`warning`, `busy`, `error (3850)`).
///
/// A failed write drops the line. The first failure returns a message to
/// report (through `sqlite3_log`: there is nowhere else); later ones are
/// silent. After `EPIPE` (the reader of a pipe is gone) nothing more is
/// written there; after other errors (`ENOSPC`) later lines are tried.
#[must_use]
pub fn write(level: &str, msg: &str) -> Option<String> {
    let line = || line(SystemTime::now(), crate::process::pid(), level, msg);
    if GONE.load(Ordering::Relaxed) {
        return None;
    }
    // One write per line: O_APPEND puts each at the end, whole, even with
    // other processes writing the same file.
    let (r, what) = match SINK.get() {
        None | Some(Sink::Nowhere) => return None,
        Some(Sink::Stderr) => (
            sys::write_all_no_sigpipe(std::io::stderr().as_fd(), line().as_bytes()),
            "standard error",
        ),
        Some(Sink::File(f)) => (
            sys::write_all_no_sigpipe(f.as_fd(), line().as_bytes()),
            "its file",
        ),
    };
    let e = r.err()?;
    let gone = e == Errno::EPIPE;
    if gone {
        GONE.store(true, Ordering::Relaxed);
    }
    if FAILED.swap(true, Ordering::Relaxed) {
        return None;
    }
    Some(format!(
        "writelock: cannot write to {LOG_VAR} ({what}): {}; {}",
        e.desc(),
        if gone {
            "no more messages go there"
        } else {
            "lines are dropped while writes fail, and this is said only once"
        }
    ))
}

/// `2025-01-31T12:00:00.123Z writelock[4242] warning: process 4242 held …`:
/// the message on one line, without its own `writelock: ` prefix.
fn line(now: SystemTime, pid: u32, level: &str, msg: &str) -> String {
    let msg = msg.strip_prefix("writelock: ").unwrap_or(msg);
    let msg: String = msg
        .chars()
        .map(|c| {
            if c == '\n' || c == '\r' || c == '\0' {
                ' '
            } else {
                c
            }
        })
        .collect();
    format!("{} writelock[{pid}] {level}: {msg}\n", utc(now))
}

/// `now` in UTC, ISO 8601 to the millisecond.
fn utc(now: SystemTime) -> String {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_reach_a_reader_files_and_dev_null_do_not() {
        let (r, w) = std::io::pipe().unwrap();
        assert!(reaches_a_reader(&w) && reaches_a_reader(&r));
        let dir = std::env::temp_dir().join(format!("writelock-log-{}", std::process::id()));
        let f = std::fs::File::create(&dir).unwrap();
        assert!(!reaches_a_reader(&f), "a regular file (a daemon's stderr)");
        let _ = std::fs::remove_file(&dir);
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(!reaches_a_reader(&null), "a character device, not a tty");
    }

    #[test]
    fn timestamps_are_utc_to_the_millisecond() {
        use std::time::Duration;
        let at = |ms: u64| utc(SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(4_102_444_800_001), "2100-01-01T00:00:00.001Z");
    }

    #[test]
    fn one_line_per_message_with_time_pid_and_level() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_042);
        assert_eq!(
            line(t, 42, "warning", "writelock: two\nlines"),
            "2023-11-14T22:13:20.042Z writelock[42] warning: two lines\n"
        );
    }

    #[test]
    fn a_file_that_cannot_be_opened_is_named_with_the_cause() {
        let p = std::path::PathBuf::from("/nonexistent-writelock-dir/x.log");
        let Err(e) = open(Some(&LogTarget::File(p))) else {
            panic!("opened");
        };
        assert!(
            e.contains("WRITELOCK_LOG")
                && e.contains("/nonexistent-writelock-dir/x.log")
                && e.contains("No such file or directory"),
            "{e}"
        );
    }

    #[test]
    fn only_a_regular_file_is_opened_and_dev_null_is_nowhere() {
        let dir = std::env::temp_dir().join(format!("writelock-log-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        for (p, kind) in [(&fifo, "a FIFO"), (&dir, "a directory")] {
            let Err(e) = open(Some(&LogTarget::File(p.clone()))) else {
                panic!("opened {p:?}");
            };
            assert!(e.contains("not a regular file") && e.contains(kind), "{e}");
        }
        let null = LogTarget::File("/dev/null".into());
        assert!(matches!(open(Some(&null)), Ok(Sink::Nowhere)));
        let file = dir.join("w.log");
        let Ok(Sink::File(f)) = open(Some(&LogTarget::File(file.clone()))) else {
            panic!("a regular file, created");
        };
        let flags = OFlag::from_bits_truncate(fcntl(&f, FcntlArg::F_GETFL).unwrap());
        assert!(flags.contains(OFlag::O_APPEND) && !flags.contains(OFlag::O_NONBLOCK));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_terminal_reaches_a_reader() {
        use nix::fcntl::OFlag;
        use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
        // A pseudo-terminal's secondary side is what fd 2 of a shell is.
        let Ok(main) = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY) else {
            eprintln!("note: no pseudo-terminals here, skipped");
            return;
        };
        grantpt(&main).unwrap();
        unlockpt(&main).unwrap();
        let tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(ptsname_r(&main).unwrap())
            .unwrap();
        assert!(reaches_a_reader(&tty));
    }
}
