//! `eoss bench`: times the operations that dominate a run — the SGD step, a full-set evaluation,
//! the Hessian-vector product, a λmax solve (cold and warm-started), a batch-sharpness estimate
//! and the per-sample gradient alignment — for the paper's MLP 3072-512-512-10, 5-layer CNN and
//! ResNet-20, in f32 on the CPU or a CUDA GPU, and, when a Python with PyTorch is given, times exactly the same cases in PyTorch in
//! the same run, each case right before eoss times it (`bench/torch_reference.py`, embedded in the
//! binary), and prints the ratio eoss / PyTorch.
//!
//! Every case runs on fixed random inputs (seeded) of CIFAR-10's shape with one-hot MSE targets;
//! times are medians over repetitions after one warm-up, with the device synchronised around each.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::Serialize;

use crate::curvature::{
    model_gradient_alignment, AlignmentConfig, Batch, FullBatchConfig, HessianOperator, HvpConfig,
    HvpMethod, LanczosConfig, Landscape, MonteCarloConfig, Objective, Start,
};
use crate::data::LabelEncoding;
use crate::device::DeviceClass;
use crate::nn::gradient;
use crate::nn::loss::{mean_loss, LossKind, Targets};
use crate::nn::optim::Sgd;
use crate::nn::{Activation, Model, ModelSpec};
use crate::train::dynamics::batch_loss_and_gradient;

/// The PyTorch side of every case, run with the interpreter given to `--torch`.
const TORCH_SCRIPT: &str = include_str!("../bench/torch_reference.py");

/// What is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Forward, the paper's MSE, backward and the SGD update on one batch of `size`.
    SgdStep,
    /// The outputs of `size` samples and their mean loss, nothing kept for a backward pass: a
    /// `train` run's full-set evaluation (by the conv nets' hand-written forward passes, in
    /// slices; PyTorch's forward under `no_grad`).
    Evaluate,
    /// One HVP on `size` samples, the forward graph kept (built once, untimed); for the MLP by the
    /// hand-written forward-over-reverse passes that eoss uses by default.
    Hvp,
    /// The same HVP by candle's double backward (`HvpMethod::Autodiff`), for comparison; PyTorch
    /// runs its double backward as for `hvp`.
    HvpAutodiff,
    /// Forward, backward with graph, and one HVP on `size` samples.
    HvpRebuilt,
    /// λmax of the Hessian on `size` samples by Lanczos from a random start.
    LambdaMaxCold,
    /// λmax after one gradient step, warm-started from the previous top eigenvector.
    LambdaMaxWarm,
    /// Batch sharpness: 50 batches of 16 drawn from `size` samples.
    BatchSharpness,
    /// The alignment of figures 23–24: the gradients of output 0 of `size` samples, their Gram
    /// matrix and its histograms (PyTorch: `torch.func`'s vmap of grad, then one matrix product).
    Alignment,
}

/// One benchmark case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Case {
    /// The operation.
    pub op: Op,
    /// `mlp`, `cnn` or `resnet20`.
    pub model: &'static str,
    /// Batch size or number of samples.
    pub size: usize,
}

impl Case {
    const fn new(op: Op, model: &'static str, size: usize) -> Self {
        Self { op, model, size }
    }

    /// `op/model/size`, the name both sides report under.
    pub fn name(&self) -> String {
        let op = serde_json::to_value(self.op).expect("op serialises");
        format!(
            "{}/{}/{}",
            op.as_str().unwrap_or("?"),
            self.model,
            self.size
        )
    }
}

/// Batches of a batch-sharpness estimate, and their size.
pub const SHARPNESS_BATCHES: usize = 50;
/// The batch size of a batch-sharpness estimate.
pub const SHARPNESS_BATCH_SIZE: usize = 16;
/// Lanczos tolerance and iteration cap of the λmax cases (the paper's 0.005).
pub const LANCZOS_TOL: f64 = 0.005;
/// Iteration cap of the λmax cases.
pub const LANCZOS_MAX_ITER: usize = 100;
/// Samples per forward graph in the conv nets' curvature cases; on more samples than this both sides
/// rebuild each chunk's graph for every product (all chunks' graphs of 8,192 CNN samples would not
/// fit in a laptop's memory).
pub const CNN_CHUNK: usize = 1024;
/// A first run longer than this (seconds) counts as a repetition instead of an untimed warm-up.
pub const LONG_CASE_S: f64 = 10.0;
/// Step size of the gradient step between the cold and the warm λmax solve.
pub const WARM_STEP_LR: f64 = 0.01;

/// The cases for a device: the CPU set is sized for a laptop, the GPU set for the paper's scale.
pub fn cases(device: DeviceClass, suite: Suite) -> Vec<Case> {
    use Op::*;
    let train = [
        Case::new(SgdStep, "mlp", 8),
        Case::new(SgdStep, "mlp", 16),
        Case::new(SgdStep, "mlp", 64),
        Case::new(SgdStep, "mlp", 512),
        Case::new(SgdStep, "cnn", 8),
        Case::new(SgdStep, "cnn", 64),
        Case::new(SgdStep, "resnet20", 8),
        Case::new(SgdStep, "resnet20", 64),
        Case::new(Evaluate, "mlp", 8192),
        Case::new(Evaluate, "cnn", 1024),
        Case::new(Evaluate, "resnet20", 1024),
    ];
    let curvature: Vec<Case> = match device {
        DeviceClass::Cpu => vec![
            Case::new(Hvp, "mlp", 512),
            Case::new(Hvp, "mlp", 8192),
            Case::new(HvpAutodiff, "mlp", 8192),
            Case::new(HvpRebuilt, "mlp", 8192),
            Case::new(LambdaMaxCold, "mlp", 512),
            Case::new(LambdaMaxWarm, "mlp", 512),
            Case::new(BatchSharpness, "mlp", 8192),
            Case::new(Hvp, "cnn", 512),
            Case::new(Hvp, "cnn", 8192),
            Case::new(LambdaMaxCold, "cnn", 256),
            Case::new(LambdaMaxWarm, "cnn", 256),
            Case::new(BatchSharpness, "cnn", 8192),
            Case::new(Hvp, "resnet20", 512),
            Case::new(LambdaMaxCold, "resnet20", 256),
            Case::new(BatchSharpness, "resnet20", 8192),
            Case::new(Alignment, "mlp", 256),
            Case::new(Alignment, "cnn", 128),
        ],
        DeviceClass::Cuda => vec![
            Case::new(Hvp, "mlp", 512),
            Case::new(Hvp, "mlp", 4096),
            Case::new(HvpRebuilt, "mlp", 4096),
            Case::new(Hvp, "mlp", 8192),
            Case::new(HvpAutodiff, "mlp", 8192),
            Case::new(HvpRebuilt, "mlp", 8192),
            Case::new(LambdaMaxCold, "mlp", 8192),
            Case::new(LambdaMaxWarm, "mlp", 8192),
            Case::new(BatchSharpness, "mlp", 8192),
            Case::new(Hvp, "cnn", 512),
            Case::new(Hvp, "cnn", 2048),
            Case::new(LambdaMaxCold, "cnn", 2048),
            Case::new(LambdaMaxWarm, "cnn", 2048),
            Case::new(BatchSharpness, "cnn", 8192),
        ],
    };
    let mut all = Vec::new();
    if suite != Suite::Curvature {
        all.extend(train);
    }
    if suite != Suite::Train {
        all.extend(curvature);
    }
    all
}

/// Which cases run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// SGD steps and evaluation passes only.
    Train,
    /// HVP, λmax and batch sharpness only.
    Curvature,
    /// Both.
    All,
}

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    /// `op/model/size`.
    pub name: String,
    /// Median milliseconds.
    pub ms: f64,
    /// Repetitions timed.
    pub reps: usize,
    /// Hessian-vector products per repetition (Lanczos iterations for λmax), where it applies.
    pub hvps: Option<usize>,
    /// PyTorch's median milliseconds for the same case, when it ran.
    pub torch_ms: Option<f64>,
    /// PyTorch's HVP count for the same case.
    pub torch_hvps: Option<usize>,
}

/// Options of `eoss bench`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Device.
    pub device: DeviceClass,
    /// Which cases.
    pub suite: Suite,
    /// Only cases whose name contains this.
    pub filter: Option<String>,
    /// A Python interpreter with PyTorch, for the reference.
    pub torch: Option<PathBuf>,
    /// Seconds of repetitions per case (at least 3 repetitions).
    pub seconds: f64,
}

/// Errors of a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Candle failed.
    #[error("benchmark {case}: {source}")]
    Candle {
        /// The case.
        case: String,
        /// The error.
        source: candle_core::Error,
    },
    /// A curvature routine failed.
    #[error("benchmark {case}: {source}")]
    Curvature {
        /// The case.
        case: String,
        /// The error.
        source: crate::curvature::CurvatureError,
    },
    /// The PyTorch reference failed.
    #[error("PyTorch reference ({python}): {message}")]
    Torch {
        /// The interpreter.
        python: String,
        /// What went wrong.
        message: String,
    },
}

/// A model with fixed inputs: the state every case starts from.
struct Setup {
    spec: ModelSpec,
    model: Box<dyn Model>,
    data: Batch,
    device: Device,
}

fn model_spec(name: &str) -> ModelSpec {
    match name {
        "cnn" => ModelSpec::Cnn {},
        "resnet20" => ModelSpec::Resnet { depth: 20 },
        _ => ModelSpec::Mlp {
            depth: 2,
            width: 512,
            activation: Activation::Relu,
        },
    }
}

impl Setup {
    fn new(case: &Case, device: &Device) -> candle_core::Result<Self> {
        let spec = model_spec(case.model);
        let model = spec.build([3, 32, 32], 10, 0.2, 0, DType::F32, device)?;
        let n = case.size;
        // Seeded standard-normal inputs: every run times the same data (and the same λmax solves).
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let values: Vec<f32> = (0..n * 3 * 32 * 32)
            .map(|_| rng.sample(StandardNormal))
            .collect();
        let x = Tensor::from_vec(values, (n, 3, 32, 32), device)?;
        let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
        let mut onehot = vec![0f32; n * 10];
        for (i, l) in labels.iter().enumerate() {
            onehot[i * 10 + *l as usize] = 1.0;
        }
        let targets = Targets {
            values: Tensor::from_vec(onehot, (n, 10), device)?,
            labels: Tensor::from_vec(labels, n, device)?,
            encoding: LabelEncoding::OneHot,
        };
        let data = Batch::new(x, targets).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Self {
            spec,
            model,
            data,
            device: device.clone(),
        })
    }

    /// The MLP's products run on the whole batch at once, like PyTorch's; the conv nets' in chunks
    /// of [`CNN_CHUNK`] samples, kept when there is only one and rebuilt per product otherwise.
    fn full(&self) -> FullBatchConfig {
        let n = self.data.len();
        let chunk_size = match self.spec {
            ModelSpec::Mlp { .. } => n,
            _ => CNN_CHUNK,
        };
        FullBatchConfig {
            subsample: None,
            subsample_seed: 0,
            hvp: HvpConfig {
                chunk_size,
                retain_graphs: n <= chunk_size,
                ..HvpConfig::default()
            },
        }
    }

    fn landscape(&self) -> crate::curvature::Result<Landscape<'_>> {
        Landscape::new(&*self.model, LossKind::Mse, &self.data, &self.full())
    }

    fn hessian(&self, method: HvpMethod) -> crate::curvature::Result<HessianOperator<'_>> {
        let cfg = HvpConfig {
            method,
            ..self.full().hvp
        };
        HessianOperator::new(
            &*self.model,
            LossKind::Mse,
            &self.data,
            &Objective::Mean,
            &cfg,
        )
    }
}

/// Median milliseconds of `f` after one warm-up, over at least 3 repetitions or `seconds`; a
/// warm-up longer than [`LONG_CASE_S`] counts as the first repetition.
fn median_ms(
    device: &Device,
    seconds: f64,
    mut f: impl FnMut() -> Result<usize, BenchError>,
) -> Result<(f64, usize, usize), BenchError> {
    let sync = |d: &Device| d.synchronize().ok();
    let t = Instant::now();
    let hvps = f()?;
    sync(device);
    let first = t.elapsed().as_secs_f64();
    let mut times = Vec::new();
    if first > LONG_CASE_S {
        times.push(first * 1e3);
    }
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed().as_secs_f64() < seconds && times.len() < 200) {
        let t = Instant::now();
        f()?;
        sync(device);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times.len(), hvps))
}

/// Times one case in eoss.
fn run_case(case: &Case, opts: &BenchOptions, device: &Device) -> Result<Timing, BenchError> {
    let name = case.name();
    let candle = |source| BenchError::Candle {
        case: name.clone(),
        source,
    };
    let curv = |source| BenchError::Curvature {
        case: name.clone(),
        source,
    };
    let mut setup = Setup::new(case, device).map_err(candle)?;
    let lanczos = LanczosConfig {
        top_k: 1,
        max_iter: LANCZOS_MAX_ITER,
        rel_tol: LANCZOS_TOL,
        seed: 0,
    };
    let (ms, reps, hvps) = match case.op {
        Op::SgdStep => {
            let mut sgd = Sgd::new(setup.model.params(), 0.01, 0.0).map_err(candle)?;
            median_ms(device, opts.seconds, || {
                let (_, grads) = batch_loss_and_gradient(
                    &*setup.model,
                    LossKind::Mse,
                    &setup.data.inputs,
                    &setup.data.targets,
                )
                .map_err(candle)?;
                sgd.step(setup.model.params(), &grads).map_err(candle)?;
                Ok(0)
            })?
        }
        Op::Evaluate => median_ms(device, opts.seconds, || {
            let outputs = gradient::outputs(&*setup.model, &setup.data.inputs).map_err(candle)?;
            mean_loss(LossKind::Mse, &outputs, &setup.data.targets)
                .and_then(|l| l.to_dtype(DType::F64)?.to_scalar::<f64>())
                .map_err(candle)?;
            Ok(0)
        })?,
        Op::Hvp | Op::HvpAutodiff => {
            let method = match case.op {
                Op::HvpAutodiff => HvpMethod::Autodiff,
                _ => HvpMethod::Auto,
            };
            let op = setup.hessian(method).map_err(curv)?;
            let v = op.gradient().clone();
            median_ms(device, opts.seconds, || {
                op.apply(&v).map_err(curv)?;
                Ok(1)
            })?
        }
        Op::HvpRebuilt => median_ms(device, opts.seconds, || {
            let op = setup.hessian(HvpMethod::Auto).map_err(curv)?;
            op.apply(op.gradient()).map_err(curv)?;
            Ok(1)
        })?,
        Op::LambdaMaxCold => {
            let land = setup.landscape().map_err(curv)?;
            median_ms(device, opts.seconds, || {
                let e = land.lambda_max(&lanczos, Start::Random).map_err(curv)?;
                Ok(e.iterations)
            })?
        }
        Op::LambdaMaxWarm => {
            let previous = {
                let land = setup.landscape().map_err(curv)?;
                land.lambda_max(&lanczos, Start::Random).map_err(curv)?
            };
            gradient_step(&mut setup, WARM_STEP_LR).map_err(candle)?;
            let land = setup.landscape().map_err(curv)?;
            let warm = previous.vectors[0].clone();
            median_ms(device, opts.seconds, || {
                let e = land
                    .lambda_max(&lanczos, Start::Warm(&warm))
                    .map_err(curv)?;
                Ok(e.iterations)
            })?
        }
        Op::BatchSharpness => {
            let land = setup.landscape().map_err(curv)?;
            let mc = MonteCarloConfig {
                min_samples: SHARPNESS_BATCHES,
                max_samples: SHARPNESS_BATCHES,
                rel_tol: 1e-9,
                seed: 0,
            };
            median_ms(device, opts.seconds, || {
                let e = land
                    .batch_sharpness(SHARPNESS_BATCH_SIZE, &mc)
                    .map_err(curv)?;
                Ok(e.samples)
            })?
        }
        Op::Alignment => {
            let cfg = AlignmentConfig::new(setup.data.len());
            median_ms(device, opts.seconds, || {
                model_gradient_alignment(&*setup.model, &setup.data, &cfg).map_err(curv)?;
                Ok(0)
            })?
        }
    };
    Ok(Timing {
        name,
        ms,
        reps,
        hvps: (!matches!(case.op, Op::SgdStep | Op::Evaluate | Op::Alignment)).then_some(hvps),
        torch_ms: None,
        torch_hvps: None,
    })
}

/// One full-batch gradient step θ ← θ − lr ∇L (the move between the cold and the warm solve).
fn gradient_step(setup: &mut Setup, lr: f64) -> candle_core::Result<()> {
    let out = setup.model.forward(&setup.data.inputs)?;
    let loss = mean_loss(LossKind::Mse, &out, &setup.data.targets)?;
    let grads = loss.backward()?;
    Sgd::new(setup.model.params(), lr, 0.0)?.step(setup.model.params(), &grads)?;
    setup.device.synchronize()
}

/// Runs the PyTorch reference on `cases` in one interpreter; returns name → (ms, hvps).
fn run_torch(
    python: &Path,
    device: DeviceClass,
    cases: &[Case],
    seconds: f64,
) -> Result<serde_json::Map<String, serde_json::Value>, BenchError> {
    let err = |message: String| BenchError::Torch {
        python: python.display().to_string(),
        message,
    };
    let mut script = tempfile::Builder::new()
        .prefix("eoss-torch-reference-")
        .suffix(".py")
        .tempfile()
        .map_err(|e| err(e.to_string()))?;
    script
        .write_all(TORCH_SCRIPT.as_bytes())
        .map_err(|e| err(e.to_string()))?;
    let spec = serde_json::json!({
        "device": if device == DeviceClass::Cuda { "cuda" } else { "cpu" },
        "seconds": seconds,
        "cases": cases.iter().map(|c| serde_json::json!({
            "name": c.name(), "op": c.op, "model": c.model, "size": c.size,
        })).collect::<Vec<_>>(),
        "sharpness_batches": SHARPNESS_BATCHES,
        "sharpness_batch_size": SHARPNESS_BATCH_SIZE,
        "lanczos_tol": LANCZOS_TOL,
        "lanczos_max_iter": LANCZOS_MAX_ITER,
        "warm_step_lr": WARM_STEP_LR,
        "cnn_chunk": CNN_CHUNK,
        "long_case_s": LONG_CASE_S,
    });
    let out = Command::new(python)
        .arg(script.path())
        .arg(spec.to_string())
        .output()
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    match serde_json::from_str(last) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        _ => Err(err(format!("unexpected output: {last}"))),
    }
}

/// Runs the benchmark; prints a table (and PyTorch ratios) and returns the timings.
pub fn run(opts: &BenchOptions) -> Result<Vec<Timing>, Box<BenchError>> {
    let device = opts
        .device
        .candle_device()
        .map_err(|e| BenchError::Candle {
            case: "device".into(),
            source: e,
        })?;
    let cases: Vec<Case> = cases(opts.device, opts.suite)
        .into_iter()
        .filter(|c| opts.filter.as_ref().is_none_or(|f| c.name().contains(f)))
        .collect();
    if let Some(python) = &opts.torch {
        eprintln!(
            "timing each case in PyTorch ({}) right before eoss",
            python.display()
        );
    }
    println!(
        "{:<28} {:>11} {:>6} {:>12} {:>6} {:>7}",
        "case", "eoss ms", "hvps", "pytorch ms", "hvps", "ratio"
    );
    let mut timings = Vec::new();
    for case in &cases {
        // Case by case, PyTorch then eoss: the machine's speed drifts over a long run, and a ratio
        // should compare two timings taken minutes apart at most.
        let reference = match &opts.torch {
            Some(python) => {
                run_torch(python, opts.device, &[*case], opts.seconds)?.remove(&case.name())
            }
            None => None,
        };
        let mut t = run_case(case, opts, &device)?;
        if let Some(reference) = reference {
            t.torch_ms = reference["ms"].as_f64();
            t.torch_hvps = reference["hvps"].as_u64().map(|h| h as usize);
        }
        let fmt_hvps = |h: Option<usize>| h.map_or("-".to_string(), |h| h.to_string());
        let (torch_ms, ratio) = match t.torch_ms {
            Some(p) => (format!("{p:.3}"), format!("{:.2}", t.ms / p)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<28} {:>11.3} {:>6} {:>12} {:>6} {:>7}",
            t.name,
            t.ms,
            fmt_hvps(t.hvps),
            torch_ms,
            fmt_hvps(t.torch_hvps),
            ratio
        );
        std::io::stdout().flush().ok();
        timings.push(t);
    }
    Ok(timings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_names_are_op_model_size() {
        assert_eq!(
            Case::new(Op::LambdaMaxWarm, "mlp", 512).name(),
            "lambda_max_warm/mlp/512"
        );
        let all = cases(DeviceClass::Cpu, Suite::All);
        let train = cases(DeviceClass::Cpu, Suite::Train);
        assert!(train
            .iter()
            .all(|c| matches!(c.op, Op::SgdStep | Op::Evaluate)));
        assert!(all.len() > train.len());
    }

    #[test]
    fn sgd_evaluation_hvp_and_alignment_cases_run_on_the_cpu() {
        let opts = BenchOptions {
            device: DeviceClass::Cpu,
            suite: Suite::All,
            filter: None,
            torch: None,
            seconds: 0.0,
        };
        let dev = Device::Cpu;
        let t = run_case(&Case::new(Op::SgdStep, "mlp", 8), &opts, &dev).unwrap();
        assert!(t.ms > 0.0 && t.reps >= 3 && t.hvps.is_none());
        let t = run_case(&Case::new(Op::Evaluate, "cnn", 4), &opts, &dev).unwrap();
        assert!(t.ms > 0.0 && t.hvps.is_none());
        let t = run_case(&Case::new(Op::Hvp, "mlp", 32), &opts, &dev).unwrap();
        assert_eq!(t.hvps, Some(1));
        let t = run_case(&Case::new(Op::Alignment, "cnn", 3), &opts, &dev).unwrap();
        assert!(t.ms > 0.0 && t.hvps.is_none());
    }
}
