//! Who holds `<db>.lock`, and who waits: the kernel's lock table and the
//! holder record on the shared page.
//!
//! The kernel is the truth about *who* (`/proc/locks` lists every `flock`
//! with the pid that took it, and blocked `flock` waiters as `->` lines).
//! *Since when* comes from the holder record that holders of the extension
//! keep on the shared page (`<db>.lock-shm`); it is trusted only when its pid
//! is the pid the kernel reports (a `flock(1)` holder writes none).
//!
//! `/proc/locks` names a file by `major:minor:inode` as the kernel's lock
//! code sees it, which is not always what `stat()` reports (btrfs subvolumes
//! give `stat()` a device number of their own). So the file's name in the
//! table is learnt from the table itself: an OFD read lock taken for an
//! instant on a byte nobody else uses shows up in `/proc/locks` under exactly
//! that name ([`kernel_name`]). Even that name is not unique on btrfs: every
//! subvolume numbers its inodes from 256 under the filesystem's one device,
//! so two files can share it. Each candidate holder is therefore checked in
//! `/proc/<pid>/fd` for a descriptor of *our* file (by `stat()`), and a
//! candidate that has none is not the holder.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use nix::libc;

/// A file's name in `/proc/locks`: `major:minor:inode` (device in hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelName(pub String);

/// One line of `/proc/locks`, the parts we use.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line<'a> {
    blocked: bool,
    kind: &'a str,
    mode: &'a str,
    pid: i64,
    file: &'a str,
    start: &'a str,
    end: &'a str,
}

fn lines(text: &str) -> impl Iterator<Item = Line<'_>> {
    text.lines().filter_map(|l| {
        let mut f: Vec<&str> = l.split_whitespace().collect();
        // Blocked waiters are listed as "1: -> FLOCK ...".
        let blocked = f.get(1) == Some(&"->");
        if blocked {
            f.remove(1);
        }
        Some(Line {
            blocked,
            kind: f.get(1)?,
            mode: f.get(3)?,
            pid: f.get(4)?.parse().ok()?,
            file: f.get(5)?,
            start: f.get(6)?,
            end: f.get(7)?,
        })
    })
}

/// The pid holding an exclusive `flock` on the file `name`, from a
/// `/proc/locks` text. OFD and POSIX locks (our shadow locks, SQLite's) and
/// blocked waiters are skipped.
pub fn flock_holder_in(proc_locks: &str, name: &KernelName) -> Option<u32> {
    lines(proc_locks)
        .find(|l| !l.blocked && l.kind == "FLOCK" && l.mode == "WRITE" && l.file == name.0)
        .and_then(|l| u32::try_from(l.pid).ok())
}

/// The pids blocked in `flock` on the file `name`, in the kernel's order.
pub fn flock_waiters_in(proc_locks: &str, name: &KernelName) -> Vec<u32> {
    lines(proc_locks)
        .filter(|l| l.blocked && l.kind == "FLOCK" && l.file == name.0)
        .filter_map(|l| u32::try_from(l.pid).ok())
        .collect()
}

/// The name `/proc/locks` gives the lock file at `lock_path`, learnt by
/// taking an OFD read lock on a byte nobody else uses, for an instant.
/// Opens the file read-only and creates nothing (None if it cannot be
/// opened). The byte is far beyond anything the protocol uses and differs
/// per process and call, so two lookups never confuse each other's lines.
pub fn kernel_name(lock_path: &Path) -> Option<KernelName> {
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(lock_path)
        .ok()?;
    if !f.metadata().ok()?.file_type().is_file() {
        return None;
    }
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let byte = (1i64 << 40)
        + ((std::process::id() as i64) << 16)
        + (CALLS.fetch_add(1, Ordering::Relaxed) & 0xFFFF) as i64;
    let fl = libc::flock {
        l_type: libc::F_RDLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    };
    nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)).ok()?;
    // Closing `f` drops the probe lock. The probe's line is there: a read
    // that lost it (see `read_proc_locks`) is repeated.
    let b = byte.to_string();
    (0..3).find_map(|_| {
        let text = read_proc_locks()?;
        let name = lines(&text)
            .find(|l| l.kind == "OFDLCK" && l.start == b && l.end == b)
            .map(|l| KernelName(l.file.to_string()));
        name
    })
}

/// The text of `/proc/locks`, in as few `read()` calls as the kernel
/// allows. The kernel restarts its walk of the lock list at each call, by
/// position: a lock let go between two calls shifts the lines after it, and
/// one of them is never returned. `read_to_string` starts with a 32-byte read
/// and doubles, seven calls for a short table and as many chances to lose
/// the holder's line; one large buffer makes it one call up to a page of
/// lines (the most the kernel fills at once).
pub fn read_proc_locks() -> Option<String> {
    use std::io::Read;
    let mut f = File::open("/proc/locks").ok()?;
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).ok()
}

/// What is known about the holder of a lock file right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The process that took the flock (for `flock(1)`, flock's own pid).
    pub pid: u32,
    /// How long it has held it, when it left a record (extension holders do).
    pub held_for: Option<Duration>,
}

/// Whether process `pid` has a descriptor of the file `(dev, ino)` (as
/// `stat()` names it) whose description holds a `flock` write lock (when
/// `holding`), or any descriptor of it. `None` when its descriptors cannot
/// be read (another user's process).
fn has_descriptor(pid: u32, file: (u64, u64), holding: bool) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let mut readable = false;
    for e in dir.flatten() {
        readable = true;
        let Ok(m) = std::fs::metadata(e.path()) else {
            continue;
        };
        if (m.dev(), m.ino()) != file {
            continue;
        }
        if !holding {
            return Some(true);
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        if info
            .lines()
            .any(|l| l.starts_with("lock:") && l.contains("FLOCK") && l.contains("WRITE"))
        {
            return Some(true);
        }
    }
    readable.then_some(false)
}

/// Of the pids `/proc/locks` gives for a name, those that hold (or wait
/// for) *our* file: the ones that have a descriptor of it, or, for pids we
/// may not look into, all of them when there is no better answer.
fn ours(pids: Vec<u32>, file: (u64, u64), holding: bool) -> Vec<u32> {
    let checked: Vec<(u32, Option<bool>)> = pids
        .into_iter()
        .map(|p| (p, has_descriptor(p, file, holding)))
        .collect();
    let sure: Vec<u32> = checked
        .iter()
        .filter(|c| c.1 == Some(true))
        .map(|c| c.0)
        .collect();
    if !sure.is_empty() {
        return sure;
    }
    checked
        .into_iter()
        .filter(|c| c.1.is_none())
        .map(|c| c.0)
        .collect()
}

/// The pids of every exclusive `flock` (granted) on the file `name`.
fn flock_holders_in(proc_locks: &str, name: &KernelName) -> Vec<u32> {
    lines(proc_locks)
        .filter(|l| !l.blocked && l.kind == "FLOCK" && l.mode == "WRITE" && l.file == name.0)
        .filter_map(|l| u32::try_from(l.pid).ok())
        .collect()
}

/// The holder and the blocked `flock` waiters of `lock_path` now, from one
/// read of `/proc/locks` (None: no lock file, or unreadable).
pub fn holder_and_waiters(lock_path: &Path) -> Option<(Option<Holder>, Vec<u32>)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(lock_path).ok()?;
    let file = (meta.dev(), meta.ino());
    let name = kernel_name(lock_path)?;
    let text = read_proc_locks()?;
    let waiters = ours(flock_waiters_in(&text, &name), file, false);
    let holder = ours(flock_holders_in(&text, &name), file, true)
        .first()
        .copied()
        .map(|pid| {
            let held_for = crate::page::peek(lock_path)
                .and_then(|s| s.holder)
                .filter(|h| h.pid == pid)
                .map(|h| Duration::from_millis(crate::page::now_ms().saturating_sub(h.since_ms)));
            Holder { pid, held_for }
        });
    Some((holder, waiters))
}

/// Look up the holder of `lock_path` (None when free or unreadable).
pub fn current_holder(lock_path: &Path) -> Option<Holder> {
    holder_and_waiters(lock_path)?.0
}

/// A process's command line, arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let parts: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_flock_writer_of_this_file_only() {
        let text = "\
1: OFDLCK ADVISORY  READ  -1 fd:01:77 0 0
2: POSIX  ADVISORY  READ  99 fd:01:77 1073741826 1073742335
3: FLOCK  ADVISORY  WRITE 1234 fd:01:77 0 EOF
3: -> FLOCK  ADVISORY  WRITE 555 fd:01:77 0 EOF
4: FLOCK  ADVISORY  WRITE 888 fd:01:78 0 EOF
5: FLOCK  ADVISORY  WRITE 999 08:02:77 0 EOF
";
        let n = |s: &str| KernelName(s.into());
        assert_eq!(flock_holder_in(text, &n("fd:01:77")), Some(1234));
        assert_eq!(flock_holder_in(text, &n("fd:01:78")), Some(888));
        assert_eq!(
            flock_holder_in(text, &n("08:02:77")),
            Some(999),
            "same inode, another device: another file"
        );
        assert_eq!(flock_holder_in(text, &n("fd:01:79")), None);
        assert_eq!(flock_waiters_in(text, &n("fd:01:77")), [555]);
    }

    #[test]
    fn holder_of_a_real_lock_by_the_kernels_own_name_for_the_file() {
        let dir = std::env::temp_dir().join(format!("wl-holder-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join("h.db.lock");
        let f = File::create(&p).unwrap();
        let name = kernel_name(&p).unwrap();
        assert!(name.0.matches(':').count() == 2, "{name:?}");
        assert_eq!(current_holder(&p), None);
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map(|l| {
                let h = current_holder(&p).unwrap();
                assert_eq!(h.pid, std::process::id());
                assert!(cmdline(h.pid).is_some());
                drop(l);
            })
            .map_err(|e| e.1)
            .unwrap();
        assert_eq!(
            kernel_name(&dir.join("missing.lock")),
            None,
            "creates nothing"
        );
        assert!(!dir.join("missing.lock").exists());
    }
}
