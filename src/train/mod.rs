//! Training: SGD (optionally with momentum) with random reshuffling or with-replacement batches,
//! step- and batch-size schedules, exact step budgets, a stop-loss on the full training loss,
//! divergence detection, periodic evaluation, checkpoints with the whole resumable state (weights,
//! optimizer, batch order), and `metrics.csv`.
//!
//! A run is a pure function of its config and data: all randomness comes from seeded RNGs, and a run
//! resumed from any of its checkpoints ends bit-identical (CPU) to an uninterrupted one.

pub mod checkpoint;
pub mod dynamics;
pub mod measure;
pub mod metrics;
pub mod sampler;
pub mod schedule;

mod run;
pub(crate) use run::DeviceData;

pub use run::{train, Outcome, StartPoint, Status, TrainConfig};
#[cfg(test)]
mod tests;
