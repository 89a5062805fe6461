//! Checkpoints of a run: `checkpoints/step-00001000.safetensors`, each holding the weights under their
//! PyTorch names (loadable with `load_state_dict`), the optimizer state, and the resumable training
//! state (step and batch-sampler position) as metadata. Files are written to a temporary name and
//! renamed, so a killed run never leaves a truncated checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use candle_core::Tensor;

use super::measure::MeasureState;
use super::sampler::SamplerState;
use crate::curvature::ParamVec;
use crate::nn::checkpoint::{self as weights, Extras};
use crate::nn::optim::Sgd;
use crate::nn::Model;
use crate::stages::StageError;

/// The resumable state besides weights and optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainState {
    /// The step about to be taken (weights are θ_step).
    pub step: u64,
    /// Position of the batch sampler.
    pub sampler: SamplerState,
}

const STATE_KEY: &str = "eoss.train_state";

/// File name of the checkpoint of `step`.
pub fn file_name(step: u64) -> String {
    format!("step-{step:08}.safetensors")
}

/// Checkpoints present in `dir`, by step, ascending.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StageError> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(StageError::io(dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| StageError::io(dir, e))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|rest| rest.strip_suffix(".safetensors"))
            .and_then(|digits| digits.parse::<u64>().ok())
        {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Warm-start vectors of the measurements, stored as extra tensors `<name>.<part>`.
const WARM_VECTORS: [&str; 2] = ["lambda_max_vector", "lambda_max_gn_vector"];

fn warm_slots(measure: &mut MeasureState) -> [&mut Option<ParamVec>; 2] {
    [
        &mut measure.lambda_max_vector,
        &mut measure.lambda_max_gn_vector,
    ]
}

/// Adds the measurements' warm-start vectors to `extras`, as tensors `<name>.<part>`.
pub fn store_warm_vectors(measure: &MeasureState, extras: &mut Extras) {
    let vectors = [&measure.lambda_max_vector, &measure.lambda_max_gn_vector];
    for (name, vector) in WARM_VECTORS.iter().zip(vectors) {
        for (part, tensor) in vector.iter().flat_map(|v| v.parts().iter().enumerate()) {
            extras
                .tensors
                .insert(format!("{name}.{part:04}"), tensor.clone());
        }
    }
}

/// Restores the warm-start vectors [`store_warm_vectors`] put in `extras`, in the dtype and on the
/// device of `model`'s parameters.
pub fn restore_warm_vectors(
    extras: &Extras,
    model: &dyn Model,
    measure: &mut MeasureState,
) -> candle_core::Result<()> {
    let template = model.params();
    for (name, slot) in WARM_VECTORS.iter().zip(warm_slots(measure)) {
        let prefix = format!("{name}.");
        let parts: BTreeMap<&String, &Tensor> = extras
            .tensors
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .collect();
        if parts.is_empty() {
            continue;
        }
        let parts = parts
            .into_values()
            .zip(template)
            .map(|(t, p)| t.to_dtype(p.var.dtype())?.to_device(p.var.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        *slot = Some(ParamVec::new(parts));
    }
    Ok(())
}

fn failed(path: &Path, e: impl std::fmt::Display) -> StageError {
    StageError::Failed(format!("{}: {e}", path.display()))
}

/// A checkpoint error as a stage failure (its message already names the file).
fn named(e: weights::CheckpointError) -> StageError {
    StageError::Failed(e.to_string())
}

/// Removes what a run killed while writing a checkpoint left behind (hidden temporary files).
pub fn remove_partial(dir: &Path) -> Result<(), StageError> {
    for entry in std::fs::read_dir(dir).map_err(|e| StageError::io(dir, e))? {
        let path = entry.map_err(|e| StageError::io(dir, e))?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
        {
            std::fs::remove_file(&path).map_err(|e| StageError::io(&path, e))?;
        }
    }
    Ok(())
}

/// Writes the checkpoint of `state.step` into `dir` (atomically: the file appears complete or not
/// at all), with the measurements' warm-start vectors so that a resumed run measures identically.
pub fn save(
    dir: &Path,
    state: &TrainState,
    model: &dyn Model,
    optimizer: &Sgd,
    measure: &MeasureState,
) -> Result<PathBuf, StageError> {
    let path = dir.join(file_name(state.step));
    let mut extras = Extras::default();
    extras.metadata.insert(
        STATE_KEY.to_string(),
        serde_json::to_string(state).expect("train state serializes"),
    );
    store_warm_vectors(measure, &mut extras);
    weights::save(&path, model, Some(optimizer), &extras).map_err(named)?;
    Ok(path)
}

/// Loads weights, optimizer state and warm-start vectors from `path`, returning the training state.
pub fn load(
    path: &Path,
    model: &dyn Model,
    optimizer: &Sgd,
    measure: &mut MeasureState,
) -> Result<TrainState, StageError> {
    let extras = weights::load(path, model, Some(optimizer)).map_err(named)?;
    let text = extras
        .metadata
        .get(STATE_KEY)
        .ok_or_else(|| failed(path, "not an eoss training checkpoint"))?;
    let state =
        serde_json::from_str(text).map_err(|e| failed(path, format!("bad training state: {e}")))?;
    restore_warm_vectors(&extras, model, measure).map_err(|e| failed(path, e))?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_checkpoints_in_step_order_ignoring_partial_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            file_name(200),
            file_name(10),
            ".step-00000300.safetensors.partial".into(),
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let steps: Vec<u64> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, vec![10, 200]);
        assert!(list(&dir.path().join("absent")).unwrap().is_empty());
        remove_partial(dir.path()).unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left.len(),
            2,
            "only the complete checkpoints remain: {left:?}"
        );
    }
}
