//! Durable file operations shared by every writer: atomic replace and directory fsync.
//!
//! A file that other processes may read (statistics, edit logs, deltas bundles) is never
//! written in place: it is written to a temporary sibling, flushed to disk, renamed over the
//! target and the folder is flushed, so a reader or a crash sees the old file or the new one.
//! A shard shared by hard link with another folder is given an inode of its own the same way
//! ([`unshare`]) before anything writes into it.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Environment variable that makes the process abort at a named step (crash tests only).
pub const CRASH_ENV: &str = "RROME_CRASH_AT";

/// Aborts the process when [`CRASH_ENV`] names `step` (crash tests only).
pub(crate) fn crash_point(step: &str) {
    if let Ok(want) = std::env::var(CRASH_ENV) {
        if want == step {
            std::process::abort();
        }
    }
}

/// Flushes a folder's entries (renames, creations, removals) to disk.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).at(dir)?;
    d.sync_all().at(dir)
}

/// The parent folder of `path` (`.` for a bare file name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The temporary sibling used while `path` is being replaced.
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    parent_of(path).join(format!(".{name}.rrome-tmp-{}", std::process::id()))
}

/// Writes `path` atomically: `fill` writes the content into a temporary sibling, which is
/// fsynced and renamed over `path`; then the folder is fsynced. On error the temporary file is
/// removed and `path` is untouched.
pub fn atomic_write(path: &Path, fill: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>) -> Result<()> {
    let tmp = tmp_sibling(path);
    let result = (|| {
        let f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).at(&tmp)?;
        {
            let mut w = BufWriter::new(&f);
            fill(&mut w).at(&tmp)?;
            w.flush().at(&tmp)?;
        }
        f.sync_all().at(&tmp)?;
        fs::rename(&tmp, path).at(path)?;
        fsync_dir(&parent_of(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes a file if it exists; a missing file is not an error.
pub fn remove_if_exists(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Gives `path` an inode of its own when it shares one with other hard links, so that writing
/// into it cannot change the other names. The content is copied to the temporary sibling
/// (which recovery removes after a crash), flushed, renamed over `path`, and the folder is
/// flushed: a crash leaves either the shared file or the private copy, byte for byte equal.
/// The other links keep the original inode untouched. Returns whether a copy was made.
pub fn unshare(path: &Path) -> Result<bool> {
    if fs::metadata(path).at(path)?.nlink() <= 1 {
        return Ok(false);
    }
    let tmp = tmp_sibling(path);
    let result = (|| {
        // fs::copy carries the permission bits over; the copy is flushed before the rename.
        fs::copy(path, &tmp).at(&tmp)?;
        File::open(&tmp).and_then(|f| f.sync_all()).at(&tmp)?;
        crash_point("unshare-copied");
        fs::rename(&tmp, path).at(path)?;
        fsync_dir(&parent_of(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    crash_point("unshared");
    Ok(true)
}

/// Puts `from` (symbolic links followed) at `to`, sharing its inode by hard link where the
/// filesystem allows and copying it otherwise. Returns whether it was linked.
///
/// Only for files that no rrome writer changes through an existing inode while it has other
/// links: in-place writers [`unshare`] a file first, and every other writer replaces files by
/// rename.
pub fn link_or_copy(from: &Path, to: &Path) -> Result<bool> {
    let real = fs::canonicalize(from).at(from)?;
    match fs::hard_link(&real, to) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::io(to, e)),
        // Across filesystems, without permission, or on a filesystem without links: copy.
        Err(_) => {
            fs::copy(&real, to).at(to)?;
            Ok(false)
        }
    }
}
