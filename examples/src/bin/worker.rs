//! The Rust client of the cross-client tests (`tests/clients.rs`); the Python
//! (`bindings/python/tests/worker.py`) and Node (`bindings/node/test/worker.js`)
//! workers speak the same protocol.
//!
//! `writelock-client-worker MODE DB CMD [N]`
//! * MODE: `register` (linked, `writelock::register()`), `load` (the `.so` in
//!   `$WRITELOCK_PATH`, `load_extension`), `stock` (neither).
//! * Always prints `sqlite_version=…` and `status=…` (`writelock_status()`, or
//!   `missing: <error>` when the function does not exist), then per CMD:
//!   * `status` — nothing more;
//!   * `hold` — `BEGIN IMMEDIATE` + one insert, prints `holding`, waits for a
//!     line on stdin, commits, prints `committed`;
//!   * `try` — one insert with `busy_timeout` 200 ms: `ok` or `error=<message>`;
//!   * `write N` — N transactions (`BEGIN IMMEDIATE`, insert, `COMMIT`),
//!     `busy_timeout` 20 s; prints `writing` after the first commit and
//!     `done=N` at the end.
//!
//! Rows go to `t(client, i, ts)`, `ts` in Unix milliseconds from SQLite's clock;
//! `client` is `$WORKER_TAG` (default `rust-MODE`). The table must exist.

use std::io::BufRead;
use std::time::Duration;

use rusqlite::Connection;

const INSERT: &str =
    "INSERT INTO t(client, i, ts) VALUES (?1, ?2, (julianday('now') - 2440587.5) * 86400000.0)";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, db, cmd, rest @ ..] = args.as_slice() else {
        return Err("usage: writelock-client-worker register|load|stock DB CMD [N]".into());
    };
    match mode.as_str() {
        "register" => writelock::register()?,
        "load" => {
            let so = std::env::var("WRITELOCK_PATH").map_err(|_| "load needs WRITELOCK_PATH")?;
            let loader = Connection::open_in_memory()?;
            // SAFETY: loading this repository's extension.
            unsafe {
                loader.load_extension_enable()?;
                loader.load_extension(so, None::<&str>)?;
            }
        }
        "stock" => {}
        m => return Err(format!("unknown mode {m}").into()),
    }
    let tag = std::env::var("WORKER_TAG").unwrap_or_else(|_| format!("rust-{mode}"));
    let conn = Connection::open(db)?;
    let version: String = conn.query_row("SELECT sqlite_version()", [], |r| r.get(0))?;
    println!("sqlite_version={version}");
    let status = conn
        .query_row("SELECT writelock_status()", [], |r| r.get::<_, String>(0))
        .unwrap_or_else(|e| format!("missing: {e}"));
    println!("status={status}");
    match cmd.as_str() {
        "status" => {}
        "hold" => {
            conn.busy_timeout(Duration::from_secs(5))?;
            conn.execute_batch("BEGIN IMMEDIATE")?;
            conn.execute(INSERT, rusqlite::params![tag, 0])?;
            println!("holding");
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            conn.execute_batch("COMMIT")?;
            println!("committed");
        }
        "try" => {
            conn.busy_timeout(Duration::from_millis(200))?;
            match conn.execute(INSERT, rusqlite::params![tag, 0]) {
                Ok(_) => println!("ok"),
                Err(e) => println!("error={e}"),
            }
        }
        "write" => {
            let n: u32 = rest.first().ok_or("write needs N")?.parse()?;
            conn.busy_timeout(Duration::from_secs(20))?;
            for i in 0..n {
                conn.execute_batch("BEGIN IMMEDIATE")?;
                conn.execute(INSERT, rusqlite::params![tag, i])?;
                conn.execute_batch("COMMIT")?;
                if i == 0 {
                    println!("writing");
                }
            }
            println!("done={n}");
        }
        c => return Err(format!("unknown command {c}").into()),
    }
    Ok(())
}
