//! A read-only description of a model folder: shards, tensors, edit log and pending state.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::undo::revert_marker;
use crate::checkpoint::{Checkpoint, TensorRef};
use crate::deltas::{read_bundle, Record};
use crate::error::Result;
use crate::journal::{journal_path, undo_path};

/// What `rrome inspect` shows of a model folder: its checkpoint, its edit log and whatever
/// an interrupted write left to recover.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The checkpoint, every shard header validated.
    pub checkpoint: Checkpoint,
    /// Whether [`Inspection::tensors`] lists every tensor (a checkpoint may hold hundreds of
    /// thousands; the count per dtype is always there).
    pub list_tensors: bool,
    /// The edit log, oldest record first.
    pub edits: Vec<LogEntry>,
    /// A sentence per interrupted write that `rrome recover` would finish or roll back.
    pub pending: Vec<String>,
}

/// One record of a model folder's edit log, and whether the undo data of its batch is there.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// The record as read from the log.
    pub record: Record,
    /// Whether `.rrome/undo` holds the undo file of the record's batch (`None` for a record
    /// without a batch number).
    pub undo: Option<bool>,
}

impl Inspection {
    /// Number of tensors per dtype (as the header spells it), by dtype name.
    pub fn dtypes(&self) -> BTreeMap<&'static str, usize> {
        let mut dtypes: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &self.checkpoint.shards {
            for t in &s.header.tensors {
                *dtypes.entry(t.dtype.as_str()).or_default() += 1;
            }
        }
        dtypes
    }

    /// Every tensor, shard by shard in header order, when [`Inspection::list_tensors`] is set.
    pub fn tensors(&self) -> Option<Vec<TensorRef<'_>>> {
        self.list_tensors.then(|| self.checkpoint.tensors_in_file_order())
    }

    /// The description as JSON, as `rrome inspect --json` prints it.
    pub fn to_json(&self) -> Value {
        let shards: Vec<Value> = self
            .checkpoint
            .shards
            .iter()
            .map(|s| json!({"file": s.file, "bytes": s.len, "tensors": s.header.tensors.len()}))
            .collect();
        let tensors = self.tensors().map(|all| {
            all.iter()
                .map(|t| json!({"name": t.name, "dtype": t.dtype.as_str(), "shape": t.shape, "shard": t.shard}))
                .collect::<Vec<Value>>()
        });
        let edits: Vec<Value> = self
            .edits
            .iter()
            .map(|e| {
                let (r, d) = (&e.record, &e.record.delta);
                json!({
                    "id": r.id, "batch": r.batch, "applied_at": r.applied_at, "tensor": d.tensor,
                    "layout": d.layout.as_str(), "scale": d.scale, "d_in": d.d_in(),
                    "d_out": d.d_out(), "meta": d.meta, "undo": e.undo,
                })
            })
            .collect();
        json!({
            "model_dir": self.checkpoint.dir.display().to_string(),
            "indexed": self.checkpoint.indexed,
            "shards": shards,
            "num_tensors": self.checkpoint.num_tensors(),
            "dtypes": self.dtypes(),
            "tensors": tensors,
            "edits": edits,
            "pending": self.pending,
        })
    }
}

/// A description of a model folder, listing every tensor (see [`inspect_with`]).
///
/// # Errors
/// As [`inspect_with`].
pub fn inspect(dir: &Path) -> Result<Inspection> {
    inspect_with(dir, true)
}

/// A description of a model folder: its checkpoint (every tensor listed only when `tensors`
/// is set), its edit log and its pending state. Reads headers and the log; writes nothing.
///
/// # Errors
/// [`Error::Checkpoint`](crate::Error::Checkpoint), [`Error::Header`](crate::Error::Header)
/// or [`Error::Io`](crate::Error::Io) for a folder that is not a readable checkpoint;
/// [`Error::DeltasFile`](crate::Error::DeltasFile) for a malformed edit log.
pub fn inspect_with(dir: &Path, tensors: bool) -> Result<Inspection> {
    let checkpoint = Checkpoint::open(dir)?;
    let edits = read_bundle(dir, true)?
        .into_iter()
        .map(|record| {
            let undo = record.batch.map(|b| undo_path(dir, b).exists());
            LogEntry { record, undo }
        })
        .collect();
    let mut pending = Vec::new();
    if journal_path(dir).exists() {
        pending.push("an in-place write was interrupted (journal present); run `rrome recover`".to_string());
    }
    if revert_marker(dir).exists() {
        pending.push("a revert was interrupted; run `rrome recover`".to_string());
    }
    Ok(Inspection { checkpoint, list_tensors: tensors, edits, pending })
}
