//! Matrix products of detached 2-D tensors for the hand-written passes. On the CPU a product of
//! middling size (2²¹ to 2²⁹ multiply-adds) is cut into at most four bands of its output,
//! each one single-threaded `gemm` call, run across rayon's threads with one join per product:
//! candle's matmul hands `gemm` all threads, and `gemm` joins them after every slice of the inner
//! dimension, which costs more than the second core brings on the thin products of a small batch
//! (the MLP's step at b = 8 took 0.54× the time). Smaller products run on the calling thread,
//! larger ones with `gemm`'s own threading. The bands follow from the shapes alone, so results do
//! not depend on the number of threads. Elsewhere (CUDA, batched products) this is candle's matmul.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::cpu_f32;

mod narrow;

/// Multiply-adds below which a product runs on the calling thread alone, and the least work of
/// one band.
const BAND_WORK: usize = 1 << 21;

/// Multiply-adds from which a product runs as one `gemm` call with `gemm`'s own threading.
const THREADED_WORK: usize = 1 << 29;

/// The most bands a product is cut into (more made the MLP's small-batch steps slower on 2 cores;
/// on more cores a middling product uses at most this many).
const MAX_BANDS: usize = 4;

/// `a` (m, k) · `b` (k, n) without recording a graph (the inputs must not need gradients).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() && a.rank() == 2 && b.rank() == 2 {
        a.apply_op2_no_bwd(b, &Product)
    } else {
        a.matmul(b)
    }
}

/// Output channels of [`same_convolution_16`].
pub const SAME_CONVOLUTION_WIDTH: usize = narrow::WIDTH;

/// Whether [`same_convolution_16`] and [`same_weight_gradient_16`] read `x`, once padded
/// ([`pad_image`]), in place: a nonempty contiguous f32 tensor on the CPU, on an AVX-512 CPU.
pub fn reads_in_place(x: &Tensor) -> bool {
    let (storage, layout) = x.storage_and_layout();
    x.elem_count() > 0 && narrow::available() && cpu_f32(&storage, layout).is_some()
}

/// `x` (N, H, W, C) zero-padded by one pixel on each side of both spatial axes: (N, H + 2,
/// W + 2, C), the input of [`same_convolution_16`] and [`same_weight_gradient_16`] (on the CPU in
/// f32 each value written once; elsewhere by candle's padding).
pub fn pad_image(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims4()?;
    let (n, h, w, c) = dims;
    let padded = {
        let (storage, layout) = x.storage_and_layout();
        cpu_f32(&storage, layout).map(|image| narrow::pad(image, dims))
    };
    match padded {
        Some(values) => Tensor::from_vec(values, (n, h + 2, w + 2, c), x.device()),
        None => x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1),
    }
}

/// `kernel` run on the image that `padded` holds zero-padded ([`pad_image`]), on the values of
/// `other` and on whether to thread (from 2²¹ multiply-adds of a 3×3 window to 16 channels on),
/// when both are contiguous f32 on the CPU, the image is not empty and this CPU runs the 16-wide
/// kernels; `None` otherwise.
fn padded_operands<T>(
    padded: &Tensor,
    other: &Tensor,
    kernel: impl FnOnce(narrow::Padded<'_>, &[f32], bool) -> T,
) -> Result<Option<T>> {
    let (n, hp, wp, c) = padded.dims4()?;
    if hp < 2 || wp < 2 || n * (hp - 2) * (wp - 2) * c == 0 || !narrow::available() {
        return Ok(None);
    }
    let (x_storage, x_layout) = padded.storage_and_layout();
    let (o_storage, o_layout) = other.storage_and_layout();
    let (Some(x), Some(other)) = (cpu_f32(&x_storage, x_layout), cpu_f32(&o_storage, o_layout))
    else {
        return Ok(None);
    };
    let dims = (n, hp - 2, wp - 2, c);
    let parallel = dims.0 * dims.1 * dims.2 * 9 * c * narrow::WIDTH >= BAND_WORK;
    Ok(Some(kernel(narrow::Padded::new(x, dims), other, parallel)))
}

/// conv(x, K) for an image x (N, H, W, C) given zero-padded ([`pad_image`]) and `kernel` K
/// (9·C, 16) in patch order, a 3×3 window with stride 1 and zero padding 1, as (N, H, W, 16): on
/// an AVX-512 CPU in f32 read in place (each patch nine runs of C values; no patch matrix), the
/// same bits as the patches times K by [`matmul`], in parallel from 2²¹ multiply-adds on; `None`
/// elsewhere.
pub fn same_convolution_16(padded: &Tensor, kernel: &Tensor) -> Result<Option<Tensor>> {
    let (n, hp, wp, c) = padded.dims4()?;
    if kernel.dims() != [9 * c, narrow::WIDTH] {
        return Ok(None);
    }
    let (h, w) = (hp.saturating_sub(2), wp.saturating_sub(2));
    let out = padded_operands(padded, kernel, |x, k, parallel| {
        let mut out = vec![0f32; n * h * w * narrow::WIDTH];
        narrow::convolution(&mut out, x, k, parallel);
        out
    })?;
    out.map(|out| Tensor::from_vec(out, (n, h, w, narrow::WIDTH), padded.device()))
        .transpose()
}

/// The gradient Σ_p patch(p)ᵀ δ(p) (9·16, 16) of the kernel matrix (in patch order, as for
/// [`same_convolution_16`]) of a 3×3 convolution with stride 1 and zero padding 1 from an image x
/// (N, H, W, 16), given zero-padded ([`pad_image`]), to 16 channels whose output gradient is
/// `delta` (N, H, W, 16): on an AVX-512 CPU in f32 read in place (no patch matrix), pixels summed
/// in fixed blocks, in parallel from 2²¹ multiply-adds on; `None` elsewhere. Not the bits of
/// patchesᵀ δ by `gemm`, whose order of summation differs.
pub fn same_weight_gradient_16(padded: &Tensor, delta: &Tensor) -> Result<Option<Tensor>> {
    let (n, hp, wp, c) = padded.dims4()?;
    let (h, w) = (hp.saturating_sub(2), wp.saturating_sub(2));
    if c != narrow::WIDTH || delta.dims() != [n, h, w, narrow::WIDTH] {
        return Ok(None);
    }
    let out = padded_operands(padded, delta, |x, delta, parallel| {
        let mut out = vec![0f32; 9 * c * narrow::WIDTH];
        narrow::weight_gradient(&mut out, x, delta, parallel);
        out
    })?;
    out.map(|out| Tensor::from_vec(out, (9 * c, narrow::WIDTH), padded.device()))
        .transpose()
}

/// The CPU op behind [`matmul`].
struct Product;

impl Product {
    const NAME: &'static str = "matrix product";
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        lhs: &CpuStorage,
        lhs_layout: &Layout,
        rhs: &CpuStorage,
        rhs_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = lhs_layout.shape().dims2()?;
        let (depth, n) = rhs_layout.shape().dims2()?;
        if depth != k {
            candle_core::bail!(
                "{}: ({m}×{k}) · ({depth}×{n}): the inner dimensions differ",
                Self::NAME
            );
        }
        let dims = (m, n, k);
        let out = match (lhs, rhs) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(banded_product(
                dims,
                Strided::of(a, lhs_layout),
                Strided::of(b, rhs_layout),
            )),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(banded_product(
                dims,
                Strided::of(a, lhs_layout),
                Strided::of(b, rhs_layout),
            )),
            _ => candle_core::bail!(
                "{}: operands of {:?} and {:?} are not supported (both f32 or both f64)",
                Self::NAME,
                lhs.dtype(),
                rhs.dtype()
            ),
        };
        Ok((out, Shape::from((m, n))))
    }
}

/// lhs (m, k) · rhs (k, n), row-major, in bands (see the module's doc).
fn banded_product<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    lhs: Strided<&[T]>,
    rhs: Strided<&[T]>,
) -> Vec<T> {
    let mut out = vec![T::zero(); m * n];
    let work = m * n * k;
    let bands = (work / BAND_WORK).clamp(1, MAX_BANDS);
    if work >= THREADED_WORK || bands == 1 {
        let threading = if work >= THREADED_WORK {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        product(
            (m, n, k),
            Strided::row_major(&mut out, n),
            lhs,
            rhs,
            threading,
        );
    } else if m >= n {
        // Bands of whole rows: each its own stretch of the output.
        let band = m.div_ceil(bands);
        out.par_chunks_mut(band * n)
            .enumerate()
            .for_each(|(i, rows)| {
                let height = rows.len() / n;
                product(
                    (height, n, k),
                    Strided::row_major(rows, n),
                    lhs.rows_from(i * band),
                    rhs.rows_from(0),
                    gemm::Parallelism::None,
                );
            });
    } else {
        // Bands of columns, each computed apart and copied into place (m < n here: the copy moves
        // m·n values, against the m·k + k·n the product reads).
        let band = n.div_ceil(bands);
        let parts: Vec<(usize, Vec<T>)> = (0..n)
            .into_par_iter()
            .step_by(band)
            .map(|first| {
                let width = band.min(n - first);
                let mut part = vec![T::zero(); m * width];
                product(
                    (m, width, k),
                    Strided::row_major(&mut part, width),
                    lhs.rows_from(0),
                    rhs.columns_from(first),
                    gemm::Parallelism::None,
                );
                (first, part)
            })
            .collect();
        for (first, part) in parts {
            let width = part.len() / m;
            for (row, values) in out.chunks_mut(n).zip(part.chunks(width)) {
                row[first..first + width].copy_from_slice(values);
            }
        }
    }
    out
}

/// A matrix in a slice: its values and the strides between its rows and between its columns.
pub(super) struct Strided<S> {
    values: S,
    row_stride: usize,
    column_stride: usize,
}

impl<S> Strided<S> {
    /// Rows of `width` values one after another.
    pub(super) fn row_major(values: S, width: usize) -> Self {
        Self {
            values,
            row_stride: width,
            column_stride: 1,
        }
    }

    /// Columns of `height` values one after another.
    pub(super) fn column_major(values: S, height: usize) -> Self {
        Self {
            values,
            row_stride: 1,
            column_stride: height,
        }
    }

    /// Whether a (rows, columns) matrix with these strides lies inside `len` values.
    fn holds(&self, (rows, columns): (usize, usize), len: usize) -> bool {
        rows == 0
            || columns == 0
            || (rows - 1) * self.row_stride + (columns - 1) * self.column_stride < len
    }
}

impl<'a, T> Strided<&'a [T]> {
    /// The 2-D tensor of `layout` in `storage`.
    fn of(storage: &'a [T], layout: &Layout) -> Self {
        let stride = layout.stride();
        Self {
            values: &storage[layout.start_offset().min(storage.len())..],
            row_stride: stride[0],
            column_stride: stride[1],
        }
    }

    /// The matrix from row `row` on.
    fn rows_from(&self, row: usize) -> Self {
        self.shifted(row * self.row_stride)
    }

    /// The matrix from column `column` on.
    fn columns_from(&self, column: usize) -> Self {
        self.shifted(column * self.column_stride)
    }

    fn shifted(&self, offset: usize) -> Self {
        Self {
            values: &self.values[offset.min(self.values.len())..],
            row_stride: self.row_stride,
            column_stride: self.column_stride,
        }
    }
}

/// dst (m, n) := lhs (m, k) · rhs (k, n) by the `gemm` crate (the kernels behind candle's CPU
/// matmul), or, for row-major f32 products 16 wide on an AVX-512 CPU, by [`narrow::product`]
/// (same bits where `gemm` keeps the inner dimension whole). Panics when a matrix does not fit its
/// slice, or when T is not a float type of `gemm`'s (f16, f32, f64).
pub(super) fn product<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: Strided<&mut [T]>,
    lhs: Strided<&[T]>,
    rhs: Strided<&[T]>,
    threading: gemm::Parallelism,
) {
    let one = T::from_f64(1.0);
    assert!(
        dst.holds((m, n), dst.values.len())
            && lhs.holds((m, k), lhs.values.len())
            && rhs.holds((k, n), rhs.values.len()),
        "matrix product ({m}×{k}) · ({k}×{n}): an operand does not fit its slice"
    );
    let row_major = |s: (usize, usize)| s == (n, 1);
    if T::DTYPE == DType::F32
        && n == narrow::WIDTH
        && row_major((dst.row_stride, dst.column_stride))
        && row_major((rhs.row_stride, rhs.column_stride))
        && lhs.column_stride == 1
        && narrow::available()
    {
        let f32s = |values: &[T]| {
            // SAFETY: T is f32 (its DType says so): the same values, read as what they are.
            unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<f32>(), values.len()) }
        };
        let dst_len = dst.values.len().min(m * n);
        // SAFETY: as above, and `dst` is borrowed mutably for as long as this view lives.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(dst.values.as_mut_ptr().cast::<f32>(), dst_len)
        };
        let parallel = !matches!(threading, gemm::Parallelism::None);
        narrow::product(
            dst,
            f32s(lhs.values),
            lhs.row_stride,
            f32s(rhs.values),
            k,
            parallel,
        );
        return;
    }
    let stride = |s: usize| s as isize;
    // SAFETY: every element the product reads or writes lies inside its slice (checked above);
    // `dst` is borrowed mutably, so it overlaps neither operand. With `read_dst` false the old
    // values of `dst` are not read (alpha unused), so `one` serves as alpha too.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.values.as_mut_ptr(),
            stride(dst.column_stride),
            stride(dst.row_stride),
            false,
            lhs.values.as_ptr(),
            stride(lhs.column_stride),
            stride(lhs.row_stride),
            rhs.values.as_ptr(),
            stride(rhs.column_stride),
            stride(rhs.row_stride),
            one,
            one,
            false,
            false,
            false,
            threading,
        );
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::nn::gradcheck::{bits, flat, random_tensor};

    /// Some entries of `a · b` against f64 dot products of the operands' values.
    fn check_entries(a: &Tensor, b: &Tensor, tol: f64) {
        let got = matmul(a, b).unwrap();
        let (m, k) = a.dims2().unwrap();
        let n = b.dim(1).unwrap();
        assert_eq!(got.dims(), &[m, n]);
        let (av, bv, gv) = (flat(a), flat(b), flat(&got));
        let step = (m * n / 500).max(1);
        for e in (0..m * n).step_by(step).chain([m * n - 1]) {
            let (i, j) = (e / n, e % n);
            let want: f64 = (0..k).map(|p| av[i * k + p] * bv[p * n + j]).sum();
            let scale: f64 = (0..k).map(|p| (av[i * k + p] * bv[p * n + j]).abs()).sum();
            assert!(
                (gv[e] - want).abs() <= tol * scale.max(1e-300),
                "({m}×{k})·({k}×{n}) entry ({i}, {j}): {} against {want}",
                gv[e]
            );
        }
    }

    #[test]
    fn every_regime_matches_plain_dot_products() {
        // (m, n, k): on the calling thread; bands of rows (uneven); bands of columns (uneven);
        // gemm's own threading (2²⁹ multiply-adds).
        let shapes = [
            (7, 5, 3),
            (301, 100, 150),
            (40, 501, 300),
            (1024, 1024, 512),
        ];
        for (seed, &(m, n, k)) in shapes.iter().enumerate() {
            let seed = seed as u64;
            let a = random_tensor(&[m, k], seed, 1.0).unwrap();
            let b = random_tensor(&[k, n], seed + 10, 1.0).unwrap();
            check_entries(&a, &b, 1e-12);
            let (a32, b32) = (
                a.to_dtype(DType::F32).unwrap(),
                b.to_dtype(DType::F32).unwrap(),
            );
            check_entries(&a32, &b32, 1e-5);
        }
    }

    #[test]
    fn transposed_and_offset_operands_are_read_through_their_strides() {
        // aᵀ and bᵀ as strided views, a taken from past the start of its storage.
        let big = random_tensor(&[330, 150], 3, 1.0).unwrap();
        let a_t = big.narrow(0, 29, 301).unwrap().t().unwrap(); // (150, 301) view
        let b_t = random_tensor(&[40, 301], 4, 1.0).unwrap().t().unwrap(); // (301, 40)
        let a_dense = a_t.contiguous().unwrap();
        let b_dense = b_t.contiguous().unwrap();
        let got = flat(&matmul(&a_t, &b_t).unwrap());
        let want = flat(&matmul(&a_dense, &b_dense).unwrap());
        assert_eq!(got, want);
        check_entries(&a_dense, &b_dense, 1e-12);
    }

    #[test]
    fn the_result_does_not_depend_on_the_number_of_threads() {
        for (m, n, k) in [(301, 100, 150), (40, 501, 300)] {
            let a = random_tensor(&[m, k], 5, 1.0)
                .and_then(|t| t.to_dtype(DType::F32))
                .unwrap();
            let b = random_tensor(&[k, n], 6, 1.0)
                .and_then(|t| t.to_dtype(DType::F32))
                .unwrap();
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| flat(&matmul(&a, &b).unwrap()))
            };
            assert_eq!(on(1), on(3));
        }
    }

    #[test]
    fn mismatched_operands_are_errors() {
        let a = random_tensor(&[3, 4], 1, 1.0).unwrap();
        let b = random_tensor(&[5, 2], 2, 1.0).unwrap();
        let err = matmul(&a, &b).unwrap_err().to_string();
        assert!(err.contains("inner dimensions"), "{err}");
        let b32 = random_tensor(&[4, 2], 2, 1.0)
            .and_then(|t| t.to_dtype(DType::F32))
            .unwrap();
        let err = matmul(&a, &b32).unwrap_err().to_string();
        assert!(err.contains("not supported"), "{err}");
    }

    #[test]
    fn the_direct_convolution_gives_the_patch_products_bits() {
        use crate::nn::im2col::{window_patches, Window};
        if !narrow::available() {
            eprintln!("skipped: this CPU lacks AVX-512F, convolutions go through their patches");
            return;
        }
        // Widths below, at and around the block of 16 pixels; the stem's 3 channels and the
        // ResNets' 16; the last case large enough to run in parallel over several tasks.
        for (n, h, w, c) in [
            (1, 1, 1, 16),
            (2, 3, 5, 3),
            (1, 4, 16, 16),
            (3, 5, 17, 16),
            (2, 7, 35, 5),
            (2, 32, 32, 16),
        ] {
            let x = random_tensor(&[n, h, w, c], (h * w) as u64, 1.0)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let kernel = random_tensor(&[9 * c, 16], c as u64, 0.3)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let padded = pad_image(&x).unwrap();
            let by_candle = x
                .pad_with_zeros(1, 1, 1)
                .unwrap()
                .pad_with_zeros(2, 1, 1)
                .unwrap();
            assert_eq!(bits(&padded), bits(&by_candle), "padding {n}×{h}×{w}×{c}");
            let direct = same_convolution_16(&padded, &kernel).unwrap().unwrap();
            let window = Window {
                k: 3,
                stride: 1,
                pad: 1,
            };
            let by_patches = matmul(&window_patches(&x, window).unwrap(), &kernel).unwrap();
            assert_eq!(direct.dims(), [n, h, w, 16]);
            assert!(bits(&direct) == bits(&by_patches), "{n}×{h}×{w}×{c}");
        }
        // An empty image pads to its zero border.
        let empty = Tensor::zeros((2, 0, 3, 4), DType::F32, &candle_core::Device::Cpu).unwrap();
        assert_eq!(pad_image(&empty).unwrap().dims(), [2, 2, 5, 4]);
        // Not 16 output channels, or f64: not taken (the image is taken padded, 1 × 1 × 2).
        let x = Tensor::zeros((1, 3, 3, 2), DType::F32, &candle_core::Device::Cpu).unwrap();
        let wide = Tensor::zeros((18, 32), DType::F32, x.device()).unwrap();
        assert!(same_convolution_16(&x, &wide).unwrap().is_none());
        let x = x.to_dtype(DType::F64).unwrap();
        let kernel = Tensor::zeros((18, 16), DType::F64, x.device()).unwrap();
        assert!(same_convolution_16(&x, &kernel).unwrap().is_none());
    }
}
