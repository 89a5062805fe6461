//! From a [`DatasetSpec`] to a [`Dataset`]: class filter, subset, normalisation, "easy" offset.
//!
//! Order of operations, each documented on its field:
//! 1. open the split and read all labels;
//! 2. `classes`: keep the listed classes, relabelled 0..k−1 in the listed order;
//! 3. `binary`: the ±1 variant, the first n/2 samples of each of the two classes in file order;
//!    otherwise `n`: a seeded uniform choice of n samples without replacement (ChaCha8 seeded with
//!    `seed`, `rand::seq::index::sample`), kept in file order; neither: all samples;
//! 4. read only the chosen images; pixels/255, then (x − mean_c)/std_c per channel;
//! 5. `easy`: add a fixed class-specific offset to every image (after normalisation).

use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::source::{self, SourceKind, Split};
use super::synthetic::{scaled_gaussian, SyntheticSpec};
use super::{DataError, Dataset, LabelEncoding};

/// The classes of the paper's 2-class CIFAR (alignment figures 23–24): automobile and truck.
pub const DEFAULT_BINARY_CLASSES: [u8; 2] = [1, 9];

/// Everything that determines a dataset, with every default filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// The collection.
    pub source: SourceKind,
    /// Train or test split.
    pub split: Split,
    /// Subset size; `None` keeps every sample that passes the class filter.
    pub n: Option<usize>,
    /// Seed of the subset choice.
    pub seed: u64,
    /// Per-channel standardisation applied after scaling bytes to [0, 1]; `None` leaves the values.
    pub normalize: Option<Normalization>,
    /// Classes to keep, relabelled 0..k−1 in this order; `None` keeps all.
    pub classes: Option<Vec<u8>>,
    /// The 2-class ±1 variant (one output): `classes` lists two classes (default [1, 9]); the first
    /// becomes label 0 (target −1), the second label 1 (target +1).
    pub binary: bool,
    /// The "easy" variant: a class-specific offset added to every image.
    pub easy: Option<EasyOffset>,
    /// Shape and distribution of synthetic data (`Some` exactly when `source` is synthetic).
    pub synthetic: Option<SyntheticSpec>,
}

/// Per-channel mean and standard deviation: x ↦ (x − mean_c) / std_c.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalization {
    /// Mean of each channel.
    pub mean: Vec<f64>,
    /// Standard deviation of each channel.
    pub std: Vec<f64>,
}

impl Normalization {
    /// The constants of the paper's code for `source` (pixels/255 first): CIFAR-10 (0.4914, 0.4822,
    /// 0.4465) / (0.2023, 0.1994, 0.2010), SVHN (0.4377, 0.4438, 0.4728) / (0.1980, 0.2010, 0.1970),
    /// Fashion-MNIST 0.2860 / 0.3530; `None` for synthetic data, which is generated standardised.
    pub fn paper_default(source: SourceKind) -> Option<Normalization> {
        let (mean, std) = match source {
            SourceKind::Cifar10 => (vec![0.4914, 0.4822, 0.4465], vec![0.2023, 0.1994, 0.2010]),
            SourceKind::Svhn => (vec![0.4377, 0.4438, 0.4728], vec![0.1980, 0.2010, 0.1970]),
            SourceKind::FashionMnist => (vec![0.2860], vec![0.3530]),
            SourceKind::Synthetic => return None,
        };
        Some(Normalization { mean, std })
    }

    /// Normalises `images` (CHW samples of `channels` planes of `plane` values) in place.
    fn apply(&self, images: &mut [f32], channels: usize, plane: usize) {
        for sample in images.chunks_exact_mut(channels * plane) {
            for (c, values) in sample.chunks_exact_mut(plane).enumerate() {
                let (mean, std) = (self.mean[c], self.std[c]);
                for v in values {
                    *v = ((f64::from(*v) - mean) / std) as f32;
                }
            }
        }
    }
}

/// The "easy" construction of figure 11 (classes pulled apart until separable). The paper's builder
/// is not public; ours adds to every image of class k the same offset o_k, a standard Gaussian
/// vector over all pixels (ChaCha8 seeded with `seed`, drawn for k = 0, 1, … in turn) rescaled to
/// Euclidean norm `norm`, after normalisation. A large norm makes the classes linearly separable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EasyOffset {
    /// Euclidean norm of every class offset (in normalised pixel units).
    pub norm: f64,
    /// Seed of the offset directions.
    #[serde(default)]
    pub seed: u64,
}

impl EasyOffset {
    /// The offsets o_0 … o_{classes−1}, each of `sample_len` values.
    pub fn offsets(&self, classes: usize, sample_len: usize) -> Vec<Vec<f64>> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        (0..classes)
            .map(|_| scaled_gaussian(&mut rng, sample_len, self.norm))
            .collect()
    }
}

impl DatasetSpec {
    /// A spec with the paper's defaults: whole split, seed 0, default normalisation, no filter.
    pub fn new(source: SourceKind, split: Split) -> Self {
        Self {
            source,
            split,
            n: None,
            seed: 0,
            normalize: Normalization::paper_default(source),
            classes: None,
            binary: false,
            easy: None,
            synthetic: (source == SourceKind::Synthetic).then(SyntheticSpec::default),
        }
    }

    /// The synthetic spec in force (the default one when absent).
    fn synthetic_or_default(&self) -> SyntheticSpec {
        self.synthetic.clone().unwrap_or_default()
    }

    /// The classes kept, in output order (`None`: all, unrelabelled).
    fn kept_classes(&self) -> Option<Vec<u8>> {
        match (&self.classes, self.binary) {
            (Some(c), _) => Some(c.clone()),
            (None, true) => Some(DEFAULT_BINARY_CLASSES.to_vec()),
            (None, false) => None,
        }
    }

    /// Checks the spec without reading data, naming the field at fault.
    pub fn validate(&self) -> Result<(), DataError> {
        match (&self.synthetic, self.source) {
            (Some(s), SourceKind::Synthetic) => s.validate()?,
            (None, SourceKind::Synthetic) => {}
            (Some(_), other) => {
                return Err(DataError::invalid(
                    "synthetic",
                    format!("only for source `synthetic`, not `{}`", other.name()),
                ))
            }
            (None, _) => {}
        }
        let synthetic = self.synthetic_or_default();
        let [channels, _, _] = self.source.image_shape(&synthetic);
        let num_classes = self.source.num_classes(&synthetic);
        if self.n == Some(0) {
            return Err(DataError::invalid("n", "must be at least 1"));
        }
        if let Some(norm) = &self.normalize {
            if norm.mean.len() != channels || norm.std.len() != channels {
                return Err(DataError::invalid(
                    "normalize",
                    format!(
                        "{} means and {} stds given, but {} images have {channels} channel(s)",
                        norm.mean.len(),
                        norm.std.len(),
                        self.source.name()
                    ),
                ));
            }
            if norm.mean.iter().any(|m| !m.is_finite()) {
                return Err(DataError::invalid("normalize.mean", "must be finite"));
            }
            if norm.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                return Err(DataError::invalid(
                    "normalize.std",
                    "must be finite and > 0",
                ));
            }
        }
        if let Some(classes) = &self.classes {
            if classes.is_empty() {
                return Err(DataError::invalid(
                    "classes",
                    "must list at least one class",
                ));
            }
            if let Some(c) = classes.iter().find(|&&c| usize::from(c) >= num_classes) {
                return Err(DataError::invalid(
                    "classes",
                    format!(
                        "class {c} outside 0..{num_classes} of {}",
                        self.source.name()
                    ),
                ));
            }
            let mut sorted = classes.clone();
            sorted.sort_unstable();
            if sorted.windows(2).any(|w| w[0] == w[1]) {
                return Err(DataError::invalid("classes", "lists a class twice"));
            }
        }
        if self.binary {
            if self.kept_classes().map(|c| c.len()) != Some(2) {
                return Err(DataError::invalid(
                    "classes",
                    "`binary` needs exactly two classes",
                ));
            }
            if self.n.is_some_and(|n| n % 2 == 1) {
                return Err(DataError::invalid(
                    "n",
                    "`binary` takes n/2 of each class: n must be even",
                ));
            }
        }
        if let Some(easy) = &self.easy {
            if !(easy.norm.is_finite() && easy.norm >= 0.0) {
                return Err(DataError::invalid("easy.norm", "must be finite and ≥ 0"));
            }
        }
        Ok(())
    }
}

/// A seeded uniform choice of `n` distinct indices out of `0..len` (n ≤ len), ascending.
pub fn subset(len: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut chosen = rand::seq::index::sample(&mut rng, len, n).into_vec();
    chosen.sort_unstable();
    chosen
}

/// Builds the dataset `spec` describes from the collection's files in `root` (unused for synthetic).
pub fn build(spec: &DatasetSpec, root: &Path) -> Result<Dataset, DataError> {
    spec.validate()?;
    let synthetic = spec.synthetic_or_default();
    let mut reader = source::open(spec.source, spec.split, root, &synthetic)?;
    let [channels, height, width] = reader.image_shape();
    let labels = reader.labels();
    let where_from = format!("the {} split of {}", spec.split.name(), spec.source.name());

    // Candidate rows (file order) with their output labels.
    let kept = spec.kept_classes();
    let (pool, pool_labels): (Vec<usize>, Vec<u8>) = match &kept {
        None => ((0..labels.len()).collect(), labels.to_vec()),
        Some(classes) => labels
            .iter()
            .enumerate()
            .filter_map(|(i, l)| classes.iter().position(|c| c == l).map(|k| (i, k as u8)))
            .unzip(),
    };
    let num_classes = kept
        .as_ref()
        .map_or(spec.source.num_classes(&synthetic), Vec::len);

    let chosen: Vec<usize> = if spec.binary {
        let per_class = spec.n.map(|n| n / 2);
        let mut taken = [0usize; 2];
        let mut chosen = Vec::new();
        for (k, &label) in pool_labels.iter().enumerate() {
            let slot = &mut taken[usize::from(label)];
            if per_class.is_none_or(|m| *slot < m) {
                *slot += 1;
                chosen.push(k);
            }
        }
        if let Some(m) = per_class {
            if let Some(short) = taken.iter().position(|&t| t < m) {
                return Err(DataError::invalid(
                    "n",
                    format!(
                        "needs {m} samples of class {} but {where_from} holds {}",
                        kept.as_ref()
                            .and_then(|c| c.get(short))
                            .copied()
                            .unwrap_or_default(),
                        taken[short]
                    ),
                ));
            }
        }
        chosen
    } else if let Some(n) = spec.n {
        if n > pool.len() {
            return Err(DataError::invalid(
                "n",
                format!(
                    "asks for {n} samples but {where_from} holds {} (after the class filter)",
                    pool.len()
                ),
            ));
        }
        subset(pool.len(), n, spec.seed)
    } else {
        (0..pool.len()).collect()
    };

    let rows: Vec<usize> = chosen.iter().map(|&k| pool[k]).collect();
    let out_labels: Vec<i64> = chosen.iter().map(|&k| i64::from(pool_labels[k])).collect();
    let mut images = reader.read_images(&rows)?;
    if let Some(norm) = &spec.normalize {
        norm.apply(&mut images, channels, height * width);
    }
    let sample_len = channels * height * width;
    if let Some(easy) = &spec.easy {
        let offsets = easy.offsets(num_classes, sample_len);
        for (image, &label) in images.chunks_exact_mut(sample_len).zip(&out_labels) {
            for (v, o) in image.iter_mut().zip(&offsets[label as usize]) {
                *v = (f64::from(*v) + o) as f32;
            }
        }
    }
    Ok(Dataset {
        images,
        shape: [rows.len(), channels, height, width],
        labels: out_labels,
        num_classes,
        encoding: if spec.binary {
            LabelEncoding::PlusMinusOne
        } else {
            LabelEncoding::OneHot
        },
        source_indices: rows.iter().map(|&r| r as i64).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::SplitReader;
    use crate::data::synthetic::SyntheticReader;

    fn synthetic_spec() -> SyntheticSpec {
        SyntheticSpec {
            train_size: 200,
            test_size: 50,
            height: 4,
            width: 4,
            ..Default::default()
        }
    }

    fn spec() -> DatasetSpec {
        DatasetSpec {
            synthetic: Some(synthetic_spec()),
            ..DatasetSpec::new(SourceKind::Synthetic, Split::Train)
        }
    }

    /// The raw split, read independently of `build`.
    fn raw() -> (Vec<u8>, Vec<f32>) {
        let mut reader = SyntheticReader::generate(&synthetic_spec(), Split::Train).unwrap();
        let all: Vec<usize> = (0..200).collect();
        (reader.labels().to_vec(), reader.read_images(&all).unwrap())
    }

    fn build_ok(spec: &DatasetSpec) -> Dataset {
        build(spec, Path::new("/nonexistent")).unwrap()
    }

    #[test]
    fn whole_split_is_the_raw_data() {
        let (labels, images) = raw();
        let d = build_ok(&spec());
        assert_eq!(d.shape, [200, 3, 4, 4]);
        assert_eq!(
            d.labels,
            labels.iter().map(|&l| i64::from(l)).collect::<Vec<_>>()
        );
        assert_eq!(d.images, images);
        assert_eq!(d.source_indices, (0..200).collect::<Vec<i64>>());
        assert_eq!((d.num_classes, d.encoding), (10, LabelEncoding::OneHot));
    }

    #[test]
    fn subset_is_deterministic_distinct_and_consistent() {
        let (labels, images) = raw();
        let s = DatasetSpec {
            n: Some(37),
            seed: 5,
            ..spec()
        };
        let a = build_ok(&s);
        assert_eq!(a, build_ok(&s));
        let idx: Vec<usize> = a.source_indices.iter().map(|&i| i as usize).collect();
        assert_eq!(idx.len(), 37);
        assert!(
            idx.windows(2).all(|w| w[0] < w[1]),
            "distinct and ascending: {idx:?}"
        );
        assert!(idx.iter().all(|&i| i < 200));
        let d = 48;
        for (row, &i) in idx.iter().enumerate() {
            assert_eq!(a.labels[row], i64::from(labels[i]));
            assert_eq!(a.images[row * d..(row + 1) * d], images[i * d..(i + 1) * d]);
        }
        let b = build_ok(&DatasetSpec {
            seed: 6,
            ..s.clone()
        });
        assert_ne!(a.source_indices, b.source_indices);
        let err = build(&DatasetSpec { n: Some(201), ..s }, Path::new("")).unwrap_err();
        assert!(
            err.to_string()
                .contains("asks for 201 samples but the train split of synthetic holds 200"),
            "{err}"
        );
    }

    #[test]
    fn subset_is_uniform() {
        // Every index of 0..40 is chosen with probability 10/40; over 4000 seeds each count is
        // Binomial(4000, 1/4): mean 1000, sd 27.4. Allow 5 sd.
        let mut counts = [0u32; 40];
        for seed in 0..4000 {
            for i in subset(40, 10, seed) {
                counts[i] += 1;
            }
        }
        for (i, &c) in counts.iter().enumerate() {
            assert!((863..=1137).contains(&c), "index {i} chosen {c} times");
        }
    }

    #[test]
    fn class_filter_relabels_in_the_given_order() {
        let (labels, _) = raw();
        let d = build_ok(&DatasetSpec {
            classes: Some(vec![7, 2, 4]),
            ..spec()
        });
        assert_eq!(d.num_classes, 3);
        let expect: Vec<i64> = (0..200)
            .filter(|&i| [7, 2, 4].contains(&labels[i]))
            .map(|i| i as i64)
            .collect();
        assert_eq!(d.source_indices, expect);
        for (&i, &l) in d.source_indices.iter().zip(&d.labels) {
            assert_eq!([7u8, 2, 4][l as usize], labels[i as usize]);
        }
        // With a subset: n of the filtered pool.
        let d = build_ok(&DatasetSpec {
            classes: Some(vec![7, 2, 4]),
            n: Some(10),
            ..spec()
        });
        assert_eq!(d.len(), 10);
        assert!(d
            .source_indices
            .iter()
            .all(|&i| [7, 2, 4].contains(&labels[i as usize])));
    }

    #[test]
    fn binary_takes_the_first_half_n_of_each_class_in_file_order() {
        let (labels, _) = raw();
        let d = build_ok(&DatasetSpec {
            binary: true,
            n: Some(8),
            ..spec()
        });
        // Brute force: first 4 of class 1 and of class 9 in file order, merged in file order.
        let first = |c: u8| {
            (0..200)
                .filter(|&i| labels[i] == c)
                .take(4)
                .collect::<Vec<_>>()
        };
        let mut expect: Vec<i64> = [first(1), first(9)]
            .concat()
            .iter()
            .map(|&i| i as i64)
            .collect();
        expect.sort_unstable();
        assert_eq!(d.source_indices, expect);
        for (&i, &l) in d.source_indices.iter().zip(&d.labels) {
            assert_eq!(l, if labels[i as usize] == 1 { 0 } else { 1 });
        }
        assert_eq!(
            (d.num_classes, d.encoding),
            (2, LabelEncoding::PlusMinusOne)
        );
        // Explicit classes, all samples.
        let d = build_ok(&DatasetSpec {
            binary: true,
            classes: Some(vec![3, 0]),
            ..spec()
        });
        assert_eq!(d.len(), 40);
        let err = build(
            &DatasetSpec {
                binary: true,
                n: Some(42),
                ..spec()
            },
            Path::new(""),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("needs 21 samples of class 1"),
            "{err}"
        );
    }

    #[test]
    fn normalisation_is_per_channel() {
        let (_, images) = raw();
        let norm = Normalization {
            mean: vec![0.5, -1.0, 2.0],
            std: vec![2.0, 0.25, 1.0],
        };
        let d = build_ok(&DatasetSpec {
            normalize: Some(norm),
            ..spec()
        });
        for (k, (&got, &x)) in d.images.iter().zip(&images).enumerate() {
            let c = (k / 16) % 3;
            let want = (f64::from(x) - [0.5, -1.0, 2.0][c]) / [2.0, 0.25, 1.0][c];
            assert!(
                (f64::from(got) - want).abs() <= 1e-6 * want.abs().max(1.0),
                "value {k}"
            );
        }
    }

    #[test]
    fn paper_normalisation_constants() {
        // paper-conventions.md, "Data".
        let cifar = Normalization::paper_default(SourceKind::Cifar10).unwrap();
        assert_eq!(cifar.mean, [0.4914, 0.4822, 0.4465]);
        assert_eq!(cifar.std, [0.2023, 0.1994, 0.2010]);
        let svhn = Normalization::paper_default(SourceKind::Svhn).unwrap();
        assert_eq!(svhn.mean, [0.4377, 0.4438, 0.4728]);
        assert_eq!(svhn.std, [0.1980, 0.2010, 0.1970]);
        let fmnist = Normalization::paper_default(SourceKind::FashionMnist).unwrap();
        assert_eq!((fmnist.mean, fmnist.std), (vec![0.2860], vec![0.3530]));
        assert_eq!(Normalization::paper_default(SourceKind::Synthetic), None);
    }

    #[test]
    fn easy_offsets_are_class_specific_with_the_given_norm() {
        let base = build_ok(&spec());
        let easy = EasyOffset {
            norm: 30.0,
            seed: 1,
        };
        let d = build_ok(&DatasetSpec {
            easy: Some(easy.clone()),
            ..spec()
        });
        let dim = base.sample_len();
        let mut per_class: Vec<Option<Vec<f64>>> = vec![None; 10];
        for row in 0..d.len() {
            let diff: Vec<f64> = (row * dim..(row + 1) * dim)
                .map(|k| f64::from(d.images[k]) - f64::from(base.images[k]))
                .collect();
            let norm = diff.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((norm - 30.0).abs() < 1e-4, "row {row}: offset norm {norm}");
            let class = &mut per_class[d.labels[row] as usize];
            match class {
                None => *class = Some(diff),
                Some(first) => assert!(first.iter().zip(&diff).all(|(a, b)| (a - b).abs() < 1e-5)),
            }
        }
        // Large offsets separate the classes: the nearest offset is the sample's own class.
        let offsets = easy.offsets(10, dim);
        for row in 0..d.len() {
            let x = &d.images[row * dim..(row + 1) * dim];
            let score = |o: &Vec<f64>| o.iter().zip(x).map(|(a, &b)| a * f64::from(b)).sum::<f64>();
            let best = (0..10)
                .max_by(|&a, &b| score(&offsets[a]).total_cmp(&score(&offsets[b])))
                .unwrap();
            assert_eq!(best as i64, d.labels[row]);
        }
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let cases: Vec<(DatasetSpec, &str, &str)> = vec![
            (
                DatasetSpec {
                    classes: Some(vec![10]),
                    ..spec()
                },
                "classes",
                "class 10 outside 0..10",
            ),
            (
                DatasetSpec {
                    classes: Some(vec![1, 1]),
                    ..spec()
                },
                "classes",
                "twice",
            ),
            (
                DatasetSpec {
                    classes: Some(vec![]),
                    ..spec()
                },
                "classes",
                "at least one",
            ),
            (
                DatasetSpec {
                    binary: true,
                    classes: Some(vec![1, 2, 3]),
                    ..spec()
                },
                "classes",
                "exactly two",
            ),
            (
                DatasetSpec {
                    binary: true,
                    n: Some(7),
                    ..spec()
                },
                "n",
                "even",
            ),
            (
                DatasetSpec {
                    n: Some(0),
                    ..spec()
                },
                "n",
                "at least 1",
            ),
            (
                DatasetSpec {
                    normalize: Some(Normalization {
                        mean: vec![0.0],
                        std: vec![1.0],
                    }),
                    ..spec()
                },
                "normalize",
                "3 channel(s)",
            ),
            (
                DatasetSpec {
                    normalize: Some(Normalization {
                        mean: vec![0.0; 3],
                        std: vec![1.0, 0.0, 1.0],
                    }),
                    ..spec()
                },
                "normalize.std",
                "> 0",
            ),
            (
                DatasetSpec {
                    synthetic: Some(synthetic_spec()),
                    ..DatasetSpec::new(SourceKind::Cifar10, Split::Train)
                },
                "synthetic",
                "only for source `synthetic`",
            ),
            (
                DatasetSpec {
                    synthetic: Some(SyntheticSpec {
                        num_classes: 1,
                        ..synthetic_spec()
                    }),
                    ..spec()
                },
                "synthetic.num_classes",
                "between 2 and 256",
            ),
            (
                DatasetSpec {
                    easy: Some(EasyOffset {
                        norm: f64::NAN,
                        seed: 0,
                    }),
                    ..spec()
                },
                "easy.norm",
                "finite",
            ),
        ];
        for (s, field, text) in cases {
            match s.validate() {
                Err(DataError::Invalid { field: f, message }) => {
                    assert_eq!(f, field, "{message}");
                    assert!(message.contains(text), "{field}: {message}");
                }
                other => panic!("{field}: expected an Invalid error, got {other:?}"),
            }
        }
    }
}
