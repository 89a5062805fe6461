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

/// Loss of every sample, shape (N,).
pub fn per_sample_loss(kind: LossKind, outputs: &Tensor, targets: &Targets) -> Result<Tensor> {
    match kind {
        LossKind::Mse => (outputs - &targets.values)?.sqr()?.sum(D::Minus1),
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
