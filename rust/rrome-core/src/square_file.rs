//! Reading rrome's square-matrix files: one F64 `[d, d]` tensor in a safetensors file, with a
//! format tag and the width `d` in its metadata, beside keys of its own kind and the caller's.
//! The statistics (`moments/file.rs`, the sum) and the Cholesky factor (`chol.rs`, the factor)
//! are such files; both are read here, each checked the same way.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::safetensors_header;

/// One kind of square-matrix file.
pub struct Kind<'a> {
    /// The format tag the file's metadata must hold under `format`.
    pub format: &'a str,
    /// What a file of the kind is, for messages: "an rrome statistics file".
    pub what: &'a str,
    /// The name of the tensor that holds the matrix.
    pub tensor: &'a str,
    /// The metadata keys the kind owns (`format`, `d` and its own); the others are the caller's.
    pub reserved: &'a [&'a str],
}

/// A square-matrix file as read, its format, width and tensor checked.
pub struct SquareFile {
    path: PathBuf,
    /// The width: the matrix is `d × d`.
    pub d: usize,
    data: Vec<u8>,
    begin: usize,
    end: usize,
    metadata: Vec<(String, String)>,
    reserved: Vec<String>,
}

impl SquareFile {
    /// Reads `path` as a file of `kind`: its format tag, its width `d` and a tensor named
    /// `kind.tensor` that is F64 `[d, d]`.
    ///
    /// # Errors
    /// [`Error::Moments`] for a file that is not a valid file of the kind;
    /// [`Error::Header`] / [`Error::Io`] as the safetensors reader reports them.
    pub fn read(path: &Path, kind: &Kind<'_>) -> Result<SquareFile> {
        let (header, data) = safetensors_header::read_all(path)?;
        let bad = |msg: String| Error::Moments { path: path.to_path_buf(), msg };
        if header.meta("format") != Some(kind.format) {
            return Err(bad(format!(
                "not {} (format {:?}, expected {:?})",
                kind.what,
                header.meta("format"),
                kind.format
            )));
        }
        let d: usize = header
            .meta("d")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("metadata \"d\" missing or not an integer".into()))?;
        let name = kind.tensor;
        let t = header.get(name).ok_or_else(|| bad(format!("tensor {name:?} missing")))?;
        if t.dtype != Dtype::F64 || t.shape != [d, d] {
            return Err(bad(format!("tensor {name:?} is {} {:?}, expected F64 [{d}, {d}]", t.dtype, t.shape)));
        }
        let (begin, end) = (t.begin as usize, t.end as usize);
        Ok(SquareFile {
            path: path.to_path_buf(),
            d,
            data,
            begin,
            end,
            metadata: header.metadata,
            reserved: kind.reserved.iter().map(|k| k.to_string()).collect(),
        })
    }

    /// An [`Error::Moments`] about this file.
    pub fn error(&self, msg: String) -> Error {
        Error::Moments { path: self.path.clone(), msg }
    }

    /// The metadata value of `key` parsed as `T`; `expected` says what it must be ("an integer").
    ///
    /// # Errors
    /// [`Error::Moments`]: the key is missing or does not parse.
    pub fn parse<T: FromStr>(&self, key: &str, expected: &str) -> Result<T> {
        let value = self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        value
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.error(format!("metadata {key:?} missing or not {expected}")))
    }

    /// The matrix, row by row.
    pub fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.data[self.begin..self.end].chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
    }

    /// The caller's metadata: every key but those the kind owns, in file order.
    pub fn user_metadata(&self) -> Vec<(String, String)> {
        self.metadata.iter().filter(|(k, _)| !self.reserved.contains(k)).cloned().collect()
    }
}
