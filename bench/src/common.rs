//! What the driver and the workers agree on: modes, journal modes, the schema,
//! where the extension is, how to open a connection.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use clap::ValueEnum;
use rusqlite::{Connection, OpenFlags};

/// Every connection's `busy_timeout`.
pub const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// The three contenders. As a command-line value: `stock`, `app-flock`,
/// `writelock` (the same as [`Mode::name`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord, ValueEnum)]
pub enum Mode {
    /// The plain `unix` VFS: SQLite's own locks only.
    Stock,
    /// The `unix` VFS plus the usual application-level fix: a blocking
    /// `flock(LOCK_EX)` on `<db>.lock` from before BEGIN IMMEDIATE to after COMMIT.
    AppFlock,
    /// The extension: VFS `writelock`.
    Writelock,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Stock, Mode::AppFlock, Mode::Writelock];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Stock => "stock",
            Mode::AppFlock => "app-flock",
            Mode::Writelock => "writelock",
        }
    }

    pub fn vfs(self) -> &'static str {
        match self {
            Mode::Writelock => "writelock",
            Mode::Stock | Mode::AppFlock => "unix",
        }
    }
}

/// The two journal modes measured. As a command-line value: `WAL`, `DELETE`
/// (the same as [`Journal::name`]; arguments taking it ignore case).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord, ValueEnum)]
pub enum Journal {
    /// WAL with `synchronous=NORMAL` (the usual WAL setting).
    #[value(name = "WAL")]
    Wal,
    /// DELETE (rollback journal) with SQLite's default `synchronous=FULL`.
    #[value(name = "DELETE")]
    Delete,
}

impl Journal {
    pub const ALL: [Journal; 2] = [Journal::Wal, Journal::Delete];

    pub fn name(self) -> &'static str {
        match self {
            Journal::Wal => "WAL",
            Journal::Delete => "DELETE",
        }
    }

    pub fn synchronous(self) -> &'static str {
        match self {
            Journal::Wal => "NORMAL",
            Journal::Delete => "FULL",
        }
    }
}

/// `<target>/release/writelock-bench` → `<target>`, so `CARGO_TARGET_DIR` is
/// respected; falls back to the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(t) = exe.parent().and_then(Path::parent) {
            if t.join("release").is_dir() {
                return t.to_path_buf();
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// The built extension: `WRITELOCK_SO`, else `<target>/release/libwritelock.so`.
pub fn so_path() -> PathBuf {
    if let Some(p) = std::env::var_os("WRITELOCK_SO") {
        return PathBuf::from(p);
    }
    target_dir().join("release/libwritelock.so")
}

/// Load the extension into this process's bundled SQLite (once), through a
/// throwaway in-memory connection. From then on VFS `writelock` exists.
pub fn load_extension() {
    static LOADED: OnceLock<()> = OnceLock::new();
    LOADED.get_or_init(|| {
        let so = so_path();
        let c = Connection::open_in_memory().expect("open :memory:");
        // SAFETY: we load the extension built from this repository; it is a
        // SQLite extension whose entry point only registers a VFS and functions.
        unsafe {
            c.load_extension_enable().expect("enable extension loading");
            c.load_extension(&so, None::<&str>)
                .unwrap_or_else(|e| panic!("loading {}: {e} (run `make` first)", so.display()));
            c.load_extension_disable()
                .expect("disable extension loading");
        }
    });
}

/// Open `db` read-write for `mode`, with the benchmark's busy timeout and
/// the journal mode's `synchronous` setting; writelock connections also run
/// `pragmas`.
pub fn connect(db: &Path, mode: Mode, journal: Journal, pragmas: &Pragmas) -> Connection {
    if mode == Mode::Writelock {
        load_extension();
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let c = Connection::open_with_flags_and_vfs(db, flags, mode.vfs())
        .unwrap_or_else(|e| panic!("open {} with vfs {}: {e}", db.display(), mode.vfs()));
    c.busy_timeout(BUSY_TIMEOUT).expect("busy_timeout");
    if mode == Mode::Writelock {
        for (k, v) in &pragmas.0 {
            c.pragma_update(None, k, v)
                .unwrap_or_else(|e| panic!("PRAGMA {k} = {v}: {e}"));
        }
    }
    c.pragma_update(None, "synchronous", journal.synchronous())
        .expect("synchronous");
    let jm: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("journal_mode");
    assert!(
        jm.eq_ignore_ascii_case(journal.name()),
        "{}: journal_mode is {jm}, expected {}",
        db.display(),
        journal.name()
    );
    c
}

/// `<db>.lock`: the application-level flock's file and the extension's.
pub use writelock_core::lockfile::lock_path_for as lock_path;

/// The task-queue schema.
pub const SCHEMA: &str = "
CREATE TABLE tasks(
    id INTEGER PRIMARY KEY,
    status TEXT NOT NULL,           -- pending, running, done
    worker INTEGER,
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    claimed_at INTEGER,
    done_at INTEGER
);
CREATE INDEX tasks_status ON tasks(status, id);
CREATE TABLE runs(
    id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL,
    worker INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    status TEXT NOT NULL
);
CREATE INDEX runs_task ON runs(task_id);
CREATE TABLE events(
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX events_run ON events(run_id);
CREATE TABLE single(id INTEGER PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE kv(k INTEGER PRIMARY KEY, v INTEGER NOT NULL, pad TEXT NOT NULL);
";

/// Rows of `kv`, which the deferred transactions update.
pub const KV_ROWS: usize = 100;

/// Pending tasks the queue starts with (each finished task enqueues one more).
pub const INITIAL_TASKS: usize = 1000;

/// A payload of about `len` bytes.
pub fn payload(seed: u64, len: usize) -> String {
    let mut s = String::with_capacity(len);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push((b'a' + (x % 26) as u8) as char);
    }
    s
}

/// Microseconds since the Unix epoch (timestamps stored in rows).
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Nanoseconds since the Unix epoch: the shared clock for the start signal.
pub fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// `name=value;…` run as PRAGMAs on every writelock connection
/// (`--writelock-pragmas`, `BENCH_WRITELOCK_PRAGMAS`). Blank entries are
/// skipped, so a trailing `;` is fine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pragmas(pub Vec<(String, String)>);

impl std::str::FromStr for Pragmas {
    type Err = String;

    fn from_str(s: &str) -> Result<Pragmas, String> {
        s.split(';')
            .filter(|p| !p.trim().is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    Ok((k.trim().to_string(), v.trim().to_string()))
                }
                _ => Err(format!("{:?} is not name=value", p.trim())),
            })
            .collect::<Result<_, _>>()
            .map(Pragmas)
    }
}

impl std::fmt::Display for Pragmas {
    /// `name=value;…`, which `from_str` reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}
