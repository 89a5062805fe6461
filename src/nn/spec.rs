//! `ModelSpec`: the YAML description of a network (`{arch: mlp, depth: 2, width: 512, activation:
//! relu}`, `{arch: cnn}`, `{arch: resnet, depth: 20}`) and the one builder that turns it into a
//! seeded, initialised [`Model`].

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::init::Initializer;
use super::layers::Activation;
use super::models::{Cnn, Mlp, ResNet};
use super::Model;

/// Why a model spec cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A field has a value the architecture does not allow.
    #[error("model.{field}: {message}")]
    Invalid {
        /// The field at fault (`depth`, `width`, …).
        field: &'static str,
        /// What is wrong and what would be right.
        message: String,
    },
}

/// Which network to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSpec {
    /// Fully connected network ([`Mlp`]).
    Mlp {
        /// Number of hidden layers (2 in the paper's main MLP, 4 in figures 19–20).
        #[serde(default = "default_mlp_depth")]
        depth: usize,
        /// Units per hidden layer.
        #[serde(default = "default_mlp_width")]
        width: usize,
        /// Nonlinearity between layers.
        #[serde(default)]
        activation: Activation,
    },
    /// The 5-layer CNN ([`Cnn`]); it has no options.
    Cnn {},
    /// CIFAR ResNet without BatchNorm ([`ResNet`]); depth 6n + 2 (14 or 20 in the paper).
    Resnet {
        /// Number of weight layers, 6n + 2.
        depth: usize,
    },
}

fn default_mlp_depth() -> usize {
    2
}

fn default_mlp_width() -> usize {
    512
}

impl ModelSpec {
    /// Checks the fields without building anything.
    pub fn validate(&self) -> Result<(), SpecError> {
        match *self {
            ModelSpec::Mlp { width: 0, .. } => Err(SpecError::Invalid {
                field: "width",
                message: "must be at least 1".into(),
            }),
            ModelSpec::Resnet { depth: 10 } => Err(SpecError::Invalid {
                field: "depth",
                message:
                    "the paper's \"ResNet-10\" is the 2-blocks-per-stage network, write depth: 14"
                        .into(),
            }),
            ModelSpec::Resnet { depth } if depth < 8 || (depth - 2) % 6 != 0 => {
                Err(SpecError::Invalid {
                    field: "depth",
                    message: format!("{depth} is not 6n + 2 with n ≥ 1 (e.g. 14 or 20)"),
                })
            }
            _ => Ok(()),
        }
    }

    /// Builds the network for inputs (C, H, W) and `outputs` outputs, with Kaiming-normal weights
    /// times `init_scale` drawn from a `ChaCha8Rng` seeded with `seed` (bit-identical for equal
    /// arguments) and zero biases, in `dtype` on `device`.
    pub fn build(
        &self,
        input: [usize; 3],
        outputs: usize,
        init_scale: f64,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Box<dyn Model>> {
        self.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if outputs == 0 || input.contains(&0) {
            candle_core::bail!("model: input {input:?} and outputs {outputs} must be non-zero");
        }
        let init = Initializer::new(seed, init_scale, dtype, device);
        Ok(match *self {
            ModelSpec::Mlp {
                depth,
                width,
                activation,
            } => {
                let features = input.iter().product();
                Box::new(Mlp::new(features, depth, width, outputs, activation, init)?)
            }
            ModelSpec::Cnn {} => Box::new(Cnn::new(input, outputs, init)?),
            ModelSpec::Resnet { depth } => {
                Box::new(ResNet::new((depth - 2) / 6, input[0], outputs, init)?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<ModelSpec, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    #[test]
    fn yaml_forms_parse_with_defaults() {
        assert_eq!(
            parse("{arch: mlp, depth: 4, width: 256, activation: tanh}").unwrap(),
            ModelSpec::Mlp {
                depth: 4,
                width: 256,
                activation: Activation::Tanh
            }
        );
        assert_eq!(
            parse("arch: mlp").unwrap(),
            ModelSpec::Mlp {
                depth: 2,
                width: 512,
                activation: Activation::Relu
            }
        );
        assert_eq!(
            parse("{arch: mlp, activation: linear}").unwrap(),
            ModelSpec::Mlp {
                depth: 2,
                width: 512,
                activation: Activation::Linear
            }
        );
        assert_eq!(parse("{arch: cnn}").unwrap(), ModelSpec::Cnn {});
        assert_eq!(
            parse("{arch: resnet, depth: 20}").unwrap(),
            ModelSpec::Resnet { depth: 20 }
        );
        // Canonical JSON spells out every default.
        let json = serde_json::to_value(parse("arch: mlp").unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"arch": "mlp", "depth": 2, "width": 512, "activation": "relu"})
        );
        assert_eq!(
            serde_json::to_value(ModelSpec::Cnn {}).unwrap(),
            serde_json::json!({"arch": "cnn"})
        );
    }

    #[test]
    fn unknown_fields_and_values_are_rejected() {
        for bad in [
            "{arch: mlp, widht: 3}",
            "{arch: cnn, width: 3}",
            "{arch: resnet, depth: 20, blocks: 3}",
            "{arch: resnet}",
            "{arch: vit}",
            "{arch: mlp, activation: gelu}",
        ] {
            assert!(parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn invalid_depths_are_named() {
        let err = ModelSpec::Resnet { depth: 16 }.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "model.depth: 16 is not 6n + 2 with n ≥ 1 (e.g. 14 or 20)"
        );
        assert!(ModelSpec::Resnet { depth: 10 }
            .validate()
            .unwrap_err()
            .to_string()
            .contains("depth: 14"));
        assert!(ModelSpec::Resnet { depth: 2 }.validate().is_err());
        assert!(ModelSpec::Mlp {
            depth: 0,
            width: 0,
            activation: Activation::Relu
        }
        .validate()
        .is_err());
        let e =
            ModelSpec::Resnet { depth: 16 }.build([3, 8, 8], 10, 1.0, 0, DType::F32, &Device::Cpu);
        assert!(e.is_err());
        let e = ModelSpec::Cnn {}.build([3, 11, 11], 10, 1.0, 0, DType::F32, &Device::Cpu);
        assert!(e.err().unwrap().to_string().contains("too small"));
        // depth 0 is a linear model.
        let m = ModelSpec::Mlp {
            depth: 0,
            width: 5,
            activation: Activation::Relu,
        }
        .build([1, 2, 2], 3, 1.0, 0, DType::F64, &Device::Cpu)
        .unwrap();
        assert_eq!(m.num_params(), 4 * 3 + 3);
    }
}
