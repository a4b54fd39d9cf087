//! The worker processes: `writelock-bench worker --role ROLE --db PATH …`
//! (the driver starts them; `writelock-bench worker --help` lists the flags).
//!
//! Roles:
//! * `single` — one process, `--n` one-row INSERT transactions per mode (after a
//!   short warm-up), the three modes interleaved in blocks, each timed.
//! * `writer` — the task-queue workload until the deadline: read the queue,
//!   claim a task and insert a run (one write transaction), read the task and
//!   the previous run's events, then insert three events, finish the run,
//!   mark the task done and enqueue a follow-up (a second write transaction).
//! * `reader` — short SELECTs (count by status, a join of runs and events)
//!   every 2 ms, each timed.
//! * `threads` — a thread-pool server: `--threads` threads, each with its own
//!   connection (`busy_timeout` 30 s), `--n` one-row write transactions
//!   each; how long, how many errors, and how many threads and `<db>.lock`
//!   descriptors the process had at most.
//! * `deferred` — Django's default transaction: `BEGIN` (deferred), read a
//!   row, update it, `COMMIT`, 1 ms of other work between requests. Such an
//!   upgrade from read to write gets `SQLITE_BUSY` at once when the write lock
//!   is taken (SQLite does not call the busy handler for it); counted.
//!
//! Every write transaction is `BEGIN IMMEDIATE … COMMIT`. Writer wait is the
//! time from the start of the attempt (before the app-flock, before BEGIN) to
//! the first statement after BEGIN succeeding, retries included. `busy`
//! counts `SQLITE_BUSY` errors that reached the application, i.e. after the
//! 5 s `busy_timeout` ran out. Each worker prints one JSON line on stdout.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use serde_json::{json, Value};

use crate::common::{self, Journal, Mode, Pragmas};

/// The worker's flags. The driver passes all of them; the defaults are for
/// running one worker by hand.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// What this process does.
    #[arg(long, value_enum)]
    role: Role,
    /// The database; for `single`, the directory holding `stock/`,
    /// `app-flock/` and `writelock/`, one `bench.db` in each.
    #[arg(long)]
    db: PathBuf,
    /// Which contender (`writer` and `reader`; `single` runs all three).
    #[arg(long, value_enum, default_value_t = Mode::Stock)]
    mode: Mode,
    /// The database's journal mode, which connections check.
    #[arg(long, value_enum, ignore_case = true)]
    journal: Journal,
    /// This process's number: the writer id stored in rows, the payload seed.
    #[arg(long, default_value_t = 0)]
    id: u64,
    /// Seconds to run after the start time (`writer`, `reader`).
    #[arg(long, default_value_t = 3.0, value_parser = crate::positive_secs)]
    secs: f64,
    /// Start time, ns since the Unix epoch: every worker of a run sleeps
    /// until then (0: start at once).
    #[arg(long = "start", default_value_t = 0)]
    start_ns: u128,
    /// Timed transactions per mode (`single`).
    #[arg(long, default_value_t = 2000)]
    n: u64,
    /// Transactions per turn when the modes take turns (`single`).
    #[arg(long, default_value_t = 100)]
    block: u64,
    /// `name=value;…` run as PRAGMAs on every writelock connection.
    #[arg(long, default_value = "")]
    writelock_pragmas: Pragmas,
    /// Threads, each with its own connection (`threads`).
    #[arg(long, default_value_t = 200)]
    threads: usize,
}

/// The worker roles (see the top of this file).
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Role {
    /// One process, one-row INSERTs, the three modes interleaved in blocks.
    Single,
    /// The task-queue writer.
    Writer,
    /// The task-queue reader.
    Reader,
    /// Many connections in one process: `--threads` threads, each with its
    /// own connection, `--n` one-row write transactions each.
    Threads,
    /// Deferred read-then-write transactions (`BEGIN; SELECT; UPDATE;
    /// COMMIT`, Django's default), a request's worth of work apart.
    Deferred,
}

pub fn main(a: Args) {
    let out = match a.role {
        Role::Single => single(&a),
        Role::Writer => writer(&a),
        Role::Reader => reader(&a),
        Role::Threads => threads(&a),
        Role::Deferred => deferred(&a),
    };
    println!("{out}");
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::DatabaseBusy)
}

fn us(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e7).round() / 10.0
}

/// Sleep until the driver's common start time; returns the run's deadline.
fn wait_for_start(a: &Args) -> Instant {
    let now = common::now_ns();
    if a.start_ns > now {
        std::thread::sleep(Duration::from_nanos((a.start_ns - now) as u64));
    }
    Instant::now() + Duration::from_secs_f64(a.secs)
}

/// A connection plus the application-level flock (mode `app-flock` only) and
/// the counters every write transaction updates.
struct Writer {
    conn: Connection,
    app_lock: Option<File>,
    waits_us: Vec<f64>,
    busy: u64,
    commits: u64,
    give_up_at: Option<Instant>,
}

impl Writer {
    fn new(db: &Path, mode: Mode, journal: Journal, pragmas: &Pragmas) -> Writer {
        let conn = common::connect(db, mode, journal, pragmas);
        let app_lock = (mode == Mode::AppFlock).then(|| {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(common::lock_path(db))
                .expect("open <db>.lock")
        });
        Writer {
            conn,
            app_lock,
            waits_us: Vec::new(),
            busy: 0,
            commits: 0,
            give_up_at: None,
        }
    }

    fn rollback(&self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    fn unlock(&self) {
        if let Some(f) = &self.app_lock {
            f.unlock().expect("flock(LOCK_UN)");
        }
    }

    /// One write transaction. `body` runs after BEGIN IMMEDIATE and calls its
    /// `mark` argument once its first statement succeeded. Retries the whole
    /// transaction on SQLITE_BUSY (counted); returns None if it gave up.
    fn tx<T>(
        &mut self,
        record: bool,
        body: impl Fn(&Connection, &mut dyn FnMut()) -> rusqlite::Result<T>,
    ) -> Option<T> {
        let t0 = Instant::now();
        loop {
            if let Some(f) = &self.app_lock {
                f.lock().expect("flock(LOCK_EX)");
            }
            let mut first_ok: Option<Duration> = None;
            let r = self.conn.execute_batch("BEGIN IMMEDIATE").and_then(|()| {
                body(&self.conn, &mut || {
                    if first_ok.is_none() {
                        first_ok = Some(t0.elapsed());
                    }
                })
            });
            let v = match r {
                Ok(v) => v,
                Err(e) if is_busy(&e) => {
                    self.busy += 1;
                    self.rollback();
                    self.unlock();
                    if self.gave_up(record, t0) {
                        return None;
                    }
                    continue;
                }
                Err(e) => panic!("write transaction: {e}"),
            };
            // COMMIT can meet SQLITE_BUSY too (rollback journal: readers still
            // hold SHARED when the busy timeout ends); retry it a few times.
            let mut committed = false;
            for _ in 0..3 {
                match self.conn.execute_batch("COMMIT") {
                    Ok(()) => {
                        committed = true;
                        break;
                    }
                    Err(e) if is_busy(&e) => self.busy += 1,
                    Err(e) => panic!("COMMIT: {e}"),
                }
            }
            if !committed {
                self.rollback();
            }
            self.unlock();
            if committed {
                if record {
                    let w = first_ok.unwrap_or_else(|| t0.elapsed());
                    self.waits_us.push(us(w));
                }
                self.commits += 1;
                return Some(v);
            }
            if self.gave_up(record, t0) {
                return None;
            }
        }
    }

    /// After a failed attempt: past the deadline (plus one busy timeout),
    /// record the censored wait and stop.
    fn gave_up(&mut self, record: bool, t0: Instant) -> bool {
        match self.give_up_at {
            Some(t) if Instant::now() > t => {
                if record {
                    self.waits_us.push(us(t0.elapsed()));
                }
                true
            }
            _ => false,
        }
    }

    /// The extension's own counters for this connection (`writelock_status()`),
    /// or null without the extension.
    fn extension_counters(&self) -> Value {
        let s: Option<String> = self
            .conn
            .query_row("SELECT writelock_status()", [], |r| r.get(0))
            .ok();
        let Some(v) = s.and_then(|s| serde_json::from_str::<Value>(&s).ok()) else {
            return Value::Null;
        };
        let d = &v["databases"][0];
        let mut o = serde_json::Map::new();
        for k in [
            "protected",
            "acquisitions",
            "contended",
            "busy",
            "wait_total_ms",
            "wait_max_ms",
            "hold_max_ms",
        ] {
            if let Some(x) = d.get(k) {
                o.insert(k.into(), x.clone());
            }
        }
        if let Some(ver) = v.get("version") {
            o.insert("version".into(), ver.clone());
        }
        Value::Object(o)
    }
}

/// One process, one database per mode (`--db` is the directory holding
/// `stock/`, `app-flock/` and `writelock/`), `--n` one-row INSERT transactions
/// per mode, run in blocks of `--block` transactions that rotate through the
/// modes, so slow phases of the disk (fsync latency drifts a lot on shared
/// machines) hit every mode alike. Stock connections use VFS `unix`
/// explicitly, so loading the extension into this process does not touch them.
fn single(a: &Args) -> Value {
    let mut ws: Vec<(Mode, Writer)> = Mode::ALL
        .iter()
        .map(|&m| {
            (
                m,
                Writer::new(
                    &a.db.join(m.name()).join("bench.db"),
                    m,
                    a.journal,
                    &a.writelock_pragmas,
                ),
            )
        })
        .collect();
    let row = common::payload(a.id, 100);
    let insert = |c: &Connection, mark: &mut dyn FnMut()| {
        c.prepare_cached("INSERT INTO single(v) VALUES (?1)")?
            .execute([&row])?;
        mark();
        Ok(())
    };
    for (_, w) in ws.iter_mut() {
        for _ in 0..100 {
            w.tx(false, insert);
        }
    }
    let mut elapsed = [Duration::ZERO; 3];
    let mut blocks_ns: [Vec<u64>; 3] = Default::default();
    let blocks = a.n.div_ceil(a.block.max(1));
    for b in 0..blocks {
        let todo = a.block.min(a.n - b * a.block);
        for k in 0..ws.len() {
            let i = (k + b as usize) % ws.len();
            let w = &mut ws[i].1;
            let t = Instant::now();
            for _ in 0..todo {
                w.tx(false, insert);
            }
            let d = t.elapsed();
            elapsed[i] += d;
            blocks_ns[i].push(d.as_nanos() as u64);
        }
    }
    let per_mode: serde_json::Map<String, Value> = ws
        .iter()
        .zip(elapsed)
        .map(|((m, _), e)| (m.name().to_string(), json!(e.as_nanos() as u64)))
        .collect();
    let ext = ws
        .iter()
        .find(|(m, _)| *m == Mode::Writelock)
        .map_or(Value::Null, |(_, w)| w.extension_counters());
    json!({
        "role": "single",
        "journal": a.journal.name(),
        "n": a.n,
        "block": a.block,
        "elapsed_ns": per_mode,
        "blocks_ns": ws
            .iter()
            .zip(&blocks_ns)
            .map(|((m, _), b)| (m.name().to_string(), json!(b)))
            .collect::<serde_json::Map<String, Value>>(),
        "busy": ws.iter().map(|(_, w)| w.busy).sum::<u64>(),
        "sqlite_version": rusqlite::version(),
        "extension": ext,
    })
}

/// The task-queue writer.
fn writer(a: &Args) -> Value {
    let mut w = Writer::new(&a.db, a.mode, a.journal, &a.writelock_pragmas);
    let me = a.id as i64;
    let mut reads = 0u64;
    let mut prev_run: i64 = 0;
    let mut seq = 0u64;
    let deadline = wait_for_start(a);
    w.give_up_at = Some(deadline + common::BUSY_TIMEOUT);
    let read_busy = std::cell::Cell::new(0u64);
    let read = |c: &Connection, f: &dyn Fn(&Connection) -> rusqlite::Result<()>| loop {
        match f(c) {
            Ok(()) => break,
            Err(e) if is_busy(&e) => read_busy.set(read_busy.get() + 1),
            Err(e) => panic!("read: {e}"),
        }
    };
    let mut iters_us: Vec<f64> = Vec::new();
    while Instant::now() < deadline {
        seq += 1;
        let iter_start = Instant::now();
        // Read: how much work is there?
        read(&w.conn, &|c| {
            c.prepare_cached("SELECT count(*) FROM tasks WHERE status = 'pending'")?
                .query_row([], |r| r.get::<_, i64>(0))
                .map(|_| ())
        });
        reads += 1;
        // Write 1: claim a task, start a run.
        let claimed = w.tx(true, |c, mark| {
            let now = common::now_us();
            let task: Option<i64> = c
                .prepare_cached(
                    "UPDATE tasks SET status = 'running', worker = ?1, claimed_at = ?2
                     WHERE id = (SELECT id FROM tasks WHERE status = 'pending' ORDER BY id LIMIT 1)
                     RETURNING id",
                )?
                .query_row(params![me, now], |r| r.get(0))
                .optional()?;
            mark();
            let task = match task {
                Some(t) => t,
                None => {
                    c.prepare_cached(
                        "INSERT INTO tasks(status, worker, payload, created_at, claimed_at)
                         VALUES ('running', ?1, 'refill', ?2, ?2)",
                    )?
                    .execute(params![me, now])?;
                    c.last_insert_rowid()
                }
            };
            c.prepare_cached(
                "INSERT INTO runs(task_id, worker, started_at, status) VALUES (?1, ?2, ?3, 'running')",
            )?
            .execute(params![task, me, now])?;
            Ok((task, c.last_insert_rowid()))
        });
        let Some((task, run)) = claimed else { break };
        if Instant::now() >= deadline {
            break;
        }
        // Read: the task's payload and what the previous run logged.
        read(&w.conn, &|c| {
            let _p: String = c
                .prepare_cached("SELECT payload FROM tasks WHERE id = ?1")?
                .query_row([task], |r| r.get(0))?;
            let mut st = c.prepare_cached(
                "SELECT kind, count(*), max(at) FROM events WHERE run_id = ?1 GROUP BY kind",
            )?;
            let n = st
                .query_map([prev_run], |r| r.get::<_, i64>(1))?
                .collect::<rusqlite::Result<Vec<_>>>()?
                .len();
            std::hint::black_box(n);
            Ok(())
        });
        reads += 1;
        // Write 2: log events, finish the run and the task, enqueue a follow-up.
        let body = common::payload(seq ^ (me as u64) << 32, 120);
        let done = w.tx(true, |c, mark| {
            let now = common::now_us();
            let mut ev = c.prepare_cached(
                "INSERT INTO events(run_id, kind, payload, at) VALUES (?1, ?2, ?3, ?4)",
            )?;
            ev.execute(params![run, "start", &body, now])?;
            mark();
            ev.execute(params![run, "log", &body, now])?;
            ev.execute(params![run, "done", &body, now])?;
            c.prepare_cached("UPDATE runs SET finished_at = ?2, status = 'ok' WHERE id = ?1")?
                .execute(params![run, now])?;
            c.prepare_cached("UPDATE tasks SET status = 'done', done_at = ?2 WHERE id = ?1")?
                .execute(params![task, now])?;
            c.prepare_cached(
                "INSERT INTO tasks(status, payload, created_at) VALUES ('pending', ?1, ?2)",
            )?
            .execute(params![&body, now])?;
            Ok(())
        });
        if done.is_none() {
            break;
        }
        iters_us.push(us(iter_start.elapsed()));
        prev_run = run;
    }
    json!({
        "role": "writer",
        "id": a.id,
        "commits": w.commits,
        "busy": w.busy,
        "read_busy": read_busy.get(),
        "reads": reads,
        "waits_us": w.waits_us,
        "iters_us": iters_us,
        "cpu_ms": cpu_ms(),
        "extension": w.extension_counters(),
    })
}

/// CPU time this process used so far, in ms (`/proc/self/schedstat`, ns
/// on CPU): pollers that burn CPU slow down the lock holder on a small machine.
fn cpu_ms() -> Option<f64> {
    let s = procfs::process::Process::myself().ok()?.schedstat().ok()?;
    Some(s.sum_exec_runtime as f64 / 1e6)
}

/// The reader: short SELECTs, each timed, 2 ms apart.
fn reader(a: &Args) -> Value {
    let conn = common::connect(&a.db, a.mode, a.journal, &a.writelock_pragmas);
    let deadline = wait_for_start(a);
    let mut lat = Vec::new();
    let mut busy = 0u64;
    let queries = [
        "SELECT status, count(*) FROM tasks WHERE status IN ('pending', 'running') GROUP BY status",
        "SELECT r.id, r.worker, t.status, count(e.id)
           FROM runs r JOIN tasks t ON t.id = r.task_id LEFT JOIN events e ON e.run_id = r.id
          WHERE r.id > (SELECT coalesce(max(id), 0) - 20 FROM runs)
          GROUP BY r.id",
    ];
    let mut i = 0;
    while Instant::now() < deadline {
        let q = queries[i % queries.len()];
        i += 1;
        let t = Instant::now();
        let r = (|| -> rusqlite::Result<usize> {
            let mut st = conn.prepare_cached(q)?;
            let n = st
                .query_map([], |r| r.get::<_, rusqlite::types::Value>(1))?
                .collect::<rusqlite::Result<Vec<_>>>()?
                .len();
            Ok(n)
        })();
        match r {
            Ok(n) => {
                std::hint::black_box(n);
                lat.push(us(t.elapsed()));
            }
            Err(e) if is_busy(&e) => {
                busy += 1;
                lat.push(us(t.elapsed()));
            }
            Err(e) => panic!("reader: {e}"),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    json!({
        "role": "reader",
        "reads": lat.len(),
        "busy": busy,
        "lat_us": lat,
    })
}

/// `--threads` threads in this one process, each with its own connection
/// (`busy_timeout` 30 s), each running `--n` one-row write transactions; they
/// start together. Reports the time until the last one finished, the
/// `SQLITE_BUSY` errors that reached the threads (each retried), and the most
/// threads and `<db>.lock` descriptors the process had meanwhile (sampled
/// every 2 ms): the extension's own threads are what exceeds the workers.
fn threads(a: &Args) -> Value {
    let n = a.threads;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n + 1));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lock = common::lock_path(&a.db);
    let monitor = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut threads, mut lock_fds) = (0u64, 0usize);
            let me = procfs::process::Process::myself().expect("/proc/self");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(st) = me.status() {
                    threads = threads.max(st.threads);
                }
                if let Ok(fds) = me.fd() {
                    let k = fds
                        .flatten()
                        .filter(|f| matches!(&f.target, procfs::process::FDTarget::Path(p) if *p == lock))
                        .count();
                    lock_fds = lock_fds.max(k);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (threads, lock_fds)
        })
    };
    let workers: Vec<_> = (0..n)
        .map(|i| {
            let (db, mode, journal) = (a.db.clone(), a.mode, a.journal);
            let pragmas = a.writelock_pragmas.clone();
            let barrier = barrier.clone();
            let todo = a.n;
            let row = common::payload(a.id * 1000 + i as u64, 100);
            std::thread::spawn(move || {
                let mut w = Writer::new(&db, mode, journal, &pragmas);
                w.conn
                    .busy_timeout(Duration::from_secs(30))
                    .expect("busy_timeout");
                barrier.wait();
                for _ in 0..todo {
                    w.tx(false, |c, mark| {
                        c.prepare_cached("INSERT INTO single(v) VALUES (?1)")?
                            .execute([&row])?;
                        mark();
                        Ok(())
                    });
                }
                (w.commits, w.busy)
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    let (mut commits, mut busy) = (0u64, 0u64);
    for w in workers {
        let (c, b) = w.join().expect("worker thread");
        commits += c;
        busy += b;
    }
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (peak_threads, lock_fds) = monitor.join().expect("monitor thread");
    json!({
        "role": "threads",
        "threads": n,
        "n": a.n,
        "secs": secs,
        "commits": commits,
        "busy": busy,
        // Workers, the main thread and the monitor are ours; the rest belong
        // to the extension (or SQLite).
        "extra_threads": peak_threads.saturating_sub(n as u64 + 2),
        "lock_fds": lock_fds,
    })
}

/// Deferred read-then-write transactions until the deadline, on the `kv`
/// table: `BEGIN; SELECT …; UPDATE …; COMMIT`, 1 ms apart. A `SQLITE_BUSY` at
/// any step rolls back and counts, as a web request would fail (Django
/// raises `OperationalError: database is locked`); app-flock wraps the whole
/// transaction in its flock.
fn deferred(a: &Args) -> Value {
    let mut w = Writer::new(&a.db, a.mode, a.journal, &a.writelock_pragmas);
    let deadline = wait_for_start(a);
    let (mut attempts, mut busy) = (0u64, 0u64);
    let mut x = a.id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let pad = common::payload(a.id, 1500);
    while Instant::now() < deadline {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = (x % common::KV_ROWS as u64) as i64;
        attempts += 1;
        if let Some(f) = &w.app_lock {
            f.lock().expect("flock(LOCK_EX)");
        }
        let r = (|| -> rusqlite::Result<()> {
            w.conn.execute_batch("BEGIN")?;
            let v: i64 = w
                .conn
                .prepare_cached("SELECT v FROM kv WHERE k = ?1")?
                .query_row([k], |r| r.get(0))?;
            w.conn
                .prepare_cached("UPDATE kv SET v = ?2, pad = ?3 WHERE k = ?1")?
                .execute(params![k, v + 1, &pad])?;
            w.conn.execute_batch("COMMIT")
        })();
        match r {
            Ok(()) => w.commits += 1,
            Err(e) if is_busy(&e) => {
                busy += 1;
                w.rollback();
            }
            Err(e) => panic!("deferred transaction: {e}"),
        }
        w.unlock();
        std::thread::sleep(Duration::from_millis(1));
    }
    json!({
        "role": "deferred",
        "id": a.id,
        "attempts": attempts,
        "commits": w.commits,
        "busy": busy,
    })
}
