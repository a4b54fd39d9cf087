//! The shared page: `<db>.lock-shm`, mapped by every process that uses the
//! extension on a database.
//!
//! `<db>.lock` itself stays an ordinary lock file: applications open it with
//! `O_TRUNC` (`open("app.db.lock", "w")`, `exec 9>app.db.lock`), and touching a
//! mapping of a file truncated under it raises `SIGBUS`. So what the
//! extension's processes share lives in a side file that nobody else opens,
//! mapped `MAP_SHARED` (which also works across containers that share the
//! directory, unlike `/dev/shm`):
//!
//! * **the holder record** — which process of the extension holds the lock,
//!   since when, and whether it borrows its application's own `flock`. The
//!   holder writes it after taking the `flock` and clears it before letting
//!   go, so a record that is set names a live holder unless that holder was
//!   killed (checked with `kill(pid, 0)`).
//! * **waiter slots** — one per waiting connection: pid, arrival time, and a
//!   futex word. A releaser wakes the *oldest* sleeping waiter, only it, and
//!   only when someone waits: one wake-up per release. Whether it also
//!   reserves the lock for that waiter (a *hand-off*) is
//!   [`crate::wait::policy`]'s decision; the page keeps the word.
//! * **the gates** — futex words bumped when a handle lets go of a shadow
//!   lock or the pending marker while someone waits for that: readers held
//!   off by a committing writer, a writer waiting for readers.
//! * **the ring** — the last [`RING`] holds by the extension's handles (pid,
//!   start, duration), so `writelock watch` misses none, however short.
//!
//! Correctness never depends on the page: the `flock` is the lock. A page that
//! is lost, deleted or replaced costs wake-ups (waiters then poll) and
//! descriptor scans, never exclusion. The file only grows; nothing in the
//! extension truncates it (truncating it under running processes would raise
//! `SIGBUS` in them — never do that; deleting it is harmless).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use nix::libc;

use crate::wait::policy;

/// `<db>.lock-shm` for a lock file `<db>.lock`.
pub fn page_path_for(lock_path: &Path) -> PathBuf {
    let mut s = lock_path.as_os_str().to_owned();
    s.push("-shm");
    PathBuf::from(s)
}

/// "WLK1", little-endian.
const MAGIC: u32 = 0x314B_4C57;
const VERSION: u32 = 1;

/// Size of the side file and of the mapping.
pub const PAGE_LEN: usize = 16 * 1024;

// Header fields (byte offsets).
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
/// The holder word: `pid << 32 | token << 16 | seq << 8 | flags` (see
/// [`HolderRecord`]), 0 when nobody of the extension holds the lock. One
/// word, so a borrower's compare-and-swap covers who and how at once, and a
/// holder clearing its record after letting go never clears the record of
/// the next holder, even one of its own process and copy (`seq` differs).
const OFF_HOLDER: usize = 8;
const OFF_HOLDER_SINCE_MS: usize = 16;
/// Occupied waiter slots (a hint: 0 lets a releaser skip the scan).
const OFF_WAITING: usize = 28;
/// Acquisitions by the extension's handles, ever (for tools).
const OFF_ACQUISITIONS: usize = 32;
/// Which `<db>.lock` the holder locked: its device and inode (see
/// [`HolderRecord::file`]).
const OFF_HOLDER_DEV: usize = 40;
const OFF_HOLDER_INO: usize = 48;
/// One more than the highest slot ever claimed: scans stop there.
const OFF_SLOTS_HI: usize = 24;
/// The gates: a generation bumped on releases that someone waits for, and
/// how many sleep on it — readers waiting for a writer, and the writer
/// waiting for readers.
const OFF_GATE: usize = 56;
const OFF_WGATE: usize = 80;
/// The hand-off word ([`crate::wait::policy::Handoff::to_word`]), 0: none.
const OFF_HANDOFF: usize = 64;
/// Holds written to the ring, ever.
const OFF_RING_HEAD: usize = 72;
/// The holder's process slot: `(slot + 1) << 32 | generation`, 0: none
/// (written with the holder word; see [`Liveness`]).
const OFF_HOLDER_PROC: usize = 88;

/// Process slots: one per process (and copy of the extension) that has the
/// page open, so a holder record can be checked against the kernel instead
/// of a pid, which another pid namespace does not see and which is reused.
/// Each is `generation << 32 | pid` (8 bytes); its owner holds an OFD write
/// lock on byte `PROC_LOCKS + i` of the side file for as long as it has the
/// page open, which the kernel drops when the process dies.
const PROCS_AT: usize = SLOTS_AT + SLOTS * SLOT_LEN;
const PROC_LEN: usize = 8;
/// How many processes can have a slot at once (more are checked by pid).
pub const PROCS: usize = 512;
const PROC_LOCKS: i64 = 1 << 21;
const _: () = assert!(PROCS_AT + PROCS * PROC_LEN <= PAGE_LEN);

/// The ring of recent holds: [`RING`] entries of [`RING_ENTRY`] bytes.
const RING_AT: usize = 256;
const RING_ENTRY: usize = 40;
/// How many recent holds the ring keeps.
pub const RING: usize = 64;
const _: () = assert!(RING_AT + RING * RING_ENTRY <= 4096);
// Ring entry fields: the hold's number (1, 2, …; 0 while written), pid,
// flags, start (ms since the epoch), duration (µs), and the number again:
// a reader that finds both equal read a whole entry.
const R_SEQ: usize = 0;
const R_PID: usize = 8;
const R_FLAGS: usize = 12;
const R_START_MS: usize = 16;
const R_HELD_US: usize = 24;
const R_SEQ2: usize = 32;

/// Waiter slots start here; each is [`SLOT_LEN`] bytes.
const SLOTS_AT: usize = 4096;
const SLOT_LEN: usize = 32;
/// How many connections can wait with wake-ups at once (more poll).
pub const SLOTS: usize = 256;
const _: () = assert!(SLOTS_AT + SLOTS * SLOT_LEN <= PAGE_LEN);

// Slot fields.
const S_STATE: usize = 0;
const S_PID: usize = 4;
const S_ARRIVAL: usize = 8;
const S_EXPIRES: usize = 16;

/// Slot states (the slot's futex word).
const FREE: u32 = 0;
const WAITING: u32 = 1;
const WOKEN: u32 = 2;
/// Owned, but its owner is back in SQLite between two sleeps (or gave up):
/// not woken, never handed the lock.
const AWAY: u32 = 3;

/// A waiting process holds an OFD write lock on byte `SLOT_LOCKS + i` of the
/// side file while it owns slot `i`: the kernel drops it when the process
/// dies, which is how a dead owner's slot is told from a slow one's.
const SLOT_LOCKS: i64 = 1 << 20;

/// Holder flags.
pub mod flags {
    /// The holder borrows its application's own `flock`.
    pub const BORROWED: u32 = 1;
    /// The holder is a tool (`writelock run`) whose command's connections
    /// may borrow its lock.
    pub const TOOL: u32 = 2;
    /// The holder is letting go (set just before its `LOCK_UN`, cleared with
    /// the record after): whoever finds the lock held now may be someone
    /// else, so the record proves nothing about who.
    pub const RELEASING: u32 = 4;
}

/// What the holder record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HolderRecord {
    /// The holding process.
    pub pid: u32,
    /// Which copy of the extension in that process (16 random bits).
    pub token: u32,
    /// Which acquisition (wraps at 256).
    pub seq: u32,
    /// [`flags`] bits.
    pub flags: u32,
    /// When it took the lock (milliseconds since the epoch; informative).
    pub since_ms: u64,
    /// Which `<db>.lock` it locked (device, inode): after the lock file was
    /// deleted or replaced, holders of the old and the new file see each
    /// other here.
    pub file: (u64, u64),
    /// The holder's process slot and its generation, if it had one.
    pub proc: Option<(usize, u32)>,
}

/// Whether the process a holder record names is alive (see [`Page::liveness`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// This process, through this copy of the extension.
    Mine,
    /// Another live process (or another copy of the extension here).
    Alive,
    /// Gone: its record is stale.
    Dead,
}

impl HolderRecord {
    fn word(pid: u32, token: u32, seq: u32, flags: u32) -> u64 {
        (pid as u64) << 32
            | ((token & 0xFFFF) as u64) << 16
            | ((seq & 0xFF) as u64) << 8
            | (flags & 0xFF) as u64
    }

    fn from_word(w: u64, since_ms: u64, file: (u64, u64), proc: u64) -> Option<HolderRecord> {
        (w != 0).then_some(HolderRecord {
            pid: (w >> 32) as u32,
            token: (w >> 16) as u32 & 0xFFFF,
            seq: (w >> 8) as u32 & 0xFF,
            flags: w as u32 & 0xFF,
            since_ms,
            file,
            proc: (proc >> 32 != 0).then(|| ((proc >> 32) as usize - 1, proc as u32)),
        })
    }

    /// The word this record was read from.
    pub fn as_word(&self) -> u64 {
        HolderRecord::word(self.pid, self.token, self.seq, self.flags)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process of the
/// machine, for arrival order and slot expiry.
pub fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64);
    t.unwrap_or(0)
}

/// One database's shared page, mapped once per process and shared by all of
/// the process's handles on that database.
pub struct Page {
    map: crate::sys::Mapping,
    file: File,
    key: (u64, u64),
    /// This process's slot and its generation (None: all were taken).
    me: Option<(usize, u32)>,
    /// When this process last logged who holds the lock (ms since the epoch):
    /// once a second per database and process, however many connections.
    last_busy_log: AtomicU64,
    /// Whether this process's application has a descriptor of the lock file
    /// (its own flock to borrow): 0 not looked yet, 1 no, 2 yes (for good).
    app_fds: std::sync::atomic::AtomicU8,
}

impl Page {
    /// Open (creating) and map `path`. Fails for anything that is not a
    /// regular file, a symlink (`O_NOFOLLOW`), or a page of another format.
    fn open(path: &Path, mode: u32) -> std::io::Result<Page> {
        let file = crate::lockfile::open_beside(path, mode)?;
        // Registered at once: a fork right after must not leave the child the
        // description whose slot locks this process takes next.
        crate::process::register_fd(file.as_raw_fd());
        let (map, key) = match Page::map_file(&file) {
            Ok(m) => m,
            Err(e) => {
                // Unregistered before it closes (holding no lock yet).
                crate::process::forget_fd(file.as_raw_fd());
                return Err(e);
            }
        };
        let mut page = Page {
            map,
            key,
            file,
            me: None,
            last_busy_log: AtomicU64::new(0),
            app_fds: std::sync::atomic::AtomicU8::new(0),
        };
        page.me = page.claim_proc();
        Ok(page)
    }

    /// Size, map and check the side file: the mapping and the file's key.
    fn map_file(file: &File) -> std::io::Result<(crate::sys::Mapping, (u64, u64))> {
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        if meta.len() < PAGE_LEN as u64 {
            // Only ever grow it (fallocate never shrinks, unlike a set_len
            // racing another opener): a mapping of a shrunk file faults.
            nix::fcntl::posix_fallocate(file, 0, PAGE_LEN as libc::off_t)
                .map_err(std::io::Error::from)?;
        }
        let map = crate::sys::Mapping::new(file, PAGE_LEN)?;
        let magic = map.u32_at(OFF_MAGIC);
        match magic.compare_exchange(0, MAGIC, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => map.u32_at(OFF_VERSION).store(VERSION, Ordering::Release),
            Err(MAGIC) => {}
            Err(other) => {
                return Err(std::io::Error::other(format!(
                    "unknown format (magic {other:#x})"
                )))
            }
        }
        let version = map.u32_at(OFF_VERSION).load(Ordering::Acquire);
        if version != VERSION && version != 0 {
            // Another layout: its fields may overlap ours in other sizes.
            return Err(std::io::Error::other(format!(
                "page format version {version}, not {VERSION}"
            )));
        }
        Ok((map, (meta.dev(), meta.ino())))
    }

    /// The page of the lock file `lock_path`, shared with the process's
    /// other handles on it. `None` when it cannot be used (read-only
    /// directory, something odd at the path): the lock works without it,
    /// with polling instead of wake-ups.
    pub fn for_lock_file(lock_path: &Path, mode: u32) -> Option<Arc<Page>> {
        let path = page_path_for(lock_path);
        let reg = REGISTRY.get(Default::default);
        let mut pages = reg.lock().unwrap_or_else(|e| e.into_inner());
        pages.retain(|(_, w)| w.strong_count() > 0);
        // A page deleted from the directory is another domain than newcomers'.
        let here = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if let Some(p) = pages
            .iter()
            .filter_map(|(_, w)| w.upgrade())
            .find(|p| Some(p.key) == here)
        {
            return Some(p);
        }
        let page = Arc::new(Page::open(&path, mode).ok()?);
        pages.push((path, Arc::downgrade(&page)));
        Some(page)
    }

    fn slot_u32(&self, i: usize, field: usize) -> &AtomicU32 {
        self.map.u32_at(SLOTS_AT + i * SLOT_LEN + field)
    }

    fn slot_u64(&self, i: usize, field: usize) -> &AtomicU64 {
        self.map.u64_at(SLOTS_AT + i * SLOT_LEN + field)
    }

    // ---- the holder record ----------------------------------------------

    /// What the record says now (None: nobody of the extension holds).
    pub fn holder(&self) -> Option<HolderRecord> {
        let word = self.map.u64_at(OFF_HOLDER);
        loop {
            let w = word.load(Ordering::Acquire);
            let since = self.map.u64_at(OFF_HOLDER_SINCE_MS).load(Ordering::Relaxed);
            let file = (
                self.map.u64_at(OFF_HOLDER_DEV).load(Ordering::Acquire),
                self.map.u64_at(OFF_HOLDER_INO).load(Ordering::Acquire),
            );
            let proc = self.map.u64_at(OFF_HOLDER_PROC).load(Ordering::Acquire);
            // The fields belong to the word if it did not change meanwhile.
            if word.load(Ordering::Acquire) == w {
                return HolderRecord::from_word(w, since, file, proc);
            }
        }
    }

    /// When the holder recorded now took the lock (ms since the epoch).
    pub fn holder_since_ms(&self) -> u64 {
        self.map.u64_at(OFF_HOLDER_SINCE_MS).load(Ordering::Relaxed)
    }

    fn next_seq(&self) -> u32 {
        self.map
            .u64_at(OFF_ACQUISITIONS)
            .fetch_add(1, Ordering::Relaxed) as u32
    }

    /// Take a process slot: the first whose lock byte nobody holds (the
    /// kernel arbitrates), with a new generation.
    fn claim_proc(&self) -> Option<(usize, u32)> {
        (0..PROCS).find_map(|i| {
            if !self.ofd(PROC_LOCKS + i as i64, libc::F_WRLCK) {
                return None;
            }
            let word = self.map.u64_at(PROCS_AT + i * PROC_LEN);
            let gen = ((word.load(Ordering::Acquire) >> 32) as u32)
                .wrapping_add(1)
                .max(1);
            word.store(
                (gen as u64) << 32 | crate::process::pid() as u64,
                Ordering::Release,
            );
            Some((i, gen))
        })
    }

    /// Set (or with `F_UNLCK` drop) this description's OFD lock on `byte`;
    /// whether it was set.
    fn ofd(&self, byte: i64, l_type: libc::c_int) -> bool {
        let fl = libc::flock {
            l_type: l_type as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: byte,
            l_len: 1,
            l_pid: 0,
        };
        nix::fcntl::fcntl(&self.file, nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)).is_ok()
    }

    /// Whether another open description holds an OFD lock on `byte` (an
    /// error counts as yes).
    fn ofd_held_elsewhere(&self, byte: i64) -> bool {
        let mut fl = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: byte,
            l_len: 1,
            l_pid: 0,
        };
        let r = nix::fcntl::fcntl(&self.file, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut fl));
        r.is_err() || fl.l_type != libc::F_UNLCK as libc::c_short
    }

    /// Whether the process the record names is alive, asked of the kernel
    /// through its process slot: right across pid namespaces (containers
    /// sharing the directory) and when pids are reused. A record without a
    /// slot (every slot was taken, or an older version wrote it) falls back
    /// to the pid, as seen from this process's namespace.
    pub fn liveness(&self, r: &HolderRecord) -> Liveness {
        match r.proc {
            Some(p) if Some(p) == self.me => Liveness::Mine,
            Some((i, gen)) if i < PROCS => {
                let word = self
                    .map
                    .u64_at(PROCS_AT + i * PROC_LEN)
                    .load(Ordering::Acquire);
                if (word >> 32) as u32 == gen && self.ofd_held_elsewhere(PROC_LOCKS + i as i64) {
                    Liveness::Alive
                } else {
                    Liveness::Dead
                }
            }
            _ if r.pid == crate::process::pid() => Liveness::Mine,
            _ if crate::process::alive(r.pid) => Liveness::Alive,
            _ => Liveness::Dead,
        }
    }

    fn describe(&self, file: (u64, u64)) {
        let proc = self
            .me
            .map_or(0, |(i, gen)| (i as u64 + 1) << 32 | gen as u64);
        self.map
            .u64_at(OFF_HOLDER_PROC)
            .store(proc, Ordering::Release);
        self.map
            .u64_at(OFF_HOLDER_DEV)
            .store(file.0, Ordering::Release);
        self.map
            .u64_at(OFF_HOLDER_INO)
            .store(file.1, Ordering::Release);
        self.map
            .u64_at(OFF_HOLDER_SINCE_MS)
            .store(now_ms(), Ordering::Relaxed);
    }

    /// Record `(pid, token, flags)` as the holder of the lock file `file`,
    /// replacing `seen` (what was read before); the word set, or `None` if
    /// it changed meanwhile. A borrower must win this race: two handles may
    /// find the application's lock at once.
    pub fn claim(
        &self,
        seen: Option<HolderRecord>,
        pid: u32,
        token: u32,
        flags: u32,
        file: (u64, u64),
    ) -> Option<u64> {
        let old = seen.map_or(0, |h| h.as_word());
        let new = HolderRecord::word(pid, token, self.next_seq(), flags);
        self.map
            .u64_at(OFF_HOLDER)
            .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        self.describe(file);
        Some(new)
    }

    /// Record `(pid, token, flags)` as the holder of the lock file `file`
    /// unconditionally (it holds the `flock`); the word set.
    pub fn set_holder(&self, pid: u32, token: u32, flags: u32, file: (u64, u64)) -> u64 {
        let new = HolderRecord::word(pid, token, self.next_seq(), flags);
        self.describe(file);
        self.map.u64_at(OFF_HOLDER).store(new, Ordering::Release);
        new
    }

    /// Mark the record `word` as letting go ([`flags::RELEASING`]), if it is
    /// still the record; the word to clear afterwards.
    pub fn releasing(&self, word: u64) -> u64 {
        let marked = word | flags::RELEASING as u64;
        match self.map.u64_at(OFF_HOLDER).compare_exchange(
            word,
            marked,
            Ordering::AcqRel,
            Ordering::Relaxed,
        ) {
            Ok(_) => marked,
            Err(_) => word,
        }
    }

    /// Clear the record if it is still `word` (what `set_holder`, `claim` or
    /// `releasing` returned).
    pub fn clear_holder(&self, word: u64) {
        let _ = self.map.u64_at(OFF_HOLDER).compare_exchange(
            word,
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// Whether this process may log who holds the lock now (at most once a
    /// second per database, whatever the number of connections): the look
    /// reads `/proc/locks`, which stalls every lock call in the system.
    pub fn may_log_busy(&self) -> bool {
        let now = now_ms();
        let last = self.last_busy_log.load(Ordering::Relaxed);
        now.saturating_sub(last) >= 1000
            && self
                .last_busy_log
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    // ---- waiter slots ---------------------------------------------------

    /// Whether any slot is occupied (cheap: a releaser asks on every release).
    pub fn has_waiters(&self) -> bool {
        self.map.u32_at(OFF_WAITING).load(Ordering::Acquire) != 0
    }

    fn lock_slot_byte(&self, i: usize, on: bool) -> bool {
        let l_type = if on { libc::F_WRLCK } else { libc::F_UNLCK };
        self.ofd(SLOT_LOCKS + i as i64, l_type)
    }

    /// Whether some live process holds slot `i`'s liveness byte. Our own
    /// process's bytes are not seen (one description per process), so the
    /// caller also compares the slot's pid with ours.
    fn slot_owner_alive(&self, i: usize) -> bool {
        self.ofd_held_elsewhere(SLOT_LOCKS + i as i64)
    }

    /// Take a free slot for a waiter of this process that waits until
    /// `expires_ns` (monotonic). Slots of dead processes are reclaimed.
    /// `None` when every slot is taken: the caller polls instead.
    pub fn claim_slot(&self, expires_ns: u64) -> Option<usize> {
        let me = crate::process::pid();
        for pass in 0..2 {
            for i in 0..SLOTS {
                let state = self.slot_u32(i, S_STATE);
                let cur = state.load(Ordering::Acquire);
                if cur != FREE {
                    // Second pass: take over a dead process's slot.
                    let stale = self.slot_u64(i, S_EXPIRES).load(Ordering::Acquire)
                        < mono_ns().saturating_sub(1_000_000_000);
                    let theirs = self.slot_u32(i, S_PID).load(Ordering::Relaxed) != me;
                    if pass == 0 || !stale || !theirs || self.slot_owner_alive(i) {
                        continue;
                    }
                    if state
                        .compare_exchange(cur, FREE, Ordering::AcqRel, Ordering::Relaxed)
                        .is_err()
                    {
                        continue;
                    }
                    self.map.u32_at(OFF_WAITING).fetch_sub(1, Ordering::AcqRel);
                }
                if state
                    .compare_exchange(FREE, WAITING, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
                {
                    continue;
                }
                if !self.lock_slot_byte(i, true) {
                    // A previous owner's lock lingers (its free is in flight).
                    state.store(FREE, Ordering::Release);
                    continue;
                }
                self.map.u32_at(OFF_WAITING).fetch_add(1, Ordering::AcqRel);
                self.map
                    .u32_at(OFF_SLOTS_HI)
                    .fetch_max(i as u32 + 1, Ordering::AcqRel);
                self.slot_u32(i, S_PID).store(me, Ordering::Relaxed);
                self.slot_u64(i, S_EXPIRES)
                    .store(expires_ns, Ordering::Relaxed);
                self.slot_u64(i, S_ARRIVAL)
                    .store(mono_ns(), Ordering::Release);
                return Some(i);
            }
        }
        None
    }

    /// The owner keeps its slot for another wait, until `expires_ns`, and
    /// sleeps in it again.
    pub fn refresh_slot(&self, i: usize, expires_ns: u64) {
        self.slot_u64(i, S_EXPIRES)
            .store(expires_ns, Ordering::Release);
        let _ = self.slot_u32(i, S_STATE).compare_exchange(
            AWAY,
            WAITING,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// The owner goes back to SQLite without the lock (its sleep ended): the
    /// slot keeps its place in the queue but is neither woken nor handed the
    /// lock until the owner sleeps in it again.
    pub fn away(&self, i: usize) {
        let state = self.slot_u32(i, S_STATE);
        let _ = state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
            (s == WAITING || s == WOKEN).then_some(AWAY)
        });
    }

    /// How many slots a scan must look at.
    fn slots_hi(&self) -> usize {
        (self.map.u32_at(OFF_SLOTS_HI).load(Ordering::Acquire) as usize).min(SLOTS)
    }

    /// The owner gives its slot up.
    pub fn free_slot(&self, i: usize) {
        self.slot_u64(i, S_ARRIVAL).store(0, Ordering::Relaxed);
        self.slot_u32(i, S_PID).store(0, Ordering::Relaxed);
        self.lock_slot_byte(i, false);
        if self.slot_u32(i, S_STATE).swap(FREE, Ordering::AcqRel) != FREE {
            self.map.u32_at(OFF_WAITING).fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether slot `i` was woken since the owner last looked (consuming it).
    pub fn take_wake(&self, i: usize) -> bool {
        self.slot_u32(i, S_STATE)
            .compare_exchange(WOKEN, WAITING, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// The owner sleeps until woken or `timeout` passes.
    pub fn sleep_in_slot(&self, i: usize, timeout: Duration) {
        crate::sys::futex_wait(self.slot_u32(i, S_STATE), WAITING, timeout);
    }

    /// The live waiting slots, oldest first: `(slot, pid, arrival_ns)`.
    pub fn waiters(&self) -> Vec<(usize, u32, u64)> {
        let now = mono_ns();
        let mut v: Vec<(usize, u32, u64)> = (0..self.slots_hi())
            .filter_map(|i| {
                let st = self.slot_u32(i, S_STATE).load(Ordering::Acquire);
                let arrival = self.slot_u64(i, S_ARRIVAL).load(Ordering::Acquire);
                let live = self.slot_u64(i, S_EXPIRES).load(Ordering::Relaxed) > now;
                (st != FREE && arrival != 0 && arrival <= now && live)
                    .then(|| (i, self.slot_u32(i, S_PID).load(Ordering::Relaxed), arrival))
            })
            .collect();
        v.sort_by_key(|w| w.2);
        v
    }

    /// Whether slot `i` is the oldest live waiter.
    pub fn is_oldest(&self, i: usize) -> bool {
        let mine = self.slot_u64(i, S_ARRIVAL).load(Ordering::Acquire);
        let now = mono_ns();
        !(0..self.slots_hi()).any(|j| {
            j != i
                && self.slot_u32(j, S_STATE).load(Ordering::Acquire) != FREE
                && self.slot_u64(j, S_EXPIRES).load(Ordering::Relaxed) > now
                && {
                    let a = self.slot_u64(j, S_ARRIVAL).load(Ordering::Acquire);
                    a != 0 && a < mine
                }
        })
    }

    /// After a release: wake the oldest waiter asleep in its slot, if any —
    /// one wake-up per release — and reserve the lock for it if it has
    /// waited `handoff_after_ns` or longer (see [`crate::wait::policy`]).
    pub fn wake_next(&self, handoff_after_ns: u64) {
        if !self.has_waiters() {
            return;
        }
        let now = mono_ns();
        let live: Vec<policy::Waiter> = (0..self.slots_hi())
            .filter_map(|i| {
                let st = self.slot_u32(i, S_STATE).load(Ordering::Acquire);
                let arrival = self.slot_u64(i, S_ARRIVAL).load(Ordering::Acquire);
                // An arrival after now was not written by a waiter (a
                // damaged page): such a slot is nobody, and never the oldest.
                let live = st != FREE
                    && arrival != 0
                    && arrival <= now
                    && self.slot_u64(i, S_EXPIRES).load(Ordering::Relaxed) > now;
                live.then_some(policy::Waiter {
                    slot: i,
                    arrival_ns: arrival,
                    asleep: st == WAITING || st == WOKEN,
                })
            })
            .collect();
        let r = policy::on_release(now, &live, handoff_after_ns);
        if let Some(h) = r.handoff {
            self.map
                .u64_at(OFF_HANDOFF)
                .store(h.to_word(), Ordering::Release);
        }
        if let Some(i) = r.wake {
            let state = self.slot_u32(i, S_STATE);
            // WOKEN already (someone barged in before it woke): wake again.
            let _ = state.compare_exchange(WAITING, WOKEN, Ordering::AcqRel, Ordering::Relaxed);
            crate::sys::futex_wake(state, 1);
        }
    }

    /// What the last look through this process's descriptors found: whether
    /// its application has the lock file open (None: never looked). Once
    /// seen, always assumed.
    pub fn application_fds(&self) -> Option<bool> {
        match self.app_fds.load(Ordering::Relaxed) {
            0 => None,
            1 => Some(false),
            _ => Some(true),
        }
    }

    /// Note what a look through this process's descriptors found.
    pub fn note_application_fds(&self, open: bool) {
        if open {
            self.app_fds.store(2, Ordering::Relaxed);
        } else {
            let _ = self
                .app_fds
                .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Whether a handle owning slot `mine` (None: not queued) may take the
    /// free lock now: not while it is reserved for another waiter.
    pub fn may_take(&self, mine: Option<usize>) -> bool {
        let w = self.map.u64_at(OFF_HANDOFF).load(Ordering::Acquire);
        w == 0 || policy::may_take(mono_ns(), policy::Handoff::from_word(w), mine)
    }

    /// A handle owning slot `mine` took the lock: a reservation for it is
    /// used up.
    pub fn took(&self, mine: Option<usize>) {
        let word = self.map.u64_at(OFF_HANDOFF);
        let w = word.load(Ordering::Acquire);
        if w != 0 && policy::Handoff::from_word(w).map(|h| h.slot) == mine {
            let _ = word.compare_exchange(w, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    // ---- the gates ----------------------------------------------------------

    fn gate_words(&self, g: Gate) -> (&AtomicU32, &AtomicU32) {
        let at = match g {
            Gate::Readers => OFF_GATE,
            Gate::Writer => OFF_WGATE,
        };
        (self.map.u32_at(at), self.map.u32_at(at + 4))
    }

    /// Start waiting at gate `g`: counted until [`Page::gate_leave`].
    pub fn gate_enter(&self, g: Gate) {
        self.gate_words(g).1.fetch_add(1, Ordering::SeqCst);
    }

    /// The gate's generation: read before looking at the locks, slept on
    /// after, so a release in between is not missed.
    pub fn gate_generation(&self, g: Gate) -> u32 {
        self.gate_words(g).0.load(Ordering::SeqCst)
    }

    /// Sleep until gate `g` opens after generation `gen`, or `timeout`.
    pub fn gate_sleep(&self, g: Gate, gen: u32, timeout: Duration) {
        crate::sys::futex_wait(self.gate_words(g).0, gen, timeout);
    }

    pub fn gate_leave(&self, g: Gate) {
        self.gate_words(g).1.fetch_sub(1, Ordering::SeqCst);
    }

    /// A lock that gate `g`'s waiters wait for was just let go: open it
    /// (one load when nobody waits). The readers' gate lets *one* reader
    /// through at once, the others at their next look: readers let in all
    /// together after a commit would begin their transactions at the same
    /// moment, and every one of them but the first that then wants to write
    /// gets `SQLITE_BUSY` without a busy handler (a deferred transaction's
    /// upgrade), where stock SQLite's backoff spreads them out.
    pub fn gate_open(&self, g: Gate) {
        std::sync::atomic::fence(Ordering::SeqCst);
        let (gen, sleepers) = self.gate_words(g);
        if sleepers.load(Ordering::SeqCst) != 0 {
            gen.fetch_add(1, Ordering::SeqCst);
            let n = match g {
                Gate::Readers => 1,
                Gate::Writer => i32::MAX,
            };
            crate::sys::futex_wake(gen, n);
        }
    }

    // ---- the ring of recent holds ---------------------------------------

    /// Add a hold (by the current holder, before it lets go: holders write
    /// one at a time).
    pub fn ring_push(&self, pid: u32, flags: u32, start_ms: u64, held: Duration) {
        let n = self.map.u64_at(OFF_RING_HEAD).load(Ordering::Acquire);
        let at = RING_AT + (n as usize % RING) * RING_ENTRY;
        let (seq, seq2) = (self.map.u64_at(at + R_SEQ), self.map.u64_at(at + R_SEQ2));
        seq.store(0, Ordering::Release);
        seq2.store(0, Ordering::Release);
        self.map.u32_at(at + R_PID).store(pid, Ordering::Relaxed);
        self.map
            .u32_at(at + R_FLAGS)
            .store(flags, Ordering::Relaxed);
        self.map
            .u64_at(at + R_START_MS)
            .store(start_ms, Ordering::Relaxed);
        self.map
            .u64_at(at + R_HELD_US)
            .store(held.as_micros() as u64, Ordering::Relaxed);
        seq2.store(n + 1, Ordering::Release);
        seq.store(n + 1, Ordering::Release);
        self.map
            .u64_at(OFF_RING_HEAD)
            .store(n + 1, Ordering::Release);
    }

    /// Descriptor of the side file (registered as the extension's).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // As for the lock file: let go of the slot bytes first (a page built
        // in another process is never dropped here: ancestors' values leak).
        let all = libc::flock {
            l_type: libc::F_UNLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        let _ = nix::fcntl::fcntl(&self.file, nix::fcntl::FcntlArg::F_OFD_SETLK(&all));
        crate::process::forget_fd(self.file.as_raw_fd());
    }
}

type Registry = Mutex<Vec<(PathBuf, Weak<Page>)>>;

/// This process's pages, one per side file (rebuilt in a forked child).
static REGISTRY: crate::process::PerProcess<Registry> = crate::process::PerProcess::new();

/// Who waits at a gate of the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Readers held off by a writer's pending marker or shadow write lock.
    Readers,
    /// The writer waiting for readers' shadow read locks to go.
    Writer,
}

/// What a tool reads from a page (see [`peek`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The holder record, if set.
    pub holder: Option<HolderRecord>,
    /// Live waiters, oldest first: `(pid, arrival in monotonic ns)`.
    pub waiters: Vec<(u32, u64)>,
    /// Holds written to the ring, ever.
    pub holds: u64,
    /// The ring's holds, oldest first (at most [`RING`]).
    pub recent: Vec<Hold>,
}

/// A finished hold from the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    /// Its number (1 for the first hold ever written to this page).
    pub n: u64,
    /// The process that held the lock.
    pub pid: u32,
    /// [`flags`] bits (borrowed, tool).
    pub flags: u32,
    /// When it took the lock, ms since the epoch.
    pub start_ms: u64,
    /// How long it held it.
    pub held: Duration,
}

/// Read the holder record and the waiters of `lock_path`'s page without
/// creating or mapping anything (for tools). `None` if there is no page.
pub fn peek(lock_path: &Path) -> Option<Snapshot> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(page_path_for(lock_path))
        .ok()?;
    if !f.metadata().ok()?.file_type().is_file() {
        return None;
    }
    let mut buf = vec![0u8; PAGE_LEN];
    let n = f.read_at(&mut buf, 0).ok()?;
    if n < PAGE_LEN {
        return None;
    }
    let u32_at = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_ne_bytes(buf[o..o + 8].try_into().unwrap());
    if u32_at(OFF_MAGIC) != MAGIC {
        return None;
    }
    let holder = HolderRecord::from_word(
        u64_at(OFF_HOLDER),
        u64_at(OFF_HOLDER_SINCE_MS),
        (u64_at(OFF_HOLDER_DEV), u64_at(OFF_HOLDER_INO)),
        u64_at(OFF_HOLDER_PROC),
    );
    let now = mono_ns();
    let mut waiters: Vec<(u32, u64)> = (0..SLOTS)
        .filter_map(|i| {
            let at = SLOTS_AT + i * SLOT_LEN;
            let live = u32_at(at + S_STATE) != FREE
                && u64_at(at + S_ARRIVAL) != 0
                && u64_at(at + S_EXPIRES) > now;
            live.then(|| (u32_at(at + S_PID), u64_at(at + S_ARRIVAL)))
        })
        .collect();
    waiters.sort_by_key(|w| w.1);
    let holds = u64_at(OFF_RING_HEAD);
    let mut recent: Vec<Hold> = (0..RING)
        .filter_map(|i| {
            let at = RING_AT + i * RING_ENTRY;
            let n = u64_at(at + R_SEQ);
            // 0 or two numbers: never written, or being written (missing).
            let whole = n != 0 && u64_at(at + R_SEQ2) == n;
            (whole && n + RING as u64 > holds).then(|| Hold {
                n,
                pid: u32_at(at + R_PID),
                flags: u32_at(at + R_FLAGS),
                start_ms: u64_at(at + R_START_MS),
                held: Duration::from_micros(u64_at(at + R_HELD_US)),
            })
        })
        .collect();
    recent.sort_by_key(|h| h.n);
    Some(Snapshot {
        holder,
        waiters,
        holds,
        recent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wl-page-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("a.db.lock")
    }

    #[test]
    fn one_page_per_file_per_process_and_the_holder_record() {
        let lp = tmp("holder");
        let a = Page::for_lock_file(&lp, 0o644).unwrap();
        let b = Page::for_lock_file(&lp, 0o644).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.holder(), None);
        let w42 = a.set_holder(42, 7, 0, (1, 2));
        assert!(a.holder().unwrap().since_ms > 0);
        let h = b.holder().unwrap();
        assert_eq!((h.pid, h.token, h.flags, h.file), (42, 7, 0, (1, 2)));
        assert_eq!(
            b.claim(None, 43, 1, flags::BORROWED, (1, 2)),
            None,
            "it changed"
        );
        let w43 = b.claim(Some(h), 43, 1, flags::BORROWED, (1, 3)).unwrap();
        assert_eq!(a.holder().unwrap().file, (1, 3));
        b.clear_holder(w42); // not the holder any more: no effect
        assert_eq!(a.holder().unwrap().pid, 43);
        a.clear_holder(w43);
        assert_eq!(a.holder(), None);
        // The same process and copy again: the old word does not clear it.
        let first = a.set_holder(42, 7, 0, (1, 2));
        a.clear_holder(first);
        let second = a.set_holder(42, 7, 0, (1, 2));
        a.clear_holder(first);
        assert!(a.holder().is_some(), "{first:x} {second:x}");
        // Letting go: marked, then cleared.
        let marked = a.releasing(second);
        assert_ne!(a.holder().unwrap().flags & flags::RELEASING, 0);
        a.clear_holder(marked);
        assert_eq!(peek(&lp).unwrap(), Snapshot::default());
    }

    #[test]
    fn the_oldest_waiter_is_woken_first_and_slots_are_freed() {
        let lp = tmp("slots");
        let p = Page::for_lock_file(&lp, 0o644).unwrap();
        let far = mono_ns() + 60_000_000_000;
        let first = p.claim_slot(far).unwrap();
        let second = p.claim_slot(far).unwrap();
        assert_ne!(first, second);
        assert!(p.is_oldest(first) && !p.is_oldest(second));
        assert_eq!(peek(&lp).unwrap().waiters.len(), 2);
        p.wake_next(u64::MAX);
        assert!(p.take_wake(first) && !p.take_wake(second));
        p.free_slot(first);
        assert!(p.is_oldest(second));
        p.wake_next(u64::MAX);
        assert!(p.take_wake(second));
        p.free_slot(second);
        assert!(!p.has_waiters());
        // Woken but not served yet: woken again, the younger one waits.
        let (o, y) = (p.claim_slot(far).unwrap(), p.claim_slot(far).unwrap());
        p.wake_next(u64::MAX);
        p.wake_next(u64::MAX);
        assert!(p.take_wake(o) && !p.take_wake(y));
        p.free_slot(o);
        p.free_slot(y);
        // An expired slot is not woken.
        let s = p.claim_slot(mono_ns()).unwrap();
        p.wake_next(u64::MAX);
        assert!(!p.take_wake(s));
        p.free_slot(s);
    }

    #[test]
    fn a_sleeping_waiter_is_woken_by_another_thread() {
        let lp = tmp("futex");
        let p = Page::for_lock_file(&lp, 0o644).unwrap();
        let s = p.claim_slot(mono_ns() + 60_000_000_000).unwrap();
        let p2 = Arc::clone(&p);
        let t0 = std::time::Instant::now();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            p2.wake_next(u64::MAX);
        });
        while !p.take_wake(s) {
            p.sleep_in_slot(s, Duration::from_secs(5));
        }
        assert!(t0.elapsed() < Duration::from_secs(4));
        waker.join().unwrap();
        p.free_slot(s);
    }
}
