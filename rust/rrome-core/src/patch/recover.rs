//! Finishing or rolling back what an interrupted run left in a model folder, and the restore
//! and rollback steps that revert shares.

use std::fs::{self};
use std::io::ErrorKind;
use std::path::Path;

use super::batch::folder_mode;
use super::plan::check_undo;
use super::undo::{finalize, finish_revert, read_marker, revert_marker, rollback, verify};
use crate::check::py_repr;
use crate::checkpoint::Checkpoint;
use crate::deltas::read_bundle;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::remove_if_exists;
use crate::journal::{journal_path, undo_path, Undo};
use crate::lock::{lock_exclusive, model_lock_path, STATE_DIR};

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
