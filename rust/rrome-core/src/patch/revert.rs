//! Reverting committed batches from their undo files, newest first, through a revert marker
//! that makes an interrupted revert finish on the next command.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::plan::check_undo;
use super::recover::{recover_locked, restore, write_log};
use super::{folder_mode, Reverted};
use crate::checkpoint::{refuse_cache_snapshot, Checkpoint};
use crate::deltas::{read_bundle, Record};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{atomic_write_mode, crash_point, fsync_dir, read_file, remove_if_exists};
use crate::journal::{read_region, sha256_hex, undo_dir, undo_path, Undo};
use crate::lock::{lock_exclusive, model_lock_path, STATE_DIR};

pub(super) fn revert_marker(dir: &Path) -> PathBuf {
    dir.join(STATE_DIR).join("revert.json")
}

/// The batch a revert marker names (the marker is read without blocking, through no FIFO).
pub(super) fn read_marker(marker: &Path) -> Result<u64> {
    let text = read_file(marker)?;
    serde_json::from_slice::<Value>(&text)
        .ok()
        .and_then(|v| v.get("batch").and_then(Value::as_u64))
        .ok_or_else(|| Error::Integrity { msg: format!("{}: unreadable revert marker", marker.display()) })
}

/// Completes the revert of `batch` that a marker records: restores its undo file's bytes
/// (checked against the checkpoint first), drops the batch from the log, removes the undo file
/// and the marker.
pub(super) fn finish_revert(dir: &Path, ckpt: &Checkpoint, batch: u64, mode: u32) -> Result<()> {
    let marker = revert_marker(dir);
    let upath = undo_path(dir, batch);
    let log = read_bundle(dir, true)?;
    let last = log.iter().filter_map(|r| r.batch).max();
    let logged = log.iter().any(|r| r.batch == Some(batch));
    let refuse = |why: String| Error::Integrity {
        msg: format!(
            "{}: names batch {batch}, {why}; nothing was written. If you did not expect it, delete it and run the \
             command again",
            marker.display()
        ),
    };
    // A revert removes the newest batch: once it has left the log it may only be newer than
    // what remains; while it is logged it must be the last batch and have its undo data.
    if logged && last != Some(batch) {
        return Err(refuse(format!("but the last batch in the edit log is {}", last.unwrap_or(0))));
    }
    if !logged && last.is_some_and(|l| l >= batch) {
        return Err(refuse(format!("which is older than the last batch in the edit log ({})", last.unwrap_or(0))));
    }
    if fs::symlink_metadata(&upath).is_ok() {
        let undo = Undo::read(&upath)?;
        if undo.batch != batch {
            return Err(refuse(format!("but {} holds batch {}", upath.display(), undo.batch)));
        }
        check_undo(ckpt, &undo)?;
        restore(dir, &undo)?;
    } else if logged {
        return Err(refuse(format!("which has no undo data ({} is missing)", upath.display())));
    }
    let kept: Vec<Record> = log.iter().filter(|r| r.batch != Some(batch)).cloned().collect();
    write_log(dir, &kept, mode)?;
    remove_if_exists(&upath)?;
    if undo_dir(dir).is_dir() {
        fsync_dir(&undo_dir(dir))?;
    }
    remove_if_exists(&marker)?;
    fsync_dir(&dir.join(STATE_DIR))
}

/// Reverts the last applied batch (or all batches) by restoring the original bytes.
///
/// # Errors
/// [`Error::Revert`] when there is nothing to revert or its undo data is missing;
/// [`Error::Integrity`] when an edited tensor changed since the batch was applied, or when an
/// undo file does not fit the checkpoint.
pub fn revert(dir: &Path, all: bool) -> Result<Reverted> {
    fs::metadata(dir).at(dir)?;
    refuse_cache_snapshot(dir)?;
    if fs::symlink_metadata(dir.join(STATE_DIR)).is_err() {
        // No lock, journal or undo file was ever made here: check it is a checkpoint at all
        // before creating the lock.
        Checkpoint::open(dir)?;
    }
    let _lock = lock_exclusive(&model_lock_path(dir), folder_mode(dir))?;
    // A revert that was interrupted is finished by the recovery; it counts as this one.
    let interrupted = if revert_marker(dir).exists() { read_marker(&revert_marker(dir)).ok() } else { None };
    let recovered = recover_locked(dir)?;
    let mut reverted: Vec<u64> = interrupted.into_iter().collect();
    if !reverted.is_empty() && !all {
        return Ok(Reverted { batches: reverted, recovered });
    }
    loop {
        let log = read_bundle(dir, true)?;
        let Some(batch) = log.iter().filter_map(|r| r.batch).max() else {
            if reverted.is_empty() {
                return Err(Error::Revert { msg: format!("{} has no rrome edits to revert", dir.display()) });
            }
            break;
        };
        let upath = undo_path(dir, batch);
        if !upath.exists() {
            return Err(Error::Revert {
                msg: format!(
                    "batch {batch} has no undo data ({} is missing); it cannot be reverted exactly",
                    upath.display()
                ),
            });
        }
        let undo = Undo::read(&upath)?;
        let ckpt = Checkpoint::open(dir)?;
        check_undo(&ckpt, &undo)?;
        for r in &undo.regions {
            let now = sha256_hex(&read_region(&dir.join(&r.shard), r.offset, r.len)?);
            if now != r.sha_after {
                return Err(Error::Integrity {
                    msg: format!(
                        "{} in {} changed after batch {batch} was applied (by something other than rrome); refusing to revert",
                        r.tensor, r.shard
                    ),
                });
            }
        }
        atomic_write_mode(&revert_marker(dir), Some(ckpt.file_mode()), |w| {
            use std::io::Write;
            write!(w, "{}", json!({"batch": batch}))
        })?;
        crash_point("revert-marked");
        finish_revert(dir, &ckpt, batch, ckpt.file_mode())?;
        reverted.push(batch);
        if !all {
            break;
        }
    }
    Ok(Reverted { batches: reverted, recovered })
}
