//! Estimators against closed forms (appendix D's 1-D example), dense Hessians of a tiny network
//! (finite differences, Jacobi) and exhaustive enumeration of all C(6, 2) = 15 mini-batches.
#![allow(clippy::needless_range_loop)] // dense reference linear algebra reads best indexed

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::curvature::hvp::HvpMethod;
use crate::curvature::testing::{
    all_subsets, data, dense_gauss_newton, dense_hessian_fd, dense_lambda_max, dot, gradient,
    matmul, matvec, Dense, Linear, TanhMlp,
};
use crate::curvature::testing::{normals, set_params};
use crate::data::LabelEncoding;
use crate::nn::init::Initializer;
use crate::nn::loss::Targets;
use crate::nn::models::Mlp;
use crate::nn::{Activation, Model};

const N: usize = 6;
const B: usize = 2;

fn tiny() -> (TanhMlp, Batch) {
    (TanhMlp::new(3, 3, 2, 41), data(N, [3, 1, 1], 2, 42))
}

fn landscape<'a>(model: &'a dyn Model, batch: &'a Batch) -> Landscape<'a> {
    Landscape::new(model, LossKind::Mse, batch, &FullBatchConfig::default()).unwrap()
}

fn tight_lanczos(d: usize) -> LanczosConfig {
    LanczosConfig {
        top_k: 1,
        max_iter: d,
        rel_tol: 1e-10,
        seed: 1,
    }
}

fn mc(seed: u64) -> MonteCarloConfig {
    MonteCarloConfig {
        min_samples: 50,
        max_samples: 600,
        rel_tol: 0.01,
        seed,
    }
}

/// Per-batch exact quantities of the tiny network, by finite differences (independent of HVPs).
struct Exact {
    h: Dense,
    grad: Vec<f64>,
    batches: Vec<(Dense, Vec<f64>)>,
}

fn exact(model: &dyn Model, batch: &Batch) -> Exact {
    let h = dense_hessian_fd(model, LossKind::Mse, batch, 1e-5);
    let grad = gradient(model, LossKind::Mse, batch);
    let batches = all_subsets(N, B)
        .iter()
        .map(|rows| {
            let sub = batch.select(rows).unwrap();
            (
                dense_hessian_fd(model, LossKind::Mse, &sub, 1e-5),
                gradient(model, LossKind::Mse, &sub),
            )
        })
        .collect();
    Exact { h, grad, batches }
}

fn within(est: &Estimate, exact: f64, sigmas: f64) {
    assert!(est.stderr.is_finite() && est.stderr > 0.0, "{est:?}");
    assert!(
        (est.value - exact).abs() <= sigmas * est.stderr,
        "estimate {} ± {} ({} samples) vs exact {exact}",
        est.value,
        est.stderr,
        est.samples
    );
}

/// Exhaustive values over all 15 batches: (batch sharpness, modified, GNI, IAS, λmax(H_B) per batch).
fn exhaustive() -> (f64, f64, f64, f64, Vec<f64>) {
    let (model, batch) = tiny();
    let ex = exact(&model, &batch);
    let count = ex.batches.len() as f64;
    let q = |h: &Dense, g: &[f64]| dot(g, &matvec(h, g));
    let bs = ex
        .batches
        .iter()
        .map(|(h, g)| q(h, g) / dot(g, g))
        .sum::<f64>()
        / count;
    let num_b = ex.batches.iter().map(|(h, g)| q(h, g)).sum::<f64>();
    let den = ex.batches.iter().map(|(_, g)| dot(g, g)).sum::<f64>();
    let num_full = ex.batches.iter().map(|(_, g)| q(&ex.h, g)).sum::<f64>();
    let gni = num_full / count / dot(&ex.grad, &ex.grad);
    let lmb = ex
        .batches
        .iter()
        .map(|(h, _)| dense_lambda_max(h))
        .collect();
    (bs, num_b / den, gni, num_full / den, lmb)
}

#[test]
fn batch_sharpness_and_its_modified_form_match_exhaustive_enumeration() {
    let (bs, modified, _, _, _) = exhaustive();
    let (model, batch) = tiny();
    let l = landscape(&model, &batch);
    let est = l.batch_sharpness(B, &mc(1)).unwrap();
    within(&est, bs, 3.0);
    assert!(est.stderr <= 0.01 * est.value.abs() || est.samples == 600);
    within(
        &l.modified_batch_sharpness(B, &mc(2)).unwrap(),
        modified,
        3.0,
    );
}

#[test]
fn gni_and_ias_match_exhaustive_enumeration() {
    let (_, _, gni, ias, _) = exhaustive();
    let (model, batch) = tiny();
    let l = landscape(&model, &batch);
    within(&l.gni(B, &mc(3)).unwrap(), gni, 3.0);
    within(&l.ias(B, &mc(4)).unwrap(), ias, 3.0);
}

#[test]
fn lambda_max_b_matches_exhaustive_enumeration() {
    let (_, _, _, _, lmb) = exhaustive();
    let (model, batch) = tiny();
    let l = landscape(&model, &batch);
    let d = ParamVec::zeros_for(model.params()).unwrap().dim();
    let cfg = MonteCarloConfig {
        rel_tol: 0.03,
        max_samples: 100,
        ..mc(5)
    };
    let got = l.lambda_max_b(B, &cfg, &tight_lanczos(d)).unwrap();
    within(&got.mean, lmb.iter().sum::<f64>() / lmb.len() as f64, 3.0);
    let best = lmb.iter().fold(f64::MIN, |m, x| m.max(*x));
    assert!(got.max <= best + 1e-8 && lmb.iter().any(|x| (x - got.max).abs() < 1e-8));
}

#[test]
fn gauss_newton_quantities_match_dense_jt_hz_j() {
    let (model, batch) = tiny();
    let g_full = dense_gauss_newton(&model, LossKind::Mse, &batch);
    let l = landscape(&model, &batch);
    let d = g_full.len();
    let top = l.lambda_max_gn(&tight_lanczos(d), Start::Random).unwrap();
    let expected = dense_lambda_max(&g_full);
    assert!((top.lambda_max() - expected).abs() < 1e-8 * expected);
    let exhaustive: f64 = all_subsets(N, B)
        .iter()
        .map(|rows| {
            let sub = batch.select(rows).unwrap();
            let (gn, g) = (
                dense_gauss_newton(&model, LossKind::Mse, &sub),
                gradient(&model, LossKind::Mse, &sub),
            );
            dot(&g, &matvec(&gn, &g)) / dot(&g, &g)
        })
        .sum::<f64>()
        / 15.0;
    within(&l.batch_sharpness_gn(B, &mc(6)).unwrap(), exhaustive, 3.0);

    // λmax^b of G_B against the dense G_B of every one of the C(N, B) batches.
    let tops: Vec<f64> = all_subsets(N, B)
        .iter()
        .map(|rows| {
            let sub = batch.select(rows).unwrap();
            dense_lambda_max(&dense_gauss_newton(&model, LossKind::Mse, &sub))
        })
        .collect();
    let cfg = MonteCarloConfig {
        rel_tol: 0.03,
        max_samples: 100,
        ..mc(7)
    };
    let got = l.lambda_max_b_gn(B, &cfg, &tight_lanczos(d)).unwrap();
    within(&got.mean, tops.iter().sum::<f64>() / tops.len() as f64, 3.0);
    assert!(tops
        .iter()
        .any(|x| (x - got.max).abs() < 1e-8 * x.abs().max(1.0)));
}

#[test]
fn full_batch_quantities_match_the_dense_hessian() {
    let (model, batch) = tiny();
    let h = dense_hessian_fd(&model, LossKind::Mse, &batch, 1e-5);
    let l = landscape(&model, &batch);
    let top = l
        .lambda_max(&tight_lanczos(h.len()), Start::Random)
        .unwrap();
    let expected = dense_lambda_max(&h);
    assert!(
        (top.lambda_max() - expected).abs() < 1e-7 * expected,
        "{} vs {expected}",
        top.lambda_max()
    );
    assert!(top.rel_residuals[0] <= 1e-10 && top.converged);
    let trace: f64 = (0..h.len()).map(|i| h[i][i]).sum();
    within(
        &l.hessian_trace(&MonteCarloConfig {
            rel_tol: 0.01,
            ..mc(7)
        })
        .unwrap(),
        trace,
        3.0,
    );
    let g = gradient(&model, LossKind::Mse, &batch);
    assert!((l.grad_norm_sq().unwrap() - dot(&g, &g)).abs() < 1e-12 * dot(&g, &g));
    // Step sharpness and the live-batch λmax on one fixed batch.
    let live = batch.select(&[4, 1]).unwrap();
    let hb = dense_hessian_fd(&model, LossKind::Mse, &live, 1e-5);
    let gb = gradient(&model, LossKind::Mse, &live);
    let step = l.step_sharpness(&live).unwrap();
    assert!((step - dot(&gb, &matvec(&hb, &gb)) / dot(&gb, &gb)).abs() < 1e-7 * step.abs());
    let lb = l
        .step_lambda_max(&live, &tight_lanczos(h.len()), Start::Random)
        .unwrap();
    assert!((lb.lambda_max() - dense_lambda_max(&hb)).abs() < 1e-7 * lb.lambda_max());
}

#[test]
fn second_moment_contraction_matches_both_dense_forms() {
    let (model, batch) = tiny();
    let eta = 0.3;
    let subsets = all_subsets(N, B);
    let hs: Vec<Dense> = subsets
        .iter()
        .map(|rows| dense_hessian_fd(&model, LossKind::Mse, &batch.select(rows).unwrap(), 1e-5))
        .collect();
    let d = hs[0].len();
    let h = dense_hessian_fd(&model, LossKind::Mse, &batch, 1e-5);
    let count = hs.len() as f64;
    // Eq. 37: mean_B (I − ηH_B)².
    let mut m37 = vec![vec![0.0; d]; d];
    let mut m39 = vec![vec![0.0; d]; d];
    for hb in &hs {
        let a: Dense = (0..d)
            .map(|i| (0..d).map(|j| f64::from(i == j) - eta * hb[i][j]).collect())
            .collect();
        let a2 = matmul(&a, &a);
        let hb2 = matmul(hb, hb);
        for i in 0..d {
            for j in 0..d {
                m37[i][j] += a2[i][j] / count;
                m39[i][j] += eta * eta * hb2[i][j] / count;
            }
        }
    }
    for i in 0..d {
        for j in 0..d {
            m39[i][j] -= 2.0 * eta * h[i][j];
        }
    }
    let l = landscape(&model, &batch);
    let cfg = LanczosConfig {
        rel_tol: 1e-11,
        ..tight_lanczos(d)
    };
    let smc = l
        .second_moment_contraction(eta, &BatchSet::Given(subsets), &cfg, Start::Random)
        .unwrap();
    assert_eq!(smc.batches, 15);
    let (e37, e39) = (dense_lambda_max(&m37), dense_lambda_max(&m39));
    assert!((smc.eq37 - e37).abs() < 1e-7, "{} vs {e37}", smc.eq37);
    assert!((smc.eq39 - e39).abs() < 1e-7, "{} vs {e39}", smc.eq39);
    // Random batches: seeded, reproducible.
    let random = BatchSet::Random {
        batch_size: B,
        count: 4,
        seed: 9,
    };
    let a = l
        .second_moment_contraction(eta, &random, &cfg, Start::Random)
        .unwrap();
    let b = l
        .second_moment_contraction(eta, &random, &cfg, Start::Random)
        .unwrap();
    assert_eq!((a.eq37, a.batches), (b.eq37, 4));
}

/// Appendix D.1: two points ±1, model f = θ (a 1×1 linear map of a constant input 1). With the
/// paper's MSE (no ½), ℓ_i = (θ − a_i)², H_B = 2 for every batch, ∇L = 2θ.
fn appendix_d(theta: f64) -> (Linear, Batch) {
    let model = Linear::new(1, 1, 0);
    model.params()[0]
        .var
        .set(&Tensor::new(&[[theta]], &Device::Cpu).unwrap())
        .unwrap();
    let dev = Device::Cpu;
    let targets = Targets {
        values: Tensor::new(&[[1.0f64], [-1.0]], &dev).unwrap(),
        labels: Tensor::new(&[1u32, 0], &dev).unwrap(),
        encoding: LabelEncoding::PlusMinusOne,
    };
    (
        model,
        Batch::new(
            Tensor::ones((2, 1, 1, 1), candle_core::DType::F64, &dev).unwrap(),
            targets,
        )
        .unwrap(),
    )
}

#[test]
fn appendix_d_one_dimensional_example_in_closed_form() {
    let theta = 0.5;
    let (model, batch) = appendix_d(theta);
    let l = landscape(&model, &batch);
    let cfg = MonteCarloConfig {
        min_samples: 20,
        max_samples: 1000,
        rel_tol: 0.002,
        seed: 3,
    };
    // Every batch has curvature 2 along every direction: exact, zero stderr, stops at min_samples.
    let bs = l.batch_sharpness(1, &cfg).unwrap();
    assert_eq!((bs.value, bs.stderr, bs.samples), (2.0, 0.0, 20));
    assert_eq!(l.modified_batch_sharpness(1, &cfg).unwrap().value, 2.0);
    assert_eq!(l.ias(1, &cfg).unwrap().value, 2.0);
    assert_eq!(l.batch_sharpness_gn(1, &cfg).unwrap().value, 2.0);
    assert!(
        (l.lambda_max(&tight_lanczos(1), Start::Random)
            .unwrap()
            .lambda_max()
            - 2.0)
            .abs()
            < 1e-14
    );
    let lmb = l.lambda_max_b(1, &cfg, &tight_lanczos(1)).unwrap();
    assert!((lmb.mean.value - 2.0).abs() < 1e-14 && (lmb.max - 2.0).abs() < 1e-14);
    assert_eq!(l.hessian_trace(&cfg).unwrap().value, 2.0);
    // GNI = E[g_B H g_B] / ‖∇L‖² = 2 · E[4(θ − a)²] / (4θ²) = 2 (θ² + 1) / θ² = 10 at θ = ½.
    within(
        &l.gni(1, &cfg).unwrap(),
        2.0 * (theta * theta + 1.0) / (theta * theta),
        3.0,
    );
    // Second moment: E[(1 − 2η)²] and −4η + 4η².
    let eta = 0.7;
    let smc = l
        .second_moment_contraction(
            eta,
            &BatchSet::Given(vec![vec![0], vec![1]]),
            &tight_lanczos(1),
            Start::Random,
        )
        .unwrap();
    assert!((smc.eq37 - (1.0 - 2.0 * eta).powi(2)).abs() < 1e-14);
    assert!((smc.eq39 - (-4.0 * eta + 4.0 * eta * eta)).abs() < 1e-14);
    // At θ = 1 the batch {a = 1} has a zero gradient: the quotient is undefined, said clearly.
    let (model, batch) = appendix_d(1.0);
    let l = landscape(&model, &batch);
    let err = l.step_sharpness(&batch.select(&[0]).unwrap()).unwrap_err();
    assert!(
        matches!(
            err,
            CurvatureError::ZeroGradient {
                what: "step sharpness"
            }
        ),
        "{err}"
    );
}

#[test]
fn same_seed_gives_identical_bits_and_subsamples_are_honoured() {
    let (model, batch) = tiny();
    let l = landscape(&model, &batch);
    let cfg = MonteCarloConfig {
        min_samples: 5,
        max_samples: 5,
        rel_tol: 0.0,
        seed: 77,
    };
    let a = l.batch_sharpness(B, &cfg).unwrap();
    assert_eq!(a, l.batch_sharpness(B, &cfg).unwrap());
    assert_eq!(a.samples, 5);
    assert_ne!(
        a,
        l.batch_sharpness(B, &MonteCarloConfig { seed: 78, ..cfg })
            .unwrap()
    );
    assert_eq!(l.gni(B, &cfg).unwrap(), l.gni(B, &cfg).unwrap());
    assert_eq!(
        l.hessian_trace(&cfg).unwrap(),
        l.hessian_trace(&cfg).unwrap()
    );

    let full = FullBatchConfig {
        subsample: Some(4),
        subsample_seed: 5,
        ..Default::default()
    };
    let sub = Landscape::new(&model, LossKind::Mse, &batch, &full).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let rows = random_subset(&mut rng, N, 4).unwrap();
    let g = gradient(&model, LossKind::Mse, &batch.select(&rows).unwrap());
    assert!((sub.grad_norm_sq().unwrap() - dot(&g, &g)).abs() < 1e-12 * dot(&g, &g));
    let bad = FullBatchConfig {
        subsample: Some(7),
        ..full
    };
    let err = Landscape::new(&model, LossKind::Mse, &batch, &bad)
        .err()
        .unwrap();
    assert!(err.to_string().contains("subsample"), "{err}");
    let err = l.batch_sharpness(7, &cfg).unwrap_err();
    assert!(err.to_string().contains("batch_size"), "{err}");
}

#[test]
fn batches_taken_many_per_pass_give_the_one_at_a_time_estimates() {
    // A real MLP 8 → 16 → 16 → 2 in f64 with random weights and biases, batches of 3: the default
    // config evaluates three batches per pass (chunks of 9) by Gram matrices, and two for GNI and
    // IAS; double backward takes one batch at a time. Same draws, same stopping point, same
    // estimates.
    let init = Initializer::new(0, 1.0, DType::F64, &Device::Cpu);
    let model = Mlp::new(8, 2, 16, 2, Activation::Tanh, init).unwrap();
    set_params(
        &model,
        &normals(&mut ChaCha8Rng::seed_from_u64(3), model.num_params(), 0.5),
    );
    let batch = data(12, [8, 1, 1], 2, 4);
    let config = |method| FullBatchConfig {
        hvp: HvpConfig {
            chunk_size: 9,
            retain_graphs: true,
            method,
        },
        // GNI's and IAS's H on 4 of the 12 rows: two batches per pass.
        subsample: Some(4),
        subsample_seed: 5,
    };
    let grouped = config(HvpMethod::Auto);
    assert!(grouped
        .hvp
        .batch_gradient_forms(&model, LossKind::CrossEntropy, 3)
        .is_some());
    for kind in [LossKind::Mse, LossKind::CrossEntropy] {
        let l = Landscape::new(&model, kind, &batch, &grouped).unwrap();
        let reference = Landscape::new(&model, kind, &batch, &config(HvpMethod::Autodiff)).unwrap();
        for (min_samples, rel_tol) in [(4, 0.3), (7, 0.15), (2, 0.0)] {
            let cfg = MonteCarloConfig {
                min_samples,
                max_samples: 40,
                rel_tol,
                seed: 11,
            };
            let pairs: [(Estimate, Estimate); 5] = [
                (
                    l.batch_sharpness(3, &cfg).unwrap(),
                    reference.batch_sharpness(3, &cfg).unwrap(),
                ),
                (
                    l.modified_batch_sharpness(3, &cfg).unwrap(),
                    reference.modified_batch_sharpness(3, &cfg).unwrap(),
                ),
                (
                    l.batch_sharpness_gn(3, &cfg).unwrap(),
                    reference.batch_sharpness_gn(3, &cfg).unwrap(),
                ),
                (l.gni(3, &cfg).unwrap(), reference.gni(3, &cfg).unwrap()),
                (l.ias(3, &cfg).unwrap(), reference.ias(3, &cfg).unwrap()),
            ];
            for (got, want) in pairs {
                let what = format!("{kind:?} {cfg:?}: {got:?} vs {want:?}");
                assert_eq!(got.samples, want.samples, "{what}");
                assert!(
                    (got.value - want.value).abs() < 1e-11 * want.value.abs(),
                    "{what}"
                );
                assert!(
                    (got.stderr - want.stderr).abs() < 1e-9 * want.stderr,
                    "{what}"
                );
            }
        }
    }
}
