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

/// How the lower triangle is stored: in the order the update kernel visits it.
///
/// Rows are cut into blocks of [`BLOCK_ROWS`]; block `b` (rows `i0..i1`) holds columns
/// `0..i1` as tiles of [`TILE_ROWS`] rows × [`TILE_COLS`] columns, column group by column group
/// (`(i1 - i0).div_ceil(8)` tiles per group, the tile of rows `i0 + 8t..` at slot `t`), each
/// tile 48 contiguous values, column after column. A block's storage is then one sequential
/// stream for the kernel, where the column-major d × d matrix it replaces cost a cache and TLB
/// miss on six distant columns per tile (about 7 % of the update). It also takes about half
/// the memory (the upper triangle is only stored within the diagonal tiles). Slots above the
/// diagonal or past `d` stay zero.
mod layout {
    /// Rows per block: a multiple of 24 = lcm(8, 6), so that full blocks hold whole tiles.
    pub const BLOCK_ROWS: usize = 96;
    pub const TILE_ROWS: usize = 8;
    pub const TILE_COLS: usize = 6;
    pub const TILE_LEN: usize = TILE_ROWS * TILE_COLS;

    /// Rows `i0..i1` of block `b`.
    pub fn rows(d: usize, b: usize) -> (usize, usize) {
        let i0 = b * BLOCK_ROWS;
        (i0, (i0 + BLOCK_ROWS).min(d))
    }

    pub fn blocks(d: usize) -> usize {
        d.div_ceil(BLOCK_ROWS)
    }

    /// Tiles per column group in block `b`.
    pub fn tiles_per_group(d: usize, b: usize) -> usize {
        let (i0, i1) = rows(d, b);
        (i1 - i0).div_ceil(TILE_ROWS)
    }

    /// Values stored for block `b`.
    pub fn block_len(d: usize, b: usize) -> usize {
        tiles_per_group(d, b) * rows(d, b).1.div_ceil(TILE_COLS) * TILE_LEN
    }

    /// Start of block `b`: every block before it is full, (b' + 1) · BLOCK_ROWS² values each.
    pub fn block_offset(b: usize) -> usize {
        BLOCK_ROWS * BLOCK_ROWS * (b * (b + 1) / 2)
    }

    /// Values stored for width `d`, or None if that overflows.
    pub fn len(d: usize) -> Option<usize> {
        let last = blocks(d).checked_sub(1)?;
        // block_offset(last) <= BLOCK_ROWS · d²/2-ish; check the product before computing it.
        d.checked_mul(d)?.checked_mul(2)?;
        Some(block_offset(last) + block_len(d, last))
    }

    /// Where entry (i, j), j <= i < d, is stored.
    pub fn index(d: usize, i: usize, j: usize) -> usize {
        debug_assert!(j <= i && i < d);
        let b = i / BLOCK_ROWS;
        let i0 = b * BLOCK_ROWS;
        let slot = (j / TILE_COLS) * tiles_per_group(d, b) + (i - i0) / TILE_ROWS;
        block_offset(b) + slot * TILE_LEN + (j % TILE_COLS) * TILE_ROWS + (i - i0) % TILE_ROWS
    }

    /// Calls `f(i, j, index)` for every stored entry of the lower triangle, in storage order.
    pub fn for_each(d: usize, mut f: impl FnMut(usize, usize, usize)) {
        for b in 0..blocks(d) {
            let (i0, i1) = rows(d, b);
            let per_group = tiles_per_group(d, b);
            let mut at = block_offset(b);
            for g in 0..i1.div_ceil(TILE_COLS) {
                for t in 0..per_group {
                    for jj in 0..TILE_COLS {
                        let j = g * TILE_COLS + jj;
                        for r in 0..TILE_ROWS {
                            let i = i0 + t * TILE_ROWS + r;
                            if j <= i && i < i1 {
                                f(i, j, at + jj * TILE_ROWS + r);
                            }
                        }
                    }
                    at += TILE_LEN;
                }
            }
        }
    }

    /// The storage cut into its blocks, with each block's first row.
    pub fn split_blocks(d: usize, lower: &mut [f64]) -> Vec<(usize, &mut [f64])> {
        let mut out = Vec::with_capacity(blocks(d));
        let mut rest = lower;
        for b in 0..blocks(d) {
            let (block, tail) = rest.split_at_mut(block_len(d, b));
            out.push((rows(d, b).0, block));
            rest = tail;
        }
        out
    }
}

/// lower += Kᵀ K on the lower triangle (in the [`layout`] order) for a row-major `n × d` f32
/// batch `keys`: the packed AVX2 kernel where the CPU has AVX2 and FMA, faer's gemm elsewhere.
/// Both give the same sums up to the order of the f64 additions.
fn add_keys(lower: &mut [f64], d: usize, keys: &[f32]) {
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

/// The lower-triangle update as a packed AVX2 + FMA kernel, reading the f32 keys directly.
///
/// faer's gemm needs the keys widened to f64 and transposed first, and it reached about 60 %
/// of the f64 FMA peak here; this kernel does what a gemm does (pack, then 8 × 6 register
/// tiles) with the symmetric update's own shape:
///
/// - `KC` keys at a time are widened straight into a packed buffer `P` of 4-column panels:
///   panel `g` holds columns `4g..4g+4` of those keys, key after key (`P[g][r][0..4]`), zero
///   beyond `d`. The same buffer serves both operands of Kᵀ K: eight rows of the accumulator
///   are two consecutive panels, six columns are six scalars taken from one or two panels.
///   Panels start `4 KC + PANEL_PAD` values apart: at exactly 4 KC (8 KiB) the panels read
///   together would all map to the same L1 cache sets.
/// - Each block of the [`layout`] (96 rows; their panels stay in L2) is one rayon task,
///   largest (lowest) blocks first. A block walks its column groups left of its diagonal and
///   runs the 8 × 6 micro-kernel down each: twelve ymm accumulators, two loads and six
///   broadcasts per key, `KC` keys deep, then one add into the tile (a sequential stream).
///   Tiles that cross the diagonal or the edge add only their lower, in-bounds entries.
///
/// Each accumulator entry is a sum of exact f64 products (f32 × f32 fits in f64's 53 bits;
/// an FMA of an exact product rounds exactly like an add), so the result differs from any
/// other summation order only by the rounding of the f64 sums.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256d, _mm256_add_pd, _mm256_broadcast_sd, _mm256_fmadd_pd, _mm256_loadu_pd, _mm256_setzero_pd,
        _mm256_storeu_pd,
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
}

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
        add_keys(&mut self.lower, d, keys);
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
                m.lower[layout::index(d, i, j)] = v;
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
    fn matches_naive_sum_across_blocks() {
        // Three blocks of the layout, the last one partial.
        let d = 2 * layout::BLOCK_ROWS + 37;
        let mut seed = 11;
        let keys: Vec<f32> = (0..40 * d).map(|_| lcg(&mut seed)).collect();
        let mut m = SecondMoment::new(d).unwrap();
        m.update(&keys).unwrap();
        assert!(rel_err(&m.sum(), &naive(&keys, d)) < 1e-13);
    }

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

    #[test]
    fn layout_stores_each_lower_entry_once() {
        for d in [1, 5, 6, 8, 24, 95, 96, 97, 191, 192, 193, 2 * layout::BLOCK_ROWS + 37] {
            let len = layout::len(d).unwrap();
            let mut seen = vec![false; len];
            let mut count = 0;
            layout::for_each(d, |i, j, at| {
                assert!(j <= i && i < d && !seen[at], "d = {d}: ({i}, {j}) at {at}");
                assert_eq!(layout::index(d, i, j), at);
                seen[at] = true;
                count += 1;
            });
            assert_eq!(count, d * (d + 1) / 2);
            let blocks: usize = (0..layout::blocks(d)).map(|b| layout::block_len(d, b)).sum();
            assert_eq!(blocks, len);
        }
        assert!(layout::len(usize::MAX / 2).is_none());
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
