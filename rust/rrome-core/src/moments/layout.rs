//! How the lower triangle is stored: in the order the update kernel visits it.
//!
//! Rows are cut into blocks of [`BLOCK_ROWS`]; block `b` (rows `i0..i1`) holds columns
//! `0..i1` as tiles of [`TILE_ROWS`] rows × [`TILE_COLS`] columns, column group by column group
//! (`(i1 - i0).div_ceil(8)` tiles per group, the tile of rows `i0 + 8t..` at slot `t`), each
//! tile 48 contiguous values, column after column. A block's storage is then one sequential
//! stream for the kernel, where the column-major d × d matrix it replaces cost a cache and TLB
//! miss on six distant columns per tile (about 7 % of the update). It also takes about half
//! the memory (the upper triangle is only stored within the diagonal tiles). Slots above the
//! diagonal or past `d` stay zero.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_stores_each_lower_entry_once() {
        for d in [1, 5, 6, 8, 24, 95, 96, 97, 191, 192, 193, 2 * BLOCK_ROWS + 37] {
            let len = len(d).unwrap();
            let mut seen = vec![false; len];
            let mut count = 0;
            for_each(d, |i, j, at| {
                assert!(j <= i && i < d && !seen[at], "d = {d}: ({i}, {j}) at {at}");
                assert_eq!(index(d, i, j), at);
                seen[at] = true;
                count += 1;
            });
            assert_eq!(count, d * (d + 1) / 2);
            let blocks: usize = (0..blocks(d)).map(|b| block_len(d, b)).sum();
            assert_eq!(blocks, len);
        }
        assert!(len(usize::MAX / 2).is_none());
    }
}
