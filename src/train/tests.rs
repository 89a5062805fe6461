//! End-to-end properties of training runs on tiny data: determinism, bit-exact resumption and
//! branching, divergence, schedules, stop-loss, and the covariance of the injected noise.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::dynamics::{Dynamics, FullBatch, NoiseSettings, NoiseState};
use super::measure::{EigenSpec, EverySpec, MeasureConfig, MonteCarloSpec};
use super::schedule::{Cadence, Change};
use super::*;
use crate::data::{Dataset, LabelEncoding};
use crate::nn::loss::{per_sample_loss, LossKind, Targets};
use crate::nn::ModelSpec;
use crate::stages::StageReporter;

struct Quiet;
impl StageReporter for Quiet {
    fn set_length(&self, _: u64) {}
    fn set_position(&self, _: u64) {}
    fn log(&self, _: &str) {}
}

/// `n` samples of shape 1×2×3 in 3 classes: class means plus noise.
fn tiny_data(n: usize, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let labels: Vec<i64> = (0..n).map(|i| (i % 3) as i64).collect();
    let images = labels
        .iter()
        .flat_map(|&l| (0..6).map(move |j| if j % 3 == l as usize { 1.0f32 } else { 0.0 }))
        .map(|m| m + 0.5 * rng.sample::<f32, _>(StandardNormal))
        .collect();
    Dataset {
        images,
        shape: [n, 1, 2, 3],
        labels,
        num_classes: 3,
        encoding: LabelEncoding::OneHot,
        source_indices: (0..n as i64).collect(),
    }
}

fn config(steps: u64) -> TrainConfig {
    serde_json::from_value(serde_json::json!({
        "model": {"arch": "mlp", "depth": 2, "width": 8},
        "init_scale": 1.0,
        "lr": 0.05,
        "batch_size": 4,
        "momentum": 0.9,
        "steps": steps,
        "checkpoint_every": 20,
        "eval": {"every": 10},
    }))
    .unwrap()
}

fn with_measurements(mut config: TrainConfig) -> TrainConfig {
    config.measure = MeasureConfig {
        lambda_max: Some(EigenSpec {
            every: 10,
            double_after: vec![],
            rel_tol: 1e-3,
            max_iter: 20,
        }),
        batch_sharpness: Some(MonteCarloSpec {
            every: 15,
            double_after: vec![],
            min_samples: 4,
            max_samples: 8,
            rel_tol: 0.01,
        }),
        step_sharpness: Some(EverySpec {
            every: 5,
            double_after: vec![],
        }),
        ..MeasureConfig::default()
    };
    config
}

fn run(config: &TrainConfig, data: &Dataset, start: &StartPoint, dir: &Path) -> Outcome {
    train(config, data, None, start, dir, &Quiet).unwrap()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn checkpoint_path(dir: &Path, step: u64) -> std::path::PathBuf {
    dir.join("checkpoints").join(checkpoint::file_name(step))
}

fn final_checkpoint(dir: &Path, step: u64) -> Vec<u8> {
    read(&checkpoint_path(dir, step))
}

/// Starts from the checkpoint of step `step` of the run in `dir`.
fn from_checkpoint(dir: &Path, step: u64) -> StartPoint {
    StartPoint::Checkpoint {
        path: checkpoint_path(dir, step),
        metrics: dir.join("metrics.csv"),
    }
}

#[test]
fn the_same_config_gives_bit_identical_checkpoints_and_metrics() {
    let data = tiny_data(24, 1);
    let config = with_measurements(config(40));
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run(&config, &data, &StartPoint::Fresh, a.path());
    run(&config, &data, &StartPoint::Fresh, b.path());
    assert_eq!(
        final_checkpoint(a.path(), 40),
        final_checkpoint(b.path(), 40)
    );
    assert_eq!(
        read(&a.path().join("metrics.csv")),
        read(&b.path().join("metrics.csv"))
    );
    // Rebuilding each chunk's graph per product (the low-memory mode) measures the same values;
    // the default mode stays out of the canonical params, so existing keys do not move.
    let mut rebuilt = config.clone();
    rebuilt.measure.retain_graphs = false;
    let r = tempfile::tempdir().unwrap();
    run(&rebuilt, &data, &StartPoint::Fresh, r.path());
    assert_eq!(
        read(&a.path().join("metrics.csv")),
        read(&r.path().join("metrics.csv"))
    );
    let canonical = |m: &MeasureConfig| serde_json::to_value(m).unwrap();
    assert!(canonical(&config.measure).get("retain_graphs").is_none());
    assert_eq!(canonical(&rebuilt.measure)["retain_graphs"], false);
    let mut other = config.clone();
    other.init_seed = 1;
    let c = tempfile::tempdir().unwrap();
    run(&other, &data, &StartPoint::Fresh, c.path());
    assert_ne!(
        final_checkpoint(a.path(), 40),
        final_checkpoint(c.path(), 40)
    );
}

#[test]
fn a_run_resumed_from_a_checkpoint_ends_bit_identical_to_an_uninterrupted_one() {
    let data = tiny_data(24, 2);
    let config = with_measurements(config(60));
    let whole = tempfile::tempdir().unwrap();
    run(&config, &data, &StartPoint::Fresh, whole.path());

    // A killed run: its work dir holds checkpoints up to step 20 and a metrics file that went on.
    let killed = tempfile::tempdir().unwrap();
    run(&config, &data, &StartPoint::Fresh, killed.path());
    for (step, path) in checkpoint::list(&killed.path().join("checkpoints")).unwrap() {
        if step > 20 {
            std::fs::remove_file(path).unwrap();
        }
    }
    let resume = from_checkpoint(killed.path(), 20);
    run(&config, &data, &resume, killed.path());
    assert_eq!(
        final_checkpoint(whole.path(), 60),
        final_checkpoint(killed.path(), 60)
    );
    assert_eq!(
        read(&whole.path().join("metrics.csv")),
        read(&killed.path().join("metrics.csv"))
    );
}

#[test]
fn a_damaged_checkpoint_is_an_error_that_names_the_file_once() {
    let data = tiny_data(24, 2);
    let config = config(40);
    let first = tempfile::tempdir().unwrap();
    run(&config, &data, &StartPoint::Fresh, first.path());
    let path = checkpoint_path(first.path(), 20);
    let bytes = read(&path);
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let resume = from_checkpoint(first.path(), 20);
    let second = tempfile::tempdir().unwrap();
    let message = train(&config, &data, None, &resume, second.path(), &Quiet)
        .unwrap_err()
        .to_string();
    assert_eq!(
        message.matches(&*path.display().to_string()).count(),
        1,
        "{message}"
    );
}

#[test]
fn a_branch_that_changes_nothing_equals_the_uninterrupted_run() {
    let data = tiny_data(24, 3);
    let config = config(60);
    let base = tempfile::tempdir().unwrap();
    run(&config, &data, &StartPoint::Fresh, base.path());
    let branch = tempfile::tempdir().unwrap();
    let start = from_checkpoint(base.path(), 40);
    run(&config, &data, &start, branch.path());
    assert_eq!(
        final_checkpoint(base.path(), 60),
        final_checkpoint(branch.path(), 60)
    );
    assert_eq!(
        read(&base.path().join("metrics.csv")),
        read(&branch.path().join("metrics.csv"))
    );

    // A branch that doubles η from step 40 on differs only from there.
    let mut doubled = config.clone();
    doubled.schedule = vec![Change {
        step: 40,
        lr: Some(0.1),
        batch_size: None,
    }];
    let changed = tempfile::tempdir().unwrap();
    run(&doubled, &data, &start, changed.path());
    let rows = metrics::read_rows(&changed.path().join("metrics.csv")).unwrap();
    let base_rows = metrics::read_rows(&base.path().join("metrics.csv")).unwrap();
    assert_eq!(rows[..40], base_rows[..40]);
    assert_eq!(rows[40].get("lr"), Some(0.1));
    assert_ne!(rows[45].get("loss"), base_rows[45].get("loss"));
}

#[test]
fn divergence_is_a_recorded_result_not_an_error() {
    let data = tiny_data(24, 4);
    let mut config = config(200);
    config.lr = 50.0;
    config.momentum = 0.0;
    let dir = tempfile::tempdir().unwrap();
    let outcome = run(&config, &data, &StartPoint::Fresh, dir.path());
    assert_eq!(outcome.status, Status::Diverged);
    let at = outcome.diverged_at.expect("a divergence step");
    assert!(at < 200);
    let rows = metrics::read_rows(&dir.path().join("metrics.csv")).unwrap();
    assert_eq!(rows.last().unwrap().step(), at);
}

#[test]
fn stop_loss_ends_the_run_at_the_first_evaluation_below_it() {
    let data = tiny_data(24, 5);
    let mut config = config(200);
    config.stop_loss = Some(10.0);
    let dir = tempfile::tempdir().unwrap();
    let outcome = run(&config, &data, &StartPoint::Fresh, dir.path());
    assert_eq!((outcome.status, outcome.steps_run), (Status::StopLoss, 0));
}

#[test]
fn batch_size_changes_follow_the_schedule_and_epochs_count_samples() {
    let data = tiny_data(24, 6);
    let mut config = config(30);
    config.schedule = vec![Change {
        step: 12,
        lr: None,
        batch_size: Some(8),
    }];
    config.eval = Cadence::every(1000);
    let dir = tempfile::tempdir().unwrap();
    run(&config, &data, &StartPoint::Fresh, dir.path());
    let rows = metrics::read_rows(&dir.path().join("metrics.csv")).unwrap();
    assert_eq!(rows[11].get("batch_size"), Some(4.0));
    assert_eq!(rows[12].get("batch_size"), Some(8.0));
    // 12 batches of 4 = 2 epochs of 24, then 3 batches of 8 per epoch.
    assert_eq!(rows[12].get("epoch"), Some(2.0));
    assert_eq!(rows[15].get("epoch"), Some(3.0));
}

/// Per-sample gradients of a tiny model, flattened, and the mean loss gradient.
fn per_sample_gradients(model: &dyn crate::nn::Model, full: &FullBatch) -> Vec<Vec<f64>> {
    let n = full.targets.labels.dims1().unwrap();
    (0..n)
        .map(|i| {
            let out = model
                .forward(&full.images.narrow(0, i, 1).unwrap())
                .unwrap();
            let loss = per_sample_loss(full.loss, &out, &full.targets.narrow(i, 1).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            flatten(
                model
                    .params()
                    .iter()
                    .map(|p| grads.get(p.var.as_tensor()).unwrap().clone()),
            )
        })
        .collect()
}

fn flatten(parts: impl Iterator<Item = candle_core::Tensor>) -> Vec<f64> {
    parts
        .flat_map(|t| {
            t.flatten_all()
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .collect()
}

/// Empirical mean and covariance of the directions of `draws` noisy steps.
fn direction_moments(
    dynamics: &Dynamics,
    b: usize,
    draws: u64,
) -> (Vec<f64>, Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let data = tiny_data(12, 7);
    let device = candle_core::Device::Cpu;
    let spec = ModelSpec::Mlp {
        depth: 1,
        width: 2,
        activation: Default::default(),
    };
    let model = spec
        .build([1, 2, 3], 3, 1.0, 0, candle_core::DType::F64, &device)
        .unwrap();
    let rows: Vec<usize> = (0..12).collect();
    let images = data
        .images_tensor(&rows, &device)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let targets = Targets::from_dataset(&data, &rows, candle_core::DType::F64, &device).unwrap();
    let full = FullBatch {
        images: &images,
        targets: &targets,
        loss: LossKind::Mse,
        chunk: 5,
    };
    let per_sample = per_sample_gradients(model.as_ref(), &full);
    let mut noise = NoiseState::new(NoiseSettings {
        seed: 3,
        refresh_every: 1_000_000,
        sigma: 0.0,
        substeps: 1,
    });
    let samples: Vec<Vec<f64>> = (0..draws)
        .map(|step| {
            let (_, d) = noise
                .step(dynamics, model.as_ref(), &full, step, 0.1, b)
                .unwrap();
            flatten(d.unwrap().into_iter())
        })
        .collect();
    let dim = samples[0].len();
    let mean: Vec<f64> = (0..dim)
        .map(|j| samples.iter().map(|s| s[j]).sum::<f64>() / draws as f64)
        .collect();
    let cov = |xs: &[Vec<f64>], m: &[f64], denom: f64| -> Vec<Vec<f64>> {
        (0..dim)
            .map(|j| {
                (0..dim)
                    .map(|k| {
                        xs.iter()
                            .map(|s| (s[j] - m[j]) * (s[k] - m[k]))
                            .sum::<f64>()
                            / denom
                    })
                    .collect()
            })
            .collect()
    };
    let g_mean: Vec<f64> = (0..dim)
        .map(|j| per_sample.iter().map(|g| g[j]).sum::<f64>() / 12.0)
        .collect();
    let sigma = cov(&per_sample, &g_mean, 12.0);
    let empirical = cov(&samples, &mean, (draws - 1) as f64);
    (g_mean, sigma, empirical)
}

fn max_abs(a: &[Vec<f64>]) -> f64 {
    a.iter().flatten().fold(0.0, |m, x| m.max(x.abs()))
}

#[test]
fn resampling_noise_has_covariance_sigma_over_b() {
    let b = 2;
    let (_, sigma, empirical) = direction_moments(&Dynamics::ResamplingNoise, b, 4000);
    let scale = max_abs(&sigma) / b as f64;
    for (row_s, row_e) in sigma.iter().zip(&empirical) {
        for (s, e) in row_s.iter().zip(row_e) {
            assert!(
                (s / b as f64 - e).abs() < 0.1 * scale,
                "Σ/b {} vs empirical {e}",
                s / b as f64
            );
        }
    }
}

#[test]
fn diagonal_and_isotropic_noise_have_the_intended_variances() {
    let b = 4;
    let (_, sigma, diagonal) = direction_moments(&Dynamics::DiagonalNoise, b, 4000);
    let dim = sigma.len();
    let scale = max_abs(&sigma) / b as f64;
    for j in 0..dim {
        assert!(
            (sigma[j][j] / b as f64 - diagonal[j][j]).abs() < 0.1 * scale,
            "coordinate {j}"
        );
        for (k, value) in diagonal[j].iter().enumerate().filter(|(k, _)| *k != j) {
            assert!(value.abs() < 0.1 * scale, "off-diagonal ({j}, {k})");
        }
    }
    let (_, _, isotropic) = direction_moments(&Dynamics::IsotropicNoise, b, 4000);
    let level = (0..dim).map(|j| sigma[j][j]).sum::<f64>() / dim as f64 / b as f64;
    for (j, row) in isotropic.iter().enumerate() {
        assert!(
            (row[j] - level).abs() < 0.1 * level.max(1e-12),
            "coordinate {j}: {} vs {level}",
            row[j]
        );
    }
}

#[test]
fn sde_paths_differ_only_by_their_seed() {
    let data = tiny_data(24, 8);
    let mut config = config(10);
    config.momentum = 0.0;
    config.dynamics = Dynamics::Sde;
    config.sde_substeps = 4;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    run(&config, &data, &StartPoint::Fresh, dirs[0].path());
    run(&config, &data, &StartPoint::Fresh, dirs[1].path());
    config.noise_seed = 1;
    run(&config, &data, &StartPoint::Fresh, dirs[2].path());
    let ckpt = |i: usize| final_checkpoint(dirs[i].path(), 10);
    assert_eq!(ckpt(0), ckpt(1));
    assert_ne!(ckpt(0), ckpt(2));
}

#[test]
fn gradient_variances_of_the_conv_nets_equal_those_of_autograd_gradients() {
    // The CNN and ResNet-8 in f64, cross-entropy: the variances come from one hand-written
    // backward pass per sample, the reference from candle's autograd on each sample.
    for spec in [ModelSpec::Cnn {}, ModelSpec::Resnet { depth: 8 }] {
        let model = spec
            .build(
                [2, 12, 12],
                3,
                1.0,
                5,
                candle_core::DType::F64,
                &candle_core::Device::Cpu,
            )
            .unwrap();
        assert!(model.conv_net().is_some() || model.residual_net().is_some());
        let batch = crate::curvature::testing::data(6, [2, 12, 12], 3, 6);
        let full = FullBatch {
            images: &batch.inputs,
            targets: &batch.targets,
            loss: LossKind::CrossEntropy,
            chunk: 4,
        };
        let variances = flatten(full.gradient_variances(model.as_ref()).unwrap().into_iter());
        let per_sample = per_sample_gradients(model.as_ref(), &full);
        let moment =
            |j: usize, power: i32| per_sample.iter().map(|g| g[j].powi(power)).sum::<f64>() / 6.0;
        let reference: Vec<f64> = (0..variances.len())
            .map(|j| moment(j, 2) - moment(j, 1).powi(2))
            .collect();
        let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0);
        for (j, (got, want)) in variances.iter().zip(&reference).enumerate() {
            assert!(
                (got - want).abs() < 1e-10 * scale,
                "{spec:?} coordinate {j}: {got} vs {want}"
            );
        }
    }
}
