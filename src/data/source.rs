//! Which collection and split to read, where its files live, and [`SplitReader`], the interface every
//! loader implements: all labels up front (they are small), images only for the rows asked for (a
//! CIFAR-10 batch is 30 MB, so a subset of 1,000 images reads 3 MB).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{cifar, fmnist, svhn, synthetic, DataError, SyntheticSpec};

/// A collection of images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// CIFAR-10, binary version (`data_batch_{1..5}.bin`, `test_batch.bin`).
    Cifar10,
    /// Fashion-MNIST, the official IDX `.gz` files.
    FashionMnist,
    /// SVHN cropped digits, the official MATLAB v5 files `train_32x32.mat`, `test_32x32.mat`.
    Svhn,
    /// Seeded Gaussian class clusters generated in memory (see [`synthetic`]).
    Synthetic,
}

impl SourceKind {
    /// The name used in params and file metadata (`cifar10`, `fashion-mnist`, `svhn`, `synthetic`).
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Cifar10 => "cifar10",
            SourceKind::FashionMnist => "fashion-mnist",
            SourceKind::Svhn => "svhn",
            SourceKind::Synthetic => "synthetic",
        }
    }

    /// The folder holding this collection's files under a data directory such as `$EOSS_DATA`.
    pub fn dir_name(self) -> &'static str {
        self.name()
    }

    /// (C, H, W) of one image; synthetic images take theirs from `synthetic`.
    pub fn image_shape(self, synthetic: &SyntheticSpec) -> [usize; 3] {
        match self {
            SourceKind::Cifar10 | SourceKind::Svhn => [3, 32, 32],
            SourceKind::FashionMnist => [1, 28, 28],
            SourceKind::Synthetic => [synthetic.channels, synthetic.height, synthetic.width],
        }
    }

    /// Number of classes in the collection.
    pub fn num_classes(self, synthetic: &SyntheticSpec) -> usize {
        match self {
            SourceKind::Cifar10 | SourceKind::FashionMnist | SourceKind::Svhn => 10,
            SourceKind::Synthetic => synthetic.num_classes,
        }
    }

    /// The files of `split` inside the collection's folder, in reading order (none for synthetic).
    pub fn file_names(self, split: Split) -> &'static [&'static str] {
        match self {
            SourceKind::Cifar10 => cifar::file_names(split),
            SourceKind::FashionMnist => fmnist::file_names(split),
            SourceKind::Svhn => svhn::file_names(split),
            SourceKind::Synthetic => &[],
        }
    }

    /// The folder the collection is read from when no `root` is given: `$EOSS_DATA/<dir>` when
    /// `eoss_data` (the variable's value) is set, else `../shared/data/<dir>` relative to the working
    /// directory.
    pub fn default_root(self, eoss_data: Option<&Path>) -> PathBuf {
        match eoss_data {
            Some(base) => base.join(self.dir_name()),
            None => Path::new("..")
                .join("shared")
                .join("data")
                .join(self.dir_name()),
        }
    }

    /// The paths of `split`'s files under `root`, or a [`DataError::Missing`] for the first absent one
    /// (naming what it should hold and where to download it).
    pub fn existing_files(self, split: Split, root: &Path) -> Result<Vec<PathBuf>, DataError> {
        self.file_names(split)
            .iter()
            .map(|name| {
                let file = root.join(name);
                if file.is_file() {
                    Ok(file)
                } else {
                    Err(self.missing(file))
                }
            })
            .collect()
    }

    /// The error for an absent file of this collection.
    pub(crate) fn missing(self, file: PathBuf) -> DataError {
        let (expected, url) = match self {
            SourceKind::Cifar10 => (cifar::EXPECTED, cifar::URL),
            SourceKind::FashionMnist => (fmnist::EXPECTED, fmnist::URL),
            SourceKind::Svhn => (svhn::EXPECTED, svhn::URL),
            SourceKind::Synthetic => ("nothing (synthetic data has no files)", "nowhere"),
        };
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        DataError::Missing {
            file,
            expected: expected.to_string(),
            url,
            dir,
        }
    }
}

/// Which part of a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The training split.
    #[default]
    Train,
    /// The test split.
    Test,
}

impl Split {
    /// `train` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// One opened split of a collection.
pub trait SplitReader {
    /// (C, H, W) of one image.
    fn image_shape(&self) -> [usize; 3];
    /// The label of every sample, in file order.
    fn labels(&self) -> &[u8];
    /// The images of `rows` (indices into the split, any order) in CHW order, concatenated.
    /// Pixels of the real collections are scaled to [0, 1] (byte / 255); synthetic values are raw.
    fn read_images(&mut self, rows: &[usize]) -> Result<Vec<f32>, DataError>;
}

/// Opens `split` of `kind` from the folder `root` (ignored for synthetic data, which takes its shape
/// from `synthetic`).
pub fn open(
    kind: SourceKind,
    split: Split,
    root: &Path,
    synthetic: &SyntheticSpec,
) -> Result<Box<dyn SplitReader>, DataError> {
    Ok(match kind {
        SourceKind::Cifar10 => Box::new(cifar::Cifar10Reader::open(root, split)?),
        SourceKind::FashionMnist => Box::new(fmnist::FashionMnistReader::open(root, split)?),
        SourceKind::Svhn => Box::new(svhn::SvhnReader::open(root, split)?),
        SourceKind::Synthetic => Box::new(synthetic::SyntheticReader::generate(synthetic, split)?),
    })
}

/// Checks that every row is below `len`, naming the file at fault otherwise.
pub(crate) fn check_rows(rows: &[usize], len: usize, file: &Path) -> Result<(), DataError> {
    match rows.iter().find(|&&r| r >= len) {
        Some(r) => Err(DataError::invalid(
            "rows",
            format!(
                "row {r} of {} requested but it holds {len} samples",
                file.display()
            ),
        )),
        None => Ok(()),
    }
}
