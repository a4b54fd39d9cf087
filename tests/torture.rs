//! Torture suite with real processes (`tests/bin/torture_worker.rs`).
//!
//! `torture_with_and_without_extension`: 6 writers + 1 reader + 1 maintenance
//! process on one database, every one of them running the "app bug" (open,
//! read and close the database file after commits, between statements and
//! during VACUUM), in DELETE and WAL modes, for three configurations: the
//! extension (`writelock`), stock SQLite (`stock`) and stock SQLite with the
//! application-level fix (`appflock`: flock on `<db>.lock` around each write
//! transaction). Witnesses: writers inside a write transaction at once (an
//! out-of-band log), lost updates (commit logs vs `runs` and `counters`),
//! errors by kind (malformed reads included), `PRAGMA integrity_check`
//! through the plain `unix` VFS. The extension must show no damage; stock
//! SQLite must show damage (so the suite proves something).
//!
//! The workload is calibrated against the extension's first build (writer
//! flock only, commit 460404e): there this test fails in both journal modes —
//! DELETE: "database disk image is malformed" reads (a reader whose SHARED
//! lock was cancelled reads while a writer writes); WAL: integrity_check
//! errors and lost updates (a closing connection that believed itself the
//! last one checkpointed and deleted `-wal`/`-shm` under live connections).
//! Run without the app bug (`TORTURE_PROBE=0`), every configuration is clean,
//! so the witnesses do not cry wolf.
//!
//! `crash_safety_sigkill`: writers SIGKILLed repeatedly mid-transaction and
//! mid-COMMIT; no committed transaction lost, integrity ok, `<db>.lock` free
//! right after the kill and a fresh process writes within 1 s.
//!
//! Knobs (environment): `TORTURE_SECS` (seconds per round, default 6; `make
//! torture` uses 60), `TORTURE_SEED`, `TORTURE_KILLS` (SIGKILLs per journal
//! mode with the extension, default 24), `TORTURE_MODES` (e.g. `stock,appflock`:
//! run only those), `TORTURE_PROBE=0` (no app bug: the control, where every
//! configuration must be clean), `TORTURE_BUSY_MS` (busy_timeout, default
//! 5000), `TORTURE_KEEP` (keep damaged databases under /tmp), `TORTURE_XFAIL`
//! (comma-separated journal modes, e.g. `wal`, whose writelock damage is
//! reported but not asserted — for a known, tracked bug only).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use writelock_tests::{outside_flock_free, tempdir, Mode, Rng, Shell};

const WORKER: &str = env!("CARGO_BIN_EXE_torture_worker");
const JOURNALS: [&str; 2] = ["delete", "wal"];
const WRITERS: u32 = 6;
const READER_ID: u32 = 7;
const MAINT_ID: u32 = 8;

/// The two tests share two cores; running them at once would distort both.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn env_f64(k: &str, default: f64) -> f64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn base_seed() -> u64 {
    std::env::var("TORTURE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_007
        })
}

/// `TORTURE_MODES` (e.g. `stock,appflock`) limits the configurations run.
fn wanted(mode: &str) -> bool {
    std::env::var("TORTURE_MODES").map_or(true, |m| m.split(',').any(|x| x.trim() == mode))
}

fn xfail(journal: &str) -> bool {
    std::env::var("TORTURE_XFAIL")
        .unwrap_or_default()
        .split(',')
        .any(|j| j.trim().eq_ignore_ascii_case(journal))
}

// ------------------------------------------------------------- processes

fn spawn(role: &str, db: &Path, mode: &str, secs: f64, seed: u64, id: u32) -> Child {
    let probe = env_f64("TORTURE_PROBE", 1.0) as u8 != 0;
    Command::new(WORKER)
        .arg(role)
        .arg("--db")
        .arg(db)
        .arg("--dir")
        .arg(db.parent().unwrap())
        .arg(format!("--mode={mode}"))
        .arg(format!("--secs={secs}"))
        .arg(format!("--seed={}", seed ^ (u64::from(id) << 32)))
        .arg(format!("--id={id}"))
        .arg(format!(
            "--busy={}",
            env_f64("TORTURE_BUSY_MS", 5000.0) as u64
        ))
        .arg(format!("--probe={}", u8::from(probe)))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start torture_worker")
}

/// Wait for a worker's JSON line; `None` if it hung past `limit` (killed) or
/// died without printing one.
fn wait_json(mut child: Child, limit: Instant) -> Option<serde_json::Value> {
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    s.lines().last().and_then(|l| serde_json::from_str(l).ok())
}

fn open_unix(db: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open_with_flags_and_vfs(db, OpenFlags::SQLITE_OPEN_READ_WRITE, "unix")?;
    c.busy_timeout(Duration::from_secs(5))?;
    Ok(c)
}

/// `PRAGMA integrity_check` through the plain `unix` VFS: its rows, or the
/// error that stopped it.
fn integrity(db: &Path) -> Vec<String> {
    let r = (|| -> rusqlite::Result<Vec<String>> {
        let c = open_unix(db)?;
        let mut s = c.prepare("PRAGMA integrity_check")?;
        let rows = s.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect()
    })();
    r.unwrap_or_else(|e| vec![format!("error: {e}")])
}

fn read_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Replay `+id`/`-id` lines: the most writers ever inside a write
/// transaction at once, and how many entries found another writer inside.
fn replay_overlap(p: &Path) -> (i64, u64) {
    let (mut now, mut max, mut events) = (0i64, 0i64, 0u64);
    for l in read_lines(p) {
        if l.starts_with('+') {
            if now >= 1 {
                events += 1;
            }
            now += 1;
            max = max.max(now);
        } else if l.starts_with('-') {
            now -= 1;
        }
    }
    (max, events)
}

// ------------------------------------------------------------- torture

#[derive(Default, Clone)]
struct Round {
    mode: &'static str,
    journal: &'static str,
    rounds: u32,
    wall: f64,
    commits: u64,
    reads: u64,
    probes: u64,
    vacuums: u64,
    checkpoints: u64,
    corrupt: u32,
    integrity: Vec<String>,
    max_overlap: i64,
    overlap_events: u64,
    lost: u64,
    phantom: u64,
    unverifiable: u32,
    malformed: u64,
    malformed_reads: u64,
    /// Workers that hung past the limit or died without a report.
    dead: u32,
    errors: BTreeMap<String, u64>,
}

impl Round {
    fn damaged(&self) -> bool {
        self.corrupt > 0
            || self.max_overlap > 1
            || self.lost > 0
            || self.phantom > 0
            || self.malformed > 0
            || self.unverifiable > 0
    }

    fn add(&mut self, o: &Round) {
        self.rounds += o.rounds;
        self.wall += o.wall;
        self.commits += o.commits;
        self.reads += o.reads;
        self.probes += o.probes;
        self.vacuums += o.vacuums;
        self.checkpoints += o.checkpoints;
        self.corrupt += o.corrupt;
        if self.integrity.is_empty() || self.integrity == ["ok"] {
            self.integrity = o.integrity.clone();
        }
        self.max_overlap = self.max_overlap.max(o.max_overlap);
        self.overlap_events += o.overlap_events;
        self.lost += o.lost;
        self.phantom += o.phantom;
        self.unverifiable += o.unverifiable;
        self.malformed += o.malformed;
        self.malformed_reads += o.malformed_reads;
        self.dead += o.dead;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }
}

const SCHEMA: &str = include_str!("torture-schema.sql");

fn create_torture_db(db: &Path, journal: &str) {
    let c = open_unix_create(db);
    c.execute_batch(&format!("PRAGMA journal_mode={journal};"))
        .unwrap();
    c.execute_batch(&format!("BEGIN; {SCHEMA} COMMIT;"))
        .unwrap();
    for w in 1..=WRITERS {
        c.execute("INSERT INTO counters(worker, n) VALUES (?1, 0)", [w])
            .unwrap();
    }
}

fn open_unix_create(db: &Path) -> Connection {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
    Connection::open_with_flags_and_vfs(db, flags, "unix").unwrap()
}

/// Lost updates: each committed tag must be in `runs`, and each writer's
/// counter must hold as many increments as its log has lines. Returns
/// (lost, phantom = counter above the log, or `None` if unreadable).
fn lost_updates(db: &Path, dir: &Path) -> Option<(u64, u64)> {
    let c = open_unix(db).ok()?;
    let tags: HashSet<String> = {
        let mut s = c.prepare("SELECT tag FROM runs NOT INDEXED").ok()?;
        let rows = s.query_map([], |r| r.get::<_, String>(0)).ok()?;
        rows.collect::<rusqlite::Result<_>>().ok()?
    };
    let counters: BTreeMap<u32, i64> = {
        let mut s = c
            .prepare("SELECT worker, n FROM counters NOT INDEXED")
            .ok()?;
        let rows = s
            .query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)?)))
            .ok()?;
        rows.collect::<rusqlite::Result<_>>().ok()?
    };
    let (mut lost, mut phantom) = (0u64, 0u64);
    for w in 1..=WRITERS {
        let logged = read_lines(&dir.join(format!("committed.{w}")));
        let missing = logged.iter().filter(|t| !tags.contains(*t)).count() as i64;
        let n = counters.get(&w).copied().unwrap_or(0);
        let deficit = logged.len() as i64 - n;
        lost += missing.max(deficit).max(0) as u64;
        phantom += (-deficit).max(0) as u64;
    }
    Some((lost, phantom))
}

/// One round: 6 writers, a reader and maintenance for `secs`, then the checks.
fn run_round(mode: &'static str, journal: &'static str, secs: f64, seed: u64) -> Round {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_torture_db(&db, journal);
    let t0 = Instant::now();
    let mut kids = Vec::new();
    for id in 1..=WRITERS {
        kids.push(spawn("writer", &db, mode, secs, seed, id));
    }
    kids.push(spawn("reader", &db, mode, secs, seed, READER_ID));
    kids.push(spawn("maintenance", &db, mode, secs, seed, MAINT_ID));
    // busy_timeout is 5 s; a worker still running a minute after its
    // deadline is stuck.
    let limit = t0 + Duration::from_secs_f64(secs + 60.0);
    let mut r = Round {
        mode,
        journal,
        rounds: 1,
        ..Round::default()
    };
    for k in kids {
        let Some(v) = wait_json(k, limit) else {
            r.dead += 1;
            continue;
        };
        let n = |f: &str| v[f].as_u64().unwrap_or(0);
        match v["role"].as_str() {
            Some("writer") => r.commits += n("commits"),
            Some("reader") => {
                r.reads += n("commits");
                r.malformed_reads += n("malformed");
            }
            _ => {}
        }
        r.probes += n("probes");
        r.vacuums += n("vacuums");
        r.checkpoints += n("checkpoints");
        r.malformed += n("malformed");
        if let Some(errs) = v["errors"].as_object() {
            for (k, c) in errs {
                *r.errors.entry(k.clone()).or_default() += c.as_u64().unwrap_or(0);
            }
        }
    }
    r.wall = t0.elapsed().as_secs_f64();
    (r.max_overlap, r.overlap_events) = replay_overlap(&dir.path().join("overlap.log"));
    r.integrity = integrity(&db);
    if r.integrity != ["ok"] {
        r.corrupt = 1;
    }
    match lost_updates(&db, dir.path()) {
        Some((lost, phantom)) => (r.lost, r.phantom) = (lost, phantom),
        None => r.unverifiable = 1,
    }
    if std::env::var_os("TORTURE_KEEP").is_some() && r.damaged() {
        let keep = PathBuf::from(format!("/tmp/torture-{mode}-{journal}-{seed}"));
        let _ = std::fs::remove_dir_all(&keep);
        let _ = std::fs::rename(dir.path(), &keep);
        eprintln!("kept {}", keep.display());
    }
    r
}

/// The first integrity_check messages, on one line.
fn brief(integrity: &[String]) -> String {
    let all = integrity.join("\n");
    let lines: Vec<&str> = all.lines().filter(|l| !l.starts_with("***")).collect();
    let mut s = lines
        .iter()
        .take(3)
        .copied()
        .collect::<Vec<_>>()
        .join(" | ");
    if lines.len() > 3 {
        write!(s, " | … ({} messages)", lines.len()).unwrap();
    }
    s
}

const HEADER: &str = "mode      journal runs  secs commits  reads  probes vac/ckpt corrupt overlap(events) lost phantom malformed(reader) dead  errors by kind";

fn table_row(r: &Round) -> String {
    let lost = if r.unverifiable > 0 {
        format!("{}+?", r.lost)
    } else {
        r.lost.to_string()
    };
    let mut errs: Vec<_> = r.errors.iter().collect();
    errs.sort_by(|a, b| b.1.cmp(a.1));
    let errs = errs
        .iter()
        .map(|(k, v)| format!("{v}× {k}"))
        .collect::<Vec<_>>()
        .join("; ");
    let mut s = format!(
        "{:<9} {:<7} {:>4} {:>5.1} {:>7} {:>6} {:>7} {:>8} {:>7} {:>7}({:>5}) {:>4} {:>7} {:>9}({:>6}) {:>4}  {}",
        r.mode,
        r.journal,
        r.rounds,
        r.wall,
        r.commits,
        r.reads,
        r.probes,
        format!("{}/{}", r.vacuums, r.checkpoints),
        format!("{}/{}", r.corrupt, r.rounds),
        r.max_overlap,
        r.overlap_events,
        lost,
        r.phantom,
        r.malformed,
        r.malformed_reads,
        r.dead,
        if errs.is_empty() { "-".into() } else { errs }
    );
    if r.corrupt > 0 {
        write!(s, "\n{:>18} integrity: {}", "", brief(&r.integrity)).unwrap();
    }
    s
}

fn table(rows: &[Round]) -> String {
    let mut s = format!("{HEADER}\n");
    for r in rows {
        writeln!(s, "{}", table_row(r)).unwrap();
    }
    s
}

#[test]
fn torture_with_and_without_extension() {
    let _serial = serial();
    let secs = env_f64("TORTURE_SECS", 6.0);
    let seed = base_seed();
    let t0 = Instant::now();
    eprintln!("torture: {secs} s per round, TORTURE_SEED={seed}\n{HEADER}");

    let mut rows = Vec::new();
    let round = |mode, journal, salt: u64| {
        let r = run_round(mode, journal, secs, seed.wrapping_add(salt));
        eprintln!("{}", table_row(&r));
        r
    };

    for (i, journal) in JOURNALS.into_iter().enumerate() {
        if wanted("writelock") {
            rows.push(round("writelock", journal, i as u64));
        }
    }
    // Stock SQLite must show the damage. It does in almost every round; to
    // never flake on a lucky one, repeat (bounded) until a round shows it.
    let mut stock: Vec<Round> = JOURNALS
        .iter()
        .map(|j| Round {
            mode: "stock",
            journal: j,
            ..Round::default()
        })
        .collect();
    for attempt in 0..if wanted("stock") { 3u64 } else { 0 } {
        for (i, journal) in JOURNALS.into_iter().enumerate() {
            let r = round("stock", journal, 100 + attempt * 10 + i as u64);
            stock[i].add(&r);
        }
        if stock.iter().any(Round::damaged) {
            break;
        }
    }
    if wanted("stock") {
        rows.extend(stock.iter().cloned());
    }
    for (i, journal) in JOURNALS.into_iter().enumerate() {
        if wanted("appflock") {
            rows.push(round("appflock", journal, 200 + i as u64));
        }
    }
    let summary = table(&rows);
    println!(
        "\ntorture summary ({secs} s per round, seed {seed}, {:.0} s in all):\n{summary}",
        t0.elapsed().as_secs_f64()
    );

    let mut failures = Vec::new();
    for r in rows.iter().filter(|r| r.mode == "writelock") {
        let mut bad = Vec::new();
        if r.corrupt > 0 {
            bad.push(format!("integrity_check: {}", brief(&r.integrity)));
        }
        if r.max_overlap > 1 {
            bad.push(format!(
                "{} writers inside write transactions at once ({} times)",
                r.max_overlap, r.overlap_events
            ));
        }
        if r.lost > 0 || r.unverifiable > 0 {
            bad.push(format!(
                "{} lost updates (unverifiable: {})",
                r.lost, r.unverifiable
            ));
        }
        if r.malformed > 0 {
            bad.push(format!(
                "{} 'malformed' errors ({} in the reader)",
                r.malformed, r.malformed_reads
            ));
        }
        if r.dead > 0 {
            bad.push(format!("{} workers hung or died without a report", r.dead));
        }
        if r.commits < 20 {
            bad.push(format!("only {} commits", r.commits));
        }
        if !bad.is_empty() {
            let msg = format!("writelock {}: {}", r.journal, bad.join("; "));
            if xfail(r.journal) {
                eprintln!("TORTURE_XFAIL, not asserted: {msg}");
            } else {
                failures.push(msg);
            }
        }
    }
    if wanted("stock") && !stock.iter().any(Round::damaged) {
        failures.push(format!(
            "stock SQLite showed no damage in {} rounds: the workload proves nothing",
            stock.iter().map(|r| r.rounds).sum::<u32>()
        ));
    }
    assert!(failures.is_empty(), "{}\n{summary}", failures.join("\n"));
}

// ------------------------------------------------------------- crash safety

const CRASH_SCHEMA: &str = "
CREATE TABLE crash(id INTEGER PRIMARY KEY, tag TEXT UNIQUE, payload BLOB);
CREATE TABLE filler(x BLOB);
CREATE TABLE total(n INT NOT NULL);
INSERT INTO total VALUES (0);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 300)
  INSERT INTO filler SELECT randomblob(900) FROM n;
";

#[derive(Default)]
struct Crash {
    kills: u32,
    /// Where the kills landed (phase byte of the killed crasher, see
    /// `crasher` in the worker): counts per phase.
    phases: BTreeMap<char, u32>,
    hot_after_kill: u32,
    committed: usize,
    rows: i64,
    total: i64,
    missing: usize,
    lock_stuck: u32,
    fresh_failed: Vec<String>,
    fresh_max_ms: f64,
    integrity: Vec<String>,
}

fn crash_run(mode: &str, journal: &str, rounds: u32, seed: u64) -> Crash {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    {
        let c = open_unix_create(&db);
        c.execute_batch(&format!(
            "PRAGMA journal_mode={journal}; BEGIN; {CRASH_SCHEMA} COMMIT;"
        ))
        .unwrap();
    }
    let mut rng = Rng(seed);
    let mut out = Crash::default();
    for r in 0..rounds {
        let mut a = spawn("crasher", &db, mode, 60.0, seed, 2 * r);
        let mut b = spawn("crasher", &db, mode, 60.0, seed, 2 * r + 1);
        std::thread::sleep(Duration::from_millis(rng.range(30, 400)));
        a.kill().unwrap();
        a.wait().unwrap();
        std::thread::sleep(Duration::from_millis(rng.range(0, 60)));
        b.kill().unwrap();
        b.wait().unwrap();
        out.kills += 2;
        for id in [2 * r, 2 * r + 1] {
            let p = std::fs::read(dir.path().join(format!("phase.c{id}"))).unwrap_or_default();
            let ph = p.first().map_or('-', |b| *b as char);
            *out.phases.entry(ph).or_default() += 1;
        }
        let hot = if journal == "wal" {
            std::fs::metadata(dir.path().join("app.db-wal")).is_ok_and(|m| m.len() > 0)
        } else {
            std::fs::read(dir.path().join("app.db-journal"))
                .is_ok_and(|j| j.first().is_some_and(|b| *b != 0))
        };
        out.hot_after_kill += u32::from(hot);
        // The kernel dropped the dead writers' flock: free right now.
        if !outside_flock_free(&db) {
            out.lock_stuck += 1;
        }
        let one = spawn("oneshot", &db, mode, 1.0, seed, r);
        match wait_json(one, Instant::now() + Duration::from_secs(30)) {
            Some(v) if v["ok"] == true => {
                let ms = v["ms"].as_f64().unwrap_or(f64::MAX);
                out.fresh_max_ms = out.fresh_max_ms.max(ms);
                if ms >= 1000.0 {
                    out.fresh_failed.push(format!("round {r}: {ms:.0} ms"));
                }
            }
            other => out.fresh_failed.push(format!("round {r}: {other:?}")),
        }
    }
    out.integrity = integrity(&db);
    let c = open_unix(&db).unwrap();
    let tags: HashSet<String> = c
        .prepare("SELECT tag FROM crash NOT INDEXED")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    out.rows = tags.len() as i64;
    out.total = c
        .query_row("SELECT n FROM total", [], |r| r.get(0))
        .unwrap();
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("committed.")
        {
            for t in read_lines(&p) {
                out.committed += 1;
                if !tags.contains(&t) {
                    out.missing += 1;
                }
            }
        }
    }
    out
}

/// "txn/COMMIT/waiting/other" from the phase counts.
fn landed(p: &BTreeMap<char, u32>) -> String {
    let g = |c: char| p.get(&c).copied().unwrap_or(0);
    let other: u32 = p
        .iter()
        .filter(|(c, _)| !"tcw".contains(**c))
        .map(|(_, n)| n)
        .sum();
    format!("{}/{}/{}/{}", g('t'), g('c'), g('w'), other)
}

#[test]
fn crash_safety_sigkill() {
    let _serial = serial();
    let seed = base_seed();
    let kills = env_f64("TORTURE_KILLS", 24.0) as u32;
    let t0 = Instant::now();
    let mut report = format!(
        "{:<9} {:<6} {:>5} {:<16} {:>9} {:>9} {:>7} {:>6} {:>7} {:>5} {:>9} {:>9}  integrity\n",
        "mode",
        "journal",
        "kills",
        "txn/COMMIT/wait/-",
        "hot-after",
        "committed",
        "missing",
        "rows",
        "total",
        "stuck",
        "fresh-max",
        "fresh-bad"
    );
    let mut failures = Vec::new();
    for (i, journal) in JOURNALS.into_iter().enumerate() {
        // Stock SQLite is crash-safe too; it runs for comparison, fewer times.
        for (mode, k) in [("writelock", kills), ("stock", (kills / 3).max(2))] {
            let c = crash_run(mode, journal, k.div_ceil(2), seed.wrapping_add(i as u64));
            writeln!(
                report,
                "{:<9} {:<6} {:>5} {:<16} {:>9} {:>9} {:>7} {:>6} {:>7} {:>5} {:>7.0}ms {:>9}  {}",
                mode,
                journal,
                c.kills,
                landed(&c.phases),
                c.hot_after_kill,
                c.committed,
                c.missing,
                c.rows,
                c.total,
                c.lock_stuck,
                c.fresh_max_ms,
                c.fresh_failed.len(),
                brief(&c.integrity)
            )
            .unwrap();
            let mut bad = Vec::new();
            if c.integrity != ["ok"] {
                bad.push(format!("integrity: {}", brief(&c.integrity)));
            }
            if c.missing > 0 {
                bad.push(format!("{} committed transactions lost", c.missing));
            }
            if c.total != c.rows {
                bad.push(format!("not atomic: total {} vs {} rows", c.total, c.rows));
            }
            if c.lock_stuck > 0 {
                bad.push(format!("<db>.lock still held after {} kills", c.lock_stuck));
            }
            if !c.fresh_failed.is_empty() {
                bad.push(format!("fresh writer not within 1 s: {:?}", c.fresh_failed));
            }
            if !bad.is_empty() {
                failures.push(format!("{mode} {journal}: {}", bad.join("; ")));
            }
        }

        // What the extension adds: a writer killed while it holds the lock
        // releases <db>.lock at once (the kernel drops flock on death).
        let dir = tempdir();
        let db = dir.path().join("app.db");
        open_unix_create(&db)
            .execute_batch(&format!(
                "PRAGMA journal_mode={journal}; CREATE TABLE t(x);"
            ))
            .unwrap();
        let mut sh = Shell::start(&db, Mode::Writelock);
        sh.run("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);");
        let held = !outside_flock_free(&db);
        sh.kill();
        let freed = outside_flock_free(&db);
        writeln!(
            report,
            "kill -9 of a writer holding the lock ({journal}): held before {held}, free right after {freed}"
        )
        .unwrap();
        if !(held && freed) {
            failures.push(format!(
                "{journal}: killed writer's lock: held before {held}, free after {freed}"
            ));
        }
    }
    println!(
        "\ncrash safety (seed {seed}, {:.0} s):\n{report}",
        t0.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}\n{report}", failures.join("\n"));
}
