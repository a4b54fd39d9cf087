//! Where the extension's messages go besides SQLite's own log
//! (`sqlite3_log`, which most programs never configure).
//!
//! A warning the user must see — a database opened before the extension was
//! loaded, and so not protected — is also written to standard error, but
//! only when someone reads it there: a terminal or a pipe. In a daemon fd 2
//! may be a data file, a socket or `/dev/null`; the extension writes nothing
//! unasked into those.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;

use nix::sys::stat::{fstat, SFlag};

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
/// [reaches a reader](reaches_a_reader); whether it was written.
pub fn to_stderr_if_read(text: &str) -> bool {
    let err = std::io::stderr();
    if !reaches_a_reader(err.as_fd()) {
        return false;
    }
    let mut line = text.replace('\0', "?");
    line.push('\n');
    err.lock().write_all(line.as_bytes()).is_ok()
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
