//! One process of the torture suite (`tests/torture.rs` starts many of them).
//!
//! ```text
//! torture_worker ROLE --db PATH [--dir DIR] [--mode writelock|stock|appflock]
//!                [--secs F] [--seed N] [--id N] [--probe 1|0] [--busy MS]
//! ```
//!
//! `torture_worker --help` lists the flags and their defaults.
//!
//! Roles:
//! * `writer` — task-queue write transactions (claim a task, insert a run and
//!   a few events, bump this worker's counter), reconnecting every ~20, with
//!   think time between transactions (so the writer lock is sometimes free).
//! * `reader` — read transactions joining runs, events and tasks, one result
//!   streamed row by row with pauses (a writer can change pages under it).
//! * `maintenance` — VACUUM, large UPDATE/DELETE, `wal_checkpoint(TRUNCATE)`.
//! * `crasher` — small and large write transactions in a tight loop until
//!   the harness SIGKILLs it (crash-safety test).
//! * `oneshot` — one write with `busy_timeout` 1 s, timed (no stuck lock).
//!
//! Modes: `writelock` loads the extension and opens through VFS `writelock`;
//! `stock` opens through the plain `unix` VFS; `appflock` is stock plus the
//! usual application-level fix: `flock(LOCK_EX)` on `<db>.lock` taken before
//! BEGIN and released after COMMIT/ROLLBACK, around every write.
//!
//! The "app bug" probe (`--probe 1`, the default): `File::open(db)`, read 100
//! bytes, drop. Closing that descriptor drops every POSIX lock this process
//! holds on the database file, SQLite's included. Writers probe after each
//! commit and between statements, the reader between statements, maintenance
//! in a loop on a second thread while VACUUM runs.
//!
//! Witnesses written for the harness:
//! * `<dir>/overlap.log`: a writer appends `+id` (O_APPEND, one write) right
//!   after the first write statement of a transaction succeeded, and `-id`
//!   just before it issues COMMIT (or gives up). While between the two, it
//!   holds the write lock as far as SQLite believes; replaying the log counts
//!   how many writers believed so at once. Ending the window *before* COMMIT
//!   keeps it sound: after COMMIT the lock is already released and the next
//!   writer may legitimately start before we could log `-id`.
//! * `<dir>/committed.<id>`: one tag per line, appended after COMMIT returned
//!   OK. The harness checks every tag is in `runs` and that `counters` holds
//!   as many increments as the log has lines.
//! * stdout: one JSON line with counts (errors by message kind).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{ArgAction, Parser, ValueEnum};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use writelock_tests::Rng;

/// How the worker opens the database.
#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum AppMode {
    /// Load the extension and open through VFS `writelock`.
    Writelock,
    /// The plain `unix` VFS.
    Stock,
    /// `unix` plus flock(LOCK_EX) on `<db>.lock` around every write.
    #[value(name = "appflock")]
    AppFlock,
}

/// What the worker does (see the top of this file).
#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Role {
    /// Task-queue write transactions with think time, reconnecting now and then.
    Writer,
    /// Read transactions, one result streamed row by row with pauses.
    Reader,
    /// VACUUM, large UPDATE/DELETE, wal_checkpoint(TRUNCATE).
    Maintenance,
    /// Write transactions in a tight loop until SIGKILLed.
    Crasher,
    /// One write with busy_timeout 1 s, timed.
    Oneshot,
}

impl Role {
    /// The name on the command line, also the `role` of the JSON line.
    fn name(self) -> String {
        self.to_possible_value()
            .expect("no role is skipped")
            .get_name()
            .to_string()
    }
}

/// One process of the torture suite (tests/torture.rs starts many of them).
#[derive(Parser, Debug)]
#[command(name = "torture_worker")]
struct Args {
    /// What this process does.
    #[arg(value_enum)]
    role: Role,
    /// The database.
    #[arg(long)]
    db: PathBuf,
    /// Where the witness files go (default: the database's directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// How to open the database.
    #[arg(long, value_enum, default_value_t = AppMode::Writelock)]
    mode: AppMode,
    /// Seconds to run (every role but oneshot).
    #[arg(long, default_value_t = 5.0, value_parser = seconds)]
    secs: f64,
    /// Seed of this process's random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// This process's number: in rows, in witness file names.
    #[arg(long, default_value_t = 0)]
    id: u32,
    /// Run the "app bug" (open, read and close the database file).
    #[arg(
        long,
        default_value = "1",
        action = ArgAction::Set,
        value_parser = PossibleValuesParser::new(["1", "0"]).map(|p| p == "1")
    )]
    probe: bool,
    /// busy_timeout, ms.
    #[arg(long = "busy", value_name = "MS", default_value_t = 5000)]
    busy_ms: u64,
}

/// Seconds: a finite number, 0 or more (`Duration::from_secs_f64` panics
/// on anything else).
fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        Ok(_) => Err("must be a number of seconds, 0 or more".into()),
        Err(e) => Err(e.to_string()),
    }
}

struct Cfg {
    role: Role,
    db: PathBuf,
    dir: PathBuf,
    mode: AppMode,
    secs: f64,
    seed: u64,
    id: u32,
    probe: bool,
    busy: Duration,
}

fn parse_args() -> Cfg {
    let a = Args::parse();
    Cfg {
        role: a.role,
        dir: a.dir.unwrap_or_else(|| {
            let parent = a.db.parent().unwrap_or(Path::new("."));
            if parent.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                parent.to_path_buf()
            }
        }),
        db: a.db,
        mode: a.mode,
        secs: a.secs,
        seed: a.seed,
        id: a.id,
        probe: a.probe,
        busy: Duration::from_millis(a.busy_ms),
    }
}

#[derive(Default)]
struct Stats {
    attempts: u64,
    commits: u64,
    probes: u64,
    reads: u64,
    reconnects: u64,
    vacuums: u64,
    checkpoints: u64,
    malformed: u64,
    errors: BTreeMap<String, u64>,
}

impl Stats {
    fn error(&mut self, e: &rusqlite::Error) {
        let k = kind(e);
        if k.contains("malformed") {
            self.malformed += 1;
        }
        *self.errors.entry(k).or_default() += 1;
    }

    fn json(&self, cfg: &Cfg, extra: serde_json::Value) -> String {
        let mut v = serde_json::json!({
            "role": cfg.role.name(),
            "id": cfg.id,
            "attempts": self.attempts,
            "commits": self.commits,
            "probes": self.probes,
            "reads": self.reads,
            "reconnects": self.reconnects,
            "vacuums": self.vacuums,
            "checkpoints": self.checkpoints,
            "malformed": self.malformed,
            "errors": self.errors,
        });
        if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        v.to_string()
    }
}

/// An error's kind: SQLite's message with numbers blanked, so that
/// "database is locked", "database disk image is malformed", "disk I/O
/// error", constraint failures, … are counted separately.
fn kind(e: &rusqlite::Error) -> String {
    let (msg, code) = match e {
        rusqlite::Error::SqliteFailure(f, m) => (
            m.clone().unwrap_or_else(|| f.to_string()),
            format!(" ({})", f.extended_code),
        ),
        other => (other.to_string(), String::new()),
    };
    let mut out = String::new();
    let mut last_digit = false;
    for c in msg.chars().take(100) {
        if c.is_ascii_digit() {
            if !last_digit {
                out.push('N');
            }
            last_digit = true;
        } else {
            out.push(c);
            last_digit = false;
        }
    }
    out + &code
}

/// Whether the connection is worth keeping after this error.
fn poisoned(e: &rusqlite::Error) -> bool {
    let k = kind(e);
    !(k.contains("database is locked") || k.contains("constraint"))
}

/// The app bug: open the database file, read 100 bytes, close it.
fn probe(db: &Path) {
    if let Ok(mut f) = File::open(db) {
        let mut buf = [0u8; 100];
        let _ = f.read(&mut buf);
    }
}

use writelock_core::lockfile::lock_path_for as lock_path;

fn connect(cfg: &Cfg, busy: Duration) -> rusqlite::Result<Connection> {
    let vfs = match cfg.mode {
        AppMode::Writelock => {
            writelock_tests::load_extension();
            "writelock"
        }
        AppMode::Stock | AppMode::AppFlock => "unix",
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI;
    let c = Connection::open_with_flags_and_vfs(&cfg.db, flags, vfs)?;
    c.busy_timeout(busy)?;
    Ok(c)
}

/// Connect, retrying (and counting failures) until the deadline.
fn connect_retry(cfg: &Cfg, st: &mut Stats, deadline: Instant) -> Option<Connection> {
    loop {
        match connect(cfg, cfg.busy) {
            Ok(c) => return Some(c),
            Err(e) => st.error(&e),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A connection dropped and reopened every `lo..=hi` transactions, as fleets
/// of short-lived workers do.
struct Reconnecting {
    conn: Option<Connection>,
    left: u64,
    lo: u64,
    hi: u64,
}

impl Reconnecting {
    fn new(lo: u64, hi: u64) -> Self {
        Reconnecting {
            conn: None,
            left: 0,
            lo,
            hi,
        }
    }

    /// The connection for the next transaction; `None` when none could be
    /// opened before the deadline.
    fn next(
        &mut self,
        cfg: &Cfg,
        st: &mut Stats,
        rng: &mut Rng,
        deadline: Instant,
    ) -> Option<&Connection> {
        if self.left == 0 {
            if self.conn.take().is_some() {
                st.reconnects += 1;
            }
            self.left = rng.range(self.lo, self.hi);
        }
        if self.conn.is_none() {
            self.conn = connect_retry(cfg, st, deadline);
        }
        let c = self.conn.as_ref()?;
        self.left -= 1;
        Some(c)
    }

    /// Forget a connection that an error left unusable.
    fn drop_conn(&mut self) {
        self.conn = None;
    }
}

/// The application-level fix (mode `appflock`): an exclusive flock on
/// `<db>.lock`, held across a whole write transaction.
struct AppLock(Option<File>);

impl AppLock {
    fn new(cfg: &Cfg) -> AppLock {
        AppLock((cfg.mode == AppMode::AppFlock).then(|| {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(lock_path(&cfg.db))
                .expect("open <db>.lock")
        }))
    }
    fn hold(&self) -> AppLockGuard<'_> {
        if let Some(f) = &self.0 {
            f.lock().expect("flock(LOCK_EX) on <db>.lock");
        }
        AppLockGuard(self)
    }
}

struct AppLockGuard<'a>(&'a AppLock);

impl Drop for AppLockGuard<'_> {
    fn drop(&mut self) {
        if let Some(f) = &self.0 .0 {
            let _ = f.unlock();
        }
    }
}

/// The out-of-band overlap log (see the module docs).
struct Witness {
    log: File,
    id: u32,
}

impl Witness {
    fn new(cfg: &Cfg) -> Witness {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(cfg.dir.join("overlap.log"))
            .expect("open overlap.log");
        Witness { log, id: cfg.id }
    }
    /// `+id` now, `-id` when the guard is dropped (before COMMIT, or on error).
    fn enter(&self) -> WitnessGuard<'_> {
        (&self.log)
            .write_all(format!("+{}\n", self.id).as_bytes())
            .unwrap();
        WitnessGuard(self)
    }
}

struct WitnessGuard<'a>(&'a Witness);

impl Drop for WitnessGuard<'_> {
    fn drop(&mut self) {
        let w = self.0;
        (&w.log)
            .write_all(format!("-{}\n", w.id).as_bytes())
            .unwrap();
    }
}

fn append_line(f: &File, line: &str) {
    let mut f = f;
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
}

fn committed_log(cfg: &Cfg, name: &str) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.dir.join(format!("committed.{name}")))
        .expect("open committed log")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn rollback(c: &Connection) {
    let _ = c.execute_batch("ROLLBACK");
}

// ---------------------------------------------------------------- writer

/// One task-queue write transaction. The witness window runs from the first
/// successful write to just before COMMIT.
fn writer_txn(
    c: &Connection,
    cfg: &Cfg,
    rng: &mut Rng,
    st: &mut Stats,
    w: &Witness,
    tag: &str,
) -> rusqlite::Result<()> {
    let begin = if rng.chance(70) {
        "BEGIN IMMEDIATE"
    } else {
        "BEGIN"
    };
    c.execute_batch(begin)?;
    let now = now_ms();
    let claimed: Option<i64> = c
        .query_row(
            "UPDATE tasks SET status='running', worker=?1, updated=?2 \
             WHERE id = (SELECT id FROM tasks WHERE status='todo' ORDER BY updated LIMIT 1) \
             RETURNING id",
            params![cfg.id, now],
            |r| r.get(0),
        )
        .optional()?;
    let guard = w.enter();
    if cfg.probe && rng.chance(60) {
        probe(&cfg.db);
        st.probes += 1;
    }
    let task_id = match claimed {
        Some(t) => t,
        None => {
            c.execute(
                "INSERT INTO tasks(status, worker, updated, payload) \
                 VALUES ('running', ?1, ?2, hex(randomblob(100)))",
                params![cfg.id, now],
            )?;
            c.last_insert_rowid()
        }
    };
    c.execute(
        "INSERT INTO runs(task_id, worker, tag, n, status, note) \
         VALUES (?1, ?2, ?3, ?4, 'done', hex(randomblob(16)))",
        params![task_id, cfg.id, tag, rng.below(1000) as i64],
    )?;
    let run_id = c.last_insert_rowid();
    for k in 0..rng.range(2, 6) {
        if cfg.probe && k == 1 && rng.chance(30) {
            probe(&cfg.db);
            st.probes += 1;
        }
        c.execute(
            "INSERT INTO events(run_id, kind, payload) VALUES (?1, ?2, hex(randomblob(?3)))",
            params![
                run_id,
                ["start", "log", "progress", "done"][k as usize % 4],
                rng.range(50, 700) as i64
            ],
        )?;
    }
    c.execute(
        "UPDATE tasks SET status='done', updated=?2 WHERE id=?1",
        params![task_id, now_ms()],
    )?;
    for _ in 0..2 {
        c.execute(
            "INSERT INTO tasks(status, worker, updated, payload) \
             VALUES ('todo', NULL, ?1, hex(randomblob(?2)))",
            params![now_ms(), rng.range(50, 300) as i64],
        )?;
    }
    let n = c.execute(
        "UPDATE counters SET n = n + 1 WHERE worker = ?1",
        params![cfg.id],
    )?;
    if n != 1 {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_NOTFOUND),
            Some(format!("counter row for worker {} missing", cfg.id)),
        ));
    }
    drop(guard);
    c.execute_batch("COMMIT")
}

fn writer(cfg: &Cfg) -> String {
    let deadline = Instant::now() + Duration::from_secs_f64(cfg.secs);
    let mut rng = Rng(cfg.seed);
    let mut st = Stats::default();
    let w = Witness::new(cfg);
    let app = AppLock::new(cfg);
    let log = committed_log(cfg, &cfg.id.to_string());
    let mut conns = Reconnecting::new(10, 30);
    let mut seq = 0u64;
    while Instant::now() < deadline {
        let Some(c) = conns.next(cfg, &mut st, &mut rng, deadline) else {
            break;
        };
        seq += 1;
        st.attempts += 1;
        let tag = format!("w{}-{seq}", cfg.id);
        let r = {
            let _app = app.hold();
            let r = writer_txn(c, cfg, &mut rng, &mut st, &w, &tag);
            if r.is_err() {
                rollback(c);
            }
            r
        };
        match r {
            Ok(()) => {
                st.commits += 1;
                append_line(&log, &tag);
                if cfg.probe {
                    probe(&cfg.db);
                    st.probes += 1;
                }
            }
            Err(e) => {
                st.error(&e);
                if poisoned(&e) {
                    conns.drop_conn();
                }
            }
        }
        // Think time: workers do other things between transactions, so the
        // writer lock is sometimes free (and a closing connection may find
        // itself "last").
        let pause = match rng.below(100) {
            0..=59 => rng.range(0, 1000),
            60..=94 => rng.range(1000, 5000),
            _ => rng.range(10_000, 30_000),
        };
        std::thread::sleep(Duration::from_micros(pause));
    }
    st.json(cfg, serde_json::json!({}))
}

// ---------------------------------------------------------------- reader

/// A read transaction the way applications write them: an aggregate, then a
/// result streamed row by row with work (and the app bug) between rows, then
/// more queries. Once the probe has dropped this process's SHARED lock, a
/// writer may rewrite pages under the open cursor.
fn reader_txn(c: &Connection, cfg: &Cfg, rng: &mut Rng, st: &mut Stats) -> rusqlite::Result<()> {
    c.execute_batch("BEGIN")?;
    let worker = rng.range(1, 6) as i64;
    let _: (i64, Option<i64>) = c.query_row(
        "SELECT count(*), sum(length(e.payload)) FROM runs r JOIN events e ON e.run_id = r.id \
         WHERE r.worker = ?1",
        [worker],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    st.reads += 1;
    if cfg.probe && rng.chance(60) {
        probe(&cfg.db);
        st.probes += 1;
    }
    let mut s = c.prepare_cached(
        "SELECT r.tag, t.status, e.kind, length(e.payload) FROM runs r \
         JOIN tasks t ON t.id = r.task_id JOIN events e ON e.run_id = r.id \
         WHERE r.status = 'done' AND r.worker = ?1 ORDER BY r.id DESC LIMIT 400",
    )?;
    let mut rows = s.query([worker])?;
    let mut i = 0u64;
    while let Some(row) = rows.next()? {
        let _: String = row.get(0)?;
        i += 1;
        if cfg.probe && i == 2 {
            probe(&cfg.db);
            st.probes += 1;
        }
        if i.is_multiple_of(40) {
            std::thread::sleep(Duration::from_micros(rng.range(50, 400)));
        }
    }
    drop(rows);
    st.reads += 1;
    let _: i64 = c.query_row(
        "SELECT count(*) FROM tasks WHERE status = 'todo'",
        [],
        |r| r.get(0),
    )?;
    let _: Option<i64> = c.query_row("SELECT sum(n) FROM counters", [], |r| r.get(0))?;
    let _: i64 = c.query_row("SELECT count(*) FROM events WHERE kind = 'done'", [], |r| {
        r.get(0)
    })?;
    st.reads += 1;
    c.execute_batch("COMMIT")
}

fn reader(cfg: &Cfg) -> String {
    let deadline = Instant::now() + Duration::from_secs_f64(cfg.secs);
    let mut rng = Rng(cfg.seed);
    let mut st = Stats::default();
    let mut conns = Reconnecting::new(20, 60);
    while Instant::now() < deadline {
        let Some(c) = conns.next(cfg, &mut st, &mut rng, deadline) else {
            break;
        };
        st.attempts += 1;
        match reader_txn(c, cfg, &mut rng, &mut st) {
            Ok(()) => st.commits += 1,
            Err(e) => {
                rollback(c);
                st.error(&e);
                if poisoned(&e) {
                    conns.drop_conn();
                }
            }
        }
        if cfg.probe && rng.chance(50) {
            probe(&cfg.db);
            st.probes += 1;
        }
        std::thread::sleep(Duration::from_micros(rng.range(0, 4000)));
    }
    st.json(cfg, serde_json::json!({}))
}

// ---------------------------------------------------------------- maintenance

/// VACUUM while a second thread runs the app bug in a loop.
fn vacuum(c: &Connection, cfg: &Cfg) -> (rusqlite::Result<()>, u64) {
    let done = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(AtomicU64::new(0));
    let t = cfg.probe.then(|| {
        let (done, probes, db) = (done.clone(), probes.clone(), cfg.db.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                probe(&db);
                probes.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(300));
            }
        })
    });
    let r = c.execute_batch("VACUUM");
    done.store(true, Ordering::Relaxed);
    if let Some(t) = t {
        t.join().unwrap();
    }
    (r, probes.load(Ordering::Relaxed))
}

fn big_write(
    c: &Connection,
    cfg: &Cfg,
    rng: &mut Rng,
    st: &mut Stats,
    w: &Witness,
    delete: bool,
) -> rusqlite::Result<()> {
    c.execute_batch("BEGIN IMMEDIATE")?;
    let guard;
    if delete {
        c.execute(
            "DELETE FROM events WHERE id < (SELECT max(id) FROM events) - 1500",
            [],
        )?;
        guard = w.enter();
        if cfg.probe {
            probe(&cfg.db);
            st.probes += 1;
        }
        c.execute(
            "DELETE FROM tasks WHERE status = 'done' AND id < (SELECT max(id) FROM tasks) - 1500 \
             AND id NOT IN (SELECT task_id FROM runs ORDER BY id DESC LIMIT 200)",
            [],
        )?;
    } else {
        let m = rng.below(3) as i64;
        c.execute(
            "UPDATE tasks SET updated = updated + 1, payload = hex(randomblob(120)) WHERE id % 3 = ?1",
            [m],
        )?;
        guard = w.enter();
        if cfg.probe {
            probe(&cfg.db);
            st.probes += 1;
        }
        c.execute(
            "UPDATE runs SET note = hex(randomblob(24)) WHERE id % 4 = ?1",
            [m],
        )?;
    }
    drop(guard);
    c.execute_batch("COMMIT")
}

fn maintenance(cfg: &Cfg) -> String {
    let deadline = Instant::now() + Duration::from_secs_f64(cfg.secs);
    let mut rng = Rng(cfg.seed);
    let mut st = Stats::default();
    let w = Witness::new(cfg);
    let app = AppLock::new(cfg);
    let mut conn: Option<Connection> = None;
    let mut step = 0u64;
    while Instant::now() < deadline {
        if conn.is_none() {
            conn = connect_retry(cfg, &mut st, deadline);
        }
        let Some(c) = conn.as_ref() else { break };
        let wal = c
            .query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0))
            .map(|m| m.eq_ignore_ascii_case("wal"))
            .unwrap_or(false);
        step += 1;
        st.attempts += 1;
        let r = match step % 4 {
            0 => {
                let _app = app.hold();
                let (r, n) = vacuum(c, cfg);
                st.probes += n;
                if r.is_ok() {
                    st.vacuums += 1;
                }
                r
            }
            1 | 3 => {
                let _app = app.hold();
                let r = big_write(c, cfg, &mut rng, &mut st, &w, step % 4 == 3);
                if r.is_err() {
                    rollback(c);
                }
                r
            }
            _ => {
                if wal {
                    let _app = app.hold();
                    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                        r.get::<_, i64>(0)
                    })
                    .map(|busy| {
                        if busy == 0 {
                            st.checkpoints += 1;
                        }
                    })
                } else {
                    Ok(())
                }
            }
        };
        match r {
            Ok(()) => st.commits += 1,
            Err(e) => {
                st.error(&e);
                if poisoned(&e) {
                    conn = None;
                }
            }
        }
        if rng.chance(20) && conn.take().is_some() {
            st.reconnects += 1;
        }
        std::thread::sleep(Duration::from_millis(rng.range(50, 250)));
    }
    st.json(cfg, serde_json::json!({}))
}

// ---------------------------------------------------------------- crash test

/// Write transactions in a tight loop until SIGKILLed: small ones, large ones
/// that spill the cache (the db file is written before COMMIT), pauses
/// between statements. Each committed tag is logged after COMMIT returns.
///
/// `<dir>/phase.c<id>` holds one byte, rewritten at each step, so the harness
/// can tell where the kill landed: `o` opening, `w` waiting for the write
/// lock (BEGIN IMMEDIATE), `t` inside the transaction, `c` inside COMMIT,
/// `l` COMMIT returned but not yet logged, `i` between transactions.
fn crasher(cfg: &Cfg) -> String {
    use std::os::unix::fs::FileExt;
    let phase_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cfg.dir.join(format!("phase.c{}", cfg.id)))
        .expect("open phase file");
    let phase = |b: u8| phase_file.write_all_at(&[b], 0).unwrap();
    phase(b'o');
    let deadline = Instant::now() + Duration::from_secs_f64(cfg.secs);
    let mut rng = Rng(cfg.seed);
    let mut st = Stats::default();
    let log = committed_log(cfg, &format!("c{}", cfg.id));
    let c = connect(cfg, cfg.busy).expect("open");
    c.execute_batch("PRAGMA cache_size = 10").unwrap();
    let mut seq = 0u64;
    while Instant::now() < deadline {
        seq += 1;
        st.attempts += 1;
        let tag = format!("c{}-{seq}", cfg.id);
        let r = (|| -> rusqlite::Result<()> {
            phase(b'w');
            c.execute_batch("BEGIN IMMEDIATE")?;
            phase(b't');
            c.execute(
                "INSERT INTO crash(tag, payload) VALUES (?1, randomblob(?2))",
                params![tag, rng.range(100, 3000) as i64],
            )?;
            match rng.below(4) {
                0 => {
                    // Large: spills, so pages hit the db file mid-transaction.
                    c.execute(
                        "INSERT INTO filler(x) SELECT randomblob(900) FROM \
                         (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < ?1) SELECT i FROM n)",
                        [rng.range(20, 200) as i64],
                    )?;
                }
                1 => {
                    c.execute(
                        "DELETE FROM filler WHERE rowid IN (SELECT rowid FROM filler ORDER BY random() LIMIT ?1)",
                        [rng.range(10, 150) as i64],
                    )?;
                }
                2 => std::thread::sleep(Duration::from_micros(rng.range(100, 3000))),
                _ => {}
            }
            c.execute("UPDATE total SET n = n + 1", [])?;
            phase(b'c');
            c.execute_batch("COMMIT")?;
            phase(b'l');
            Ok(())
        })();
        match r {
            Ok(()) => {
                st.commits += 1;
                append_line(&log, &tag);
            }
            Err(e) => {
                rollback(&c);
                st.error(&e);
            }
        }
        phase(b'i');
    }
    st.json(cfg, serde_json::json!({}))
}

/// One write with `busy_timeout` 1 s, timed from open to COMMIT.
fn oneshot(cfg: &Cfg) -> String {
    let mut st = Stats::default();
    let t0 = Instant::now();
    let log = committed_log(cfg, "oneshot");
    let tag = format!("fresh-{}", cfg.id);
    let r = (|| -> rusqlite::Result<()> {
        let c = connect(cfg, Duration::from_secs(1))?;
        c.execute_batch("BEGIN IMMEDIATE")?;
        c.execute("INSERT INTO crash(tag, payload) VALUES (?1, x'00')", [&tag])?;
        c.execute("UPDATE total SET n = n + 1", [])?;
        c.execute_batch("COMMIT")
    })();
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let ok = match &r {
        Ok(()) => {
            st.commits += 1;
            append_line(&log, &tag);
            true
        }
        Err(e) => {
            st.error(e);
            false
        }
    };
    st.json(cfg, serde_json::json!({ "ok": ok, "ms": ms }))
}

fn main() {
    let cfg = parse_args();
    let out = match cfg.role {
        Role::Writer => writer(&cfg),
        Role::Reader => reader(&cfg),
        Role::Maintenance => maintenance(&cfg),
        Role::Crasher => crasher(&cfg),
        Role::Oneshot => oneshot(&cfg),
    };
    println!("{out}");
}
