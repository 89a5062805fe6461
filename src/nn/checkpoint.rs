//! Checkpoints: a model's parameters, optionally the optimiser's velocity, and caller-supplied extra
//! tensors and metadata strings, in one safetensors file that PyTorch reads as a `state_dict`.
//!
//! Layout of the file:
//! - model parameters under their PyTorch `state_dict` names and in PyTorch layout (linear weights
//!   (out, in), transposed from the in-memory (in, out); convolution weights as is), in the model's
//!   dtype. The names per architecture and the equivalent PyTorch modules are documented on
//!   [`Mlp`](super::models::Mlp), [`Cnn`](super::models::Cnn) and [`ResNet`](super::models::ResNet):
//!   MLP `layers.{i}.weight|bias`; CNN `conv{1,2,3}.weight|bias`, `fc{1,2}.weight|bias`; ResNet
//!   `conv1.weight`, `layer{s}.{b}.conv{1,2}.weight`, `linear.weight|bias`.
//! - the SGD velocity (PyTorch's `momentum_buffer`) of parameter `name` under
//!   `optimizer.momentum_buffer.{name}`, in the same PyTorch layout as the parameter;
//! - every extra tensor `k` under `extra.{k}`;
//! - the metadata strings as one sorted JSON object under the single safetensors metadata key `eoss`
//!   (a single key, because the safetensors crate writes its metadata map in hash order: with one key
//!   the bytes are identical across processes).
//!
//! Without optimiser state and extras the file is exactly a `state_dict`. With them, load it in
//! PyTorch with:
//! ```python
//! sd = safetensors.torch.load_file(path)
//! model.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("optimizer.", "extra."))})
//! ```
//! Files are written to a temporary file in the same directory and renamed into place, so a killed
//! writer never leaves a truncated checkpoint under the final name. Round trips are bit-exact.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::optim::Sgd;
use super::{Model, Param, TorchLayout};

const OPTIMIZER_PREFIX: &str = "optimizer.momentum_buffer.";
const EXTRA_PREFIX: &str = "extra.";
const METADATA_KEY: &str = "eoss";

/// Why a checkpoint could not be written or read; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The checkpoint file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid safetensors, or a tensor operation failed.
    #[error("{path}: {message}")]
    Format {
        /// The checkpoint file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The file does not match the model or optimiser it is loaded into.
    #[error("{path}: tensor `{name}`: {message}")]
    Mismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor at fault.
        name: String,
        /// What differs.
        message: String,
    },
}

/// What a caller stores beside the model: named tensors (e.g. RNG state, step) and strings.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// Tensors stored under `extra.{name}`, returned on the CPU when loaded.
    pub tensors: BTreeMap<String, Tensor>,
    /// Strings stored in the file's metadata.
    pub metadata: BTreeMap<String, String>,
}

fn format_err(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn to_torch(p: &Param, t: &Tensor) -> candle_core::Result<Tensor> {
    let t = t.detach().to_device(&Device::Cpu)?;
    match p.layout {
        TorchLayout::Same => t.contiguous(),
        TorchLayout::Transposed => t.t()?.contiguous(),
    }
}

fn from_torch(p: &Param, t: &Tensor) -> candle_core::Result<Tensor> {
    let t = match p.layout {
        TorchLayout::Same => t.clone(),
        TorchLayout::Transposed => t.t()?.contiguous()?,
    };
    t.to_device(p.var.device())
}

/// Writes `model`'s parameters, `optimizer`'s velocity (if it has momentum) and `extras` to `path`.
pub fn save(
    path: &Path,
    model: &dyn Model,
    optimizer: Option<&Sgd>,
    extras: &Extras,
) -> Result<(), CheckpointError> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let cpu = |r: candle_core::Result<Tensor>| r.map_err(|e| format_err(path, e));
    for p in model.params() {
        tensors.push((p.name.clone(), cpu(to_torch(p, p.var.as_tensor()))?));
    }
    if let Some(opt) = optimizer {
        for (p, v) in model.params().iter().zip(opt.velocity()) {
            tensors.push((
                format!("{OPTIMIZER_PREFIX}{}", p.name),
                cpu(to_torch(p, v.as_tensor()))?,
            ));
        }
    }
    for (k, t) in &extras.tensors {
        let t = cpu(t
            .detach()
            .to_device(&Device::Cpu)
            .and_then(|t| t.contiguous()))?;
        tensors.push((format!("{EXTRA_PREFIX}{k}"), t));
    }
    let metadata = serde_json::to_string(&extras.metadata).map_err(|e| format_err(path, e))?;
    let info = HashMap::from([(METADATA_KEY.to_string(), metadata)]);
    let bytes = safetensors::serialize(tensors, Some(info)).map_err(|e| format_err(path, e))?;
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(&bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Loads `path` into `model`'s parameters (and `optimizer`'s velocity when given) and returns the
/// extras. Every model parameter must be present with its exact PyTorch shape and dtype; unknown
/// tensor names are errors, as with PyTorch's strict `load_state_dict`.
pub fn load(
    path: &Path,
    model: &dyn Model,
    optimizer: Option<&Sgd>,
) -> Result<Extras, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| format_err(path, e))?;
    let metadata: BTreeMap<String, String> =
        match header.metadata().as_ref().and_then(|m| m.get(METADATA_KEY)) {
            Some(json) => serde_json::from_str(json).map_err(|e| format_err(path, e))?,
            None => BTreeMap::new(),
        };
    let mut stored = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| format_err(path, e))?;
    let mismatch = |name: &str, message: String| CheckpointError::Mismatch {
        path: path.to_path_buf(),
        name: name.to_string(),
        message,
    };
    let mut take = |name: &str, p: &Param| -> Result<Tensor, CheckpointError> {
        let t = stored
            .remove(name)
            .ok_or_else(|| mismatch(name, "missing".into()))?;
        let want = to_torch(p, p.var.as_tensor()).map_err(|e| format_err(path, e))?;
        if t.dims() != want.dims() || t.dtype() != want.dtype() {
            return Err(mismatch(
                name,
                format!(
                    "stored {:?} {:?}, model expects {:?} {:?}",
                    t.dtype(),
                    t.dims(),
                    want.dtype(),
                    want.dims()
                ),
            ));
        }
        from_torch(p, &t).map_err(|e| format_err(path, e))
    };
    let mut values = Vec::new();
    for p in model.params() {
        values.push(take(&p.name, p)?);
    }
    let mut velocity = Vec::new();
    if let Some(opt) = optimizer {
        if !opt.velocity().is_empty() {
            for p in model.params() {
                velocity.push(take(&format!("{OPTIMIZER_PREFIX}{}", p.name), p)?);
            }
        }
    }
    let mut extras = Extras {
        tensors: BTreeMap::new(),
        metadata,
    };
    for (name, t) in stored {
        if let Some(k) = name.strip_prefix(EXTRA_PREFIX) {
            extras.tensors.insert(k.to_string(), t);
        } else if !name.starts_with(OPTIMIZER_PREFIX) {
            return Err(mismatch(&name, "not a parameter of this model".into()));
        }
    }
    // Only now, with every tensor checked, overwrite the model and optimiser.
    let set = |var: &candle_core::Var, t: &Tensor, name: &str| {
        var.set(t).map_err(|e| mismatch(name, e.to_string()))
    };
    for (p, t) in model.params().iter().zip(&values) {
        set(&p.var, t, &p.name)?;
    }
    if let Some(opt) = optimizer {
        for ((p, v), t) in model.params().iter().zip(opt.velocity()).zip(&velocity) {
            set(v, t, &p.name)?;
        }
    }
    Ok(extras)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Activation, ModelSpec};
    use candle_core::DType;

    fn mlp(seed: u64) -> Box<dyn Model> {
        ModelSpec::Mlp {
            depth: 2,
            width: 5,
            activation: Activation::Relu,
        }
        .build([1, 2, 3], 4, 1.0, seed, DType::F32, &Device::Cpu)
        .unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    fn extras() -> Extras {
        let mut e = Extras::default();
        e.tensors.insert(
            "rng".into(),
            Tensor::new(&[7u32, 9, 11], &Device::Cpu).unwrap(),
        );
        e.metadata.insert("step".into(), "123".into());
        e.metadata.insert("arch".into(), "mlp".into());
        e
    }

    #[test]
    fn state_dict_names_and_torch_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let model = mlp(1);
        save(&path, model.as_ref(), None, &Extras::default()).unwrap();
        let stored = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let mut names: Vec<&String> = stored.keys().collect();
        names.sort();
        let want = [
            "layers.0.bias",
            "layers.0.weight",
            "layers.1.bias",
            "layers.1.weight",
            "layers.2.bias",
            "layers.2.weight",
        ];
        assert_eq!(names, want.iter().collect::<Vec<_>>());
        // nn.Linear(6, 5).weight is (out, in) = (5, 6), the transpose of the in-memory (6, 5).
        assert_eq!(stored["layers.0.weight"].dims(), &[5, 6]);
        assert_eq!(stored["layers.2.weight"].dims(), &[4, 5]);
        let mem = model.params()[0].var.as_tensor().to_vec2::<f32>().unwrap();
        let torch = stored["layers.0.weight"].to_vec2::<f32>().unwrap();
        for (o, row) in torch.iter().enumerate() {
            for (i, v) in row.iter().enumerate() {
                assert_eq!(*v, mem[i][o]);
            }
        }
        // Convolutions keep PyTorch's (out, in, kh, kw).
        let cnn = ModelSpec::Cnn {}
            .build([1, 12, 12], 3, 1.0, 0, DType::F32, &Device::Cpu)
            .unwrap();
        let path = dir.path().join("cnn.safetensors");
        save(&path, cnn.as_ref(), None, &Extras::default()).unwrap();
        let stored = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(stored["conv1.weight"].dims(), &[64, 1, 3, 3]);
        assert_eq!(
            bits(&stored["conv2.weight"]),
            bits(cnn.params()[2].var.as_tensor())
        );
        assert_eq!(stored["fc1.weight"].dims(), &[512, 128]);
        assert_eq!(stored["fc2.bias"].dims(), &[3]);
        // ResNet-14: akamaster names without BatchNorm, bias-free convolutions.
        let resnet = ModelSpec::Resnet { depth: 14 }
            .build([3, 8, 8], 10, 1.0, 0, DType::F32, &Device::Cpu)
            .unwrap();
        let names: Vec<&str> = resnet.params().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names.len(), 1 + 3 * 2 * 2 + 2);
        assert_eq!(
            &names[..3],
            &[
                "conv1.weight",
                "layer1.0.conv1.weight",
                "layer1.0.conv2.weight"
            ]
        );
        assert_eq!(&names[names.len() - 2..], &["linear.weight", "linear.bias"]);
        let path = dir.path().join("resnet.safetensors");
        save(&path, resnet.as_ref(), None, &Extras::default()).unwrap();
        let stored = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(stored.len(), names.len());
        assert_eq!(stored["layer2.0.conv1.weight"].dims(), &[32, 16, 3, 3]);
        assert_eq!(stored["layer3.1.conv2.weight"].dims(), &[64, 64, 3, 3]);
        assert_eq!(stored["linear.weight"].dims(), &[10, 64]);
    }

    #[test]
    fn round_trip_is_bit_exact_and_bytes_are_stable() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            dir.path().join("a.safetensors"),
            dir.path().join("b.safetensors"),
        );
        let model = mlp(1);
        let opt = Sgd::new(model.params(), 0.1, 0.9).unwrap();
        for (v, p) in opt.velocity().iter().zip(model.params()) {
            v.set(&(p.var.as_tensor() * 3.0).unwrap()).unwrap();
        }
        save(&a, model.as_ref(), Some(&opt), &extras()).unwrap();

        let other = mlp(2);
        let other_opt = Sgd::new(other.params(), 0.1, 0.9).unwrap();
        let got = load(&a, other.as_ref(), Some(&other_opt)).unwrap();
        for (p, q) in model.params().iter().zip(other.params()) {
            assert_eq!(
                bits(p.var.as_tensor()),
                bits(q.var.as_tensor()),
                "{}",
                p.name
            );
        }
        for (v, w) in opt.velocity().iter().zip(other_opt.velocity()) {
            assert_eq!(bits(v.as_tensor()), bits(w.as_tensor()));
        }
        assert_eq!(got.metadata, extras().metadata);
        assert_eq!(got.tensors["rng"].to_vec1::<u32>().unwrap(), vec![7, 9, 11]);
        save(&b, other.as_ref(), Some(&other_opt), &got).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }

    #[test]
    fn mismatches_name_the_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let model = mlp(1);
        save(&path, model.as_ref(), None, &Extras::default()).unwrap();
        let wider = ModelSpec::Mlp {
            depth: 2,
            width: 6,
            activation: Activation::Relu,
        }
        .build([1, 2, 3], 4, 1.0, 0, DType::F32, &Device::Cpu)
        .unwrap();
        let before = bits(wider.params()[5].var.as_tensor());
        let err = load(&path, wider.as_ref(), None).unwrap_err().to_string();
        assert!(
            err.contains("m.safetensors") && err.contains("layers.0.weight"),
            "{err}"
        );
        // Nothing was overwritten by the failed load.
        assert_eq!(bits(wider.params()[5].var.as_tensor()), before);
        // An optimiser with momentum needs the buffers.
        let opt = Sgd::new(model.params(), 0.1, 0.9).unwrap();
        let err = load(&path, model.as_ref(), Some(&opt))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`optimizer.momentum_buffer.layers.0.weight`: missing"),
            "{err}"
        );
        let f64_model = ModelSpec::Mlp {
            depth: 2,
            width: 5,
            activation: Activation::Relu,
        }
        .build([1, 2, 3], 4, 1.0, 0, DType::F64, &Device::Cpu)
        .unwrap();
        assert!(load(&path, f64_model.as_ref(), None)
            .unwrap_err()
            .to_string()
            .contains("F32"));
        let err = load(&dir.path().join("none.safetensors"), model.as_ref(), None).unwrap_err();
        assert!(err.to_string().contains("none.safetensors"));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(load(&path, model.as_ref(), None).is_err());
    }
}
