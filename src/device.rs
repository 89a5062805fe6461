//! Device classes a stage may run on. The class enters artifact keys, since results differ by device.

use serde::{Deserialize, Serialize};

/// Where a stage computes: the CPU everywhere, CUDA when built with the `cuda` feature.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceClass {
    /// The CPU (bit-reproducible).
    #[default]
    Cpu,
    /// The first CUDA GPU (needs the `cuda` cargo feature).
    Cuda,
}

impl DeviceClass {
    /// The candle device for this class, or an error explaining how to get it.
    pub fn candle_device(self) -> candle_core::Result<candle_core::Device> {
        match self {
            DeviceClass::Cpu => Ok(candle_core::Device::Cpu),
            DeviceClass::Cuda => {
                if cfg!(feature = "cuda") {
                    candle_core::Device::new_cuda(0)
                } else {
                    Err(candle_core::Error::Msg(
                        "device: cuda needs a binary built with `--features cuda`".into(),
                    ))
                }
            }
        }
    }

    /// Whether stages on this device must run one at a time (one GPU).
    pub fn is_exclusive(self) -> bool {
        matches!(self, DeviceClass::Cuda)
    }
}
