//! The training loop.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, TrainState};
use super::dynamics::{
    batch_loss_and_gradient, to_grad_store, Dynamics, FullBatch, NoiseSettings, NoiseState,
};
use super::measure::{at_step, MeasureConfig, MeasurePoint, MeasureState};
use super::metrics::{MetricsLog, Row};
use super::sampler::{BatchSampler, Sampling};
use super::schedule::{Cadence, Change, HyperSchedule};
use crate::curvature::Batch;
use crate::data::{Dataset, LabelEncoding};
use crate::device::DeviceClass;
use crate::nn::gradient;
use crate::nn::loss::{correct_count, per_sample_loss, LossKind, Targets};
use crate::nn::optim::Sgd;
use crate::nn::{Model, ModelSpec};
use crate::stages::{StageError, StageReporter};

/// Floating-point precision of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats (the paper's setting).
    #[default]
    F32,
    /// 64-bit floats (tests, reference computations).
    F64,
}

impl Precision {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F64 => DType::F64,
        }
    }
}

/// Everything that determines a training run (the `train` stage's params).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The network.
    pub model: ModelSpec,
    /// Multiplier of the Kaiming-normal initial weights.
    pub init_scale: f64,
    /// Seed of the initial weights.
    #[serde(default)]
    pub init_seed: u64,
    /// Loss minimised.
    #[serde(default)]
    pub loss: LossKind,
    /// Step size η.
    pub lr: f64,
    /// Batch size b.
    pub batch_size: usize,
    /// SGD momentum (0: plain SGD, as in the paper).
    #[serde(default)]
    pub momentum: f64,
    /// Changes of η and b at given steps.
    #[serde(default)]
    pub schedule: Vec<Change>,
    /// How batches are drawn.
    #[serde(default)]
    pub sampling: Sampling,
    /// Seed of the batch order.
    #[serde(default)]
    pub data_seed: u64,
    /// Number of SGD steps (exact, not rounded to epochs).
    pub steps: u64,
    /// Stop once the full training loss (checked at each evaluation) falls below this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_loss: Option<f64>,
    /// A mini-batch or full loss above this (or NaN/inf) marks the run as diverged.
    #[serde(default = "default_divergence_loss")]
    pub divergence_loss: f64,
    /// Checkpoint every this many steps (and always at the end).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Further checkpoint steps, e.g. `[0]` for the initial weights (default none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checkpoint_at: Vec<u64>,
    /// Cadence of the full training-loss and test evaluation.
    #[serde(default = "default_eval")]
    pub eval: Cadence,
    /// Samples per forward pass when evaluating on the whole set.
    #[serde(default = "default_eval_chunk")]
    pub eval_chunk: usize,
    /// Floating-point precision.
    #[serde(default)]
    pub precision: Precision,
    /// Where to compute.
    #[serde(default)]
    pub device: DeviceClass,
    /// Curvature quantities measured during the run, each at its own cadence.
    #[serde(default)]
    pub measure: MeasureConfig,
    /// Update rule: SGD, GD, noisy GD or the SDE.
    #[serde(default)]
    pub dynamics: Dynamics,
    /// Seed of the injected noise (noisy GD, SDE).
    #[serde(default)]
    pub noise_seed: u64,
    /// Steps between refreshes of the per-coordinate gradient variances (diagonal and isotropic
    /// noise; the paper: 30).
    #[serde(default = "default_refresh_every")]
    pub noise_refresh_every: u64,
    /// σ of `constant_noise`.
    #[serde(default)]
    pub noise_sigma: f64,
    /// Euler–Maruyama substeps per step for `sde` (h = η / substeps; the paper: 20).
    #[serde(default = "default_substeps")]
    pub sde_substeps: u32,
    /// For the `train` stage: start from the `base` run's checkpoint at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_step: Option<u64>,
}

fn default_divergence_loss() -> f64 {
    1e6
}
fn default_checkpoint_every() -> u64 {
    1000
}
fn default_eval() -> Cadence {
    Cadence::every(100)
}
fn default_refresh_every() -> u64 {
    30
}
fn default_substeps() -> u32 {
    20
}
fn default_eval_chunk() -> usize {
    1024
}

/// Where a run starts.
#[derive(Debug, Clone)]
pub enum StartPoint {
    /// From freshly initialised weights at step 0.
    Fresh,
    /// From a checkpoint (of this run, or of a base run for a branch), keeping the metrics rows before
    /// the checkpoint's step from `metrics`.
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// Metrics file whose earlier rows are kept.
        metrics: PathBuf,
    },
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Ran all its steps.
    Completed,
    /// The full training loss fell below `stop_loss`.
    StopLoss,
    /// Loss became NaN, infinite or exceeded `divergence_loss`.
    Diverged,
}

/// Summary of a finished run (written as `summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// How it ended.
    pub status: Status,
    /// Number of SGD steps taken.
    pub steps_run: u64,
    /// Step at which divergence was detected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diverged_at: Option<u64>,
    /// Last evaluated full training loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_full_loss: Option<f64>,
    /// Last evaluated full training accuracy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_full_accuracy: Option<f64>,
}

impl TrainConfig {
    /// The initial network for `data` (inputs C×H×W, one output per class or one for ±1 targets).
    pub fn build_model(
        &self,
        data: &Dataset,
        device: &Device,
    ) -> Result<Box<dyn Model>, StageError> {
        let [_, c, h, w] = data.shape;
        let outputs = match data.encoding {
            LabelEncoding::OneHot => data.num_classes,
            LabelEncoding::PlusMinusOne => 1,
        };
        Ok(self.model.build(
            [c, h, w],
            outputs,
            self.init_scale,
            self.init_seed,
            self.precision.dtype(),
            device,
        )?)
    }
}

/// A dataset moved to the device once, with its targets.
pub(crate) struct DeviceData {
    images: Tensor,
    targets: Targets,
    n: usize,
}

impl DeviceData {
    /// Copies `data` to `device` in `dtype`.
    pub(crate) fn new(data: &Dataset, dtype: DType, device: &Device) -> Result<Self, StageError> {
        let all: Vec<usize> = (0..data.shape[0]).collect();
        Ok(Self {
            images: data.images_tensor(&all, device)?.to_dtype(dtype)?,
            targets: Targets::from_dataset(data, &all, dtype, device)?,
            n: data.shape[0],
        })
    }

    /// The whole set as one curvature batch.
    pub(crate) fn batch(&self) -> Result<Batch, StageError> {
        Batch::new(self.images.clone(), self.targets.clone())
            .map_err(|e| StageError::Failed(format!("training set: {e}")))
    }

    /// (mean loss, accuracy) over the whole set, in chunks.
    fn evaluate(
        &self,
        model: &dyn Model,
        loss: LossKind,
        chunk: usize,
    ) -> candle_core::Result<(f64, f64)> {
        let (mut total, mut correct) = (0f64, 0usize);
        let mut start = 0;
        while start < self.n {
            let len = chunk.min(self.n - start);
            let outputs = gradient::outputs(model, &self.images.narrow(0, start, len)?)?;
            let targets = self.targets.narrow(start, len)?;
            total += per_sample_loss(loss, &outputs, &targets)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            correct += correct_count(&outputs, &targets)?;
            start += len;
        }
        Ok((total / self.n as f64, correct as f64 / self.n as f64))
    }
}

fn diverging(loss: f64, bound: f64) -> bool {
    !loss.is_finite() || loss > bound
}

/// Trains according to `config` on `train_data` (evaluating on `test_data` too), writing
/// `metrics.csv` and `checkpoints/` into `out_dir`.
pub fn train(
    config: &TrainConfig,
    train_data: &Dataset,
    test_data: Option<&Dataset>,
    start: &StartPoint,
    out_dir: &Path,
    reporter: &dyn StageReporter,
) -> Result<Outcome, StageError> {
    let device = config.device.candle_device()?;
    let dtype = config.precision.dtype();
    let schedule = HyperSchedule::new(config.lr, config.batch_size, config.schedule.clone());
    let n = train_data.shape[0];
    if schedule.max_batch_size() > n || schedule.max_batch_size() == 0 {
        return Err(StageError::Failed(format!(
            "batch size {} must be between 1 and the dataset size {n}",
            schedule.max_batch_size()
        )));
    }
    let train_set = DeviceData::new(train_data, dtype, &device)?;
    let test_set = test_data
        .map(|d| DeviceData::new(d, dtype, &device))
        .transpose()?;
    let model = config.build_model(train_data, &device)?;
    let mut optimizer = Sgd::new(model.params(), config.lr, config.momentum)?;

    let mut measure_state = MeasureState::default();
    let checkpoints = out_dir.join("checkpoints");
    std::fs::create_dir_all(&checkpoints).map_err(|e| StageError::io(&checkpoints, e))?;
    checkpoint::remove_partial(&checkpoints)?;
    let (first_step, sampler_state, kept_rows) = match start {
        StartPoint::Fresh => (0, Default::default(), Vec::new()),
        StartPoint::Checkpoint { path, metrics } => {
            let state = checkpoint::load(path, model.as_ref(), &optimizer, &mut measure_state)?;
            let rows = super::metrics::read_rows_before(metrics, state.step, true)?;
            (state.step, state.sampler, rows)
        }
    };
    let metrics_path = out_dir.join("metrics.csv");
    let mut log = MetricsLog::create(&metrics_path, &kept_rows)?;
    let mut sampler = BatchSampler::new(n, config.data_seed, config.sampling, sampler_state);
    let save_checkpoint =
        |step: u64, sampler: &BatchSampler, optimizer: &Sgd, measure: &MeasureState| {
            let state = TrainState {
                step,
                sampler: sampler.state(),
            };
            checkpoint::save(&checkpoints, &state, model.as_ref(), optimizer, measure)
        };
    let mut noise = NoiseState::new(NoiseSettings {
        seed: config.noise_seed,
        refresh_every: config.noise_refresh_every,
        sigma: config.noise_sigma,
        substeps: config.sde_substeps,
    });
    let full_set = train_set.batch()?;

    reporter.set_length(config.steps);
    reporter.set_position(first_step);
    let mut outcome = Outcome {
        status: Status::Completed,
        steps_run: config.steps,
        diverged_at: None,
        final_full_loss: None,
        final_full_accuracy: None,
    };
    let mut step = first_step;
    while step <= config.steps {
        let mut row = Row::new(step);
        let (lr, batch_size) = schedule.at(step);
        // Full-batch dynamics see every sample once per step.
        let epoch = if config.dynamics.uses_batches() {
            sampler.epochs_done()
        } else {
            step as f64
        };
        row.set("epoch", epoch);
        row.set("lr", lr);
        row.set("batch_size", batch_size as f64);

        if config.eval.is_due(step) || step == config.steps {
            let (full_loss, full_accuracy) =
                train_set.evaluate(model.as_ref(), config.loss, config.eval_chunk)?;
            row.set("full_loss", full_loss);
            row.set("full_accuracy", full_accuracy);
            outcome.final_full_loss = Some(full_loss);
            outcome.final_full_accuracy = Some(full_accuracy);
            if let Some(test_set) = &test_set {
                let (test_loss, test_accuracy) =
                    test_set.evaluate(model.as_ref(), config.loss, config.eval_chunk)?;
                row.set("test_loss", test_loss);
                row.set("test_accuracy", test_accuracy);
            }
            if diverging(full_loss, config.divergence_loss) {
                outcome.status = Status::Diverged;
                outcome.diverged_at = Some(step);
            } else if config.stop_loss.is_some_and(|stop| full_loss < stop) {
                outcome.status = Status::StopLoss;
            }
        }
        // The last row (the final state, or where the run stops) draws no batch and takes no step;
        // its state is still measured where the cadences say so, unless the run diverged.
        let last = step == config.steps || outcome.status != Status::Completed;
        if last {
            outcome.steps_run = step;
        }

        let listed = config.checkpoint_at.contains(&step);
        let periodic = step % config.checkpoint_every == 0;
        // The step a run resumes at already has its checkpoint; a fresh run saves step 0 if listed.
        if !last
            && ((step > first_step && (periodic || listed))
                || (step == 0 && listed && matches!(start, StartPoint::Fresh)))
        {
            log.flush()?;
            save_checkpoint(step, &sampler, &optimizer, &measure_state)?;
        }

        let live = if config.dynamics.uses_batches() && !last {
            let batch = sampler.next_batch(batch_size);
            Some(full_set.select(&batch).map_err(at_step(step))?)
        } else {
            None
        };
        if outcome.status != Status::Diverged {
            let point = MeasurePoint {
                step,
                lr,
                batch_size,
                live_batch: live.as_ref(),
            };
            config
                .measure
                .measure(
                    model.as_ref(),
                    config.loss,
                    &full_set,
                    &point,
                    &mut measure_state,
                    &mut row,
                )
                .map_err(at_step(step))?;
        }
        if last {
            log.append(&row)?;
            break;
        }
        let (loss_value, gradient) = if let Some(live) = &live {
            let (loss, gradient) =
                batch_loss_and_gradient(model.as_ref(), config.loss, &live.inputs, &live.targets)?;
            (loss, Some(gradient))
        } else {
            let full = FullBatch {
                images: &train_set.images,
                targets: &train_set.targets,
                loss: config.loss,
                chunk: config.eval_chunk,
            };
            let (loss, direction) = noise.step(
                &config.dynamics,
                model.as_ref(),
                &full,
                step,
                lr,
                batch_size,
            )?;
            (
                loss,
                direction
                    .map(|d| to_grad_store(model.as_ref(), d))
                    .transpose()?,
            )
        };
        row.set("loss", loss_value);
        log.append(&row)?;
        if diverging(loss_value, config.divergence_loss) {
            outcome.status = Status::Diverged;
            outcome.diverged_at = Some(step);
            outcome.steps_run = step;
            break;
        }
        if let Some(gradient) = gradient {
            optimizer.set_lr(lr);
            optimizer.step(model.params(), &gradient)?;
        }
        step += 1;
        reporter.set_position(step);
    }
    log.flush()?;
    save_checkpoint(outcome.steps_run, &sampler, &optimizer, &measure_state)?;
    // Timings go to the log only: the artifact's files stay bit-identical across runs.
    for (name, t) in &measure_state.time {
        reporter.log(&t.describe(name));
    }
    Ok(outcome)
}
