//! Synthetic image-shaped data for quick runs and tests: Gaussian class clusters.
//!
//! Class k has a mean image m_k, drawn once from N(0, I) and rescaled to norm `separation`; sample i
//! of a split has label i mod K and pixels m_label + `noise`·z with z ~ N(0, I). The means come from
//! ChaCha8 stream 0 of `seed`, train samples from stream 1, test samples from stream 2, so both
//! splits share one distribution and a larger `train_size` only appends samples. With the defaults
//! (separation 4, noise 1) the nearest-class-mean rule is right on about 99 % of test samples:
//! learnable, yet the classes overlap.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::source::{Split, SplitReader};
use super::DataError;

/// Shape and distribution of a synthetic collection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSpec {
    /// Channels per image.
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Number of classes (2 to 256).
    pub num_classes: usize,
    /// Samples in the train split.
    pub train_size: usize,
    /// Samples in the test split.
    pub test_size: usize,
    /// Euclidean norm of every class mean.
    pub separation: f64,
    /// Standard deviation of the per-pixel Gaussian noise.
    pub noise: f64,
    /// Seed of the generator (the subset seed of the dataset is separate).
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            channels: 3,
            height: 8,
            width: 8,
            num_classes: 10,
            train_size: 1024,
            test_size: 512,
            separation: 4.0,
            noise: 1.0,
            seed: 0,
        }
    }
}

impl SyntheticSpec {
    /// Checks every field, naming the first one at fault (as `synthetic.<field>`).
    pub fn validate(&self) -> Result<(), DataError> {
        let positive = [
            ("synthetic.channels", self.channels),
            ("synthetic.height", self.height),
            ("synthetic.width", self.width),
            ("synthetic.train_size", self.train_size),
            ("synthetic.test_size", self.test_size),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(DataError::invalid(field, "must be at least 1"));
            }
        }
        if !(2..=256).contains(&self.num_classes) {
            return Err(DataError::invalid(
                "synthetic.num_classes",
                "must be between 2 and 256",
            ));
        }
        if !(self.separation.is_finite() && self.separation >= 0.0) {
            return Err(DataError::invalid(
                "synthetic.separation",
                "must be finite and ≥ 0",
            ));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(DataError::invalid(
                "synthetic.noise",
                "must be finite and ≥ 0",
            ));
        }
        Ok(())
    }

    /// Values per image.
    pub fn sample_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The class means, `num_classes` rows of `sample_len` values, each of norm `separation`.
    pub fn class_means(&self) -> Vec<Vec<f64>> {
        let mut rng = stream(self.seed, 0);
        (0..self.num_classes)
            .map(|_| scaled_gaussian(&mut rng, self.sample_len(), self.separation))
            .collect()
    }
}

/// A ChaCha8 generator for `seed` on its `stream`.
fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// A standard Gaussian vector of length `len` rescaled to Euclidean norm `norm` (the zero vector
/// when `norm` is 0).
pub(crate) fn scaled_gaussian(rng: &mut ChaCha8Rng, len: usize, norm: f64) -> Vec<f64> {
    let v: Vec<f64> = (0..len).map(|_| StandardNormal.sample(rng)).collect();
    let length = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let scale = if length > 0.0 { norm / length } else { 0.0 };
    v.into_iter().map(|x| x * scale).collect()
}

/// A generated synthetic split held in memory.
pub struct SyntheticReader {
    shape: [usize; 3],
    images: Vec<f32>,
    labels: Vec<u8>,
}

impl SyntheticReader {
    /// Generates `split` of the collection `spec` describes.
    pub fn generate(spec: &SyntheticSpec, split: Split) -> Result<Self, DataError> {
        spec.validate()?;
        let means = spec.class_means();
        let (size, mut rng) = match split {
            Split::Train => (spec.train_size, stream(spec.seed, 1)),
            Split::Test => (spec.test_size, stream(spec.seed, 2)),
        };
        let d = spec.sample_len();
        let mut images = Vec::with_capacity(size * d);
        let mut labels = Vec::with_capacity(size);
        for i in 0..size {
            let label = i % spec.num_classes;
            labels.push(label as u8);
            for &m in &means[label] {
                let z: f64 = StandardNormal.sample(&mut rng);
                images.push((m + spec.noise * z) as f32);
            }
        }
        Ok(Self {
            shape: [spec.channels, spec.height, spec.width],
            images,
            labels,
        })
    }
}

impl SplitReader for SyntheticReader {
    fn image_shape(&self) -> [usize; 3] {
        self.shape
    }

    fn labels(&self) -> &[u8] {
        &self.labels
    }

    fn read_images(&mut self, rows: &[usize]) -> Result<Vec<f32>, DataError> {
        let d = self.shape.iter().product::<usize>();
        let mut out = Vec::with_capacity(rows.len() * d);
        for &row in rows {
            let image = self.images.get(row * d..(row + 1) * d).ok_or_else(|| {
                DataError::invalid(
                    "rows",
                    format!(
                        "synthetic row {row} requested but the split holds {}",
                        self.labels.len()
                    ),
                )
            })?;
            out.extend_from_slice(image);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(spec: &SyntheticSpec, split: Split) -> SyntheticReader {
        SyntheticReader::generate(spec, split).unwrap()
    }

    #[test]
    fn seeded_and_prefix_stable() {
        let spec = SyntheticSpec::default();
        let a = all(&spec, Split::Train);
        assert_eq!(a.images, all(&spec, Split::Train).images);
        let bigger = all(
            &SyntheticSpec {
                train_size: 2048,
                ..spec.clone()
            },
            Split::Train,
        );
        assert_eq!(bigger.images[..a.images.len()], a.images[..]);
        assert_ne!(
            all(
                &SyntheticSpec {
                    seed: 1,
                    ..spec.clone()
                },
                Split::Train
            )
            .images,
            a.images
        );
        assert_ne!(all(&spec, Split::Test).images[..], a.images[..512 * 192]);
        assert_eq!(a.labels[..12], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
    }

    #[test]
    fn class_means_have_the_requested_norm_and_the_data_follows_them() {
        let spec = SyntheticSpec {
            train_size: 4000,
            noise: 0.5,
            ..Default::default()
        };
        let means = spec.class_means();
        for m in &means {
            let norm = m.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((norm - 4.0).abs() < 1e-12, "{norm}");
        }
        // Empirical class means (400 samples each) are within a few noise/√400 of the true ones,
        // and the empirical noise variance is noise².
        let data = all(&spec, Split::Train);
        let d = spec.sample_len();
        let mut resid2 = 0f64;
        for (k, true_mean) in means.iter().enumerate() {
            let mut mean = vec![0f64; d];
            for i in (k..4000).step_by(10) {
                for (m, &v) in mean.iter_mut().zip(&data.images[i * d..(i + 1) * d]) {
                    *m += f64::from(v) / 400.0;
                }
            }
            let err = mean
                .iter()
                .zip(true_mean)
                .map(|(a, b)| (a - b).abs())
                .fold(0f64, f64::max);
            assert!(err < 5.0 * 0.5 / 20.0, "class {k}: max error {err}");
        }
        for (i, image) in data.images.chunks_exact(d).enumerate() {
            resid2 += image
                .iter()
                .zip(&means[i % 10])
                .map(|(&v, m)| (f64::from(v) - m).powi(2))
                .sum::<f64>();
        }
        let var = resid2 / (4000.0 * d as f64);
        assert!((var - 0.25).abs() < 0.01, "noise variance {var}");
    }

    #[test]
    fn defaults_are_learnable() {
        // Nearest class mean, estimated on the train split, classifies the test split well.
        let spec = SyntheticSpec::default();
        let (train, test) = (all(&spec, Split::Train), all(&spec, Split::Test));
        let d = spec.sample_len();
        let mut means = vec![vec![0f64; d]; 10];
        let mut counts = [0f64; 10];
        for (image, &l) in train.images.chunks_exact(d).zip(&train.labels) {
            counts[usize::from(l)] += 1.0;
            for (m, &v) in means[usize::from(l)].iter_mut().zip(image) {
                *m += f64::from(v);
            }
        }
        let mut correct = 0;
        for (image, &l) in test.images.chunks_exact(d).zip(&test.labels) {
            let dist = |k: usize| {
                means[k]
                    .iter()
                    .zip(image)
                    .map(|(a, &b)| (a / counts[k] - f64::from(b)).powi(2))
                    .sum::<f64>()
            };
            let best = (0..10)
                .min_by(|&a, &b| dist(a).total_cmp(&dist(b)))
                .unwrap();
            correct += usize::from(best == usize::from(l));
        }
        let accuracy = correct as f64 / 512.0;
        assert!(accuracy > 0.95, "accuracy {accuracy}");
    }
}
