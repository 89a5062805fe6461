//! Benchmark (not a test) of one SGD step — forward, MSE loss, backward, update — of the paper's MLP
//! 3072-512-512-10 at batch 8, 64 and 512 and of the 5-layer CNN at batch 8 and 64, f32 on the CPU.
//!
//! After criterion's own report, the same steps are timed once more (median of repeated runs) next to
//! `bench/torch_step.py` when `python3` with PyTorch is installed, and the ratio candle / PyTorch is
//! printed. See `bench/README.md`.

use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use criterion::{BenchmarkId, Criterion};
use eoss::data::LabelEncoding;
use eoss::nn::loss::{mean_loss, LossKind, Targets};
use eoss::nn::optim::Sgd;
use eoss::nn::{Activation, Model, ModelSpec};

/// The cases: (name, model, batch).
const CASES: [(&str, ModelSpec, usize); 5] = [
    ("mlp", MLP, 8),
    ("mlp", MLP, 64),
    ("mlp", MLP, 512),
    ("cnn", ModelSpec::Cnn {}, 8),
    ("cnn", ModelSpec::Cnn {}, 64),
];
const MLP: ModelSpec = ModelSpec::Mlp {
    depth: 2,
    width: 512,
    activation: Activation::Relu,
};

/// A model, its optimiser and one fixed batch.
struct Setup {
    model: Box<dyn Model>,
    sgd: Sgd,
    x: Tensor,
    targets: Targets,
}

impl Setup {
    fn new(spec: ModelSpec, batch: usize) -> Self {
        let dev = Device::Cpu;
        let model = spec
            .build([3, 32, 32], 10, 0.2, 0, DType::F32, &dev)
            .unwrap();
        let sgd = Sgd::new(model.params(), 0.01, 0.0).unwrap();
        let x = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), &dev).unwrap();
        let labels: Vec<u32> = (0..batch as u32).map(|i| i % 10).collect();
        let mut onehot = vec![0f32; batch * 10];
        for (i, l) in labels.iter().enumerate() {
            onehot[i * 10 + *l as usize] = 1.0;
        }
        let targets = Targets {
            values: Tensor::from_vec(onehot, (batch, 10), &dev).unwrap(),
            labels: Tensor::from_vec(labels, batch, &dev).unwrap(),
            encoding: LabelEncoding::OneHot,
        };
        Self {
            model,
            sgd,
            x,
            targets,
        }
    }

    fn step(&mut self) {
        let out = self.model.forward(&self.x).unwrap();
        let loss = mean_loss(LossKind::Mse, &out, &self.targets).unwrap();
        let grads = loss.backward().unwrap();
        self.sgd.step(self.model.params(), &grads).unwrap();
    }

    /// Median wall time of one step in milliseconds.
    fn median_ms(&mut self, reps: usize) -> f64 {
        self.step();
        let mut t: Vec<f64> = (0..reps)
            .map(|_| {
                let start = Instant::now();
                self.step();
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[reps / 2]
    }
}

fn bench_steps(c: &mut Criterion) {
    let mut group = c.benchmark_group("sgd_step_f32_cpu");
    group.sample_size(20);
    for (name, spec, batch) in CASES {
        let mut setup = Setup::new(spec, batch);
        group.bench_with_input(BenchmarkId::new(name, batch), &batch, |b, _| {
            b.iter(|| setup.step())
        });
    }
    group.finish();
}

/// Times the same steps in PyTorch (if installed) and prints candle / PyTorch ratios.
fn compare_with_pytorch() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/torch_step.py");
    let out = Command::new("python3").arg(script).arg("--json").output();
    let torch: Option<serde_json::Value> = match out {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).ok(),
        Ok(o) => {
            eprintln!(
                "no PyTorch reference: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("no PyTorch reference: python3: {e}");
            None
        }
    };
    println!("\ncase        candle ms   pytorch ms   ratio");
    for (name, spec, batch) in CASES {
        let reps = if batch >= 512 || name == "cnn" {
            11
        } else {
            51
        };
        let ms = Setup::new(spec, batch).median_ms(reps);
        let key = format!("{name}/{batch}");
        match torch.as_ref().and_then(|t| t[&key].as_f64()) {
            Some(p) => println!("{key:<10} {ms:>10.2} {p:>12.2} {:>7.2}", ms / p),
            None => println!("{key:<10} {ms:>10.2} {:>12} {:>7}", "-", "-"),
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_steps(&mut c);
    c.final_summary();
    compare_with_pytorch();
}
