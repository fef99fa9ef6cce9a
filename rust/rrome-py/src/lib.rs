//! Python bindings of rrome-core (`rrome._rust`).
//!
//! This crate only converts types, releases the GIL around heavy work and maps
//! `rrome_core::Error` onto the exception classes of `rrome.errors`. All logic lives in the
//! core crate; the Python package wraps these functions in its documented API.
//!
//! - `linalg`: the second-moment accumulator and the Cholesky solver;
//! - `files`: checkpoints, deltas bundles and the shard writer, whose results cross as
//!   classes (`Checkpoint`, `Tensor`, `ApplyReport`, `LoggedDelta`, `Inspection`, ...).

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use rrome_core::{deltas, patch, Error};

mod files;
mod linalg;

pub(crate) mod exc {
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
pub(crate) fn to_py(err: Error) -> PyErr {
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

#[pymodule]
fn _rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<linalg::PySecondMoment>()?;
    m.add_class::<linalg::PyCholesky>()?;
    files::register(m)?;
    m.add("CRASH_ENV", patch::CRASH_ENV)?;
    // The names of a deltas bundle's two files, defined in the core alone.
    m.add("EDITS_FILE", deltas::EDITS_FILE)?;
    m.add("DELTAS_FILE", deltas::DELTAS_FILE)?;
    // The package's version: the workspace's Cargo.toml is its one source (pyproject.toml reads
    // it through maturin, `rrome.__version__` through this constant).
    m.add("VERSION", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
