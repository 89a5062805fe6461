//! Datasets: loaders for the official files of CIFAR-10, Fashion-MNIST and SVHN, a seeded synthetic
//! source, subsetting, normalisation, class filters, and the one `Dataset` type they all produce.
//!
//! The flow is [`source`] (open one split of one collection: labels up front, images on demand) →
//! [`mod@build`] (class filter, seeded subset or the ±1 two-class variant, normalisation, the "easy"
//! offset) → [`Dataset`], which [`Dataset::save`] writes as safetensors and [`Dataset::load`] reads
//! back. This module knows nothing of pipelines; the `dataset` stage kind drives it.

pub mod build;
pub mod cifar;
pub mod fetch;
pub mod fmnist;
mod safetensors_file;
pub mod source;
pub mod svhn;
pub mod synthetic;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

pub use build::{build, DatasetSpec, EasyOffset, Normalization};
pub use source::{SourceKind, Split};
pub use synthetic::SyntheticSpec;

/// How labels become training targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelEncoding {
    /// `num_classes` outputs; MSE targets are one-hot 0/1, cross-entropy uses the class index.
    OneHot,
    /// Two classes mapped to one output with targets -1 (label 0) and +1 (label 1).
    PlusMinusOne,
}

impl LabelEncoding {
    /// The name written in files (`one_hot`, `plus_minus_one`).
    pub fn as_str(self) -> &'static str {
        match self {
            LabelEncoding::OneHot => "one_hot",
            LabelEncoding::PlusMinusOne => "plus_minus_one",
        }
    }

    /// Parses [`LabelEncoding::as_str`]'s names.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "one_hot" => Some(LabelEncoding::OneHot),
            "plus_minus_one" => Some(LabelEncoding::PlusMinusOne),
            _ => None,
        }
    }
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

/// Why a dataset could not be read, built or written. Every variant names the file or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A data file is absent.
    #[error(
        "{}: not found; expected {expected}. Get it from {url} and put it in {} (`eoss fetch` \
         does both, checking the published MD5s), or point the `root` param or the EOSS_DATA variable \
         at the folder holding it",
        file.display(),
        dir.display()
    )]
    Missing {
        /// The file looked for.
        file: PathBuf,
        /// What the file should contain.
        expected: String,
        /// Where to download it.
        url: &'static str,
        /// The folder it belongs in.
        dir: PathBuf,
    },
    /// A data file exists but does not hold what it should.
    #[error("{}: {message}", file.display())]
    Malformed {
        /// The file at fault.
        file: PathBuf,
        /// What is wrong, and what was expected.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file at fault.
        file: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A request that the data cannot satisfy (e.g. more samples than the split holds).
    #[error("{field}: {message}")]
    Invalid {
        /// The parameter at fault (e.g. `n`, `classes`).
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl DataError {
    /// Wraps an I/O error with the file it concerns.
    pub fn io(file: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            file: file.into(),
            source,
        }
    }

    /// A malformed-file error.
    pub fn malformed(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError::Malformed {
            file: file.into(),
            message: message.into(),
        }
    }

    /// An invalid-request error about `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        DataError::Invalid {
            field,
            message: message.into(),
        }
    }
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.shape[0]
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }

    /// Values per sample (C·H·W).
    pub fn sample_len(&self) -> usize {
        self.shape[1] * self.shape[2] * self.shape[3]
    }

    /// The images of `rows` (in that order) as an (rows.len(), C, H, W) f32 tensor on `device`.
    pub fn images_tensor(&self, rows: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let d = self.sample_len();
        let mut values = Vec::with_capacity(rows.len() * d);
        for &row in rows {
            if row >= self.len() {
                return Err(candle_core::Error::Msg(format!(
                    "dataset row {row} out of range: the dataset has {} samples",
                    self.len()
                )));
            }
            values.extend_from_slice(&self.images[row * d..(row + 1) * d]);
        }
        Tensor::from_vec(
            values,
            (rows.len(), self.shape[1], self.shape[2], self.shape[3]),
            device,
        )
    }

    /// Writes the dataset as safetensors: tensors `images` (N,C,H,W f32), `labels` (N i64),
    /// `source_indices` (N i64), metadata `num_classes`, `encoding` and `source` (the collection's
    /// name). The bytes depend only on the contents.
    pub fn save(&self, path: impl AsRef<Path>, source: &str) -> Result<(), DataError> {
        safetensors_file::save(self, path.as_ref(), source)
    }

    /// Reads a file written by [`Dataset::save`], checking shapes, dtypes and labels.
    pub fn load(path: impl AsRef<Path>) -> Result<Dataset, DataError> {
        safetensors_file::load(path.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small dataset with awkward values (negative zero, subnormal, NaN payload) to test bit-exactness.
    fn sample() -> Dataset {
        let mut images: Vec<f32> = (0..2 * 3 * 2 * 2).map(|i| (i as f32 - 7.5) / 3.0).collect();
        images[0] = -0.0;
        images[1] = f32::from_bits(1); // smallest subnormal
        images[2] = f32::from_bits(0x7fc0_1234); // NaN with a payload
        Dataset {
            images,
            shape: [2, 3, 2, 2],
            labels: vec![4, 0],
            num_classes: 5,
            encoding: LabelEncoding::OneHot,
            source_indices: vec![49_999, 3],
        }
    }

    fn bits(d: &Dataset) -> Vec<u32> {
        d.images.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn save_load_round_trip_is_bit_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.safetensors");
        let data = sample();
        data.save(&path, "cifar10").unwrap();
        let back = Dataset::load(&path).unwrap();
        assert_eq!(bits(&back), bits(&data));
        assert_eq!(back.shape, data.shape);
        assert_eq!(back.labels, data.labels);
        assert_eq!(back.source_indices, data.source_indices);
        assert_eq!(back.num_classes, 5);
        assert_eq!(back.encoding, LabelEncoding::OneHot);
    }

    #[test]
    fn saved_bytes_do_not_depend_on_hash_map_order() {
        // Each HashMap gets fresh random keys, so unsorted metadata would differ between saves.
        let dir = tempfile::tempdir().unwrap();
        let data = sample();
        let first = dir.path().join("0.safetensors");
        data.save(&first, "svhn").unwrap();
        let expected = std::fs::read(&first).unwrap();
        for i in 1..16 {
            let path = dir.path().join(format!("{i}.safetensors"));
            data.save(&path, "svhn").unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), expected, "save {i} differs");
        }
        // The header, read by hand: length prefix, then JSON with sorted keys, padded to 8 bytes.
        let n = u64::from_le_bytes(expected[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header = std::str::from_utf8(&expected[8..8 + n]).unwrap();
        assert!(
            header.starts_with(
                r#"{"__metadata__":{"encoding":"one_hot","num_classes":"5","source":"svhn"},"images":"#
            ),
            "{header}"
        );
        // Data: images (2·3·2·2 f32), labels and source_indices (2 i64 each) at their offsets.
        assert_eq!(expected.len(), 8 + n + 24 * 4 + 2 * 8 + 2 * 8);
        let json: serde_json::Value = serde_json::from_str(header.trim_end()).unwrap();
        let start = json["images"]["data_offsets"][0].as_u64().unwrap() as usize;
        assert_eq!(
            &expected[8 + n + start..8 + n + start + 4],
            &(-0.0f32).to_le_bytes()
        );
        let start = json["source_indices"]["data_offsets"][0].as_u64().unwrap() as usize;
        assert_eq!(
            &expected[8 + n + start..8 + n + start + 8],
            &49_999i64.to_le_bytes()
        );
    }

    #[test]
    fn saved_file_is_readable_by_candle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.safetensors");
        let data = sample();
        data.save(&path, "synthetic").unwrap();
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let images = tensors["images"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            images.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            bits(&data)
        );
        assert_eq!(tensors["labels"].to_vec1::<i64>().unwrap(), data.labels);
        assert_eq!(
            tensors["source_indices"].to_vec1::<i64>().unwrap(),
            data.source_indices
        );
    }

    #[test]
    fn load_names_the_file_and_the_fault() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.safetensors");
        std::fs::write(&garbage, b"not a safetensors file at all").unwrap();
        let msg = Dataset::load(&garbage).unwrap_err().to_string();
        assert!(
            msg.contains("garbage.safetensors") && msg.contains("not a safetensors"),
            "{msg}"
        );

        // A file without our metadata.
        let foreign = dir.path().join("foreign.safetensors");
        let t = candle_core::Tensor::zeros((2, 1, 1, 1), candle_core::DType::F32, &Device::Cpu)
            .unwrap();
        candle_core::safetensors::save(&std::collections::HashMap::from([("images", t)]), &foreign)
            .unwrap();
        let msg = Dataset::load(&foreign).unwrap_err().to_string();
        assert!(
            msg.contains("foreign.safetensors") && msg.contains("num_classes"),
            "{msg}"
        );

        // A label outside the declared classes.
        let mut data = sample();
        data.labels[1] = 5;
        let bad = dir.path().join("bad.safetensors");
        data.save(&bad, "cifar10").unwrap();
        let msg = Dataset::load(&bad).unwrap_err().to_string();
        assert!(msg.contains("label 5 outside 0..5"), "{msg}");

        let missing = Dataset::load(dir.path().join("absent.safetensors")).unwrap_err();
        assert!(matches!(missing, DataError::Io { .. }), "{missing}");
    }

    #[test]
    fn images_tensor_gathers_rows() {
        let data = sample();
        let t = data.images_tensor(&[1, 0, 1], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 3, 2, 2]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d = data.sample_len();
        let expect: Vec<u32> = [1, 0, 1]
            .iter()
            .flat_map(|&r| data.images[r * d..(r + 1) * d].iter().map(|x| x.to_bits()))
            .collect();
        assert_eq!(v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), expect);
        let err = data
            .images_tensor(&[2], &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 2 out of range"), "{err}");
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Helpers shared by the loaders' tests.
    use std::path::PathBuf;

    /// `../shared/data/<name>` next to the crate, or `None` (with a note on stderr) when absent, so
    /// tests on the real files skip on machines without them.
    pub(crate) fn real_data_dir(name: &str) -> Option<PathBuf> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data")
            .join(name);
        if dir.is_dir() {
            Some(dir)
        } else {
            eprintln!("skipped: {} absent", dir.display());
            None
        }
    }

    /// How many of `labels` fall in each of 10 classes.
    pub(crate) fn histogram(labels: &[u8]) -> [usize; 10] {
        let mut h = [0; 10];
        labels.iter().for_each(|&l| h[usize::from(l)] += 1);
        h
    }
}
