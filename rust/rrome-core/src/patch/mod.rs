//! Applying, reverting and recovering batches of deltas in a model folder (docs/design.md §4).
//!
//! In place, under the folder's exclusive lock:
//! 1. finish or roll back whatever an earlier crashed run left (see [`recover()`]);
//! 2. validate the checkpoint and every delta; give any edited shard that shares its inode with
//!    other hard links (a copy made with `out_dir`) an inode of its own ([`unshare`](crate::fsutil::unshare));
//! 3. write the undo journal: stream each region's original bytes into it while the new bytes
//!    are computed and both are hashed (in parallel), fill the hashes into its header, fsync,
//!    rename into place (a region is read and hashed once here, and nothing touches a shard);
//! 4. patch: re-read each region, check it byte for byte against the journal's copy, compute
//!    the new bytes and write them; fsync the shards. (The new bytes are a pure function of the
//!    old ones, so their hash is the one recorded in step 3; re-reading the page cache to hash
//!    them again would prove nothing more.)
//! 5. append the batch to the edit log (atomic rename of `rrome_edits.jsonl`: the commit point);
//! 6. move the journal to `.rrome/undo/batch-N.safetensors`, the data `revert` uses.
//!
//! A crash before 5 is rolled back from the journal, a crash after 5 is rolled forward; every
//! recovery step checks hashes first, so running it twice is harmless. Revert and rollback
//! shrink the edit log: they replace its JSON lines before its tensor file, so a crash between
//! the two renames leaves a log whose every record still has its tensors.
//!
//! Nothing in a model folder is trusted (docs/design.md §7, "Threat model"): a journal, undo file
//! or revert marker found there is checked against the checkpoint before any byte is written
//! ([`check_undo`]): each region must be exactly the bytes of a tensor of a shard of the
//! checkpoint, and every shard written must be a regular file of the folder, not a link.
//! Copies refuse links and special files instead of following them. Files rrome creates take
//! the shards' permission bits.
//!
//! To a copy (`out_dir`): everything is built in a hidden sibling of the destination, fsynced
//! and renamed into place at the end, so the destination is complete or absent. With
//! [`Untouched::HardLink`], shards that no delta touches (and committed undo files, which are
//! only ever replaced, never rewritten) are hard links to the source's files where the
//! filesystem allows; an in-place write on either side un-shares a shard before it changes a
//! byte of it, so neither folder ever writes through the other's file.
//!
//! The submodules follow the steps: `plan` (what a batch writes, and whether it may),
//! `in_place` (steps 1-6 above), `copy` (the `out_dir` build), `recover` and `revert`, and
//! `inspect` (a read-only description of a folder).

mod copy;
mod in_place;
mod inspect;
mod plan;
mod recover;
mod revert;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::check::{check_bundle, py_repr};
use crate::checkpoint::Checkpoint;
use crate::deltas::{Delta, Record};
use crate::error::{Error, Result};
use crate::fsutil::PRIVATE_MODE;
use crate::journal::Region;

/// Environment variable that makes the process abort at a named step (crash tests only).
pub use crate::fsutil::CRASH_ENV;
pub use inspect::{inspect, inspect_with, Inspection, LogEntry};
pub use plan::check_undo;
pub use recover::recover;
pub use revert::revert;

/// What an apply did.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// Batch number given to the deltas in the edit log.
    pub batch: u64,
    /// The folder that now holds the edited checkpoint.
    pub model_dir: PathBuf,
    /// Number of deltas in the batch.
    pub deltas: usize,
    /// Edited tensors, in order.
    pub tensors: Vec<String>,
    /// Shards that changed.
    pub shards: Vec<String>,
    /// Bytes of the edited tensors.
    pub tensor_bytes: u64,
    /// Bytes written to the checkpoint folder (patches, journal, log; copies excluded).
    pub bytes_written: u64,
    /// What the recovery that runs first did (an interrupted write finished or rolled back);
    /// empty when the folder was clean.
    pub recovered: Vec<String>,
}

/// What a revert did.
#[derive(Debug, Clone, Default)]
pub struct Reverted {
    /// The reverted batches, newest first.
    pub batches: Vec<u64>,
    /// What the recovery that runs first did (see [`ApplyReport::recovered`]).
    pub recovered: Vec<String>,
}

/// How a copy made with `out_dir` holds the files that no delta changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Untouched {
    /// Copied: the two folders share nothing (the default).
    #[default]
    Copy,
    /// Untouched shards and committed undo files are hard links to the source's files (copied
    /// where the filesystem cannot link). Fast and small, and safe against rrome's own later
    /// writes (an in-place write un-shares a shard first), but a tool other than rrome that
    /// rewrites a shared shard in place (opening it for writing rather than replacing it)
    /// changes both folders.
    HardLink,
}

/// How an apply runs: how a copy holds the files no delta changes, and whether a batch that
/// repeats deltas already in the edit log may be applied again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOptions {
    /// How a copy made with `out_dir` holds the files no delta changes (ignored in place).
    pub untouched: Untouched,
    /// Apply even when a delta is bit for bit one the edit log already holds. Off, such a batch
    /// is refused before anything is written: it is almost surely the same bundle applied a
    /// second time (after a command that committed but reported a failure, say).
    pub again: bool,
}

impl From<Untouched> for ApplyOptions {
    fn from(untouched: Untouched) -> ApplyOptions {
        ApplyOptions { untouched, again: false }
    }
}

/// Applies `deltas` to the checkpoint in `model_dir`, in place or into a new folder `out_dir`
/// that shares no file with `model_dir` (see [`apply_deltas_with`]).
///
/// # Errors
/// Any [`Error`](crate::Error); on error the model folder is unchanged (in place: rolled back
/// before returning, or by the next command after a crash) and `out_dir` does not exist.
pub fn apply_deltas(model_dir: &Path, deltas: &[Delta], out_dir: Option<&Path>) -> Result<ApplyReport> {
    apply_deltas_with(model_dir, deltas, out_dir, ApplyOptions::default())
}

/// [`apply_deltas`] with [`ApplyOptions`] (or just an [`Untouched`]).
///
/// # Errors
/// As [`apply_deltas`]; [`Error::Delta`] when a delta repeats one of the edit log and
/// `again` is off.
pub fn apply_deltas_with(
    model_dir: &Path,
    deltas: &[Delta],
    out_dir: Option<&Path>,
    options: impl Into<ApplyOptions>,
) -> Result<ApplyReport> {
    let options = options.into();
    match out_dir {
        None => in_place::apply_in_place(model_dir, deltas, options.again),
        Some(out) => copy::apply_to_copy(model_dir, deltas, out, options),
    }
}

/// Reads the deltas bundle at `bundle` (a folder or either of its files), checks every record
/// against the checkpoint in `model_dir`, naming each misfit at its `FILE:LINE`
/// ([`check_bundle`]), and applies them as one batch as [`apply_deltas_with`] does: the
/// `rrome apply-deltas` command in one call.
///
/// # Errors
/// As [`check_bundle`], then as [`apply_deltas_with`].
pub fn apply_bundle(
    model_dir: &Path,
    bundle: &Path,
    out_dir: Option<&Path>,
    options: impl Into<ApplyOptions>,
) -> Result<ApplyReport> {
    let deltas: Vec<Delta> = check_bundle(model_dir, bundle)?.into_iter().map(|r| r.delta).collect();
    apply_deltas_with(model_dir, &deltas, out_dir, options)
}

/// Refuses a batch holding a delta that is bit for bit one the edit log `log` of `dir` already
/// holds (same tensor, layout, scale and factors), unless `again`.
pub(super) fn refuse_repeat(dir: &Path, log: &[Record], deltas: &[Delta], again: bool) -> Result<()> {
    if again {
        return Ok(());
    }
    let same = |a: &Delta, b: &Delta| {
        a.tensor == b.tensor
            && a.layout == b.layout
            && a.scale.to_bits() == b.scale.to_bits()
            && a.u.len() == b.u.len()
            && a.r.len() == b.r.len()
            && a.u.iter().zip(&b.u).all(|(x, y)| x.to_bits() == y.to_bits())
            && a.r.iter().zip(&b.r).all(|(x, y)| x.to_bits() == y.to_bits())
    };
    let repeats: Vec<String> = deltas
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let r = log.iter().find(|r| same(&r.delta, d))?;
            let batch = r.batch.map(|b| format!(" of batch {b}")).unwrap_or_default();
            Some(format!("delta {i} ({}) is {}{batch}", py_repr(&d.tensor), py_repr(&r.id)))
        })
        .collect();
    if repeats.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = repeats.iter().take(5).map(String::as_str).collect();
    let more = if repeats.len() > 5 { format!(" (and {} more)", repeats.len() - 5) } else { String::new() };
    Err(Error::Delta {
        msg: format!(
            "{}: the edit log already holds {} of these deltas: {}{more}; this batch was applied before. \
             Nothing was written; to apply it a second time on purpose, pass --again (again=True)",
            dir.display(),
            repeats.len(),
            shown.join("; ")
        ),
    })
}

/// The mode of files rrome creates in `dir`: its shards' bits, or owner-only when the
/// checkpoint cannot be read.
pub(super) fn folder_mode(dir: &Path) -> u32 {
    Checkpoint::open(dir).map(|c| c.file_mode()).unwrap_or(PRIVATE_MODE)
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The number of the batch after the log's last. A log whose last batch is `u64::MAX` is
/// corrupt (no folder takes 2^64 batches); wrapping to 0 would reuse a number.
pub(super) fn next_batch(dir: &Path, log: &[Record]) -> Result<u64> {
    let last = log.iter().filter_map(|r| r.batch).max().unwrap_or(0);
    last.checked_add(1).ok_or_else(|| Error::DeltasFile {
        msg: format!(
            "{}: batch {last} is the largest batch number there can be; the edit log is corrupt",
            dir.join(crate::deltas::EDITS_FILE).display()
        ),
    })
}

pub(super) fn new_records(deltas: &[Delta], batch: u64) -> Vec<Record> {
    let t = now();
    deltas
        .iter()
        .enumerate()
        .map(|(i, d)| Record {
            id: format!("b{batch}.{i}"),
            batch: Some(batch),
            applied_at: Some(t),
            line: 0,
            delta: d.clone(),
        })
        .collect()
}

pub(super) fn report(dir: &Path, batch: u64, deltas: usize, regions: &[Region], extra_bytes: u64) -> ApplyReport {
    let mut shards: Vec<String> = Vec::new();
    for r in regions {
        if !shards.contains(&r.shard) {
            shards.push(r.shard.clone());
        }
    }
    let tensor_bytes = regions.iter().map(|r| r.len).sum();
    ApplyReport {
        batch,
        model_dir: dir.to_path_buf(),
        deltas,
        tensors: regions.iter().map(|r| r.tensor.clone()).collect(),
        shards,
        tensor_bytes,
        bytes_written: tensor_bytes + extra_bytes,
        recovered: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::revert::revert_marker;
    use super::*;
    use crate::deltas::Layout;
    use crate::dtype::Dtype;
    use crate::fsutil::SYNCED_DIRS;
    use crate::journal::{undo_dir, undo_path};
    use crate::lock::STATE_DIR;
    use crate::safetensors_header::{write, TensorData};

    fn synced() -> Vec<PathBuf> {
        SYNCED_DIRS.with(|s| std::mem::take(&mut *s.borrow_mut()))
    }

    #[test]
    fn state_folder_entries_are_flushed_when_created_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let data: Vec<u8> = (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut f = File::create(dir.join("model.safetensors")).unwrap();
        write(&mut f, &[TensorData { name: "w", dtype: Dtype::F32, shape: vec![2, 4], data: &data }], &[]).unwrap();
        drop(f);
        let d = Delta {
            tensor: "w".into(),
            u: vec![1.0; 4],
            r: vec![1.0; 2],
            layout: Layout::OutIn,
            scale: 1.0,
            meta: None,
            key: None,
        };
        let state = dir.join(STATE_DIR);
        synced();
        apply_deltas(dir, &[d], None).unwrap();
        let after_apply = synced();
        // Creating .rrome flushes the model folder; creating .rrome/undo flushes .rrome; the
        // journal's rename into undo/ flushes undo/.
        assert_eq!(after_apply.iter().position(|p| p == dir), Some(0), "{after_apply:?}");
        for want in [&state, &undo_dir(dir)] {
            assert!(after_apply.contains(want), "{want:?} not flushed: {after_apply:?}");
        }
        revert(dir, false).unwrap();
        let after_revert = synced();
        // Removing the undo file flushes undo/; removing the marker flushes .rrome.
        for want in [&undo_dir(dir), &state, &dir.to_path_buf()] {
            assert!(after_revert.contains(want), "{want:?} not flushed: {after_revert:?}");
        }
        assert!(!undo_path(dir, 1).exists() && !revert_marker(dir).exists());
    }
}
