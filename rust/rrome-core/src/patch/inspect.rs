//! A read-only description of a model folder: shards, tensors, edit log and pending state.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::revert::revert_marker;
use crate::checkpoint::Checkpoint;
use crate::deltas::read_bundle;
use crate::error::Result;
use crate::journal::{journal_path, undo_path};

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
