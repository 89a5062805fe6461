//! Stochastic gradient descent with optional heavy-ball momentum, with PyTorch's `torch.optim.SGD`
//! semantics (dampening 0, no Nesterov, no weight decay):
//!
//! ```text
//! v ← μ v + g        (only when μ > 0; v starts at 0, so the first step has v = g as in PyTorch)
//! θ ← θ − η v        (θ ← θ − η g when μ = 0)
//! ```
//!
//! The learning rate η may change between steps (schedules). The velocity is exposed so checkpoints
//! can save and restore it. On the CPU the update runs in place on the parameters' storage (one pass,
//! no allocation, in parallel chunks); on other devices it is computed with tensor ops and copied in.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var};

use rayon::prelude::*;

use super::Param;

/// SGD (+ momentum) over a fixed list of parameters.
pub struct Sgd {
    lr: f64,
    momentum: f64,
    /// One buffer per parameter when `momentum > 0`, else empty.
    velocity: Vec<Var>,
}

impl Sgd {
    /// An optimiser for `params` with learning rate `lr` and momentum `momentum` (0 for plain SGD).
    pub fn new(params: &[Param], lr: f64, momentum: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&momentum) {
            candle_core::bail!("sgd: momentum {momentum} must be in [0, 1)");
        }
        let velocity = if momentum > 0.0 {
            params
                .iter()
                .map(|p| Var::zeros(p.var.shape(), p.var.dtype(), p.var.device()))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(Self {
            lr,
            momentum,
            velocity,
        })
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Sets the learning rate used by the next steps.
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// The momentum coefficient μ.
    pub fn momentum(&self) -> f64 {
        self.momentum
    }

    /// The velocity buffers (PyTorch's `momentum_buffer`), one per parameter in the parameters'
    /// order and in their in-memory layout; empty without momentum.
    pub fn velocity(&self) -> &[Var] {
        &self.velocity
    }

    /// One update of `params` from the gradients in `grads` (e.g. from `loss.backward()`).
    /// Parameters without a gradient are left alone (and their velocity too), as in PyTorch.
    pub fn step(&mut self, params: &[Param], grads: &GradStore) -> Result<()> {
        if !self.velocity.is_empty() && self.velocity.len() != params.len() {
            candle_core::bail!(
                "sgd: built for {} parameters, stepped with {}",
                self.velocity.len(),
                params.len()
            );
        }
        for (i, p) in params.iter().enumerate() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let g = g.detach().contiguous()?;
            let update = match self.velocity.get(i) {
                Some(v) => {
                    scale_add(v, self.momentum, 1.0, &g)?;
                    v.as_tensor().clone()
                }
                None => g,
            };
            scale_add(&p.var, 1.0, -self.lr, &update)?;
        }
        Ok(())
    }
}

/// `dst ← beta · dst + alpha · src`, in place on the CPU, by tensor ops elsewhere.
fn scale_add(dst: &Var, beta: f64, alpha: f64, src: &Tensor) -> Result<()> {
    if dst.device().is_cpu() && matches!(dst.dtype(), DType::F32 | DType::F64) {
        dst.as_tensor().inplace_op2(src, &ScaleAdd { beta, alpha })
    } else {
        // Plain SGD (beta = 1) skips a scaling pass: fewer kernel launches per step on a GPU.
        let kept = if beta == 1.0 {
            dst.as_tensor().detach()
        } else {
            dst.as_tensor().affine(beta, 0.0)?
        };
        dst.set(&(kept + src.affine(alpha, 0.0)?)?)
    }
}

/// In-place `dst ← beta · dst + alpha · src` on contiguous CPU f32/f64 storage.
struct ScaleAdd {
    beta: f64,
    alpha: f64,
}

impl InplaceOp2 for ScaleAdd {
    fn name(&self) -> &'static str {
        "sgd-scale-add"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("sgd: parameters and updates must be contiguous");
        };
        if a1 - a0 != b1 - b0 {
            candle_core::bail!("sgd: parameter has {} values, update {}", a1 - a0, b1 - b0);
        }
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => {
                let (beta, alpha) = (self.beta as f32, self.alpha as f32);
                scale_add_values(&mut d[a0..a1], beta, alpha, &s[b0..b1]);
            }
            (CpuStorage::F64(d), CpuStorage::F64(s)) => {
                scale_add_values(&mut d[a0..a1], self.beta, self.alpha, &s[b0..b1]);
            }
            _ => {
                candle_core::bail!("sgd: parameter and update dtypes differ (f32 or f64 expected)")
            }
        }
        Ok(())
    }
}

/// Values per parallel chunk of [`scale_add_values`]: large enough that one chunk outweighs
/// handing it to a thread (a layer of the MLP, 1.6 M weights, takes 25 chunks).
const VALUES_PER_CHUNK: usize = 1 << 16;

/// `dst ← beta · dst + alpha · src`, value by value, in parallel chunks (each value's result does
/// not depend on the chunking).
fn scale_add_values<T>(dst: &mut [T], beta: T, alpha: T, src: &[T])
where
    T: Copy + Send + Sync + std::ops::Mul<Output = T> + std::ops::Add<Output = T>,
{
    dst.par_chunks_mut(VALUES_PER_CHUNK)
        .zip(src.par_chunks(VALUES_PER_CHUNK))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                *d = beta * *d + alpha * s;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::TorchLayout;
    use candle_core::Device;

    fn param(name: &str, values: &[f64], dtype: DType) -> Param {
        let t = Tensor::new(values, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        Param {
            name: name.into(),
            var: Var::from_tensor(&t).unwrap(),
            layout: TorchLayout::Same,
        }
    }

    fn values(p: &Param) -> Vec<f64> {
        p.var
            .as_tensor()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    /// Gradients of L = ½‖θ‖² (so g = θ) for the first parameter only.
    fn half_square_grads(params: &[Param]) -> GradStore {
        (params[0].var.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5)
            .unwrap()
            .backward()
            .unwrap()
    }

    #[test]
    fn plain_sgd_matches_a_hand_computed_step() {
        for dtype in [DType::F64, DType::F32] {
            let params = vec![param("a", &[1.0, -2.0], dtype), param("b", &[5.0], dtype)];
            let mut sgd = Sgd::new(&params, 0.25, 0.0).unwrap();
            assert!(sgd.velocity().is_empty());
            sgd.step(&params, &half_square_grads(&params)).unwrap();
            // θ − η θ = 0.75 θ (exact in binary); b has no gradient and stays.
            assert_eq!(values(&params[0]), vec![0.75, -1.5]);
            assert_eq!(values(&params[1]), vec![5.0]);
            sgd.set_lr(0.5);
            assert_eq!(sgd.lr(), 0.5);
            sgd.step(&params, &half_square_grads(&params)).unwrap();
            assert_eq!(values(&params[0]), vec![0.375, -0.75]);
        }
    }

    #[test]
    fn momentum_matches_pytorch_recurrence_by_hand() {
        // θ0 = (1, −2), η = 0.1, μ = 0.9, g = θ:
        // v1 = g1 = (1, −2), θ1 = (0.9, −1.8); v2 = 0.9 v1 + θ1 = (1.8, −3.6), θ2 = (0.72, −1.44).
        let params = vec![
            param("a", &[1.0, -2.0], DType::F64),
            param("b", &[5.0], DType::F64),
        ];
        let mut sgd = Sgd::new(&params, 0.1, 0.9).unwrap();
        sgd.step(&params, &half_square_grads(&params)).unwrap();
        let v = |i: usize| sgd.velocity()[i].as_tensor().to_vec1::<f64>().unwrap();
        assert_eq!(v(0), vec![1.0, -2.0]);
        assert_eq!(v(1), vec![0.0]);
        sgd.step(&params, &half_square_grads(&params)).unwrap();
        let v0 = sgd.velocity()[0].as_tensor().to_vec1::<f64>().unwrap();
        for (got, want) in v0.iter().zip([1.8, -3.6]) {
            assert!((got - want).abs() < 1e-15);
        }
        for (got, want) in values(&params[0]).iter().zip([0.72, -1.44]) {
            assert!((got - want).abs() < 1e-15, "{got} vs {want}");
        }
        assert_eq!(values(&params[1]), vec![5.0]);
    }

    #[test]
    fn bad_settings_are_errors() {
        let params = vec![param("a", &[1.0], DType::F64)];
        assert!(Sgd::new(&params, 0.1, 1.0).is_err());
        assert!(Sgd::new(&params, 0.1, -0.1).is_err());
        let mut sgd = Sgd::new(&params, 0.1, 0.5).unwrap();
        let two = vec![
            param("a", &[1.0], DType::F64),
            param("b", &[1.0], DType::F64),
        ];
        assert!(sgd.step(&two, &half_square_grads(&two)).is_err());
    }
}
