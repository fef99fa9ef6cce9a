//! The model-folder lock: one writer at a time, and a clear message naming the holder.
//!
//! The lock is an advisory `flock` on `<model>/.rrome/lock`. The holder writes who it is (pid,
//! command line, start time) into the file, so a second writer can say whom it is waiting for.
//! The kernel drops the lock when the holder dies, so a crash never leaves a stale lock.
//!
//! The lock file and the `.rrome` folder are never used through a symbolic link: a folder
//! shipped with `.rrome/lock -> ../../some/file` would otherwise have rrome truncate that file.
//! Nor is a lock file with other hard links ever written: a folder may arrive with
//! `.rrome/lock` hard-linked to one of its shards (tar keeps hard links). Such a file is locked,
//! then replaced by a fresh lock file (created, locked, renamed over it) before anything is
//! written, and the shard keeps every byte. After taking a lock the holder checks that the
//! path still names the file it locked, so a writer that opened the old file cannot also win.

use std::fs::{self, File, TryLockError};
use std::io::{ErrorKind, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::check::py_repr;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{create_new, dir_mode, ensure_dir, fsync_dir, open_write_nofollow, parent_of, tmp_sibling};

/// Folder inside a model folder that holds rrome's private state.
pub const STATE_DIR: &str = ".rrome";

/// Most bytes of a holder's description that are read and shown.
const HOLDER_MAX: usize = 1024;

/// A held lock; released on drop.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    /// The lock file.
    pub path: PathBuf,
}

fn describe_self() -> String {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // args_os: an argument need not be UTF-8 (a file name), and `args` would panic on it.
    let cmd: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
    format!("pid {}, command {:?}, since unix time {since}", std::process::id(), cmd.join(" "))
}

/// What the holder of `f` wrote about itself, escaped (the file is untrusted: it may hold
/// anything, of any length), or "holder unknown".
fn holder_of(f: &File) -> String {
    let mut buf = vec![0u8; HOLDER_MAX];
    let n = f.read_at(&mut buf, 0).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    let text = text.trim();
    if text.is_empty() {
        "holder unknown".to_string()
    } else {
        py_repr(text)
    }
}

/// Opens the lock file, creating it with `mode` if missing; never through a link.
fn open_lock_file(path: &Path, mode: u32) -> Result<File> {
    match create_new(path, mode) {
        Err(Error::Io { source, .. }) if source.kind() == ErrorKind::AlreadyExists => open_write_nofollow(path),
        other => other,
    }
}

/// Whether `path` names (without following a link) the file whose metadata is `held`.
fn names(path: &Path, held: &fs::Metadata) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.dev() == held.dev() && m.ino() == held.ino())
}

/// Replaces the locked file `old`, which has other hard links, by a fresh lock file: created
/// beside it, locked, renamed over it while `old` is still held. Nothing is written to `old`.
fn replace_shared(path: &Path, old: File, mode: u32) -> Result<File> {
    let tmp = tmp_sibling(path);
    let _ = fs::remove_file(&tmp); // a dead run's leftover of this pid (removing never follows a link)
    let fresh = create_new(&tmp, mode)?;
    let placed = (|| {
        fresh.try_lock().map_err(|e| Error::io(&tmp, std::io::Error::other(e.to_string())))?;
        fs::rename(&tmp, path).at(path)?;
        fsync_dir(&parent_of(path))
    })();
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    drop(old);
    Ok(fresh)
}

/// Takes the exclusive lock of `lock_path`, failing at once with [`Error::Locked`] if it is held.
/// The lock file and its folder are created with `mode` (and the matching folder mode) when
/// missing; a link at either place is refused, and a lock file with other hard links is
/// replaced, never written.
pub fn lock_exclusive(lock_path: &Path, mode: u32) -> Result<DirLock> {
    if let Some(parent) = lock_path.parent() {
        ensure_dir(parent, dir_mode(mode))?;
    }
    for _ in 0..16 {
        let f = open_lock_file(lock_path, mode)?;
        match f.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(Error::Locked { path: lock_path.to_path_buf(), holder: holder_of(&f) })
            }
            Err(TryLockError::Error(e)) => return Err(Error::io(lock_path, e)),
        }
        let meta = f.metadata().at(lock_path)?;
        if !names(lock_path, &meta) {
            continue; // replaced since it was opened (see replace_shared): lock the new one
        }
        let mut f = if meta.nlink() > 1 { replace_shared(lock_path, f, mode)? } else { f };
        f.set_len(0).at(lock_path)?;
        f.seek(SeekFrom::Start(0)).at(lock_path)?;
        f.write_all(describe_self().as_bytes()).at(lock_path)?;
        return Ok(DirLock { _file: f, path: lock_path.to_path_buf() });
    }
    Err(Error::Locked { path: lock_path.to_path_buf(), holder: "its lock file keeps being replaced".into() })
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

    #[test]
    fn a_hard_linked_lock_is_replaced_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let shard = dir.path().join("model.safetensors");
        fs::write(&shard, b"weights that must survive").unwrap();
        let p = model_lock_path(dir.path());
        fs::create_dir(p.parent().unwrap()).unwrap();
        fs::hard_link(&shard, &p).unwrap();
        let held = lock_exclusive(&p, 0o600).unwrap();
        assert_eq!(fs::read(&shard).unwrap(), b"weights that must survive");
        let (lock_meta, shard_meta) = (fs::metadata(&p).unwrap(), fs::metadata(&shard).unwrap());
        assert_ne!(lock_meta.ino(), shard_meta.ino());
        assert_eq!((lock_meta.nlink(), shard_meta.nlink()), (1, 1));
        assert!(fs::read_to_string(&p).unwrap().contains(&format!("pid {}", std::process::id())));
        // The replacement is the lock: a second locker is refused.
        assert!(matches!(lock_exclusive(&p, 0o600), Err(Error::Locked { .. })));
        drop(held);
    }

    #[test]
    fn a_planted_holder_is_escaped_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = model_lock_path(dir.path());
        let held = lock_exclusive(&p, 0o600).unwrap();
        let planted = format!("evil\n\x1b]0;title\x07{}", "x".repeat(10_000));
        let mut other = fs::OpenOptions::new().write(true).open(&p).unwrap();
        other.write_all(planted.as_bytes()).unwrap();
        match lock_exclusive(&p, 0o600) {
            Err(Error::Locked { holder, .. }) => {
                assert!(!holder.chars().any(|c| c.is_control()), "{holder:?}");
                assert!(holder.contains("\\x1b") || holder.contains("\\n"), "{holder:?}");
                assert!(holder.len() < 2 * HOLDER_MAX, "{}", holder.len());
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(held);
    }
}
