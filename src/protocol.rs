//! The writer-lock protocol for one main-database handle, in pure Rust.
//!
//! A handle is a *writer* while its `xLock` level is at least RESERVED, or
//! while it holds the WAL write lock (shared-memory slot 0) or the checkpoint
//! lock (slot 1) exclusively. While it is a writer it holds `LOCK_EX` on
//! `<db>.lock`; the lock is taken *before* the inner SQLite lock, released
//! *after* the inner unlock, and undone when the inner call fails.
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

use crate::lockfile::LockError;
use libsqlite3_sys as ffi;

/// The lock on `<db>.lock`, as the protocol needs it (a trait so tests can fake it).
pub trait WriterFlock {
    /// Take the exclusive lock without blocking: `Ok(false)` when contended.
    fn try_acquire(&mut self) -> Result<bool, LockError>;
    /// Release it (no-op if not held).
    fn release(&mut self);
    /// Whether some *other* holder has it right now.
    fn held_elsewhere(&mut self) -> Result<bool, LockError>;
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
}

/// Counters for one handle. `contended` counts non-blocking attempts that
/// found the lock held elsewhere; `busy` counts `SQLITE_BUSY` returned because
/// of it (equal today; they differ once waits are added).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub acquisitions: u64,
    pub contended: u64,
    pub busy: u64,
}

/// Why the handle is a writer; the flock is held while any bit is set.
mod why {
    pub const XLOCK: u8 = 1; // xLock level >= RESERVED
    pub const WAL_WRITE: u8 = 2; // shm slot 0 (WAL write lock)
    pub const WAL_CKPT: u8 = 4; // shm slot 1 (checkpoint lock)
}

const SLOT_WRITE: u32 = 1 << 0;
const SLOT_CKPT: u32 = 1 << 1;

/// Per-handle lock state. Generic over the flock so tests can inject failures.
pub struct Protocol<F> {
    flock: F,
    level: i32,
    shm_excl: u32,
    shm_shared: u32,
    why: u8,
    held: bool,
    /// Last error from the lock file, kept for messages and status.
    pub last_error: Option<String>,
    /// An error not yet written to SQLite's log (the shim drains it).
    pub unlogged: Option<(i32, String)>,
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
            why: 0,
            held: false,
            last_error: None,
            unlogged: None,
            counters: Counters::default(),
        }
    }

    /// Whether this handle holds the flock now.
    pub fn holds(&self) -> bool {
        self.held
    }

    /// The flock, for status reporting.
    pub fn flock(&self) -> &F {
        &self.flock
    }

    fn note_error(&mut self, rc: i32, e: LockError) {
        let msg = e.to_string();
        self.last_error = Some(msg.clone());
        self.unlogged = Some((rc, msg));
    }

    /// Add a reason to be a writer; takes the flock on the first one.
    /// `Err(rc)` leaves the state unchanged.
    fn enter(&mut self, reason: u8) -> Result<(), i32> {
        if self.why == 0 && !self.held {
            match self.flock.try_acquire() {
                Ok(true) => {
                    self.held = true;
                    self.counters.acquisitions += 1;
                    crate::stats::GLOBAL.acquired();
                }
                Ok(false) => {
                    self.counters.contended += 1;
                    self.counters.busy += 1;
                    crate::stats::GLOBAL.busy();
                    return Err(ffi::SQLITE_BUSY);
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

    /// Drop a reason; releases the flock when none is left.
    fn leave(&mut self, reason: u8) {
        self.why &= !reason;
        if self.why == 0 && self.held {
            self.flock.release();
            self.held = false;
        }
    }

    /// `xLock(level)`: escalation to RESERVED or above needs the flock first.
    pub fn lock(&mut self, level: i32, inner: impl FnOnce() -> i32) -> i32 {
        let newly = level >= ffi::SQLITE_LOCK_RESERVED && self.why & why::XLOCK == 0;
        if newly {
            if let Err(rc) = self.enter(why::XLOCK) {
                return rc;
            }
        }
        let rc = inner();
        if rc == ffi::SQLITE_OK {
            self.level = self.level.max(level);
        } else if newly {
            self.leave(why::XLOCK);
        }
        rc
    }

    /// `xUnlock(level)`: the flock goes after the inner unlock succeeded and
    /// the level is below RESERVED. If the inner unlock fails the inner lock
    /// may still be held, so the flock stays (fail closed; close releases it).
    pub fn unlock(&mut self, level: i32, inner: impl FnOnce() -> i32) -> i32 {
        let rc = inner();
        if rc == ffi::SQLITE_OK {
            self.level = level;
            if level < ffi::SQLITE_LOCK_RESERVED {
                self.leave(why::XLOCK);
            }
        }
        rc
    }

    /// `xCheckReservedLock`: also "reserved" while another handle holds the
    /// flock, so a reader never mistakes a live journal for a hot one.
    pub fn check_reserved(&mut self, inner: impl FnOnce(&mut i32) -> i32) -> (i32, i32) {
        let mut res = 0;
        let rc = inner(&mut res);
        if rc != ffi::SQLITE_OK || res != 0 || self.held {
            return (rc, res);
        }
        match self.flock.held_elsewhere() {
            Ok(true) => (rc, 1),
            Ok(false) => (rc, 0),
            Err(e) => {
                self.note_error(ffi::SQLITE_IOERR_CHECKRESERVEDLOCK, e);
                (ffi::SQLITE_IOERR_CHECKRESERVEDLOCK, 0)
            }
        }
    }

    /// `xShmLock(ofst, n, flags)`.
    pub fn shm_lock(&mut self, ofst: i32, n: i32, flags: i32, inner: impl FnOnce() -> i32) -> i32 {
        let mask = range_mask(ofst, n);
        let lock = flags & ffi::SQLITE_SHM_LOCK != 0;
        let excl = flags & ffi::SQLITE_SHM_EXCLUSIVE != 0;
        match (lock, excl) {
            (true, true) => {
                let reason = if mask & SLOT_WRITE != 0 {
                    if self.shm_excl == 0 && self.shm_shared == 0 {
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
                        return rc;
                    }
                }
                let rc = inner();
                if rc == ffi::SQLITE_OK {
                    self.shm_excl |= mask;
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
            self.leave(why::WAL_WRITE);
        }
        if self.shm_excl & SLOT_CKPT == 0 {
            self.leave(why::WAL_CKPT);
        }
    }

    /// `xShmUnmap`: the shared-memory connection and all its locks are gone.
    pub fn shm_unmap(&mut self) {
        self.shm_excl = 0;
        self.shm_shared = 0;
        self.sync_shm_reasons();
    }

    /// `xClose`: whatever happened, the flock does not outlive the handle.
    pub fn close(&mut self) {
        self.why = 0;
        if self.held {
            self.flock.release();
            self.held = false;
        }
        self.level = ffi::SQLITE_LOCK_NONE;
        self.shm_excl = 0;
        self.shm_shared = 0;
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
    fn check_reserved_reports_other_holder() {
        let mut h = p();
        assert_eq!(
            h.check_reserved(|r| {
                *r = 0;
                SQLITE_OK
            }),
            (SQLITE_OK, 0)
        );
        h.flock.contended = true;
        assert_eq!(
            h.check_reserved(|r| {
                *r = 0;
                SQLITE_OK
            }),
            (SQLITE_OK, 1)
        );
    }
}
