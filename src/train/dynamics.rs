//! What drives each update: mini-batch SGD (the default), full-batch GD, noisy GD with one of the
//! noise models of the paper's section 6 / appendix J, or the SDE by Euler–Maruyama substeps.
//!
//! Noisy GD takes the full-batch gradient plus noise with the scale of batch size b:
//! - Gaussian resampling: the gradient of Σ_i w_i ℓ_i with w = 1/n + (I − 11ᵀ/n) z / √(n b),
//!   z ~ N(0, I_n): noise covariance exactly Σ/b, with Σ = (1/n) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ, and the
//!   mini-batch structure of the Hessians kept (every sample's loss is reweighted);
//! - diagonal: N(0, diag(Σ)/b), the per-coordinate variances refreshed every `refresh_every` steps from
//!   running sums of per-sample gradients (O(d) memory, never n × d);
//! - isotropic: N(0, (tr Σ / d)/b · I), refreshed likewise;
//! - constant: N(0, σ² I) with a given σ.
//!
//! The SDE dθ = −∇L dt + √η (Σ/b)^{1/2} dW advances time η per step in `substeps` Euler–Maruyama
//! substeps of h = η / substeps, each the gradient of Σ_i w_i ℓ_i with
//! w = h/n + √(η h) (I − 11ᵀ/n) z / √(n b): drift −h∇L and noise of covariance η h Σ/b, with no
//! per-sample gradients.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::nn::dense::{gradient_moments, SampleWeights};
use crate::nn::gradient::{loss_and_gradient, mean_loss_and_gradient};
use crate::nn::loss::{LossKind, Targets};
use crate::nn::Model;

/// The update rule of a run (a plain name, so that it can be swept in a matrix; its settings are
/// [`NoiseSettings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Dynamics {
    /// Mini-batch SGD (batches from the sampler).
    #[default]
    Sgd,
    /// Full-batch gradient descent.
    Gd,
    /// Full-batch gradient with Gaussian-resampling noise of batch size b.
    ResamplingNoise,
    /// Full-batch gradient with diagonal noise diag(Σ)/b.
    DiagonalNoise,
    /// Full-batch gradient with isotropic noise (tr Σ / d)/b · I.
    IsotropicNoise,
    /// Full-batch gradient with N(0, σ² I) noise.
    ConstantNoise,
    /// The SDE of SGD with batch size b, by Euler–Maruyama substeps.
    Sde,
}

/// Settings of the noisy dynamics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseSettings {
    /// Seed of the noise (the noise of step t comes from stream t of a ChaCha RNG with this seed).
    pub seed: u64,
    /// Steps between refreshes of the diagonal / isotropic variances.
    pub refresh_every: u64,
    /// σ of the constant noise.
    pub sigma: f64,
    /// Euler–Maruyama substeps per step of time η (h = η / substeps).
    pub substeps: u32,
}

impl Dynamics {
    /// Whether updates use mini-batches from the sampler.
    pub fn uses_batches(&self) -> bool {
        matches!(self, Dynamics::Sgd)
    }
}

/// The training set on the device, as the full-batch dynamics see it.
pub struct FullBatch<'a> {
    /// All inputs (N, C, H, W).
    pub images: &'a Tensor,
    /// All targets.
    pub targets: &'a Targets,
    /// The loss.
    pub loss: LossKind,
    /// Samples per forward pass.
    pub chunk: usize,
}

impl FullBatch<'_> {
    fn n(&self) -> usize {
        self.targets.labels.dims1().unwrap_or(0)
    }

    /// The samples in chunks of at most `chunk`: (first row, inputs, targets) of each.
    fn chunks(&self) -> impl Iterator<Item = Result<(usize, Tensor, Targets)>> + '_ {
        let (n, chunk) = (self.n(), self.chunk.max(1));
        (0..n).step_by(chunk).map(move |start| {
            let len = chunk.min(n - start);
            Ok((
                start,
                self.images.narrow(0, start, len)?,
                self.targets.narrow(start, len)?,
            ))
        })
    }

    /// Gradient of Σ_i weights_i ℓ_i, accumulated over chunks (detached, one tensor per param), and
    /// the plain mean loss (1/n) Σ_i ℓ_i from the same forward passes.
    pub fn weighted_gradient(
        &self,
        model: &dyn Model,
        weights: &[f64],
    ) -> Result<(Vec<Tensor>, f64)> {
        let mut total: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0f64;
        for chunk in self.chunks() {
            let (start, inputs, targets) = chunk?;
            let len = targets.labels.dims1()?;
            let w = Tensor::from_slice(&weights[start..start + len], len, inputs.device())?
                .to_dtype(inputs.dtype())?;
            let w = SampleWeights::PerSample(w.unsqueeze(1)?);
            let (losses, grads) = loss_and_gradient(model, self.loss, &inputs, &targets, &w)?;
            loss_sum += losses.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            total = Some(match total {
                None => grads,
                Some(t) => add_all(&t, &grads)?,
            });
        }
        let gradient = total.ok_or_else(|| candle_core::Error::Msg("empty dataset".into()))?;
        Ok((gradient, loss_sum / self.n() as f64))
    }

    /// Per-coordinate variances diag(Σ) of the per-sample gradients, from running sums of g_i and
    /// g_i² (memory O(d)): for a dense stack in closed form chunk by chunk
    /// ([`gradient_moments`]), otherwise one backward pass per sample
    /// ([`loss_and_gradient`] on a batch of one).
    pub fn gradient_variances(&self, model: &dyn Model) -> Result<Vec<Tensor>> {
        let params = model.params();
        let n = self.n();
        if let Some(stack) = model.dense_stack() {
            let mut moments: Option<(Vec<Tensor>, Vec<Tensor>)> = None;
            for chunk in self.chunks() {
                let (_, inputs, targets) = chunk?;
                let (sum, sum_sq) = gradient_moments(stack, self.loss, &inputs, &targets)?;
                moments = Some(match moments {
                    None => (sum, sum_sq),
                    Some((s, q)) => (add_all(&s, &sum)?, add_all(&q, &sum_sq)?),
                });
            }
            let (sum, sum_sq) =
                moments.ok_or_else(|| candle_core::Error::Msg("empty dataset".into()))?;
            return variances(&sum, &sum_sq, n);
        }
        let mut sum: Vec<Tensor> = params
            .iter()
            .map(|p| p.var.zeros_like())
            .collect::<Result<_>>()?;
        let mut sum_sq = sum.clone();
        let one = SampleWeights::Uniform(1.0);
        for i in 0..n {
            let inputs = self.images.narrow(0, i, 1)?;
            let targets = self.targets.narrow(i, 1)?;
            let (_, gradient) = loss_and_gradient(model, self.loss, &inputs, &targets, &one)?;
            for (k, g) in gradient.into_iter().enumerate() {
                sum_sq[k] = (&sum_sq[k] + g.sqr()?)?;
                sum[k] = (&sum[k] + g)?;
            }
        }
        variances(&sum, &sum_sq, n)
    }
}

/// Elementwise a + b, part by part.
fn add_all(a: &[Tensor], b: &[Tensor]) -> Result<Vec<Tensor>> {
    a.iter().zip(b).map(|(a, b)| a + b).collect()
}

/// max(E[g²] − E[g]², 0) per coordinate from Σ g and Σ g² over n samples.
fn variances(sum: &[Tensor], sum_sq: &[Tensor], n: usize) -> Result<Vec<Tensor>> {
    let n = n as f64;
    sum.iter()
        .zip(sum_sq)
        .map(|(s, sq)| (sq / n)? - (s / n)?.sqr()?)
        .map(|v| v?.relu())
        .collect()
}

/// Noise and state carried between steps by the noisy dynamics.
pub struct NoiseState {
    settings: NoiseSettings,
    variances: Option<Vec<Tensor>>,
    refreshed_at: Option<u64>,
}

/// Centred Gaussian weights (I − 11ᵀ/n) z scaled by `scale`, plus `base` on every sample.
fn resampling_weights(rng: &mut ChaCha8Rng, n: usize, base: f64, scale: f64) -> Vec<f64> {
    let z: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    let mean = z.iter().sum::<f64>() / n as f64;
    z.iter().map(|zi| base + scale * (zi - mean)).collect()
}

fn gaussian_like(
    rng: &mut ChaCha8Rng,
    like: &Tensor,
    std: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let values: Vec<f64> = (0..like.elem_count())
        .map(|_| StandardNormal.sample(rng))
        .collect();
    let noise = Tensor::from_vec(values, like.shape(), &Device::Cpu)?
        .to_dtype(like.dtype())?
        .to_device(like.device())?;
    let noise = (noise * scale)?;
    match std {
        Some(std) => noise * std,
        None => Ok(noise),
    }
}

impl NoiseState {
    /// Fresh state. The noise of a step depends only on the seed and the step, so a resumed run
    /// draws the same noise.
    pub fn new(settings: NoiseSettings) -> Self {
        Self {
            settings,
            variances: None,
            refreshed_at: None,
        }
    }

    fn rng(&self, step: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.settings.seed);
        rng.set_stream(step);
        rng
    }

    /// Step `step` of a full-batch dynamics: returns the full training loss at θ_t and the update
    /// direction (per-param tensors, to be scaled by η by the optimizer), or no direction when the
    /// dynamics moved θ itself (the SDE's substeps).
    pub fn step(
        &mut self,
        dynamics: &Dynamics,
        model: &dyn Model,
        data: &FullBatch,
        step: u64,
        lr: f64,
        batch_size: usize,
    ) -> Result<(f64, Option<Vec<Tensor>>)> {
        let n = data.n();
        let b = batch_size as f64;
        let mean = vec![1.0 / n as f64; n];
        let mut rng = self.rng(step);
        match dynamics {
            Dynamics::Sgd => Err(candle_core::Error::Msg("SGD takes mini-batches".into())),
            Dynamics::Gd => data
                .weighted_gradient(model, &mean)
                .map(|(g, l)| (l, Some(g))),
            Dynamics::ResamplingNoise => {
                let w =
                    resampling_weights(&mut rng, n, 1.0 / n as f64, 1.0 / (n as f64 * b).sqrt());
                data.weighted_gradient(model, &w).map(|(g, l)| (l, Some(g)))
            }
            Dynamics::DiagonalNoise | Dynamics::IsotropicNoise => {
                let refresh_every = self.settings.refresh_every.max(1);
                // Variances for steps [kR, (k+1)R) come from θ at step kR.
                let due = step - step % refresh_every;
                if self.refreshed_at != Some(due) {
                    let variances = data.gradient_variances(model)?;
                    self.variances = Some(if *dynamics == Dynamics::IsotropicNoise {
                        let d: usize = variances.iter().map(Tensor::elem_count).sum();
                        let mut trace = 0f64;
                        for v in &variances {
                            trace += v.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
                        }
                        variances
                            .iter()
                            .map(|v| v.ones_like()? * (trace / d as f64))
                            .collect::<Result<_>>()?
                    } else {
                        variances
                    });
                    self.refreshed_at = Some(due);
                }
                let (gradient, loss) = data.weighted_gradient(model, &mean)?;
                let variances = self.variances.as_ref().expect("refreshed above");
                let noisy = gradient
                    .iter()
                    .zip(variances)
                    .map(|(g, var)| {
                        g + gaussian_like(&mut rng, g, Some(&var.sqrt()?), 1.0 / b.sqrt())?
                    })
                    .collect::<Result<_>>()?;
                Ok((loss, Some(noisy)))
            }
            Dynamics::ConstantNoise => {
                let sigma = self.settings.sigma;
                let (gradient, loss) = data.weighted_gradient(model, &mean)?;
                let noisy = gradient
                    .iter()
                    .map(|g| g + gaussian_like(&mut rng, g, None, sigma)?)
                    .collect::<Result<_>>()?;
                Ok((loss, Some(noisy)))
            }
            Dynamics::Sde => {
                let substeps = self.settings.substeps.max(1);
                let h = lr / substeps as f64;
                let mut first_loss = None;
                for _ in 0..substeps {
                    let w = resampling_weights(
                        &mut rng,
                        n,
                        h / n as f64,
                        (lr * h / (n as f64 * b)).sqrt(),
                    );
                    let (displacement, loss) = data.weighted_gradient(model, &w)?;
                    first_loss.get_or_insert(loss);
                    for (param, d) in model.params().iter().zip(&displacement) {
                        param.var.set(&(param.var.as_tensor() - d)?)?;
                    }
                }
                Ok((first_loss.unwrap_or(f64::NAN), None))
            }
        }
    }
}

/// The mean loss of a mini-batch and its gradient, ready for the optimizer (by hand-written passes
/// where the model has them, see [`crate::nn::gradient`]).
pub fn batch_loss_and_gradient(
    model: &dyn Model,
    kind: LossKind,
    inputs: &Tensor,
    targets: &Targets,
) -> Result<(f64, GradStore)> {
    let (loss, gradient) = mean_loss_and_gradient(model, kind, inputs, targets)?;
    Ok((loss, to_grad_store(model, gradient)?))
}

/// Packs per-param tensors into a `GradStore` for the optimizer.
pub fn to_grad_store(model: &dyn Model, gradient: Vec<Tensor>) -> Result<GradStore> {
    // A GradStore can only be created by backward(); start from an empty one of a scalar.
    let mut store = Tensor::new(0f32, &Device::Cpu)?.backward()?;
    for (param, g) in model.params().iter().zip(gradient) {
        store.insert(param.var.as_tensor(), g);
    }
    Ok(store)
}
