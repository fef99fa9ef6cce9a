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
//! The submodules follow the steps: `batch` (a batch's options, number, records and report),
//! `plan` (what a batch writes, and whether it may), `undo` (restoring original bytes,
//! shrinking the log, moving a journal into place, the revert marker), then the writers
//! `in_place` (steps 1-6 above), `copy` (the `out_dir` build), `recover` and `revert`, and
//! `inspect` (a read-only description of a folder). The arrows run one way: the writers use
//! `batch`, `plan` and `undo` (and `in_place` and `revert` run `recover` first); `undo` uses
//! only `plan`; this file only declares them and re-exports the public face
//! (tests/test_layers.py checks that no cycle appears).

mod batch;
mod copy;
mod in_place;
mod inspect;
mod plan;
mod recover;
mod revert;
mod undo;

use std::path::Path;

use crate::check::check_bundle;
use crate::deltas::Delta;
use crate::error::Result;

/// Environment variable that makes the process abort at a named step (crash tests only).
pub use crate::fsutil::CRASH_ENV;
pub use batch::{ApplyOptions, ApplyReport, Untouched};
pub use inspect::{inspect, inspect_with, Inspection, LogEntry};
pub use plan::check_undo;
pub use recover::recover;
pub use revert::{revert, Reverted};

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

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::path::PathBuf;

    use super::undo::revert_marker;
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
            other_key: None,
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
