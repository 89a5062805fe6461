//! Lanczos against dense Jacobi eigenvalues.
#![allow(clippy::needless_range_loop)] // dense reference linear algebra reads best indexed

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::curvature::testing::{
    data, dense_hessian_hvp, jacobi_eigen, matvec, mean_hessian, normals, Dense, TanhMlp,
};
use crate::nn::loss::LossKind;
use crate::nn::Model;

/// A random symmetric matrix with eigenvalues `spectrum` (Q diag Qᵀ, Q from Jacobi of a random
/// symmetric matrix).
fn with_spectrum(spectrum: &[f64], seed: u64) -> Dense {
    let n = spectrum.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let r = normals(&mut rng, n * n, 1.0);
    let sym: Dense = (0..n)
        .map(|i| (0..n).map(|j| r[i * n + j] + r[j * n + i]).collect())
        .collect();
    let (_, q) = jacobi_eigen(&sym);
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| (0..n).map(|k| q[i][k] * spectrum[k] * q[j][k]).sum())
                .collect()
        })
        .collect()
}

fn template(n: usize) -> ParamVec {
    // Two parts, to exercise multi-tensor vectors.
    let dev = Device::Cpu;
    ParamVec::new(vec![
        Tensor::zeros(n / 2, candle_core::DType::F64, &dev).unwrap(),
        Tensor::zeros(n - n / 2, candle_core::DType::F64, &dev).unwrap(),
    ])
}

fn dense_op(a: &Dense) -> impl FnMut(&ParamVec) -> Result<ParamVec> + '_ {
    move |v: &ParamVec| {
        let x = v.to_f64_vec()?;
        v.from_f64_like(&matvec(a, &x))
    }
}

#[test]
fn top_k_of_an_indefinite_matrix_match_jacobi() {
    // The most negative eigenvalue has the largest magnitude: λmax is the algebraic maximum.
    let spectrum = [
        -9.0, -3.0, -1.0, 0.5, 1.0, 2.0, 2.5, 4.0, 6.0, 7.0, 8.0, 8.5,
    ];
    let a = with_spectrum(&spectrum, 1);
    let (expected, _) = jacobi_eigen(&a);
    let t = template(a.len());
    let cfg = LanczosConfig {
        top_k: 3,
        max_iter: 12,
        rel_tol: 1e-10,
        seed: 2,
    };
    let got = lanczos(dense_op(&a), &t, Start::Random, &cfg).unwrap();
    assert!(got.converged);
    for (i, v) in got.values.iter().enumerate() {
        let e = expected[expected.len() - 1 - i];
        assert!((v - e).abs() < 1e-9, "eigenvalue {i}: {v} vs {e}");
    }
    // The reported residuals are the true ones.
    for (i, y) in got.vectors.iter().enumerate() {
        let yv = y.to_f64_vec().unwrap();
        assert!((yv.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-12);
        let ay = matvec(&a, &yv);
        let res: f64 = ay
            .iter()
            .zip(&yv)
            .map(|(p, q)| (p - got.values[i] * q).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((res / got.values[i].abs() - got.rel_residuals[i]).abs() < 1e-9);
        assert!(got.rel_residuals[i] <= 1e-10);
    }
}

#[test]
fn loose_tolerance_stops_early_and_warm_start_is_cheaper() {
    let spectrum: Vec<f64> = (0..60)
        .map(|i| 1.0 + i as f64 * 0.1)
        .chain([20.0])
        .collect();
    let a = with_spectrum(&spectrum, 3);
    let t = template(a.len());
    let cfg = LanczosConfig {
        top_k: 1,
        max_iter: 60,
        rel_tol: 1e-6,
        seed: 4,
    };
    let cold = lanczos(dense_op(&a), &t, Start::Random, &cfg).unwrap();
    assert!(cold.converged && cold.iterations < 61);
    assert!((cold.lambda_max() - 20.0).abs() < 1e-4);
    // Perturb the operator slightly, warm-start from the previous eigenvector.
    let b: Dense = a
        .iter()
        .enumerate()
        .map(|(i, row)| {
            row.iter()
                .enumerate()
                .map(|(j, x)| x + 1e-3 * ((i + j) % 3) as f64)
                .collect()
        })
        .collect();
    let cold_b = lanczos(dense_op(&b), &t, Start::Random, &cfg).unwrap();
    let warm_b = lanczos(dense_op(&b), &t, Start::Warm(&cold.vectors[0]), &cfg).unwrap();
    assert!(
        warm_b.iterations < cold_b.iterations,
        "{} vs {}",
        warm_b.iterations,
        cold_b.iterations
    );
    assert!((warm_b.lambda_max() - cold_b.lambda_max()).abs() < 1e-4);
    // An exact eigenvector converges at once.
    let exact = lanczos(
        dense_op(&a),
        &t,
        Start::Warm(&cold.vectors[0]),
        &LanczosConfig {
            rel_tol: 1e-3,
            ..cfg
        },
    )
    .unwrap();
    assert_eq!(exact.iterations, 1);
}

#[test]
fn breakdown_on_a_low_rank_operator_restarts_and_finds_zero() {
    let mut spectrum = vec![0.0; 10];
    spectrum[0] = 5.0;
    spectrum[1] = 3.0;
    let a = with_spectrum(&spectrum, 5);
    let t = template(10);
    let cfg = LanczosConfig {
        top_k: 3,
        max_iter: 10,
        rel_tol: 1e-8,
        seed: 6,
    };
    let got = lanczos(dense_op(&a), &t, Start::Random, &cfg).unwrap();
    assert!((got.values[0] - 5.0).abs() < 1e-10);
    assert!((got.values[1] - 3.0).abs() < 1e-10);
    assert!(got.values[2].abs() < 1e-10);
}

#[test]
fn same_seed_same_bits() {
    let a = with_spectrum(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 7);
    let t = template(6);
    let cfg = LanczosConfig {
        top_k: 2,
        max_iter: 6,
        rel_tol: 1e-12,
        seed: 8,
    };
    let x = lanczos(dense_op(&a), &t, Start::Random, &cfg).unwrap();
    let y = lanczos(dense_op(&a), &t, Start::Random, &cfg).unwrap();
    assert_eq!(x.values, y.values);
    assert_eq!(
        x.vectors[1].to_f64_vec().unwrap(),
        y.vectors[1].to_f64_vec().unwrap()
    );
}

#[test]
fn hessian_of_a_tanh_mlp_matches_dense_eigenvalues() {
    let model = TanhMlp::new(3, 4, 2, 21);
    let batch = data(8, [3, 1, 1], 2, 22);
    let (expected, _) = jacobi_eigen(&dense_hessian_hvp(&model, LossKind::Mse, &batch));
    let op = mean_hessian(&model, LossKind::Mse, &batch);
    let t = ParamVec::zeros_for(model.params()).unwrap();
    let cfg = LanczosConfig {
        top_k: 2,
        max_iter: t.dim(),
        rel_tol: 1e-9,
        seed: 23,
    };
    let got = lanczos(|v| op.apply(v), &t, Start::Random, &cfg).unwrap();
    let n = expected.len();
    assert!((got.values[0] - expected[n - 1]).abs() < 1e-8 * expected[n - 1].abs());
    assert!((got.values[1] - expected[n - 2]).abs() < 1e-8 * expected[n - 1].abs());
}

#[test]
fn invalid_settings_are_named() {
    let t = template(4);
    let a = with_spectrum(&[1.0, 2.0, 3.0, 4.0], 9);
    for (cfg, field) in [
        (
            LanczosConfig {
                top_k: 0,
                ..Default::default()
            },
            "top_k",
        ),
        (
            LanczosConfig {
                top_k: 3,
                max_iter: 2,
                ..Default::default()
            },
            "max_iter",
        ),
        (
            LanczosConfig {
                rel_tol: 0.0,
                ..Default::default()
            },
            "rel_tol",
        ),
    ] {
        let err = lanczos(dense_op(&a), &t, Start::Random, &cfg)
            .err()
            .unwrap();
        assert!(
            matches!(err, CurvatureError::Config { field: f, .. } if f == field),
            "{err}"
        );
    }
}

#[test]
fn long_f32_runs_keep_the_basis_orthogonal_no_ghost_eigenvalues() {
    // Plain Lanczos in f32 loses orthogonality once the top Ritz value converges and then finds
    // spurious copies of it. A diagonal operator on 4,000 coordinates with a well-separated top
    // pair and a dense bulk, run for 120 iterations with a tolerance it cannot meet: the top three
    // Ritz values must still be the three distinct top eigenvalues.
    let n = 4000;
    let diag: Vec<f32> = (0..n)
        .map(|i| match i {
            0 => 10.0,
            1 => 9.0,
            2 => 8.5,
            _ => 5.0 * (i as f32 / n as f32),
        })
        .collect();
    let d = Tensor::from_vec(diag, n, &Device::Cpu).unwrap();
    let t = ParamVec::new(vec![d.zeros_like().unwrap()]);
    let cfg = LanczosConfig {
        top_k: 3,
        max_iter: 120,
        rel_tol: 1e-12,
        seed: 5,
    };
    let op = |v: &ParamVec| Ok(ParamVec::new(vec![(&v.parts()[0] * &d).unwrap()]));
    let e = lanczos(op, &t, Start::Random, &cfg).unwrap();
    assert!(e.iterations > 20, "{}", e.iterations);
    for (got, want) in e.values.iter().zip([10.0, 9.0, 8.5]) {
        assert!((got - want).abs() < 1e-4, "{:?}", e.values);
    }
}
