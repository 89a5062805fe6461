//! HVP and Gauss–Newton products against closed forms, finite differences and dense JᵀH_zJ.
#![allow(clippy::needless_range_loop)] // dense reference linear algebra reads best indexed

use candle_core::{Device, Tensor};

use super::*;
use crate::curvature::testing::{
    data, dense_gauss_newton, dense_hessian_fd, dense_hessian_hvp, dense_of, mean_hessian, normals,
    rel_max_diff, set_params, Dense, Linear, TanhMlp, TinyConv,
};
use crate::nn::init::Initializer;
use crate::nn::models::Mlp;
use crate::nn::Activation;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn inputs_matrix(batch: &Batch) -> Vec<Vec<f64>> {
    batch
        .inputs
        .flatten_from(1)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap()
}

#[test]
fn linear_mse_hessian_is_two_over_n_xtx_kron_identity() {
    let (n, d, k) = (5, 3, 2);
    let model = Linear::new(d, k, 1);
    let batch = data(n, [d, 1, 1], k, 2);
    let x = inputs_matrix(&batch);
    let h = dense_hessian_hvp(&model, LossKind::Mse, &batch);
    // Parameter (a, c) is W[a][c] at flat index a·k + c.
    let mut expected = vec![vec![0.0; d * k]; d * k];
    for a in 0..d {
        for b in 0..d {
            let xtx: f64 = (0..n).map(|i| x[i][a] * x[i][b]).sum();
            for c in 0..k {
                expected[a * k + c][b * k + c] = 2.0 / n as f64 * xtx;
            }
        }
    }
    assert!(rel_max_diff(&h, &expected) < 1e-14, "{h:?}");
}

fn assert_symmetric(h: &Dense, tol: f64) {
    let scale = h.iter().flatten().fold(0.0f64, |m, x| m.max(x.abs()));
    for i in 0..h.len() {
        for j in 0..i {
            assert!((h[i][j] - h[j][i]).abs() <= tol * scale, "H[{i}][{j}]");
        }
    }
}

fn check_against_finite_differences(model: &dyn Model, kind: LossKind, batch: &Batch) {
    let h = dense_hessian_hvp(model, kind, batch);
    assert!(h.iter().flatten().any(|x| *x != 0.0));
    assert_symmetric(&h, 1e-12);
    let fd = dense_hessian_fd(model, kind, batch, 1e-5);
    let err = rel_max_diff(&h, &fd);
    assert!(
        err < 1e-7,
        "{kind:?}: HVP vs finite differences, relative error {err:e}"
    );
}

#[test]
fn tanh_mlp_hvp_matches_finite_differences_and_is_symmetric() {
    let model = TanhMlp::new(3, 4, 2, 5);
    let batch = data(6, [3, 1, 1], 2, 6);
    check_against_finite_differences(&model, LossKind::Mse, &batch);
    check_against_finite_differences(&model, LossKind::CrossEntropy, &batch);
}

#[test]
fn conv_net_hvp_matches_finite_differences_and_is_symmetric() {
    let model = TinyConv::new(1, 2, 2, 7);
    let batch = data(4, [1, 3, 3], 2, 8);
    check_against_finite_differences(&model, LossKind::Mse, &batch);
    check_against_finite_differences(&model, LossKind::CrossEntropy, &batch);
}

fn random_vec(model: &dyn Model, seed: u64) -> ParamVec {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ParamVec::zeros_for(model.params())
        .unwrap()
        .random_like(crate::curvature::vector::Probe::Gaussian, &mut rng)
        .unwrap()
}

fn max_abs_diff(a: &ParamVec, b: &ParamVec) -> f64 {
    let (a, b) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
    a.iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn chunked_products_equal_the_whole_batch_product() {
    let model = TanhMlp::new(3, 4, 2, 9);
    let batch = data(7, [3, 1, 1], 2, 10);
    let v = random_vec(&model, 11);
    let whole = HvpConfig {
        chunk_size: 100,
        retain_graphs: true,
        ..HvpConfig::default()
    };
    let op = HessianOperator::new(&model, LossKind::Mse, &batch, &Objective::Mean, &whole).unwrap();
    let reference = op.apply(&v).unwrap();
    for retain_graphs in [true, false] {
        let cfg = HvpConfig {
            chunk_size: 3,
            retain_graphs,
            ..HvpConfig::default()
        };
        let chunked =
            HessianOperator::new(&model, LossKind::Mse, &batch, &Objective::Mean, &cfg).unwrap();
        assert!((chunked.loss() - op.loss()).abs() < 1e-14);
        assert!(max_abs_diff(chunked.gradient(), op.gradient()) < 1e-14);
        assert!(max_abs_diff(&chunked.apply(&v).unwrap(), &reference) < 1e-13);
        let gn = GaussNewtonOperator::new(&model, LossKind::Mse, &batch, &Objective::Mean, &cfg)
            .unwrap();
        let gn_whole =
            GaussNewtonOperator::new(&model, LossKind::Mse, &batch, &Objective::Mean, &whole)
                .unwrap();
        assert!(max_abs_diff(&gn.apply(&v).unwrap(), &gn_whole.apply(&v).unwrap()) < 1e-13);
        assert!(max_abs_diff(gn.gradient(), op.gradient()) < 1e-14);
    }
}

#[test]
fn weighted_objective_is_the_weighted_sum_of_per_sample_hessians() {
    let model = TanhMlp::new(2, 3, 2, 12);
    let batch = data(4, [2, 1, 1], 2, 13);
    let w = [0.5, -0.25, 1.5, 0.75];
    let weights = Tensor::from_slice(&w, 4, &Device::Cpu).unwrap();
    let v = random_vec(&model, 14);
    let cfg = HvpConfig {
        chunk_size: 3,
        retain_graphs: true,
        ..HvpConfig::default()
    };
    let op = HessianOperator::new(
        &model,
        LossKind::Mse,
        &batch,
        &Objective::Weighted(weights),
        &cfg,
    )
    .unwrap();
    let mut expected = ParamVec::zeros_for(model.params()).unwrap();
    for (i, wi) in w.iter().enumerate() {
        let single = batch.select(&[i]).unwrap();
        let op_i =
            HessianOperator::new(&model, LossKind::Mse, &single, &Objective::Mean, &cfg).unwrap();
        expected = expected.axpy(*wi, &op_i.apply(&v).unwrap()).unwrap();
    }
    assert!(max_abs_diff(&op.apply(&v).unwrap(), &expected) < 1e-13);
}

/// Builds the mean-loss Gauss–Newton operator with the default config and checks its dense
/// matrix against the independent dense Σ_i J_iᵀ H_z,i J_i.
fn check_gauss_newton_against_dense<'a>(
    model: &'a dyn Model,
    kind: LossKind,
    batch: &Batch,
    what: &str,
) -> GaussNewtonOperator<'a> {
    let op = GaussNewtonOperator::new(model, kind, batch, &Objective::Mean, &HvpConfig::default())
        .unwrap();
    let template = ParamVec::zeros_for(model.params()).unwrap();
    let got = dense_of(|v| op.apply(v).unwrap(), &template);
    let err = rel_max_diff(&got, &dense_gauss_newton(model, kind, batch));
    assert!(err < 1e-12, "{what} {kind:?}: {err:e}");
    op
}

#[test]
fn gauss_newton_product_equals_dense_jt_hz_j() {
    let model = TanhMlp::new(3, 3, 2, 15);
    let batch = data(5, [3, 1, 1], 2, 16);
    for kind in [LossKind::Mse, LossKind::CrossEntropy] {
        let op = check_gauss_newton_against_dense(&model, kind, &batch, "tanh MLP fixture");
        let hess = mean_hessian(&model, kind, &batch);
        assert!((op.loss() - hess.loss()).abs() < 1e-14);
    }
}

#[test]
fn gauss_newton_of_a_linear_model_is_its_hessian() {
    let model = Linear::new(3, 2, 17);
    let batch = data(4, [3, 1, 1], 2, 18);
    let template = ParamVec::zeros_for(model.params()).unwrap();
    let op = GaussNewtonOperator::new(
        &model,
        LossKind::Mse,
        &batch,
        &Objective::Mean,
        &HvpConfig::default(),
    )
    .unwrap();
    let h = dense_hessian_hvp(&model, LossKind::Mse, &batch);
    assert!(rel_max_diff(&dense_of(|v| op.apply(v).unwrap(), &template), &h) < 1e-14);
}

#[test]
fn self_check_passes_with_double_backward_enabled() {
    self_check(&Device::Cpu).unwrap();
}

#[test]
fn bad_weights_and_chunk_size_are_named() {
    let model = Linear::new(2, 2, 19);
    let batch = data(3, [2, 1, 1], 2, 20);
    let w = Tensor::from_vec(
        normals(&mut ChaCha8Rng::seed_from_u64(0), 2, 1.0),
        2,
        &Device::Cpu,
    )
    .unwrap();
    let err = HessianOperator::new(
        &model,
        LossKind::Mse,
        &batch,
        &Objective::Weighted(w),
        &HvpConfig::default(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("weights"), "{err}");
    let cfg = HvpConfig {
        chunk_size: 0,
        retain_graphs: true,
        ..HvpConfig::default()
    };
    let err = HessianOperator::new(&model, LossKind::Mse, &batch, &Objective::Mean, &cfg)
        .err()
        .unwrap();
    assert!(err.to_string().contains("chunk_size"), "{err}");
}

const ACTIVATIONS: [Activation; 4] = [
    Activation::Relu,
    Activation::Tanh,
    Activation::Silu,
    Activation::Linear,
];
const LOSSES: [LossKind; 2] = [LossKind::Mse, LossKind::CrossEntropy];

/// The real MLP (3 → 4 → 4 → 2) in f64, with every weight and bias drawn at random.
fn random_mlp(activation: Activation, seed: u64) -> Mlp {
    random_mlp_of_depth(activation, 2, seed)
}

/// The real MLP with `depth` hidden layers of 4 units, 3 inputs and 2 outputs, in f64, with every
/// weight and bias drawn at random.
fn random_mlp_of_depth(activation: Activation, depth: usize, seed: u64) -> Mlp {
    let init = Initializer::new(seed, 1.0, candle_core::DType::F64, &Device::Cpu);
    let model = Mlp::new(3, depth, 4, 2, activation, init).unwrap();
    let theta = normals(
        &mut ChaCha8Rng::seed_from_u64(seed),
        model.num_params(),
        0.7,
    );
    set_params(&model, &theta);
    model
}

#[test]
fn dense_mlp_hessian_matches_finite_differences_for_every_activation_and_loss() {
    let batch = data(6, [3, 1, 1], 2, 30);
    for (i, activation) in ACTIVATIONS.into_iter().enumerate() {
        let model = random_mlp(activation, 31 + i as u64);
        assert!(model.dense_stack().is_some());
        for kind in LOSSES {
            // The default config takes the hand-written passes for the MLP.
            check_against_finite_differences(&model, kind, &batch);
        }
    }
}

#[test]
fn dense_passes_handle_linear_and_one_hidden_layer_stacks() {
    let batch = data(5, [3, 1, 1], 2, 35);
    for depth in [0, 1] {
        let model = random_mlp_of_depth(Activation::Silu, depth, 36 + depth as u64);
        let v = random_vec(&model, 37);
        for kind in LOSSES {
            check_against_finite_differences(&model, kind, &batch);
            let op = mean_hessian(&model, kind, &batch);
            let vhv = v.dot(&op.apply(&v).unwrap()).unwrap();
            let got = op.quadratic_form(&v).unwrap();
            assert!(
                (got - vhv).abs() < 1e-11 * vhv.abs(),
                "depth {depth} {kind:?}"
            );
        }
    }
}

#[test]
fn dense_mlp_gauss_newton_equals_dense_jt_hz_j() {
    let batch = data(5, [3, 1, 1], 2, 40);
    for (i, activation) in ACTIVATIONS.into_iter().enumerate() {
        let model = random_mlp(activation, 41 + i as u64);
        for kind in LOSSES {
            check_gauss_newton_against_dense(&model, kind, &batch, &format!("{activation:?}"));
        }
    }
}

/// The hand-written products of `model` (the default config) against double backward, for both
/// losses, the mean and a weighted objective, chunks of 3 kept and rebuilt: loss, gradient, H v,
/// G v and both quadratic forms.
fn check_passes_against_autodiff(model: &dyn Model, batch: &Batch, v: &ParamVec, what: &str) {
    let n = batch.len();
    let weights = Tensor::from_vec(
        normals(&mut ChaCha8Rng::seed_from_u64(51), n, 1.0),
        n,
        &Device::Cpu,
    )
    .unwrap();
    let autodiff = HvpConfig {
        method: HvpMethod::Autodiff,
        ..HvpConfig::default()
    };
    for kind in LOSSES {
        for objective in [Objective::Mean, Objective::Weighted(weights.clone())] {
            let hess = |cfg: &HvpConfig| {
                HessianOperator::new(model, kind, batch, &objective, cfg).unwrap()
            };
            let gn = |cfg: &HvpConfig| {
                GaussNewtonOperator::new(model, kind, batch, &objective, cfg).unwrap()
            };
            let (h_ref, gn_ref) = (hess(&autodiff), gn(&autodiff));
            let hv_ref = h_ref.apply(v).unwrap();
            let gv_ref = gn_ref.apply(v).unwrap();
            let scale = hv_ref.norm().unwrap() + gv_ref.norm().unwrap();
            for retain_graphs in [true, false] {
                let cfg = HvpConfig {
                    chunk_size: 3,
                    retain_graphs,
                    method: HvpMethod::Auto,
                };
                let what = format!("{what} {kind:?} {objective:?} {retain_graphs}");
                let (h, g) = (hess(&cfg), gn(&cfg));
                assert!((h.loss() - h_ref.loss()).abs() < 1e-12, "{what}");
                assert!((g.loss() - h_ref.loss()).abs() < 1e-12, "{what}");
                let grad_scale = h_ref.gradient().norm().unwrap();
                assert!(
                    max_abs_diff(h.gradient(), h_ref.gradient()) < 1e-12 * grad_scale,
                    "{what}"
                );
                assert!(
                    max_abs_diff(g.gradient(), h_ref.gradient()) < 1e-12 * grad_scale,
                    "{what}"
                );
                let hv = h.apply(v).unwrap();
                assert!(max_abs_diff(&hv, &hv_ref) < 1e-12 * scale, "{what}");
                let gv = g.apply(v).unwrap();
                assert!(max_abs_diff(&gv, &gv_ref) < 1e-12 * scale, "{what}");
                // The quadratic forms equal v · (H v) and v · (G v).
                let (vhv, vgv) = (v.dot(&hv_ref).unwrap(), v.dot(&gv_ref).unwrap());
                let tol = 1e-11 * (vhv.abs() + vgv.abs());
                let got = h.quadratic_form(v).unwrap();
                assert!((got - vhv).abs() < tol, "{what}: vᵀHv {got} vs {vhv}");
                let got = g.quadratic_form(v).unwrap();
                assert!((got - vgv).abs() < tol, "{what}: vᵀGv {got} vs {vgv}");
            }
        }
    }
}

#[test]
fn dense_and_autodiff_products_agree_chunked_rebuilt_and_weighted() {
    let batch = data(7, [3, 1, 1], 2, 50);
    for (i, activation) in ACTIVATIONS.into_iter().enumerate() {
        let model = random_mlp(activation, 52 + i as u64);
        let v = random_vec(&model, 60 + i as u64);
        check_passes_against_autodiff(&model, &batch, &v, &format!("{activation:?}"));
    }
}

#[test]
fn cnn_passes_and_autodiff_products_agree_chunked_rebuilt_and_weighted() {
    // The real CNN on (2, 13, 14) inputs: both pools drop an odd row or column.
    let model = crate::nn::ModelSpec::Cnn {}
        .build(
            [2, 13, 14],
            3,
            1.0,
            70,
            candle_core::DType::F64,
            &Device::Cpu,
        )
        .unwrap();
    for (i, p) in model.params().iter().enumerate() {
        if p.name.ends_with("bias") {
            let b = normals(
                &mut ChaCha8Rng::seed_from_u64(71 + i as u64),
                p.var.elem_count(),
                0.1,
            );
            p.var
                .set(&Tensor::from_vec(b, p.var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    assert!(model.conv_net().is_some());
    let batch = data(7, [2, 13, 14], 3, 72);
    let v = random_vec(model.as_ref(), 73);
    check_passes_against_autodiff(model.as_ref(), &batch, &v, "cnn");
}

/// ResNet-8 in f64 on (2, h, w) inputs with a random linear bias.
fn random_resnet(h: usize, w: usize, seed: u64) -> Box<dyn Model> {
    let model = crate::nn::ModelSpec::Resnet { depth: 8 }
        .build(
            [2, h, w],
            3,
            1.0,
            seed,
            candle_core::DType::F64,
            &Device::Cpu,
        )
        .unwrap();
    let bias = &model.params()[model.params().len() - 1];
    let b = normals(&mut ChaCha8Rng::seed_from_u64(seed + 1), 3, 0.1);
    bias.var
        .set(&Tensor::from_vec(b, 3, &Device::Cpu).unwrap())
        .unwrap();
    assert!(model.residual_net().is_some());
    model
}

#[test]
fn resnet_passes_and_autodiff_products_agree_chunked_rebuilt_and_weighted() {
    // 8 × 8 inputs (stages of 8, 4, 2 rows): candle's autograd fails on some odd sizes.
    let model = random_resnet(8, 8, 80);
    let batch = data(7, [2, 8, 8], 3, 82);
    let v = random_vec(model.as_ref(), 83);
    check_passes_against_autodiff(model.as_ref(), &batch, &v, "resnet");
}

#[test]
fn resnet_hvp_on_odd_sizes_matches_a_finite_difference_of_the_gradient() {
    // 7 × 6 inputs: the stride-2 stages keep ⌈H/2⌉ rows. H v against (g(θ + εv) − g(θ − εv)) / 2ε
    // of the hand-written gradient (itself checked against finite differences of the loss).
    let model = random_resnet(7, 6, 90);
    let batch = data(5, [2, 7, 6], 3, 92);
    let v = random_vec(model.as_ref(), 93);
    for kind in LOSSES {
        let cfg = HvpConfig::default();
        let hv = HessianOperator::new(model.as_ref(), kind, &batch, &Objective::Mean, &cfg)
            .unwrap()
            .apply(&v)
            .unwrap();
        let gradient_at = |t: f64| -> ParamVec {
            let originals: Vec<Tensor> = model
                .params()
                .iter()
                .map(|p| p.var.as_tensor().copy().unwrap())
                .collect();
            for ((p, o), d) in model.params().iter().zip(&originals).zip(v.parts()) {
                p.var
                    .set(&(o + d.affine(t, 0.0).unwrap()).unwrap())
                    .unwrap();
            }
            let (_, g) = crate::nn::gradient::mean_loss_and_gradient(
                model.as_ref(),
                kind,
                &batch.inputs,
                &batch.targets,
            )
            .unwrap();
            for (p, o) in model.params().iter().zip(&originals) {
                p.var.set(o).unwrap();
            }
            ParamVec::new(g)
        };
        // A small step: no ReLU crosses its kink between θ ± εv (ReLU nets are only piecewise
        // smooth), while rounding stays far below the tolerance.
        let eps = 1e-7;
        let (plus, minus) = (gradient_at(eps), gradient_at(-eps));
        let fd: Vec<f64> = plus
            .to_f64_vec()
            .unwrap()
            .iter()
            .zip(minus.to_f64_vec().unwrap())
            .map(|(p, m)| (p - m) / (2.0 * eps))
            .collect();
        let exact = hv.to_f64_vec().unwrap();
        let scale = exact.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let err = exact
            .iter()
            .zip(&fd)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            scale > 0.0 && err < 1e-6 * scale,
            "{kind:?}: {err:e} of {scale:e}"
        );
    }
}

#[test]
fn dense_mlp_products_in_f32_match_f64() {
    // The paper's runs are in f32: the hand-written passes there agree with f64 to f32 precision.
    let model = random_mlp(Activation::Relu, 70);
    let batch = data(16, [3, 1, 1], 2, 71);
    let v = random_vec(&model, 72);
    let cfg = HvpConfig::default();
    let hv = HessianOperator::new(&model, LossKind::Mse, &batch, &Objective::Mean, &cfg)
        .unwrap()
        .apply(&v)
        .unwrap();
    let init = Initializer::new(0, 1.0, candle_core::DType::F32, &Device::Cpu);
    let model32 = Mlp::new(3, 2, 4, 2, Activation::Relu, init).unwrap();
    for (p32, p) in model32.params().iter().zip(model.params()) {
        let t = p.var.as_tensor().to_dtype(candle_core::DType::F32).unwrap();
        p32.var.set(&t).unwrap();
    }
    let to32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
    let batch32 = Batch::new(
        to32(&batch.inputs),
        Targets {
            values: to32(&batch.targets.values),
            ..batch.targets.clone()
        },
    )
    .unwrap();
    let v32 = ParamVec::new(v.parts().iter().map(to32).collect());
    let hv32 = HessianOperator::new(&model32, LossKind::Mse, &batch32, &Objective::Mean, &cfg)
        .unwrap()
        .apply(&v32)
        .unwrap();
    assert!(max_abs_diff(&hv32, &hv) < 1e-5 * hv.norm().unwrap());
}

#[test]
fn gram_forms_equal_double_backward_along_each_batch_gradient() {
    // Three batches of three stacked: every batch's g_Bᵀ H_B g_B, g_Bᵀ G_B g_B, g_Bᵀ H g_B (H of a
    // fixed set of 7 rows, taken in chunks of 3, 3, 1) and ‖g_B‖² against double backward, for
    // stacks of depth 0 to 2, every activation and loss.
    let (count, b) = (3, 3);
    let batch = data(count * b, [3, 1, 1], 2, 80);
    let fixed = data(7, [3, 1, 1], 2, 79);
    let autodiff = HvpConfig {
        method: HvpMethod::Autodiff,
        ..HvpConfig::default()
    };
    for depth in 0..=2 {
        for (i, activation) in ACTIVATIONS.into_iter().enumerate() {
            let model = random_mlp_of_depth(activation, depth, 81 + 10 * depth as u64 + i as u64);
            for kind in LOSSES {
                let what = format!("depth {depth} {activation:?} {kind:?}");
                let forms = BatchGradientForms {
                    stack: model.dense_stack().unwrap(),
                    kind,
                    batch_size: b,
                    chunk_size: 3,
                };
                let hessian = forms.own(&batch, false).unwrap();
                let gn = forms.own(&batch, true).unwrap();
                let fixed_forms = forms.fixed(&fixed).unwrap();
                assert_eq!(fixed_forms.batches_per_pass(), 1);
                let full = fixed_forms.along(&batch).unwrap();
                let h_full =
                    HessianOperator::new(&model, kind, &fixed, &Objective::Mean, &autodiff)
                        .unwrap();
                let full_gg = h_full.gradient().norm_sq().unwrap();
                let close = |got: f64, want: f64| (got - want).abs() <= 1e-11 * want.abs();
                assert!(close(fixed_forms.grad_norm_sq(), full_gg), "{what}: ‖∇L‖²");
                for k in 0..count {
                    let sub = batch.narrow(k * b, b).unwrap();
                    let h = HessianOperator::new(&model, kind, &sub, &Objective::Mean, &autodiff)
                        .unwrap();
                    let g = h.gradient();
                    let gop =
                        GaussNewtonOperator::new(&model, kind, &sub, &Objective::Mean, &autodiff)
                            .unwrap();
                    let want = [
                        (hessian[k], g.dot(&h.apply(g).unwrap()).unwrap(), "gᵀH_Bg"),
                        (gn[k], g.dot(&gop.apply(g).unwrap()).unwrap(), "gᵀG_Bg"),
                        (full[k], g.dot(&h_full.apply(g).unwrap()).unwrap(), "gᵀHg"),
                    ];
                    let gg = g.norm_sq().unwrap();
                    for ((form, norm), form_want, name) in want {
                        assert!(
                            close(form, form_want),
                            "{what} {k}: {name} {form} vs {form_want}"
                        );
                        assert!(close(norm, gg), "{what} {k}: ‖g‖² {norm} vs {gg}");
                    }
                }
            }
        }
    }
}

#[test]
fn gram_forms_are_taken_where_they_are_cheaper_than_forming_each_gradient() {
    // The paper's MLP 3072-512-512-10: Gram matrices while b · 5,130 ≤ 1,841,152 (b ≤ 358); a
    // fixed set of 1,000 rows takes 4 batches per pass of 4,096 rows.
    let init = Initializer::new(0, 1.0, candle_core::DType::F64, &Device::Cpu);
    let model = Mlp::new(3072, 2, 512, 10, Activation::Relu, init).unwrap();
    let cfg = HvpConfig::default();
    let forms = cfg.batch_gradient_forms(&model, LossKind::Mse, 16).unwrap();
    assert_eq!(forms.batches_per_pass(), 4096 / 16);
    let fixed = forms.fixed(&data(1000, [3, 32, 32], 10, 92)).unwrap();
    assert_eq!(fixed.batches_per_pass(), 4);
    assert!(cfg
        .batch_gradient_forms(&model, LossKind::Mse, 358)
        .is_some());
    assert!(cfg
        .batch_gradient_forms(&model, LossKind::Mse, 359)
        .is_none());
    let autodiff = HvpConfig {
        method: HvpMethod::Autodiff,
        ..cfg
    };
    assert!(autodiff
        .batch_gradient_forms(&model, LossKind::Mse, 16)
        .is_none());
    let small_chunks = HvpConfig {
        chunk_size: 8,
        ..cfg
    };
    assert!(small_chunks
        .batch_gradient_forms(&model, LossKind::Mse, 16)
        .is_none());
    let conv = TinyConv::new(1, 2, 2, 7);
    assert!(cfg.batch_gradient_forms(&conv, LossKind::Mse, 2).is_none());
    let tiny = random_mlp(Activation::Relu, 91);
    let forms = BatchGradientForms {
        stack: tiny.dense_stack().unwrap(),
        kind: LossKind::Mse,
        batch_size: 4,
        chunk_size: 4,
    };
    let err = forms.own(&data(10, [3, 1, 1], 2, 90), false).unwrap_err();
    assert!(err.to_string().contains("not whole batches of 4"), "{err}");
}

#[test]
fn resnet_products_in_f32_read_in_place_match_f64() {
    // In f32 the ResNet's 16-channel convolutions keep their input images (and the tangents')
    // and take weight and input gradients from them in place; f64 takes patches throughout.
    let (model32, model64, x32, x64) = crate::nn::gradcheck::f32_and_f64_resnets(95, 6);
    let batch64 = data(6, [2, 16, 16], 3, 96);
    let batch64 = Batch::new(x64, batch64.targets).unwrap();
    let targets32 = crate::nn::loss::Targets {
        values: batch64.targets.values.to_dtype(DType::F32).unwrap(),
        ..batch64.targets.clone()
    };
    let batch32 = Batch::new(x32, targets32).unwrap();
    let v64 = random_vec(model64.as_ref(), 97);
    let v32 = ParamVec::new(
        v64.parts()
            .iter()
            .map(|p| p.to_dtype(DType::F32).unwrap())
            .collect(),
    );
    let v64 = ParamVec::new(
        v32.parts()
            .iter()
            .map(|p| p.to_dtype(DType::F64).unwrap())
            .collect(),
    );
    let cfg = HvpConfig::default();
    for kind in LOSSES {
        let objective = &Objective::Mean;
        let h32 = HessianOperator::new(model32.as_ref(), kind, &batch32, objective, &cfg).unwrap();
        let h64 = HessianOperator::new(model64.as_ref(), kind, &batch64, objective, &cfg).unwrap();
        let g32 =
            GaussNewtonOperator::new(model32.as_ref(), kind, &batch32, objective, &cfg).unwrap();
        let g64 =
            GaussNewtonOperator::new(model64.as_ref(), kind, &batch64, objective, &cfg).unwrap();
        let pairs = [
            (h32.apply(&v32).unwrap(), h64.apply(&v64).unwrap()),
            (g32.apply(&v32).unwrap(), g64.apply(&v64).unwrap()),
        ];
        for (got, want) in pairs {
            let scale = want
                .to_f64_vec()
                .unwrap()
                .iter()
                .fold(0.0f64, |m, x| m.max(x.abs()));
            let err = max_abs_diff(&got, &want);
            assert!(err <= 1e-4 * scale, "{kind:?}: {err:e} of {scale:e}");
        }
        let (got, want) = (
            h32.quadratic_form(&v32).unwrap(),
            h64.quadratic_form(&v64).unwrap(),
        );
        assert!(
            (got - want).abs() <= 1e-4 * want.abs(),
            "{kind:?}: vᵀHv {got} vs {want}"
        );
    }
}
