//! Holders the extension cannot name by pid: a process in another pid
//! namespace (a container sharing the database's directory), and a killed
//! holder whose pid lives on (pid 1 in its container, or a reused pid).
//! Whether a holder record names a live process is asked of the kernel, not
//! of `kill(pid, 0)` in the checker's namespace. Needs `unshare` and the
//! right to create pid namespaces (root); skipped otherwise.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use writelock_tests::procs::{python, Proc, PRELUDE};
use writelock_tests::{lock_path, so_path, system_python, tempdir, Mode};

/// Whether this machine lets us create pid namespaces.
fn namespaces() -> bool {
    let ok = Command::new("unshare")
        .args(["-p", "-f", "--mount-proc", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: cannot create pid namespaces (unshare -p needs root)");
    }
    ok
}

/// A Python script run in a new pid namespace (killed with its `unshare`
/// parent): as its pid 1, or (`high_pid`) as pid 40001, which names no
/// process outside it.
fn python_in_namespace(py: &Path, script: &str, args: &[&OsStr], high_pid: bool) -> Proc {
    let mut cmd = Command::new("unshare");
    cmd.args(["-p", "-f", "--mount-proc", "--kill-child"]);
    if high_pid {
        // The shell is pid 1; its child takes the next pid after 40000.
        cmd.args([
            "sh",
            "-c",
            "echo 40000 > /proc/sys/kernel/ns_last_pid; \"$0\" \"$@\"; true",
        ]);
    }
    cmd.arg(py)
        .arg("-c")
        .arg(format!("{PRELUDE}\n{script}"))
        .args(args);
    Proc::start(cmd)
}

fn make_db(db: &Path, journal: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch(&format!(
        "PRAGMA journal_mode={journal}; CREATE TABLE t(id INTEGER PRIMARY KEY, v);
         INSERT INTO t VALUES (1, 0);"
    ))
    .unwrap();
}

fn value(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row("SELECT v FROM t", [], |r| r.get(0))
        .unwrap()
}

/// Writer A: a write transaction, held until told to commit, after a stray
/// `close()` of a descriptor of the database (which drops SQLite's own locks
/// in its process).
const HOLD_THEN_COMMIT: &str = r#"
db, so, vfs = sys.argv[1], sys.argv[2], sys.argv[3]
load_extension(so, vfs)
con = connect(db, vfs, 5)
con.execute("BEGIN IMMEDIATE")
con.execute("UPDATE t SET v = v + 1000")
os.close(os.open(db, os.O_RDONLY))
print("ready", flush=True)
sys.stdin.readline()
try:
    con.execute("COMMIT")
    print("ok", flush=True)
except sqlite3.Error as e:
    print("error", e, flush=True)
"#;

/// One write transaction adding 1, with `busy_timeout` argv[4] seconds.
const ADD_ONE: &str = r#"
db, so, vfs, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
load_extension(so, vfs)
con = connect(db, vfs, timeout)
try:
    con.execute("BEGIN IMMEDIATE")
    con.execute("UPDATE t SET v = v + 1")
    con.execute("COMMIT")
    print("ok", flush=True)
except sqlite3.Error as e:
    print("error", e, flush=True)
"#;

fn add_one(py: &Path, db: &Path, mode: Mode, timeout: &str) -> String {
    let so = so_path();
    let args = [
        db.as_os_str(),
        so.as_os_str(),
        OsStr::new(mode.vfs()),
        OsStr::new(timeout),
    ];
    let (_, out, err) = python(py, ADD_ONE, &args).finish_within(Duration::from_secs(30));
    format!("{}{err}", out.trim())
}

/// A writer in another pid namespace is mid-transaction (its process did a
/// stray `close()`) when `<db>.lock` is deleted. Its pid means nothing on the
/// host, yet a host writer must still wait for it: every commit that
/// reported success is in the database. Without the extension the stray
/// close lets both write, and one update is lost.
#[test]
fn a_writer_in_another_pid_namespace_is_waited_for_when_the_lock_file_goes() {
    let Some(py) = system_python() else { return };
    if !namespaces() {
        return;
    }
    let so = so_path();
    for mode in Mode::BOTH {
        let dir = tempdir();
        let db = dir.path().join("app.db");
        make_db(&db, "delete");
        let args = [db.as_os_str(), so.as_os_str(), OsStr::new(mode.vfs())];
        let mut a = python_in_namespace(&py, HOLD_THEN_COMMIT, &args, true);
        assert_eq!(a.line(), "ready");
        let _ = std::fs::remove_file(lock_path(&db));
        let b = add_one(&py, &db, mode, "0.5");
        a.send("commit");
        let a_out = a.line();
        let expected = 1000 * i64::from(a_out == "ok") + i64::from(b == "ok");
        let v = value(&db);
        match mode {
            Mode::Writelock => assert_eq!(
                v, expected,
                "A: {a_out}, B: {b}: a committed update was lost"
            ),
            Mode::Stock => assert_ne!(v, expected, "stock: A {a_out}, B {b}"),
        }
    }
}

/// A holder that was pid 1 of its container is killed with `kill -9` in its
/// transaction, after `<db>.lock` was replaced; pid 1 exists everywhere, so
/// its record seems to name a live process. Nobody may be stuck behind it: a
/// writer gets the lock, and so does a writer whose own process holds the
/// lock (under `flock(1)`) with `busy_timeout` 0.
#[test]
fn a_killed_holder_whose_pid_lives_on_stops_nobody() {
    let Some(py) = system_python() else { return };
    if !namespaces() {
        return;
    }
    let so = so_path();
    let dir = tempdir();
    let db = dir.path().join("app.db");
    make_db(&db, "wal");
    let args = [db.as_os_str(), so.as_os_str(), OsStr::new("writelock")];
    let mut holder = python_in_namespace(&py, HOLD_THEN_COMMIT, &args, false);
    assert_eq!(holder.line(), "ready");
    let fresh = dir.path().join("fresh");
    std::fs::write(&fresh, b"").unwrap();
    std::fs::rename(&fresh, lock_path(&db)).unwrap();
    holder.kill();
    assert_eq!(add_one(&py, &db, Mode::Writelock, "2"), "ok");
    let (code, out, err) = {
        let mut cmd = Command::new("flock");
        cmd.arg(lock_path(&db))
            .arg(&py)
            .arg("-c")
            .arg(format!("{PRELUDE}\n{ADD_ONE}"))
            .args([db.as_os_str(), so.as_os_str()])
            .args(["writelock", "0"]);
        Proc::start(cmd).finish_within(Duration::from_secs(30))
    };
    assert_eq!((code, out.trim()), (Some(0), "ok"), "{err}");
    assert_eq!(value(&db), 2);
}
