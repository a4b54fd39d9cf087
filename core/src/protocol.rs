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
//! Two exceptions, both from SQLite's internals:
//! * WAL recovery / header check: slot 0 requested while the handle holds no
//!   shared-memory lock at all. It rebuilds the `-shm` index and never writes
//!   the database; demanding the flock there turns a plain read into a
//!   multi-second wait or `SQLITE_PROTOCOL`. It passes through.
//! * Every escalation is non-blocking: contended means [`Refusal::Busy`], and
//!   the connection's busy handler (which first drops its read lock) decides.
//!
//! Everything here is typed: lock levels, shared-memory requests, refusals and
//! events. The inner SQLite call is a closure returning `Result<(), E>` for
//! whatever error type the caller uses; the shim turns C ints into these
//! types on the way in and back on the way out, and nothing here knows a
//! SQLite result code.

use std::time::{Duration, Instant};

use crate::clock::{Clock, SystemClock};
use crate::lockfile::{LockError, Shadow};
use crate::options::Options;

/// SQLite's lock levels on the database file (`xLock`, `xUnlock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LockLevel {
    None,
    Shared,
    Reserved,
    Pending,
    Exclusive,
}

/// The slots of an `xShmLock` request: `count` slots from `first` (SQLite
/// has 8: 0 the WAL write lock, 1 the checkpoint lock, 2 recovery, 3.. read
/// marks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    pub first: u8,
    pub count: u8,
}

impl Slots {
    fn mask(self) -> u32 {
        (self.first as u32..(self.first as u32 + self.count as u32).min(32))
            .fold(0, |m, i| m | (1u32 << i))
    }
}

/// An `xShmLock` request's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShmMode {
    Shared,
    Exclusive,
}

/// An `xShmLock` request: take or let go of `slots` in `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShmOp {
    Lock(Slots, ShmMode),
    Unlock(Slots, ShmMode),
}

/// Why a call of the protocol did not go through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal<E> {
    /// Held elsewhere, or readers or a writer in the way: `SQLITE_BUSY`.
    Busy,
    /// The inner (SQLite's own) call failed with this.
    Inner(E),
    /// The lock file failed. `unusable`: it cannot serve at all (cannot be
    /// opened, not a regular file); otherwise an I/O error. The error itself
    /// is in [`Events::failure`].
    LockFile { unusable: bool },
}

/// What the shim should act on after a call (see [`Protocol::take_events`]).
#[derive(Debug, Default)]
pub struct Events {
    /// An attempt was refused because another holder has the lock: the shim
    /// may say who (off the connection's path: the look is slow). At most
    /// once a second per handle.
    pub refused: bool,
    /// A write intent was taken: the shim arms its expiry.
    pub intent: bool,
    /// The lock was taken: the shim arms the long-hold watch if needed.
    pub acquired: bool,
    /// How many times [`Refusal::Busy`] was returned.
    pub busy: u32,
    /// A hold ended after `held`, at least the warning threshold, and was
    /// not warned about while it lasted.
    pub held_long: Option<HeldLong>,
    /// The lock file failed (logged once by the shim).
    pub failure: Option<String>,
}

impl Events {
    /// Something to log: a refusal (who holds the lock), a long hold, a
    /// failure. Most steps have none.
    pub fn loggable(&self) -> bool {
        self.refused || self.held_long.is_some() || self.failure.is_some()
    }
}

/// A long hold: how long, and the threshold it passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldLong {
    pub held: Duration,
    pub threshold: Duration,
    /// Still held when reported (the timer's warning) or ended (release).
    pub still_held: bool,
}

/// The lock on `<db>.lock`, as the protocol needs it (a trait so tests can fake it).
pub trait WriterFlock {
    /// Take the exclusive lock without blocking: `Ok(false)` when contended.
    fn try_acquire(&mut self) -> Result<bool, LockError>;
    /// Release it (no-op if not held).
    fn release(&mut self);
    /// The options that shape how it is taken and released (the hand-off
    /// threshold); given before every release.
    fn configure(&mut self, _options: &crate::options::Options) {}
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
    /// Whether the handle is in WAL mode (its writers' own lock lives in the
    /// WAL index, which no stray `close()` of the database cancels).
    fn set_wal(&mut self, _wal: bool) {}
}

impl WriterFlock for crate::lockfile::LockFile {
    fn try_acquire(&mut self) -> Result<bool, LockError> {
        self.try_lock()
    }
    fn release(&mut self) {
        self.unlock()
    }
    fn configure(&mut self, options: &crate::options::Options) {
        self.set_handoff_after(options.handoff);
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
    fn set_wal(&mut self, wal: bool) {
        crate::lockfile::LockFile::set_wal(self, wal)
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

/// Who holds the lock is asked about at most this often per handle.
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

/// Per-handle lock state. Generic over the flock so tests can inject
/// failures, and over the clock so they can move time.
pub struct Protocol<F, C = SystemClock> {
    flock: F,
    clock: C,
    level: LockLevel,
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
    /// Last error from the lock file, kept for status.
    pub last_error: Option<String>,
    /// Options in force (URI parameters, PRAGMAs).
    pub options: Options,
    /// The database path, for messages.
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
    events: Events,
    pub counters: Counters,
}

impl<F: WriterFlock> Protocol<F> {
    /// A handle with no SQLite lock and no flock, on the system clock.
    pub fn new(flock: F) -> Self {
        Protocol::with_clock(flock, SystemClock)
    }
}

impl<F: WriterFlock, C: Clock> Protocol<F, C> {
    /// A handle with no SQLite lock and no flock, on `clock`.
    pub fn with_clock(flock: F, clock: C) -> Self {
        Protocol {
            flock,
            clock,
            level: LockLevel::None,
            shm_excl: 0,
            shm_shared: 0,
            shadow: Shadow::Unlocked,
            pending: false,
            exclusive_wanted: false,
            shared_wanted: false,
            why: 0,
            held: false,
            last_error: None,
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
            events: Events::default(),
            counters: Counters::default(),
        }
    }

    /// The clock this handle measures time with.
    pub fn clock(&self) -> &C {
        &self.clock
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

    /// The lock file, to note the handle's place in the queue.
    pub fn flock_mut(&mut self) -> &mut F {
        &mut self.flock
    }

    /// What happened since the last call, clearing it.
    pub fn take_events(&mut self) -> Events {
        std::mem::take(&mut self.events)
    }

    /// When the current hold began (None when not holding).
    pub fn held_since(&self) -> Option<Instant> {
        self.held_since
    }

    /// The current hold if it has lasted at least `writelock_hold_warn_ms`
    /// and was not reported yet (the shim's timer asks while it lasts).
    pub fn long_hold(&mut self) -> Option<HeldLong> {
        let since = self.held_since?;
        let threshold = self.options.hold_warn;
        let held = self.clock.now().saturating_duration_since(since);
        if threshold.is_zero() || held < threshold || self.warned_hold == Some(since) {
            return None;
        }
        self.warned_hold = Some(since);
        Some(HeldLong {
            held,
            threshold,
            still_held: true,
        })
    }

    fn failed<E>(&mut self, e: LockError) -> Refusal<E> {
        let unusable = matches!(e, LockError::Open { .. } | LockError::NotRegular { .. });
        let msg = e.to_string();
        self.last_error = Some(msg.clone());
        self.events.failure = Some(msg);
        Refusal::LockFile { unusable }
    }

    /// Add a reason to be a writer; takes the flock on the first one.
    /// A refusal leaves the state unchanged.
    fn enter<E>(&mut self, reason: u8) -> Result<(), Refusal<E>> {
        if self.why & why::INTENT != 0 {
            // The lock taken while the busy handler slept: now a real write.
            self.why = (self.why & !why::INTENT) | reason;
            self.intent_since = None;
            return Ok(());
        }
        if self.why == 0 && !self.held {
            match self.flock.try_acquire() {
                Ok(true) => self.acquired(),
                Ok(false) => {
                    self.counters.contended += 1;
                    self.contended();
                    self.intent_wanted = true;
                    return Err(self.busy());
                }
                Err(e) => return Err(self.failed(e)),
            }
        }
        self.why |= reason;
        Ok(())
    }

    fn acquired(&mut self) {
        let now = self.clock.now();
        self.held = true;
        self.held_since = Some(now);
        self.events.acquired = true;
        self.counters.acquisitions += 1;
        if let Some(t0) = self.wait_since.take() {
            let w = now.saturating_duration_since(t0);
            self.counters.wait_total += w;
            self.counters.wait_max = self.counters.wait_max.max(w);
        }
    }

    /// A refused attempt: start or continue a wait, and ask the shim to say
    /// who holds the lock (at most once a second per handle).
    fn contended(&mut self) {
        let now = self.clock.now();
        if self
            .last_attempt
            .is_none_or(|t| now.saturating_duration_since(t) > EPISODE_GAP)
        {
            self.wait_since = Some(now);
        }
        self.last_attempt = Some(now);
        if self
            .last_busy_log
            .is_none_or(|t| now.saturating_duration_since(t) >= BUSY_LOG_EVERY)
        {
            self.last_busy_log = Some(now);
            self.events.refused = true;
        }
    }

    fn release(&mut self) {
        self.flock.configure(&self.options);
        self.flock.release();
        self.held = false;
        if let Some(t0) = self.held_since.take() {
            let held = self.clock.now().saturating_duration_since(t0);
            self.counters.hold_total += held;
            self.counters.hold_max = self.counters.hold_max.max(held);
            let threshold = self.options.hold_warn;
            // Warned while held already (the shim's timer): not again.
            if !threshold.is_zero() && held >= threshold && self.warned_hold != Some(t0) {
                self.events.held_long.get_or_insert(HeldLong {
                    held,
                    threshold,
                    still_held: false,
                });
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

    /// Move the shadow lock: `Ok(false)` when another handle's conflicts.
    fn set_shadow<E>(&mut self, to: Shadow) -> Result<bool, Refusal<E>> {
        match self.flock.shadow(to) {
            Ok(true) => {
                self.shadow = to;
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Best effort on paths that cannot fail (unlock, undo): an error is
    /// noted and the handle keeps believing it holds the stronger lock.
    fn lower_shadow(&mut self, to: Shadow) {
        let _ = self.set_shadow::<()>(to);
    }

    fn busy<E>(&mut self) -> Refusal<E> {
        self.counters.busy += 1;
        self.events.busy += 1;
        Refusal::Busy
    }

    /// `xLock(level)`: shadow read before SHARED; the flock before RESERVED
    /// or above; shadow write before EXCLUSIVE. Any step that fails undoes
    /// the steps before it, and a failed inner lock undoes them all.
    pub fn lock<E>(
        &mut self,
        level: LockLevel,
        inner: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), Refusal<E>> {
        self.expire_intent();
        let took_read = self.shadow == Shadow::Unlocked;
        if took_read {
            if let Err(e) = self.flock.refresh() {
                return Err(self.failed(e));
            }
            // Like SQLite's PENDING: a writer waiting for EXCLUSIVE stops new readers.
            match self.flock.pending_elsewhere() {
                Ok(false) => {}
                Ok(true) => {
                    self.shared_wanted = true;
                    return Err(self.busy());
                }
                Err(e) => return Err(self.failed(e)),
            }
            if !self.set_shadow(Shadow::Read)? {
                // A writer holds EXCLUSIVE.
                self.shared_wanted = true;
                return Err(self.busy());
            }
        }
        let newly = level >= LockLevel::Reserved && self.why & why::XLOCK == 0;
        if newly {
            if let Err(r) = self.enter(why::XLOCK) {
                if took_read {
                    self.lower_shadow(Shadow::Unlocked);
                }
                return Err(r);
            }
        }
        let took_write = level >= LockLevel::Exclusive && self.shadow != Shadow::Write;
        if took_write && !self.pending {
            // Only flock holders get here, so nobody else holds it.
            if self.flock.pending(true).unwrap_or(false) {
                self.pending = true;
            }
        }
        if took_write {
            let r = self.set_shadow(Shadow::Write);
            if !matches!(r, Ok(true)) {
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
                return Err(match r {
                    Err(refusal) => refusal,
                    Ok(_) => self.busy(),
                });
            }
        }
        match inner() {
            Ok(()) => {
                self.level = self.level.max(level);
                Ok(())
            }
            Err(e) => {
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
                Err(Refusal::Inner(e))
            }
        }
    }

    /// `xUnlock(level)`: the flock and the shadow go after the inner unlock
    /// succeeded. If the inner unlock fails the inner lock may still be held,
    /// so ours stay (fail closed; close releases them).
    pub fn unlock<E>(
        &mut self,
        level: LockLevel,
        inner: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), Refusal<E>> {
        inner().map_err(Refusal::Inner)?;
        self.level = level;
        let want = match level {
            LockLevel::Exclusive => self.shadow,
            LockLevel::None => Shadow::Unlocked,
            _ => Shadow::Read,
        };
        if want != self.shadow && !(want == Shadow::Read && self.shadow == Shadow::Unlocked) {
            self.lower_shadow(want);
        }
        if level < LockLevel::Exclusive {
            self.drop_pending();
        }
        if level < LockLevel::Reserved {
            self.leave(why::XLOCK);
        }
        if level == LockLevel::None {
            self.leave(why::INTENT); // the transaction ended without writing
        }
        Ok(())
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
        if !self.held || self.why & why::XLOCK == 0 || self.level < LockLevel::Reserved {
            return false;
        }
        matches!(self.set_shadow::<()>(Shadow::Write), Ok(true))
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
    /// and by the process timer, so even a connection nothing runs on again
    /// lets go within [`INTENT_TTL`].
    pub fn expire_intent(&mut self) {
        let now = self.clock.now();
        if self
            .intent_since
            .is_some_and(|t| now.saturating_duration_since(t) > INTENT_TTL)
        {
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
            && (self.level == LockLevel::None || (self.wal && self.level == LockLevel::Shared))
    }

    /// One non-blocking attempt to take the flock as a write *intent*, from
    /// the connection's busy-handler sleep: `Ok(true)` when taken. The
    /// retry that follows turns it into a write; an intent unused for
    /// [`INTENT_TTL`], or a transaction that ends first, releases it.
    pub fn try_intent(&mut self) -> Result<bool, Refusal<()>> {
        if !self.may_wait() {
            return Ok(false);
        }
        match self.flock.try_acquire() {
            Ok(true) => {
                self.acquired();
                self.why = why::INTENT;
                self.intent_since = Some(self.clock.now());
                self.events.intent = true;
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Whether the handle holds the flock as a writer (not only as an
    /// intent): the write it waited for is under way.
    pub fn writing(&self) -> bool {
        self.held && self.why & !why::INTENT != 0
    }

    /// When the unused write intent held now was taken.
    pub fn intent_since(&self) -> Option<Instant> {
        self.intent_since
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
        self.flock.set_wal(true);
    }

    /// `xCheckReservedLock`, asked by a reader that found a journal; `inner`
    /// says whether SQLite sees a writer. When it sees none but the journal
    /// looks hot (`journal_looks_hot`: non-zero first byte) while another
    /// handle holds the flock, the journal may belong to a live writer whose
    /// POSIX locks were cancelled (or a `flock(1)` holder is guarding the
    /// files): neither roll it back nor read the half-written file —
    /// [`Refusal::Busy`], and the busy handler retries. The probe runs only
    /// in that case, so it never disturbs writers' own non-blocking attempts
    /// in the common one.
    pub fn check_reserved<E>(
        &mut self,
        inner: impl FnOnce() -> Result<bool, E>,
        journal_looks_hot: impl FnOnce() -> bool,
    ) -> Result<bool, Refusal<E>> {
        let reserved = inner().map_err(Refusal::Inner)?;
        if reserved || self.held || !journal_looks_hot() {
            return Ok(reserved);
        }
        match self.flock.held_elsewhere() {
            Ok(true) => Err(self.busy()),
            Ok(false) => Ok(false),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// `xShmLock`.
    pub fn shm_lock<E>(
        &mut self,
        op: ShmOp,
        inner: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), Refusal<E>> {
        self.expire_intent();
        match op {
            ShmOp::Lock(slots, ShmMode::Exclusive) => {
                let mask = slots.mask();
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
                    if let Err(r) = self.enter(reason) {
                        // A checkpoint that holds no shm lock may wait a
                        // little (SQLite gives the checkpoint lock a single
                        // try, no busy handler): nothing a writer needs is
                        // held. Only the commit's own auto-checkpoint queues:
                        // an explicit blocking one waits through its busy
                        // handler at the WAL write lock (exactly its
                        // busy_timeout, as stock), a passive one never.
                        if matches!(r, Refusal::Busy) && reason == why::WAL_CKPT && !reading {
                            let now = self.clock.now();
                            let auto = self.write_ended.is_some_and(|t| {
                                now.saturating_duration_since(t) < AUTO_CHECKPOINT_WINDOW
                            });
                            self.checkpoint_wait = Some(if auto {
                                self.options.checkpoint_wait
                            } else {
                                Duration::ZERO
                            });
                        }
                        return Err(r);
                    }
                }
                match inner() {
                    Ok(()) => {
                        self.shm_excl |= mask;
                        if self.ckpt_unlocked && self.held {
                            // A blocking checkpoint got the flock at the WAL
                            // write lock: keep it until the checkpoint ends.
                            self.why |= why::WAL_CKPT;
                            self.ckpt_unlocked = false;
                        }
                        Ok(())
                    }
                    Err(e) => {
                        if newly {
                            self.leave(reason);
                        }
                        Err(Refusal::Inner(e))
                    }
                }
            }
            ShmOp::Lock(slots, ShmMode::Shared) => {
                inner().map_err(Refusal::Inner)?;
                self.shm_shared |= slots.mask();
                Ok(())
            }
            ShmOp::Unlock(slots, mode) => {
                let r = inner().map_err(Refusal::Inner);
                match mode {
                    ShmMode::Exclusive => self.shm_excl &= !slots.mask(),
                    ShmMode::Shared => self.shm_shared &= !slots.mask(),
                }
                self.sync_shm_reasons();
                r
            }
        }
    }

    fn sync_shm_reasons(&mut self) {
        if self.shm_excl & SLOT_WRITE == 0 {
            if self.why & why::WAL_WRITE != 0 {
                self.write_ended = Some(self.clock.now());
            }
            self.leave(why::WAL_WRITE);
        }
        if self.shm_excl & SLOT_CKPT == 0 {
            self.leave(why::WAL_CKPT);
            self.ckpt_unlocked = false;
        }
    }

    /// After a refused checkpoint lock waited its `checkpoint_wait` in vain:
    /// take the checkpoint lock (`slots`) without the flock (`inner` is the
    /// inner `xShmLock`). What the checkpoint may do then:
    /// * a blocking one (FULL, RESTART, TRUNCATE) asks for the WAL write lock
    ///   next, which needs the flock: refused, SQLite's busy handler waits
    ///   for it (within `busy_timeout`, as stock SQLite waits for the WAL write
    ///   lock), and once taken the flock stays until the checkpoint ends;
    /// * a passive one goes on to copy pages: [`Self::checkpoint_write`]
    ///   makes its first write of the database file take the flock or fail
    ///   with [`Refusal::Busy`], which SQLite takes as "not everything copied".
    ///
    /// Either way the database file is never written without the flock.
    pub fn checkpoint_without_flock<E>(
        &mut self,
        slots: Slots,
        inner: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), Refusal<E>> {
        inner().map_err(Refusal::Inner)?;
        self.shm_excl |= slots.mask();
        self.ckpt_unlocked = true;
        Ok(())
    }

    /// Whether the handle holds the checkpoint lock without the flock (the
    /// shim then routes writes of the database file through
    /// [`Self::checkpoint_write`]).
    pub fn checkpoint_unlocked(&self) -> bool {
        self.ckpt_unlocked
    }

    /// Before a checkpoint that holds the checkpoint lock without the flock
    /// writes, truncates or syncs the database file: take the flock now
    /// (kept until the checkpoint ends) or refuse the write
    /// ([`Refusal::Busy`]: SQLite stops copying and reports the checkpoint as
    /// incomplete, as when readers are in the way).
    pub fn checkpoint_write(&mut self) -> Result<(), Refusal<()>> {
        if !self.ckpt_unlocked || self.held {
            return Ok(());
        }
        let r = self.enter(why::WAL_CKPT);
        if r.is_ok() {
            self.ckpt_unlocked = false;
        } else {
            self.intent_wanted = false; // no busy handler follows a write
        }
        r
    }

    /// `xShmUnmap`: the shared-memory connection and all its locks are gone.
    pub fn shm_unmap(&mut self) {
        self.wal = false;
        self.flock.set_wal(false);
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
        self.level = LockLevel::None;
        self.shm_excl = 0;
        self.shm_shared = 0;
        self.ckpt_unlocked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    // The tests speak SQLite's result codes, as the shim does: an inner call
    // returns a code, and `code` maps a protocol result back to one.
    const SQLITE_OK: i32 = 0;
    const SQLITE_BUSY: i32 = 5;
    const SQLITE_IOERR_LOCK: i32 = 3850;
    const SQLITE_IOERR_UNLOCK: i32 = 2058;
    /// What the tests call a lock file failure.
    const LOCKFILE_FAILED: i32 = -1;
    const NONE: LockLevel = LockLevel::None;
    const SHARED: LockLevel = LockLevel::Shared;
    const RES: LockLevel = LockLevel::Reserved;
    const EXCL: LockLevel = LockLevel::Exclusive;

    fn inner(rc: i32) -> Result<(), i32> {
        if rc == SQLITE_OK {
            Ok(())
        } else {
            Err(rc)
        }
    }

    fn code(r: Result<(), Refusal<i32>>) -> i32 {
        match r {
            Ok(()) => SQLITE_OK,
            Err(Refusal::Busy) => SQLITE_BUSY,
            Err(Refusal::Inner(rc)) => rc,
            Err(Refusal::LockFile { .. }) => LOCKFILE_FAILED,
        }
    }

    /// Shared-memory flags as SQLite passes them (lock/unlock × shared/exclusive).
    const LOCK: i32 = 2;
    const UNLOCK: i32 = 1;
    const SHM_SHARED: i32 = 4;
    const SHM_EXCLUSIVE: i32 = 8;

    fn shm(ofst: i32, n: i32, flags: i32) -> ShmOp {
        let slots = Slots {
            first: ofst as u8,
            count: n as u8,
        };
        let mode = if flags & SHM_EXCLUSIVE != 0 {
            ShmMode::Exclusive
        } else {
            ShmMode::Shared
        };
        if flags & LOCK != 0 {
            ShmOp::Lock(slots, mode)
        } else {
            ShmOp::Unlock(slots, mode)
        }
    }

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

    fn p() -> Protocol<Fake, ManualClock> {
        Protocol::with_clock(Fake::default(), ManualClock::default())
    }

    const XL: i32 = LOCK | SHM_EXCLUSIVE;
    const XU: i32 = UNLOCK | SHM_EXCLUSIVE;
    const SL: i32 = LOCK | SHM_SHARED;
    const SU: i32 = UNLOCK | SHM_SHARED;

    #[test]
    fn rollback_writer_holds_flock_from_reserved_to_unlock() {
        let mut h = p();
        assert_eq!(code(h.lock(SHARED, || inner(SQLITE_OK))), SQLITE_OK);
        assert!(!h.holds());
        assert_eq!(code(h.lock(RES, || inner(SQLITE_OK))), SQLITE_OK);
        assert!(h.holds());
        assert_eq!(code(h.lock(EXCL, || inner(SQLITE_OK))), SQLITE_OK);
        assert_eq!(h.flock.acquires, 1, "one acquisition per transaction");
        assert_eq!(code(h.unlock(SHARED, || inner(SQLITE_OK))), SQLITE_OK);
        assert!(!h.holds());
        assert_eq!(code(h.unlock(NONE, || inner(SQLITE_OK))), SQLITE_OK);
        assert_eq!(h.flock.releases, 1);
    }

    #[test]
    fn flock_taken_before_inner_lock_and_released_after_inner_unlock() {
        let mut h = p();
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        let mut seen = false;
        // The inner call cannot observe our state directly; check via counters.
        code(h.lock(RES, || {
            inner({
                seen = true;
                SQLITE_OK
            })
        }));
        assert!(seen && h.flock.held);
        let mut held_during_inner_unlock = false;
        let flock_held = h.flock.held;
        code(h.unlock(SHARED, || {
            inner({
                held_during_inner_unlock = flock_held;
                SQLITE_OK
            })
        }));
        assert!(held_during_inner_unlock && !h.flock.held);
    }

    #[test]
    fn hot_journal_shared_to_exclusive_counts_as_writer() {
        let mut h = p();
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        assert_eq!(code(h.lock(EXCL, || inner(SQLITE_OK))), SQLITE_OK);
        assert!(h.holds());
    }

    #[test]
    fn contended_is_busy_and_inner_not_called() {
        let mut h = p();
        h.flock.contended = true;
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        let rc = code(h.lock(RES, || -> Result<(), i32> {
            panic!("inner lock must not be tried")
        }));
        assert_eq!(rc, SQLITE_BUSY);
        assert_eq!(h.counters.busy, 1);
        assert!(!h.holds());
    }

    #[test]
    fn inner_failure_undoes_the_flock() {
        let mut h = p();
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        assert_eq!(code(h.lock(RES, || inner(SQLITE_BUSY))), SQLITE_BUSY);
        assert!(!h.holds() && !h.flock.held);
        // A failed EXCLUSIVE from RESERVED keeps the flock: still a writer.
        code(h.lock(RES, || inner(SQLITE_OK)));
        assert_eq!(
            code(h.lock(EXCL, || inner(SQLITE_IOERR_LOCK))),
            SQLITE_IOERR_LOCK
        );
        assert!(h.holds());
    }

    #[test]
    fn failed_inner_unlock_keeps_flock_until_close() {
        let mut h = p();
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        code(h.lock(RES, || inner(SQLITE_OK)));
        code(h.unlock(SHARED, || inner(SQLITE_IOERR_UNLOCK)));
        assert!(h.holds());
        h.close();
        assert!(!h.holds() && !h.flock.held);
    }

    #[test]
    fn wal_write_lock_needs_flock_when_reading() {
        let mut h = p();
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        code(h.shm_lock(shm(3, 1, SL), || inner(SQLITE_OK))); // read lock
        code(h.shm_lock(shm(0, 1, XL), || inner(SQLITE_OK))); // begin write
        assert!(h.holds());
        code(h.shm_lock(shm(0, 1, XU), || inner(SQLITE_OK)));
        assert!(!h.holds());
        code(h.shm_lock(shm(3, 1, SU), || inner(SQLITE_OK)));
        assert_eq!(h.flock.acquires, 1);
    }

    #[test]
    fn wal_recovery_without_read_lock_passes_through() {
        let mut h = p();
        h.flock.contended = true;
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        assert_eq!(
            code(h.shm_lock(shm(0, 1, XL), || inner(SQLITE_OK))),
            SQLITE_OK
        );
        assert_eq!(
            code(h.shm_lock(shm(1, 7, XL), || inner(SQLITE_OK))),
            SQLITE_OK
        );
        assert!(!h.holds());
        code(h.shm_lock(shm(1, 7, XU), || inner(SQLITE_OK)));
        code(h.shm_lock(shm(0, 1, XU), || inner(SQLITE_OK)));
        // ...but a write after it is refused while contended.
        code(h.shm_lock(shm(3, 1, SL), || inner(SQLITE_OK)));
        assert_eq!(
            code(h.shm_lock(shm(0, 1, XL), || inner(SQLITE_OK))),
            SQLITE_BUSY
        );
    }

    #[test]
    fn checkpoint_lock_needs_flock_and_full_checkpoint_takes_one() {
        let mut h = p();
        code(h.shm_lock(shm(1, 1, XL), || inner(SQLITE_OK))); // checkpointer
        assert!(h.holds());
        code(h.shm_lock(shm(0, 1, XL), || inner(SQLITE_OK))); // FULL: writer lock too
        code(h.shm_lock(shm(0, 1, XU), || inner(SQLITE_OK)));
        assert!(h.holds(), "still checkpointing");
        code(h.shm_lock(shm(1, 1, XU), || inner(SQLITE_OK)));
        assert!(!h.holds());
        assert_eq!(h.flock.acquires, 1);
    }

    #[test]
    fn exclusive_range_covering_slot_zero_counts() {
        let mut h = p();
        code(h.shm_lock(shm(3, 1, SL), || inner(SQLITE_OK)));
        code(h.shm_lock(shm(0, 2, XL), || inner(SQLITE_OK)));
        assert!(h.holds());
        code(h.shm_lock(shm(0, 2, XU), || inner(SQLITE_OK)));
        assert!(!h.holds());
    }

    #[test]
    fn xlock_and_shm_reasons_overlap_without_double_acquire() {
        let mut h = p();
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        code(h.lock(EXCL, || inner(SQLITE_OK))); // WAL close: EXCLUSIVE first
        code(h.shm_lock(shm(1, 1, XL), || inner(SQLITE_OK))); // then checkpoint
        code(h.unlock(SHARED, || inner(SQLITE_OK)));
        assert!(h.holds(), "checkpoint lock still held");
        h.shm_unmap();
        assert!(!h.holds());
        assert_eq!((h.flock.acquires, h.flock.releases), (1, 1));
    }

    #[test]
    fn shadow_follows_shared_and_exclusive() {
        let mut h = p();
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        assert_eq!(h.shadow_held(), Shadow::Read);
        code(h.lock(RES, || inner(SQLITE_OK)));
        assert_eq!(h.shadow_held(), Shadow::Read);
        code(h.lock(EXCL, || inner(SQLITE_OK)));
        assert_eq!(h.shadow_held(), Shadow::Write);
        code(h.unlock(SHARED, || inner(SQLITE_OK)));
        assert_eq!(h.shadow_held(), Shadow::Read);
        code(h.unlock(NONE, || inner(SQLITE_OK)));
        assert_eq!(h.shadow_held(), Shadow::Unlocked);
        assert!(!h.holds());
    }

    #[test]
    fn reader_is_busy_while_another_handle_writes_the_file() {
        let mut h = p();
        h.flock.other_writing = true;
        assert_eq!(
            code(h.lock(SHARED, || -> Result<(), i32> {
                panic!("inner SHARED must wait")
            })),
            SQLITE_BUSY
        );
        assert_eq!(h.shadow_held(), Shadow::Unlocked);
        h.flock.other_writing = false;
        assert_eq!(code(h.lock(SHARED, || inner(SQLITE_OK))), SQLITE_OK);
    }

    #[test]
    fn exclusive_waits_for_other_readers_and_keeps_reserved() {
        let mut h = p();
        h.flock.others_reading = true;
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        code(h.lock(RES, || inner(SQLITE_OK)));
        assert_eq!(
            code(h.lock(EXCL, || -> Result<(), i32> {
                panic!("inner EXCLUSIVE must wait")
            })),
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
        code(g.lock(SHARED, || inner(SQLITE_OK)));
        assert_eq!(
            code(g.lock(EXCL, || -> Result<(), i32> { panic!("must not be tried") })),
            SQLITE_BUSY
        );
        assert!(!g.holds() && !g.flock.held);
        assert_eq!(g.shadow_held(), Shadow::Read);
    }

    #[test]
    fn pending_marker_stops_new_readers_and_lasts_while_reserved() {
        let mut r = p();
        r.flock.other_pending = true;
        assert_eq!(
            code(r.lock(SHARED, || -> Result<(), i32> { panic!("must wait") })),
            SQLITE_BUSY
        );
        let mut w = p();
        w.flock.others_reading = true;
        code(w.lock(SHARED, || inner(SQLITE_OK)));
        code(w.lock(RES, || inner(SQLITE_OK)));
        assert_eq!(code(w.lock(EXCL, || inner(SQLITE_OK))), SQLITE_BUSY);
        assert!(
            w.pending_held() && w.flock.pending,
            "kept while RESERVED and waiting"
        );
        w.flock.others_reading = false;
        assert_eq!(code(w.lock(EXCL, || inner(SQLITE_OK))), SQLITE_OK);
        code(w.unlock(SHARED, || inner(SQLITE_OK)));
        assert!(!w.pending_held() && !w.flock.pending);
    }

    #[test]
    fn failed_inner_exclusive_downgrades_shadow() {
        let mut h = p();
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        code(h.lock(RES, || inner(SQLITE_OK)));
        assert_eq!(code(h.lock(EXCL, || inner(SQLITE_BUSY))), SQLITE_BUSY);
        assert_eq!(h.shadow_held(), Shadow::Read);
        assert!(h.holds());
        h.close();
        assert_eq!(h.shadow_held(), Shadow::Unlocked);
    }

    #[test]
    fn intent_taken_in_sleep_becomes_the_write() {
        let mut h = p();
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        h.flock.contended = true;
        assert_eq!(code(h.lock(RES, || inner(SQLITE_OK))), SQLITE_BUSY);
        assert!(h.take_intent_request());
        assert!(
            !h.may_wait(),
            "still SHARED in rollback mode: the btree unlocks first"
        );
        code(h.unlock(NONE, || inner(SQLITE_OK)));
        assert!(h.may_wait());
        assert_eq!(h.try_intent(), Ok(false), "still contended");
        h.flock.contended = false;
        assert_eq!(h.try_intent(), Ok(true));
        assert!(h.holds());
        // The retry: SHARED then RESERVED finds the lock already held.
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        assert_eq!(code(h.lock(RES, || inner(SQLITE_OK))), SQLITE_OK);
        code(h.unlock(NONE, || inner(SQLITE_OK)));
        assert!(!h.holds());
        assert_eq!((h.flock.acquires, h.flock.releases), (1, 1));
    }

    #[test]
    fn unused_intent_is_released() {
        let mut h = p();
        assert_eq!(h.try_intent(), Ok(true));
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        code(h.unlock(NONE, || inner(SQLITE_OK)));
        assert!(!h.holds(), "transaction ended without writing");
        assert_eq!(h.try_intent(), Ok(true));
        h.clock().advance(INTENT_TTL);
        h.expire_intent();
        assert!(h.holds(), "not older than the TTL yet");
        h.clock().advance(Duration::from_millis(1));
        h.expire_intent(); // the process timer's call
        assert!(!h.holds(), "expired");
        assert_eq!(h.try_intent(), Ok(true));
        h.clock().advance(INTENT_TTL * 2);
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        assert!(!h.holds(), "expired on the next call too");
    }

    #[test]
    fn read_transaction_upgrade_never_waits() {
        let mut h = p();
        h.shm_mapped();
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        code(h.shm_lock(shm(3, 1, SL), || inner(SQLITE_OK)));
        h.flock.contended = true;
        assert_eq!(
            code(h.shm_lock(shm(0, 1, XL), || inner(SQLITE_OK))),
            SQLITE_BUSY
        );
        assert!(!h.may_wait(), "holds a read mark");
        code(h.shm_lock(shm(3, 1, SU), || inner(SQLITE_OK)));
        assert!(h.may_wait(), "WAL: SHARED for life, no shm lock");
    }

    #[test]
    fn waits_and_holds_are_timed() {
        let mut h = p();
        code(h.lock(SHARED, || inner(SQLITE_OK)));
        h.flock.contended = true;
        assert_eq!(code(h.lock(RES, || inner(SQLITE_OK))), SQLITE_BUSY);
        let e = h.take_events();
        assert!(e.refused, "who holds it: asked for, off this path");
        assert_eq!(
            (e.busy, e.failure),
            (1, None),
            "nothing else on the refusal path"
        );
        h.clock().advance(Duration::from_millis(5));
        h.flock.contended = false;
        code(h.lock(RES, || inner(SQLITE_OK)));
        assert_eq!(h.counters.wait_max, Duration::from_millis(5));
        h.options.hold_warn = Duration::from_millis(10);
        h.clock().advance(Duration::from_millis(12));
        let long = h.long_hold().unwrap();
        assert!(long.still_held && long.held == Duration::from_millis(12));
        assert_eq!(h.long_hold(), None, "once per hold");
        code(h.unlock(SHARED, || inner(SQLITE_OK)));
        assert_eq!(h.counters.hold_max, Duration::from_millis(12));
        assert_eq!(
            h.take_events().held_long,
            None,
            "warned while held: not again"
        );
        code(h.lock(RES, || inner(SQLITE_OK)));
        h.clock().advance(Duration::from_millis(20));
        code(h.unlock(SHARED, || inner(SQLITE_OK)));
        let long = h.take_events().held_long.unwrap();
        assert!(!long.still_held && long.threshold == Duration::from_millis(10));
    }

    #[test]
    fn check_reserved_reports_other_holder() {
        let mut h = p();
        let none = || Ok::<bool, i32>(false);
        assert_eq!(h.check_reserved(none, || true), Ok(false));
        h.flock.contended = true;
        assert_eq!(
            h.check_reserved(none, || false),
            Ok(false),
            "no hot-looking journal: no probe"
        );
        assert_eq!(
            h.check_reserved(none, || true),
            Err(Refusal::Busy),
            "live writer or flock(1) holder"
        );
        assert_eq!(
            h.check_reserved(|| Ok::<bool, i32>(true), || panic!("not asked")),
            Ok(true)
        );
        assert_eq!(
            h.check_reserved(|| Err::<bool, i32>(SQLITE_IOERR_LOCK), || true),
            Err(Refusal::Inner(SQLITE_IOERR_LOCK))
        );
    }

    #[test]
    fn snapshot_style_shared_slot1_is_not_a_read_transaction() {
        let mut h = p();
        h.flock.contended = true;
        code(h.shm_lock(shm(1, 1, SL), || inner(SQLITE_OK)));
        assert_eq!(
            code(h.shm_lock(shm(0, 1, XL), || inner(SQLITE_OK))),
            SQLITE_OK,
            "recovery passes"
        );
    }

    mod model {
        //! Random sequences of SQLite lock calls, busy-handler sleeps that
        //! take write intents, the timer's expiry, time passing, checkpoints
        //! that go on without the flock, and close — with injected inner
        //! failures and contention — checked against the protocol's
        //! invariants. The fake flock itself panics on a double acquire or a
        //! stray release.
        use super::*;
        use crate::wait::Run;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Lock(LockLevel),
            Unlock(LockLevel),
            Shm {
                ofst: i32,
                n: i32,
                flags: i32,
            },
            ShmUnmap,
            CheckReserved,
            /// The busy handler's sleep: a run step, then one try at the
            /// lock as a write intent.
            Sleep {
                asked_ms: u64,
            },
            /// Time passes.
            Advance {
                ms: u64,
            },
            /// The process timer's call.
            Expire,
            /// A checkpoint refused the flock goes on without it.
            CheckpointWithoutFlock,
            /// A write of the database file by such a checkpoint.
            CheckpointWrite,
        }

        fn op() -> impl Strategy<Value = Op> {
            let shm_flags = prop_oneof![Just(XL), Just(XU), Just(SL), Just(SU)];
            prop_oneof![
                4 => prop_oneof![Just(SHARED), Just(RES), Just(EXCL)].prop_map(Op::Lock),
                3 => prop_oneof![Just(NONE), Just(SHARED)].prop_map(Op::Unlock),
                4 => (0..8i32, 1..=3i32, shm_flags).prop_map(|(ofst, n, flags)| Op::Shm {
                    ofst,
                    n,
                    flags
                }),
                1 => Just(Op::ShmUnmap),
                1 => Just(Op::CheckReserved),
                2 => (1..=100u64).prop_map(|asked_ms| Op::Sleep { asked_ms }),
                2 => (0..=150u64).prop_map(|ms| Op::Advance { ms }),
                1 => Just(Op::Expire),
                1 => Just(Op::CheckpointWithoutFlock),
                1 => Just(Op::CheckpointWrite),
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
            fn flock_held_exactly_while_a_writer_or_a_young_intent(
                steps in prop::collection::vec(step(), 1..80)
            ) {
                let mut h = p();
                let clock = h.clock().clone();
                let mut w = crate::wait::WaitState::default();
                let mut level = NONE; // what SQLite believes, from successful calls
                let mut excl: u32 = 0;
                let ahead = Duration::from_millis(25);
                for (op, rc, contended, readers, writer) in steps {
                    h.flock.contended = contended && !h.flock.held;
                    // Others can only write the file while we hold no shadow lock.
                    h.flock.others_reading = readers;
                    h.flock.other_writing = writer && h.shadow_held() == Shadow::Unlocked;
                    let expired_by_now = matches!(
                        op,
                        Op::Lock(_) | Op::Shm { .. } | Op::Expire
                    );
                    match op {
                        Op::Lock(l) if l > level => {
                            if code(h.lock(l, || inner(rc))) == SQLITE_OK {
                                level = l;
                            }
                        }
                        Op::Unlock(l) if l < level => {
                            if code(h.unlock(l, || inner(rc))) == SQLITE_OK {
                                level = l;
                            }
                        }
                        Op::Lock(_) | Op::Unlock(_) => {
                            // SQLite never asks for a level it holds.
                            h.expire_intent();
                        }
                        Op::Shm { ofst, n, flags } => {
                            let mask = shm(ofst, n, flags);
                            let (slots, is_excl, locking) = match mask {
                                ShmOp::Lock(s, m) => (s, m == ShmMode::Exclusive, true),
                                ShmOp::Unlock(s, m) => (s, m == ShmMode::Exclusive, false),
                            };
                            let mask = slots.mask();
                            // SQLite never locks a slot it holds, nor unlocks one it does not.
                            if locking && (excl & mask != 0 || (is_excl && h.shm_shared & mask != 0)) {
                                h.expire_intent();
                                continue;
                            }
                            if !locking && is_excl && excl & mask != mask {
                                h.expire_intent();
                                continue;
                            }
                            let got = code(h.shm_lock(shm(ofst, n, flags), || inner(rc)));
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
                            let _ = h.check_reserved(|| inner(rc).map(|_| false), || contended);
                        }
                        Op::Sleep { asked_ms } => {
                            let now = clock.now();
                            let asked = Duration::from_millis(asked_ms);
                            let deadline = Run::deadline(&mut w.run, now, asked, ahead);
                            prop_assert!(deadline >= now, "a sleep never ends in the past");
                            let granted = h.may_wait() && h.try_intent() == Ok(true);
                            if granted {
                                prop_assert!(h.holds() && h.has_pure_intent());
                            }
                            let waited = if granted { Duration::ZERO } else { deadline - now };
                            clock.advance(waited);
                            Run::ended(&mut w.run, h.holds(), clock.now());
                        }
                        Op::Advance { ms } => clock.advance(Duration::from_millis(ms)),
                        Op::Expire => h.expire_intent(),
                        Op::CheckpointWithoutFlock => {
                            let ckpt = Slots { first: 1, count: 1 };
                            if excl & ckpt.mask() == 0 && h.shm_shared & ckpt.mask() == 0 {
                                let r = h.checkpoint_without_flock(ckpt, || inner(rc));
                                if r.is_ok() {
                                    excl |= ckpt.mask();
                                }
                            }
                        }
                        Op::CheckpointWrite => {
                            let unlocked = h.checkpoint_unlocked();
                            if h.checkpoint_write().is_ok() && unlocked {
                                prop_assert!(h.holds(), "a checkpoint writes the database file only with the flock");
                            }
                        }
                    }
                    // The flock is held by the handle iff the fake says so.
                    prop_assert_eq!(h.holds(), h.flock.held);
                    if level >= RES {
                        prop_assert!(h.holds(), "a writer by xLock must hold the flock");
                    }
                    let writer = level >= RES || (excl & (SLOT_WRITE | SLOT_CKPT) != 0 && h.writing());
                    if h.holds() && !writer {
                        // Only a write intent: young, whatever path took it.
                        prop_assert!(h.has_pure_intent(), "holds the flock, neither a writer nor an intent");
                        if expired_by_now {
                            let age = h.held_since().map(|t| clock.now().saturating_duration_since(t));
                            prop_assert!(age.is_some_and(|a| a <= INTENT_TTL), "an intent older than {:?}: {:?}", INTENT_TTL, age);
                        }
                    }
                    if level < RES && excl & (SLOT_WRITE | SLOT_CKPT) == 0 && !h.has_pure_intent() {
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
                prop_assert!(!h.has_pure_intent() && !h.checkpoint_unlocked());
                prop_assert_eq!(h.flock.acquires, h.flock.releases);
            }
        }
    }
}
