//! The two cases beside the task queue: many connections in one process (a
//! thread-pool server), and Django's deferred read-then-write transactions.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use serde_json::{json, Value};

use crate::common::{self, Journal, Mode};
use crate::{finish, settle, setup_db, spawn, Settings};

/// One thread-pool run: one process, many threads, one connection each.
pub struct Threads {
    pub journal: Journal,
    pub mode: Mode,
    pub threads: usize,
    pub per_thread: u64,
    pub secs: f64,
    pub busy: u64,
    /// Threads beyond the workers, the main thread and the monitor: the
    /// extension's.
    pub extra_threads: u64,
    /// The most `<db>.lock` descriptors the process had at once.
    pub lock_fds: u64,
    pub check: String,
}

/// Transactions per thread: DELETE commits cost several fsyncs each.
fn per_thread(j: Journal) -> u64 {
    match j {
        Journal::Wal => 20,
        Journal::Delete => 5,
    }
}

pub fn run_threads(s: &Settings, root: &Path, journal: Journal, mode: Mode) -> Threads {
    let dir = root.join(format!("threads-{}-{}", journal.name(), mode.name()));
    let db = setup_db(&dir, journal);
    settle();
    let n = per_thread(journal);
    let mut args: Vec<OsString> = vec![
        "--role=threads".into(),
        "--db".into(),
        db.clone().into(),
        format!("--mode={}", mode.name()).into(),
        format!("--journal={}", journal.name()).into(),
        format!("--threads={}", s.threads).into(),
        format!("--n={n}").into(),
    ];
    args.extend(s.worker_args());
    let out = finish(spawn(&args));
    let num = |k: &str| out[k].as_u64().unwrap_or(0);
    let rows: i64 = Connection::open(&db)
        .and_then(|c| c.query_row("SELECT count(*) FROM single", [], |r| r.get(0)))
        .unwrap_or(-1);
    let want = (s.threads as u64 * n) as i64;
    Threads {
        journal,
        mode,
        threads: s.threads,
        per_thread: n,
        secs: out["secs"].as_f64().unwrap_or(f64::NAN),
        busy: num("busy"),
        extra_threads: num("extra_threads"),
        lock_fds: num("lock_fds"),
        check: if rows == want {
            "ok".into()
        } else {
            format!("{rows} rows, expected {want}")
        },
    }
}

/// Deferred read-then-write transactions, pooled over repeats.
#[derive(Default)]
pub struct Deferred {
    pub secs: f64,
    pub attempts: u64,
    pub commits: u64,
    pub busy: u64,
}

impl Deferred {
    pub fn busy_rate(&self) -> f64 {
        self.busy as f64 / self.attempts.max(1) as f64
    }
}

/// Processes running deferred transactions at once.
pub const DEFERRED_PROCS: usize = 4;

pub fn run_deferred(s: &Settings, root: &Path, journal: Journal, mode: Mode, acc: &mut Deferred) {
    let dir = root.join(format!("deferred-{}-{}", journal.name(), mode.name()));
    let db = setup_db(&dir, journal);
    settle();
    let start_ns = common::now_ns() + Duration::from_millis(400).as_nanos();
    let ps: Vec<_> = (0..DEFERRED_PROCS)
        .map(|i| {
            let mut args: Vec<OsString> = vec![
                "--role=deferred".into(),
                "--db".into(),
                db.clone().into(),
                format!("--mode={}", mode.name()).into(),
                format!("--journal={}", journal.name()).into(),
                format!("--secs={}", s.secs).into(),
                format!("--start={start_ns}").into(),
                format!("--id={}", i + 1).into(),
            ];
            args.extend(s.worker_args());
            spawn(&args)
        })
        .collect();
    for o in ps.into_iter().map(finish) {
        let num = |k: &str| o[k].as_u64().unwrap_or(0);
        acc.attempts += num("attempts");
        acc.commits += num("commits");
        acc.busy += num("busy");
    }
    acc.secs += s.secs;
}

/// The markdown of both cases.
pub fn tables(
    md: &mut String,
    s: &Settings,
    threads: &[Threads],
    deferred: &std::collections::BTreeMap<(Journal, Mode), Deferred>,
) {
    if !threads.is_empty() {
        let _ = writeln!(
            md,
            "\n### Many connections in one process: {} threads, one connection each\n",
            s.threads
        );
        let _ = writeln!(md, "Each thread runs one-row `BEGIN IMMEDIATE; INSERT; COMMIT` transactions ({} per thread in WAL, {} in DELETE) with `busy_timeout` 30 s, all starting together. Errors: `SQLITE_BUSY` that reached a thread (retried). Extra threads: the most threads the process had beyond its workers, main thread and monitor. Lock descriptors: the most `<db>.lock` descriptors open at once (app-flock opens one per thread).\n", per_thread(Journal::Wal), per_thread(Journal::Delete));
        let _ = writeln!(
            md,
            "| journal | mode | seconds | errors | extra threads | lock descriptors | check |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---|");
        for t in threads {
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {} | {} | {} | {} |",
                t.journal.name(),
                t.mode.name(),
                t.secs,
                t.busy,
                t.extra_threads,
                t.lock_fds,
                t.check
            );
        }
    }
    if !deferred.is_empty() {
        let _ = writeln!(
            md,
            "\n### Deferred read-then-write transactions (Django's default): {} processes, {} s per run\n",
            DEFERRED_PROCS, s.secs
        );
        let _ = writeln!(md, "Each process loops `BEGIN; SELECT v FROM kv WHERE k = ?; UPDATE kv …; COMMIT` on one of {} rows, 1 ms apart. SQLite gives such an upgrade from read to write `SQLITE_BUSY` at once, without the busy handler, whenever the write lock is taken; the request then fails. BUSY rate: failed / attempted.\n", common::KV_ROWS);
        let _ = writeln!(
            md,
            "| journal | mode | commits/s | attempts | BUSY | BUSY rate |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|");
        for ((j, m), d) in deferred {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} | {} | {:.2}% |",
                j.name(),
                m.name(),
                d.commits as f64 / d.secs,
                d.attempts,
                d.busy,
                100.0 * d.busy_rate()
            );
        }
    }
}

/// Both cases for results.json.
pub fn json(
    threads: &[Threads],
    deferred: &std::collections::BTreeMap<(Journal, Mode), Deferred>,
) -> Value {
    json!({
        "threads": threads.iter().map(|t| json!({
            "journal": t.journal.name(), "mode": t.mode.name(), "threads": t.threads,
            "per_thread": t.per_thread, "secs": t.secs, "busy": t.busy,
            "extra_threads": t.extra_threads, "lock_fds": t.lock_fds, "check": t.check,
        })).collect::<Vec<_>>(),
        "deferred": deferred.iter().map(|((j, m), d)| json!({
            "journal": j.name(), "mode": m.name(), "processes": DEFERRED_PROCS, "secs": d.secs,
            "attempts": d.attempts, "commits": d.commits, "busy": d.busy, "busy_rate": d.busy_rate(),
        })).collect::<Vec<_>>(),
    })
}
