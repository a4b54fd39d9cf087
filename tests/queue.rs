//! The write-intent queue (waits in the busy handler's sleep) must never
//! deadlock and must respect busy_timeout. Each scenario runs with the
//! extension and with stock SQLite: the outcomes must be the same kind.

use std::path::Path;
use std::time::{Duration, Instant};

use writelock_tests::{create_table, open, tempdir, Mode, Shell};

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
