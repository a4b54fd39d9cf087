//! Child processes driven line by line, and Python scripts run with the
//! system interpreter against the extension (or stock SQLite).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A child process driven through stdin/stdout lines; stderr is collected.
pub struct Proc {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    stdout: Option<BufReader<ChildStdout>>,
    stderr: Option<JoinHandle<String>>,
}

impl Proc {
    pub fn start(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Proc {
            stdin: child.stdin.take(),
            stdout: Some(BufReader::new(child.stdout.take().unwrap())),
            child,
            stderr: Some(stderr),
        }
    }

    /// The next line of stdout; panics with stderr if the process ended.
    pub fn line(&mut self) -> String {
        let mut l = String::new();
        let n = self.stdout.as_mut().unwrap().read_line(&mut l).unwrap();
        if n == 0 {
            let _ = self.child.wait();
            let err = self.stderr.take().map(|h| h.join().unwrap());
            panic!(
                "the process ended early; stderr:\n{}",
                err.unwrap_or_default()
            );
        }
        l.trim_end().to_string()
    }

    pub fn send(&mut self, line: &str) {
        let s = self.stdin.as_mut().unwrap();
        writeln!(s, "{line}").unwrap();
        s.flush().unwrap();
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Close stdin and wait at most `limit` for the process to exit (a hang
    /// is killed and reported): (exit code, rest of stdout, stderr).
    pub fn finish_within(mut self, limit: Duration) -> (Option<i32>, String, String) {
        drop(self.stdin.take());
        let mut stdout = self.stdout.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > limit {
                self.kill();
                let err = self.stderr.take().map(|h| h.join().unwrap());
                panic!(
                    "did not finish within {limit:?}; stdout:\n{}\nstderr:\n{}",
                    out.join().unwrap(),
                    err.unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let err = self.stderr.take().map(|h| h.join().unwrap());
        (status.code(), out.join().unwrap(), err.unwrap_or_default())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// SIGKILLs a process that is not our child (a fork()ed grandchild) on drop.
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Prepended to every Python script. Stock runs (`vfs` "unix") never load
/// the extension.
pub const PRELUDE: &str = r#"
import json, os, sys, sqlite3

def load_extension(so, vfs):
    if vfs == "writelock":
        boot = sqlite3.connect(":memory:")
        boot.enable_load_extension(True)
        boot.load_extension(so)

def connect(db, vfs, timeout, **kw):
    kw.setdefault("isolation_level", None)
    return sqlite3.connect(f"file:{db}?vfs={vfs}", uri=True, timeout=timeout, **kw)

def status(con, field):
    q = "SELECT json_extract(writelock_status(), '$.databases[0].' || ?)"
    return con.execute(q, (field,)).fetchone()[0]
"#;

pub fn python(py: &Path, script: &str, args: &[&OsStr]) -> Proc {
    let mut cmd = Command::new(py);
    cmd.arg("-c").arg(format!("{PRELUDE}\n{script}")).args(args);
    Proc::start(cmd)
}
