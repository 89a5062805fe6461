//! Seeded, bit-reproducible parameter initialisation: Kaiming-normal weights times `init_scale`, zero
//! biases.
//!
//! Candle's own RNG cannot be seeded, so every weight is drawn here from a `ChaCha8Rng` seeded with the
//! model seed, on the CPU, in f64, one parameter after the other in the model's parameter order, each
//! filled in row-major order of its *PyTorch* layout. The f64 values are then converted to the model's
//! dtype and device, so an f32 and an f64 model built from one seed hold the same weights up to
//! rounding. Biases consume no random numbers.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::{Param, TorchLayout};

/// Which fan a Kaiming initialisation divides by (as `mode` in `torch.nn.init.kaiming_normal_`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fan {
    /// Inputs per output unit: `in_features`, or `C_in·kh·kw` for a convolution.
    In,
    /// Outputs per input unit: `out_features`, or `C_out·kh·kw` for a convolution.
    Out,
}

/// Draws the parameters of one model, in order.
pub struct Initializer {
    rng: ChaCha8Rng,
    init_scale: f64,
    dtype: DType,
    device: Device,
    params: Vec<Param>,
}

impl Initializer {
    /// Starts drawing for a model with this seed and weight multiplier.
    pub fn new(seed: u64, init_scale: f64, dtype: DType, device: &Device) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            init_scale,
            dtype,
            device: device.clone(),
            params: Vec::new(),
        }
    }

    /// Standard deviation of a Kaiming-normal weight with ReLU gain √2: `√2 / √fan · init_scale`.
    pub fn kaiming_std(&self, fan: usize) -> f64 {
        (2.0 / fan as f64).sqrt() * self.init_scale
    }

    /// Adds a Kaiming-normal weight with PyTorch shape `torch_shape` (out, in, …). Linear weights
    /// (2-D) are kept in memory as (in, out) and marked [`TorchLayout::Transposed`]; others as is.
    pub fn weight(&mut self, name: &str, torch_shape: &[usize], fan: Fan) -> Result<()> {
        let receptive: usize = torch_shape[2..].iter().product();
        let fan = match fan {
            Fan::In => torch_shape[1] * receptive,
            Fan::Out => torch_shape[0] * receptive,
        };
        let std = self.kaiming_std(fan);
        let n: usize = torch_shape.iter().product();
        let values: Vec<f64> = (0..n)
            .map(|_| std * self.rng.sample::<f64, _>(StandardNormal))
            .collect();
        let torch = Tensor::from_vec(values, torch_shape, &Device::Cpu)?;
        let (tensor, layout) = if torch_shape.len() == 2 {
            (torch.t()?.contiguous()?, TorchLayout::Transposed)
        } else {
            (torch, TorchLayout::Same)
        };
        self.push(name, tensor, layout)
    }

    /// Adds a zero bias of length `len`.
    pub fn bias(&mut self, name: &str, len: usize) -> Result<()> {
        self.push(
            name,
            Tensor::zeros(len, DType::F64, &Device::Cpu)?,
            TorchLayout::Same,
        )
    }

    fn push(&mut self, name: &str, tensor: Tensor, layout: TorchLayout) -> Result<()> {
        let tensor = tensor.to_dtype(self.dtype)?.to_device(&self.device)?;
        self.params.push(Param {
            name: name.to_string(),
            var: Var::from_tensor(&tensor)?,
            layout,
        });
        Ok(())
    }

    /// The parameters drawn so far, in order.
    pub fn finish(self) -> Vec<Param> {
        self.params
    }
}
