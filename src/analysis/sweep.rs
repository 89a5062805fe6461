//! Sweep-level analyses of the final λmax against the batch size b (appendix I of the paper):
//! the gap 2/η − λmax on log-log axes with a least-squares power law and a test of that law, and the
//! critical batch size b_c as the knee of a two-segment fit of λmax against log b.
//!
//! Power-law test (documented choice): a power law `gap = C b^(−α)` is a straight line in
//! (log b, log gap). We fit the nested alternative `log gap = c₀ + c₁ log b + c₂ (log b)²` and test
//! c₂ = 0 with a two-sided t test (equivalently the F test of the nested models). A significant
//! curvature rejects the power law for every exponent, which is what the paper's "no robust straight
//! line" (Fact 6) claims. Residuals of the linear fit are reported too.
//!
//! Level on log-log axes (figures 14–15, panel (b)): a least-squares line through (log b, log λ) over
//! the steep part of the curve, the batch sizes up to the critical batch size when the two-segment
//! fit leaves at least three there, else all of them.
//!
//! Critical batch size: a continuous hinge `λ = a + s₁ min(x − k, 0) + s₂ max(x − k, 0)`,
//! x = ln b, fitted by profiling the residual sum of squares over the knee k (for fixed k the model is
//! linear); b_c = e^k. Its uncertainty is a seeded residual bootstrap (percentile interval).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::stats::{least_squares, student_t_two_sided_p};
use super::AnalysisError;

/// The t test of curvature in log-log space.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvatureTest {
    /// Coefficient of (log₁₀ b)² in the quadratic alternative.
    pub quadratic_coef: f64,
    /// Its standard error.
    pub stderr: f64,
    /// t statistic.
    pub t: f64,
    /// Residual degrees of freedom (points − 3).
    pub df: usize,
    /// Two-sided p-value; small values reject the power law.
    pub p_value: f64,
}

/// Least-squares power law `gap ≈ C b^(−α)` fitted on log₁₀ axes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PowerLawFit {
    /// The exponent α (the log-log slope is −α).
    pub alpha: f64,
    /// Standard error of α.
    pub alpha_stderr: f64,
    /// log₁₀ C.
    pub log10_c: f64,
    /// Coefficient of determination of the log-log line.
    pub r_squared: f64,
    /// The (b, gap) points used (gap > 0).
    pub used: Vec<(f64, f64)>,
    /// Batch sizes left out because the gap was not positive (λmax ≥ 2/η).
    pub excluded: Vec<f64>,
    /// Residuals of log₁₀ gap around the line, in the order of `used`.
    pub residuals: Vec<f64>,
    /// Curvature test; `None` with fewer than 4 points.
    pub curvature: Option<CurvatureTest>,
}

impl PowerLawFit {
    /// Whether the power law is rejected at significance `alpha_level` (e.g. 0.05).
    pub fn rejected(&self, alpha_level: f64) -> Option<bool> {
        self.curvature.map(|c| c.p_value < alpha_level)
    }

    /// The fitted gap at batch size `b`.
    pub fn predict(&self, b: f64) -> f64 {
        10f64.powf(self.log10_c - self.alpha * b.log10())
    }
}

/// A least-squares line through (log₁₀ x, log₁₀ y): `y ≈ C x^slope`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogLogLine {
    /// The slope on log-log axes.
    pub slope: f64,
    /// Standard error of the slope.
    pub slope_stderr: f64,
    /// log₁₀ C.
    pub log10_c: f64,
    /// Coefficient of determination.
    pub r_squared: f64,
    /// Residuals of log₁₀ y around the line, in the order of the points.
    pub residuals: Vec<f64>,
}

impl LogLogLine {
    /// Fits the line to points with positive coordinates (two at least); `None` otherwise.
    pub fn fit(points: &[(f64, f64)]) -> Option<LogLogLine> {
        let lx: Vec<f64> = points.iter().map(|p| p.0.log10()).collect();
        let ly: Vec<f64> = points.iter().map(|p| p.1.log10()).collect();
        if lx.len() < 2 || lx.iter().chain(&ly).any(|v| !v.is_finite()) {
            return None;
        }
        let design: Vec<Vec<f64>> = lx.iter().map(|&x| vec![1.0, x]).collect();
        let fit = least_squares(&design, &ly)?;
        let my = ly.iter().sum::<f64>() / ly.len() as f64;
        let tss: f64 = ly.iter().map(|y| (y - my).powi(2)).sum();
        Some(LogLogLine {
            slope: fit.coef[1],
            slope_stderr: fit.stderr[1],
            log10_c: fit.coef[0],
            r_squared: if tss > 0.0 { 1.0 - fit.rss / tss } else { 1.0 },
            residuals: fit.residuals,
        })
    }

    /// The fitted y at `x`.
    pub fn predict(&self, x: f64) -> f64 {
        10f64.powf(self.log10_c + self.slope * x.log10())
    }
}

/// Fits `2/η − λ = C b^(−α)` to `(b, λ)` points (e.g. final λmax of each run of a sweep).
pub fn gap_power_law(points: &[(f64, f64)], lr: f64) -> Result<PowerLawFit, AnalysisError> {
    if lr.is_nan() || lr <= 0.0 {
        return Err(AnalysisError::Invalid(format!(
            "gap power law: learning rate must be positive, got {lr}"
        )));
    }
    let threshold = 2.0 / lr;
    type Points = Vec<(f64, f64)>;
    let (used, excluded): (Points, Points) = points
        .iter()
        .map(|&(b, lam)| (b, threshold - lam))
        .partition(|&(b, gap)| gap > 0.0 && b > 0.0 && gap.is_finite());
    let excluded: Vec<f64> = excluded.into_iter().map(|p| p.0).collect();
    let not_enough = || AnalysisError::NotEnoughData {
        what: format!(
            "power-law fit of 2/η − λmax (η = {lr}) over {} batch sizes",
            points.len()
        ),
        needed: 3,
        got: used.len(),
    };
    if used.len() < 3 {
        return Err(not_enough());
    }
    let line = LogLogLine::fit(&used).ok_or_else(not_enough)?;
    let lx: Vec<f64> = used.iter().map(|p| p.0.log10()).collect();
    let ly: Vec<f64> = used.iter().map(|p| p.1.log10()).collect();
    let curvature = if used.len() >= 4 {
        // Centre log b so the quadratic design is well conditioned.
        let mx = lx.iter().sum::<f64>() / lx.len() as f64;
        let quad: Vec<Vec<f64>> = lx
            .iter()
            .map(|&x| vec![1.0, x - mx, (x - mx).powi(2)])
            .collect();
        least_squares(&quad, &ly).map(|q| {
            let df = used.len() - 3;
            let t = q.coef[2] / q.stderr[2];
            CurvatureTest {
                quadratic_coef: q.coef[2],
                stderr: q.stderr[2],
                t,
                df,
                // 0/0 (an exact straight line) is no evidence of curvature.
                p_value: if t.is_nan() {
                    1.0
                } else {
                    student_t_two_sided_p(t, df as f64)
                },
            }
        })
    } else {
        None
    };
    Ok(PowerLawFit {
        alpha: -line.slope,
        alpha_stderr: line.slope_stderr,
        log10_c: line.log10_c,
        r_squared: line.r_squared,
        used,
        excluded,
        residuals: line.residuals,
        curvature,
    })
}

/// The line through the steep part of λ against b on log-log axes (figures 14–15, panel (b)).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LevelLogLogFit {
    /// The fitted line.
    pub line: LogLogLine,
    /// The (b, λ) points fitted.
    pub used: Vec<(f64, f64)>,
}

/// Fits a line to `(b, λ)` points on log-log axes: those with b ≤ the `knee`'s critical batch size
/// when it leaves at least three, else all of them (at least three with λ > 0).
pub fn level_log_log(
    points: &[(f64, f64)],
    knee: Option<&KneeFit>,
) -> Result<LevelLogLogFit, AnalysisError> {
    let positive: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|&(b, l)| b > 0.0 && l > 0.0 && l.is_finite())
        .collect();
    let below: Vec<(f64, f64)> = knee.map_or_else(Vec::new, |k| {
        positive
            .iter()
            .copied()
            .filter(|p| p.0 <= k.critical_batch)
            .collect()
    });
    let used = if below.len() >= 3 { below } else { positive };
    let line = (used.len() >= 3)
        .then(|| LogLogLine::fit(&used))
        .flatten()
        .ok_or_else(|| AnalysisError::NotEnoughData {
            what: "log-log line of the final λ against b".to_string(),
            needed: 3,
            got: used.len(),
        })?;
    Ok(LevelLogLogFit { line, used })
}

/// A two-segment (hinge) fit of λ against ln b, with the knee as the critical batch size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KneeFit {
    /// The critical batch size b_c = e^knee.
    pub critical_batch: f64,
    /// λ at the knee.
    pub level_at_knee: f64,
    /// dλ/d ln b below the knee.
    pub slope_below: f64,
    /// dλ/d ln b above the knee.
    pub slope_above: f64,
    /// Residual sum of squares.
    pub rss: f64,
    /// Lower end of the bootstrap interval for b_c.
    pub ci_low: f64,
    /// Upper end of the bootstrap interval for b_c.
    pub ci_high: f64,
    /// Bootstrap replicates used for the interval.
    pub bootstrap: usize,
}

impl KneeFit {
    /// The fitted λ at batch size `b`.
    pub fn predict(&self, b: f64) -> f64 {
        let d = b.ln() - self.critical_batch.ln();
        self.level_at_knee + self.slope_below * d.min(0.0) + self.slope_above * d.max(0.0)
    }
}

/// Hinge least squares at a fixed knee: (rss, [a, s₁, s₂]).
fn hinge_at(x: &[f64], y: &[f64], knee: f64) -> Option<(f64, Vec<f64>)> {
    let design: Vec<Vec<f64>> = x
        .iter()
        .map(|&v| vec![1.0, (v - knee).min(0.0), (v - knee).max(0.0)])
        .collect();
    least_squares(&design, y).map(|f| (f.rss, f.coef))
}

/// Profiles the hinge RSS over the knee in [x₂, x_{n−1}] (each segment spans at least two
/// points): a 64-point grid, then golden-section refinement around the best grid cell.
fn best_knee(x: &[f64], y: &[f64]) -> Option<(f64, f64, Vec<f64>)> {
    let (lo, hi) = (x[1], x[x.len() - 2]);
    let rss = |k: f64| hinge_at(x, y, k).map_or(f64::INFINITY, |r| r.0);
    const GRID: usize = 64;
    let grid: Vec<f64> = (0..=GRID)
        .map(|i| lo + (hi - lo) * i as f64 / GRID as f64)
        .collect();
    let best = (0..grid.len()).min_by(|&i, &j| rss(grid[i]).total_cmp(&rss(grid[j])))?;
    let (mut a, mut b) = (grid[best.saturating_sub(1)], grid[(best + 1).min(GRID)]);
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..40 {
        let c = b - phi * (b - a);
        let d = a + phi * (b - a);
        if rss(c) <= rss(d) {
            b = d;
        } else {
            a = c;
        }
    }
    let refined = 0.5 * (a + b);
    let knee = if rss(refined) <= rss(grid[best]) {
        refined
    } else {
        grid[best]
    };
    let (r, coef) = hinge_at(x, y, knee)?;
    Some((knee, r, coef))
}

/// Fits the critical batch size to `(b, λ)` points (distinct b ≥ 4 points), with a `level`
/// percentile interval from `bootstrap` residual-bootstrap replicates seeded by `seed`.
pub fn critical_batch_size(
    points: &[(f64, f64)],
    bootstrap: usize,
    level: f64,
    seed: u64,
) -> Result<KneeFit, AnalysisError> {
    let mut pts: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(b, l)| *b > 0.0 && l.is_finite())
        .collect();
    pts.sort_by(|p, q| p.0.total_cmp(&q.0));
    let distinct =
        pts.windows(2).filter(|w| w[0].0 != w[1].0).count() + usize::from(!pts.is_empty());
    let not_enough = || AnalysisError::NotEnoughData {
        what: "critical batch size (two-segment fit of λmax against ln b)".to_string(),
        needed: 4,
        got: distinct,
    };
    if distinct < 4 || pts.len() < 4 {
        return Err(not_enough());
    }
    if let Some(problem) = super::run::probability_error("confidence level", level) {
        return Err(AnalysisError::Invalid(format!(
            "critical batch size: {problem}"
        )));
    }
    let x: Vec<f64> = pts.iter().map(|p| p.0.ln()).collect();
    let y: Vec<f64> = pts.iter().map(|p| p.1).collect();
    let (knee, rss, coef) = best_knee(&x, &y).ok_or_else(not_enough)?;
    let fitted: Vec<f64> = x
        .iter()
        .map(|&v| coef[0] + coef[1] * (v - knee).min(0.0) + coef[2] * (v - knee).max(0.0))
        .collect();
    let residuals: Vec<f64> = y.iter().zip(&fitted).map(|(a, f)| a - f).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut knees: Vec<f64> = (0..bootstrap)
        .filter_map(|_| {
            let yb: Vec<f64> = fitted
                .iter()
                .map(|f| f + residuals[rng.random_range(0..residuals.len())])
                .collect();
            best_knee(&x, &yb).map(|k| k.0)
        })
        .collect();
    knees.sort_by(f64::total_cmp);
    let (ci_low, ci_high) = if knees.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        let q = |p: f64| knees[(p * (knees.len() - 1) as f64).round() as usize].exp();
        (q((1.0 - level) / 2.0), q((1.0 + level) / 2.0))
    };
    Ok(KneeFit {
        critical_batch: knee.exp(),
        level_at_knee: coef[0],
        slope_below: coef[1],
        slope_above: coef[2],
        rss,
        ci_low,
        ci_high,
        bootstrap: knees.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    const BATCHES: [f64; 8] = [4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

    #[test]
    fn exact_power_law_is_recovered_and_not_rejected() {
        // λ = 2/η − 30 b^(−0.7), η = 0.02 (2/η = 100), small multiplicative noise.
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let noise = Normal::new(0.0, 0.01).unwrap();
        let pts: Vec<(f64, f64)> = BATCHES
            .iter()
            .map(|&b| {
                (
                    b,
                    100.0 - 30.0 * b.powf(-0.7) * (1.0 + noise.sample(&mut rng)),
                )
            })
            .collect();
        let fit = gap_power_law(&pts, 0.02).unwrap();
        assert!((fit.alpha - 0.7).abs() < 0.02, "{fit:?}");
        assert!((fit.predict(10.0) - 30.0 * 10f64.powf(-0.7)).abs() < 0.1);
        assert!(fit.r_squared > 0.999);
        assert_eq!(fit.rejected(0.05), Some(false), "{:?}", fit.curvature);
    }

    #[test]
    fn curved_log_log_gap_rejects_power_law() {
        // Gap shaped like the paper's figures: saturating then collapsing (curved in log-log).
        let pts: Vec<(f64, f64)> = BATCHES
            .iter()
            .map(|&b| {
                let lb = b.log2();
                (b, 100.0 - 10f64.powf(1.8 - 0.02 * lb * lb))
            })
            .collect();
        let fit = gap_power_law(&pts, 0.02).unwrap();
        let c = fit.curvature.unwrap();
        // Exact data: c₂ = −0.02 / (log₁₀ 2)² in log₁₀ units.
        assert!(
            (c.quadratic_coef + 0.02 / 2f64.log10().powi(2)).abs() < 1e-9,
            "{c:?}"
        );
        assert_eq!(fit.rejected(0.05), Some(true));
    }

    #[test]
    fn gaps_at_or_above_threshold_are_excluded() {
        let pts = vec![
            (8.0, 10.0),
            (16.0, 20.0),
            (32.0, 30.0),
            (64.0, 50.0),
            (128.0, 51.0),
        ];
        let fit = gap_power_law(&pts, 0.04).unwrap();
        assert_eq!(fit.excluded, vec![64.0, 128.0]);
        assert_eq!(fit.used.len(), 3);
        assert!(fit.curvature.is_none());
        assert!(gap_power_law(&pts[..2], 0.04).is_err());
        assert!(gap_power_law(&pts, 0.0).is_err());
    }

    /// λ(b) = 40 + 12 min(ln b − ln 48, 0) + 2 max(ln b − ln 48, 0).
    fn hinge(b: f64) -> f64 {
        let d = b.ln() - 48f64.ln();
        40.0 + 12.0 * d.min(0.0) + 2.0 * d.max(0.0)
    }

    #[test]
    fn noiseless_knee_is_exact() {
        let pts: Vec<(f64, f64)> = BATCHES.iter().map(|&b| (b, hinge(b))).collect();
        let fit = critical_batch_size(&pts, 50, 0.9, 1).unwrap();
        assert!((fit.critical_batch - 48.0).abs() < 1e-4, "{fit:?}");
        assert!((fit.slope_below - 12.0).abs() < 1e-6 && (fit.slope_above - 2.0).abs() < 1e-6);
        assert!(fit.rss < 1e-12);
        assert!((fit.predict(100.0) - hinge(100.0)).abs() < 1e-6);
    }

    #[test]
    fn noisy_knee_interval_covers_truth() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let noise = Normal::new(0.0, 0.5).unwrap();
        let bs: Vec<f64> = (0..14).map(|i| 2f64.powf(2.0 + 0.5 * i as f64)).collect();
        let pts: Vec<(f64, f64)> = bs
            .iter()
            .map(|&b| (b, hinge(b) + noise.sample(&mut rng)))
            .collect();
        let fit = critical_batch_size(&pts, 200, 0.95, 9).unwrap();
        assert!(fit.ci_low <= 48.0 && 48.0 <= fit.ci_high, "{fit:?}");
        assert!(fit.ci_high / fit.ci_low < 3.0, "interval too wide: {fit:?}");
        // Same seed, same interval.
        assert_eq!(fit, critical_batch_size(&pts, 200, 0.95, 9).unwrap());
    }

    #[test]
    fn level_line_fits_the_steep_part_below_the_knee() {
        // λ = 2 b^0.8 up to b = 64, then flat at 2·64^0.8: the knee falls at 64 and the log-log
        // line through b ≤ 64 recovers the exponent and the constant exactly.
        let level = |b: f64| 2.0 * b.min(64.0).powf(0.8);
        let pts: Vec<(f64, f64)> = BATCHES.iter().map(|&b| (b, level(b))).collect();
        let knee = KneeFit {
            critical_batch: 64.0,
            ..critical_batch_size(&pts, 0, 0.9, 0).unwrap()
        };
        let fit = level_log_log(&pts, Some(&knee)).unwrap();
        assert_eq!(fit.used.len(), 5);
        assert!((fit.line.slope - 0.8).abs() < 1e-12, "{fit:?}");
        assert!((fit.line.predict(10.0) - 2.0 * 10f64.powf(0.8)).abs() < 1e-10);
        assert!((fit.line.r_squared - 1.0).abs() < 1e-12);
        // Without a knee every point is used, and the flat part pulls the slope down.
        let all = level_log_log(&pts, None).unwrap();
        assert_eq!(all.used.len(), BATCHES.len());
        assert!(all.line.slope < 0.7, "{all:?}");
        // A knee below the third batch size leaves too few points: all are used.
        let low = KneeFit {
            critical_batch: 10.0,
            ..knee
        };
        assert_eq!(level_log_log(&pts, Some(&low)).unwrap().used.len(), 8);
        assert!(matches!(
            level_log_log(&pts[..2], None),
            Err(AnalysisError::NotEnoughData { got: 2, .. })
        ));
    }

    #[test]
    fn knee_needs_four_distinct_batch_sizes() {
        let pts = vec![(8.0, 1.0), (8.0, 1.1), (16.0, 2.0), (32.0, 3.0)];
        assert!(matches!(
            critical_batch_size(&pts, 10, 0.9, 0),
            Err(AnalysisError::NotEnoughData { got: 3, .. })
        ));
    }
}
