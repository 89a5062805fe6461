//! Which samples each SGD step sees. Random reshuffling draws a fresh permutation per epoch and takes
//! consecutive slices of b (⌊n/b⌋ steps per epoch, the remainder dropped); with-replacement sampling
//! draws every batch independently. Both are pure functions of (seed, position), so the sampler's whole
//! state is two integers: a checkpoint restores the exact batch sequence, and a branch started from a
//! checkpoint sees the batches the base run would have seen.

use rand::seq::index::sample;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How mini-batches are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// A fresh permutation each epoch, consecutive slices of b (the paper's default).
    #[default]
    Reshuffle,
    /// Each batch b distinct samples drawn uniformly, independently of earlier batches.
    Replacement,
}

/// Where the sampler stands: the resumable part of its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SamplerState {
    /// Current epoch (reshuffling) or number of batches drawn (replacement).
    pub epoch: u64,
    /// Position inside the current epoch's permutation (reshuffling only).
    pub cursor: u64,
}

/// Draws mini-batches of sample indices from `0..n`.
#[derive(Debug, Clone)]
pub struct BatchSampler {
    n: usize,
    seed: u64,
    sampling: Sampling,
    state: SamplerState,
    permutation: Vec<usize>,
}

impl BatchSampler {
    /// A sampler over `n` samples, at `state` (use `SamplerState::default()` to start).
    pub fn new(n: usize, seed: u64, sampling: Sampling, state: SamplerState) -> Self {
        let mut sampler = Self {
            n,
            seed,
            sampling,
            state,
            permutation: Vec::new(),
        };
        if sampling == Sampling::Reshuffle {
            sampler.permutation = sampler.epoch_permutation(state.epoch);
        }
        sampler
    }

    fn epoch_permutation(&self, epoch: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(epoch);
        let mut permutation: Vec<usize> = (0..self.n).collect();
        permutation.shuffle(&mut rng);
        permutation
    }

    /// The state to save in a checkpoint.
    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// Fractional epochs completed, for the metrics (`epoch` column).
    pub fn epochs_done(&self) -> f64 {
        match self.sampling {
            Sampling::Reshuffle => {
                self.state.epoch as f64 + self.state.cursor as f64 / self.n as f64
            }
            Sampling::Replacement => self.state.cursor as f64 / self.n as f64,
        }
    }

    /// The next batch of `batch_size` distinct indices (`batch_size` ≤ n).
    pub fn next_batch(&mut self, batch_size: usize) -> Vec<usize> {
        assert!(
            batch_size >= 1 && batch_size <= self.n,
            "batch size checked at resolve time"
        );
        match self.sampling {
            Sampling::Reshuffle => {
                if self.state.cursor as usize + batch_size > self.n {
                    self.state.epoch += 1;
                    self.state.cursor = 0;
                    self.permutation = self.epoch_permutation(self.state.epoch);
                }
                let start = self.state.cursor as usize;
                self.state.cursor += batch_size as u64;
                self.permutation[start..start + batch_size].to_vec()
            }
            Sampling::Replacement => {
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
                rng.set_stream(self.state.epoch);
                self.state.epoch += 1;
                self.state.cursor += batch_size as u64;
                sample(&mut rng, self.n, batch_size).into_vec()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshuffling_visits_every_sample_once_per_epoch_and_drops_the_remainder() {
        let mut sampler = BatchSampler::new(10, 7, Sampling::Reshuffle, SamplerState::default());
        let mut seen: Vec<usize> = (0..3).flat_map(|_| sampler.next_batch(3)).collect();
        seen.sort();
        assert_eq!(seen.len(), 9);
        seen.dedup();
        assert_eq!(seen.len(), 9, "no sample repeats within an epoch");
        sampler.next_batch(3); // 9 + 3 > 10: a new epoch starts
        assert_eq!(
            sampler.state(),
            SamplerState {
                epoch: 1,
                cursor: 3
            }
        );
    }

    #[test]
    fn epochs_use_different_permutations() {
        let mut sampler = BatchSampler::new(50, 1, Sampling::Reshuffle, SamplerState::default());
        let first = sampler.next_batch(50);
        let second = sampler.next_batch(50);
        assert_ne!(first, second);
    }

    #[test]
    fn restoring_a_state_continues_the_same_sequence() {
        for sampling in [Sampling::Reshuffle, Sampling::Replacement] {
            let mut a = BatchSampler::new(20, 3, sampling, SamplerState::default());
            for _ in 0..7 {
                a.next_batch(6);
            }
            let mut b = BatchSampler::new(20, 3, sampling, a.state());
            for _ in 0..10 {
                assert_eq!(a.next_batch(4), b.next_batch(4));
            }
        }
    }

    #[test]
    fn replacement_batches_hold_distinct_indices_and_vary() {
        let mut sampler = BatchSampler::new(30, 9, Sampling::Replacement, SamplerState::default());
        let a = sampler.next_batch(8);
        let mut sorted = a.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 8);
        assert_ne!(a, sampler.next_batch(8));
    }

    #[test]
    fn different_seeds_give_different_orders() {
        let mut a = BatchSampler::new(100, 1, Sampling::Reshuffle, SamplerState::default());
        let mut b = BatchSampler::new(100, 2, Sampling::Reshuffle, SamplerState::default());
        assert_ne!(a.next_batch(10), b.next_batch(10));
    }
}
