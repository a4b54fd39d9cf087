//! sqlite-writelock without SQLite: everything the extension decides and
//! every file it touches, in safe Rust over one small module of system calls
//! ([`sys`], the only place `unsafe` is allowed). The extension crate adds
//! the C entry points and the VFS shim; the CLI, the tests and the benchmark
//! use this crate directly.
//!
//! Where each decision lives:
//! * [`protocol`] — *whether to take the lock*: when a handle is a writer and
//!   must hold the flock, typed (`LockLevel`, `ShmOp`, `Refusal`, `Events`).
//! * [`wait`] — *whether and how long to wait*: the busy handler's sleep,
//!   waiter slots, write intents and their expiry.
//! * [`lockfile`] — *whether to borrow*: `<db>.lock`, the `flock` and the OFD
//!   bytes, the process's own lock, a deleted or replaced lock file.
//! * [`page`] — the shared page `<db>.lock-shm`: holder record, waiter slots.
//! * [`process`] — pid, `fork()`, the descriptors the extension owns.
//! * [`timer`] — the one timer thread per process.
//! * [`holder`] — who holds it, for tools: `/proc/locks` and the record.
//! * [`options`] — options from the environment, URI parameters, PRAGMAs.
//! * [`log`] — messages beyond `sqlite3_log`: `WRITELOCK_LOG`, standard error.
//! * [`netfs`] — network filesystems are refused.
//! * [`clock`] — time, injectable for tests.
//! * [`stats`] — process-wide counters.

#![deny(unsafe_code)]

pub mod clock;
pub mod holder;
pub mod lockfile;
pub mod log;
pub mod netfs;
pub mod options;
pub mod page;
pub mod process;
pub mod protocol;
pub mod stats;
#[allow(unsafe_code)]
pub mod sys;
pub mod timer;
pub mod wait;
