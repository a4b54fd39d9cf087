//! SQL scripts (`sql/*.slt`, sqllogictest format) run with and without the
//! extension.
//!
//! Every script runs twice, each time in a fresh temp directory whose main
//! database is `<tmpdir>/test.db`:
//! * label `writelock`: connections use VFS `writelock` from the built
//!   `target/release/libwritelock.so`, loaded at run time (never linked);
//! * label `stock`: connections use the plain `unix` VFS. The extension is
//!   loaded in this process all the same, so `writelock_status()` exists here
//!   too and reports VFS `unix` and `"protected": false`.
//!
//! Records without a condition must give the same result in both runs: that is
//! the "the extension is invisible" guarantee. Extension-only expectations are
//! marked `onlyif writelock`, stock-only ones `onlyif stock` (or `skipif
//! writelock`); say in a comment why they differ.
//!
//! In a script:
//! * `connection NAME` before a record runs it on connection NAME (opened on
//!   first use, same database, `busy_timeout` 0); unprefixed records use the
//!   default connection. All connections live in this one process.
//! * `query` records must list one type letter per result column (`query IT`);
//!   the letters themselves are not checked.
//! * `__TEST_DIR__` is replaced with the run's temp directory before parsing
//!   (e.g. `ATTACH '__TEST_DIR__/aux.db' AS aux`).
//! * Values print as: NULL → `NULL`, integers and text plainly, reals as Rust's
//!   `{:?}` (`2.0`, `0.5`), empty text → `(empty)`, blobs as `x'hex'`.
//! * Errors carry SQLite's message and extended code, e.g. `database is
//!   locked (code 5)`, so `statement error database is locked` matches.
//! * A record may hold several statements; the last one's result counts.
//!
//! To add a script, drop `sql/NAME.slt` next to the others; it is picked up
//! automatically. Run `make` first (it builds the `.so`), then
//! `cargo test --release -p writelock-tests --test slt [-- NAME-SUBSTRING...]`.

use std::path::{Path, PathBuf};

use rusqlite::fallible_iterator::FallibleIterator;
use rusqlite::types::ValueRef;
use rusqlite::{Batch, Connection};
use sqllogictest::{DBOutput, DefaultColumnType, Runner};
use writelock_tests::{open, tempdir, Mode};

/// One SQLite connection as a sqllogictest database.
struct Db(Connection);

#[derive(Debug)]
struct SqlError(String);

impl std::fmt::Display for SqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for SqlError {}

impl From<rusqlite::Error> for SqlError {
    fn from(e: rusqlite::Error) -> Self {
        SqlError(match e.sqlite_error() {
            Some(code) => format!("{e} (code {})", code.extended_code),
            None => e.to_string(),
        })
    }
}

fn text(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Null => "NULL".into(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(r) => format!("{r:?}"),
        ValueRef::Text(b"") => "(empty)".into(),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Blob(b) => format!(
            "x'{}'",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        ),
    }
}

impl sqllogictest::DB for Db {
    type Error = SqlError;
    type ColumnType = DefaultColumnType;

    fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SqlError> {
        let mut out = DBOutput::StatementComplete(0);
        let mut batch = Batch::new(&self.0, sql);
        while let Some(mut stmt) = batch.next()? {
            let ncol = stmt.column_count();
            if ncol == 0 {
                stmt.raw_execute()?;
                out = DBOutput::StatementComplete(self.0.changes());
                continue;
            }
            let mut rows = Vec::new();
            let mut cursor = stmt.raw_query();
            while let Some(row) = cursor.next()? {
                rows.push(
                    (0..ncol)
                        .map(|i| row.get_ref(i).map(text))
                        .collect::<Result<_, _>>()?,
                );
            }
            out = DBOutput::Rows {
                types: vec![DefaultColumnType::Any; ncol],
                rows,
            };
        }
        Ok(out)
    }
}

/// Run one script in one mode; `Err` holds the failure report.
fn run_script(script: &Path, mode: Mode, label: &str) -> Result<(), String> {
    let dir = tempdir();
    let db = dir.path().join("test.db");
    let src = std::fs::read_to_string(script).map_err(|e| e.to_string())?;
    let src = src.replace("__TEST_DIR__", &dir.path().to_string_lossy());
    let mut runner =
        Runner::new(move || std::future::ready(Ok::<_, SqlError>(Db(open(&db, mode)))));
    runner.add_label(label);
    // `query ITT` must name as many columns as the result has (types are not checked).
    runner.with_column_validator(|actual, expected| actual.len() == expected.len());
    let r = runner.run_script_with_name(&src, script.display().to_string());
    drop(runner); // close every connection before the directory goes
    r.map_err(|e| e.display(false).to_string())
}

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let sql_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql");
    let sql_dir = sql_dir
        .canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", sql_dir.display()));
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(&sql_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .filter(|p| {
            filters.is_empty()
                || filters
                    .iter()
                    .any(|f| p.to_string_lossy().contains(f.as_str()))
        })
        .collect();
    scripts.sort();

    let (mut passed, mut failed) = (0, 0);
    for script in &scripts {
        let name = script.file_name().unwrap().to_string_lossy();
        for (mode, label) in [(Mode::Writelock, "writelock"), (Mode::Stock, "stock")] {
            // A panic (e.g. a connection that cannot be opened) fails this run only.
            let result = std::panic::catch_unwind(|| run_script(script, mode, label))
                .unwrap_or_else(|_| Err("panicked (message above)".into()));
            match result {
                Ok(()) => {
                    passed += 1;
                    println!("ok    {name} [{label}]");
                }
                Err(e) => {
                    failed += 1;
                    println!("FAIL  {name} [{label}]\n{e}");
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 || passed == 0 {
        std::process::exit(1);
    }
}
