//! Small statistics toolbox: Student-t distribution, batch-means confidence intervals and dense least
//! squares with coefficient standard errors. Plain `f64`, no external numerics crate.

/// Natural log of the gamma function (Lanczos approximation, g = 7, 9 terms; relative error < 1e-13
/// for positive arguments).
fn ln_gamma(x: f64) -> f64 {
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection formula.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = COEF[0];
    let t = x + 7.5;
    for (i, c) in COEF.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4).
fn beta_continued_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..500 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// Regularized incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1].
fn regularized_incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_continued_fraction(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_continued_fraction(b, a, 1.0 - x) / b
    }
}

/// Cumulative distribution function of Student's t with `df` degrees of freedom.
pub fn student_t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t));
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// Quantile of Student's t: the `t` with `student_t_cdf(t, df) == p`, for `p` in (0, 1) (bisection to
/// 1e-12).
pub fn student_t_quantile(p: f64, df: f64) -> f64 {
    let (mut lo, mut hi) = (-1e6_f64, 1e6_f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if student_t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-12 * (1.0 + mid.abs()) {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// Two-sided p-value of a t statistic with `df` degrees of freedom.
pub fn student_t_two_sided_p(t: f64, df: f64) -> f64 {
    2.0 * (1.0 - student_t_cdf(t.abs(), df))
}

/// Arithmetic mean; `None` for an empty slice.
pub fn mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        None
    } else {
        Some(values.iter().sum::<f64>() / values.len() as f64)
    }
}

/// Trailing moving average of `values` over `window` entries (fewer at the start); a window of 0
/// or 1 leaves them as they are.
pub fn trailing_mean(values: &[f64], window: usize) -> Vec<f64> {
    let window = window.max(1);
    let mut sum = 0.0;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            sum += v;
            if i >= window {
                sum -= values[i - window];
            }
            sum / (i + 1).min(window) as f64
        })
        .collect()
}

/// Unbiased sample variance; `None` with fewer than two values.
pub fn sample_variance(values: &[f64]) -> Option<f64> {
    let m = mean(values)?;
    if values.len() < 2 {
        return None;
    }
    Some(values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (values.len() - 1) as f64)
}

/// A mean with a confidence interval that accounts for autocorrelation.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MeanInterval {
    /// The sample mean.
    pub mean: f64,
    /// Standard error of the mean from the batch means.
    pub stderr: f64,
    /// Lower end of the interval.
    pub low: f64,
    /// Upper end of the interval.
    pub high: f64,
    /// Number of samples.
    pub samples: usize,
    /// Number of contiguous batches the samples were grouped into.
    pub batches: usize,
}

/// Mean of a time series with a `level` (e.g. 0.95) confidence interval by non-overlapping batch
/// means: the series is cut into `⌊√n⌋` contiguous batches (at most 30, at least 2), whose means are
/// nearly independent when a batch spans several autocorrelation times, and the interval is
/// `mean ± t_{k−1} · sd(batch means)/√k`. Samples left over after the last full batch are dropped
/// from the interval but not from the mean. `None` with fewer than 4 samples.
pub fn batch_means_interval(series: &[f64], level: f64) -> Option<MeanInterval> {
    let n = series.len();
    if n < 4 {
        return None;
    }
    let batches = ((n as f64).sqrt().floor() as usize).clamp(2, 30);
    let per_batch = n / batches;
    let batch_means: Vec<f64> = series
        .chunks_exact(per_batch)
        .take(batches)
        .map(|c| c.iter().sum::<f64>() / per_batch as f64)
        .collect();
    let m = mean(series)?;
    let stderr = (sample_variance(&batch_means)? / batches as f64).sqrt();
    let t = student_t_quantile(0.5 + level / 2.0, (batches - 1) as f64);
    Some(MeanInterval {
        mean: m,
        stderr,
        low: m - t * stderr,
        high: m + t * stderr,
        samples: n,
        batches,
    })
}

/// A least-squares fit `y ≈ X β`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearFit {
    /// Coefficients β, one per design column.
    pub coef: Vec<f64>,
    /// Standard errors of β (σ̂² (XᵀX)⁻¹ diagonal, σ̂² = RSS/(n − p)); NaN when n = p.
    pub stderr: Vec<f64>,
    /// Residual sum of squares.
    pub rss: f64,
    /// Residuals y − Xβ.
    pub residuals: Vec<f64>,
}

/// Inverts a small symmetric positive-definite matrix by Gauss–Jordan elimination with partial
/// pivoting; `None` when singular.
fn invert(mut a: Vec<Vec<f64>>) -> Option<Vec<Vec<f64>>> {
    let p = a.len();
    let scale = a.iter().flatten().fold(0.0_f64, |m, v| m.max(v.abs()));
    let mut inv: Vec<Vec<f64>> = (0..p)
        .map(|i| (0..p).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    for col in 0..p {
        let pivot = (col..p).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() <= 1e-12 * scale.max(f64::MIN_POSITIVE) {
            return None;
        }
        a.swap(col, pivot);
        inv.swap(col, pivot);
        let d = a[col][col];
        for j in 0..p {
            a[col][j] /= d;
            inv[col][j] /= d;
        }
        for i in 0..p {
            if i != col {
                let f = a[i][col];
                for j in 0..p {
                    a[i][j] -= f * a[col][j];
                    inv[i][j] -= f * inv[col][j];
                }
            }
        }
    }
    Some(inv)
}

/// Ordinary least squares of `y` on the rows of `design` (each row one observation); `None` when
/// the design is rank-deficient or has fewer rows than columns.
pub fn least_squares(design: &[Vec<f64>], y: &[f64]) -> Option<LinearFit> {
    let n = design.len();
    let p = design.first()?.len();
    if n < p || y.len() != n || p == 0 {
        return None;
    }
    let mut xtx = vec![vec![0.0; p]; p];
    let mut xty = vec![0.0; p];
    for (row, yi) in design.iter().zip(y) {
        for i in 0..p {
            xty[i] += row[i] * yi;
            for j in 0..p {
                xtx[i][j] += row[i] * row[j];
            }
        }
    }
    let inv = invert(xtx)?;
    let coef: Vec<f64> = (0..p)
        .map(|i| (0..p).map(|j| inv[i][j] * xty[j]).sum())
        .collect();
    let residuals: Vec<f64> = design
        .iter()
        .zip(y)
        .map(|(row, yi)| yi - row.iter().zip(&coef).map(|(x, c)| x * c).sum::<f64>())
        .collect();
    let rss = residuals.iter().map(|r| r * r).sum::<f64>();
    let sigma2 = if n > p {
        rss / (n - p) as f64
    } else {
        f64::NAN
    };
    let stderr = (0..p).map(|i| (sigma2 * inv[i][i]).sqrt()).collect();
    Some(LinearFit {
        coef,
        stderr,
        rss,
        residuals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    #[test]
    fn t_cdf_matches_closed_forms() {
        // df = 1 is Cauchy: 1/2 + atan(t)/π; df = 2: 1/2 + t / (2 √(2 + t²)).
        for &t in &[-7.0, -1.3, -0.2, 0.0, 0.5, 2.0, 12.0] {
            let cauchy = 0.5 + f64::atan(t) / std::f64::consts::PI;
            assert!((student_t_cdf(t, 1.0) - cauchy).abs() < 1e-12, "df=1 t={t}");
            let two = 0.5 + t / (2.0 * (2.0 + t * t).sqrt());
            assert!((student_t_cdf(t, 2.0) - two).abs() < 1e-12, "df=2 t={t}");
        }
    }

    #[test]
    fn t_quantiles_match_tables() {
        // Published two-sided 95% critical values (e.g. NIST/SEMATECH handbook, table 1.3.6.7.2).
        for &(df, q) in &[(1.0, 12.706), (4.0, 2.776), (9.0, 2.262), (29.0, 2.045)] {
            assert!((student_t_quantile(0.975, df) - q).abs() < 1e-3, "df={df}");
        }
        // Large df tends to the normal 1.959964.
        assert!((student_t_quantile(0.975, 1e6) - 1.959964).abs() < 1e-4);
    }

    #[test]
    fn batch_means_interval_covers_ar1_mean() {
        // AR(1) with φ = 0.9 (autocorrelation time ≈ 19): a naive iid interval would cover far less
        // than 95 %; batch means must stay close to the nominal level.
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let noise = Normal::new(0.0, 1.0).unwrap();
        let (mu, reps) = (3.0, 300);
        let mut covered = 0;
        let mut naive_covered = 0;
        for _ in 0..reps {
            let mut x = 0.0;
            let series: Vec<f64> = (0..2000)
                .map(|_| {
                    x = 0.9 * x + noise.sample(&mut rng);
                    mu + x
                })
                .collect();
            let ci = batch_means_interval(&series, 0.95).unwrap();
            if ci.low <= mu && mu <= ci.high {
                covered += 1;
            }
            let naive_se = (sample_variance(&series).unwrap() / series.len() as f64).sqrt();
            if (ci.mean - mu).abs() <= 1.96 * naive_se {
                naive_covered += 1;
            }
        }
        let rate = covered as f64 / reps as f64;
        let naive_rate = naive_covered as f64 / reps as f64;
        assert!((0.88..=0.99).contains(&rate), "batch-means coverage {rate}");
        assert!(
            naive_rate < 0.6,
            "naive coverage {naive_rate} should be poor"
        );
    }

    #[test]
    fn least_squares_matches_simple_regression_formulas() {
        // Simple regression closed forms: slope = Sxy/Sxx, se(slope) = s/√Sxx.
        let x = [1.0, 2.0, 3.5, 4.0, 6.0, 7.5];
        let y = [2.1, 3.9, 7.2, 8.1, 12.5, 14.6];
        let design: Vec<Vec<f64>> = x.iter().map(|&v| vec![1.0, v]).collect();
        let fit = least_squares(&design, &y).unwrap();
        let (mx, my) = (mean(&x).unwrap(), mean(&y).unwrap());
        let sxx: f64 = x.iter().map(|v| (v - mx).powi(2)).sum();
        let sxy: f64 = x.iter().zip(&y).map(|(a, b)| (a - mx) * (b - my)).sum();
        let slope = sxy / sxx;
        let intercept = my - slope * mx;
        let rss: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (b - intercept - slope * a).powi(2))
            .sum();
        let se = (rss / 4.0 / sxx).sqrt();
        assert!((fit.coef[1] - slope).abs() < 1e-12);
        assert!((fit.coef[0] - intercept).abs() < 1e-12);
        assert!((fit.rss - rss).abs() < 1e-12);
        assert!((fit.stderr[1] - se).abs() < 1e-12);
    }

    #[test]
    fn least_squares_rejects_rank_deficient_design() {
        let design = vec![vec![1.0, 2.0], vec![2.0, 4.0], vec![3.0, 6.0]];
        assert!(least_squares(&design, &[1.0, 2.0, 3.0]).is_none());
    }

    #[test]
    fn trailing_mean_averages_the_last_window_entries() {
        let got = trailing_mean(&[1.0, 3.0, 5.0, 7.0, 100.0], 3);
        assert_eq!(got, vec![1.0, 2.0, 3.0, 5.0, 112.0 / 3.0]);
        assert_eq!(trailing_mean(&[2.0, 4.0], 1), vec![2.0, 4.0]);
        assert_eq!(trailing_mean(&[2.0, 4.0], 0), vec![2.0, 4.0]);
        assert!(trailing_mean(&[], 5).is_empty());
    }
}
