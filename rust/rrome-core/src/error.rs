//! One error type for the whole core.
//!
//! Every variant corresponds to one Python exception class of `rrome.errors` (the bindings crate
//! does the mapping), so a caller can tell a corrupt file from a lock conflict from a numeric
//! failure without parsing messages. I/O failures keep their `io::ErrorKind` and the path they
//! concern, so they surface in Python as the matching `OSError` subclass with `filename` set.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias used throughout the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O failure on `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder the operation was about.
        path: PathBuf,
        /// The underlying error; its kind selects the Python `OSError` subclass.
        source: io::Error,
    },
    /// A safetensors file whose header is malformed or inconsistent with its contents.
    #[error("{path}: invalid safetensors file: {msg}")]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        msg: String,
    },
    /// A model folder that is not a usable checkpoint (missing or unsafe index, missing shard).
    #[error("{path}: {msg}")]
    Checkpoint {
        /// The model folder or index file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor named by a delta is not in the checkpoint.
    #[error("{msg}")]
    TensorNotFound {
        /// The model folder.
        path: PathBuf,
        /// The tensor name that was asked for.
        name: String,
        /// What is wrong: [`Error::tensor_not_found`]'s sentence, or every problem of a batch
        /// refused because of it (see [`crate::check::refusal`]).
        msg: String,
    },
    /// A tensor whose storage dtype cannot be edited (only F32, F16 and BF16 can).
    #[error("{msg}")]
    UnsupportedDtype {
        /// The tensor.
        name: String,
        /// Its dtype as the file spells it.
        dtype: String,
        /// What is wrong: [`Error::unsupported_dtype`]'s sentence, or every problem of a batch
        /// refused because of it.
        msg: String,
    },
    /// A delta that does not fit its tensor, or holds non-finite numbers.
    #[error("{msg}")]
    Delta {
        /// What is wrong, naming the tensor.
        msg: String,
    },
    /// A deltas bundle or edit log that cannot be read (with file and line where known).
    #[error("{msg}")]
    DeltasFile {
        /// What is wrong, starting with `file:line:`.
        msg: String,
    },
    /// A matrix handed to the Cholesky factorisation is not symmetric positive definite.
    #[error(
        "matrix is not positive definite: pivot {pivot} of {dim} is not positive \
         (add a ridge, or collect statistics over more tokens)"
    )]
    NotPositiveDefinite {
        /// Zero-based index of the failing pivot.
        pivot: usize,
        /// Matrix dimension.
        dim: usize,
    },
    /// Shapes that do not agree (moments of different widths, right-hand sides of the wrong size).
    #[error("{msg}")]
    Shape {
        /// What disagrees.
        msg: String,
    },
    /// Another process holds the model folder's lock.
    #[error("{path} is locked by another rrome process ({holder}); wait for it to finish")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// What the holder recorded about itself (pid, command, start time).
        holder: String,
    },
    /// Bytes on disk are not what the journal or edit log says they should be.
    #[error("{msg}")]
    Integrity {
        /// What was expected and what was found.
        msg: String,
    },
    /// A revert that cannot be carried out (nothing to revert, missing undo data).
    #[error("{msg}")]
    Revert {
        /// Why.
        msg: String,
    },
    /// A statistics (second-moment) file that cannot be used.
    #[error("{path}: {msg}")]
    Moments {
        /// The file.
        path: PathBuf,
        /// Why.
        msg: String,
    },
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<Path>, source: io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }

    /// Builds a header error for `path`.
    pub fn header(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Header { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }

    /// The error for a tensor `name` that the checkpoint in folder `path` does not hold.
    pub fn tensor_not_found(path: impl AsRef<Path>, name: &str) -> Self {
        let path = path.as_ref().to_path_buf();
        let msg = format!("tensor {name:?} is not in the checkpoint at {}", path.display());
        Error::TensorNotFound { path, name: name.to_string(), msg }
    }

    /// The error for a tensor `name` of a dtype rrome cannot edit.
    pub fn unsupported_dtype(name: &str, dtype: &str) -> Self {
        let msg = format!("tensor {name:?} has dtype {dtype}; rrome edits only F32, F16 and BF16 tensors");
        Error::UnsupportedDtype { name: name.to_string(), dtype: dtype.to_string(), msg }
    }

    /// Builds a checkpoint-layout error for `path`.
    pub fn checkpoint(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Checkpoint { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
}

/// Attaches a path to `io::Result`s: `file.read(..).at(&path)?`.
pub trait IoContext<T> {
    /// Converts the error into [`Error::Io`] naming `path`.
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
