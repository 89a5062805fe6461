//! g_Bᵀ H_B g_B and ‖g_B‖² of many mini-batches of a [`DenseStack`] (the MLP) in one pass, each
//! along its own gradient g_B, without forming any g_B: what batch sharpness samples.
//!
//! A dense layer's batch gradient is V_{W_l} = Σ_{i∈B} a_{l−1,i}ᵀ δ_{l,i}, V_{b_l} = Σ_{i∈B} δ_{l,i},
//! so everything the quadratic form of [`super::dense`] takes of V reduces to b × b Gram matrices of
//! the batch's own activations (K_l = a_{l−1} a_{l−1}ᵀ + 1, D_l = δ_l δ_lᵀ):
//!
//!   ‖g_B‖² = Σ_l Σ_ij (K_l ⊙ D_l)_ij,
//!   a_{l−1} V_{W_l} + V_{b_l} = K_l δ_l,    ȧ_{l−1} V_{W_l} = (ȧ_{l−1} a_{l−1}ᵀ) δ_l,
//!
//! and the tangents ż_l = ȧ_{l−1} W_l + K_l δ_l, z̈_l = ä_{l−1} W_l + 2 (ȧ_{l−1} a_{l−1}ᵀ) δ_l need
//! matrix products with the weights W_l alone. Stacking K batches of b samples as K·b rows, the
//! forward pass, the δ's and the tangents are ordinary products over all rows and the Gram matrices
//! batched (K, b, b) products: about one and a half forward passes per sample, instead of a
//! gradient and a forward-mode pass per batch whose cost is that of the parameters. Cheaper than
//! forming g_B while b stays below the layers' widths ([`gram_pays`]).

use candle_core::{DType, Tensor, D};

use super::dense::{accumulate, OutputCurvature};
use super::{Batch, CandleContext, Result};
use crate::nn::dense::{output_gradient, DenseForward, SampleWeights};
use crate::nn::loss::LossKind;
use crate::nn::DenseStack;

const CTX: &str = "batch quadratic forms by Gram matrices";

/// Whether the Gram matrices of batches of `b` cost fewer multiply-adds than forming each g_B:
/// b² Σ_l (d_in + d_out) against b Σ_l d_in d_out per batch.
pub(super) fn gram_pays(stack: DenseStack<'_>, b: usize) -> bool {
    let (mut gram, mut direct) = (0, 0);
    for w in stack.params.iter().step_by(2) {
        if let [d_in, d_out] = w.var.dims() {
            gram += b * (d_in + d_out);
            direct += d_in * d_out;
        }
    }
    gram <= direct
}

/// (g_kᵀ H_k g_k, ‖g_k‖²) of each mini-batch k of the mean loss, where `batches` holds the batches
/// of `b` samples one after another; with `gauss_newton`, g_kᵀ G_k g_k in place of g_kᵀ H_k g_k.
pub(super) fn own_gradient_forms(
    stack: DenseStack<'_>,
    kind: LossKind,
    batches: &Batch,
    b: usize,
    gauss_newton: bool,
) -> Result<Vec<(f64, f64)>> {
    let count = batches.len() / b;
    let forward = DenseForward::run(stack, &batches.inputs, !gauss_newton).ctx(CTX)?;
    let weights = SampleWeights::Uniform(1.0 / b as f64);
    let (grad, probs) = output_gradient(kind, &forward.outputs, &batches.targets).ctx(CTX)?;
    let deltas = weights
        .apply(&grad)
        .and_then(|g| forward.deltas(g))
        .ctx(CTX)?;
    let curvature = match probs {
        None => OutputCurvature::Mse,
        Some(probs) => OutputCurvature::CrossEntropy {
            probs,
            mass: batches.targets.values.sum_keepdim(D::Minus1).ctx(CTX)?,
        },
    };
    let forms = Forms::new(&forward, &deltas, count, b).ctx(CTX)?;
    let norms = forms.gradient_norms().ctx(CTX)?;
    let quadratic = forms
        .quadratic(&curvature, &weights, gauss_newton)
        .ctx(CTX)?;
    Ok(quadratic.into_iter().zip(norms).collect())
}

/// The passes of K batches of b samples stacked as rows, with each layer's K_l.
struct Forms<'f> {
    forward: &'f DenseForward,
    deltas: &'f [Tensor],
    count: usize,
    b: usize,
    /// K_l = a_{l−1} a_{l−1}ᵀ + 1 within each batch (K, b, b), per layer.
    kernels: Vec<Tensor>,
}

impl<'f> Forms<'f> {
    fn new(
        forward: &'f DenseForward,
        deltas: &'f [Tensor],
        count: usize,
        b: usize,
    ) -> candle_core::Result<Self> {
        let mut forms = Self {
            forward,
            deltas,
            count,
            b,
            kernels: Vec::new(),
        };
        forms.kernels = forward
            .inputs
            .iter()
            .map(|a| forms.gram(a, a)?.affine(1.0, 1.0))
            .collect::<candle_core::Result<_>>()?;
        Ok(forms)
    }

    /// Rows (K·b, d) as (K, b, d), one matrix per batch.
    fn per_batch(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        t.reshape((self.count, self.b, ()))
    }

    /// x yᵀ within each batch: (K, b, b).
    fn gram(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        self.per_batch(x)?
            .matmul(&self.per_batch(y)?.t()?.contiguous()?)
    }

    /// `gram` (K, b, b) times each batch's δ_l, back as rows (K·b, d_out).
    fn through(&self, gram: &Tensor, l: usize) -> candle_core::Result<Tensor> {
        gram.matmul(&self.per_batch(&self.deltas[l])?)?
            .reshape((self.count * self.b, ()))
    }

    /// Per-batch sums of a (K·b, d) tensor, in f64.
    fn batch_sums(&self, t: &Tensor) -> candle_core::Result<Vec<f64>> {
        self.per_batch(&t.to_dtype(DType::F64)?)?
            .sum((1, 2))?
            .to_vec1()
    }

    /// ‖g_k‖² = Σ_l Σ_ij (K_l ⊙ D_l)_ij of every batch.
    fn gradient_norms(&self) -> candle_core::Result<Vec<f64>> {
        let mut norms = vec![0.0; self.count];
        for (kernel, delta) in self.kernels.iter().zip(self.deltas) {
            let products = (kernel * self.gram(delta, delta)?)?;
            let sums = products
                .to_dtype(DType::F64)?
                .sum((1, 2))?
                .to_vec1::<f64>()?;
            norms.iter_mut().zip(sums).for_each(|(n, s)| *n += s);
        }
        Ok(norms)
    }

    /// g_kᵀ H_k g_k (or g_kᵀ G_k g_k) of every batch, by forward tangents along each batch's g_k:
    /// Σ_i c_i (ḟ_iᵀ H_ℓ ḟ_i + ∂ℓ_i/∂f · f̈_i), the second term left out for Gauss–Newton.
    fn quadratic(
        &self,
        curvature: &OutputCurvature,
        weights: &SampleWeights,
        gauss_newton: bool,
    ) -> candle_core::Result<Vec<f64>> {
        let DenseForward { slopes, bends, .. } = self.forward;
        let last = self.deltas.len() - 1;
        // Tangents ȧ, ä of the current layer's input (None while zero, as for data).
        let (mut a_dot, mut a_ddot) = (None, None);
        for l in 0..last {
            let (z_dot, z_ddot) = self.tangents(l, a_dot.as_ref(), a_ddot, gauss_newton)?;
            let mut next_ddot = z_ddot.map(|t| t * &slopes[l]).transpose()?;
            if let (false, Some(bend)) = (gauss_newton, &bends[l]) {
                next_ddot = Some(accumulate(next_ddot, (z_dot.sqr()? * bend)?)?);
            }
            a_ddot = next_ddot;
            a_dot = Some((&z_dot * &slopes[l])?);
        }
        let (f_dot, f_ddot) = self.tangents(last, a_dot.as_ref(), a_ddot, gauss_newton)?;
        let hf = weights.apply(&curvature.apply(&f_dot)?)?;
        let mut forms = self.batch_sums(&(hf * &f_dot)?)?;
        if let Some(f_ddot) = f_ddot {
            let second = self.batch_sums(&(&self.deltas[last] * f_ddot)?)?;
            forms.iter_mut().zip(second).for_each(|(f, s)| *f += s);
        }
        Ok(forms)
    }

    /// Layer l's tangents from its input's: ż_l = ȧ_{l−1} W_l + K_l δ_l and, unless
    /// `gauss_newton`, z̈_l = ä_{l−1} W_l + 2 (ȧ_{l−1} a_{l−1}ᵀ) δ_l (None while zero).
    fn tangents(
        &self,
        l: usize,
        a_dot: Option<&Tensor>,
        a_ddot: Option<Tensor>,
        gauss_newton: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let weight = &self.forward.params[2 * l];
        let mut z_dot = self.through(&self.kernels[l], l)?;
        let mut z_ddot = None;
        if let Some(ad) = a_dot {
            z_dot = (z_dot + ad.matmul(weight)?)?;
            if !gauss_newton {
                let cross = self.gram(ad, &self.forward.inputs[l])?;
                z_ddot = Some(self.through(&cross, l)?.affine(2.0, 0.0)?);
            }
        }
        if let Some(add) = a_ddot {
            z_ddot = Some(accumulate(z_ddot, add.matmul(weight)?)?);
        }
        Ok((z_dot, z_ddot))
    }
}
