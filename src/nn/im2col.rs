//! Patch extraction ("im2col") of channels-last images as a candle op, so that a convolution is
//! one matrix product, and the two products of its backward pass on the CPU: the input gradient
//! (patch gradients summed back onto the image, "col2im", image by image) and the weight gradient
//! (patchesᵀ δ, by blocks of rows). On the CPU candle's strided copies move a few elements at a
//! time on one thread; here each window row is one contiguous run of up to k·C values in
//! channels-last layout, copied in parallel over output rows.
//!
//! (Routing candle's autograd convolutions through these patches too, with the adjoint
//! "col2im" as their derivative, made the CNN's double-backward HVP 2.2× faster but held 2.3× the
//! memory, 87 against 37 MB per sample: not done. The hand-written passes of [`super::conv`] keep
//! only the patches.)

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::product::{product, Strided};

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
    let image_dims = x.dims4()?;
    x.contiguous()?
        .apply_op1_no_bwd(&Im2col { window, image_dims })
}

/// The input gradient of convolutions that read one image: col2im(Σ_j δ_j K_jᵀ), the patch
/// gradients δ_j K_jᵀ (N·H_o·W_o, k·k·C) summed back onto an image (N, H, W, C) of `image_dims`
/// by the adjoint of [`window_patches`] ("col2im": each value onto the pixel its patch entry was
/// read from, padding entries dropped). `deltas` (N·H_o·W_o, D) holds the δ_j side by side and
/// `kernels` (k·k·C, D) the kernel matrices K_j likewise, so the sum over j is one product.
/// Image by image: each image's patch gradients go to a scratch buffer that stays in cache and
/// are summed onto it at once (the whole patch-gradient matrix, 9·C values a pixel, was written
/// out and read back). CPU only; each image is summed in a fixed order, so the result is
/// deterministic.
pub fn conv_input_gradient(
    deltas: &Tensor,
    kernels: &Tensor,
    image_dims: (usize, usize, usize, usize),
    window: Window,
) -> Result<Tensor> {
    if !deltas.device().is_cpu() {
        candle_core::bail!("the convolution input gradient by col2im runs on the CPU only");
    }
    deltas
        .contiguous()?
        .apply_op2_no_bwd(&kernels.contiguous()?, &Col2im { window, image_dims })
}

/// δᵀ `patches` for `patches` (R, k·k·C_in) and `deltas` (R, C_out): a convolution's weight
/// gradient as (C_out, k·k·C_in), each row in patch order (window row, window column, channel).
/// CPU only. Rows are taken in blocks of [`ROWS_PER_BLOCK`], one single-threaded product per
/// block in parallel, and the blocks' sums added in order: candle's one product over all R rows
/// synchronised its threads after every slice of the long inner dimension and wrote a 16–64-wide
/// destination row by row (1.5–5× slower on the ResNets' 16- and 32-channel convolutions). The
/// blocks depend only on R, so the result is deterministic.
pub fn patch_weight_gradient(patches: &Tensor, deltas: &Tensor) -> Result<Tensor> {
    if !patches.device().is_cpu() {
        candle_core::bail!("the convolution weight gradient by blocks runs on the CPU only");
    }
    let ((rows, row), (delta_rows, c_out)) = (patches.dims2()?, deltas.dims2()?);
    if delta_rows != rows {
        candle_core::bail!(
            "convolution weight gradient: {rows} patch rows against {delta_rows} δ rows"
        );
    }
    patches
        .contiguous()?
        .apply_op2_no_bwd(&deltas.contiguous()?, &WeightGradient { rows, row, c_out })
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
    image_dims: (usize, usize, usize, usize),
}

impl Im2col {
    /// (H_o, W_o): the output's height and width under the window.
    fn output_size(&self) -> Result<(usize, usize)> {
        let (_, h, w, _) = self.image_dims;
        Ok((self.window.output_len(h)?, self.window.output_len(w)?))
    }

    /// The patch matrix's shape (N·H_o·W_o, k·k·C).
    fn patch_matrix(&self) -> Result<(usize, usize)> {
        let (n, _, _, c) = self.image_dims;
        let (ho, wo) = self.output_size()?;
        Ok((n * ho * wo, self.window.k * self.window.k * c))
    }
}

impl FloatKernel<1> for Im2col {
    const NAME: &'static str = "im2col";

    fn run<T: WithDType + Default>(&self, [image]: [&[T]; 1]) -> Result<Vec<T>> {
        let (n, h, w, c) = self.image_dims;
        if image.len() != n * h * w * c {
            candle_core::bail!(
                "im2col: {} values are not an image of {n}×{h}×{w}×{c}",
                image.len()
            );
        }
        let window = self.window;
        let (ho, wo) = self.output_size()?;
        let (pixels, row) = self.patch_matrix()?;
        let run = window.k * c;
        let len = pixels * row;
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
        Ok(out)
    }
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let patches = self.on_cpu([(storage, layout)])?;
        Ok((patches, Shape::from(self.patch_matrix()?)))
    }
}

/// [`conv_input_gradient`] on the CPU.
struct Col2im {
    window: Window,
    image_dims: (usize, usize, usize, usize),
}

impl FloatKernel<2> for Col2im {
    const NAME: &'static str = "col2im";

    /// Each image's patch gradients (H_o·W_o, k·k·C) = its δ rows times `kernels`ᵀ, into a
    /// per-thread scratch buffer, then [`Col2im::scatter`]ed onto the image.
    fn run<T: WithDType + Default>(&self, [deltas, kernels]: [&[T]; 2]) -> Result<Vec<T>> {
        let (n, h, w, c) = self.image_dims;
        let k = self.window.k;
        let (ho, wo) = (self.window.output_len(h)?, self.window.output_len(w)?);
        let (pixels, row) = (ho * wo, k * k * c);
        let depth = kernels.len() / row.max(1);
        if kernels.len() != row * depth || deltas.len() != n * pixels * depth {
            candle_core::bail!(
                "convolution input gradient: {} δ values and {} kernel values do not make \
                 {n}·{ho}·{wo} rows times a ({row}, D) kernel matrix",
                deltas.len(),
                kernels.len()
            );
        }
        let mut image = vec![T::default(); n * h * w * c];
        image
            .par_chunks_mut(h * w * c)
            .zip(deltas.par_chunks(pixels * depth))
            .for_each_init(Vec::new, |cols, (image, delta)| {
                cols.resize(pixels * row, T::default());
                // The patch gradients (pixels, row) = δ (pixels, depth) times the kernel matrix
                // (row, depth) read as its transpose.
                product(
                    (pixels, row, depth),
                    Strided::row_major(cols, row),
                    Strided::row_major(delta, depth),
                    Strided::column_major(kernels, depth),
                    gemm::Parallelism::None,
                );
                self.scatter(cols, image, wo);
            });
        Ok(image)
    }
}

impl Col2im {
    /// Sums one image's patch rows `cols` (H_o·W_o, k·k·C) onto `image` (H, W, C), for W_o = `wo`.
    fn scatter<T: Copy + std::ops::AddAssign>(&self, cols: &[T], image: &mut [T], wo: usize) {
        let (_, h, w, c) = self.image_dims;
        let window = self.window;
        let k = window.k;
        let (run, row) = (k * c, k * k * c);
        for (p, patch) in cols.chunks_exact(row).enumerate() {
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
    }
}

impl CustomOp2 for Col2im {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        deltas: &CpuStorage,
        deltas_layout: &Layout,
        kernels: &CpuStorage,
        kernels_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let image = self.on_cpu([(deltas, deltas_layout), (kernels, kernels_layout)])?;
        Ok((image, Shape::from(self.image_dims)))
    }
}

/// Rows of the patches per block of [`patch_weight_gradient`].
pub const ROWS_PER_BLOCK: usize = 1024;

/// Blocks of [`patch_weight_gradient`] computed in parallel before their sums are added in order:
/// bounds the partial sums held at once, whatever the number of rows.
const BLOCKS_PER_ROUND: usize = 64;

/// [`patch_weight_gradient`] on the CPU: patches (`rows`, `row`), δ (`rows`, `c_out`).
struct WeightGradient {
    rows: usize,
    row: usize,
    c_out: usize,
}

impl FloatKernel<2> for WeightGradient {
    const NAME: &'static str = "convolution weight gradient";

    fn run<T: WithDType + Default>(&self, [patches, deltas]: [&[T]; 2]) -> Result<Vec<T>> {
        let Self { rows, row, c_out } = *self;
        if patches.len() != rows * row || deltas.len() != rows * c_out {
            candle_core::bail!(
                "{}: {} patch values and {} δ values do not make {rows} rows of {row} and of \
                 {c_out}",
                Self::NAME,
                patches.len(),
                deltas.len()
            );
        }
        let mut sum = vec![T::default(); row * c_out];
        if sum.is_empty() {
            return Ok(sum);
        }
        let round = BLOCKS_PER_ROUND * ROWS_PER_BLOCK;
        for (p, d) in patches
            .chunks(round * row)
            .zip(deltas.chunks(round * c_out))
        {
            let partials: Vec<Vec<T>> = p
                .par_chunks(ROWS_PER_BLOCK * row)
                .zip(d.par_chunks(ROWS_PER_BLOCK * c_out))
                .map(|(p, d)| {
                    let len = d.len() / c_out;
                    let mut out = vec![T::default(); row * c_out];
                    // (row, c_out) stored column by column, i.e. the (c_out, row) gradient
                    // row-major: the block's patches (len, row) read as their transpose, times
                    // δ (len, c_out).
                    product(
                        (row, c_out, len),
                        Strided::column_major(&mut out, row),
                        Strided::column_major(p, row),
                        Strided::row_major(d, c_out),
                        gemm::Parallelism::None,
                    );
                    out
                })
                .collect();
            for block in partials {
                for (s, b) in sum.iter_mut().zip(block) {
                    *s += b;
                }
            }
        }
        Ok(sum)
    }
}

impl CustomOp2 for WeightGradient {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        patches: &CpuStorage,
        patches_layout: &Layout,
        deltas: &CpuStorage,
        deltas_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gradient = self.on_cpu([(patches, patches_layout), (deltas, deltas_layout)])?;
        Ok((gradient, Shape::from((self.c_out, self.row))))
    }
}

/// The body of a CPU op on `N` inputs, written once for both float types.
trait FloatKernel<const N: usize> {
    /// The op's name in error messages.
    const NAME: &'static str;

    /// The output's values from the inputs' values, all contiguous and of one float type.
    fn run<T: WithDType + Default>(&self, inputs: [&[T]; N]) -> Result<Vec<T>>;

    /// [`FloatKernel::run`] on candle's CPU storage: the inputs must be contiguous and all f32 or
    /// all f64.
    fn on_cpu(&self, inputs: [(&CpuStorage, &Layout); N]) -> Result<CpuStorage> {
        let dtypes = inputs.map(|(storage, _)| storage.dtype());
        if dtypes.iter().all(|&d| d == DType::F32) {
            self.on_values::<f32>(inputs)
        } else if dtypes.iter().all(|&d| d == DType::F64) {
            self.on_values::<f64>(inputs)
        } else {
            candle_core::bail!(
                "{}: inputs of {dtypes:?} are not supported (all f32 or all f64)",
                Self::NAME
            )
        }
    }

    /// [`FloatKernel::run`] on inputs of type `T`.
    fn on_values<T: WithDType + Default>(
        &self,
        inputs: [(&CpuStorage, &Layout); N],
    ) -> Result<CpuStorage> {
        let mut values: [&[T]; N] = [&[]; N];
        for (value, (storage, layout)) in values.iter_mut().zip(inputs) {
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("{}: the inputs must be contiguous", Self::NAME);
            };
            *value = &storage.as_slice::<T>()?[start..end];
        }
        Ok(T::to_cpu_storage_owned(self.run(values)?))
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
    fn padded_strided_patches_read_zeros_outside_and_the_input_gradient_is_their_adjoint() {
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
            // ⟨patches(x) K, δ⟩ = ⟨x, col2im(δ Kᵀ)⟩, for two kernels side by side.
            let kernels = random_tensor(&[27, 2], 3, 1.0).unwrap();
            let deltas = random_tensor(&[2 * ho * wo, 2], 4, 1.0).unwrap();
            let back = conv_input_gradient(&deltas, &kernels, (2, 5, 4, 3), window).unwrap();
            assert_eq!(back.dims(), x.dims());
            let out = flat(&got.matmul(&kernels).unwrap());
            let lhs: f64 = out.iter().zip(flat(&deltas)).map(|(o, d)| o * d).sum();
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

    #[test]
    fn the_weight_gradient_by_blocks_is_patches_transposed_times_delta() {
        // Two rounds of blocks, the last block partial; f64, against one plain product.
        let rows = (BLOCKS_PER_ROUND + 2) * ROWS_PER_BLOCK + 37;
        let patches = random_tensor(&[rows, 18], 5, 1.0).unwrap();
        let deltas = random_tensor(&[rows, 3], 6, 1.0).unwrap();
        let got = patch_weight_gradient(&patches, &deltas).unwrap();
        assert_eq!(got.dims(), &[3, 18]);
        let want = flat(&deltas.t().unwrap().matmul(&patches).unwrap());
        for (g, w) in flat(&got).iter().zip(&want) {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{g} vs {w}");
        }
        let single = patches.to_dtype(DType::F32).unwrap();
        assert!(patch_weight_gradient(&single, &deltas).is_err());
        assert!(patch_weight_gradient(&patches, &deltas.narrow(0, 1, rows - 1).unwrap()).is_err());
    }
}
