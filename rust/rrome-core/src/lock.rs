//! The model-folder lock: one writer at a time, and a clear message naming the holder.
//!
//! The lock is an advisory `flock` on `<model>/.rrome/lock`. The holder writes who it is (pid,
//! command line, start time) into the file, so a second writer can say whom it is waiting for.
//! The kernel drops the lock when the holder dies, so a crash never leaves a stale lock.
//!
//! The lock file and the `.rrome` folder are never used through a symbolic link: a folder
//! shipped with `.rrome/lock -> ../../some/file` would otherwise have rrome truncate that file.

use std::fs::{File, TryLockError};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{create_new, dir_mode, ensure_dir, open_write_nofollow};

/// Folder inside a model folder that holds rrome's private state.
pub const STATE_DIR: &str = ".rrome";

/// A held lock; released on drop.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    /// The lock file.
    pub path: PathBuf,
}

fn describe_self() -> String {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let cmd: Vec<String> = std::env::args().collect();
    format!("pid {}, command {:?}, since unix time {since}", std::process::id(), cmd.join(" "))
}

/// Opens the lock file, creating it with `mode` if missing; never through a link.
fn open_lock_file(path: &Path, mode: u32) -> Result<File> {
    match create_new(path, mode) {
        Err(Error::Io { source, .. }) if source.kind() == ErrorKind::AlreadyExists => open_write_nofollow(path),
        other => other,
    }
}

/// Takes the exclusive lock of `lock_path`, failing at once with [`Error::Locked`] if it is held.
/// The lock file and its folder are created with `mode` (and the matching folder mode) when
/// missing; a link at either place is refused.
pub fn lock_exclusive(lock_path: &Path, mode: u32) -> Result<DirLock> {
    if let Some(parent) = lock_path.parent() {
        ensure_dir(parent, dir_mode(mode))?;
    }
    let mut f = open_lock_file(lock_path, mode)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder =
                if holder.trim().is_empty() { "holder unknown".to_string() } else { holder.trim().to_string() };
            return Err(Error::Locked { path: lock_path.to_path_buf(), holder });
        }
        Err(TryLockError::Error(e)) => return Err(Error::io(lock_path, e)),
    }
    f.set_len(0).at(lock_path)?;
    f.seek(SeekFrom::Start(0)).at(lock_path)?;
    f.write_all(describe_self().as_bytes()).at(lock_path)?;
    Ok(DirLock { _file: f, path: lock_path.to_path_buf() })
}

/// The lock path of a model folder.
pub fn model_lock_path(model_dir: &Path) -> PathBuf {
    model_dir.join(STATE_DIR).join("lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_locker_is_refused_and_told_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let p = model_lock_path(dir.path());
        let held = lock_exclusive(&p, 0o600).unwrap();
        match lock_exclusive(&p, 0o600) {
            Err(Error::Locked { holder, .. }) => assert!(holder.contains(&format!("pid {}", std::process::id()))),
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(held);
        assert!(lock_exclusive(&p, 0o600).is_ok());
    }
}
