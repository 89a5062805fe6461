//! The `measure` stage kind: curvature quantities computed afterwards on the checkpoints of a cached
//! `train` artifact, so adding a quantity to a figure never retrains.
//!
//! Inputs: `run` (a `train` artifact) and `data` (the dataset it was trained on). Params: `measure`
//! (the same settings as a run's inline `measure:`; a quantity is computed at a checkpoint whose step
//! its cadence selects) and optionally `steps` (only these checkpoints). Output: `metrics.csv` with
//! the same header as a run's, one row per measured checkpoint (step, lr and batch size in force).
//!
//! With `alignment:` (figures 23–24) it also histograms the per-sample model-gradient alignment at
//! each selected checkpoint into `alignment.csv`: columns `step,statistic,bin_lo,bin_hi,count`, with
//! `statistic` one of `dots`, `cosines`, `sq_norms`, and the values outside the edges counted in the
//! open bins (−inf, first edge) and (last edge, inf).

use serde::{Deserialize, Serialize};

use super::{resolve_typed, InputSlot, ParamError, Resolved, Stage, StageContext, StageError};
use crate::curvature::{model_gradient_alignment, AlignmentConfig, AlignmentReport};
use crate::data::Dataset;
use crate::device::DeviceClass;
use crate::nn::checkpoint as weights;
use crate::train::measure::{
    at_step, samples_batch_quotients, MeasureConfig, MeasurePoint, MeasureState,
};
use crate::train::metrics::{MetricsLog, Row};
use crate::train::schedule::HyperSchedule;
use crate::train::{checkpoint, DeviceData, TrainConfig};

/// The `measure` kind.
pub struct MeasureStage;

/// Params of the `measure` kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeasureParams {
    /// What to measure and at which checkpoint steps (cadences select among the checkpoints).
    #[serde(default)]
    measure: MeasureConfig,
    /// Per-sample model-gradient alignment histograms at every selected checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alignment: Option<AlignmentConfig>,
    /// Only these checkpoint steps (default: every checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    steps: Option<Vec<u64>>,
    /// Where to compute (default: the CPU).
    #[serde(default)]
    device: DeviceClass,
}

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "run",
        required: true,
        sweep: false,
    },
    InputSlot {
        name: "data",
        required: true,
        sweep: false,
    },
];

fn input_error(input: &str, message: impl Into<String>) -> StageError {
    StageError::Input {
        input: input.into(),
        message: message.into(),
    }
}

impl Stage for MeasureStage {
    fn kind(&self) -> &'static str {
        "measure"
    }

    fn version(&self, params: &serde_json::Value) -> u32 {
        // 2: MLP curvature by hand-written forward-over-reverse passes (same values to rounding).
        // 3 (batch sharpness, GNI, IAS only): an MLP's batches many per pass (same values to
        // rounding).
        if samples_batch_quotients(&params["measure"]) {
            3
        } else {
            2
        }
    }

    fn resolve(&self, params: &serde_json::Value) -> Result<Resolved, ParamError> {
        let (typed, canonical): (MeasureParams, _) = resolve_typed(params)?;
        Ok(Resolved {
            params: canonical,
            external_files: Vec::new(),
            device: typed.device,
            needs_inputs: Vec::new(),
        })
    }

    fn inputs(&self) -> &'static [InputSlot] {
        INPUTS
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let params: MeasureParams = ctx.typed_params()?;
        let run = ctx
            .inputs
            .get("run")
            .and_then(|r| r.first())
            .ok_or_else(|| input_error("run", "missing"))?;
        let data = ctx
            .inputs
            .get("data")
            .and_then(|d| d.first())
            .ok_or_else(|| input_error("data", "missing"))?;
        let config: TrainConfig = serde_json::from_value(run.params.clone()).map_err(|e| {
            input_error(
                "run",
                format!("`{}` is not a train artifact: {e}", run.stage),
            )
        })?;
        let dataset = Dataset::load(data.file("dataset.safetensors"))
            .map_err(|e| input_error("data", e.to_string()))?;

        let device = params.device.candle_device()?;
        let train_set = DeviceData::new(&dataset, config.precision.dtype(), &device)?;
        let full = train_set.batch()?;
        let model = config.build_model(&dataset, &device)?;
        let schedule = HyperSchedule::new(config.lr, config.batch_size, config.schedule.clone());

        let mut checkpoints = checkpoint::list(&run.dir.join("checkpoints"))?;
        // `run: train:checkpoints/step-500.safetensors` measures that one checkpoint.
        if run.output.is_some() {
            let chosen = run.file("");
            checkpoints.retain(|(_, path)| *path == chosen);
            if checkpoints.is_empty() {
                return Err(input_error(
                    "run",
                    format!(
                        "`{}` is not a checkpoint of `{}`",
                        chosen.display(),
                        run.stage
                    ),
                ));
            }
        }
        if let Some(steps) = &params.steps {
            if let Some(missing) = steps
                .iter()
                .find(|s| !checkpoints.iter().any(|(c, _)| c == *s))
            {
                return Err(input_error(
                    "run",
                    format!(
                        "`{}` has no checkpoint at step {missing}; it has {:?}",
                        run.stage,
                        checkpoints.iter().map(|(s, _)| s).collect::<Vec<_>>()
                    ),
                ));
            }
            checkpoints.retain(|(s, _)| steps.contains(s));
        }
        if params.alignment.is_none() {
            checkpoints.retain(|(step, _)| params.measure.any_due(*step));
        }

        let mut log = MetricsLog::create(&ctx.work_dir.join("metrics.csv"), &[])?;
        let alignment_path = ctx.work_dir.join("alignment.csv");
        let mut alignment_csv = match &params.alignment {
            Some(_) => Some(alignment_writer(&alignment_path)?),
            None => None,
        };
        let mut state = MeasureState::default();
        ctx.reporter.set_length(checkpoints.len() as u64);
        for (done, (step, path)) in checkpoints.iter().enumerate() {
            weights::load(path, model.as_ref(), None)
                .map_err(|e| input_error("run", e.to_string()))?;
            let (lr, batch_size) = schedule.at(*step);
            let mut row = Row::new(*step);
            row.set("lr", lr);
            row.set("batch_size", batch_size as f64);
            let point = MeasurePoint {
                step: *step,
                lr,
                batch_size,
                live_batch: None,
            };
            params
                .measure
                .measure(
                    model.as_ref(),
                    config.loss,
                    &full,
                    &point,
                    &mut state,
                    &mut row,
                )
                .map_err(at_step(*step))?;
            log.append(&row)?;
            if let (Some(cfg), Some(csv)) = (&params.alignment, alignment_csv.as_mut()) {
                let report =
                    model_gradient_alignment(model.as_ref(), &full, cfg).map_err(at_step(*step))?;
                write_alignment(csv, *step, &report)
                    .map_err(|e| StageError::io(&alignment_path, e))?;
            }
            ctx.reporter.log(&format!("measured checkpoint {step}"));
            ctx.reporter.set_position(done as u64 + 1);
        }
        for (name, t) in &state.time {
            ctx.reporter.log(&t.describe(name));
        }
        if let Some(mut csv) = alignment_csv {
            csv.flush()
                .map_err(|e| StageError::io(&alignment_path, e))?;
        }
        log.flush()
    }
}

fn alignment_writer(path: &std::path::Path) -> Result<csv::Writer<std::fs::File>, StageError> {
    let mut w =
        csv::Writer::from_path(path).map_err(|e| StageError::io(path, std::io::Error::other(e)))?;
    w.write_record(["step", "statistic", "bin_lo", "bin_hi", "count"])
        .map_err(|e| StageError::io(path, std::io::Error::other(e)))?;
    Ok(w)
}

/// One row per bin of each histogram of `report`, the out-of-range counts as open bins.
fn write_alignment(
    csv: &mut csv::Writer<std::fs::File>,
    step: u64,
    report: &AlignmentReport,
) -> std::io::Result<()> {
    for (name, h) in [
        ("dots", &report.dots),
        ("cosines", &report.cosines),
        ("sq_norms", &report.sq_norms),
    ] {
        let (first, last) = (h.edges[0], h.edges[h.edges.len() - 1]);
        let mut rows = vec![(f64::NEG_INFINITY, first, h.below)];
        rows.extend(
            h.edges
                .windows(2)
                .zip(&h.counts)
                .map(|(e, c)| (e[0], e[1], *c)),
        );
        rows.push((last, f64::INFINITY, h.above));
        for (lo, hi, count) in rows {
            csv.write_record([
                step.to_string(),
                name.to_string(),
                lo.to_string(),
                hi.to_string(),
                count.to_string(),
            ])
            .map_err(std::io::Error::other)?;
        }
    }
    Ok(())
}
