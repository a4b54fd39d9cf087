//! The writer-lock protocol for one main-database handle, in pure Rust.
//!
//! A handle is a *writer* while its `xLock` level is at least RESERVED, or
//! while it holds the WAL write lock (shared-memory slot 0) or the checkpoint
//! lock (slot 1) exclusively. While it is a writer it holds `LOCK_EX` on
//! `<db>.lock`; the lock is taken *before* the inner SQLite lock, released
//! *after* the inner unlock, and undone when the inner call fails.
//!
//! Beside the flock, SQLite's SHARED and EXCLUSIVE levels are *shadowed* by an
//! OFD lock on `<db>.lock` (read at SHARED, write at EXCLUSIVE), which no
//! `close()` elsewhere in the process can cancel. In rollback modes that keeps
//! readers and a writer of the database file apart even when SQLite's POSIX
//! locks were lost; in WAL mode every connection holds SHARED for its whole
//! life, so the shadow marks it *attached*, and the close-time EXCLUSIVE (the
//! "am I the last connection?" test that checkpoints and deletes `-wal` and
//! `-shm`) is refused while anyone else is attached. See `docs/protocol.md`.
//!
//! Two exceptions, both from SQLite's internals (see DESIGN.md):
//! * WAL recovery / header check: slot 0 requested while the handle holds no
//!   shared-memory lock at all. It rebuilds the `-shm` index and never writes
//!   the database; demanding the flock there turns a plain read into a
//!   multi-second wait or `SQLITE_PROTOCOL`. It passes through.
//! * Every escalation is non-blocking: contended means `SQLITE_BUSY`, and the
//!   connection's busy handler (which first drops its read lock) decides.
//!
//! The inner SQLite call is passed in as a closure returning its result code,
//! so this module is driven by unit tests without SQLite.

use std::time::{Duration, Instant};

use crate::lockfile::{LockError, Shadow};
use crate::options::Options;
use libsqlite3_sys as ffi;

/// The lock on `<db>.lock`, as the protocol needs it (a trait so tests can fake it).
pub trait WriterFlock {
    /// Take the exclusive lock without blocking: `Ok(false)` when contended.
    fn try_acquire(&mut self) -> Result<bool, LockError>;
    /// Release it (no-op if not held).
    fn release(&mut self);
    /// Whether some *other* holder has it right now.
    fn held_elsewhere(&mut self) -> Result<bool, LockError>;
    /// Set the shadow lock without blocking: `Ok(false)` when it conflicts.
    fn shadow(&mut self, to: Shadow) -> Result<bool, LockError>;
    /// Take or drop the pending marker (a writer waiting for EXCLUSIVE).
    fn pending(&mut self, on: bool) -> Result<bool, LockError>;
    /// Whether another handle holds the pending marker.
    fn pending_elsewhere(&mut self) -> Result<bool, LockError>;
    /// Whether a shadow read lock would be refused now (pending marker or
    /// shadow write elsewhere), without taking anything.
    fn read_blocked(&mut self) -> Result<bool, LockError>;
    /// Before a reader takes its shadow read lock: make sure the lock file
    /// is still the one at the path (moving to a fresh one if not).
    fn refresh(&mut self) -> Result<(), LockError> {
        Ok(())
    }
}

impl WriterFlock for crate::lockfile::LockFile {
    fn try_acquire(&mut self) -> Result<bool, LockError> {
        self.try_lock()
    }
    fn release(&mut self) {
        self.unlock()
    }
    fn held_elsewhere(&mut self) -> Result<bool, LockError> {
        crate::lockfile::LockFile::held_elsewhere(self)
    }
    fn shadow(&mut self, to: Shadow) -> Result<bool, LockError> {
        crate::lockfile::LockFile::shadow(self, to)
    }
    fn pending(&mut self, on: bool) -> Result<bool, LockError> {
        crate::lockfile::LockFile::pending(self, on)
    }
    fn pending_elsewhere(&mut self) -> Result<bool, LockError> {
        crate::lockfile::LockFile::pending_elsewhere(self)
    }
    fn read_blocked(&mut self) -> Result<bool, LockError> {
        crate::lockfile::LockFile::read_blocked(self)
    }
    fn refresh(&mut self) -> Result<(), LockError> {
        crate::lockfile::LockFile::refresh(self)
    }
}

/// Counters for one handle. `contended` counts non-blocking flock attempts
/// that found the lock held elsewhere; `busy` counts every `SQLITE_BUSY` this
/// protocol returned — contended flock, a writer's EXCLUSIVE waiting for
/// readers, a reader held off by a waiting writer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub acquisitions: u64,
    pub contended: u64,
    pub busy: u64,
    /// Time from a first contended attempt to the acquisition that ended it
    /// (attempts more than [`EPISODE_GAP`] apart start a new wait).
    pub wait_total: Duration,
    pub wait_max: Duration,
    /// Time from acquisition to release.
    pub hold_total: Duration,
    /// Waits for the flock in the queue (busy-handler sleeps and checkpoints)…
    pub queued: u64,
    /// …and how many of them got it before their deadline.
    pub queue_granted: u64,
    pub hold_max: Duration,
}

/// Attempts further apart than this belong to different waits.
pub const EPISODE_GAP: Duration = Duration::from_secs(1);

/// `SQLITE_BUSY` log lines per handle are at most this frequent.
const BUSY_LOG_EVERY: Duration = Duration::from_secs(1);

/// Why the handle is a writer; the flock is held while any bit is set.
mod why {
    pub const XLOCK: u8 = 1; // xLock level >= RESERVED
    pub const WAL_WRITE: u8 = 2; // shm slot 0 (WAL write lock)
    pub const WAL_CKPT: u8 = 4; // shm slot 1 (checkpoint lock)
    pub const INTENT: u8 = 8; // taken in xSleep for the retry that follows
}

/// A write intent not turned into a write within this long is released.
pub const INTENT_TTL: Duration = Duration::from_millis(100);

/// A checkpoint this soon after the handle's commit is that commit's
/// automatic checkpoint (SQLite runs it right after, on the same thread).
const AUTO_CHECKPOINT_WINDOW: Duration = Duration::from_millis(5);

const SLOT_WRITE: u32 = 1 << 0;
const SLOT_CKPT: u32 = 1 << 1;
/// WAL read-mark slots (3..8): holding one means a read transaction is open.
const READ_SLOTS: u32 = !0b111;

// A checkpoint (auto or `PRAGMA wal_checkpoint`) queues for the flock up to
// `Options::checkpoint_wait` (the shim does the wait). Without it the
// committer's auto-checkpoint loses to the next writer every time and the WAL
// only grows. Still refused, it gets the checkpoint lock *without* the flock
// (see `checkpoint_without_flock`): a blocking checkpoint then waits for the
// flock at the WAL write lock, through its busy handler as in stock SQLite,
// and a passive one may not write the database file until it has the flock.

/// Something the shim should act on after a step (bits of [`Protocol::events`]).
pub mod event {
    /// An attempt was refused because another holder has the lock: the shim
    /// may log who (off this path: the look is slow).
    pub const REFUSED: u8 = 1;
    /// A write intent was taken: the shim arms its expiry.
    pub const INTENT: u8 = 2;
    /// The lock was taken: the shim arms the long-hold warning if needed.
    pub const ACQUIRED: u8 = 4;
}

/// Per-handle lock state. Generic over the flock so tests can inject failures.
pub struct Protocol<F> {
    flock: F,
    level: i32,
    shm_excl: u32,
    shm_shared: u32,
    shadow: Shadow,
    /// Holding the pending marker (waiting for, or holding, EXCLUSIVE).
    pending: bool,
    /// EXCLUSIVE was refused for readers while RESERVED (see `try_shadow_write`).
    exclusive_wanted: bool,
    /// SHARED was refused for a writer's pending marker or EXCLUSIVE (see
    /// [`Self::read_blocked`]).
    shared_wanted: bool,
    why: u8,
    held: bool,
    /// Last error from the lock file, kept for messages and status.
    pub last_error: Option<String>,
    /// An error or warning not yet written to SQLite's log (the shim drains it).
    pub unlogged: Option<(i32, String)>,
    /// Options in force (URI parameters, PRAGMAs).
    pub options: Options,
    /// The database path, for log messages.
    pub label: String,
    wait_since: Option<Instant>,
    /// Set when an escalation was refused for the flock: the busy handler
    /// that follows may wait for it in xSleep (see [`Self::try_intent`]).
    intent_wanted: bool,
    intent_since: Option<Instant>,
    /// The handle has a WAL-index mapping (WAL mode).
    wal: bool,
    /// A refused checkpoint lock asks the shim to queue this long, then retry.
    checkpoint_wait: Option<Duration>,
    /// The checkpoint lock is held without the flock (see
    /// [`Self::checkpoint_without_flock`]).
    ckpt_unlocked: bool,
    /// When the handle last let go of the WAL write lock (a commit ended).
    write_ended: Option<Instant>,
    last_attempt: Option<Instant>,
    held_since: Option<Instant>,
    /// The hold that was warned about already (its start).
    warned_hold: Option<Instant>,
    last_busy_log: Option<Instant>,
    /// [`event`] bits for the shim, drained by [`Self::take_events`].
    events: u8,
    pub counters: Counters,
}

fn range_mask(ofst: i32, n: i32) -> u32 {
    if !(0..32).contains(&ofst) || n <= 0 {
        return 0;
    }
    let end = (ofst + n).min(32);
    (ofst..end).fold(0, |m, i| m | (1u32 << i))
}

impl<F: WriterFlock> Protocol<F> {
    /// A handle with no SQLite lock and no flock.
    pub fn new(flock: F) -> Self {
        Protocol {
            flock,
            level: ffi::SQLITE_LOCK_NONE,
            shm_excl: 0,
            shm_shared: 0,
            shadow: Shadow::Unlocked,
            pending: false,
            exclusive_wanted: false,
            shared_wanted: false,
            why: 0,
            held: false,
            last_error: None,
            unlogged: None,
            options: Options::default(),
            label: String::new(),
            wait_since: None,
            intent_wanted: false,
            intent_since: None,
            wal: false,
            checkpoint_wait: None,
            ckpt_unlocked: false,
            write_ended: None,
            last_attempt: None,
            held_since: None,
            warned_hold: None,
            last_busy_log: None,
            events: 0,
            counters: Counters::default(),
        }
    }

    /// The shadow lock this handle holds now.
    pub fn shadow_held(&self) -> Shadow {
        self.shadow
    }

    /// Whether this handle holds the flock now.
    pub fn holds(&self) -> bool {
        self.held
    }

    /// The flock, for status reporting.
    pub fn flock(&self) -> &F {
        &self.flock
    }

    /// The [`event`] bits since the last call, clearing them.
    pub fn take_events(&mut self) -> u8 {
        std::mem::take(&mut self.events)
    }

    /// When the current hold began (None when not holding).
    pub fn held_since(&self) -> Option<Instant> {
        self.held_since
    }

    /// A warning for the current hold if it has lasted at least
    /// `writelock_hold_warn_ms` and was not warned about yet (the shim's
    /// timer asks while the hold lasts).
    pub fn long_hold_warning(&mut self, pid: u32) -> Option<String> {
        let since = self.held_since?;
        let warn = self.options.hold_warn;
        let h = since.elapsed();
        if warn.is_zero() || h < warn || self.warned_hold == Some(since) {
            return None;
        }
        self.warned_hold = Some(since);
        Some(format!(
            "writelock: process {pid} has held the write lock on {} for {} ms, and still holds it (warning threshold {} ms)",
            self.label,
            h.as_millis(),
            warn.as_millis()
        ))
    }

    fn note_error(&mut self, rc: i32, e: LockError) {
        let msg = e.to_string();
        self.last_error = Some(msg.clone());
        self.unlogged = Some((rc, msg));
    }

    /// Add a reason to be a writer; takes the flock on the first one.
    /// `Err(rc)` leaves the state unchanged.
    fn enter(&mut self, reason: u8) -> Result<(), i32> {
        if self.why & why::INTENT != 0 {
            // The lock taken while the busy handler slept: now a real write.
            self.why = (self.why & !why::INTENT) | reason;
            self.intent_since = None;
            return Ok(());
        }
        if self.why == 0 && !self.held {
            let got = self.flock.try_acquire();
            match got {
                Ok(true) => self.acquired(),
                Ok(false) => {
                    self.counters.contended += 1;
                    self.contended();
                    self.intent_wanted = true;
                    return Err(self.busy());
                }
                Err(e) => {
                    let rc = match e {
                        LockError::Open { .. } | LockError::NotRegular { .. } => {
                            ffi::SQLITE_CANTOPEN
                        }
                        _ => ffi::SQLITE_IOERR_LOCK,
                    };
                    self.note_error(rc, e);
                    return Err(rc);
                }
            }
        }
        self.why |= reason;
        Ok(())
    }

    fn acquired(&mut self) {
        let now = Instant::now();
        self.held = true;
        self.held_since = Some(now);
        self.events |= event::ACQUIRED;
        self.counters.acquisitions += 1;
        crate::stats::GLOBAL.acquired();
        if let Some(t0) = self.wait_since.take() {
            let w = now - t0;
            self.counters.wait_total += w;
            self.counters.wait_max = self.counters.wait_max.max(w);
        }
    }

    /// A refused attempt: start or continue a wait, and ask the shim to say
    /// who holds the lock (at most once a second per handle; the look itself
    /// happens off the connection's path).
    fn contended(&mut self) {
        let now = Instant::now();
        if self.last_attempt.is_none_or(|t| now - t > EPISODE_GAP) {
            self.wait_since = Some(now);
        }
        self.last_attempt = Some(now);
        if self.last_busy_log.is_none_or(|t| now - t >= BUSY_LOG_EVERY) {
            self.last_busy_log = Some(now);
            self.events |= event::REFUSED;
        }
    }

    fn release(&mut self) {
        self.flock.release();
        self.held = false;
        if let Some(t0) = self.held_since.take() {
            let h = t0.elapsed();
            self.counters.hold_total += h;
            self.counters.hold_max = self.counters.hold_max.max(h);
            let warn = self.options.hold_warn;
            // Warned while held already (the shim's timer): not again.
            if !warn.is_zero() && h >= warn && self.warned_hold != Some(t0) {
                let msg = format!(
                    "writelock: process {} held the write lock on {} for {} ms (warning threshold {} ms)",
                    std::process::id(),
                    self.label,
                    h.as_millis(),
                    warn.as_millis()
                );
                self.unlogged.get_or_insert((ffi::SQLITE_WARNING, msg));
            }
        }
    }

    /// Drop a reason; releases the flock when none is left.
    fn leave(&mut self, reason: u8) {
        self.why &= !reason;
        if self.why == 0 && self.held {
            self.release();
        }
    }

    /// Move the shadow lock; `Err(rc)` on a system error (logged).
    fn set_shadow(&mut self, to: Shadow) -> Result<bool, i32> {
        match self.flock.shadow(to) {
            Ok(true) => {
                self.shadow = to;
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => {
                self.note_error(ffi::SQLITE_IOERR_LOCK, e);
                Err(ffi::SQLITE_IOERR_LOCK)
            }
        }
    }

    /// Best effort on paths that cannot fail (unlock, undo): an error is
    /// noted and the handle keeps believing it holds the stronger lock.
    fn lower_shadow(&mut self, to: Shadow) {
        let _ = self.set_shadow(to);
    }

    fn busy(&mut self) -> i32 {
        self.counters.busy += 1;
        crate::stats::GLOBAL.busy();
        ffi::SQLITE_BUSY
    }

    /// `xLock(level)`: shadow read before SHARED; the flock before RESERVED
    /// or above; shadow write before EXCLUSIVE. Any step that fails undoes
    /// the steps before it, and a failed inner lock undoes them all.
    pub fn lock(&mut self, level: i32, inner: impl FnOnce() -> i32) -> i32 {
        self.expire_intent();
        let took_read = self.shadow == Shadow::Unlocked;
        if took_read {
            if let Err(e) = self.flock.refresh() {
                self.note_error(ffi::SQLITE_IOERR_LOCK, e);
                return ffi::SQLITE_IOERR_LOCK;
            }
            // Like SQLite's PENDING: a writer waiting for EXCLUSIVE stops new readers.
            match self.flock.pending_elsewhere() {
                Ok(false) => {}
                Ok(true) => {
                    self.shared_wanted = true;
                    return self.busy();
                }
                Err(e) => {
                    self.note_error(ffi::SQLITE_IOERR_LOCK, e);
                    return ffi::SQLITE_IOERR_LOCK;
                }
            }
            match self.set_shadow(Shadow::Read) {
                Ok(true) => {}
                Ok(false) => {
                    // A writer holds EXCLUSIVE.
                    self.shared_wanted = true;
                    return self.busy();
                }
                Err(rc) => return rc,
            }
        }
        let newly = level >= ffi::SQLITE_LOCK_RESERVED && self.why & why::XLOCK == 0;
        if newly {
            if let Err(rc) = self.enter(why::XLOCK) {
                if took_read {
                    self.lower_shadow(Shadow::Unlocked);
                }
                return rc;
            }
        }
        let took_write = level >= ffi::SQLITE_LOCK_EXCLUSIVE && self.shadow != Shadow::Write;
        let took_pending = took_write && !self.pending;
        if took_pending {
            // Only flock holders get here, so nobody else holds it.
            if self.flock.pending(true).unwrap_or(false) {
                self.pending = true;
            }
        }
        if took_write {
            let r = self.set_shadow(Shadow::Write);
            if r != Ok(true) {
                // Other handles are reading (or, in WAL mode, attached).
                // Still RESERVED, a writer keeps its pending marker, as SQLite
                // keeps PENDING, so the readers drain; its busy handler's
                // sleep then watches for them to finish.
                if newly {
                    self.drop_pending();
                    self.leave(why::XLOCK);
                } else {
                    self.exclusive_wanted = true;
                }
                if took_read {
                    self.lower_shadow(Shadow::Unlocked);
                }
                return match r {
                    Err(rc) => rc,
                    _ => self.busy(),
                };
            }
        }
        let rc = inner();
        if rc == ffi::SQLITE_OK {
            self.level = self.level.max(level);
        } else {
            if took_write {
                self.lower_shadow(Shadow::Read);
            }
            if newly {
                self.drop_pending();
                self.leave(why::XLOCK);
            }
            if took_read {
                self.lower_shadow(Shadow::Unlocked);
            }
        }
        rc
    }

    /// `xUnlock(level)`: the flock and the shadow go after the inner unlock
    /// succeeded. If the inner unlock fails the inner lock may still be held,
    /// so ours stay (fail closed; close releases them).
    pub fn unlock(&mut self, level: i32, inner: impl FnOnce() -> i32) -> i32 {
        let rc = inner();
        if rc == ffi::SQLITE_OK {
            self.level = level;
            let want = match level {
                l if l >= ffi::SQLITE_LOCK_EXCLUSIVE => self.shadow,
                l if l >= ffi::SQLITE_LOCK_SHARED => Shadow::Read,
                _ => Shadow::Unlocked,
            };
            if want != self.shadow && !(want == Shadow::Read && self.shadow == Shadow::Unlocked) {
                self.lower_shadow(want);
            }
            if level < ffi::SQLITE_LOCK_EXCLUSIVE {
                self.drop_pending();
            }
            if level < ffi::SQLITE_LOCK_RESERVED {
                self.leave(why::XLOCK);
            }
            if level == ffi::SQLITE_LOCK_NONE {
                self.leave(why::INTENT); // the transaction ended without writing
            }
        }
        rc
    }

    /// Whether the last refusal was SHARED held off by a writer, clearing it.
    pub fn take_shared_request(&mut self) -> bool {
        std::mem::take(&mut self.shared_wanted)
    }

    /// Whether SHARED would still be held off by a writer (pending marker or
    /// EXCLUSIVE elsewhere). An error counts as "no": the retry then meets it.
    pub fn read_blocked(&mut self) -> bool {
        self.flock.read_blocked().unwrap_or(false)
    }

    /// Whether the last refusal was EXCLUSIVE waiting for readers, clearing it.
    pub fn take_exclusive_request(&mut self) -> bool {
        std::mem::take(&mut self.exclusive_wanted)
    }

    /// From the busy handler's sleep of a RESERVED writer waiting for
    /// readers: take the shadow write lock as soon as they are gone, so the
    /// retry's EXCLUSIVE goes through. New readers are kept out by the
    /// pending marker meanwhile. `true` when taken (or already held).
    pub fn try_shadow_write(&mut self) -> bool {
        if self.shadow == Shadow::Write {
            return true;
        }
        if !self.held || self.why & why::XLOCK == 0 || self.level < ffi::SQLITE_LOCK_RESERVED {
            return false;
        }
        self.set_shadow(Shadow::Write) == Ok(true)
    }

    fn drop_pending(&mut self) {
        if self.pending {
            let _ = self.flock.pending(false);
            self.pending = false;
        }
    }

    /// Whether the pending marker is held (for tests and status).
    pub fn pending_held(&self) -> bool {
        self.pending
    }

    /// Release a write intent that was never used: called on every entry,
    /// and by the shim's timer, so even a connection nothing runs on again
    /// lets go within [`INTENT_TTL`].
    pub fn expire_intent(&mut self) {
        if self.intent_since.is_some_and(|t| t.elapsed() > INTENT_TTL) {
            self.intent_since = None;
            self.leave(why::INTENT);
        }
    }

    /// How long a refused checkpoint may queue for the flock (then the shim
    /// calls `shm_lock` again), clearing the request.
    pub fn take_checkpoint_wait(&mut self) -> Option<Duration> {
        self.checkpoint_wait.take()
    }

    /// Whether the last refusal asked for a wait, clearing the request.
    pub fn take_intent_request(&mut self) -> bool {
        std::mem::take(&mut self.intent_wanted)
    }

    /// Whether waiting for the flock is safe now: the handle holds no lock a
    /// writer could need — no WAL-index lock at all, and no SQLite lock
    /// beyond the SHARED that WAL connections keep for life. (A deferred
    /// read transaction upgrading to write still holds its read lock, so it
    /// never waits here: SQLite returns BUSY at once, as stock does.)
    ///
    /// A checkpoint that holds the checkpoint lock without the flock may wait
    /// too, as stock SQLite's blocking checkpoints wait for the WAL write lock
    /// holding it: no writer needs the checkpoint lock to finish (its
    /// auto-checkpoint tries it once and moves on).
    pub fn may_wait(&self) -> bool {
        !self.held
            && self.shm_excl & !SLOT_CKPT == 0
            && self.shm_shared == 0
            && (self.level == ffi::SQLITE_LOCK_NONE
                || (self.wal && self.level == ffi::SQLITE_LOCK_SHARED))
    }

    /// One non-blocking attempt to take the flock as a write *intent*, from
    /// the connection's busy-handler sleep: `Ok(true)` when taken. The
    /// retry that follows turns it into a write; an intent unused for
    /// [`INTENT_TTL`], or a transaction that ends first, releases it.
    pub fn try_intent(&mut self) -> Result<bool, i32> {
        if !self.may_wait() {
            return Ok(false);
        }
        match self.flock.try_acquire() {
            Ok(true) => {
                self.acquired();
                self.why = why::INTENT;
                self.intent_since = Some(Instant::now());
                self.events |= event::INTENT;
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => {
                self.note_error(ffi::SQLITE_IOERR_LOCK, e);
                Err(ffi::SQLITE_IOERR_LOCK)
            }
        }
    }

    /// Whether the handle holds the flock as a writer (not only as an
    /// intent): the write it waited for is under way.
    pub fn writing(&self) -> bool {
        self.held && self.why & !why::INTENT != 0
    }

    /// Whether the flock is held as an unused write intent only.
    pub fn has_pure_intent(&self) -> bool {
        self.why == why::INTENT
    }

    /// Give up an unused write intent.
    pub fn drop_intent(&mut self) {
        if self.has_pure_intent() {
            self.intent_since = None;
            self.leave(why::INTENT);
        }
    }

    /// The handle has mapped the WAL index (so it is in WAL mode).
    pub fn shm_mapped(&mut self) {
        self.wal = true;
    }

    /// `xCheckReservedLock`, asked by a reader that found a journal. When
    /// SQLite sees no writer but the journal looks hot (`journal_looks_hot`:
    /// non-zero first byte) while another handle holds the flock, the journal
    /// may belong to a live writer whose POSIX locks were cancelled (or a
    /// `flock(1)` holder is guarding the files): neither roll it back nor read
    /// the half-written file — `SQLITE_BUSY`, and the busy handler retries.
    /// The probe runs only in that case, so it never disturbs writers' own
    /// non-blocking attempts in the common one.
    pub fn check_reserved(
        &mut self,
        inner: impl FnOnce(&mut i32) -> i32,
        journal_looks_hot: impl FnOnce() -> bool,
    ) -> (i32, i32) {
        let mut res = 0;
        let rc = inner(&mut res);
        if rc != ffi::SQLITE_OK || res != 0 || self.held || !journal_looks_hot() {
            return (rc, res);
        }
        match self.flock.held_elsewhere() {
            Ok(true) => (self.busy(), 0),
            Ok(false) => (rc, 0),
            Err(e) => {
                self.note_error(ffi::SQLITE_IOERR_CHECKRESERVEDLOCK, e);
                (ffi::SQLITE_IOERR_CHECKRESERVEDLOCK, 0)
            }
        }
    }

    /// `xShmLock(ofst, n, flags)`.
    pub fn shm_lock(&mut self, ofst: i32, n: i32, flags: i32, inner: impl FnOnce() -> i32) -> i32 {
        self.expire_intent();
        let mask = range_mask(ofst, n);
        let lock = flags & ffi::SQLITE_SHM_LOCK != 0;
        let excl = flags & ffi::SQLITE_SHM_EXCLUSIVE != 0;
        match (lock, excl) {
            (true, true) => {
                let reading = self.shm_excl != 0 || self.shm_shared & READ_SLOTS != 0;
                let reason = if mask & SLOT_WRITE != 0 {
                    if !reading {
                        0 // WAL recovery / header check: not a user write.
                    } else {
                        why::WAL_WRITE
                    }
                } else if mask & SLOT_CKPT != 0 && self.shm_excl & SLOT_WRITE == 0 {
                    why::WAL_CKPT
                } else {
                    0
                };
                let newly = reason != 0 && self.why & reason == 0;
                if newly {
                    if let Err(rc) = self.enter(reason) {
                        // A checkpoint that holds no shm lock may wait a
                        // little (SQLite gives the checkpoint lock a single
                        // try, no busy handler): nothing a writer needs is
                        // held. The shim queues for it and calls again.
                        if rc == ffi::SQLITE_BUSY && reason == why::WAL_CKPT && !reading {
                            // Only the commit's own auto-checkpoint queues:
                            // an explicit blocking one waits through its
                            // busy handler at the WAL write lock (exactly its
                            // busy_timeout, as stock), a passive one never.
                            let auto = self
                                .write_ended
                                .is_some_and(|t| t.elapsed() < AUTO_CHECKPOINT_WINDOW);
                            self.checkpoint_wait = Some(if auto {
                                self.options.checkpoint_wait
                            } else {
                                Duration::ZERO
                            });
                        }
                        return rc;
                    }
                }
                let rc = inner();
                if rc == ffi::SQLITE_OK {
                    self.shm_excl |= mask;
                    if self.ckpt_unlocked && self.held {
                        // A blocking checkpoint got the flock at the WAL
                        // write lock: keep it until the checkpoint ends.
                        self.why |= why::WAL_CKPT;
                        self.ckpt_unlocked = false;
                    }
                } else if newly {
                    self.leave(reason);
                }
                rc
            }
            (true, false) => {
                let rc = inner();
                if rc == ffi::SQLITE_OK {
                    self.shm_shared |= mask;
                }
                rc
            }
            (false, _) => {
                let rc = inner();
                if excl {
                    self.shm_excl &= !mask;
                } else {
                    self.shm_shared &= !mask;
                }
                self.sync_shm_reasons();
                rc
            }
        }
    }

    fn sync_shm_reasons(&mut self) {
        if self.shm_excl & SLOT_WRITE == 0 {
            if self.why & why::WAL_WRITE != 0 {
                self.write_ended = Some(Instant::now());
            }
            self.leave(why::WAL_WRITE);
        }
        if self.shm_excl & SLOT_CKPT == 0 {
            self.leave(why::WAL_CKPT);
            self.ckpt_unlocked = false;
        }
    }

    /// After a refused checkpoint lock waited its `checkpoint_wait` in vain:
    /// take the checkpoint lock without the flock (`inner` is the inner
    /// `xShmLock`). What the checkpoint may do then:
    /// * a blocking one (FULL, RESTART, TRUNCATE) asks for the WAL write lock
    ///   next, which needs the flock: refused, SQLite's busy handler waits
    ///   for it (within `busy_timeout`, as stock SQLite waits for the WAL write
    ///   lock), and once taken the flock stays until the checkpoint ends;
    /// * a passive one goes on to copy pages: [`Self::checkpoint_write`]
    ///   makes its first write of the database file take the flock or fail
    ///   with `SQLITE_BUSY`, which SQLite takes as "not everything copied".
    ///
    /// Either way the database file is never written without the flock.
    pub fn checkpoint_without_flock(
        &mut self,
        ofst: i32,
        n: i32,
        inner: impl FnOnce() -> i32,
    ) -> i32 {
        let rc = inner();
        if rc == ffi::SQLITE_OK {
            self.shm_excl |= range_mask(ofst, n);
            self.ckpt_unlocked = true;
        }
        rc
    }

    /// Whether the handle holds the checkpoint lock without the flock (the
    /// shim then routes writes of the database file through
    /// [`Self::checkpoint_write`]).
    pub fn checkpoint_unlocked(&self) -> bool {
        self.ckpt_unlocked
    }

    /// Before a checkpoint that holds the checkpoint lock without the flock
    /// writes, truncates or syncs the database file: take the flock now
    /// (`SQLITE_OK`, kept until the checkpoint ends) or refuse the write
    /// (`SQLITE_BUSY`: SQLite stops copying and reports the checkpoint as
    /// incomplete, as when readers are in the way).
    pub fn checkpoint_write(&mut self) -> i32 {
        if !self.ckpt_unlocked || self.held {
            return ffi::SQLITE_OK;
        }
        match self.enter(why::WAL_CKPT) {
            Ok(()) => {
                self.ckpt_unlocked = false;
                ffi::SQLITE_OK
            }
            Err(rc) => {
                self.intent_wanted = false; // no busy handler follows a write
                rc
            }
        }
    }

    /// `xShmUnmap`: the shared-memory connection and all its locks are gone.
    pub fn shm_unmap(&mut self) {
        self.wal = false;
        self.shm_excl = 0;
        self.shm_shared = 0;
        self.sync_shm_reasons();
    }

    /// `xClose`: whatever happened, no lock outlives the handle.
    pub fn close(&mut self) {
        self.drop_pending();
        self.intent_since = None;
        if self.shadow != Shadow::Unlocked {
            self.lower_shadow(Shadow::Unlocked);
        }
        self.why = 0;
        if self.held {
            self.release();
        }
        self.level = ffi::SQLITE_LOCK_NONE;
        self.shm_excl = 0;
        self.shm_shared = 0;
        self.ckpt_unlocked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ffi::{SQLITE_BUSY, SQLITE_IOERR_LOCK, SQLITE_OK};
    use ffi::{SQLITE_LOCK_EXCLUSIVE as EXCL, SQLITE_LOCK_NONE as NONE};
    use ffi::{SQLITE_LOCK_RESERVED as RES, SQLITE_LOCK_SHARED as SHARED};
    use ffi::{SQLITE_SHM_EXCLUSIVE, SQLITE_SHM_LOCK, SQLITE_SHM_SHARED, SQLITE_SHM_UNLOCK};

    /// A flock shared between fake handles: `owner` is who holds it.
    #[derive(Default)]
    struct Fake {
        held: bool,
        contended: bool,
        acquires: u32,
        releases: u32,
        /// Another handle holds a shadow read (reader / attached).
        others_reading: bool,
        /// Another handle holds the shadow write (writing the db file).
        other_writing: bool,
        shadow: Option<Shadow>,
        /// Another handle holds the pending marker.
        other_pending: bool,
        pending: bool,
    }
    impl WriterFlock for Fake {
        fn try_acquire(&mut self) -> Result<bool, LockError> {
            assert!(!self.held, "acquired twice");
            if self.contended {
                return Ok(false);
            }
            self.held = true;
            self.acquires += 1;
            Ok(true)
        }
        fn release(&mut self) {
            assert!(self.held, "released while not held");
            self.held = false;
            self.releases += 1;
        }
        fn held_elsewhere(&mut self) -> Result<bool, LockError> {
            Ok(self.contended)
        }
        fn pending(&mut self, on: bool) -> Result<bool, LockError> {
            self.pending = on;
            Ok(true)
        }
        fn pending_elsewhere(&mut self) -> Result<bool, LockError> {
            Ok(self.other_pending)
        }
        fn read_blocked(&mut self) -> Result<bool, LockError> {
            Ok(self.other_pending || self.other_writing)
        }
        fn shadow(&mut self, to: Shadow) -> Result<bool, LockError> {
            // Holding the write lock ourselves, nobody else holds anything.
            let mine = self.shadow == Some(Shadow::Write);
            let ok = match to {
                Shadow::Unlocked => true,
                Shadow::Read => mine || !self.other_writing,
                Shadow::Write => mine || (!self.other_writing && !self.others_reading),
            };
            if ok {
                self.shadow = Some(to);
            }
            Ok(ok)
        }
    }

    fn p() -> Protocol<Fake> {
        Protocol::new(Fake::default())
    }

    const XL: i32 = SQLITE_SHM_LOCK | SQLITE_SHM_EXCLUSIVE;
    const XU: i32 = SQLITE_SHM_UNLOCK | SQLITE_SHM_EXCLUSIVE;
    const SL: i32 = SQLITE_SHM_LOCK | SQLITE_SHM_SHARED;
    const SU: i32 = SQLITE_SHM_UNLOCK | SQLITE_SHM_SHARED;

    #[test]
    fn rollback_writer_holds_flock_from_reserved_to_unlock() {
        let mut h = p();
        assert_eq!(h.lock(SHARED, || SQLITE_OK), SQLITE_OK);
        assert!(!h.holds());
        assert_eq!(h.lock(RES, || SQLITE_OK), SQLITE_OK);
        assert!(h.holds());
        assert_eq!(h.lock(EXCL, || SQLITE_OK), SQLITE_OK);
        assert_eq!(h.flock.acquires, 1, "one acquisition per transaction");
        assert_eq!(h.unlock(SHARED, || SQLITE_OK), SQLITE_OK);
        assert!(!h.holds());
        assert_eq!(h.unlock(NONE, || SQLITE_OK), SQLITE_OK);
        assert_eq!(h.flock.releases, 1);
    }

    #[test]
    fn flock_taken_before_inner_lock_and_released_after_inner_unlock() {
        let mut h = p();
        h.lock(SHARED, || SQLITE_OK);
        let mut seen = false;
        // The inner call cannot observe our state directly; check via counters.
        h.lock(RES, || {
            seen = true;
            SQLITE_OK
        });
        assert!(seen && h.flock.held);
        let mut held_during_inner_unlock = false;
        let flock_held = h.flock.held;
        h.unlock(SHARED, || {
            held_during_inner_unlock = flock_held;
            SQLITE_OK
        });
        assert!(held_during_inner_unlock && !h.flock.held);
    }

    #[test]
    fn hot_journal_shared_to_exclusive_counts_as_writer() {
        let mut h = p();
        h.lock(SHARED, || SQLITE_OK);
        assert_eq!(h.lock(EXCL, || SQLITE_OK), SQLITE_OK);
        assert!(h.holds());
    }

    #[test]
    fn contended_is_busy_and_inner_not_called() {
        let mut h = p();
        h.flock.contended = true;
        h.lock(SHARED, || SQLITE_OK);
        let rc = h.lock(RES, || panic!("inner lock must not be tried"));
        assert_eq!(rc, SQLITE_BUSY);
        assert_eq!(h.counters.busy, 1);
        assert!(!h.holds());
    }

    #[test]
    fn inner_failure_undoes_the_flock() {
        let mut h = p();
        h.lock(SHARED, || SQLITE_OK);
        assert_eq!(h.lock(RES, || SQLITE_BUSY), SQLITE_BUSY);
        assert!(!h.holds() && !h.flock.held);
        // A failed EXCLUSIVE from RESERVED keeps the flock: still a writer.
        h.lock(RES, || SQLITE_OK);
        assert_eq!(h.lock(EXCL, || SQLITE_IOERR_LOCK), SQLITE_IOERR_LOCK);
        assert!(h.holds());
    }

    #[test]
    fn failed_inner_unlock_keeps_flock_until_close() {
        let mut h = p();
        h.lock(SHARED, || SQLITE_OK);
        h.lock(RES, || SQLITE_OK);
        h.unlock(SHARED, || ffi::SQLITE_IOERR_UNLOCK);
        assert!(h.holds());
        h.close();
        assert!(!h.holds() && !h.flock.held);
    }

    #[test]
    fn wal_write_lock_needs_flock_when_reading() {
        let mut h = p();
        h.lock(SHARED, || SQLITE_OK);
        h.shm_lock(3, 1, SL, || SQLITE_OK); // read lock
        h.shm_lock(0, 1, XL, || SQLITE_OK); // begin write
        assert!(h.holds());
        h.shm_lock(0, 1, XU, || SQLITE_OK);
        assert!(!h.holds());
        h.shm_lock(3, 1, SU, || SQLITE_OK);
        assert_eq!(h.flock.acquires, 1);
    }

    #[test]
    fn wal_recovery_without_read_lock_passes_through() {
        let mut h = p();
        h.flock.contended = true;
        h.lock(SHARED, || SQLITE_OK);
        assert_eq!(h.shm_lock(0, 1, XL, || SQLITE_OK), SQLITE_OK);
        assert_eq!(h.shm_lock(1, 7, XL, || SQLITE_OK), SQLITE_OK);
        assert!(!h.holds());
        h.shm_lock(1, 7, XU, || SQLITE_OK);
        h.shm_lock(0, 1, XU, || SQLITE_OK);
        // ...but a write after it is refused while contended.
        h.shm_lock(3, 1, SL, || SQLITE_OK);
        assert_eq!(h.shm_lock(0, 1, XL, || SQLITE_OK), SQLITE_BUSY);
    }

    #[test]
    fn checkpoint_lock_needs_flock_and_full_checkpoint_takes_one() {
        let mut h = p();
        h.shm_lock(1, 1, XL, || SQLITE_OK); // checkpointer
        assert!(h.holds());
        h.shm_lock(0, 1, XL, || SQLITE_OK); // FULL: writer lock too
        h.shm_lock(0, 1, XU, || SQLITE_OK);
        assert!(h.holds(), "still checkpointing");
        h.shm_lock(1, 1, XU, || SQLITE_OK);
        assert!(!h.holds());
        assert_eq!(h.flock.acquires, 1);
    }

    #[test]
    fn exclusive_range_covering_slot_zero_counts() {
        let mut h = p();
        h.shm_lock(3, 1, SL, || SQLITE_OK);
        h.shm_lock(0, 2, XL, || SQLITE_OK);
        assert!(h.holds());
        h.shm_lock(0, 2, XU, || SQLITE_OK);
        assert!(!h.holds());
    }

    #[test]
    fn xlock_and_shm_reasons_overlap_without_double_acquire() {
        let mut h = p();
        h.lock(SHARED, || SQLITE_OK);
        h.lock(EXCL, || SQLITE_OK); // WAL close: EXCLUSIVE first
        h.shm_lock(1, 1, XL, || SQLITE_OK); // then checkpoint
        h.unlock(SHARED, || SQLITE_OK);
        assert!(h.holds(), "checkpoint lock still held");
        h.shm_unmap();
        assert!(!h.holds());
        assert_eq!((h.flock.acquires, h.flock.releases), (1, 1));
    }

    #[test]
    fn shadow_follows_shared_and_exclusive() {
        let mut h = p();
        h.lock(SHARED, || SQLITE_OK);
        assert_eq!(h.shadow_held(), Shadow::Read);
        h.lock(RES, || SQLITE_OK);
        assert_eq!(h.shadow_held(), Shadow::Read);
        h.lock(EXCL, || SQLITE_OK);
        assert_eq!(h.shadow_held(), Shadow::Write);
        h.unlock(SHARED, || SQLITE_OK);
        assert_eq!(h.shadow_held(), Shadow::Read);
        h.unlock(NONE, || SQLITE_OK);
        assert_eq!(h.shadow_held(), Shadow::Unlocked);
        assert!(!h.holds());
    }

    #[test]
    fn reader_is_busy_while_another_handle_writes_the_file() {
        let mut h = p();
        h.flock.other_writing = true;
        assert_eq!(
            h.lock(SHARED, || panic!("inner SHARED must wait")),
            SQLITE_BUSY
        );
        assert_eq!(h.shadow_held(), Shadow::Unlocked);
        h.flock.other_writing = false;
        assert_eq!(h.lock(SHARED, || SQLITE_OK), SQLITE_OK);
    }

    #[test]
    fn exclusive_waits_for_other_readers_and_keeps_reserved() {
        let mut h = p();
        h.flock.others_reading = true;
        h.lock(SHARED, || SQLITE_OK);
        h.lock(RES, || SQLITE_OK);
        assert_eq!(
            h.lock(EXCL, || panic!("inner EXCLUSIVE must wait")),
            SQLITE_BUSY
        );
        assert!(h.holds(), "still RESERVED: keeps the flock");
        assert_eq!(
            h.shadow_held(),
            Shadow::Read,
            "a failed upgrade keeps the read lock"
        );
        // Straight from SHARED (hot journal, WAL close): everything undone.
        let mut g = p();
        g.flock.others_reading = true;
        g.lock(SHARED, || SQLITE_OK);
        assert_eq!(g.lock(EXCL, || panic!("must not be tried")), SQLITE_BUSY);
        assert!(!g.holds() && !g.flock.held);
        assert_eq!(g.shadow_held(), Shadow::Read);
    }

    #[test]
    fn pending_marker_stops_new_readers_and_lasts_while_reserved() {
        let mut r = p();
        r.flock.other_pending = true;
        assert_eq!(r.lock(SHARED, || panic!("must wait")), SQLITE_BUSY);
        let mut w = p();
        w.flock.others_reading = true;
        w.lock(SHARED, || SQLITE_OK);
        w.lock(RES, || SQLITE_OK);
        assert_eq!(w.lock(EXCL, || SQLITE_OK), SQLITE_BUSY);
        assert!(
            w.pending_held() && w.flock.pending,
            "kept while RESERVED and waiting"
        );
        w.flock.others_reading = false;
        assert_eq!(w.lock(EXCL, || SQLITE_OK), SQLITE_OK);
        w.unlock(SHARED, || SQLITE_OK);
        assert!(!w.pending_held() && !w.flock.pending);
    }

    #[test]
    fn failed_inner_exclusive_downgrades_shadow() {
        let mut h = p();
        h.lock(SHARED, || SQLITE_OK);
        h.lock(RES, || SQLITE_OK);
        assert_eq!(h.lock(EXCL, || SQLITE_BUSY), SQLITE_BUSY);
        assert_eq!(h.shadow_held(), Shadow::Read);
        assert!(h.holds());
        h.close();
        assert_eq!(h.shadow_held(), Shadow::Unlocked);
    }

    #[test]
    fn intent_taken_in_sleep_becomes_the_write() {
        let mut h = p();
        h.lock(SHARED, || SQLITE_OK);
        h.flock.contended = true;
        assert_eq!(h.lock(RES, || SQLITE_OK), SQLITE_BUSY);
        assert!(h.take_intent_request());
        assert!(
            !h.may_wait(),
            "still SHARED in rollback mode: the btree unlocks first"
        );
        h.unlock(NONE, || SQLITE_OK);
        assert!(h.may_wait());
        assert_eq!(h.try_intent(), Ok(false), "still contended");
        h.flock.contended = false;
        assert_eq!(h.try_intent(), Ok(true));
        assert!(h.holds());
        // The retry: SHARED then RESERVED finds the lock already held.
        h.lock(SHARED, || SQLITE_OK);
        assert_eq!(h.lock(RES, || SQLITE_OK), SQLITE_OK);
        h.unlock(NONE, || SQLITE_OK);
        assert!(!h.holds());
        assert_eq!((h.flock.acquires, h.flock.releases), (1, 1));
    }

    #[test]
    fn unused_intent_is_released() {
        let mut h = p();
        assert_eq!(h.try_intent(), Ok(true));
        h.lock(SHARED, || SQLITE_OK);
        h.unlock(NONE, || SQLITE_OK);
        assert!(!h.holds(), "transaction ended without writing");
        assert_eq!(h.try_intent(), Ok(true));
        h.intent_since = Some(Instant::now() - INTENT_TTL * 2);
        h.lock(SHARED, || SQLITE_OK);
        assert!(!h.holds(), "expired");
    }

    #[test]
    fn read_transaction_upgrade_never_waits() {
        let mut h = p();
        h.shm_mapped();
        h.lock(SHARED, || SQLITE_OK);
        h.shm_lock(3, 1, SL, || SQLITE_OK);
        h.flock.contended = true;
        assert_eq!(h.shm_lock(0, 1, XL, || SQLITE_OK), SQLITE_BUSY);
        assert!(!h.may_wait(), "holds a read mark");
        h.shm_lock(3, 1, SU, || SQLITE_OK);
        assert!(h.may_wait(), "WAL: SHARED for life, no shm lock");
    }

    #[test]
    fn waits_and_holds_are_timed() {
        let mut h = p();
        h.lock(SHARED, || SQLITE_OK);
        h.flock.contended = true;
        assert_eq!(h.lock(RES, || SQLITE_OK), SQLITE_BUSY);
        assert_eq!(
            h.take_events() & event::REFUSED,
            event::REFUSED,
            "who holds it: logged off this path"
        );
        assert!(h.unlogged.is_none(), "nothing built on the refusal path");
        std::thread::sleep(Duration::from_millis(5));
        h.flock.contended = false;
        h.lock(RES, || SQLITE_OK);
        assert!(h.counters.wait_max >= Duration::from_millis(5));
        h.options.hold_warn = Duration::from_millis(1);
        std::thread::sleep(Duration::from_millis(2));
        h.unlock(SHARED, || SQLITE_OK);
        assert!(h.counters.hold_max >= Duration::from_millis(2));
        assert!(h
            .unlogged
            .take()
            .is_some_and(|(c, m)| c == ffi::SQLITE_WARNING && m.contains("held the write lock")));
    }

    #[test]
    fn check_reserved_reports_other_holder() {
        let mut h = p();
        assert_eq!(
            h.check_reserved(
                |r| {
                    *r = 0;
                    SQLITE_OK
                },
                || true
            ),
            (SQLITE_OK, 0)
        );
        h.flock.contended = true;
        let none = |r: &mut i32| {
            *r = 0;
            SQLITE_OK
        };
        assert_eq!(
            h.check_reserved(none, || false),
            (SQLITE_OK, 0),
            "no hot-looking journal: no probe"
        );
        assert_eq!(
            h.check_reserved(none, || true),
            (SQLITE_BUSY, 0),
            "live writer or flock(1) holder"
        );
        let inner_reserved = |r: &mut i32| {
            *r = 1;
            SQLITE_OK
        };
        assert_eq!(
            h.check_reserved(inner_reserved, || panic!("not asked")),
            (SQLITE_OK, 1)
        );
    }

    #[test]
    fn snapshot_style_shared_slot1_is_not_a_read_transaction() {
        let mut h = p();
        h.flock.contended = true;
        h.shm_lock(1, 1, SL, || SQLITE_OK);
        assert_eq!(
            h.shm_lock(0, 1, XL, || SQLITE_OK),
            SQLITE_OK,
            "recovery passes"
        );
    }

    mod model {
        //! Random sequences of SQLite lock calls, with injected inner failures
        //! and contention, checked against the protocol's invariants. The
        //! fake flock itself panics on a double acquire or a stray release.
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Lock(i32),
            Unlock(i32),
            Shm { ofst: i32, n: i32, flags: i32 },
            ShmUnmap,
            CheckReserved,
        }

        fn op() -> impl Strategy<Value = Op> {
            let shm_flags = prop_oneof![Just(XL), Just(XU), Just(SL), Just(SU)];
            prop_oneof![
                (1..=4i32)
                    .prop_filter("no PENDING", |l| *l != 3)
                    .prop_map(Op::Lock),
                prop_oneof![Just(NONE), Just(SHARED)].prop_map(Op::Unlock),
                (0..8i32, 1..=3i32, shm_flags).prop_map(|(ofst, n, flags)| Op::Shm {
                    ofst,
                    n,
                    flags
                }),
                Just(Op::ShmUnmap),
                Just(Op::CheckReserved),
            ]
        }

        /// (op, inner result, flock contended, readers elsewhere, writer elsewhere)
        fn step() -> impl Strategy<Value = (Op, i32, bool, bool, bool)> {
            let rc = prop_oneof![6 => Just(SQLITE_OK), 1 => Just(SQLITE_BUSY), 1 => Just(SQLITE_IOERR_LOCK)];
            (
                op(),
                rc,
                any::<bool>(),
                any::<bool>(),
                prop::bool::weighted(0.1),
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]
            #[test]
            fn flock_held_exactly_while_a_writer(steps in prop::collection::vec(step(), 1..60)) {
                let mut h = p();
                let mut level = NONE; // what SQLite believes, from successful calls
                let mut excl: u32 = 0;
                for (op, rc, contended, readers, writer) in steps {
                    h.flock.contended = contended && !h.flock.held;
                    // Others can only write the file while we hold no shadow lock.
                    h.flock.others_reading = readers;
                    h.flock.other_writing = writer && h.shadow_held() == Shadow::Unlocked;
                    match op {
                        Op::Lock(l) if l > level => {
                            if h.lock(l, || rc) == SQLITE_OK {
                                level = l;
                            }
                        }
                        Op::Unlock(l) if l < level => {
                            if h.unlock(l, || rc) == SQLITE_OK {
                                level = l;
                            }
                        }
                        Op::Shm { ofst, n, flags } => {
                            let mask = range_mask(ofst, n);
                            let is_excl = flags & SQLITE_SHM_EXCLUSIVE != 0;
                            let locking = flags & SQLITE_SHM_LOCK != 0;
                            // SQLite never locks a slot it holds, nor unlocks one it does not.
                            if locking && (excl & mask != 0 || (is_excl && h.shm_shared & mask != 0)) {
                                continue;
                            }
                            if !locking && is_excl && excl & mask != mask {
                                continue;
                            }
                            let got = h.shm_lock(ofst, n, flags, || rc);
                            if is_excl && locking && got == SQLITE_OK {
                                excl |= mask;
                            }
                            if is_excl && !locking {
                                excl &= !mask;
                            }
                        }
                        Op::ShmUnmap => {
                            h.shm_unmap();
                            excl = 0;
                        }
                        Op::CheckReserved => {
                            let _ = h.check_reserved(|r| { *r = 0; rc }, || contended);
                        }
                        _ => continue,
                    }
                    // The flock is held by the handle iff the fake says so.
                    prop_assert_eq!(h.holds(), h.flock.held);
                    if level >= RES {
                        prop_assert!(h.holds(), "a writer by xLock must hold the flock");
                    }
                    if level < RES && excl & (SLOT_WRITE | SLOT_CKPT) == 0 {
                        prop_assert!(!h.holds(), "not a writer, yet holds the flock");
                    }
                    if level < EXCL && !h.holds() {
                        prop_assert!(!h.pending_held(), "pending marker without being a writer");
                    }
                    match level {
                        NONE => prop_assert_eq!(h.shadow_held(), Shadow::Unlocked),
                        EXCL => prop_assert_eq!(h.shadow_held(), Shadow::Write),
                        _ => prop_assert_eq!(h.shadow_held(), Shadow::Read),
                    }
                }
                h.close();
                prop_assert!(!h.flock.held, "never after close");
                prop_assert!(!h.flock.pending, "no pending marker after close");
                prop_assert_eq!(h.flock.acquires, h.flock.releases);
            }
        }
    }
}
