//! Writing a batch in place: steps 1-6 of the protocol in the [module documentation](super).

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::batch::{new_records, next_batch, refuse_repeat, report, ApplyReport};
use super::plan::{own_shards, plan, region_slots, OpenShards, Plan};
use super::recover::recover_locked;
use super::undo::{finalize, rollback};
use crate::checkpoint::{refuse_cache_snapshot, Checkpoint};
use crate::deltas::{read_bundle, write_bundle_with, Delta, Order, DELTAS_FILE, EDITS_FILE};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{crash_point, dir_mode, ensure_dir};
use crate::journal::{journal_path, read_region_into, undo_dir, undo_path, write_undo, Region, Undo};
use crate::lock::{lock_exclusive, model_lock_path};

pub(super) fn apply_in_place(dir: &Path, deltas: &[Delta], again: bool) -> Result<ApplyReport> {
    if !dir.is_dir() {
        // Report a missing folder before creating any state inside it.
        fs::metadata(dir).at(dir)?;
        return Err(Error::checkpoint(dir, "is not a folder"));
    }
    refuse_cache_snapshot(dir)?;
    // Refuse a folder that is not a checkpoint, or deltas that do not fit it, before the lock
    // creates any state inside it (headers are never rewritten, so this read is valid even
    // with a crashed batch pending); the checks are repeated under the lock.
    let first = Checkpoint::open(dir)?;
    plan(&first, deltas)?;
    let _lock = lock_exclusive(&model_lock_path(dir), first.file_mode())?;
    let recovered = recover_locked(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let mode = ckpt.file_mode();
    let plans = plan(&ckpt, deltas)?;
    let log = read_bundle(dir, true)?;
    let batch = next_batch(dir, &log)?;
    refuse_repeat(dir, &log, deltas, again)?;
    // Everything step 6 needs is made and checked now, before the journal: once the batch is
    // committed nothing may fail for want of a folder.
    prepare_undo(dir, batch, mode)?;
    own_shards(&ckpt, &plans)?;

    let journal = journal_path(dir);
    let regions = write_journal(&ckpt, &plans, &journal, batch)?;
    crash_point("journal-written");
    let result = (|| {
        patch_from_journal(dir, &plans, &regions, &journal)?;
        crash_point("patched");
        let mut records = log.clone();
        records.extend(new_records(deltas, batch));
        write_bundle_with(dir, &records, Some(mode), Order::Growing)?;
        Ok(())
    })();
    if let Err(e) = result {
        // Put the original bytes back now rather than leaving it to the next command.
        return Err(match rollback(dir, &Undo::read(&journal)?, &log, mode) {
            Ok(()) => e,
            Err(re) => Error::Integrity { msg: format!("{e}; rolling back also failed: {re}; run `rrome recover`") },
        });
    }
    crash_point("committed");
    finalize(dir, batch, mode).map_err(|e| committed_but(dir, batch, e))?;
    let journal_bytes = fs::metadata(undo_path(dir, batch)).at(undo_path(dir, batch))?.len();
    let log_bytes = fs::metadata(dir.join(EDITS_FILE)).map(|m| m.len()).unwrap_or(0)
        + fs::metadata(dir.join(DELTAS_FILE)).map(|m| m.len()).unwrap_or(0);
    Ok(ApplyReport { recovered, ..report(dir, batch, deltas.len(), &regions, journal_bytes + log_bytes) })
}

/// In place, pass 1: writes the undo journal. Each region's original bytes are read once,
/// streamed into the journal and hashed while the new bytes are computed and hashed; no shard
/// is written. Returns the regions with their hashes.
fn write_journal(ckpt: &Checkpoint, plans: &[Plan], journal: &Path, batch: u64) -> Result<Vec<Region>> {
    let mut regions = region_slots(ckpt, plans);
    let mut shards = OpenShards::new(false);
    let (mut old, mut new) = (Vec::new(), Vec::new());
    write_undo(journal, ckpt.file_mode(), batch, &mut regions, |i, w| {
        let p = &plans[i];
        let path = &ckpt.shards[p.shard].path;
        read_region_into(shards.get(path)?, path, p.offset, p.len, &mut old)?;
        let hashes = p.compute_and_hash(&old, &mut new)?;
        w.write_all(&old).at(journal)?;
        Ok(hashes)
    })?;
    Ok(regions)
}

/// In place, pass 2: for each region, checks that the shard still holds exactly the bytes
/// the journal saved, computes the new bytes and writes them; then fsyncs the shards.
fn patch_from_journal(dir: &Path, plans: &[Plan], regions: &[Region], journal: &Path) -> Result<()> {
    let undo = Undo::read(journal)?;
    let mut shards = OpenShards::new(true);
    let (mut old, mut buf) = (Vec::new(), Vec::new());
    for (i, (p, r)) in plans.iter().zip(regions).enumerate() {
        let path = dir.join(&r.shard);
        let f = shards.get(&path)?;
        read_region_into(f, &path, p.offset, p.len, &mut old)?;
        undo.raw_into(i, &mut buf)?;
        if old != buf {
            return Err(Error::Integrity {
                msg: format!("{} in {} changed after the undo journal was written", r.tensor, r.shard),
            });
        }
        p.new_bytes_into(&old, &mut buf)?;
        f.write_all_at(&buf, p.offset).at(&path)?;
        crash_point("patch-region");
    }
    shards.sync_all()
}

/// Makes the undo folder and checks that batch `batch` has no undo file yet: a file there was
/// not written by rrome (the batch is not in the log), and renaming the journal onto it after
/// the commit could fail (a folder) or hide it.
fn prepare_undo(dir: &Path, batch: u64, mode: u32) -> Result<()> {
    ensure_dir(&undo_dir(dir), dir_mode(mode))?;
    let dest = undo_path(dir, batch);
    if fs::symlink_metadata(&dest).is_ok() {
        return Err(Error::Integrity {
            msg: format!(
                "{} exists, but batch {batch} is not in the edit log: rrome did not write it. Nothing was \
                 written; remove it and run the command again",
                dest.display()
            ),
        });
    }
    Ok(())
}

/// The error for a step after the commit point that failed: the batch is applied and logged,
/// and the next command (or `rrome recover`) finishes the step; applying it again would add it
/// twice.
fn committed_but(dir: &Path, batch: u64, e: Error) -> Error {
    Error::Integrity {
        msg: format!(
            "batch {batch} was committed: the weights are edited and the edit log holds it (do not apply it \
             again); moving its undo file into place then failed: {e}. `rrome recover {}` finishes that",
            dir.display()
        ),
    }
}
