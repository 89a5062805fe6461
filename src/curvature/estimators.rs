//! The measured quantities of the paper, on one model, loss and training set ([`Landscape`]).
//!
//! Conventions (see `paper-conventions.md`, "Measurements"):
//! - Mini-batches for expectations E_B are uniform random subsets of size b drawn without
//!   replacement from the training set given, each batch independently, from the estimator's own
//!   `ChaCha8Rng` seeded by the caller; the same inputs and seed give bit-identical results on the
//!   CPU.
//! - Full-batch quantities (λmax, ∇L, H in GNI/IAS, trace, second-moment contraction) use the whole
//!   training set, or a seeded random subsample of it when [`FullBatchConfig::subsample`] asks
//!   for one (mini-batches are still drawn from the whole set). Large sets are processed in chunks.
//! - Monte Carlo estimators stop adaptively on the relative standard error of exactly the
//!   statistic they report, between `min_samples` and `max_samples`.
//!
//! Costs (one HVP ≈ two to three forward+backward passes of the same batch): batch sharpness is one
//! forward/backward plus one HVP of size b per batch; GNI and IAS one full-batch HVP per batch (for
//! an MLP whose widths exceed b, `hvp::BatchGradientForms` takes both many batches per pass, at
//! about one and a half forward passes per sample for batch sharpness and a fraction of a
//! full-batch HVP per batch for GNI and IAS);
//! λmax a Lanczos run of full-batch HVPs (warm starts help); λmax^b a Lanczos run per batch; the
//! second-moment contraction a Lanczos run whose every product costs a full HVP plus two batch
//! HVPs per sampled batch; Gauss–Newton products cost three backward passes.
//!
//! Measured (debug build of eoss, dependencies at opt-level 3, f32, 2 shared and busy CPU cores):
//! for the paper's MLP 3072-512-512-10, building the operator (forward + backward with graph) on
//! 512 samples took 0.38 s, one HVP 0.60 s and one Gauss–Newton product 0.81 s; on 2048 samples
//! 1.1 s, 1.9 s and 3.3 s. `candle-notes.md` reports 0.31 s per HVP on 512 samples on idle cores.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::batch::random_subset;
use super::hvp::{GaussNewtonOperator, HessianOperator, HvpConfig, Objective};
use super::lanczos::{lanczos, Eigenpairs, LanczosConfig, Start};
use super::stats::{mean_estimate, ratio_estimate, Estimate, MonteCarloConfig};
use super::vector::Probe;
use super::{Batch, CurvatureError, ParamVec, Result};
use crate::nn::loss::LossKind;
use crate::nn::Model;

/// How full-batch quantities see the training set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FullBatchConfig {
    /// Use a seeded uniform random subset of this many samples instead of the whole set.
    pub subsample: Option<usize>,
    /// Seed of that subset.
    pub subsample_seed: u64,
    /// Chunking of full-batch (and mini-batch) products.
    pub hvp: HvpConfig,
}

/// λmax^b: statistics of λmax(H_B) over random batches.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LambdaMaxB {
    /// E_B[λmax(H_B)].
    pub mean: Estimate,
    /// The largest λmax(H_B) seen.
    pub max: f64,
}

/// The second-moment contraction of Wu et al. (2018) in the paper's two forms.
#[derive(Debug, Clone)]
pub struct SecondMomentContraction {
    /// Eq. 37: `λmax(E_B[(I − ηH_B)²])` (threshold 1).
    pub eq37: f64,
    /// Eq. 39: `λmax(−2ηH + η² E_B[H_B²])` (threshold 0); eq37 = 1 + eq39.
    pub eq39: f64,
    /// Number of batches the expectation was taken over.
    pub batches: usize,
    /// The Lanczos run on the eq. 39 operator (iterations, residual, eigenvector for warm starts).
    pub eigen: Eigenpairs,
}

/// The batches an expectation over B is taken over.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchSet {
    /// `count` independent uniform batches of size `batch_size`, from a `ChaCha8Rng` with `seed`.
    Random {
        /// b.
        batch_size: usize,
        /// Number of batches.
        count: usize,
        /// Seed.
        seed: u64,
    },
    /// Exactly these batches (row indices into the training set), e.g. all C(n, b) of them.
    Given(Vec<Vec<usize>>),
}

/// A model, a loss and a training set: everything the curvature quantities are measured on.
pub struct Landscape<'a> {
    model: &'a dyn Model,
    loss: LossKind,
    data: &'a Batch,
    full: Batch,
    hvp: HvpConfig,
}

impl<'a> Landscape<'a> {
    /// Prepares measurements of `model` under `loss` on the training set `data`.
    pub fn new(
        model: &'a dyn Model,
        loss: LossKind,
        data: &'a Batch,
        full: &FullBatchConfig,
    ) -> Result<Self> {
        let full_batch = match full.subsample {
            None => data.clone(),
            Some(m) => {
                let mut rng = ChaCha8Rng::seed_from_u64(full.subsample_seed);
                let rows =
                    random_subset(&mut rng, data.len(), m).map_err(|_| CurvatureError::Config {
                        field: "subsample",
                        message: format!("must be in 1..={}, got {m}", data.len()),
                    })?;
                data.select(&rows)?
            }
        };
        Ok(Self {
            model,
            loss,
            data,
            full: full_batch,
            hvp: full.hvp,
        })
    }

    /// The full-batch Hessian operator (with its gradient and loss).
    pub fn hessian(&self) -> Result<HessianOperator<'a>> {
        HessianOperator::new(
            self.model,
            self.loss,
            &self.full,
            &Objective::Mean,
            &self.hvp,
        )
    }

    /// The full-batch Gauss–Newton operator.
    pub fn gauss_newton(&self) -> Result<GaussNewtonOperator<'a>> {
        GaussNewtonOperator::new(
            self.model,
            self.loss,
            &self.full,
            &Objective::Mean,
            &self.hvp,
        )
    }

    fn template(&self) -> Result<ParamVec> {
        ParamVec::zeros_for(self.model.params())
    }

    fn batch_hessian(&self, batch: &Batch) -> Result<HessianOperator<'a>> {
        HessianOperator::new(self.model, self.loss, batch, &Objective::Mean, &self.hvp)
    }

    fn batch_gauss_newton(&self, batch: &Batch) -> Result<GaussNewtonOperator<'a>> {
        GaussNewtonOperator::new(self.model, self.loss, batch, &Objective::Mean, &self.hvp)
    }

    fn random_batch(&self, rng: &mut ChaCha8Rng, b: usize) -> Result<Batch> {
        self.data.select(&random_subset(rng, self.data.len(), b)?)
    }

    /// `count` random batches of `b` one after another: the same draws, in the same order, as
    /// `count` calls of [`Self::random_batch`].
    fn random_batches(&self, rng: &mut ChaCha8Rng, count: usize, b: usize) -> Result<Batch> {
        let mut rows = Vec::with_capacity(count * b);
        for _ in 0..count {
            rows.extend(random_subset(rng, self.data.len(), b)?);
        }
        self.data.select(&rows)
    }

    /// ‖∇L‖² of the full-batch loss.
    pub fn grad_norm_sq(&self) -> Result<f64> {
        let cfg = HvpConfig {
            retain_graphs: false,
            ..self.hvp
        };
        let op = HessianOperator::new(self.model, self.loss, &self.full, &Objective::Mean, &cfg)?;
        op.gradient().norm_sq()
    }

    /// Top eigenvalue(s) of the full-batch Hessian; pass the previous eigenvector as a warm start.
    pub fn lambda_max(&self, cfg: &LanczosConfig, start: Start) -> Result<Eigenpairs> {
        let op = self.hessian()?;
        lanczos(|v| op.apply(v), &self.template()?, start, cfg)
    }

    /// Top eigenvalue(s) of the full-batch Gauss–Newton matrix.
    pub fn lambda_max_gn(&self, cfg: &LanczosConfig, start: Start) -> Result<Eigenpairs> {
        let op = self.gauss_newton()?;
        lanczos(|v| op.apply(v), &self.template()?, start, cfg)
    }

    /// Step sharpness: g_Bᵀ H_B g_B / ‖g_B‖² on the given (live) batch.
    pub fn step_sharpness(&self, batch: &Batch) -> Result<f64> {
        let (ghg, gg) = rayleigh_along_gradient(&self.batch_hessian(batch)?, "step sharpness")?;
        Ok(ghg / gg)
    }

    /// λmax(H_B) of the given (live) batch.
    pub fn step_lambda_max(
        &self,
        batch: &Batch,
        cfg: &LanczosConfig,
        start: Start,
    ) -> Result<Eigenpairs> {
        let op = self.batch_hessian(batch)?;
        lanczos(|v| op.apply(v), &self.template()?, start, cfg)
    }

    /// Batch sharpness E_B[g_Bᵀ H_B g_B / ‖g_B‖²] over batches of size `b`.
    pub fn batch_sharpness(&self, b: usize, mc: &MonteCarloConfig) -> Result<Estimate> {
        self.sample_batch_quotients(b, mc, Curvature::Hessian, QuotientForm::MeanOfRatios)
    }

    /// Modified batch sharpness E_B[g_Bᵀ H_B g_B] / E_B[‖g_B‖²] over batches of size `b`.
    pub fn modified_batch_sharpness(&self, b: usize, mc: &MonteCarloConfig) -> Result<Estimate> {
        self.sample_batch_quotients(b, mc, Curvature::Hessian, QuotientForm::RatioOfMeans)
    }

    /// Batch sharpness with the mini-batch Gauss–Newton matrix in place of H_B.
    pub fn batch_sharpness_gn(&self, b: usize, mc: &MonteCarloConfig) -> Result<Estimate> {
        self.sample_batch_quotients(b, mc, Curvature::GaussNewton, QuotientForm::MeanOfRatios)
    }

    fn sample_batch_quotients(
        &self,
        b: usize,
        mc: &MonteCarloConfig,
        curvature: Curvature,
        form: QuotientForm,
    ) -> Result<Estimate> {
        let what = match (curvature, form) {
            (Curvature::Hessian, QuotientForm::MeanOfRatios) => "batch sharpness",
            (Curvature::Hessian, QuotientForm::RatioOfMeans) => "modified batch sharpness",
            (Curvature::GaussNewton, _) => "Gauss-Newton batch sharpness",
        };
        let estimate = |s: &[(f64, f64)]| match form {
            QuotientForm::MeanOfRatios => {
                mean_estimate(&s.iter().map(|(x, y)| x / y).collect::<Vec<_>>())
            }
            QuotientForm::RatioOfMeans => {
                let (x, y): (Vec<f64>, Vec<f64>) = s.iter().copied().unzip();
                ratio_estimate(&x, &y)
            }
        };
        let gauss_newton = matches!(curvature, Curvature::GaussNewton);
        if let Some(forms) = self.hvp.batch_gradient_forms(self.model, self.loss, b) {
            return adaptive_in_groups(
                mc,
                forms.batches_per_pass(),
                |rng, count| {
                    let samples = forms.own(&self.random_batches(rng, count, b)?, gauss_newton)?;
                    nonzero_gradients(samples, what)
                },
                estimate,
            );
        }
        adaptive(
            mc,
            |rng| {
                let batch = self.random_batch(rng, b)?;
                if gauss_newton {
                    let op = self.batch_gauss_newton(&batch)?;
                    let g = op.gradient();
                    let gg = g.norm_sq()?;
                    if gg == 0.0 {
                        return Err(CurvatureError::ZeroGradient { what });
                    }
                    Ok((op.quadratic_form(g)?, gg))
                } else {
                    rayleigh_along_gradient(&self.batch_hessian(&batch)?, what)
                }
            },
            estimate,
        )
    }

    /// Samples (g_Bᵀ H g_B, ‖g_B‖²) with the full-batch H, and returns them with ‖∇L‖².
    fn full_hessian_samples(
        &self,
        b: usize,
        mc: &MonteCarloConfig,
        divides_by_gradient: bool,
        finish: impl Fn(&[(f64, f64)], f64) -> Estimate,
    ) -> Result<Estimate> {
        if let Some(forms) = self.hvp.batch_gradient_forms(self.model, self.loss, b) {
            let fixed = forms.fixed(&self.full)?;
            let grad_sq = fixed.grad_norm_sq();
            check_full_gradient(divides_by_gradient, grad_sq)?;
            return adaptive_in_groups(
                mc,
                fixed.batches_per_pass(),
                |rng, count| fixed.along(&self.random_batches(rng, count, b)?),
                |s| finish(s, grad_sq),
            );
        }
        let full = self.hessian()?;
        let grad_sq = full.gradient().norm_sq()?;
        check_full_gradient(divides_by_gradient, grad_sq)?;
        let gradient_only = HvpConfig {
            retain_graphs: false,
            ..self.hvp
        };
        adaptive(
            mc,
            |rng| {
                let batch = self.random_batch(rng, b)?;
                let op = HessianOperator::new(
                    self.model,
                    self.loss,
                    &batch,
                    &Objective::Mean,
                    &gradient_only,
                )?;
                let g = op.gradient();
                Ok((full.quadratic_form(g)?, g.norm_sq()?))
            },
            |s| finish(s, grad_sq),
        )
    }

    /// GNI = E_B[g_Bᵀ H g_B] / ‖∇L‖² (full-batch H and ∇L) over batches of size `b`.
    pub fn gni(&self, b: usize, mc: &MonteCarloConfig) -> Result<Estimate> {
        self.full_hessian_samples(b, mc, true, |s, grad_sq| {
            let e = mean_estimate(&s.iter().map(|(x, _)| *x).collect::<Vec<_>>());
            Estimate {
                value: e.value / grad_sq,
                stderr: e.stderr / grad_sq,
                samples: e.samples,
            }
        })
    }

    /// IAS = E_B[g_Bᵀ H g_B] / E_B[‖g_B‖²] (full-batch H) over batches of size `b`.
    pub fn ias(&self, b: usize, mc: &MonteCarloConfig) -> Result<Estimate> {
        self.full_hessian_samples(b, mc, false, |s, _| {
            let (x, y): (Vec<f64>, Vec<f64>) = s.iter().copied().unzip();
            ratio_estimate(&x, &y)
        })
    }

    /// λmax^b: mean (with stderr, adaptive stop) and max of λmax(H_B) over batches of size `b`.
    pub fn lambda_max_b(
        &self,
        b: usize,
        mc: &MonteCarloConfig,
        cfg: &LanczosConfig,
    ) -> Result<LambdaMaxB> {
        self.batch_lambda_max(b, mc, cfg, Curvature::Hessian)
    }

    /// λmax^b of the Gauss–Newton matrices G_B (figure 34): mean and max of λmax(G_B).
    pub fn lambda_max_b_gn(
        &self,
        b: usize,
        mc: &MonteCarloConfig,
        cfg: &LanczosConfig,
    ) -> Result<LambdaMaxB> {
        self.batch_lambda_max(b, mc, cfg, Curvature::GaussNewton)
    }

    fn batch_lambda_max(
        &self,
        b: usize,
        mc: &MonteCarloConfig,
        cfg: &LanczosConfig,
        curvature: Curvature,
    ) -> Result<LambdaMaxB> {
        let template = self.template()?;
        let mut max = f64::NEG_INFINITY;
        let mean = adaptive(
            mc,
            |rng| {
                let batch = self.random_batch(rng, b)?;
                let top = match curvature {
                    Curvature::Hessian => {
                        let op = self.batch_hessian(&batch)?;
                        lanczos(|v| op.apply(v), &template, Start::Random, cfg)?
                    }
                    Curvature::GaussNewton => {
                        let op = self.batch_gauss_newton(&batch)?;
                        lanczos(|v| op.apply(v), &template, Start::Random, cfg)?
                    }
                }
                .lambda_max();
                max = max.max(top);
                Ok(top)
            },
            mean_estimate,
        )?;
        Ok(LambdaMaxB { mean, max })
    }

    /// tr(H) of the full-batch Hessian by Hutchinson's estimator with Rademacher probes.
    pub fn hessian_trace(&self, mc: &MonteCarloConfig) -> Result<Estimate> {
        let op = self.hessian()?;
        let template = self.template()?;
        adaptive(
            mc,
            |rng| {
                let z = template.random_like(Probe::Rademacher, rng)?;
                op.quadratic_form(&z)
            },
            mean_estimate,
        )
    }

    /// The second-moment contraction at step size `eta`: Lanczos on
    /// A = −2ηH + η² mean_B H_B² (full-batch H; H_B over `batches`), giving eq. 39 = λmax(A) and
    /// eq. 37 = 1 + λmax(A) = λmax(I − 2ηH + η² mean_B H_B²), which equals
    /// λmax(mean_B (I − ηH_B)²) whenever mean_B H_B = H (e.g. over all C(n, b) batches).
    pub fn second_moment_contraction(
        &self,
        eta: f64,
        batches: &BatchSet,
        cfg: &LanczosConfig,
        start: Start,
    ) -> Result<SecondMomentContraction> {
        let rows: Vec<Vec<usize>> = match batches {
            BatchSet::Given(rows) => rows.clone(),
            BatchSet::Random {
                batch_size,
                count,
                seed,
            } => {
                let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                (0..*count)
                    .map(|_| random_subset(&mut rng, self.data.len(), *batch_size))
                    .collect::<Result<_>>()?
            }
        };
        if rows.is_empty() {
            return Err(CurvatureError::Config {
                field: "batches",
                message: "the second-moment contraction needs at least one batch".into(),
            });
        }
        let full = self.hessian()?;
        let ops = rows
            .iter()
            .map(|r| self.batch_hessian(&self.data.select(r)?))
            .collect::<Result<Vec<_>>>()?;
        let weight = eta * eta / ops.len() as f64;
        let eigen = lanczos(
            |v| {
                let mut out = full.apply(v)?.scale(-2.0 * eta)?;
                for op in &ops {
                    out = out.axpy(weight, &op.apply(&op.apply(v)?)?)?;
                }
                Ok(out)
            },
            &self.template()?,
            start,
            cfg,
        )?;
        let eq39 = eigen.lambda_max();
        Ok(SecondMomentContraction {
            eq37: 1.0 + eq39,
            eq39,
            batches: ops.len(),
            eigen,
        })
    }
}

/// Which curvature matrix a quotient uses.
#[derive(Debug, Clone, Copy)]
enum Curvature {
    Hessian,
    GaussNewton,
}

/// E[x/y] (batch sharpness) or E[x]/E[y] (modified batch sharpness).
#[derive(Debug, Clone, Copy)]
enum QuotientForm {
    MeanOfRatios,
    RatioOfMeans,
}

/// The samples, unless a batch's gradient vanished (its quotient would be undefined).
fn nonzero_gradients(samples: Vec<(f64, f64)>, what: &'static str) -> Result<Vec<(f64, f64)>> {
    if samples.iter().any(|&(_, gg)| gg == 0.0) {
        return Err(CurvatureError::ZeroGradient { what });
    }
    Ok(samples)
}

/// Fails when an estimate divides by ‖∇L‖² = 0.
fn check_full_gradient(divides_by_gradient: bool, grad_sq: f64) -> Result<()> {
    if divides_by_gradient && grad_sq == 0.0 {
        return Err(CurvatureError::ZeroGradient {
            what: "GNI (full-batch gradient)",
        });
    }
    Ok(())
}

/// (g_Bᵀ H_B g_B, ‖g_B‖²) of an operator's own gradient.
fn rayleigh_along_gradient(op: &HessianOperator, what: &'static str) -> Result<(f64, f64)> {
    let g = op.gradient();
    let gg = g.norm_sq()?;
    if gg == 0.0 {
        return Err(CurvatureError::ZeroGradient { what });
    }
    Ok((op.quadratic_form(g)?, gg))
}

/// Draws samples with a `ChaCha8Rng` seeded by `mc.seed` until `mc` says stop; `estimate` turns
/// the samples so far into the reported estimate (the stopping rule tests that very estimate).
fn adaptive<T>(
    mc: &MonteCarloConfig,
    mut draw: impl FnMut(&mut ChaCha8Rng) -> Result<T>,
    estimate: impl Fn(&[T]) -> Estimate,
) -> Result<Estimate> {
    adaptive_in_groups(mc, 1, |rng, _| Ok(vec![draw(rng)?]), estimate)
}

/// [`adaptive`] drawing up to `group` samples at a time (`draw(rng, count)` gives `count`, drawn
/// in order): first `min_samples`, then as many again as drawn so far, so that at most half the
/// work is past the stop. The stopping rule still looks after every sample and the samples past
/// the stop are dropped: the estimate is the one-at-a-time estimate.
fn adaptive_in_groups<T>(
    mc: &MonteCarloConfig,
    group: usize,
    mut draw: impl FnMut(&mut ChaCha8Rng, usize) -> Result<Vec<T>>,
    estimate: impl Fn(&[T]) -> Estimate,
) -> Result<Estimate> {
    mc.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(mc.seed);
    let mut samples = Vec::new();
    loop {
        let drawn = samples.len();
        let wanted = mc.min_samples.saturating_sub(drawn).max(drawn);
        let count = wanted.min(group).min(mc.max_samples - drawn).max(1);
        for sample in draw(&mut rng, count)? {
            samples.push(sample);
            let e = estimate(&samples);
            if mc.should_stop(&e) {
                return Ok(e);
            }
        }
    }
}

#[cfg(test)]
mod tests;
