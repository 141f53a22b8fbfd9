//! Space held back in the data dir for the moment it fills up.
//!
//! On a full disk SQLite cannot append even the few pages that record how a job ended, and the
//! job would stay `running` until an operator freed space. The server keeps a small file of real
//! (not sparse) bytes in the data dir; the worker deletes it when a job's final state will not
//! land for lack of space, which lets that write through, and writes it again once there is room.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Bytes held back: far more than a job's final rows and their WAL frames need.
pub const SIZE: usize = 4 << 20;

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("reserve.bin")
}

/// Writes the reserve if it is missing or short. Fails (and leaves no partial file) when there
/// is no room for it.
pub fn ensure(data_dir: &Path) -> std::io::Result<()> {
    let file = path(data_dir);
    if std::fs::metadata(&file).is_ok_and(|m| m.len() as usize >= SIZE) {
        return Ok(());
    }
    let tmp = data_dir.join(".tmp-reserve.bin");
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(&vec![0xa5u8; SIZE])?;
        f.sync_all()
    });
    match written {
        Ok(()) => std::fs::rename(&tmp, &file),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Deletes the reserve, freeing its space. True when there was one to delete.
pub fn release(data_dir: &Path) -> bool {
    let released = std::fs::remove_file(path(data_dir)).is_ok();
    if released {
        tracing::warn!("the data dir is full: released its {} MiB reserve to record a job's end", SIZE >> 20);
    }
    released
}

/// Space left for unprivileged writers on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `st` a writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Whether an error, anywhere in its chain, is a full disk or quota (the OS's ENOSPC or
/// EDQUOT, or SQLite's SQLITE_FULL).
pub fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|e| matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
            || c.downcast_ref::<sqlx::Error>().is_some_and(|e| crate::error::sqlite_primary_code(e) == Some(13))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_written_once_released_once_and_full_disk_errors_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        ensure(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(path(dir.path())).unwrap().len() as usize, SIZE);
        ensure(dir.path()).unwrap();
        assert!(release(dir.path()));
        assert!(!release(dir.path()));
        assert!(free_bytes(dir.path()).is_some_and(|b| b > 0));
        let full = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::ENOSPC)).context("saving");
        assert!(is_disk_full(&full));
        assert!(!is_disk_full(&anyhow::Error::from(std::io::Error::from_raw_os_error(libc::EACCES))));
    }
}
