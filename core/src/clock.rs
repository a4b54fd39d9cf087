//! The clock the protocol and the wait state measure time with: the system's
//! monotonic clock in the extension, one moved by hand in tests, so a model
//! test can let 100 ms pass without sleeping them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Monotonic time.
pub trait Clock: Send + 'static {
    /// Now.
    fn now(&self) -> Instant;
}

/// [`Instant::now`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to (for tests); clones share the time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    base: Instant,
    nanos: Arc<AtomicU64>,
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock {
            base: Instant::now(),
            nanos: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl ManualClock {
    /// Let `d` pass.
    pub fn advance(&self, d: Duration) {
        self.nanos.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}
