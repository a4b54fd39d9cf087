//! One timer thread per process, for work that must happen even when nothing
//! runs on a connection again: a write intent that nobody used is released
//! after 100 ms, a long hold is warned about while it is still held, a slow
//! diagnostic (who holds the lock, from `/proc/locks`) is written off the
//! connection's own path.
//!
//! Jobs are closures with a due time. The thread starts with the first job,
//! sleeps until the earliest one, and never wakes when there is nothing to
//! do. A forked child gets a timer of its own (see
//! [`crate::process::PerProcess`]): the parent's thread does not exist there.

use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

type Job = Box<dyn FnOnce() + Send>;

struct Entry {
    due: Instant,
    seq: u64,
    job: Job,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    /// Earliest first in a max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

#[derive(Default)]
struct State {
    jobs: BinaryHeap<Entry>,
    seq: u64,
    running: bool,
}

#[derive(Default)]
struct Timer {
    state: Mutex<State>,
    more: Condvar,
}

static TIMER: crate::process::PerProcess<Timer> = crate::process::PerProcess::new();

/// Run `job` on the timer thread at `due` (or soon after). Jobs must be
/// quick and must not call back into this module's caller while holding its
/// locks in the other order; they usually upgrade a `Weak` and check whether
/// there is still anything to do.
pub fn at(due: Instant, job: impl FnOnce() + Send + 'static) {
    let t = TIMER.get(Timer::default);
    let mut s = t.state.lock().unwrap_or_else(|e| e.into_inner());
    s.seq += 1;
    let seq = s.seq;
    s.jobs.push(Entry {
        due,
        seq,
        job: Box::new(job),
    });
    // The thread sleeps until the earliest job: a later one needs no wake-up.
    let earliest = s.jobs.peek().is_some_and(|e| e.seq == seq);
    if !s.running {
        let started = std::thread::Builder::new()
            .name("writelock-timer".into())
            .spawn(move || run(t));
        // Without a thread the jobs wait for the next chance (each caller
        // also checks on its own path); never fail the caller for it.
        s.running = started.is_ok();
    }
    drop(s);
    if earliest {
        t.more.notify_one();
    }
}

fn run(t: &'static Timer) {
    let mut s = t.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let now = Instant::now();
        match s.jobs.peek() {
            None => {
                s = t.more.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            Some(e) if e.due > now => {
                let d = e.due - now;
                s = t
                    .more
                    .wait_timeout(s, d)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            Some(_) => {
                let e = s.jobs.pop().expect("peeked");
                drop(s);
                // A panicking job must not take the timer with it.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(e.job));
                s = t.state.lock().unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn jobs_run_in_due_order_and_not_before() {
        let (tx, rx) = mpsc::channel();
        let t0 = Instant::now();
        for (ms, tag) in [(60u64, 'c'), (20, 'a'), (40, 'b')] {
            let tx = tx.clone();
            at(t0 + Duration::from_millis(ms), move || {
                tx.send((tag, Instant::now())).unwrap()
            });
        }
        let got: Vec<(char, Instant)> = (0..3)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        assert_eq!(
            got.iter().map(|g| g.0).collect::<String>(),
            "abc",
            "due order"
        );
        assert!(got[0].1 >= t0 + Duration::from_millis(20));
    }
}
