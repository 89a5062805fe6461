//! g_Bᵀ H g_B and ‖g_B‖² of many mini-batches of a [`DenseStack`] (the MLP) in one pass, each
//! along its own gradient g_B, without forming any g_B: H is each batch's own Hessian H_B (batch
//! sharpness) or the Hessian of a fixed set of rows, the training set (GNI, IAS).
//!
//! A dense layer's batch gradient is V_{W_l} = Σ_{i∈B} a_{l−1,i}ᵀ δ_{l,i}, V_{b_l} = Σ_{i∈B} δ_{l,i},
//! so everything a forward-mode quadratic form ([`super::dense`]) takes of V, at any row j, reduces to
//! dot products with the batch's own activations (K_l[j, i] = a_{l−1,j} · a_{l−1,i} + 1):
//!
//!   a_{l−1,j} V_{W_l} + V_{b_l} = Σ_i K_l[j, i] δ_{l,i},   ȧ_{l−1,j} V_{W_l} = Σ_i (ȧ_{l−1,j} · a_{l−1,i}) δ_{l,i},
//!   ‖g_B‖² = Σ_l Σ_ij (a_{l−1,i} · a_{l−1,j} + 1)(δ_{l,i} · δ_{l,j})  (i, j ∈ B),
//!
//! and the tangents ż_l = ȧ_{l−1} W_l + K_l δ_l, z̈_l = ä_{l−1} W_l + 2 (ȧ_{l−1} a_{l−1}ᵀ) δ_l need
//! matrix products with the weights W_l alone. K batches of b samples stacked as K·b rows take one
//! forward pass and one δ pass; the tangents of the rows the forms are taken over run as (K, m, ·)
//! tensors, where m = b and batch k's rows for H_B ([`Layout::Blocks`]), or m the rows of the fixed
//! set, the same for every batch, for H ([`Layout::Shared`]). Cheaper than forming each g_B while b
//! stays below the layers' widths ([`gram_pays`]).

use candle_core::{DType, Tensor};

use super::dense::{accumulate, OutputCurvature};
use super::{add_into, Batch, CandleContext, ParamVec, Result};
use crate::nn::dense::{output_gradient, DenseForward, SampleWeights};
use crate::nn::loss::LossKind;
use crate::nn::product::matmul;
use crate::nn::DenseStack;

const CTX: &str = "batch quadratic forms by Gram matrices";

/// Whether the Gram matrices of batches of `b` cost fewer multiply-adds than forming each g_B:
/// b Σ_l (d_in + d_out) against Σ_l d_in d_out per row the forms are taken over.
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

/// The K mini-batches of b samples stacked as rows: their forward pass and the δ's of each
/// batch's mean loss (the directions g_B, never formed).
pub(super) struct Directions {
    forward: DenseForward,
    deltas: Vec<Tensor>,
    /// a_{l−1} a_{l−1}ᵀ + 1 within each batch (K, b, b), per layer.
    kernels: Vec<Tensor>,
    /// The batches' own objectives, when `forward` kept σ'' for their own Hessians.
    own: Option<Rows>,
    count: usize,
    b: usize,
}

/// The rows a quadratic form is taken over: their objective's per-sample factors c_j,
/// c_j ∂ℓ_j/∂f, and output-space curvature.
struct Rows {
    weights: SampleWeights,
    last_delta: Tensor,
    curvature: OutputCurvature,
}

impl Rows {
    /// Rows of `forward` whose objective weighs each sample by `weight`.
    fn new(
        kind: LossKind,
        forward: &DenseForward,
        batch: &Batch,
        weight: f64,
    ) -> candle_core::Result<Self> {
        let weights = SampleWeights::Uniform(weight);
        let (grad, probs) = output_gradient(kind, &forward.outputs, &batch.targets)?;
        Ok(Self {
            last_delta: weights.apply(&grad)?,
            weights,
            curvature: OutputCurvature::new(probs, &batch.targets)?,
        })
    }
}

impl Directions {
    /// Runs `batches` (K·b rows, batch after batch) through `stack`; `own_curvature` keeps what
    /// the forms along each batch's own Hessian need.
    pub fn new(
        stack: DenseStack<'_>,
        kind: LossKind,
        batches: &Batch,
        b: usize,
        own_curvature: bool,
    ) -> Result<Self> {
        let forward = DenseForward::run(stack, &batches.inputs, own_curvature).ctx(CTX)?;
        let rows = Rows::new(kind, &forward, batches, 1.0 / b as f64).ctx(CTX)?;
        let deltas = forward.deltas(rows.last_delta.clone()).ctx(CTX)?;
        let mut dir = Self {
            forward,
            deltas,
            kernels: Vec::new(),
            own: own_curvature.then_some(rows),
            count: batches.len() / b,
            b,
        };
        dir.kernels = dir
            .forward
            .inputs
            .iter()
            .map(|a| dir.gram(a, a)?.affine(1.0, 1.0))
            .collect::<candle_core::Result<_>>()
            .ctx(CTX)?;
        Ok(dir)
    }

    /// Rows (K·b, d) as (K, b, d), one matrix per batch.
    fn per_batch(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        t.reshape((self.count, self.b, ()))
    }

    /// x yᵀ within each batch, for rows x, y (K·b, d) of the batches: (K, b, b).
    fn gram(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        self.per_batch(x)?
            .matmul(&self.per_batch(y)?.t()?.contiguous()?)
    }

    /// ‖g_k‖² = Σ_l Σ_ij (a_{l−1,i} · a_{l−1,j} + 1)(δ_{l,i} · δ_{l,j}) of every batch.
    pub fn gradient_norms(&self) -> Result<Vec<f64>> {
        let norms = || -> candle_core::Result<Vec<f64>> {
            let mut norms = vec![0.0; self.count];
            for (kernel, delta) in self.kernels.iter().zip(&self.deltas) {
                let products = (kernel * self.gram(delta, delta)?)?;
                let sums = products
                    .to_dtype(DType::F64)?
                    .sum((1, 2))?
                    .to_vec1::<f64>()?;
                norms.iter_mut().zip(sums).for_each(|(n, s)| *n += s);
            }
            Ok(norms)
        };
        norms().ctx(CTX)
    }

    /// g_kᵀ H_k g_k (or g_kᵀ G_k g_k) of every batch along its own gradient.
    pub fn own_forms(&self, gauss_newton: bool) -> Result<Vec<f64>> {
        let Some(rows) = &self.own else {
            return Err(candle_core::Error::Msg(
                "the batches' passes were run without their own curvature".into(),
            ))
            .ctx(CTX);
        };
        let forms = Forms {
            dir: self,
            eval: &self.forward,
            rows,
            layout: Layout::Blocks,
        };
        forms.quadratic(gauss_newton).ctx(CTX)
    }
}

/// A fixed set of rows (the training set, in chunks) and its mean objective, the H that GNI and
/// IAS take along each batch's gradient.
pub(super) struct FixedRows {
    chunks: Vec<(DenseForward, Rows)>,
    /// ‖∇L‖² of the set's mean loss.
    pub grad_norm_sq: f64,
}

impl FixedRows {
    /// Runs `data` through `stack` in chunks of at most `chunk_size` rows.
    pub fn new(
        stack: DenseStack<'_>,
        kind: LossKind,
        data: &Batch,
        chunk_size: usize,
    ) -> Result<Self> {
        let n = data.len();
        let mut chunks = Vec::new();
        let mut gradient = None;
        for start in (0..n).step_by(chunk_size) {
            let chunk = data.narrow(start, chunk_size.min(n - start))?;
            let forward = DenseForward::run(stack, &chunk.inputs, true).ctx(CTX)?;
            let rows = Rows::new(kind, &forward, &chunk, 1.0 / n as f64).ctx(CTX)?;
            let part = forward
                .backward_to(rows.last_delta.clone(), false)
                .ctx(CTX)?
                .gradient;
            add_into(&mut gradient, part).ctx(CTX)?;
            chunks.push((forward, rows));
        }
        Ok(Self {
            chunks,
            grad_norm_sq: ParamVec::new(gradient.unwrap_or_default()).norm_sq()?,
        })
    }

    /// g_kᵀ H g_k of every batch of `dir`, H the Hessian of this set's mean loss.
    pub fn forms_along(&self, dir: &Directions) -> Result<Vec<f64>> {
        let mut total = vec![0.0; dir.count];
        for (forward, rows) in &self.chunks {
            let forms = Forms {
                dir,
                eval: forward,
                rows,
                layout: Layout::Shared,
            };
            let part = forms.quadratic(false).ctx(CTX)?;
            total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
        }
        Ok(total)
    }
}

/// How the rows a form is taken over relate to the batches.
#[derive(Clone, Copy)]
enum Layout {
    /// Batch k's form over batch k's own rows (the passes are the batches' own).
    Blocks,
    /// Every batch's form over the same m rows.
    Shared,
}

/// Quadratic forms along each batch's gradient over the rows of `eval`.
struct Forms<'f> {
    dir: &'f Directions,
    eval: &'f DenseForward,
    rows: &'f Rows,
    layout: Layout,
}

impl Forms<'_> {
    /// A per-row tensor of the evaluated rows, shaped to broadcast against (K, m, d) tangents.
    fn rows(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        match self.layout {
            Layout::Blocks => self.dir.per_batch(t),
            Layout::Shared => Ok(t.clone()),
        }
    }

    /// K_l = a_{l−1} a_{l−1}ᵀ + 1 between the evaluated rows and each batch's: (K, m, b).
    fn kernel(&self, l: usize) -> candle_core::Result<Tensor> {
        match self.layout {
            Layout::Blocks => Ok(self.dir.kernels[l].clone()),
            Layout::Shared => {
                let (x, y) = (&self.eval.inputs[l], &self.dir.forward.inputs[l]);
                let m = x.dim(0)?;
                // One (m, K·b) product, then one (m, b) block per batch.
                matmul(x, &y.t()?)?
                    .reshape((m, self.dir.count, self.dir.b))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .affine(1.0, 1.0)
            }
        }
    }

    /// `gram` (K, m, b) times each batch's δ_l: (K, m, d_out).
    fn through(&self, gram: &Tensor, l: usize) -> candle_core::Result<Tensor> {
        gram.matmul(&self.dir.per_batch(&self.dir.deltas[l])?)
    }

    /// Per-batch sums of a (K, m, d) tensor, in f64.
    fn batch_sums(t: &Tensor) -> candle_core::Result<Vec<f64>> {
        t.to_dtype(DType::F64)?.sum((1, 2))?.to_vec1()
    }

    /// g_kᵀ H g_k (or g_kᵀ G g_k) of every batch, by forward tangents along each batch's g_k:
    /// Σ_j c_j (ḟ_jᵀ H_ℓ ḟ_j + ∂ℓ_j/∂f · f̈_j) over the evaluated rows, the second term left out
    /// for Gauss–Newton.
    fn quadratic(&self, gauss_newton: bool) -> candle_core::Result<Vec<f64>> {
        let DenseForward { slopes, bends, .. } = self.eval;
        let last = self.eval.inputs.len() - 1;
        // Tangents ȧ, ä of the current layer's input (None while zero, as for data).
        let (mut a_dot, mut a_ddot) = (None, None);
        for l in 0..last {
            let (z_dot, z_ddot) = self.tangents(l, a_dot.as_ref(), a_ddot, gauss_newton)?;
            let slope = self.rows(&slopes[l])?;
            let mut next_ddot = z_ddot.map(|t| t.broadcast_mul(&slope)).transpose()?;
            if let (false, Some(bend)) = (gauss_newton, &bends[l]) {
                let term = z_dot.sqr()?.broadcast_mul(&self.rows(bend)?)?;
                next_ddot = Some(accumulate(next_ddot, term)?);
            }
            a_ddot = next_ddot;
            a_dot = Some(z_dot.broadcast_mul(&slope)?);
        }
        let (f_dot, f_ddot) = self.tangents(last, a_dot.as_ref(), a_ddot, gauss_newton)?;
        let curvature = match &self.rows.curvature {
            OutputCurvature::Mse => OutputCurvature::Mse,
            OutputCurvature::CrossEntropy { probs, mass } => OutputCurvature::CrossEntropy {
                probs: self.rows(probs)?,
                mass: self.rows(mass)?,
            },
        };
        let hf = self.rows.weights.apply(&curvature.apply(&f_dot)?)?;
        let mut forms = Self::batch_sums(&(hf * &f_dot)?)?;
        if let Some(f_ddot) = f_ddot {
            let delta = self.rows(&self.rows.last_delta)?;
            let second = Self::batch_sums(&f_ddot.broadcast_mul(&delta)?)?;
            forms.iter_mut().zip(second).for_each(|(f, s)| *f += s);
        }
        Ok(forms)
    }

    /// Layer l's tangents (K, m, d_out) from its input's: ż_l = ȧ_{l−1} W_l + K_l δ_l and, unless
    /// `gauss_newton`, z̈_l = ä_{l−1} W_l + 2 (ȧ_{l−1} a_{l−1}ᵀ) δ_l (None while zero).
    fn tangents(
        &self,
        l: usize,
        a_dot: Option<&Tensor>,
        a_ddot: Option<Tensor>,
        gauss_newton: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let weight = &self.eval.params[2 * l];
        let mut z_dot = self.through(&self.kernel(l)?, l)?;
        let mut z_ddot = None;
        if let Some(ad) = a_dot {
            z_dot = (z_dot + times(ad, weight)?)?;
            if !gauss_newton {
                let y = self.dir.per_batch(&self.dir.forward.inputs[l])?;
                let cross = ad.matmul(&y.t()?.contiguous()?)?;
                z_ddot = Some(self.through(&cross, l)?.affine(2.0, 0.0)?);
            }
        }
        if let Some(add) = a_ddot {
            z_ddot = Some(accumulate(z_ddot, times(&add, weight)?)?);
        }
        Ok((z_dot, z_ddot))
    }
}

/// (K, m, d_in) tangents times a weight (d_in, d_out), as one (K·m)-row product.
fn times(t: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let (k, m, d) = t.dims3()?;
    matmul(&t.reshape((k * m, d))?, weight)?.reshape((k, m, ()))
}
