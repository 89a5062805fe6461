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
//!
//! The kind is resumable: after each measured checkpoint it records its progress (`progress.safetensors`),
//! so a killed run continues after the last checkpoint it measured.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{
    check_fits_data, resolve_typed, InputSlot, ParamError, PlannedInputs, Resolved, Stage,
    StageContext, StageError,
};
use crate::curvature::{model_gradient_alignment, AlignmentConfig, AlignmentReport};
use crate::data::Dataset;
use crate::device::DeviceClass;
use crate::nn::checkpoint as weights;
use crate::nn::Model;
use crate::stages::train::{list_steps, no_checkpoint_at, planned_checkpoints};
use crate::train::measure::{
    at_step, samples_batch_quotients, MeasureConfig, MeasurePoint, MeasureState,
};
use crate::train::metrics::{flushed_len, reopen_truncated, MetricsLog, Row};
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

impl Stage for MeasureStage {
    fn kind(&self) -> &'static str {
        "measure"
    }

    fn version(&self, params: &serde_json::Value) -> u32 {
        // 2: MLP curvature by hand-written forward-over-reverse passes (same values to rounding).
        // 3 (batch sharpness, GNI, IAS only): an MLP's batches many per pass (same values to
        // rounding).
        // 4 (alignment only): per-sample model gradients by hand-written passes (same values to
        // rounding).
        if !params["alignment"].is_null() {
            4
        } else if samples_batch_quotients(&params["measure"]) {
            3
        } else {
            2
        }
    }

    fn resolve(&self, params: &serde_json::Value) -> Result<Resolved, ParamError> {
        let (typed, canonical): (MeasureParams, _) = resolve_typed(params)?;
        if typed.measure.is_empty() && typed.alignment.is_none() {
            return Err(ParamError {
                path: "measure".into(),
                message: "names nothing to measure: give a quantity (e.g. `lambda_max: {every: \
                          100}`) or `alignment`"
                    .into(),
            });
        }
        if typed.steps.as_ref().is_some_and(Vec::is_empty) {
            return Err(ParamError {
                path: "steps".into(),
                message: "lists no step: leave it out to measure at every checkpoint".into(),
            });
        }
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

    /// The curvature subsample and the alignment's samples fit in the `data` subset, no listed
    /// step lies where the `run` can have no checkpoint ([`no_checkpoint_at`]), and each quantity's
    /// cadence is due at one of the checkpoints measured, where those are certain.
    fn check_inputs(
        &self,
        params: &serde_json::Value,
        inputs: &PlannedInputs<'_>,
    ) -> Result<(), ParamError> {
        if let Some(run) = inputs.get("run").and_then(|run| run.first()) {
            let steps = params["steps"].as_array().into_iter().flatten();
            for (i, step) in steps
                .enumerate()
                .filter_map(|(i, s)| Some((i, s.as_u64()?)))
            {
                if let Some(message) = no_checkpoint_at("run", run.params, step) {
                    return Err(ParamError {
                        path: format!("steps[{i}]"),
                        message,
                    });
                }
            }
            if let Some(mut checkpoints) = planned_checkpoints(run.params) {
                if let Some(listed) = params["steps"].as_array() {
                    checkpoints.retain(|step| listed.contains(&(*step).into()));
                }
                let measure: MeasureConfig = serde_json::from_value(params["measure"].clone())
                    .map_err(|e| ParamError {
                        path: "measure".into(),
                        message: e.to_string(),
                    })?;
                if let Some(name) = measure.never_due(&checkpoints) {
                    return Err(ParamError {
                        path: format!("measure.{name}"),
                        message: format!(
                            "its cadence is due at none of the checkpoints measured (steps {})",
                            list_steps(&checkpoints)
                        ),
                    });
                }
            }
        }
        let counts = [
            (
                "measure.subsample",
                &params["measure"]["subsample"],
                "subsample",
            ),
            (
                "alignment.samples",
                &params["alignment"]["samples"],
                "alignment samples",
            ),
        ];
        check_fits_data(
            inputs,
            counts.map(|(path, value, what)| (path.to_string(), value, what)),
        )
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let params: MeasureParams = ctx.typed_params()?;
        let run = ctx
            .inputs
            .get("run")
            .and_then(|r| r.first())
            .ok_or_else(|| StageError::input("run", "missing"))?;
        let data = ctx
            .inputs
            .get("data")
            .and_then(|d| d.first())
            .ok_or_else(|| StageError::input("data", "missing"))?;
        let config: TrainConfig = serde_json::from_value(run.params.clone()).map_err(|e| {
            StageError::input(
                "run",
                format!("`{}` is not a train artifact: {e}", run.stage),
            )
        })?;
        let dataset = Dataset::load(data.file("dataset.safetensors"))
            .map_err(|e| StageError::input("data", e))?;

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
                return Err(StageError::input(
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
                return Err(StageError::input(
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

        let metrics_path = ctx.work_dir.join("metrics.csv");
        let alignment_path = ctx.work_dir.join("alignment.csv");
        let progress_path = ctx.work_dir.join(PROGRESS);
        let mut state = MeasureState::default();
        let earlier = match read_progress(&progress_path, model.as_ref(), &mut state) {
            Ok(progress) => progress,
            Err(why) => {
                ctx.reporter.log(&format!("starting afresh: {why}"));
                state = MeasureState::default();
                None
            }
        };
        let (mut log, mut alignment_csv, first) = match &earlier {
            Some(p) => {
                let first = checkpoints.partition_point(|(step, _)| *step <= p.step);
                ctx.reporter.log(&format!(
                    "resuming after checkpoint {} ({first} of {} checkpoints measured)",
                    p.step,
                    checkpoints.len()
                ));
                let alignment = p
                    .alignment_bytes
                    .map(|bytes| {
                        let file = reopen_truncated(&alignment_path, bytes)
                            .map_err(|e| StageError::io(&alignment_path, e))?;
                        Ok::<_, StageError>(csv::Writer::from_writer(file))
                    })
                    .transpose()?;
                (
                    MetricsLog::resume(&metrics_path, p.metrics_bytes)?,
                    alignment,
                    first,
                )
            }
            None => (
                MetricsLog::create(&metrics_path, &[])?,
                match &params.alignment {
                    Some(_) => Some(alignment_writer(&alignment_path)?),
                    None => None,
                },
                0,
            ),
        };
        ctx.reporter.set_length(checkpoints.len() as u64);
        ctx.reporter.set_position(first as u64);
        for (done, (step, path)) in checkpoints.iter().enumerate().skip(first) {
            weights::load(path, model.as_ref(), None).map_err(|e| StageError::input("run", e))?;
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
            let progress = Progress {
                step: *step,
                metrics_bytes: log.flushed_len()?,
                alignment_bytes: alignment_csv
                    .as_mut()
                    .map(flushed_len)
                    .transpose()
                    .map_err(|e| StageError::io(&alignment_path, e))?,
            };
            save_progress(&progress_path, model.as_ref(), &state, &progress)?;
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
        log.flush()?;
        match std::fs::remove_file(&progress_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StageError::io(&progress_path, e))
            }
            _ => Ok(()),
        }
    }

    fn metrics_columns(&self, _params: &serde_json::Value) -> Option<Vec<String>> {
        Some(crate::train::metrics::header())
    }

    fn resumable(&self) -> bool {
        true
    }
}

/// The file in which a run records how far it got, rewritten after every measured checkpoint: the
/// weights of that checkpoint, the warm-start vectors of the eigenvalue solvers, and a [`Progress`]
/// in its metadata. A killed (or failed) run resumes after that checkpoint and ends bit-identical
/// (CPU) to an uninterrupted one; the file is removed when the run completes.
const PROGRESS: &str = "progress.safetensors";
const PROGRESS_KEY: &str = "eoss.measure_progress";

/// How far a run got.
#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    /// The checkpoint step measured last.
    step: u64,
    /// Length of `metrics.csv` once that checkpoint's row was written.
    metrics_bytes: u64,
    /// Length of `alignment.csv` then, when alignment is measured.
    alignment_bytes: Option<u64>,
}

fn save_progress(
    path: &Path,
    model: &dyn Model,
    state: &MeasureState,
    progress: &Progress,
) -> Result<(), StageError> {
    let mut extras = weights::Extras::default();
    extras.metadata.insert(
        PROGRESS_KEY.to_string(),
        serde_json::to_string(progress).expect("progress serializes"),
    );
    checkpoint::store_warm_vectors(state, &mut extras);
    weights::save(path, model, None, &extras)
        .map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))
}

/// The progress an earlier run of this key left at `path` (`None` if there is none), with its
/// warm-start vectors restored into `state`. An error says why the earlier work cannot be used.
fn read_progress(
    path: &Path,
    model: &dyn Model,
    state: &mut MeasureState,
) -> Result<Option<Progress>, String> {
    if !path.exists() {
        return Ok(None);
    }
    let extras = weights::load(path, model, None).map_err(|e| e.to_string())?;
    let progress: Progress = extras
        .metadata
        .get(PROGRESS_KEY)
        .and_then(|text| serde_json::from_str(text).ok())
        .ok_or_else(|| format!("{}: no progress record", path.display()))?;
    checkpoint::restore_warm_vectors(&extras, model, state).map_err(|e| e.to_string())?;
    // The rows it counts must all be on disk (they are flushed before the record is written).
    let dir = path.parent().unwrap_or(Path::new("."));
    for (name, bytes) in [
        ("metrics.csv", Some(progress.metrics_bytes)),
        ("alignment.csv", progress.alignment_bytes),
    ] {
        let Some(bytes) = bytes else { continue };
        let on_disk = std::fs::metadata(dir.join(name))
            .map(|m| m.len())
            .unwrap_or(0);
        if on_disk < bytes {
            return Err(format!(
                "{name} holds {on_disk} bytes, fewer than the {bytes} recorded in {}",
                path.display()
            ));
        }
    }
    Ok(Some(progress))
}

fn alignment_writer(path: &Path) -> Result<csv::Writer<std::fs::File>, StageError> {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use serde_json::{json, Value};

    use super::*;
    use crate::stages::analysis::test_support::{run_stage_in, NullReporter};
    use crate::stages::dataset::DatasetStage;
    use crate::stages::single_input;
    use crate::stages::train::TrainStage;
    use crate::stages::{InputArtifact, StageReporter};

    /// A reporter that keeps the log lines.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl StageReporter for Recorder {
        fn set_length(&self, _: u64) {}
        fn set_position(&self, _: u64) {}
        fn log(&self, line: &str) {
            self.0.lock().unwrap().push(line.to_string());
        }
    }

    fn input(
        slot: &str,
        stage: &dyn Stage,
        params: &Value,
        dir: &Path,
    ) -> (String, Vec<InputArtifact>) {
        let artifact = InputArtifact {
            stage: slot.to_string(),
            key: slot.to_string(),
            dir: dir.to_path_buf(),
            params: stage.resolve(params).unwrap().params,
            upstream_params: BTreeMap::new(),
            output: None,
        };
        (slot.to_string(), vec![artifact])
    }

    #[test]
    fn a_measure_stage_measures_something_somewhere() {
        let path = |raw: Value| MeasureStage.resolve(&raw).map(|_| ()).map_err(|e| e.path);
        assert_eq!(path(json!({})), Err("measure".to_string()));
        assert_eq!(
            path(json!({"measure": {"seed": 3}})),
            Err("measure".to_string())
        );
        assert_eq!(path(json!({"alignment": {"samples": 8}})), Ok(()));
        let some = json!({"lambda_max": {"every": 100}});
        assert_eq!(path(json!({"measure": some})), Ok(()));
        assert_eq!(
            path(json!({"measure": some, "steps": []})),
            Err("steps".to_string())
        );
    }

    #[test]
    fn versions_change_only_for_the_measurements_whose_values_changed() {
        let version =
            |raw: Value| MeasureStage.version(&MeasureStage.resolve(&raw).unwrap().params);
        assert_eq!(version(json!({"alignment": {"samples": 8}})), 4);
        let lambda = json!({"lambda_max": {"every": 100}});
        assert_eq!(version(json!({"measure": lambda})), 2);
        let sharpness = json!({"batch_sharpness": {"every": 100}});
        assert_eq!(version(json!({"measure": sharpness})), 3);
    }

    #[test]
    fn the_subsample_and_the_alignment_samples_must_fit_in_the_data_subset() {
        let check = |raw: Value| {
            let params = MeasureStage.resolve(&raw).unwrap().params;
            let data = json!({"source": "synthetic", "n": 16});
            let inputs = single_input("data", &DatasetStage, &data);
            MeasureStage
                .check_inputs(&params, &inputs)
                .map_err(|e| e.path)
        };
        let lambda = json!({"every": 1});
        assert_eq!(
            check(json!({"measure": {"subsample": 16, "lambda_max": lambda}})),
            Ok(())
        );
        assert_eq!(
            check(json!({"measure": {"subsample": 17, "lambda_max": lambda}})),
            Err("measure.subsample".to_string())
        );
        assert_eq!(
            check(json!({"alignment": {"samples": 17}})),
            Err("alignment.samples".to_string())
        );
    }

    #[test]
    fn listed_steps_must_be_where_the_run_can_have_checkpoints() {
        let check = |run: Value, steps: Value| {
            let params = MeasureStage
                .resolve(&json!({"steps": steps, "measure": {"grad_norm_sq": {"every": 1}}}))
                .unwrap()
                .params;
            let inputs = single_input("run", &TrainStage, &run);
            MeasureStage
                .check_inputs(&params, &inputs)
                .map_err(|e| (e.path, e.message))
        };
        let run = json!({"steps": 110, "checkpoint_every": 50, "checkpoint_at": [0, 7]});
        assert_eq!(check(run.clone(), json!([0, 7, 50, 100, 110])), Ok(()));
        assert_eq!(
            check(run.clone(), json!([50, 150])),
            Err((
                "steps[1]".to_string(),
                "the `run` input ends at step 110: no checkpoint at step 150".to_string()
            ))
        );
        assert_eq!(
            check(run.clone(), json!([50, 60])),
            Err((
                "steps[1]".to_string(),
                "the `run` input saves checkpoints at steps 0, 7, 50, 100, 110: none at step 60"
                    .to_string()
            ))
        );
        // Without `checkpoint_at: [0]` step 0 has no checkpoint.
        let periodic = json!({"steps": 100, "checkpoint_every": 50});
        assert_eq!(check(periodic, json!([0])).unwrap_err().0, "steps[0]");
        // A run that may stop early at any step may have its last checkpoint there.
        let early = json!({"steps": 110, "checkpoint_every": 50, "stop_loss": 0.01});
        assert_eq!(check(early.clone(), json!([60])), Ok(()));
        assert_eq!(check(early, json!([120])).unwrap_err().0, "steps[0]");
        let branch = json!({"steps": 100, "checkpoint_every": 20, "branch_step": 40});
        assert_eq!(check(branch.clone(), json!([60])), Ok(()));
        assert_eq!(check(branch, json!([40])).unwrap_err().0, "steps[0]");
    }

    #[test]
    fn each_quantity_is_due_at_some_measured_checkpoint() {
        let run = json!({"steps": 2400, "checkpoint_every": 400});
        let check = |raw: Value| {
            let params = MeasureStage.resolve(&raw).unwrap().params;
            let inputs = single_input("run", &TrainStage, &run);
            MeasureStage
                .check_inputs(&params, &inputs)
                .map_err(|e| (e.path, e.message))
        };
        let every = |n: u64| json!({"every": n});
        assert_eq!(
            check(json!({"measure": {"lambda_max": every(300)}})),
            Ok(())
        );
        assert_eq!(
            check(json!({"measure": {"lambda_max": every(400), "gni": every(5000)}})),
            Err((
                "measure.gni".to_string(),
                "its cadence is due at none of the checkpoints measured (steps 400, 800, 1200, \
                 1600, 2000, 2400)"
                    .to_string()
            ))
        );
        // Among the listed steps only.
        let listed = json!({"measure": {"lambda_max": every(1200)}, "steps": [400, 800]});
        assert_eq!(check(listed).unwrap_err().0, "measure.lambda_max");
        // Without planned checkpoints (a run that may stop early) it is left to the run.
        let params = MeasureStage
            .resolve(&json!({"measure": {"gni": every(5000)}}))
            .unwrap()
            .params;
        let early = json!({"steps": 2400, "checkpoint_every": 400, "stop_loss": 0.01});
        let inputs = single_input("run", &TrainStage, &early);
        assert_eq!(MeasureStage.check_inputs(&params, &inputs), Ok(()));
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn planned_checkpoints_are_the_ones_a_run_and_a_branch_save() {
        let data_params = json!({"source": "synthetic", "n": 16, "seed": 1,
            "synthetic": {"channels": 1, "height": 2, "width": 2, "num_classes": 2, "train_size": 16}});
        let data = tempfile::tempdir().unwrap();
        let no_inputs = BTreeMap::new();
        run_stage_in(
            &DatasetStage,
            &data_params,
            &no_inputs,
            data.path(),
            &NullReporter,
        )
        .unwrap();
        let data_input = input("data", &DatasetStage, &data_params, data.path());
        let base_params = json!({"model": {"arch": "mlp", "depth": 1, "width": 4},
            "init_scale": 1.0, "lr": 0.05, "batch_size": 4, "steps": 25, "checkpoint_every": 10,
            "checkpoint_at": [0, 3]});
        let mut branch_params = base_params.clone();
        branch_params["branch_step"] = json!(10);
        branch_params["steps"] = json!(27);
        branch_params["checkpoint_at"] = json!([15]);
        let base = tempfile::tempdir().unwrap();
        let branch = tempfile::tempdir().unwrap();
        let saved = |params: &Value, inputs, dir: &Path| {
            run_stage_in(&TrainStage, params, &inputs, dir, &NullReporter).unwrap();
            let listed = crate::train::checkpoint::list(&dir.join("checkpoints")).unwrap();
            let planned = planned_checkpoints(&TrainStage.resolve(params).unwrap().params);
            (
                listed.into_iter().map(|(step, _)| step).collect::<Vec<_>>(),
                planned.unwrap(),
            )
        };
        let (listed, planned) = saved(
            &base_params,
            BTreeMap::from([data_input.clone()]),
            base.path(),
        );
        assert_eq!(listed, [0, 3, 10, 20, 25]);
        assert_eq!(planned, listed);
        let branch_inputs = BTreeMap::from([
            data_input,
            input("base", &TrainStage, &base_params, base.path()),
        ]);
        let (listed, planned) = saved(&branch_params, branch_inputs, branch.path());
        assert_eq!(listed, [15, 20, 27]);
        assert_eq!(planned, listed);
    }

    #[test]
    fn a_run_stopped_part_way_resumes_after_its_last_checkpoint_and_ends_bit_identical() {
        let data_params = json!({"source": "synthetic", "n": 24, "seed": 1,
            "synthetic": {"channels": 1, "height": 2, "width": 3, "num_classes": 3, "train_size": 24}});
        let data = tempfile::tempdir().unwrap();
        run_stage_in(
            &DatasetStage,
            &data_params,
            &BTreeMap::new(),
            data.path(),
            &NullReporter,
        )
        .unwrap();
        let train_params = json!({"model": {"arch": "mlp", "depth": 2, "width": 8},
            "init_scale": 1.0, "lr": 0.05, "batch_size": 4, "steps": 40, "checkpoint_every": 10});
        let train = tempfile::tempdir().unwrap();
        let data_input = input("data", &DatasetStage, &data_params, data.path());
        let train_inputs = BTreeMap::from([data_input.clone()]);
        run_stage_in(
            &TrainStage,
            &train_params,
            &train_inputs,
            train.path(),
            &NullReporter,
        )
        .unwrap();
        let inputs = BTreeMap::from([
            input("run", &TrainStage, &train_params, train.path()),
            data_input,
        ]);
        // λmax warm-starts from the previous checkpoint's eigenvector: resuming needs it back.
        let params = json!({"measure": {
                "lambda_max": {"every": 10, "rel_tol": 1e-3, "max_iter": 6},
                "batch_sharpness": {"every": 10, "min_samples": 4, "max_samples": 8}},
            "alignment": {"samples": 6}});
        let whole = tempfile::tempdir().unwrap();
        run_stage_in(&MeasureStage, &params, &inputs, whole.path(), &NullReporter).unwrap();
        assert!(!whole.path().join(PROGRESS).exists());

        // A run that fails at the checkpoint of step 30 (an unreadable file), after writing part of
        // the next rows as a kill between a flush and the progress record would.
        let step_30 = train
            .path()
            .join("checkpoints")
            .join(checkpoint::file_name(30));
        let original = std::fs::read(&step_30).unwrap();
        std::fs::write(&step_30, b"not a checkpoint").unwrap();
        let stopped = tempfile::tempdir().unwrap();
        let err = run_stage_in(
            &MeasureStage,
            &params,
            &inputs,
            stopped.path(),
            &NullReporter,
        )
        .unwrap_err();
        assert!(err.to_string().contains("step-00000030"), "{err}");
        for name in ["metrics.csv", "alignment.csv"] {
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(stopped.path().join(name))
                .unwrap();
            std::io::Write::write_all(&mut file, b"30,0.05,4,7.2").unwrap();
        }
        std::fs::write(&step_30, original).unwrap();

        let log = Recorder::default();
        run_stage_in(&MeasureStage, &params, &inputs, stopped.path(), &log).unwrap();
        let lines = log.0.into_inner().unwrap();
        assert!(
            lines.contains(
                &"resuming after checkpoint 20 (2 of 4 checkpoints measured)".to_string()
            ),
            "{lines:?}"
        );
        assert!(
            !lines.contains(&"measured checkpoint 20".to_string()),
            "{lines:?}"
        );
        for name in ["metrics.csv", "alignment.csv"] {
            assert_eq!(
                read(&whole.path().join(name)),
                read(&stopped.path().join(name)),
                "{name}"
            );
        }
        assert!(!stopped.path().join(PROGRESS).exists());
    }
}
