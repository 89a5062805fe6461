//! Patch extraction ("im2col") of channels-last images as a candle op, so that a valid
//! convolution is one matrix product. On the CPU candle's strided copies move a few elements at a
//! time on one thread; here each window row is one contiguous run of k·C values in channels-last
//! layout, copied in parallel over output rows.
//!
//! (Routing candle's autograd convolutions through these patches too, with the adjoint
//! "col2im" as their derivative, made the CNN's double-backward HVP 2.2× faster but held 2.3× the
//! memory, 87 against 37 MB per sample: not done. The hand-written passes of [`super::conv`] keep
//! only the patches.)

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The patches of `x` (N, H, W, C) under a valid k×k window with stride 1, as rows
/// (N·H_o·W_o, k·k·C) in (window row, window column, channel) order, H_o = H − k + 1. Not
/// differentiable (the hand-written passes need none).
pub fn patches(x: &Tensor, k: usize) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    if h < k || w < k {
        candle_core::bail!("convolution: input {h}×{w} is smaller than the {k}×{k} kernel");
    }
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1_no_bwd(&Im2col { k })
    } else {
        patches_by_views(x, k)
    }
}

/// [`patches`] from k² shifted views of `x`, on any device (on the CPU candle copies the views a
/// few elements at a time, several times slower than [`Im2col`]).
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

/// [`patches`] on the CPU.
struct Im2col {
    k: usize,
}

impl Im2col {
    fn gather<T: Copy + Send + Sync>(
        &self,
        image: &[T],
        dims: (usize, usize, usize, usize),
    ) -> Vec<T> {
        let (n, h, w, c) = dims;
        let k = self.k;
        let (ho, wo) = (h + 1 - k, w + 1 - k);
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
                    for (a, dst) in patch.chunks_exact_mut(run).enumerate() {
                        let src = ((img * h + i + a) * w + j) * c;
                        dst.write_copy_of_slice(&image[src..src + run]);
                    }
                }
            });
        // SAFETY: the chunks tile all `len` elements (N·H_o rows of W_o patches of k runs of k·C
        // values each) and every element was written above.
        unsafe { out.set_len(len) };
        out
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
        let (n, h, w, c) = dims;
        let k = self.k;
        let shape = Shape::from((n * (h + 1 - k) * (w + 1 - k), k * k * c));
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(self.gather(&x[start..end], dims)),
            CpuStorage::F64(x) => CpuStorage::F64(self.gather(&x[start..end], dims)),
            other => candle_core::bail!("im2col: {:?} is not supported (f32, f64)", other.dtype()),
        };
        Ok((out, shape))
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
}
