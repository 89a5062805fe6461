//! Per-run summaries: the plateau level of a quantity over a window of steps (with an
//! autocorrelation-aware confidence interval) and the final value of a sparsely measured quantity
//! such as λmax.

use serde::{Deserialize, Serialize};

use super::metrics::MetricsTable;
use super::stats::{batch_means_interval, mean, MeanInterval};
use super::AnalysisError;

/// Which steps a plateau is averaged over.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Window {
    /// The last fraction of the run's step range (e.g. 1/3: the last third, as in figure 1).
    LastFraction(f64),
    /// Every step from this one on.
    FromStep(f64),
}

impl Window {
    /// Why the window selects no sensible range (a fraction outside (0, 1], a negative or
    /// non-finite step), or `None`.
    pub fn error(&self) -> Option<String> {
        match *self {
            Window::LastFraction(f) if !(0.0 < f && f <= 1.0) => {
                Some(format!("window fraction must lie in (0, 1], got {f}"))
            }
            Window::FromStep(s) if !(s >= 0.0 && s.is_finite()) => {
                Some(format!("window step must be a step (≥ 0), got {s}"))
            }
            _ => None,
        }
    }
}

/// Why `level` is not a probability strictly between 0 and 1 (a confidence level or a
/// significance), or `None`; `name` says which.
pub fn probability_error(name: &str, level: f64) -> Option<String> {
    (!(0.0 < level && level < 1.0)).then(|| format!("{name} must lie in (0, 1), got {level}"))
}

/// The mean of `(step, value)` points inside `window`, with a `level` confidence interval by batch
/// means (see [`batch_means_interval`]). `what` names the data in errors.
pub fn plateau(
    points: &[(f64, f64)],
    window: Window,
    level: f64,
    what: &str,
) -> Result<MeanInterval, AnalysisError> {
    let problem = probability_error("confidence level", level).or_else(|| window.error());
    if let Some(problem) = problem {
        return Err(AnalysisError::Invalid(format!("{what}: {problem}")));
    }
    let start = match window {
        Window::LastFraction(f) => {
            let (first, last) = match (points.first(), points.last()) {
                (Some(a), Some(b)) => (a.0, b.0),
                _ => (0.0, 0.0),
            };
            last - f * (last - first)
        }
        Window::FromStep(s) => s,
    };
    let values: Vec<f64> = points
        .iter()
        .filter(|(x, y)| *x >= start && y.is_finite())
        .map(|p| p.1)
        .collect();
    batch_means_interval(&values, level).ok_or(AnalysisError::NotEnoughData {
        what: format!("plateau of {what} from step {start}"),
        needed: 4,
        got: values.len(),
    })
}

/// How the "final" value of a quantity is read off a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FinalProtocol {
    /// The mean of the last `k` measurements.
    LastK(usize),
    /// The paper's "final-epoch λmax" (figures 12–20): the mean of the measurements taken during the
    /// run's last epoch (by the `epoch` column); when the cadence left none there (large batches
    /// have short epochs), the last measurement.
    FinalEpoch,
}

impl FinalProtocol {
    /// Why the protocol reads no value (`last_k: 0`), or `None`.
    pub fn error(&self) -> Option<String> {
        (*self == FinalProtocol::LastK(0)).then(|| "last_k must be at least 1".to_string())
    }
}

/// The final value of one quantity of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FinalValue {
    /// The value (a mean over `samples` measurements).
    pub value: f64,
    /// How many measurements were averaged.
    pub samples: usize,
    /// Step of the first measurement used.
    pub from_step: f64,
    /// Step of the last measurement used.
    pub to_step: f64,
}

/// The final value of `column` in `table` under `protocol`.
pub fn final_value(
    table: &MetricsTable,
    column: &str,
    protocol: FinalProtocol,
) -> Result<FinalValue, AnalysisError> {
    let steps = table.column("step")?;
    let values = table.column(column)?;
    let measured: Vec<(usize, f64, f64)> = steps
        .iter()
        .zip(values)
        .enumerate()
        .filter_map(|(i, (s, v))| Some((i, (*s)?, (*v)?)))
        .filter(|(_, _, v)| v.is_finite())
        .collect();
    let not_enough = |needed| AnalysisError::NotEnoughData {
        what: format!("final `{column}` of {}", table.source.display()),
        needed,
        got: measured.len(),
    };
    let used: &[(usize, f64, f64)] = match protocol {
        FinalProtocol::LastK(k) => {
            if let Some(problem) = protocol.error() {
                return Err(AnalysisError::Invalid(format!("final value: {problem}")));
            }
            if measured.len() < k {
                return Err(not_enough(k));
            }
            &measured[measured.len() - k..]
        }
        FinalProtocol::FinalEpoch => {
            let epochs = table.column("epoch")?;
            let last_epoch = epochs.iter().rev().find_map(|e| *e);
            let first_in_last = measured
                .iter()
                .position(|(i, _, _)| epochs[*i].is_some() && epochs[*i] == last_epoch)
                .unwrap_or(measured.len().saturating_sub(1));
            if measured.is_empty() {
                return Err(not_enough(1));
            }
            &measured[first_in_last..]
        }
    };
    let vals: Vec<f64> = used.iter().map(|m| m.2).collect();
    Ok(FinalValue {
        value: mean(&vals).ok_or_else(|| not_enough(1))?,
        samples: used.len(),
        from_step: used[0].1,
        to_step: used[used.len() - 1].1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};
    use std::path::Path;

    #[test]
    fn plateau_recovers_level_after_sharpening() {
        // Ramp up to 40 by step 1000, then hover at 40 with AR(1) noise: the last-third plateau is
        // 40 and the interval covers it, while a window including the ramp is biased low.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let noise = Normal::new(0.0, 2.0).unwrap();
        let mut e = 0.0;
        let points: Vec<(f64, f64)> = (0..3000)
            .map(|s| {
                e = 0.8 * e + noise.sample(&mut rng);
                let level = if s < 1000 {
                    40.0 * s as f64 / 1000.0
                } else {
                    40.0
                };
                (s as f64, level + e)
            })
            .collect();
        let p = plateau(&points, Window::LastFraction(1.0 / 3.0), 0.95, "bs").unwrap();
        assert!(p.low <= 40.0 && 40.0 <= p.high, "{p:?}");
        assert!(p.high - p.low < 2.0, "{p:?}");
        assert_eq!(p.samples, 1000); // steps 2000..=2999 (start 1999.3)
        let whole = plateau(&points, Window::FromStep(0.0), 0.95, "bs").unwrap();
        assert!(whole.high < 40.0, "{whole:?}");
    }

    #[test]
    fn plateau_rejects_bad_settings_and_short_windows() {
        let points = vec![(0.0, 1.0), (1.0, 1.0), (2.0, 1.0)];
        assert!(plateau(&points, Window::LastFraction(0.0), 0.95, "x").is_err());
        assert!(plateau(&points, Window::FromStep(0.0), 1.5, "x").is_err());
        let err = plateau(&points, Window::FromStep(0.0), 0.95, "x").unwrap_err();
        assert!(matches!(err, AnalysisError::NotEnoughData { got: 3, .. }));
    }

    fn table() -> MetricsTable {
        // Epochs of 4 steps; λmax measured every 3 steps.
        let mut csv = String::from("step,epoch,lambda_max\n");
        for s in 0..14 {
            let lam = if s % 3 == 0 {
                format!("{}", 10 + s)
            } else {
                String::new()
            };
            csv.push_str(&format!("{s},{},{lam}\n", s / 4));
        }
        MetricsTable::from_reader(csv.as_bytes(), Path::new("f.csv")).unwrap()
    }

    #[test]
    fn final_value_last_k_and_final_epoch() {
        let t = table();
        // Measurements at steps 0,3,6,9,12 → 10,13,16,19,22.
        let last2 = final_value(&t, "lambda_max", FinalProtocol::LastK(2)).unwrap();
        assert_eq!((last2.value, last2.samples), (20.5, 2));
        // Last epoch = 3 (steps 12, 13): one measurement, 22.
        let fe = final_value(&t, "lambda_max", FinalProtocol::FinalEpoch).unwrap();
        assert_eq!((fe.value, fe.samples, fe.from_step), (22.0, 1, 12.0));
        assert!(final_value(&t, "lambda_max", FinalProtocol::LastK(9)).is_err());
    }

    #[test]
    fn final_epoch_without_measurement_falls_back_to_last() {
        // Last epoch (steps 12..13) has no measurement when λ is measured at 0,5,10.
        let mut csv = String::from("step,epoch,lambda_max\n");
        for s in 0..14 {
            let lam = if s % 5 == 0 {
                format!("{s}")
            } else {
                String::new()
            };
            csv.push_str(&format!("{s},{},{lam}\n", s / 4));
        }
        let t = MetricsTable::from_reader(csv.as_bytes(), Path::new("f.csv")).unwrap();
        let fe = final_value(&t, "lambda_max", FinalProtocol::FinalEpoch).unwrap();
        assert_eq!((fe.value, fe.samples), (10.0, 1));
    }
}
