//! The paper's losses. MSE is the mean over samples of the *sum* over outputs of squared errors, with
//! no ½ (so its Hessians are twice those of a ½-MSE); cross-entropy is the usual mean of −log p.
//! Both are written with primitive ops only, so they differentiate twice in candle.

use candle_core::{DType, Device, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, LabelEncoding};

/// Which loss a run minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Σ_k (f_k − y_k)², averaged over samples.
    #[default]
    Mse,
    /// −log softmax(f)_y, averaged over samples (one-hot encoding only).
    CrossEntropy,
}

/// Training targets of a set of samples, on a device.
#[derive(Debug, Clone)]
pub struct Targets {
    /// (N, K) targets: one-hot 0/1, or ±1 with K = 1.
    pub values: Tensor,
    /// Class index of each sample, (N,) u32, for accuracy.
    pub labels: Tensor,
    /// How `values` encode the labels.
    pub encoding: LabelEncoding,
}

impl Targets {
    /// Builds targets for the samples `indices` of `data`, in `dtype` on `device`.
    pub fn from_dataset(
        data: &Dataset,
        indices: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (outputs, values): (usize, Vec<f32>) = match data.encoding {
            LabelEncoding::OneHot => {
                let k = data.num_classes;
                let mut v = vec![0f32; indices.len() * k];
                for (row, &i) in indices.iter().enumerate() {
                    v[row * k + data.labels[i] as usize] = 1.0;
                }
                (k, v)
            }
            LabelEncoding::PlusMinusOne => (
                1,
                indices
                    .iter()
                    .map(|&i| if data.labels[i] == 1 { 1.0 } else { -1.0 })
                    .collect(),
            ),
        };
        let labels: Vec<u32> = indices.iter().map(|&i| data.labels[i] as u32).collect();
        Ok(Self {
            values: Tensor::from_vec(values, (indices.len(), outputs), device)?.to_dtype(dtype)?,
            labels: Tensor::from_vec(labels, indices.len(), device)?,
            encoding: data.encoding,
        })
    }

    /// The targets of rows `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            values: self.values.narrow(0, start, len)?,
            labels: self.labels.narrow(0, start, len)?,
            encoding: self.encoding,
        })
    }

    /// The targets of the given rows.
    pub fn select(&self, rows: &Tensor) -> Result<Self> {
        Ok(Self {
            values: self.values.index_select(rows, 0)?,
            labels: self.labels.index_select(rows, 0)?,
            encoding: self.encoding,
        })
    }
}

/// Loss of every sample, shape (N,). Cross-entropy needs one-hot targets (an error for ±1 targets,
/// whose single output would make it identically zero).
pub fn per_sample_loss(kind: LossKind, outputs: &Tensor, targets: &Targets) -> Result<Tensor> {
    match kind {
        LossKind::Mse => (outputs - &targets.values)?.sqr()?.sum(D::Minus1),
        LossKind::CrossEntropy if targets.encoding == LabelEncoding::PlusMinusOne => {
            candle_core::bail!("loss: cross_entropy needs one-hot targets, not the ±1 encoding")
        }
        LossKind::CrossEntropy => {
            let log_p = candle_nn::ops::log_softmax(outputs, D::Minus1)?;
            (log_p * &targets.values)?.sum(D::Minus1)?.neg()
        }
    }
}

/// Mean loss over the batch (a scalar).
pub fn mean_loss(kind: LossKind, outputs: &Tensor, targets: &Targets) -> Result<Tensor> {
    per_sample_loss(kind, outputs, targets)?.mean_all()
}

/// Σ_i w_i ℓ_i for per-sample weights `weights` (N,), used by noisy-GD and SDE variants.
pub fn weighted_loss(
    kind: LossKind,
    outputs: &Tensor,
    targets: &Targets,
    weights: &Tensor,
) -> Result<Tensor> {
    (per_sample_loss(kind, outputs, targets)? * weights)?.sum_all()
}

/// Number of correctly classified samples (argmax for one-hot, sign for ±1).
pub fn correct_count(outputs: &Tensor, targets: &Targets) -> Result<usize> {
    let predicted = match targets.encoding {
        LabelEncoding::OneHot => outputs.argmax(D::Minus1)?,
        LabelEncoding::PlusMinusOne => outputs.squeeze(D::Minus1)?.gt(0.0)?.to_dtype(DType::U32)?,
    };
    let hits = predicted.eq(&targets.labels)?.to_dtype(DType::U32)?;
    Ok(hits.sum_all()?.to_scalar::<u32>()? as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(encoding: LabelEncoding, num_classes: usize, labels: Vec<i64>) -> Dataset {
        let n = labels.len();
        Dataset {
            images: vec![0.0; n],
            shape: [n, 1, 1, 1],
            labels,
            num_classes,
            encoding,
            source_indices: (0..n as i64).collect(),
        }
    }

    fn outputs(rows: &[&[f64]]) -> Tensor {
        let k = rows[0].len();
        let v: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(v, (rows.len(), k), &Device::Cpu).unwrap()
    }

    #[test]
    fn targets_are_one_hot_or_plus_minus_one() {
        let d = dataset(LabelEncoding::OneHot, 3, vec![2, 0, 1]);
        let t = Targets::from_dataset(&d, &[0, 2], DType::F64, &Device::Cpu).unwrap();
        assert_eq!(
            t.values.to_vec2::<f64>().unwrap(),
            vec![vec![0.0, 0.0, 1.0], vec![0.0, 1.0, 0.0]]
        );
        assert_eq!(t.labels.to_vec1::<u32>().unwrap(), vec![2, 1]);
        let d = dataset(LabelEncoding::PlusMinusOne, 2, vec![1, 0]);
        let t = Targets::from_dataset(&d, &[0, 1], DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            t.values.to_vec2::<f32>().unwrap(),
            vec![vec![1.0], vec![-1.0]]
        );
    }

    #[test]
    fn mse_is_the_mean_of_summed_squares_without_a_half() {
        let d = dataset(LabelEncoding::OneHot, 2, vec![0, 1]);
        let t = Targets::from_dataset(&d, &[0, 1], DType::F64, &Device::Cpu).unwrap();
        let y = outputs(&[&[0.5, 2.0], &[0.0, -1.0]]);
        // Sample 1: (0.5 − 1)² + 2² = 4.25; sample 2: 0² + (−1 − 1)² = 4.
        assert_eq!(
            per_sample_loss(LossKind::Mse, &y, &t)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            vec![4.25, 4.0]
        );
        assert_eq!(
            mean_loss(LossKind::Mse, &y, &t)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            4.125
        );
        let w = Tensor::new(&[2.0f64, -0.5], &Device::Cpu).unwrap();
        assert_eq!(
            weighted_loss(LossKind::Mse, &y, &t, &w)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            6.5
        );
    }

    #[test]
    fn cross_entropy_is_minus_log_softmax_of_the_label() {
        let d = dataset(LabelEncoding::OneHot, 3, vec![0, 2]);
        let t = Targets::from_dataset(&d, &[0, 1], DType::F64, &Device::Cpu).unwrap();
        let y = outputs(&[&[1.0, 2.0, 3.0], &[0.0, 0.0, -1.0]]);
        let e = std::f64::consts::E;
        // −log(e¹ / (e¹ + e² + e³)) = ln(1 + e + e²); −log(e⁻¹ / (2 + e⁻¹)) = ln(1 + 2e).
        let want = [(1.0 + e + e * e).ln(), (1.0 + 2.0 * e).ln()];
        let got = per_sample_loss(LossKind::CrossEntropy, &y, &t)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-14, "{g} vs {w}");
        }
        let mean = mean_loss(LossKind::CrossEntropy, &y, &t)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((mean - (want[0] + want[1]) / 2.0).abs() < 1e-14);
        let pm = Targets::from_dataset(
            &dataset(LabelEncoding::PlusMinusOne, 2, vec![1]),
            &[0],
            DType::F64,
            &Device::Cpu,
        )
        .unwrap();
        assert!(per_sample_loss(LossKind::CrossEntropy, &outputs(&[&[0.3]]), &pm).is_err());
    }

    #[test]
    fn accuracy_counts_argmax_and_sign() {
        let d = dataset(LabelEncoding::OneHot, 3, vec![2, 0, 1]);
        let t = Targets::from_dataset(&d, &[0, 1, 2], DType::F64, &Device::Cpu).unwrap();
        let y = outputs(&[&[0.0, 0.1, 0.9], &[0.2, 0.5, 0.1], &[0.0, 3.0, 1.0]]);
        assert_eq!(correct_count(&y, &t).unwrap(), 2);
        let d = dataset(LabelEncoding::PlusMinusOne, 2, vec![1, 0, 0]);
        let t = Targets::from_dataset(&d, &[0, 1, 2], DType::F64, &Device::Cpu).unwrap();
        assert_eq!(
            correct_count(&outputs(&[&[0.4], &[-2.0], &[0.1]]), &t).unwrap(),
            2
        );
    }
}
