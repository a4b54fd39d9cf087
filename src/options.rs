//! Options: process-wide defaults from the environment (`WRITELOCK_QUEUE=0`),
//! per connection as URI parameters at open (`?writelock_hold_warn_ms=`) and
//! `PRAGMA writelock_…` afterwards. Pure parsing, no SQLite.

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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            hold_warn: Duration::from_secs(5),
            checkpoint_wait: Duration::from_millis(100),
            queue: true,
            queue_ahead: Duration::from_millis(25),
            allow_network_fs: false,
        }
    }
}

/// Every option name, as URI parameter and PRAGMA.
pub const NAMES: [&str; 5] = [
    "writelock_hold_warn_ms",
    "writelock_checkpoint_wait_ms",
    "writelock_queue",
    "writelock_queue_ahead_ms",
    "writelock_allow_network_fs",
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
            _ => Err(unknown(name)),
        }
    }
}

impl Options {
    /// The process-wide defaults: [`Options::default`] changed by environment
    /// variables named like the options in capitals
    /// (`WRITELOCK_QUEUE_AHEAD_MS=50`). `WRITELOCK_ALLOW_NETWORK_FS` is read
    /// by the filesystem check itself (see `netfs`). A bad value is an error
    /// naming the variable.
    pub fn from_env() -> Result<Options, String> {
        Options::from_vars(|k| std::env::var(k).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Options, String> {
        let mut o = Options::default();
        for name in NAMES.iter().filter(|n| **n != "writelock_allow_network_fs") {
            let key = name.to_ascii_uppercase();
            if let Some(v) = var(&key) {
                o.set(name, &v)
                    .map_err(|e| format!("{e} (from the environment variable {key})"))?;
            }
        }
        Ok(o)
    }
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

    #[test]
    fn environment_sets_process_defaults_and_names_a_bad_variable() {
        let env = |k: &str| match k {
            "WRITELOCK_QUEUE" => Some("off".to_string()),
            "WRITELOCK_QUEUE_AHEAD_MS" => Some("40".to_string()),
            _ => None,
        };
        let o = Options::from_vars(env).unwrap();
        assert!(!o.queue);
        assert_eq!(o.queue_ahead, Duration::from_millis(40));
        assert_eq!(o.hold_warn, Options::default().hold_warn);
        let bad = |k: &str| (k == "WRITELOCK_CHECKPOINT_WAIT_MS").then(|| "soon".to_string());
        let e = Options::from_vars(bad).unwrap_err();
        assert!(
            e.contains("WRITELOCK_CHECKPOINT_WAIT_MS") && e.contains("'soon'"),
            "{e}"
        );
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
