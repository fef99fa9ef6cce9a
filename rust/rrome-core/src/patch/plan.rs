//! What a batch writes, and whether it may: one [`Plan`] per edited tensor, checked against the
//! checkpoint before anything is written; the checks that a shard may be written in place; and
//! the check of an undo record found in the folder ([`check_undo`]).

use std::collections::HashSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::check::{check_deltas, refusal};
use crate::checkpoint::{Checkpoint, Shard};
use crate::deltas::Delta;
use crate::dtype::Dtype;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{not_regular, open_read, open_write_nofollow, unshare};
use crate::journal::{sha256_hex, Region, Undo};
use crate::rank_one::{self, Term};

/// One tensor's planned change.
pub(super) struct Plan {
    pub(super) shard: usize,
    pub(super) tensor: String,
    pub(super) offset: u64,
    pub(super) len: u64,
    dtype: Dtype,
    rows: usize,
    cols: usize,
    terms: Vec<Term>,
}

impl Plan {
    /// New bytes for the given old bytes, into `new` (resized; reusable across regions);
    /// refuses results that overflow the dtype. Deterministic: the same old bytes always give
    /// the same new bytes (each element is computed on its own, in term order).
    pub(super) fn new_bytes_into(&self, old: &[u8], new: &mut Vec<u8>) -> Result<()> {
        new.resize(old.len(), 0);
        if !rank_one::apply(self.dtype, self.rows, self.cols, old, &self.terms, new) {
            return Err(Error::Delta {
                msg: format!("the update of {} produces values that are not finite in {}", self.tensor, self.dtype),
            });
        }
        Ok(())
    }

    /// Computes the new bytes from `old` into `new` and returns (sha256 of old, sha256 of
    /// new); the old bytes are hashed while the new ones are computed and hashed.
    pub(super) fn compute_and_hash(&self, old: &[u8], new: &mut Vec<u8>) -> Result<(String, String)> {
        let (before, after) =
            rayon::join(|| sha256_hex(old), || self.new_bytes_into(old, new).map(|()| sha256_hex(new)));
        Ok((before, after?))
    }
}

/// The files of the shards a batch touches, each opened once.
pub(super) struct OpenShards {
    write: bool,
    files: Vec<(PathBuf, File)>,
}

impl OpenShards {
    pub(super) fn new(write: bool) -> OpenShards {
        OpenShards { write, files: Vec::new() }
    }

    pub(super) fn get(&mut self, path: &Path) -> Result<&File> {
        let i = match self.files.iter().position(|(p, _)| p == path) {
            Some(i) => i,
            None => {
                let f = if self.write { open_write_nofollow(path)? } else { open_read(path)? };
                self.files.push((path.to_path_buf(), f));
                self.files.len() - 1
            }
        };
        Ok(&self.files[i].1)
    }

    pub(super) fn sync_all(&self) -> Result<()> {
        for (p, f) in &self.files {
            f.sync_all().at(p)?;
        }
        Ok(())
    }
}

/// One [`Plan`] per edited tensor, its deltas' terms in batch order.
///
/// # Errors
/// The [`refusal`] listing every delta that does not fit the checkpoint ([`check_deltas`]);
/// nothing is planned unless all fit.
pub(super) fn plan(ckpt: &Checkpoint, deltas: &[Delta]) -> Result<Vec<Plan>> {
    if deltas.is_empty() {
        return Err(Error::Delta { msg: "no deltas to apply".into() });
    }
    if let Some(e) = refusal(ckpt, &check_deltas(ckpt, deltas)) {
        return Err(e);
    }
    let mut plans: Vec<Plan> = Vec::new();
    for d in deltas {
        let (shard_idx, info) = ckpt.find(&d.tensor)?;
        let shard = &ckpt.shards[shard_idx];
        let want = d.layout.stored_shape(d.d_out(), d.d_in());
        let term = Term::from_delta(d);
        match plans.iter_mut().find(|p| p.tensor == d.tensor) {
            Some(p) => p.terms.push(term),
            None => plans.push(Plan {
                shard: shard_idx,
                tensor: d.tensor.clone(),
                offset: shard.header.abs_offset(info),
                len: info.nbytes(),
                dtype: info.dtype,
                rows: want[0],
                cols: want[1],
                terms: vec![term],
            }),
        }
    }
    Ok(plans)
}

/// Refuses to write a shard in place unless it is a regular file of the folder: never
/// through a symbolic link (the file it names may be anywhere), nor into a FIFO or device.
fn check_writable_in_place(shard: &Shard) -> Result<()> {
    let meta = fs::symlink_metadata(&shard.path).at(&shard.path)?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(&shard.path).map(|t| t.display().to_string()).unwrap_or_default();
        return Err(Error::checkpoint(
            &shard.path,
            format!(
                "is a symbolic link to {target}; rrome never writes through links in a model folder, whose \
                 targets may lie outside the model folder; make a real copy of the folder (`cp -rL`) and edit that"
            ),
        ));
    }
    if !meta.is_file() {
        return Err(not_regular(&shard.path, &meta.file_type()));
    }
    Ok(())
}

/// Makes every shard the plans write safe to write in place: all are checked first (nothing
/// changes when one is refused), then a shard with other hard links gets an inode of its own,
/// so the other names (another folder's copy) keep their bytes.
pub(super) fn own_shards(ckpt: &Checkpoint, plans: &[Plan]) -> Result<()> {
    let mut files: Vec<usize> = Vec::new();
    for p in plans {
        check_writable_in_place(&ckpt.shards[p.shard])?;
        if !files.contains(&p.shard) {
            files.push(p.shard);
        }
    }
    for &i in &files {
        unshare(&ckpt.shards[i].path)?;
    }
    Ok(())
}

/// Checks an undo record found in the folder (the journal, an undo file) against the
/// checkpoint before anything is written from it: every region must be exactly the byte range
/// of the tensor it names, in a shard of the checkpoint that is a regular file of the folder,
/// and no tensor may appear twice. rrome writes only such records; anything else was not
/// written by rrome (or was changed since) and could aim the restore at any file.
pub fn check_undo(ckpt: &Checkpoint, undo: &Undo) -> Result<()> {
    let mut seen = HashSet::new();
    for (i, r) in undo.regions.iter().enumerate() {
        let bad = |msg: String| Error::Integrity {
            msg: format!(
                "{}: region {i} ({} in {}): {msg}; nothing was written. rrome never writes such a record: \
                 if you did not expect it, delete {} and run the command again",
                undo.path.display(),
                r.tensor,
                r.shard,
                undo.path.display()
            ),
        };
        let shard = ckpt.shard(&r.shard).ok_or_else(|| bad(format!("{} is not a shard of the checkpoint", r.shard)))?;
        let t = shard.header.get(&r.tensor).ok_or_else(|| bad(format!("{} holds no tensor of that name", r.shard)))?;
        let (begin, end) = (shard.header.abs_offset(t), shard.header.abs_offset(t) + t.nbytes());
        if r.offset != begin || r.len != t.nbytes() {
            return Err(bad(format!(
                "bytes {}..{} are not the tensor's bytes {begin}..{end}",
                r.offset,
                r.offset.saturating_add(r.len)
            )));
        }
        if !seen.insert((&r.shard, &r.tensor)) {
            return Err(bad("the tensor appears twice".into()));
        }
        check_writable_in_place(shard).map_err(|e| bad(e.to_string()))?;
    }
    Ok(())
}

/// The regions the plans change, hashes still unknown.
pub(super) fn region_slots(ckpt: &Checkpoint, plans: &[Plan]) -> Vec<Region> {
    plans
        .iter()
        .map(|p| Region {
            shard: ckpt.shards[p.shard].file.clone(),
            tensor: p.tensor.clone(),
            offset: p.offset,
            len: p.len,
            sha_before: String::new(),
            sha_after: String::new(),
        })
        .collect()
}
