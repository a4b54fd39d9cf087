//! Options: process-wide defaults from the environment (`WRITELOCK_QUEUE=0`),
//! per connection as URI parameters at open (`?writelock_hold_warn_ms=`) and
//! `PRAGMA writelock_…` afterwards. Pure parsing, no SQLite.
//!
//! One parser per option, whatever the source ([`Options::set`]); an error
//! names the option, the value, what was expected and where it came from
//! ([`Source`]). One option is the process's, not a connection's, and comes
//! from the environment only: `WRITELOCK_LOG` ([`parse_log`]). An unknown `writelock_…` name is an error in a URI or a
//! PRAGMA; an unknown `WRITELOCK_…` variable is only warned about (a stray
//! export must not stop every program, and an older copy must not refuse a
//! newer copy's variable).

use std::path::PathBuf;
use std::time::Duration;

/// The options of one handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// A hold at least this long logs a warning through `sqlite3_log`
    /// (zero: never).
    pub hold_warn: Duration,
    /// How long a checkpoint queues for the flock before reporting busy.
    pub checkpoint_wait: Duration,
    /// Wait in the busy handler's sleep for the lock (or for a committing
    /// writer) instead of sleeping SQLite's backoff.
    pub queue: bool,
    /// How far a run of such waits may go beyond SQLite's sleep schedule
    /// (the tolerance on `busy_timeout`).
    pub queue_ahead: Duration,
    /// Open databases on network/FUSE filesystems anyway (URI only).
    pub allow_network_fs: bool,
    /// How long the oldest waiter may wait before a release reserves the
    /// lock for it (the bound on unfairness; 0: strict arrival order).
    pub handoff: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            hold_warn: Duration::from_secs(5),
            checkpoint_wait: Duration::from_millis(100),
            queue: true,
            queue_ahead: Duration::from_millis(25),
            allow_network_fs: false,
            handoff: Duration::from_millis(DEFAULT_HANDOFF_MS),
        }
    }
}

/// The default of `writelock_handoff_ms`.
pub const DEFAULT_HANDOFF_MS: u64 = 20;

/// Every option name, as URI parameter and PRAGMA.
pub const NAMES: [&str; 6] = [
    "writelock_hold_warn_ms",
    "writelock_checkpoint_wait_ms",
    "writelock_queue",
    "writelock_queue_ahead_ms",
    "writelock_allow_network_fs",
    "writelock_handoff_ms",
];

const MAX_MS: u64 = 3_600_000;

fn parse_ms(name: &str, value: &str) -> Result<Duration, String> {
    match value.trim().parse::<u64>() {
        Ok(ms) if ms <= MAX_MS => Ok(Duration::from_millis(ms)),
        _ => Err(format!(
            "writelock: bad value '{value}' for {name}: expected whole milliseconds from 0 to {MAX_MS}"
        )),
    }
}

fn parse_bool(name: &str, value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("writelock: bad value '{value}' for {name}: expected 1 or 0 (true/false, yes/no, on/off)")),
    }
}

impl Options {
    /// Whether `name` is one of ours (`writelock_` prefix, any case).
    pub fn owns(name: &str) -> bool {
        name.to_ascii_lowercase().starts_with("writelock_")
    }

    /// Set `name` to `value`; an error names the option and the cause.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        match name.to_ascii_lowercase().as_str() {
            "writelock_hold_warn_ms" => self.hold_warn = parse_ms(name, value)?,
            "writelock_checkpoint_wait_ms" => self.checkpoint_wait = parse_ms(name, value)?,
            "writelock_queue" => self.queue = parse_bool(name, value)?,
            "writelock_queue_ahead_ms" => self.queue_ahead = parse_ms(name, value)?,
            "writelock_allow_network_fs" => self.allow_network_fs = parse_bool(name, value)?,
            "writelock_handoff_ms" => self.handoff = parse_ms(name, value)?,
            _ => return Err(unknown(name)),
        }
        Ok(())
    }

    /// The current value of `name`, as the PRAGMA returns it.
    pub fn get(&self, name: &str) -> Result<String, String> {
        match name.to_ascii_lowercase().as_str() {
            "writelock_hold_warn_ms" => Ok(self.hold_warn.as_millis().to_string()),
            "writelock_checkpoint_wait_ms" => Ok(self.checkpoint_wait.as_millis().to_string()),
            "writelock_queue" => Ok(u8::from(self.queue).to_string()),
            "writelock_queue_ahead_ms" => Ok(self.queue_ahead.as_millis().to_string()),
            "writelock_allow_network_fs" => Ok(u8::from(self.allow_network_fs).to_string()),
            "writelock_handoff_ms" => Ok(self.handoff.as_millis().to_string()),
            _ => Err(unknown(name)),
        }
    }
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A URI parameter of the database named here.
    Uri(&'a str),
    /// `PRAGMA writelock_…`.
    Pragma,
    /// The environment variable of the option's name in capitals.
    Env,
}

impl std::fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Uri(db) => write!(f, "a URI parameter of {db}"),
            Source::Pragma => f.write_str("a PRAGMA"),
            Source::Env => f.write_str("the environment"),
        }
    }
}

/// `WRITELOCK_…` variables that are not options: the bindings' and tests'
/// own (where the library is). They are never warned about.
pub const NOT_OPTIONS: [&str; 2] = ["WRITELOCK_PATH", "WRITELOCK_SO"];

/// The process-wide option: where the extension's warnings and errors go
/// besides `sqlite3_log` ([`parse_log`]).
pub const LOG_VAR: &str = "WRITELOCK_LOG";

/// Where `WRITELOCK_LOG` sends the extension's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard error, whatever it is (the user asked for it).
    Stderr,
    /// A file, appended to (created if missing).
    File(PathBuf),
}

/// The parser of `WRITELOCK_LOG`: empty is nowhere but `sqlite3_log`,
/// `stderr` is standard error, anything else a file path. `stdout` (the
/// program's output) and switch words (`1`, `on`, …, which would otherwise
/// name a file in the working directory) are errors naming the variable.
pub fn parse_log(value: &str) -> Result<Option<LogTarget>, String> {
    let v = value.trim();
    let bad = |why: &str| {
        Err(format!(
            "writelock: bad value '{value}' for {LOG_VAR}: expected stderr or a file path ({why})"
        ))
    };
    match v.to_ascii_lowercase().as_str() {
        "" => Ok(None),
        "stderr" => Ok(Some(LogTarget::Stderr)),
        "stdout" | "-" => bad("standard output carries the program's own output"),
        "1" | "0" | "true" | "false" | "yes" | "no" | "on" | "off" => {
            bad("it is not a switch: name where the messages go")
        }
        _ => Ok(Some(LogTarget::File(PathBuf::from(v)))),
    }
}

impl Options {
    /// Set `name` to `value` from `source`; the error says where it came
    /// from, and the options are unchanged.
    pub fn set_from(&mut self, source: Source, name: &str, value: &str) -> Result<(), String> {
        self.set(name, value).map_err(|e| match source {
            Source::Env => format!(
                "{e} (from the environment variable {})",
                name.to_ascii_uppercase()
            ),
            other => format!("{e} (from {other})"),
        })
    }

    /// The process-wide defaults: [`Options::default`] changed by environment
    /// variables named like the options in capitals
    /// (`WRITELOCK_QUEUE_AHEAD_MS=50`, `WRITELOCK_ALLOW_NETWORK_FS=1`). A bad
    /// value is an error naming the variable. Also returns the
    /// `WRITELOCK_…` variables that name no option, to warn about.
    pub fn from_env() -> Result<(Options, Vec<String>), String> {
        Options::from_vars(
            std::env::vars_os().filter_map(|(k, v)| {
                Some((k.into_string().ok()?, v.to_string_lossy().into_owned()))
            }),
        )
    }

    fn from_vars(
        vars: impl Iterator<Item = (String, String)>,
    ) -> Result<(Options, Vec<String>), String> {
        let mut o = Options::default();
        let mut unknown = Vec::new();
        for (key, value) in vars {
            if !key.starts_with("WRITELOCK_")
                || NOT_OPTIONS.contains(&key.as_str())
                || key == LOG_VAR
            {
                continue;
            }
            let name = key.to_ascii_lowercase();
            if NAMES.contains(&name.as_str()) {
                o.set_from(Source::Env, &name, &value)?;
            } else {
                unknown.push(key);
            }
        }
        unknown.sort();
        Ok((o, unknown))
    }

    /// Apply the `writelock_…` parameters among a database's URI parameters
    /// (`(key, value)` in order); an unknown `writelock_…` key is an error.
    /// Other keys are SQLite's or other extensions'.
    pub fn apply_uri<'a>(
        &mut self,
        db: &str,
        params: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), String> {
        for (k, v) in params {
            if Options::owns(k) {
                self.set_from(Source::Uri(db), k, v)?;
            }
        }
        Ok(())
    }
}

/// The warning for unknown `WRITELOCK_…` variables (None if there are none).
pub fn unknown_env_warning(unknown: &[String]) -> Option<String> {
    (!unknown.is_empty()).then(|| {
        // Short: SQLite's log truncates a message at about 200 bytes.
        format!(
            "writelock: ignoring {}: not an option (options: WRITELOCK_ + a writelock_ option's name)",
            unknown.join(", ")
        )
    })
}

fn unknown(name: &str) -> String {
    format!(
        "writelock: unknown option {name} (known: {})",
        NAMES.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_and_errors_name_the_option() {
        let mut o = Options::default();
        o.set("writelock_hold_warn_ms", " 250 ").unwrap();
        assert_eq!(o.get("WRITELOCK_HOLD_WARN_MS").unwrap(), "250");
        let e = o.set("writelock_checkpoint_wait_ms", "-1").unwrap_err();
        assert!(
            e.contains("writelock_checkpoint_wait_ms") && e.contains("'-1'"),
            "{e}"
        );
        let e = o.set("writelock_nope", "1").unwrap_err();
        assert!(e.contains("unknown option writelock_nope"), "{e}");
        assert_eq!(
            o.checkpoint_wait,
            Duration::from_millis(100),
            "unchanged on error"
        );
    }

    fn vars(v: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn environment_sets_process_defaults_and_names_a_bad_variable() {
        let (o, unknown) = Options::from_vars(vars(&[
            ("WRITELOCK_QUEUE", "off"),
            ("WRITELOCK_QUEUE_AHEAD_MS", "40"),
            ("WRITELOCK_ALLOW_NETWORK_FS", "no"),
            ("WRITELOCK_PATH", "/x.so"),
            ("WRITELOCK_LOG", "stdout"),
            ("WRITELOCK_HOLD_WARN", "5"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        assert!(!o.queue && !o.allow_network_fs);
        assert_eq!(o.queue_ahead, Duration::from_millis(40));
        assert_eq!(o.hold_warn, Options::default().hold_warn);
        assert_eq!(
            unknown,
            ["WRITELOCK_HOLD_WARN"],
            "bindings' own are silent; WRITELOCK_LOG is the process's (parse_log)"
        );
        let w = unknown_env_warning(&unknown).unwrap();
        assert!(w.contains("WRITELOCK_HOLD_WARN") && w.len() < 200, "{w}");
        for (k, v) in [
            ("WRITELOCK_CHECKPOINT_WAIT_MS", "soon"),
            ("WRITELOCK_ALLOW_NETWORK_FS", "banana"),
        ] {
            let e = Options::from_vars(vars(&[(k, v)])).err().unwrap();
            assert!(e.contains(k) && e.contains(&format!("'{v}'")), "{e}");
        }
        let (o, _) = Options::from_vars(vars(&[("WRITELOCK_ALLOW_NETWORK_FS", "1")])).unwrap();
        assert!(o.allow_network_fs);
    }

    #[test]
    fn uri_parameters_unknown_names_are_errors_others_are_not_ours() {
        let mut o = Options::default();
        let p = [
            ("mode", "rwc"),
            ("writelock_hold_warn_ms", "7"),
            ("cache", "shared"),
        ];
        o.apply_uri("/d/app.db", p.iter().copied()).unwrap();
        assert_eq!(o.hold_warn, Duration::from_millis(7));
        let e = o
            .apply_uri("/d/app.db", [("writelock_hold_warn", "5")].into_iter())
            .unwrap_err();
        assert!(
            e.contains("unknown option writelock_hold_warn")
                && e.contains("URI parameter of /d/app.db"),
            "{e}"
        );
    }

    #[test]
    fn log_target_stderr_a_path_or_an_error_naming_the_variable() {
        assert_eq!(parse_log(""), Ok(None));
        assert_eq!(parse_log(" StdErr "), Ok(Some(LogTarget::Stderr)));
        assert_eq!(
            parse_log("/var/log/app/writelock.log"),
            Ok(Some(LogTarget::File("/var/log/app/writelock.log".into())))
        );
        assert_eq!(
            parse_log("wl.log"),
            Ok(Some(LogTarget::File("wl.log".into())))
        );
        for v in ["stdout", "-", "1", "on", "TRUE"] {
            let e = parse_log(v).unwrap_err();
            assert!(
                e.contains("WRITELOCK_LOG") && e.contains(&format!("'{v}'")),
                "{e}"
            );
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any name and value: never a panic; an error names the option;
            /// an accepted value reads back and re-parses to the same options.
            #[test]
            fn any_input_is_accepted_consistently_or_named_in_the_error(
                name in prop_oneof![
                    prop::sample::select(NAMES.to_vec()).prop_map(String::from),
                    "writelock_[a-z_]{0,12}",
                    ".{0,20}",
                ],
                value in prop_oneof![".{0,12}", "[0-9]{1,9}", " ?[0-9]{1,7} ?", "(yes|no|on|off|true|false|YES|2)"],
            ) {
                let mut o = Options::default();
                match o.set(&name, &value) {
                    Ok(()) => {
                        let shown = o.get(&name).unwrap();
                        let mut again = Options::default();
                        again.set(&name, &shown).unwrap();
                        prop_assert_eq!(again.get(&name).unwrap(), shown);
                    }
                    Err(e) => {
                        prop_assert!(e.contains(&name), "{}", e);
                        prop_assert_eq!(o, Options::default(), "unchanged on error");
                    }
                }
            }

            #[test]
            fn milliseconds_round_trip(ms in 0u64..=3_600_000) {
                let mut o = Options::default();
                o.set("writelock_hold_warn_ms", &ms.to_string()).unwrap();
                prop_assert_eq!(o.hold_warn, Duration::from_millis(ms));
            }
        }
    }
}
