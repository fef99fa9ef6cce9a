//! Bindings of the numeric half: the second-moment accumulator and the Cholesky solver.

use std::path::PathBuf;

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use rrome_core::{chol, moments};

use crate::{exc, to_py};

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
pub(crate) struct PySecondMoment {
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
pub(crate) struct PyCholesky {
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

    /// Makes this the factor of (the matrix it factors) + weight·v vᵀ, in place, in O(d²)
    /// (``weight`` > 0; no refactoring).
    fn rank_one_update(&mut self, py: Python<'_>, v: &Bound<'_, PyAny>, weight: f64) -> PyResult<()> {
        let arr = as_f64(v)?;
        let ro = arr.readonly();
        let slice = ro.as_slice().expect("contiguous");
        let inner = &mut self.inner;
        py.detach(|| inner.rank_one_update(slice, weight)).map_err(to_py)
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
