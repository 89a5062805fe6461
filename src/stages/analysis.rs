//! The `analysis` stage kind: reads the `metrics.csv` of every run of a sweep (input `runs`) and
//! computes one of the analyses of [`crate::analysis`], chosen by `mode`:
//! `plateau` (level of a quantity over a window, with its ratio to 2/η), `final_lambda` (final value
//! per run), `gap` (power law of 2/η − λmax against b, with its test), `critical_batch` (knee of
//! λmax against ln b) and `catapults` (loss spikes). Writes `analysis.json` (the full result),
//! `analysis.csv` (a tidy table) and `summary.json`.
//!
//! A run's step size and batch size come from its `lr` / `batch_size` params, else from the last
//! row of its `lr` / `batch_size` metrics columns.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    check_columns_written, resolve_typed, InputArtifact, InputSlot, ParamError, PlannedInputs,
    Resolved, Stage, StageContext, StageError,
};
use crate::analysis::catapult::{detect_catapults, settings_error};
use crate::analysis::metrics::MetricsTable;
use crate::analysis::run::{final_value, plateau, probability_error, FinalProtocol, Window};
use crate::analysis::sweep::{critical_batch_size, gap_power_law};

/// One run of the input sweep with its metrics.
#[derive(Debug, Clone)]
pub struct RunMetrics {
    /// Instance name of the producing stage.
    pub stage: String,
    /// Its resolved params.
    pub params: Value,
    /// The params of its own inputs, by slot (see [`InputArtifact::upstream_params`]).
    pub upstream: BTreeMap<String, Value>,
    /// Its metrics table.
    pub table: MetricsTable,
}

/// The value at a dotted path (`model.arch`) inside `root`.
fn walk_path<'v>(root: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(root, |v, key| v.get(key))
}

/// The param at a dotted path (`model.arch`) in a run's `params`, else, when the first segment
/// names one of its input slots, the param of that input in `upstream` (`data.n`: the size of its
/// dataset).
fn run_param<'v>(
    params: &'v Value,
    upstream: &'v BTreeMap<String, Value>,
    path: &str,
) -> Option<&'v Value> {
    let of_input = || {
        let (slot, rest) = path.split_once('.')?;
        walk_path(upstream.get(slot)?, rest)
    };
    walk_path(params, path).or_else(of_input)
}

impl RunMetrics {
    /// [`run_param`] of this run.
    fn param(&self, path: &str) -> Option<&Value> {
        run_param(&self.params, &self.upstream, path)
    }

    /// A numeric param (see `param`), else the last value of the metrics column of the
    /// same name (last path segment).
    pub fn value(&self, name: &str) -> Option<f64> {
        self.param(name).and_then(Value::as_f64).or_else(|| {
            let column = name.rsplit('.').next()?;
            self.table
                .column(column)
                .ok()?
                .iter()
                .rev()
                .find_map(|v| *v)
        })
    }

    /// A param rendered for labels (strings and numbers alike), falling back to [`Self::value`].
    pub fn label(&self, name: &str) -> Option<String> {
        match self.param(name) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(Value::Bool(b)) => Some(b.to_string()),
            _ => self.value(name).map(|v| v.to_string()),
        }
    }

    /// A required numeric value (see [`Self::value`]), or an error naming the run.
    pub fn require(&self, name: &str, input: &str) -> Result<f64, StageError> {
        self.value(name).ok_or_else(|| {
            StageError::input(
                input,
                format!(
                    "run `{}` has neither a `{name}` param nor a `{name}` metrics column",
                    self.stage
                ),
            )
        })
    }
}

/// The artifacts of input `name`, in sweep order; an error if there are none.
pub fn input_artifacts<'c>(
    ctx: &'c StageContext,
    name: &str,
) -> Result<&'c [InputArtifact], StageError> {
    ctx.inputs
        .get(name)
        .filter(|a| !a.is_empty())
        .map(Vec::as_slice)
        .ok_or_else(|| StageError::input(name, "no input artifacts given"))
}

/// Reads `metrics.csv` of every artifact of input `name`, in sweep order.
pub fn load_runs(ctx: &StageContext, name: &str) -> Result<Vec<RunMetrics>, StageError> {
    input_artifacts(ctx, name)?
        .iter()
        .map(|a| {
            let table = MetricsTable::read(&a.file("metrics.csv"))
                .map_err(|e| StageError::input(name, e))?;
            Ok(RunMetrics {
                stage: a.stage.clone(),
                params: a.params.clone(),
                upstream: a.upstream_params.clone(),
                table,
            })
        })
        .collect()
}

/// Writes `value` as pretty JSON.
pub fn write_json(path: &Path, value: &Value) -> Result<(), StageError> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| StageError::Failed(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| StageError::io(path, e))
}

/// Writes a CSV table of string cells.
pub fn write_table(path: &Path, header: &[&str], rows: &[Vec<String>]) -> Result<(), StageError> {
    let fail = |e: csv::Error| StageError::Failed(format!("{}: {e}", path.display()));
    let mut w = csv::Writer::from_path(path).map_err(fail)?;
    w.write_record(header).map_err(fail)?;
    for row in rows {
        w.write_record(row).map_err(fail)?;
    }
    w.flush().map_err(|e| StageError::io(path, e))
}

fn default_level() -> f64 {
    0.95
}
fn default_sharpness() -> String {
    "batch_sharpness".to_string()
}
fn default_lambda() -> String {
    "lambda_max".to_string()
}
fn default_loss() -> String {
    "loss".to_string()
}
fn default_window() -> Window {
    Window::LastFraction(1.0 / 3.0)
}
fn default_protocol() -> FinalProtocol {
    FinalProtocol::FinalEpoch
}
fn default_significance() -> f64 {
    0.05
}
fn default_bootstrap() -> usize {
    1000
}
fn default_catapult_window() -> usize {
    50
}
fn default_factor() -> f64 {
    3.0
}

/// Params of the `analysis` kind, one variant per `mode`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum AnalysisParams {
    /// Plateau level of `column` over `window`, with a `level` interval and its ratio to 2/η.
    Plateau {
        /// Metrics column (default `batch_sharpness`).
        #[serde(default = "default_sharpness")]
        column: String,
        /// Steps averaged (default: the last third, `{last_fraction: 0.333…}`).
        #[serde(default = "default_window")]
        window: Window,
        /// Confidence level (default 0.95).
        #[serde(default = "default_level")]
        level: f64,
    },
    /// Final value of `column` per run.
    FinalLambda {
        /// Metrics column (default `lambda_max`).
        #[serde(default = "default_lambda")]
        column: String,
        /// `final_epoch` (default) or `{last_k: k}`.
        #[serde(default = "default_protocol")]
        protocol: FinalProtocol,
    },
    /// Power law of the gap 2/η − final λ against b across the sweep (one η).
    Gap {
        /// Metrics column (default `lambda_max`).
        #[serde(default = "default_lambda")]
        column: String,
        /// How the final value is read (default `final_epoch`).
        #[serde(default = "default_protocol")]
        protocol: FinalProtocol,
        /// Significance of the curvature test (default 0.05).
        #[serde(default = "default_significance")]
        significance: f64,
        /// Param(s) splitting the sweep into one fit per value (e.g. `lr`, `[model.arch, lr]`,
        /// `data.n`); default one fit for the whole sweep, which must then share one η.
        #[serde(default, deserialize_with = "one_or_many")]
        series_by: Vec<String>,
    },
    /// Critical batch size: knee of final λ against ln b.
    CriticalBatch {
        /// Metrics column (default `lambda_max`).
        #[serde(default = "default_lambda")]
        column: String,
        /// How the final value is read (default `final_epoch`).
        #[serde(default = "default_protocol")]
        protocol: FinalProtocol,
        /// Bootstrap replicates (default 1000).
        #[serde(default = "default_bootstrap")]
        bootstrap: usize,
        /// Interval level (default 0.95).
        #[serde(default = "default_level")]
        level: f64,
        /// Bootstrap seed (default 0).
        #[serde(default)]
        seed: u64,
        /// Param(s) splitting the sweep into one fit per value (as for `gap`).
        #[serde(default, deserialize_with = "one_or_many")]
        series_by: Vec<String>,
    },
    /// Loss spikes above a running median baseline.
    Catapults {
        /// Metrics column (default `loss`).
        #[serde(default = "default_loss")]
        column: String,
        /// Points in the running baseline (default 50).
        #[serde(default = "default_catapult_window")]
        window: usize,
        /// Spike threshold as a multiple of the baseline (default 3).
        #[serde(default = "default_factor")]
        factor: f64,
    },
}

impl AnalysisParams {
    /// The field whose setting the analysis cannot use (a window outside the run, a level outside
    /// (0, 1), `last_k: 0`, a catapult factor not above 1) and why, or `None`.
    fn settings_error(&self) -> Option<(&'static str, String)> {
        let protocol = |p: &FinalProtocol| p.error().map(|m| ("protocol", m));
        let probability = |field, name, value| probability_error(name, value).map(|m| (field, m));
        match self {
            AnalysisParams::Plateau { window, level, .. } => window
                .error()
                .map(|m| ("window", m))
                .or_else(|| probability("level", "confidence level", *level)),
            AnalysisParams::FinalLambda { protocol: p, .. } => protocol(p),
            AnalysisParams::Gap {
                protocol: p,
                significance,
                ..
            } => protocol(p).or_else(|| probability("significance", "significance", *significance)),
            AnalysisParams::CriticalBatch {
                protocol: p, level, ..
            } => protocol(p).or_else(|| probability("level", "confidence level", *level)),
            AnalysisParams::Catapults { window, factor, .. } => settings_error(*window, *factor),
        }
    }
}

/// The `analysis` stage kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnalysisStage;

/// The input slot of the `analysis` and `plot` kinds: the runs of a sweep.
pub const RUNS: &str = "runs";

/// [`RUNS`] as the only, required, sweep input.
pub const RUNS_INPUT: &[InputSlot] = &[InputSlot {
    name: RUNS,
    required: true,
    sweep: true,
}];

fn f(v: f64) -> String {
    v.to_string()
}

/// (b, final value) of every run, checking that all share one step size, which is returned.
fn final_points(
    runs: &[&RunMetrics],
    column: &str,
    protocol: FinalProtocol,
) -> Result<(Vec<(f64, f64)>, f64), StageError> {
    let mut lr: Option<(f64, &str)> = None;
    let mut points = Vec::with_capacity(runs.len());
    for run in runs {
        let this_lr = run.require("lr", RUNS)?;
        match lr {
            Some((l, first)) if l != this_lr => {
                return Err(StageError::input(
                    RUNS,
                    format!(
                        "runs `{first}` (lr {l}) and `{}` (lr {this_lr}) differ in step size; a \
                         gap or critical-batch analysis needs one η (split the sweep by lr)",
                        run.stage
                    ),
                ))
            }
            None => lr = Some((this_lr, &run.stage)),
            _ => {}
        }
        let value =
            final_value(&run.table, column, protocol).map_err(|e| StageError::input(RUNS, e))?;
        points.push((run.require("batch_size", RUNS)?, value.value));
    }
    Ok((points, lr.map_or(f64::NAN, |l| l.0)))
}

/// Result, CSV rows and summary of one fit.
type Fit = (Value, Vec<Vec<String>>, Value);

/// What an analysis writes: `analysis.json`, the header and rows of `analysis.csv`, `summary.json`.
type Analysed = (Value, Vec<&'static str>, Vec<Vec<String>>, Value);

/// Runs `fit` on each series of `runs` (split by `series_by`; the whole sweep when empty). Without
/// `series_by` the result and summary are the fit's own (plus `mode` and `column`); with it they
/// hold a `series` array of them, each with its `series` label (or the `error` that series met,
/// when at least one other series was fitted). CSV rows get a leading `series`.
fn per_series(
    mode: &str,
    column: &str,
    runs: &[RunMetrics],
    series_by: &[String],
    header: &[&'static str],
    fit: impl Fn(&[&RunMetrics]) -> Result<Fit, StageError>,
) -> Result<Analysed, StageError> {
    let groups = series(runs, series_by, RUNS)?;
    let mut results = Vec::new();
    let mut summaries = Vec::new();
    let mut all_rows = Vec::new();
    let mut first_failure = None;
    for (label, members) in &groups {
        let (mut result, rows, mut summary) = match fit(members) {
            Ok(done) => done,
            // With several series, one that cannot be fitted (e.g. every λ above 2/η) is reported
            // in its place; the stage fails only when no series can be.
            Err(e) if !series_by.is_empty() => {
                let failed = json!({"series": label, "error": e.to_string()});
                results.push(failed.clone());
                summaries.push(failed);
                first_failure.get_or_insert(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        all_rows.extend(rows.into_iter().map(|row| {
            let mut full = vec![label.clone()];
            full.extend(row);
            full
        }));
        if !series_by.is_empty() {
            result["series"] = json!(label);
            summary["series"] = json!(label);
        }
        results.push(result);
        summaries.push(summary);
    }
    if let Some(e) = first_failure.filter(|_| all_rows.is_empty()) {
        return Err(e);
    }
    let wrap = |mut items: Vec<Value>| {
        let mut out = if series_by.is_empty() {
            items.remove(0)
        } else {
            json!({"series": items})
        };
        out["mode"] = json!(mode);
        out["column"] = json!(column);
        out
    };
    let mut full_header = vec!["series"];
    full_header.extend_from_slice(header);
    Ok((wrap(results), full_header, all_rows, wrap(summaries)))
}

/// A param path or a list of them (`series_by: lr` or `series_by: [model.arch, lr]`).
pub fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(ps) => ps,
    })
}

/// `(field path, name)` for each entry of a [`one_or_many`] field: the field itself for a lone
/// entry (which the YAML may give as a plain string), `field[i]` for each of several.
pub fn one_or_many_paths<'a>(field: &str, names: &'a [String]) -> Vec<(String, &'a str)> {
    match names {
        [name] => vec![(field.to_string(), name.as_str())],
        _ => names
            .iter()
            .enumerate()
            .map(|(i, name)| (format!("{field}[{i}]"), name.as_str()))
            .collect(),
    }
}

/// Checks before anything runs that every stage feeding `slot` has what [`group_runs`] labels it
/// by, for each `(field path, name)`: a param at that dotted path, a param of one of its inputs
/// (`data.n`; through a sweep input, left to the run), or a column of its `metrics.csv` (a stage
/// whose kind declares no header is left to the run too). A typo gets the nearest param or column.
pub fn check_group_by<'a>(
    inputs: &PlannedInputs<'_>,
    slot: &str,
    names: impl IntoIterator<Item = (String, &'a str)>,
) -> Result<(), ParamError> {
    let stages = inputs.get(slot).map(Vec::as_slice).unwrap_or_default();
    for (path, name) in names {
        for stage in stages {
            let Some(columns) = stage.metrics_columns() else {
                continue;
            };
            let labelled = run_param(stage.params, stage.upstream, name)
                .is_some_and(|v| v.is_string() || v.is_number() || v.is_boolean());
            let through_sweep = name
                .split_once('.')
                .and_then(|(slot, _)| stage.upstream.get(slot))
                .is_some_and(Value::is_array);
            let column = name.rsplit('.').next().unwrap_or(name);
            if labelled || through_sweep || columns.iter().any(|c| c == column) {
                continue;
            }
            let mut known = Vec::new();
            leaf_paths(stage.params, "", &mut known);
            for (slot, params) in stage.upstream {
                leaf_paths(params, slot, &mut known);
            }
            known.extend(columns);
            let nearest = crate::analysis::closest_name(name, known.iter().map(String::as_str));
            let hint = crate::analysis::did_you_mean(&nearest);
            return Err(ParamError {
                path,
                message: format!(
                    "the `{}` stages feeding `{slot}` have no param or metrics column `{name}` to \
                     group by{hint}",
                    stage.kind.kind()
                ),
            });
        }
    }
    Ok(())
}

/// The dotted paths of every scalar inside `value` (`model.arch`, `lr`), each after `prefix`.
fn leaf_paths(value: &Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(fields) => {
            for (key, field) in fields {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                leaf_paths(field, &path, out);
            }
        }
        Value::Array(_) | Value::Null => {}
        _ => out.push(prefix.to_string()),
    }
}

/// Groups runs by their labels of `params` (`η = 0.04, n = 1024`), or one group per run when
/// there are none (labelled by the params that vary between them), keeping first-appearance order;
/// `input` names the slot in errors.
pub fn group_runs<'a>(
    runs: &'a [RunMetrics],
    params: &[String],
    input: &str,
) -> Result<Vec<(String, Vec<&'a RunMetrics>)>, StageError> {
    if params.is_empty() {
        return Ok(varying_labels(runs)
            .into_iter()
            .zip(runs.iter().map(|r| vec![r]))
            .collect());
    }
    let mut groups: Vec<(String, Vec<&RunMetrics>)> = Vec::new();
    for run in runs {
        let labels = params
            .iter()
            .map(|p| {
                let label = run.label(p).ok_or_else(|| {
                    StageError::input(
                        input,
                        format!(
                            "run `{}` has no param or column `{p}` to group by",
                            run.stage
                        ),
                    )
                })?;
                Ok(format!("{} = {label}", short_name(p)))
            })
            .collect::<Result<Vec<_>, StageError>>()?;
        let key = labels.join(", ");
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => g.1.push(run),
            None => groups.push((key, vec![run])),
        }
    }
    Ok(groups)
}

/// One label per run: its swept params (those its instance name binds, `train[batch_size=8,lr=0.04]`)
/// whose values differ across `runs` (all of them for a lone run), as `b = 8`; the instance names
/// where that leaves a run with no label or two runs with the same one.
fn varying_labels(runs: &[RunMetrics]) -> Vec<String> {
    let labels: Vec<String> = runs
        .iter()
        .map(|run| {
            swept_params(&run.stage)
                .into_iter()
                .filter(|p| {
                    runs.len() == 1 || runs.iter().any(|other| other.label(p) != run.label(p))
                })
                .map(|p| format!("{} = {}", short_name(p), run.label(p).unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .collect();
    let distinct: std::collections::BTreeSet<&String> = labels.iter().collect();
    if labels.iter().any(String::is_empty) || distinct.len() < labels.len() {
        runs.iter().map(|r| r.stage.clone()).collect()
    } else {
        labels
    }
}

/// The params an instance name binds: `batch_size` and `lr` for `train[batch_size=8,lr=0.04]`.
fn swept_params(instance: &str) -> Vec<&str> {
    instance
        .split_once('[')
        .and_then(|(_, rest)| rest.strip_suffix(']'))
        .map(|inner| {
            inner
                .split(',')
                .filter_map(|binding| binding.split_once('=').map(|(param, _)| param))
                .collect()
        })
        .unwrap_or_default()
}

/// The series of a sweep: one per value of `series_by` (see [`group_runs`]), or the whole sweep
/// as one series with an empty label when `series_by` is empty.
pub fn series<'a>(
    runs: &'a [RunMetrics],
    series_by: &[String],
    input: &str,
) -> Result<Vec<(String, Vec<&'a RunMetrics>)>, StageError> {
    if series_by.is_empty() {
        Ok(vec![(String::new(), runs.iter().collect())])
    } else {
        group_runs(runs, series_by, input)
    }
}

/// The label of a param in legends: `η` for `lr`, `b` for `batch_size`, else its last segment.
pub fn short_name(param: &str) -> String {
    match param.rsplit('.').next().unwrap_or(param) {
        "lr" => "η".to_string(),
        "batch_size" => "b".to_string(),
        "arch" => "model".to_string(),
        other => other.to_string(),
    }
}

impl Stage for AnalysisStage {
    fn kind(&self) -> &'static str {
        "analysis"
    }

    fn version(&self, _params: &serde_json::Value) -> u32 {
        // 2: `series_by`, and a leading `series` column in analysis.csv.
        2
    }

    fn resolve(&self, params: &Value) -> Result<Resolved, ParamError> {
        let (typed, canonical) = resolve_typed::<AnalysisParams>(params)?;
        if let Some((path, message)) = typed.settings_error() {
            return Err(ParamError {
                path: path.into(),
                message,
            });
        }
        Ok(Resolved::cpu(canonical))
    }

    fn inputs(&self) -> &'static [InputSlot] {
        RUNS_INPUT
    }

    /// The analysed `column` is written by some run, and every run has what `series_by` names.
    fn check_inputs(&self, params: &Value, inputs: &PlannedInputs<'_>) -> Result<(), ParamError> {
        let column = params["column"].as_str();
        check_columns_written(inputs, RUNS, column.map(|c| ("column".to_string(), c)))?;
        let series_by: Vec<String> = params["series_by"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|name| Some(name.as_str()?.to_string()))
            .collect();
        check_group_by(inputs, RUNS, one_or_many_paths("series_by", &series_by))
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let params: AnalysisParams = ctx.typed_params()?;
        let runs = load_runs(ctx, RUNS)?;
        let (result, header, rows, summary): Analysed = match &params {
            AnalysisParams::Plateau {
                column,
                window,
                level,
            } => {
                let mut per_run = Vec::new();
                let mut rows = Vec::new();
                for run in &runs {
                    let lr = run.require("lr", RUNS)?;
                    let pts = run
                        .table
                        .pairs("step", column)
                        .map_err(|e| StageError::input(RUNS, e))?;
                    let what = format!("`{column}` of run `{}`", run.stage);
                    let p = plateau(&pts, *window, *level, &what)
                        .map_err(|e| StageError::input(RUNS, e))?;
                    let ratio = p.mean * lr / 2.0;
                    rows.push(vec![
                        run.stage.clone(),
                        f(lr),
                        run.value("batch_size").map_or(String::new(), f),
                        f(2.0 / lr),
                        f(p.mean),
                        f(p.stderr),
                        f(p.low),
                        f(p.high),
                        p.samples.to_string(),
                        f(ratio),
                    ]);
                    per_run.push(json!({"run": run.stage, "lr": lr, "plateau": p, "ratio_to_threshold": ratio}));
                }
                let ratios: Vec<f64> = per_run
                    .iter()
                    .filter_map(|r| r["ratio_to_threshold"].as_f64())
                    .collect();
                let summary = json!({
                    "mode": "plateau",
                    "column": column,
                    "min_ratio_to_threshold": ratios.iter().copied().fold(f64::INFINITY, f64::min),
                    "max_ratio_to_threshold": ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                });
                (
                    json!({"mode": "plateau", "column": column, "runs": per_run}),
                    vec![
                        "run",
                        "lr",
                        "batch_size",
                        "threshold",
                        "mean",
                        "stderr",
                        "low",
                        "high",
                        "samples",
                        "ratio_to_threshold",
                    ],
                    rows,
                    summary,
                )
            }
            AnalysisParams::FinalLambda { column, protocol } => {
                let mut per_run = Vec::new();
                let mut rows = Vec::new();
                for run in &runs {
                    let v = final_value(&run.table, column, *protocol)
                        .map_err(|e| StageError::input(RUNS, e))?;
                    let lr = run.value("lr");
                    let b = run.value("batch_size");
                    rows.push(vec![
                        run.stage.clone(),
                        lr.map_or(String::new(), f),
                        b.map_or(String::new(), f),
                        f(v.value),
                        v.samples.to_string(),
                        f(v.from_step),
                        f(v.to_step),
                    ]);
                    per_run.push(json!({"run": run.stage, "lr": lr, "batch_size": b, "final": v}));
                }
                (
                    json!({"mode": "final_lambda", "column": column, "runs": per_run}),
                    vec![
                        "run",
                        "lr",
                        "batch_size",
                        "value",
                        "samples",
                        "from_step",
                        "to_step",
                    ],
                    rows,
                    json!({"mode": "final_lambda", "column": column, "runs": runs.len()}),
                )
            }
            AnalysisParams::Gap {
                column,
                protocol,
                significance,
                series_by,
            } => per_series(
                "gap",
                column,
                &runs,
                series_by,
                &[
                    "batch_size",
                    "lambda",
                    "gap",
                    "fitted_gap",
                    "log10_residual",
                ],
                |members| {
                    let (points, lr) = final_points(members, column, *protocol)?;
                    let fit = gap_power_law(&points, lr).map_err(|e| StageError::input(RUNS, e))?;
                    let rows = points
                        .iter()
                        .map(|&(b, lam)| {
                            let used = fit.used.iter().position(|p| p.0 == b);
                            vec![
                                f(b),
                                f(lam),
                                f(2.0 / lr - lam),
                                used.map_or(String::new(), |_| f(fit.predict(b))),
                                used.map_or(String::new(), |i| f(fit.residuals[i])),
                            ]
                        })
                        .collect();
                    let rejected = fit.rejected(*significance);
                    let summary = json!({
                        "lr": lr, "alpha": fit.alpha, "r_squared": fit.r_squared,
                        "curvature_p_value": fit.curvature.map(|c| c.p_value),
                        "power_law_rejected": rejected,
                    });
                    let result = json!({"lr": lr, "threshold": 2.0 / lr, "points": points,
                            "fit": fit, "significance": significance,
                            "power_law_rejected": rejected});
                    Ok((result, rows, summary))
                },
            )?,
            AnalysisParams::CriticalBatch {
                column,
                protocol,
                bootstrap,
                level,
                seed,
                series_by,
            } => per_series(
                "critical_batch",
                column,
                &runs,
                series_by,
                &["batch_size", "lambda", "fitted"],
                |members| {
                    let (points, lr) = final_points(members, column, *protocol)?;
                    let knee = critical_batch_size(&points, *bootstrap, *level, *seed)
                        .map_err(|e| StageError::input(RUNS, e))?;
                    let rows = points
                        .iter()
                        .map(|&(b, lam)| vec![f(b), f(lam), f(knee.predict(b))])
                        .collect();
                    let summary = json!({
                        "lr": lr, "critical_batch": knee.critical_batch,
                        "ci_low": knee.ci_low, "ci_high": knee.ci_high,
                    });
                    let result = json!({"lr": lr, "threshold": 2.0 / lr, "points": points,
                            "fit": knee, "level": level});
                    Ok((result, rows, summary))
                },
            )?,
            AnalysisParams::Catapults {
                column,
                window,
                factor,
            } => {
                let mut per_run = Vec::new();
                let mut rows = Vec::new();
                for run in &runs {
                    let pts = run
                        .table
                        .pairs("step", column)
                        .map_err(|e| StageError::input(RUNS, e))?;
                    let events = detect_catapults(&pts, *window, *factor)
                        .map_err(|e| StageError::input(RUNS, e))?;
                    for e in &events {
                        rows.push(vec![
                            run.stage.clone(),
                            f(e.start_step),
                            f(e.peak_step),
                            f(e.peak),
                            f(e.baseline),
                            f(e.ratio),
                            e.end_step.map_or(String::new(), f),
                        ]);
                    }
                    per_run.push(json!({"run": run.stage, "catapults": events}));
                }
                (
                    json!({"mode": "catapults", "column": column, "runs": per_run}),
                    vec![
                        "run",
                        "start_step",
                        "peak_step",
                        "peak",
                        "baseline",
                        "ratio",
                        "end_step",
                    ],
                    rows.clone(),
                    json!({"mode": "catapults", "column": column, "catapults": rows.len()}),
                )
            }
        };
        write_json(&ctx.work_dir.join("analysis.json"), &result)?;
        write_table(&ctx.work_dir.join("analysis.csv"), &header, &rows)?;
        write_json(&ctx.work_dir.join("summary.json"), &summary)
    }
}

/// Helpers for driving stages directly on the fixture runs of `tests/fixtures/metrics/`.
#[cfg(test)]
pub(crate) mod test_support {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use serde_json::{json, Value};

    use crate::stages::{InputArtifact, Stage, StageContext, StageError, StageReporter};

    /// A reporter that discards everything.
    pub struct NullReporter;

    impl StageReporter for NullReporter {
        fn set_length(&self, _: u64) {}
        fn set_position(&self, _: u64) {}
        fn log(&self, _: &str) {}
    }

    /// The fixture sweep at lr = 0.04 over b = 8…128, as input `runs`.
    pub fn fixture_runs() -> BTreeMap<String, Vec<InputArtifact>> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics");
        let runs = [8, 16, 32, 64, 128]
            .iter()
            .map(|b| InputArtifact {
                stage: format!("train[batch_size={b}]"),
                key: format!("key{b}"),
                dir: root.join(format!("b{b}")),
                params: json!({"lr": 0.04, "batch_size": b}),
                upstream_params: BTreeMap::from([("data".to_string(), json!({"n": 1024}))]),
                output: None,
            })
            .collect();
        BTreeMap::from([("runs".to_string(), runs)])
    }

    /// Resolves `params` and runs `stage` in a fresh temporary work dir.
    pub fn run_stage(
        stage: &dyn Stage,
        params: Value,
        inputs: &BTreeMap<String, Vec<InputArtifact>>,
    ) -> (tempfile::TempDir, Result<(), StageError>) {
        let dir = tempfile::tempdir().unwrap();
        let result = run_stage_in(stage, &params, inputs, dir.path(), &NullReporter);
        (dir, result)
    }

    /// Resolves `params` and runs `stage` in `work_dir`, reporting to `reporter`.
    pub fn run_stage_in(
        stage: &dyn Stage,
        params: &Value,
        inputs: &BTreeMap<String, Vec<InputArtifact>>,
        work_dir: &std::path::Path,
        reporter: &dyn StageReporter,
    ) -> Result<(), StageError> {
        let resolved = stage.resolve(params).unwrap();
        stage.run(&StageContext {
            name: "test",
            params: &resolved.params,
            inputs,
            work_dir,
            reporter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{fixture_runs, run_stage};
    use super::*;

    fn summary(dir: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
    }

    #[test]
    fn the_analysed_column_must_be_written_by_some_run() {
        use crate::stages::{single_input, train::TrainStage};
        let train = json!({});
        let check = |raw: Value| {
            let params = AnalysisStage.resolve(&raw).unwrap().params;
            let inputs = single_input(RUNS, &TrainStage, &train);
            AnalysisStage
                .check_inputs(&params, &inputs)
                .map_err(|e| e.path)
        };
        assert_eq!(check(json!({"mode": "plateau"})), Ok(()));
        assert_eq!(
            check(json!({"mode": "final_lambda", "column": "lambda_max_gn"})),
            Ok(())
        );
        assert_eq!(
            check(json!({"mode": "catapults", "column": "los"})),
            Err("column".to_string())
        );
    }

    #[test]
    fn grouping_names_a_param_an_input_param_or_a_column_of_every_run() {
        use crate::stages::{single_input, train::TrainStage};
        let train = TrainStage
            .resolve(
                &json!({"model": {"arch": "mlp"}, "init_scale": 0.2, "lr": 0.1,
                             "batch_size": 8, "steps": 10}),
            )
            .unwrap()
            .params;
        let data = BTreeMap::from([("data".to_string(), json!({"source": "cifar10", "n": 64}))]);
        let mut inputs = single_input(RUNS, &TrainStage, &train);
        inputs.get_mut(RUNS).unwrap()[0].upstream = &data;
        let check = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            check_group_by(&inputs, RUNS, one_or_many_paths("series_by", &names))
                .map_err(|e| (e.path, e.message))
        };
        // A param, a nested param, an input's param and a metrics column.
        assert_eq!(check(&["lr", "model.arch", "data.n", "full_loss"]), Ok(()));
        assert_eq!(
            check(&["data.nn"]).unwrap_err().1,
            "the `train` stages feeding `runs` have no param or metrics column `data.nn` to group \
             by; did you mean `data.n`?"
        );
        assert_eq!(
            check(&["batch-size"]),
            Err((
                "series_by".to_string(),
                "the `train` stages feeding `runs` have no param or metrics column `batch-size` \
                 to group by; did you mean `batch_size`?"
                    .to_string()
            ))
        );
        assert_eq!(check(&["lr", "model.arc"]).unwrap_err().0, "series_by[1]");
        // A param that is not a scalar labels nothing; nor does one left null.
        assert_eq!(check(&["model"]).unwrap_err().0, "series_by");
        assert_eq!(check(&["stop_loss"]).unwrap_err().0, "series_by");
        // The analysis kind checks its `series_by`.
        let params = AnalysisStage
            .resolve(&json!({"mode": "gap", "series_by": ["lr", "sed"]}))
            .unwrap()
            .params;
        assert_eq!(
            AnalysisStage
                .check_inputs(&params, &inputs)
                .unwrap_err()
                .path,
            "series_by[1]"
        );
    }

    #[test]
    fn settings_the_analysis_cannot_use_are_rejected_by_field() {
        let path = |raw: Value| AnalysisStage.resolve(&raw).map(|_| ()).map_err(|e| e.path);
        let cases = [
            (
                json!({"mode": "plateau", "window": {"last_fraction": 2.0}}),
                "window",
            ),
            (
                json!({"mode": "plateau", "window": {"from_step": -1.0}}),
                "window",
            ),
            (json!({"mode": "plateau", "level": 1.0}), "level"),
            (
                json!({"mode": "final_lambda", "protocol": {"last_k": 0}}),
                "protocol",
            ),
            (json!({"mode": "gap", "significance": 0.0}), "significance"),
            (json!({"mode": "critical_batch", "level": -0.5}), "level"),
            (json!({"mode": "catapults", "window": 0}), "window"),
            (json!({"mode": "catapults", "factor": 1.0}), "factor"),
        ];
        for (raw, field) in cases {
            assert_eq!(path(raw.clone()), Err(field.to_string()), "{raw}");
        }
        for raw in [
            json!({"mode": "plateau", "window": {"from_step": 100.0}, "level": 0.9}),
            json!({"mode": "critical_batch", "protocol": {"last_k": 3}}),
            json!({"mode": "catapults", "window": 10, "factor": 2.0}),
        ] {
            assert_eq!(path(raw.clone()), Ok(()), "{raw}");
        }
    }

    #[test]
    fn params_reject_unknown_fields_and_modes() {
        let s = AnalysisStage;
        let err = s
            .resolve(&json!({"mode": "plateau", "colum": "gni"}))
            .unwrap_err();
        assert!(err.message.contains("colum"), "{err}");
        assert!(s.resolve(&json!({"mode": "median"})).is_err());
        let ok = s
            .resolve(&json!({"mode": "final_lambda", "protocol": {"last_k": 3}}))
            .unwrap();
        assert_eq!(ok.params["column"], "lambda_max");
    }

    #[test]
    fn plateau_of_fixture_batch_sharpness_is_at_two_over_eta() {
        // Fixture batch sharpness hovers at 50 = 2/η after step 120 (noise sd 1.5).
        let (dir, r) = run_stage(&AnalysisStage, json!({"mode": "plateau"}), &fixture_runs());
        r.unwrap();
        let s = summary(dir.path());
        let (lo, hi) = (
            s["min_ratio_to_threshold"].as_f64().unwrap(),
            s["max_ratio_to_threshold"].as_f64().unwrap(),
        );
        assert!(lo > 0.95 && hi < 1.05, "{s}");
        let text = std::fs::read_to_string(dir.path().join("analysis.csv")).unwrap();
        assert_eq!(text.lines().count(), 6);
    }

    #[test]
    fn final_lambda_and_critical_batch_on_fixture_sweep() {
        let runs = fixture_runs();
        let (dir, r) = run_stage(&AnalysisStage, json!({"mode": "final_lambda"}), &runs);
        r.unwrap();
        let result: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("analysis.json")).unwrap(),
        )
        .unwrap();
        // Designed final λ: 10, 19.5, 36, 47, 51.5 (noise sd 0.3, ≤ 2 samples averaged).
        for (run, want) in result["runs"]
            .as_array()
            .unwrap()
            .iter()
            .zip([10.0, 19.5, 36.0, 47.0, 51.5])
        {
            let got = run["final"]["value"].as_f64().unwrap();
            assert!((got - want).abs() < 1.0, "{run}");
        }
        let (dir, r) = run_stage(
            &AnalysisStage,
            json!({"mode": "critical_batch", "bootstrap": 100}),
            &runs,
        );
        r.unwrap();
        let s = summary(dir.path());
        let bc = s["critical_batch"].as_f64().unwrap();
        // λ rises steeply to b = 64 (by ~11 per doubling) then flattens: the knee lies in 32..=64.
        assert!((32.0..=64.0).contains(&bc), "{s}");
    }

    #[test]
    fn gap_excludes_runs_above_threshold_and_catapult_is_found() {
        let runs = fixture_runs();
        let (dir, r) = run_stage(&AnalysisStage, json!({"mode": "gap"}), &runs);
        r.unwrap();
        let result: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("analysis.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(result["fit"]["excluded"], json!([128.0]));
        let (dir, r) = run_stage(
            &AnalysisStage,
            json!({"mode": "catapults", "window": 20}),
            &runs,
        );
        r.unwrap();
        let text = std::fs::read_to_string(dir.path().join("analysis.csv")).unwrap();
        let rows: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(rows.len(), 1, "{text}");
        assert!(rows[0].starts_with("train[batch_size=8],200,"), "{text}");
    }

    #[test]
    fn series_by_fits_each_series_on_its_own() {
        // The fixture sweep twice: once on "n = 1024", once (same metrics) on "n = 2048".
        let mut runs = fixture_runs();
        let copies: Vec<InputArtifact> = runs["runs"]
            .iter()
            .map(|a| {
                let mut a = a.clone();
                a.stage = format!("{}-2048", a.stage);
                a.upstream_params.insert("data".into(), json!({"n": 2048}));
                a
            })
            .collect();
        runs.get_mut("runs").unwrap().extend(copies);
        let (dir, r) = run_stage(&AnalysisStage, json!({"mode": "gap"}), &fixture_runs());
        r.unwrap();
        let alone = summary(dir.path())["alpha"].as_f64().unwrap();
        let params = json!({"mode": "gap", "series_by": "data.n"});
        let (dir, r) = run_stage(&AnalysisStage, params, &runs);
        r.unwrap();
        let s = summary(dir.path());
        let series = s["series"].as_array().unwrap();
        let labels: Vec<&str> = series
            .iter()
            .map(|x| x["series"].as_str().unwrap())
            .collect();
        assert_eq!(labels, ["n = 1024", "n = 2048"]);
        for x in series {
            assert_eq!(x["alpha"].as_f64().unwrap(), alone, "{s}");
        }
        let text = std::fs::read_to_string(dir.path().join("analysis.csv")).unwrap();
        assert!(text.starts_with("series,batch_size,"), "{text}");
        assert_eq!(
            text.lines().filter(|l| l.starts_with("n = 2048,")).count(),
            5
        );

        // At η = 0.2 (2/η = 10) every λ of the second series lies above 2/η: that series reports
        // its error and the first is still fitted; with no series fitted the stage fails.
        for run in runs.get_mut("runs").unwrap().iter_mut().skip(5) {
            run.params["lr"] = json!(0.2);
        }
        let params = json!({"mode": "gap", "series_by": ["data.n", "lr"]});
        let (dir, r) = run_stage(&AnalysisStage, params.clone(), &runs);
        r.unwrap();
        let s = summary(dir.path());
        assert_eq!(s["series"][0]["alpha"].as_f64().unwrap(), alone, "{s}");
        let error = s["series"][1]["error"].as_str().unwrap();
        assert!(error.contains("usable points"), "{s}");
        let mut only_failing = fixture_runs();
        for run in only_failing.get_mut("runs").unwrap().iter_mut() {
            run.params["lr"] = json!(0.2);
        }
        let (_d, r) = run_stage(&AnalysisStage, params, &only_failing);
        assert!(r.unwrap_err().to_string().contains("usable points"));
    }

    #[test]
    fn missing_column_and_mixed_lr_are_named() {
        let mut runs = fixture_runs();
        let (_d, r) = run_stage(
            &AnalysisStage,
            json!({"mode": "plateau", "column": "ias"}),
            &runs,
        );
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains("ias") && msg.contains("b8/metrics.csv"),
            "{msg}"
        );
        runs.get_mut("runs").unwrap()[1].params["lr"] = json!(0.02);
        let (_d, r) = run_stage(&AnalysisStage, json!({"mode": "gap"}), &runs);
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains("train[batch_size=16]") && msg.contains("step size"),
            "{msg}"
        );
    }

    /// Runs named `names` with `params`, on one fixture metrics table.
    fn named_runs(runs: &[(&str, Value)]) -> Vec<RunMetrics> {
        let table = MetricsTable::read(
            &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/metrics/b8/metrics.csv"),
        )
        .unwrap();
        runs.iter()
            .map(|(name, params)| RunMetrics {
                stage: name.to_string(),
                params: params.clone(),
                upstream: BTreeMap::new(),
                table: table.clone(),
            })
            .collect()
    }

    #[test]
    fn runs_without_group_params_are_labelled_by_the_swept_params_that_vary() {
        let runs = named_runs(&[
            (
                "train[batch_size=8,lr=0.04,model.arch=mlp]",
                json!({"batch_size": 8, "lr": 0.04, "model": {"arch": "mlp"}}),
            ),
            (
                "train[batch_size=32,lr=0.04,model.arch=cnn]",
                json!({"batch_size": 32, "lr": 0.04, "model": {"arch": "cnn"}}),
            ),
        ]);
        let titles: Vec<String> = group_runs(&runs, &[], "runs")
            .unwrap()
            .into_iter()
            .map(|(title, members)| {
                assert_eq!(members.len(), 1);
                title
            })
            .collect();
        assert_eq!(titles, ["b = 8, model = mlp", "b = 32, model = cnn"]);
        // A lone run of a sweep is titled by all its swept params.
        let lone = &runs[..1];
        assert_eq!(
            group_runs(lone, &[], "runs").unwrap()[0].0,
            "b = 8, η = 0.04, model = mlp"
        );
    }

    #[test]
    fn runs_that_the_swept_params_do_not_tell_apart_keep_their_instance_names() {
        // Two stages sweeping the same values, and a lone run of a stage without a sweep.
        let same = named_runs(&[
            ("train[batch_size=8]", json!({"batch_size": 8})),
            ("sde[batch_size=8]", json!({"batch_size": 8})),
        ]);
        let lone = named_runs(&[("train", json!({"batch_size": 8}))]);
        for runs in [same, lone] {
            let titles: Vec<String> = group_runs(&runs, &[], "runs")
                .unwrap()
                .into_iter()
                .map(|g| g.0)
                .collect();
            let names: Vec<String> = runs.iter().map(|r| r.stage.clone()).collect();
            assert_eq!(titles, names);
        }
    }
}
