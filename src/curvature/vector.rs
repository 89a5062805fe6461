//! Vectors in parameter space: one tensor per model parameter, on the model's device and in its
//! dtype, with the few linear-algebra operations Lanczos and the estimators need. Scalar results
//! (dot products, norms) are accumulated in f64 across parameters.

use candle_core::{DType, Tensor};
use rand::Rng;
use rand_distr::StandardNormal;

use super::{CandleContext, Result};
use crate::nn::Param;

/// A vector in parameter space, laid out like a model's parameters (same order, shapes, dtype).
#[derive(Debug, Clone)]
pub struct ParamVec {
    parts: Vec<Tensor>,
}

/// Distribution of the entries of a random [`ParamVec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Independent standard normal entries.
    Gaussian,
    /// Independent ±1 entries with equal probability (Hutchinson's probes).
    Rademacher,
}

impl ParamVec {
    /// Wraps one tensor per parameter (the caller guarantees the layout).
    pub fn new(parts: Vec<Tensor>) -> Self {
        Self { parts }
    }

    /// The tensors, one per parameter.
    pub fn parts(&self) -> &[Tensor] {
        &self.parts
    }

    /// The current values of `params`, detached from any graph.
    pub fn from_params(params: &[Param]) -> Self {
        Self::new(params.iter().map(|p| p.var.as_detached_tensor()).collect())
    }

    /// A zero vector laid out like `params`.
    pub fn zeros_for(params: &[Param]) -> Result<Self> {
        let parts = params
            .iter()
            .map(|p| p.var.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()
            .ctx("zero parameter vector")?;
        Ok(Self::new(parts))
    }

    /// A zero vector laid out like `self`.
    pub fn zeros_like(&self) -> Result<Self> {
        let parts = self
            .parts
            .iter()
            .map(|t| t.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()
            .ctx("zero parameter vector")?;
        Ok(Self::new(parts))
    }

    /// A random vector laid out like `self`, drawn from `rng` (host-side, so it is reproducible on
    /// every device).
    pub fn random_like<R: Rng>(&self, probe: Probe, rng: &mut R) -> Result<Self> {
        let mut parts = Vec::with_capacity(self.parts.len());
        for t in &self.parts {
            let values: Vec<f64> = (0..t.elem_count())
                .map(|_| match probe {
                    Probe::Gaussian => rng.sample::<f64, _>(StandardNormal),
                    Probe::Rademacher => {
                        if rng.random::<bool>() {
                            1.0
                        } else {
                            -1.0
                        }
                    }
                })
                .collect();
            let part = Tensor::from_vec(values, t.shape(), t.device())
                .and_then(|x| x.to_dtype(t.dtype()))
                .ctx("random parameter vector")?;
            parts.push(part);
        }
        Ok(Self::new(parts))
    }

    /// Number of scalar entries (the dimension of parameter space).
    pub fn dim(&self) -> usize {
        self.parts.iter().map(|t| t.elem_count()).sum()
    }

    /// Euclidean inner product, accumulated in f64 across parameters.
    pub fn dot(&self, other: &ParamVec) -> Result<f64> {
        let sums = self
            .parts
            .iter()
            .zip(&other.parts)
            .map(|(a, b)| (a * b)?.sum_all()?.to_dtype(DType::F64))
            .collect::<candle_core::Result<Vec<_>>>()
            .ctx("parameter-vector dot product")?;
        if sums.is_empty() {
            return Ok(0.0);
        }
        let values: Vec<f64> = Tensor::stack(&sums, 0)
            .and_then(|s| s.to_vec1::<f64>())
            .ctx("parameter-vector dot product")?;
        Ok(values.iter().sum())
    }

    /// Squared Euclidean norm.
    pub fn norm_sq(&self) -> Result<f64> {
        self.dot(self)
    }

    /// Euclidean norm.
    pub fn norm(&self) -> Result<f64> {
        Ok(self.norm_sq()?.sqrt())
    }

    /// `a · self`.
    pub fn scale(&self, a: f64) -> Result<ParamVec> {
        let parts = self
            .parts
            .iter()
            .map(|t| t.affine(a, 0.0))
            .collect::<candle_core::Result<Vec<_>>>()
            .ctx("parameter-vector scaling")?;
        Ok(Self::new(parts))
    }

    /// `self + a · x`.
    pub fn axpy(&self, a: f64, x: &ParamVec) -> Result<ParamVec> {
        let parts = self
            .parts
            .iter()
            .zip(&x.parts)
            .map(|(s, x)| s + x.affine(a, 0.0)?)
            .collect::<candle_core::Result<Vec<_>>>()
            .ctx("parameter-vector axpy")?;
        Ok(Self::new(parts))
    }

    /// All entries as one f64 vector, parameters concatenated in order (for tests and small dumps).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(self.dim());
        for t in &self.parts {
            let v = t
                .flatten_all()
                .and_then(|x| x.to_dtype(DType::F64))
                .and_then(|x| x.to_vec1::<f64>())
                .ctx("parameter vector to host")?;
            out.extend(v);
        }
        Ok(out)
    }

    /// A vector laid out like `self` holding `values` (parameters concatenated in order).
    pub fn from_f64_like(&self, values: &[f64]) -> Result<ParamVec> {
        if values.len() != self.dim() {
            return Err(super::CurvatureError::Config {
                field: "vector",
                message: format!(
                    "{} values for a {}-dimensional space",
                    values.len(),
                    self.dim()
                ),
            });
        }
        let mut parts = Vec::with_capacity(self.parts.len());
        let mut offset = 0;
        for t in &self.parts {
            let n = t.elem_count();
            let part = Tensor::from_slice(&values[offset..offset + n], t.shape(), t.device())
                .and_then(|x| x.to_dtype(t.dtype()))
                .ctx("parameter vector from host")?;
            parts.push(part);
            offset += n;
        }
        Ok(Self::new(parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn vec_of(values: &[f64], split: usize) -> ParamVec {
        let dev = Device::Cpu;
        let a = Tensor::from_slice(&values[..split], split, &dev).unwrap();
        let b = Tensor::from_slice(&values[split..], values.len() - split, &dev).unwrap();
        ParamVec::new(vec![a, b])
    }

    #[test]
    fn linear_algebra_matches_plain_f64() {
        let x = [1.0, -2.0, 3.0, 0.5, 4.0];
        let y = [0.25, 1.0, -1.0, 2.0, -0.5];
        let (vx, vy) = (vec_of(&x, 2), vec_of(&y, 2));
        let dot: f64 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert_eq!(vx.dot(&vy).unwrap(), dot);
        let norm = x.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!((vx.norm().unwrap() - norm).abs() < 1e-15);
        let axpy: Vec<f64> = x.iter().zip(&y).map(|(a, b)| a + 2.5 * b).collect();
        assert_eq!(vx.axpy(2.5, &vy).unwrap().to_f64_vec().unwrap(), axpy);
        let scaled: Vec<f64> = x.iter().map(|a| -3.0 * a).collect();
        assert_eq!(vx.scale(-3.0).unwrap().to_f64_vec().unwrap(), scaled);
        assert_eq!(vx.dim(), 5);
        let back = vx.from_f64_like(&y).unwrap().to_f64_vec().unwrap();
        assert_eq!(back, y);
        assert!(vx.from_f64_like(&y[..3]).is_err());
    }

    #[test]
    fn random_vectors_are_seeded_and_rademacher_is_plus_minus_one() {
        let template = vec_of(&[0.0; 7], 3);
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            template
                .random_like(Probe::Rademacher, &mut rng)
                .unwrap()
                .to_f64_vec()
                .unwrap()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert!(a.iter().all(|v| *v == 1.0 || *v == -1.0));
        assert!(a.contains(&1.0) && a.contains(&-1.0));
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let g = template
            .random_like(Probe::Gaussian, &mut rng)
            .unwrap()
            .to_f64_vec()
            .unwrap();
        assert!(g.iter().all(|v| v.is_finite() && v.abs() < 10.0));
        assert!(g.iter().any(|v| v.fract() != 0.0));
    }
}
