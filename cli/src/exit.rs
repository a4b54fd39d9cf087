//! Every exit code of every verb, in one table: the code uses the constants,
//! `--help` prints [`help`], and docs/cli.md holds [`markdown`] (a test
//! compares them).

/// `status --exit-code`: the lock is held. `ps`: a writable opener is not
/// protected.
pub const FOUND: u8 = 1;
/// Usage error (clap's own code).
pub const USAGE: u8 = 2;
/// No database at DB.
pub const NO_DB: u8 = 66;
/// The lock file cannot be used.
pub const LOCK_FILE: u8 = 73;
/// `run --timeout` ran out.
pub const TIMEOUT: u8 = 75;
/// `run`: the command could not be executed.
pub const CANNOT_EXEC: u8 = 126;
/// `run`: the command was not found.
pub const NOT_FOUND: u8 = 127;

/// One row: which verbs, the code, what it means.
pub struct Row {
    pub verbs: &'static str,
    pub code: &'static str,
    pub meaning: &'static str,
}

const fn row(verbs: &'static str, code: &'static str, meaning: &'static str) -> Row {
    Row {
        verbs,
        code,
        meaning,
    }
}

/// The table. Codes are strings: `run` passes ranges through.
pub const EXIT_CODES: &[Row] = &[
    row("status", "0", "the state was printed, held or free"),
    row("status --exit-code", "0", "the lock is free"),
    row("status --exit-code", "1", "the lock is held"),
    row(
        "watch",
        "0",
        "--for SECS passed (without --for it runs until interrupted)",
    ),
    row(
        "run",
        "0-255",
        "the command's own exit status, passed through (so the codes below may be the command's too)",
    ),
    row(
        "run",
        "75",
        "--timeout SECS passed before the lock was free; the command did not run",
    ),
    row("run", "126", "the command could not be executed"),
    row("run", "127", "the command was not found"),
    row("run", "128+N", "the command was killed by signal N"),
    row(
        "ps",
        "0",
        "every process with DB open for writing is protected (or none has it open)",
    ),
    row(
        "ps",
        "1",
        "a process has DB open for writing without the extension (NOT PROTECTED)",
    ),
    row(
        "status, watch, ps",
        "66",
        "no database at DB (nothing is created)",
    ),
    row(
        "status, watch, run, ps",
        "73",
        "the lock file cannot be used: not a regular file, or cannot be opened or created",
    ),
    row("every verb", "2", "usage error"),
];

/// The table for `writelock --help`.
pub fn help() -> String {
    render(|_| true)
}

/// The rows about `verb`, for `writelock VERB --help`.
pub fn help_for(verb: &str) -> String {
    render(|r| {
        r.verbs == "every verb"
            || r.verbs
                .split(", ")
                .any(|v| v.split(' ').next() == Some(verb))
    })
}

fn render(keep: impl Fn(&Row) -> bool) -> String {
    let rows: Vec<&Row> = EXIT_CODES.iter().filter(|r| keep(r)).collect();
    let w = rows.iter().map(|r| r.verbs.len()).max().unwrap_or(0);
    let mut s = String::from("Exit codes:\n");
    for r in rows {
        s += &format!("  {:<w$}  {:<5}  {}\n", r.verbs, r.code, r.meaning);
    }
    s
}

/// The table for docs/cli.md.
#[cfg(test)]
pub fn markdown() -> String {
    let mut s = String::from("| Verb | Exit | Meaning |\n|---|---|---|\n");
    for r in EXIT_CODES {
        s += &format!("| {} | {} | {} |\n", r.verbs, r.code, r.meaning);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/cli.md carries the table exactly as [`markdown`] renders it.
    #[test]
    fn docs_cli_md_has_the_exit_code_table() {
        let docs = include_str!("../../docs/cli.md");
        let table = markdown();
        assert!(
            docs.contains(&table),
            "docs/cli.md's exit code table differs from cli/src/exit.rs; put this in it:\n\n{table}"
        );
    }

    #[test]
    fn a_verbs_help_lists_its_rows_only() {
        let run = help_for("run");
        assert!(
            run.contains("128+N") && run.contains("usage error"),
            "{run}"
        );
        assert!(!run.contains("--exit-code") && !run.contains("66"), "{run}");
        let status = help_for("status");
        assert!(status.contains("the lock is held"), "{status}");
        assert!(
            status.contains("66") && !status.contains("128+N"),
            "{status}"
        );
    }

    /// The constants the code returns are the codes the table lists.
    #[test]
    fn the_constants_are_in_the_table() {
        for c in [
            FOUND,
            USAGE,
            NO_DB,
            LOCK_FILE,
            TIMEOUT,
            CANNOT_EXEC,
            NOT_FOUND,
        ] {
            assert!(
                EXIT_CODES.iter().any(|r| r.code == c.to_string()),
                "{c} is not in EXIT_CODES"
            );
        }
    }
}
