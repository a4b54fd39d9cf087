//! Refuse network and FUSE filesystems, where the lock cannot be trusted.
//!
//! `flock()` over NFS is emulated with byte-range locks (which then conflict
//! with the OFD shadow locks), SMB/CIFS and FUSE filesystems implement locks
//! as they please, and SQLite's WAL mode needs shared memory that only works
//! on one machine. So at open the database's filesystem is checked with
//! `statfs()`; such filesystems are refused unless the user opts in.

use std::path::Path;

/// Environment variable that opts the whole process in.
pub const ALLOW_ENV: &str = "WRITELOCK_ALLOW_NETWORK_FS";

/// The name of a filesystem type (statfs `f_type`) we refuse, if it is one.
pub fn refused_kind(f_type: i64) -> Option<&'static str> {
    Some(match f_type as u32 {
        0x6969 => "NFS",
        0x517B => "SMB",
        0xFF53_4D42 => "CIFS",
        0xFE53_4D42 => "SMB2",
        0x6573_5546 => "FUSE",
        0x0102_1997 => "9P",
        0x5346_414F | 0x6B41_4653 => "AFS",
        0x7375_7245 => "Coda",
        0x00C3_6400 => "Ceph",
        0x4750_4653 => "GPFS",
        0x0BD0_0BD0 => "Lustre",
        0x564C => "NCP",
        _ => return None,
    })
}

/// `Err` with a message naming the file, the filesystem and the way out when
/// `db` lives on a refused filesystem, unless `allow` (the option
/// `writelock_allow_network_fs`, from a URI parameter or [`ALLOW_ENV`], parsed
/// like every option). A failing `statfs` is not an error: the lock file's
/// own open reports real problems.
pub fn check(db: &Path, allow: bool) -> Result<(), String> {
    if allow {
        return Ok(());
    }
    let Ok(st) = nix::sys::statfs::statfs(db) else {
        return Ok(());
    };
    match refused_kind(st.filesystem_type().0) {
        None => Ok(()),
        Some(kind) => Err(format!(
            "writelock: {} is on a network or FUSE filesystem ({kind}): flock() there is not \
             reliable and SQLite's WAL mode cannot work; see the README section \"Network \
             filesystems\". To proceed anyway open with ?writelock_allow_network_fs=1 or set \
             {ALLOW_ENV}=1",
            db.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_the_network_filesystems() {
        assert_eq!(refused_kind(0x6969), Some("NFS"));
        assert_eq!(refused_kind(0xFF53_4D42_u32 as i64), Some("CIFS"));
        assert_eq!(refused_kind(0x6573_5546), Some("FUSE"));
        assert_eq!(refused_kind(0xEF53), None, "ext4");
        assert_eq!(refused_kind(0x0102_1994), None, "tmpfs");
    }

    #[test]
    fn local_temp_dir_passes() {
        let p = std::env::temp_dir();
        assert_eq!(check(&p, false), Ok(()));
    }
}
