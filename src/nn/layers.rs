//! Stateless layer functions shared by the models: activations, linear maps, convolutions, 2×2 max
//! pooling, global average pooling and the "option A" ResNet shortcut.
//!
//! Every function is written with candle ops whose backward pass is itself differentiable and correct,
//! so Hessian-vector products by double backward work through them (see the tests at the bottom and
//! `candle-notes.md`). In particular max pooling avoids candle's `max_pool2d`, whose backward is wrong,
//! and the shortcut avoids `upsample`/`scatter`, using only reshape, narrow and zero padding (`cat`).
//! Parameters are owned by the models; these functions only read them.

use candle_core::{Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// The nonlinearity between the layers of an MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(x, 0).
    #[default]
    Relu,
    /// tanh(x).
    Tanh,
    /// x·sigmoid(x).
    Silu,
    /// The identity (a deep linear network).
    Linear,
}

impl Activation {
    /// Applies the activation elementwise.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Relu => x.relu(),
            Activation::Tanh => x.tanh(),
            Activation::Silu => x.silu(),
            Activation::Linear => Ok(x.clone()),
        }
    }

    /// σ'(z) and, where it is not identically zero, σ''(z), elementwise: the local derivatives that
    /// hand-written first- and second-order passes through a dense stack need. ReLU takes
    /// σ'(0) = 0, as autograd does.
    pub fn derivatives(self, z: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Activation::Relu => Ok((z.gt(0.0)?.to_dtype(z.dtype())?, None)),
            Activation::Linear => Ok((z.ones_like()?, None)),
            Activation::Tanh => {
                // σ' = 1 − a², σ'' = −2a(1 − a²).
                let a = z.tanh()?;
                let slope = a.sqr()?.affine(-1.0, 1.0)?;
                let curvature = (&a * &slope)?.affine(-2.0, 0.0)?;
                Ok((slope, Some(curvature)))
            }
            Activation::Silu => {
                // s = sigmoid(z): σ' = s(1 + z(1 − s)), σ'' = s(1 − s)(2 + z(1 − 2s)).
                let s = candle_nn::ops::sigmoid(z)?;
                let one_minus_s = s.affine(-1.0, 1.0)?;
                let slope = (&s * (z * &one_minus_s)?.affine(1.0, 1.0)?)?;
                let bend = (z * s.affine(-2.0, 1.0)?)?.affine(1.0, 2.0)?;
                let curvature = ((&s * &one_minus_s)? * bend)?;
                Ok((slope, Some(curvature)))
            }
        }
    }
}

/// `x · w + b` for `x` (N, in), `w` stored as (in, out) (the transpose of PyTorch's layout, about twice
/// as fast in candle on the CPU) and `b` (out).
pub fn linear(x: &Tensor, w_in_out: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.matmul(w_in_out)?.broadcast_add(b)
}

/// 2-D convolution of `x` (N, C_in, H, W) with `w` (C_out, C_in, kh, kw) as PyTorch's `nn.Conv2d`
/// (zero padding `padding` on every side, stride `stride`), plus an optional bias (C_out).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let y = x.conv2d(w, padding, stride, 1, 1)?;
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// 2×2 max pooling with stride 2 of `x` (N, C, H, W), like `nn.MaxPool2d(2)`: odd trailing rows and
/// columns are dropped. Written as a reshape to (N, C, H/2, 2, W/2, 2) and a max over the window axes,
/// because candle's `max_pool2d` divides its gradient by the window area.
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    if ho == 0 || wo == 0 {
        candle_core::bail!("max_pool2: input {h}×{w} is too small for a 2×2 window");
    }
    let x = if h % 2 == 1 {
        x.narrow(2, 0, 2 * ho)?
    } else {
        x.clone()
    };
    let x = if w % 2 == 1 {
        x.narrow(3, 0, 2 * wo)?
    } else {
        x
    };
    x.reshape((n, c, ho, 2, wo, 2))?.max(5)?.max(3)
}

/// Mean over the spatial axes: (N, C, H, W) → (N, C), like `F.adaptive_avg_pool2d(x, 1).flatten(1)`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(2)?.mean(D::Minus1)
}

/// The parameter-free "option A" shortcut of He et al.'s CIFAR ResNets: `x[:, :, ::stride, ::stride]`
/// then zero channels padded on both sides up to `out_channels` (half of the extra channels before,
/// the rest after, as `F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))` does when the
/// channel count doubles). `stride` is 1 or 2.
pub fn option_a_shortcut(x: &Tensor, out_channels: usize, stride: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if out_channels < c {
        candle_core::bail!("option-A shortcut: cannot shrink {c} channels to {out_channels}");
    }
    let x = match stride {
        1 => x.clone(),
        2 => {
            // ::2 keeps ceil(h / 2) rows: pad odd sizes with a zero row/column first.
            let x = if h % 2 == 1 {
                x.pad_with_zeros(2, 0, 1)?
            } else {
                x.clone()
            };
            let x = if w % 2 == 1 {
                x.pad_with_zeros(3, 0, 1)?
            } else {
                x
            };
            let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
            x.reshape((n, c, ho, 2, wo, 2))?
                .narrow(5, 0, 1)?
                .narrow(3, 0, 1)?
                .reshape((n, c, ho, wo))?
        }
        s => candle_core::bail!("option-A shortcut: stride {s} is not supported (1 or 2)"),
    };
    let extra = out_channels - c;
    if extra == 0 {
        return Ok(x);
    }
    x.pad_with_zeros(1, extra / 2, extra - extra / 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check_first_order, check_second_order, Probe};
    use candle_core::{DType, Device};

    /// A fixed input of the given shape with distinct, well-separated values (no ties in max pooling,
    /// no ReLU kinks within a finite-difference step).
    fn input(dims: &[usize], seed: u64) -> Tensor {
        crate::nn::gradcheck::random_tensor(dims, seed, 1.0).unwrap()
    }

    fn check_layer(name: &str, probe: Probe) {
        check_first_order(name, &probe);
        check_second_order(name, &probe);
    }

    #[test]
    fn activations_match_closed_forms() {
        let x = Tensor::new(&[-1.5f64, -0.2, 0.3, 2.0], &Device::Cpu).unwrap();
        let got = |a: Activation| a.apply(&x).unwrap().to_vec1::<f64>().unwrap();
        let xs = [-1.5f64, -0.2, 0.3, 2.0];
        let relu: Vec<f64> = xs.iter().map(|v| v.max(0.0)).collect();
        let tanh: Vec<f64> = xs.iter().map(|v| v.tanh()).collect();
        let silu: Vec<f64> = xs.iter().map(|v| v / (1.0 + (-v).exp())).collect();
        assert_eq!(got(Activation::Relu), relu);
        assert_eq!(got(Activation::Linear), xs.to_vec());
        for (a, b) in got(Activation::Tanh).iter().zip(&tanh) {
            assert!((a - b).abs() < 1e-15);
        }
        for (a, b) in got(Activation::Silu).iter().zip(&silu) {
            assert!((a - b).abs() < 1e-15);
        }
    }

    #[test]
    fn max_pool_matches_a_loop_and_drops_odd_edges() {
        let x = input(&[2, 3, 5, 4], 1);
        let got = max_pool2(&x).unwrap();
        assert_eq!(got.dims(), &[2, 3, 2, 2]);
        let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let gv = got.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for n in 0..2 {
            for c in 0..3 {
                for i in 0..2 {
                    for j in 0..2 {
                        let at = |a: usize, b: usize| xv[((n * 3 + c) * 5 + a) * 4 + b];
                        let m = at(2 * i, 2 * j)
                            .max(at(2 * i + 1, 2 * j))
                            .max(at(2 * i, 2 * j + 1))
                            .max(at(2 * i + 1, 2 * j + 1));
                        assert_eq!(gv[((n * 3 + c) * 2 + i) * 2 + j], m);
                    }
                }
            }
        }
    }

    #[test]
    fn shortcut_subsamples_and_pads_channels_like_pytorch() {
        let x = input(&[1, 2, 3, 3], 2);
        let y = option_a_shortcut(&x, 6, 2).unwrap();
        assert_eq!(y.dims(), &[1, 6, 2, 2]);
        let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let yv = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for c in 0..6 {
            for i in 0..2 {
                for j in 0..2 {
                    // x[:, :, ::2, ::2] padded with 2 zero channels before and after.
                    let want = if (2..4).contains(&c) {
                        xv[((c - 2) * 3 + 2 * i) * 3 + 2 * j]
                    } else {
                        0.0
                    };
                    assert_eq!(yv[(c * 2 + i) * 2 + j], want, "channel {c} ({i},{j})");
                }
            }
        }
        let same = option_a_shortcut(&x, 2, 1).unwrap();
        assert_eq!(same.flatten_all().unwrap().to_vec1::<f64>().unwrap(), xv);
        assert!(option_a_shortcut(&x, 1, 1).is_err());
        assert!(option_a_shortcut(&x, 2, 3).is_err());
    }

    #[test]
    fn conv2d_matches_a_direct_sum() {
        // Stride 2, padding 1, as in the ResNets' downsampling convolutions.
        let x = input(&[1, 2, 5, 5], 3);
        let w = input(&[3, 2, 3, 3], 4);
        let b = input(&[3], 5);
        let y = conv2d(&x, &w, Some(&b), 2, 1).unwrap();
        assert_eq!(y.dims(), &[1, 3, 3, 3]);
        let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let bv = b.to_vec1::<f64>().unwrap();
        let yv = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for o in 0..3 {
            for i in 0..3 {
                for j in 0..3 {
                    let mut s = bv[o];
                    for c in 0..2 {
                        for a in 0..3 {
                            for bb in 0..3 {
                                let (r, q) = ((2 * i + a) as i64 - 1, (2 * j + bb) as i64 - 1);
                                if (0..5).contains(&r) && (0..5).contains(&q) {
                                    s += xv[(c * 5 + r as usize) * 5 + q as usize]
                                        * wv[((o * 2 + c) * 3 + a) * 3 + bb];
                                }
                            }
                        }
                    }
                    assert!((yv[(o * 3 + i) * 3 + j] - s).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn linear_layer_derivatives() {
        let w = input(&[4, 3], 10);
        let b = input(&[3], 11);
        let x = input(&[5, 4], 12);
        check_layer(
            "linear",
            Probe::new(vec![x, w, b], |t| linear(&t[0], &t[1], &t[2])),
        );
    }

    #[test]
    fn activation_derivatives() {
        for act in [
            Activation::Relu,
            Activation::Tanh,
            Activation::Silu,
            Activation::Linear,
        ] {
            // Pass through a linear map first so the second derivative w.r.t. its weight is non-trivial.
            let x = input(&[4, 3], 20);
            let w = input(&[3, 3], 21);
            check_layer(
                &format!("{act:?}"),
                Probe::new(vec![x, w], move |t| act.apply(&t[0].matmul(&t[1])?)),
            );
        }
    }

    #[test]
    fn conv2d_derivatives() {
        for (stride, padding) in [(1, 0), (1, 1), (2, 1)] {
            let x = input(&[2, 2, 5, 5], 30);
            let w = input(&[3, 2, 3, 3], 31);
            let b = input(&[3], 32);
            check_layer(
                &format!("conv2d stride {stride} padding {padding}"),
                Probe::new(vec![x, w, b], move |t| {
                    conv2d(&t[0], &t[1], Some(&t[2]), stride, padding)?.tanh()
                }),
            );
        }
    }

    #[test]
    fn max_pool_derivatives() {
        let x = input(&[2, 2, 5, 4], 40);
        let w = input(&[2, 2, 1, 1], 41);
        check_layer(
            "max_pool2",
            Probe::new(vec![x, w], |t| {
                max_pool2(&conv2d(&t[0], &t[1], None, 1, 0)?)?.tanh()
            }),
        );
    }

    #[test]
    fn global_avg_pool_derivatives() {
        let x = input(&[2, 3, 3, 2], 50);
        let w = input(&[3, 3, 1, 1], 51);
        check_layer(
            "global_avg_pool",
            Probe::new(vec![x, w], |t| {
                global_avg_pool(&conv2d(&t[0], &t[1], None, 1, 0)?)?.tanh()
            }),
        );
    }

    #[test]
    fn shortcut_and_residual_add_derivatives() {
        for (h, stride, out) in [(4, 2, 4), (5, 2, 4), (4, 1, 2)] {
            let x = input(&[2, 2, h, h], 60);
            let w = input(&[out, 2, 3, 3], 61);
            check_layer(
                &format!("shortcut + residual add (h {h}, stride {stride})"),
                Probe::new(vec![x, w], move |t| {
                    let branch = conv2d(&t[0], &t[1], None, stride, 1)?.tanh()?;
                    (branch + option_a_shortcut(&t[0].tanh()?, out, stride)?)?.tanh()
                }),
            );
        }
    }

    #[test]
    fn layers_run_in_f32() {
        let x = input(&[1, 2, 4, 4], 70).to_dtype(DType::F32).unwrap();
        let y = option_a_shortcut(&max_pool2(&x).unwrap(), 4, 2).unwrap();
        assert_eq!(y.dims(), &[1, 4, 1, 1]);
        assert_eq!(global_avg_pool(&y).unwrap().dims(), &[1, 4]);
    }
}
