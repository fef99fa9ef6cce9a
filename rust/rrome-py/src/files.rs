//! Bindings of the file half: checkpoints, deltas bundles and the shard writer.
//!
//! What the core returns crosses as frozen classes with the core's field names: a
//! [`Checkpoint`](PyCheckpoint) and its [`Tensor`](PyTensor)s and [`Shard`](PyShard)s, the
//! [`ApplyReport`](PyApplyReport) of a write, the [`LoggedDelta`](PyLoggedDelta)s of a bundle
//! and the [`Inspection`](PyInspection) of a folder. A delta comes in as the Python
//! `rrome.Delta` it is, read by its attributes, and goes out as one (the class is imported from
//! `rrome.files.shards`, as the exceptions are from `rrome.errors`), so its validation has one
//! home.

use std::collections::BTreeMap;
use std::path::PathBuf;

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyString, PyType};
use rrome_core::checkpoint::{Checkpoint, Shard, TensorRef};
use rrome_core::deltas::{self, Delta, Layout, Record};
use rrome_core::{check, patch, Error};
use serde_json::Value;

use crate::{exc, to_py};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCheckpoint>()?;
    m.add_class::<PyTensor>()?;
    m.add_class::<PyShard>()?;
    m.add_class::<PyApplyReport>()?;
    m.add_class::<PyLoggedDelta>()?;
    m.add_class::<PyLogEntry>()?;
    m.add_class::<PyInspection>()?;
    m.add_function(wrap_pyfunction!(apply_deltas, m)?)?;
    m.add_function(wrap_pyfunction!(apply_bundle, m)?)?;
    m.add_function(wrap_pyfunction!(check_bundle, m)?)?;
    m.add_function(wrap_pyfunction!(read_bundle, m)?)?;
    m.add_function(wrap_pyfunction!(write_bundle, m)?)?;
    m.add_function(wrap_pyfunction!(revert, m)?)?;
    m.add_function(wrap_pyfunction!(recover, m)?)?;
    m.add_function(wrap_pyfunction!(hf_cache_repo, m)?)?;
    m.add_function(wrap_pyfunction!(escape_unprintable, m)?)?;
    m.add_function(wrap_pyfunction!(refuse_cache_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    Ok(())
}

// --- values -------------------------------------------------------------------------------

/// A JSON value as the Python object `json.loads` makes of it (dicts keep the file's order).
fn json_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into_pyobject(py)?.into_any(),
            (None, Some(i)) => i.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            PyList::new(py, items.iter().map(|x| json_to_py(py, x)).collect::<PyResult<Vec<_>>>()?)?.into_any()
        }
        Value::Object(map) => {
            let out = PyDict::new(py);
            for (k, x) in map {
                out.set_item(k, json_to_py(py, x)?)?;
            }
            out.into_any()
        }
    })
}

/// Python's `repr` of a string (for the `__repr__` of the classes below), from the core's one
/// home of escaping.
fn py_repr(_py: Python<'_>, s: &str) -> PyResult<String> {
    Ok(rrome_core::text::py_repr(s))
}

/// An `rrome.Delta` (the Python dataclass, validated there), read by its attributes.
#[derive(FromPyObject)]
struct DeltaArg<'py> {
    tensor: String,
    u: PyReadonlyArray1<'py, f32>,
    r: PyReadonlyArray1<'py, f32>,
    layout: String,
    scale: f64,
    meta: Option<Bound<'py, PyAny>>,
    key: Option<PyReadonlyArray1<'py, f32>>,
    other_key: Option<PyReadonlyArray1<'py, f32>>,
}

impl DeltaArg<'_> {
    /// The core delta; `meta` goes through `json.dumps(dict(meta))`, as the edit log stores it.
    fn to_core(&self, py: Python<'_>) -> PyResult<Delta> {
        let layout = Layout::parse(&self.layout).ok_or_else(|| {
            exc::DeltaError::new_err(format!("layout must be \"out_in\" or \"in_out\", got {:?}", self.layout))
        })?;
        let meta = match &self.meta {
            None => None,
            Some(m) => {
                let dict = py.get_type::<PyDict>().call1((m,))?;
                let text: String = py.import("json")?.call_method1("dumps", (dict,))?.extract()?;
                match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(m)) => Some(m),
                    _ => return Err(exc::DeltaError::new_err("meta must serialise to a JSON object")),
                }
            }
        };
        Ok(Delta {
            tensor: self.tensor.clone(),
            u: self.u.as_array().to_vec(),
            r: self.r.as_array().to_vec(),
            layout,
            scale: self.scale,
            meta,
            key: self.key.as_ref().map(|k| k.as_array().to_vec()),
            other_key: self.other_key.as_ref().map(|k| k.as_array().to_vec()),
        })
    }
}

fn to_core(py: Python<'_>, deltas: &[DeltaArg<'_>]) -> PyResult<Vec<Delta>> {
    deltas.iter().map(|d| d.to_core(py)).collect()
}

/// The Python `rrome.Delta` of a core delta (its constructor checks it as it checks any).
fn to_python_delta<'py>(py: Python<'py>, d: Delta) -> PyResult<Bound<'py, PyAny>> {
    static DELTA: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    let meta = d.meta.map(|m| json_to_py(py, &Value::Object(m))).transpose()?;
    let (u, r) = (PyArray1::from_vec(py, d.u), PyArray1::from_vec(py, d.r));
    let key = d.key.map(|k| PyArray1::from_vec(py, k));
    let other_key = d.other_key.map(|k| PyArray1::from_vec(py, k));
    let args = (d.tensor, u, r, d.layout.as_str(), d.scale, meta, key, other_key);
    DELTA.import(py, "rrome.files.shards", "Delta")?.call1(args)
}

fn options(link: bool, again: bool) -> patch::ApplyOptions {
    let untouched = if link { patch::Untouched::HardLink } else { patch::Untouched::Copy };
    patch::ApplyOptions { untouched, again }
}

// --- checkpoint ---------------------------------------------------------------------------

/// One tensor of a checkpoint: name, dtype (as the header spells it), shape, the shard file
/// that holds it, and the absolute byte range ``offset .. offset + len`` of its data there.
#[pyclass(module = "rrome._rust", name = "Tensor", frozen, get_all, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct PyTensor {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    shard: String,
    offset: u64,
    len: u64,
}

impl From<TensorRef<'_>> for PyTensor {
    fn from(t: TensorRef<'_>) -> Self {
        PyTensor {
            name: t.name.to_string(),
            dtype: t.dtype.as_str(),
            shape: t.shape.to_vec(),
            shard: t.shard.to_string(),
            offset: t.offset,
            len: t.len,
        }
    }
}

#[pymethods]
impl PyTensor {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "Tensor(name={}, dtype={}, shape={:?}, shard={}, offset={}, len={})",
            py_repr(py, &self.name)?,
            py_repr(py, self.dtype)?,
            self.shape,
            py_repr(py, &self.shard)?,
            self.offset,
            self.len
        ))
    }
}

/// One shard file of a checkpoint: its name in the folder, its size in bytes and how many
/// tensors it holds.
#[pyclass(module = "rrome._rust", name = "Shard", frozen, get_all, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct PyShard {
    file: String,
    bytes: u64,
    tensors: usize,
}

impl From<&Shard> for PyShard {
    fn from(s: &Shard) -> Self {
        PyShard { file: s.file.clone(), bytes: s.len, tensors: s.header.tensors.len() }
    }
}

#[pymethods]
impl PyShard {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("Shard(file={}, bytes={}, tensors={})", py_repr(py, &self.file)?, self.bytes, self.tensors))
    }
}

/// A model folder (``model.safetensors``, or shards and their index) with every shard header
/// and the index validated. Only headers are read.
///
/// Raises CheckpointError (no weights, an unsafe or inconsistent index),
/// SafetensorsHeaderError (a malformed shard) or OSError.
#[pyclass(module = "rrome._rust", name = "Checkpoint", frozen)]
pub(crate) struct PyCheckpoint {
    inner: Checkpoint,
}

#[pymethods]
impl PyCheckpoint {
    #[new]
    fn new(py: Python<'_>, model_dir: PathBuf) -> PyResult<Self> {
        Ok(PyCheckpoint { inner: py.detach(|| Checkpoint::open(&model_dir)).map_err(to_py)? })
    }

    /// The model folder.
    #[getter]
    fn dir(&self) -> String {
        self.inner.dir.display().to_string()
    }

    /// Whether the checkpoint is sharded through ``model.safetensors.index.json``.
    #[getter]
    fn indexed(&self) -> bool {
        self.inner.indexed
    }

    /// The shard files, by file name.
    #[getter]
    fn shards(&self) -> Vec<PyShard> {
        self.inner.shards.iter().map(PyShard::from).collect()
    }

    /// Number of tensors.
    #[getter]
    fn num_tensors(&self) -> usize {
        self.inner.num_tensors()
    }

    /// Every tensor of every shard, sorted by name (code point order, as Python's ``sorted``).
    fn tensors(&self) -> Vec<PyTensor> {
        self.inner.tensors().into_iter().map(PyTensor::from).collect()
    }

    /// The tensor of that name, or None.
    fn tensor(&self, name: &str) -> Option<PyTensor> {
        self.inner.tensor(name).map(PyTensor::from)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("Checkpoint({})", py_repr(py, &self.dir())?))
    }
}

// --- deltas and writes --------------------------------------------------------------------

/// What :func:`rrome.apply_deltas` did: the batch number, the folder that now holds the
/// edited checkpoint, the number of deltas, the edited tensors and shards, the bytes of the
/// edited tensors and the bytes written, and ``recovered``: what the recovery that runs first
/// did to an interrupted earlier write (empty if nothing).
///
/// ``report["batch"]`` reads the same as ``report.batch`` (the report used to be a dict).
#[pyclass(module = "rrome._rust", name = "ApplyReport", frozen, get_all)]
pub(crate) struct PyApplyReport {
    batch: u64,
    model_dir: String,
    deltas: usize,
    tensors: Vec<String>,
    shards: Vec<String>,
    tensor_bytes: u64,
    bytes_written: u64,
    recovered: Vec<String>,
}

const REPORT_FIELDS: [&str; 8] =
    ["batch", "model_dir", "deltas", "tensors", "shards", "tensor_bytes", "bytes_written", "recovered"];

impl From<patch::ApplyReport> for PyApplyReport {
    fn from(r: patch::ApplyReport) -> Self {
        PyApplyReport {
            batch: r.batch,
            model_dir: r.model_dir.display().to_string(),
            deltas: r.deltas,
            tensors: r.tensors,
            shards: r.shards,
            tensor_bytes: r.tensor_bytes,
            bytes_written: r.bytes_written,
            recovered: r.recovered,
        }
    }
}

#[pymethods]
impl PyApplyReport {
    fn __getitem__<'py>(slf: &Bound<'py, Self>, key: &str) -> PyResult<Bound<'py, PyAny>> {
        if REPORT_FIELDS.contains(&key) {
            slf.getattr(key)
        } else {
            Err(PyKeyError::new_err(key.to_string()))
        }
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "ApplyReport(batch={}, model_dir={}, deltas={}, tensors={:?}, shards={:?}, tensor_bytes={}, \
             bytes_written={}, recovered={:?})",
            self.batch,
            py_repr(py, &self.model_dir)?,
            self.deltas,
            self.tensors,
            self.shards,
            self.tensor_bytes,
            self.bytes_written,
            self.recovered
        ))
    }
}

/// A delta read back from a bundle or edit log, with its record fields: ``id``, ``batch`` and
/// ``applied_at`` (edit log only, else None), the ``rrome.Delta`` itself, and ``line``, the
/// line of ``rrome_edits.jsonl`` that holds the record (1-based).
#[pyclass(module = "rrome._rust", name = "LoggedDelta", frozen, get_all)]
pub(crate) struct PyLoggedDelta {
    id: String,
    batch: Option<u64>,
    applied_at: Option<f64>,
    delta: Py<PyAny>,
    line: usize,
}

impl PyLoggedDelta {
    fn new(py: Python<'_>, rec: Record) -> PyResult<Self> {
        let delta = to_python_delta(py, rec.delta)?.unbind();
        Ok(PyLoggedDelta { id: rec.id, batch: rec.batch, applied_at: rec.applied_at, delta, line: rec.line })
    }

    fn all(py: Python<'_>, records: Vec<Record>) -> PyResult<Vec<Self>> {
        records.into_iter().map(|r| PyLoggedDelta::new(py, r)).collect()
    }
}

#[pymethods]
impl PyLoggedDelta {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "LoggedDelta(id={}, batch={}, applied_at={}, delta={}, line={})",
            py_repr(py, &self.id)?,
            self.batch.into_pyobject(py)?.repr()?,
            self.applied_at.into_pyobject(py)?.repr()?,
            self.delta.bind(py).repr()?,
            self.line
        ))
    }
}

/// Applies deltas (``rrome.Delta`` objects) to a model folder, in place or into ``out_dir``.
#[pyfunction]
#[pyo3(signature = (model_dir, deltas, out_dir = None, link_untouched = false, again = false))]
fn apply_deltas(
    py: Python<'_>,
    model_dir: PathBuf,
    deltas: Vec<DeltaArg<'_>>,
    out_dir: Option<PathBuf>,
    link_untouched: bool,
    again: bool,
) -> PyResult<PyApplyReport> {
    let deltas = to_core(py, &deltas)?;
    let how = options(link_untouched, again);
    let rep = py.detach(|| patch::apply_deltas_with(&model_dir, &deltas, out_dir.as_deref(), how)).map_err(to_py)?;
    Ok(rep.into())
}

/// Reads a deltas bundle, checks every record against the checkpoint (each misfit at its
/// FILE:LINE) and applies them as one batch, in place or into ``out_dir``.
#[pyfunction]
#[pyo3(signature = (model_dir, bundle, out_dir = None, link_untouched = false, again = false))]
fn apply_bundle(
    py: Python<'_>,
    model_dir: PathBuf,
    bundle: PathBuf,
    out_dir: Option<PathBuf>,
    link_untouched: bool,
    again: bool,
) -> PyResult<PyApplyReport> {
    let how = options(link_untouched, again);
    let rep = py.detach(|| patch::apply_bundle(&model_dir, &bundle, out_dir.as_deref(), how)).map_err(to_py)?;
    Ok(rep.into())
}

/// Reads a deltas bundle and checks every record against the checkpoint in ``model_dir``
/// (headers only); every misfit is reported at once, each at its FILE:LINE.
#[pyfunction]
fn check_bundle(py: Python<'_>, model_dir: PathBuf, bundle: PathBuf) -> PyResult<Vec<PyLoggedDelta>> {
    let records = py.detach(|| check::check_bundle(&model_dir, &bundle)).map_err(to_py)?;
    PyLoggedDelta::all(py, records)
}

/// Reads a deltas bundle or edit log (a folder, or the path of either file).
#[pyfunction]
fn read_bundle(py: Python<'_>, path: PathBuf) -> PyResult<Vec<PyLoggedDelta>> {
    let records = py.detach(|| deltas::read_bundle(&path, false)).map_err(to_py)?;
    PyLoggedDelta::all(py, records)
}

/// Writes deltas (``rrome.Delta`` objects) as a bundle in folder ``dir``, ids "0", "1", ...
#[pyfunction]
fn write_bundle(py: Python<'_>, dir: PathBuf, deltas: Vec<DeltaArg<'_>>) -> PyResult<()> {
    let records: Vec<Record> = to_core(py, &deltas)?
        .into_iter()
        .enumerate()
        .map(|(i, delta)| Record { id: i.to_string(), batch: None, applied_at: None, line: 0, delta })
        .collect();
    py.detach(|| {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        deltas::write_bundle(&dir, &records)
    })
    .map_err(to_py)
}

/// Reverts the last batch (or all); returns (reverted batch numbers, recovery actions).
#[pyfunction]
#[pyo3(signature = (model_dir, all = false))]
fn revert(py: Python<'_>, model_dir: PathBuf, all: bool) -> PyResult<(Vec<u64>, Vec<String>)> {
    let rep = py.detach(|| patch::revert(&model_dir, all)).map_err(to_py)?;
    Ok((rep.batches, rep.recovered))
}

/// Finishes or rolls back an interrupted write; returns what was done.
#[pyfunction]
fn recover(py: Python<'_>, model_dir: PathBuf) -> PyResult<Vec<String>> {
    py.detach(|| patch::recover(&model_dir)).map_err(to_py)
}

/// ``text`` with every character that is not printable escaped as ``ascii()`` writes it (for
/// printing names read from untrusted files; rrome's one home of escaping is the core's).
#[pyfunction]
fn escape_unprintable(text: &str) -> String {
    rrome_core::text::escape_unprintable(text)
}

/// The Hugging Face cache repository of which ``model_dir`` is a snapshot, or None.
#[pyfunction]
fn hf_cache_repo(model_dir: PathBuf) -> Option<PathBuf> {
    rrome_core::checkpoint::hf_cache_repo(&model_dir)
}

/// Raises CheckpointError (pointing to ``--out``) if ``model_dir`` is a Hugging Face cache
/// snapshot: what an in-place write would refuse, checked before any work is done.
#[pyfunction]
fn refuse_cache_snapshot(model_dir: PathBuf) -> PyResult<()> {
    rrome_core::checkpoint::refuse_cache_snapshot(&model_dir).map_err(to_py)
}

// --- inspect ------------------------------------------------------------------------------

/// One record of a model folder's edit log as :func:`rrome.inspect` shows it: the record's
/// fields without the factors (``d_in``, ``d_out`` are their lengths), and ``undo``: whether
/// the undo data of its batch is in the folder (None for a record without a batch).
#[pyclass(module = "rrome._rust", name = "LogEntry", frozen, get_all)]
pub(crate) struct PyLogEntry {
    id: String,
    batch: Option<u64>,
    applied_at: Option<f64>,
    tensor: String,
    layout: &'static str,
    scale: f64,
    d_in: usize,
    d_out: usize,
    meta: Option<Py<PyAny>>,
    undo: Option<bool>,
}

impl PyLogEntry {
    fn new(py: Python<'_>, e: &patch::LogEntry) -> PyResult<Self> {
        let (r, d) = (&e.record, &e.record.delta);
        let meta = d.meta.as_ref().map(|m| json_to_py(py, &Value::Object(m.clone())).map(Bound::unbind)).transpose()?;
        Ok(PyLogEntry {
            id: r.id.clone(),
            batch: r.batch,
            applied_at: r.applied_at,
            tensor: d.tensor.clone(),
            layout: d.layout.as_str(),
            scale: d.scale,
            d_in: d.d_in(),
            d_out: d.d_out(),
            meta,
            undo: e.undo,
        })
    }
}

/// A description of a model folder: ``model_dir``, ``indexed``, ``shards``, ``num_tensors``,
/// ``dtypes`` (tensors per dtype), ``tensors`` (every tensor, shard by shard in header order;
/// None unless asked for), ``edits`` (the edit log) and ``pending`` (interrupted writes that
/// ``rrome recover`` would finish). ``to_dict()`` is the JSON form ``rrome inspect --json``
/// prints.
#[pyclass(module = "rrome._rust", name = "Inspection", frozen)]
pub(crate) struct PyInspection {
    inner: patch::Inspection,
}

#[pymethods]
impl PyInspection {
    /// The model folder.
    #[getter]
    fn model_dir(&self) -> String {
        self.inner.checkpoint.dir.display().to_string()
    }

    /// Whether the checkpoint is sharded through an index file.
    #[getter]
    fn indexed(&self) -> bool {
        self.inner.checkpoint.indexed
    }

    /// The shard files, by file name.
    #[getter]
    fn shards(&self) -> Vec<PyShard> {
        self.inner.checkpoint.shards.iter().map(PyShard::from).collect()
    }

    /// Number of tensors.
    #[getter]
    fn num_tensors(&self) -> usize {
        self.inner.checkpoint.num_tensors()
    }

    /// Number of tensors per dtype.
    #[getter]
    fn dtypes(&self) -> BTreeMap<&'static str, usize> {
        self.inner.dtypes()
    }

    /// Every tensor, shard by shard in header order; None unless asked for.
    #[getter]
    fn tensors(&self) -> Option<Vec<PyTensor>> {
        self.inner.tensors().map(|all| all.into_iter().map(PyTensor::from).collect())
    }

    /// The edit log, oldest record first.
    #[getter]
    fn edits(&self, py: Python<'_>) -> PyResult<Vec<PyLogEntry>> {
        self.inner.edits.iter().map(|e| PyLogEntry::new(py, e)).collect()
    }

    /// A sentence per interrupted write that ``rrome recover`` would finish or roll back.
    #[getter]
    fn pending(&self) -> Vec<String> {
        self.inner.pending.clone()
    }

    /// The description as plain dicts and lists, as ``rrome inspect --json`` prints it.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &self.inner.to_json())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "<Inspection of {}: {} tensors in {} shard(s), {} logged delta(s), {} pending>",
            py_repr(py, &self.model_dir())?,
            self.inner.checkpoint.num_tensors(),
            self.inner.checkpoint.shards.len(),
            self.inner.edits.len(),
            self.inner.pending.len()
        ))
    }
}

/// Describes a model folder (every tensor listed only with ``tensors``).
#[pyfunction]
#[pyo3(signature = (model_dir, tensors = true))]
fn inspect(py: Python<'_>, model_dir: PathBuf, tensors: bool) -> PyResult<PyInspection> {
    let inner = py.detach(|| patch::inspect_with(&model_dir, tensors)).map_err(to_py)?;
    Ok(PyInspection { inner })
}
