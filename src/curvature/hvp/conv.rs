//! Hessian- and Gauss–Newton-vector products of a [`ConvNet`] (the 5-layer CNN) by the
//! R-operator, forward over reverse, on the hand-written passes of [`crate::nn::conv`], instead of
//! candle's double backward (about 20× PyTorch's time on the CPU, and 37 MB per sample).
//!
//! The convolutions are linear in their input and weight, ReLU has σ'' = 0 and a max pool passes
//! its window's maximum on (a fixed selection almost everywhere), so along a direction V the
//! forward tangents are
//!
//!   ż_l = patches(ȧ_{l−1}) K_l + P_l K(V_l) + V_{b_l},   ȧ_l = pool(gate_l ⊙ ż_l),
//!
//! with P_l the retained patches, K(·) a weight as a patch matrix and gate_l = ReLU' ⊙ pool mask;
//! the flattened ȧ enters the dense head ([`super::dense::tangents`]), whose backward tangents
//! return R(∂L/∂a) at the head's input. Back through the convolutions, with u_l = ∂L/∂a_l:
//!
//!   R δ_l = unpool(R u_l) ⊙ gate_l,   (H V)_{W_l} = P_lᵀ R δ_l + patches(ȧ_{l−1})ᵀ δ_l,
//!   (H V)_{b_l} = Σ R δ_l,   R u_{l−1} = ∂ᵀ_x(R δ_l, W_l) + ∂ᵀ_x(δ_l, V_l),
//!
//! ∂ᵀ_x the convolution's input gradient. The Gauss–Newton product drops the terms in δ.

use candle_core::Tensor;

use super::dense::{
    accumulate, product_context, quadratic_form, Chunk, ChunkProducts, InputTangents,
};
use super::Result;
use crate::curvature::{CandleContext, ParamVec};
use crate::nn::conv::{
    flatten_features, input_gradient, kernel_gradient, kernel_matrix, unflatten_features,
    ConvForward,
};
use crate::nn::gate::{gate_gradient, gate_tangent};
use crate::nn::im2col::patches;
use crate::nn::product::matmul;
use crate::nn::reduce::column_sums;

/// Forward tangents through the convolutions of a network (the CNN, the ResNets), with what each
/// convolution keeps of its input tangent (`P`: its patches, or what [`ConvLayer::keep`] keeps).
///
/// [`ConvLayer::keep`]: crate::nn::residual::ConvLayer::keep
pub(super) struct TrunkTangents<P = Tensor> {
    /// ȧ at the trunk's output (N, H, W, C).
    pub first: Tensor,
    /// ä at the trunk's output, when asked for and not zero.
    pub second: Option<Tensor>,
    /// What each convolution keeps of its input tangent (none for the first: the data does not
    /// move).
    pub patch_dots: Vec<Option<P>>,
}

impl Chunk<ConvForward> {
    /// Tangents along `v_conv` through the convolutions: ż_l = patches(ȧ_{l−1}) K_l + P_l K(V_l) +
    /// V_{b_l} and, with `second`, z̈_l = patches(ä_{l−1}) K_l + 2 patches(ȧ_{l−1}) K(V_l); each
    /// gated and, at a pool, summed over its windows.
    fn trunk_tangents(
        &self,
        v_conv: &[Tensor],
        second: bool,
        ctx: &'static str,
    ) -> Result<TrunkTangents> {
        let ConvForward {
            weights,
            patches: kept,
            gates,
            pools,
            ..
        } = &self.forward;
        let gate = |l: usize, t: Tensor| gate_tangent(&t, &gates[l], pools[l]);
        let mut a_dot: Option<Tensor> = None;
        let mut a_ddot: Option<Tensor> = None;
        let mut patch_dots = Vec::with_capacity(gates.len());
        for l in 0..gates.len() {
            let k = weights[l].dim(2).ctx(ctx)?;
            let kernel = kernel_matrix(&weights[l]).ctx(ctx)?;
            let v_kernel = kernel_matrix(&v_conv[2 * l]).ctx(ctx)?;
            let mut z_dot = matmul(&kept[l], &v_kernel)
                .and_then(|t| t.broadcast_add(&v_conv[2 * l + 1]))
                .ctx(ctx)?;
            let patch_dot = a_dot
                .as_ref()
                .map(|ad| patches(ad, k))
                .transpose()
                .ctx(ctx)?;
            if let Some(p) = &patch_dot {
                z_dot = (z_dot + matmul(p, &kernel).ctx(ctx)?).ctx(ctx)?;
            }
            if second {
                let mut z_ddot = match &patch_dot {
                    Some(p) => Some(
                        matmul(p, &v_kernel)
                            .and_then(|t| t.affine(2.0, 0.0))
                            .ctx(ctx)?,
                    ),
                    None => None,
                };
                if let Some(add) = &a_ddot {
                    let term = patches(add, k).and_then(|p| matmul(&p, &kernel)).ctx(ctx)?;
                    z_ddot = Some(accumulate(z_ddot, term).ctx(ctx)?);
                }
                a_ddot = z_ddot.map(|t| gate(l, t)).transpose().ctx(ctx)?;
            }
            patch_dots.push(patch_dot);
            a_dot = Some(gate(l, z_dot).ctx(ctx)?);
        }
        let Some(first) = a_dot else {
            return Err(candle_core::Error::Msg(
                "a conv net without convolutions".into(),
            ))
            .ctx(ctx);
        };
        Ok(TrunkTangents {
            first,
            second: a_ddot,
            patch_dots,
        })
    }
}

impl ChunkProducts for Chunk<ConvForward> {
    /// vᵀ H v of the chunk's objective (or vᵀ G v) by a forward pass alone: first and second
    /// tangents through the convolutions ([`Self::trunk_tangents`]; ReLU and the pools have no
    /// second derivative), then through the head ([`quadratic_form`]).
    fn quadratic_form(&self, v: &ParamVec, gauss_newton: bool) -> Result<f64> {
        let ctx = "curvature quadratic form";
        let (v_conv, v_head) = v.parts().split_at(2 * self.forward.gates.len());
        let trunk = self.trunk_tangents(v_conv, !gauss_newton, ctx)?;
        let input =
            InputTangents::through(&trunk.first, trunk.second, flatten_features).ctx(ctx)?;
        quadratic_form(self.head(), v_head, input, gauss_newton)
    }

    /// H v of the chunk's objective, or its Gauss–Newton product Jᵀ H_ℓ J v.
    fn apply(&self, v: &ParamVec, gauss_newton: bool) -> Result<Vec<Tensor>> {
        let ctx = product_context(gauss_newton);
        let ConvForward {
            weights,
            patches: kept,
            gates,
            pools,
            features,
            ..
        } = &self.forward;
        let convs = gates.len();
        let (v_conv, v_head) = v.parts().split_at(2 * convs);

        let trunk = self.trunk_tangents(v_conv, false, ctx)?;
        let patch_dots = trunk.patch_dots;
        let head_input = flatten_features(&trunk.first).ctx(ctx)?;

        // The head, forward and back, down to R(∂L/∂a) at its input.
        let (head_out, r_input) =
            self.head()
                .products_to_input(v_head, head_input, gauss_newton, ctx)?;
        let mut r_u = unflatten_features(&r_input, *features).ctx(ctx)?;

        // Backward tangents through the convolutions.
        let deltas = &self.backward.deltas;
        let mut out = vec![None; 2 * convs];
        for l in (0..convs).rev() {
            let k = weights[l].dim(2).ctx(ctx)?;
            let r_delta = gate_gradient(&r_u, &gates[l], pools[l]).ctx(ctx)?;
            let mut gw = kernel_gradient(&kept[l], &r_delta, k).ctx(ctx)?;
            if let (false, Some(p)) = (gauss_newton, &patch_dots[l]) {
                let term = kernel_gradient(p, &deltas[l], k).ctx(ctx)?;
                gw = (gw + term).ctx(ctx)?;
            }
            out[2 * l] = Some(gw);
            out[2 * l + 1] = Some(
                r_delta
                    .flatten_to(2)
                    .and_then(|t| column_sums(&t))
                    .ctx(ctx)?,
            );
            if l > 0 {
                r_u = input_gradient(&r_delta, &weights[l]).ctx(ctx)?;
                if !gauss_newton {
                    let term = input_gradient(&deltas[l], &v_conv[2 * l]).ctx(ctx)?;
                    r_u = (r_u + term).ctx(ctx)?;
                }
            }
        }
        let mut out: Vec<Tensor> = out.into_iter().flatten().collect();
        out.extend(head_out);
        Ok(out)
    }
}
