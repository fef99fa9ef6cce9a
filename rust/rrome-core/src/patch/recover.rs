//! Finishing or rolling back what an interrupted run left in a model folder, and the restore
//! and rollback steps that revert shares.

use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::folder_mode;
use super::in_place::finalize;
use super::plan::check_undo;
use super::revert::{finish_revert, read_marker, revert_marker};
use crate::check::py_repr;
use crate::checkpoint::Checkpoint;
use crate::deltas::{read_bundle, write_bundle_with, Order, Record, DELTAS_FILE, EDITS_FILE};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{crash_point, fsync_dir, open_write_nofollow, remove_if_exists, unshare};
use crate::journal::{journal_path, read_region, sha256_hex, undo_path, Region, Undo};
use crate::lock::{lock_exclusive, model_lock_path, STATE_DIR};

/// Re-reads every region of `dir` and checks its hash (`after` or `before`).
fn verify(dir: &Path, regions: &[Region], after: bool) -> Result<()> {
    for r in regions {
        let got = sha256_hex(&read_region(&dir.join(&r.shard), r.offset, r.len)?);
        let want = if after { &r.sha_after } else { &r.sha_before };
        if &got != want {
            return Err(Error::Integrity {
                msg: format!("{} in {}: sha256 {got} after writing, expected {want}", r.tensor, r.shard),
            });
        }
    }
    Ok(())
}

/// Restores every region of `undo` whose bytes are not already the originals, then verifies.
/// The caller has checked `undo` against the checkpoint ([`check_undo`]).
pub(super) fn restore(dir: &Path, undo: &Undo) -> Result<()> {
    let mut touched: Vec<PathBuf> = Vec::new();
    for (i, r) in undo.regions.iter().enumerate() {
        let path = dir.join(&r.shard);
        if sha256_hex(&read_region(&path, r.offset, r.len)?) == r.sha_before {
            continue;
        }
        let orig = undo.original(i)?;
        if !touched.contains(&path) {
            unshare(&path)?;
            touched.push(path.clone());
        }
        let f = open_write_nofollow(&path)?;
        f.write_all_at(&orig, r.offset).at(&path)?;
        crash_point("restore-region");
    }
    for p in &touched {
        File::open(p).and_then(|f| f.sync_all()).at(p)?;
    }
    verify(dir, &undo.regions, false)
}

/// Rewrites the edit log as `records` (a subset of the current log), removing both files when
/// none remain. The JSON lines go first, so every listed record keeps its tensors throughout.
pub(super) fn write_log(dir: &Path, records: &[Record], mode: u32) -> Result<()> {
    if records.is_empty() {
        remove_if_exists(&dir.join(EDITS_FILE))?;
        crash_point("log-shrunk");
        remove_if_exists(&dir.join(DELTAS_FILE))?;
        fsync_dir(dir)
    } else {
        write_bundle_with(dir, records, Some(mode), Order::Shrinking)
    }
}

/// Rolls an uncommitted journal back: original bytes, a log without the batch, no journal.
pub(super) fn rollback(dir: &Path, undo: &Undo, log: &[Record], mode: u32) -> Result<()> {
    restore(dir, undo)?;
    let kept: Vec<Record> = log.iter().filter(|r| r.batch != Some(undo.batch)).cloned().collect();
    write_log(dir, &kept, mode)?;
    remove_if_exists(&undo.path)?;
    fsync_dir(&dir.join(STATE_DIR))
}

/// Removes leftovers of interrupted atomic writes (`.<name>.rrome-tmp-<pid>`) from `dir`.
fn remove_tmp_files(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.at(dir)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".rrome-tmp-") && entry.file_type().at(dir)?.is_file() {
            remove_if_exists(&entry.path())?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Finishes or rolls back whatever an interrupted run left in `dir`. Caller holds the lock.
/// Returns a description of each action taken (empty when the folder was clean). Every record
/// found is checked before it is acted on; a record that rrome could not have written is
/// refused with an error naming it, and nothing is written.
pub(super) fn recover_locked(dir: &Path) -> Result<Vec<String>> {
    let mut actions = Vec::new();
    for name in remove_tmp_files(dir)?.into_iter().chain(remove_tmp_files(&dir.join(STATE_DIR))?) {
        actions.push(format!("removed unfinished temporary file {}", py_repr(&name)));
    }
    let marker = revert_marker(dir);
    let journal = journal_path(dir);
    // Finishing a revert neither creates nor removes a journal: both are looked at once.
    let (has_marker, has_journal) = (marker.exists(), fs::symlink_metadata(&journal).is_ok());
    if !has_marker && !has_journal {
        return Ok(actions);
    }
    let ckpt = Checkpoint::open(dir)?;
    let mode = ckpt.file_mode();
    if has_marker {
        let batch = read_marker(&marker)?;
        finish_revert(dir, &ckpt, batch, mode)?;
        actions.push(format!("finished the interrupted revert of batch {batch}"));
    }
    if has_journal {
        let undo = Undo::read(&journal)?;
        check_undo(&ckpt, &undo)?;
        let log = read_bundle(dir, true)?;
        let last = log.iter().filter_map(|r| r.batch).max().unwrap_or(0);
        let committed = log.iter().any(|r| r.batch == Some(undo.batch));
        // A journal is always the newest batch: the last one in the log once committed, the
        // next one before; any other number was not written by an interrupted rrome.
        let expected = if committed { last } else { last + 1 };
        if undo.batch != expected || (committed && undo_path(dir, undo.batch).exists()) {
            return Err(Error::Integrity {
                msg: format!(
                    "{}: journal of batch {} does not fit the edit log (last batch {last}); nothing was written. \
                     If you did not expect it, delete it and run the command again",
                    journal.display(),
                    undo.batch
                ),
            });
        }
        if committed {
            verify(dir, &undo.regions, true)?;
            finalize(dir, undo.batch, mode)?;
            actions.push(format!("completed batch {} (it was committed before the interruption)", undo.batch));
        } else {
            rollback(dir, &undo, &log, mode)?;
            actions.push(format!("rolled back uncommitted batch {}; the original bytes are restored", undo.batch));
        }
    }
    Ok(actions)
}

/// Recovers a model folder after a crash: takes the lock and finishes or rolls back.
pub fn recover(dir: &Path) -> Result<Vec<String>> {
    fs::metadata(dir).at(dir)?;
    if fs::symlink_metadata(dir.join(STATE_DIR)).is_err() && remove_tmp_files(dir)?.is_empty() {
        return Ok(Vec::new()); // rrome never wrote here: nothing to recover, nothing to create
    }
    let _lock = lock_exclusive(&model_lock_path(dir), folder_mode(dir))?;
    recover_locked(dir)
}
