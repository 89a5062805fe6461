//! When things happen during a run: hyper-parameter changes at given steps, and measurement cadences
//! with the paper's doubling schedule (e.g. every 128 steps, every 256 after step 10k, 512 after 50k).

use serde::{Deserialize, Serialize};

/// A measurement cadence: every `every` steps, the interval doubling after each step in
/// `double_after`. Steps count from 0; step 0 is always measured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cadence {
    /// Base interval in steps (≥ 1).
    #[serde(deserialize_with = "interval")]
    pub every: u64,
    /// Steps after which the interval doubles (sorted ascending).
    #[serde(default)]
    pub double_after: Vec<u64>,
}

impl Cadence {
    /// Every `every` steps, never doubling.
    pub fn every(every: u64) -> Self {
        Self {
            every,
            double_after: Vec::new(),
        }
    }

    /// The interval in force at `step`.
    pub fn interval_at(&self, step: u64) -> u64 {
        let doublings = self.double_after.iter().filter(|&&s| step >= s).count() as u32;
        self.every.max(1) << doublings
    }

    /// Whether `step` is a measurement step.
    pub fn is_due(&self, step: u64) -> bool {
        step.is_multiple_of(self.interval_at(step))
    }
}

/// Deserializes a cadence's interval, refusing 0 (there is no "every 0 steps").
pub fn interval<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    match u64::deserialize(deserializer)? {
        0 => Err(serde::de::Error::custom(
            "must be at least 1 (steps between measurements)",
        )),
        every => Ok(every),
    }
}

/// A change of hyper-parameters taking effect at `step`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// First step using the new values.
    pub step: u64,
    /// New step size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// New batch size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
}

impl Change {
    /// Checks the values the change sets, naming the field at fault (`lr`, `batch_size`, or
    /// empty for a change that sets nothing) and what is wrong.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.lr.is_none() && self.batch_size.is_none() {
            return Err(("", "sets neither `lr` nor `batch_size`".into()));
        }
        if let Some(message) = self.lr.and_then(step_size_error) {
            return Err(("lr", message));
        }
        if self.batch_size == Some(0) {
            return Err(("batch_size", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// Why `lr` is not a step size (not positive, or not finite), or `None` when it is one.
pub fn step_size_error(lr: f64) -> Option<String> {
    (!(lr > 0.0 && lr.is_finite())).then(|| format!("must be a positive number, got {lr}"))
}

/// The param path of field `field` of change `index` (`schedule[1].lr`; `schedule[1]` for none).
pub fn schedule_path(index: usize, field: &str) -> String {
    match field {
        "" => format!("schedule[{index}]"),
        field => format!("schedule[{index}].{field}"),
    }
}

/// Step size and batch size at a given step: initial values plus a list of changes.
#[derive(Debug, Clone, PartialEq)]
pub struct HyperSchedule {
    lr: f64,
    batch_size: usize,
    changes: Vec<Change>,
}

impl HyperSchedule {
    /// Initial values and changes (in any order).
    pub fn new(lr: f64, batch_size: usize, mut changes: Vec<Change>) -> Self {
        changes.sort_by_key(|c| c.step);
        Self {
            lr,
            batch_size,
            changes,
        }
    }

    /// (step size, batch size) in force at `step`.
    pub fn at(&self, step: u64) -> (f64, usize) {
        let (mut lr, mut batch_size) = (self.lr, self.batch_size);
        for change in self.changes.iter().take_while(|c| c.step <= step) {
            lr = change.lr.unwrap_or(lr);
            batch_size = change.batch_size.unwrap_or(batch_size);
        }
        (lr, batch_size)
    }

    /// The largest batch size ever used (to validate against the dataset size).
    pub fn max_batch_size(&self) -> usize {
        self.changes
            .iter()
            .filter_map(|c| c.batch_size)
            .fold(self.batch_size, usize::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cadence_doubles_after_each_threshold() {
        let cadence = Cadence {
            every: 128,
            double_after: vec![10_000, 50_000],
        };
        assert!(cadence.is_due(0));
        assert!(cadence.is_due(128));
        assert!(!cadence.is_due(129));
        assert_eq!(cadence.interval_at(9_999), 128);
        assert_eq!(cadence.interval_at(10_000), 256);
        assert!(!cadence.is_due(10_112)); // 79 × 128, but not a multiple of 256
        assert!(cadence.is_due(10_240));
        assert_eq!(cadence.interval_at(60_000), 512);
    }

    #[test]
    fn schedule_applies_changes_from_their_step_on() {
        let schedule = HyperSchedule::new(
            0.01,
            16,
            vec![
                Change {
                    step: 200,
                    lr: None,
                    batch_size: Some(64),
                },
                Change {
                    step: 100,
                    lr: Some(0.02),
                    batch_size: None,
                },
            ],
        );
        assert_eq!(schedule.at(99), (0.01, 16));
        assert_eq!(schedule.at(100), (0.02, 16));
        assert_eq!(schedule.at(250), (0.02, 64));
        assert_eq!(schedule.max_batch_size(), 64);
    }
}
