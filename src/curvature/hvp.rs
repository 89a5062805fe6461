//! Hessian- and Gauss–Newton-vector products on one fixed batch.
//!
//! [`HessianOperator`] runs the forward pass and the first backward pass once, keeping the
//! gradient's graph, and then applies H v for many v by differentiating gᵀv a second time (double
//! backward; needs `CANDLE_GRAD_DO_NOT_DETACH=1`). [`GaussNewtonOperator`] applies
//! G v = Jᵀ H_z J v, where J is the Jacobian of the outputs and H_z the Hessian of the loss with
//! respect to the outputs (2I/N per sample for the paper's MSE): J v comes from the double-backward
//! R-operator trick J v = ∂/∂u [(Jᵀu)·v], H_z w from a double backward in output space, and Jᵀ q
//! from one more backward pass.
//!
//! Models that are a plain stack of dense layers (the MLP, [`Model::dense_stack`]), convolutions
//! followed by one (the 5-layer CNN, [`Model::conv_net`]) or, on the CPU, a residual net (the
//! ResNets, [`Model::residual_net`]) take both products by hand-written forward-over-reverse passes
//! instead ([`HvpMethod::Auto`], modules `dense`, `conv` and `residual`): the same values, several
//! times fewer kernels, no autograd graph.
//!
//! Large batches are split into chunks: the loss of a chunk is scaled by its share of the whole
//! (n_c / n for the mean loss), so chunk products simply add up to the full-batch product. Graphs
//! are either kept for all chunks (fast, memory ∝ n) or rebuilt chunk by chunk for every product
//! (memory ∝ chunk size). Everything handed back to callers is detached from the graphs.

use candle_core::{DType, Device, Tensor, Var};

use super::{Batch, CandleContext, CurvatureError, ParamVec, Result};
use crate::data::LabelEncoding;
use crate::nn::conv::ConvForward;
use crate::nn::dense::DenseForward;
use crate::nn::gradient::param_grads;
use crate::nn::loss::{mean_loss, weighted_loss, LossKind, Targets};
use crate::nn::pass::Forward;
use crate::nn::residual::ResidualForward;
use crate::nn::{ConvNet, DenseStack, Model, Param, ResidualNet, TorchLayout};

mod conv;
mod dense;
mod gram;
mod residual;
use dense::{Chunk, ChunkProducts};

/// Which scalar objective of a batch is differentiated.
#[derive(Debug, Clone)]
pub enum Objective {
    /// The mean loss over the batch (`mean_loss`), as SGD and the full-batch loss use.
    Mean,
    /// Σ_i w_i ℓ_i for per-sample weights (N,) (`weighted_loss`), as noisy-GD variants use.
    Weighted(Tensor),
}

/// How products are differentiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HvpMethod {
    /// Hand-written passes for dense stacks (the MLP), conv nets (the CNN) and, on the CPU,
    /// residual nets (the ResNets); double backward otherwise.
    #[default]
    Auto,
    /// Double backward through candle's autograd for every model (the reference).
    Autodiff,
}

/// How a batch is split, whether graphs are kept between products, and how products are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HvpConfig {
    /// At most this many samples per forward graph.
    pub chunk_size: usize,
    /// Keep every chunk's graph for the operator's lifetime (one forward + backward in total) or
    /// rebuild each chunk's graph for every product (memory of one chunk only).
    pub retain_graphs: bool,
    /// Hand-written passes where the model allows them, or autograd throughout.
    #[serde(default)]
    pub method: HvpMethod,
}

impl Default for HvpConfig {
    /// Chunks of 4096 samples, graphs kept, hand-written passes where possible.
    fn default() -> Self {
        Self {
            chunk_size: 4096,
            retain_graphs: true,
            method: HvpMethod::Auto,
        }
    }
}

impl HvpConfig {
    /// The model's hand-written passes when this config takes them.
    fn passes<'a>(&self, model: &'a dyn Model) -> Option<Passes<'a>> {
        match self.method {
            HvpMethod::Autodiff => None,
            HvpMethod::Auto => model
                .dense_stack()
                .map(Passes::Dense)
                .or_else(|| model.conv_net().map(Passes::Conv))
                .or_else(|| model.residual_net().map(Passes::Residual)),
        }
    }
}

/// g_Bᵀ H g_B and ‖g_B‖² of many mini-batches of the mean loss in one pass, H each batch's own
/// Hessian H_B (batch sharpness; or its Gauss–Newton matrix) or the Hessian of a fixed set (GNI,
/// IAS), by Gram matrices of each batch's activations instead of forming g_B (module `gram`): for
/// dense stacks under the hand-written passes, where that is the cheaper way.
#[derive(Clone, Copy)]
pub struct BatchGradientForms<'a> {
    stack: DenseStack<'a>,
    kind: LossKind,
    batch_size: usize,
    chunk_size: usize,
}

impl HvpConfig {
    /// [`BatchGradientForms`] of `model` under `kind` for batches of `batch_size`, when this
    /// config's passes take the model and the Gram matrices are cheaper than forming each g_B.
    pub fn batch_gradient_forms<'a>(
        &self,
        model: &'a dyn Model,
        kind: LossKind,
        batch_size: usize,
    ) -> Option<BatchGradientForms<'a>> {
        match self.passes(model)? {
            Passes::Dense(stack)
                if (1..=self.chunk_size).contains(&batch_size)
                    && gram::gram_pays(stack, batch_size) =>
            {
                Some(BatchGradientForms {
                    stack,
                    kind,
                    batch_size,
                    chunk_size: self.chunk_size,
                })
            }
            _ => None,
        }
    }
}

impl<'a> BatchGradientForms<'a> {
    /// How many batches one pass of [`Self::own`] takes (at most `chunk_size` samples).
    pub fn batches_per_pass(&self) -> usize {
        self.chunk_size / self.batch_size
    }

    /// The batches of `batches` (one after another) and their gradient directions.
    fn directions(&self, batches: &Batch, own_curvature: bool) -> Result<gram::Directions> {
        let (n, b) = (batches.len(), self.batch_size);
        if n % b != 0 {
            return Err(CurvatureError::Batch(format!(
                "{n} samples are not whole batches of {b}"
            )));
        }
        gram::Directions::new(self.stack, self.kind, batches, b, own_curvature)
    }

    /// (g_kᵀ H_k g_k, ‖g_k‖²) of each batch k in `batches`, which holds them one after another;
    /// with `gauss_newton`, g_kᵀ G_k g_k in place of g_kᵀ H_k g_k.
    pub fn own(&self, batches: &Batch, gauss_newton: bool) -> Result<Vec<(f64, f64)>> {
        let dir = self.directions(batches, true)?;
        Ok(dir
            .own_forms(gauss_newton)?
            .into_iter()
            .zip(dir.gradient_norms()?)
            .collect())
    }

    /// The forms along batch gradients with H the Hessian of `data`'s mean loss: runs `data`'s
    /// forward pass (in chunks) once.
    pub fn fixed(&self, data: &Batch) -> Result<FixedSetForms<'a>> {
        Ok(FixedSetForms {
            rows: gram::FixedRows::new(self.stack, self.kind, data, self.chunk_size)?,
            per_pass: self.chunk_size / data.len().min(self.chunk_size),
            forms: *self,
        })
    }
}

/// [`BatchGradientForms`] with H the Hessian of a fixed set's mean loss.
pub struct FixedSetForms<'a> {
    rows: gram::FixedRows,
    per_pass: usize,
    forms: BatchGradientForms<'a>,
}

impl FixedSetForms<'_> {
    /// ‖∇L‖² of the fixed set's mean loss.
    pub fn grad_norm_sq(&self) -> f64 {
        self.rows.grad_norm_sq
    }

    /// How many batches one pass of [`Self::along`] takes (the set's rows times the batches stay
    /// within `chunk_size`).
    pub fn batches_per_pass(&self) -> usize {
        self.per_pass
    }

    /// (g_kᵀ H g_k, ‖g_k‖²) of each batch k in `batches`, which holds them one after another.
    pub fn along(&self, batches: &Batch) -> Result<Vec<(f64, f64)>> {
        let dir = self.forms.directions(batches, false)?;
        Ok(self
            .rows
            .forms_along(&dir)?
            .into_iter()
            .zip(dir.gradient_norms()?)
            .collect())
    }
}

/// A model's structure for hand-written forward-over-reverse passes.
#[derive(Clone, Copy)]
enum Passes<'a> {
    Dense(DenseStack<'a>),
    Conv(ConvNet<'a>),
    Residual(ResidualNet<'a>),
}

/// The retained passes of one chunk, whichever structure took them.
type PassChunk = Box<dyn ChunkProducts>;

/// Runs the chunk `spec` through `passes`' hand-written forward and backward passes: the retained
/// state, the chunk's objective and its gradient.
fn build_chunk(
    passes: Passes<'_>,
    kind: LossKind,
    spec: &ChunkSpec,
) -> Result<(PassChunk, f64, Vec<Tensor>)> {
    fn boxed<F: Forward>(chunk: Chunk<F>) -> (PassChunk, f64, Vec<Tensor>)
    where
        Chunk<F>: ChunkProducts + 'static,
    {
        let (loss, gradient) = (chunk.loss, chunk.gradient().to_vec());
        (Box::new(chunk), loss, gradient)
    }
    Ok(match passes {
        // The dense stack keeps σ'' (its second-order tangents need it).
        Passes::Dense(stack) => boxed(Chunk::build(
            |x| DenseForward::run(stack, x, true),
            kind,
            spec,
            "dense forward and backward pass",
        )?),
        Passes::Conv(net) => boxed(Chunk::build(
            |x| ConvForward::run(net, x),
            kind,
            spec,
            "conv forward and backward pass",
        )?),
        Passes::Residual(net) => boxed(Chunk::build(
            |x| ResidualForward::run(net, x),
            kind,
            spec,
            "residual forward and backward pass",
        )?),
    })
}

/// One chunk of a batch with its share of the objective.
pub struct ChunkSpec {
    batch: Batch,
    weights: Option<Tensor>,
    /// Factor on the chunk's objective so that chunk objectives sum to the whole objective.
    scale: f64,
}

/// Chunks, and their built states when graphs are retained.
struct Chunked<S> {
    specs: Vec<ChunkSpec>,
    retained: Option<Vec<S>>,
}

impl<S> Chunked<S> {
    /// Splits `batch` into chunks (mean objective: scale n_c/n; weighted: scale 1, weights split).
    fn split(batch: &Batch, objective: &Objective, cfg: &HvpConfig) -> Result<Vec<ChunkSpec>> {
        if cfg.chunk_size == 0 {
            return Err(CurvatureError::Config {
                field: "chunk_size",
                message: "must be at least 1".into(),
            });
        }
        let n = batch.len();
        if let Objective::Weighted(w) = objective {
            if w.dims() != [n] {
                return Err(CurvatureError::Batch(format!(
                    "weights of shape {:?} for {n} samples",
                    w.dims()
                )));
            }
        }
        let mut specs = Vec::new();
        let mut start = 0;
        while start < n {
            let len = cfg.chunk_size.min(n - start);
            let whole = start == 0 && len == n;
            let chunk = if whole {
                batch.clone()
            } else {
                batch.narrow(start, len)?
            };
            let (weights, scale) = match objective {
                Objective::Mean => (None, len as f64 / n as f64),
                Objective::Weighted(w) => {
                    (Some(w.narrow(0, start, len).ctx("weights chunk")?), 1.0)
                }
            };
            specs.push(ChunkSpec {
                batch: chunk,
                weights,
                scale,
            });
            start += len;
        }
        Ok(specs)
    }

    /// Splits `batch` (see [`Self::split`]) and builds every chunk's state with `build`, which also
    /// gives the chunk's objective and gradient; keeps the states when `cfg.retain_graphs`. Returns
    /// the chunks, the summed gradient and the summed objective.
    fn build(
        batch: &Batch,
        objective: &Objective,
        cfg: &HvpConfig,
        build: impl Fn(&ChunkSpec) -> Result<(S, f64, Vec<Tensor>)>,
    ) -> Result<(Self, ParamVec, f64)> {
        let specs = Self::split(batch, objective, cfg)?;
        let mut retained = Vec::new();
        let mut gradient = None;
        let mut loss = 0.0;
        for spec in &specs {
            let (state, chunk_loss, chunk_gradient) = build(spec)?;
            loss += chunk_loss;
            add_into(&mut gradient, chunk_gradient).ctx("gradient")?;
            if cfg.retain_graphs {
                retained.push(state);
            }
        }
        let chunks = Self {
            specs,
            retained: cfg.retain_graphs.then_some(retained),
        };
        Ok((chunks, ParamVec::new(gradient.unwrap_or_default()), loss))
    }

    /// Runs `f` on every chunk's state, building states on the fly when they are not retained.
    fn visit(
        &self,
        build: impl Fn(&ChunkSpec) -> Result<S>,
        mut f: impl FnMut(&S) -> Result<()>,
    ) -> Result<()> {
        match &self.retained {
            Some(states) => states.iter().try_for_each(f),
            None => self.specs.iter().try_for_each(|spec| f(&build(spec)?)),
        }
    }
}

/// How an operator takes its products, with the per-chunk state each way keeps.
enum Engine<'a, S> {
    /// Through candle's autograd graphs.
    Autodiff(Chunked<S>),
    /// By hand-written passes through a dense stack or a conv net.
    Passes(Passes<'a>, Chunked<PassChunk>),
}

/// The hand-written passes of every chunk (kept when `cfg.retain_graphs`), the gradient and the
/// objective.
fn build_passes<'a, S>(
    passes: Passes<'a>,
    kind: LossKind,
    batch: &Batch,
    objective: &Objective,
    cfg: &HvpConfig,
) -> Result<(Engine<'a, S>, ParamVec, f64)> {
    let (chunks, gradient, loss) = Chunked::build(batch, objective, cfg, |spec| {
        build_chunk(passes, kind, spec)
    })?;
    Ok((Engine::Passes(passes, chunks), gradient, loss))
}

/// Σ over chunks of the hand-written Hessian (or Gauss–Newton) product with `v`.
fn apply_passes(
    passes: Passes<'_>,
    kind: LossKind,
    chunks: &Chunked<PassChunk>,
    v: &ParamVec,
    gauss_newton: bool,
) -> Result<ParamVec> {
    let mut acc = None;
    chunks.visit(
        |spec| Ok(build_chunk(passes, kind, spec)?.0),
        |chunk| add_into(&mut acc, chunk.apply(v, gauss_newton)?).ctx("sum over chunks"),
    )?;
    Ok(ParamVec::new(acc.unwrap_or_default()))
}

/// Σ over chunks of the hand-written quadratic form vᵀ H v (or vᵀ G v).
fn quadratic_form_passes(
    passes: Passes<'_>,
    kind: LossKind,
    chunks: &Chunked<PassChunk>,
    v: &ParamVec,
    gauss_newton: bool,
) -> Result<f64> {
    let mut total = 0.0;
    chunks.visit(
        |spec| Ok(build_chunk(passes, kind, spec)?.0),
        |chunk| {
            total += chunk.quadratic_form(v, gauss_newton)?;
            Ok(())
        },
    )?;
    Ok(total)
}

/// The chunk's share of the objective, as a differentiable scalar of `outputs`.
fn chunk_objective(
    kind: LossKind,
    outputs: &Tensor,
    spec: &ChunkSpec,
) -> candle_core::Result<Tensor> {
    let loss = match &spec.weights {
        None => mean_loss(kind, outputs, &spec.batch.targets)?,
        Some(w) => weighted_loss(kind, outputs, &spec.batch.targets, w)?,
    };
    if spec.scale == 1.0 {
        Ok(loss)
    } else {
        loss.affine(spec.scale, 0.0)
    }
}

fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// Σ_p ⟨a_p, v_p⟩ as a differentiable scalar (a keeps its graph, v is a constant).
fn pair(a: &[Tensor], v: &ParamVec) -> candle_core::Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (a, v) in a.iter().zip(v.parts()) {
        let term = (a * v)?.sum_all()?;
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    match total {
        Some(t) => Ok(t),
        None => Tensor::new(0f32, &Device::Cpu),
    }
}

fn add_into(acc: &mut Option<Vec<Tensor>>, parts: Vec<Tensor>) -> candle_core::Result<()> {
    *acc = Some(match acc.take() {
        None => parts,
        Some(a) => a
            .iter()
            .zip(&parts)
            .map(|(a, b)| a + b)
            .collect::<candle_core::Result<_>>()?,
    });
    Ok(())
}

/// The autograd state of one chunk for one kind of curvature product: what [`CurvatureOperator`]
/// builds per chunk (and keeps when graphs are retained) when no hand-written passes apply.
pub trait AutodiffProduct: Sized {
    /// Whether the product is the Gauss–Newton one (G v) rather than the Hessian's (H v).
    const GAUSS_NEWTON: bool;
    /// Forward pass and first backward pass of one chunk; the chunk's objective value.
    fn build(model: &dyn Model, kind: LossKind, spec: &ChunkSpec) -> Result<(Self, f64)>;
    /// The chunk objective's gradient, detached.
    fn gradient(&self, model: &dyn Model) -> Result<Vec<Tensor>>;
    /// The chunk's product with `v`, detached.
    fn apply(&self, model: &dyn Model, v: &ParamVec) -> Result<Vec<Tensor>>;
}

/// A batch objective's curvature (the Hessian, or the Gauss–Newton matrix) as a linear operator on
/// one fixed batch: the forward and first backward passes run once, per chunk, at construction.
pub struct CurvatureOperator<'a, S> {
    model: &'a dyn Model,
    kind: LossKind,
    engine: Engine<'a, S>,
    gradient: ParamVec,
    loss: f64,
    samples: usize,
}

/// The Hessian of a batch's objective as a linear operator (double backward, or hand-written passes).
pub type HessianOperator<'a> = CurvatureOperator<'a, HessianChunk>;

/// The Gauss–Newton matrix G = Jᵀ H_z J of a batch's objective as a linear operator.
pub type GaussNewtonOperator<'a> = CurvatureOperator<'a, GnChunk>;

impl<'a, S: AutodiffProduct> CurvatureOperator<'a, S> {
    /// Runs the forward and first backward pass on `batch` (chunk by chunk) and keeps the graphs
    /// (or the hand-written passes' state) when `cfg.retain_graphs`.
    pub fn new(
        model: &'a dyn Model,
        kind: LossKind,
        batch: &Batch,
        objective: &Objective,
        cfg: &HvpConfig,
    ) -> Result<Self> {
        let (engine, gradient, loss) = match cfg.passes(model) {
            Some(passes) => build_passes(passes, kind, batch, objective, cfg)?,
            None => {
                let (chunks, gradient, loss) = Chunked::build(batch, objective, cfg, |spec| {
                    let (chunk, loss) = S::build(model, kind, spec)?;
                    let gradient = chunk.gradient(model)?;
                    Ok((chunk, loss, gradient))
                })?;
                (Engine::Autodiff(chunks), gradient, loss)
            }
        };
        Ok(Self {
            model,
            kind,
            engine,
            gradient,
            loss,
            samples: batch.len(),
        })
    }

    /// The objective's value.
    pub fn loss(&self) -> f64 {
        self.loss
    }

    /// The objective's gradient (detached).
    pub fn gradient(&self) -> &ParamVec {
        &self.gradient
    }

    /// Number of samples in the batch.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// vᵀ H v (or vᵀ G v): by a forward pass alone with hand-written passes, as v · (H v)
    /// otherwise.
    pub fn quadratic_form(&self, v: &ParamVec) -> Result<f64> {
        match &self.engine {
            Engine::Passes(passes, chunks) => {
                quadratic_form_passes(*passes, self.kind, chunks, v, S::GAUSS_NEWTON)
            }
            Engine::Autodiff(_) => v.dot(&self.apply(v)?),
        }
    }

    /// H v (or G v).
    pub fn apply(&self, v: &ParamVec) -> Result<ParamVec> {
        let chunks = match &self.engine {
            Engine::Passes(passes, chunks) => {
                return apply_passes(*passes, self.kind, chunks, v, S::GAUSS_NEWTON)
            }
            Engine::Autodiff(chunks) => chunks,
        };
        let mut acc = None;
        chunks.visit(
            |spec| Ok(S::build(self.model, self.kind, spec)?.0),
            |chunk| add_into(&mut acc, chunk.apply(self.model, v)?).ctx("sum over chunks"),
        )?;
        Ok(ParamVec::new(acc.unwrap_or_default()))
    }
}

/// Graph state of one chunk for Hessian products: the gradient per parameter, with its graph.
pub struct HessianChunk {
    grads: Vec<Tensor>,
}

impl AutodiffProduct for HessianChunk {
    const GAUSS_NEWTON: bool = false;

    fn build(model: &dyn Model, kind: LossKind, spec: &ChunkSpec) -> Result<(Self, f64)> {
        let outputs = model.forward(&spec.batch.inputs).ctx("forward pass")?;
        let loss = chunk_objective(kind, &outputs, spec).ctx("loss")?;
        let grads = param_grads(&loss, model.params(), true).ctx("gradient")?;
        Ok((Self { grads }, scalar(&loss).ctx("loss")?))
    }

    fn gradient(&self, _model: &dyn Model) -> Result<Vec<Tensor>> {
        Ok(self.grads.iter().map(|g| g.detach()).collect())
    }

    /// H v = ∂/∂θ [g · v].
    fn apply(&self, model: &dyn Model, v: &ParamVec) -> Result<Vec<Tensor>> {
        let ctx = "Hessian-vector product";
        let s = pair(&self.grads, v).ctx(ctx)?;
        param_grads(&s, model.params(), false).ctx(ctx)
    }
}

/// Graph state of one chunk for Gauss–Newton products.
pub struct GnChunk {
    /// Model outputs z (N, K), with the forward graph.
    outputs: Tensor,
    /// Dummy output-space variable u for the R-operator trick.
    u: Var,
    /// Jᵀu per parameter, with its graph (linear in u).
    jt_u: Vec<Tensor>,
    /// A copy of z as a variable, the loss's argument in output space.
    z: Var,
    /// ∂loss/∂z at `z`, with its graph (for H_z w by one more backward).
    grad_z: Tensor,
}

impl AutodiffProduct for GnChunk {
    const GAUSS_NEWTON: bool = true;

    fn build(model: &dyn Model, kind: LossKind, spec: &ChunkSpec) -> Result<(Self, f64)> {
        let ctx = "Gauss-Newton graph";
        let outputs = model.forward(&spec.batch.inputs).ctx("forward pass")?;
        let u = Var::zeros(outputs.shape(), outputs.dtype(), outputs.device()).ctx(ctx)?;
        let s = (&outputs * u.as_tensor())
            .and_then(|t| t.sum_all())
            .ctx(ctx)?;
        let jt_u = param_grads(&s, model.params(), true).ctx(ctx)?;
        let z = Var::from_tensor(&outputs.detach()).ctx(ctx)?;
        let loss = chunk_objective(kind, z.as_tensor(), spec).ctx("loss")?;
        let grads = loss.backward().ctx(ctx)?;
        let grad_z = match grads.get(z.as_tensor()) {
            Some(g) => g.clone(),
            None => z.as_tensor().zeros_like().ctx(ctx)?,
        };
        let chunk = Self {
            outputs,
            u,
            jt_u,
            z,
            grad_z,
        };
        Ok((chunk, scalar(&loss).ctx("loss")?))
    }

    /// ∇L = Jᵀ ∂L/∂z.
    fn gradient(&self, model: &dyn Model) -> Result<Vec<Tensor>> {
        let ctx = "Gauss-Newton gradient";
        let s = (&self.outputs * self.grad_z.detach())
            .and_then(|t| t.sum_all())
            .ctx(ctx)?;
        param_grads(&s, model.params(), false).ctx(ctx)
    }

    /// G v = Jᵀ H_z J v.
    fn apply(&self, model: &dyn Model, v: &ParamVec) -> Result<Vec<Tensor>> {
        let ctx = "Gauss-Newton-vector product";
        // J v = ∂/∂u [(Jᵀu)·v].
        let t = pair(&self.jt_u, v).ctx(ctx)?;
        let jv = match t.backward().ctx(ctx)?.get(self.u.as_tensor()) {
            Some(g) => g.detach(),
            None => self.u.as_tensor().zeros_like().ctx(ctx)?,
        };
        // H_z (J v) = ∂/∂z [∂L/∂z · J v].
        let s = (&self.grad_z * &jv).and_then(|t| t.sum_all()).ctx(ctx)?;
        let hjv = match s.backward().ctx(ctx)?.get(self.z.as_tensor()) {
            Some(g) => g.detach(),
            None => self.z.as_tensor().zeros_like().ctx(ctx)?,
        };
        // Jᵀ q = ∂/∂θ [z · q].
        let r = (&self.outputs * &hjv).and_then(|t| t.sum_all()).ctx(ctx)?;
        param_grads(&r, model.params(), false).ctx(ctx)
    }
}

/// A linear model x ↦ x W used by [`self_check`].
struct ProbeModel {
    params: Vec<Param>,
}

impl Model for ProbeModel {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.flatten_from(1)?.matmul(self.params[0].var.as_tensor())
    }

    fn params(&self) -> &[Param] {
        &self.params
    }
}

/// Checks on `device` that a Hessian-vector product by double backward is right and non-zero:
/// for the linear model x ↦ xW under the paper's MSE, H V = (2/N) XᵀX V in closed form. Fails with
/// a clear message when `CANDLE_GRAD_DO_NOT_DETACH=1` was not set before this thread's first
/// backward pass (candle then silently returns no second-order gradients).
pub fn self_check(device: &Device) -> Result<()> {
    let ctx = "HVP self-check";
    let (n, d, k) = (4usize, 3usize, 2usize);
    let x: Vec<f32> = vec![
        1.0, 2.0, -1.0, 0.5, -0.5, 1.5, 2.0, 0.0, 1.0, -1.0, 1.0, 0.5,
    ];
    let w: Vec<f32> = vec![0.3, -0.2, 0.1, 0.4, -0.5, 0.2];
    let y: Vec<f32> = vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0];
    let v: Vec<f32> = vec![1.0, -1.0, 0.5, 2.0, -0.5, 1.0];
    let var = Var::from_tensor(&Tensor::from_slice(&w, (d, k), device).ctx(ctx)?).ctx(ctx)?;
    let model = ProbeModel {
        params: vec![Param {
            name: "weight".into(),
            var,
            layout: TorchLayout::Same,
        }],
    };
    let targets = Targets {
        values: Tensor::from_slice(&y, (n, k), device).ctx(ctx)?,
        labels: Tensor::zeros(n, DType::U32, device).ctx(ctx)?,
        encoding: LabelEncoding::OneHot,
    };
    let batch = Batch::new(
        Tensor::from_slice(&x, (n, d, 1, 1), device).ctx(ctx)?,
        targets,
    )?;
    let op = HessianOperator::new(
        &model,
        LossKind::Mse,
        &batch,
        &Objective::Mean,
        &HvpConfig::default(),
    )?;
    let vt = ParamVec::new(vec![Tensor::from_slice(&v, (d, k), device).ctx(ctx)?]);
    let got = op.apply(&vt)?.to_f64_vec()?;
    // (2/N) XᵀX V, in f64.
    let mut expected = vec![0.0f64; d * k];
    for a in 0..d {
        for c in 0..k {
            let mut sum = 0.0;
            for b in 0..d {
                let xtx: f64 = (0..n).map(|i| (x[i * d + a] * x[i * d + b]) as f64).sum();
                sum += xtx * v[b * k + c] as f64;
            }
            expected[a * k + c] = 2.0 / n as f64 * sum;
        }
    }
    let norm = |u: &[f64]| u.iter().map(|x| x * x).sum::<f64>().sqrt();
    let diff: Vec<f64> = got.iter().zip(&expected).map(|(a, b)| a - b).collect();
    let rel = norm(&diff) / norm(&expected);
    if norm(&got) == 0.0 {
        return Err(CurvatureError::SelfCheck(
            "the Hessian-vector product is zero: set CANDLE_GRAD_DO_NOT_DETACH=1 before the \
             first backward pass of this thread (candle reads it once per thread)"
                .into(),
        ));
    }
    if rel.is_nan() || rel >= 1e-4 {
        return Err(CurvatureError::SelfCheck(format!(
            "relative error {rel:e} against the closed form (2/N) XᵀX V on {device:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
