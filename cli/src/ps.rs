//! `writelock ps DB`: every process that has the database file open, and
//! whether its connections are the extension's.
//!
//! A connection of the extension that may write keeps, for as long as it is
//! open, a descriptor on `<db>.lock` marked with an OFD read lock on
//! `MARKER_BYTE`; `fd_locks` is the rule the extension itself applies to its
//! own descriptors. A process is protected when it has at least as many
//! marked lock-file descriptors as writable descriptors on the database.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;

use writelock_core::holder::cmdline;
use writelock_core::lockfile::fd_locks;

/// What one process has open on the database and its lock file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Opener {
    pub pid: u32,
    /// Descriptors on the database opened for writing (`O_RDWR`/`O_WRONLY`).
    pub db_writable: u32,
    /// Descriptors on the database opened `O_RDONLY`.
    pub db_read_only: u32,
    /// Descriptors on the lock file with the extension's marker.
    pub marked: u32,
    /// Holds the write lock now (`LOCK_EX` on a descriptor of the lock file).
    pub holds_lock: bool,
}

impl Opener {
    /// Opened the database only for reading: it cannot write, so it is not
    /// judged.
    pub fn read_only(&self) -> bool {
        self.db_writable == 0
    }

    /// Each writable descriptor on the database has a marked lock-file
    /// descriptor beside it: one per connection of the extension.
    pub fn protected(&self) -> bool {
        self.marked >= self.db_writable
    }
}

/// Everything `ps` found: the openers by pid, and how many processes'
/// descriptors it was not allowed to read.
#[derive(Debug, Default)]
pub struct Found {
    pub openers: Vec<Opener>,
    pub not_inspectable: u32,
}

/// The access mode in an fdinfo text's `flags:` line (octal): `O_RDONLY`,
/// `O_WRONLY` or `O_RDWR`, or None if there is no such line.
pub fn access_mode(fdinfo: &str) -> Option<i32> {
    let flags = fdinfo.lines().find_map(|l| l.strip_prefix("flags:"))?;
    i32::from_str_radix(flags.trim(), 8)
        .ok()
        .map(|f| f & nix::libc::O_ACCMODE)
}

/// Whether `pid` is a kernel thread (`PF_KTHREAD` in /proc/PID/stat, which
/// anyone may read): it opens no files, so it is not counted as a process
/// that could not be inspected.
fn kernel_thread(pid: u32) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state ppid pgrp session tty_nr tpgid flags ...": comm may
    // hold spaces and parentheses, so count from the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(6))
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|f| f & PF_KTHREAD != 0)
}

/// Look through `/proc/*/fd` for descriptors on `db` and `lock`, each
/// matched by path (as the kernel names the open file, symlinks resolved)
/// and then by device and inode.
pub fn scan(db: &Path, lock: &Path) -> Found {
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let (db_id, lock_id) = (id(db), id(lock));
    // The kernel names an open file by its canonical path.
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (db, lock) = (canon(db), canon(lock));
    let me = std::process::id();
    let mut found = Found::default();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let fds = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
            Ok(fds) => fds,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                found.not_inspectable += u32::from(!kernel_thread(pid));
                continue;
            }
            Err(_) => continue, // exited meanwhile, or a kernel thread
        };
        let mut o = Opener {
            pid,
            ..Opener::default()
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let is_db = target == db;
            if !is_db && target != lock {
                continue;
            }
            let same = id(&fd.path());
            if same.is_none() || same != if is_db { db_id } else { lock_id } {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            if is_db {
                match access_mode(&info) {
                    Some(nix::libc::O_RDONLY) => o.db_read_only += 1,
                    _ => o.db_writable += 1,
                }
            } else {
                let l = fd_locks(&info);
                o.marked += u32::from(l.marked);
                o.holds_lock |= l.flock;
            }
        }
        if o.db_writable + o.db_read_only > 0 {
            found.openers.push(o);
        }
    }
    found.openers.sort_by_key(|o| o.pid);
    found
}

/// Print what `scan` found; exit 1 if a writable opener is not protected.
pub fn report(db: &Path, lock: &Path, json: bool) -> ExitCode {
    let found = scan(db, lock);
    let unprotected = found
        .openers
        .iter()
        .any(|o| !o.read_only() && !o.protected());
    let code = if unprotected {
        ExitCode::from(crate::exit::FOUND)
    } else {
        ExitCode::SUCCESS
    };
    if json {
        let v = serde_json::json!({
            "db": db.to_string_lossy(),
            "lock_file": lock.to_string_lossy(),
            "processes": found.openers.iter().map(|o| serde_json::json!({
                "pid": o.pid,
                "cmdline": cmdline(o.pid),
                "read_only": o.read_only(),
                "protected": (!o.read_only()).then(|| o.protected()),
                "db_fds_writable": o.db_writable,
                "db_fds_read_only": o.db_read_only,
                "marker_fds": o.marked,
                "holds_lock": o.holds_lock,
            })).collect::<Vec<_>>(),
            "not_inspectable": found.not_inspectable,
        });
        println!("{v}");
        return code;
    }
    println!("database:  {}", db.display());
    println!("lock file: {}", lock.display());
    let cmd = |pid: u32| cmdline(pid).unwrap_or_else(|| "?".into());
    let (writers, readers): (Vec<&Opener>, Vec<&Opener>) =
        found.openers.iter().partition(|o| !o.read_only());
    if writers.is_empty() {
        println!("no process has the database open for writing");
    }
    for o in &writers {
        let n = o.db_writable;
        let conns = if n == 1 {
            "1 connection".to_string()
        } else {
            format!("{n} connections")
        };
        let how = if o.protected() {
            format!("protected      {conns}, all with the extension")
        } else if o.marked == 0 {
            format!("NOT PROTECTED  {conns}, none with the extension")
        } else {
            format!(
                "NOT PROTECTED  {conns}, {} without the extension",
                n - o.marked
            )
        };
        let holding = if o.holds_lock {
            ", holds the write lock"
        } else {
            ""
        };
        println!("pid {:<7} {how}{holding} ({})", o.pid, cmd(o.pid));
    }
    if !readers.is_empty() {
        println!("read-only (opened O_RDONLY: cannot write, not judged):");
        for o in &readers {
            println!("pid {:<7} read-only      ({})", o.pid, cmd(o.pid));
        }
    }
    println!(
        "{} processes not inspectable (their /proc/PID/fd may not be read: run as their user or root)",
        found.not_inspectable
    );
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_mode_comes_from_the_octal_flags_line() {
        assert_eq!(access_mode("pos:\t0\nflags:\t0100000\n"), Some(0));
        assert_eq!(access_mode("pos:\t0\nflags:\t02100002\n"), Some(2));
        assert_eq!(access_mode("flags:\t01\n"), Some(1));
        assert_eq!(access_mode("pos:\t0\n"), None);
    }

    #[test]
    fn protected_means_a_marker_per_writable_descriptor() {
        let o = |w, r, m| Opener {
            pid: 1,
            db_writable: w,
            db_read_only: r,
            marked: m,
            holds_lock: false,
        };
        assert!(o(1, 0, 1).protected());
        assert!(o(2, 0, 2).protected());
        assert!(!o(2, 0, 1).protected());
        assert!(!o(1, 0, 0).protected());
        assert!(o(0, 1, 0).read_only());
        assert!(!o(1, 1, 1).read_only());
    }
}
