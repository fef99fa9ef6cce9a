//! Applying a batch to a copy (`out_dir`): built in a hidden sibling of the destination and
//! renamed into place, so the destination is complete or absent.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::batch::{folder_mode, new_records, next_batch, refuse_repeat, report, ApplyOptions, ApplyReport, Untouched};
use super::plan::{plan, region_slots, OpenShards, Plan};
use super::undo::revert_marker;
use crate::checkpoint::{hf_cache_repo, Checkpoint};
use crate::deltas::{read_bundle, write_bundle_with, Delta, Order, DELTAS_FILE, EDITS_FILE};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{
    copy_file, crash_point, dir_mode, ensure_dir, fsync_dir, link_or_copy, link_refused, not_regular, parent_of,
};
use crate::journal::{journal_path, read_region_into, undo_dir, undo_path, write_undo, Region};
use crate::lock::{lock_exclusive, model_lock_path, DirLock, STATE_DIR};

/// Ending of the hidden folder a copy is built in (`.NAME.rrome-partial` beside `NAME`).
const PARTIAL_SUFFIX: &str = ".rrome-partial";

/// Refuses a destination inside the source folder (or the folder itself): the copy would be
/// built inside what it copies, and a later copy of the source would carry it along.
fn refuse_nested(src: &Path, out: &Path) -> Result<()> {
    let src_real = fs::canonicalize(src).at(src)?;
    let parent = parent_of(out);
    let parent_real = fs::canonicalize(&parent).at(&parent)?;
    if parent_real.starts_with(&src_real) {
        return Err(Error::checkpoint(
            out,
            format!("is inside the model folder {}; write the copy outside it", src.display()),
        ));
    }
    Ok(())
}

/// One file a copy carries over: where it goes (relative to the folder) and where its bytes are
/// read (the entry itself, or for a link of a Hugging Face cache snapshot, the blob it names).
struct SourceFile {
    rel: PathBuf,
    from: PathBuf,
}

/// The blob a link of a cache snapshot names, if it is a regular file inside the snapshot's own
/// cache repository `repo` (`<repo>/blobs/...`); `None` for any other link.
fn cache_blob(link: &Path, repo: &Path) -> Option<PathBuf> {
    let target = fs::canonicalize(link).ok()?;
    let regular = fs::metadata(&target).ok()?.is_file();
    (regular && target.starts_with(repo.join("blobs"))).then_some(target)
}

/// Files of a model folder that a copy carries over (everything but locks, journals and
/// temporary files). Links are never followed: a folder holding one (`docs -> ../secret`,
/// `loop -> .`) is refused, as is a FIFO, socket or device; the one exception is a snapshot of
/// the Hugging Face cache ([`hf_cache_repo`]), whose links into its own repository's blobs are
/// copied as the blobs they name (any other link there is refused too).
fn files_to_copy(src: &Path) -> Result<Vec<SourceFile>> {
    let repo = hf_cache_repo(src);
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = src.join(&rel);
        for entry in fs::read_dir(&abs).at(&abs)? {
            let entry = entry.at(&abs)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = rel.join(&name);
            if name.contains(".rrome-tmp-") || (name.starts_with('.') && name.ends_with(PARTIAL_SUFFIX)) {
                continue; // leftovers of interrupted writes, never part of a model
            }
            if rel == Path::new(STATE_DIR) && matches!(name.as_str(), "lock" | "journal.safetensors" | "revert.json") {
                continue;
            }
            // The entry itself, not what a link points to.
            let ft = entry.file_type().at(entry.path())?;
            if ft.is_symlink() {
                match repo.as_deref().and_then(|r| cache_blob(&entry.path(), r)) {
                    Some(blob) => out.push(SourceFile { rel: child, from: blob }),
                    None => return Err(link_refused(&entry.path())),
                }
            } else if ft.is_dir() {
                stack.push(child);
            } else if ft.is_file() {
                out.push(SourceFile { from: src.join(&child), rel: child });
            } else {
                return Err(not_regular(&entry.path(), &ft));
            }
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// Takes ownership of the hidden build folder beside `out`, clearing one left by a dead run.
fn claim_partial(out: &Path, mode: u32) -> Result<(PathBuf, DirLock)> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::checkpoint(out, "destination has no folder name"))?
        .to_string_lossy()
        .into_owned();
    let partial = parent_of(out).join(format!(".{name}{PARTIAL_SUFFIX}"));
    for _ in 0..2 {
        match fs::create_dir(&partial) {
            Ok(()) => {
                return match lock_exclusive(&model_lock_path(&partial), mode) {
                    Ok(lock) => Ok((partial, lock)),
                    Err(e) => {
                        // Out of space or quota for the lock: leave nothing behind.
                        let _ = fs::remove_dir_all(&partial);
                        Err(e)
                    }
                };
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

/// Takes the source's lock where it can, so no in-place writer changes it mid-copy (a
/// read-only source cannot be written in place anyway), and refuses a source with an
/// unfinished in-place operation.
fn lock_source(src: &Path, mode: u32) -> Result<Option<DirLock>> {
    // A cache snapshot is never written in place, so it needs no lock, and rrome creates nothing
    // inside the cache.
    let lock = if hf_cache_repo(src).is_some() { None } else { lock_source_folder(src, mode)? };
    if journal_path(src).exists() || revert_marker(src).exists() {
        return Err(Error::Integrity {
            msg: format!(
                "{} has an unfinished in-place operation; run `rrome recover {}` first",
                src.display(),
                src.display()
            ),
        });
    }
    Ok(lock)
}

/// The source's lock, or `None` where it cannot be taken because the folder is read-only.
fn lock_source_folder(src: &Path, mode: u32) -> Result<Option<DirLock>> {
    match lock_exclusive(&model_lock_path(src), mode) {
        Ok(l) => Ok(Some(l)),
        Err(Error::Io { source, .. })
            if matches!(source.kind(), ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Which files the copy may share with the source by hard link: shards no delta touches, and
/// committed undo files (rrome only ever replaces or removes those, never rewrites them).
struct Linkable {
    hard_link: bool,
    untouched_shards: HashSet<PathBuf>,
}

impl Linkable {
    fn new(ckpt: &Checkpoint, regions: &[Region], untouched: Untouched) -> Linkable {
        let edited: HashSet<PathBuf> = regions.iter().map(|r| PathBuf::from(&r.shard)).collect();
        let untouched_shards =
            ckpt.shards.iter().map(|s| PathBuf::from(&s.file)).filter(|f| !edited.contains(f)).collect();
        Linkable { hard_link: untouched == Untouched::HardLink, untouched_shards }
    }

    /// Whether the file at `rel` (relative to the folder) may be a hard link.
    fn allows(&self, rel: &Path) -> bool {
        if !self.hard_link {
            return false;
        }
        let undo_file =
            parent_of(rel) == Path::new(STATE_DIR).join("undo") && rel.to_string_lossy().ends_with(".safetensors");
        self.untouched_shards.contains(rel) || undo_file
    }
}

/// Copies (or links, where `linkable` allows) `files` of `src` into `partial`; returns the
/// folders whose entries changed.
fn copy_files(partial: &Path, files: &[SourceFile], linkable: &Linkable) -> Result<HashSet<PathBuf>> {
    let mut dirs = HashSet::new();
    for SourceFile { rel, from } in files {
        let to = partial.join(rel);
        let parent = parent_of(&to);
        fs::create_dir_all(&parent).at(&parent)?;
        if linkable.allows(rel) {
            link_or_copy(from, &to)?;
        } else {
            copy_file(from, &to)?;
        }
        dirs.insert(parent);
    }
    Ok(dirs)
}

/// One pass over the copied shards: read each region, compute the new bytes, hash both (in
/// parallel), write the new bytes into the copy and stream the old into its undo file; then
/// flush the shards.
fn patch_copy(
    partial: &Path,
    ckpt: &Checkpoint,
    plans: &[Plan],
    regions: &mut [Region],
    batch: u64,
    mode: u32,
) -> Result<()> {
    let upath = undo_path(partial, batch);
    let mut shards = OpenShards::new(true);
    let (mut old, mut new) = (Vec::new(), Vec::new());
    write_undo(&upath, mode, batch, regions, |i, w| {
        let p = &plans[i];
        let path = partial.join(&ckpt.shards[p.shard].file);
        let f = shards.get(&path)?;
        read_region_into(f, &path, p.offset, p.len, &mut old)?;
        let hashes = p.compute_and_hash(&old, &mut new)?;
        f.write_all_at(&new, p.offset).at(&path)?;
        w.write_all(&old).at(&upath)?;
        Ok(hashes)
    })?;
    shards.sync_all()
}

/// Flushes the copied `files` and every folder of the build, then renames it to `out`.
fn publish(partial: &Path, out: &Path, files: &[SourceFile], mut dirs: HashSet<PathBuf>) -> Result<()> {
    for f in files {
        let p = partial.join(&f.rel);
        File::open(&p).and_then(|f| f.sync_all()).at(&p)?;
    }
    dirs.insert(undo_dir(partial));
    dirs.insert(partial.join(STATE_DIR));
    for d in &dirs {
        fsync_dir(d)?;
    }
    fsync_dir(partial)?;
    crash_point("copy-ready");
    if out.exists() {
        return Err(Error::io(
            out,
            std::io::Error::new(ErrorKind::AlreadyExists, "destination appeared during the write"),
        ));
    }
    fs::rename(partial, out).at(out)?;
    fsync_dir(&parent_of(out))
}

pub(super) fn apply_to_copy(src: &Path, deltas: &[Delta], out: &Path, options: ApplyOptions) -> Result<ApplyReport> {
    fs::metadata(src).at(src)?;
    if out.exists() {
        return Err(Error::io(out, std::io::Error::new(ErrorKind::AlreadyExists, "destination already exists")));
    }
    refuse_nested(src, out)?;
    // Refuse links and special files before anything is created (checked again under the lock).
    files_to_copy(src)?;
    let _src_lock = lock_source(src, folder_mode(src))?;
    let ckpt = Checkpoint::open(src)?;
    let mode = ckpt.file_mode();
    let plans = plan(&ckpt, deltas)?;
    let log = read_bundle(src, true)?;
    let batch = next_batch(src, &log)?;
    refuse_repeat(src, &log, deltas, options.again)?;
    let mut regions = region_slots(&ckpt, &plans);
    let linkable = Linkable::new(&ckpt, &regions, options.untouched);

    let (partial, part_lock) = claim_partial(out, mode)?;
    let result = (|| {
        let files = files_to_copy(src)?;
        ensure_dir(&undo_dir(&partial), dir_mode(mode))?;
        let dirs = copy_files(&partial, &files, &linkable)?;
        crash_point("copied");
        patch_copy(&partial, &ckpt, &plans, &mut regions, batch, mode)?;
        let mut records = log.clone();
        records.extend(new_records(deltas, batch));
        write_bundle_with(&partial, &records, Some(mode), Order::Growing)?;
        publish(&partial, out, &files, dirs)
    })();
    drop(part_lock);
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&partial);
        return Err(e);
    }
    let log_bytes = fs::metadata(out.join(EDITS_FILE)).map(|m| m.len()).unwrap_or(0)
        + fs::metadata(out.join(DELTAS_FILE)).map(|m| m.len()).unwrap_or(0)
        + fs::metadata(undo_path(out, batch)).map(|m| m.len()).unwrap_or(0);
    Ok(report(out, batch, deltas.len(), &regions, log_bytes))
}
