//! The edge between SQLite's C ints and the typed protocol: levels, shared
//! memory requests and result codes are converted here and nowhere else;
//! one step runs the protocol and acts on what it reports (log lines, the
//! timer, the refusal the busy handler's sleep may wait for).

use std::cell::RefCell;
use std::ffi::c_int;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use libsqlite3_sys as ffi;
use writelock_core::lockfile::LockFile;
use writelock_core::protocol::{
    Events, HeldLong, LockLevel, Protocol, Refusal, ShmMode, ShmOp, Slots,
};
use writelock_core::wait::{self, Handle, Run, State};

/// A handle's lock state, shared with the thread-local refusal record, the
/// busy handler's sleep and the process timer.
pub(crate) type Shared = Arc<Handle>;

/// `xLock`/`xUnlock` level → [`LockLevel`] (an unknown level is treated as
/// the next stronger known one, never weaker).
pub(crate) fn level(l: c_int) -> LockLevel {
    match l {
        ffi::SQLITE_LOCK_NONE => LockLevel::None,
        ffi::SQLITE_LOCK_SHARED => LockLevel::Shared,
        ffi::SQLITE_LOCK_RESERVED => LockLevel::Reserved,
        ffi::SQLITE_LOCK_PENDING => LockLevel::Pending,
        _ => LockLevel::Exclusive,
    }
}

/// `xShmLock(ofst, n, flags)` → [`ShmOp`] (slots clamped to SQLite's range).
pub(crate) fn shm_op(ofst: c_int, n: c_int, flags: c_int) -> ShmOp {
    let first = ofst.clamp(0, 31) as u8;
    let slots = Slots {
        first,
        count: n.clamp(0, 32 - first as c_int) as u8,
    };
    let mode = if flags & ffi::SQLITE_SHM_EXCLUSIVE != 0 {
        ShmMode::Exclusive
    } else {
        ShmMode::Shared
    };
    if flags & ffi::SQLITE_SHM_LOCK != 0 {
        ShmOp::Lock(slots, mode)
    } else {
        ShmOp::Unlock(slots, mode)
    }
}

/// An inner call's result code as the protocol takes it.
pub(crate) fn inner(rc: c_int) -> Result<(), c_int> {
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(rc)
    }
}

/// The one way back from the protocol to a result code; `io_err` is the
/// method's own I/O error code (`SQLITE_IOERR_LOCK`, `…_CHECKRESERVEDLOCK`…).
pub(crate) fn code(r: Result<(), Refusal<c_int>>, io_err: c_int) -> c_int {
    match r {
        Ok(()) => ffi::SQLITE_OK,
        Err(Refusal::Busy) => ffi::SQLITE_BUSY,
        Err(Refusal::Inner(rc)) => rc,
        Err(Refusal::LockFile { unusable: true }) => ffi::SQLITE_CANTOPEN,
        Err(Refusal::LockFile { unusable: false }) => io_err,
    }
}

thread_local! {
    /// The handle whose last escalation on this thread was refused, when,
    /// and what for: the busy handler's sleep that follows may wait for it.
    static WANTS_LOCK: RefCell<Option<(Weak<Handle>, Instant, Want)>> = const { RefCell::new(None) };
}

/// What a refused handle waits for in its busy handler's sleep.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// The flock (queue as a write intent).
    Flock,
    /// Other handles' read locks to go (a RESERVED writer wanting EXCLUSIVE).
    Readers,
    /// A writer's pending marker or EXCLUSIVE to go (a reader wanting SHARED).
    Writer,
}

/// A refusal older than this is not the one the current sleep is for.
const INTENT_FRESH: Duration = Duration::from_millis(50);

/// Run one protocol call on a handle and act on what it reports: remember a
/// refusal so the busy handler's sleep can wait for it, arm the intent
/// expiry and the long-hold watch, log what needs saying (who holds the
/// lock is looked up off the connection's path).
pub(crate) fn step<R>(
    m: &Shared,
    op: impl FnOnce(&mut Protocol<LockFile>) -> Result<R, Refusal<c_int>>,
) -> Result<R, Refusal<c_int>> {
    if let Some(parent) = m.inherited_from() {
        refuse_inherited(m, parent);
        return Err(Refusal::LockFile { unusable: false });
    }
    let mut st = m.lock();
    let r = op(&mut st.p);
    let want = match (
        st.p.take_intent_request(),
        st.p.take_exclusive_request(),
        st.p.take_shared_request(),
    ) {
        (true, _, _) => Some(Want::Flock),
        (_, true, _) => Some(Want::Readers),
        // A writer queued for the flock whose retry meets the committing
        // writer's pending marker keeps its place in the queue: it wants the
        // flock anyway, and the committer's release wakes the oldest waiter.
        (_, _, true) if st.queued() => Some(Want::Flock),
        (_, _, true) => Some(Want::Writer),
        _ => None,
    };
    if let (Some(want), Err(Refusal::Busy)) = (want, &r) {
        let w = Arc::downgrade(m);
        WANTS_LOCK.with(|c| *c.borrow_mut() = Some((w, Instant::now(), want)));
    }
    let events = st.p.take_events();
    if events.intent {
        wait::arm_intent_expiry(m, &mut st);
    }
    if events.acquired {
        wait::arm_hold_watch(m, &mut st, report_hold);
    }
    st.settle(m);
    if r.is_ok() && st.p.writing() {
        wait::forgive();
    }
    if events.acquired || events.busy != 0 {
        writelock_core::stats::GLOBAL.add(events.acquired as u64, events.busy as u64);
    }
    if !events.loggable() {
        return r;
    }
    let who = (events.refused && st.p.flock().page().is_none_or(|p| p.may_log_busy()))
        .then(|| st.p.flock().path().to_path_buf());
    let label = st.p.label.clone();
    drop(st);
    report(&events, &label, who);
    r
}

/// Log what a step reported.
fn report(events: &Events, label: &str, who: Option<std::path::PathBuf>) {
    if let Some(msg) = &events.failure {
        crate::log_error(ffi::SQLITE_IOERR_LOCK, msg);
    }
    if let Some(lock_path) = who {
        // Who holds it takes a read of /proc/locks: never on the
        // connection's path (a busy_timeout 0 refusal costs what stock's does).
        let label = label.to_string();
        writelock_core::timer::at(Instant::now(), move || {
            let who = writelock_core::holder::current_holder(&lock_path)
                .map(|h| {
                    let cmd = writelock_core::holder::cmdline(h.pid).unwrap_or_else(|| "?".into());
                    match h.held_for {
                        Some(d) => format!("pid {} ({cmd}) for {} ms", h.pid, d.as_millis()),
                        None => format!("pid {} ({cmd})", h.pid),
                    }
                })
                .unwrap_or_else(|| "another process".into());
            crate::log_error(
                ffi::SQLITE_BUSY,
                &format!("writelock: {label} is locked by {who}; returning SQLITE_BUSY"),
            );
        });
    }
    if let Some(long) = events.held_long {
        report_hold(label, long);
    }
}

/// Log a long hold (from the timer while it lasts, or at its release).
fn report_hold(label: &str, h: HeldLong) {
    let pid = writelock_core::process::pid();
    let msg = if h.still_held {
        format!(
            "writelock: process {pid} has held the write lock on {label} for {} ms, and still \
             holds it (warning threshold {} ms)",
            h.held.as_millis(),
            h.threshold.as_millis()
        )
    } else {
        format!(
            "writelock: process {pid} held the write lock on {label} for {} ms (warning \
             threshold {} ms)",
            h.held.as_millis(),
            h.threshold.as_millis()
        )
    };
    crate::log_error(ffi::SQLITE_WARNING, &msg);
}

/// A connection inherited through `fork()` and used in the child: refused,
/// without touching its state (which belongs to the parent).
fn refuse_inherited(m: &Shared, parent: u32) {
    if !m.child_warned.swap(true, Ordering::Relaxed) {
        crate::log_error(
            ffi::SQLITE_IOERR_LOCK,
            &format!(
                "writelock: connection opened in process {parent} used in process {} after \
                 fork(); its lock belongs to the parent — open a new connection in the child",
                writelock_core::process::pid()
            ),
        );
    }
}

/// The busy handler's sleep: when the refusal it sleeps for was ours, wait
/// for what was refused instead (see `writelock_core::wait`). `None`: not
/// ours, or waiting is not possible now — sleep as asked.
pub(crate) fn sleep_for_lock(us: c_int) -> Option<c_int> {
    let (w, at, want) = WANTS_LOCK.with(|c| c.borrow_mut().take())?;
    if at.elapsed() > INTENT_FRESH {
        return None;
    }
    let h = w.upgrade()?;
    if h.inherited_from().is_some() {
        return None;
    }
    let asked = Duration::from_micros(us.max(0) as u64);
    if wait::last_of_default_schedule(asked) {
        // No retry makes up for a sleep that ends early now: if SQLite's own
        // lock refuses the retry, busy_timeout would end early. Sleep it out.
        return None;
    }
    let start = Instant::now();
    let (deadline, owed) = {
        let mut st: std::sync::MutexGuard<'_, State> = h.lock();
        if !st.p.options.queue {
            return None;
        }
        let ahead = st.p.options.queue_ahead;
        let owed = wait::take_debt();
        (
            Run::deadline(&mut st.w.run, start, asked, ahead) + owed,
            owed,
        )
    };
    let granted = match want {
        Want::Flock => wait::for_flock(&h, deadline),
        Want::Readers => Some(wait::for_readers(&h, deadline)),
        Want::Writer => Some(wait::for_writer(&h, asked, deadline)),
    };
    let slept = start.elapsed();
    Run::ended(&mut h.lock().w.run, granted == Some(true), Instant::now());
    if granted == Some(true) {
        // Ended early: if SQLite's retry fails after all (its own lock held
        // by a process without the extension), the rest is still owed.
        wait::owe((asked + owed).saturating_sub(slept));
    }
    granted?;
    Some(slept.as_micros().min(c_int::MAX as u128) as c_int)
}

/// Not a refusal of ours: how long to sleep instead of `us` (plus what an
/// earlier sleep of this thread's run owes: it got the flock early, and
/// SQLite's own lock then refused — see `wait::owe`).
pub(crate) fn plain_sleep(us: c_int) -> c_int {
    let owed = wait::take_debt().as_micros().min(i32::MAX as u128) as c_int;
    us.saturating_add(owed)
}
