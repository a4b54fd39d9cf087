//! `make bench`: stock SQLite, the application-level flock and the writelock
//! extension side by side, with real processes, in one invocation.
//!
//! ```text
//! writelock-bench [OPTIONS]          run everything, print the table, write target/bench/
//! writelock-bench worker --role …    one worker process (the driver starts these)
//! ```
//!
//! `writelock-bench --help` lists the options (seconds per run, writer
//! counts, repeats, transactions per single-writer round, rounds, one half
//! only, journal modes, PRAGMAs for writelock connections), each with its
//! default and the `BENCH_*` environment variable that sets it, so
//! `BENCH_SECS=1 make bench` works as well as `--secs 1`. `WRITELOCK_SO`
//! names the extension (default `target/release/libwritelock.so`).
//! docs/benchmark.md explains the output.

mod cases;
mod common;
mod plot;
mod stats;
mod targets;
mod worker;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::builder::{EnumValueParser, PossibleValue, TypedValueParser};
use clap::error::{ContextKind, ContextValue};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use rusqlite::Connection;
use serde_json::{json, Value};

use common::{Journal, Mode, Pragmas};
use stats::{median, pct, sorted};

#[derive(Parser, Debug)]
#[command(
    name = "writelock-bench",
    about = "Stock SQLite vs the application-level flock vs the writelock extension, \
             with real processes, modes interleaved",
    long_about = "Stock SQLite vs the application-level flock vs the writelock extension, \
                  with real processes, modes interleaved.\n\n\
                  Runs a single-writer benchmark (one-row transactions, the three modes \
                  taking turns inside one process) and a task-queue benchmark (N writer \
                  processes + 1 reader per run) in each journal mode, prints the tables and \
                  writes target/bench/results.md, results.json and writer-wait-cdf.svg. \
                  Every option can also be set through the environment variable shown \
                  with it (make bench passes the environment through).",
    after_help = "Environment: WRITELOCK_SO is the extension to load \
                  (default: <target>/release/libwritelock.so). \
                  See docs/benchmark.md for how to read the results."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// One worker process; the driver starts these.
    #[command(hide = true)]
    Worker(worker::Args),
}

/// The driver's options: each one also read from its `BENCH_*` variable.
#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Seconds per task-queue run.
    #[arg(long, env = "BENCH_SECS", default_value = "3", value_parser = Opt(positive_secs))]
    secs: f64,
    /// Writer process counts for the task queue, comma-separated; one run
    /// (per repeat, journal mode and mode) for each.
    #[arg(
        long,
        env = "BENCH_PROCS",
        value_name = "N,…",
        value_delimiter = ',',
        default_value = "2,4,8,16",
        value_parser = Opt(at_least_one::<usize>)
    )]
    procs: Vec<usize>,
    /// Runs of every task-queue configuration, the modes interleaved
    /// (their order rotated each time), samples pooled.
    #[arg(
        long,
        env = "BENCH_REPEAT",
        default_value = "2",
        value_parser = Opt(at_least_one::<usize>)
    )]
    repeat: usize,
    /// Single writer, WAL: timed transactions per mode and round.
    #[arg(
        long,
        env = "BENCH_N_WAL",
        default_value = "10000",
        value_parser = Opt(at_least_one::<u64>)
    )]
    n_wal: u64,
    /// Single writer, DELETE: timed transactions per mode and round (fewer: a
    /// DELETE commit with synchronous=FULL costs several fsyncs).
    #[arg(
        long,
        env = "BENCH_N_DELETE",
        default_value = "300",
        value_parser = Opt(at_least_one::<u64>)
    )]
    n_delete: u64,
    /// Single-writer rounds, one process each; the table shows the median.
    #[arg(
        long,
        env = "BENCH_ROUNDS",
        default_value = "5",
        value_parser = Opt(at_least_one::<usize>)
    )]
    rounds: usize,
    /// Run only one part: the single-writer benchmark, the task queue, the
    /// thread-pool case or the deferred-transaction case (default: all).
    #[arg(long, env = "BENCH_ONLY", value_parser = Opt(EnumValueParser::<Only>::new()))]
    only: Option<Only>,
    /// Threads (one connection each) in the many-connections-in-one-process
    /// case.
    #[arg(
        long,
        env = "BENCH_THREADS",
        default_value = "200",
        value_parser = Opt(at_least_one::<usize>)
    )]
    threads: usize,
    /// Journal modes, comma-separated, any case.
    #[arg(
        long,
        env = "BENCH_JOURNALS",
        value_name = "JOURNAL,…",
        value_delimiter = ',',
        default_value = "WAL,DELETE",
        ignore_case = true,
        value_parser = Opt(EnumValueParser::<Journal>::new())
    )]
    journals: Vec<Journal>,
    /// `name=value;…` run as PRAGMAs on every writelock connection, to try
    /// the extension's options (e.g. writelock_checkpoint_wait_ms=0);
    /// recorded in the results.
    #[arg(
        long,
        env = "BENCH_WRITELOCK_PRAGMAS",
        value_name = "NAME=VALUE;…",
        value_parser = Opt(|s: &str| s.parse::<Pragmas>())
    )]
    writelock_pragmas: Option<Pragmas>,
}

/// `--only`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Only {
    /// The single-writer benchmark only.
    Single,
    /// The task-queue benchmark only.
    Queue,
    /// Many connections in one process only.
    Threads,
    /// Deferred read-then-write transactions only.
    Deferred,
}

/// Seconds: a finite number above 0 (`Duration::from_secs_f64` panics on
/// anything else).
fn positive_secs(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        Ok(_) => Err("must be a number of seconds above 0".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A count: a whole number, 1 or more.
fn at_least_one<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + From<u8>,
    T::Err: std::fmt::Display,
{
    match s.trim().parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        Ok(_) => Err("must be 1 or more".into()),
        Err(e) => Err(format!("{e} (a whole number, 1 or more)")),
    }
}

/// The value parser of every driver option: ignores surrounding whitespace
/// (`BENCH_PROCS="2, 4"`), defers to `P` (possible values included), and
/// when a value is refused while the option's environment variable is set,
/// says so: clap's message names only the flag.
#[derive(Clone)]
struct Opt<P>(P);

impl<P: TypedValueParser> TypedValueParser for Opt<P> {
    type Value = P::Value;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<P::Value, clap::Error> {
        let trimmed = value.to_str().map_or(value, |s| OsStr::new(s.trim()));
        self.0.parse_ref(cmd, arg, trimmed).map_err(|mut e| {
            let Some(name) = arg.and_then(clap::Arg::get_env) else {
                return e;
            };
            let set = std::env::var_os(name).unwrap_or_default();
            let (set, bad) = (set.to_string_lossy(), trimmed.to_string_lossy());
            if !bad.is_empty() && set.contains(&*bad) {
                let tip = format!(
                    "the value comes from the environment: {}={set:?}",
                    name.to_string_lossy()
                );
                e.insert(
                    ContextKind::Suggested,
                    ContextValue::StyledStrs(vec![tip.into()]),
                );
            }
            e
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        self.0.possible_values()
    }
}

struct Settings {
    secs: f64,
    procs: Vec<usize>,
    repeat: usize,
    n_wal: u64,
    n_delete: u64,
    rounds: usize,
    single: bool,
    queue: bool,
    threads_case: bool,
    deferred_case: bool,
    threads: usize,
    journals: Vec<Journal>,
    pragmas: Pragmas,
}

impl From<BenchArgs> for Settings {
    fn from(a: BenchArgs) -> Settings {
        Settings {
            secs: a.secs,
            procs: a.procs,
            repeat: a.repeat,
            n_wal: a.n_wal,
            n_delete: a.n_delete,
            rounds: a.rounds,
            single: a.only.is_none_or(|o| o == Only::Single),
            queue: a.only.is_none_or(|o| o == Only::Queue),
            threads_case: a.only.is_none_or(|o| o == Only::Threads),
            deferred_case: a.only.is_none_or(|o| o == Only::Deferred),
            threads: a.threads,
            journals: a.journals,
            pragmas: a.writelock_pragmas.unwrap_or_default(),
        }
    }
}

impl Settings {
    fn n(&self, j: Journal) -> u64 {
        match j {
            Journal::Wal => self.n_wal,
            Journal::Delete => self.n_delete,
        }
    }
    /// Transactions per turn when the single-writer modes take turns.
    fn block(&self, j: Journal) -> u64 {
        match j {
            Journal::Wal => 200,
            Journal::Delete => 10,
        }
    }
    /// Flags every worker gets besides its own: the PRAGMAs, if any.
    fn worker_args(&self) -> Vec<OsString> {
        if self.pragmas.0.is_empty() {
            Vec::new()
        } else {
            vec![format!("--writelock-pragmas={}", self.pragmas).into()]
        }
    }
}

/// An empty or blank `BENCH_*` variable means unset, as it always has
/// (`BENCH_ONLY= make bench` runs both halves); clap would parse it as a
/// value and refuse it. Runs first, while this process has one thread.
fn drop_blank_env() {
    for arg in Cli::command().get_arguments() {
        let Some(name) = arg.get_env() else { continue };
        if std::env::var_os(name).is_some_and(|v| v.to_string_lossy().trim().is_empty()) {
            std::env::remove_var(name);
        }
    }
}

fn main() {
    drop_blank_env();
    let cli = Cli::parse();
    match cli.command {
        Some(Sub::Worker(a)) => worker::main(a),
        None => drive(cli.bench.into()),
    }
}

// ---------------------------------------------------------------------------
// Processes

/// A started worker whose stdout is drained on a thread (the JSON line can be
/// larger than a pipe buffer).
struct Proc {
    child: Child,
    out: std::thread::JoinHandle<String>,
}

fn spawn(args: &[OsString]) -> Proc {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .arg("worker")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn worker");
    let mut stdout = child.stdout.take().expect("stdout");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    Proc { child, out }
}

fn finish(p: Proc) -> Value {
    let Proc { mut child, out } = p;
    let st = child.wait().expect("wait worker");
    let s = out.join().expect("stdout thread");
    assert!(st.success(), "a worker failed ({st}); its stderr is above");
    let line = s.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("worker output {line:?}: {e}"))
}

/// Write back every dirty page (`sync(1)`) before a run starts, so the
/// previous run's (and the setup's) writeback does not slow this run's
/// fsyncs: runs follow each other closely and the modes take turns, so
/// otherwise a mode pays for the one before it.
fn settle() {
    let _ = Command::new("sync").status();
}

/// A fresh database in `dir` for `journal`: schema and the initial queue.
fn setup_db(dir: &Path, journal: Journal) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("create run directory");
    let db = dir.join("bench.db");
    let c = Connection::open(&db).expect("create db");
    let jm: String = c
        .query_row(
            &format!("PRAGMA journal_mode = {}", journal.name()),
            [],
            |r| r.get(0),
        )
        .expect("journal_mode");
    assert!(jm.eq_ignore_ascii_case(journal.name()));
    c.execute_batch(common::SCHEMA).expect("schema");
    c.execute_batch("BEGIN").unwrap();
    {
        let mut st = c
            .prepare("INSERT INTO tasks(status, payload, created_at) VALUES ('pending', ?1, ?2)")
            .unwrap();
        for i in 0..common::INITIAL_TASKS {
            st.execute(rusqlite::params![
                common::payload(i as u64, 200),
                common::now_us()
            ])
            .unwrap();
        }
    }
    {
        let mut st = c
            .prepare("INSERT INTO kv(k, v, pad) VALUES (?1, 0, '')")
            .unwrap();
        for k in 0..common::KV_ROWS {
            st.execute([k as i64]).unwrap();
        }
    }
    c.execute_batch("COMMIT").unwrap();
    db
}

fn wal_size(db: &Path) -> Option<u64> {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    std::fs::metadata(PathBuf::from(p)).ok().map(|m| m.len())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------------------
// Single writer

struct Single {
    journal: Journal,
    /// Per mode, µs per transaction in each round.
    per_tx_us: BTreeMap<Mode, Vec<f64>>,
    /// Per mode, this mode's block time / stock's block time in the same
    /// round, for every block of every round.
    block_ratios: BTreeMap<Mode, Vec<f64>>,
}

impl Single {
    fn median(&self, m: Mode) -> f64 {
        median(&self.per_tx_us[&m])
    }
    /// This mode's total time / stock's, per round (the two ran
    /// interleaved in one process); the median over rounds.
    fn ratio_totals(&self, m: Mode) -> f64 {
        let r: Vec<f64> = self.per_tx_us[&m]
            .iter()
            .zip(&self.per_tx_us[&Mode::Stock])
            .map(|(x, st)| x / st)
            .collect();
        median(&r)
    }
    /// The median over all blocks of (this mode's block / stock's block of
    /// the same turn): robust to the odd slow fsync or checkpoint.
    fn ratio(&self, m: Mode) -> f64 {
        median(&self.block_ratios[&m])
    }
}

fn run_single(s: &Settings, root: &Path, journal: Journal) -> (Single, Value) {
    let mut per_tx_us: BTreeMap<Mode, Vec<f64>> = BTreeMap::new();
    let mut block_ratios: BTreeMap<Mode, Vec<f64>> = BTreeMap::new();
    let mut info = Value::Null;
    let n = s.n(journal);
    for round in 0..s.rounds {
        // One process per round; inside it the modes take turns in blocks.
        let dir = root.join(format!("single-{}", journal.name()));
        let _ = std::fs::remove_dir_all(&dir);
        for m in Mode::ALL {
            setup_db(&dir.join(m.name()), journal);
        }
        settle();
        let mut args: Vec<OsString> = vec![
            "--role=single".into(),
            "--db".into(),
            dir.clone().into(),
            format!("--journal={}", journal.name()).into(),
            format!("--n={n}").into(),
            format!("--block={}", s.block(journal)).into(),
            format!("--id={round}").into(),
        ];
        args.extend(s.worker_args());
        let out = finish(spawn(&args));
        let mut line = format!(
            "  single writer {:<6} round {}/{}:",
            journal.name(),
            round + 1,
            s.rounds
        );
        for m in Mode::ALL {
            let ns = out["elapsed_ns"][m.name()].as_f64().unwrap_or(f64::NAN);
            let us = ns / 1000.0 / n as f64;
            per_tx_us.entry(m).or_default().push(us);
            let _ = write!(line, "  {} {:.1} µs/tx", m.name(), us);
        }
        eprintln!("{line}");
        let blocks = |m: Mode| -> Vec<f64> {
            out["blocks_ns"][m.name()]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default()
        };
        let stock = blocks(Mode::Stock);
        for m in Mode::ALL {
            let r = block_ratios.entry(m).or_default();
            r.extend(blocks(m).iter().zip(&stock).map(|(x, st)| x / st));
        }
        info = out;
    }
    (
        Single {
            journal,
            per_tx_us,
            block_ratios,
        },
        info,
    )
}

// ---------------------------------------------------------------------------
// Multi-writer task queue

#[derive(Default)]
struct Multi {
    secs: f64,
    commits: u64,
    per_proc: Vec<u64>,
    /// Each writer process's p99 latency of one task-queue iteration (its
    /// reads and both write transactions), ms.
    proc_iter_p99: Vec<f64>,
    /// Every iteration's latency, pooled, ms.
    iters_ms: Vec<f64>,
    /// Commits per second of each run (the spread between repeats).
    run_tput: Vec<f64>,
    busy: u64,
    writer_read_busy: u64,
    waits_ms: Vec<f64>,
    reader_ms: Vec<f64>,
    reader_busy: u64,
    wal_end: Option<u64>,
    wal_max: Option<u64>,
    wal_mid: Option<u64>,
    ext_contended: u64,
    ext_busy: u64,
    ext_acq: u64,
    ext_protected: Option<bool>,
    ext_wait_total_ms: f64,
    /// CPU time of all writer processes.
    cpu_ms: f64,
    ext_wait_max_ms: f64,
    ext_hold_max_ms: f64,
    ext_version: Option<String>,
    checks: Vec<String>,
}

impl Multi {
    fn throughput(&self) -> f64 {
        self.commits as f64 / self.secs
    }
    /// Writer CPU time per commit, µs.
    fn cpu_per_commit_us(&self) -> f64 {
        self.cpu_ms * 1000.0 / self.commits as f64
    }
    /// The worst-served writer process's p99 iteration latency, ms.
    fn worst_iter_p99(&self) -> f64 {
        self.proc_iter_p99.iter().copied().fold(f64::NAN, f64::max)
    }
    fn fairness(&self) -> f64 {
        let min = self.per_proc.iter().min().copied().unwrap_or(0) as f64;
        let max = self.per_proc.iter().max().copied().unwrap_or(0) as f64;
        if max > 0.0 {
            min / max
        } else {
            f64::NAN
        }
    }
    fn check(&self) -> String {
        if self.checks.iter().all(|c| c == "ok") {
            "ok".into()
        } else {
            self.checks
                .iter()
                .filter(|c| *c != "ok")
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        }
    }
}

/// Every writer's commits must be in the database, and the file intact.
fn verify(db: &Path, commits: u64) -> String {
    let c = match Connection::open(db) {
        Ok(c) => c,
        Err(e) => return format!("open: {e}"),
    };
    let q = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0));
    let (Ok(runs), Ok(ok_runs), Ok(events)) = (
        q("SELECT count(*) FROM runs"),
        q("SELECT count(*) FROM runs WHERE status = 'ok'"),
        q("SELECT count(*) FROM events"),
    ) else {
        return "count query failed".into();
    };
    let qc: String = c
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .unwrap_or_else(|e| e.to_string());
    let mut bad = Vec::new();
    if (runs + ok_runs) as u64 != commits {
        bad.push(format!(
            "{commits} commits reported, {} in the database",
            runs + ok_runs
        ));
    }
    if events != 3 * ok_runs {
        bad.push(format!("{events} events for {ok_runs} finished runs"));
    }
    if qc != "ok" {
        bad.push(format!("quick_check: {qc}"));
    }
    if bad.is_empty() {
        "ok".into()
    } else {
        bad.join(", ")
    }
}

fn run_multi_once(
    s: &Settings,
    dir: &Path,
    journal: Journal,
    procs: usize,
    mode: Mode,
    acc: &mut Multi,
) -> Option<u64> {
    let db = setup_db(dir, journal);
    settle();
    let lead = Duration::from_millis(300 + 40 * procs as u64);
    let start_ns = common::now_ns() + lead.as_nanos();
    let common_args = |role: &str, id: usize| -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            format!("--role={role}").into(),
            "--db".into(),
            db.clone().into(),
            format!("--mode={}", mode.name()).into(),
            format!("--journal={}", journal.name()).into(),
            format!("--secs={}", s.secs).into(),
            format!("--start={start_ns}").into(),
            format!("--id={id}").into(),
        ];
        args.extend(s.worker_args());
        args
    };
    let mut ps: Vec<Proc> = (0..procs)
        .map(|i| spawn(&common_args("writer", i + 1)))
        .collect();
    ps.push(spawn(&common_args("reader", 0)));

    // Watch the WAL while they run.
    let t_start = Instant::now() + lead;
    let run = Duration::from_secs_f64(s.secs);
    let (mut wal_end, mut wal_max, mut wal_mid) = (None, None, None);
    loop {
        let now = Instant::now();
        if now >= t_start && now < t_start + run {
            if let Some(sz) = wal_size(&db) {
                wal_end = Some(sz);
                wal_max = Some(wal_max.unwrap_or(0).max(sz));
                if now < t_start + run / 2 {
                    wal_mid = Some(sz);
                }
            }
        }
        if ps
            .iter_mut()
            .all(|p| matches!(p.child.try_wait(), Ok(Some(_))))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let outs: Vec<Value> = ps.into_iter().map(finish).collect();

    let mut commits = 0;
    for o in &outs {
        let num = |k: &str| o[k].as_u64().unwrap_or(0);
        match o["role"].as_str() {
            Some("writer") => {
                commits += num("commits");
                acc.per_proc.push(num("commits"));
                acc.busy += num("busy");
                acc.writer_read_busy += num("read_busy");
                if let Some(w) = o["waits_us"].as_array() {
                    acc.waits_ms
                        .extend(w.iter().filter_map(Value::as_f64).map(|u| u / 1000.0));
                }
                if let Some(w) = o["iters_us"].as_array() {
                    let it: Vec<f64> = w
                        .iter()
                        .filter_map(Value::as_f64)
                        .map(|u| u / 1000.0)
                        .collect();
                    acc.proc_iter_p99.push(pct(&sorted(&it), 99.0));
                    acc.iters_ms.extend(it);
                }
                let x = &o["extension"];
                acc.cpu_ms += o["cpu_ms"].as_f64().unwrap_or(f64::NAN);
                acc.ext_acq += x["acquisitions"].as_u64().unwrap_or(0);
                acc.ext_contended += x["contended"].as_u64().unwrap_or(0);
                acc.ext_busy += x["busy"].as_u64().unwrap_or(0);
                acc.ext_wait_total_ms += x["wait_total_ms"].as_f64().unwrap_or(0.0);
                acc.ext_wait_max_ms = acc
                    .ext_wait_max_ms
                    .max(x["wait_max_ms"].as_f64().unwrap_or(0.0));
                acc.ext_hold_max_ms = acc
                    .ext_hold_max_ms
                    .max(x["hold_max_ms"].as_f64().unwrap_or(0.0));
                if let Some(v) = x["version"].as_str() {
                    acc.ext_version = Some(v.to_string());
                }
                if let Some(p) = x["protected"].as_bool() {
                    acc.ext_protected = Some(acc.ext_protected.unwrap_or(true) && p);
                }
            }
            Some("reader") => {
                acc.reader_busy += num("busy");
                if let Some(w) = o["lat_us"].as_array() {
                    acc.reader_ms
                        .extend(w.iter().filter_map(Value::as_f64).map(|u| u / 1000.0));
                }
            }
            _ => {}
        }
    }
    acc.commits += commits;
    acc.secs += s.secs;
    acc.run_tput.push(commits as f64 / s.secs);
    let maxo = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    acc.wal_end = maxo(acc.wal_end, wal_end);
    acc.wal_max = maxo(acc.wal_max, wal_max);
    acc.wal_mid = maxo(acc.wal_mid, wal_mid);
    acc.checks.push(verify(&db, commits));
    wal_end
}

// ---------------------------------------------------------------------------
// Report

/// Which build was measured: the commit, whether the extension's sources had
/// uncommitted changes, and when the `.so` was built.
fn source_note() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let mut s = match git(&["rev-parse", "--short", "HEAD"]) {
        Some(h) => format!("commit {h}"),
        None => "an unknown commit".into(),
    };
    if let Some(st) = git(&["status", "--porcelain", "--", "../src", "../Cargo.toml"]) {
        if !st.is_empty() {
            s.push_str(" + uncommitted changes");
        }
    }
    if let Ok(m) = std::fs::metadata(common::so_path()).and_then(|m| m.modified()) {
        if let Ok(age) = m.elapsed() {
            let _ = write!(
                s,
                ", .so built {:.0} min before the run",
                age.as_secs_f64() / 60.0
            );
        }
    }
    s
}

/// The 1-minute load average (`/proc/loadavg`); NaN if it cannot be read.
fn loadavg() -> f64 {
    use procfs::Current as _;
    // procfs holds it as an f32; the file has two decimals, so round back to
    // them (0.8, not 0.800000011920929 in results.json).
    procfs::LoadAverage::current().map_or(f64::NAN, |l| (f64::from(l.one) * 100.0).round() / 100.0)
}

/// The filesystem type the databases live on (from /proc/self/mountinfo):
/// the longest mount point that holds `dir`; of equal ones, the last
/// mounted, which is the one on top.
fn fs_type(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounts = procfs::process::Process::myself().and_then(|p| p.mountinfo());
    mounts
        .into_iter()
        .flatten()
        .filter(|m| dir.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .map_or_else(
            || "filesystem ?".into(),
            |m| format!("{} filesystem", m.fs_type),
        )
}

/// The running kernel's release, as `uname -r` prints it. Read as it is:
/// procfs's `KernelVersion` keeps only major.minor.patch and would drop the
/// suffix (`-fc-v857`) that tells one build from another.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn f(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.digits$}")
    }
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v < 1.0 {
        format!("{v:.3}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn drive(s: Settings) {
    let t0 = Instant::now();
    let target = common::target_dir();
    let out_dir = target.join("bench");
    let run_root = out_dir.join("run");
    std::fs::create_dir_all(&run_root).expect("create target/bench/run");
    let so = common::so_path();
    if !so.exists() {
        eprintln!(
            "writelock-bench: {} is missing: run `make` first (or set WRITELOCK_SO)",
            so.display()
        );
        std::process::exit(1);
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_start = loadavg();
    let kernel = kernel_release();
    let n_multi = if s.queue {
        s.journals.len() * s.procs.len() * Mode::ALL.len() * s.repeat
    } else {
        0
    };
    eprintln!(
        "writelock-bench: SQLite {} (bundled), extension {}, {} cores, Linux {}",
        rusqlite::version(),
        so.display(),
        cores,
        kernel
    );
    eprintln!(
        "single writer: {} rounds × 3 modes × {} (WAL) / {} (DELETE) one-row transactions, interleaved; task queue: {} runs of {} s (about {:.0} s)",
        s.rounds,
        s.n_wal,
        s.n_delete,
        n_multi,
        s.secs,
        n_multi as f64 * (s.secs + 0.8)
    );

    // -- single writer --------------------------------------------------------
    let mut singles = Vec::new();
    let mut ext_info = Value::Null;
    for j in s.journals.iter().copied().filter(|_| s.single) {
        let (r, info) = run_single(&s, &run_root, j);
        eprintln!(
            "  single writer {:<6} median: stock {:.1} µs/tx, app-flock {:.1} ({:.3}×), writelock {:.1} ({:.3}×)",
            j.name(),
            r.median(Mode::Stock),
            r.median(Mode::AppFlock),
            r.ratio(Mode::AppFlock),
            r.median(Mode::Writelock),
            r.ratio(Mode::Writelock)
        );
        singles.push(r);
        if ext_info.is_null() {
            ext_info = info;
        }
    }

    // -- task queue -------------------------------------------------------------
    let mut multis: BTreeMap<(Journal, usize, Mode), Multi> = BTreeMap::new();
    let mut k = 0;
    for j in s.journals.iter().copied().filter(|_| s.queue) {
        for &p in &s.procs {
            for rep in 0..s.repeat {
                let mut order = Mode::ALL.to_vec();
                order.rotate_left(rep % Mode::ALL.len());
                for m in order {
                    k += 1;
                    let dir = run_root.join(format!("{}-{}-{}", j.name(), p, m.name()));
                    let acc = multis.entry((j, p, m)).or_default();
                    let before = (acc.commits, acc.waits_ms.len(), acc.busy);
                    let cpu_before = acc.cpu_ms;
                    let wal = run_multi_once(&s, &dir, j, p, m, acc);
                    let commits = acc.commits - before.0;
                    let w = sorted(&acc.waits_ms[before.1..]);
                    eprintln!(
                        "[{k:>2}/{n_multi}] {:<6} {:>2} writers {:<9} {:>6.0} commits/s  wait p99 {:>6} ms  max {:>6} ms  BUSY {}  CPU {:>4.0} µs/commit  WAL {}  check {}  ({:.0} s)",
                        j.name(),
                        p,
                        m.name(),
                        commits as f64 / s.secs,
                        ms(pct(&w, 99.0)),
                        ms(pct(&w, 100.0)),
                        acc.busy - before.2,
                        (acc.cpu_ms - cpu_before) * 1000.0 / commits as f64,
                        wal.map_or("–".into(), |b| format!("{:.1} MiB", mib(b))),
                        acc.checks.last().map_or("", String::as_str),
                        t0.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }

    // -- many connections in one process; deferred transactions ----------------
    let mut threads = Vec::new();
    for j in s.journals.iter().copied().filter(|_| s.threads_case) {
        for m in Mode::ALL {
            let t = cases::run_threads(&s, &run_root, j, m);
            eprintln!(
                "  {} threads {:<6} {:<9} {:>6.2} s  errors {}  extra threads {}  lock descriptors {}  check {}",
                t.threads,
                j.name(),
                m.name(),
                t.secs,
                t.busy,
                t.extra_threads,
                t.lock_fds,
                t.check
            );
            threads.push(t);
        }
    }
    let mut deferred: BTreeMap<(Journal, Mode), cases::Deferred> = BTreeMap::new();
    for j in s.journals.iter().copied().filter(|_| s.deferred_case) {
        for rep in 0..s.repeat {
            let mut order = Mode::ALL.to_vec();
            order.rotate_left(rep % Mode::ALL.len());
            for m in order {
                let acc = deferred.entry((j, m)).or_default();
                let before = (acc.attempts, acc.busy);
                cases::run_deferred(&s, &run_root, j, m, acc);
                eprintln!(
                    "  deferred {:<6} {:<9} {} attempts, BUSY {}",
                    j.name(),
                    m.name(),
                    acc.attempts - before.0,
                    acc.busy - before.1
                );
            }
        }
    }

    // -- tables -------------------------------------------------------------------
    let mut md = String::new();
    if s.single {
        let _ = writeln!(
        md,
        "### Single writer: one-row `BEGIN IMMEDIATE; INSERT; COMMIT` transactions, one process\n"
    );
        let _ = writeln!(
        md,
        "{} (WAL) / {} (DELETE) timed transactions per mode and round after 100 untimed ones; each round is one process with one fresh database per mode, the modes taking turns in blocks of {} (WAL) / {} (DELETE) transactions so drifts in fsync latency hit all three alike. µs/tx: median of {} rounds. Ratio vs stock: median over all blocks of the block's time over stock's block of the same turn (robust to a stray slow fsync or checkpoint); ratio of totals: median over rounds of total time over stock's.\n",
        s.n_wal, s.n_delete, s.block(Journal::Wal), s.block(Journal::Delete), s.rounds
    );
        let _ = writeln!(
            md,
            "| journal | synchronous | mode | µs/tx (median) | min–max | ratio vs stock | ratio of totals |"
        );
        let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|");
        for r in &singles {
            for m in Mode::ALL {
                let v = &r.per_tx_us[&m];
                let (lo, hi) = (
                    v.iter().copied().fold(f64::INFINITY, f64::min),
                    v.iter().copied().fold(0.0, f64::max),
                );
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {}–{} | {} | {} |",
                    r.journal.name(),
                    r.journal.synchronous(),
                    m.name(),
                    f(r.median(m), 1),
                    f(lo, 1),
                    f(hi, 1),
                    f(r.ratio(m), 3),
                    f(r.ratio_totals(m), 3)
                );
            }
        }
    }
    if s.queue {
        let _ = writeln!(
            md,
            "\n### Task queue: N writer processes + 1 reader, {} s per run{}\n",
            s.secs,
            if s.repeat > 1 {
                format!(", {} runs pooled", s.repeat)
            } else {
                String::new()
            }
        );
        let _ = writeln!(md, "Writer wait: from the start of the attempt (before the app-flock, before `BEGIN IMMEDIATE`) until the first statement succeeded, busy retries included. BUSY: `SQLITE_BUSY` that reached the application (after `busy_timeout` 5000 ms). Reader: latency of each short SELECT, busy waits included; reads: how many it completed (it sleeps 2 ms between reads, so few reads means it was kept waiting). Fairness: fewest / most commits of one writer process. Worst p99 iteration: each writer process's p99 latency of one loop iteration (its reads and both write transactions), the worst process's. CPU µs/commit: CPU time of all writer processes per commit (busy polling shows here). WAL: size of `-wal` at the end of the run. Check: commits reported = rows in the database, and `PRAGMA quick_check`.\n");
        let _ = writeln!(md, "| journal | writers | mode | commits/s | wait p50 ms | p95 | p99 | max | reader p99 ms | reader max | reads | BUSY | fairness | worst p99 iteration ms | CPU µs/commit | WAL MiB | check |");
        let _ = writeln!(
            md,
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for ((j, p, m), r) in &multis {
            let w = sorted(&r.waits_ms);
            let rd = sorted(&r.reader_ms);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}/{}) | {} | {} | {} | {} |",
                j.name(),
                p,
                m.name(),
                f(r.throughput(), 0),
                ms(pct(&w, 50.0)),
                ms(pct(&w, 95.0)),
                ms(pct(&w, 99.0)),
                ms(pct(&w, 100.0)),
                ms(pct(&rd, 99.0)),
                ms(pct(&rd, 100.0)),
                rd.len(),
                r.busy,
                f(r.fairness(), 2),
                r.per_proc.iter().min().copied().unwrap_or(0),
                r.per_proc.iter().max().copied().unwrap_or(0),
                ms(r.worst_iter_p99()),
                f(r.cpu_per_commit_us(), 0),
                r.wal_end.map_or("–".into(), |b| f(mib(b), 1)),
                r.check()
            );
        }
    }

    cases::tables(&mut md, &s, &threads, &deferred);
    let targets = targets::evaluate(&s, &singles, &multis, &threads, &deferred);
    targets::table(&mut md, &targets);
    let elapsed = t0.elapsed().as_secs_f64();
    let source = source_note();
    let load_end = loadavg();
    let fs_note = fs_type(&run_root);
    let pragmas = s
        .pragmas
        .0
        .iter()
        .map(|(k, v)| format!("PRAGMA {k} = {v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let ext_version = ext_info["extension"]["version"]
        .as_str()
        .map(str::to_string)
        .or_else(|| multis.values().find_map(|m| m.ext_version.clone()))
        .unwrap_or_else(|| "?".into());
    let _ = writeln!(
        md,
        "\nMachine: {cores} cores, Linux {kernel}, {}; SQLite {} (rusqlite bundled); writelock {ext_version} from {}. Load average (1 min) {load_start:.1} at the start, {load_end:.1} at the end: other work on the machine skews absolute numbers; the modes are interleaved so ratios suffer less. WAL runs use `synchronous=NORMAL`, DELETE runs SQLite's default `synchronous=FULL`; `busy_timeout` 5000 ms everywhere.{} Whole run: {elapsed:.0} s.",
        fs_note,
        rusqlite::version(),
        source,
        if pragmas.is_empty() {
            String::new()
        } else {
            format!(" Writelock connections ran `{pragmas}`.")
        }
    );

    // -- files ------------------------------------------------------------------------
    println!("\n{md}");
    let md_path = out_dir.join("results.md");
    std::fs::write(&md_path, &md).expect("write results.md");

    let json_multi: Vec<Value> = multis
        .iter()
        .map(|((j, p, m), r)| {
            let w = sorted(&r.waits_ms);
            let rd = sorted(&r.reader_ms);
            json!({
                "journal": j.name(), "writers": p, "mode": m.name(),
                "secs": r.secs, "commits": r.commits, "commits_per_s": r.throughput(),
                "wait_ms": {"n": w.len(), "p50": pct(&w, 50.0), "p95": pct(&w, 95.0), "p99": pct(&w, 99.0), "max": pct(&w, 100.0)},
                "reader_ms": {"n": rd.len(), "p50": pct(&rd, 50.0), "p99": pct(&rd, 99.0), "max": pct(&rd, 100.0)},
                "writer_cpu_s": r.cpu_ms / 1000.0, "writer_cpu_us_per_commit": r.cpu_per_commit_us(),
                "busy": r.busy, "reader_busy": r.reader_busy, "writer_read_busy": r.writer_read_busy,
                "commits_per_process": r.per_proc, "fairness_min_over_max": r.fairness(),
                "iteration_ms": {"p50": pct(&sorted(&r.iters_ms), 50.0), "p99": pct(&sorted(&r.iters_ms), 99.0), "worst_process_p99": r.worst_iter_p99(), "per_process_p99": r.proc_iter_p99},
                "commits_per_s_per_run": r.run_tput,
                "wal_bytes": {"mid": r.wal_mid, "end": r.wal_end, "max": r.wal_max},
                "extension": {"acquisitions": r.ext_acq, "contended": r.ext_contended, "busy": r.ext_busy, "protected": r.ext_protected, "wait_total_ms": r.ext_wait_total_ms, "wait_max_ms": r.ext_wait_max_ms, "hold_max_ms": r.ext_hold_max_ms},
                "check": r.check(),
            })
        })
        .collect();
    let json_single: Vec<Value> = singles
        .iter()
        .map(|r| {
            json!({
                "journal": r.journal.name(), "synchronous": r.journal.synchronous(), "n": s.n(r.journal),
                "per_tx_us": r.per_tx_us.iter().map(|(m, v)| (m.name().to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "median_us": Mode::ALL.iter().map(|&m| (m.name().to_string(), json!(r.median(m)))).collect::<serde_json::Map<_, _>>(),
                "ratio_of_totals": Mode::ALL.iter().map(|&m| (m.name().to_string(), json!(r.ratio_totals(m)))).collect::<serde_json::Map<_, _>>(),
                "ratio_vs_stock": Mode::ALL.iter().map(|&m| (m.name().to_string(), json!(r.ratio(m)))).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    let doc = json!({
        "machine": {"cores": cores, "kernel": kernel, "filesystem": fs_note, "loadavg_start": load_start, "loadavg_end": load_end, "sqlite": rusqlite::version(), "writelock": ext_version, "source": source},
        "settings": {"secs": s.secs, "procs": s.procs, "repeat": s.repeat, "single_n_wal": s.n_wal, "single_n_delete": s.n_delete, "single_rounds": s.rounds, "busy_timeout_ms": common::BUSY_TIMEOUT.as_millis() as u64, "journals": s.journals.iter().map(|j| j.name()).collect::<Vec<_>>(), "writelock_pragmas": pragmas},
        "single_writer": json_single,
        "task_queue": json_multi,
        "cases": cases::json(&threads, &deferred),
        "targets": targets::json(&targets),
        "elapsed_s": elapsed,
    });
    let json_path = out_dir.join("results.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&doc).unwrap() + "\n",
    )
    .expect("write results.json");

    let panels: Vec<plot::Panel> = s
        .journals
        .iter()
        .filter(|_| s.queue)
        .flat_map(|&j| s.procs.iter().map(move |&p| (j, p)))
        .map(|(j, p)| plot::Panel {
            title: format!("{}, {} writers", j.name(), p),
            lines: Mode::ALL
                .iter()
                .map(|&m| (m, sorted(&multis[&(j, p, m)].waits_ms)))
                .collect(),
        })
        .collect();
    let svg_path = out_dir.join("writer-wait-cdf.svg");
    let mut wrote = vec![
        md_path.display().to_string(),
        json_path.display().to_string(),
    ];
    if panels.is_empty() {
        // Nothing to draw: leave no stale figure behind.
        let _ = std::fs::remove_file(&svg_path);
    } else {
        let title = "Writer wait, CDF: task queue, N writer processes + 1 reader; \
                     stock vs application-level flock vs writelock";
        match plot::draw(&svg_path, title, &panels, s.procs.len()) {
            Ok(()) => wrote.push(svg_path.display().to_string()),
            Err(e) => eprintln!("writelock-bench: drawing {}: {e}", svg_path.display()),
        }
    }
    eprintln!("wrote {} ({elapsed:.0} s in all)", wrote.join(", "));
}
