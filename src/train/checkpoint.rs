//! Checkpoints of a run: `checkpoints/step-00001000.safetensors`, each holding the weights under their
//! PyTorch names (loadable with `load_state_dict`), the optimizer state, and the resumable training
//! state (step and batch-sampler position) as metadata. Files are written to a temporary name and
//! renamed, so a killed run never leaves a truncated checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sampler::SamplerState;
use crate::nn::optim::Sgd;
use crate::nn::{checkpoint as weights, Model};
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
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
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

/// Writes the checkpoint of `state.step` into `dir` atomically.
pub fn save(
    dir: &Path,
    state: &TrainState,
    model: &dyn Model,
    optimizer: &Sgd,
) -> Result<PathBuf, StageError> {
    let path = dir.join(file_name(state.step));
    let partial = dir.join(format!(".{}.partial", file_name(state.step)));
    let mut metadata = BTreeMap::new();
    metadata.insert(
        STATE_KEY.to_string(),
        serde_json::to_string(state).expect("train state serializes"),
    );
    weights::save(&partial, model, Some(optimizer), &metadata)?;
    std::fs::rename(&partial, &path).map_err(|e| StageError::io(&path, e))?;
    Ok(path)
}

/// Loads weights and optimizer state from `path` into `model` and `optimizer`, returning the state.
pub fn load(path: &Path, model: &dyn Model, optimizer: &mut Sgd) -> Result<TrainState, StageError> {
    let metadata = weights::load(path, model, Some(optimizer))?;
    let text = metadata.get(STATE_KEY).ok_or_else(|| {
        StageError::Failed(format!("{}: not an eoss training checkpoint", path.display()))
    })?;
    serde_json::from_str(text)
        .map_err(|e| StageError::Failed(format!("{}: bad training state: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_checkpoints_in_step_order_ignoring_partial_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in [file_name(200), file_name(10), ".step-00000300.safetensors.partial".into()] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let steps: Vec<u64> = list(dir.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![10, 200]);
        assert!(list(&dir.path().join("absent")).unwrap().is_empty());
    }
}
