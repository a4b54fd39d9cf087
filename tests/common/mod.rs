//! Shared helpers for the end-to-end tests: where the built extension is, how
//! to open connections with and without it, and how to drive real processes.
//!
//! The extension is loaded at run time from `target/release/libwritelock.so`
//! (`make` builds it; `WRITELOCK_SO` overrides), never linked.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;

use rusqlite::{Connection, OpenFlags};

pub mod procs;

/// The built extension (`WRITELOCK_SO` overrides the default path).
pub fn so_path() -> PathBuf {
    if let Some(p) = std::env::var_os("WRITELOCK_SO") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/libwritelock.so");
    assert!(p.exists(), "{} is missing: run `make` first", p.display());
    p.canonicalize().unwrap()
}

/// Load the extension into this process's (bundled) SQLite, once. From then on
/// `writelock` is the default VFS for connections opened here.
pub fn load_extension() {
    static LOADED: OnceLock<()> = OnceLock::new();
    LOADED.get_or_init(|| {
        let c = Connection::open_in_memory().unwrap();
        // SAFETY: loading our own extension, built from this repository.
        unsafe {
            c.load_extension_enable().unwrap();
            c.load_extension(so_path(), None::<&str>).unwrap();
            c.load_extension_disable().unwrap();
        }
    });
}

/// With or without the extension, for tests that show the difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The plain `unix` VFS: stock SQLite.
    Stock,
    /// VFS `writelock` (loads the extension if needed).
    Writelock,
}

impl Mode {
    /// Both modes, extension first.
    pub const BOTH: [Mode; 2] = [Mode::Writelock, Mode::Stock];

    /// The VFS name to open with.
    pub fn vfs(self) -> &'static str {
        match self {
            Mode::Stock => "unix",
            Mode::Writelock => "writelock",
        }
    }
}

/// Open `path` read-write (creating it) in `mode`, with `busy_timeout` 0.
pub fn open(path: &Path, mode: Mode) -> Connection {
    load_extension();
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_URI;
    let c = Connection::open_with_flags_and_vfs(path, flags, mode.vfs()).unwrap();
    c.busy_timeout(std::time::Duration::ZERO).unwrap();
    c
}

/// The built `writelock` CLI (`make` builds it next to the extension).
pub fn cli_path() -> PathBuf {
    let p = so_path().with_file_name("writelock");
    assert!(p.exists(), "{} is missing: run `make` first", p.display());
    p
}

/// Create table `t(x)` (if missing) in `db`, in `journal` mode, through
/// stock SQLite.
pub fn create_table(db: &Path, journal: &str) {
    let c = open(db, Mode::Stock);
    c.execute_batch(&format!(
        "PRAGMA journal_mode={journal}; CREATE TABLE IF NOT EXISTS t(x);"
    ))
    .unwrap();
}

/// `<db>.lock` for a database path.
pub use writelock_core::lockfile::lock_path_for as lock_path;

/// Whether `flock -n <db>.lock true` (util-linux flock(1), a separate process)
/// gets the lock right now.
pub fn outside_flock_free(db: &Path) -> bool {
    let st = Command::new("flock")
        .arg("-n")
        .arg(lock_path(db))
        .arg("true")
        .status()
        .expect("flock(1) from util-linux is needed");
    st.success()
}

/// The lines of `/proc/locks` about `file` (matched by inode), e.g.
/// `3: -> FLOCK  ADVISORY  WRITE 555 fd:01:77 0 EOF` for a queued waiter.
pub fn proc_locks_on(file: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(file).unwrap().ino();
    // One read where the kernel allows: a lock let go between two reads
    // can hide another's line.
    writelock_core::holder::read_proc_locks()
        .expect("/proc/locks")
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .find(|f| f.matches(':').count() == 2)
                .and_then(|dev_ino| dev_ino.rsplit(':').next())
                .is_some_and(|i| i.parse() == Ok(ino))
        })
        .map(str::to_string)
        .collect()
}

/// Poll `cond` every 5 ms until it holds; panics with `what` after 10 s.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "timed out waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Debian's `/usr/bin/python3` (whose `sqlite3` module can load extensions,
/// on the system SQLite the `sqlite3` shell uses too), or `None` with a note
/// on stderr when it is missing or cannot load extensions: callers skip.
pub fn system_python() -> Option<PathBuf> {
    static PY: OnceLock<Option<PathBuf>> = OnceLock::new();
    PY.get_or_init(|| {
        let py = PathBuf::from("/usr/bin/python3");
        let ok = py.exists()
            && Command::new(&py)
                .args([
                    "-c",
                    "import sqlite3; sqlite3.connect(':memory:').enable_load_extension(True)",
                ])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("note: /usr/bin/python3 is missing or cannot load extensions");
        }
        ok.then_some(py)
    })
    .clone()
}

/// The Python of a venv with `apsw` (its own bundled SQLite) beside Debian's
/// stdlib `sqlite3`, created under `target/apsw-venv` on first use
/// (`python3 -m venv`, `pip install apsw`). `None` when there is no
/// [`system_python`].
pub fn apsw_python() -> Option<PathBuf> {
    static PY: OnceLock<Option<PathBuf>> = OnceLock::new();
    PY.get_or_init(|| {
        let py = system_python()?;
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/apsw-venv");
        let vpy = venv.join("bin/python");
        if !vpy.exists() {
            let ok = Command::new(&py).args(["-m", "venv"]).arg(&venv).status();
            assert!(ok.unwrap().success(), "python3 -m venv failed");
        }
        let has = Command::new(&vpy)
            .args(["-c", "import apsw"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has {
            let ok = Command::new(&vpy)
                .args(["-m", "pip", "install", "-q", "apsw"])
                .status();
            assert!(ok.unwrap().success(), "pip install apsw failed");
        }
        Some(vpy)
    })
    .clone()
}

/// A `flock(1)` process holding `LOCK_EX` on a file until [`FlockHolder::release`].
pub struct FlockHolder {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl FlockHolder {
    /// Start `flock -x FILE sh -c 'echo held; read _ || true'` and wait for "held".
    pub fn hold(file: &Path) -> FlockHolder {
        let (mut child, _, line) = spawn_until_first_line(
            Command::new("flock")
                .arg("-x")
                .arg(file)
                .args(["sh", "-c", "echo held; read _ || true"])
                .stdin(Stdio::piped()),
        );
        assert_eq!(line.trim(), "held");
        let stdin = child.stdin.take();
        FlockHolder { child, stdin }
    }

    /// Let go: the child reads a line and exits, and the kernel drops the lock.
    pub fn release(mut self) {
        drop(self.stdin.take());
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for FlockHolder {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// A `sqlite3` shell process (the system's) driven line by line: each
/// [`Shell::run`] sends SQL and waits for a marker, so tests synchronise on
/// real output, never on sleeps.
pub struct Shell {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<std::io::PipeReader>,
    marker: u64,
}

impl Shell {
    /// Start `sqlite3` on `db`; with the extension `.load`ed first when `mode`
    /// is [`Mode::Writelock`]. stdout and stderr share one pipe, so `run`
    /// returns errors in order with results.
    pub fn start(db: &Path, mode: Mode) -> Shell {
        Shell::start_wrapped(&[], db, mode)
    }

    /// [`Shell::start`] under a wrapper command, e.g. `["flock", "-x", "app.db.lock"]`.
    pub fn start_wrapped(wrapper: &[&std::ffi::OsStr], db: &Path, mode: Mode) -> Shell {
        Shell::start_with(wrapper, &[], db, mode)
    }

    /// [`Shell::start`] with extra environment variables.
    pub fn start_env(env: &[(&str, &str)], db: &Path, mode: Mode) -> Shell {
        Shell::start_with(&[], env, db, mode)
    }

    fn start_with(
        wrapper: &[&std::ffi::OsStr],
        env: &[(&str, &str)],
        db: &Path,
        mode: Mode,
    ) -> Shell {
        Shell::spawn(wrapper, env, db, mode, false).0
    }

    /// [`Shell::start_env`], but with `-cmd '.log stderr'` before `.load` (so
    /// SQLite's log — where the extension's warnings go — reaches stderr) and
    /// stderr on a pipe of its own: the channel receives its lines as they
    /// come. stdout still carries results and the markers of [`Shell::run`].
    pub fn start_logging(
        env: &[(&str, &str)],
        db: &Path,
        mode: Mode,
    ) -> (Shell, std::sync::mpsc::Receiver<String>) {
        let (sh, stderr) = Shell::spawn(&[], env, db, mode, true);
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = stderr.expect("stderr is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (sh, rx)
    }

    fn spawn(
        wrapper: &[&std::ffi::OsStr],
        env: &[(&str, &str)],
        db: &Path,
        mode: Mode,
        log_to_own_stderr: bool,
    ) -> (Shell, Option<std::process::ChildStderr>) {
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg("sqlite3");
                c
            }
            None => Command::new("sqlite3"),
        };
        cmd.arg("-batch").arg("-noheader").arg("-list");
        if log_to_own_stderr {
            cmd.arg("-cmd").arg(".log stderr");
        }
        if mode == Mode::Writelock {
            cmd.arg("-cmd")
                .arg(format!(".load {}", so_path().display()));
        }
        cmd.arg("-cmd").arg(format!(".open {}", db.display()));
        cmd.envs(env.iter().copied());
        let (r, w) = std::io::pipe().unwrap();
        if log_to_own_stderr {
            cmd.stdout(w).stderr(Stdio::piped());
        } else {
            cmd.stdout(w.try_clone().unwrap()).stderr(w);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .spawn()
            .expect("the sqlite3 shell is needed (apt-get install sqlite3)");
        drop(cmd);
        let stdin = child.stdin.take().unwrap();
        let stderr = child.stderr.take();
        (
            Shell {
                child,
                stdin,
                stdout: BufReader::new(r),
                marker: 0,
            },
            stderr,
        )
    }

    fn send(&mut self, s: &str) {
        self.stdin.write_all(s.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    /// Run `sql` (one or more statements) and return what it printed, errors
    /// included (the shell prints them as `…Error…` lines).
    pub fn run(&mut self, sql: &str) -> String {
        self.submit(sql);
        self.collect()
    }

    /// Send `sql` without waiting for it; [`Shell::collect`] reads its output.
    pub fn submit(&mut self, sql: &str) {
        self.marker += 1;
        let m = format!("--done-{}--", self.marker);
        self.send(&format!("{sql}\n.print {m}\n"));
    }

    /// Wait for the last [`Shell::submit`]ted SQL to finish; what it printed.
    pub fn collect(&mut self) -> String {
        let m = format!("--done-{}--", self.marker);
        let mut out = String::new();
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line).unwrap() == 0 {
                panic!("sqlite3 exited; output so far: {out}");
            }
            if line.trim_end() == m {
                break;
            }
            out.push_str(&line);
        }
        out
    }

    /// The shell's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL the shell mid-whatever and reap it.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Quit and wait for the process.
    pub fn finish(mut self) {
        self.send(".quit\n");
        assert!(self.child.wait().unwrap().code().is_some());
    }
}

/// A fresh temporary directory, removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("writelock-test")
        .tempdir()
        .unwrap()
}

/// splitmix64: small, seeded, good enough to vary timings and sizes in the
/// torture suite (the same seed replays the same run).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True `percent` times in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Spawn `cmd` with its standard output piped and wait for its first line:
/// the child, a reader of the rest of its output, and that line without its
/// newline. The line is the child's own signal that it is ready.
pub fn spawn_until_first_line(cmd: &mut Command) -> (Child, BufReader<ChildStdout>, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{:?} could not start: {e}", cmd.get_program()));
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    line.truncate(line.trim_end_matches('\n').len());
    (child, out, line)
}
