//! Every client without code changes: the `sqlite3` shell, Python (Debian's
//! `/usr/bin/python3` with `enable_load_extension`, and the `python3` on PATH,
//! which here lacks it), Rust (linked `writelock::register()` and
//! `load_extension`), Node (better-sqlite3 12) — each on its own, and all of
//! them writing one database at the same time.
//!
//! Every client speaks one small protocol (`status`, `hold`, `try`, `write N`;
//! see `examples/src/bin/worker.rs`), so every lock test runs the same way for
//! all of them, with the extension and without it.
//!
//! The snippets of docs/clients.md live in files (`bindings/snippets/*`,
//! `examples/src/bin/{register,load}.rs`); the tests here run each of them,
//! and [`docs_quote_every_snippet_and_readme_lines_come_from_them`] checks
//! that docs/clients.md quotes each verbatim and README.md's lines are theirs.
//!
//! Needs: `sqlite3`, `flock(1)`, `/usr/bin/python3` with `venv`, a `python3`
//! on PATH, `node` and `npm` (PyPI and the npm registry reachable for the
//! first install). Builds on first use, once per test process: the Rust
//! examples (`cargo build --release -p writelock-examples`), one venv per
//! interpreter under `target/clients/` (`pip install ./bindings/python`, the
//! install line of the docs), better-sqlite3 in `bindings/node/node_modules`.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use writelock_tests::{lock_path, open, outside_flock_free, so_path, tempdir, FlockHolder, Mode};

// ---- the repository and its snippets -----------------------------------------

fn repo() -> &'static Path {
    static R: OnceLock<PathBuf> = OnceLock::new();
    R.get_or_init(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .canonicalize()
            .unwrap()
    })
}

/// Files whose whole content docs/clients.md must quote, each run by a test here.
const SNIPPETS: [&str; 9] = [
    "bindings/snippets/shell.sh",
    "bindings/snippets/python-install.sh",
    "bindings/snippets/python.py",
    "bindings/snippets/python-run.sh",
    "bindings/snippets/python-sitecustomize.sh",
    "bindings/snippets/python-pth.sh",
    "bindings/snippets/node.js",
    "examples/src/bin/register.rs",
    "examples/src/bin/load.rs",
];

fn snippet(rel: &str) -> PathBuf {
    let p = repo().join(rel);
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

/// A temporary working directory in which the snippets' relative paths work:
/// `./target` is a symlink to the repository's `target/`.
fn scratch() -> tempfile::TempDir {
    let d = tempdir();
    std::os::unix::fs::symlink(repo().join("target"), d.path().join("target")).unwrap();
    d
}

// ---- running things ------------------------------------------------------------

fn text(o: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run to completion; panic with everything it printed unless it succeeded.
fn run_ok(what: &str, cmd: &mut Command) -> String {
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    assert!(o.status.success(), "{what} failed: {cmd:?}\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `command` with `dir/bin` first on PATH (a venv, node_modules/.bin, …).
fn path_with(dir: &Path) -> OsString {
    let mut p = OsString::from(dir);
    if let Some(old) = std::env::var_os("PATH") {
        p.push(":");
        p.push(old);
    }
    p
}

// ---- clients, built once per test process --------------------------------------

/// `target/release`, after building the Rust examples (`writelock-examples`).
fn examples_dir() -> &'static Path {
    static E: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = E.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        // Its own cargo invocation: never together with the root cdylib (the
        // `links` trap in examples/Cargo.toml).
        let o = Command::new(cargo)
            .args(["build", "--release", "-p", "writelock-examples"])
            .current_dir(repo())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(format!(
                "cargo build --release -p writelock-examples:\n{}",
                text(&o)
            ));
        }
        Ok(repo().join("target/release"))
    });
    match r {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// better-sqlite3 12, installed from `bindings/node/package.json`.
fn node_ready() {
    static N: OnceLock<Result<(), String>> = OnceLock::new();
    let r = N.get_or_init(|| {
        let dir = repo().join("bindings/node");
        let o = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--no-package-lock"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("npm (Node.js) is needed: {e}"))?;
        if !o.status.success() {
            return Err(format!("npm install in {}:\n{}", dir.display(), text(&o)));
        }
        Ok(())
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// The Python interpreters under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Py {
    /// Debian's `/usr/bin/python3`: has `enable_load_extension`.
    Debian,
    /// The `python3` on PATH (pyenv's 3.11 here): no `enable_load_extension`,
    /// so `install()` goes through ctypes. Where it has it, the tests force
    /// the ctypes path with `SQLITE_WRITELOCK_LOADER=ctypes`.
    OnPath,
    /// Debian's, in a venv of its own for the `.pth` recipe (which changes
    /// every program of the venv).
    DebianPth,
}

struct Venv {
    dir: PathBuf,
    /// Environment for every process of this venv.
    env: Vec<(&'static str, OsString)>,
    /// What `install()` must report.
    expect_how: &'static str,
}

impl Venv {
    fn python(&self) -> PathBuf {
        self.dir.join("bin/python")
    }

    /// This venv's environment: first on PATH (so a snippet's `python` is
    /// this one), no PYTHONPATH or WRITELOCK_PATH from outside.
    fn env(&self, c: &mut Command) {
        c.env("PATH", path_with(&self.dir.join("bin")))
            .env("VIRTUAL_ENV", &self.dir)
            .env_remove("PYTHONPATH")
            .env_remove("WRITELOCK_PATH")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
    }

    /// `python …` in this venv, in `cwd`.
    fn cmd(&self, cwd: &Path) -> Command {
        let mut c = Command::new(self.python());
        self.env(&mut c);
        c.current_dir(cwd);
        c
    }

    /// `sh FILE` with this venv's environment, in `cwd`.
    fn sh(&self, file: &Path, cwd: &Path) -> Command {
        let mut c = Command::new("sh");
        self.env(&mut c);
        c.arg(file).current_dir(cwd);
        c
    }
}

/// Serializes `pip install ./bindings/python`: the in-tree builds share
/// `target/python`.
static PIP: Mutex<()> = Mutex::new(());

/// The venv of `py`, made (and the package installed) on first use.
fn venv(py: Py) -> &'static Venv {
    static SLOTS: [OnceLock<Result<Venv, String>>; 3] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    match SLOTS[py as usize].get_or_init(|| make_venv(py)) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

fn make_venv(py: Py) -> Result<Venv, String> {
    let base: PathBuf = match py {
        Py::Debian | Py::DebianPth => "/usr/bin/python3".into(),
        Py::OnPath => {
            let o = Command::new("python3")
                .args(["-c", "import sys; print(sys.executable)"])
                .output()
                .map_err(|e| format!("a python3 on PATH is needed: {e}"))?;
            String::from_utf8_lossy(&o.stdout).trim().into()
        }
    };
    if !base.exists() {
        return Err(format!(
            "{} is needed (apt-get install python3 python3-venv)",
            base.display()
        ));
    }
    let has_ele = Command::new(&base)
        .args([
            "-c",
            "import sqlite3; print(hasattr(sqlite3.Connection, 'enable_load_extension'))",
        ])
        .output()
        .map_err(|e| e.to_string())?;
    let has_ele = String::from_utf8_lossy(&has_ele.stdout).trim() == "True";
    let (env, expect_how): (Vec<(&'static str, OsString)>, _) = match py {
        Py::Debian | Py::DebianPth => {
            if !has_ele {
                return Err(format!(
                    "{} should have enable_load_extension",
                    base.display()
                ));
            }
            (vec![], "enable_load_extension")
        }
        Py::OnPath if has_ele => (vec![("SQLITE_WRITELOCK_LOADER", "ctypes".into())], "ctypes"),
        Py::OnPath => (vec![], "ctypes"),
    };
    let name = match py {
        Py::Debian => "venv-debian",
        Py::OnPath => "venv-path",
        Py::DebianPth => "venv-debian-pth",
    };
    let dir = repo().join("target/clients").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let o = Command::new(&base)
        .args(["-m", "venv"])
        .arg(&dir)
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(format!(
            "{} -m venv {}:\n{}",
            base.display(),
            dir.display(),
            text(&o)
        ));
    }
    let v = Venv {
        dir,
        env,
        expect_how,
    };
    // The install line of docs/clients.md and the README, run as written from the repository root.
    let _g = PIP.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    let o = v
        .sh(&snippet("bindings/snippets/python-install.sh"), repo())
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env("PIP_NO_INPUT", "1")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(format!(
            "pip install ./bindings/python ({py:?}):\n{}",
            text(&o)
        ));
    }
    eprintln!(
        "venv {py:?} ({}): pip install took {:?}",
        base.display(),
        t.elapsed()
    );
    Ok(v)
}

/// One client program, run with the worker protocol.
#[derive(Clone)]
struct Client {
    name: String,
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    protected: bool,
}

impl Client {
    fn command(&self, db: &Path, cmd: &[&str]) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args)
            .arg(db)
            .args(cmd)
            .env_remove("PYTHONPATH")
            .env("WORKER_TAG", &self.name)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Run `cmd` to the end and parse what it printed.
    fn run(&self, db: &Path, cmd: &[&str]) -> Report {
        let o = self
            .command(db, cmd)
            .output()
            .unwrap_or_else(|e| panic!("{}: cannot start: {e}", self.name));
        let r = Report::parse(&self.name, &o);
        assert!(
            o.status.success(),
            "{} {cmd:?} failed:\n{}",
            self.name,
            r.raw
        );
        r
    }

    fn spawn(&self, db: &Path, cmd: &[&str], stdin: bool) -> Running {
        let mut c = self.command(db, cmd);
        if stdin {
            c.stdin(Stdio::piped());
        }
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot start: {e}", self.name));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Running {
            name: self.name.clone(),
            child,
            stdin,
            stdout,
            lines: Vec::new(),
        }
    }
}

/// What a worker printed.
#[derive(Debug)]
struct Report {
    name: String,
    sqlite_version: Option<String>,
    /// `writelock_status()`, or None when the function does not exist.
    status: Option<Value>,
    lines: Vec<String>,
    raw: String,
}

impl Report {
    fn parse(name: &str, o: &Output) -> Report {
        Report::from_lines(name, String::from_utf8_lossy(&o.stdout).lines(), text(o))
    }

    fn from_lines<'a>(name: &str, lines: impl Iterator<Item = &'a str>, raw: String) -> Report {
        let mut r = Report {
            name: name.into(),
            sqlite_version: None,
            status: None,
            lines: Vec::new(),
            raw,
        };
        for l in lines {
            if let Some(v) = l.strip_prefix("sqlite_version=") {
                r.sqlite_version = Some(v.into());
            } else if let Some(s) = l.strip_prefix("status=") {
                r.status = serde_json::from_str(s).ok();
            }
            r.lines.push(l.into());
        }
        r
    }

    /// `protected` of the database at `db` in `writelock_status()`.
    fn protected(&self) -> Option<bool> {
        let st = self.status.as_ref()?;
        let dbs = st["databases"].as_array()?;
        let main = dbs.iter().find(|d| d["schema"] == "main")?;
        main["protected"].as_bool()
    }

    fn has_line(&self, l: &str) -> bool {
        self.lines.iter().any(|x| x.trim() == l)
    }

    fn locked(&self) -> bool {
        self.raw.contains("database is locked")
    }

    fn assert_protected(&self, expect: bool) {
        if expect {
            assert_eq!(
                self.protected(),
                Some(true),
                "{}: not protected:\n{}",
                self.name,
                self.raw
            );
            assert_eq!(
                self.status.as_ref().unwrap()["vfs"],
                "writelock",
                "{}",
                self.raw
            );
        } else {
            assert!(
                self.status.is_none(),
                "{}: writelock_status() exists without the extension:\n{}",
                self.name,
                self.raw
            );
        }
    }
}

/// A worker still running (`hold`, or `write` alongside others).
struct Running {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    lines: Vec<String>,
}

impl Running {
    /// Read lines until one equals `want`; panic if the worker ends first.
    fn wait_for(&mut self, want: &str) {
        loop {
            let mut l = String::new();
            if self.stdout.read_line(&mut l).unwrap() == 0 {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!(
                    "{}: ended before {want:?}; stdout:\n{}\nstderr:\n{err}",
                    self.name,
                    self.lines.join("\n")
                );
            }
            let l = l.trim_end().to_string();
            self.lines.push(l.clone());
            if l == want {
                return;
            }
        }
    }

    /// Send a line (the `hold` worker then commits).
    fn send_line(&mut self) {
        let s = self.stdin.as_mut().expect("spawned with stdin");
        s.write_all(b"go\n").unwrap();
        s.flush().unwrap();
    }

    /// Wait for the end; the whole output as a [`Report`].
    fn finish(mut self) -> Report {
        drop(self.stdin.take());
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest).unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        let st = self.child.wait().unwrap();
        let mut all = self.lines.join("\n");
        all.push('\n');
        all.push_str(&rest);
        let raw = format!("status: {st}\n--- stdout\n{all}--- stderr\n{err}");
        let r = Report::from_lines(&self.name, all.lines(), raw);
        assert!(st.success(), "{} failed:\n{}", self.name, r.raw);
        r
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn shell_client(protected: bool) -> Client {
    Client {
        name: if protected { "shell" } else { "shell-stock" }.into(),
        program: "sh".into(),
        args: vec![
            repo().join("bindings/shell/worker.sh").into(),
            if protected { "load" } else { "stock" }.into(),
        ],
        env: vec![("WRITELOCK_PATH".into(), so_path().into())],
        protected,
    }
}

fn python_client(py: Py, protected: bool) -> Client {
    let v = venv(py);
    let worker = repo().join("bindings/python/tests/worker.py");
    let mut args: Vec<OsString> = Vec::new();
    if protected {
        args.extend(["-m".into(), "sqlite_writelock".into(), "run".into()]);
    }
    args.push(worker.into());
    let mut env: Vec<(OsString, OsString)> = v
        .env
        .iter()
        .map(|(k, v)| (OsString::from(k), v.clone()))
        .collect();
    env.push(("PATH".into(), path_with(&v.dir.join("bin"))));
    let tag = match py {
        Py::Debian | Py::DebianPth => "python-debian",
        Py::OnPath => "python-path",
    };
    Client {
        name: if protected {
            tag.to_string()
        } else {
            format!("{tag}-stock")
        },
        program: v.python().into(),
        args,
        env,
        protected,
    }
}

fn rust_client(mode: &str) -> Client {
    Client {
        name: format!("rust-{mode}"),
        program: examples_dir().join("writelock-client-worker").into(),
        args: vec![mode.into()],
        env: vec![("WRITELOCK_PATH".into(), so_path().into())],
        protected: mode != "stock",
    }
}

fn node_client(protected: bool) -> Client {
    node_ready();
    Client {
        name: if protected { "node" } else { "node-stock" }.into(),
        program: "node".into(),
        args: vec![
            repo().join("bindings/node/test/worker.js").into(),
            if protected { "load" } else { "stock" }.into(),
        ],
        env: vec![("WRITELOCK_PATH".into(), so_path().into())],
        protected,
    }
}

/// Every client, each loading the extension its own way.
fn protected_clients() -> Vec<Client> {
    vec![
        shell_client(true),
        python_client(Py::Debian, true),
        python_client(Py::OnPath, true),
        rust_client("register"),
        rust_client("load"),
        node_client(true),
    ]
}

/// The same programs without the extension.
fn stock_clients() -> Vec<Client> {
    vec![
        shell_client(false),
        python_client(Py::Debian, false),
        python_client(Py::OnPath, false),
        rust_client("stock"),
        node_client(false),
    ]
}

// ---- databases -----------------------------------------------------------------

fn create_db(db: &Path, journal: &str) {
    let c = open(db, Mode::Stock);
    c.execute_batch(&format!(
        "PRAGMA journal_mode={journal};
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, client TEXT, i INTEGER, ts REAL);"
    ))
    .unwrap();
}

fn query_i64(db: &Path, sql: &str) -> i64 {
    let c = open(db, Mode::Stock);
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn integrity(db: &Path) -> String {
    let c = open(db, Mode::Stock);
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

/// `flock -w 30 <db>.lock` for 0.3 s, from another process; the window it
/// held the lock, in Unix milliseconds (the clock SQLite's `julianday('now')` uses).
fn flock_window(db: &Path) -> (f64, f64) {
    let out = run_ok(
        "flock(1) window",
        Command::new("flock")
            .args(["-w", "30"])
            .arg(lock_path(db))
            .args(["sh", "-c", "date +%s%3N; sleep 0.3; date +%s%3N"]),
    );
    let v: Vec<f64> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(v.len(), 2, "{out}");
    (v[0], v[1])
}

/// Start `clients` writing `n` transactions each into `db` at once; while they
/// run, a `flock(1)` job holds `<db>.lock` for 0.3 s. Checks the row counts,
/// integrity, that every client was protected, and that no row was written
/// while `flock(1)` held the lock. Returns the SQLite version of each client.
fn write_together(db: &Path, clients: &[Client], n: usize) -> Vec<(String, String)> {
    let t = Instant::now();
    let mut running: Vec<Running> = clients
        .iter()
        .map(|c| c.spawn(db, &["write", &n.to_string()], false))
        .collect();
    // Hold the lock from outside as soon as the first client has committed:
    // the others are then starting or writing, and each has all or nearly all
    // of its transactions still to do, so the hold falls inside the run
    // however long flock(1) has to wait for its turn. (The client's own word,
    // not a poll of the database: in DELETE mode a reader can wait a long time
    // among busy writers.)
    running[0].wait_for("writing");
    let asked = Instant::now();
    let (start, end) = flock_window(db);
    let flock_wait = asked.elapsed().saturating_sub(Duration::from_millis(300));
    let reports: Vec<Report> = running.into_iter().map(Running::finish).collect();
    let elapsed = t.elapsed();
    let mut versions = Vec::new();
    for r in &reports {
        r.assert_protected(true);
        assert!(r.has_line(&format!("done={n}")), "{}:\n{}", r.name, r.raw);
        versions.push((r.name.clone(), r.sqlite_version.clone().unwrap_or_default()));
    }
    let total = query_i64(db, "SELECT count(*) FROM t");
    assert_eq!(total as usize, clients.len() * n);
    for c in clients {
        let k = query_i64(
            db,
            &format!("SELECT count(*) FROM t WHERE client = '{}'", c.name),
        );
        assert_eq!(k as usize, n, "rows of {}", c.name);
    }
    assert_eq!(integrity(db), "ok");
    // 1 ms margins: SQLite's clock has millisecond steps, seen through a double.
    let under = query_i64(
        db,
        &format!("SELECT count(*) FROM t WHERE ts > {start} + 1 AND ts < {end} - 1"),
    );
    let before = query_i64(db, &format!("SELECT count(*) FROM t WHERE ts <= {start}"));
    let after = query_i64(db, &format!("SELECT count(*) FROM t WHERE ts >= {end}"));
    assert_eq!(
        under,
        0,
        "rows written while flock(1) held {}",
        lock_path(db).display()
    );
    assert!(
        before > 0 && after > 0,
        "the flock(1) window did not fall inside the run ({before} rows before, {after} after)"
    );
    let per_client: Vec<String> = clients
        .iter()
        .map(|c| {
            let q = |cond: &str| {
                query_i64(
                    db,
                    &format!(
                        "SELECT count(*) FROM t WHERE client = '{}' AND {cond}",
                        c.name
                    ),
                )
            };
            format!(
                "{} {}/{}",
                c.name,
                q(&format!("ts <= {start}")),
                q(&format!("ts >= {end}"))
            )
        })
        .collect();
    eprintln!("rows before/after the hold: {}", per_client.join(", "));
    eprintln!(
        "{} clients x {n} transactions in {elapsed:?}: {total} rows, integrity ok, \
         {before} rows before / 0 during / {after} after a 0.3 s flock(1) hold \
         (which waited about {flock_wait:?} for the lock)",
        clients.len()
    );
    versions
}

// ---- every client on its own ----------------------------------------------------

/// Each client reports `"protected": true` for a database it opened, and
/// prints its SQLite version; without the extension `writelock_status()`
/// does not exist.
#[test]
fn every_client_is_protected_and_says_so() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_db(&db, "wal");
    let mut versions = Vec::new();
    for c in protected_clients().into_iter().chain(stock_clients()) {
        let r = c.run(&db, &["status"]);
        r.assert_protected(c.protected);
        let v = r.sqlite_version.clone();
        let v = v.unwrap_or_else(|| panic!("{}: no version:\n{}", c.name, r.raw));
        versions.push(format!("{}: SQLite {v}", c.name));
    }
    eprintln!("{}", versions.join("\n"));
}

/// While any client holds a write transaction, an outside `flock -n <db>.lock`
/// fails and the next client's write gets `database is locked`; after COMMIT
/// the lock is free. Without the extension the same transaction leaves the
/// lock file alone.
#[test]
fn every_client_holds_the_lock_file_while_writing() {
    for journal in ["wal", "delete"] {
        let dir = tempdir();
        let db = dir.path().join("app.db");
        create_db(&db, journal);
        let clients = protected_clients();
        for (i, c) in clients.iter().enumerate() {
            let mut h = c.spawn(&db, &["hold"], true);
            h.wait_for("holding");
            assert!(
                !outside_flock_free(&db),
                "{journal}: {} holds a write transaction but <db>.lock is free",
                c.name
            );
            let other = &clients[(i + 1) % clients.len()];
            let r = other.run(&db, &["try"]);
            assert!(
                r.locked(),
                "{journal}: {} wrote while {} held a write transaction:\n{}",
                other.name,
                c.name,
                r.raw
            );
            h.send_line();
            h.wait_for("committed");
            let r = h.finish();
            r.assert_protected(true);
            assert!(
                outside_flock_free(&db),
                "{journal}: {} kept the lock after COMMIT",
                c.name
            );
        }
        for c in stock_clients() {
            let mut h = c.spawn(&db, &["hold"], true);
            h.wait_for("holding");
            assert!(
                outside_flock_free(&db),
                "{journal}: {} took <db>.lock without the extension",
                c.name
            );
            h.send_line();
            h.wait_for("committed");
            h.finish();
        }
        assert_eq!(integrity(&db), "ok");
    }
}

/// A `flock(1)` holder of `<db>.lock` (a backup script, say) makes every
/// protected client's write fail with `database is locked` after its busy
/// timeout; the same programs without the extension write anyway.
#[test]
fn a_flock_holder_stops_every_client_but_not_stock_ones() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_db(&db, "wal");
    let holder = FlockHolder::hold(&lock_path(&db));
    for c in protected_clients() {
        let r = c.run(&db, &["try"]);
        assert!(
            r.locked() && !r.has_line("ok"),
            "{} wrote under flock(1):\n{}",
            c.name,
            r.raw
        );
    }
    let before = query_i64(&db, "SELECT count(*) FROM t");
    assert_eq!(before, 0);
    for c in stock_clients() {
        let r = c.run(&db, &["try"]);
        assert!(
            r.has_line("ok"),
            "{} (stock) did not write:\n{}",
            c.name,
            r.raw
        );
    }
    holder.release();
    assert_eq!(
        query_i64(&db, "SELECT count(*) FROM t"),
        stock_clients().len() as i64
    );
}

// ---- all clients at once -----------------------------------------------------------

/// Shell, Python (both interpreters), Rust (linked and loaded) and Node
/// processes write one WAL database at the same time.
#[test]
fn all_clients_write_one_database_wal() {
    all_clients_write_one_database("wal");
}

/// The same in rollback-journal (DELETE) mode.
#[test]
fn all_clients_write_one_database_delete() {
    all_clients_write_one_database("delete");
}

fn all_clients_write_one_database(journal: &str) {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_db(&db, journal);
    let versions = write_together(&db, &protected_clients(), 100);
    let v: Vec<String> = versions.iter().map(|(n, v)| format!("{n}={v}")).collect();
    eprintln!("{journal}: SQLite versions: {}", v.join(" "));
    // Several SQLite versions really met in one file.
    let distinct: std::collections::BTreeSet<&String> = versions.iter().map(|(_, v)| v).collect();
    assert!(distinct.len() >= 2, "{versions:?}");
}

// ---- Python ------------------------------------------------------------------------

/// 4 processes x 100 transactions, each an unmodified script run with
/// `python -m sqlite_writelock run`, per interpreter; then the same script
/// without it: no `writelock_status()`, and a `flock(1)` holder does not stop it.
#[test]
fn python_processes_debian() {
    python_processes(Py::Debian);
}

#[test]
fn python_processes_on_path() {
    python_processes(Py::OnPath);
}

fn python_processes(py: Py) {
    let v = venv(py);
    for journal in ["wal", "delete"] {
        let dir = tempdir();
        let db = dir.path().join("app.db");
        create_db(&db, journal);
        let base = python_client(py, true);
        let clients: Vec<Client> = (0..4)
            .map(|i| Client {
                name: format!("{}-{i}", base.name),
                ..base.clone()
            })
            .collect();
        let versions = write_together(&db, &clients, 100);
        eprintln!("{py:?} {journal}: {versions:?}");
        // How install() got there on this interpreter.
        let how = run_ok(
            "install()",
            v.cmd(dir.path())
                .args(["-c", "import sqlite_writelock as w; print(w.install())"]),
        );
        assert_eq!(how.trim(), v.expect_how, "{py:?}");
        // Without the extension.
        let stock = python_client(py, false);
        stock.run(&db, &["status"]).assert_protected(false);
        let holder = FlockHolder::hold(&lock_path(&db));
        assert!(base.run(&db, &["try"]).locked());
        assert!(stock.run(&db, &["try"]).has_line("ok"));
        holder.release();
    }
}

/// `load(conn)`: the connection it was given stays unprotected (and a
/// warning says so), connections opened afterwards are protected; loading
/// through a `:memory:` connection warns about nothing; `install()` after
/// `load()` is a no-op.
#[test]
fn python_load_protects_connections_opened_afterwards() {
    let script = r#"
import sqlite3, warnings
import sqlite_writelock as w
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    before = sqlite3.connect("app.db")
    w.load(before)
    print("warned_before", any(issubclass(x.category, w.WritelockWarning) for x in caught))
    caught.clear()
    after = sqlite3.connect("app.db")
    print("after", w.status(after)["databases"][0]["protected"])
    w.load(sqlite3.connect(":memory:"))
    w.load(after)
    print("warned_memory_or_after", bool(caught))
print("install", w.install())
"#;
    for py in [Py::Debian, Py::OnPath] {
        let v = venv(py);
        let dir = scratch();
        let out = run_ok("load(conn)", v.cmd(dir.path()).args(["-c", script]));
        assert!(out.contains("warned_before True"), "{py:?}:\n{out}");
        assert!(out.contains("after True"), "{py:?}:\n{out}");
        assert!(
            out.contains("warned_memory_or_after False"),
            "{py:?}:\n{out}"
        );
        let how = if py == Py::Debian {
            "already loaded"
        } else {
            "ctypes"
        };
        assert!(out.contains(&format!("install {how}")), "{py:?}:\n{out}");
    }
}

/// `install()` after a connection to `early.db` is already open: one
/// `WritelockWarning` naming early.db (not the `:memory:` one, and not again
/// on a second `install()`); `status()` of that connection says "not
/// protected" and why instead of raising; and it really is not: while
/// `flock(1)` (another process) holds `early.db.lock`, it writes anyway, and
/// a connection opened after `install()` gets `database is locked`.
#[test]
fn python_install_warns_about_connections_opened_before_it() {
    let script = r#"
import json, sqlite3, warnings
import sqlite_writelock as w
early = sqlite3.connect("early.db", timeout=0.2, isolation_level=None)
mem = sqlite3.connect(":memory:")
print("status_before " + json.dumps(w.status(early)))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    w.install()
    first = [str(x.message) for x in caught if issubclass(x.category, w.WritelockWarning)]
    caught.clear()
    w.install()
    print("install_warnings " + json.dumps(first))
    print("second_install_warnings %d" % len(caught))
print("status_after " + json.dumps(w.status(early)))
early.execute("INSERT INTO t(client) VALUES ('early')")
print("early_wrote")
later = sqlite3.connect("early.db", timeout=0.2, isolation_level=None)
print("later_protected %s" % w.status(later)["databases"][0]["protected"])
try:
    later.execute("INSERT INTO t(client) VALUES ('later')")
    print("later_wrote")
except sqlite3.OperationalError as e:
    print("later_error " + str(e))
"#;
    for py in [Py::Debian, Py::OnPath] {
        let v = venv(py);
        let dir = tempdir();
        let db = dir.path().join("early.db");
        create_db(&db, "wal");
        let holder = FlockHolder::hold(&lock_path(&db));
        let out = run_ok(
            "install() after a connection",
            v.cmd(dir.path()).args(["-c", script]),
        );
        holder.release();
        let line = |key: &str| -> String {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{key} ")).map(str::to_owned))
                .unwrap_or_else(|| panic!("{py:?}: no {key} in:\n{out}"))
        };
        let real = std::fs::canonicalize(&db).unwrap();
        for key in ["status_before", "status_after"] {
            let st: Value = serde_json::from_str(&line(key)).unwrap();
            assert_eq!(st["protected"], false, "{py:?} {key}: {st}");
            assert_eq!(st["loaded"], false, "{py:?} {key}: {st}");
            let reason = st["reason"].as_str().unwrap_or_default();
            assert!(
                reason.contains("not protected")
                    && reason.contains("not loaded into this connection"),
                "{py:?} {key}: {st}"
            );
            let d = &st["databases"][0];
            assert_eq!(d["protected"], false, "{py:?} {key}: {st}");
            assert_eq!(
                d["file"]
                    .as_str()
                    .map(|f| std::fs::canonicalize(f).unwrap()),
                Some(real.clone()),
                "{py:?} {key}: {st}"
            );
        }
        let warned: Vec<String> = serde_json::from_str(&line("install_warnings")).unwrap();
        assert_eq!(warned.len(), 1, "{py:?}: {warned:?}");
        assert!(
            warned[0].contains("early.db")
                && warned[0].contains("NOT protected")
                && warned[0].contains("1 sqlite3 connection")
                && !warned[0].contains(":memory:"),
            "{py:?}: {warned:?}"
        );
        assert_eq!(line("second_install_warnings"), "0", "{py:?}:\n{out}");
        assert!(out.contains("early_wrote"), "{py:?}:\n{out}");
        assert_eq!(line("later_protected"), "True", "{py:?}:\n{out}");
        assert!(
            line("later_error").contains("locked"),
            "{py:?}: a protected connection wrote while flock(1) held the lock:\n{out}"
        );
    }
}

/// Where neither `enable_load_extension` nor a shared libsqlite3 is there
/// (simulated: `_sqlite3`'s symbols cannot be found), `install()` raises an
/// error that says why and what to do.
#[test]
fn python_install_explains_a_statically_linked_sqlite() {
    let script = r#"
import ctypes, sqlite3
import sqlite_writelock as w
class NoSymbols:
    def __init__(self, *a, **k): pass
    def __getattr__(self, name): raise AttributeError("undefined symbol: " + name)
ctypes.CDLL = NoSymbols
try:
    w.install()
    print("installed?!")
except w.WritelockError as e:
    print("error:", e)
"#;
    let v = venv(Py::OnPath);
    let dir = tempdir();
    let out = run_ok(
        "install() without a shared SQLite",
        v.cmd(dir.path())
            .env("SQLITE_WRITELOCK_LOADER", "ctypes")
            .args(["-c", script]),
    );
    assert!(out.starts_with("error:"), "{out}");
    for want in [
        "statically",
        "enable_load_extension",
        "--enable-loadable-sqlite-extensions",
    ] {
        assert!(out.contains(want), "missing {want:?} in: {out}");
    }
}

/// `path()` is the library inside the package unless `WRITELOCK_PATH` says
/// otherwise; `python -m sqlite_writelock path|status` work; after
/// `install()` the process has mapped exactly one libsqlite3 (the ctypes
/// loader used the one `_sqlite3` links, not a second copy).
#[test]
fn python_path_status_and_one_sqlite() {
    let script = r#"
import sqlite3, sqlite_writelock as w
print("path", w.path())
print("how", w.install())
maps = open("/proc/self/maps").read().split("\n")
libs = {l.split()[-1] for l in maps if "libsqlite3" in l}
print("libsqlite3", len(libs), sorted(libs))
"#;
    for py in [Py::Debian, Py::OnPath] {
        let v = venv(py);
        let dir = tempdir();
        let out = run_ok("path/install", v.cmd(dir.path()).args(["-c", script]));
        let inside = v.dir.join("lib");
        let path_line = out.lines().find(|l| l.starts_with("path ")).unwrap();
        assert!(
            Path::new(&path_line[5..]).starts_with(&inside) && path_line.ends_with(".so"),
            "{py:?}: {out}"
        );
        assert!(
            out.contains(&format!("how {}", v.expect_how)),
            "{py:?}: {out}"
        );
        assert!(out.contains("libsqlite3 1 "), "{py:?}: {out}");

        let so = so_path();
        let out = run_ok(
            "WRITELOCK_PATH",
            v.cmd(dir.path())
                .env("WRITELOCK_PATH", &so)
                .args(["-m", "sqlite_writelock", "path"]),
        );
        assert_eq!(Path::new(out.trim()), so, "{py:?}");

        // A question creates nothing: a missing database is an error…
        let o = v
            .cmd(dir.path())
            .args(["-m", "sqlite_writelock", "status", "app.db"])
            .output()
            .unwrap();
        assert!(!o.status.success(), "{py:?}: {}", text(&o));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{py:?}");
        // …and an existing one is looked at through a read-only connection
        // (which takes no lock, so creates no lock file).
        create_db(&dir.path().join("app.db"), "wal");
        let out = run_ok(
            "python -m sqlite_writelock status",
            v.cmd(dir.path())
                .args(["-m", "sqlite_writelock", "status", "app.db"]),
        );
        let st: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
        let d = &st["databases"][0];
        assert_eq!(st["vfs"], "writelock", "{py:?}: {out}");
        assert!(
            d["lock_file"]
                .as_str()
                .is_some_and(|l| l.ends_with("/app.db.lock")),
            "{py:?}: {out}"
        );
        assert_eq!(d["protected"], false, "read-only: {py:?}: {out}");
    }
}

/// `import sqlite_writelock.auto` (the start-up recipes) stops the
/// interpreter rather than run a program unprotected.
#[test]
fn python_auto_refuses_to_run_unprotected() {
    let v = venv(Py::OnPath);
    let dir = tempdir();
    let o = v
        .cmd(dir.path())
        .env("WRITELOCK_PATH", dir.path().join("missing.so"))
        .args(["-c", "import sqlite_writelock.auto; print('ran')"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("ran"), "{out}");
    assert!(out.contains("refusing to run unprotected"), "{out}");
}

// ---- the snippets of docs/clients.md, as written ------------------------------------

/// An unmodified program for the Python recipes: prints its arguments and
/// `writelock_status()` of `app.db`.
const APP_PY: &str = r#"import sqlite3, sys
con = sqlite3.connect("app.db")
print("argv=" + " ".join(sys.argv[1:]))
print("status=" + con.execute("SELECT writelock_status()").fetchone()[0])
"#;

fn assert_status_lines(what: &str, out: &str, dir: &Path, expect: usize) {
    let statuses: Vec<Value> = out
        .lines()
        .map(|l| l.strip_prefix("status=").unwrap_or(l))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("databases").is_some())
        .collect();
    assert_eq!(statuses.len(), expect, "{what}: {out}");
    let file = dir.join("app.db").canonicalize().unwrap();
    for s in statuses {
        let main = &s["databases"][0];
        assert_eq!(main["protected"], true, "{what}: {out}");
        assert_eq!(
            Path::new(main["file"].as_str().unwrap()),
            file,
            "{what}: {out}"
        );
    }
}

#[test]
fn snippet_shell() {
    let dir = scratch();
    let mut c = Command::new("sh");
    c.arg(snippet("bindings/snippets/shell.sh"))
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    // The first form reads SQL from stdin.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SELECT writelock_status();\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_status_lines(
        "shell.sh",
        &String::from_utf8_lossy(&o.stdout),
        dir.path(),
        2,
    );
}

/// Interactively: `.load`, then `.open`.
#[test]
fn shell_load_then_open() {
    let dir = scratch();
    let mut child = Command::new("sqlite3")
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b".load ./target/release/libwritelock\n.open app.db\nSELECT writelock_status();\n",
        )
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_status_lines(
        ".load/.open",
        &String::from_utf8_lossy(&o.stdout),
        dir.path(),
        1,
    );
}

/// What docs/clients.md warns about: `sqlite3 -cmd '.load …' app.db` opens app.db
/// before loading, so app.db is not protected — the status says so, and a
/// `flock(1)` holder does not stop its writes. The `-cmd '.open app.db'`
/// form, under the same holder, is stopped.
#[test]
fn shell_first_argument_form_is_not_protected() {
    let dir = scratch();
    create_db(&dir.path().join("app.db"), "wal");
    let load = "-cmd=.load ./target/release/libwritelock";
    let shell = |args: &[&str]| {
        let mut c = Command::new("sqlite3");
        c.current_dir(dir.path());
        for a in args {
            match a.strip_prefix("-cmd=") {
                Some(cmd) => c.args(["-cmd", cmd]),
                None => c.arg(a),
            };
        }
        c.output().unwrap()
    };
    let o = shell(&[load, "app.db", "SELECT writelock_status();"]);
    let st: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)));
    assert_eq!(st["databases"][0]["protected"], false, "{}", text(&o));

    let holder = FlockHolder::hold(&dir.path().join("app.db.lock"));
    let insert = "INSERT INTO t(client) VALUES ('shell');";
    let o = shell(&[load, "-cmd=.timeout 200", "app.db", insert]);
    assert!(
        o.status.success(),
        "first-argument form was stopped: {}",
        text(&o)
    );
    let o = shell(&[
        load,
        "-cmd=.open app.db",
        "-cmd=.timeout 200",
        ":memory:",
        insert,
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("database is locked"),
        "the -cmd .open form wrote under flock(1): {}",
        text(&o)
    );
    holder.release();
}

/// The misuse above is said where the user sees it: on standard error (a
/// pipe here), naming the database and the fix, and in SQLite's log. The
/// right order says nothing; neither does a read-only open, which never
/// writes. An attached database opened before loading is named too. Standard
/// error on a regular file (a daemon's, perhaps a data file) gets nothing.
#[test]
fn shell_warns_about_a_database_opened_before_loading() {
    let dir = scratch();
    create_db(&dir.path().join("app.db"), "wal");
    create_db(&dir.path().join("aux.db"), "delete");
    let load = "-cmd=.load ./target/release/libwritelock";
    let shell = |args: &[&str], stderr: Stdio| {
        let mut c = Command::new("sqlite3");
        c.current_dir(dir.path()).stderr(stderr);
        for a in args {
            match a.strip_prefix("-cmd=") {
                Some(cmd) => c.args(["-cmd", cmd]),
                None => c.arg(a),
            };
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        (String::from_utf8_lossy(&o.stdout).into_owned(), err, o)
    };

    let (out, err, o) = shell(&[load, "app.db", "SELECT 1;"], Stdio::piped());
    assert_eq!(out.trim(), "1", "the shell goes on: {}", text(&o));
    for want in [
        "app.db was opened before the extension was loaded",
        "NOT protected",
        "\"protected\": false",
        "-cmd '.open ",
        "/app.db' (not the database as the shell's first argument), or .open ",
    ] {
        assert!(err.contains(want), "missing {want:?}: {}", text(&o));
    }

    let (_, err, o) = shell(
        &[load, "-cmd=.open app.db", ":memory:", "SELECT 1;"],
        Stdio::piped(),
    );
    assert_eq!(err, "", "load, then open: {}", text(&o));
    let (_, err, o) = shell(&["-readonly", load, "app.db", "SELECT 1;"], Stdio::piped());
    assert_eq!(err, "", "read-only: {}", text(&o));

    let attach = "-cmd=ATTACH 'aux.db' AS aux";
    let (_, err, o) = shell(
        &[attach, load, "-cmd=.open app.db", ":memory:", "SELECT 1;"],
        Stdio::piped(),
    );
    assert!(
        err.contains("aux.db (schema aux) was attached before") && err.contains("DETACH aux"),
        "{}",
        text(&o)
    );
    assert!(
        !err.contains("app.db"),
        "app.db was opened after: {}",
        text(&o)
    );

    // Standard error on a file: nothing there, but SQLite's log has it.
    let file = dir.path().join("stderr.txt");
    let f = std::fs::File::create(&file).unwrap();
    let (out, _, o) = shell(&["-cmd=.log stdout", load, "app.db", "SELECT 1;"], f.into());
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "",
        "stderr on a file"
    );
    assert!(
        out.contains("(28) writelock: ") && out.contains("app.db was opened before"),
        "sqlite3_log: {}",
        text(&o)
    );
}

#[test]
fn snippet_python() {
    for py in [Py::Debian, Py::OnPath] {
        let v = venv(py);
        let dir = scratch();
        let out = run_ok(
            "python.py",
            v.cmd(dir.path())
                .arg(snippet("bindings/snippets/python.py")),
        );
        assert_status_lines("python.py", &out, dir.path(), 1);
    }
}

#[test]
fn snippet_python_run() {
    for py in [Py::Debian, Py::OnPath] {
        let v = venv(py);
        let dir = scratch();
        std::fs::write(dir.path().join("app.py"), APP_PY).unwrap();
        let run = snippet("bindings/snippets/python-run.sh");
        let out = run_ok("python-run.sh", &mut v.sh(&run, dir.path()));
        assert!(out.contains("argv=--its-args\n"), "{out}");
        assert_status_lines("python-run.sh", &out, dir.path(), 1);
        // As a module, like `python -m app`.
        let out = run_ok(
            "run -m",
            v.cmd(dir.path())
                .args(["-m", "sqlite_writelock", "run", "-m", "app", "x", "y"]),
        );
        assert!(out.contains("argv=x y\n"), "{out}");
        assert_status_lines("run -m", &out, dir.path(), 1);
        // The same program without it.
        let o = v.cmd(dir.path()).arg("app.py").output().unwrap();
        assert!(String::from_utf8_lossy(&o.stderr).contains("no such function: writelock_status"));
    }
}

#[test]
fn snippet_python_sitecustomize() {
    for py in [Py::Debian, Py::OnPath] {
        let v = venv(py);
        let dir = scratch();
        std::fs::write(dir.path().join("app.py"), APP_PY).unwrap();
        let file = snippet("bindings/snippets/python-sitecustomize.sh");
        let out = run_ok("python-sitecustomize.sh", &mut v.sh(&file, dir.path()));
        assert_status_lines("python-sitecustomize.sh", &out, dir.path(), 1);
    }
}

/// The `.pth` recipe changes every program of its venv, so it gets one of its own.
#[test]
fn snippet_python_pth() {
    let v = venv(Py::DebianPth);
    let dir = scratch();
    std::fs::write(dir.path().join("app.py"), APP_PY).unwrap();
    let file = snippet("bindings/snippets/python-pth.sh");
    let out = run_ok("python-pth.sh", &mut v.sh(&file, dir.path()));
    assert_status_lines("python-pth.sh", &out, dir.path(), 1);
    // Any other program of the venv, too.
    let out = run_ok("app.py under .pth", v.cmd(dir.path()).arg("app.py"));
    assert_status_lines("app.py under .pth", &out, dir.path(), 1);
}

#[test]
fn snippet_node() {
    node_ready();
    let dir = scratch();
    let out = run_ok(
        "node.js",
        Command::new("node")
            .arg(snippet("bindings/snippets/node.js"))
            .env("NODE_PATH", repo().join("bindings/node/node_modules"))
            .current_dir(dir.path()),
    );
    assert_status_lines("node.js", &out, dir.path(), 1);
}

#[test]
fn snippet_rust_register() {
    let dir = scratch();
    let out = run_ok(
        "register.rs",
        Command::new(examples_dir().join("writelock-example-register")).current_dir(dir.path()),
    );
    assert_status_lines("register.rs", &out, dir.path(), 1);
}

#[test]
fn snippet_rust_load() {
    let dir = scratch();
    let out = run_ok(
        "load.rs",
        Command::new(examples_dir().join("writelock-example-load")).current_dir(dir.path()),
    );
    assert_status_lines("load.rs", &out, dir.path(), 1);
}

/// docs/clients.md quotes every snippet file verbatim and the README's lines
/// are theirs, so what users copy is what
/// the tests above run.
#[test]
fn docs_quote_every_snippet_and_readme_lines_come_from_them() {
    let clients = std::fs::read_to_string(repo().join("docs/clients.md")).unwrap();
    let bodies: Vec<String> = SNIPPETS
        .iter()
        .map(|rel| std::fs::read_to_string(snippet(rel)).unwrap())
        .collect();
    let missing: Vec<&str> = SNIPPETS
        .iter()
        .zip(&bodies)
        .filter(|(_, body)| !clients.contains(body.trim_end()))
        .map(|(rel, _)| *rel)
        .collect();
    assert!(
        missing.is_empty(),
        "docs/clients.md does not quote these files verbatim (paste each whole, in a fenced block): {missing:?}"
    );
    // The README's one-line versions: every line of its fenced blocks in
    // "From a checkout" is a line of a snippet that the tests here run.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("## From a checkout")
        .expect("README has a From a checkout section");
    let end = readme[start + 1..]
        .find("\n## ")
        .map_or(readme.len(), |i| start + 1 + i);
    let mut in_block = false;
    let mut lines = 0;
    for line in readme[start..end].lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block && !line.trim().is_empty() {
            lines += 1;
            assert!(
                bodies
                    .iter()
                    .any(|b| b.lines().any(|l| l.trim() == line.trim())),
                "README.md's line {line:?} is in no snippet file {SNIPPETS:?}"
            );
        }
    }
    assert!(
        lines >= 4,
        "README.md's From a checkout section has {lines} code lines"
    );
}
