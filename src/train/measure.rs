//! Which curvature quantities a run measures, and when: each quantity has its own cadence (with the
//! paper's doubling schedule) and settings, and its own RNG seeded from (measurement seed, step,
//! quantity), so values are reproducible and a resumed run measures exactly what an uninterrupted one
//! would. The same code serves measurements inline in `train` and the `measure` stage on checkpoints.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::metrics::Row;
use super::schedule::{interval, Cadence};
use crate::curvature::{
    Batch, BatchSet, CurvatureError, Eigenpairs, Estimate, FullBatchConfig, HvpConfig, LambdaMaxB,
    LanczosConfig, Landscape, MonteCarloConfig, ParamVec, Start,
};
use crate::nn::loss::LossKind;
use crate::nn::Model;

/// A deterministic quantity (λmax and the like): cadence and Lanczos settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EigenSpec {
    /// Measure every this many steps (≥ 1).
    #[serde(deserialize_with = "interval")]
    pub every: u64,
    /// Steps after which the interval doubles.
    #[serde(default)]
    pub double_after: Vec<u64>,
    /// Relative residual at which Lanczos stops.
    #[serde(default = "default_eigen_tol")]
    pub rel_tol: f64,
    /// At most this many Hessian-vector products.
    #[serde(default = "default_max_iter")]
    pub max_iter: usize,
}

/// A Monte Carlo quantity: cadence and adaptive-stopping settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonteCarloSpec {
    /// Measure every this many steps (≥ 1).
    #[serde(deserialize_with = "interval")]
    pub every: u64,
    /// Steps after which the interval doubles.
    #[serde(default)]
    pub double_after: Vec<u64>,
    /// Never fewer samples (batches or probes).
    #[serde(default = "default_min_samples")]
    pub min_samples: usize,
    /// Never more samples.
    #[serde(default = "default_max_samples")]
    pub max_samples: usize,
    /// Stop once the standard error is below this fraction of the estimate.
    #[serde(default = "default_mc_tol")]
    pub rel_tol: f64,
}

/// A cheap quantity measured at a cadence with no further settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EverySpec {
    /// Measure every this many steps (≥ 1).
    #[serde(deserialize_with = "interval")]
    pub every: u64,
    /// Steps after which the interval doubles.
    #[serde(default)]
    pub double_after: Vec<u64>,
}

/// The second-moment contraction (eqs. 37 and 39) over a fixed number of random batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractionSpec {
    /// Measure every this many steps (≥ 1).
    #[serde(deserialize_with = "interval")]
    pub every: u64,
    /// Steps after which the interval doubles.
    #[serde(default)]
    pub double_after: Vec<u64>,
    /// Number of random batches in E_B.
    #[serde(default = "default_contraction_batches")]
    pub batches: usize,
    /// Relative residual at which Lanczos stops.
    #[serde(default = "default_eigen_tol")]
    pub rel_tol: f64,
    /// At most this many operator products.
    #[serde(default = "default_max_iter")]
    pub max_iter: usize,
}

fn default_eigen_tol() -> f64 {
    0.005
}
fn default_max_iter() -> usize {
    100
}
fn default_min_samples() -> usize {
    20
}
fn default_max_samples() -> usize {
    1000
}
fn default_mc_tol() -> f64 {
    0.005
}
fn default_contraction_batches() -> usize {
    32
}
fn default_retain() -> bool {
    true
}
fn is_default_retain(retain: &bool) -> bool {
    *retain
}
fn default_chunk() -> usize {
    2048
}

/// Everything a run measures. Absent quantities are not measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasureConfig {
    /// Seed of every measurement RNG.
    #[serde(default)]
    pub seed: u64,
    /// Full-batch quantities on a seeded random subset of this many samples (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsample: Option<usize>,
    /// Samples per forward graph in Hessian-vector products.
    #[serde(default = "default_chunk")]
    pub chunk: usize,
    /// Keep the gradient graphs of the whole (sub)set for all products of one measurement (default),
    /// or rebuild each chunk's graph per product: memory of one chunk instead of the whole set (a
    /// CNN keeps roughly 30 MB per sample), at the price of a forward and backward pass per product.
    /// The values are the same either way. Left out of the canonical params when true.
    #[serde(default = "default_retain", skip_serializing_if = "is_default_retain")]
    pub retain_graphs: bool,
    /// λmax of the full-batch Hessian (warm-started from the previous eigenvector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda_max: Option<EigenSpec>,
    /// Batch sharpness E_B[g_Bᵀ H_B g_B / ‖g_B‖²].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_sharpness: Option<MonteCarloSpec>,
    /// Step sharpness on the live batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_sharpness: Option<EverySpec>,
    /// Gradient-noise interaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gni: Option<MonteCarloSpec>,
    /// Interaction-aware sharpness E_B[g_Bᵀ H g_B] / E_B[‖g_B‖²].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ias: Option<MonteCarloSpec>,
    /// Modified batch sharpness E_B[g_Bᵀ H_B g_B] / E_B[‖g_B‖²].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_sharpness_modified: Option<MonteCarloSpec>,
    /// λmax^b: mean and max of λmax(H_B) over random batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda_max_b: Option<MonteCarloSpec>,
    /// λmax(H_B) of the live batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_lambda_max_b: Option<EverySpec>,
    /// Hutchinson trace of the full-batch Hessian.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hessian_trace: Option<MonteCarloSpec>,
    /// Second-moment contraction, eqs. 37 and 39.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smc: Option<ContractionSpec>,
    /// λmax of the full-batch Gauss–Newton matrix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda_max_gn: Option<EigenSpec>,
    /// Batch sharpness with Gauss–Newton matrices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_sharpness_gn: Option<MonteCarloSpec>,
    /// λmax^b with Gauss–Newton matrices: mean and max of λmax(G_B) over random batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda_max_b_gn: Option<MonteCarloSpec>,
    /// ‖∇L‖² of the full-batch loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm_sq: Option<EverySpec>,
}

impl Default for MeasureConfig {
    /// Nothing measured, default settings (the same as an empty `measure:` mapping).
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every field has a default")
    }
}

fn due(every: u64, double_after: &[u64], step: u64) -> bool {
    Cadence {
        every,
        double_after: double_after.to_vec(),
    }
    .is_due(step)
}

/// SplitMix64: decorrelates seeds derived from (seed, step, quantity).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn seed_for(seed: u64, step: u64, quantity: u64) -> u64 {
    mix(mix(seed ^ mix(step)) ^ quantity)
}

impl MonteCarloSpec {
    fn config(&self, seed: u64) -> MonteCarloConfig {
        MonteCarloConfig {
            min_samples: self.min_samples,
            max_samples: self.max_samples,
            rel_tol: self.rel_tol,
            seed,
        }
    }
}

fn lanczos_config(rel_tol: f64, max_iter: usize, seed: u64) -> LanczosConfig {
    LanczosConfig {
        top_k: 1,
        max_iter,
        rel_tol,
        seed,
    }
}

/// State carried between measurements: the last top eigenvectors, for warm starts, and the time
/// spent on each quantity so far (this process only; not checkpointed).
#[derive(Default)]
pub struct MeasureState {
    /// Last top eigenvector of the full-batch Hessian.
    pub lambda_max_vector: Option<ParamVec>,
    /// Last top eigenvector of the full-batch Gauss–Newton matrix.
    pub lambda_max_gn_vector: Option<ParamVec>,
    /// Time per quantity (metrics column name → totals).
    pub time: BTreeMap<String, QuantityTime>,
}

/// Time spent measuring one quantity over a run (reported in the stage's log).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QuantityTime {
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Number of measurements.
    pub measurements: u64,
    /// Lanczos iterations (operator products) in total, for eigenvalue quantities.
    pub lanczos_iterations: u64,
}

impl QuantityTime {
    /// `measured NAME k time(s) in S s[, N Lanczos iterations]`, for logs.
    pub fn describe(&self, name: &str) -> String {
        let iterations = match self.lanczos_iterations {
            0 => String::new(),
            n => format!(", {n} Lanczos iterations"),
        };
        format!(
            "measured {name} {} time(s) in {:.2} s{iterations}",
            self.measurements, self.seconds
        )
    }
}

impl MeasureState {
    fn record(&mut self, quantity: &str, since: Instant, lanczos_iterations: usize) {
        let t = self.time.entry(quantity.to_string()).or_default();
        t.seconds += since.elapsed().as_secs_f64();
        t.measurements += 1;
        t.lanczos_iterations += lanczos_iterations as u64;
    }
}

/// What is measured at one step.
pub struct MeasurePoint<'a> {
    /// The step (θ_step, before its update).
    pub step: u64,
    /// Step size in force (for the second-moment contraction).
    pub lr: f64,
    /// Batch size in force.
    pub batch_size: usize,
    /// The live batch of this step, if any (SGD runs).
    pub live_batch: Option<&'a Batch>,
}

fn put(row: &mut Row, name: &str, estimate: Estimate) {
    row.set(name, estimate.value);
    row.set(&format!("{name}_stderr"), estimate.stderr);
    row.set(&format!("{name}_samples"), estimate.samples as f64);
}

/// A quantity's cadence: every `every` steps, the interval doubling after each `double_after` step.
trait Scheduled {
    fn cadence(&self) -> (u64, &[u64]);

    fn is_due(&self, step: u64) -> bool {
        let (every, double_after) = self.cadence();
        due(every, double_after, step)
    }
}

macro_rules! scheduled {
    ($($spec:ty),*) => {
        $(impl Scheduled for $spec {
            fn cadence(&self) -> (u64, &[u64]) {
                (self.every, &self.double_after)
            }
        })*
    };
}
scheduled!(EigenSpec, MonteCarloSpec, EverySpec, ContractionSpec);

/// Runs `measure` when `spec` is given and due at `step`, timing it under `name` in `state`;
/// `measure` returns its Lanczos iteration count (0 for none).
fn when_due<S: Scheduled>(
    spec: &Option<S>,
    step: u64,
    name: &str,
    state: &mut MeasureState,
    measure: impl FnOnce(&S, &mut MeasureState) -> Result<usize, CurvatureError>,
) -> Result<(), CurvatureError> {
    if let Some(spec) = spec.as_ref().filter(|s| s.is_due(step)) {
        let since = Instant::now();
        let iterations = measure(spec, state)?;
        state.record(name, since, iterations);
    }
    Ok(())
}

/// A top-eigenvalue solver of a full-batch matrix.
type EigenSolver<'l> =
    fn(&Landscape<'l>, &LanczosConfig, Start) -> Result<Eigenpairs, CurvatureError>;

/// Where a solver's warm-start vector is kept.
type WarmVector = fn(&mut MeasureState) -> &mut Option<ParamVec>;

/// Mean and max of λmax of a batch matrix over random batches of size b.
type BatchEigen<'l> = fn(
    &Landscape<'l>,
    usize,
    &MonteCarloConfig,
    &LanczosConfig,
) -> Result<LambdaMaxB, CurvatureError>;

/// A Monte Carlo estimator over random batches of size b.
type BatchEstimator<'l> =
    fn(&Landscape<'l>, usize, &MonteCarloConfig) -> Result<Estimate, CurvatureError>;

/// Whether the measure params `measure` (as resolved JSON) sample g_Bᵀ H g_B over random batches
/// (batch sharpness in any form, GNI, IAS): MLPs take those many batches per pass since train v5
/// and measure v3 (the same values to rounding), so their keys tell the two apart.
pub fn samples_batch_quotients(measure: &serde_json::Value) -> bool {
    [
        "batch_sharpness",
        "batch_sharpness_modified",
        "batch_sharpness_gn",
        "gni",
        "ias",
    ]
    .iter()
    .any(|q| !measure[q].is_null())
}

impl MeasureConfig {
    /// Every configured quantity's schedule, with its field name.
    fn schedules(&self) -> Vec<(&'static str, &dyn Scheduled)> {
        fn named<'a, S: Scheduled>(
            name: &'static str,
            spec: &'a Option<S>,
        ) -> Option<(&'static str, &'a dyn Scheduled)> {
            spec.as_ref().map(|s| (name, s as &dyn Scheduled))
        }
        [
            named("lambda_max", &self.lambda_max),
            named("lambda_max_gn", &self.lambda_max_gn),
            named("batch_sharpness", &self.batch_sharpness),
            named("gni", &self.gni),
            named("ias", &self.ias),
            named("batch_sharpness_modified", &self.batch_sharpness_modified),
            named("lambda_max_b", &self.lambda_max_b),
            named("lambda_max_b_gn", &self.lambda_max_b_gn),
            named("hessian_trace", &self.hessian_trace),
            named("batch_sharpness_gn", &self.batch_sharpness_gn),
            named("step_sharpness", &self.step_sharpness),
            named("step_lambda_max_b", &self.step_lambda_max_b),
            named("grad_norm_sq", &self.grad_norm_sq),
            named("smc", &self.smc),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// The first configured quantity (its field name) whose cadence is due at none of `steps`.
    pub fn never_due(&self, steps: &[u64]) -> Option<&'static str> {
        self.schedules()
            .into_iter()
            .find(|(_, s)| !steps.iter().any(|&step| s.is_due(step)))
            .map(|(name, _)| name)
    }

    /// Whether no quantity is configured.
    pub fn is_empty(&self) -> bool {
        self.schedules().is_empty()
    }

    /// Whether anything is measured at `step` (to skip building the landscape otherwise).
    pub fn any_due(&self, step: u64) -> bool {
        self.schedules().iter().any(|(_, s)| s.is_due(step))
    }

    /// Measures every quantity due at `point.step` on `model` over the training set `data`, writing
    /// the values into `row`.
    pub fn measure(
        &self,
        model: &dyn Model,
        loss: LossKind,
        data: &Batch,
        point: &MeasurePoint,
        state: &mut MeasureState,
        row: &mut Row,
    ) -> Result<(), CurvatureError> {
        let step = point.step;
        if !self.any_due(step) {
            return Ok(());
        }
        let full = FullBatchConfig {
            subsample: self.subsample,
            subsample_seed: seed_for(self.seed, step, 0),
            hvp: HvpConfig {
                chunk_size: self.chunk,
                retain_graphs: self.retain_graphs,
                ..HvpConfig::default()
            },
        };
        let landscape = Landscape::new(model, loss, data, &full)?;
        let b = point.batch_size;
        let seed = |quantity: u64| seed_for(self.seed, step, quantity);

        // (spec, column, RNG stream, solver, its warm-start vector): top eigenvalues of full-batch
        // matrices, each warm-started from its previous eigenvector.
        let eigen: [(&Option<EigenSpec>, &str, u64, EigenSolver<'_>, WarmVector); 2] = [
            (
                &self.lambda_max,
                "lambda_max",
                1,
                Landscape::lambda_max,
                |s| &mut s.lambda_max_vector,
            ),
            (
                &self.lambda_max_gn,
                "lambda_max_gn",
                2,
                Landscape::lambda_max_gn,
                |s| &mut s.lambda_max_gn_vector,
            ),
        ];
        for (spec, name, stream, solve, warm) in eigen {
            when_due(spec, step, name, state, |spec, state| {
                let cfg = lanczos_config(spec.rel_tol, spec.max_iter, seed(stream));
                let vector = warm(state);
                let start = vector.as_ref().map_or(Start::Random, Start::Warm);
                let eig = solve(&landscape, &cfg, start)?;
                row.set(name, eig.lambda_max());
                *vector = eig.vectors.into_iter().next();
                Ok(eig.iterations)
            })?;
        }
        // (spec, column, RNG stream, estimator): the quotient estimators over random batches.
        let batch_estimators: [(&Option<MonteCarloSpec>, &str, u64, BatchEstimator<'_>); 5] = [
            (
                &self.batch_sharpness,
                "batch_sharpness",
                3,
                Landscape::batch_sharpness,
            ),
            (&self.gni, "gni", 4, Landscape::gni),
            (&self.ias, "ias", 5, Landscape::ias),
            (
                &self.batch_sharpness_modified,
                "batch_sharpness_modified",
                6,
                Landscape::modified_batch_sharpness,
            ),
            (
                &self.batch_sharpness_gn,
                "batch_sharpness_gn",
                10,
                Landscape::batch_sharpness_gn,
            ),
        ];
        for (spec, name, stream, estimate) in batch_estimators {
            when_due(spec, step, name, state, |spec, _| {
                put(
                    row,
                    name,
                    estimate(&landscape, b, &spec.config(seed(stream)))?,
                );
                Ok(0)
            })?;
        }
        // (spec, column, Lanczos stream, batch stream, solver): mean and max of λmax over batches.
        let batch_eigen: [(&Option<MonteCarloSpec>, &str, u64, u64, BatchEigen<'_>); 2] = [
            (
                &self.lambda_max_b,
                "lambda_max_b",
                7,
                8,
                Landscape::lambda_max_b,
            ),
            (
                &self.lambda_max_b_gn,
                "lambda_max_b_gn",
                14,
                15,
                Landscape::lambda_max_b_gn,
            ),
        ];
        for (spec, name, lanczos_stream, batch_stream, solve) in batch_eigen {
            when_due(spec, step, name, state, |spec, _| {
                let cfg = lanczos_config(
                    default_eigen_tol(),
                    default_max_iter(),
                    seed(lanczos_stream),
                );
                let stats = solve(&landscape, b, &spec.config(seed(batch_stream)), &cfg)?;
                put(row, name, stats.mean);
                row.set(&format!("{name}_max"), stats.max);
                Ok(0)
            })?;
        }
        when_due(
            &self.hessian_trace,
            step,
            "hessian_trace",
            state,
            |spec, _| {
                put(
                    row,
                    "hessian_trace",
                    landscape.hessian_trace(&spec.config(seed(9)))?,
                );
                Ok(0)
            },
        )?;
        when_due(&self.smc, step, "smc", state, |spec, _| {
            let batches = BatchSet::Random {
                batch_size: b,
                count: spec.batches,
                seed: seed(11),
            };
            let cfg = lanczos_config(spec.rel_tol, spec.max_iter, seed(12));
            let smc =
                landscape.second_moment_contraction(point.lr, &batches, &cfg, Start::Random)?;
            for (name, value) in [("smc_eq37", smc.eq37), ("smc_eq39", smc.eq39)] {
                row.set(name, value);
                row.set(&format!("{name}_stderr"), f64::NAN);
                row.set(&format!("{name}_samples"), smc.batches as f64);
            }
            Ok(smc.eigen.iterations)
        })?;
        when_due(&self.grad_norm_sq, step, "grad_norm_sq", state, |_, _| {
            row.set("grad_norm_sq", landscape.grad_norm_sq()?);
            Ok(0)
        })?;
        if let Some(live) = point.live_batch {
            when_due(
                &self.step_sharpness,
                step,
                "step_sharpness",
                state,
                |_, _| {
                    row.set("step_sharpness", landscape.step_sharpness(live)?);
                    Ok(0)
                },
            )?;
            when_due(
                &self.step_lambda_max_b,
                step,
                "step_lambda_max_b",
                state,
                |_, _| {
                    let cfg = lanczos_config(default_eigen_tol(), default_max_iter(), seed(13));
                    let eig = landscape.step_lambda_max(live, &cfg, Start::Random)?;
                    row.set("step_lambda_max_b", eig.lambda_max());
                    Ok(eig.iterations)
                },
            )?;
        }
        Ok(())
    }
}

/// Converts a curvature error into a stage error naming the step.
pub fn at_step(step: u64) -> impl Fn(CurvatureError) -> crate::stages::StageError {
    move |e| crate::stages::StageError::Failed(format!("measurement at step {step}: {e}"))
}
