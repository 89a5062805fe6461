//! Patch extraction ("im2col") of channels-last images as a candle op, so that a convolution is
//! one matrix product, and its adjoint ("col2im"), which sums patch gradients back onto the image
//! (a convolution's input gradient). On the CPU candle's strided copies move a few elements at a
//! time on one thread; here each window row is one contiguous run of up to k·C values in
//! channels-last layout, copied in parallel over output rows.
//!
//! (Routing candle's autograd convolutions through these patches too, with the adjoint
//! "col2im" as their derivative, made the CNN's double-backward HVP 2.2× faster but held 2.3× the
//! memory, 87 against 37 MB per sample: not done. The hand-written passes of [`super::conv`] keep
//! only the patches.)

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A square convolution window: its size, stride and zero padding on every side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// k of the k×k window.
    pub k: usize,
    /// Step between windows, in both axes.
    pub stride: usize,
    /// Zero rows and columns added on every side.
    pub pad: usize,
}

impl Window {
    /// A valid k×k window with stride 1 (no padding).
    pub fn valid(k: usize) -> Self {
        Self {
            k,
            stride: 1,
            pad: 0,
        }
    }

    /// The output size along an axis of input size `len` (PyTorch's
    /// ⌊(len + 2·pad − k) / stride⌋ + 1), or an error when the window does not fit.
    pub fn output_len(&self, len: usize) -> Result<usize> {
        let padded = len + 2 * self.pad;
        if padded < self.k || self.stride == 0 {
            candle_core::bail!(
                "convolution: input size {len} (padding {}) is smaller than the {}×{} kernel",
                self.pad,
                self.k,
                self.k
            );
        }
        Ok((padded - self.k) / self.stride + 1)
    }
}

/// The patches of `x` (N, H, W, C) under a valid k×k window with stride 1, as rows
/// (N·H_o·W_o, k·k·C) in (window row, window column, channel) order, H_o = H − k + 1. Not
/// differentiable (the hand-written passes need none).
pub fn patches(x: &Tensor, k: usize) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    if h < k || w < k {
        candle_core::bail!("convolution: input {h}×{w} is smaller than the {k}×{k} kernel");
    }
    if x.device().is_cpu() {
        window_patches(x, Window::valid(k))
    } else {
        patches_by_views(x, k)
    }
}

/// The patches of `x` (N, H, W, C) under any [`Window`], as rows (N·H_o·W_o, k·k·C) in (window
/// row, window column, channel) order, zeros where the window covers the padding. CPU only.
pub fn window_patches(x: &Tensor, window: Window) -> Result<Tensor> {
    if !x.device().is_cpu() {
        candle_core::bail!("im2col with padding or strides runs on the CPU only");
    }
    x.contiguous()?.apply_op1_no_bwd(&Im2col { window })
}

/// The adjoint of [`window_patches`]: sums the rows of `cols` (N·H_o·W_o, k·k·C) back onto an
/// image (N, H, W, C) of `image_dims`, each value onto the pixel its patch entry was read from
/// (padding entries are dropped). With `cols` = δ Kᵀ this is a convolution's input gradient.
/// CPU only; each image is summed in a fixed order, so the result is deterministic.
pub fn col2im(
    cols: &Tensor,
    image_dims: (usize, usize, usize, usize),
    window: Window,
) -> Result<Tensor> {
    if !cols.device().is_cpu() {
        candle_core::bail!("col2im runs on the CPU only");
    }
    cols.contiguous()?
        .apply_op1_no_bwd(&Col2im { window, image_dims })
}

/// [`patches`] from k² shifted views of `x`, on any device (on the CPU candle copies the views a
/// few elements at a time, several times slower than the CPU op of [`window_patches`]).
pub fn patches_by_views(x: &Tensor, k: usize) -> Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    let (ho, wo) = (h + 1 - k, w + 1 - k);
    let mut shifted = Vec::with_capacity(k * k);
    for a in 0..k {
        for b in 0..k {
            shifted.push(x.narrow(1, a, ho)?.narrow(2, b, wo)?);
        }
    }
    Tensor::cat(&shifted, 3)?.reshape((n * ho * wo, k * k * c))
}

/// The valid part of one window row: output column `j`'s window starts at image column
/// `j·stride − pad`; returns the range of window columns inside the image and the first image
/// column, or `None` when none is.
fn valid_columns(window: Window, j: usize, w: usize) -> Option<(usize, usize, usize)> {
    let start = (j * window.stride) as isize - window.pad as isize;
    let first = (-start).max(0) as usize;
    let last = (w as isize - start).clamp(0, window.k as isize) as usize;
    (first < last).then(|| (first, last, (start + first as isize) as usize))
}

/// The image row read by window row `a` of output row `i`, when inside the image.
fn source_row(window: Window, i: usize, a: usize, h: usize) -> Option<usize> {
    let row = (i * window.stride + a) as isize - window.pad as isize;
    (row >= 0 && (row as usize) < h).then_some(row as usize)
}

/// Writes zeros (`T::default()`) into uninitialised memory.
fn fill_zeros<T: Copy + Default>(dst: &mut [std::mem::MaybeUninit<T>]) {
    for d in dst {
        d.write(T::default());
    }
}

/// [`window_patches`] on the CPU.
struct Im2col {
    window: Window,
}

impl Im2col {
    fn gather<T: Copy + Default + Send + Sync>(
        &self,
        image: &[T],
        dims: (usize, usize, usize, usize),
    ) -> Result<(Vec<T>, Shape)> {
        let (n, h, w, c) = dims;
        let window = self.window;
        let k = window.k;
        let (ho, wo) = (window.output_len(h)?, window.output_len(w)?);
        let (run, row) = (k * c, k * k * c);
        let len = n * ho * wo * row;
        // Written once, never zeroed first (zeroing the patches, several times the input, took a
        // tenth of a CNN step).
        let mut out = Vec::with_capacity(len);
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(wo * row)
            .enumerate()
            .for_each(|(image_row, rows)| {
                let (img, i) = (image_row / ho, image_row % ho);
                for (j, patch) in rows.chunks_exact_mut(row).enumerate() {
                    let columns = valid_columns(window, j, w);
                    for (a, dst) in patch.chunks_exact_mut(run).enumerate() {
                        match (source_row(window, i, a, h), columns) {
                            (Some(r), Some((first, last, col))) => {
                                let src = ((img * h + r) * w + col) * c;
                                let (before, rest) = dst.split_at_mut(first * c);
                                let (inside, after) = rest.split_at_mut((last - first) * c);
                                fill_zeros(before);
                                inside.write_copy_of_slice(&image[src..src + inside.len()]);
                                fill_zeros(after);
                            }
                            _ => fill_zeros(dst),
                        }
                    }
                }
            });
        // SAFETY: the chunks tile all `len` elements (N·H_o rows of W_o patches of k runs of k·C
        // values each) and every element was written above.
        unsafe { out.set_len(len) };
        Ok((out, Shape::from((n * ho * wo, row))))
    }
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("im2col: the input must be contiguous");
        };
        let dims = layout.shape().dims4()?;
        Ok(match storage {
            CpuStorage::F32(x) => {
                let (out, shape) = self.gather(&x[start..end], dims)?;
                (CpuStorage::F32(out), shape)
            }
            CpuStorage::F64(x) => {
                let (out, shape) = self.gather(&x[start..end], dims)?;
                (CpuStorage::F64(out), shape)
            }
            other => candle_core::bail!("im2col: {:?} is not supported (f32, f64)", other.dtype()),
        })
    }
}

/// [`col2im`] on the CPU.
struct Col2im {
    window: Window,
    image_dims: (usize, usize, usize, usize),
}

impl Col2im {
    fn scatter<T: Copy + Default + Send + Sync + std::ops::AddAssign>(
        &self,
        cols: &[T],
    ) -> Result<Vec<T>> {
        let (n, h, w, c) = self.image_dims;
        let window = self.window;
        let k = window.k;
        let (ho, wo) = (window.output_len(h)?, window.output_len(w)?);
        let (run, row) = (k * c, k * k * c);
        if cols.len() != n * ho * wo * row {
            candle_core::bail!(
                "col2im: {} values do not hold {n}·{ho}·{wo} patches of {row}",
                cols.len()
            );
        }
        let mut image = vec![T::default(); n * h * w * c];
        image
            .par_chunks_mut(h * w * c)
            .zip(cols.par_chunks(ho * wo * row))
            .for_each(|(image, patches)| {
                for (p, patch) in patches.chunks_exact(row).enumerate() {
                    let (i, j) = (p / wo, p % wo);
                    let Some((first, last, col)) = valid_columns(window, j, w) else {
                        continue;
                    };
                    for (a, src) in patch.chunks_exact(run).enumerate() {
                        if let Some(r) = source_row(window, i, a, h) {
                            let dst = (r * w + col) * c;
                            let len = (last - first) * c;
                            for (d, s) in image[dst..dst + len]
                                .iter_mut()
                                .zip(&src[first * c..first * c + len])
                            {
                                *d += *s;
                            }
                        }
                    }
                }
            });
        Ok(image)
    }
}

impl CustomOp1 for Col2im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("col2im: the input must be contiguous");
        };
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(self.scatter(&x[start..end])?),
            CpuStorage::F64(x) => CpuStorage::F64(self.scatter(&x[start..end])?),
            other => candle_core::bail!("col2im: {:?} is not supported (f32, f64)", other.dtype()),
        };
        Ok((out, Shape::from(self.image_dims)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::nn::gradcheck::{flat, random_tensor};

    #[test]
    fn patches_hold_each_window_in_row_column_channel_order() {
        // Images 1.. of a batch: contiguous, starting past the storage's first element.
        let batch = random_tensor(&[3, 5, 6, 4], 1, 1.0).unwrap();
        let x = batch.narrow(0, 1, 2).unwrap();
        let xv = flat(&x);
        for k in [1, 2, 3] {
            let (ho, wo) = (6 - k, 7 - k);
            let got = patches(&x, k).unwrap();
            assert_eq!(got.dims(), &[2 * ho * wo, k * k * 4]);
            let gv = flat(&got);
            for img in 0..2 {
                for (i, j) in (0..ho).flat_map(|i| (0..wo).map(move |j| (i, j))) {
                    let r = (img * ho + i) * wo + j;
                    for (a, b, c) in (0..k)
                        .flat_map(|a| (0..k).flat_map(move |b| (0..4).map(move |c| (a, b, c))))
                    {
                        let want = xv[((img * 5 + i + a) * 6 + j + b) * 4 + c];
                        assert_eq!(gv[r * k * k * 4 + (a * k + b) * 4 + c], want);
                    }
                }
            }
            assert_eq!(gv, flat(&patches_by_views(&x, k).unwrap()), "k = {k}");
        }
        let single = x.to_dtype(DType::F32).unwrap();
        assert_eq!(patches(&single, 3).unwrap().dtype(), DType::F32);
        assert!(patches(&x, 7).is_err());
    }

    #[test]
    fn padded_strided_patches_read_zeros_outside_and_col2im_is_their_adjoint() {
        let x = random_tensor(&[2, 5, 4, 3], 2, 1.0).unwrap();
        let xv = flat(&x);
        for (stride, pad) in [(1, 1), (2, 1), (2, 0), (1, 2)] {
            let window = Window { k: 3, stride, pad };
            let (ho, wo) = (window.output_len(5).unwrap(), window.output_len(4).unwrap());
            let got = window_patches(&x, window).unwrap();
            assert_eq!(got.dims(), &[2 * ho * wo, 27]);
            let gv = flat(&got);
            for (img, i, j, a, b, c) in (0..2).flat_map(|img| {
                (0..ho).flat_map(move |i| {
                    (0..wo).flat_map(move |j| {
                        (0..3).flat_map(move |a| {
                            (0..3).flat_map(move |b| (0..3).map(move |c| (img, i, j, a, b, c)))
                        })
                    })
                })
            }) {
                let (r, q) = (
                    (i * stride + a) as isize - pad as isize,
                    (j * stride + b) as isize - pad as isize,
                );
                let want = if (0..5).contains(&r) && (0..4).contains(&q) {
                    xv[((img * 5 + r as usize) * 4 + q as usize) * 3 + c]
                } else {
                    0.0
                };
                let row = (img * ho + i) * wo + j;
                assert_eq!(gv[row * 27 + (a * 3 + b) * 3 + c], want, "{window:?}");
            }
            // ⟨patches(x), Y⟩ = ⟨x, col2im(Y)⟩.
            let y = random_tensor(got.dims(), 3, 1.0).unwrap();
            let back = col2im(&y, (2, 5, 4, 3), window).unwrap();
            assert_eq!(back.dims(), x.dims());
            let lhs: f64 = gv.iter().zip(flat(&y)).map(|(p, y)| p * y).sum();
            let rhs: f64 = xv.iter().zip(flat(&back)).map(|(x, b)| x * b).sum();
            assert!(
                (lhs - rhs).abs() < 1e-12 * lhs.abs(),
                "{window:?}: {lhs} vs {rhs}"
            );
        }
        let valid = Window::valid(3);
        assert_eq!(
            flat(&window_patches(&x, valid).unwrap()),
            flat(&patches_by_views(&x, 3).unwrap())
        );
        assert!(Window::valid(6).output_len(5).is_err());
    }
}
