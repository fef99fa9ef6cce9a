//! The statistics file: the full symmetric sum (F64 [d, d]) in a safetensors file, with the
//! count, width and provenance in its metadata.

use std::path::Path;

use super::{layout, SecondMoment};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::fsutil::atomic_write;
use crate::safetensors_header::{self, TensorData};
use crate::square_file::{Kind, SquareFile};

/// Format tag written into statistics files.
pub const MOMENTS_FORMAT: &str = "rrome-moments/1";

/// Metadata keys the file format owns; user metadata cannot override them.
const RESERVED: [&str; 4] = ["format", "count", "d", "writer"];

/// A statistics file, as [`SquareFile::read`] reads it.
const MOMENTS_FILE: Kind<'static> =
    Kind { format: MOMENTS_FORMAT, what: "an rrome statistics file", tensor: "sum", reserved: &RESERVED };

impl SecondMoment {
    /// Writes the sum, count, width and metadata to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let sum = self.sum();
        let bytes: Vec<u8> = sum.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut meta = vec![
            ("format".to_string(), MOMENTS_FORMAT.to_string()),
            ("count".to_string(), self.count.to_string()),
            ("d".to_string(), self.d.to_string()),
            ("writer".to_string(), concat!("rrome ", env!("CARGO_PKG_VERSION")).to_string()),
        ];
        meta.extend(self.metadata.iter().filter(|(k, _)| !RESERVED.contains(&k.as_str())).cloned());
        atomic_write(path, |w| {
            safetensors_header::write(
                w,
                &[TensorData { name: "sum", dtype: Dtype::F64, shape: vec![self.d, self.d], data: &bytes }],
                &meta,
            )
        })
    }

    /// Reads a file written by [`SecondMoment::save`], validating it.
    pub fn load(path: &Path) -> Result<SecondMoment> {
        let file = SquareFile::read(path, &MOMENTS_FILE)?;
        let d = file.d;
        let count: u64 = file.parse("count", "an integer")?;
        let mut m = SecondMoment::new(d).map_err(|e| file.error(e.to_string()))?;
        for (idx, v) in file.values().enumerate() {
            if !v.is_finite() {
                return Err(file.error(format!("sum holds a non-finite value at index {idx}")));
            }
            let (i, j) = (idx / d, idx % d);
            if i >= j {
                m.lower[layout::index(d, i, j)] = v;
            }
        }
        m.count = count;
        m.metadata = file.user_metadata();
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c0.safetensors");
        let mut m = SecondMoment::new(3).unwrap();
        m.update(&[1.0, 2.0, 3.0, -1.0, 0.5, 4.0]).unwrap();
        m.set_metadata(vec![("model".into(), "tiny".into())]);
        m.save(&p).unwrap();
        let back = SecondMoment::load(&p).unwrap();
        assert_eq!(back.count(), 2);
        assert_eq!(back.sum(), m.sum());
        assert_eq!(back.metadata(), &[("model".to_string(), "tiny".to_string())]);
    }
}
