//! Process-wide counters, summed over every handle this process ever opened.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters shared by all handles of this process.
pub struct Global {
    acquisitions: AtomicU64,
    busy: AtomicU64,
}

/// The one instance.
pub static GLOBAL: Global = Global {
    acquisitions: AtomicU64::new(0),
    busy: AtomicU64::new(0),
};

impl Global {
    /// Count `acquisitions` and `busy` returns of one call.
    pub fn add(&self, acquisitions: u64, busy: u64) {
        if acquisitions != 0 {
            self.acquisitions.fetch_add(acquisitions, Relaxed);
        }
        if busy != 0 {
            self.busy.fetch_add(busy, Relaxed);
        }
    }
    /// `(acquisitions, busy returns)` so far in this process.
    pub fn snapshot(&self) -> (u64, u64) {
        (self.acquisitions.load(Relaxed), self.busy.load(Relaxed))
    }
}
