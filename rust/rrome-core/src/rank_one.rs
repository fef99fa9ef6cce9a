//! The rank-one write kernel: new = encode(decode(old) + Σ_k a_k b_kᵀ), rounded once.
//!
//! Works in stored coordinates: the tensor is `rows × cols` row-major and each term adds
//! `a[p]·b[q]` to element (p, q). For an `out_in` tensor a = scale·r and b = u; for `in_out` the
//! roles swap (a = u, b = scale·r), which gives the same f32 products because multiplication is
//! commutative. Each element is one f32 product and one f32 add per term, in term order, with
//! no fused multiply-add, so `torch` reproduces it bit for bit with
//! `w32 += torch.outer(scale * r, u)` term by term. Rows are processed in parallel blocks.

use rayon::prelude::*;

use crate::deltas::{Delta, Layout};
use crate::dtype::{all_finite, decode_f32, encode_f32, Dtype};

/// One term in stored coordinates.
pub struct Term {
    /// Row factor (length `rows`).
    pub a: Vec<f32>,
    /// Column factor (length `cols`).
    pub b: Vec<f32>,
}

impl Term {
    /// The stored-coordinate term of a delta whose shape has already been checked.
    pub fn from_delta(d: &Delta) -> Term {
        let s = d.scale as f32;
        let rs: Vec<f32> = d.r.iter().map(|v| v * s).collect();
        match d.layout {
            Layout::OutIn => Term { a: rs, b: d.u.clone() },
            Layout::InOut => Term { a: d.u.clone(), b: rs },
        }
    }
}

/// Rows handled by one parallel task.
const ROWS_PER_TASK: usize = 16;

/// Writes the edited bytes of a `rows × cols` tensor of `dtype` into `new` (same length as
/// `old`). Returns whether every result is finite.
///
/// # Panics
/// If lengths disagree with `rows`, `cols` and the dtype, or the dtype is not editable.
pub fn apply(dtype: Dtype, rows: usize, cols: usize, old: &[u8], terms: &[Term], new: &mut [u8]) -> bool {
    let es = dtype.size();
    assert_eq!(old.len(), rows * cols * es);
    assert_eq!(new.len(), old.len());
    for t in terms {
        assert_eq!((t.a.len(), t.b.len()), (rows, cols));
    }
    let row_bytes = cols * es;
    if row_bytes == 0 {
        return true;
    }
    new.par_chunks_mut(row_bytes * ROWS_PER_TASK)
        .zip(old.par_chunks(row_bytes * ROWS_PER_TASK))
        .enumerate()
        .map(|(blk, (dst, src))| {
            let mut acc = vec![0f32; cols];
            let mut finite = true;
            for (i, (d_row, s_row)) in dst.chunks_mut(row_bytes).zip(src.chunks(row_bytes)).enumerate() {
                let p = blk * ROWS_PER_TASK + i;
                decode_f32(dtype, s_row, &mut acc);
                for t in terms {
                    let ap = t.a[p];
                    for (x, bq) in acc.iter_mut().zip(&t.b) {
                        *x += ap * bq;
                    }
                }
                encode_f32(dtype, &acc, d_row);
                finite &= all_finite(dtype, d_row);
            }
            finite
        })
        .reduce(|| true, |a, b| a && b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_elementwise_reference() {
        let (rows, cols) = (37, 5);
        let old_f: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let terms = vec![
            Term { a: (0..rows).map(|i| i as f32 * 0.01).collect(), b: (0..cols).map(|j| 1.0 - j as f32).collect() },
            Term { a: (0..rows).map(|i| (i as f32).cos()).collect(), b: (0..cols).map(|j| j as f32 * 3.0).collect() },
        ];
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let mut old = vec![0u8; rows * cols * dtype.size()];
            encode_f32(dtype, &old_f, &mut old);
            let mut new = vec![0u8; old.len()];
            assert!(apply(dtype, rows, cols, &old, &terms, &mut new));
            let mut dec = vec![0f32; rows * cols];
            decode_f32(dtype, &old, &mut dec);
            for p in 0..rows {
                for q in 0..cols {
                    let mut x = dec[p * cols + q];
                    for t in &terms {
                        x += t.a[p] * t.b[q];
                    }
                    dec[p * cols + q] = x;
                }
            }
            let mut want = vec![0u8; old.len()];
            encode_f32(dtype, &dec, &mut want);
            assert_eq!(new, want, "{dtype}");
        }
    }

    #[test]
    fn reports_overflow() {
        let old = [0u8; 2 * 2];
        let mut new = [0u8; 4];
        let t = Term { a: vec![1e3, 1.0], b: vec![1e3] };
        // 1e6 overflows f16 (max 65504).
        assert!(!apply(Dtype::F16, 2, 1, &old, &[t], &mut new));
    }
}
