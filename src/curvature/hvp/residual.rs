//! Hessian- and Gauss–Newton-vector products of a [`ResidualNet`] (the CIFAR ResNets) by the
//! R-operator, forward over reverse, on the hand-written passes of [`crate::nn::residual`], instead
//! of candle's double backward (CPU only, like those passes).
//!
//! Convolutions are linear in their input and weight, ReLU has σ'' = 0, and the shortcut S and the
//! average pool are linear, so along a direction V the forward tangents of a block with input x,
//! inner activation h and output x' are
//!
//!   ḣ = g_h ⊙ (conv(ẋ, W₁) + conv(x, V₁)),   ẋ' = g_o ⊙ (conv(ḣ, W₂) + conv(h, V₂) + S ẋ),
//!
//! with g the ReLU gates and conv(x, V) = P(x) K(V) on the retained patches P (or, for the
//! 16-channel convolutions, read in place from the retained padded image: [`ConvInput`]). The
//! pooled ẋ enters the linear layer ([`super::dense::tangents`]), whose backward tangents return
//! R(∂L/∂pool). Back through a block, with δ_o, δ_h the retained deltas of its two ReLUs and
//! u = ∂L/∂x':
//!
//!   R δ_o = g_o ⊙ R u,   (H V)_{W₂} = P(h)ᵀ R δ_o + P(ḣ)ᵀ δ_o,
//!   R δ_h = g_h ⊙ (∂ᵀ_x(R δ_o, W₂) + ∂ᵀ_x(δ_o, V₂)),   (H V)_{W₁} = P(x)ᵀ R δ_h + P(ẋ)ᵀ δ_h,
//!   R u_x = ∂ᵀ_x(R δ_h, W₁) + ∂ᵀ_x(δ_h, V₁) + Sᵀ R δ_o,
//!
//! ∂ᵀ_x a convolution's input gradient. The Gauss–Newton product drops the terms in δ.

use candle_core::Tensor;

use super::conv::TrunkTangents;
use super::dense::{product_context, quadratic_form, Chunk, ChunkProducts, InputTangents};
use super::Result;
use crate::curvature::{CandleContext, ParamVec};
use crate::nn::gate::{gate_gradient, gated_sum};
use crate::nn::residual::{
    average_pool, average_pool_adjoint, shortcut, shortcut_adjoint, ConvInput, ResidualForward,
};

impl Chunk<ResidualForward> {
    /// Tangents along `v_conv` through the convolutions (module docs) and, with `second`, the
    /// second-order ones: z̈ = conv(ẍ, W) + 2 conv(ẋ, V) (+ S ẍ), gated. Each convolution of an
    /// input tangent goes through what its layer keeps of it ([`keep`]: its patches,
    /// or the padded image that the 16-channel ones read in place), returned for the weight
    /// terms of H v.
    ///
    /// [`keep`]: crate::nn::residual::ConvLayer::keep
    fn trunk_tangents(
        &self,
        v_conv: &[Tensor],
        second: bool,
        ctx: &'static str,
    ) -> Result<TrunkTangents<ConvInput>> {
        let convs = &self.forward.convs;
        let stem = &convs[0];
        let mut a_dot = stem
            .convolve(&stem.input, &v_conv[0])
            .and_then(|t| t * &stem.gate)
            .ctx(ctx)?;
        // The stem's second tangent is zero (its input is data).
        let mut a_ddot: Option<Tensor> = None;
        let mut patch_dots = vec![None];
        for (b, block) in self.forward.blocks.iter().enumerate() {
            let (first, last) = (&convs[1 + 2 * b], &convs[2 + 2 * b]);
            let (v1, v2) = (&v_conv[1 + 2 * b], &v_conv[2 + 2 * b]);
            type Step = (Tensor, Option<Tensor>, ConvInput, ConvInput);
            let step = || -> candle_core::Result<Step> {
                let p_a = first.keep(&a_dot)?;
                let conv_a = |kernel: &Tensor| first.convolve(&p_a, kernel);
                let h_dot = gated_sum(
                    &[&first.convolve(&first.input, v1)?, &conv_a(&first.weight)?],
                    &first.gate,
                )?;
                let p_h = last.keep(&h_dot)?;
                let conv_h = |kernel: &Tensor| last.convolve(&p_h, kernel);
                let next = gated_sum(
                    &[
                        &last.convolve(&last.input, v2)?,
                        &conv_h(&last.weight)?,
                        &shortcut(&a_dot, block.out_channels, block.stride)?,
                    ],
                    &last.gate,
                )?;
                let next_second = if second {
                    // The terms of z̈ in the order the sums were taken when each was its own op
                    // (the bits of the measurements do not change).
                    let doubled = conv_a(v1)?.affine(2.0, 0.0)?;
                    let through = a_ddot
                        .as_ref()
                        .map(|t| first.apply(t, &first.weight))
                        .transpose()?;
                    let terms: Vec<&Tensor> = through.iter().chain([&doubled]).collect();
                    let h_ddot = gated_sum(&terms, &first.gate)?;
                    let doubled = conv_h(v2)?.affine(2.0, 0.0)?;
                    let through = last.apply(&h_ddot, &last.weight)?;
                    let skip = a_ddot
                        .as_ref()
                        .map(|t| shortcut(t, block.out_channels, block.stride))
                        .transpose()?;
                    let terms: Vec<&Tensor> =
                        [&doubled, &through].into_iter().chain(&skip).collect();
                    Some(gated_sum(&terms, &last.gate)?)
                } else {
                    None
                };
                Ok((next, next_second, p_a, p_h))
            };
            let (next, next_second, p_a, p_h) = step().ctx(ctx)?;
            a_dot = next;
            a_ddot = next_second;
            patch_dots.push(Some(p_a));
            patch_dots.push(Some(p_h));
        }
        Ok(TrunkTangents {
            first: a_dot,
            second: a_ddot,
            patch_dots,
        })
    }
}

impl ChunkProducts for Chunk<ResidualForward> {
    /// vᵀ H v of the chunk's objective (or vᵀ G v) by a forward pass alone: first and second
    /// tangents through the convolutions, then through the linear layer ([`quadratic_form`]).
    fn quadratic_form(&self, v: &ParamVec, gauss_newton: bool) -> Result<f64> {
        let ctx = "curvature quadratic form";
        let (v_conv, v_head) = v.parts().split_at(self.forward.convs.len());
        let trunk = self.trunk_tangents(v_conv, !gauss_newton, ctx)?;
        let input = InputTangents::through(&trunk.first, trunk.second, average_pool).ctx(ctx)?;
        quadratic_form(self.head(), v_head, input, gauss_newton)
    }

    /// H v of the chunk's objective, or its Gauss–Newton product Jᵀ H_ℓ J v.
    fn apply(&self, v: &ParamVec, gauss_newton: bool) -> Result<Vec<Tensor>> {
        let ctx = product_context(gauss_newton);
        let ResidualForward {
            convs,
            blocks,
            features,
            ..
        } = &self.forward;
        let (v_conv, v_head) = v.parts().split_at(convs.len());
        let trunk = self.trunk_tangents(v_conv, false, ctx)?;
        let head_input = average_pool(&trunk.first).ctx(ctx)?;

        // The linear layer, forward and back, down to R(∂L/∂pool).
        let (head_out, r_input) =
            self.head()
                .products_to_input(v_head, head_input, gauss_newton, ctx)?;

        // Backward tangents through the blocks.
        let deltas = &self.backward.deltas;
        let patch_dots = &trunk.patch_dots;
        let mut out = vec![None; convs.len()];
        let mut weight_term = |l: usize, r_delta: &Tensor| -> candle_core::Result<()> {
            let conv = &convs[l];
            let mut g = conv.weight_gradient(&conv.input, r_delta)?;
            if let (false, Some(p)) = (gauss_newton, &patch_dots[l]) {
                g = (g + conv.weight_gradient(p, &deltas[l])?)?;
            }
            out[l] = Some(g);
            Ok(())
        };
        let mut back = || -> candle_core::Result<()> {
            let mut r_u = average_pool_adjoint(&r_input, *features)?;
            for (b, block) in blocks.iter().enumerate().rev() {
                let (l1, l2) = (1 + 2 * b, 2 + 2 * b);
                let (first, last) = (&convs[l1], &convs[l2]);
                let r_out = gate_gradient(&r_u, &last.gate, false)?;
                weight_term(l2, &r_out)?;
                let mut terms = vec![(&r_out, &last.weight)];
                if !gauss_newton {
                    terms.push((&deltas[l2], &v_conv[l2]));
                }
                let r_inner = gate_gradient(&last.input_gradient(&terms)?, &first.gate, false)?;
                weight_term(l1, &r_inner)?;
                let mut terms = vec![(&r_inner, &first.weight)];
                if !gauss_newton {
                    terms.push((&deltas[l1], &v_conv[l1]));
                }
                r_u = (first.input_gradient(&terms)?
                    + shortcut_adjoint(&r_out, first.input_dims, block.stride)?)?;
            }
            let r_stem = gate_gradient(&r_u, &convs[0].gate, false)?;
            weight_term(0, &r_stem)
        };
        back().ctx(ctx)?;
        let mut out: Vec<Tensor> = out.into_iter().flatten().collect();
        out.extend(head_out);
        Ok(out)
    }
}
