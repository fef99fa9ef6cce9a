//! Rank-one deltas and the file pair that stores them.
//!
//! A [`Delta`] means W_math += scale · r uᵀ, where W_math is the d_out × d_in matrix the module
//! applies (y = W_math x). Its [`Layout`] says how the tensor stores W_math: `out_in` (torch
//! `nn.Linear`, shape [d_out, d_in]) or `in_out` (GPT-2's `Conv1D`, shape [d_in, d_out]).
//!
//! A set of deltas is stored as two files in one folder (a "deltas bundle"):
//! - `rrome_edits.jsonl`: one JSON object per delta, in application order:
//!   `{"id", "tensor", "layout", "scale", "d_in", "d_out"}` plus optional `"batch"`,
//!   `"applied_at"` (set in a model's edit log) and `"meta"` (any JSON object: the edit
//!   request, method, diagnostics).
//! - `rrome_deltas.safetensors`: F32 tensors `<id>.u` (shape `[d_in]`) and `<id>.r` (`[d_out]`),
//!   and, for a record that has them, `<id>.k` (`[d_in]`): the key the edit wrote at (k_den),
//!   which later edits of the same tensor retain, and `<id>.k_other` (`[d_in]`): the edit's other
//!   key (the plain prompt's k_e^o under r-rome), retained beside it with `retain_both_keys`.
//!   Files without keys (written before keys were recorded) read as deltas without keys; readers
//!   that predate keys ignore the extra tensors, so the format tag is unchanged.
//!
//! A model folder's edit log is a bundle of the same format kept inside the model folder: every
//! applied batch appends its records there, which is what `revert` and `inspect` read.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::fsutil::{atomic_write_mode, crash_point, open_read, read_file};
use crate::safetensors_header::{self, TensorData};

/// File name of the JSON-lines half of a bundle.
pub const EDITS_FILE: &str = "rrome_edits.jsonl";
/// File name of the tensor half of a bundle.
pub const DELTAS_FILE: &str = "rrome_deltas.safetensors";
/// Format tag of the tensor half.
pub const DELTAS_FORMAT: &str = "rrome-deltas/1";

/// How a weight tensor stores W_math.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Shape [d_out, d_in] (torch `nn.Linear`).
    OutIn,
    /// Shape [d_in, d_out] (GPT-2 `Conv1D`).
    InOut,
}

impl Layout {
    /// Parses `"out_in"` or `"in_out"`.
    pub fn parse(s: &str) -> Option<Layout> {
        match s {
            "out_in" => Some(Layout::OutIn),
            "in_out" => Some(Layout::InOut),
            _ => None,
        }
    }

    /// The spelling used in files and in Python.
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::OutIn => "out_in",
            Layout::InOut => "in_out",
        }
    }

    /// The stored shape of a d_out × d_in matrix.
    pub fn stored_shape(self, d_out: usize, d_in: usize) -> [usize; 2] {
        match self {
            Layout::OutIn => [d_out, d_in],
            Layout::InOut => [d_in, d_out],
        }
    }
}

/// One rank-one update W_math += scale · r uᵀ of one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    /// Safetensors name of the weight, e.g. `model.layers.6.mlp.down_proj.weight`.
    pub tensor: String,
    /// Input-side factor, length d_in.
    pub u: Vec<f32>,
    /// Output-side factor, length d_out.
    pub r: Vec<f32>,
    /// Storage layout of the tensor.
    pub layout: Layout,
    /// Scalar factor; applied in f32 as (scale · r) uᵀ.
    pub scale: f64,
    /// Free-form JSON object carried into the edit log (edit request, method, diagnostics).
    pub meta: Option<Map<String, Value>>,
    /// The key the edit wrote at (k_den), length d_in, if recorded: what later edits retain.
    pub key: Option<Vec<f32>>,
    /// The edit's other key (k_e^o when it wrote at k_e, and the reverse), length d_in, if
    /// recorded; only beside `key`.
    pub other_key: Option<Vec<f32>>,
}

impl Delta {
    /// d_in = len(u).
    pub fn d_in(&self) -> usize {
        self.u.len()
    }

    /// d_out = len(r).
    pub fn d_out(&self) -> usize {
        self.r.len()
    }

    /// Checks that all numbers are finite and both factors non-empty; `what` prefixes messages.
    pub fn check_finite(&self, what: &str) -> Result<()> {
        match self.not_finite() {
            Some(msg) => Err(Error::Delta { msg: format!("{what}: {msg}") }),
            None => Ok(()),
        }
    }

    /// What [`Delta::check_finite`] refuses, in words: an empty factor, a scale that is not
    /// finite in f32, the first number of `u` or `r` that is not finite, a key whose length is
    /// not d_in or that holds a number that is not finite, or an other key without a key.
    pub fn not_finite(&self) -> Option<String> {
        if self.u.is_empty() || self.r.is_empty() {
            return Some("u and r must not be empty".into());
        }
        if !(self.scale as f32).is_finite() {
            return Some(format!("scale is {} (must be finite in float32)", self.scale));
        }
        if let Some(i) = self.u.iter().position(|v| !v.is_finite()) {
            return Some(format!("u[{i}] is {}", self.u[i]));
        }
        if let Some(i) = self.r.iter().position(|v| !v.is_finite()) {
            return Some(format!("r[{i}] is {}", self.r[i]));
        }
        if self.other_key.is_some() && self.key.is_none() {
            return Some("other_key is recorded without key".into());
        }
        for (name, k) in [("key", &self.key), ("other_key", &self.other_key)] {
            let Some(k) = k else { continue };
            if k.len() != self.u.len() {
                return Some(format!("{name} has {} values; expected d_in = {}", k.len(), self.u.len()));
            }
            if let Some(i) = k.iter().position(|v| !v.is_finite()) {
                return Some(format!("{name}[{i}] is {}", k[i]));
            }
        }
        None
    }
}

/// A delta as recorded in a bundle: the delta plus its record fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Unique id within the bundle; names the tensors `<id>.u` and `<id>.r`.
    pub id: String,
    /// Batch number in a model's edit log (absent in a plain bundle).
    pub batch: Option<u64>,
    /// Unix time the batch was applied (edit log only).
    pub applied_at: Option<f64>,
    /// Line of `rrome_edits.jsonl` the record was read from (1-based; 0 for a record built
    /// in memory).
    pub line: usize,
    /// The delta itself.
    pub delta: Delta,
}

/// Resolves a bundle argument: a folder holding both files, or the path of either file
/// (named `rrome_edits.jsonl` or `rrome_deltas.safetensors`).
///
/// # Errors
/// [`Error::Io`] (not found) for a path that is neither: a mistyped folder must not fall back
/// to the bundle of the folder above it.
pub fn bundle_paths(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let named = path.file_name().is_some_and(|n| n == EDITS_FILE || n == DELTAS_FILE);
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else if named {
        crate::fsutil::parent_of(path)
    } else {
        let why = if path.exists() {
            format!("is neither a deltas bundle folder nor a file named {EDITS_FILE} or {DELTAS_FILE}")
        } else {
            "no such deltas bundle (a folder holding rrome_edits.jsonl, or that file)".to_string()
        };
        let kind = if path.exists() { std::io::ErrorKind::InvalidInput } else { std::io::ErrorKind::NotFound };
        return Err(Error::io(path, std::io::Error::new(kind, why)));
    };
    Ok((dir.join(EDITS_FILE), dir.join(DELTAS_FILE)))
}

/// Reads a bundle (folder or either file). With `allow_missing` (a model's edit log), a
/// folder without `rrome_edits.jsonl` is an empty log: the JSON lines are the commit point,
/// so a tensor file without them is the leftover of an interrupted first write. Otherwise a
/// missing file is an I/O error naming it.
pub fn read_bundle(path: &Path, allow_missing: bool) -> Result<Vec<Record>> {
    let (edits, tensors) = bundle_paths(path)?;
    if allow_missing && !edits.exists() {
        return Ok(Vec::new());
    }
    let text = read_file(&edits)?;
    let factors = Factors::read(&tensors)?;
    let ename = edits.display().to_string();
    let text =
        std::str::from_utf8(&text).map_err(|e| Error::DeltasFile { msg: format!("{ename}: not valid UTF-8 ({e})") })?;
    let mut out = Vec::new();
    let mut ids = HashSet::new();
    for (lineno, line) in text.lines().enumerate() {
        let lineno = lineno + 1;
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_line(line, &format!("{ename}:{lineno}"), lineno, &factors, &mut ids)?);
    }
    Ok(out)
}

/// Longest factor a record may declare (2^24 values, 64 MiB in F32): wider than any model's
/// module, and small enough that a planted `d_in` cannot ask for more memory than a machine has.
pub const MAX_FACTOR_LEN: usize = 1 << 24;

/// The tensor half of a bundle: its validated header and the open file. Only the byte ranges
/// that records name are read (a sparse file may claim any size; nothing else of it is read).
struct Factors {
    path: PathBuf,
    header: safetensors_header::Header,
    file: std::fs::File,
}

impl Factors {
    fn read(path: &Path) -> Result<Factors> {
        let mut file = open_read(path)?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let header = safetensors_header::Header::read_from(&mut file, len, path)?;
        if header.meta("format") != Some(DELTAS_FORMAT) {
            return Err(Error::DeltasFile {
                msg: format!(
                    "{}: not an rrome deltas file (format {:?}, expected {DELTAS_FORMAT:?})",
                    path.display(),
                    header.meta("format")
                ),
            });
        }
        Ok(Factors { path: path.to_path_buf(), header, file })
    }

    /// Whether the file holds a tensor `<id>.<suffix>`.
    fn has(&self, id: &str, suffix: &str) -> bool {
        self.header.get(&format!("{id}.{suffix}")).is_some()
    }

    /// The F32 vector `<id>.<suffix>`, which must have `len` values.
    fn vector(&self, id: &str, suffix: &str, len: usize) -> std::result::Result<Vec<f32>, String> {
        let name = format!("{id}.{suffix}");
        let t =
            self.header.get(&name).ok_or_else(|| format!("tensor {name:?} is missing from {}", self.path.display()))?;
        if t.dtype != Dtype::F32 || t.shape != [len] {
            return Err(format!("tensor {name:?} is {} {:?}; expected F32 [{len}]", t.dtype, t.shape));
        }
        let bytes = safetensors_header::read_range(&self.file, &self.path, self.header.abs_offset(t), t.nbytes())
            .map_err(|e| e.to_string())?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// Parses line `lineno` of `rrome_edits.jsonl` (`at` is `FILE:LINE`, prefixed to every message)
/// into a record, with its factors from `factors`; `ids` holds the ids of the lines before.
fn parse_line(line: &str, at: &str, lineno: usize, factors: &Factors, ids: &mut HashSet<String>) -> Result<Record> {
    let fail = |msg: String| Error::DeltasFile { msg: format!("{at}: {msg}") };
    let v: Value = serde_json::from_str(line).map_err(|e| fail(format!("not valid JSON ({e})")))?;
    let obj = v.as_object().ok_or_else(|| fail("expected a JSON object".into()))?;
    let field_str = |k: &str| -> Result<String> {
        obj.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| fail(format!("field {k:?}: expected a non-empty string")))
    };
    let field_uint = |k: &str| -> Result<u64> {
        obj.get(k).and_then(Value::as_u64).ok_or_else(|| fail(format!("field {k:?}: expected a non-negative integer")))
    };
    let id = field_str("id")?;
    if !ids.insert(id.clone()) {
        return Err(fail(format!("field \"id\": {id:?} appears twice")));
    }
    let tensor = field_str("tensor")?;
    let layout_s = field_str("layout")?;
    let layout = Layout::parse(&layout_s)
        .ok_or_else(|| fail(format!("field \"layout\": expected \"out_in\" or \"in_out\", got {layout_s:?}")))?;
    let scale = match obj.get("scale") {
        None => 1.0,
        Some(s) => s.as_f64().ok_or_else(|| fail("field \"scale\": expected a number".into()))?,
    };
    let width = |k: &str| -> Result<usize> {
        let n = field_uint(k)?;
        usize::try_from(n).ok().filter(|&n| n <= MAX_FACTOR_LEN).ok_or_else(|| {
            fail(format!("field {k:?}: {n} is wider than any module rrome edits (at most {MAX_FACTOR_LEN})"))
        })
    };
    let d_in = width("d_in")?;
    let d_out = width("d_out")?;
    let batch = match obj.get("batch") {
        None => None,
        Some(_) => Some(field_uint("batch")?),
    };
    let applied_at = obj.get("applied_at").and_then(Value::as_f64);
    let meta = match obj.get("meta") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => return Err(fail("field \"meta\": expected a JSON object".into())),
    };
    let u = factors.vector(&id, "u", d_in).map_err(fail)?;
    let r = factors.vector(&id, "r", d_out).map_err(fail)?;
    let optional = |suffix: &str| -> Result<Option<Vec<f32>>> {
        if factors.has(&id, suffix) {
            Ok(Some(factors.vector(&id, suffix, d_in).map_err(fail)?))
        } else {
            Ok(None)
        }
    };
    let (key, other_key) = (optional("k")?, optional("k_other")?);
    let delta = Delta { tensor, u, r, layout, scale, meta, key, other_key };
    delta.check_finite(at)?;
    Ok(Record { id, batch, applied_at, line: lineno, delta })
}

/// The JSON line of a record.
pub fn record_line(rec: &Record) -> String {
    let d = &rec.delta;
    let mut obj = Map::new();
    obj.insert("id".into(), json!(rec.id));
    if let Some(b) = rec.batch {
        obj.insert("batch".into(), json!(b));
    }
    if let Some(t) = rec.applied_at {
        obj.insert("applied_at".into(), json!(t));
    }
    obj.insert("tensor".into(), json!(d.tensor));
    obj.insert("layout".into(), json!(d.layout.as_str()));
    obj.insert("scale".into(), json!(d.scale));
    obj.insert("d_in".into(), json!(d.d_in()));
    obj.insert("d_out".into(), json!(d.d_out()));
    if let Some(m) = &d.meta {
        obj.insert("meta".into(), Value::Object(m.clone()));
    }
    Value::Object(obj).to_string()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Which file of a bundle is replaced first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The tensors first, then the JSON lines (the commit point): for a record set that grows
    /// or is new, so a reader that sees a record also finds its tensors.
    Growing,
    /// The JSON lines first: for a record set that shrinks (revert, rollback), so that after a
    /// crash between the two renames the old tensor file still holds every record listed.
    Shrinking,
}

/// Writes a bundle into folder `dir`. Each file is replaced atomically, in the given
/// [`Order`], and gets exactly `mode` when it is `Some` (the umask's default otherwise).
pub fn write_bundle_with(dir: &Path, records: &[Record], mode: Option<u32>, order: Order) -> Result<()> {
    let mut seen = HashSet::new();
    for r in records {
        if !seen.insert(r.id.as_str()) {
            return Err(Error::Delta { msg: format!("delta id {:?} appears twice", r.id) });
        }
        // A key that could not be read back must not be written (the factors are the caller's
        // to check; a key has no other check on the way in).
        if r.delta.other_key.is_some() && r.delta.key.is_none() {
            return Err(Error::Delta { msg: format!("delta {:?}: other_key is recorded without key", r.id) });
        }
        for (name, k) in [("key", &r.delta.key), ("other_key", &r.delta.other_key)] {
            let Some(k) = k else { continue };
            if k.len() != r.delta.d_in() || !k.iter().all(|v| v.is_finite()) {
                return Err(Error::Delta {
                    msg: format!("delta {:?}: its {name} must be d_in = {} finite numbers", r.id, r.delta.d_in()),
                });
            }
        }
    }
    // Each record's vectors as (name, length, bytes): u, r, and the keys where there are some.
    let vectors: Vec<Vec<(String, usize, Vec<u8>)>> = records
        .iter()
        .map(|r| {
            let d = &r.delta;
            let mut v = vec![
                (format!("{}.u", r.id), d.d_in(), f32_bytes(&d.u)),
                (format!("{}.r", r.id), d.d_out(), f32_bytes(&d.r)),
            ];
            for (suffix, k) in [("k", &d.key), ("k_other", &d.other_key)] {
                if let Some(k) = k {
                    v.push((format!("{}.{suffix}", r.id), k.len(), f32_bytes(k)));
                }
            }
            v
        })
        .collect();
    let tensors: Vec<TensorData<'_>> = vectors
        .iter()
        .flatten()
        .map(|(name, len, data)| TensorData { name, dtype: Dtype::F32, shape: vec![*len], data })
        .collect();
    let meta = vec![("format".to_string(), DELTAS_FORMAT.to_string())];
    let write_tensors =
        || atomic_write_mode(&dir.join(DELTAS_FILE), mode, |w| safetensors_header::write(w, &tensors, &meta));
    let write_lines = || {
        atomic_write_mode(&dir.join(EDITS_FILE), mode, |w| {
            for r in records {
                writeln!(w, "{}", record_line(r))?;
            }
            Ok(())
        })
    };
    match order {
        Order::Growing => {
            write_tensors()?;
            write_lines()
        }
        Order::Shrinking => {
            write_lines()?;
            crash_point("log-shrunk");
            write_tensors()
        }
    }
}

/// Writes a new or growing bundle into folder `dir` (see [`write_bundle_with`]).
pub fn write_bundle(dir: &Path, records: &[Record]) -> Result<()> {
    write_bundle_with(dir, records, None, Order::Growing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn delta(t: &str) -> Delta {
        Delta {
            tensor: t.into(),
            u: vec![1.0, 2.0, 3.0],
            r: vec![0.5, -1.0],
            layout: Layout::InOut,
            scale: 2.0,
            meta: None,
            key: None,
            other_key: None,
        }
    }

    #[test]
    fn bundle_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut meta = Map::new();
        meta.insert("method".into(), json!("r-rome"));
        let recs = vec![
            Record {
                id: "a".into(),
                batch: None,
                applied_at: None,
                line: 1,
                delta: Delta { meta: Some(meta), ..delta("w1") },
            },
            Record { id: "b".into(), batch: Some(3), applied_at: Some(12.5), line: 2, delta: delta("w2") },
        ];
        write_bundle(dir.path(), &recs).unwrap();
        assert_eq!(read_bundle(dir.path(), false).unwrap(), recs);
        assert_eq!(read_bundle(&dir.path().join(EDITS_FILE), false).unwrap(), recs);
    }

    #[test]
    fn bad_lines_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        write_bundle(
            dir.path(),
            &[Record { id: "a".into(), batch: None, applied_at: None, line: 0, delta: delta("w") }],
        )
        .unwrap();
        let edits = dir.path().join(EDITS_FILE);
        let good = fs::read_to_string(&edits).unwrap();
        for (bad, want) in [
            ("{not json", ":2: not valid JSON"),
            (r#"{"id":"a","tensor":"w","layout":"in_out","d_in":3,"d_out":2}"#, "appears twice"),
            (r#"{"id":"c","tensor":"w","layout":"sideways","d_in":3,"d_out":2}"#, "field \"layout\""),
            (r#"{"id":"c","tensor":"","layout":"in_out","d_in":3,"d_out":2}"#, "field \"tensor\""),
            (r#"{"id":"c","tensor":"w","layout":"in_out","d_in":3,"d_out":2}"#, "\"c.u\" is missing"),
            (r#"{"id":"a2","tensor":"w","layout":"in_out","d_in":-1,"d_out":2}"#, "field \"d_in\""),
        ] {
            fs::write(&edits, format!("{good}{bad}\n")).unwrap();
            let err = read_bundle(dir.path(), false).unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
            assert!(err.contains("rrome_edits.jsonl:"), "{err}");
        }
    }

    #[test]
    fn keys_round_trip_where_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let keyed = Delta { key: Some(vec![0.25, -4.0, 1e-3]), ..delta("w") };
        let both = Delta { other_key: Some(vec![7.0, 0.0, -2.5]), ..keyed.clone() };
        let recs = vec![
            Record { id: "a".into(), batch: Some(1), applied_at: None, line: 1, delta: keyed },
            Record { id: "b".into(), batch: Some(1), applied_at: None, line: 2, delta: delta("w") },
            Record { id: "c".into(), batch: Some(2), applied_at: None, line: 3, delta: both },
        ];
        write_bundle(dir.path(), &recs).unwrap();
        let back = read_bundle(dir.path(), false).unwrap();
        assert_eq!(back, recs);
        assert_eq!(back[0].delta.key.as_deref(), Some(&[0.25, -4.0, 1e-3][..]));
        assert_eq!((&back[0].delta.other_key, &back[1].delta.key), (&None, &None));
        assert_eq!(back[2].delta.other_key.as_deref(), Some(&[7.0, 0.0, -2.5][..]));
        let (header, _) = safetensors_header::read_all(&dir.path().join(DELTAS_FILE)).unwrap();
        assert_eq!(header.meta("format"), Some(DELTAS_FORMAT));
        assert!(header.get("a.k").is_some() && header.get("b.k").is_none());
        assert!(header.get("c.k_other").is_some() && header.get("a.k_other").is_none());
    }

    /// Writes the tensor half of a one-record bundle by hand, as a file from elsewhere may hold
    /// it: `a.u` = [1, 2, 3] and `a.r` = [0.5, -1], then each `(name, values)` of `extra`.
    fn write_tensor_half(dir: &Path, extra: &[(&str, &[f32])]) {
        let mut named: Vec<(&str, Vec<u8>, usize)> =
            vec![("a.u", f32_bytes(&[1.0, 2.0, 3.0]), 3), ("a.r", f32_bytes(&[0.5, -1.0]), 2)];
        named.extend(extra.iter().map(|(name, v)| (*name, f32_bytes(v), v.len())));
        let tensors: Vec<TensorData<'_>> = named
            .iter()
            .map(|(name, data, len)| TensorData { name, dtype: Dtype::F32, shape: vec![*len], data })
            .collect();
        let meta = vec![("format".to_string(), DELTAS_FORMAT.to_string())];
        let mut f = fs::File::create(dir.join(DELTAS_FILE)).unwrap();
        safetensors_header::write(&mut f, &tensors, &meta).unwrap();
    }

    #[test]
    fn a_file_without_keys_reads_as_deltas_without_keys() {
        // The tensor half as rrome wrote it before keys were recorded: u and r only.
        let dir = tempfile::tempdir().unwrap();
        write_tensor_half(dir.path(), &[]);
        fs::write(
            dir.path().join(EDITS_FILE),
            r#"{"id":"a","tensor":"w","layout":"in_out","scale":2.0,"d_in":3,"d_out":2}"#.to_string() + "\n",
        )
        .unwrap();
        let back = read_bundle(dir.path(), false).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].delta, delta("w"));
    }

    #[test]
    fn bad_keys_are_refused_when_read_and_written() {
        let dir = tempfile::tempdir().unwrap();
        // A key of another length in the file: the record's line and the tensor are named.
        write_tensor_half(dir.path(), &[("a.k", &[1.0, 2.0])]);
        fs::write(
            dir.path().join(EDITS_FILE),
            "{\"id\":\"a\",\"tensor\":\"w\",\"layout\":\"in_out\",\"d_in\":3,\"d_out\":2}\n",
        )
        .unwrap();
        let err = read_bundle(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("rrome_edits.jsonl:1:") && err.contains("\"a.k\"") && err.contains("[3]"), "{err}");
        // A key that is not finite, in the file or in memory.
        write_tensor_half(dir.path(), &[("a.k", &[1.0, f32::NAN, 3.0])]);
        let err = read_bundle(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("rrome_edits.jsonl:1:") && err.contains("key[1] is NaN"), "{err}");
        for key in [vec![1.0, 2.0], vec![1.0, f32::INFINITY, 3.0]] {
            let d = Delta { key: Some(key), ..delta("w") };
            assert!(d.check_finite("x").unwrap_err().to_string().contains("key"));
            let rec = Record { id: "a".into(), batch: None, applied_at: None, line: 0, delta: d };
            let other = tempfile::tempdir().unwrap();
            let err = write_bundle(other.path(), &[rec]).unwrap_err().to_string();
            assert!(err.contains("key must be d_in = 3 finite numbers"), "{err}");
            assert!(!other.path().join(DELTAS_FILE).exists());
        }
        // The same for the other key, and an other key without the key it belongs beside.
        let keyed = || Delta { key: Some(vec![1.0; 3]), ..delta("w") };
        for (d, want) in [
            (Delta { other_key: Some(vec![1.0, 2.0]), ..keyed() }, "other_key must be d_in = 3 finite numbers"),
            (Delta { other_key: Some(vec![0.0, f32::NAN, 0.0]), ..keyed() }, "other_key must be d_in = 3"),
            (Delta { other_key: Some(vec![1.0; 3]), ..delta("w") }, "other_key is recorded without key"),
        ] {
            assert!(d.check_finite("x").unwrap_err().to_string().contains("other_key"));
            let rec = Record { id: "a".into(), batch: None, applied_at: None, line: 0, delta: d };
            let other = tempfile::tempdir().unwrap();
            let err = write_bundle(other.path(), &[rec]).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            assert!(!other.path().join(DELTAS_FILE).exists());
        }
        // In the file: an other key read without a key, named with the record's line.
        write_tensor_half(dir.path(), &[("a.k_other", &[1.0, 2.0, 3.0])]);
        let err = read_bundle(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("rrome_edits.jsonl:1:") && err.contains("other_key is recorded without key"), "{err}");
    }

    #[test]
    fn non_finite_is_rejected() {
        let mut d = delta("w");
        d.r[1] = f32::NAN;
        assert!(d.check_finite("x").unwrap_err().to_string().contains("r[1]"));
    }
}
