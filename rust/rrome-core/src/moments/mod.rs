//! The running second moment Σ k kᵀ of layer keys: the statistics C0 of ROME.
//!
//! Keys arrive as f32 batches (N × d, row-major, as torch hands them over). Each batch is
//! widened to f64 and only the lower triangle of Kᵀ K is accumulated (a symmetric rank-N update
//! does half the flops of a full product). Products of two f32 values are exact in f64, so the
//! only rounding is in the f64 sums. A moment is a count plus a sum, so partial moments from
//! many workers merge by addition; [`SecondMoment::save`] writes both into a safetensors file.
//!
//! The storage order of the triangle is in `layout`, the update kernels in `kernels` (and
//! `avx2`), the file format in `file`.

mod file;
mod kernels;
mod layout;

#[cfg(target_arch = "x86_64")]
mod avx2;

use crate::error::{Error, Result};

pub use file::MOMENTS_FORMAT;

/// Accumulator of Σ k kᵀ over keys of width `d`, in f64.
#[derive(Debug, Clone)]
pub struct SecondMoment {
    d: usize,
    count: u64,
    /// The lower triangle (diagonal included), stored as [`layout`] describes.
    lower: Vec<f64>,
    metadata: Vec<(String, String)>,
}

impl SecondMoment {
    /// An empty accumulator for keys of width `d`.
    pub fn new(d: usize) -> Result<Self> {
        if d == 0 {
            return Err(Error::Shape { msg: "SecondMoment width d must be positive".into() });
        }
        let len = layout::len(d).ok_or_else(|| Error::Shape { msg: format!("d = {d} is too large") })?;
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
        kernels::add_keys(&mut self.lower, d, keys);
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
                m.lower[layout::index(d, i, j)] = lo;
            }
        }
        m.count = count;
        Ok(m)
    }

    /// The full symmetric sum Σ k kᵀ, row-major d × d.
    pub fn sum(&self) -> Vec<f64> {
        let d = self.d;
        let mut out = vec![0f64; d * d];
        layout::for_each(d, |i, j, at| {
            let v = self.lower[at];
            out[i * d + j] = v;
            out[j * d + i] = v;
        });
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
}

#[cfg(test)]
pub(crate) mod test_keys {
    //! Random keys and a naive reference sum, shared by the tests of this module's files.

    pub(crate) fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub(crate) fn naive(keys: &[f32], d: usize) -> Vec<f64> {
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

    pub(crate) fn rel_err(a: &[f64], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::test_keys::{lcg, naive, rel_err};
    use super::*;

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
    fn matches_naive_sum_across_blocks() {
        // Three blocks of the layout, the last one partial.
        let d = 2 * layout::BLOCK_ROWS + 37;
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
}
