//! The `train` stage kind: one SGD run on a `dataset` artifact (optionally evaluated on a test
//! `dataset`), or a branch continuing a cached base run from one of its checkpoints.
//!
//! Outputs: `metrics.csv`, `checkpoints/step-*.safetensors`, `summary.json` (status, steps run,
//! `diverged_at`). A diverged run is a valid, cached result (`eoss run` names it and exits with 3).
//! The kind is resumable: a killed run continues from the last checkpoint in its work dir and ends
//! bit-identical to an uninterrupted run.

use super::{
    check_fits_data, resolve_typed, InputSlot, ParamError, PlannedInputs, Resolved, Stage,
    StageContext, StageError,
};
use crate::data::Dataset;
use crate::train::measure::samples_batch_quotients;
use crate::train::schedule::{schedule_path, step_size_error};
use crate::train::{checkpoint, train, StartPoint, TrainConfig};

/// The `train` kind.
pub struct TrainStage;

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "data",
        required: true,
        sweep: false,
    },
    InputSlot {
        name: "test",
        required: false,
        sweep: false,
    },
    InputSlot {
        name: "base",
        required: false,
        sweep: false,
    },
];

fn load_dataset(ctx: &StageContext, input: &str) -> Result<Option<Dataset>, StageError> {
    let Some(artifacts) = ctx.inputs.get(input) else {
        return Ok(None);
    };
    let artifact = artifacts
        .first()
        .ok_or_else(|| StageError::input(input, "no artifact given"))?;
    Dataset::load(artifact.file("dataset.safetensors"))
        .map(Some)
        .map_err(|e| StageError::input(input, e))
}

impl Stage for TrainStage {
    fn kind(&self) -> &'static str {
        "train"
    }

    fn version(&self, params: &serde_json::Value) -> u32 {
        // 2: the `epoch` column of full-batch dynamics counts steps.
        // 3: the final state is measured where due; MLP curvature by hand-written passes.
        // 4 (the CNN and the ResNets only): gradients and curvature by hand-written passes (same
        // values to rounding).
        // 5 (the MLP measuring batch sharpness, GNI or IAS only): many batches per pass by Gram
        // matrices (same values to rounding).
        // 6 (the ResNets only): full-set and test evaluation by the hand-written forward pass
        // (same values to rounding).
        // 7 (the ResNets only): the 16-channel convolutions' weight and input gradients read the
        // padded image in place, in another order of summation (same values to rounding).
        // 8 for the ResNets, 5 for the CNN (diagonal and isotropic noise only): the per-sample
        // gradients of the noise variances by hand-written passes (same values to rounding).
        let per_sample_variances = matches!(
            params["dynamics"].as_str(),
            Some("diagonal_noise" | "isotropic_noise")
        );
        match params["model"]["arch"].as_str() {
            Some("resnet") if per_sample_variances => 8,
            Some("resnet") => 7,
            Some("cnn") if per_sample_variances => 5,
            Some("cnn") => 4,
            _ if samples_batch_quotients(&params["measure"]) => 5,
            _ => 3,
        }
    }

    fn resolve(&self, params: &serde_json::Value) -> Result<Resolved, ParamError> {
        let (config, canonical): (TrainConfig, _) = resolve_typed(params)?;
        let invalid = |path: &str, message: &str| ParamError {
            path: path.into(),
            message: message.into(),
        };
        if let Some(message) = step_size_error(config.lr) {
            return Err(invalid("lr", &message));
        }
        if config.batch_size == 0 {
            return Err(invalid("batch_size", "must be at least 1"));
        }
        for (i, change) in config.schedule.iter().enumerate() {
            change
                .check()
                .map_err(|(field, message)| invalid(&schedule_path(i, field), &message))?;
            if change.step >= config.steps {
                return Err(invalid(
                    &schedule_path(i, "step"),
                    &format!(
                        "step {} is not before the run's last step {}: no step would use the change",
                        change.step, config.steps
                    ),
                ));
            }
        }
        config.model.validate().map_err(|e| match e {
            crate::nn::SpecError::Invalid { field, message } => {
                invalid(&format!("model.{field}"), &message)
            }
        })?;
        use crate::train::dynamics::Dynamics;
        if config.dynamics != Dynamics::Sgd && config.momentum != 0.0 {
            return Err(invalid(
                "momentum",
                "noisy GD and the SDE take plain steps: momentum must be 0",
            ));
        }
        if matches!(
            config.dynamics,
            Dynamics::DiagonalNoise | Dynamics::IsotropicNoise
        ) && (config.noise_refresh_every == 0
            || config.checkpoint_every % config.noise_refresh_every != 0)
        {
            return Err(invalid(
                "noise_refresh_every",
                "must divide checkpoint_every, so that a resumed run refreshes the noise where an uninterrupted one does",
            ));
        }
        if let Some(k) = config.branch_step.filter(|&k| k >= config.steps) {
            return Err(invalid(
                "branch_step",
                &format!(
                    "a branch continues its base after step {k}: `steps` ({}) must be larger",
                    config.steps
                ),
            ));
        }
        // A branch saves after its branch step only.
        let first = config.branch_step.map_or(0, |k| k + 1);
        let outside = |step: &u64| !(first..=config.steps).contains(step);
        if let Some((i, step)) = config
            .checkpoint_at
            .iter()
            .enumerate()
            .find(|(_, s)| outside(s))
        {
            return Err(invalid(
                &format!("checkpoint_at[{i}]"),
                &format!(
                    "step {step} is outside the run's steps {first}..={}",
                    config.steps
                ),
            ));
        }
        for (path, value) in [
            ("checkpoint_every", config.checkpoint_every),
            ("eval_chunk", config.eval_chunk as u64),
        ] {
            if value == 0 {
                return Err(invalid(path, "must be at least 1"));
            }
        }
        Ok(Resolved {
            params: canonical,
            external_files: Vec::new(),
            device: config.device,
            needs_inputs: if config.branch_step.is_some() {
                vec![("base", "branch_step")]
            } else {
                Vec::new()
            },
        })
    }

    fn inputs(&self) -> &'static [InputSlot] {
        INPUTS
    }

    /// Every batch size (the first and each schedule change's) and the curvature subsample fit in
    /// the `data` subset, and a branch's `base` can have a checkpoint at `branch_step`.
    fn check_inputs(
        &self,
        params: &serde_json::Value,
        inputs: &PlannedInputs<'_>,
    ) -> Result<(), ParamError> {
        let base = inputs.get("base").and_then(|base| base.first());
        if let (Some(base), Some(step)) = (base, params["branch_step"].as_u64()) {
            if let Some(message) = no_checkpoint_at("base", base.params, step) {
                return Err(ParamError {
                    path: "branch_step".into(),
                    message,
                });
            }
        }
        let changes = params["schedule"].as_array().into_iter().flatten();
        let counts = [
            (
                "batch_size".to_string(),
                &params["batch_size"],
                "batch size",
            ),
            (
                "measure.subsample".to_string(),
                &params["measure"]["subsample"],
                "subsample",
            ),
        ]
        .into_iter()
        .chain(changes.enumerate().map(|(i, change)| {
            (
                schedule_path(i, "batch_size"),
                &change["batch_size"],
                "batch size",
            )
        }));
        check_fits_data(inputs, counts)
    }

    fn metrics_columns(&self, _params: &serde_json::Value) -> Option<Vec<String>> {
        Some(crate::train::metrics::header())
    }

    fn resumable(&self) -> bool {
        true
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let config: TrainConfig = ctx.typed_params()?;
        let train_data = load_dataset(ctx, "data")?.expect("`data` is a required input");
        let test_data = load_dataset(ctx, "test")?;

        let own = checkpoint::list(&ctx.work_dir.join("checkpoints"))?;
        let start = if let Some((step, path)) = own.last() {
            ctx.reporter
                .log(&format!("resuming from own checkpoint at step {step}"));
            StartPoint::Checkpoint {
                path: path.clone(),
                metrics: ctx.work_dir.join("metrics.csv"),
            }
        } else if let Some(step) = config.branch_step {
            let base = ctx
                .inputs
                .get("base")
                .and_then(|b| b.first())
                .ok_or_else(|| {
                    StageError::input("base", "`branch_step` needs a `base` train input")
                })?;
            let available = checkpoint::list(&base.dir.join("checkpoints"))?;
            let path = available
                .iter()
                .find(|(s, _)| *s == step)
                .map(|(_, p)| p.clone())
                .ok_or_else(|| {
                    StageError::input(
                        "base",
                        format!(
                            "base run `{}` has no checkpoint at step {step}; it has {:?}",
                            base.stage,
                            available.iter().map(|(s, _)| s).collect::<Vec<_>>()
                        ),
                    )
                })?;
            ctx.reporter
                .log(&format!("branching from `{}` at step {step}", base.stage));
            StartPoint::Checkpoint {
                path,
                metrics: base.dir.join("metrics.csv"),
            }
        } else {
            StartPoint::Fresh
        };

        let outcome = train(
            &config,
            &train_data,
            test_data.as_ref(),
            &start,
            ctx.work_dir,
            ctx.reporter,
        )?;
        ctx.reporter.log(&format!(
            "finished: {:?} after {} steps",
            outcome.status, outcome.steps_run
        ));

        let summary = ctx.work_dir.join("summary.json");
        std::fs::write(
            &summary,
            serde_json::to_vec_pretty(&outcome).expect("outcome serializes"),
        )
        .map_err(|e| StageError::io(&summary, e))
    }
}

/// The steps at which the `train` run with `run` params saves checkpoints (every
/// `checkpoint_every` steps, each `checkpoint_at` step and its last step, all after a branch's
/// `branch_step`), when they are certain before it runs: `None` for a run with a `stop_loss`, which
/// may end, and save its last checkpoint, at any step.
pub fn planned_checkpoints(run: &serde_json::Value) -> Option<Vec<u64>> {
    if !run["stop_loss"].is_null() {
        return None;
    }
    let last = run["steps"].as_u64()?;
    let every = run["checkpoint_every"].as_u64()?.max(1);
    let listed: Vec<u64> = run["checkpoint_at"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    let first = run["branch_step"].as_u64().map_or(0, |k| k + 1);
    let periodic = (first.max(1).div_ceil(every)..=last / every).map(|i| i * every);
    let listed = listed
        .into_iter()
        .filter(|step| (first..=last).contains(step));
    let mut steps: Vec<u64> = periodic.chain(listed).chain([last]).collect();
    steps.sort_unstable();
    steps.dedup();
    Some(steps)
}

/// Why the `train` run with `run` params, feeding input `slot`, can have no checkpoint at `step`,
/// when that is certain before it runs: the step lies after its last step, at or before the step
/// it branched at, or off its [`planned_checkpoints`]. `None` when it has or may have one.
pub fn no_checkpoint_at(slot: &str, run: &serde_json::Value, step: u64) -> Option<String> {
    let last = run["steps"].as_u64()?;
    if step > last {
        return Some(format!(
            "the `{slot}` input ends at step {last}: no checkpoint at step {step}"
        ));
    }
    if let Some(k) = run["branch_step"].as_u64().filter(|&k| step <= k) {
        return Some(format!(
            "the `{slot}` input is a branch from step {k}: its checkpoints come after it, not at \
             step {step} (its own base has those)"
        ));
    }
    let checkpoints = planned_checkpoints(run)?;
    (!checkpoints.contains(&step)).then(|| {
        format!(
            "the `{slot}` input saves checkpoints at steps {}: none at step {step}",
            list_steps(&checkpoints)
        )
    })
}

/// Steps for a message: all of up to eight, else the first six, `…` and the last.
pub fn list_steps(steps: &[u64]) -> String {
    let shown: Vec<String> = match steps {
        [] => return "(none)".to_string(),
        _ if steps.len() <= 8 => steps.iter().map(u64::to_string).collect(),
        _ => steps[..6]
            .iter()
            .map(u64::to_string)
            .chain(["…".to_string(), steps[steps.len() - 1].to_string()])
            .collect(),
    };
    shown.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::dataset::DatasetStage;
    use crate::stages::single_input;

    #[test]
    fn params_are_checked_and_the_error_names_the_field() {
        use serde_json::json;
        let error = |changes: serde_json::Value| {
            let mut raw = json!({"model": {"arch": "mlp"}, "init_scale": 0.2, "lr": 0.1,
                                 "batch_size": 8, "steps": 10});
            for (field, value) in changes.as_object().unwrap() {
                raw[field] = value.clone();
            }
            TrainStage
                .resolve(&raw)
                .map(|_| ())
                .map_err(|e| (e.path, e.message))
        };
        assert_eq!(error(json!({})), Ok(()));
        let path = |changes| error(changes).unwrap_err().0;
        assert_eq!(path(json!({"lr": -0.1})), "lr");
        assert_eq!(path(json!({"batch_size": 0})), "batch_size");
        assert_eq!(path(json!({"checkpoint_every": 0})), "checkpoint_every");
        assert_eq!(path(json!({"eval": {"every": 0}})), "eval.every");
        assert_eq!(
            path(json!({"measure": {"lambda_max": {"every": 0}}})),
            "measure.lambda_max.every"
        );
        assert_eq!(
            path(json!({"measure": {"batch_sharpness": {"every": 0}}})),
            "measure.batch_sharpness.every"
        );
        assert_eq!(
            path(json!({"schedule": [{"step": 5, "lr": 0.2}, {"step": 9, "lr": 0.0}]})),
            "schedule[1].lr"
        );
        assert_eq!(
            path(json!({"schedule": [{"step": 5, "batch_size": 0}]})),
            "schedule[0].batch_size"
        );
        assert_eq!(path(json!({"schedule": [{"step": 5}]})), "schedule[0]");
        assert_eq!(
            error(json!({"schedule": [{"step": 5, "lr": 0.2, "batch_size": 4}]})),
            Ok(())
        );
        assert_eq!(
            path(json!({"dynamics": "diagonal_noise", "noise_refresh_every": 7})),
            "noise_refresh_every"
        );
        assert_eq!(
            error(json!({"schedule": [{"step": 10, "lr": 0.2}]})),
            Err((
                "schedule[0].step".to_string(),
                "step 10 is not before the run's last step 10: no step would use the change"
                    .to_string()
            ))
        );
        // A branch takes at least one step of its own; listed checkpoints lie within the run.
        assert_eq!(path(json!({"branch_step": 10})), "branch_step");
        assert_eq!(error(json!({"branch_step": 9})), Ok(()));
        assert_eq!(
            error(json!({"checkpoint_at": [0, 3, 11]})),
            Err((
                "checkpoint_at[2]".to_string(),
                "step 11 is outside the run's steps 0..=10".to_string()
            ))
        );
        assert_eq!(
            path(json!({"branch_step": 4, "checkpoint_at": [6, 4]})),
            "checkpoint_at[1]"
        );
        assert_eq!(
            error(json!({"branch_step": 4, "checkpoint_at": [5, 10]})),
            Ok(())
        );
    }

    #[test]
    fn a_branch_starts_where_its_base_has_a_checkpoint() {
        use serde_json::json;
        let base = json!({"steps": 1000, "checkpoint_every": 200});
        let check = |branch_step: u64| {
            let raw = json!({"model": {"arch": "mlp"}, "init_scale": 0.2, "lr": 0.1,
                             "batch_size": 8, "steps": 2000, "branch_step": branch_step});
            let params = TrainStage.resolve(&raw).unwrap().params;
            let inputs = single_input("base", &TrainStage, &base);
            TrainStage
                .check_inputs(&params, &inputs)
                .map_err(|e| (e.path, e.message))
        };
        assert_eq!(check(400), Ok(()));
        assert_eq!(check(1000), Ok(()));
        assert_eq!(
            check(1200),
            Err((
                "branch_step".to_string(),
                "the `base` input ends at step 1000: no checkpoint at step 1200".to_string()
            ))
        );
        assert_eq!(check(450).unwrap_err().0, "branch_step");
    }

    #[test]
    fn planned_checkpoints_follow_the_run_loop() {
        use serde_json::json;
        let steps = |run| planned_checkpoints(&run);
        assert_eq!(
            steps(json!({"steps": 25, "checkpoint_every": 10})),
            Some(vec![10, 20, 25])
        );
        assert_eq!(
            steps(json!({"steps": 20, "checkpoint_every": 10, "checkpoint_at": [0, 3]})),
            Some(vec![0, 3, 10, 20])
        );
        // A branch saves after its branch step only.
        let branch = json!({"steps": 30, "checkpoint_every": 10, "branch_step": 10,
                            "checkpoint_at": [15]});
        assert_eq!(steps(branch), Some(vec![15, 20, 30]));
        // A run that may stop early has no certain list.
        let early = json!({"steps": 30, "checkpoint_every": 10, "stop_loss": 0.1});
        assert_eq!(steps(early), None);
        let many: Vec<u64> = (1..=20).map(|i| i * 5).collect();
        assert_eq!(list_steps(&many), "5, 10, 15, 20, 25, 30, …, 100");
        assert_eq!(list_steps(&many[..8]), "5, 10, 15, 20, 25, 30, 35, 40");
    }

    #[test]
    fn batch_sizes_and_the_subsample_must_fit_in_the_data_subset() {
        use serde_json::json;
        let check = |data: serde_json::Value, changes: serde_json::Value| {
            let mut raw = json!({"model": {"arch": "mlp"}, "init_scale": 0.2, "lr": 0.1,
                                 "batch_size": 8, "steps": 10});
            for (field, value) in changes.as_object().unwrap() {
                raw[field] = value.clone();
            }
            let params = TrainStage.resolve(&raw).unwrap().params;
            let inputs = single_input("data", &DatasetStage, &data);
            TrainStage
                .check_inputs(&params, &inputs)
                .map_err(|e| (e.path, e.message))
        };
        let subset = json!({"source": "synthetic", "n": 32});
        assert_eq!(check(subset.clone(), json!({"batch_size": 32})), Ok(()));
        assert_eq!(
            check(subset.clone(), json!({"batch_size": 33})),
            Err((
                "batch_size".to_string(),
                "batch size 33 is larger than the training set (the `data` input has n = 32)"
                    .to_string()
            ))
        );
        let schedule = json!({"schedule": [{"step": 2, "lr": 0.2}, {"step": 4, "batch_size": 64}]});
        assert_eq!(
            check(subset.clone(), schedule.clone()).unwrap_err().0,
            "schedule[1].batch_size"
        );
        assert_eq!(
            check(subset.clone(), json!({"measure": {"subsample": 40}}))
                .unwrap_err()
                .0,
            "measure.subsample"
        );
        // Without `n` the subset is the whole collection, checked when the run starts.
        assert_eq!(
            check(json!({"source": "synthetic", "n": null}), schedule),
            Ok(())
        );
    }

    #[test]
    fn versions_change_only_for_the_runs_whose_values_changed() {
        // Resolved params, as keys see them: the MLP's results did not change when the CNN's and
        // the ResNets' gradients moved to hand-written passes, so their keys must not either.
        use serde_json::json;
        // The version a run of `model` with the params `extra` gets, from its resolved params.
        let version_with = |model: serde_json::Value, extra: serde_json::Value| {
            let mut raw = json!({
                "model": model, "init_scale": 0.2, "loss": "mse", "lr": 0.1,
                "batch_size": 8, "steps": 10
            });
            raw.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            TrainStage.version(&TrainStage.resolve(&raw).unwrap().params)
        };
        // ... measuring `measure`.
        let version = |model, measure| version_with(model, json!({ "measure": measure }));
        let nothing = json!({});
        assert_eq!(version(json!({"arch": "cnn"}), nothing.clone()), 4);
        assert_eq!(version(json!({"arch": "mlp"}), nothing.clone()), 3);
        let mlp = || json!({"arch": "mlp"});
        assert_eq!(version(mlp(), json!({"step_sharpness": {"every": 2}})), 3);
        assert_eq!(version(mlp(), json!({"batch_sharpness": {"every": 2}})), 5);
        assert_eq!(
            version(mlp(), json!({"batch_sharpness_gn": {"every": 2}})),
            5
        );
        assert_eq!(version(mlp(), json!({"gni": {"every": 2}})), 5);
        let resnet = json!({"arch": "resnet", "depth": 14});
        assert_eq!(version(resnet.clone(), nothing.clone()), 7);
        // Noisy dynamics: only those that take per-sample gradient variances of a conv net.
        let noisy = |model, dynamics: &str| {
            version_with(
                model,
                json!({"dynamics": dynamics, "noise_refresh_every": 1}),
            )
        };
        assert_eq!(noisy(json!({"arch": "cnn"}), "diagonal_noise"), 5);
        assert_eq!(noisy(json!({"arch": "cnn"}), "isotropic_noise"), 5);
        assert_eq!(noisy(json!({"arch": "cnn"}), "resampling_noise"), 4);
        assert_eq!(noisy(resnet.clone(), "isotropic_noise"), 8);
        assert_eq!(noisy(resnet, "sde"), 7);
        assert_eq!(noisy(mlp(), "diagonal_noise"), 3);
    }
}
