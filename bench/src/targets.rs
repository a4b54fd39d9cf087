//! The targets: each a ratio against stock SQLite or the application-level
//! flock measured in the same run, met or missed. Printed, never asserted.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::cases::{Deferred, Threads};
use crate::common::{Journal, Mode};
use crate::stats::{pct, sorted};
use crate::{f, ms, Multi, Settings, Single};

/// Must meet, or should meet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Level {
    Must,
    Should,
    /// Measured and shown, no bound (e.g. the spread between repeats).
    Info,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Must => "must",
            Level::Should => "should",
            Level::Info => "info",
        }
    }
}

/// One target: per journal mode, the measured value and whether it holds.
pub struct Target {
    pub level: Level,
    pub what: String,
    /// WAL, DELETE: the cell text and the verdict (None: not measured or
    /// no bound).
    pub cells: Vec<(String, Option<bool>)>,
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "missed",
        None => "",
    }
}

/// The task-queue size the targets are stated for.
pub const AT: usize = 8;

fn ratio_cell(x: f64, w: String, other: String, ok: bool) -> (String, Option<bool>) {
    (format!("{} ({w} / {other})", f(x, 3)), Some(ok))
}

/// Every target that the run measured.
pub fn evaluate(
    s: &Settings,
    singles: &[Single],
    multis: &BTreeMap<(Journal, usize, Mode), Multi>,
    threads: &[Threads],
    deferred: &BTreeMap<(Journal, Mode), Deferred>,
) -> Vec<Target> {
    let mut out = Vec::new();
    let per_journal = |level: Level,
                       what: &str,
                       cell: &dyn Fn(Journal) -> Option<(String, Option<bool>)>|
     -> Target {
        Target {
            level,
            what: what.into(),
            cells: Journal::ALL
                .iter()
                .map(|&j| cell(j).unwrap_or_else(|| ("–".into(), None)))
                .collect(),
        }
    };
    let q = |j: Journal, m: Mode| multis.get(&(j, AT, m));
    let q3 = |j: Journal| {
        Some((
            q(j, Mode::Stock)?,
            q(j, Mode::AppFlock)?,
            q(j, Mode::Writelock)?,
        ))
    };

    // -- must ----------------------------------------------------------------
    out.push(per_journal(
        Level::Must,
        "8 writers: throughput ≥ 1.0 × app-flock's",
        &|j| {
            let (_, a, w) = q3(j)?;
            let x = w.throughput() / a.throughput();
            Some(ratio_cell(
                x,
                format!("{:.0}", w.throughput()),
                format!("{:.0}/s", a.throughput()),
                x >= 1.0,
            ))
        },
    ));
    out.push(per_journal(
        Level::Must,
        "8 writers: WAL size ≤ 2 × app-flock's",
        &|j| {
            let (_, a, w) = q3(j)?;
            let (w, a) = (w.wal_max? as f64, a.wal_max? as f64);
            let x = w / a;
            let mib = |b: f64| format!("{:.1}", b / 1048576.0);
            Some(ratio_cell(x, mib(w), format!("{} MiB", mib(a)), x <= 2.0))
        },
    ));
    out.push(per_journal(
        Level::Must,
        "8 writers: worst-served process's p99 iteration ≤ app-flock's",
        &|j| {
            let (_, a, w) = q3(j)?;
            let (w, a) = (w.worst_iter_p99(), a.worst_iter_p99());
            let x = w / a;
            Some(ratio_cell(x, ms(w), format!("{} ms", ms(a)), x <= 1.0))
        },
    ));
    out.push(per_journal(
        Level::Must,
        "8 writers: writer wait max ≤ 0.1 × stock's",
        &|j| {
            let (st, _, w) = q3(j)?;
            let (w, st) = (
                pct(&sorted(&w.waits_ms), 100.0),
                pct(&sorted(&st.waits_ms), 100.0),
            );
            let x = w / st;
            Some(ratio_cell(x, ms(w), format!("{} ms", ms(st)), x <= 0.1))
        },
    ));
    out.push(per_journal(
        Level::Must,
        "8 writers: SQLITE_BUSY reaching the app = 0",
        &|j| {
            let w = q(j, Mode::Writelock)?;
            let b = w.busy + w.writer_read_busy;
            Some((b.to_string(), Some(b == 0)))
        },
    ));
    let th = |j: Journal, m: Mode| threads.iter().find(|t| t.journal == j && t.mode == m);
    let threads_label = format!("{} threads, one connection each", s.threads);
    out.push(per_journal(
        Level::Must,
        &format!("{threads_label}: time ≤ stock's"),
        &|j| {
            let (st, w) = (th(j, Mode::Stock)?, th(j, Mode::Writelock)?);
            let x = w.secs / st.secs;
            Some(ratio_cell(
                x,
                format!("{:.2}", w.secs),
                format!("{:.2} s", st.secs),
                x <= 1.0,
            ))
        },
    ));
    out.push(per_journal(
        Level::Must,
        &format!("{threads_label}: errors = 0"),
        &|j| {
            let w = th(j, Mode::Writelock)?;
            let ok = w.busy == 0 && w.check == "ok";
            Some((format!("{} ({})", w.busy, w.check), Some(ok)))
        },
    ));
    out.push(per_journal(
        Level::Must,
        &format!("{threads_label}: extension threads ≤ 1, lock descriptors ≤ 1 per connection"),
        &|j| {
            let w = th(j, Mode::Writelock)?;
            // One per connection, plus the one the process timer opens for
            // a moment to name the holder in its `SQLITE_BUSY` log line.
            let ok = w.extra_threads <= 1 && w.lock_fds <= w.threads as u64 + 1;
            Some((
                format!("{} threads, {} descriptors", w.extra_threads, w.lock_fds),
                Some(ok),
            ))
        },
    ));

    // -- should ----------------------------------------------------------------
    out.push(per_journal(
        Level::Should,
        "8 writers: fairness (fewest/most commits) ≥ 0.5",
        &|j| {
            let w = q(j, Mode::Writelock)?;
            let x = w.fairness();
            Some((f(x, 2), Some(x >= 0.5)))
        },
    ));
    for (label, p) in [
        ("8 writers: reader p99 ≤ stock's", 99.0),
        ("8 writers: reader max ≤ stock's", 100.0),
    ] {
        out.push(per_journal(Level::Should, label, &|j| {
            let (st, _, w) = q3(j)?;
            let (w, st) = (
                pct(&sorted(&w.reader_ms), p),
                pct(&sorted(&st.reader_ms), p),
            );
            let x = w / st;
            Some(ratio_cell(x, ms(w), format!("{} ms", ms(st)), x <= 1.0))
        }));
    }
    out.push(per_journal(
        Level::Should,
        "8 writers: CPU per commit ≤ app-flock's",
        &|j| {
            let (_, a, w) = q3(j)?;
            let x = w.cpu_per_commit_us() / a.cpu_per_commit_us();
            Some(ratio_cell(
                x,
                f(w.cpu_per_commit_us(), 0),
                format!("{} µs", f(a.cpu_per_commit_us(), 0)),
                x <= 1.0,
            ))
        },
    ));
    out.push(per_journal(
        Level::Should,
        "single writer: writelock / stock ≤ app-flock / stock + 0.05",
        &|j| {
            let r = singles.iter().find(|r| r.journal == j)?;
            let (w, a) = (r.ratio(Mode::Writelock), r.ratio(Mode::AppFlock));
            Some((format!("{} vs {}", f(w, 3), f(a, 3)), Some(w <= a + 0.05)))
        },
    ));

    // -- info ------------------------------------------------------------------
    for &n in s.procs.iter().filter(|&&n| n != AT) {
        out.push(per_journal(
            Level::Info,
            &format!("{n} writers: throughput / app-flock's, per repeat (app-flock's spread)"),
            &|j| {
                let (a, w) = (
                    multis.get(&(j, n, Mode::AppFlock))?,
                    multis.get(&(j, n, Mode::Writelock))?,
                );
                let per: Vec<String> = w
                    .run_tput
                    .iter()
                    .zip(&a.run_tput)
                    .map(|(w, a)| f(w / a, 2))
                    .collect();
                let lo = a.run_tput.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = a.run_tput.iter().copied().fold(0.0, f64::max);
                Some((
                    format!("{} ({:.0}%)", per.join(", "), 100.0 * (hi / lo - 1.0)),
                    None,
                ))
            },
        ));
    }
    out.push(per_journal(
        Level::Info,
        "deferred read-then-write: BUSY rate, writelock vs stock",
        &|j| {
            let (st, w) = (
                deferred.get(&(j, Mode::Stock))?,
                deferred.get(&(j, Mode::Writelock))?,
            );
            Some((
                format!(
                    "{:.2}% vs {:.2}%",
                    100.0 * w.busy_rate(),
                    100.0 * st.busy_rate()
                ),
                None,
            ))
        },
    ));
    out.retain(|t| t.cells.iter().any(|(c, _)| c != "–"));
    out
}

/// The targets as a markdown table, and a summary line per level.
pub fn table(md: &mut String, targets: &[Target]) {
    let _ = writeln!(
        md,
        "\n### Targets (writelock against the others, same run; ratios, not assertions)\n"
    );
    let _ = writeln!(md, "| level | target | WAL | DELETE |");
    let _ = writeln!(md, "|---|---|---|---|");
    for t in targets {
        let cells: Vec<String> = t
            .cells
            .iter()
            .map(|(c, ok)| match ok {
                Some(_) => format!("{c} **{}**", verdict(*ok)),
                None => c.clone(),
            })
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            t.level.name(),
            t.what,
            cells.join(" | ")
        );
    }
    for level in [Level::Must, Level::Should] {
        let verdicts: Vec<bool> = targets
            .iter()
            .filter(|t| t.level == level)
            .flat_map(|t| t.cells.iter().filter_map(|(_, ok)| *ok))
            .collect();
        let met = verdicts.iter().filter(|&&ok| ok).count();
        let _ = writeln!(
            md,
            "\n{}: {met} of {} met",
            match level {
                Level::Must => "Must meet",
                _ => "Should meet",
            },
            verdicts.len()
        );
    }
}

/// The targets for results.json.
pub fn json(targets: &[Target]) -> serde_json::Value {
    serde_json::Value::Array(
        targets
            .iter()
            .map(|t| {
                let cell = |i: usize| {
                    t.cells.get(i).map(|(c, ok)| serde_json::json!({"value": c, "met": ok}))
                };
                serde_json::json!({"level": t.level.name(), "target": t.what, "WAL": cell(0), "DELETE": cell(1)})
            })
            .collect(),
    )
}
