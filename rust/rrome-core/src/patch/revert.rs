//! Reverting committed batches from their undo files, newest first, through a revert marker
//! that makes an interrupted revert finish on the next command.

use std::fs;
use std::path::Path;

use super::batch::folder_mode;
use super::plan::check_undo;
use super::recover::recover_locked;
use super::undo::{finish_revert, read_marker, revert_marker, write_marker};
use crate::checkpoint::{refuse_cache_snapshot, Checkpoint};
use crate::deltas::read_bundle;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::crash_point;
use crate::journal::{read_region, sha256_hex, undo_path, Undo};
use crate::lock::{lock_exclusive, model_lock_path, STATE_DIR};

/// What a revert did.
#[derive(Debug, Clone, Default)]
pub struct Reverted {
    /// The reverted batches, newest first.
    pub batches: Vec<u64>,
    /// What the recovery that runs first did (see [`ApplyReport::recovered`]).
    pub recovered: Vec<String>,
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
        write_marker(dir, batch, ckpt.file_mode())?;
        crash_point("revert-marked");
        finish_revert(dir, &ckpt, batch, ckpt.file_mode())?;
        reverted.push(batch);
        if !all {
            break;
        }
    }
    Ok(Reverted { batches: reverted, recovered })
}
