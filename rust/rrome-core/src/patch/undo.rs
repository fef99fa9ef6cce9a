//! The undo machinery every writer shares: checking and restoring a batch's original bytes,
//! shrinking the edit log, moving a committed journal into place, and the revert marker that
//! makes an interrupted revert finish on the next command. It calls nothing else of `patch`
//! but [`check_undo`], so the writers (`in_place`, `recover`, `revert`, `copy`) all point
//! here and never at each other's helpers.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::plan::check_undo;
use crate::checkpoint::Checkpoint;
use crate::deltas::{read_bundle, write_bundle_with, Order, Record, DELTAS_FILE, EDITS_FILE};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{
    atomic_write_mode, crash_point, dir_mode, ensure_dir, fsync_dir, open_write_nofollow, read_file, remove_if_exists,
    unshare,
};
use crate::journal::{journal_path, read_region, sha256_hex, undo_dir, undo_path, Region, Undo};
use crate::lock::STATE_DIR;

/// Re-reads every region of `dir` and checks its hash (`after` or `before`).
pub(super) fn verify(dir: &Path, regions: &[Region], after: bool) -> Result<()> {
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

/// Moves a committed journal to the undo folder.
pub(super) fn finalize(dir: &Path, batch: u64, mode: u32) -> Result<()> {
    let udir = undo_dir(dir);
    ensure_dir(&udir, dir_mode(mode))?;
    let dest = undo_path(dir, batch);
    fs::rename(journal_path(dir), &dest).at(&dest)?;
    fsync_dir(&udir)?;
    fsync_dir(&dir.join(STATE_DIR))
}

/// The revert marker of a model folder: the batch an unfinished revert removes.
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

/// Writes the revert marker naming `batch` (mode `mode`), before any byte of it is restored.
pub(super) fn write_marker(dir: &Path, batch: u64, mode: u32) -> Result<()> {
    atomic_write_mode(&revert_marker(dir), Some(mode), |w| {
        use std::io::Write;
        write!(w, "{}", json!({"batch": batch}))
    })
}
