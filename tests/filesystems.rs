//! Who holds `<db>.lock`, on filesystems where `stat()` and the kernel's lock
//! table name files differently: a btrfs subvolume (its own device number
//! for `stat()`, the filesystem's in `/proc/locks`, and inode numbers that
//! repeat across subvolumes) and overlayfs. Each needs root and a kernel that
//! lets us mount them (loop devices, `mkfs.btrfs`); without, the test says so
//! and skips.
//!
//! The lock tables of these filesystems are the point, so each test puts a
//! *decoy* beside the real lock file: another file with the same name in
//! `/proc/locks`, locked by `flock(1)`. Matching by inode alone (what the CLI
//! did) reports the decoy's holder for a free database.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use writelock_tests::{cli_path, FlockHolder, Mode, Shell};

fn status(db: &Path) -> Value {
    let out = Command::new(cli_path())
        .args(["status", "--json"])
        .arg(db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", cmd])
        .status()
        .is_ok_and(|s| s.success())
}

fn root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A mount that is undone on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn inode(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().ino()
}

/// The real database's lock file is free while a decoy with the same name in
/// `/proc/locks` is held: `status` says free. Then a connection of the
/// extension holds the real one: `status` names it.
fn holder_is_told_from_the_decoy(db: &Path, decoy: &Path) {
    let lock = writelock_tests::lock_path(db);
    let held = FlockHolder::hold(decoy);
    let v = status(db);
    assert_eq!(v["held"], false, "the decoy's holder is not ours: {v}");
    drop(held);
    let mut c = Shell::start(db, Mode::Writelock);
    c.run("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);");
    let held_decoy = FlockHolder::hold(decoy);
    let v = status(db);
    assert_eq!(v["held"], true, "{v}");
    assert_eq!(v["holder_pid"], c.pid(), "{v}");
    assert_eq!(v["lock_file"], lock.to_string_lossy().as_ref());
    drop(held_decoy);
    c.run("COMMIT;");
    c.finish();
}

#[test]
fn btrfs_subvolumes_share_lock_table_names() {
    if !root() || !sh("command -v mkfs.btrfs >/dev/null") {
        eprintln!("skipped: needs root and mkfs.btrfs (btrfs-progs)");
        return;
    }
    let dir = writelock_tests::tempdir();
    let img = dir.path().join("fs.img");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let made = sh(&format!(
        "truncate -s 128M {0} && mkfs.btrfs -q {0} >/dev/null 2>&1 && mount -o loop {0} {1}",
        img.display(),
        mnt.display()
    ));
    if !made {
        eprintln!("skipped: cannot make and loop-mount a btrfs image here");
        return;
    }
    let _m = Mount(mnt.clone());
    for sub in ["a", "b"] {
        assert!(sh(&format!(
            "btrfs subvolume create {}/{sub} >/dev/null",
            mnt.display()
        )));
    }
    let db = mnt.join("a/app.db");
    writelock_tests::create_table(&db, "wal");
    let lock = writelock_tests::lock_path(&db);
    std::fs::File::create(&lock).unwrap();
    // Inode numbers start over in every subvolume: make a file in b with
    // the lock file's number, which /proc/locks then names alike.
    let mut decoy = None;
    for n in 0..10_000 {
        let p = mnt.join(format!("b/f{n}"));
        std::fs::File::create(&p).unwrap();
        if inode(&p) == inode(&lock) {
            decoy = Some(p);
            break;
        }
    }
    let decoy = decoy.expect("a file with the lock file's inode number in the other subvolume");
    holder_is_told_from_the_decoy(&db, &decoy);
}

#[test]
fn overlayfs_lock_files_are_found() {
    if !root() {
        eprintln!("skipped: needs root to mount overlayfs");
        return;
    }
    let dir = writelock_tests::tempdir();
    let d = dir.path();
    for sub in ["lower", "upper", "work", "merged"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    let merged = d.join("merged");
    let made = sh(&format!(
        "mount -t overlay overlay -o lowerdir={0}/lower,upperdir={0}/upper,workdir={0}/work {0}/merged",
        d.display()
    ));
    if !made {
        eprintln!("skipped: cannot mount overlayfs here");
        return;
    }
    let _m = Mount(merged.clone());
    let db = merged.join("app.db");
    writelock_tests::create_table(&db, "delete");
    let decoy = merged.join("decoy");
    std::fs::File::create(&decoy).unwrap();
    holder_is_told_from_the_decoy(&db, &decoy);
}
