//! The `writelock` CLI and the holder record, with real processes: `status`
//! names the process that holds the lock, `run` excludes writers, `watch`
//! sees holds come and go. Each shows what differs without the extension.

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use writelock_tests::{
    cli_path, create_table, lock_path, open, outside_flock_free, proc_locks_on,
    spawn_until_first_line, tempdir, wait_until, FlockHolder, Mode, Shell,
};

fn status_json(db: &Path) -> Value {
    let out = Command::new(cli_path())
        .args(["status", "--json"])
        .arg(db)
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn status_names_the_holder_while_a_transaction_is_open() {
    for journal in ["delete", "wal"] {
        for mode in Mode::BOTH {
            let dir = tempdir();
            let db = dir.path().join("app.db");
            create_table(&db, journal);
            let mut sh = Shell::start(&db, mode);
            sh.run("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);");
            let v = status_json(&db);
            let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            assert_eq!(
                keys,
                [
                    "db",
                    "exists",
                    "held",
                    "held_for_ms",
                    "holder_cmdline",
                    "holder_pid",
                    "lock_file",
                    "waiters"
                ],
                "the JSON schema is a contract"
            );
            match mode {
                Mode::Writelock => {
                    assert_eq!(v["holder_pid"], sh.pid(), "{journal}: {v}");
                    assert!(v["held_for_ms"].as_u64().is_some(), "{v}");
                    assert!(
                        v["holder_cmdline"].as_str().unwrap().starts_with("sqlite3"),
                        "{v}"
                    );
                    // The same from SQL, in another process.
                    let c = open(&db, Mode::Writelock);
                    let s: String = c
                        .query_row("SELECT writelock_status()", [], |r| r.get(0))
                        .unwrap();
                    let s: Value = serde_json::from_str(&s).unwrap();
                    assert_eq!(s["databases"][0]["holder_pid"], sh.pid(), "{s}");
                }
                Mode::Stock => assert_eq!(v["holder_pid"], Value::Null, "{v}"),
            }
            sh.run("COMMIT;");
            assert_eq!(status_json(&db)["holder_pid"], Value::Null);
            sh.finish();
        }
    }
}

/// A writer of `mode` while a tool holds `db`'s lock: the extension's gets
/// `database is locked` after a 200 ms busy_timeout, a stock one writes.
/// The shell, for what the caller does next.
fn write_while_held(db: &Path, mode: Mode) -> Shell {
    let mut w = Shell::start(db, mode);
    w.run(".timeout 200");
    let out = w.run("INSERT INTO t VALUES (1);");
    match mode {
        Mode::Writelock => assert!(out.contains("database is locked"), "{out:?}"),
        Mode::Stock => assert_eq!(out, "", "stock writers ignore the lock"),
    }
    w
}

#[test]
fn run_holds_the_lock_for_the_command_and_passes_its_status() {
    for mode in Mode::BOTH {
        let dir = tempdir();
        let db = dir.path().join("app.db");
        create_table(&db, "wal");
        let (mut job, _, line) = spawn_until_first_line(
            Command::new(cli_path())
                .arg("run")
                .arg(&db)
                .args(["--", "sh", "-c", "echo started; read _; exit 7"])
                .stdin(Stdio::piped()),
        );
        assert_eq!(line.trim(), "started");
        let mut w = write_while_held(&db, mode);
        job.stdin.take().unwrap().write_all(b"\n").unwrap();
        assert_eq!(job.wait().unwrap().code(), Some(7), "the command's status");
        assert_eq!(w.run("INSERT INTO t VALUES (2);"), "");
        w.finish();
    }
}

/// `run` locks a lock file it may only read, as `flock(1)` does: a backup
/// run by a user who may read the database but not write it. The lock still
/// excludes the extension's writers (stock ones ignore it).
#[test]
fn run_locks_a_lock_file_it_may_only_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_table(&db, "wal");
    let lock = lock_path(&db);
    std::fs::write(&lock, b"").unwrap();
    // /proc/self belongs to the process's effective user.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
    let mut cmd = if root {
        // Root may write anything: run as nobody, who may read only.
        let mode = std::fs::Permissions::from_mode;
        std::fs::set_permissions(dir.path(), mode(0o755)).unwrap();
        std::fs::set_permissions(&db, mode(0o644)).unwrap();
        std::fs::set_permissions(&lock, mode(0o644)).unwrap();
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(cli_path());
        c
    } else {
        std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o444)).unwrap();
        Command::new(cli_path())
    };
    let (mut job, _, line) = spawn_until_first_line(
        cmd.arg("run")
            .arg(&db)
            .args(["--", "sh", "-c", "echo started; read _"])
            .stdin(Stdio::piped()),
    );
    assert_eq!(line.trim(), "started", "run refused a read-only lock file");
    assert!(!outside_flock_free(&db), "held while the command runs");
    if root {
        for mode in Mode::BOTH {
            write_while_held(&db, mode).finish();
        }
    }
    job.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert_eq!(job.wait().unwrap().code(), Some(0));
    assert!(outside_flock_free(&db), "free once the command exited");
}

#[test]
fn run_times_out_with_75_naming_the_holder() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_table(&db, "delete");
    let holder = FlockHolder::hold(&lock_path(&db));
    let out = Command::new(cli_path())
        .arg("run")
        .arg(&db)
        .args(["--timeout", "0.2", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not free within") && err.contains("flock"),
        "{err}"
    );
    holder.release();
    let out = Command::new(cli_path())
        .arg("run")
        .arg(&db)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn run_lets_the_command_borrow_the_lock() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_table(&db, "delete");
    let so = writelock_tests::so_path();
    let out = Command::new(cli_path())
        .arg("run")
        .arg(&db)
        .args(["--", "sqlite3", "-cmd"])
        .arg(format!(".load {}", so.display()))
        .arg("-cmd")
        .arg(format!(".open {}", db.display()))
        .args([
            ":memory:",
            "INSERT INTO t VALUES (1); SELECT count(*) FROM t;",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
}

/// `watch` shows a hold when it begins and its duration when it ends, once.
#[test]
fn watch_sees_a_hold_come_and_go() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_table(&db, "wal");
    std::fs::File::create(lock_path(&db)).unwrap();
    let (mut watch, mut out, line) =
        spawn_until_first_line(Command::new(cli_path()).arg("watch").arg(&db).args([
            "--for",
            "1.5",
            "--interval-ms",
            "5",
        ]));
    assert!(line.contains("watching"), "{line}");
    let mut sh = Shell::start(&db, Mode::Writelock);
    sh.run("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);");
    let mut held = String::new();
    out.read_line(&mut held).unwrap();
    let pid = sh.pid();
    assert!(held.contains(&format!("held  by pid {pid}")), "{held}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    sh.run("COMMIT;");
    sh.finish();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(watch.wait().unwrap().success());
    let first = rest.lines().next().unwrap_or_default();
    let ms: f64 = first
        .split_once(&format!("free  pid {pid} held it "))
        .and_then(|(_, ms)| ms.trim_end_matches(" ms").parse().ok())
        .unwrap_or_else(|| panic!("{held}{rest}"));
    assert!(ms >= 300.0, "{held}{rest}");
}

/// `watch` polling only every 300 ms still reports every one of 20 write
/// transactions of about a millisecond each, from the ring of recent holds
/// on the shared page. Stock writers take no lock `watch` could see.
#[test]
fn watch_misses_no_short_hold() {
    for mode in Mode::BOTH {
        let dir = tempdir();
        let db = dir.path().join("app.db");
        create_table(&db, "wal");
        std::fs::File::create(lock_path(&db)).unwrap();
        // Created before the watch starts, so its first look finds the page.
        drop(open(&db, Mode::Writelock));
        let (mut watch, mut out, line) =
            spawn_until_first_line(Command::new(cli_path()).arg("watch").arg(&db).args([
                "--for",
                "1.2",
                "--interval-ms",
                "300",
            ]));
        assert!(line.contains("watching"), "{line}");
        let mut sh = Shell::start(&db, mode);
        sh.run(&"INSERT INTO t VALUES (1);".repeat(20));
        let pid = sh.pid();
        sh.finish();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        assert!(watch.wait().unwrap().success());
        let frees = rest
            .lines()
            .filter(|l| l.contains(&format!("free  pid {pid} held it")))
            .count();
        match mode {
            // Each INSERT is a hold; so may be a checkpoint.
            Mode::Writelock => assert!(frees >= 20, "{frees} holds seen:\n{rest}"),
            Mode::Stock => assert_eq!(frees, 0, "{rest}"),
        }
    }
}

/// `writelock VERB ARGS… DB`: (exit code, stdout, stderr).
fn cli(args: &[&str], db: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(cli_path())
        .args(args)
        .arg(db)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `pid` sleeps in `nanosleep` now, as SQLite's busy handler does
/// between two polls (`/proc/PID/wchan`; true where the kernel does not say).
fn sleeps_in_busy_handler(pid: u32) -> bool {
    let w = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    w.contains("nanosleep") || w.trim().is_empty() || w.trim() == "0"
}

/// Whether `pid` is a blocked `flock` waiter (`->`) on `file` in /proc/locks.
fn blocked_in_flock(file: &Path, pid: u32) -> bool {
    proc_locks_on(file).iter().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"->") && f.contains(&pid.to_string().as_str())
    })
}

/// Wait at most 10 s for `child` to exit: its exit code.
fn exits(child: &mut Child) -> Option<i32> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---- status --exit-code ----------------------------------------------------------

/// `status --exit-code` exits 1 while a writer holds the lock and 0 when it
/// is free; plain `status` exits 0 either way, and the other codes stay.
/// A stock writer in its transaction holds no lock: 0.
#[test]
fn status_exit_code_says_whether_the_lock_is_held() {
    for mode in Mode::BOTH {
        let dir = tempdir();
        let db = dir.path().join("app.db");
        create_table(&db, "wal");
        let mut sh = Shell::start(&db, mode);
        sh.run("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);");
        let held = if mode == Mode::Writelock { 1 } else { 0 };
        assert_eq!(
            cli(&["status", "--exit-code"], &db).0,
            Some(held),
            "{mode:?}"
        );
        let (code, out, _) = cli(&["status", "--json", "--exit-code"], &db);
        assert_eq!(code, Some(held), "{mode:?}: {out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["held"], held == 1, "{v}");
        assert_eq!(cli(&["status"], &db).0, Some(0), "{mode:?}: plain status");
        sh.run("COMMIT;");
        assert_eq!(cli(&["status", "--exit-code"], &db).0, Some(0), "{mode:?}");
        sh.finish();
    }
    let dir = tempdir();
    let missing = dir.path().join("missing.db");
    assert_eq!(cli(&["status", "--exit-code"], &missing).0, Some(66));
    let db = dir.path().join("app.db");
    create_table(&db, "delete");
    std::fs::create_dir(lock_path(&db)).unwrap();
    assert_eq!(cli(&["status", "--exit-code"], &db).0, Some(73));
}

// ---- status: waiters ---------------------------------------------------------------

/// While a writer holds the lock, `status` lists a queued writer of the
/// extension (how "extension", with how long it has waited) and a blocked
/// `flock(1)` (how "flock", in the kernel's queue), each with pid and
/// command line, in text and JSON. Without the extension nothing queues: the
/// stock writer polls in SQLite's busy handler, and flock(1) is not blocked.
#[test]
fn status_lists_queued_writers_and_blocked_flocks() {
    for mode in Mode::BOTH {
        let dir = tempdir();
        let db = dir.path().join("app.db");
        create_table(&db, "wal");
        std::fs::File::create(lock_path(&db)).unwrap();
        let mut holder = Shell::start(&db, mode);
        holder.run("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);");
        let mut queued = Shell::start(&db, mode);
        queued.run(".timeout 20000");
        queued.submit("INSERT INTO t VALUES (2);");
        let mut flock = Command::new("flock")
            .arg("-x")
            .arg(lock_path(&db))
            .arg("true")
            .spawn()
            .unwrap();
        match mode {
            Mode::Writelock => {
                wait_until("two waiters", || {
                    status_json(&db)["waiters"].as_array().unwrap().len() == 2
                });
                let v = status_json(&db);
                let w = &v["waiters"];
                assert_eq!(v["holder_pid"], holder.pid(), "{v}");
                assert_eq!(w[0]["pid"], queued.pid(), "{v}");
                assert_eq!(w[0]["how"], "extension", "{v}");
                assert!(
                    w[0]["cmdline"].as_str().unwrap().starts_with("sqlite3"),
                    "{v}"
                );
                assert!(w[0]["waiting_ms"].as_u64().is_some(), "{v}");
                assert_eq!(w[1]["pid"], flock.id(), "{v}");
                assert_eq!(w[1]["how"], "flock", "{v}");
                assert!(
                    w[1]["cmdline"].as_str().unwrap().starts_with("flock -x"),
                    "{v}"
                );
                assert_eq!(w[1]["waiting_ms"], Value::Null, "{v}");
                assert!(blocked_in_flock(&lock_path(&db), flock.id()));
                let (_, text, _) = cli(&["status"], &db);
                let ext = format!("waiting:   pid {} (sqlite3", queued.pid());
                let fl = format!("pid {} (flock -x ", flock.id());
                assert!(text.contains(&ext), "{text}");
                assert!(text.contains(&fl) && text.contains("[flock]"), "{text}");
                holder.run("COMMIT;");
                assert_eq!(queued.collect(), "", "the queued writer wrote");
                assert_eq!(exits(&mut flock), Some(0));
            }
            Mode::Stock => {
                assert_eq!(exits(&mut flock), Some(0), "flock(1) was not blocked");
                wait_until("the stock writer polls", || {
                    sleeps_in_busy_handler(queued.pid())
                });
                let v = status_json(&db);
                assert_eq!(v["held"], false, "{v}");
                assert_eq!(v["waiters"], serde_json::json!([]), "{v}");
                holder.run("COMMIT;");
                assert_eq!(queued.collect(), "");
            }
        }
        assert_eq!(status_json(&db)["waiters"], serde_json::json!([]));
        holder.finish();
        queued.finish();
    }
}

// ---- watch: holders without a record -----------------------------------------------

/// `watch` says how it sees holders that leave no record on the shared page
/// (`flock(1)`): from /proc/locks, every 100 ms. Their lines say so; an
/// extension writer's hold afterwards is read from the ring, without.
#[test]
fn watch_says_how_it_sees_a_flock_holder() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_table(&db, "wal");
    std::fs::File::create(lock_path(&db)).unwrap();
    drop(open(&db, Mode::Writelock));
    let (mut watch, mut out, line) =
        spawn_until_first_line(Command::new(cli_path()).arg("watch").arg(&db).args([
            "--for",
            "2",
            "--interval-ms",
            "5",
        ]));
    assert!(
        line.contains("watching") && line.contains("/proc/locks every 100 ms"),
        "{line}"
    );
    let holder = FlockHolder::hold(&lock_path(&db));
    let mut held = String::new();
    out.read_line(&mut held).unwrap();
    assert!(
        held.contains("held  by pid")
            && held.contains("(flock -x ")
            && held.contains("(seen in /proc/locks)"),
        "{held}"
    );
    holder.release();
    let mut free = String::new();
    out.read_line(&mut free).unwrap();
    assert!(
        free.contains("free  pid") && free.ends_with("(seen in /proc/locks)\n"),
        "{free}"
    );
    let mut sh = Shell::start(&db, Mode::Writelock);
    sh.run("INSERT INTO t VALUES (1);");
    let pid = sh.pid();
    sh.finish();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(watch.wait().unwrap().success());
    let mine: Vec<&str> = rest
        .lines()
        .filter(|l| l.contains(&format!("pid {pid} ")))
        .collect();
    assert!(!mine.is_empty(), "{rest}");
    assert!(mine.iter().all(|l| !l.contains("/proc/locks")), "{rest}");
}

// ---- run: the kernel's queue, --timeout, -o --------------------------------------

/// `run` waits in flock(2) like flock(1): a blocked `->` waiter in
/// /proc/locks that `status` lists, woken when the holder lets go, with no
/// polling. With --timeout it gives up after about that long, exit 75.
#[test]
fn run_waits_in_the_kernels_queue_and_times_out() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_table(&db, "delete");
    let lock = lock_path(&db);
    let holder = FlockHolder::hold(&lock);
    let mut run = Command::new(cli_path())
        .arg("run")
        .arg(&db)
        .args(["--", "true"])
        .spawn()
        .unwrap();
    let pid = run.id();
    wait_until("run is a blocked flock waiter", || {
        blocked_in_flock(&lock, pid)
    });
    let v = status_json(&db);
    assert!(
        v["waiters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["pid"] == pid && w["how"] == "flock"),
        "{v}"
    );
    holder.release();
    assert_eq!(exits(&mut run), Some(0));

    let holder = FlockHolder::hold(&lock);
    let t0 = Instant::now();
    let mut run = Command::new(cli_path())
        .arg("run")
        .arg(&db)
        .args(["--timeout", "0.5", "--", "true"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = run.id();
    wait_until("run --timeout is a blocked flock waiter", || {
        blocked_in_flock(&lock, pid) || t0.elapsed() > Duration::from_millis(400)
    });
    assert!(blocked_in_flock(&lock, pid), "{:?}", proc_locks_on(&lock));
    assert_eq!(exits(&mut run), Some(75));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("not free within 0.5s"), "{err}");
    holder.release();
}

/// Start `writelock run [-o] DB -- sh -c '<daemon> & echo $!'`: the command
/// leaves a `sleep 30` running and exits 0. The daemon's pid.
fn run_leaving_a_daemon(db: &Path, close: bool) -> u32 {
    let mut cmd = Command::new(cli_path());
    cmd.arg("run");
    if close {
        cmd.arg("-o");
    }
    let out = cmd
        .arg(db)
        .args([
            "--",
            "sh",
            "-c",
            "sleep 30 </dev/null >/dev/null 2>&1 & echo $!",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Without -o the command's children inherit the locked descriptor, as
/// under flock(1): a daemon the command leaves running keeps the lock after
/// `run` exits. With -o (as flock -o) it does not: the lock is free the
/// moment the command exits, while the daemon lives on.
#[test]
fn run_o_keeps_the_lock_from_a_daemon_the_command_leaves() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_table(&db, "delete");
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    let kill = |pid: u32| {
        Command::new("kill").arg(pid.to_string()).status().unwrap();
    };

    let daemon = run_leaving_a_daemon(&db, false);
    assert!(alive(daemon));
    assert!(
        !outside_flock_free(&db),
        "without -o the daemon keeps the lock"
    );
    kill(daemon);
    wait_until("the lock is free once the daemon is gone", || {
        outside_flock_free(&db)
    });

    let daemon = run_leaving_a_daemon(&db, true);
    assert!(alive(daemon), "the daemon outlives the command");
    assert!(
        outside_flock_free(&db),
        "with -o the lock is free when the command exits"
    );
    kill(daemon);
}

// ---- run and signals --------------------------------------------------------------

/// `writelock run -o DB -- sh …` signalled while the command runs: `run`
/// passes the signal on to the command and keeps the lock until the command
/// exits, then exits with its status. A writer of the extension waiting
/// meanwhile commits only after the command's last line. (If `run` died of
/// the signal, the lock, held by it alone under -o, would be free at once
/// and the writer would commit while the command still runs.)
#[test]
fn run_o_passes_a_signal_on_and_holds_the_lock_until_the_command_exits() {
    for sig in ["TERM", "HUP", "INT"] {
        let dir = tempdir();
        let db = dir.path().join("app.db");
        let log = dir.path().join("log");
        create_table(&db, "delete");
        let script = format!(
            "trap 'echo got-{sig} >> {log}' {sig}; echo started; \
             i=0; while [ $i -lt 10 ]; do sleep 0.1; i=$((i+1)); done; \
             echo end >> {log}; exit 5",
            log = log.display()
        );
        let (mut run, _, line) = spawn_until_first_line(
            Command::new(cli_path())
                .args(["run", "-o"])
                .arg(&db)
                .args(["--", "sh", "-c", &script]),
        );
        assert_eq!(line.trim(), "started");
        let kill = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(run.id().to_string())
            .status()
            .unwrap();
        assert!(kill.success());
        let mut w = Shell::start(&db, Mode::Writelock);
        w.run(".timeout 20000");
        assert_eq!(w.run("INSERT INTO t VALUES (42);"), "");
        let at_commit = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            at_commit.contains("end"),
            "SIG{sig}: the writer committed while the command still ran: {at_commit:?}"
        );
        assert!(
            at_commit.contains(&format!("got-{sig}")),
            "SIG{sig} reached the command: {at_commit:?}"
        );
        assert_eq!(exits(&mut run), Some(5), "SIG{sig}: the command's status");
        w.finish();
    }
}

/// `python3 -c …` that blocks SIGALRM, then executes ARGS: a caller whose
/// signal mask blocks it.
fn with_sigalrm_blocked() -> Command {
    let mut c = Command::new("python3");
    c.args([
        "-c",
        "import os, signal, sys; \
         signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM}); \
         os.execvp(sys.argv[1], sys.argv[1:])",
    ]);
    c
}

/// --timeout works for a caller that blocks SIGALRM (the signal that ends
/// the wait): `run` exits 75 in time instead of waiting for the holder.
#[test]
fn run_times_out_when_the_caller_blocks_sigalrm() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_table(&db, "delete");
    let holder = FlockHolder::hold(&lock_path(&db));
    let t0 = Instant::now();
    let mut run = with_sigalrm_blocked()
        .arg(cli_path())
        .arg("run")
        .arg(&db)
        .args(["--timeout", "0.3", "--", "true"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let code = loop {
        if let Some(st) = run.try_wait().unwrap() {
            break st.code();
        }
        if t0.elapsed() > Duration::from_secs(5) {
            let _ = run.kill();
            let _ = run.wait();
            panic!("run --timeout 0.3 still waits after 5 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(code, Some(75));
    holder.release();
}

/// The command starts with its caller's signal mask, whatever `run` blocks
/// or unblocks for itself: SigBlk in /proc/self/status is the same under
/// `run` (with and without --timeout) as without it.
#[test]
fn run_gives_the_command_the_callers_signal_mask() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_table(&db, "delete");
    let probe = ["grep", "^SigBlk", "/proc/self/status"];
    let sigblk = |c: &mut Command| {
        let out = c.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let caller = sigblk(with_sigalrm_blocked().args(probe));
    let mask = u64::from_str_radix(caller.split_whitespace().nth(1).unwrap(), 16).unwrap();
    assert_ne!(mask & (1 << (14 - 1)), 0, "SIGALRM blocked: {caller}");
    for timeout in [&[][..], &["--timeout", "5"][..]] {
        for close in [&[][..], &["-o"][..]] {
            let under_run = sigblk(
                with_sigalrm_blocked()
                    .arg(cli_path())
                    .arg("run")
                    .args(close)
                    .arg(&db)
                    .args(timeout)
                    .arg("--")
                    .args(probe),
            );
            assert_eq!(under_run, caller, "run {close:?} {timeout:?}");
        }
    }
    let plain = sigblk(Command::new(probe[0]).args(&probe[1..]));
    let under_run = sigblk(
        Command::new(cli_path())
            .arg("run")
            .arg(&db)
            .arg("--")
            .args(probe),
    );
    assert_eq!(under_run, plain, "without a wrapper");
}

// ---- ps ------------------------------------------------------------------------------

/// `writelock ps DB --json`: (exit code, the object).
fn ps_json(db: &Path) -> (Option<i32>, Value) {
    let (code, out, err) = cli(&["ps", "--json"], db);
    (
        code,
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}")),
    )
}

/// The entry of `pid` in `ps --json`'s processes.
fn ps_entry(v: &Value, pid: u32) -> Option<&Value> {
    v["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
}

/// A python process that opened `db` with `open(db, 'rb')` (O_RDONLY) and
/// keeps it open until its stdin closes.
fn python_reader(db: &Path) -> Child {
    let (child, _, line) = spawn_until_first_line(
        Command::new("python3")
            .args([
                "-c",
                "import sys; f = open(sys.argv[1], 'rb'); print('open', flush=True); sys.stdin.read()",
            ])
            .arg(db)
            .stdin(Stdio::piped()),
    );
    assert_eq!(line.trim(), "open");
    child
}

/// `ps` tells a sqlite3 shell with the extension loaded (protected: a
/// marked descriptor on the lock file per connection) from a stock one (NOT
/// PROTECTED, exit 1), and lists a python `open(db, 'rb')` apart as
/// read-only. The same shell, the same database: only the extension differs.
#[test]
fn ps_tells_protected_openers_from_stock_ones_and_readers() {
    let dir = tempdir();
    let db = dir.path().join("app.db");
    create_table(&db, "wal");

    // Nobody has it open.
    let (code, v) = ps_json(&db);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["processes"], serde_json::json!([]), "{v}");
    assert!(v["not_inspectable"].as_u64().is_some(), "{v}");

    for mode in Mode::BOTH {
        let mut sh = Shell::start(&db, mode);
        sh.run("SELECT count(*) FROM t;");
        let (code, v) = ps_json(&db);
        let e = ps_entry(&v, sh.pid()).unwrap_or_else(|| panic!("{mode:?}: {v}"));
        assert_eq!(e["read_only"], false, "{e}");
        assert_eq!(e["db_fds_writable"], 1, "{e}");
        let (c, text, _) = cli(&["ps"], &db);
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("pid {} ", sh.pid())))
            .unwrap_or_else(|| panic!("{text}"));
        match mode {
            Mode::Writelock => {
                assert_eq!(code, Some(0), "{v}");
                assert_eq!(
                    (e["protected"].clone(), e["marker_fds"].clone()),
                    (true.into(), 1.into()),
                    "{e}"
                );
                assert!(line.contains(" protected "), "{line}");
            }
            Mode::Stock => {
                assert_eq!(code, Some(1), "{v}");
                assert_eq!(
                    (e["protected"].clone(), e["marker_fds"].clone()),
                    (false.into(), 0.into()),
                    "{e}"
                );
                assert!(line.contains(" NOT PROTECTED "), "{line}");
            }
        }
        assert_eq!(c, code);
        let last = text.lines().last().unwrap_or_default();
        let (n, rest) = last.split_once(' ').unwrap_or_default();
        assert!(
            n.parse::<u32>().is_ok() && rest.starts_with("processes not inspectable"),
            "{text}"
        );
        sh.finish();
    }

    // A reader beside a protected writer: listed apart, not judged.
    let mut sh = Shell::start(&db, Mode::Writelock);
    sh.run("SELECT count(*) FROM t;");
    let mut py = python_reader(&db);
    let (code, v) = ps_json(&db);
    assert_eq!(code, Some(0), "{v}");
    let e = ps_entry(&v, py.id()).unwrap_or_else(|| panic!("{v}"));
    assert_eq!(e["read_only"], true, "{e}");
    assert_eq!(e["protected"], Value::Null, "{e}");
    assert_eq!(e["db_fds_read_only"], 1, "{e}");
    let (_, text, _) = cli(&["ps"], &db);
    let (writers, readers) = text
        .split_once("read-only (")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(writers.contains(&format!("pid {} ", sh.pid())), "{text}");
    assert!(readers.contains(&format!("pid {} ", py.id())), "{text}");
    drop(py.stdin.take());
    py.wait().unwrap();
    sh.finish();
}
