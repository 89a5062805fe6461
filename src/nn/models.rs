//! The paper's networks: the MLP, the 5-layer CNN and the CIFAR ResNets without BatchNorm.
//!
//! Each model owns its parameters as a `Vec<Param>` in a fixed order (the order of initialisation and
//! of the checkpoint) named as in the equivalent PyTorch module, which is spelled out on each struct.
//! Linear weights live in memory as (in, out) (faster matmuls in candle on the CPU) and are exported
//! transposed; convolution weights are stored exactly as PyTorch stores them.

use candle_core::{Result, Tensor};

use super::init::{Fan, Initializer};
use super::layers::{conv2d, global_avg_pool, linear, max_pool2, option_a_shortcut, Activation};
use super::{ConvNet, DenseStack, Model, Param, ResidualBlock, ResidualNet};

/// A fully connected network: flatten (C, H, W order), then `depth` hidden layers of `width` units
/// with `activation`, then a linear output layer. Weights Kaiming-normal (fan_in, ReLU gain √2 for
/// every activation) times `init_scale`; zero biases.
///
/// Equivalent PyTorch module (`state_dict` names `layers.{i}.weight` (out, in) and `layers.{i}.bias`):
/// ```python
/// class MLP(nn.Module):
///     def __init__(self, input_dim, width, depth, outputs, act=nn.ReLU):
///         super().__init__()
///         dims = [input_dim] + [width] * depth + [outputs]
///         self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
///         self.act = act()  # nn.ReLU / nn.Tanh / nn.SiLU / nn.Identity
///     def forward(self, x):
///         x = x.flatten(1)
///         for layer in self.layers[:-1]:
///             x = self.act(layer(x))
///         return self.layers[-1](x)
/// ```
pub struct Mlp {
    params: Vec<Param>,
    activation: Activation,
}

impl Mlp {
    /// Builds and initialises an MLP on `input_dim` features.
    pub fn new(
        input_dim: usize,
        depth: usize,
        width: usize,
        outputs: usize,
        activation: Activation,
        mut init: Initializer,
    ) -> Result<Self> {
        let mut dims = vec![input_dim];
        dims.extend(std::iter::repeat_n(width, depth));
        dims.push(outputs);
        for (i, pair) in dims.windows(2).enumerate() {
            init.weight(&format!("layers.{i}.weight"), &[pair[1], pair[0]], Fan::In)?;
            init.bias(&format!("layers.{i}.bias"), pair[1])?;
        }
        Ok(Self {
            params: init.finish(),
            activation,
        })
    }
}

impl Model for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let layers = self.params.len() / 2;
        let mut h = x.flatten_from(1)?;
        for i in 0..layers {
            h = linear(
                &h,
                self.params[2 * i].var.as_tensor(),
                self.params[2 * i + 1].var.as_tensor(),
            )?;
            if i + 1 < layers {
                h = self.activation.apply(&h)?;
            }
        }
        Ok(h)
    }

    fn params(&self) -> &[Param] {
        &self.params
    }

    fn dense_stack(&self) -> Option<DenseStack<'_>> {
        Some(DenseStack {
            params: &self.params,
            activation: self.activation,
        })
    }
}

/// The 5-layer CNN: conv 3×3 C→64, ReLU, conv 64→64, ReLU, max-pool 2, conv 64→128, ReLU, max-pool 2,
/// flatten, linear →512, ReLU, linear →outputs; all with bias, no padding, stride 1. On 32×32 inputs
/// the flattened size is 128·6·6 = 4608. Weights Kaiming-normal (fan_in, ReLU gain) × `init_scale`.
///
/// Equivalent PyTorch module (`state_dict` names `conv{1,2,3}.{weight,bias}`, `fc{1,2}.{weight,bias}`,
/// weights in PyTorch layout):
/// ```python
/// class CNN(nn.Module):
///     def __init__(self, channels=3, side=32, outputs=10):
///         super().__init__()
///         self.conv1 = nn.Conv2d(channels, 64, 3)
///         self.conv2 = nn.Conv2d(64, 64, 3)
///         self.conv3 = nn.Conv2d(64, 128, 3)
///         s = ((side - 4) // 2 - 2) // 2
///         self.fc1 = nn.Linear(128 * s * s, 512)
///         self.fc2 = nn.Linear(512, outputs)
///     def forward(self, x):
///         x = F.relu(self.conv2(F.relu(self.conv1(x))))
///         x = F.max_pool2d(x, 2)
///         x = F.max_pool2d(F.relu(self.conv3(x)), 2)
///         return self.fc2(F.relu(self.fc1(x.flatten(1))))
/// ```
pub struct Cnn {
    params: Vec<Param>,
}

impl Cnn {
    /// Spatial size after the convolutions and pools, for an input side `s`.
    fn feature_side(s: usize) -> Option<usize> {
        let s = s.checked_sub(4)? / 2;
        let s = s.checked_sub(2)? / 2;
        (s > 0).then_some(s)
    }

    /// Builds and initialises the CNN for inputs (C, H, W).
    pub fn new(input: [usize; 3], outputs: usize, mut init: Initializer) -> Result<Self> {
        let [c, h, w] = input;
        let (Some(fh), Some(fw)) = (Self::feature_side(h), Self::feature_side(w)) else {
            candle_core::bail!("cnn: input {h}×{w} is too small (needs at least 12×12)");
        };
        init.weight("conv1.weight", &[64, c, 3, 3], Fan::In)?;
        init.bias("conv1.bias", 64)?;
        init.weight("conv2.weight", &[64, 64, 3, 3], Fan::In)?;
        init.bias("conv2.bias", 64)?;
        init.weight("conv3.weight", &[128, 64, 3, 3], Fan::In)?;
        init.bias("conv3.bias", 128)?;
        init.weight("fc1.weight", &[512, 128 * fh * fw], Fan::In)?;
        init.bias("fc1.bias", 512)?;
        init.weight("fc2.weight", &[outputs, 512], Fan::In)?;
        init.bias("fc2.bias", outputs)?;
        Ok(Self {
            params: init.finish(),
        })
    }

    fn p(&self, i: usize) -> &Tensor {
        self.params[i].var.as_tensor()
    }
}

impl Model for Cnn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = conv2d(x, self.p(0), Some(self.p(1)), 1, 0)?.relu()?;
        let x = conv2d(&x, self.p(2), Some(self.p(3)), 1, 0)?.relu()?;
        let x = max_pool2(&x)?;
        let x = max_pool2(&conv2d(&x, self.p(4), Some(self.p(5)), 1, 0)?.relu()?)?;
        let x = linear(&x.flatten_from(1)?, self.p(6), self.p(7))?.relu()?;
        linear(&x, self.p(8), self.p(9))
    }

    fn params(&self) -> &[Param] {
        &self.params
    }

    fn conv_net(&self) -> Option<ConvNet<'_>> {
        Some(ConvNet {
            convs: &self.params[..6],
            pools: &[false, true, true],
            head: DenseStack {
                params: &self.params[6..],
                activation: Activation::Relu,
            },
        })
    }
}

/// He et al.'s CIFAR ResNet (6n+2 layers) with BatchNorm replaced by the identity: stem conv 3×3
/// C→16 + ReLU; three stages of n BasicBlocks with 16, 32, 64 channels, stride 2 entering stages 2
/// and 3; option-A shortcuts (`::2` subsampling, zero-padded channels); global average pool; linear
/// 64→outputs. Convolutions have no bias. Conv weights Kaiming-normal with fan_out, the linear layer
/// with fan_in (ReLU gain), all × `init_scale`; zero linear bias.
///
/// Equivalent PyTorch module (akamaster/pytorch_resnet_cifar10 with `bn1`/`bn2` removed;
/// `state_dict` names `conv1.weight`, `layer{s}.{b}.conv{1,2}.weight`, `linear.{weight,bias}`):
/// ```python
/// class BasicBlock(nn.Module):
///     def __init__(self, inp, planes, stride):
///         super().__init__()
///         self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
///         self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
///         self.pad = planes - inp
///         self.stride = stride
///     def forward(self, x):
///         out = self.conv2(F.relu(self.conv1(x)))
///         short = x[:, :, ::self.stride, ::self.stride]
///         short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
///         return F.relu(out + short)
/// class ResNet(nn.Module):
///     def __init__(self, depth, channels=3, outputs=10):
///         super().__init__()
///         n = (depth - 2) // 6
///         self.conv1 = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
///         widths, inp = [16, 32, 64], 16
///         for s, planes in enumerate(widths):
///             blocks = []
///             for b in range(n):
///                 blocks.append(BasicBlock(inp, planes, 2 if (s > 0 and b == 0) else 1))
///                 inp = planes
///             setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
///         self.linear = nn.Linear(64, outputs)
///     def forward(self, x):
///         x = F.relu(self.conv1(x))
///         x = self.layer3(self.layer2(self.layer1(x)))
///         return self.linear(x.mean((2, 3)))
/// ```
pub struct ResNet {
    params: Vec<Param>,
    blocks: Vec<ResidualBlock>,
}

impl ResNet {
    /// Builds and initialises a ResNet with `blocks_per_stage` blocks in each of its three stages
    /// (depth 6·blocks_per_stage + 2) for inputs with `channels` channels.
    pub fn new(
        blocks_per_stage: usize,
        channels: usize,
        outputs: usize,
        mut init: Initializer,
    ) -> Result<Self> {
        init.weight("conv1.weight", &[16, channels, 3, 3], Fan::Out)?;
        let mut blocks = Vec::new();
        let mut inp = 16;
        for (s, planes) in [16usize, 32, 64].into_iter().enumerate() {
            for b in 0..blocks_per_stage {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let prefix = format!("layer{}.{b}", s + 1);
                init.weight(
                    &format!("{prefix}.conv1.weight"),
                    &[planes, inp, 3, 3],
                    Fan::Out,
                )?;
                init.weight(
                    &format!("{prefix}.conv2.weight"),
                    &[planes, planes, 3, 3],
                    Fan::Out,
                )?;
                blocks.push(ResidualBlock {
                    stride,
                    out_channels: planes,
                });
                inp = planes;
            }
        }
        init.weight("linear.weight", &[outputs, 64], Fan::In)?;
        init.bias("linear.bias", outputs)?;
        Ok(Self {
            params: init.finish(),
            blocks,
        })
    }

    fn p(&self, i: usize) -> &Tensor {
        self.params[i].var.as_tensor()
    }
}

impl Model for ResNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = conv2d(x, self.p(0), None, 1, 1)?.relu()?;
        for (i, b) in self.blocks.iter().enumerate() {
            let out = conv2d(&x, self.p(1 + 2 * i), None, b.stride, 1)?.relu()?;
            let out = conv2d(&out, self.p(2 + 2 * i), None, 1, 1)?;
            x = (out + option_a_shortcut(&x, b.out_channels, b.stride)?)?.relu()?;
        }
        let n = self.params.len();
        linear(&global_avg_pool(&x)?, self.p(n - 2), self.p(n - 1))
    }

    fn params(&self) -> &[Param] {
        &self.params
    }

    /// The hand-written residual passes run on the CPU only (their patch extraction and its adjoint
    /// are CPU kernels): on another device the ResNet takes candle's autograd.
    fn residual_net(&self) -> Option<ResidualNet<'_>> {
        if !self.params.iter().all(|p| p.var.device().is_cpu()) {
            return None;
        }
        let n = self.params.len();
        Some(ResidualNet {
            convs: &self.params[..n - 2],
            blocks: &self.blocks,
            head: DenseStack {
                params: &self.params[n - 2..],
                activation: Activation::Relu,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{
        check_first_order, check_second_order, flat, one_hot_targets, random_tensor, Probe,
    };
    use crate::nn::loss::{mean_loss, LossKind};
    use crate::nn::spec::ModelSpec;
    use candle_core::{DType, Device};

    const CIFAR: [usize; 3] = [3, 32, 32];

    fn build(spec: ModelSpec, input: [usize; 3], outputs: usize, dtype: DType) -> Box<dyn Model> {
        spec.build(input, outputs, 0.5, 7, dtype, &Device::Cpu)
            .unwrap()
    }

    #[test]
    fn parameter_counts_match_the_paper_conventions() {
        // paper-conventions.md, "Models".
        let mlp = ModelSpec::Mlp {
            depth: 2,
            width: 512,
            activation: Activation::Relu,
        };
        assert_eq!(build(mlp, CIFAR, 10, DType::F32).num_params(), 1_841_162);
        assert_eq!(
            build(ModelSpec::Cnn {}, CIFAR, 10, DType::F32).num_params(),
            2_477_514
        );
        assert_eq!(
            build(ModelSpec::Resnet { depth: 20 }, CIFAR, 10, DType::F32).num_params(),
            268_346
        );
        assert_eq!(
            build(ModelSpec::Resnet { depth: 14 }, CIFAR, 10, DType::F32).num_params(),
            171_578
        );
    }

    #[test]
    fn models_run_in_f32_and_f64_on_cifar_shapes() {
        for spec in [
            ModelSpec::Mlp {
                depth: 1,
                width: 8,
                activation: Activation::Silu,
            },
            ModelSpec::Cnn {},
            ModelSpec::Resnet { depth: 14 },
        ] {
            for dtype in [DType::F32, DType::F64] {
                let m = build(spec, CIFAR, 10, dtype);
                let x = random_tensor(&[2, 3, 32, 32], 1, 1.0)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let y = m.forward(&x).unwrap();
                assert_eq!(
                    (y.dims(), y.dtype()),
                    (&[2usize, 10][..], dtype),
                    "{spec:?}"
                );
                assert!(flat(&y).iter().all(|v| v.is_finite()));
            }
        }
    }

    #[test]
    fn mlp_forward_matches_plain_loops() {
        let m = build(
            ModelSpec::Mlp {
                depth: 2,
                width: 3,
                activation: Activation::Tanh,
            },
            [1, 2, 2],
            2,
            DType::F64,
        );
        let x = random_tensor(&[3, 1, 2, 2], 5, 1.0).unwrap();
        let got = flat(&m.forward(&x).unwrap());
        let p: Vec<Vec<f64>> = m.params().iter().map(|p| flat(p.var.as_tensor())).collect();
        let xs = flat(&x);
        for n in 0..3 {
            let mut h: Vec<f64> = xs[n * 4..n * 4 + 4].to_vec();
            for l in 0..3 {
                let (din, dout) = (h.len(), p[2 * l + 1].len());
                // In-memory weights are (in, out): w[i * out + o].
                let mut z: Vec<f64> = (0..dout)
                    .map(|o| {
                        p[2 * l + 1][o]
                            + (0..din).map(|i| h[i] * p[2 * l][i * dout + o]).sum::<f64>()
                    })
                    .collect();
                if l < 2 {
                    z.iter_mut().for_each(|v| *v = v.tanh());
                }
                h = z;
            }
            for o in 0..2 {
                assert!((got[n * 2 + o] - h[o]).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn initialisation_is_deterministic_per_seed() {
        let spec = ModelSpec::Resnet { depth: 14 };
        let bytes = |seed: u64| -> Vec<Vec<f64>> {
            let m = spec
                .build(CIFAR, 10, 0.2, seed, DType::F64, &Device::Cpu)
                .unwrap();
            m.params().iter().map(|p| flat(p.var.as_tensor())).collect()
        };
        let (a, b, c) = (bytes(3), bytes(3), bytes(4));
        let bits =
            |v: &Vec<Vec<f64>>| -> Vec<u64> { v.iter().flatten().map(|x| x.to_bits()).collect() };
        assert_eq!(bits(&a), bits(&b));
        assert_ne!(bits(&a), bits(&c));
        // f32 holds the f64 draws rounded.
        let m32 = spec
            .build(CIFAR, 10, 0.2, 3, DType::F32, &Device::Cpu)
            .unwrap();
        let first32 = flat(m32.params()[0].var.as_tensor());
        assert!(first32
            .iter()
            .zip(&a[0])
            .all(|(x, y)| *x == (*y as f32) as f64));
    }

    /// Sample std of `v` against `want`, for a Kaiming-normal layer.
    fn assert_std(name: &str, v: &[f64], want: f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        // The sample std of n normals has relative standard error ≈ 1/√(2n); allow 5 of those.
        let tol = 5.0 / (2.0 * n).sqrt();
        assert!(
            (std / want - 1.0).abs() < tol,
            "{name}: std {std}, expected {want}"
        );
        assert!(mean.abs() < 5.0 * want / n.sqrt(), "{name}: mean {mean}");
    }

    #[test]
    fn initialisation_has_kaiming_statistics() {
        let scale = 0.3;
        // The fan of a parameter from its in-memory shape.
        type FanOf = fn(&[usize]) -> usize;
        let cases: [(ModelSpec, FanOf); 3] = [
            // MLP and CNN: fan_in; stored linear weights are (in, out).
            (
                ModelSpec::Mlp {
                    depth: 2,
                    width: 512,
                    activation: Activation::Relu,
                },
                |d| {
                    if d.len() == 2 {
                        d[0]
                    } else {
                        d[1] * d[2] * d[3]
                    }
                },
            ),
            (ModelSpec::Cnn {}, |d| {
                if d.len() == 2 {
                    d[0]
                } else {
                    d[1] * d[2] * d[3]
                }
            }),
            // ResNet: fan_out for convolutions, fan_in for the linear layer.
            (ModelSpec::Resnet { depth: 20 }, |d| {
                if d.len() == 2 {
                    d[0]
                } else {
                    d[0] * d[2] * d[3]
                }
            }),
        ];
        for (spec, fan) in cases {
            let m = spec
                .build(CIFAR, 10, scale, 1, DType::F32, &Device::Cpu)
                .unwrap();
            for p in m.params() {
                let v = flat(p.var.as_tensor());
                if p.name.ends_with("bias") {
                    assert!(v.iter().all(|x| *x == 0.0), "{}", p.name);
                } else {
                    let want = (2.0 / fan(p.var.dims()) as f64).sqrt() * scale;
                    assert_std(&p.name, &v, want);
                }
            }
        }
    }

    fn model_probe(
        model: Box<dyn Model>,
        input: [usize; 3],
        outputs: usize,
        kind: LossKind,
    ) -> Probe {
        let n = 2;
        let x = random_tensor(&[n, input[0], input[1], input[2]], 77, 1.0).unwrap();
        let targets = one_hot_targets(n, outputs);
        let vars = model.params().iter().map(|p| p.var.clone()).collect();
        Probe::from_vars(vars, move || mean_loss(kind, &model.forward(&x)?, &targets))
    }

    fn check_model(name: &str, spec: ModelSpec, input: [usize; 3], outputs: usize, kind: LossKind) {
        let m = spec
            .build(input, outputs, 1.0, 2, DType::F64, &Device::Cpu)
            .unwrap();
        let probe = model_probe(m, input, outputs, kind);
        check_first_order(name, &probe);
        check_second_order(name, &probe);
    }

    #[test]
    fn mlp_derivatives_for_every_activation() {
        for act in [
            Activation::Relu,
            Activation::Tanh,
            Activation::Silu,
            Activation::Linear,
        ] {
            let spec = ModelSpec::Mlp {
                depth: 2,
                width: 4,
                activation: act,
            };
            check_model(&format!("mlp {act:?}"), spec, [1, 2, 3], 3, LossKind::Mse);
        }
        let spec = ModelSpec::Mlp {
            depth: 1,
            width: 4,
            activation: Activation::Tanh,
        };
        check_model(
            "mlp cross-entropy",
            spec,
            [1, 2, 3],
            3,
            LossKind::CrossEntropy,
        );
    }

    #[test]
    fn cnn_derivatives() {
        check_model("cnn", ModelSpec::Cnn {}, [1, 12, 12], 3, LossKind::Mse);
    }

    #[test]
    fn resnet_derivatives() {
        check_model(
            "resnet-14",
            ModelSpec::Resnet { depth: 14 },
            [2, 5, 5],
            3,
            LossKind::Mse,
        );
        check_model(
            "resnet-8",
            ModelSpec::Resnet { depth: 8 },
            [1, 4, 4],
            2,
            LossKind::CrossEntropy,
        );
    }

    #[test]
    fn resnet_20_derivatives() {
        check_model(
            "resnet-20",
            ModelSpec::Resnet { depth: 20 },
            [1, 4, 4],
            2,
            LossKind::Mse,
        );
    }
}
