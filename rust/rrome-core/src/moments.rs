//! The running second moment Σ k kᵀ of layer keys: the statistics C0 of ROME.
//!
//! Keys arrive as f32 batches (N × d, row-major, as torch hands them over). Each batch is
//! widened to f64 and only the lower triangle of Kᵀ K is accumulated (a symmetric rank-N update
//! does half the flops of a full product). Products of two f32 values are exact in f64, so the
//! only rounding is in the f64 sums. A moment is a count plus a sum, so partial moments from
//! many workers merge by addition; [`SecondMoment::save`] writes both into a safetensors file.

use std::path::Path;

use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::fsutil::atomic_write;
use crate::safetensors_header::{self, TensorData};

/// Format tag written into statistics files.
pub const MOMENTS_FORMAT: &str = "rrome-moments/1";

/// Metadata keys the file format owns; user metadata cannot override them.
const RESERVED: [&str; 4] = ["format", "count", "d", "writer"];

/// Rows converted to f64 at a time (bounds the scratch buffer to `CHUNK × d` f64).
const CHUNK: usize = 1024;

/// Side of the square tiles of the lower triangle; each tile is one single-threaded gemm.
const TILE: usize = 512;

/// acc += Kᵀ K on the lower triangle (diagonal included).
///
/// The lower triangle is cut into `TILE × TILE` tiles; an off-diagonal tile is one full gemm
/// and a diagonal tile a gemm that writes only its lower triangle, so the flops are those of
/// the triangle. The tiles run in parallel on rayon's pool, each gemm on one thread: equal,
/// independent pieces of work keep both cores busy at the gemm's full single-thread rate,
/// where splitting each (often small) gemm across threads did not.
fn lower_update(acc: MatMut<'_, f64>, k: MatRef<'_, f64>) {
    let d = k.ncols();
    let mut tiles = Vec::new();
    let mut rest = acc;
    let mut c0 = 0;
    while c0 < d {
        let w = TILE.min(d - c0);
        let (block, right) = rest.split_at_col_mut(w);
        rest = right;
        // Rows c0.. of this column block: the diagonal tile first, then the ones below it.
        let (_, mut below) = block.split_at_row_mut(c0);
        let mut r0 = c0;
        while r0 < d {
            let h = TILE.min(d - r0);
            let (tile, next) = below.split_at_row_mut(h);
            below = next;
            tiles.push((tile, r0, c0));
            r0 += h;
        }
        c0 += w;
    }
    tiles.into_par_iter().for_each(|(tile, r0, c0)| {
        let (lhs, rhs) = (k.subcols(r0, tile.nrows()).transpose(), k.subcols(c0, tile.ncols()));
        if r0 == c0 {
            triangular::matmul(
                tile,
                BlockStructure::TriangularLower,
                Accum::Add,
                lhs,
                BlockStructure::Rectangular,
                rhs,
                BlockStructure::Rectangular,
                1.0,
                Par::Seq,
            );
        } else {
            matmul(tile, Accum::Add, lhs, rhs, 1.0, Par::Seq);
        }
    });
}

/// Accumulator of Σ k kᵀ over keys of width `d`, in f64.
#[derive(Debug, Clone)]
pub struct SecondMoment {
    d: usize,
    count: u64,
    /// Column-major d × d; only the lower triangle (diagonal included) is maintained.
    lower: Vec<f64>,
    metadata: Vec<(String, String)>,
}

impl SecondMoment {
    /// An empty accumulator for keys of width `d`.
    pub fn new(d: usize) -> Result<Self> {
        if d == 0 {
            return Err(Error::Shape { msg: "SecondMoment width d must be positive".into() });
        }
        let len = d.checked_mul(d).ok_or_else(|| Error::Shape { msg: format!("d = {d} is too large") })?;
        Ok(SecondMoment { d, count: 0, lower: vec![0.0; len], metadata: Vec::new() })
    }

    /// Key width.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// Number of keys accumulated.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Free-form provenance (model, layer, corpus, ...), saved with the file.
    pub fn metadata(&self) -> &[(String, String)] {
        &self.metadata
    }

    /// Replaces the provenance metadata.
    pub fn set_metadata(&mut self, metadata: Vec<(String, String)>) {
        self.metadata = metadata;
    }

    /// Adds the keys of a row-major `n × d` f32 batch.
    ///
    /// # Errors
    /// [`Error::Shape`] if `keys.len()` is not a multiple of `d`.
    pub fn update(&mut self, keys: &[f32]) -> Result<()> {
        let d = self.d;
        if !keys.len().is_multiple_of(d) {
            return Err(Error::Shape {
                msg: format!("keys hold {} values, not a whole number of rows of width {d}", keys.len()),
            });
        }
        let n = keys.len() / d;
        let mut wide = vec![0f64; CHUNK.min(n.max(1)) * d];
        for rows in keys.chunks(CHUNK * d) {
            let m = rows.len() / d;
            let buf = &mut wide[..m * d];
            // Widen and transpose in one pass: faer's gemm runs about twice as fast on a
            // column-major K as on the row-major layout the keys arrive in.
            for i0 in (0..m).step_by(64) {
                for j in 0..d {
                    let col = &mut buf[j * m..(j + 1) * m];
                    for i in i0..(i0 + 64).min(m) {
                        col[i] = f64::from(rows[i * d + j]);
                    }
                }
            }
            let k = MatRef::from_column_major_slice(buf, m, d);
            let acc = MatMut::from_column_major_slice_mut(&mut self.lower, d, d);
            lower_update(acc, k);
        }
        self.count += n as u64;
        Ok(())
    }

    /// Adds another accumulator's keys (sums and counts add exactly as f64/u64).
    pub fn merge(&mut self, other: &SecondMoment) -> Result<()> {
        if other.d != self.d {
            return Err(Error::Shape { msg: format!("cannot merge moments of width {} and {}", self.d, other.d) });
        }
        for (a, b) in self.lower.iter_mut().zip(&other.lower) {
            *a += b;
        }
        self.count += other.count;
        Ok(())
    }

    /// An accumulator holding a given sum Σ k kᵀ (row-major `d × d`) and key count: how a
    /// moment reduced across workers (e.g. an all-reduce of their [`SecondMoment::sum`]s) is
    /// turned back into an accumulator. Only the lower triangle is kept; the upper one must
    /// agree with it to 1e-10 relative (sums added in different orders differ by rounding).
    ///
    /// # Errors
    /// [`Error::Shape`] if `sum` is not `d × d`, holds NaN or Inf, or is not symmetric.
    pub fn from_sum(sum: &[f64], d: usize, count: u64) -> Result<SecondMoment> {
        let mut m = SecondMoment::new(d)?;
        if sum.len() != d * d {
            return Err(Error::Shape { msg: format!("sum holds {} values; expected {d} × {d}", sum.len()) });
        }
        if !sum.iter().all(|v| v.is_finite()) {
            return Err(Error::Shape { msg: "sum holds NaN or Inf".into() });
        }
        let tol = 1e-10 * sum.iter().fold(0f64, |acc, v| acc.max(v.abs()));
        for i in 0..d {
            for j in 0..=i {
                let (lo, up) = (sum[i * d + j], sum[j * d + i]);
                if (lo - up).abs() > tol {
                    return Err(Error::Shape {
                        msg: format!("sum is not symmetric: s[{i},{j}] = {lo} but s[{j},{i}] = {up}"),
                    });
                }
                m.lower[j * d + i] = lo;
            }
        }
        m.count = count;
        Ok(m)
    }

    /// The full symmetric sum Σ k kᵀ, row-major d × d.
    pub fn sum(&self) -> Vec<f64> {
        let d = self.d;
        let mut out = vec![0f64; d * d];
        for j in 0..d {
            for i in j..d {
                let v = self.lower[j * d + i];
                out[i * d + j] = v;
                out[j * d + i] = v;
            }
        }
        out
    }

    /// The mean E[k kᵀ] = Σ k kᵀ / count, row-major d × d.
    ///
    /// # Errors
    /// [`Error::Shape`] if no key has been accumulated.
    pub fn moment(&self) -> Result<Vec<f64>> {
        if self.count == 0 {
            return Err(Error::Shape { msg: "SecondMoment has seen no keys yet".into() });
        }
        let inv = self.count as f64;
        Ok(self.sum().into_iter().map(|v| v / inv).collect())
    }

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
        let (header, data) = safetensors_header::read_all(path)?;
        let bad = |msg: String| Error::Moments { path: path.to_path_buf(), msg };
        if header.meta("format") != Some(MOMENTS_FORMAT) {
            return Err(bad(format!(
                "not an rrome statistics file (format {:?}, expected {MOMENTS_FORMAT:?})",
                header.meta("format")
            )));
        }
        let d: usize = header
            .meta("d")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("metadata \"d\" missing or not an integer".into()))?;
        let count: u64 = header
            .meta("count")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("metadata \"count\" missing or not an integer".into()))?;
        let t = header.get("sum").ok_or_else(|| bad("tensor \"sum\" missing".into()))?;
        if t.dtype != Dtype::F64 || t.shape != [d, d] {
            return Err(bad(format!("tensor \"sum\" is {} {:?}, expected F64 [{d}, {d}]", t.dtype, t.shape)));
        }
        let mut m = SecondMoment::new(d).map_err(|e| bad(e.to_string()))?;
        let raw = &data[t.begin as usize..t.end as usize];
        for (idx, c) in raw.chunks_exact(8).enumerate() {
            let v = f64::from_le_bytes(c.try_into().expect("8 bytes"));
            if !v.is_finite() {
                return Err(bad(format!("sum holds a non-finite value at index {idx}")));
            }
            let (i, j) = (idx / d, idx % d);
            if i >= j {
                m.lower[j * d + i] = v;
            }
        }
        m.count = count;
        m.metadata = header.metadata.iter().filter(|(k, _)| !RESERVED.contains(&k.as_str())).cloned().collect();
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn naive(keys: &[f32], d: usize) -> Vec<f64> {
        let n = keys.len() / d;
        let mut out = vec![0f64; d * d];
        for r in 0..n {
            for i in 0..d {
                for j in 0..d {
                    out[i * d + j] += f64::from(keys[r * d + i]) * f64::from(keys[r * d + j]);
                }
            }
        }
        out
    }

    fn rel_err(a: &[f64], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    }

    #[test]
    fn matches_naive_sum_across_chunks() {
        let d = 13;
        let mut seed = 7;
        // 2500 rows span three CHUNKs, the last one partial.
        let keys: Vec<f32> = (0..2500 * d).map(|_| lcg(&mut seed)).collect();
        let mut m = SecondMoment::new(d).unwrap();
        m.update(&keys[..700 * d]).unwrap();
        m.update(&keys[700 * d..]).unwrap();
        assert_eq!(m.count(), 2500);
        assert!(rel_err(&m.sum(), &naive(&keys, d)) < 1e-13);
    }

    #[test]
    fn matches_naive_sum_across_tiles() {
        // d > TILE exercises the tiling, with a last tile narrower than the others.
        let d = TILE + 37;
        let mut seed = 11;
        let keys: Vec<f32> = (0..40 * d).map(|_| lcg(&mut seed)).collect();
        let mut m = SecondMoment::new(d).unwrap();
        m.update(&keys).unwrap();
        assert!(rel_err(&m.sum(), &naive(&keys, d)) < 1e-13);
    }

    #[test]
    fn merge_equals_whole() {
        let d = 9;
        let mut seed = 3;
        let keys: Vec<f32> = (0..300 * d).map(|_| lcg(&mut seed) * 1e3).collect();
        let mut whole = SecondMoment::new(d).unwrap();
        whole.update(&keys).unwrap();
        let mut a = SecondMoment::new(d).unwrap();
        let mut b = SecondMoment::new(d).unwrap();
        a.update(&keys[..100 * d]).unwrap();
        b.update(&keys[100 * d..]).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.count(), whole.count());
        assert!(rel_err(&a.sum(), &whole.sum()) < 1e-14);
        assert!(a.merge(&SecondMoment::new(4).unwrap()).is_err());
    }

    #[test]
    fn from_sum_round_trips_and_validates() {
        let d = 5;
        let mut seed = 5;
        let keys: Vec<f32> = (0..50 * d).map(|_| lcg(&mut seed)).collect();
        let mut m = SecondMoment::new(d).unwrap();
        m.update(&keys).unwrap();
        let back = SecondMoment::from_sum(&m.sum(), d, m.count()).unwrap();
        assert_eq!(back.sum(), m.sum());
        assert_eq!(back.count(), 50);
        assert!(SecondMoment::from_sum(&[1.0; 3], 2, 1).is_err());
        assert!(SecondMoment::from_sum(&[1.0, 2.0, 0.0, 1.0], 2, 1).is_err());
        assert!(SecondMoment::from_sum(&[f64::NAN, 0.0, 0.0, 1.0], 2, 1).is_err());
    }

    #[test]
    fn rejects_ragged_batch_and_empty_moment() {
        let mut m = SecondMoment::new(4).unwrap();
        assert!(matches!(m.update(&[1.0; 6]), Err(Error::Shape { .. })));
        assert!(m.moment().is_err());
    }

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
