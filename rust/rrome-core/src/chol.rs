//! Cholesky factorisation C0 + ridge·I = L Lᵀ, reused for many solves u = C0⁻¹ k.
//!
//! ROME needs C0⁻¹k for every edit; the reference code forms C0⁻¹ explicitly, which is slower
//! and loses accuracy on ill-conditioned statistics. Here the factor is computed once (d³/3
//! flops) and every right-hand side costs two triangular solves (2d² flops each column).

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch, LltError};
use faer::linalg::triangular_solve::{solve_lower_triangular_in_place, solve_upper_triangular_in_place};
use std::path::Path;

use faer::{Mat, MatMut, Par};
use rayon::prelude::*;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::fsutil::atomic_write;
use crate::safetensors_header::{self, TensorData};
use crate::square_file::{Kind, SquareFile};

/// Format tag written into factor files.
pub const CHOLESKY_FORMAT: &str = "rrome-cholesky/1";

/// Metadata keys the factor file format owns; user metadata cannot override them.
const RESERVED: [&str; 4] = ["format", "d", "ridge", "writer"];

/// A factor file, as [`SquareFile::read`] reads it.
const FACTOR_FILE: Kind<'static> =
    Kind { format: CHOLESKY_FORMAT, what: "an rrome Cholesky factor file", tensor: "factor", reserved: &RESERVED };

/// Tile width of the copy-and-check transposition in [`Cholesky::new`].
const TILE: usize = 64;

/// Columns per serially solved block of [`Cholesky::solve_vector`]: fewer blocks mean fewer
/// hand-offs between threads, larger ones more work on one thread (256 was fastest at d = 2048
/// and d = 6400 on 2 cores).
const VEC_BLOCK: usize = 256;

/// Fewest dot products per parallel task in the backward pass of [`Cholesky::solve_vector`].
const VEC_MIN_DOTS: usize = 64;

/// The rectangular update of the forward pass is cut into one piece per thread, in whole cache
/// lines of rows: long contiguous runs of each column are what the prefetcher streams best.
fn forward_task_rows(rows: usize) -> usize {
    (rows.div_ceil(rayon::current_num_threads()).div_ceil(8) * 8).max(64)
}

/// A Cholesky factor of a symmetric positive definite f64 matrix.
#[derive(Debug, Clone)]
pub struct Cholesky {
    l: Mat<f64>,
    ridge: f64,
}

impl Cholesky {
    /// Factors the row-major `d × d` matrix `a` plus `ridge` on the diagonal.
    ///
    /// # Errors
    /// [`Error::Shape`] if `a` is not square, not symmetric or not finite, or `ridge` is
    /// negative or not finite; [`Error::NotPositiveDefinite`] naming the failing pivot.
    pub fn new(a: &[f64], d: usize, ridge: f64) -> Result<Cholesky> {
        if d == 0 || a.len() != d * d {
            return Err(Error::Shape {
                msg: format!("Cholesky needs a square matrix; got {} values for d = {d}", a.len()),
            });
        }
        if !(ridge.is_finite() && ridge >= 0.0) {
            return Err(Error::Shape { msg: format!("ridge must be finite and non-negative, got {ridge}") });
        }
        if !a.iter().all(|v| v.is_finite()) {
            return Err(Error::Shape { msg: "matrix holds NaN or Inf".into() });
        }
        let tol = 1e-10 * a.iter().fold(0f64, |m, v| m.max(v.abs()));
        let mut l = Mat::<f64>::zeros(d, d);
        // Copy the lower triangle into the column-major factor and check symmetry, tile by tile
        // so that the strided side of the transposition stays in cache.
        let mut symmetric = true;
        for i0 in (0..d).step_by(TILE) {
            let i1 = (i0 + TILE).min(d);
            for j0 in (0..i1).step_by(TILE) {
                for j in j0..(j0 + TILE).min(i1) {
                    let col = l.col_as_slice_mut(j);
                    let up_row = &a[j * d..(j + 1) * d];
                    for i in i0.max(j)..i1 {
                        let lo = a[i * d + j];
                        symmetric &= (lo - up_row[i]).abs() <= tol;
                        col[i] = lo;
                    }
                }
            }
        }
        if !symmetric {
            // Name the first offending pair in row order.
            for i in 0..d {
                for j in 0..i {
                    let (lo, up) = (a[i * d + j], a[j * d + i]);
                    if (lo - up).abs() > tol {
                        return Err(Error::Shape {
                            msg: format!("matrix is not symmetric: a[{i},{j}] = {lo} but a[{j},{i}] = {up}"),
                        });
                    }
                }
            }
        }
        for i in 0..d {
            l[(i, i)] += ridge;
        }
        let par = Par::rayon(0);
        let mut mem = MemBuffer::new(cholesky_in_place_scratch::<f64>(d, par, Default::default()));
        let stack = MemStack::new(&mut mem);
        match cholesky_in_place(l.as_mut(), Default::default(), par, stack, Default::default()) {
            Ok(_) => {}
            Err(LltError::NonPositivePivot { index }) => {
                return Err(Error::NotPositiveDefinite { pivot: index, dim: d })
            }
        }
        for j in 0..d {
            l.col_as_slice_mut(j)[..j].fill(0.0);
        }
        Ok(Cholesky { l, ridge })
    }

    /// A factor computed earlier (by [`Cholesky::new`], then stored): the row-major `d × d`
    /// lower-triangular `l` with C0 + ridge·I = L Lᵀ. Nothing is recomputed.
    ///
    /// # Errors
    /// [`Error::Shape`] if `l` is not `d × d`, not finite, has a non-zero entry above the
    /// diagonal or a diagonal entry that is not positive, or `ridge` is negative or not finite.
    pub fn from_factor(l: &[f64], d: usize, ridge: f64) -> Result<Cholesky> {
        if d == 0 || l.len() != d * d {
            return Err(Error::Shape {
                msg: format!("a Cholesky factor must be square; got {} values for d = {d}", l.len()),
            });
        }
        if !(ridge.is_finite() && ridge >= 0.0) {
            return Err(Error::Shape { msg: format!("ridge must be finite and non-negative, got {ridge}") });
        }
        if !l.iter().all(|v| v.is_finite()) {
            return Err(Error::Shape { msg: "factor holds NaN or Inf".into() });
        }
        let mut m = Mat::<f64>::zeros(d, d);
        for i in 0..d {
            for j in 0..d {
                let v = l[i * d + j];
                if j > i && v != 0.0 {
                    return Err(Error::Shape { msg: format!("factor is not lower triangular: L[{i},{j}] = {v}") });
                }
                if j == i && v <= 0.0 {
                    return Err(Error::Shape { msg: format!("factor has a non-positive diagonal: L[{i},{i}] = {v}") });
                }
                m[(i, j)] = v;
            }
        }
        Ok(Cholesky { l: m, ridge })
    }

    /// Writes the factor (F64 tensor `factor`), its ridge and `metadata` to a safetensors file,
    /// atomically. Keys `format`, `d`, `ridge` and `writer` belong to the format.
    pub fn save(&self, path: &Path, metadata: &[(String, String)]) -> Result<()> {
        let bytes: Vec<u8> = self.factor().iter().flat_map(|v| v.to_le_bytes()).collect();
        let d = self.dim();
        let mut meta = vec![
            ("format".to_string(), CHOLESKY_FORMAT.to_string()),
            ("d".to_string(), d.to_string()),
            // `{:?}` prints the shortest string that parses back to the same f64.
            ("ridge".to_string(), format!("{:?}", self.ridge)),
            ("writer".to_string(), concat!("rrome ", env!("CARGO_PKG_VERSION")).to_string()),
        ];
        meta.extend(metadata.iter().filter(|(k, _)| !RESERVED.contains(&k.as_str())).cloned());
        atomic_write(path, |w| {
            safetensors_header::write(
                w,
                &[TensorData { name: "factor", dtype: Dtype::F64, shape: vec![d, d], data: &bytes }],
                &meta,
            )
        })
    }

    /// Reads a file written by [`Cholesky::save`], validating it like [`Cholesky::from_factor`].
    /// Returns the factor and the caller's metadata (the format's own keys left out).
    ///
    /// # Errors
    /// [`Error::Moments`] for a file that is not a valid factor file (a statistics-side file);
    /// [`Error::Header`] / [`Error::Io`] as the safetensors reader reports them.
    pub fn load(path: &Path) -> Result<(Cholesky, Vec<(String, String)>)> {
        let file = SquareFile::read(path, &FACTOR_FILE)?;
        let ridge: f64 = file.parse("ridge", "a number")?;
        let l: Vec<f64> = file.values().collect();
        let chol = Cholesky::from_factor(&l, file.d, ridge).map_err(|e| file.error(e.to_string()))?;
        Ok((chol, file.user_metadata()))
    }

    /// Turns this factor of A into the factor of A + `weight`·v vᵀ (`weight` > 0) in place, in
    /// O(d²), without refactoring: the classic rank-one update, one plane rotation per column
    /// (column k of L and the running vector x = √weight·v, below the diagonal), reading and
    /// writing each column once, contiguously. The diagonal stays positive, so the result is a
    /// factor whatever the sequence of updates. [`Cholesky::ridge`] keeps the ridge the factor
    /// was made with; the matrix it factors is then C0 + ridge·I + Σ weightᵢ vᵢ vᵢᵀ.
    ///
    /// # Errors
    /// [`Error::Shape`] if `v` is not `d` finite values or `weight` is not finite and positive.
    pub fn rank_one_update(&mut self, v: &[f64], weight: f64) -> Result<()> {
        let d = self.dim();
        if v.len() != d || !v.iter().all(|x| x.is_finite()) {
            return Err(Error::Shape { msg: format!("a rank-one update needs {d} finite values; got {}", v.len()) });
        }
        if !(weight.is_finite() && weight > 0.0) {
            return Err(Error::Shape {
                msg: format!("a rank-one update's weight must be finite and > 0, got {weight}"),
            });
        }
        let root = weight.sqrt();
        let mut x: Vec<f64> = v.iter().map(|a| a * root).collect();
        for k in 0..d {
            let xk = x[k];
            if xk == 0.0 {
                continue; // the identity rotation
            }
            let col = self.l.col_as_slice_mut(k);
            let lkk = col[k];
            let r = lkk.hypot(xk);
            let (c, s) = (r / lkk, xk / lkk);
            let inv_c = lkk / r;
            col[k] = r;
            // Multiplications only (no division per entry), so the loop vectorises; it is bound
            // by reading and writing the column.
            for (li, xi) in col[k + 1..].iter_mut().zip(&mut x[k + 1..]) {
                let new = (*li + s * *xi) * inv_c;
                *xi = c * *xi - s * new;
                *li = new;
            }
        }
        Ok(())
    }

    /// Matrix dimension.
    pub fn dim(&self) -> usize {
        self.l.nrows()
    }

    /// The ridge added to the diagonal before factoring.
    pub fn ridge(&self) -> f64 {
        self.ridge
    }

    /// The lower factor L, row-major.
    pub fn factor(&self) -> Vec<f64> {
        let d = self.dim();
        (0..d * d).map(|idx| self.l[(idx / d, idx % d)]).collect()
    }

    /// Solves (C0 + ridge·I) X = B for a row-major `d × m` right-hand side, in place.
    ///
    /// # Errors
    /// [`Error::Shape`] if `b.len()` is not `d × m`.
    pub fn solve_in_place(&self, b: &mut [f64], m: usize) -> Result<()> {
        let d = self.dim();
        if b.len() != d * m {
            return Err(Error::Shape { msg: format!("right-hand side holds {} values; expected {d} × {m}", b.len()) });
        }
        if m == 0 {
            return Ok(());
        }
        if m == 1 {
            self.solve_vector(b);
            return Ok(());
        }
        let par = Par::rayon(0);
        // Row-major d × m is column-major m × d; view it transposed as d × m.
        let mut x = MatMut::from_column_major_slice_mut(b, m, d).transpose_mut();
        solve_lower_triangular_in_place(self.l.as_ref(), x.as_mut(), par);
        solve_upper_triangular_in_place(self.l.as_ref().transpose(), x.as_mut(), par);
        Ok(())
    }

    /// Solves L Lᵀ x = b for one vector, in place.
    ///
    /// faer's triangular solves recurse down to 4 × 4 blocks, which for a single column turns
    /// into thousands of tiny matrix products (about 1 GFLOP/s). A single vector is bound by
    /// reading the factor, so this reads each column of L once per triangle, contiguously:
    /// blocks of `VEC_BLOCK` columns are solved serially, and the rectangular part beside each
    /// block (almost all of the work) is split across threads. Each entry's sum runs in a fixed
    /// order whatever the thread count, so the result is deterministic.
    fn solve_vector(&self, x: &mut [f64]) {
        let d = x.len();
        let l = &self.l;
        // Forward: L y = b, column by column (axpy on the part of column j below j).
        for j0 in (0..d).step_by(VEC_BLOCK) {
            let j1 = (j0 + VEC_BLOCK).min(d);
            for j in j0..j1 {
                let col = l.col_as_slice(j);
                let xj = x[j] / col[j];
                x[j] = xj;
                sub_scaled(&mut x[j + 1..j1], &col[j + 1..j1], xj);
            }
            let (head, tail) = x.split_at_mut(j1);
            let xb = &head[j0..j1];
            let task = forward_task_rows(tail.len());
            tail.par_chunks_mut(task).enumerate().for_each(|(t, chunk)| {
                let r0 = j1 + t * task;
                for (jj, &xj) in xb.iter().enumerate() {
                    sub_scaled(chunk, &l.col_as_slice(j0 + jj)[r0..r0 + chunk.len()], xj);
                }
            });
        }
        // Backward: Lᵀ x = y; row j of Lᵀ is column j of L, so each step is a dot product.
        let n_blocks = d.div_ceil(VEC_BLOCK);
        for blk in (0..n_blocks).rev() {
            let j0 = blk * VEC_BLOCK;
            let j1 = (j0 + VEC_BLOCK).min(d);
            let (head, tail) = x.split_at_mut(j1);
            head[j0..j1]
                .par_iter_mut()
                .with_min_len(VEC_MIN_DOTS)
                .enumerate()
                .for_each(|(jj, xj)| *xj -= dot(&l.col_as_slice(j0 + jj)[j1..], tail));
            for j in (j0..j1).rev() {
                let col = l.col_as_slice(j);
                let s = dot(&col[j + 1..j1], &x[j + 1..j1]);
                x[j] = (x[j] - s) / col[j];
            }
        }
    }
}

/// x_i −= a_i · s for every i.
fn sub_scaled(x: &mut [f64], a: &[f64], s: f64) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return unsafe { avx2::sub_scaled(x, a, s) };
    }
    sub_scaled_any(x, a, s)
}

/// Σ a_i b_i with eight partial sums (a fixed order for a given length).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return unsafe { avx2::dot(a, b) };
    }
    dot_any(a, b)
}

#[inline(always)]
fn sub_scaled_any(x: &mut [f64], a: &[f64], s: f64) {
    for (xi, ai) in x.iter_mut().zip(a) {
        *xi -= ai * s;
    }
}

#[inline(always)]
fn dot_any(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (xa, xb) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += xa[k] * xb[k];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// The same two loops compiled for 256-bit registers. Only AVX2, not FMA: the operations and
/// their order are those of the portable versions, so every CPU computes the same bits (the
/// single-vector solve reads L from cache at d ≈ 2048, where the wider loads make the forward
/// pass about 1.5× faster).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2")]
    pub(super) fn sub_scaled(x: &mut [f64], a: &[f64], s: f64) {
        super::sub_scaled_any(x, a, s)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn dot(a: &[f64], b: &[f64]) -> f64 {
        super::dot_any(a, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(d: usize) -> Vec<f64> {
        // A = B Bᵀ + d·I with a fixed B.
        let b: Vec<f64> = (0..d * d).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0).collect();
        let mut a = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                a[i * d + j] = (0..d).map(|k| b[i * d + k] * b[j * d + k]).sum::<f64>();
            }
            a[i * d + i] += d as f64;
        }
        a
    }

    #[test]
    fn rank_one_updates_match_a_refactored_sum() {
        // Against the naive way: add every w v vᵀ to A, then factor it again.
        let d = 57;
        let mut a = spd(d);
        let mut c = Cholesky::new(&a, d, 0.5).unwrap();
        for (t, w) in [0.3, 7.0, 1e-3, 42.0].into_iter().enumerate() {
            let v: Vec<f64> = (0..d).map(|i| ((i * (t + 3)) as f64 * 0.7).cos() * (1.0 + i as f64 / 10.0)).collect();
            c.rank_one_update(&v, w).unwrap();
            for i in 0..d {
                for j in 0..d {
                    a[i * d + j] += w * v[i] * v[j];
                }
            }
        }
        let want = Cholesky::new(&a, d, 0.5).unwrap();
        let scale = want.factor().iter().fold(0f64, |m, v| m.max(v.abs()));
        for (x, y) in c.factor().iter().zip(want.factor()) {
            assert!((x - y).abs() <= 1e-12 * scale, "{x} vs {y}");
        }
        assert_eq!(c.ridge(), 0.5);
        // A zero entry is skipped exactly; bad input is refused.
        assert!(c.rank_one_update(&vec![0.0; d], 1.0).is_ok());
        assert!(c.rank_one_update(&vec![1.0; d - 1], 1.0).is_err());
        assert!(c.rank_one_update(&vec![1.0; d], 0.0).is_err());
        assert!(c.rank_one_update(&vec![f64::NAN; d], 1.0).is_err());
    }

    #[test]
    fn solve_has_small_residual() {
        let d = 40;
        let a = spd(d);
        let c = Cholesky::new(&a, d, 0.0).unwrap();
        let m = 3;
        let rhs: Vec<f64> = (0..d * m).map(|i| (i as f64).sin()).collect();
        let mut x = rhs.clone();
        c.solve_in_place(&mut x, m).unwrap();
        let mut res = 0f64;
        let mut norm = 0f64;
        for i in 0..d {
            for col in 0..m {
                let ax: f64 = (0..d).map(|k| a[i * d + k] * x[k * m + col]).sum();
                res += (ax - rhs[i * m + col]).powi(2);
                norm += rhs[i * m + col].powi(2);
            }
        }
        assert!((res / norm).sqrt() < 1e-12);
    }

    #[test]
    fn vector_solve_matches_block_solve() {
        // Several column blocks and several parallel row tasks on the single-vector path.
        let d = 700;
        let a = spd(d);
        let c = Cholesky::new(&a, d, 0.5).unwrap();
        let rhs: Vec<f64> = (0..d).map(|i| (i as f64 * 0.7).sin()).collect();
        let mut x1 = rhs.clone();
        c.solve_in_place(&mut x1, 1).unwrap();
        // The same vector twice as a d × 2 block goes through faer's triangular solves.
        let mut x2: Vec<f64> = rhs.iter().flat_map(|&v| [v, v]).collect();
        c.solve_in_place(&mut x2, 2).unwrap();
        let (mut diff, mut norm) = (0f64, 0f64);
        for i in 0..d {
            assert_eq!(x2[2 * i], x2[2 * i + 1]);
            diff += (x1[i] - x2[2 * i]).powi(2);
            norm += x1[i].powi(2);
        }
        assert!((diff / norm).sqrt() < 1e-12, "relative difference {}", (diff / norm).sqrt());
        // And the residual of (A + 0.5 I) x = b.
        let (mut res, mut bn) = (0f64, 0f64);
        for i in 0..d {
            let ax: f64 = (0..d).map(|k| a[i * d + k] * x1[k]).sum::<f64>() + 0.5 * x1[i];
            res += (ax - rhs[i]).powi(2);
            bn += rhs[i].powi(2);
        }
        assert!((res / bn).sqrt() < 1e-12);
        // Bit for bit the same whatever the number of threads (the rows are cut per thread).
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut x = rhs.clone();
            pool.install(|| c.solve_in_place(&mut x, 1)).unwrap();
            assert!(x.iter().zip(&x1).all(|(a, b)| a.to_bits() == b.to_bits()), "{threads} threads differ");
        }
    }

    /// The dispatched kernels (AVX2 on this CPU where it has it) give the portable loops' bits.
    #[test]
    fn vector_kernels_match_portable_bits() {
        for n in [0, 1, 7, 8, 9, 31, 64, 1000] {
            let a: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin() * 1e3).collect();
            let b: Vec<f64> = (0..n).map(|i| (i as f64 * 1.13).cos() / 7.0).collect();
            assert_eq!(dot(&a, &b).to_bits(), dot_any(&a, &b).to_bits(), "dot, n = {n}");
            let (mut x, mut y) = (b.clone(), b.clone());
            sub_scaled(&mut x, &a, 0.3);
            sub_scaled_any(&mut y, &a, 0.3);
            assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "sub_scaled, n = {n}");
        }
    }

    #[test]
    fn asymmetry_is_found_in_any_tile() {
        let d = 150;
        let mut a = spd(d);
        a[140 * d + 3] += 1.0;
        match Cholesky::new(&a, d, 0.0) {
            Err(Error::Shape { msg }) => assert!(msg.contains("a[140,3]"), "{msg}"),
            other => panic!("expected a symmetry error, got {other:?}"),
        }
    }

    #[test]
    fn non_spd_names_the_pivot() {
        // diag(1, 1, -1): the third pivot fails.
        let a = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0];
        match Cholesky::new(&a, 3, 0.0) {
            Err(Error::NotPositiveDefinite { pivot, dim }) => assert_eq!((pivot, dim), (2, 3)),
            other => panic!("expected NotPositiveDefinite, got {other:?}"),
        }
        // A ridge large enough makes it SPD.
        assert!(Cholesky::new(&a, 3, 2.0).is_ok());
    }

    #[test]
    fn stored_factor_equals_fresh_one() {
        let d = 30;
        let a = spd(d);
        let c = Cholesky::new(&a, d, 0.25).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("chol.safetensors");
        c.save(&p, &[("stats".into(), "abc".into()), ("d".into(), "spoofed".into())]).unwrap();
        let (back, meta) = Cholesky::load(&p).unwrap();
        assert_eq!(back.factor(), c.factor());
        assert_eq!(back.ridge(), 0.25);
        assert_eq!(meta, vec![("stats".to_string(), "abc".to_string())]);
        let again = Cholesky::from_factor(&c.factor(), d, c.ridge()).unwrap();
        let rhs: Vec<f64> = (0..d).map(|i| (i as f64).cos()).collect();
        let (mut x1, mut x2) = (rhs.clone(), rhs.clone());
        c.solve_in_place(&mut x1, 1).unwrap();
        again.solve_in_place(&mut x2, 1).unwrap();
        assert_eq!(x1, x2);
    }

    #[test]
    fn from_factor_validates() {
        assert!(Cholesky::from_factor(&[1.0, 0.5, 0.0, 1.0], 2, 0.0).is_err()); // upper entry
        assert!(Cholesky::from_factor(&[1.0, 0.0, 0.5, 0.0], 2, 0.0).is_err()); // zero pivot
        assert!(Cholesky::from_factor(&[1.0, 0.0, 0.5, 1.0], 2, -1.0).is_err()); // ridge
        assert!(Cholesky::from_factor(&[1.0; 3], 2, 0.0).is_err()); // shape
        assert!(Cholesky::from_factor(&[1.0, 0.0, 0.5, 1.0], 2, 0.0).is_ok());
    }

    #[test]
    fn rejects_asymmetric_and_nan() {
        assert!(matches!(Cholesky::new(&[1.0, 0.5, 0.0, 1.0], 2, 0.0), Err(Error::Shape { .. })));
        assert!(matches!(Cholesky::new(&[f64::NAN, 0.0, 0.0, 1.0], 2, 0.0), Err(Error::Shape { .. })));
    }
}
