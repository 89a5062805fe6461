//! Datasets: loaders for the official files of CIFAR-10, Fashion-MNIST and SVHN, a seeded synthetic
//! source, subsetting, normalisation, class filters, and the one `Dataset` type they all produce.

/// How labels become training targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelEncoding {
    /// `num_classes` outputs; MSE targets are one-hot 0/1, cross-entropy uses the class index.
    OneHot,
    /// Two classes mapped to one output with targets -1 (label 0) and +1 (label 1).
    PlusMinusOne,
}

/// A normalised image dataset held in memory, NCHW.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Normalised pixels, `shape[0] * shape[1] * shape[2] * shape[3]` values in NCHW order.
    pub images: Vec<f32>,
    /// (N, C, H, W).
    pub shape: [usize; 4],
    /// Class index of every sample, in `0..num_classes`.
    pub labels: Vec<i64>,
    /// Number of classes after filtering (2 for the ±1 variant).
    pub num_classes: usize,
    /// How labels become targets.
    pub encoding: LabelEncoding,
    /// Index of every sample in its source split, for provenance.
    pub source_indices: Vec<i64>,
}
