//! Waiting: where a refused connection waits for the lock, and how long.
//! Who gets it next is [`policy`]'s decision.
//!
//! SQLite's busy handler sleeps through the connection's VFS *after* the
//! connection released its locks; that sleep is the one safe place to wait
//! (a WAL connection keeps only its lifelong SHARED there). When the refusal
//! it sleeps for was ours, the sleep instead waits for the lock **on the
//! connection's own thread**:
//!
//! * it takes a waiter slot on the shared page (`<db>.lock-shm`) and sleeps on
//!   the slot's futex word; whoever of the extension releases the lock wakes
//!   the oldest sleeping waiter, and only it, and once that waiter has waited
//!   `writelock_handoff_ms` reserves the lock for it ([`policy`]);
//! * the oldest waiter also polls (every [`POLL_OLDEST`]) for holders that
//!   wake nobody: `flock(1)`, an application's own `flock`, a killed process;
//!   younger waiters look every [`POLL_OTHERS`] in case a wake-up was lost;
//! * when it gets the lock it holds it as a *write intent*: the retry that
//!   follows finds it held and proceeds. An intent nobody uses is released
//!   by the process timer after [`INTENT_TTL`], whatever took it.
//!
//! No helper thread, nothing blocked in `flock()`: a connection that closes
//! while it waits leaves nothing behind but its slot, which it frees.
//!
//! Readers held off by a committing writer (rollback modes), and a writer
//! waiting for readers to finish, wait at the page's *gate*: a futex word
//! that whoever lets go of a shadow lock or the pending marker bumps when
//! someone sleeps on it. They look at least every [`GATE_POLL`] too: a killed
//! process's locks go without a wake-up.
//!
//! How long: SQLite counts the *requested* sleeps against `busy_timeout`. A
//! run of sleeps for one refusal may wait until the run's start plus
//! everything requested so far plus `writelock_queue_ahead_ms` (see [`Run`]),
//! never less than asked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

pub mod policy;

use crate::lockfile::LockFile;
use crate::page::{mono_ns, Gate, Page};
use crate::protocol::{HeldLong, Protocol, INTENT_TTL};

/// Where a long hold is reported: the database's label, and the hold.
pub type HoldReport = fn(&str, HeldLong);

/// The oldest waiter polls for holders that wake nobody this often.
pub const POLL_OLDEST: Duration = Duration::from_millis(1);
/// Younger waiters look this often in case a wake-up went to nobody.
pub const POLL_OTHERS: Duration = Duration::from_millis(20);
/// Waiters at the gate look this often for releases that wake nobody (a
/// killed process's shadow locks, an older version of the extension).
pub const GATE_POLL: Duration = Duration::from_millis(2);
/// A slot stays live this long after its owner's sleep ended (the retry
/// between two sleeps of one run takes microseconds; a run that ended
/// leaves a slot that others skip after this).
const SLOT_GRACE: Duration = Duration::from_millis(50);

/// Sleeps closer together than this belong to one run.
const RUN_JOIN: Duration = Duration::from_millis(50);

/// One busy handler's run of sleeps for a refused lock, per handle.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    start: Instant,
    requested: Duration,
    last_asked: Duration,
    last_end: Instant,
}

impl Run {
    /// The deadline of a sleep of `asked` starting `now`, counted into
    /// `run`. SQLite counts the *requested* sleeps against `busy_timeout`,
    /// so a wait longer than asked stretches it; but its first steps are
    /// short (1, 2, 5, 10 ms …), and ending each on time means a retry that
    /// fails again while the queue moves. So a sleep may wait until the
    /// run's start plus everything requested so far plus `ahead`: the whole
    /// run never ends before `busy_timeout` and never exceeds it by more than
    /// `ahead` plus the last retry. The time SQLite's retries take in between
    /// comes out of that allowance, and once it is spent a sleep is shorter
    /// than asked — so retries on a loaded machine do not add up either.
    ///
    /// A run ends with a grant, after a pause of [`RUN_JOIN`], or when a sleep
    /// of SQLite's first step (1 ms) follows a longer one: SQLite's busy
    /// handler started over (a new statement, or the application's retry).
    pub fn deadline(
        run: &mut Option<Run>,
        now: Instant,
        asked: Duration,
        ahead: Duration,
    ) -> Instant {
        let first_step = asked <= Duration::from_millis(1);
        let mut r = match *run {
            Some(r)
                if now.saturating_duration_since(r.last_end) < RUN_JOIN
                    && !(first_step && r.last_asked > asked) =>
            {
                r
            }
            _ => Run {
                start: now,
                requested: Duration::ZERO,
                last_asked: Duration::ZERO,
                last_end: now,
            },
        };
        r.requested += asked;
        r.last_asked = asked;
        *run = Some(r);
        (r.start + r.requested + ahead).max(now)
    }

    /// A sleep ended at `now`; a granted lock ends the run.
    pub fn ended(run: &mut Option<Run>, granted: bool, now: Instant) {
        *run = run.filter(|_| !granted).map(|mut r| {
            r.last_end = now;
            r
        });
    }
}

thread_local! {
    /// Time SQLite counted against `busy_timeout` but this thread did not
    /// sleep (see [`owe`]), and when that was last added to.
    static DEBT: std::cell::Cell<(Duration, Option<Instant>)> =
        const { std::cell::Cell::new((Duration::ZERO, None)) };
}

/// A sleep that got its lock returned `early` before SQLite's requested
/// time. SQLite counts the whole request against `busy_timeout` anyway, so if
/// the retry fails after all (SQLite's own lock is held by a process without
/// the extension, say), the busy handler would run out of time early and
/// report `database is locked` before `busy_timeout`. The thread owes that
/// time: the next sleeps of the same run may wait that much longer.
pub fn owe(early: Duration) {
    DEBT.with(|d| {
        let (owed, _) = d.get();
        d.set((owed + early, Some(Instant::now())));
    });
}

/// What this thread owes now (see [`owe`]), clearing it; nothing if it was
/// owed longer than a pause between runs ago.
pub fn take_debt() -> Duration {
    DEBT.with(|d| {
        let (owed, at) = d.replace((Duration::ZERO, None));
        match at {
            Some(t) if t.elapsed() < RUN_JOIN => owed,
            _ => Duration::ZERO,
        }
    })
}

/// Whether a sleep of `asked` is the last one of SQLite's default busy
/// handler (`sqlite3_busy_timeout`): it sleeps 1, 2, 5, 10, 15, 20, 25, 25,
/// 25, 50, 50 ms, then 100 ms at a time, and cuts the last sleep short so
/// the total is exactly busy_timeout. A length off that list is such a last
/// sleep; no later sleep could repay time it did not sleep.
pub fn last_of_default_schedule(asked: Duration) -> bool {
    const STEPS_MS: [u64; 9] = [1, 2, 5, 10, 15, 20, 25, 50, 100];
    let us = asked.as_micros() as u64;
    !(us.is_multiple_of(1000) && STEPS_MS.contains(&(us / 1000)))
}

/// The write went through: nothing is owed any more.
pub fn forgive() {
    DEBT.with(|d| d.set((Duration::ZERO, None)));
}

/// A handle's waiting state, beside its protocol under the same mutex.
#[derive(Debug, Default)]
pub struct WaitState {
    /// The waiter slot on the shared page this handle owns, if any.
    slot: Option<usize>,
    /// The current run of busy-handler sleeps.
    pub run: Option<Run>,
    /// The long-hold watch is armed on the timer.
    hold_watch: bool,
    /// The intent expiry is armed on the timer.
    intent_watch: bool,
}

/// Everything of one main-database handle that needs its mutex.
pub struct State {
    pub p: Protocol<LockFile>,
    pub w: WaitState,
}

/// A main-database handle's lock state, shared between the connection's
/// thread, any thread whose sleep serves its refusal, and the timer.
pub struct Handle {
    m: Mutex<State>,
    /// Mirrors [`Protocol::checkpoint_unlocked`], so every write of the
    /// database file can ask without taking the mutex.
    pub ckpt_unlocked: AtomicBool,
    /// The process that opened it.
    pid: u32,
    /// Whether use in a forked child was logged already.
    pub child_warned: AtomicBool,
}

impl Handle {
    pub fn new(p: Protocol<LockFile>) -> Arc<Handle> {
        Arc::new(Handle {
            m: Mutex::new(State {
                p,
                w: WaitState::default(),
            }),
            ckpt_unlocked: AtomicBool::new(false),
            pid: crate::process::pid(),
            child_warned: AtomicBool::new(false),
        })
    }

    /// The process that opened the handle, when that is not this one (a
    /// connection inherited through `fork()`). Such a handle is never
    /// touched: its mutex may have been held by a thread of the parent at
    /// the fork, which does not exist here to release it.
    pub fn inherited_from(&self) -> Option<u32> {
        (crate::process::forked() && self.pid != crate::process::pid()).then_some(self.pid)
    }

    /// The state. A panic inside a lock call leaves it as it was between
    /// two field updates at worst; keep serving (and failing closed) rather
    /// than abort.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.m.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn page(&self) -> Option<Arc<Page>> {
        self.p.flock().page().cloned()
    }

    /// Whether the handle is queued for the flock (owns a waiter slot).
    pub fn queued(&self) -> bool {
        self.w.slot.is_some()
    }

    /// Give the waiter slot up (granted, holding, closing).
    pub fn free_slot(&mut self) {
        if let (Some(s), Some(page)) = (self.w.slot.take(), self.page()) {
            page.free_slot(s);
        }
        self.p.flock_mut().set_queue_slot(None);
    }

    /// Take a waiter slot, or keep the one owned, until `expires`.
    fn queue(&mut self, page: &Page, expires: u64) -> Option<usize> {
        match self.w.slot {
            Some(s) => page.refresh_slot(s, expires),
            None => {
                self.w.slot = page.claim_slot(expires);
                self.p.flock_mut().set_queue_slot(self.w.slot);
            }
        }
        self.w.slot
    }

    /// After every step: a holder owns no slot; keep the mirror in sync.
    pub fn settle(&mut self, h: &Handle) {
        if self.w.slot.is_some() && self.p.holds() {
            self.free_slot();
        }
        h.ckpt_unlocked
            .store(self.p.checkpoint_unlocked(), Ordering::Relaxed);
    }
}

/// Monotonic nanoseconds of `t` (the page's clock).
fn mono_of(t: Instant) -> u64 {
    let now = Instant::now();
    let base = mono_ns();
    if t >= now {
        base + (t - now).as_nanos() as u64
    } else {
        base.saturating_sub((now - t).as_nanos() as u64)
    }
}

/// Release the write intent of `h` once it is older than [`INTENT_TTL`],
/// on the process timer: enforced even when nothing runs on the connection
/// again. One job per handle at a time: intents are usually used within
/// microseconds, so the job re-arms itself only for an intent still young
/// when it runs (a connection taking many intents wakes the timer about
/// ten times a second, not once per intent).
pub fn arm_intent_expiry(h: &Arc<Handle>, st: &mut State) {
    let Some(since) = st.p.intent_since() else {
        return;
    };
    if st.w.intent_watch {
        return;
    }
    st.w.intent_watch = true;
    schedule_intent_expiry(Arc::downgrade(h), since);
}

fn schedule_intent_expiry(w: Weak<Handle>, since: Instant) {
    crate::timer::at(since + INTENT_TTL + Duration::from_millis(1), move || {
        let Some(h) = w.upgrade() else { return };
        let mut st = h.lock();
        st.p.expire_intent();
        st.settle(&h);
        match st.p.intent_since() {
            Some(next) => schedule_intent_expiry(w, next),
            None => st.w.intent_watch = false,
        }
    });
}

/// Watch a hold of `h` on the process timer, so a hold that passes
/// `writelock_hold_warn_ms` is warned about while it still lasts. One watch
/// per handle at a time: the first acquisition arms it, it re-arms itself
/// for the hold in progress, and lapses when the handle holds nothing.
pub fn arm_hold_watch(h: &Arc<Handle>, st: &mut State, report: HoldReport) {
    if st.w.hold_watch || st.p.options.hold_warn.is_zero() {
        return;
    }
    let Some(since) = st.p.held_since() else {
        return;
    };
    st.w.hold_watch = true;
    schedule_hold_watch(Arc::downgrade(h), since + st.p.options.hold_warn, report);
}

fn schedule_hold_watch(w: Weak<Handle>, due: Instant, report: HoldReport) {
    crate::timer::at(due, move || {
        let Some(h) = w.upgrade() else { return };
        let mut st = h.lock();
        let long = st.p.long_hold();
        let next = match (st.p.held_since(), st.p.options.hold_warn) {
            (_, warn) if warn.is_zero() => None,
            (Some(since), warn) if long.is_none() && since + warn > Instant::now() => {
                Some(since + warn)
            }
            _ => None,
        };
        st.w.hold_watch = next.is_some();
        let label = st.p.label.clone();
        drop(st);
        if let Some(long) = long {
            report(&label, long);
        }
        if let Some(due) = next {
            schedule_hold_watch(w, due, report);
        }
    });
}

/// Queue for the flock until `deadline`, holding it as a write intent when
/// granted. `None` when waiting is not safe or possible now (the caller then
/// behaves as without the queue), else whether the lock was granted.
pub fn for_flock(h: &Arc<Handle>, deadline: Instant) -> Option<bool> {
    let mut st = h.lock();
    if st.p.has_pure_intent() {
        return Some(true); // granted between the last attempt and this wait
    }
    if !st.p.may_wait() {
        return None;
    }
    if grant(h, &mut st)? {
        return Some(true);
    }
    let page = st.page();
    let expires = mono_of(deadline + SLOT_GRACE);
    let slot = page.as_ref().and_then(|p| st.queue(p, expires));
    st.p.counters.queued += 1;
    drop(st);
    loop {
        let now = Instant::now();
        if now >= deadline {
            // The slot keeps its place for the next sleep of the run, but is
            // not woken or handed the lock meanwhile.
            if let (Some(p), Some(s)) = (&page, slot) {
                p.away(s);
            }
            return Some(false);
        }
        let (woken, oldest) = match (&page, slot) {
            (Some(p), Some(s)) => {
                let woken = p.take_wake(s);
                (woken, woken || p.is_oldest(s))
            }
            _ => (false, true),
        };
        if !woken {
            let every = if oldest { POLL_OLDEST } else { POLL_OTHERS };
            let nap = (deadline - now).min(every);
            match (&page, slot) {
                (Some(p), Some(s)) => p.sleep_in_slot(s, nap),
                _ => std::thread::sleep(nap),
            }
            let woken_now = matches!((&page, slot), (Some(p), Some(s)) if p.take_wake(s));
            if !woken_now && !oldest {
                continue;
            }
        }
        let mut st = h.lock();
        if st.p.has_pure_intent() {
            st.free_slot();
            return Some(true);
        }
        if !st.p.may_wait() {
            if let (Some(p), Some(s)) = (&page, slot) {
                p.away(s);
            }
            return None;
        }
        if grant(h, &mut st)? {
            return Some(true);
        }
    }
}

/// One attempt at the lock as a write intent; `None` on an error (logged by
/// the protocol), `Some(true)` when taken (the slot is freed, the expiry
/// armed).
fn grant(h: &Arc<Handle>, st: &mut State) -> Option<bool> {
    match st.p.try_intent() {
        Ok(true) => {
            st.free_slot();
            st.p.counters.queue_granted += 1;
            arm_intent_expiry(h, st);
            Some(true)
        }
        Ok(false) => Some(false),
        Err(_) => None,
    }
}

/// Check `done` every `every` until it holds (`true`) or `deadline` passes
/// (`false`).
pub fn poll_until(deadline: Instant, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep((deadline - now).min(every));
    }
}

/// Wait at the page's gate until `done` holds (`true`) or `deadline` passes
/// (`false`): woken by every release of a shadow lock or pending marker while
/// someone waits, and looking every [`GATE_POLL`] regardless. Without a page,
/// polling only.
///
/// No release is missed: the waiter is counted at the gate before it reads
/// the generation and looks at the locks, and a releaser lets go of its lock
/// before it reads that count; so either the look sees the lock gone, or the
/// releaser sees the waiter and bumps the generation the waiter then sleeps
/// on (and the futex returns at once).
fn at_gate(
    page: Option<Arc<Page>>,
    g: Gate,
    deadline: Instant,
    mut done: impl FnMut() -> bool,
) -> bool {
    let Some(p) = page else {
        return poll_until(deadline, Duration::from_micros(200), done);
    };
    p.gate_enter(g);
    let r = loop {
        let gen = p.gate_generation(g);
        if done() {
            break true;
        }
        let now = Instant::now();
        if now >= deadline {
            break false;
        }
        p.gate_sleep(g, gen, (deadline - now).min(GATE_POLL));
    };
    p.gate_leave(g);
    r
}

/// A RESERVED writer whose EXCLUSIVE waits for readers: instead of sleeping
/// SQLite's whole backoff step, take the shadow write lock as soon as they
/// are gone (only the one flock holder can be here, and new readers are held
/// off by its pending marker), up to `deadline`. It holds RESERVED and the
/// flock meanwhile, exactly as in SQLite's own sleep. Whether they are gone.
pub fn for_readers(h: &Handle, deadline: Instant) -> bool {
    let page = h.lock().page();
    at_gate(page, Gate::Writer, deadline, || {
        h.lock().p.try_shadow_write()
    })
}

/// How long a reader held off by writers backs off as stock SQLite does
/// before it waits at the gate (see [`for_writer`]). Measured at 8 writers in
/// rollback mode: 10 ms let readers in so often that writers lost ~10% of
/// their throughput and deferred transactions saw more `SQLITE_BUSY`; 50 and
/// 100 ms starved the least-served process (fewest/most commits < 0.5).
pub const READER_PATIENCE: Duration = Duration::from_millis(30);

/// A reader held off by a writer that waits for or holds EXCLUSIVE (rollback
/// modes). For its first [`READER_PATIENCE`] it sleeps what SQLite asked, as
/// stock does: readers let in the moment a commit ends would all begin at
/// once, and in a deferred transaction every one of them but the first that
/// then wants to write gets `SQLITE_BUSY` (SQLite calls no busy handler for
/// that upgrade); SQLite's backoff spreads them out. After that it waits at
/// the readers' gate until the writer is done, up to `deadline`, so that
/// SQLite's 10–100 ms steps cannot miss every short gap between queued
/// writers' commits and starve it. The handle holds no lock meanwhile (its
/// SHARED was refused). Whether the writer is done.
pub fn for_writer(h: &Handle, asked: Duration, deadline: Instant) -> bool {
    let (page, age) = {
        let st = h.lock();
        (
            st.page(),
            st.w.run.map_or(Duration::ZERO, |r| r.start.elapsed()),
        )
    };
    if age < READER_PATIENCE {
        std::thread::sleep(asked.min(deadline.saturating_duration_since(Instant::now())));
        return !h.lock().p.read_blocked();
    }
    at_gate(page, Gate::Readers, deadline, || !h.lock().p.read_blocked())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// SQLite's default busy handler (sqliteDefaultBusyCallback) asks for
    /// these sleeps, then 100 ms each, until busy_timeout is used up.
    fn schedule(timeout_ms: u64) -> Vec<Duration> {
        let steps = [1u64, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100];
        let (mut out, mut total) = (Vec::new(), 0);
        for i in 0.. {
            let d = steps.get(i).copied().unwrap_or(100).min(timeout_ms - total);
            if d == 0 {
                break;
            }
            total += d;
            out.push(Duration::from_millis(d));
        }
        out
    }

    #[test]
    fn a_run_ends_after_busy_timeout_by_at_most_ahead_plus_the_last_retry() {
        for timeout in [1u64, 30, 300, 1000, 5000] {
            for ahead in [Duration::ZERO, 25 * MS, 100 * MS] {
                // Slow retries (a loaded machine) must not add up.
                for retry in [
                    Duration::from_micros(20),
                    Duration::from_micros(800),
                    8 * MS,
                ] {
                    let mut run = None;
                    let t0 = Instant::now();
                    let mut now = t0;
                    let sleeps = schedule(timeout);
                    let retries = retry * sleeps.len() as u32;
                    for asked in sleeps {
                        let end = Run::deadline(&mut run, now, asked, ahead);
                        assert!(end >= now, "never in the past");
                        now = end; // never granted: each sleep runs to its deadline
                        Run::ended(&mut run, false, now);
                        now += retry;
                    }
                    let waited = now - t0;
                    let t = Duration::from_millis(timeout);
                    // Never more than stock SQLite (which pays its retries on
                    // top of busy_timeout) plus the allowance…
                    assert!(
                        waited <= t + retries + ahead,
                        "{timeout} ms, ahead {ahead:?}, retry {retry:?}: {waited:?}"
                    );
                    // …and retries shorter than SQLite's shortest sleep come
                    // out of the sleeps that follow them.
                    if retry <= MS {
                        assert!(
                            waited <= t + ahead + retry,
                            "{timeout} ms, ahead {ahead:?}, retry {retry:?}: {waited:?}"
                        );
                    }
                    assert!(
                        waited >= Duration::from_millis(timeout),
                        "never before busy_timeout: {timeout} ms: {waited:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_default_handlers_last_sleep_is_known_by_its_length() {
        let lasts = |timeout: u64| -> Vec<bool> {
            schedule(timeout)
                .into_iter()
                .map(last_of_default_schedule)
                .collect()
        };
        // 1000 ms: 328 ms of steps, six of 100 ms, then 72 ms.
        let l = lasts(1000);
        assert_eq!(l.iter().filter(|&&x| x).count(), 1);
        assert!(*l.last().unwrap());
        assert!(
            lasts(5000).last().unwrap(),
            "5000 - 328 = 4672: 46 x 100, then 72"
        );
        assert!(
            !lasts(928).iter().any(|&x| x),
            "a timeout on a step boundary: none known"
        );
    }

    #[test]
    fn sqlite_starting_over_starts_a_new_run() {
        let mut run = None;
        let t0 = Instant::now();
        let mut now = t0;
        for asked in schedule(300) {
            now = Run::deadline(&mut run, now, asked, 25 * MS);
            Run::ended(&mut run, false, now);
        }
        // The application retries at once: SQLite asks for 1 ms again.
        let again = Run::deadline(&mut run, now, MS, 25 * MS);
        assert_eq!(again, now + 26 * MS, "a fresh allowance, not the old run's");
        // A custom busy handler that always asks for 1 ms stays in one run.
        let mut run = None;
        let mut now = t0;
        for _ in 0..10 {
            now = Run::deadline(&mut run, now, MS, 25 * MS);
            Run::ended(&mut run, false, now);
        }
        assert!(now - t0 <= 10 * MS + 25 * MS);
    }

    #[test]
    fn a_grant_ends_the_run_and_a_later_sleep_starts_a_new_one() {
        let mut run = None;
        let t0 = Instant::now();
        assert_eq!(Run::deadline(&mut run, t0, MS, 25 * MS), t0 + 26 * MS);
        Run::ended(&mut run, true, t0 + 3 * MS);
        assert!(run.is_none());
        let t1 = t0 + 4 * MS;
        assert_eq!(Run::deadline(&mut run, t1, MS, 25 * MS), t1 + 26 * MS);
        // Long after a run's last sleep, a new run starts too.
        Run::ended(&mut run, false, t1 + 26 * MS);
        let t2 = t1 + 26 * MS + RUN_JOIN;
        assert_eq!(Run::deadline(&mut run, t2, 2 * MS, 25 * MS), t2 + 27 * MS);
    }
}
