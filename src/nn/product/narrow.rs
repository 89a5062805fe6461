//! Products whose output is sixteen f32 wide, one AVX-512 register per row: the 16-channel
//! convolutions of the ResNets (patches (R, 9·16) times a (9·16, 16) kernel). `gemm` turns such a
//! row-major product around so that the 16 columns become its vector dimension, then runs its
//! narrowest kernel (one register, six columns) behind a packing copy of the patches, at half the
//! speed it reaches on 32 or 64 columns. Here each block of 16 output rows keeps one accumulator
//! register per row, reads the kernel one row at a time and the patches in place (the next block
//! prefetched): 1.6–1.8× `gemm`'s speed on those shapes on one core. The same kernel runs a 3×3
//! convolution with padding 1 straight from a zero-padded copy of the image ([`convolution`],
//! [`pad`]), with no patch matrix: 3–4× faster than writing the patches and multiplying. Its
//! weight gradient reads the padded image likewise ([`weight_gradient`]), so a 16-channel
//! convolution never needs its patches.
//!
//! Each output element is a running fused multiply-add over the inner dimension in order, from
//! zero: the same bits as `gemm` wherever `gemm` does not split the inner dimension (up to a few
//! hundred on current CPUs, which covers every 16-wide product of the models here), and the same
//! bits however the rows are split between threads.

use rayon::prelude::*;

/// Output columns of the products here.
pub(super) const WIDTH: usize = 16;

/// Output rows computed together: one accumulator register each (16 of the 32).
const BLOCK: usize = 16;

/// Output rows per parallel task when the product is threaded.
const ROWS_PER_TASK: usize = 1024;

/// The left operand of a 16-wide product: row i is the values of `runs` (offset, length), in
/// order, from `values[i · row_stride]`; k is the sum of the lengths.
#[derive(Clone, Copy)]
struct Lhs<'a> {
    values: &'a [f32],
    row_stride: usize,
    runs: &'a [(usize, usize)],
}

/// Whether this CPU runs [`product`] (AVX-512F).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst` (m, 16) := lhs (m, k) · `rhs` (k, 16), m = `dst.len() / 16`. The rows of lhs lie
/// `row_stride` values apart in `lhs`, each contiguous; `rhs` and `dst` are row-major and
/// contiguous. With `parallel`, blocks of rows run on rayon's threads. Panics when an operand does
/// not fit its slice or the CPU lacks AVX-512F ([`available`]).
pub(super) fn product(
    dst: &mut [f32],
    lhs: &[f32],
    row_stride: usize,
    rhs: &[f32],
    k: usize,
    parallel: bool,
) {
    let runs = [(0, k)];
    let rows = |dst: &mut [f32], first: usize| {
        let values = &lhs[(first * row_stride).min(lhs.len())..];
        let lhs = Lhs {
            values,
            row_stride,
            runs: &runs,
        };
        block_rows(dst, lhs, rhs)
    };
    if parallel {
        dst.par_chunks_mut(ROWS_PER_TASK * WIDTH)
            .enumerate()
            .for_each(|(task, dst)| rows(dst, task * ROWS_PER_TASK));
    } else {
        rows(dst, 0);
    }
}

/// `dst` (N, H, W, 16) := the 3×3 convolution, stride 1, zero padding 1, of an image (N, H, W, C)
/// given zero-padded (`x`) with `rhs` (9·C, 16), the kernel in patch order (window row, window
/// column, channel): read in place, where the patch of each output pixel is nine runs of C values,
/// no patch matrix written. The same bits as the patches times `rhs` by [`product`]. With
/// `parallel`, image rows run on rayon's threads. Panics when an operand does not fit its slice or
/// the CPU lacks AVX-512F.
pub(super) fn convolution(dst: &mut [f32], x: Padded<'_>, rhs: &[f32], parallel: bool) {
    let (n, h, w, c) = x.dims;
    assert!(
        dst.len() == n * h * w * WIDTH,
        "3×3 convolution of {n}×{h}×{w}×{c} to 16 channels: an operand does not fit its slice"
    );
    let runs: Vec<(usize, usize)> = (0..9).map(|cell| (x.cell(cell), c)).collect();
    let image_row = |row: usize, dst: &mut [f32]| {
        let lhs = Lhs {
            values: &x.values[x.row(row)..],
            row_stride: c,
            runs: &runs,
        };
        block_rows(dst, lhs, rhs);
    };
    let rows_per_task = ROWS_PER_TASK.div_ceil(w.max(1));
    let task = |(t, dst): (usize, &mut [f32])| {
        for (r, dst) in dst.chunks_mut(w * WIDTH).enumerate() {
            image_row(t * rows_per_task + r, dst);
        }
    };
    let chunk = (rows_per_task * w * WIDTH).max(1);
    if parallel {
        dst.par_chunks_mut(chunk).enumerate().for_each(task);
    } else {
        dst.chunks_mut(chunk).enumerate().for_each(task);
    }
}

/// `dst` (9·16, 16) := Σ_p patch(p)ᵀ δ(p) over the pixels p of an image (N, H, W, 16) given
/// zero-padded (`x`) and `delta` (N, H, W, 16), row-major and channels last: the gradient of the
/// kernel matrix (rows in patch order: window row, window column, channel) of a 3×3 convolution
/// with stride 1 and zero padding 1 from 16 channels to 16 whose output gradient is `delta`, read
/// in place (no patch matrix). Each block of whole image rows (about [`ROWS_PER_TASK`] pixels,
/// fixed by the shapes) sums its pixels in order by running fused multiply-adds, one window cell
/// at a time; the blocks' sums are then added in order, so the result is the same however many
/// threads run them (with `parallel`, blocks run on rayon's threads). Panics when an operand does
/// not fit its slice or the CPU lacks AVX-512F.
pub(super) fn weight_gradient(dst: &mut [f32], x: Padded<'_>, delta: &[f32], parallel: bool) {
    let (n, h, w, c) = x.dims;
    assert!(
        c == WIDTH && dst.len() == 9 * WIDTH * WIDTH && delta.len() == n * h * w * WIDTH,
        "weight gradient of a 3×3 convolution of {n}×{h}×{w}×{c} to 16 channels: an operand does \
         not fit its slice"
    );
    assert!(
        available(),
        "16-wide weight gradient: this CPU lacks AVX-512F"
    );
    let rows_per_task = ROWS_PER_TASK.div_ceil(w.max(1));
    let block = |first_row: usize| {
        let rows = first_row..(first_row + rows_per_task).min(n * h);
        let mut sums = vec![0f32; dst.len()];
        for (cell, sums) in sums.chunks_mut(WIDTH * WIDTH).enumerate() {
            // SAFETY: AVX-512F is available; the rows lie inside `delta` and, shifted by any
            // window cell, inside the padded image (checked when `x` was made).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                avx512::cell_gradient(sums, x, delta, rows.clone(), cell)
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("AVX-512F on a CPU that is not x86-64 ({sums:?}, {cell})")
        }
        sums
    };
    let blocks: Vec<Vec<f32>> = if parallel {
        (0..n * h)
            .into_par_iter()
            .step_by(rows_per_task)
            .map(block)
            .collect()
    } else {
        (0..n * h).step_by(rows_per_task).map(block).collect()
    };
    dst.fill(0.0);
    for sums in blocks {
        for (d, s) in dst.iter_mut().zip(sums) {
            *d += s;
        }
    }
}

/// `x` (N, H, W, C), row-major and channels last, zero-padded by one pixel on each side:
/// (N, H + 2, W + 2, C), each value written once.
pub(super) fn pad(x: &[f32], (n, h, w, c): (usize, usize, usize, usize)) -> Vec<f32> {
    assert_eq!(
        x.len(),
        n * h * w * c,
        "padding {n}×{h}×{w}×{c}: the image does not fit"
    );
    let padded_row = (w + 2) * c;
    if h * w * c == 0 {
        return vec![0.0; n * (h + 2) * padded_row];
    }
    let mut out = Vec::with_capacity(n * (h + 2) * padded_row);
    for image in x.chunks(h * w * c) {
        out.resize(out.len() + padded_row + c, 0.0);
        for (r, row) in image.chunks(w * c).enumerate() {
            if r > 0 {
                out.resize(out.len() + 2 * c, 0.0);
            }
            out.extend_from_slice(row);
        }
        out.resize(out.len() + c + padded_row, 0.0);
    }
    out
}

/// An image (N, H, W, C) zero-padded by one pixel on each side, (N, H + 2, W + 2, C) row-major
/// and channels last ([`pad`]): the input that the 3×3 convolutions here read in place.
#[derive(Clone, Copy)]
pub(super) struct Padded<'a> {
    values: &'a [f32],
    /// (N, H, W, C) of the image before padding.
    dims: (usize, usize, usize, usize),
}

impl<'a> Padded<'a> {
    /// The padded `values` of an image of `dims` (N, H, W, C). Panics when they do not fit.
    pub(super) fn new(values: &'a [f32], dims: (usize, usize, usize, usize)) -> Self {
        let (n, h, w, c) = dims;
        assert_eq!(
            values.len(),
            n * (h + 2) * (w + 2) * c,
            "a padded {n}×{h}×{w}×{c} image: the values do not fit"
        );
        Self { values, dims }
    }

    /// Where the top-left window cell of the first pixel of image row `row` (of N·H) lies.
    fn row(&self, row: usize) -> usize {
        let (_, h, w, c) = self.dims;
        (row / h * (h + 2) + row % h) * (w + 2) * c
    }

    /// The offset of window cell `cell` (window row · 3 + window column) from the top-left one.
    fn cell(&self, cell: usize) -> usize {
        let (_, _, w, c) = self.dims;
        ((cell / 3) * (w + 2) + cell % 3) * c
    }
}

/// `dst` (m, 16) := `lhs` · `rhs` on this thread, m = `dst.len() / 16`. Panics when an operand
/// does not fit its slice or the CPU lacks AVX-512F.
fn block_rows(dst: &mut [f32], lhs: Lhs<'_>, rhs: &[f32]) {
    let m = dst.len() / WIDTH;
    let k: usize = lhs.runs.iter().map(|(_, len)| len).sum();
    let row_end = lhs.runs.iter().map(|(at, len)| at + len).max().unwrap_or(0);
    assert!(
        dst.len() == m * WIDTH
            && rhs.len() >= k * WIDTH
            && (m == 0 || (m - 1) * lhs.row_stride + row_end <= lhs.values.len()),
        "16-wide product ({m}×{k}) · ({k}×{WIDTH}): an operand does not fit its slice"
    );
    assert!(available(), "16-wide product: this CPU lacks AVX-512F");
    // SAFETY: AVX-512F is available and every row's runs and the k rows of rhs lie inside their
    // slices (asserted above).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        avx512::rows(dst, lhs, rhs)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX-512F on a CPU that is not x86-64 ({dst:?}, {k})")
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::{
        _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
        _mm_prefetch, _MM_HINT_T0,
    };

    use super::{Lhs, Padded, BLOCK, WIDTH};

    /// `dst` (16, 16) := Σ over the pixels of image rows `rows` of x(p + cell)ᵀ δ(p): window
    /// cell `cell`'s rows of [`super::weight_gradient`]'s sum over those rows, one accumulator
    /// register per input channel, pixels in order.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `padded` holds an image of 16 channels, `delta` its output
    /// gradient, `rows` lie within both and `dst` holds 256 values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn cell_gradient(
        dst: &mut [f32],
        padded: Padded<'_>,
        delta: &[f32],
        rows: std::ops::Range<usize>,
        cell: usize,
    ) {
        let w = padded.dims.2;
        let shift = padded.cell(cell);
        let mut acc = [_mm512_setzero_ps(); WIDTH];
        for row in rows {
            let x = padded.values.as_ptr().add(padded.row(row) + shift);
            let d = delta.as_ptr().add(row * w * WIDTH);
            for pixel in 0..w {
                let d = _mm512_loadu_ps(d.add(pixel * WIDTH));
                let x = x.add(pixel * WIDTH);
                for (c, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(*x.add(c)), d, *acc);
                }
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(dst.as_mut_ptr().add(c * WIDTH), *acc);
        }
    }

    /// [`super::block_rows`] once its operands are checked.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `lhs` holds `dst.len() / 16` rows and `rhs` at least `k · 16`
    /// values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows(dst: &mut [f32], lhs: Lhs<'_>, rhs: &[f32]) {
        let m = dst.len() / WIDTH;
        let Lhs {
            values,
            row_stride,
            runs,
        } = lhs;
        let (lhs, rhs, out) = (values.as_ptr(), rhs.as_ptr(), dst.as_mut_ptr());
        let mut first = 0;
        while first + BLOCK <= m {
            let block = lhs.add(first * row_stride);
            // The next block's rows, one cache line (16 values) per step of the inner loop: all of
            // them when the rows are contiguous. Prefetching never faults, even past the end.
            let next = block.wrapping_add(BLOCK * row_stride);
            let mut acc = [_mm512_setzero_ps(); BLOCK];
            let mut p = 0;
            for &(at, len) in runs {
                for q in at..at + len {
                    let kernel_row = _mm512_loadu_ps(rhs.add(p * WIDTH));
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(p * WIDTH).cast());
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let x = _mm512_set1_ps(*block.add(i * row_stride + q));
                        *acc = _mm512_fmadd_ps(x, kernel_row, *acc);
                    }
                    p += 1;
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add((first + i) * WIDTH), *acc);
            }
            first += BLOCK;
        }
        for row in first..m {
            let values = lhs.add(row * row_stride);
            let mut acc = _mm512_setzero_ps();
            let mut p = 0;
            for &(at, len) in runs {
                for q in at..at + len {
                    let kernel_row = _mm512_loadu_ps(rhs.add(p * WIDTH));
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(*values.add(q)), kernel_row, acc);
                    p += 1;
                }
            }
            _mm512_storeu_ps(out.add(row * WIDTH), acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [−1, 1) from a seeded generator.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// Each output element as a running `mul_add` (one rounding per term) over the inner
    /// dimension in order.
    fn sequential_fma(lhs: &[f32], row_stride: usize, rhs: &[f32], m: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * WIDTH];
        for (i, row) in out.chunks_mut(WIDTH).enumerate() {
            for (j, o) in row.iter_mut().enumerate() {
                *o = (0..k).fold(0.0, |acc, p| {
                    lhs[i * row_stride + p].mul_add(rhs[p * WIDTH + j], acc)
                });
            }
        }
        out
    }

    #[test]
    fn every_element_is_a_running_fused_multiply_add_in_order() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512F, the 16-wide products fall back to gemm");
            return;
        }
        // Row counts around the block of 16 (and a threaded product over several tasks); inner
        // dimensions from 0 to past gemm's blocking; rows contiguous and spaced apart.
        for (m, k, row_stride) in [
            (0, 5, 5),
            (1, 1, 1),
            (15, 27, 27),
            (16, 144, 144),
            (17, 144, 150),
            (40, 0, 3),
            (100, 1000, 1003),
            (2 * ROWS_PER_TASK + 33, 27, 27),
        ] {
            let lhs = values(m.max(1) * row_stride, m as u64);
            let rhs = values(k * WIDTH, k as u64 + 1);
            let want = sequential_fma(&lhs, row_stride, &rhs, m, k);
            for parallel in [false, true] {
                let mut got = vec![f32::NAN; m * WIDTH];
                product(&mut got, &lhs, row_stride, &rhs, k, parallel);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(
                    same,
                    "({m}×{k}), row stride {row_stride}, parallel {parallel}"
                );
            }
        }
    }

    /// Σ_p patch(p)ᵀ δ(p) of a 3×3 convolution with stride 1 and zero padding 1 from 16 channels
    /// to 16, read from the unpadded image with bounds checks, each element a running `mul_add`
    /// over the pixels of a block of `rows_per_block` image rows, the blocks' sums added in order.
    fn blocked_weight_gradient(
        x: &[f32],
        delta: &[f32],
        (n, h, w): (usize, usize, usize),
        rows_per_block: usize,
    ) -> Vec<f32> {
        let mut total = vec![0f32; 9 * WIDTH * WIDTH];
        for first in (0..n * h).step_by(rows_per_block) {
            let mut block = vec![0f32; total.len()];
            for row in first..(first + rows_per_block).min(n * h) {
                let (image, r) = (row / h, row % h);
                for s in 0..w {
                    let d = &delta[(row * w + s) * WIDTH..][..WIDTH];
                    for cell in 0..9 {
                        let (rr, ss) = (r + cell / 3, s + cell % 3);
                        if rr == 0 || rr > h || ss == 0 || ss > w {
                            // A padding entry: the kernel adds 0 · δ = ±0 to a running sum that
                            // is never −0 (an exact cancellation rounds to +0): the same bits.
                            continue;
                        }
                        let pixel = (image * h + rr - 1) * w + ss - 1;
                        for c in 0..WIDTH {
                            let xv = x[pixel * WIDTH + c];
                            let out = &mut block[(cell * WIDTH + c) * WIDTH..][..WIDTH];
                            for (o, dv) in out.iter_mut().zip(d) {
                                *o = xv.mul_add(*dv, *o);
                            }
                        }
                    }
                }
            }
            for (t, b) in total.iter_mut().zip(block) {
                *t += b;
            }
        }
        total
    }

    #[test]
    fn the_in_place_weight_gradient_sums_in_fixed_blocks_whatever_the_threads() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512F, the weight gradient takes the patches");
            return;
        }
        // One pixel; one image row; several images with odd sizes; blocks that split an image
        // (32 rows of 32 pixels a block) and a last block shorter than the others.
        for (n, h, w) in [(1, 1, 1), (1, 1, 7), (3, 5, 6), (2, 33, 32), (5, 17, 13)] {
            let x = values(n * h * w * WIDTH, (n * h + w) as u64);
            let delta = values(n * h * w * WIDTH, (n * h * w) as u64 + 7);
            let want = blocked_weight_gradient(&x, &delta, (n, h, w), ROWS_PER_TASK.div_ceil(w));
            for parallel in [false, true] {
                let mut got = vec![f32::NAN; want.len()];
                let padded = pad(&x, (n, h, w, WIDTH));
                weight_gradient(
                    &mut got,
                    Padded::new(&padded, (n, h, w, WIDTH)),
                    &delta,
                    parallel,
                );
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same, "{n}×{h}×{w}, parallel {parallel}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn a_short_operand_is_refused() {
        let mut dst = vec![0.0; 2 * WIDTH];
        product(&mut dst, &[0.0; 9], 5, &[0.0; 5 * WIDTH], 5, false);
    }
}
