//! The `plot` stage kind: builds a [`Figure`] from the metrics of every run of a sweep (input
//! `runs`) and writes `<stem>.png`, `<stem>.svg` and `<stem>.csv` (the tidy data drawn).
//!
//! `mode: time_series` (figures 1, 3–11, 36–44…): one panel per value of `panel_by` (or per run,
//! titled by its swept params that vary across the runs: `b = 8`), the chosen `columns` against `x`
//! in the paper's styles, `secondary` columns (losses) on a log twin axis, and the dashed 2/η,
//! which follows the run's `lr` column when it changes; with `panels`, several panels per run, each
//! drawing its own columns (figure 3), and with `instability_line` a red vertical line where a run's
//! 2/η falls below its λmax.
//! `mode: lambda_vs_batch` (figures 12–20): (a) final λ against b (on a log or, as in the paper's
//! figures 13–20, linear `batch_axis`) with 2/η and, with ≥ 4 batch sizes, the two-segment fit whose
//! knee is the critical batch size; with `log_log_level` (figures 14–15) the same λ on log-log axes
//! with a line through its steep part; then the gap 2/η − λ on log-log axes with its least-squares
//! power law. One curve per value of `series_by` (e.g. `lr`). With `fits: false` (figure 29), one
//! panel of every column's final values against b, nothing fitted.
//! `mode: alignment` (figures 23–24): the inputs are `measure` artifacts with `alignment.csv`; one
//! panel per input and statistic (pairwise dot products, cosines, squared norms), one histogram
//! (fraction of values per bin, drawn as a staircase) per checkpoint step.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::analysis::{
    check_group_by, group_runs, input_artifacts, load_runs, one_or_many, one_or_many_paths, series,
    write_json, RunMetrics, RUNS, RUNS_INPUT,
};
use super::{
    check_columns_written, resolve_typed, InputSlot, ParamError, PlannedInputs, Resolved, Stage,
    StageContext, StageError,
};
use crate::analysis::run::{final_value, FinalProtocol};
use crate::analysis::stats::trailing_mean;
use crate::analysis::sweep::{critical_batch_size, gap_power_law, level_log_log};
use crate::plot::figure::{Axis, AxisSpec, Figure, Mark, Panel, Scale, Series, Style};
use crate::plot::render::{write_png, write_svg};
use crate::plot::style::{column_style, display_name, threshold_style, CYCLE, RED};

/// What kind of figure to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PlotMode {
    /// Quantities over training steps.
    #[default]
    TimeSeries,
    /// Final λ against batch size, and the log-log gap.
    LambdaVsBatch,
    /// Histograms of per-sample model-gradient alignment from `measure` artifacts.
    Alignment,
}

fn default_stem() -> String {
    "figure".to_string()
}
fn default_columns() -> Vec<String> {
    vec![
        "step_sharpness".to_string(),
        "batch_sharpness".to_string(),
        "lambda_max".to_string(),
    ]
}
fn default_x() -> String {
    "step".to_string()
}
fn default_grid_columns() -> usize {
    3
}
fn default_true() -> bool {
    true
}
fn is_true(value: &bool) -> bool {
    *value
}
fn default_panel_size() -> (u32, u32) {
    (520, 380)
}
fn default_protocol() -> FinalProtocol {
    FinalProtocol::FinalEpoch
}
fn default_batch_axis() -> Scale {
    Scale::Log
}

/// Params of the `plot` kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlotParams {
    /// File stem of the outputs (default `figure`).
    #[serde(default = "default_stem")]
    pub stem: String,
    /// Figure title (default none).
    #[serde(default)]
    pub title: String,
    /// `time_series` (default) or `lambda_vs_batch`.
    #[serde(default)]
    pub mode: PlotMode,
    /// Left-axis metrics columns (default step sharpness, batch sharpness, λmax); for
    /// `lambda_vs_batch` the first one is the quantity (each one with `fits: false`).
    #[serde(default = "default_columns")]
    pub columns: Vec<String>,
    /// Right-axis (log) columns, e.g. `[loss]` (default none).
    #[serde(default)]
    pub secondary: Vec<String>,
    /// x column (default `step`).
    #[serde(default = "default_x")]
    pub x: String,
    /// Param(s) grouping runs into panels (e.g. `batch_size`); default one panel per run. A
    /// dotted path reaches into params (`model.arch`) or, through an input slot of the runs, into
    /// the params of their inputs (`data.n`).
    #[serde(default, deserialize_with = "one_or_many")]
    pub panel_by: Vec<String>,
    /// Param(s) grouping runs into curves in `lambda_vs_batch` (e.g. `lr`, or
    /// `[model.arch, lr]`); default one curve.
    #[serde(default, deserialize_with = "one_or_many")]
    pub series_by: Vec<String>,
    /// Panels per row (default 3).
    #[serde(default = "default_grid_columns")]
    pub grid_columns: usize,
    /// Panel size in pixels (default 520 × 380).
    #[serde(default = "default_panel_size")]
    pub panel_size: (u32, u32),
    /// Draw the dashed 2/η (default true).
    #[serde(default = "default_true")]
    pub threshold: bool,
    /// A dashed horizontal line at this left-axis level across each panel, for quantities whose
    /// threshold is not 2/η (e.g. 1 for the second-moment contraction of eq. 37); default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<f64>,
    /// Log scale on the left y axis (default false).
    #[serde(default)]
    pub log_y: bool,
    /// Log scale on the right y axis (default true, for losses; e.g. false for the Hessian trace).
    #[serde(default = "default_true")]
    pub log_secondary: bool,
    /// Final-value protocol for `lambda_vs_batch` (default `final_epoch`).
    #[serde(default = "default_protocol")]
    pub protocol: FinalProtocol,
    /// Scale of the batch-size axis of `lambda_vs_batch`'s first panel: `log` (default) or
    /// `linear` (the paper's figures 13–20).
    #[serde(default = "default_batch_axis")]
    pub batch_axis: Scale,
    /// `lambda_vs_batch`: add a panel of the final λ against b on log-log axes with a line fitted
    /// through its steep part, up to the critical batch size (the paper's figures 14–15; default
    /// false).
    #[serde(default)]
    pub log_log_level: bool,
    /// `time_series`: the panels drawn for each run (or `panel_by` group), each with its own
    /// `columns` and optional `title`, `secondary`, `threshold`, `reference` and `log_y` (else the
    /// plot's), e.g. a run's GNI, iterate and loss side by side (figure 3); default one panel of
    /// the plot's `columns` and `secondary`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub panels: Vec<PanelSpec>,
    /// `time_series`: a red vertical line in each panel at the first x where a run's 2/η falls
    /// below its `lambda_max` (η crosses 2/λmax: the red line of figure 3); default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub instability_line: bool,
    /// `lambda_vs_batch`: fit the two-segment knee and the gap's power law, and draw the gap panel
    /// (default true; the first column only). `false` draws every column's final values against b
    /// in one panel, fits left out (figure 29: quantities whose level does not depend on b).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub fits: bool,
    /// Trailing moving average per `time_series` column, over that many measured rows, e.g.
    /// `{loss: 50}` for the spiky mini-batch loss (default none; the CSV gets what is drawn).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub smooth: BTreeMap<String, usize>,
}

/// One panel of a `time_series` plot's `panels`: what it draws, the rest taken from the plot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PanelSpec {
    /// Panel title (default: the run's or group's title).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Left-axis columns.
    #[serde(default)]
    pub columns: Vec<String>,
    /// Right-axis columns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secondary: Vec<String>,
    /// Draw the dashed 2/η here (default: the plot's `threshold`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<bool>,
    /// A dashed level here (default: the plot's `reference`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<f64>,
    /// Log left axis here (default: the plot's `log_y`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_y: Option<bool>,
}

impl PanelSpec {
    /// The plot's params as this panel draws them (its title aside).
    fn apply(&self, params: &PlotParams) -> PlotParams {
        PlotParams {
            columns: self.columns.clone(),
            secondary: self.secondary.clone(),
            threshold: self.threshold.unwrap_or(params.threshold),
            reference: self.reference.or(params.reference),
            log_y: self.log_y.unwrap_or(params.log_y),
            ..params.clone()
        }
    }
}

/// `(field[i], column)` for each column a list field names.
fn indexed<'a>(field: &str, columns: &'a [String]) -> impl Iterator<Item = (String, &'a str)> {
    let field = field.to_string();
    columns
        .iter()
        .enumerate()
        .map(move |(i, column)| (format!("{field}[{i}]"), column.as_str()))
}

/// The `plot` stage kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlotStage;

/// The 2/η line of a run as a step function over `x`, following its `lr` column.
fn threshold_points(run: &RunMetrics, x: &str) -> Result<Vec<(f64, f64)>, StageError> {
    let pts = run
        .table
        .pairs(x, "lr")
        .map_err(|e| StageError::input(RUNS, e))?;
    let mut out: Vec<(f64, f64)> = Vec::new();
    for (i, &(xv, lr)) in pts.iter().enumerate() {
        let y = 2.0 / lr;
        let changed = out.last().is_none_or(|p| p.1 != y);
        if changed {
            if let Some(&(_, prev)) = out.last() {
                out.push((xv, prev));
            }
            out.push((xv, y));
        } else if i == pts.len() - 1 {
            out.push((xv, y));
        }
    }
    Ok(out)
}

/// The value at `x` of a step function given by its sorted corner points (the last point at or
/// before `x`), `None` before its first point.
fn step_value(line: &[(f64, f64)], x: f64) -> Option<f64> {
    line.iter().take_while(|p| p.0 <= x).last().map(|p| p.1)
}

/// The panels of a `time_series` plot: per run or `panel_by` group, one panel, or one per entry
/// of `panels` (titled by the entry, prefixed by the group when there are several).
fn time_series(params: &PlotParams, runs: &[RunMetrics]) -> Result<Vec<Panel>, StageError> {
    let groups = group_runs(runs, &params.panel_by, RUNS)?;
    let views: Vec<(Option<&String>, PlotParams)> = if params.panels.is_empty() {
        vec![(None, params.clone())]
    } else {
        params
            .panels
            .iter()
            .map(|spec| (spec.title.as_ref(), spec.apply(params)))
            .collect()
    };
    let mut panels = Vec::new();
    for (group, members) in &groups {
        for (title, view) in &views {
            let title = match title {
                Some(title) if groups.len() == 1 => title.to_string(),
                Some(title) => format!("{group}: {title}"),
                None => group.clone(),
            };
            panels.push(time_series_panel(view, title, members)?);
        }
    }
    Ok(panels)
}

/// The first x at which a run's 2/η lies below its `lambda_max` (`None` if never, or if it has
/// no `lambda_max` values).
fn instability_x(run: &RunMetrics, x: &str) -> Result<Option<f64>, StageError> {
    if !run.table.has("lambda_max") {
        return Ok(None);
    }
    let thresholds = threshold_points(run, x)?;
    let lambdas = run
        .table
        .pairs(x, "lambda_max")
        .map_err(|e| StageError::input(RUNS, e))?;
    Ok(lambdas
        .into_iter()
        .find(|&(xv, l)| step_value(&thresholds, xv).is_some_and(|t| t < l))
        .map(|p| p.0))
}

/// The red vertical lines of `instability_line`: one at each distinct [`instability_x`] of the
/// panel's runs, spanning the left-axis range of the panel's `series` (lines only: dots may hold
/// outliers the axis leaves out).
fn instability_lines(
    params: &PlotParams,
    members: &[&RunMetrics],
    series: &[Series],
) -> Result<Vec<Series>, StageError> {
    let mut marks: Vec<f64> = Vec::new();
    for &run in members {
        if let Some(x) = instability_x(run, &params.x)? {
            if !marks.contains(&x) {
                marks.push(x);
            }
        }
    }
    let ys = series
        .iter()
        .filter(|s| s.axis == Axis::Left && s.style.mark != Mark::Dots)
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|&y| y.is_finite() && (!params.log_y || y > 0.0));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
        (lo.min(y), hi.max(y))
    });
    if lo > hi {
        return Ok(Vec::new());
    }
    Ok(marks
        .into_iter()
        .map(|x| Series {
            name: "η > 2/λmax".to_string(),
            style: Style {
                color: RED,
                mark: Mark::Line,
            },
            axis: Axis::Left,
            points: vec![(x, lo), (x, hi)],
        })
        .collect())
}

/// One `time_series` panel of `members`. Runs in one panel (e.g. a `train` run and the `measure`
/// stages on its checkpoints) each contribute the columns they have values for (a column no run
/// of the panel has is an error); a series names its run only when several runs in the panel draw
/// the same column, and a 2/η line equal to one already drawn is drawn once.
fn time_series_panel(
    params: &PlotParams,
    title: String,
    members: &[&RunMetrics],
) -> Result<Panel, StageError> {
    let columns: Vec<(&String, Axis)> = params
        .columns
        .iter()
        .map(|c| (c, Axis::Left))
        .chain(params.secondary.iter().map(|c| (c, Axis::Right)))
        .collect();
    let suffix = |run: &RunMetrics, shared: bool| {
        if shared {
            format!(" ({})", run.stage)
        } else {
            String::new()
        }
    };
    let mut series = Vec::new();
    if params.threshold {
        let mut lines: Vec<(&RunMetrics, Vec<(f64, f64)>)> = Vec::new();
        for &run in members {
            let points = threshold_points(run, &params.x)?;
            let covered = lines
                .iter()
                .any(|(_, line)| points.iter().all(|&(x, y)| step_value(line, x) == Some(y)));
            if !points.is_empty() && !covered {
                lines.push((run, points));
            }
        }
        let shared = lines.len() > 1;
        for (run, points) in lines {
            series.push(Series {
                name: format!("2/η{}", suffix(run, shared)),
                style: threshold_style(),
                axis: Axis::Left,
                points,
            });
        }
    }
    let mut measured = false;
    for (ci, &(column, axis)) in columns.iter().enumerate() {
        // A column missing from every run of the panel is an error (a typo); from some, not.
        if !members.iter().any(|r| r.table.has(column)) {
            members[0]
                .table
                .column(column)
                .map_err(|e| StageError::input(RUNS, e))?;
        }
        let mut drawn = Vec::new();
        for &run in members.iter().filter(|r| r.table.has(column)) {
            let points = run
                .table
                .pairs(&params.x, column)
                .map_err(|e| StageError::input(RUNS, e))?;
            if !points.is_empty() {
                drawn.push((run, points));
            }
        }
        measured |= !drawn.is_empty();
        let shared = drawn.len() > 1;
        for (k, (run, mut points)) in drawn.into_iter().enumerate() {
            let mut style = column_style(column, ci);
            if k > 0 {
                style.color = CYCLE[(k + ci) % CYCLE.len()];
            }
            let mut name = display_name(column);
            if let Some(&window) = params.smooth.get(column.as_str()) {
                let ys: Vec<f64> = points.iter().map(|p| p.1).collect();
                for (p, y) in points.iter_mut().zip(trailing_mean(&ys, window)) {
                    p.1 = y;
                }
                name = format!("{name}, mean of {window}");
            }
            series.push(Series {
                name: format!("{name}{}", suffix(run, shared)),
                style,
                axis,
                points,
            });
        }
    }
    if !measured {
        // Only reference lines would be drawn: the quantities were not measured in these runs.
        let names: Vec<&str> = columns.iter().map(|(c, _)| c.as_str()).collect();
        let stages: Vec<&str> = members.iter().map(|r| r.stage.as_str()).collect();
        return Err(StageError::input(
            RUNS,
            format!(
                "panel `{title}`: no value of {} in {} (a quantity must be measured, e.g. in the \
                 run's `measure:`, to be plotted)",
                names.join(", "),
                stages.join(", ")
            ),
        ));
    }
    if let Some(level) = params.reference {
        let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
        if lo <= hi {
            series.push(Series {
                name: format!("threshold {level}"),
                style: threshold_style(),
                axis: Axis::Left,
                points: vec![(lo, level), (hi, level)],
            });
        }
    }
    if params.instability_line {
        let lines = instability_lines(params, members, &series)?;
        series.extend(lines);
    }
    let y_label = if params.columns.len() == 1 {
        display_name(&params.columns[0])
    } else {
        "sharpness".to_string()
    };
    Ok(Panel {
        title,
        x: AxisSpec::linear(&params.x),
        y: if params.log_y {
            AxisSpec::log(&y_label)
        } else {
            AxisSpec::linear(&y_label)
        },
        y2: (!params.secondary.is_empty()).then(|| {
            let label = if params.secondary.len() == 1 {
                display_name(&params.secondary[0])
            } else if params.secondary.iter().any(|c| c.ends_with("accuracy")) {
                "loss, accuracy".to_string()
            } else {
                "loss".to_string()
            };
            if params.log_secondary {
                AxisSpec::log(&label)
            } else {
                AxisSpec::linear(&label)
            }
        }),
        series,
    })
}

/// A fitted curve `predict(b)`, dashed in its curve's colour, on 41 log-spaced batch sizes over
/// `(lo, hi)`.
fn fitted_curve(
    name: String,
    color: (u8, u8, u8),
    (lo, hi): (f64, f64),
    predict: impl Fn(f64) -> f64,
) -> Series {
    Series {
        name,
        style: Style {
            color,
            mark: Mark::Dashed,
        },
        axis: Axis::Left,
        points: (0..=40)
            .map(|i| lo * (hi / lo).powf(i as f64 / 40.0))
            .map(|b| (b, predict(b)))
            .collect(),
    }
}

/// The dashed 2/η lines of a `lambda_vs_batch` panel from each curve's `(lr, bmin, bmax)`: one
/// line per distinct step size, spanning every curve that has it, named by η only when they differ.
fn threshold_lines(curves: &[(f64, f64, f64)]) -> Vec<Series> {
    let mut lines: Vec<(f64, f64, f64)> = Vec::new();
    for &(lr, lo, hi) in curves {
        match lines.iter_mut().find(|l| l.0 == lr) {
            Some(line) => *line = (lr, line.1.min(lo), line.2.max(hi)),
            None => lines.push((lr, lo, hi)),
        }
    }
    let named = lines.len() > 1;
    lines
        .into_iter()
        .map(|(lr, lo, hi)| Series {
            name: if named {
                format!("2/η (η = {lr})")
            } else {
                "2/η".to_string()
            },
            style: threshold_style(),
            axis: Axis::Left,
            points: vec![(lo, 2.0 / lr), (hi, 2.0 / lr)],
        })
        .collect()
}

fn lambda_vs_batch(
    params: &PlotParams,
    runs: &[RunMetrics],
) -> Result<(Vec<Panel>, Value), StageError> {
    let column = params.columns.first().ok_or_else(|| {
        StageError::Failed(
            "params.columns: lambda_vs_batch needs the quantity as the first column".into(),
        )
    })?;
    // With fits, the first column; without, one curve per column (and per `series_by` group).
    let quantities = if params.fits {
        &params.columns[..1]
    } else {
        &params.columns[..]
    };
    let mut level = Vec::new();
    let mut level_log = Vec::new();
    let mut gap = Vec::new();
    let mut fits = Vec::new();
    let mut thresholds = Vec::new();
    // Without `series_by`, the whole sweep is one curve.
    let curves = series(runs, &params.series_by, RUNS)?;
    let pairs = quantities
        .iter()
        .flat_map(|column| curves.iter().map(move |curve| (column, curve)));
    for (gi, (column, (label, members))) in pairs.enumerate() {
        let name = display_name(column);
        let color = if quantities.len() > 1 && params.series_by.is_empty() {
            column_style(column, gi).color
        } else {
            CYCLE[gi % CYCLE.len()]
        };
        let suffix = if !params.series_by.is_empty() {
            format!(" ({label})")
        } else {
            String::new()
        };
        let mut points = Vec::new();
        let mut lrs = Vec::new();
        for run in members {
            let v = final_value(&run.table, column, params.protocol)
                .map_err(|e| StageError::input(RUNS, e))?;
            points.push((run.require("batch_size", RUNS)?, v.value));
            lrs.push(run.require("lr", RUNS)?);
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let lr = lrs[0];
        if lrs.iter().any(|&l| l != lr) {
            return Err(StageError::input(
                RUNS,
                format!("curve `{label}` mixes step sizes; set `series_by: lr`"),
            ));
        }
        let (bmin, bmax) = (points[0].0, points[points.len() - 1].0);
        let finals = Series {
            name: format!("final {name}{suffix}"),
            style: Style {
                color,
                mark: Mark::LineDots,
            },
            axis: Axis::Left,
            points: points.clone(),
        };
        thresholds.push((lr, bmin, bmax));
        let mut curve = json!({"quantity": column, "curve": label, "lr": lr, "points": points});
        if !params.fits {
            level.push(finals);
            fits.push(curve);
            continue;
        }
        level_log.push(finals.clone());
        level.push(finals);
        // The figure shows the point estimate; the `analysis` kind gives its interval.
        let knee = critical_batch_size(&points, 0, 0.95, 0).ok();
        if let Some(k) = &knee {
            level.push(fitted_curve(
                format!("two-segment fit, b_c ≈ {:.0}{suffix}", k.critical_batch),
                color,
                (bmin, bmax),
                |b| k.predict(b),
            ));
        }
        let steep = level_log_log(&points, knee.as_ref()).ok();
        if let Some(s) = &steep {
            level_log.push(fitted_curve(
                format!("log-log fit, slope {:.2}{suffix}", s.line.slope),
                color,
                (s.used[0].0, s.used[s.used.len() - 1].0),
                |b| s.line.predict(b),
            ));
        }
        let power = gap_power_law(&points, lr).ok();
        gap.push(Series {
            name: format!("2/η − {name}{suffix}"),
            style: Style {
                color,
                mark: Mark::LineDots,
            },
            axis: Axis::Left,
            points: points
                .iter()
                .map(|&(b, l)| (b, 2.0 / lr - l))
                .filter(|p| p.1 > 0.0)
                .collect(),
        });
        if let Some(p) = &power {
            gap.push(fitted_curve(
                format!("power law, α = {:.2}{suffix}", p.alpha),
                color,
                (bmin, bmax),
                |b| p.predict(b),
            ));
        }
        curve["critical_batch"] = json!(knee);
        curve["power_law"] = json!(power);
        curve["log_log_level"] = json!(steep);
        fits.push(curve);
    }
    if params.threshold {
        let lines = threshold_lines(&thresholds);
        level_log.extend(lines.iter().cloned());
        level.extend(lines);
    }
    let name = display_name(column);
    let (title, y_label) = match (params.fits, quantities.len()) {
        (true, _) => (format!("(a) final {name} vs batch size"), name.clone()),
        (false, 1) => (format!("final {name} vs batch size"), name.clone()),
        (false, _) => ("final values vs batch size".into(), "final value".into()),
    };
    let mut panels = vec![Panel {
        title,
        x: AxisSpec {
            label: "batch size b".to_string(),
            scale: params.batch_axis,
        },
        y: AxisSpec::linear(&y_label),
        y2: None,
        series: level,
    }];
    if params.fits && params.log_log_level {
        panels.push(Panel {
            title: format!("(b) final {name} (log-log)"),
            x: AxisSpec::log("batch size b"),
            y: AxisSpec::log(&name),
            y2: None,
            series: level_log,
        });
    }
    if params.fits {
        panels.push(Panel {
            title: format!(
                "({}) gap 2/η − {name} (log-log)",
                if params.log_log_level { 'c' } else { 'b' }
            ),
            x: AxisSpec::log("batch size b"),
            y: AxisSpec::log(&format!("2/η − {name}")),
            y2: None,
            series: gap,
        });
    }
    Ok((panels, json!({ "curves": fits })))
}

/// One row of a `measure` artifact's `alignment.csv`.
#[derive(Debug, Deserialize)]
struct AlignmentRow {
    step: u64,
    statistic: String,
    bin_lo: f64,
    bin_hi: f64,
    count: u64,
}

/// The alignment panels: per input and statistic, one staircase histogram per step.
fn alignment(ctx: &StageContext) -> Result<Vec<Panel>, StageError> {
    let inputs = input_artifacts(ctx, RUNS)?;
    let mut panels = Vec::new();
    for input in inputs {
        let path = input.file("alignment.csv");
        let bad =
            |message: String| StageError::input(RUNS, format!("{}: {message}", path.display()));
        let mut reader = csv::Reader::from_path(&path).map_err(|e| {
            bad(format!(
                "{e} (is `{}` a measure stage with `alignment:`?)",
                input.stage
            ))
        })?;
        let rows: Vec<AlignmentRow> = reader
            .deserialize()
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        for (statistic, label, axis) in [
            ("dots", "⟨∇f_i, ∇f_j⟩, i ≠ j", "dot product"),
            ("cosines", "cos(∇f_i, ∇f_j), i ≠ j", "cosine"),
            ("sq_norms", "‖∇f_i‖²", "squared norm"),
        ] {
            let mut by_step: BTreeMap<u64, Vec<&AlignmentRow>> = BTreeMap::new();
            for r in rows.iter().filter(|r| r.statistic == statistic) {
                by_step.entry(r.step).or_default().push(r);
            }
            let series = by_step
                .iter()
                .enumerate()
                .map(|(i, (step, bins))| {
                    let total = bins.iter().map(|b| b.count).sum::<u64>().max(1) as f64;
                    let points = bins
                        .iter()
                        .filter(|b| b.bin_lo.is_finite() && b.bin_hi.is_finite())
                        .flat_map(|b| {
                            let y = b.count as f64 / total;
                            [(b.bin_lo, y), (b.bin_hi, y)]
                        })
                        .collect();
                    Series {
                        name: format!("step {step}"),
                        style: Style {
                            color: CYCLE[i % CYCLE.len()],
                            mark: Mark::Line,
                        },
                        axis: Axis::Left,
                        points,
                    }
                })
                .collect();
            let title = if inputs.len() > 1 {
                format!("{label} ({})", input.stage)
            } else {
                label.to_string()
            };
            panels.push(Panel {
                title,
                x: AxisSpec::linear(axis),
                y: AxisSpec::linear("fraction"),
                y2: None,
                series,
            });
        }
    }
    Ok(panels)
}

impl Stage for PlotStage {
    fn kind(&self) -> &'static str {
        "plot"
    }

    fn version(&self, _params: &serde_json::Value) -> u32 {
        // 2: round tick values (1-2-5 steps, 1-2-5 multiples of decades on log axes).
        // 3: dashed legend entries for dashed lines.
        // 4: titles shrink to fit the canvas.
        // 5: the mini-batch loss in light grey, the full-batch loss in grey.
        // 6: runs sharing a panel merge their columns (2/η once, run names only where needed);
        //    legends go to the corner with the least data.
        // 7: names for the second-moment contraction and gradient-norm columns.
        // 8: `lambda_vs_batch` draws one 2/η per step size and each fit in its curve's colour.
        // 9: the legend box is sized from its entries; with no free corner the y axes get headroom.
        // 10: without `panel_by`, panels are titled by the swept params that vary (`b = 8`).
        // 11: names for the accuracy columns; a right axis holding accuracies says so.
        // 12: a few outlying dots (above a series' 99th percentile) no longer set the axis range.
        // 13: lines split at their sharp turns (no spikes in PNGs); a name for `gni_windowed`; a
        //     lone run's panel titled by all its swept params.
        // 14: `lambda_vs_batch` takes `batch_axis` and `log_log_level`; its data JSON has the
        //     log-log line of each curve.
        // 15: a linear axis gets at least four ticks.
        // 16: a log axis under a decade gets at least three.
        // 17: `lambda_vs_batch` names each curve's quantity in its data JSON (`fits: false`).
        // 18: a log axis reaching beyond [0.01, 10⁴) labels its ticks as powers of ten.
        18
    }

    fn resolve(&self, params: &Value) -> Result<Resolved, ParamError> {
        let (p, canonical) = resolve_typed::<PlotParams>(params)?;
        let stem_ok = !p.stem.is_empty()
            && p.stem
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !p.stem.starts_with('.');
        if !stem_ok {
            return Err(ParamError {
                path: "stem".into(),
                message: format!(
                    "`{}` must be a plain file name stem ([A-Za-z0-9_.-])",
                    p.stem
                ),
            });
        }
        let drawn = |c: &String| {
            p.columns.contains(c)
                || p.secondary.contains(c)
                || p.panels
                    .iter()
                    .any(|panel| panel.columns.contains(c) || panel.secondary.contains(c))
        };
        if p.log_log_level && !p.fits {
            return Err(ParamError {
                path: "log_log_level".into(),
                message: "draws a fitted line, which `fits: false` leaves out".into(),
            });
        }
        let nothing_drawn = match p.mode {
            PlotMode::LambdaVsBatch => p.columns.is_empty(),
            PlotMode::TimeSeries => {
                p.panels.is_empty() && p.columns.is_empty() && p.secondary.is_empty()
            }
            PlotMode::Alignment => false,
        };
        if nothing_drawn {
            return Err(ParamError {
                path: "columns".into(),
                message: "names no column to draw (`columns`, or `secondary` for a time series)"
                    .into(),
            });
        }
        if let Some(i) = p
            .panels
            .iter()
            .position(|panel| panel.columns.is_empty() && panel.secondary.is_empty())
        {
            return Err(ParamError {
                path: format!("panels[{i}].columns"),
                message: "a panel needs at least one column (`columns` or `secondary`)".into(),
            });
        }
        if let Some(message) = p.protocol.error() {
            return Err(ParamError {
                path: "protocol".into(),
                message,
            });
        }
        if let Some(column) = p.smooth.iter().find_map(|(c, &w)| (w == 0).then_some(c)) {
            return Err(ParamError {
                path: format!("smooth.{column}"),
                message: "a moving average needs a window of at least 1 row".into(),
            });
        }
        if let Some(column) = p.smooth.keys().find(|c| !drawn(c)) {
            return Err(ParamError {
                path: format!("smooth.{column}"),
                message: "smooths a column that `columns` and `secondary` do not draw".into(),
            });
        }
        if p.grid_columns == 0 || p.panel_size.0 < 100 || p.panel_size.1 < 100 {
            return Err(ParamError {
                path: "grid_columns".into(),
                message: "grid_columns must be ≥ 1 and panel_size at least 100 × 100".into(),
            });
        }
        Ok(Resolved::cpu(canonical))
    }

    fn inputs(&self) -> &'static [InputSlot] {
        RUNS_INPUT
    }

    /// Every column the plot draws (`x`, `columns`, `secondary`, or each panel's) is written by
    /// some run, and every run has what `panel_by` and `series_by` name (alignment histograms read
    /// neither).
    fn check_inputs(&self, params: &Value, inputs: &PlannedInputs<'_>) -> Result<(), ParamError> {
        let (p, _) = resolve_typed::<PlotParams>(params)?;
        let x = ("x".to_string(), p.x.as_str());
        let drawn: Vec<(String, &str)> = match p.mode {
            PlotMode::Alignment => return Ok(()),
            PlotMode::LambdaVsBatch => {
                let quantities = if p.fits {
                    p.columns.get(..1).unwrap_or(&[])
                } else {
                    &p.columns[..]
                };
                indexed("columns", quantities).collect()
            }
            PlotMode::TimeSeries if p.panels.is_empty() => std::iter::once(x)
                .chain(indexed("columns", &p.columns))
                .chain(indexed("secondary", &p.secondary))
                .collect(),
            PlotMode::TimeSeries => {
                let panels = p.panels.iter().enumerate().flat_map(|(i, panel)| {
                    indexed(&format!("panels[{i}].columns"), &panel.columns)
                        .chain(indexed(&format!("panels[{i}].secondary"), &panel.secondary))
                        .collect::<Vec<_>>()
                });
                std::iter::once(x).chain(panels).collect()
            }
        };
        check_columns_written(inputs, RUNS, drawn)?;
        let group_by = one_or_many_paths("panel_by", &p.panel_by)
            .into_iter()
            .chain(one_or_many_paths("series_by", &p.series_by));
        check_group_by(inputs, RUNS, group_by)
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let params: PlotParams = ctx.typed_params()?;
        let (panels, extra) = match params.mode {
            PlotMode::TimeSeries => (time_series(&params, &load_runs(ctx, RUNS)?)?, json!({})),
            PlotMode::LambdaVsBatch => lambda_vs_batch(&params, &load_runs(ctx, RUNS)?)?,
            PlotMode::Alignment => (alignment(ctx)?, json!({})),
        };
        let figure = Figure {
            title: params.title.clone(),
            columns: params.grid_columns,
            panel_size: params.panel_size,
            panels,
        };
        let out = |ext: &str| ctx.work_dir.join(format!("{}.{ext}", params.stem));
        let fail = |e: crate::plot::PlotError| StageError::Failed(e.to_string());
        figure.write_csv(&out("csv")).map_err(fail)?;
        write_png(&figure, &out("png")).map_err(fail)?;
        write_svg(&figure, &out("svg")).map_err(fail)?;
        let points: BTreeMap<&str, usize> = figure
            .panels
            .iter()
            .map(|p| {
                (
                    p.title.as_str(),
                    p.series.iter().map(|s| s.points.len()).sum(),
                )
            })
            .collect();
        write_json(
            &ctx.work_dir.join("summary.json"),
            &json!({"panels": figure.panels.len(), "points": points, "fits": extra}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::analysis::test_support::{fixture_runs, run_stage};
    use super::*;
    use crate::analysis::metrics::MetricsTable;
    use crate::stages::InputArtifact;

    #[test]
    fn drawn_columns_must_be_written_by_some_run() {
        use crate::stages::{dataset::DatasetStage, quadratic::QuadraticStage, train::TrainStage};
        use crate::stages::{PlannedInput, PlannedInputs};
        let train = json!({});
        let quadratic = json!({});
        let check = |raw: Value, runs: Vec<PlannedInput>| {
            let params = PlotStage.resolve(&raw).unwrap().params;
            let inputs = PlannedInputs::from([(RUNS.to_string(), runs)]);
            PlotStage
                .check_inputs(&params, &inputs)
                .map_err(|e| (e.path, e.message))
        };
        let trained = || vec![PlannedInput::of(&TrainStage, &train)];
        assert_eq!(check(json!({"secondary": ["loss"]}), trained()), Ok(()));
        assert_eq!(
            check(json!({"columns": ["gni", "lamda_max"]}), trained()),
            Err((
                "columns[1]".to_string(),
                "no stage feeding `runs` writes a column `lamda_max`; did you mean `lambda_max`?"
                    .to_string()
            ))
        );
        let far = check(json!({"x": "epoch", "secondary": ["zzz"]}), trained()).unwrap_err();
        assert_eq!(far.0, "secondary[0]");
        assert!(far.1.contains("the columns are step, epoch,"), "{}", far.1);
        assert_eq!(check(json!({"x": "time"}), trained()).unwrap_err().0, "x");
        // Each panel's columns, not the plot's defaults (the quadratic has no step sharpness).
        let panels = json!({"panels": [{"columns": ["lr"]}, {"columns": ["gni_windowed"], "secondary": ["x", "los"]}]});
        let quadratic_run = || vec![PlannedInput::of(&QuadraticStage, &quadratic)];
        assert_eq!(
            check(panels, quadratic_run()).unwrap_err().0,
            "panels[1].secondary[1]"
        );
        assert_eq!(
            check(
                json!({"panels": [{"columns": ["gni_windowed"]}]}),
                quadratic_run()
            ),
            Ok(())
        );
        // A column written by one run of several is enough; the other may lack it.
        let both = vec![
            PlannedInput::of(&TrainStage, &train),
            PlannedInput::of(&QuadraticStage, &quadratic),
        ];
        assert_eq!(check(json!({"columns": ["gni_windowed"]}), both), Ok(()));
        // `lambda_vs_batch` with fits reads its first column only.
        let vs_b = json!({"mode": "lambda_vs_batch", "columns": ["lambda_max", "extra"]});
        assert_eq!(check(vs_b, trained()), Ok(()));
        // Unknown headers are left to the run: a kind that declares none, another named output,
        // and the alignment histograms.
        let data = json!({});
        let undeclared = vec![PlannedInput::of(&DatasetStage, &data)];
        assert_eq!(check(json!({"columns": ["anything"]}), undeclared), Ok(()));
        let other_output = vec![PlannedInput {
            output: Some("alignment.csv"),
            ..PlannedInput::of(&TrainStage, &train)
        }];
        assert_eq!(
            check(json!({"columns": ["anything"]}), other_output),
            Ok(())
        );
        assert_eq!(check(json!({"mode": "alignment"}), trained()), Ok(()));
        // What `panel_by` and `series_by` name must label every run.
        assert_eq!(check(json!({"panel_by": "batch_size"}), trained()), Ok(()));
        assert_eq!(
            check(json!({"panel_by": ["lr", "batch"]}), trained())
                .unwrap_err()
                .0,
            "panel_by[1]"
        );
        let vs_b = json!({"mode": "lambda_vs_batch", "series_by": "step_size"});
        assert_eq!(check(vs_b, trained()).unwrap_err().0, "series_by");
        assert_eq!(
            check(
                json!({"mode": "alignment", "panel_by": "anything"}),
                trained()
            ),
            Ok(())
        );
    }

    fn count_green(png: &std::path::Path) -> usize {
        let img = image::open(png).unwrap().to_rgb8();
        img.pixels().filter(|p| p.0 == [34, 139, 34]).count()
    }

    /// A temporary run directory holding `csv` as its metrics.
    fn metrics_dir(csv: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metrics.csv"), csv).unwrap();
        dir
    }

    /// The first fixture runs (b = 8, 16, …), one per entry of `csvs`, reading it as their
    /// metrics; keep the directories alive while the inputs are used.
    fn runs_with_metrics(
        csvs: &[&str],
    ) -> (BTreeMap<String, Vec<InputArtifact>>, Vec<tempfile::TempDir>) {
        let mut inputs = fixture_runs();
        let runs = inputs.get_mut("runs").unwrap();
        runs.truncate(csvs.len());
        let dirs: Vec<_> = csvs.iter().map(|csv| metrics_dir(csv)).collect();
        for (run, dir) in runs.iter_mut().zip(&dirs) {
            run.dir = dir.path().to_path_buf();
        }
        (inputs, dirs)
    }

    #[test]
    fn time_series_grid_writes_png_svg_and_matching_csv() {
        let runs = fixture_runs();
        let params = json!({"panel_by": "batch_size", "secondary": ["loss"], "stem": "fig1"});
        let (dir, r) = run_stage(&PlotStage, params, &runs);
        r.unwrap();
        let png = dir.path().join("fig1.png");
        let img = image::open(&png).unwrap();
        assert_eq!((img.width(), img.height()), (3 * 520, 2 * 380));
        assert!(count_green(&png) > 200, "batch sharpness line not drawn");
        let svg = std::fs::read_to_string(dir.path().join("fig1.svg")).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("Batch Sharpness") && svg.contains("b = 8")
        );
        // The CSV holds exactly the measured points of each plotted column plus two threshold
        // points per run (constant lr), counted here straight from the fixture files.
        let text = std::fs::read_to_string(dir.path().join("fig1.csv")).unwrap();
        let mut expected = 0;
        for run in &runs["runs"] {
            let t = MetricsTable::read(&run.dir.join("metrics.csv")).unwrap();
            for c in ["step_sharpness", "batch_sharpness", "lambda_max", "loss"] {
                expected += t.column(c).unwrap().iter().filter(|v| v.is_some()).count();
            }
            expected += 2;
        }
        assert_eq!(text.lines().count(), expected + 1);
        assert!(
            text.contains("b = 32,Batch Sharpness,left,10,"),
            "{}",
            &text[..200]
        );
    }

    #[test]
    fn runs_sharing_a_panel_merge_their_columns() {
        // A train run and a measure-like run on its checkpoints: λmax at two of them, the Hessian
        // trace (a column the train run lacks) at three.
        let mut inputs = fixture_runs();
        let runs = inputs.get_mut("runs").unwrap();
        runs.truncate(1);
        let measured = metrics_dir(
            "step,epoch,lr,batch_size,loss,lambda_max,batch_sharpness,hessian_trace\n\
             10,,0.04,8,,3.5,,700\n20,,0.04,8,,,,800\n30,,0.04,8,,4.5,,900\n",
        );
        let mut measure = runs[0].clone();
        measure.stage = "trace[batch_size=8]".into();
        measure.dir = measured.path().to_path_buf();
        runs.push(measure);
        let params = json!({"panel_by": "batch_size", "secondary": ["hessian_trace"]});
        let (dir, r) = run_stage(&PlotStage, params, &inputs);
        r.unwrap();
        let text = std::fs::read_to_string(dir.path().join("figure.csv")).unwrap();
        let names: std::collections::BTreeSet<&str> = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap())
            .collect();
        let expected = [
            "2/η",
            "Batch Sharpness",
            "Hessian trace",
            "Step Sharpness",
            "λmax (trace[batch_size=8])",
            "λmax (train[batch_size=8])",
        ];
        assert_eq!(names, expected.into_iter().collect());
        assert_eq!(text.matches(",Hessian trace,right,").count(), 3);

        let params = json!({"panel_by": "batch_size", "threshold": false, "reference": 1.0});
        let (dir, r) = run_stage(&PlotStage, params, &inputs);
        r.unwrap();
        let text = std::fs::read_to_string(dir.path().join("figure.csv")).unwrap();
        assert!(!text.contains("2/η"));
        // The reference line spans the x range of what else is drawn, at its level.
        let (mut reference, mut xs) = (Vec::new(), Vec::new());
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            let (x, y): (f64, f64) = (f[3].parse().unwrap(), f[4].parse().unwrap());
            if f[1] == "threshold 1" {
                reference.push((x, y));
            } else {
                xs.push(x);
            }
        }
        let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert!(lo < hi);
        assert_eq!(reference, [(lo, 1.0), (hi, 1.0)]);

        let params = json!({"panel_by": "batch_size", "columns": ["lambda_mx"]});
        let err = run_stage(&PlotStage, params, &inputs).1.unwrap_err();
        assert!(err.to_string().contains("lambda_mx"), "{err}");
    }

    #[test]
    fn a_panel_whose_quantities_were_never_measured_is_an_error() {
        // The column exists (a run's metrics.csv has every quantity's column) but is empty.
        let csv = "step,lr,batch_size,loss,lambda_max,gni
0,0.04,8,0.9,,
10,0.04,8,0.5,,
";
        let (inputs, _dirs) = runs_with_metrics(&[csv]);
        let params = json!({"columns": ["lambda_max", "gni"]});
        let err = run_stage(&PlotStage, params, &inputs).1.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("no value of lambda_max, gni in") && text.contains("measure"),
            "{text}"
        );
        // One measured quantity in the panel is enough (the loss, here, on the right axis).
        let params = json!({"columns": ["lambda_max"], "secondary": ["loss"]});
        run_stage(&PlotStage, params, &inputs).1.unwrap();
    }

    #[test]
    fn a_right_axis_with_accuracy_says_so() {
        let (inputs, _dirs) = runs_with_metrics(&[
            "step,lr,batch_size,loss,full_loss,full_accuracy,batch_sharpness\n\
             0,0.04,8,0.9,0.95,0.1,3\n10,0.04,8,0.5,0.45,0.6,5\n",
        ]);
        let params =
            json!({"columns": ["batch_sharpness"], "secondary": ["loss", "full_accuracy"]});
        let (dir, r) = run_stage(&PlotStage, params, &inputs);
        r.unwrap();
        let svg = std::fs::read_to_string(dir.path().join("figure.svg")).unwrap();
        assert!(svg.contains("loss, accuracy") && svg.contains("Train accuracy"));
        let params = json!({"columns": ["batch_sharpness"], "secondary": ["loss", "full_loss"]});
        let (dir, r) = run_stage(&PlotStage, params, &inputs);
        r.unwrap();
        let svg = std::fs::read_to_string(dir.path().join("figure.svg")).unwrap();
        assert!(svg.contains(">\nloss\n<") && !svg.contains("accuracy"));
    }

    #[test]
    fn panels_split_a_run_and_the_instability_line_marks_where_eta_passes_two_over_lambda() {
        // Run 0: η = 0.5 then 2.5 from step 5, λmax = 1: 2/η < λmax from step 5 on. Run 1 never.
        let (inputs, _dirs) = runs_with_metrics(&[
            "step,lr,batch_size,lambda_max,gni,full_loss\n\
             0,0.5,8,1,4,1\n3,0.5,8,1,3.5,2\n5,2.5,8,1,0.9,50\n7,2.5,8,1,0.8,900\n",
            "step,lr,batch_size,lambda_max,gni,full_loss\n0,0.5,16,1,4,1\n7,0.5,16,1,4.5,3\n",
        ]);
        let params = json!({"instability_line": true, "panels": [
            {"title": "GNI", "columns": ["gni"]},
            {"title": "loss", "columns": ["full_loss"], "threshold": false, "log_y": true}]});
        let (dir, r) = run_stage(&PlotStage, params, &inputs);
        r.unwrap();
        let text = std::fs::read_to_string(dir.path().join("figure.csv")).unwrap();
        let rows = |panel: &str, series: &str| -> Vec<(f64, f64)> {
            text.lines()
                .skip(1)
                .map(|l| l.split(',').collect::<Vec<_>>())
                .filter(|f| f[0] == panel && f[1] == series)
                .map(|f| (f[3].parse().unwrap(), f[4].parse().unwrap()))
                .collect()
        };
        // Two runs × two panels, titled by run and panel; 2/η only where asked.
        let panels: std::collections::BTreeSet<&str> = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').next().unwrap())
            .collect();
        assert_eq!(
            panels,
            ["b = 8: GNI", "b = 8: loss", "b = 16: GNI", "b = 16: loss"]
                .into_iter()
                .collect()
        );
        assert_eq!(
            rows("b = 8: GNI", "2/η"),
            [(0.0, 4.0), (5.0, 4.0), (5.0, 0.8), (7.0, 0.8)]
        );
        assert!(rows("b = 8: loss", "2/η").is_empty());
        // The red line stands at step 5, across each panel's left-axis range.
        assert_eq!(rows("b = 8: GNI", "η > 2/λmax"), [(5.0, 0.8), (5.0, 4.0)]);
        assert_eq!(
            rows("b = 8: loss", "η > 2/λmax"),
            [(5.0, 1.0), (5.0, 900.0)]
        );
        assert!(rows("b = 16: GNI", "η > 2/λmax").is_empty());

        let bad = json!({"panels": [{"columns": ["gni"]}, {"title": "empty"}]});
        assert_eq!(
            PlotStage.resolve(&bad).unwrap_err().path,
            "panels[1].columns"
        );
        let unknown = json!({"panels": [{"columns": ["gni"], "colour": "red"}]});
        assert!(PlotStage.resolve(&unknown).is_err());
    }

    #[test]
    fn smooth_draws_a_trailing_mean_and_must_name_a_drawn_column() {
        let runs = fixture_runs();
        let params =
            json!({"panel_by": "batch_size", "secondary": ["loss"], "smooth": {"loss": 3}});
        let (dir, r) = run_stage(&PlotStage, params, &runs);
        r.unwrap();
        let run = &runs["runs"][0];
        let table = MetricsTable::read(&run.dir.join("metrics.csv")).unwrap();
        let raw: Vec<f64> = table
            .column("loss")
            .unwrap()
            .iter()
            .flatten()
            .copied()
            .collect();
        let b = run.params["batch_size"].as_u64().unwrap();
        let mut csv = csv::Reader::from_path(dir.path().join("figure.csv")).unwrap();
        let drawn: Vec<f64> = csv
            .records()
            .map(|r| r.unwrap())
            .filter(|r| r[0] == *format!("b = {b}") && r[1] == *"Train loss (batch), mean of 3")
            .map(|r| r[4].parse().unwrap())
            .collect();
        let expected = trailing_mean(&raw, 3);
        assert_eq!(drawn.len(), expected.len());
        for (d, e) in drawn.iter().zip(&expected) {
            assert!((d - e).abs() <= 1e-12 * e.abs(), "{d} vs {e}");
        }
        assert!(raw.len() > 3 && expected[3] != raw[3]);

        let err = PlotStage
            .resolve(&json!({"smooth": {"loss": 3}}))
            .unwrap_err();
        assert_eq!(err.path, "smooth.loss");
    }

    #[test]
    fn lambda_vs_batch_plots_final_values_and_fits() {
        let (dir, r) = run_stage(
            &PlotStage,
            json!({"mode": "lambda_vs_batch", "columns": ["lambda_max"], "grid_columns": 2}),
            &fixture_runs(),
        );
        r.unwrap();
        let text = std::fs::read_to_string(dir.path().join("figure.csv")).unwrap();
        let finals = text.lines().filter(|l| l.contains(",final λmax,")).count();
        assert_eq!(finals, 5);
        // b = 128 sits above 2/η and is left out of the log-log gap.
        let gaps = text.lines().filter(|l| l.contains(",2/η − λmax,")).count();
        assert_eq!(gaps, 4);
        assert!(
            text.contains("two-segment fit") && text.contains("power law, α ="),
            "{text}"
        );
        let img = image::open(dir.path().join("figure.png")).unwrap();
        assert_eq!((img.width(), img.height()), (2 * 520, 380));
    }

    #[test]
    fn lambda_vs_batch_without_fits_draws_every_column_in_one_panel() {
        let params = json!({"mode": "lambda_vs_batch", "columns": ["batch_sharpness", "lambda_max"],
                            "fits": false, "protocol": {"last_k": 2}});
        let (dir, r) = run_stage(&PlotStage, params, &fixture_runs());
        r.unwrap();
        let text = std::fs::read_to_string(dir.path().join("figure.csv")).unwrap();
        let summary: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("summary.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(summary["panels"], 1);
        // One curve per column, each point the mean of that column's last two values in its run.
        for (column, series) in [
            ("batch_sharpness", "final Batch Sharpness"),
            ("lambda_max", "final λmax"),
        ] {
            let drawn: Vec<(f64, f64)> = text
                .lines()
                .map(|l| l.split(',').collect::<Vec<_>>())
                .filter(|f| f[1] == series)
                .map(|f| (f[3].parse().unwrap(), f[4].parse().unwrap()))
                .collect();
            assert_eq!(drawn.len(), 5, "{series}");
            for (b, y) in drawn {
                let path = format!(
                    "{}/tests/fixtures/metrics/b{b}/metrics.csv",
                    env!("CARGO_MANIFEST_DIR")
                );
                let t = MetricsTable::read(std::path::Path::new(&path)).unwrap();
                let values: Vec<f64> = t
                    .column(column)
                    .unwrap()
                    .iter()
                    .flatten()
                    .copied()
                    .collect();
                let expected = (values[values.len() - 1] + values[values.len() - 2]) / 2.0;
                assert!(
                    (y - expected).abs() < 1e-9 * expected.abs().max(1.0),
                    "{series} b = {b}"
                );
            }
        }
        assert!(!text.contains("fit") && !text.contains("power law") && !text.contains("2/η −"));
        assert_eq!(summary["fits"]["curves"][1]["quantity"], "lambda_max");

        let both = json!({"mode": "lambda_vs_batch", "fits": false, "log_log_level": true});
        assert_eq!(PlotStage.resolve(&both).unwrap_err().path, "log_log_level");
    }

    #[test]
    fn lambda_vs_batch_adds_the_log_log_level_panel_on_request() {
        let params = json!({"mode": "lambda_vs_batch", "columns": ["lambda_max"],
                            "batch_axis": "linear", "log_log_level": true});
        let (dir, r) = run_stage(&PlotStage, params, &fixture_runs());
        r.unwrap();
        let img = image::open(dir.path().join("figure.png")).unwrap();
        assert_eq!((img.width(), img.height()), (3 * 520, 380));
        let summary: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("summary.json")).unwrap(),
        )
        .unwrap();
        let curve = &summary["fits"]["curves"][0];
        let pairs = |v: &Value| -> Vec<(f64, f64)> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap()))
                .collect()
        };
        // The line goes through the final values up to the knee (all of them when fewer than
        // three lie there).
        let finals = pairs(&curve["points"]);
        let knee = curve["critical_batch"]["critical_batch"].as_f64().unwrap();
        let below: Vec<(f64, f64)> = finals.iter().copied().filter(|p| p.0 <= knee).collect();
        let used = pairs(&curve["log_log_level"]["used"]);
        assert_eq!(used, if below.len() >= 3 { below } else { finals });
        // Its slope against the closed-form simple regression of log λ on log b.
        let (x, y): (Vec<f64>, Vec<f64>) = used.iter().map(|p| (p.0.ln(), p.1.ln())).unzip();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (mx, my) = (mean(&x), mean(&y));
        let sxy: f64 = x.iter().zip(&y).map(|(a, b)| (a - mx) * (b - my)).sum();
        let sxx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
        let slope = sxy / sxx;
        // The drawn line (in the figure's CSV) has that slope on log-log axes.
        let text = std::fs::read_to_string(dir.path().join("figure.csv")).unwrap();
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let drawn: Vec<(f64, f64)> = reader
            .records()
            .map(|r| r.unwrap())
            .filter(|r| &r[0] == "(b) final λmax (log-log)" && r[1].starts_with("log-log fit"))
            .map(|r| (r[3].parse().unwrap(), r[4].parse().unwrap()))
            .collect();
        let (first, last) = (drawn[0], drawn[drawn.len() - 1]);
        let drawn_slope = (last.1 / first.1).ln() / (last.0 / first.0).ln();
        assert!(
            (drawn_slope - slope).abs() < 1e-9,
            "{drawn_slope} vs {slope}"
        );
        assert_eq!((first.0, last.0), (used[0].0, used[used.len() - 1].0));
        assert!(
            text.contains(&format!("log-log fit, slope {slope:.2}")),
            "{text}"
        );
        // The finals appear in (a) and (b); the gap moves to (c).
        for panel in ["(a) final λmax vs batch size", "(b) final λmax (log-log)"] {
            let n = text
                .lines()
                .filter(|l| l.starts_with(panel) && l.contains(",final λmax,"))
                .count();
            assert_eq!(n, 5, "{panel}: {text}");
        }
        assert!(text.contains("(c) gap 2/η − λmax (log-log)"));
        // Panel (a)'s batch axis is linear (ticks 20, 40, …, 120 over b = 8…128); (b) and (c) are
        // log (10, 20, 50, 100).
        let svg = std::fs::read_to_string(dir.path().join("figure.svg")).unwrap();
        let ticks = x_tick_labels(&svg, 3, 520, 331);
        assert_eq!(
            ticks[0],
            ["20", "40", "60", "80", "100", "120"],
            "{ticks:?}"
        );
        assert_eq!(ticks[1], ["10", "20", "50", "100"], "{ticks:?}");
        assert_eq!(ticks[2], ticks[1]);
    }

    /// The numeric labels below `axis_y` in an SVG figure, per panel of `width` pixels.
    fn x_tick_labels(svg: &str, panels: usize, width: usize, axis_y: usize) -> Vec<Vec<String>> {
        let attr = |tag: &str, name: &str| -> usize {
            let start = tag.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
            tag[start..].split('"').next().unwrap().parse().unwrap()
        };
        let mut out = vec![Vec::new(); panels];
        for element in svg.split("<text").skip(1) {
            let (tag, rest) = element.split_once('>').unwrap();
            let text = rest.split('<').next().unwrap().trim();
            if attr(tag, "y") > axis_y && text.parse::<f64>().is_ok() {
                out[attr(tag, "x") / width].push(text.to_string());
            }
        }
        out
    }

    #[test]
    fn series_group_by_input_params_and_by_several_params() {
        // Two "dataset sizes": the b <= 32 runs on n = 2048, the others on n = 1024.
        let mut runs = fixture_runs();
        for run in runs.get_mut("runs").unwrap().iter_mut().take(3) {
            run.upstream_params
                .insert("data".into(), json!({"n": 2048, "seed": 0}));
        }
        let params = json!({"mode": "lambda_vs_batch", "columns": ["lambda_max"],
                            "series_by": ["data.n", "lr"]});
        let (dir, r) = run_stage(&PlotStage, params, &runs);
        r.unwrap();
        let text = std::fs::read_to_string(dir.path().join("figure.csv")).unwrap();
        let finals = |label: &str| {
            text.lines()
                .filter(|l| l.contains(&format!("\"final λmax ({label})\",")))
                .count()
        };
        assert_eq!(finals("n = 2048, η = 0.04"), 3, "{text}");
        assert_eq!(finals("n = 1024, η = 0.04"), 2, "{text}");
        // Both curves share η: one 2/η line, unnamed by η, across every batch size.
        let thresholds: Vec<&str> = text.lines().filter(|l| l.contains(",2/η,")).collect();
        assert_eq!(thresholds.len(), 2, "{text}");
        assert!(thresholds[0].contains(",8,50") && thresholds[1].contains(",128,50"));
        // A path that is neither a param nor an input's param is an error naming it.
        let params = json!({"mode": "lambda_vs_batch", "series_by": "data.width"});
        let (_d, r) = run_stage(&PlotStage, params, &runs);
        assert!(r.unwrap_err().to_string().contains("data.width"));
    }

    #[test]
    fn bad_params_are_rejected_by_field() {
        let err = PlotStage.resolve(&json!({"stem": "../x"})).unwrap_err();
        assert_eq!(err.path, "stem");
        let err = PlotStage.resolve(&json!({"layout": 3})).unwrap_err();
        assert!(err.message.contains("layout"), "{err}");
        let protocol = json!({"mode": "lambda_vs_batch", "protocol": {"last_k": 0}});
        assert_eq!(PlotStage.resolve(&protocol).unwrap_err().path, "protocol");
        let smooth = json!({"secondary": ["loss"], "smooth": {"loss": 0}});
        assert_eq!(PlotStage.resolve(&smooth).unwrap_err().path, "smooth.loss");
        // Nothing to draw.
        for params in [
            json!({"mode": "lambda_vs_batch", "columns": []}),
            json!({"columns": [], "secondary": []}),
        ] {
            assert_eq!(PlotStage.resolve(&params).unwrap_err().path, "columns");
        }
        assert!(PlotStage
            .resolve(&json!({"columns": [], "secondary": ["loss"]}))
            .is_ok());
        let err = PlotStage
            .resolve(&json!({"columns": [], "panels": [{"title": "t"}]}))
            .unwrap_err();
        assert_eq!(err.path, "panels[0].columns");
        let (_d, r) = run_stage(&PlotStage, json!({"panel_by": "width"}), &fixture_runs());
        assert!(r.unwrap_err().to_string().contains("width"));
    }
}
