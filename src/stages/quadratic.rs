//! The `quadratic` stage kind: SGD on the 1-D quadratic of figure 3 ([`crate::toy::quadratic`]),
//! writing `metrics.csv` in the training-run layout (so `plot` and `analysis` read it like any run)
//! and `summary.json` with `diverged_at`. Divergence (expected for η > 2) is a result, not a failure.
//!
//! Columns: `step,epoch,lr,batch_size,loss` (batch loss), `full_loss`, `grad_norm_sq`, `gni`,
//! `gni_windowed` (GNI as the ratio of the sums of its numerator and denominator over the last
//! `gni_window` steps: the time average that sits at 2/η while SGD oscillates), `lambda_max` (= 1,
//! the closed form) and `x`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::analysis::{write_json, write_table};
use super::{resolve_typed, InputSlot, ParamError, Resolved, Stage, StageContext, StageError};
use crate::toy::quadratic::{run_sgd, QuadraticConfig, QuadraticError, Sampling};
use crate::train::schedule::Change;

fn default_n() -> usize {
    100
}
fn default_batch() -> usize {
    1
}
fn default_steps() -> usize {
    2000
}
fn default_x0() -> f64 {
    1.0
}
fn default_divergence() -> f64 {
    1e10
}
fn default_gni_window() -> usize {
    50
}

/// Params of the `quadratic` kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuadraticParams {
    /// Step size η (required).
    pub lr: f64,
    /// Step-size changes `[{step, lr}]` (default none), e.g. η stepped across 2 in one run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<Change>,
    /// Number of data points N (default 100).
    #[serde(default = "default_n")]
    pub n: usize,
    /// Batch size (default 1).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// SGD steps (default 2000).
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Seed of data and batch order (default 0).
    #[serde(default)]
    pub seed: u64,
    /// Starting point (default 1).
    #[serde(default = "default_x0")]
    pub x0: f64,
    /// `reshuffle` (default) or `replacement`.
    #[serde(default)]
    pub sampling: Sampling,
    /// Full loss beyond which the run is stopped as diverged (default 1e10).
    #[serde(default = "default_divergence")]
    pub divergence_loss: f64,
    /// Steps in the trailing window of `gni_windowed` (default 50).
    #[serde(default = "default_gni_window")]
    pub gni_window: usize,
}

impl QuadraticParams {
    /// The run these params describe.
    fn config(&self) -> QuadraticConfig {
        QuadraticConfig {
            n: self.n,
            batch_size: self.batch_size,
            lr: self.lr,
            schedule: self.schedule.clone(),
            steps: self.steps,
            seed: self.seed,
            x0: self.x0,
            sampling: self.sampling,
            divergence_loss: self.divergence_loss,
        }
    }
}

/// The header of the `metrics.csv` it writes.
const COLUMNS: [&str; 11] = [
    "step",
    "epoch",
    "lr",
    "batch_size",
    "loss",
    "full_loss",
    "grad_norm_sq",
    "gni",
    "gni_windowed",
    "lambda_max",
    "x",
];

/// The `quadratic` stage kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuadraticStage;

impl Stage for QuadraticStage {
    fn kind(&self) -> &'static str {
        "quadratic"
    }

    fn version(&self, _params: &serde_json::Value) -> u32 {
        // 2: the `gni_windowed` column; 3: `lr` per step (step-size schedules).
        3
    }

    fn resolve(&self, params: &Value) -> Result<Resolved, ParamError> {
        let (p, canonical) = resolve_typed::<QuadraticParams>(params)?;
        if p.gni_window == 0 {
            return Err(ParamError {
                path: "gni_window".into(),
                message: "must be at least 1".into(),
            });
        }
        p.config()
            .validate()
            .map_err(|QuadraticError::Invalid { field, message }| ParamError {
                path: field,
                message,
            })?;
        Ok(Resolved::cpu(canonical))
    }

    fn metrics_columns(&self, _params: &Value) -> Option<Vec<String>> {
        Some(COLUMNS.map(String::from).to_vec())
    }

    fn inputs(&self) -> &'static [InputSlot] {
        &[]
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let p: QuadraticParams = ctx.typed_params()?;
        ctx.reporter.set_length(p.steps as u64);
        let run = run_sgd(&p.config()).map_err(|e| StageError::Failed(e.to_string()))?;
        let grad_norm_sq: Vec<f64> = run.steps.iter().map(|s| s.grad_norm_sq).collect();
        let windowed =
            run.problem
                .windowed_gni(&grad_norm_sq, p.batch_size, p.sampling, p.gni_window);
        let rows: Vec<Vec<String>> = run
            .steps
            .iter()
            .zip(&windowed)
            .map(|(s, windowed)| {
                vec![
                    s.step.to_string(),
                    s.epoch.to_string(),
                    s.lr.to_string(),
                    p.batch_size.to_string(),
                    s.batch_loss.to_string(),
                    s.full_loss.to_string(),
                    s.grad_norm_sq.to_string(),
                    s.gni.to_string(),
                    windowed.to_string(),
                    "1".to_string(),
                    s.x.to_string(),
                ]
            })
            .collect();
        write_table(&ctx.work_dir.join("metrics.csv"), &COLUMNS, &rows)?;
        ctx.reporter.set_position(run.steps.len() as u64);
        write_json(
            &ctx.work_dir.join("summary.json"),
            &json!({
                "steps": run.steps.len(),
                "diverged_at": run.diverged_at,
                "minimum": run.problem.mean,
                "min_loss": run.problem.loss(run.problem.mean),
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::analysis::test_support::run_stage;
    use super::*;
    use crate::analysis::metrics::MetricsTable;
    use std::collections::BTreeMap;

    #[test]
    fn writes_metrics_and_reports_divergence_only_above_two() {
        for (lr, diverges) in [(1.5, false), (2.5, true)] {
            let params = json!({"lr": lr, "n": 50, "batch_size": 5, "steps": 500, "seed": 1});
            let (dir, r) = run_stage(&QuadraticStage, params, &BTreeMap::new());
            r.unwrap();
            let t = MetricsTable::read(&dir.path().join("metrics.csv")).unwrap();
            let summary: Value = serde_json::from_str(
                &std::fs::read_to_string(dir.path().join("summary.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(summary["diverged_at"].is_null(), !diverges, "lr {lr}");
            // The written loss is the closed form ½((x − ā)² + σ²) of the written x.
            let (mean, var) = {
                let p = crate::toy::quadratic::QuadraticProblem::sample(50, 1);
                (p.mean, p.variance)
            };
            let xs = t.column("x").unwrap();
            let full = t.column("full_loss").unwrap();
            for (x, l) in xs.iter().zip(full).take(50) {
                let (x, l) = (x.unwrap(), l.unwrap());
                assert!((l - 0.5 * ((x - mean).powi(2) + var)).abs() <= 1e-9 * l.max(1.0));
            }
            assert_eq!(t.rows() < 500, diverges, "lr {lr}: {} rows", t.rows());
        }
    }

    #[test]
    fn a_schedule_writes_each_step_s_step_size() {
        let params = json!({"lr": 1.5, "n": 50, "batch_size": 5, "steps": 500, "seed": 1,
                            "schedule": [{"step": 100, "lr": 2.5}]});
        let (dir, r) = run_stage(&QuadraticStage, params, &BTreeMap::new());
        r.unwrap();
        let t = MetricsTable::read(&dir.path().join("metrics.csv")).unwrap();
        let lr: Vec<f64> = t.column("lr").unwrap().iter().flatten().copied().collect();
        assert!(lr[..100].iter().all(|&l| l == 1.5) && lr[100..].iter().all(|&l| l == 2.5));
        let summary: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("summary.json")).unwrap(),
        )
        .unwrap();
        let at = summary["diverged_at"].as_u64().expect("η = 2.5 diverges");
        assert!(at > 100 && lr.len() as u64 == at + 1, "diverged at {at}");
    }

    #[test]
    fn params_are_checked() {
        assert_eq!(
            QuadraticStage
                .resolve(&json!({"lr": 0.5, "n": 4, "batch_size": 8}))
                .unwrap_err()
                .path,
            "batch_size"
        );
        assert!(QuadraticStage
            .resolve(&json!({"n": 4}))
            .unwrap_err()
            .message
            .contains("lr"));
        assert!(QuadraticStage
            .resolve(&json!({"lr": 0.5, "eta": 1}))
            .is_err());
        let schedule = |change| json!({"lr": 0.5, "schedule": [{"step": 9, "lr": 1.0}, change]});
        let err = |change| QuadraticStage.resolve(&schedule(change)).unwrap_err().path;
        assert_eq!(
            err(json!({"step": 10, "batch_size": 2})),
            "schedule[1].batch_size"
        );
        let message = |change| {
            QuadraticStage
                .resolve(&schedule(change))
                .unwrap_err()
                .message
        };
        assert_eq!(err(json!({"step": 10, "lr": -1.0})), "schedule[1].lr");
        assert_eq!(
            message(json!({"step": 10, "lr": -1.0})),
            "must be a positive number, got -1"
        );
        assert_eq!(err(json!({"step": 10})), "schedule[1]");
        assert_eq!(
            message(json!({"step": 10})),
            "sets neither `lr` nor `batch_size`"
        );
        assert!(QuadraticStage
            .resolve(&schedule(json!({"step": 10, "lr": 2.1})))
            .is_ok());
    }
}
