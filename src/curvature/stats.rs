//! Monte Carlo bookkeeping: estimates with standard errors, and the adaptive stopping rule shared by
//! the estimators. The rule stops on the relative standard error of exactly the statistic that is
//! reported (unlike the reference code, which tests a ratio of means but reports a mean of ratios).

use serde::{Deserialize, Serialize};

use super::{CurvatureError, Result};

/// A Monte Carlo estimate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// The estimated value.
    pub value: f64,
    /// Its standard error (NaN with fewer than two samples; 0 for exact values).
    pub stderr: f64,
    /// Number of samples (batches or probes) used.
    pub samples: usize,
}

impl Estimate {
    /// An exact value (no sampling).
    pub fn exact(value: f64) -> Self {
        Self {
            value,
            stderr: 0.0,
            samples: 1,
        }
    }
}

/// How many samples a Monte Carlo estimator draws.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MonteCarloConfig {
    /// Never stop before this many samples.
    pub min_samples: usize,
    /// Always stop at this many samples.
    pub max_samples: usize,
    /// Stop once stderr ≤ rel_tol · |value| (and at least `min_samples` were drawn).
    pub rel_tol: f64,
    /// Seed of the estimator's own RNG (`ChaCha8Rng`).
    pub seed: u64,
}

impl Default for MonteCarloConfig {
    /// The reference code's batch-sharpness settings: 20 to 1000 batches, relative stderr 0.005.
    fn default() -> Self {
        Self {
            min_samples: 20,
            max_samples: 1000,
            rel_tol: 0.005,
            seed: 0,
        }
    }
}

impl MonteCarloConfig {
    /// Checks the ranges, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        if self.min_samples == 0 {
            return Err(CurvatureError::Config {
                field: "min_samples",
                message: "must be at least 1".into(),
            });
        }
        if self.max_samples < self.min_samples {
            return Err(CurvatureError::Config {
                field: "max_samples",
                message: format!(
                    "{} is below min_samples {}",
                    self.max_samples, self.min_samples
                ),
            });
        }
        if self.rel_tol.is_nan() || self.rel_tol < 0.0 {
            return Err(CurvatureError::Config {
                field: "rel_tol",
                message: format!("must be a non-negative number, got {}", self.rel_tol),
            });
        }
        Ok(())
    }

    /// Whether to stop after drawing `samples` samples whose current estimate is `estimate`.
    pub fn should_stop(&self, estimate: &Estimate) -> bool {
        if estimate.samples >= self.max_samples {
            return true;
        }
        estimate.samples >= self.min_samples
            && estimate.samples >= 2
            && estimate.stderr <= self.rel_tol * estimate.value.abs()
    }
}

/// Sample mean and its standard error.
pub fn mean_estimate(xs: &[f64]) -> Estimate {
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n as f64;
    let stderr = if n < 2 {
        f64::NAN
    } else {
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        (var / n as f64).sqrt()
    };
    Estimate {
        value: mean,
        stderr,
        samples: n,
    }
}

/// Ratio of sample means mean(x) / mean(y), with its delta-method standard error
/// sqrt(Σ (x_i − R y_i)² / (n (n − 1))) / |mean(y)|.
pub fn ratio_estimate(xs: &[f64], ys: &[f64]) -> Estimate {
    let n = xs.len();
    let mx = xs.iter().sum::<f64>() / n as f64;
    let my = ys.iter().sum::<f64>() / n as f64;
    let r = mx / my;
    let stderr = if n < 2 {
        f64::NAN
    } else {
        let s = xs
            .iter()
            .zip(ys)
            .map(|(x, y)| (x - r * y).powi(2))
            .sum::<f64>();
        (s / (n * (n - 1)) as f64).sqrt() / my.abs()
    };
    Estimate {
        value: r,
        stderr,
        samples: n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_stderr_match_textbook_formulas() {
        let e = mean_estimate(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(e.value, 2.5);
        // Sample variance 5/3; stderr = sqrt(5/3/4).
        assert!((e.stderr - (5.0f64 / 12.0).sqrt()).abs() < 1e-15);
        assert!(mean_estimate(&[1.0]).stderr.is_nan());
    }

    #[test]
    fn ratio_stderr_is_the_delta_method() {
        let x = [2.0, 4.0, 6.0];
        let y = [1.0, 2.0, 3.0];
        let e = ratio_estimate(&x, &y);
        assert_eq!(e.value, 2.0);
        assert_eq!(e.stderr, 0.0); // x = 2y exactly
        let e = ratio_estimate(&[1.0, 3.0], &[1.0, 1.0]);
        // R = 2, residuals (−1, 1): sqrt(2 / 2) / 1 = 1.
        assert_eq!((e.value, e.stderr), (2.0, 1.0));
    }

    #[test]
    fn stopping_rule_respects_bounds_and_tolerance() {
        let cfg = MonteCarloConfig {
            min_samples: 3,
            max_samples: 5,
            rel_tol: 0.1,
            seed: 0,
        };
        let est = |value, stderr, samples| Estimate {
            value,
            stderr,
            samples,
        };
        assert!(!cfg.should_stop(&est(1.0, 0.0, 2)));
        assert!(cfg.should_stop(&est(1.0, 0.05, 3)));
        assert!(!cfg.should_stop(&est(1.0, 0.5, 4)));
        assert!(cfg.should_stop(&est(1.0, 0.5, 5)));
        assert!(!cfg.should_stop(&est(-1.0, f64::NAN, 4)));
        assert!(cfg.validate().is_ok());
        let bad = MonteCarloConfig {
            max_samples: 2,
            ..cfg
        };
        assert!(matches!(
            bad.validate(),
            Err(CurvatureError::Config {
                field: "max_samples",
                ..
            })
        ));
    }
}
