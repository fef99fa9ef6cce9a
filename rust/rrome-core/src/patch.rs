//! Applying, reverting and recovering batches of deltas in a model folder (docs/design.md §4).
//!
//! In place, under the folder's exclusive lock:
//! 1. finish or roll back whatever an earlier crashed run left (see [`recover`]);
//! 2. validate the checkpoint and every delta; give any edited shard that shares its inode with
//!    other hard links (a copy made with `out_dir`) an inode of its own ([`unshare`]);
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

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::checkpoint::{Checkpoint, Shard};
use crate::deltas::{read_bundle, write_bundle_with, Delta, Order, Record, DELTAS_FILE, EDITS_FILE};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{
    atomic_write_mode, copy_file, crash_point, dir_mode, ensure_dir, fsync_dir, link_or_copy, link_refused,
    not_regular, open_read, open_write_nofollow, parent_of, read_file, remove_if_exists, unshare, PRIVATE_MODE,
};
use crate::journal::{
    journal_path, read_region, read_region_into, sha256_hex, undo_dir, undo_path, write_undo, Region, Undo,
};
use crate::lock::{lock_exclusive, model_lock_path, DirLock, STATE_DIR};
use crate::rank_one::{self, Term};

/// Environment variable that makes the process abort at a named step (crash tests only).
pub use crate::fsutil::CRASH_ENV;

/// What an apply did.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// Batch number given to the deltas in the edit log.
    pub batch: u64,
    /// The folder that now holds the edited checkpoint.
    pub model_dir: PathBuf,
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

/// One tensor's planned change.
struct Plan {
    shard: usize,
    tensor: String,
    offset: u64,
    len: u64,
    dtype: crate::dtype::Dtype,
    rows: usize,
    cols: usize,
    terms: Vec<Term>,
}

impl Plan {
    /// New bytes for the given old bytes, into `new` (resized; reusable across regions);
    /// refuses results that overflow the dtype. Deterministic: the same old bytes always give
    /// the same new bytes (each element is computed on its own, in term order).
    fn new_bytes_into(&self, old: &[u8], new: &mut Vec<u8>) -> Result<()> {
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
    fn compute_and_hash(&self, old: &[u8], new: &mut Vec<u8>) -> Result<(String, String)> {
        let (before, after) =
            rayon::join(|| sha256_hex(old), || self.new_bytes_into(old, new).map(|()| sha256_hex(new)));
        Ok((before, after?))
    }
}

/// The files of the shards a batch touches, each opened once.
struct OpenShards {
    write: bool,
    files: Vec<(PathBuf, File)>,
}

impl OpenShards {
    fn new(write: bool) -> OpenShards {
        OpenShards { write, files: Vec::new() }
    }

    fn get(&mut self, path: &Path) -> Result<&File> {
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

    fn sync_all(&self) -> Result<()> {
        for (p, f) in &self.files {
            f.sync_all().at(p)?;
        }
        Ok(())
    }
}

fn plan(ckpt: &Checkpoint, deltas: &[Delta]) -> Result<Vec<Plan>> {
    if deltas.is_empty() {
        return Err(Error::Delta { msg: "no deltas to apply".into() });
    }
    let mut plans: Vec<Plan> = Vec::new();
    for (i, d) in deltas.iter().enumerate() {
        let what = format!("delta {i} ({})", d.tensor);
        d.check_finite(&what)?;
        let (shard_idx, info) = ckpt.find(&d.tensor)?;
        let shard = &ckpt.shards[shard_idx];
        if !info.dtype.is_editable() {
            return Err(Error::UnsupportedDtype { name: d.tensor.clone(), dtype: info.dtype.to_string() });
        }
        let want = d.layout.stored_shape(d.d_out(), d.d_in());
        if info.shape != want {
            return Err(Error::Delta {
                msg: format!(
                    "{what}: len(u) = {} and len(r) = {} with layout {} need a tensor of shape {:?}, but it has shape {:?}",
                    d.d_in(),
                    d.d_out(),
                    d.layout.as_str(),
                    want,
                    info.shape
                ),
            });
        }
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
fn own_shards(ckpt: &Checkpoint, plans: &[Plan]) -> Result<()> {
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

/// The mode of files rrome creates in `dir`: its shards' bits, or owner-only when the
/// checkpoint cannot be read.
fn folder_mode(dir: &Path) -> u32 {
    Checkpoint::open(dir).map(|c| c.file_mode()).unwrap_or(PRIVATE_MODE)
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn next_batch(log: &[Record]) -> u64 {
    log.iter().filter_map(|r| r.batch).max().unwrap_or(0) + 1
}

fn new_records(deltas: &[Delta], batch: u64) -> Vec<Record> {
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

/// The regions the plans change, hashes still unknown.
fn region_slots(ckpt: &Checkpoint, plans: &[Plan]) -> Vec<Region> {
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

/// Applies `deltas` to the checkpoint in `model_dir`, in place or into a new folder `out_dir`
/// that shares no file with `model_dir` (see [`apply_deltas_with`]).
///
/// # Errors
/// Any [`Error`]; on error the model folder is unchanged (in place: rolled back before
/// returning, or by the next command after a crash) and `out_dir` does not exist.
pub fn apply_deltas(model_dir: &Path, deltas: &[Delta], out_dir: Option<&Path>) -> Result<ApplyReport> {
    apply_deltas_with(model_dir, deltas, out_dir, Untouched::Copy)
}

/// [`apply_deltas`], choosing how a copy holds the files no delta changes (ignored in place).
///
/// # Errors
/// As [`apply_deltas`].
pub fn apply_deltas_with(
    model_dir: &Path,
    deltas: &[Delta],
    out_dir: Option<&Path>,
    untouched: Untouched,
) -> Result<ApplyReport> {
    match out_dir {
        None => apply_in_place(model_dir, deltas),
        Some(out) => apply_to_copy(model_dir, deltas, out, untouched),
    }
}

fn apply_in_place(dir: &Path, deltas: &[Delta]) -> Result<ApplyReport> {
    if !dir.is_dir() {
        // Report a missing folder before creating any state inside it.
        fs::metadata(dir).at(dir)?;
        return Err(Error::checkpoint(dir, "is not a folder"));
    }
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
    let batch = next_batch(&log);
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
    finalize(dir, batch, mode)?;
    let journal_bytes = fs::metadata(undo_path(dir, batch)).at(undo_path(dir, batch))?.len();
    let log_bytes = fs::metadata(dir.join(EDITS_FILE)).map(|m| m.len()).unwrap_or(0)
        + fs::metadata(dir.join(DELTAS_FILE)).map(|m| m.len()).unwrap_or(0);
    Ok(ApplyReport { recovered, ..report(dir, batch, &regions, journal_bytes + log_bytes) })
}

fn report(dir: &Path, batch: u64, regions: &[Region], extra_bytes: u64) -> ApplyReport {
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
        tensors: regions.iter().map(|r| r.tensor.clone()).collect(),
        shards,
        tensor_bytes,
        bytes_written: tensor_bytes + extra_bytes,
        recovered: Vec::new(),
    }
}

/// Moves a committed journal to the undo folder.
fn finalize(dir: &Path, batch: u64, mode: u32) -> Result<()> {
    let udir = undo_dir(dir);
    ensure_dir(&udir, dir_mode(mode))?;
    let dest = undo_path(dir, batch);
    fs::rename(journal_path(dir), &dest).at(&dest)?;
    fsync_dir(&udir)?;
    fsync_dir(&dir.join(STATE_DIR))
}

/// Restores every region of `undo` whose bytes are not already the originals, then verifies.
/// The caller has checked `undo` against the checkpoint ([`check_undo`]).
fn restore(dir: &Path, undo: &Undo) -> Result<()> {
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
fn write_log(dir: &Path, records: &[Record], mode: u32) -> Result<()> {
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
fn rollback(dir: &Path, undo: &Undo, log: &[Record], mode: u32) -> Result<()> {
    restore(dir, undo)?;
    let kept: Vec<Record> = log.iter().filter(|r| r.batch != Some(undo.batch)).cloned().collect();
    write_log(dir, &kept, mode)?;
    remove_if_exists(&undo.path)?;
    fsync_dir(&dir.join(STATE_DIR))
}

fn revert_marker(dir: &Path) -> PathBuf {
    dir.join(STATE_DIR).join("revert.json")
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

/// The batch a revert marker names (the marker is read without blocking, through no FIFO).
fn read_marker(marker: &Path) -> Result<u64> {
    let text = read_file(marker)?;
    serde_json::from_slice::<Value>(&text)
        .ok()
        .and_then(|v| v.get("batch").and_then(Value::as_u64))
        .ok_or_else(|| Error::Integrity { msg: format!("{}: unreadable revert marker", marker.display()) })
}

/// Finishes or rolls back whatever an interrupted run left in `dir`. Caller holds the lock.
/// Returns a description of each action taken (empty when the folder was clean). Every record
/// found is checked before it is acted on; a record that rrome could not have written is
/// refused with an error naming it, and nothing is written.
fn recover_locked(dir: &Path) -> Result<Vec<String>> {
    let mut actions = Vec::new();
    for name in remove_tmp_files(dir)?.into_iter().chain(remove_tmp_files(&dir.join(STATE_DIR))?) {
        actions.push(format!("removed unfinished temporary file {name}"));
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

/// Completes the revert of `batch` that a marker records: restores its undo file's bytes
/// (checked against the checkpoint first), drops the batch from the log, removes the undo file
/// and the marker.
fn finish_revert(dir: &Path, ckpt: &Checkpoint, batch: u64, mode: u32) -> Result<()> {
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

/// Files of a model folder that a copy carries over (everything but locks, journals and
/// temporary files), as paths relative to the folder. Links are never followed: a folder
/// holding one (`docs -> ../secret`, `loop -> .`) is refused, as is a FIFO, socket or device.
fn files_to_copy(src: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = src.join(&rel);
        for entry in fs::read_dir(&abs).at(&abs)? {
            let entry = entry.at(&abs)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = rel.join(&name);
            if name.contains(".rrome-tmp-") {
                continue;
            }
            if rel == Path::new(STATE_DIR) && matches!(name.as_str(), "lock" | "journal.safetensors" | "revert.json") {
                continue;
            }
            // The entry itself, not what a link points to.
            let ft = entry.file_type().at(entry.path())?;
            if ft.is_symlink() {
                return Err(link_refused(&entry.path()));
            } else if ft.is_dir() {
                stack.push(child);
            } else if ft.is_file() {
                out.push(child);
            } else {
                return Err(not_regular(&entry.path(), &ft));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Takes ownership of the hidden build folder beside `out`, clearing one left by a dead run.
fn claim_partial(out: &Path, mode: u32) -> Result<(PathBuf, DirLock)> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::checkpoint(out, "destination has no folder name"))?
        .to_string_lossy()
        .into_owned();
    let partial = parent_of(out).join(format!(".{name}.rrome-partial"));
    for _ in 0..2 {
        match fs::create_dir(&partial) {
            Ok(()) => {
                let lock = lock_exclusive(&model_lock_path(&partial), mode)?;
                return Ok((partial, lock));
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                // Held by a live writer: Locked. Otherwise a dead run's leftovers: remove.
                let lock = lock_exclusive(&model_lock_path(&partial), mode)?;
                drop(lock);
                fs::remove_dir_all(&partial).at(&partial)?;
            }
            Err(e) => return Err(Error::io(&partial, e)),
        }
    }
    Err(Error::Locked { path: partial, holder: "another rrome process building the same destination".into() })
}

fn apply_to_copy(src: &Path, deltas: &[Delta], out: &Path, untouched: Untouched) -> Result<ApplyReport> {
    fs::metadata(src).at(src)?;
    if out.exists() {
        return Err(Error::io(out, std::io::Error::new(ErrorKind::AlreadyExists, "destination already exists")));
    }
    // Refuse links and special files before anything is created (checked again under the lock).
    files_to_copy(src)?;
    let mode = folder_mode(src);
    // Hold the source's lock where we can, so no in-place writer changes it mid-copy; a
    // read-only source cannot be written in place anyway.
    let _src_lock = match lock_exclusive(&model_lock_path(src), mode) {
        Ok(l) => Some(l),
        Err(Error::Io { source, .. })
            if matches!(source.kind(), ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem) =>
        {
            None
        }
        Err(e) => return Err(e),
    };
    if journal_path(src).exists() || revert_marker(src).exists() {
        return Err(Error::Integrity {
            msg: format!(
                "{} has an unfinished in-place operation; run `rrome recover {}` first",
                src.display(),
                src.display()
            ),
        });
    }
    let ckpt = Checkpoint::open(src)?;
    let mode = ckpt.file_mode();
    let plans = plan(&ckpt, deltas)?;
    let log = read_bundle(src, true)?;
    let batch = next_batch(&log);
    let mut regions = region_slots(&ckpt, &plans);
    // Files the copy may share with the source by hard link: shards no delta touches, and
    // committed undo files (rrome only ever replaces or removes those, never rewrites them).
    let edited: HashSet<PathBuf> = regions.iter().map(|r| PathBuf::from(&r.shard)).collect();
    let shareable = |rel: &Path| -> bool {
        if untouched != Untouched::HardLink {
            return false;
        }
        let name = rel.to_string_lossy();
        let untouched_shard = ckpt.shards.iter().any(|s| Path::new(&s.file) == rel) && !edited.contains(rel);
        untouched_shard || (parent_of(rel) == Path::new(STATE_DIR).join("undo") && name.ends_with(".safetensors"))
    };

    let (partial, part_lock) = claim_partial(out, mode)?;
    let result = (|| {
        let files = files_to_copy(src)?;
        let mut synced_dirs: HashSet<PathBuf> = HashSet::new();
        ensure_dir(&undo_dir(&partial), dir_mode(mode))?;
        for rel in &files {
            let from = src.join(rel);
            let to = partial.join(rel);
            let parent = parent_of(&to);
            fs::create_dir_all(&parent).at(&parent)?;
            if shareable(rel) {
                link_or_copy(&from, &to)?;
            } else {
                copy_file(&from, &to)?;
            }
            synced_dirs.insert(parent);
        }
        crash_point("copied");
        // One pass: read each region from the copied shard, compute the new bytes, hash both
        // (in parallel), write the new bytes into the copy and stream the old into its undo file.
        let upath = undo_path(&partial, batch);
        let mut shards = OpenShards::new(true);
        let (mut old, mut new) = (Vec::new(), Vec::new());
        write_undo(&upath, mode, batch, &mut regions, |i, w| {
            let p = &plans[i];
            let path = partial.join(&ckpt.shards[p.shard].file);
            let f = shards.get(&path)?;
            read_region_into(f, &path, p.offset, p.len, &mut old)?;
            let hashes = p.compute_and_hash(&old, &mut new)?;
            f.write_all_at(&new, p.offset).at(&path)?;
            w.write_all(&old).at(&upath)?;
            Ok(hashes)
        })?;
        shards.sync_all()?;
        let mut records = log.clone();
        records.extend(new_records(deltas, batch));
        write_bundle_with(&partial, &records, Some(mode), Order::Growing)?;
        for rel in &files {
            let p = partial.join(rel);
            File::open(&p).and_then(|f| f.sync_all()).at(&p)?;
        }
        synced_dirs.insert(undo_dir(&partial));
        synced_dirs.insert(partial.join(STATE_DIR));
        for d in &synced_dirs {
            fsync_dir(d)?;
        }
        fsync_dir(&partial)?;
        crash_point("copy-ready");
        if out.exists() {
            return Err(Error::io(
                out,
                std::io::Error::new(ErrorKind::AlreadyExists, "destination appeared during the write"),
            ));
        }
        fs::rename(&partial, out).at(out)?;
        fsync_dir(&parent_of(out))
    })();
    drop(part_lock);
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&partial);
        return Err(e);
    }
    let log_bytes = fs::metadata(out.join(EDITS_FILE)).map(|m| m.len()).unwrap_or(0)
        + fs::metadata(out.join(DELTAS_FILE)).map(|m| m.len()).unwrap_or(0)
        + fs::metadata(undo_path(out, batch)).map(|m| m.len()).unwrap_or(0);
    Ok(report(out, batch, &regions, log_bytes))
}

/// A description of a model folder: shards, tensors, edit log and pending state, as JSON.
pub fn inspect(dir: &Path) -> Result<Value> {
    inspect_with(dir, true)
}

/// [`inspect`], listing every tensor only when `tensors` is set (a checkpoint may hold
/// hundreds of thousands); the count of tensors per dtype is always there.
pub fn inspect_with(dir: &Path, tensors: bool) -> Result<Value> {
    let ckpt = Checkpoint::open(dir)?;
    let log = read_bundle(dir, true)?;
    let shards: Vec<Value> = ckpt
        .shards
        .iter()
        .map(|s| json!({"file": s.file, "bytes": s.len, "tensors": s.header.tensors.len()}))
        .collect();
    let mut dtypes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut listed = Vec::new();
    for s in &ckpt.shards {
        for t in &s.header.tensors {
            *dtypes.entry(t.dtype.as_str()).or_default() += 1;
            if tensors {
                listed.push(json!({"name": t.name, "dtype": t.dtype.as_str(), "shape": t.shape, "shard": s.file}));
            }
        }
    }
    let edits: Vec<Value> = log
        .iter()
        .map(|r| {
            json!({
                "id": r.id, "batch": r.batch, "applied_at": r.applied_at, "tensor": r.delta.tensor,
                "layout": r.delta.layout.as_str(), "scale": r.delta.scale, "d_in": r.delta.d_in(),
                "d_out": r.delta.d_out(), "meta": r.delta.meta,
                "undo": r.batch.map(|b| undo_path(dir, b).exists()),
            })
        })
        .collect();
    let mut pending = Vec::new();
    if journal_path(dir).exists() {
        pending.push("an in-place write was interrupted (journal present); run `rrome recover`");
    }
    if revert_marker(dir).exists() {
        pending.push("a revert was interrupted; run `rrome recover`");
    }
    Ok(json!({
        "model_dir": dir.display().to_string(),
        "indexed": ckpt.indexed,
        "shards": shards,
        "num_tensors": ckpt.num_tensors(),
        "dtypes": dtypes,
        "tensors": if tensors { Value::Array(listed) } else { Value::Null },
        "edits": edits,
        "pending": pending,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deltas::Layout;
    use crate::dtype::Dtype;
    use crate::fsutil::SYNCED_DIRS;
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
