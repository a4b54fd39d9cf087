//! Who holds `<db>.lock`: the kernel's lock table and the holder record.
//!
//! The kernel is the truth about *who* (`/proc/locks` lists every `flock` with
//! the pid that took it). *Since when* comes from a small record the holder
//! writes into `<db>.lock` when it takes the lock: one `pwrite` of a fixed
//! 64-byte line, no fsync, no extra file. A record is trusted only when its
//! pid is the pid the kernel reports (a `flock(1)` holder writes none).

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Size of the record at offset 0 of `<db>.lock`.
pub const RECORD_LEN: usize = 64;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// The record for `pid` taking the lock at `since_ms`.
pub fn record(pid: u32, since_ms: u64) -> [u8; RECORD_LEN] {
    use std::io::Write;
    let mut out = [b' '; RECORD_LEN];
    // Formatted in place (this runs on every acquisition). A 10-digit pid
    // and 13-digit milliseconds take 57 bytes, which fit before the newline;
    // an absurd value would be cut short, never overrun the buffer.
    let _ = write!(
        &mut out[..RECORD_LEN - 1],
        "writelock-holder v1 pid={pid} since_ms={since_ms}"
    );
    out[RECORD_LEN - 1] = b'\n';
    out
}

/// Write the record for process `pid` (the caller's), now. Best effort: the
/// record only informs; failing to write it must not fail a transaction.
pub fn write_record(f: &File, pid: u32) {
    let _ = f.write_at(&record(pid, now_ms()), 0);
}

/// Parse a record: `(pid, since_ms)`.
pub fn parse_record(bytes: &[u8]) -> Option<(u32, u64)> {
    let s = std::str::from_utf8(bytes.get(..RECORD_LEN.min(bytes.len()))?).ok()?;
    let mut it = s.split_whitespace();
    if it.next()? != "writelock-holder" || it.next()? != "v1" {
        return None;
    }
    let pid = it.next()?.strip_prefix("pid=")?.parse().ok()?;
    let since = it.next()?.strip_prefix("since_ms=")?.parse().ok()?;
    Some((pid, since))
}

/// The pid holding an exclusive `flock` on the file with inode `ino`, from a
/// `/proc/locks` text. Lines look like
/// `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF` (device in hex, inode in
/// decimal). OFD and POSIX locks (our shadow locks, SQLite's) are skipped.
pub fn flock_holder_in(proc_locks: &str, ino: u64) -> Option<u32> {
    proc_locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Blocked waiters are listed as "1: -> FLOCK ...": f[1] is "->".
        if f.get(1) != Some(&"FLOCK") || f.get(3) != Some(&"WRITE") {
            return None;
        }
        let file_ino: u64 = f.get(5)?.rsplit(':').next()?.parse().ok()?;
        (file_ino == ino).then(|| f.get(4)?.parse().ok()).flatten()
    })
}

/// What is known about the holder of a lock file right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The process that took the flock (for `flock(1)`, flock's own pid).
    pub pid: u32,
    /// How long it has held it, when it left a record (extension holders do).
    pub held_for: Option<Duration>,
}

/// Look up the holder of `lock_path` (None when free or unreadable).
pub fn current_holder(lock_path: &Path) -> Option<Holder> {
    let ino = std::fs::symlink_metadata(lock_path).ok()?.ino();
    let pid = flock_holder_in(&std::fs::read_to_string("/proc/locks").ok()?, ino)?;
    let mut buf = [0u8; RECORD_LEN];
    let held_for = File::open(lock_path)
        .and_then(|f| f.read_at(&mut buf, 0))
        .ok()
        .and_then(|n| parse_record(&buf[..n]))
        .filter(|(rpid, _)| *rpid == pid)
        .map(|(_, since)| Duration::from_millis(now_ms().saturating_sub(since)));
    Some(Holder { pid, held_for })
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
    fn record_round_trips() {
        let r = record(4242, 1_700_000_000_123);
        assert_eq!(r.len(), RECORD_LEN);
        assert_eq!(parse_record(&r), Some((4242, 1_700_000_000_123)));
        assert_eq!(parse_record(b""), None);
        assert_eq!(parse_record(b"something else entirely"), None);
    }

    #[test]
    fn finds_the_flock_writer_only() {
        let text = "\
1: OFDLCK ADVISORY  READ  -1 fd:01:77 0 0
2: POSIX  ADVISORY  READ  99 fd:01:77 1073741826 1073742335
3: FLOCK  ADVISORY  WRITE 1234 fd:01:77 0 EOF
3: -> FLOCK  ADVISORY  WRITE 555 fd:01:77 0 EOF
4: FLOCK  ADVISORY  WRITE 888 fd:01:78 0 EOF
";
        assert_eq!(flock_holder_in(text, 77), Some(1234));
        assert_eq!(flock_holder_in(text, 78), Some(888));
        assert_eq!(flock_holder_in(text, 79), None);
    }

    #[test]
    fn holder_of_a_real_lock() {
        let dir = std::env::temp_dir().join(format!("wl-holder-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join("h.db.lock");
        let f = File::create(&p).unwrap();
        assert_eq!(current_holder(&p), None);
        let f = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|e| e.1)
            .unwrap();
        write_record(&f, std::process::id());
        let h = current_holder(&p).unwrap();
        assert_eq!(h.pid, std::process::id());
        assert!(h.held_for.unwrap() < Duration::from_secs(5));
        assert!(cmdline(h.pid).is_some());
    }
}
