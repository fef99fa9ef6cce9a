//! The lower-triangle update lower += Kᵀ K: dispatch, and the portable faer path.

use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::layout;

/// lower += Kᵀ K on the lower triangle (in the [`layout`] order) for a row-major `n × d` f32
/// batch `keys`: the packed AVX2 kernel where the CPU has AVX2 and FMA, faer's gemm elsewhere.
/// Both give the same sums up to the order of the f64 additions.
pub(super) fn add_keys(lower: &mut [f64], d: usize, keys: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        avx2::add_keys(lower, d, keys);
        return;
    }
    add_keys_faer(lower, d, keys);
}

/// Rows converted to f64 at a time by the faer path (bounds its scratch to `CHUNK × d` f64).
const CHUNK: usize = 1024;

/// The portable path: widen and transpose `CHUNK` rows at a time (faer's gemm runs about twice
/// as fast on a column-major K as on the row-major layout the keys arrive in), then per block
/// of rows, in parallel: one gemm left of the diagonal and one lower-triangular gemm on it,
/// single-threaded, into a column-major scratch that is then added into the tiles.
fn add_keys_faer(lower: &mut [f64], d: usize, keys: &[f32]) {
    use layout::{TILE_COLS, TILE_LEN, TILE_ROWS};
    let n = keys.len() / d;
    let mut wide = vec![0f64; CHUNK.min(n.max(1)) * d];
    let mut blocks = layout::split_blocks(d, lower);
    for rows in keys.chunks(CHUNK * d) {
        let m = rows.len() / d;
        let buf = &mut wide[..m * d];
        for i0 in (0..m).step_by(64) {
            for j in 0..d {
                let col = &mut buf[j * m..(j + 1) * m];
                for i in i0..(i0 + 64).min(m) {
                    col[i] = f64::from(rows[i * d + j]);
                }
            }
        }
        let k = MatRef::from_column_major_slice(buf, m, d);
        blocks.par_iter_mut().for_each(|(i0, block)| {
            let i0 = *i0;
            let h = layout::BLOCK_ROWS.min(d - i0);
            let i1 = i0 + h;
            let mut scratch = vec![0f64; h * i1];
            let s = MatMut::from_column_major_slice_mut(&mut scratch, h, i1);
            let k_rows = k.subcols(i0, h).transpose();
            let (left, diag) = s.split_at_col_mut(i0);
            if i0 > 0 {
                matmul(left, Accum::Replace, k_rows, k.subcols(0, i0), 1.0, Par::Seq);
            }
            triangular::matmul(
                diag,
                BlockStructure::TriangularLower,
                Accum::Replace,
                k_rows,
                BlockStructure::Rectangular,
                k.subcols(i0, h),
                BlockStructure::Rectangular,
                1.0,
                Par::Seq,
            );
            let per_group = h.div_ceil(TILE_ROWS);
            for (slot, tile) in block.chunks_exact_mut(TILE_LEN).enumerate() {
                let (g, t) = (slot / per_group, slot % per_group);
                for jj in 0..TILE_COLS {
                    let j = g * TILE_COLS + jj;
                    for r in 0..TILE_ROWS {
                        let i = i0 + t * TILE_ROWS + r;
                        if j <= i && i < i1 {
                            tile[jj * TILE_ROWS + r] += scratch[j * h + (i - i0)];
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_keys::{lcg, naive, rel_err};
    use super::super::SecondMoment;
    use super::*;

    type Kernel = fn(&mut [f64], usize, &[f32]);

    /// Both kernels directly (whichever this CPU runs), over widths that leave partial panels,
    /// partial 6-column groups and partial row blocks, rows cut into several tasks (d = 450 >
    /// 384 columns), and batches that end mid-`KC`/`CHUNK`.
    #[test]
    fn both_kernels_match_naive_sum() {
        let mut seed = 17;
        for (d, n) in [
            (1, 3),
            (5, 1),
            (13, 7),
            (24, 9),
            (25, 300),
            (61, 1100),
            (200, 31),
            (2 * layout::BLOCK_ROWS + 37, 40),
            (450, 9),
        ] {
            let keys: Vec<f32> = (0..n * d).map(|_| lcg(&mut seed)).collect();
            let want = naive(&keys, d);
            let mut kernels: Vec<(&str, Kernel)> = vec![("faer", add_keys_faer)];
            #[cfg(target_arch = "x86_64")]
            if avx2::available() {
                kernels.push(("avx2", avx2::add_keys));
            }
            for (name, kernel) in kernels {
                let mut m = SecondMoment::new(d).unwrap();
                kernel(&mut m.lower, d, &keys);
                let err = rel_err(&m.sum(), &want);
                assert!(err < 1e-13, "{name} kernel, d = {d}, n = {n}: relative error {err:e}");
            }
        }
    }
}
