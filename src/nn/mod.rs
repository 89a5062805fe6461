//! Neural networks of the paper (MLP, 5-layer CNN, ResNets without BatchNorm), its losses and SGD.
//!
//! Models keep their parameters as candle `Var`s in whatever layout is fastest in memory and know
//! how to export them under PyTorch `state_dict` names and layouts.

pub mod checkpoint;
pub mod dense;
#[cfg(test)]
mod gradcheck;
pub mod init;
pub mod layers;
pub mod loss;
pub mod models;
pub mod optim;
pub mod spec;

pub use layers::Activation;
pub use spec::{ModelSpec, SpecError};

use candle_core::{Result, Tensor, Var};

/// How an in-memory parameter maps to its PyTorch layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchLayout {
    /// Stored exactly as PyTorch stores it.
    Same,
    /// Stored as the transpose of PyTorch's 2-D layout (e.g. linear weights kept as (in, out)).
    Transposed,
}

/// One trainable tensor with its PyTorch `state_dict` name.
#[derive(Debug, Clone)]
pub struct Param {
    /// PyTorch `state_dict` name, e.g. `layers.0.weight`.
    pub name: String,
    /// The variable itself, in the in-memory layout.
    pub var: Var,
    /// How `var` relates to the PyTorch layout.
    pub layout: TorchLayout,
}

/// A network: a forward pass and its parameters in a fixed order.
pub trait Model: Send + Sync {
    /// Maps a batch of inputs (N, C, H, W) to outputs (N, K).
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The parameters, always in the same order.
    fn params(&self) -> &[Param];
    /// Total number of scalar parameters.
    fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.var.elem_count()).sum()
    }
    /// The model as a plain stack of dense layers, when it is one (the MLP), so that curvature code
    /// can use hand-written derivatives instead of candle's double backward.
    fn dense_stack(&self) -> Option<DenseStack<'_>> {
        None
    }
}

/// A network that flattens its input, then applies dense layers `x ↦ x W + b` (weights stored
/// (in, out)) with `activation` between them and none after the last.
#[derive(Clone, Copy)]
pub struct DenseStack<'a> {
    /// Weight and bias of each layer, in order: `[W₁, b₁, W₂, b₂, ...]`.
    pub params: &'a [Param],
    /// The nonlinearity between layers.
    pub activation: Activation,
}
