//! Test support: first- and second-order derivative checks of candle graphs against central finite
//! differences in f64.
//!
//! A [`Probe`] is a scalar function of some variables. First order: the autodiff gradient against
//! `(L(θ + h e) − L(θ − h e)) / 2h` on coordinates `e` and random directions. Second order: the
//! Hessian-vector product by double backward (backward of Σ g·v) against
//! `(∇L(θ + h v) − ∇L(θ − h v)) / 2h`, plus the symmetry uᵀHv = vᵀHu.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::data::LabelEncoding;
use crate::nn::dense::SampleWeights;
use crate::nn::gradient::{loss_and_gradient, mean_loss_and_gradient};
use crate::nn::loss::{mean_loss, per_sample_loss, LossKind, Targets};
use crate::nn::{Model, ModelSpec, Param};

/// A seeded standard-normal f64 tensor on the CPU, times `scale`.
pub fn random_tensor(dims: &[usize], seed: u64, scale: f64) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| scale * rng.sample::<f64, _>(StandardNormal))
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

/// The bit patterns of an f32 tensor's values, for comparisons bit for bit (−0 against +0, NaNs).
pub fn bits(t: &Tensor) -> Vec<u32> {
    let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    values.iter().map(|v| v.to_bits()).collect()
}

/// The values of some tensors as f64, one after another.
pub fn flat_all(parts: &[Tensor]) -> Vec<f64> {
    parts.iter().flat_map(flat).collect()
}

/// Σ ⟨a_p, b_p⟩ over paired tensors, in f64.
pub fn dot_all(a: &[Tensor], b: &[Tensor]) -> f64 {
    flat_all(a)
        .iter()
        .zip(flat_all(b))
        .map(|(x, y)| x * y)
        .sum()
}

/// The derivative of `f` along `direction` at the parameters' current values, by the central
/// difference (f(θ + h d) − f(θ − h d)) / 2h; the parameters are restored afterwards.
pub fn directional_difference(
    params: &[Param],
    direction: &[Tensor],
    h: f64,
    f: impl Fn() -> f64,
) -> f64 {
    let theta: Vec<Tensor> = params
        .iter()
        .map(|p| p.var.as_tensor().copy().unwrap())
        .collect();
    let at = |step: f64| {
        for ((p, t), d) in params.iter().zip(&theta).zip(direction) {
            p.var.set(&(t + (d * step).unwrap()).unwrap()).unwrap();
        }
        f()
    };
    let difference = (at(h) - at(-h)) / (2.0 * h);
    for (p, t) in params.iter().zip(&theta) {
        p.var.set(t).unwrap();
    }
    difference
}

/// ResNet-8 (3 classes) on `n` random (2, 16, 16) inputs in f32, and the same network on the same
/// inputs in f64 (the f32 values exactly; random linear biases): (f32 model, f64 model, f32
/// inputs, f64 inputs). Its 16-channel stage takes the f32 passes' in-place convolutions.
pub fn f32_and_f64_resnets(
    seed: u64,
    n: usize,
) -> (Box<dyn Model>, Box<dyn Model>, Tensor, Tensor) {
    let build = |dtype| {
        ModelSpec::Resnet { depth: 8 }
            .build([2, 16, 16], 3, 1.0, seed, dtype, &Device::Cpu)
            .unwrap()
    };
    let (model32, model64) = (build(DType::F32), build(DType::F64));
    for (i, (p32, p64)) in model32.params().iter().zip(model64.params()).enumerate() {
        let mut w = p64.var.as_tensor().clone();
        if p64.name.ends_with("bias") {
            w = random_tensor(p64.var.dims(), seed + i as u64, 0.1).unwrap();
        }
        let w = w.to_dtype(DType::F32).unwrap();
        p64.var.set(&w.to_dtype(DType::F64).unwrap()).unwrap();
        p32.var.set(&w).unwrap();
    }
    let x32 = random_tensor(&[n, 2, 16, 16], seed + 100, 1.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let x64 = x32.to_dtype(DType::F64).unwrap();
    (model32, model64, x32, x64)
}

/// One-hot f64 targets for `n` samples of `outputs` classes, sample i of class i mod `outputs`.
pub fn one_hot_targets(n: usize, outputs: usize) -> Targets {
    let labels: Vec<u32> = (0..n as u32).map(|i| i % outputs as u32).collect();
    let mut onehot = vec![0f64; n * outputs];
    for (i, l) in labels.iter().enumerate() {
        onehot[i * outputs + *l as usize] = 1.0;
    }
    Targets {
        values: Tensor::from_vec(onehot, (n, outputs), &Device::Cpu).unwrap(),
        labels: Tensor::from_vec(labels, n, &Device::Cpu).unwrap(),
        encoding: LabelEncoding::OneHot,
    }
}

type LossFn = Box<dyn Fn() -> Result<Tensor>>;

/// A scalar function of some f64 variables.
pub struct Probe {
    vars: Vec<Var>,
    loss: LossFn,
}

impl Probe {
    /// Wraps a layer: `f` maps the inputs to a tensor `y`; the probe's scalar is
    /// Σ c⊙y + ½ Σ y² with a fixed random `c`, so both its gradient and its Hessian are generic.
    pub fn new(inputs: Vec<Tensor>, f: impl Fn(&[Tensor]) -> Result<Tensor> + 'static) -> Self {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let shape = f(&inputs).unwrap().dims().to_vec();
        let c = random_tensor(&shape, 999, 1.0).unwrap();
        let vs = vars.clone();
        let loss = move || {
            let t: Vec<Tensor> = vs.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&t)?;
            (y.mul(&c)?.sum_all()? + (y.sqr()?.sum_all()? * 0.5)?)?.to_dtype(DType::F64)
        };
        Self {
            vars,
            loss: Box::new(loss),
        }
    }

    /// A probe on existing variables (e.g. a model's parameters) and a scalar loss closure.
    pub fn from_vars(vars: Vec<Var>, loss: impl Fn() -> Result<Tensor> + 'static) -> Self {
        Self {
            vars,
            loss: Box::new(loss),
        }
    }

    fn value(&self) -> f64 {
        (self.loss)().unwrap().to_scalar::<f64>().unwrap()
    }

    /// Gradients by autodiff, detached, as flat f64 vectors.
    fn grads(&self) -> Vec<Vec<f64>> {
        let g = (self.loss)().unwrap().backward().unwrap();
        self.vars
            .iter()
            .map(|v| match g.get(v.as_tensor()) {
                Some(t) => flat(t),
                None => vec![0.0; v.elem_count()],
            })
            .collect()
    }

    /// H v by double backward.
    fn hvp(&self, v: &[Tensor]) -> Vec<Vec<f64>> {
        // Without the flag candle detaches inside backward and H v comes out partly missing, not zero.
        assert_eq!(
            std::env::var("CANDLE_GRAD_DO_NOT_DETACH").as_deref(),
            Ok("1"),
            "double backward needs CANDLE_GRAD_DO_NOT_DETACH=1 (set by .cargo/config.toml under cargo)"
        );
        let g = (self.loss)().unwrap().backward().unwrap();
        let mut dot = Tensor::zeros((), DType::F64, &Device::Cpu).unwrap();
        for (var, dir) in self.vars.iter().zip(v) {
            let gi = g
                .get(var.as_tensor())
                .expect("every variable enters the loss");
            dot = (dot + gi.mul(dir).unwrap().sum_all().unwrap()).unwrap();
        }
        let h = dot.backward().unwrap();
        let out: Vec<Vec<f64>> = self
            .vars
            .iter()
            .map(|var| match h.get(var.as_tensor()) {
                Some(t) => flat(t),
                None => vec![0.0; var.elem_count()],
            })
            .collect();
        assert!(
            out.iter().flatten().any(|x| *x != 0.0),
            "double backward gave no second-order gradient: is CANDLE_GRAD_DO_NOT_DETACH=1 set?"
        );
        out
    }

    fn values(&self) -> Vec<Vec<f64>> {
        self.vars.iter().map(|v| flat(v.as_tensor())).collect()
    }

    fn set(&self, values: &[Vec<f64>]) {
        for (var, v) in self.vars.iter().zip(values) {
            let t = Tensor::from_vec(v.clone(), var.shape(), &Device::Cpu).unwrap();
            var.set(&t.to_dtype(var.dtype()).unwrap()).unwrap();
        }
    }

    /// Runs `f` with the variables moved to θ + t·dir, then restores θ.
    fn at<T>(&self, base: &[Vec<f64>], dir: &[Vec<f64>], t: f64, f: impl Fn() -> T) -> T {
        let moved: Vec<Vec<f64>> = base
            .iter()
            .zip(dir)
            .map(|(b, d)| b.iter().zip(d).map(|(x, y)| x + t * y).collect())
            .collect();
        self.set(&moved);
        let r = f();
        self.set(base);
        r
    }

    /// L at θ with coordinate `j` of variable `k` moved by `t` (only that variable is rewritten).
    fn at_coord(&self, base: &[Vec<f64>], k: usize, j: usize, t: f64) -> f64 {
        let mut moved = base[k].clone();
        moved[j] += t;
        let var = &self.vars[k];
        let set = |v: &[f64]| {
            let t = Tensor::from_slice(v, var.shape(), &Device::Cpu).unwrap();
            var.set(&t.to_dtype(var.dtype()).unwrap()).unwrap();
        };
        set(&moved);
        let value = self.value();
        set(&base[k]);
        value
    }

    /// A random direction of unit Euclidean norm over all variables together, so a step h along it
    /// moves every pre-activation by O(h) whatever the parameter count, and ReLU kinks are rarely
    /// crossed by finite differences.
    fn random_direction(&self, seed: u64) -> Vec<Vec<f64>> {
        let mut d: Vec<Vec<f64>> = self
            .vars
            .iter()
            .enumerate()
            .map(|(i, v)| flat(&random_tensor(v.dims(), seed * 1000 + i as u64, 1.0).unwrap()))
            .collect();
        let norm = dot(&d, &d).sqrt();
        d.iter_mut().flatten().for_each(|x| *x /= norm);
        d
    }
}

/// The values of a tensor as f64.
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn dot(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| x * y)
        .sum()
}

/// Checks the gradient on every coordinate of small variables (the first, middle and last on
/// larger ones; h = 1e-5) and along 3 random unit directions (h = 1e-6), against central differences.
pub fn check_first_order(name: &str, probe: &Probe) {
    let h = 1e-5;
    let base = probe.values();
    let grads = probe.grads();
    let scale = 1.0 + probe.value().abs();
    for (k, (b, g)) in base.iter().zip(&grads).enumerate() {
        let n = b.len();
        let coords: Vec<usize> = if n <= 256 {
            (0..n).collect()
        } else {
            vec![0, n / 2, n - 1]
        };
        for j in coords {
            let fd = (probe.at_coord(&base, k, j, h) - probe.at_coord(&base, k, j, -h)) / (2.0 * h);
            assert!(
                (fd - g[j]).abs() <= 1e-6 * (scale + g[j].abs()),
                "{name}: d/dθ[{k}][{j}]: autodiff {} vs finite difference {fd}",
                g[j]
            );
        }
    }
    let h = 1e-6;
    for s in 0..3 {
        let dir = probe.random_direction(s + 1);
        let fd = (probe.at(&base, &dir, h, || probe.value())
            - probe.at(&base, &dir, -h, || probe.value()))
            / (2.0 * h);
        let ad = dot(&grads, &dir);
        assert!(
            (fd - ad).abs() <= 1e-6 * (scale + ad.abs()),
            "{name}: directional derivative {s}: autodiff {ad} vs finite difference {fd}"
        );
    }
}

/// Checks H v (double backward) against central differences of gradients (h = 1e-6) along 2 random
/// unit directions, and uᵀHv = vᵀHu.
pub fn check_second_order(name: &str, probe: &Probe) {
    let h = 1e-6;
    let base = probe.values();
    let u = probe.random_direction(11);
    let v = probe.random_direction(12);
    let as_tensors = |d: &[Vec<f64>]| -> Vec<Tensor> {
        probe
            .vars
            .iter()
            .zip(d)
            .map(|(var, x)| {
                Tensor::from_vec(x.clone(), var.shape(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(var.dtype())
                    .unwrap()
            })
            .collect()
    };
    let hu = probe.hvp(&as_tensors(&u));
    let hv = probe.hvp(&as_tensors(&v));
    for (dir, hd, label) in [(&u, &hu, "u"), (&v, &hv, "v")] {
        let plus = probe.at(&base, dir, h, || probe.grads());
        let minus = probe.at(&base, dir, -h, || probe.grads());
        let size = hd.iter().flatten().fold(1.0f64, |m, x| m.max(x.abs()));
        for (k, ((p, m), a)) in plus.iter().zip(&minus).zip(hd).enumerate() {
            for j in 0..a.len() {
                let fd = (p[j] - m[j]) / (2.0 * h);
                assert!(
                    (fd - a[j]).abs() <= 1e-5 * size,
                    "{name}: (H{label})[{k}][{j}]: double backward {} vs finite difference {fd}",
                    a[j]
                );
            }
        }
    }
    let (uhv, vhu) = (dot(&u, &hv), dot(&v, &hu));
    assert!(
        (uhv - vhu).abs() <= 1e-10 * (1.0 + uhv.abs()),
        "{name}: uᵀHv = {uhv} but vᵀHu = {vhu}"
    );
}

/// Asserts that a model's gradient by [`crate::nn::gradient::mean_loss_and_gradient`] (its
/// hand-written passes) equals candle's autograd, for MSE and cross-entropy, in f64; `setup`
/// builds the model, inputs and targets from a seed.
pub fn assert_gradient_equals_autograd(setup: impl Fn(u64) -> (Box<dyn Model>, Tensor, Targets)) {
    for (i, kind) in [LossKind::Mse, LossKind::CrossEntropy]
        .into_iter()
        .enumerate()
    {
        let (model, x, targets) = setup(40 + i as u64);
        let (loss, gradient) = mean_loss_and_gradient(model.as_ref(), kind, &x, &targets).unwrap();
        let reference = mean_loss(kind, &model.forward(&x).unwrap(), &targets).unwrap();
        let grads = reference.backward().unwrap();
        assert!((loss - reference.to_scalar::<f64>().unwrap()).abs() < 1e-12);
        for (p, got) in model.params().iter().zip(&gradient) {
            let want = grads.get(p.var.as_tensor()).unwrap();
            assert_eq!(got.dims(), want.dims(), "{}", p.name);
            let (got, want) = (flat(got), flat(want));
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{kind:?} {}: zero gradient", p.name);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-11 * scale,
                    "{kind:?} {}: {g} vs {w}",
                    p.name
                );
            }
        }
    }
}

/// Asserts that the gradient of Σ_i c_i ℓ_i (random c_i) by
/// [`crate::nn::gradient::loss_and_gradient`] matches a central finite difference of the objective
/// along a random direction, in f64, for `model` on `x` with one row of `targets` per sample.
pub fn assert_weighted_gradient_matches_finite_difference(
    model: &dyn Model,
    x: &Tensor,
    targets: &Targets,
    kind: LossKind,
) {
    let n = x.dim(0).unwrap();
    let w = random_tensor(&[n, 1], 51, 1.0).unwrap();
    let weights = SampleWeights::PerSample(w.clone());
    let objective = |model: &dyn Model| -> f64 {
        let losses = per_sample_loss(kind, &model.forward(x).unwrap(), targets);
        (losses.unwrap() * w.squeeze(1).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let (_, gradient) = loss_and_gradient(model, kind, x, targets, &weights).unwrap();
    let d: Vec<Tensor> = model
        .params()
        .iter()
        .enumerate()
        .map(|(i, p)| random_tensor(p.var.dims(), 60 + i as u64, 0.05).unwrap())
        .collect();
    let fd = directional_difference(model.params(), &d, 1e-5, || objective(model));
    let exact = dot_all(&gradient, &d);
    assert!(
        (fd - exact).abs() < 1e-7 * exact.abs().max(1.0),
        "{kind:?}: {fd} vs {exact}"
    );
}
