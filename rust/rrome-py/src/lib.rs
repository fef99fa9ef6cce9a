//! Python bindings of rrome-core (`rrome._rust`).
//!
//! This crate only converts types, releases the GIL around heavy work and maps
//! `rrome_core::Error` onto the exception classes of `rrome.errors`. All logic lives in the
//! core crate; the Python package wraps these functions in its documented API.

use std::path::PathBuf;

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOSError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use rrome_core::checkpoint::Checkpoint;
use rrome_core::deltas::{self, Delta, Layout, Record};
use rrome_core::{chol, moments, patch, Error};

mod exc {
    pyo3::import_exception!(rrome.errors, SafetensorsHeaderError);
    pyo3::import_exception!(rrome.errors, CheckpointError);
    pyo3::import_exception!(rrome.errors, TensorNotFoundError);
    pyo3::import_exception!(rrome.errors, UnsupportedDtypeError);
    pyo3::import_exception!(rrome.errors, DeltaError);
    pyo3::import_exception!(rrome.errors, DeltasFileError);
    pyo3::import_exception!(rrome.errors, NotPositiveDefiniteError);
    pyo3::import_exception!(rrome.errors, ShapeError);
    pyo3::import_exception!(rrome.errors, LockedError);
    pyo3::import_exception!(rrome.errors, IntegrityError);
    pyo3::import_exception!(rrome.errors, RevertError);
    pyo3::import_exception!(rrome.errors, MomentsFileError);
}

/// errno for I/O errors that carry none (ours, built from an `ErrorKind`).
fn errno_of(kind: std::io::ErrorKind) -> i32 {
    use std::io::ErrorKind::*;
    match kind {
        NotFound => 2,
        PermissionDenied => 13,
        AlreadyExists => 17,
        NotADirectory => 20,
        IsADirectory => 21,
        InvalidInput => 22,
        FileTooLarge => 27,
        StorageFull => 28,
        ReadOnlyFilesystem => 30,
        _ => 5,
    }
}

/// Maps a core error onto its Python exception. `OSError(errno, ...)` itself picks the
/// matching subclass (FileNotFoundError, PermissionError, ...).
fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::Io { path, source } => {
            let errno = source.raw_os_error().unwrap_or_else(|| errno_of(source.kind()));
            let strerror = match source.raw_os_error() {
                Some(_) => std::io::Error::from_raw_os_error(errno).to_string(),
                None => source.to_string(),
            };
            let strerror = strerror.split(" (os error").next().unwrap_or_default().to_string();
            PyOSError::new_err((errno, strerror, path.display().to_string()))
        }
        Error::Header { .. } => exc::SafetensorsHeaderError::new_err(msg),
        Error::Checkpoint { .. } => exc::CheckpointError::new_err(msg),
        Error::TensorNotFound { .. } => exc::TensorNotFoundError::new_err(msg),
        Error::UnsupportedDtype { .. } => exc::UnsupportedDtypeError::new_err(msg),
        Error::Delta { .. } => exc::DeltaError::new_err(msg),
        Error::DeltasFile { .. } => exc::DeltasFileError::new_err(msg),
        Error::NotPositiveDefinite { pivot, .. } => exc::NotPositiveDefiniteError::new_err((msg, pivot)),
        Error::Shape { .. } => exc::ShapeError::new_err(msg),
        Error::Locked { .. } => exc::LockedError::new_err(msg),
        Error::Integrity { .. } => exc::IntegrityError::new_err(msg),
        Error::Revert { .. } => exc::RevertError::new_err(msg),
        Error::Moments { .. } => exc::MomentsFileError::new_err(msg),
    }
}

/// Converts any array-like to a C-contiguous float64 numpy array (copying only if needed).
fn as_f64<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArrayDyn<f64>>> {
    let np = obj.py().import("numpy")?;
    let arr = np.call_method1("ascontiguousarray", (obj, np.getattr("float64")?))?;
    Ok(arr.cast_into::<PyArrayDyn<f64>>()?)
}

/// Accumulator of the second moment Σ k kᵀ of keys of width `d`, in float64.
///
/// `update` takes C-contiguous float32 arrays of shape (N, d) without copying them and
/// releases the GIL while it works. Only the lower triangle is accumulated.
#[pyclass(module = "rrome._rust", name = "SecondMoment")]
struct PySecondMoment {
    inner: moments::SecondMoment,
}

#[pymethods]
impl PySecondMoment {
    #[new]
    fn new(d: usize) -> PyResult<Self> {
        Ok(PySecondMoment { inner: moments::SecondMoment::new(d).map_err(to_py)? })
    }

    /// Adds a batch of keys: a C-contiguous float32 array of shape (N, d).
    fn update(&mut self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<()> {
        let d = self.inner.dim();
        let arr = keys.cast::<PyArray2<f32>>().map_err(|_| {
            PyTypeError::new_err(format!(
                "keys must be a float32 numpy array of shape (N, {d}); got {}",
                describe(keys)
            ))
        })?;
        let ro = arr.readonly();
        let shape = ro.shape();
        if shape[1] != d {
            return Err(exc::ShapeError::new_err(format!(
                "keys have width {}, this SecondMoment has d = {d}",
                shape[1]
            )));
        }
        // as_slice() also accepts Fortran order, which would be read transposed: check C order.
        let slice = ro.as_slice().ok().filter(|_| ro.is_c_contiguous()).ok_or_else(|| {
            PyTypeError::new_err("keys must be C-contiguous (use numpy.ascontiguousarray or tensor.contiguous())")
        })?;
        let inner = &mut self.inner;
        py.detach(|| inner.update(slice)).map_err(to_py)
    }

    /// Number of keys accumulated.
    #[getter]
    fn count(&self) -> u64 {
        self.inner.count()
    }

    /// Key width.
    #[getter]
    fn d(&self) -> usize {
        self.inner.dim()
    }

    /// Provenance metadata (saved with the file).
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (k, v) in self.inner.metadata() {
            out.set_item(k, v)?;
        }
        Ok(out)
    }

    #[setter(metadata)]
    fn set_metadata(&mut self, metadata: std::collections::BTreeMap<String, String>) {
        self.inner.set_metadata(metadata.into_iter().collect());
    }

    /// Adds another accumulator's keys to this one.
    fn merge(&mut self, other: PyRef<'_, PySecondMoment>) -> PyResult<()> {
        self.inner.merge(&other.inner).map_err(to_py)
    }

    /// The mean E[k kᵀ] as a float64 (d, d) array.
    fn moment<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let d = self.inner.dim();
        let m = py.detach(|| self.inner.moment()).map_err(to_py)?;
        Ok(Array2::from_shape_vec((d, d), m).expect("d × d").into_pyarray(py))
    }

    /// An accumulator holding the sum Σ k kᵀ (a float64 (d, d) array) of `count` keys, e.g.
    /// partial sums of several workers added up. Only the lower triangle is kept.
    #[staticmethod]
    fn from_sum(py: Python<'_>, sum: &Bound<'_, PyAny>, count: u64) -> PyResult<Self> {
        let a = as_f64(sum)?;
        let ro = a.readonly();
        let shape = ro.shape().to_vec();
        if shape.len() != 2 || shape[0] != shape[1] {
            return Err(exc::ShapeError::new_err(format!("sum must be a square matrix; got shape {shape:?}")));
        }
        let slice = ro.as_slice().expect("contiguous");
        let inner = py.detach(|| moments::SecondMoment::from_sum(slice, shape[0], count)).map_err(to_py)?;
        Ok(PySecondMoment { inner })
    }

    /// The sum Σ k kᵀ as a float64 (d, d) array.
    fn sum<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f64>> {
        let d = self.inner.dim();
        Array2::from_shape_vec((d, d), self.inner.sum()).expect("d × d").into_pyarray(py)
    }

    /// Writes the moment to a safetensors file (atomically).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.save(&path)).map_err(to_py)
    }

    /// Reads a file written by `save`.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        Ok(PySecondMoment { inner: py.detach(|| moments::SecondMoment::load(&path)).map_err(to_py)? })
    }

    fn __repr__(&self) -> String {
        format!("SecondMoment(d={}, count={})", self.inner.dim(), self.inner.count())
    }
}

fn describe(obj: &Bound<'_, PyAny>) -> String {
    let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
    match (obj.getattr("dtype"), obj.getattr("shape")) {
        (Ok(dt), Ok(sh)) => format!("{ty} of dtype {dt} and shape {sh}"),
        _ => ty,
    }
}

/// Cholesky factor of a symmetric positive definite matrix plus `ridge`·I, for repeated solves.
#[pyclass(module = "rrome._rust", name = "Cholesky")]
struct PyCholesky {
    inner: chol::Cholesky,
    metadata: Vec<(String, String)>,
}

#[pymethods]
impl PyCholesky {
    #[new]
    #[pyo3(signature = (c0, ridge = 0.0))]
    fn new(py: Python<'_>, c0: &Bound<'_, PyAny>, ridge: f64) -> PyResult<Self> {
        let a = as_f64(c0)?;
        let ro = a.readonly();
        let shape = ro.shape().to_vec();
        if shape.len() != 2 || shape[0] != shape[1] {
            return Err(exc::ShapeError::new_err(format!("c0 must be a square matrix; got shape {shape:?}")));
        }
        let slice = ro.as_slice().expect("contiguous");
        let inner = py.detach(|| chol::Cholesky::new(slice, shape[0], ridge)).map_err(to_py)?;
        Ok(PyCholesky { inner, metadata: Vec::new() })
    }

    /// A factor computed earlier: the lower-triangular L (float64, (d, d)) with
    /// c0 + ridge·I = L Lᵀ, validated (lower triangular, positive diagonal) but not recomputed.
    #[staticmethod]
    #[pyo3(signature = (factor, ridge = 0.0))]
    fn from_factor(py: Python<'_>, factor: &Bound<'_, PyAny>, ridge: f64) -> PyResult<Self> {
        let a = as_f64(factor)?;
        let ro = a.readonly();
        let shape = ro.shape().to_vec();
        if shape.len() != 2 || shape[0] != shape[1] {
            return Err(exc::ShapeError::new_err(format!("factor must be a square matrix; got shape {shape:?}")));
        }
        let slice = ro.as_slice().expect("contiguous");
        let inner = py.detach(|| chol::Cholesky::from_factor(slice, shape[0], ridge)).map_err(to_py)?;
        Ok(PyCholesky { inner, metadata: Vec::new() })
    }

    /// Writes the factor, its ridge and `metadata` to a safetensors file (atomically).
    #[pyo3(signature = (path, metadata = None))]
    fn save(
        &self,
        py: Python<'_>,
        path: PathBuf,
        metadata: Option<std::collections::BTreeMap<String, String>>,
    ) -> PyResult<()> {
        let meta: Vec<(String, String)> = metadata.unwrap_or_default().into_iter().collect();
        py.detach(|| self.inner.save(&path, &meta)).map_err(to_py)
    }

    /// Reads a file written by `save`; its metadata is in `metadata`.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let (inner, metadata) = py.detach(|| chol::Cholesky::load(&path)).map_err(to_py)?;
        Ok(PyCholesky { inner, metadata })
    }

    /// The metadata read by `load` (empty for a factor computed here).
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (k, v) in &self.metadata {
            out.set_item(k, v)?;
        }
        Ok(out)
    }

    /// Solves (c0 + ridge·I) x = k for a vector (d,) or a matrix (d, m) of right-hand sides.
    fn solve<'py>(&self, py: Python<'py>, k: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let arr = as_f64(k)?;
        let shape = arr.shape().to_vec();
        let d = self.inner.dim();
        let m = match shape.as_slice() {
            [n] if *n == d => 1,
            [n, m] if *n == d => *m,
            _ => {
                return Err(exc::ShapeError::new_err(format!(
                    "right-hand side must have shape ({d},) or ({d}, m); got {shape:?}"
                )))
            }
        };
        let mut x: Vec<f64> = arr.readonly().as_slice().expect("contiguous").to_vec();
        py.detach(|| self.inner.solve_in_place(&mut x, m)).map_err(to_py)?;
        let out = PyArray1::from_vec(py, x);
        Ok(out.reshape(shape)?.into_any())
    }

    /// Matrix dimension.
    #[getter]
    fn d(&self) -> usize {
        self.inner.dim()
    }

    /// The ridge added to the diagonal.
    #[getter]
    fn ridge(&self) -> f64 {
        self.inner.ridge()
    }

    /// The lower-triangular factor L (float64, (d, d)).
    fn factor<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f64>> {
        let d = self.inner.dim();
        Array2::from_shape_vec((d, d), self.inner.factor()).expect("d × d").into_pyarray(py)
    }

    fn __repr__(&self) -> String {
        format!("Cholesky(d={}, ridge={})", self.inner.dim(), self.inner.ridge())
    }
}

/// A delta as the Python layer hands it over: (tensor, u, r, layout, scale, meta_json).
type RawDelta<'py> = (String, PyReadonlyArray1<'py, f32>, PyReadonlyArray1<'py, f32>, String, f64, Option<String>);

fn to_delta(raw: RawDelta<'_>) -> PyResult<Delta> {
    let (tensor, u, r, layout, scale, meta) = raw;
    let layout = Layout::parse(&layout)
        .ok_or_else(|| exc::DeltaError::new_err(format!("layout must be \"out_in\" or \"in_out\", got {layout:?}")))?;
    let meta = match meta {
        None => None,
        Some(s) => match serde_json::from_str::<serde_json::Value>(&s) {
            Ok(serde_json::Value::Object(m)) => Some(m),
            _ => return Err(exc::DeltaError::new_err("meta must serialise to a JSON object")),
        },
    };
    Ok(Delta { tensor, u: u.as_array().to_vec(), r: r.as_array().to_vec(), layout, scale, meta })
}

fn from_record<'py>(py: Python<'py>, rec: Record) -> PyResult<Bound<'py, PyTuple>> {
    let meta = rec.delta.meta.as_ref().map(|m| serde_json::Value::Object(m.clone()).to_string());
    let d = rec.delta;
    (
        rec.id,
        rec.batch,
        rec.applied_at,
        rec.line,
        d.tensor,
        PyArray1::from_vec(py, d.u),
        PyArray1::from_vec(py, d.r),
        d.layout.as_str(),
        d.scale,
        meta,
    )
        .into_pyobject(py)
}

/// Applies deltas to a model folder, in place or into `out_dir`. Returns a report dict.
#[pyfunction]
#[pyo3(signature = (model_dir, deltas, out_dir = None, link_untouched = false))]
fn apply_deltas<'py>(
    py: Python<'py>,
    model_dir: PathBuf,
    deltas: Vec<RawDelta<'py>>,
    out_dir: Option<PathBuf>,
    link_untouched: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let deltas: Vec<Delta> = deltas.into_iter().map(to_delta).collect::<PyResult<_>>()?;
    let untouched = if link_untouched { patch::Untouched::HardLink } else { patch::Untouched::Copy };
    let rep =
        py.detach(|| patch::apply_deltas_with(&model_dir, &deltas, out_dir.as_deref(), untouched)).map_err(to_py)?;
    let out = PyDict::new(py);
    out.set_item("batch", rep.batch)?;
    out.set_item("model_dir", rep.model_dir.display().to_string())?;
    out.set_item("tensors", rep.tensors)?;
    out.set_item("shards", rep.shards)?;
    out.set_item("tensor_bytes", rep.tensor_bytes)?;
    out.set_item("bytes_written", rep.bytes_written)?;
    out.set_item("recovered", rep.recovered)?;
    Ok(out)
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

/// Describes a model folder as a JSON string (every tensor listed only with `tensors`).
#[pyfunction]
#[pyo3(signature = (model_dir, tensors = true))]
fn inspect(py: Python<'_>, model_dir: PathBuf, tensors: bool) -> PyResult<String> {
    py.detach(|| patch::inspect_with(&model_dir, tensors)).map(|v| v.to_string()).map_err(to_py)
}

/// A tensor's (dtype, shape).
type TensorSpec = (&'static str, Vec<usize>);

/// For each name, (dtype, shape) of that tensor in the checkpoint, or None where it has none.
#[pyfunction]
fn tensor_specs(py: Python<'_>, model_dir: PathBuf, names: Vec<String>) -> PyResult<Vec<Option<TensorSpec>>> {
    let ckpt = py.detach(|| Checkpoint::open(&model_dir)).map_err(to_py)?;
    Ok(names.iter().map(|n| ckpt.find(n).ok().map(|(_, t)| (t.dtype.as_str(), t.shape.clone()))).collect())
}

/// Reads a deltas bundle: a list of (id, batch, applied_at, line, tensor, u, r, layout, scale, meta_json).
#[pyfunction]
fn read_bundle<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyList>> {
    let recs = py.detach(|| deltas::read_bundle(&path, false)).map_err(to_py)?;
    let items = recs.into_iter().map(|r| from_record(py, r)).collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

/// Writes deltas as a bundle in folder `dir`, with ids "0", "1", ...
#[pyfunction]
fn write_bundle<'py>(py: Python<'py>, dir: PathBuf, deltas: Vec<RawDelta<'py>>) -> PyResult<()> {
    let records: Vec<Record> = deltas
        .into_iter()
        .enumerate()
        .map(|(i, raw)| Ok(Record { id: i.to_string(), batch: None, applied_at: None, line: 0, delta: to_delta(raw)? }))
        .collect::<PyResult<_>>()?;
    py.detach(|| {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        deltas::write_bundle(&dir, &records)
    })
    .map_err(to_py)
}

#[pymodule]
fn _rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySecondMoment>()?;
    m.add_class::<PyCholesky>()?;
    m.add_function(wrap_pyfunction!(apply_deltas, m)?)?;
    m.add_function(wrap_pyfunction!(revert, m)?)?;
    m.add_function(wrap_pyfunction!(recover, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_specs, m)?)?;
    m.add_function(wrap_pyfunction!(read_bundle, m)?)?;
    m.add_function(wrap_pyfunction!(write_bundle, m)?)?;
    m.add("CRASH_ENV", patch::CRASH_ENV)?;
    Ok(())
}
