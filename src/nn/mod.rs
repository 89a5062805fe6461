//! Neural networks of the paper (MLP, 5-layer CNN, ResNets without BatchNorm), its losses and SGD.
//!
//! Models keep their parameters as candle `Var`s in whatever layout is fastest in memory and know
//! how to export them under PyTorch `state_dict` names and layouts.

pub mod checkpoint;
pub mod conv;
pub mod dense;
pub mod gate;
#[cfg(test)]
pub(crate) mod gradcheck;
pub mod gradient;
pub mod im2col;
pub mod init;
pub mod layers;
pub mod loss;
pub mod models;
pub mod optim;
pub mod pass;
pub mod product;
pub mod reduce;
pub mod residual;
pub mod spec;

pub use layers::Activation;
pub use spec::{ModelSpec, SpecError};

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor, Var};

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
    /// The model as convolutions followed by a dense stack, when it is one (the 5-layer CNN), so
    /// that its gradients can use hand-written passes instead of candle's autograd.
    fn conv_net(&self) -> Option<ConvNet<'_>> {
        None
    }
    /// The model as a residual network (the CIFAR ResNets, on the CPU), so that its gradients and
    /// curvature products can use hand-written passes instead of candle's autograd.
    fn residual_net(&self) -> Option<ResidualNet<'_>> {
        None
    }
    /// The dense layers at the top of a network with hand-written passes (all of a dense stack):
    /// the last parameters, whose per-sample gradients are outer products.
    fn dense_head(&self) -> Option<DenseStack<'_>> {
        self.dense_stack()
            .or_else(|| self.conv_net().map(|net| net.head))
            .or_else(|| self.residual_net().map(|net| net.head))
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

/// A network of valid, stride-1 convolutions with bias, each followed by ReLU and optionally a 2×2
/// max pool, then flattened in (C, H, W) order into a [`DenseStack`].
#[derive(Clone, Copy)]
pub struct ConvNet<'a> {
    /// Weight (C_out, C_in, k, k) and bias of each convolution, in order: `[W₁, b₁, W₂, b₂, ...]`.
    pub convs: &'a [Param],
    /// Whether a 2×2 max pool follows each convolution's ReLU.
    pub pools: &'a [bool],
    /// The dense layers after the flatten.
    pub head: DenseStack<'a>,
}

/// One BasicBlock of a [`ResidualNet`]: conv3×3(stride)–ReLU–conv3×3 (padding 1, no bias) plus the
/// option-A shortcut (`::stride` subsampling, channels zero-padded to `out_channels`), then ReLU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResidualBlock {
    /// Stride of the block's first convolution and of its shortcut (1 or 2).
    pub stride: usize,
    /// Channels of the block's output.
    pub out_channels: usize,
}

/// A CIFAR ResNet without BatchNorm: a 3×3 stem convolution (padding 1, no bias) and ReLU,
/// [`ResidualBlock`]s, a global average pool and a dense head.
#[derive(Clone, Copy)]
pub struct ResidualNet<'a> {
    /// The stem's weight, then both weights of each block: `[W₀, W₁₁, W₁₂, W₂₁, ...]`, each
    /// (C_out, C_in, 3, 3).
    pub convs: &'a [Param],
    /// The blocks, in order.
    pub blocks: &'a [ResidualBlock],
    /// The linear layer after the pool.
    pub head: DenseStack<'a>,
}

/// Runs `f` on the f32 values of `t` when it is a contiguous CPU f32 tensor.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    cpu_f32(&storage, layout).map(f)
}

/// The values of a contiguous CPU f32 tensor's storage.
pub(crate) fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => Some(&values[start..end]),
        _ => None,
    }
}
