//! Lock tests with real processes: the system `sqlite3` shell loading the
//! built extension, `flock(1)` from util-linux, and this test process.
//!
//! Every test runs its scenario with the extension and with stock SQLite and
//! asserts that the outcomes differ where the extension is meant to act.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use writelock_tests::{lock_path, open, outside_flock_free, tempdir, FlockHolder, Mode, Shell};

const JOURNAL_MODES: [&str; 2] = ["delete", "wal"];

/// Table `t(x)` with one row.
fn create_db(db: &Path, journal: &str) {
    writelock_tests::create_table(db, journal);
    let c = open(db, Mode::Stock);
    c.execute("INSERT INTO t VALUES (0)", []).unwrap();
}

fn count(db: &Path) -> i64 {
    let c = open(db, Mode::Stock);
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

/// During a write transaction an outside `flock -n <db>.lock` fails; after
/// COMMIT it succeeds. Stock SQLite never takes the lock.
#[test]
fn write_transaction_holds_lock_file() {
    for journal in JOURNAL_MODES {
        for begin in [
            "BEGIN IMMEDIATE;",
            "BEGIN DEFERRED; SELECT count(*) FROM t;",
        ] {
            for mode in Mode::BOTH {
                let dir = tempdir();
                let db = dir.path().join("app.db");
                create_db(&db, journal);
                std::fs::File::create(lock_path(&db)).unwrap();
                let mut sh = Shell::start(&db, mode);
                assert!(
                    outside_flock_free(&db),
                    "nothing held before the transaction"
                );
                sh.run(begin);
                if begin.starts_with("BEGIN DEFERRED") {
                    assert!(
                        outside_flock_free(&db),
                        "{journal} {mode:?}: a read is not a write"
                    );
                }
                let out = sh.run("INSERT INTO t VALUES (1);");
                assert_eq!(out, "", "{journal} {mode:?}");
                let free = outside_flock_free(&db);
                match mode {
                    Mode::Writelock => {
                        assert!(!free, "{journal} {begin}: writer must hold <db>.lock")
                    }
                    Mode::Stock => assert!(free, "stock SQLite does not lock <db>.lock"),
                }
                sh.run("COMMIT;");
                assert!(
                    outside_flock_free(&db),
                    "{journal} {mode:?}: released after COMMIT"
                );
                sh.finish();
                assert_eq!(count(&db), 2);
            }
        }
    }
}

/// While an outside process holds `<db>.lock`, reads work and writes fail
/// with `database is locked` after busy_timeout; when it lets go they succeed.
#[test]
fn outside_holder_blocks_writers_not_readers() {
    for journal in JOURNAL_MODES {
        for mode in Mode::BOTH {
            let dir = tempdir();
            let db = dir.path().join("app.db");
            create_db(&db, journal);
            let mut sh = Shell::start(&db, mode);
            sh.run(".timeout 300");
            let holder = FlockHolder::hold(&lock_path(&db));
            assert_eq!(
                sh.run("SELECT count(*) FROM t;").trim(),
                "1",
                "{journal} {mode:?}: reads work"
            );
            let t0 = Instant::now();
            let out = sh.run("INSERT INTO t VALUES (1);");
            let waited = t0.elapsed();
            match mode {
                Mode::Writelock => {
                    assert!(out.contains("database is locked"), "{journal}: got {out:?}");
                    assert!(
                        waited >= Duration::from_millis(250),
                        "busy_timeout governs the wait: {waited:?}"
                    );
                    assert_eq!(count(&db), 1, "nothing written while held");
                }
                Mode::Stock => assert_eq!(out, "", "stock ignores <db>.lock"),
            }
            holder.release();
            assert_eq!(
                sh.run("INSERT INTO t VALUES (2);"),
                "",
                "{journal} {mode:?}: writes after release"
            );
            sh.finish();
            let expect = if mode == Mode::Writelock { 2 } else { 3 };
            assert_eq!(count(&db), expect);
        }
    }
}

/// ATTACHed databases have their own lock file: writing only the attached one
/// locks only its `<aux>.lock`.
#[test]
fn attached_database_has_its_own_lock_file() {
    for mode in Mode::BOTH {
        let dir = tempdir();
        let main = dir.path().join("main.db");
        let aux = dir.path().join("aux.db");
        create_db(&main, "delete");
        create_db(&aux, "wal");
        std::fs::File::create(lock_path(&main)).unwrap();
        std::fs::File::create(lock_path(&aux)).unwrap();
        let mut sh = Shell::start(&main, mode);
        sh.run(&format!(
            "ATTACH '{}' AS aux; BEGIN; INSERT INTO aux.t VALUES (1);",
            aux.display()
        ));
        assert_eq!(
            outside_flock_free(&aux),
            mode == Mode::Stock,
            "{mode:?}: aux.db.lock"
        );
        assert!(outside_flock_free(&main), "{mode:?}: main was not written");
        sh.run("INSERT INTO main.t VALUES (1);");
        assert_eq!(
            outside_flock_free(&main),
            mode == Mode::Stock,
            "{mode:?}: main.db.lock"
        );
        sh.run("COMMIT;");
        assert!(outside_flock_free(&main) && outside_flock_free(&aux));
        sh.finish();
        assert_eq!((count(&main), count(&aux)), (2, 2));
    }
}

/// A writer killed mid-transaction leaves a hot journal. While another process
/// holds `<db>.lock` (a live writer, as far as anyone can tell), a reader with
/// the extension must not treat it as hot nor roll it back; stock SQLite does.
#[test]
fn hot_journal_not_rolled_back_while_lock_is_held() {
    for mode in Mode::BOTH {
        let dir = tempdir();
        let db = dir.path().join("app.db");
        create_db(&db, "delete");
        let mut sh = Shell::start(&db, Mode::Stock);
        // A tiny cache makes the transaction spill: the journal is synced
        // (so it is hot once its writer dies) and the db file is half-written.
        sh.run("PRAGMA cache_size=5; BEGIN; UPDATE t SET x=1; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<300) INSERT INTO t SELECT randomblob(900) FROM n;");
        sh.kill();
        let journal = dir.path().join("app.db-journal");
        let first = std::fs::read(&journal).unwrap();
        assert!(
            first.first().is_some_and(|b| *b != 0),
            "a hot journal (synced header) is left behind"
        );

        let holder = FlockHolder::hold(&lock_path(&db));
        let reader = open(&db, mode);
        // With the extension the reader neither rolls back nor reads the
        // half-written file: it is told to wait (busy_timeout is 0 here).
        let r = reader.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0));
        if mode == Mode::Writelock {
            let e = r
                .expect_err("must not read a half-written file")
                .to_string();
            assert!(e.contains("database is locked"), "{e}");
        }
        let journal_left =
            std::fs::read(&journal).is_ok_and(|j| j.first().is_some_and(|b| *b != 0));
        match mode {
            Mode::Writelock => assert!(
                journal_left,
                "journal must not be rolled back under the holder"
            ),
            Mode::Stock => assert!(
                !journal_left,
                "stock rolls the journal back under the holder"
            ),
        }
        holder.release();
        let n: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        assert!(
            !journal.exists(),
            "{mode:?}: rolled back once the lock is free"
        );
        assert_eq!(
            count(&db),
            1,
            "{mode:?}: the dead writer's transaction is gone"
        );
        let ok: String = reader
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }
}

/// `<db>.lock` that cannot serve: the open fails with a message naming the
/// lock path and the cause; the database is untouched and opens once fixed.
#[test]
fn unusable_lock_file_is_a_clear_error() {
    type Make = fn(&Path);
    let cases: [(&str, Make, &str); 3] = [
        (
            "directory",
            |p| std::fs::create_dir(p).unwrap(),
            "directory",
        ),
        (
            "symlink",
            |p| std::os::unix::fs::symlink("/tmp", p).unwrap(),
            "symlink",
        ),
        (
            "fifo",
            |p| {
                let st = std::process::Command::new("mkfifo")
                    .arg(p)
                    .status()
                    .unwrap();
                assert!(st.success());
            },
            "FIFO",
        ),
    ];
    for (what, make, says) in cases {
        let dir = tempdir();
        let db = dir.path().join("app.db");
        create_db(&db, "wal");
        let lp = lock_path(&db);
        make(&lp);

        // Stock SQLite does not care.
        assert_eq!(count(&db), 1);
        // With the extension: open fails, naming the path and the cause.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        writelock_tests::load_extension();
        let e = Connection::open_with_flags_and_vfs(&db, flags, "writelock")
            .expect_err(what)
            .to_string();
        assert!(e.contains(&lp.display().to_string()), "{what}: {e}");
        assert!(e.contains(says), "{what}: {e}");
        // The same through the sqlite3 shell.
        let mut sh = Shell::start(&db, Mode::Writelock);
        let out = sh.run("SELECT count(*) FROM t;");
        sh.finish();
        assert!(
            out.contains(&lp.display().to_string()) && out.contains(says),
            "{what}: shell said {out:?}"
        );
        // Nothing lost: fix the path and everything is there.
        if lp.symlink_metadata().unwrap().is_dir() {
            std::fs::remove_dir(&lp).unwrap();
        } else {
            std::fs::remove_file(&lp).unwrap();
        }
        let c = open(&db, Mode::Writelock);
        c.execute("INSERT INTO t VALUES (1)", []).unwrap();
        assert_eq!(count(&db), 2, "{what}");
    }
}

/// A lock file we may not create (read-only directory) is an error too. Root
/// bypasses directory permissions, so this runs only as an ordinary user.
#[test]
fn read_only_directory_is_a_clear_error() {
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() == "0" {
        eprintln!("skipped: running as root, who may write any directory");
        return;
    }
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_db(&db, "delete");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    writelock_tests::load_extension();
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE;
    let e = Connection::open_with_flags_and_vfs(&db, flags, "writelock")
        .err()
        .unwrap()
        .to_string();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(
        e.contains("app.db.lock") && e.contains("Permission denied"),
        "{e}"
    );
}

/// Read-only, immutable, in-memory and temporary databases need no lock file.
#[test]
fn no_lock_file_where_no_writer_can_be() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_db(&db, "delete");
    writelock_tests::load_extension();
    let lp = lock_path(&db);
    assert!(!lp.exists());

    let ro =
        Connection::open_with_flags_and_vfs(&db, OpenFlags::SQLITE_OPEN_READ_ONLY, "writelock")
            .unwrap();
    let n: i64 = ro
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    drop(ro);
    assert!(!lp.exists(), "read-only");

    let uri = format!("file:{}?immutable=1", db.display());
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI;
    let im = Connection::open_with_flags_and_vfs(&uri, flags, "writelock").unwrap();
    let _: i64 = im
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    drop(im);
    assert!(!lp.exists(), "immutable=1");

    for name in [":memory:", ""] {
        let c =
            Connection::open_with_flags_and_vfs(name, OpenFlags::default(), "writelock").unwrap();
        c.execute_batch("CREATE TABLE x(y); INSERT INTO x VALUES (1);")
            .unwrap();
        let s: String = c
            .query_row("SELECT writelock_status()", [], |r| r.get(0))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(
            v["databases"][0]["lock_file"],
            serde_json::Value::Null,
            "{name:?}: {s}"
        );
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "only app.db in the directory"
    );

    // A read-write open does create it (so the checks above could fail).
    let rw = open(&db, Mode::Writelock);
    rw.execute("INSERT INTO t VALUES (1)", []).unwrap();
    assert!(lp.exists());
    drop(rw);
    assert!(lp.exists(), "the lock file is never deleted");
}

/// `.load` twice, then write: one VFS, never wrapping itself (a self-wrapped
/// VFS would contend with its own second descriptor and report busy).
#[test]
fn loading_twice_is_harmless() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    let so = writelock_tests::so_path();
    let mut sh = Shell::start(&db, Mode::Stock);
    let out = sh.run(&format!(
        ".load {0}\n.load {0}\n.open {1}",
        so.display(),
        db.display()
    ));
    // The shell opened app.db before the loads: each load says so, and
    // nothing else is said (no error).
    let warning = format!(
        "writelock: WARNING: {} was opened before the extension was loaded",
        db.display()
    );
    assert_eq!(out.matches(&warning).count(), 2, "{out}");
    assert!(out.lines().all(|l| l.starts_with("writelock: ")), "{out}");
    let out = sh.run(
        "CREATE TABLE t(x); BEGIN IMMEDIATE; INSERT INTO t VALUES (1); \
         SELECT json_extract(writelock_status(), '$.vfs'), json_extract(writelock_status(), '$.databases[0].holding'); COMMIT;",
    );
    assert_eq!(out.trim(), "writelock|1");
    assert!(outside_flock_free(&db));
    sh.finish();
}

/// `SQLITE_FCNTL_VFSNAME` (the shell's `.vfsname`) names the stack, as
/// SQLite's own shims do: `writelock/unix`. Stock: the bare inner VFS.
#[test]
fn vfsname_names_the_shim_over_the_inner_vfs() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    for mode in Mode::BOTH {
        let mut sh = Shell::start(&db, mode);
        let out = sh.run(".vfsname");
        sh.finish();
        let want = match mode {
            Mode::Writelock => "writelock/unix",
            Mode::Stock => "unix",
        };
        assert_eq!(out.trim(), want, "{mode:?}");
    }
}

/// `flock app.db.lock sqlite3 …` — a migration run under the lock: the shell
/// inherits the locked description and must not wait for itself, while every
/// other process stays excluded until flock(1) lets go.
#[test]
fn process_under_its_own_flock_is_not_locked_out() {
    for journal in JOURNAL_MODES {
        for mode in Mode::BOTH {
            let dir = tempdir();
            let db = dir.path().join("app.db");
            create_db(&db, journal);
            let lp = lock_path(&db);
            let wrapper = ["flock".as_ref(), "-x".as_ref(), lp.as_os_str()];
            let mut migration = Shell::start_wrapped(&wrapper, &db, mode);
            migration.run(".timeout 1000");
            let out = migration.run("BEGIN IMMEDIATE; INSERT INTO t VALUES (1); COMMIT;");
            assert_eq!(out, "", "{journal} {mode:?}: the lock's own process writes");
            let mut other = Shell::start(&db, mode);
            other.run(".timeout 200");
            let out = other.run("INSERT INTO t VALUES (2);");
            match mode {
                Mode::Writelock => {
                    assert!(out.contains("database is locked"), "{journal}: {out:?}")
                }
                Mode::Stock => assert_eq!(out, "", "stock ignores <db>.lock"),
            }
            migration.finish();
            assert_eq!(
                other.run("INSERT INTO t VALUES (3);"),
                "",
                "{journal} {mode:?}"
            );
            other.finish();
        }
    }
}

/// The application's own `flock(LOCK_EX)` on `<db>.lock` (the usual fix) in
/// the same process that loads the extension: its writes proceed (Debian's
/// python3, whose sqlite3 module can load extensions, on the system SQLite).
#[test]
fn app_level_flock_in_the_same_process() {
    let py = Path::new("/usr/bin/python3");
    if !py.exists() {
        eprintln!("skipped: no /usr/bin/python3");
        return;
    }
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_db(&db, "wal");
    let script = r#"
import fcntl, sqlite3, sys
db, so = sys.argv[1], sys.argv[2]
lock = open(db + ".lock", "a")
fcntl.flock(lock, fcntl.LOCK_EX)
boot = sqlite3.connect(":memory:")
boot.enable_load_extension(True)
boot.load_extension(so)
con = sqlite3.connect(db, timeout=1)
with con:
    con.execute("INSERT INTO t VALUES (1)")
print(con.execute("SELECT json_extract(writelock_status(), '$.databases[0].protected')").fetchone()[0])
"#;
    let out = std::process::Command::new(py)
        .args(["-c", script])
        .arg(&db)
        .arg(writelock_tests::so_path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("enable_load_extension") {
        eprintln!("skipped: this python3 cannot load extensions");
        return;
    }
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    assert_eq!(count(&db), 2);
}

/// A connection used in a `fork()`ed child must not act on the parent's lock
/// (the descriptors are shared): the child's write fails, the parent's lock
/// and data are intact. Stock SQLite lets the child write.
#[test]
fn connection_used_after_fork_is_refused() {
    let py = Path::new("/usr/bin/python3");
    if !py.exists() {
        eprintln!("skipped: no /usr/bin/python3");
        return;
    }
    for (journal, mode) in JOURNAL_MODES
        .iter()
        .flat_map(|j| Mode::BOTH.map(|m| (*j, m)))
    {
        let dir = tempdir();
        let db = dir.path().join("app.db");
        create_db(&db, journal);
        let script = r#"
import os, sqlite3, sys
db, so, vfs = sys.argv[1], sys.argv[2], sys.argv[3]
boot = sqlite3.connect(":memory:")
boot.enable_load_extension(True)
boot.load_extension(so)
con = sqlite3.connect(f"file:{db}?vfs={vfs}", uri=True, timeout=0, isolation_level=None)
con.execute("SELECT count(*) FROM t").fetchone()
pid = os.fork()
if pid == 0:
    try:
        con.execute("INSERT INTO t VALUES (1)")
        os._exit(0)
    except sqlite3.Error as e:
        print("child:", e, flush=True)
        os._exit(3)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
con.execute("BEGIN IMMEDIATE"); con.execute("INSERT INTO t VALUES (2)"); con.execute("COMMIT")
print("parent ok")
"#;
        let out = std::process::Command::new(py)
            .args(["-c", script])
            .arg(&db)
            .arg(writelock_tests::so_path())
            .arg(mode.vfs())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("enable_load_extension") {
            eprintln!("skipped: this python3 cannot load extensions");
            return;
        }
        assert!(out.status.success(), "{stderr}");
        assert!(stdout.contains("parent ok"), "{stdout}");
        match mode {
            Mode::Writelock => {
                assert!(
                    stdout.contains("child: disk I/O error") && stdout.contains("child exit 3"),
                    "{stdout}"
                );
                assert_eq!(count(&db), 2);
            }
            Mode::Stock => {
                assert!(stdout.contains("child exit 0"), "{stdout}");
                assert_eq!(count(&db), 3);
            }
        }
        assert!(outside_flock_free(&db));
    }
}

/// `load_extension()` from SQL on a connection that has the functions works;
/// a second *copy* of the library (another .so file) is refused with a clear
/// error instead of running beside the first one.
#[test]
fn reload_from_sql_works_and_a_second_copy_is_refused() {
    let dir = tempdir();
    let so = writelock_tests::so_path();
    let mut sh = Shell::start(&dir.path().join("x.db"), Mode::Writelock);
    let out = sh.run(&format!(
        "SELECT load_extension('{}'); SELECT writelock_version();",
        so.display()
    ));
    let version = out.lines().last().unwrap_or_default();
    assert!(
        version.starts_with("0."),
        "reload worked, the functions too: {out:?}"
    );
    assert!(!out.contains("rror"), "{out:?}");
    let copy = dir.path().join("copy.so");
    std::fs::copy(&so, &copy).unwrap();
    let out = sh.run(&format!(".load {} sqlite3_writelock_init", copy.display()));
    assert!(
        out.contains("another copy of the extension is already loaded"),
        "{out:?}"
    );
    sh.finish();
}

/// Two SQLite libraries in one process — Python's stdlib `sqlite3` on the
/// system library and `apsw` with its own bundled copy — both loading the
/// extension: the second is refused with a clear error (never served through
/// the first library's API), and the first keeps working.
#[test]
fn second_sqlite_library_in_one_process_is_refused() {
    let py = Path::new("/usr/bin/python3");
    if !py.exists() {
        eprintln!("skipped: no /usr/bin/python3");
        return;
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/apsw-venv");
    let vpy = venv.join("bin/python");
    if !vpy.exists() {
        let ok = std::process::Command::new(py)
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(ok.success(), "python3 -m venv failed");
    }
    let ok = std::process::Command::new(&vpy)
        .args(["-m", "pip", "install", "-q", "apsw"])
        .status()
        .unwrap();
    assert!(ok.success(), "pip install apsw failed");
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_db(&db, "wal");
    let script = r#"
import sqlite3, sys, json
import apsw
db, so = sys.argv[1], sys.argv[2]
boot = sqlite3.connect(":memory:")
boot.enable_load_extension(True)
boot.load_extension(so)
other = apsw.Connection(":memory:")
other.enable_load_extension(True)
try:
    other.load_extension(so)
    print("second: loaded")
except apsw.Error as e:
    print("second:", e)
con = sqlite3.connect(db)
with con:
    con.execute("INSERT INTO t VALUES (5)")
s = json.loads(con.execute("SELECT writelock_status()").fetchone()[0])
print("first: protected", s["databases"][0]["protected"], sqlite3.sqlite_version, apsw.sqlite_lib_version())
"#;
    let out = std::process::Command::new(&vpy)
        .args(["-c", script])
        .arg(&db)
        .arg(writelock_tests::so_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("second:")
            && stdout.contains("already loaded into a different SQLite library"),
        "{stdout}"
    );
    assert!(stdout.contains("first: protected True"), "{stdout}");
    eprintln!("{stdout}");
}

/// Odd paths: a directory name that is not UTF-8, and a database path near
/// SQLite's path limit (stock fails from ~505 bytes, as we do). Both work and
/// get their lock file; a path over the limit fails as in stock SQLite.
#[test]
fn odd_paths_work_or_fail_like_stock() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempdir();
    let weird = dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9-\xff"));
    std::fs::create_dir(&weird).unwrap();
    let mut long = dir.path().to_path_buf();
    while long.as_os_str().len() < 440 {
        long.push("d".repeat(60));
    }
    std::fs::create_dir_all(&long).unwrap();
    let pad = 500 - long.as_os_str().len() - "/.db".len();
    let long_db = long.join(format!("{}.db", "x".repeat(pad)));
    assert!(
        long_db.as_os_str().len() <= 505,
        "{}",
        long_db.as_os_str().len()
    );
    for db in [weird.join("app.db"), long_db] {
        for mode in Mode::BOTH {
            let c = open(&db, mode);
            c.execute_batch("CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES (1);")
                .unwrap();
            assert_eq!(
                lock_path(&db).exists(),
                mode == Mode::Writelock || lock_path(&db).exists()
            );
        }
        assert!(lock_path(&db).exists(), "{}", db.display());
    }
    let too_long = long.join("y".repeat(200) + ".db");
    for mode in Mode::BOTH {
        writelock_tests::load_extension();
        let flags =
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_CREATE;
        let r = Connection::open_with_flags_and_vfs(&too_long, flags, mode.vfs());
        assert!(r.is_err(), "{mode:?}: SQLite's own limit");
    }
}

// ---- WRITELOCK_LOG -----------------------------------------------------------

/// A `sqlite3` shell with the extension loaded, `env` set and no `.log`: the
/// messages the test sees come from `WRITELOCK_LOG`, not from SQLite's log.
/// Runs `script` from stdin; (stdout, stderr).
fn shell_script(db: &Path, env: &[(&str, &str)], script: &str, stderr: Stdio) -> (String, String) {
    use std::io::Write;
    let mut child = Command::new("sqlite3")
        .arg("-batch")
        .arg("-cmd")
        .arg(format!(".load {}", writelock_tests::so_path().display()))
        .arg("-cmd")
        .arg(format!(".open {}", db.display()))
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("the sqlite3 shell is needed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    // The extension must never hang its host: a shell still running after
    // 30 s is killed and the test fails (instead of hanging with it).
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the shell hung: {env:?}\n{script}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(
        o.status.success(),
        "{script}\n{}\nstdout: {out}\nstderr: {err}",
        o.status
    );
    (out, err)
}

/// A write transaction held 200 ms with `writelock_hold_warn_ms` 50.
const LONG_HOLD: &str = "PRAGMA writelock_hold_warn_ms=50;\n\
    BEGIN IMMEDIATE; INSERT INTO t VALUES (1);\n.shell sleep 0.2\nCOMMIT;\n";

/// `2025-01-31T12:00:00.123Z writelock[4242] ` at the start of `line`, with
/// this pid (any pid when `None`).
fn stamped(line: &str, pid: Option<u32>) -> bool {
    let b = line.as_bytes();
    let shape = "dddd-dd-ddTdd:dd:dd.dddZ ";
    let time_ok = b.len() > shape.len()
        && shape.bytes().zip(b).all(|(s, c)| match s {
            b'd' => c.is_ascii_digit(),
            _ => s == *c,
        });
    let rest = &line[shape.len().min(line.len())..];
    time_ok
        && match pid {
            Some(p) => rest.starts_with(&format!("writelock[{p}] ")),
            None => rest.starts_with("writelock["),
        }
}

/// `WRITELOCK_LOG=<file>`: a long hold and a `SQLITE_BUSY` refusal (who holds
/// the lock) land in the file, created when missing, one stamped line each,
/// from both processes; a later process appends.
#[test]
fn writelock_log_file_gets_long_holds_and_busy_refusals() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_db(&db, "wal");
    let log = dir.path().join("logs/writelock.log");
    std::fs::create_dir(log.parent().unwrap()).unwrap();
    let env = [("WRITELOCK_LOG", log.to_str().unwrap())];
    let lines = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };

    let mut holder = Shell::start_env(&env, &db, Mode::Writelock);
    holder.run("PRAGMA writelock_hold_warn_ms=50;");
    holder.run("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);");
    let mut refused = Shell::start_env(&env, &db, Mode::Writelock);
    let out = refused.run(".timeout 0\nINSERT INTO t VALUES (2);");
    assert!(out.contains("database is locked"), "{out}");
    let (hp, rp) = (holder.pid(), refused.pid());
    writelock_tests::wait_until("both messages are in WRITELOCK_LOG", || {
        let l = lines();
        l.iter().any(|l| l.contains("busy: ")) && l.iter().any(|l| l.contains("warning: "))
    });
    holder.run("COMMIT;");
    holder.finish();
    refused.finish();
    let l = lines();
    let hold = l
        .iter()
        .find(|l| l.contains(" warning: "))
        .expect("the long hold");
    assert!(
        stamped(hold, Some(hp))
            && hold.contains(&format!("process {hp} has held the write lock on"))
            && hold.contains("app.db")
            && hold.contains("warning threshold 50 ms"),
        "{l:#?}"
    );
    let busy = l
        .iter()
        .find(|l| l.contains(" busy: "))
        .expect("the refusal");
    assert!(
        stamped(busy, Some(rp))
            && busy.contains("app.db is locked by pid ")
            && busy.contains(&hp.to_string())
            && busy.contains("returning SQLITE_BUSY"),
        "{l:#?}"
    );
    assert!(
        l.iter().all(|x| stamped(x, None)),
        "one line per message: {l:#?}"
    );

    let before = l.len();
    shell_script(&db, &env, LONG_HOLD, Stdio::null());
    let after = lines();
    assert_eq!(after[..before], l[..], "appended, not truncated");
    assert!(after.len() > before, "{after:#?}");
}

/// `WRITELOCK_LOG=stderr` in a shell: the long hold reaches standard error,
/// whatever it is (the user asked: `2>>app.log` works), without `.log`.
#[test]
fn writelock_log_stderr_in_a_shell() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_db(&db, "delete");
    let env = [("WRITELOCK_LOG", "stderr")];
    let (_, err) = shell_script(&db, &env, LONG_HOLD, Stdio::piped());
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines.iter().any(|l| stamped(l, None)
            && l.contains(" warning: process ")
            && l.contains("held the write lock on")),
        "{err}"
    );
    let file = dir.path().join("stderr.log");
    let f = std::fs::File::create(&file).unwrap();
    shell_script(&db, &env, LONG_HOLD, f.into());
    let err = std::fs::read_to_string(&file).unwrap();
    assert!(err.contains("held the write lock on"), "{err:?}");
    let (_, err) = shell_script(&db, &[], LONG_HOLD, Stdio::piped());
    assert_eq!(err, "", "without WRITELOCK_LOG, nothing on stderr");
}

/// A bad `WRITELOCK_LOG` is reported once per process (on stderr, a pipe
/// here), naming the variable, the value or path and the cause; the extension
/// works all the same. It is no unknown variable either.
#[test]
fn a_bad_writelock_log_is_reported_and_the_extension_works() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    let other = dir.path().join("other.db");
    create_db(&db, "wal");
    let missing = dir.path().join("no-such-dir/writelock.log");
    let a_dir = dir.path().to_str().unwrap().to_string();
    let cases = [
        (missing.to_str().unwrap(), "No such file or directory"),
        (a_dir.as_str(), "not a regular file (a directory"),
        ("stdout", "bad value 'stdout' for WRITELOCK_LOG"),
        ("on", "bad value 'on' for WRITELOCK_LOG"),
    ];
    let script = format!(
        "INSERT INTO t VALUES (1);\n\
         SELECT json_extract(writelock_status(), '$.databases[0].protected');\n\
         .open {}\nCREATE TABLE IF NOT EXISTS u(x); INSERT INTO u VALUES (1);\n",
        other.display()
    );
    for (value, cause) in cases {
        let env = [("WRITELOCK_LOG", value)];
        let (out, err) = shell_script(&db, &env, &script, Stdio::piped());
        assert_eq!(out.trim(), "1", "{value}: protected and working; {err}");
        let reports: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("WRITELOCK_LOG"))
            .collect();
        assert_eq!(reports.len(), 1, "{value}: once per process: {err}");
        assert!(
            reports[0].contains(value) && reports[0].contains(cause),
            "{value}: {err}"
        );
        assert!(!err.contains("ignoring"), "not an unknown variable: {err}");
    }
    assert_eq!(count(&db), 1 + cases.len() as i64);
}

/// `WRITELOCK_LOG` naming a FIFO — nobody reading it, or someone — is
/// refused at load (a blocking open would hang the host; a reader can
/// vanish), reported once naming the variable, the path and the cause; the
/// shell runs its SQL and exits 0.
#[test]
fn a_fifo_for_writelock_log_is_refused_without_hanging() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_db(&db, "wal");
    let fifo = dir.path().join("log.fifo");
    let ok = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(ok.success(), "mkfifo");
    let path = fifo.to_str().unwrap();
    let env = [("WRITELOCK_LOG", path)];
    let before = count(&db);
    let script = "INSERT INTO t VALUES (1);\n\
        SELECT json_extract(writelock_status(), '$.databases[0].protected');\n";
    let check = |err: &str, out: &str| {
        assert_eq!(out.trim(), "1", "protected and working; {err}");
        let reports: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("WRITELOCK_LOG"))
            .collect();
        assert_eq!(reports.len(), 1, "once per process: {err}");
        assert!(
            reports[0].contains(path) && reports[0].contains("not a regular file"),
            "{err}"
        );
    };
    let (out, err) = shell_script(&db, &env, script, Stdio::piped());
    check(&err, &out);
    // With a reader holding the FIFO open: refused all the same.
    let mut reader = Command::new("sh")
        .arg("-c")
        .arg("exec cat \"$0\" >/dev/null")
        .arg(&fifo)
        .spawn()
        .unwrap();
    let (out, err) = shell_script(&db, &env, script, Stdio::piped());
    let _ = reader.kill();
    let _ = reader.wait();
    check(&err, &out);
    assert_eq!(count(&db), before + 2);
}

/// Writing a message when the reader of standard error is gone (a pipe whose
/// reader exited) never kills the host with SIGPIPE: with
/// `WRITELOCK_LOG=stderr` and a long hold, and for the warning about a
/// database opened before loading, the shell runs its later statements and
/// exits 0.
#[test]
fn a_gone_reader_of_stderr_does_not_kill_the_shell() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_db(&db, "delete");
    let broken = || {
        let (r, w) = std::io::pipe().unwrap();
        drop(r);
        w
    };
    let env = [("WRITELOCK_LOG", "stderr")];
    let before = count(&db);
    let script = format!("{LONG_HOLD}{LONG_HOLD}SELECT count(*) FROM t;\n");
    let (out, _) = shell_script(&db, &env, &script, broken().into());
    let after = (before + 2).to_string();
    assert_eq!(
        out.lines().last(),
        Some(after.as_str()),
        "the later statements ran"
    );

    // The warning at load time: app.db opened before the extension.
    let o = Command::new("sqlite3")
        .arg("-batch")
        .arg("-cmd")
        .arg(format!(".load {}", writelock_tests::so_path().display()))
        .arg(&db)
        .arg("SELECT count(*) FROM t;")
        .stdin(Stdio::null())
        .stderr(broken())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", o.status);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), after);
}
