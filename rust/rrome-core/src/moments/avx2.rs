//! The lower-triangle update as a packed AVX2 + FMA kernel, reading the f32 keys directly.
//!
//! faer's gemm needs the keys widened to f64 and transposed first, and it reached about 60 %
//! of the f64 FMA peak here; this kernel does what a gemm does (pack, then 8 × 6 register
//! tiles) with the symmetric update's own shape:
//!
//! - `KC` keys at a time are widened straight into a packed buffer `P` of 4-column panels:
//!   panel `g` holds columns `4g..4g+4` of those keys, key after key (`P[g][r][0..4]`), zero
//!   beyond `d`. The same buffer serves both operands of Kᵀ K: eight rows of the accumulator
//!   are two consecutive panels, six columns are six scalars taken from one or two panels.
//!   Panels start `4 KC + PANEL_PAD` values apart: at exactly 4 KC (8 KiB) the panels read
//!   together would all map to the same L1 cache sets.
//! - Each block of the [`layout`] (96 rows; their panels stay in L2) is one rayon task,
//!   largest (lowest) blocks first. A block walks its column groups left of its diagonal and
//!   runs the 8 × 6 micro-kernel down each: twelve ymm accumulators, two loads and six
//!   broadcasts per key, `KC` keys deep, then one add into the tile (a sequential stream).
//!   Tiles that cross the diagonal or the edge add only their lower, in-bounds entries.
//!
//! Each accumulator entry is a sum of exact f64 products (f32 × f32 fits in f64's 53 bits;
//! an FMA of an exact product rounds exactly like an add), so the result differs from any
//! other summation order only by the rounding of the f64 sums.

use std::arch::x86_64::{
    __m256d, _mm256_add_pd, _mm256_broadcast_sd, _mm256_fmadd_pd, _mm256_loadu_pd, _mm256_setzero_pd, _mm256_storeu_pd,
};

use rayon::prelude::*;

use super::layout::{self, TILE_COLS as NR, TILE_LEN, TILE_ROWS as MR};

/// Keys per packed block (the depth of each micro-kernel call).
const KC: usize = 256;
/// Panels packed per rayon task when packing.
const PACK_PANELS: usize = 16;
/// Values between the end of one packed panel and the start of the next (two cache lines).
const PANEL_PAD: usize = 16;
/// Column groups (of 6) per rayon task: blocks low in the triangle are cut into pieces of
/// at most 384 columns, so that tasks stay small and many next to the largest block's work.
const GROUPS_PER_TASK: usize = 64;

pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// lower += Kᵀ K (lower triangle, [`layout`] order) for row-major `n × d` f32 keys.
pub(super) fn add_keys(lower: &mut [f64], d: usize, keys: &[f32]) {
    assert!(available(), "the AVX2 moment kernel needs AVX2 and FMA");
    assert_eq!(Some(lower.len()), layout::len(d));
    assert!(keys.len().is_multiple_of(d));
    let n = keys.len() / d;
    if n == 0 {
        return;
    }
    // Packed columns: whole 8-row panels and whole 6-column groups (24 = lcm(8, 6, 4)).
    let dp = d.div_ceil(24) * 24;
    let mut packed = vec![0f64; dp / 4 * (4 * KC.min(n) + PANEL_PAD)];
    // Tasks: (first row, first column group, storage of those groups of that block).
    let mut tasks = Vec::new();
    for (i0, block) in layout::split_blocks(d, lower) {
        let group_len = layout::tiles_per_group(d, i0 / layout::BLOCK_ROWS) * TILE_LEN;
        for (c, part) in block.chunks_mut(GROUPS_PER_TASK * group_len).enumerate() {
            tasks.push((i0, c * GROUPS_PER_TASK, part));
        }
    }
    tasks.reverse(); // the lowest blocks hold the most work: start them first
    for rows in keys.chunks(KC * d) {
        let kc = rows.len() / d;
        let stride = 4 * kc + PANEL_PAD;
        let p = &mut packed[..dp / 4 * stride];
        pack(p, rows, d, kc, stride);
        let p: &[f64] = p;
        tasks.par_iter_mut().for_each(|(i0, g0, groups)| {
            // SAFETY: AVX2 and FMA were checked above; `p` holds `dp / 4` panels of `kc`
            // keys, `stride` apart; `groups` is the storage of column groups `g0..` of the
            // layout block at row `i0`.
            unsafe { row_block(groups, *i0, *g0, d, p, kc, stride) }
        });
    }
}

/// Widens `kc` keys (row-major, width `d`) into 4-column panels `stride` apart, zero past
/// column `d`.
fn pack(p: &mut [f64], rows: &[f32], d: usize, kc: usize, stride: usize) {
    debug_assert!(stride >= 4 * kc && rows.len() == kc * d);
    p.par_chunks_mut(PACK_PANELS * stride).enumerate().for_each(|(t, out)| {
        let c_first = t * PACK_PANELS * 4;
        for (r, key) in rows.chunks_exact(d).enumerate() {
            for (g, panel) in out.chunks_exact_mut(stride).enumerate() {
                let c0 = c_first + 4 * g;
                let dst = &mut panel[4 * r..4 * r + 4];
                if c0 + 4 <= d {
                    for (o, v) in dst.iter_mut().zip(&key[c0..c0 + 4]) {
                        *o = f64::from(*v);
                    }
                } else {
                    for (c, o) in dst.iter_mut().enumerate() {
                        *o = key.get(c0 + c).map_or(0.0, |v| f64::from(*v));
                    }
                }
            }
        }
    });
}

/// Adds the packed keys' contribution to column groups `g0..` of the layout block of rows
/// `i0..`, whose storage is `groups`.
///
/// # Safety
/// AVX2 and FMA must be available; `p` must hold `d.div_ceil(24) * 6` panels of `kc` keys,
/// `stride >= 4 kc` apart; `groups` must be the storage of whole column groups `g0..` of the
/// layout block at row `i0`.
#[target_feature(enable = "avx2,fma")]
unsafe fn row_block(groups: &mut [f64], i0: usize, g0: usize, d: usize, p: &[f64], kc: usize, stride: usize) {
    let b = i0 / layout::BLOCK_ROWS;
    let i1 = layout::rows(d, b).1;
    let per_group = layout::tiles_per_group(d, b);
    let group_len = per_group * TILE_LEN;
    assert!(groups.len().is_multiple_of(group_len));
    assert!(g0 * group_len + groups.len() <= layout::block_len(d, b) && stride >= 4 * kc);
    assert!(p.len() >= d.div_ceil(24) * 6 * stride);
    let panel = |c: usize| p.as_ptr().wrapping_add((c / 4) * stride + c % 4);
    for (g, group) in groups.chunks_exact_mut(group_len).enumerate() {
        let j = (g0 + g) * NR;
        // Column j + jj's keys: every 4th value from panel(j + jj).
        let cols: [*const f64; NR] = std::array::from_fn(|jj| panel(j + jj));
        // The first tile with a row at or below the diagonal of column j.
        let t_first = (j.max(i0) - i0) / MR;
        for (t, tile) in group.chunks_exact_mut(TILE_LEN).enumerate().skip(t_first) {
            let i = i0 + t * MR;
            // SAFETY: rows i..i + 8 and columns j..j + 6 lie below dp = d.div_ceil(24) * 24,
            // so the panels read (`panel(i)`, `panel(i + 4)` and the 6 columns of `cols`,
            // `kc` keys each) are inside `p` (asserted above).
            let acc = unsafe { micro_kernel(kc, panel(i), panel(i + 4), &cols) };
            if i + MR <= i1 && j + NR <= d && i >= j + NR - 1 {
                // The whole tile is in the lower triangle: add it with vector loads/stores.
                for (q, v) in acc.iter().enumerate() {
                    // SAFETY: `tile` holds 48 = 12 × 4 values.
                    unsafe {
                        let dst = tile.as_mut_ptr().add(4 * q);
                        _mm256_storeu_pd(dst, _mm256_add_pd(_mm256_loadu_pd(dst), *v));
                    }
                }
            } else {
                let mut sums = [0f64; TILE_LEN];
                for (q, v) in acc.iter().enumerate() {
                    // SAFETY: `sums` holds 48 = 12 × 4 values.
                    unsafe { _mm256_storeu_pd(sums.as_mut_ptr().add(4 * q), *v) };
                }
                for jj in 0..NR {
                    for r in 0..MR {
                        if j + jj <= i + r && i + r < i1 {
                            tile[jj * MR + r] += sums[jj * MR + r];
                        }
                    }
                }
            }
        }
    }
}

/// Σ over `kc` keys of (4 values at `a0` and 4 at `a1`) ⊗ (6 values at `b`): accumulator
/// `2 jj + h` holds rows `4h..4h + 4` of column `jj` (the tile's storage order). Each step
/// of the key index moves every pointer by 4 values.
///
/// # Safety
/// AVX2 and FMA must be available; `a0` and `a1` must each be readable for `4 kc` values
/// and every `b[jj]` for `4 (kc - 1) + 1` values.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_kernel(kc: usize, a0: *const f64, a1: *const f64, b: &[*const f64; NR]) -> [__m256d; 2 * NR] {
    let [b0, b1, b2, b3, b4, b5] = *b;
    let mut c = [_mm256_setzero_pd(); 2 * NR];
    for k in 0..kc {
        // SAFETY: k < kc, within the ranges the caller guarantees.
        unsafe {
            let x0 = _mm256_loadu_pd(a0.add(4 * k));
            let x1 = _mm256_loadu_pd(a1.add(4 * k));
            macro_rules! column {
                ($jj:expr, $b:expr) => {
                    let y = _mm256_broadcast_sd(&*$b.add(4 * k));
                    c[2 * $jj] = _mm256_fmadd_pd(x0, y, c[2 * $jj]);
                    c[2 * $jj + 1] = _mm256_fmadd_pd(x1, y, c[2 * $jj + 1]);
                };
            }
            column!(0, b0);
            column!(1, b1);
            column!(2, b2);
            column!(3, b3);
            column!(4, b4);
            column!(5, b5);
        }
    }
    c
}
