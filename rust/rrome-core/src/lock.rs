//! The model-folder lock: one writer at a time, and a clear message naming the holder.
//!
//! The lock is an advisory `flock` on `<model>/.rrome/lock`. The holder writes who it is (pid,
//! command line, start time) into the file, so a second writer can say whom it is waiting for.
//! The kernel drops the lock when the holder dies, so a crash never leaves a stale lock.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, IoContext, Result};

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

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).at(path)
}

/// Takes the exclusive lock of `lock_path`, failing at once with [`Error::Locked`] if it is held.
pub fn lock_exclusive(lock_path: &Path) -> Result<DirLock> {
    if let Some(parent) = lock_path.parent() {
        fs::create_dir_all(parent).at(parent)?;
    }
    let mut f = open_lock_file(lock_path)?;
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
        let held = lock_exclusive(&p).unwrap();
        match lock_exclusive(&p) {
            Err(Error::Locked { holder, .. }) => assert!(holder.contains(&format!("pid {}", std::process::id()))),
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(held);
        assert!(lock_exclusive(&p).is_ok());
    }
}
