//! Curvature of the loss: Hessian- and Gauss–Newton-vector products, top eigenvalues, and the
//! Monte Carlo estimators of the paper (batch sharpness, GNI, IAS, λmax^b, trace, ...).
//!
//! Layout:
//! - [`vector`]: [`ParamVec`], a vector in parameter space (one tensor per parameter).
//! - [`batch`]: [`Batch`] (inputs + targets) and uniform mini-batch sampling.
//! - [`hvp`]: [`HessianOperator`] and [`GaussNewtonOperator`] on one fixed batch (one forward graph
//!   reused for many products; large batches in chunks), and the start-up [`self_check`].
//! - [`lanczos`](mod@lanczos): top-k eigenpairs of any symmetric operator closure.
//! - [`estimators`]: [`Landscape`], every measured quantity of the paper, with seeded RNGs.
//! - [`alignment`]: pairwise alignment of per-sample model gradients (figures 23–24).
//!
//! This module knows nothing of pipelines, files or cadences: callers (the `train` and `measure`
//! stages) decide when to measure and where the numbers go.
//!
//! Hessian-vector products of the MLP use hand-written forward-over-reverse passes
//! ([`HvpMethod::Auto`]); every other model needs candle's double backward, which only works when
//! the environment variable `CANDLE_GRAD_DO_NOT_DETACH=1` is set before a thread's first
//! `backward()`; without it every HVP is silently zero. Call [`self_check`] at start-up to turn that
//! into a clear error.

pub mod alignment;
pub mod batch;
pub mod estimators;
pub mod hvp;
pub mod lanczos;
pub mod stats;
pub mod tridiagonal;
pub mod vector;

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // dense reference linear algebra reads best indexed
pub(crate) mod testing;

pub use alignment::{
    model_gradient_alignment, AlignmentBins, AlignmentConfig, AlignmentReport, Histogram,
};
pub use batch::Batch;
pub use estimators::{BatchSet, FullBatchConfig, LambdaMaxB, Landscape, SecondMomentContraction};
pub use hvp::{self_check, GaussNewtonOperator, HessianOperator, HvpConfig, HvpMethod, Objective};
pub use lanczos::{lanczos, Eigenpairs, LanczosConfig, Start};
pub use stats::{Estimate, MonteCarloConfig};
pub use vector::{ParamVec, Probe};

/// Why a curvature computation failed.
#[derive(Debug, thiserror::Error)]
pub enum CurvatureError {
    /// A tensor operation failed; `context` names the computation.
    #[error("{context}: tensor computation failed: {source}")]
    Candle {
        /// What was being computed (e.g. `Hessian-vector product`).
        context: &'static str,
        /// The underlying candle error.
        source: candle_core::Error,
    },
    /// A configuration value is out of range.
    #[error("curvature config `{field}`: {message}")]
    Config {
        /// The field at fault, e.g. `lanczos.top_k`.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A batch is malformed (empty, mismatched lengths, bad indices).
    #[error("batch: {0}")]
    Batch(String),
    /// The start-up Hessian-vector self-check failed.
    #[error("Hessian-vector product self-check failed: {0}")]
    SelfCheck(String),
    /// A Rayleigh quotient along a gradient was asked for, but the gradient is exactly zero.
    #[error("{what}: the gradient is exactly zero, so the quotient by its norm is undefined")]
    ZeroGradient {
        /// The quantity being measured.
        what: &'static str,
    },
}

/// Adds the name of the computation to candle errors.
pub(crate) trait CandleContext<T> {
    /// Wraps a candle error as [`CurvatureError::Candle`] naming `context`.
    fn ctx(self, context: &'static str) -> std::result::Result<T, CurvatureError>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, context: &'static str) -> std::result::Result<T, CurvatureError> {
        self.map_err(|source| CurvatureError::Candle { context, source })
    }
}

/// Shorthand for results of this module.
pub type Result<T> = std::result::Result<T, CurvatureError>;
