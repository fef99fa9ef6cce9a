//! What one batch is, apart from how it is written: its options, its number, its records in the
//! edit log, the refusal of a batch the log already holds, and the report of an apply.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::check::py_repr;
use crate::checkpoint::Checkpoint;
use crate::deltas::{Delta, Record};
use crate::error::{Error, Result};
use crate::fsutil::PRIVATE_MODE;
use crate::journal::Region;

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
