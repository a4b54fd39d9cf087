//! The write-intent queue (waits in the busy handler's sleep) must never
//! deadlock and must respect busy_timeout. Each scenario runs with the
//! extension and with stock SQLite: the outcomes must be the same kind.

use std::path::Path;
use std::time::{Duration, Instant};

use writelock_tests::{
    create_table, lock_path, open, outside_flock_free, proc_locks_on, tempdir, wait_until, Mode,
    Shell,
};

/// No word on the shared page holds a writer back for long: a hand-off
/// reservation damaged to last for ever (or written by a process whose
/// monotonic clock runs elsewhere) binds nobody beyond the hand-off grace,
/// so the next writer still gets the lock at once. Stock SQLite never reads
/// the page.
#[test]
fn a_damaged_handoff_word_holds_no_writer_back() {
    use std::io::{Seek, SeekFrom, Write};
    for journal in ["delete", "wal"] {
        for mode in Mode::BOTH {
            let dir = tempdir();
            let db = dir.path().join("app.db");
            create_table(&db, journal);
            let w = open(&db, mode);
            w.busy_timeout(Duration::from_millis(1000)).unwrap();
            w.execute_batch("INSERT INTO t VALUES (0);").unwrap();
            // The reservation word (bytes 64..72): slot 65534, until the end of time.
            let page = writelock_core::page::page_path_for(&lock_path(&db));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&page)
                .unwrap();
            f.seek(SeekFrom::Start(64)).unwrap();
            f.write_all(&[0xff; 8]).unwrap();
            drop(f);
            let r = w.execute_batch("INSERT INTO t VALUES (1);");
            assert!(r.is_ok(), "{journal} {mode:?}: {r:?}");
        }
    }
}

/// Two connections in one thread: the second writer waits its busy_timeout
/// for a lock its own thread holds, then gets `database is locked`.
#[test]
fn two_connections_in_one_thread_time_out() {
    for journal in ["delete", "wal"] {
        for mode in Mode::BOTH {
            let dir = tempdir();
            let db = dir.path().join("app.db");
            create_table(&db, journal);
            let a = open(&db, mode);
            let b = open(&db, mode);
            b.busy_timeout(Duration::from_millis(300)).unwrap();
            a.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
                .unwrap();
            let t0 = Instant::now();
            let e = b.execute_batch("BEGIN IMMEDIATE").unwrap_err().to_string();
            let waited = t0.elapsed();
            assert!(e.contains("database is locked"), "{journal} {mode:?}: {e}");
            assert!(
                waited >= Duration::from_millis(250),
                "{journal} {mode:?}: {waited:?}"
            );
            assert!(
                waited < Duration::from_millis(2000),
                "{journal} {mode:?}: bounded, {waited:?}"
            );
            a.execute_batch("COMMIT").unwrap();
            b.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (2); COMMIT;")
                .unwrap();
        }
    }
}

/// A deferred read transaction that tries to write while another process
/// holds the lock gets SQLITE_BUSY at once, busy_timeout notwithstanding.
#[test]
fn deferred_upgrade_is_busy_at_once() {
    for journal in ["delete", "wal"] {
        for mode in Mode::BOTH {
            let dir = tempdir();
            let db = dir.path().join("app.db");
            create_table(&db, journal);
            let mut holder = Shell::start(&db, mode);
            let b = open(&db, mode);
            b.busy_timeout(Duration::from_millis(3000)).unwrap();
            b.execute_batch("BEGIN; SELECT count(*) FROM t;").unwrap();
            holder.run("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);");
            let t0 = Instant::now();
            let e = b
                .execute("INSERT INTO t VALUES (2)", [])
                .unwrap_err()
                .to_string();
            assert!(e.contains("database is locked"), "{journal} {mode:?}: {e}");
            assert!(
                t0.elapsed() < Duration::from_millis(1000),
                "{journal} {mode:?}: {:?}",
                t0.elapsed()
            );
            b.execute_batch("ROLLBACK").unwrap();
            holder.run("COMMIT;");
            holder.finish();
        }
    }
}

/// Two processes write two ATTACHed databases in opposite orders. Whoever
/// waits holds the other's lock, so each may time out — but nothing hangs:
/// both finish within their busy_timeout, and every commit is whole.
#[test]
fn attached_databases_in_opposite_orders_never_hang() {
    for mode in Mode::BOTH {
        let dir = tempdir();
        let a = dir.path().join("a.db");
        let b = dir.path().join("b.db");
        create_table(&a, "wal");
        create_table(&b, "delete");
        let script = |first: &Path, second: &Path| {
            let mut sql = format!(".timeout 200\nATTACH '{}' AS other;\n", second.display());
            for i in 0..40 {
                sql.push_str(&format!(
                    "BEGIN; INSERT INTO main.t VALUES ({i}); INSERT INTO other.t VALUES ({i}); COMMIT;\nROLLBACK;\n"
                ));
            }
            let _ = first;
            sql
        };
        let t0 = Instant::now();
        let mut p1 = Shell::start(&a, mode);
        let mut p2 = Shell::start(&b, mode);
        let s1 = script(&a, &b);
        let s2 = script(&b, &a);
        let h1 = std::thread::spawn(move || {
            let out = p1.run(&s1);
            p1.finish();
            out
        });
        let h2 = std::thread::spawn(move || {
            let out = p2.run(&s2);
            p2.finish();
            out
        });
        let (o1, o2) = (h1.join().unwrap(), h2.join().unwrap());
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{mode:?}: took {:?}",
            t0.elapsed()
        );
        for out in [&o1, &o2] {
            for line in out.lines() {
                assert!(
                    line.contains("database is locked")
                        || line.contains("no transaction is active"),
                    "{mode:?}: unexpected {line:?}"
                );
            }
        }
        let ca = open(&a, Mode::Stock);
        let na: i64 = ca
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        let cb = open(&b, Mode::Stock);
        let nb: i64 = cb
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            na, nb,
            "{mode:?}: each commit wrote both databases or neither"
        );
        assert!(na > 0, "{mode:?}: some transactions committed");
    }
}

/// Waiters for `<db>.lock`, as `writelock status` lists them: connections
/// queued on the shared page, and `flock` waiters in the kernel's queue.
fn queued(db: &Path) -> usize {
    if !lock_path(db).exists() {
        return 0;
    }
    let out = std::process::Command::new(writelock_tests::cli_path())
        .args(["status", "--json"])
        .arg(db)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["waiters"].as_array().map_or(0, |w| w.len())
}

/// Writers that find the lock taken queue for it in arrival order and are
/// served in that order (`writelock status` lists them as waiters). Stock
/// SQLite has no queue: its writers poll, so no waiter ever shows up, and
/// either may win.
#[test]
fn waiting_writers_are_served_in_arrival_order() {
    for journal in ["wal", "delete"] {
        for mode in Mode::BOTH {
            let dir = tempdir();
            let db = dir.path().join("app.db");
            create_table(&db, journal);
            let mut a = Shell::start(&db, mode);
            a.run("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);");
            let mut writers = Vec::new();
            for (n, x) in [2, 3].into_iter().enumerate() {
                let mut w = Shell::start(&db, mode);
                w.run(".timeout 10000");
                w.submit(&format!(
                    "BEGIN IMMEDIATE; INSERT INTO t VALUES ({x}); COMMIT;"
                ));
                if mode == Mode::Writelock {
                    wait_until(&format!("{} writer(s) queue ({journal})", n + 1), || {
                        queued(&db) == n + 1
                    });
                }
                writers.push(w);
            }
            if mode == Mode::Stock {
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_millis(300) {
                    assert_eq!(queued(&db), 0, "{journal}: stock has no queue");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            a.run("COMMIT;");
            for mut w in writers {
                let out = w.collect();
                assert!(!out.contains("Error"), "{journal} {mode:?}: {out}");
                w.finish();
            }
            a.finish();
            let c = open(&db, Mode::Stock);
            let order: Vec<i64> = c
                .prepare("SELECT x FROM t ORDER BY rowid")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            assert_eq!(order.len(), 3, "{journal} {mode:?}: {order:?}");
            if mode == Mode::Writelock {
                assert_eq!(order, [1, 2, 3], "{journal}: served in arrival order");
            }
        }
    }
}

/// A reader that meets a writer waiting for EXCLUSIVE (rollback journal)
/// waits for it within its own busy_timeout and then gets `database is
/// locked`, as with stock SQLite; once the writer is through, it reads.
#[test]
fn reader_behind_a_committing_writer_waits_at_most_its_timeout() {
    for mode in Mode::BOTH {
        let dir = tempdir();
        let db = dir.path().join("app.db");
        create_table(&db, "delete");
        let mut w = Shell::start(&db, mode);
        w.run(".timeout 10000\nBEGIN IMMEDIATE; INSERT INTO t VALUES (1);");
        let r = open(&db, mode);
        r.execute_batch("BEGIN; SELECT count(*) FROM t;").unwrap();
        w.submit("COMMIT;"); // waits for r's SHARED, holding off new readers
        let pending = |l: &String| match mode {
            // Our pending marker: an OFD write lock on byte 1 of <db>.lock.
            Mode::Writelock => l.contains("OFDLCK") && l.contains("WRITE") && l.ends_with(" 1 1"),
            // SQLite's PENDING byte (0x40000000) on the database file.
            Mode::Stock => l.contains("POSIX") && l.contains("WRITE") && l.contains(" 1073741824 "),
        };
        let file = if mode == Mode::Writelock {
            lock_path(&db)
        } else {
            db.clone()
        };
        wait_until("the writer waits for EXCLUSIVE", || {
            proc_locks_on(&file).iter().any(pending)
        });
        // Another process (in-process connections share SQLite's locks and
        // would skip the PENDING check).
        let mut c = Shell::start(&db, mode);
        c.run(".timeout 300");
        let t0 = Instant::now();
        let e = c.run("SELECT count(*) FROM t;");
        let waited = t0.elapsed();
        assert!(e.contains("database is locked"), "{mode:?}: {e}");
        assert!(waited >= Duration::from_millis(250), "{mode:?}: {waited:?}");
        assert!(
            waited < Duration::from_millis(2000),
            "{mode:?}: bounded, {waited:?}"
        );
        r.execute_batch("COMMIT").unwrap();
        let out = w.collect();
        assert!(!out.contains("Error"), "{mode:?}: {out}");
        assert_eq!(c.run("SELECT count(*) FROM t;").trim(), "1", "{mode:?}");
        c.finish();
        w.finish();
    }
}

/// Process-wide defaults come from the environment (`WRITELOCK_` + the
/// option's name in capitals); a bad value fails the open with a message
/// naming the variable, and nothing is written unprotected.
#[test]
fn environment_sets_process_wide_defaults() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_table(&db, "wal");
    let shell = |var: &str, value: &str, sql: &str| {
        let mut s = Shell::start_env(&[(var, value)], &db, Mode::Writelock);
        let out = s.run(sql);
        s.finish();
        out
    };
    let q = "SELECT json_extract(writelock_status(), '$.databases[0].options.queue_ahead_ms'), \
             json_extract(writelock_status(), '$.databases[0].options.queue');";
    assert_eq!(shell("WRITELOCK_QUEUE_AHEAD_MS", "40", q).trim(), "40|1");
    assert_eq!(shell("WRITELOCK_QUEUE", "0", q).trim(), "25|0");
    let e = shell(
        "WRITELOCK_QUEUE_AHEAD_MS",
        "soon",
        "INSERT INTO t VALUES (1);",
    );
    assert!(
        e.contains("WRITELOCK_QUEUE_AHEAD_MS") && e.contains("'soon'"),
        "{e}"
    );
    let n: i64 = open(&db, Mode::Stock)
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0, "the failed open wrote nothing");
}

/// Right after its connection queued for (and got) the lock behind another
/// process, the application takes its own `flock` on `<db>.lock`: the next
/// write borrows it at once, without queueing behind the application's own
/// lock, and when the application lets go nothing keeps `<db>.lock` after
/// the commit. Stock SQLite takes no lock, so its write never waits for the
/// `flock(1)` holder in the first place.
#[test]
fn an_app_lock_taken_while_queued_is_borrowed_and_the_late_grant_released() {
    for mode in Mode::BOTH {
        let dir = tempdir();
        let db = dir.path().join("app.db");
        create_table(&db, "wal");
        let c = open(&db, mode);
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        // 1. Contend with another process: the handle looks for the app's
        //    lock (none), queues, and writes once the holder lets go.
        let holder = writelock_tests::FlockHolder::hold(&lock_path(&db));
        let db2 = db.clone();
        let releaser = std::thread::spawn(move || {
            if mode == Mode::Writelock {
                wait_until("the connection queues", || queued(&db2) == 1);
            }
            holder.release();
        });
        let t0 = Instant::now();
        c.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1); COMMIT;")
            .unwrap();
        if mode == Mode::Stock {
            releaser.join().unwrap();
            continue; // stock wrote without waiting for the holder at all
        }
        releaser.join().unwrap();
        // 2. Right after, the application takes its own lock; the next
        //    write borrows it at once.
        let app = std::fs::File::open(lock_path(&db)).unwrap();
        app.lock().unwrap(); // flock(LOCK_EX)
        c.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (2);")
            .unwrap();
        let borrowed: bool = c
            .query_row(
                "SELECT json_extract(writelock_status(), '$.databases[0].borrowed')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(borrowed, "writes under the application's own lock");
        assert_eq!(
            queued(&db),
            0,
            "nobody queues behind its own process's lock"
        );
        // 3. The app lets go while the connection still borrows: nothing
        //    may stay with the connection's description after the commit.
        drop(app);
        wait_until("the queued waiter is served", || queued(&db) == 0);
        c.execute_batch("COMMIT").unwrap();
        wait_until("<db>.lock is free for other processes", || {
            outside_flock_free(&db)
        });
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
