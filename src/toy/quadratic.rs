//! SGD on the 1-D quadratic of figure 3: L(x) = 1/(2N) Σᵢ (x − aᵢ)², aᵢ ~ N(0, 1) seeded.
//!
//! Closed forms used throughout (ā = mean of a, σ² = population variance of a, y = x − ā):
//! L(x) = ½(y² + σ²), ∇L = y, H = λmax = 1 (every mini-batch Hessian is 1 as well). A batch B
//! gives ∇L_B = x − ā_B, so E_B[∇L_Bᵀ H ∇L_B] = y² + v_b with v_b = Var(ā_B): σ²/b when batches are
//! drawn with replacement, σ²/b · (N − b)/(N − 1) for a uniform b-subset (random reshuffling).
//! Hence GNI(x) = 1 + v_b / y² exactly, and with i.i.d. batches the stationary law of
//! y_{t+1} = (1 − η) y_t − η ξ_t has E\[y²\] = η v_b / (2 − η) for 0 < η < 2, so
//! E\[E_B ∇L_B²\] / E\[y²\] = 2/η exactly; for η > 2 the iteration diverges (paper, appendix D.1).

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::train::schedule::{schedule_path, step_size_error, Change, HyperSchedule};

/// How mini-batches are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// A fresh permutation each epoch, consecutive slices of b, ⌊N/b⌋ steps per epoch.
    #[default]
    Reshuffle,
    /// b indices drawn independently with replacement each step.
    Replacement,
}

/// The data aᵢ of one quadratic problem and its closed-form statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct QuadraticProblem {
    /// The targets aᵢ.
    pub a: Vec<f64>,
    /// Their mean ā (the minimiser).
    pub mean: f64,
    /// Their population variance σ² (so the minimum loss is σ²/2).
    pub variance: f64,
}

impl QuadraticProblem {
    /// Draws N targets from N(0, 1) with a seeded RNG.
    pub fn sample(n: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Self::from_targets((0..n).map(|_| StandardNormal.sample(&mut rng)).collect())
    }

    /// Wraps given targets.
    pub fn from_targets(a: Vec<f64>) -> Self {
        let n = a.len().max(1) as f64;
        let mean = a.iter().sum::<f64>() / n;
        let variance = a.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        QuadraticProblem { a, mean, variance }
    }

    /// Full-batch loss L(x) = ½((x − ā)² + σ²).
    pub fn loss(&self, x: f64) -> f64 {
        0.5 * ((x - self.mean).powi(2) + self.variance)
    }

    /// Variance of the batch mean ā_B for batch size `b` under `sampling`.
    pub fn batch_mean_variance(&self, b: usize, sampling: Sampling) -> f64 {
        let n = self.a.len() as f64;
        let b = b as f64;
        match sampling {
            Sampling::Replacement => self.variance / b,
            Sampling::Reshuffle if n > 1.0 => self.variance / b * (n - b) / (n - 1.0),
            Sampling::Reshuffle => 0.0,
        }
    }

    /// GNI over a trailing window of `window` steps of a trajectory whose squared full gradients
    /// are `grad_norm_sq`: the ratio of the sums of its numerator E_B[∇L_B²] = ∇L² + v_b and of its
    /// denominator ∇L² over the last `window` steps (fewer at the start). It is the time average
    /// that sits at 2/η while SGD oscillates (module docs); GNI at a single step, 1 + v_b / ∇L², is
    /// heavy-tailed (it is unbounded as the iterate crosses the minimum).
    pub fn windowed_gni(
        &self,
        grad_norm_sq: &[f64],
        b: usize,
        sampling: Sampling,
        window: usize,
    ) -> Vec<f64> {
        let v = self.batch_mean_variance(b, sampling);
        let mut sum = 0.0;
        (0..grad_norm_sq.len())
            .map(|t| {
                sum += grad_norm_sq[t];
                if t >= window {
                    sum -= grad_norm_sq[t - window];
                }
                let k = (t + 1).min(window) as f64;
                1.0 + k * v / sum
            })
            .collect()
    }

    /// GNI(x) = E_B[∇L_B(x)²] / ∇L(x)² (H = 1).
    pub fn gni(&self, x: f64, b: usize, sampling: Sampling) -> f64 {
        let y2 = (x - self.mean).powi(2);
        (y2 + self.batch_mean_variance(b, sampling)) / y2
    }
}

/// Settings of one SGD run on the quadratic.
#[derive(Debug, Clone, PartialEq)]
pub struct QuadraticConfig {
    /// Number of data points N.
    pub n: usize,
    /// Batch size b (1 ≤ b ≤ N).
    pub batch_size: usize,
    /// Step size η at step 0.
    pub lr: f64,
    /// Step-size changes (`lr` only: the batch size is fixed), e.g. η stepped across 2/λmax = 2
    /// in one run (the paper's figure 3).
    pub schedule: Vec<Change>,
    /// Number of SGD steps.
    pub steps: usize,
    /// Seed of the data (stream 0) and of the batch order (stream 1).
    pub seed: u64,
    /// Starting point x₀.
    pub x0: f64,
    /// How batches are drawn.
    pub sampling: Sampling,
    /// The run counts as diverged once the full loss exceeds this (or is not finite).
    pub divergence_loss: f64,
}

/// What is recorded at each step, at x_t before the update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuadraticStep {
    /// Step index t.
    pub step: usize,
    /// Epoch index (t divided by steps per epoch).
    pub epoch: usize,
    /// Step size η used for the update from x_t.
    pub lr: f64,
    /// The iterate x_t.
    pub x: f64,
    /// Loss of the batch used at this step.
    pub batch_loss: f64,
    /// Full-batch loss L(x_t).
    pub full_loss: f64,
    /// ‖∇L(x_t)‖².
    pub grad_norm_sq: f64,
    /// Gradient-noise interaction at x_t (closed form, see module docs).
    pub gni: f64,
}

/// A run: its steps, and the step at which it diverged, if it did.
#[derive(Debug, Clone, PartialEq)]
pub struct QuadraticRun {
    /// The problem that was optimised.
    pub problem: QuadraticProblem,
    /// One record per step taken (the diverging step is the last).
    pub steps: Vec<QuadraticStep>,
    /// First step whose full loss exceeded the divergence threshold.
    pub diverged_at: Option<usize>,
}

/// Why a quadratic run could not start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuadraticError {
    /// A setting is out of range.
    #[error("quadratic: {field}: {message}")]
    Invalid {
        /// The setting at fault, as a path (`batch_size`, `schedule[1].lr`).
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl QuadraticConfig {
    /// Checks every setting, naming the first one at fault by its path.
    pub fn validate(&self) -> Result<(), QuadraticError> {
        let invalid =
            |field: String, message: String| Err(QuadraticError::Invalid { field, message });
        if self.n == 0 {
            return invalid("n".into(), "must be at least 1".into());
        }
        if self.batch_size == 0 || self.batch_size > self.n {
            return invalid(
                "batch_size".into(),
                format!("must lie in 1..={} (n), got {}", self.n, self.batch_size),
            );
        }
        if let Some(message) = step_size_error(self.lr) {
            return invalid("lr".into(), message);
        }
        for (i, change) in self.schedule.iter().enumerate() {
            if change.batch_size.is_some() {
                return invalid(
                    schedule_path(i, "batch_size"),
                    "the quadratic takes step-size changes only".into(),
                );
            }
            change
                .check()
                .or_else(|(field, message)| invalid(schedule_path(i, field), message))?;
        }
        Ok(())
    }
}

/// Runs SGD `x ← x − η ∇L_B(x)` with the configured sampling, stopping early on divergence.
pub fn run_sgd(config: &QuadraticConfig) -> Result<QuadraticRun, QuadraticError> {
    config.validate()?;
    let schedule = HyperSchedule::new(config.lr, config.batch_size, config.schedule.clone());
    let problem = QuadraticProblem::sample(config.n, config.seed);
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream(1);
    let b = config.batch_size;
    let steps_per_epoch = config.n / b;
    let mut order: Vec<usize> = (0..config.n).collect();
    let mut batch = vec![0usize; b];
    let mut x = config.x0;
    let mut steps = Vec::with_capacity(config.steps);
    let mut diverged_at = None;
    for t in 0..config.steps {
        match config.sampling {
            Sampling::Reshuffle => {
                let slot = t % steps_per_epoch;
                if slot == 0 {
                    order.shuffle(&mut rng);
                }
                batch.copy_from_slice(&order[slot * b..(slot + 1) * b]);
            }
            Sampling::Replacement => {
                for i in batch.iter_mut() {
                    *i = rng.random_range(0..config.n);
                }
            }
        }
        let batch_mean = batch.iter().map(|&i| problem.a[i]).sum::<f64>() / b as f64;
        let batch_loss = batch
            .iter()
            .map(|&i| (x - problem.a[i]).powi(2))
            .sum::<f64>()
            / (2.0 * b as f64);
        let full_loss = problem.loss(x);
        let (lr, _) = schedule.at(t as u64);
        steps.push(QuadraticStep {
            step: t,
            epoch: t / steps_per_epoch,
            lr,
            x,
            batch_loss,
            full_loss,
            grad_norm_sq: (x - problem.mean).powi(2),
            gni: problem.gni(x, b, config.sampling),
        });
        if full_loss.is_nan() || full_loss > config.divergence_loss {
            diverged_at = Some(t);
            break;
        }
        x -= lr * (x - batch_mean);
    }
    Ok(QuadraticRun {
        problem,
        steps,
        diverged_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(lr: f64, sampling: Sampling) -> QuadraticConfig {
        QuadraticConfig {
            n: 100,
            batch_size: 10,
            lr,
            schedule: Vec::new(),
            steps: 30_000,
            seed: 4,
            x0: 3.0,
            sampling,
            divergence_loss: 1e10,
        }
    }

    #[test]
    fn loss_and_gni_match_direct_sums_and_batch_enumeration() {
        let p = QuadraticProblem::sample(6, 1);
        let x = 0.7;
        let direct: f64 = p.a.iter().map(|a| (x - a).powi(2)).sum::<f64>() / 12.0;
        assert!((p.loss(x) - direct).abs() < 1e-14);
        // E_B[(x − ā_B)²] over all 2-subsets (reshuffle) and all ordered 2-tuples (replacement).
        let (mut subsets, mut count) = (0.0, 0.0);
        let mut tuples = 0.0;
        for i in 0..6 {
            for j in 0..6 {
                let g = (x - (p.a[i] + p.a[j]) / 2.0).powi(2);
                tuples += g / 36.0;
                if i < j {
                    subsets += g;
                    count += 1.0;
                }
            }
        }
        let y2 = (x - p.mean).powi(2);
        assert!((p.gni(x, 2, Sampling::Reshuffle) - subsets / count / y2).abs() < 1e-12);
        assert!((p.gni(x, 2, Sampling::Replacement) - tuples / y2).abs() < 1e-12);
    }

    #[test]
    fn below_two_over_lambda_it_oscillates_at_the_stationary_variance() {
        // λmax = 1, so η < 2 is stable: E[y²] → η v_b / (2 − η) and the ratio of time-averaged GNI
        // numerator and denominator → 2/η (module docs).
        for &lr in &[0.5, 1.5] {
            let run = run_sgd(&config(lr, Sampling::Replacement)).unwrap();
            assert_eq!(run.diverged_at, None);
            let v = run.problem.batch_mean_variance(10, Sampling::Replacement);
            let tail = &run.steps[1000..];
            let ey2 = tail.iter().map(|s| s.grad_norm_sq).sum::<f64>() / tail.len() as f64;
            let expected = lr * v / (2.0 - lr);
            assert!(
                (ey2 / expected - 1.0).abs() < 0.08,
                "lr {lr}: {ey2} vs {expected}"
            );
            let num = tail.iter().map(|s| s.gni * s.grad_norm_sq).sum::<f64>();
            let den = tail.iter().map(|s| s.grad_norm_sq).sum::<f64>();
            assert!(
                (num / den * lr / 2.0 - 1.0).abs() < 0.08,
                "lr {lr}: GNI {}",
                num / den
            );
        }
    }

    #[test]
    fn windowed_gni_is_the_ratio_of_sums_of_numerator_and_denominator() {
        let run = run_sgd(&config(1.5, Sampling::Reshuffle)).unwrap();
        let g2: Vec<f64> = run.steps.iter().map(|s| s.grad_norm_sq).collect();
        let windowed = run.problem.windowed_gni(&g2, 10, Sampling::Reshuffle, 7);
        for t in [0, 3, 6, 7, 500, g2.len() - 1] {
            let window = &run.steps[t.saturating_sub(6)..=t];
            let num: f64 = window.iter().map(|s| s.gni * s.grad_norm_sq).sum();
            let den: f64 = window.iter().map(|s| s.grad_norm_sq).sum();
            assert!(
                (windowed[t] / (num / den) - 1.0).abs() < 1e-9,
                "step {t}: {} vs {}",
                windowed[t],
                num / den
            );
        }
    }

    #[test]
    fn reshuffled_sgd_is_stable_below_two_and_diverges_above() {
        for &lr in &[0.1, 1.0, 1.9] {
            let run = run_sgd(&config(lr, Sampling::Reshuffle)).unwrap();
            assert_eq!(run.diverged_at, None, "lr {lr}");
            assert_eq!(run.steps.len(), 30_000);
            assert_eq!(run.steps[25].epoch, 2); // 10 steps per epoch
        }
        let run = run_sgd(&config(2.2, Sampling::Reshuffle)).unwrap();
        // |1 − η| = 1.2 per step from loss ≈ 5 to 1e10: about ln(1e10/5)/(2 ln 1.2) ≈ 59 steps.
        let at = run.diverged_at.expect("η = 2.2 > 2/λmax must diverge");
        assert!((40..80).contains(&at), "diverged at {at}");
        assert_eq!(run.steps.len(), at + 1);
    }

    #[test]
    fn a_stepped_step_size_oscillates_at_each_level_and_diverges_only_past_two() {
        // η = 0.5 → 1.5 → 2.2 in one run: each stable segment settles at its own stationary
        // E[y²] = η v_b / (2 − η) within a few steps, the run matches the constant-η run up to the
        // first change (same batches), and it diverges only once η = 2.2 > 2/λmax.
        let change = |step, lr| Change {
            step,
            lr: Some(lr),
            batch_size: None,
        };
        let mut c = config(0.5, Sampling::Replacement);
        c.schedule = vec![change(20_000, 2.2), change(10_000, 1.5)];
        let run = run_sgd(&c).unwrap();
        let constant = run_sgd(&config(0.5, Sampling::Replacement)).unwrap();
        assert_eq!(run.steps[..10_000], constant.steps[..10_000]);
        let v = run.problem.batch_mean_variance(10, Sampling::Replacement);
        for (lr, from, to) in [(0.5, 1_000, 10_000), (1.5, 11_000, 20_000)] {
            let segment = &run.steps[from..to];
            assert!(segment.iter().all(|s| s.lr == lr));
            let ey2 = segment.iter().map(|s| s.grad_norm_sq).sum::<f64>() / segment.len() as f64;
            let expected = lr * v / (2.0 - lr);
            assert!(
                (ey2 / expected - 1.0).abs() < 0.1,
                "η {lr}: {ey2} vs {expected}"
            );
        }
        let at = run.diverged_at.expect("η = 2.2 must diverge");
        assert!((20_040..20_080).contains(&at), "diverged at {at}");
        assert_eq!(run.steps[at].lr, 2.2);
    }

    #[test]
    fn runs_are_reproducible_and_validated() {
        let c = config(0.8, Sampling::Reshuffle);
        assert_eq!(run_sgd(&c).unwrap(), run_sgd(&c).unwrap());
        let mut other = c.clone();
        other.seed = 5;
        assert_ne!(
            run_sgd(&c).unwrap().steps[50].x,
            run_sgd(&other).unwrap().steps[50].x
        );
        let mut bad = c.clone();
        bad.batch_size = 101;
        assert!(run_sgd(&bad)
            .unwrap_err()
            .to_string()
            .contains("batch_size"));
        bad = c.clone();
        bad.lr = -1.0;
        assert!(run_sgd(&bad).is_err());
        bad = c.clone();
        bad.schedule = vec![Change {
            step: 10,
            lr: Some(f64::NAN),
            batch_size: None,
        }];
        assert!(run_sgd(&bad).unwrap_err().to_string().contains("lr"));
        bad.schedule[0] = Change {
            step: 10,
            lr: None,
            batch_size: Some(5),
        };
        assert!(run_sgd(&bad)
            .unwrap_err()
            .to_string()
            .contains("schedule[0].batch_size: the quadratic takes step-size changes only"));
    }
}
