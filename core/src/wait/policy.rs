//! Who gets the lock next: the queue's decisions, as pure functions over
//! what the shared page says, so they can be model-tested without
//! processes, files or clocks.
//!
//! The model is Go's `sync.Mutex`. In *normal mode* a release wakes the
//! oldest sleeping waiter, and anyone may take the free lock — typically the
//! process that just let go and writes again at once, which keeps its
//! caches warm and saves a context switch per transaction. Once the oldest
//! waiter has waited longer than a threshold (`writelock_handoff_ms`), the
//! release *hands the lock off* instead: for a short grace the lock is
//! reserved for that waiter, every other handle of the extension refuses
//! itself and queues, and the woken waiter takes it. So unfairness is
//! bounded: no waiter waits more than the threshold plus one hold plus the
//! grace beyond the holds of the waiters queued before it.
//!
//! Three things keep that from ever sticking:
//! * a hand-off expires after [`HANDOFF_GRACE`], whoever it named — a waiter
//!   that died or gave up never holds the lock back for longer;
//! * it names only a waiter asleep in its slot (a slot whose owner went back
//!   to SQLite between two sleeps, or gave up, is passed over);
//! * it binds only the extension's handles: `flock(1)`, `writelock run` and
//!   an application's own `flock` wait in the kernel and may take the lock
//!   whenever it is free, so they never starve either.

/// How long a hand-off reserves the lock for the waiter it names.
pub const HANDOFF_GRACE_NS: u64 = 2_000_000;

/// A live waiter slot as a releaser sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiter {
    /// The slot's index.
    pub slot: usize,
    /// When its current run of waits started (monotonic ns).
    pub arrival_ns: u64,
    /// Asleep in its slot (else between two sleeps, back in SQLite).
    pub asleep: bool,
}

/// A reservation of the free lock for one waiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handoff {
    /// The waiter's slot.
    pub slot: usize,
    /// Until when (monotonic ns).
    pub until_ns: u64,
}

impl Handoff {
    /// As one word for the page: `(slot + 1) << 48 | until in µs` (48 bits of
    /// microseconds of monotonic time: 8.9 years of uptime). 0 is none.
    pub fn to_word(self) -> u64 {
        ((self.slot as u64 + 1) << 48) | ((self.until_ns / 1000) & ((1 << 48) - 1))
    }

    /// The word back (None for 0).
    pub fn from_word(w: u64) -> Option<Handoff> {
        (w >> 48 != 0).then(|| Handoff {
            slot: (w >> 48) as usize - 1,
            until_ns: (w & ((1 << 48) - 1)) * 1000,
        })
    }
}

/// What a release does: which slot to wake, and whether to hand off to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Release {
    /// The slot to wake: the oldest waiter asleep.
    pub wake: Option<usize>,
    /// Set when that waiter has waited longer than the threshold.
    pub handoff: Option<Handoff>,
}

/// Decide a release at `now_ns` over the live waiters (any order).
/// `handoff_after_ns`: how long the oldest may wait before the lock is
/// reserved for it (0: always, strict FIFO; `u64::MAX`: never).
pub fn on_release(now_ns: u64, live: &[Waiter], handoff_after_ns: u64) -> Release {
    let Some(oldest) = live
        .iter()
        .filter(|w| w.asleep)
        .min_by_key(|w| w.arrival_ns)
    else {
        return Release {
            wake: None,
            handoff: None,
        };
    };
    let starving = now_ns.saturating_sub(oldest.arrival_ns) >= handoff_after_ns;
    Release {
        wake: Some(oldest.slot),
        handoff: starving.then_some(Handoff {
            slot: oldest.slot,
            until_ns: now_ns + HANDOFF_GRACE_NS,
        }),
    }
}

/// Whether a handle that owns slot `mine` (None: not queued) may try to
/// take the free lock at `now_ns`, given the page's hand-off.
///
/// A reservation never lasts longer than [`HANDOFF_GRACE_NS`] from now: one
/// that ends later was not written by a release (a damaged page, a process
/// whose monotonic clock runs elsewhere, as in another time namespace) and
/// binds nobody, so no word on the page can hold the lock back for longer.
pub fn may_take(now_ns: u64, handoff: Option<Handoff>, mine: Option<usize>) -> bool {
    match handoff {
        None => true,
        Some(h) if h.until_ns <= now_ns => true,
        Some(h) if h.until_ns > now_ns.saturating_add(HANDOFF_GRACE_NS) => true,
        Some(h) => Some(h.slot) == mine,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn the_word_round_trips_and_zero_is_none() {
        let h = Handoff {
            slot: 255,
            until_ns: 123_456_789_000,
        };
        assert_eq!(Handoff::from_word(h.to_word()), Some(h));
        assert_eq!(Handoff::from_word(0), None);
        let h0 = Handoff {
            slot: 0,
            until_ns: 0,
        };
        assert_eq!(Handoff::from_word(h0.to_word()), Some(h0));
    }

    #[test]
    fn normal_mode_wakes_the_oldest_sleeper_and_reserves_nothing() {
        let live = [
            Waiter {
                slot: 3,
                arrival_ns: 10 * MS,
                asleep: true,
            },
            Waiter {
                slot: 1,
                arrival_ns: 5 * MS,
                asleep: false,
            },
            Waiter {
                slot: 7,
                arrival_ns: 8 * MS,
                asleep: true,
            },
        ];
        let r = on_release(11 * MS, &live, 5 * MS);
        assert_eq!(
            r,
            Release {
                wake: Some(7),
                handoff: None
            }
        );
        let r = on_release(13 * MS, &live, 5 * MS);
        assert_eq!(r.handoff.map(|h| h.slot), Some(7), "8 ms old by now");
        assert_eq!(
            on_release(0, &[], 0),
            Release {
                wake: None,
                handoff: None
            }
        );
    }

    #[test]
    fn a_handoff_binds_others_until_it_expires() {
        let h = Some(Handoff {
            slot: 2,
            until_ns: 10 * MS,
        });
        assert!(may_take(9 * MS, h, Some(2)));
        assert!(!may_take(9 * MS, h, Some(3)));
        assert!(!may_take(9 * MS, h, None));
        assert!(may_take(10 * MS, h, None), "expired");
        assert!(may_take(0, None, None));
    }

    #[test]
    fn no_word_reserves_the_lock_for_longer_than_the_grace() {
        let now = 50 * MS;
        // What a release writes: binding until it expires.
        let fresh = on_release(
            now,
            &[Waiter {
                slot: 4,
                arrival_ns: 0,
                asleep: true,
            }],
            0,
        )
        .handoff;
        assert!(!may_take(now, fresh, None));
        // Any word at all, damaged or from another clock: free by now + grace.
        for w in [
            u64::MAX,
            0xffff_ffff_0000_0000,
            0x0001_ffff_ffff_ffff,
            1 << 48,
        ] {
            let h = Handoff::from_word(w);
            assert!(
                may_take(now + HANDOFF_GRACE_NS, h, None),
                "{w:#x} still binds after the grace"
            );
        }
    }

    /// One simulated contender.
    #[derive(Clone, Debug)]
    struct Proc {
        /// Queued since (its slot's arrival), while waiting, and how many
        /// were queued before it then.
        queued: Option<(u64, u64)>,
        /// When it next tries to take the lock (a poll, a wake-up, or its
        /// next transaction).
        next_try: u64,
    }

    /// The queue with `n` contenders, each hold taking `holds[k % len]`; a
    /// woken waiter tries `wake_lat` after its wake-up, a queued one polls
    /// every `poll`, and the holder tries again `think` after it let go.
    /// A try while the lock is held, or reserved for someone else, queues
    /// the contender (its arrival kept). At every acquisition, no queued
    /// contender has waited longer than the bound: threshold + grace + one
    /// hold and wake-up for each waiter queued before it, and two more.
    fn simulate(n: usize, holds: &[u64], threshold: u64, wake_lat: u64, poll: u64, think: u64) {
        let mut ps: Vec<Proc> = (0..n)
            .map(|i| Proc {
                queued: None,
                next_try: i as u64 * 10_000,
            })
            .collect();
        let max_hold = *holds.iter().max().unwrap();
        let mut handoff: Option<Handoff> = None;
        let mut now = 0u64;
        for k in 0..400 {
            // The lock is free at `now`: the earliest try that may take it does.
            let (h, t) = loop {
                let i = (0..n).min_by_key(|&i| (ps[i].next_try, i)).unwrap();
                let t = ps[i].next_try.max(now);
                if may_take(t, handoff, ps[i].queued.map(|_| i)) {
                    break (i, t);
                }
                queue(&mut ps, i, t);
                ps[i].next_try = t + poll;
            };
            for p in &ps {
                if let Some((q, ahead)) = p.queued {
                    let bound = threshold + HANDOFF_GRACE_NS + (ahead + 2) * (max_hold + wake_lat);
                    assert!(t - q <= bound, "waited {} > bound {bound}", t - q);
                }
            }
            if let Some(ho) = handoff.filter(|ho| ho.until_ns > t) {
                assert_eq!(ho.slot, h, "the lock went around a hand-off");
            }
            ps[h].queued = None;
            let release = t + holds[k % holds.len()];
            // Tries during the hold are refused: queue, poll again later.
            for i in (0..n).filter(|&i| i != h) {
                while ps[i].next_try < release {
                    let t = ps[i].next_try;
                    queue(&mut ps, i, t);
                    ps[i].next_try += poll;
                }
            }
            ps[h].next_try = release + think;
            let live: Vec<Waiter> = ps
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    p.queued.map(|(a, _)| Waiter {
                        slot: i,
                        arrival_ns: a,
                        asleep: true,
                    })
                })
                .collect();
            let r = on_release(release, &live, threshold);
            handoff = r.handoff;
            if let Some(w) = r.wake {
                ps[w].next_try = ps[w].next_try.min(release + wake_lat);
            }
            now = release;
        }
    }

    /// Contender `i` is refused at `t`: it queues, unless it already does.
    fn queue(ps: &mut [Proc], i: usize, t: u64) {
        if ps[i].queued.is_none() {
            let ahead = ps.iter().filter(|p| p.queued.is_some()).count() as u64;
            ps[i].queued = Some((t, ahead));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn unfairness_is_bounded(
            n in 2usize..12,
            holds in proptest::collection::vec(10_000u64..5_000_000, 1..6),
            threshold in prop_oneof![Just(0u64), 0u64..20_000_000, Just(u64::MAX / 4)],
            wake_lat in 5_000u64..1_500_000,
            poll in 1_000_000u64..20_000_000,
            think in 0u64..3_000_000,
        ) {
            simulate(n, &holds, threshold, wake_lat, poll, think);
        }
    }
}
