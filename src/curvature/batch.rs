//! A batch of samples (inputs + targets) on a device, and the uniform mini-batch sampling the
//! estimators use: subsets of size b drawn without replacement from the full set given, each batch
//! drawn independently of the others.

use candle_core::Tensor;
use rand::Rng;

use super::{CandleContext, CurvatureError, Result};
use crate::nn::loss::Targets;

/// Inputs (N, C, H, W) and their targets.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Inputs, leading dimension N.
    pub inputs: Tensor,
    /// Targets of the same N samples.
    pub targets: Targets,
}

impl Batch {
    /// Checks that inputs and targets describe the same, non-empty set of samples.
    pub fn new(inputs: Tensor, targets: Targets) -> Result<Self> {
        let n = inputs.dims().first().copied().unwrap_or(0);
        let t = targets.values.dims().first().copied().unwrap_or(0);
        if n == 0 {
            return Err(CurvatureError::Batch("no samples".into()));
        }
        if n != t {
            return Err(CurvatureError::Batch(format!("{n} inputs but {t} targets")));
        }
        Ok(Self { inputs, targets })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.inputs.dims()[0]
    }

    /// Whether the batch holds no sample (never true for a batch made by [`Batch::new`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples at `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> Result<Batch> {
        let n = self.len();
        if rows.is_empty() {
            return Err(CurvatureError::Batch("empty selection".into()));
        }
        if let Some(bad) = rows.iter().find(|&&r| r >= n) {
            return Err(CurvatureError::Batch(format!(
                "row {bad} out of range for {n} samples"
            )));
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), self.inputs.device()).ctx("batch selection")?;
        Ok(Batch {
            inputs: self.inputs.index_select(&idx, 0).ctx("batch selection")?,
            targets: self.targets.select(&idx).ctx("batch selection")?,
        })
    }

    /// Samples `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Batch> {
        Ok(Batch {
            inputs: self.inputs.narrow(0, start, len).ctx("batch chunk")?,
            targets: self.targets.narrow(start, len).ctx("batch chunk")?,
        })
    }
}

/// A uniform random subset of size `b` of `0..n`, drawn without replacement.
pub fn random_subset<R: Rng>(rng: &mut R, n: usize, b: usize) -> Result<Vec<usize>> {
    if b == 0 || b > n {
        return Err(CurvatureError::Config {
            field: "batch_size",
            message: format!("must be in 1..={n} (the number of samples), got {b}"),
        });
    }
    Ok(rand::seq::index::sample(rng, n, b).into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn subsets_are_uniform_without_replacement() {
        // n = 4, b = 2: 6 subsets, each with probability 1/6.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut counts = std::collections::BTreeMap::new();
        let draws = 6000;
        for _ in 0..draws {
            let mut s = random_subset(&mut rng, 4, 2).unwrap();
            assert_ne!(s[0], s[1]);
            s.sort();
            *counts.entry(s).or_insert(0usize) += 1;
        }
        assert_eq!(counts.len(), 6);
        for c in counts.values() {
            // Binomial(6000, 1/6): sd ≈ 28.9; 5 sd.
            assert!((*c as f64 - 1000.0).abs() < 145.0, "{counts:?}");
        }
        assert!(random_subset(&mut rng, 4, 5).is_err());
        assert!(random_subset(&mut rng, 4, 0).is_err());
    }
}
