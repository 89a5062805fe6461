//! CIFAR-10, binary version: `data_batch_1.bin` … `data_batch_5.bin` (train, 50,000 images) and
//! `test_batch.bin` (test, 10,000). Each record is one label byte (0–9) and 3,072 pixel bytes: the
//! 32×32 red plane, then green, then blue, each row-major, which is already CHW. No header.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::source::{check_rows, SourceKind, Split, SplitReader};
use super::DataError;

/// Where the official files come from (unpack `cifar-10-batches-bin/`).
pub const URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// What each file must hold.
pub const EXPECTED: &str = "a CIFAR-10 binary batch (10000 records of 3073 bytes: a label byte, \
                            then 1024 red, 1024 green and 1024 blue pixel bytes), as unpacked from \
                            cifar-10-binary.tar.gz";

const PIXELS: usize = 3 * 32 * 32;
const RECORD_BYTES: usize = 1 + PIXELS;
const RECORDS_PER_FILE: usize = 10_000;
const NUM_CLASSES: u8 = 10;

/// The batch files of a split, in record order.
pub fn file_names(split: Split) -> &'static [&'static str] {
    match split {
        Split::Train => &[
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
            "data_batch_5.bin",
        ],
        Split::Test => &["test_batch.bin"],
    }
}

/// An opened CIFAR-10 split: labels read, files kept open for the images.
pub struct Cifar10Reader {
    files: Vec<(PathBuf, File)>,
    labels: Vec<u8>,
}

impl Cifar10Reader {
    /// Opens the batches of `split` in `root`, checks their sizes and reads every label byte.
    pub fn open(root: &Path, split: Split) -> Result<Self, DataError> {
        let mut files = Vec::new();
        let mut labels = Vec::with_capacity(file_names(split).len() * RECORDS_PER_FILE);
        for path in SourceKind::Cifar10.existing_files(split, root)? {
            let mut file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
            let len = file.metadata().map_err(|e| DataError::io(&path, e))?.len();
            if len != (RECORDS_PER_FILE * RECORD_BYTES) as u64 {
                return Err(DataError::malformed(
                    &path,
                    format!(
                        "{len} bytes, expected {} ({RECORDS_PER_FILE} records of {RECORD_BYTES} \
                         bytes); get the binary version from {URL}",
                        RECORDS_PER_FILE * RECORD_BYTES
                    ),
                ));
            }
            for record in 0..RECORDS_PER_FILE {
                let mut label = [0u8];
                read_at(&mut file, &path, (record * RECORD_BYTES) as u64, &mut label)?;
                if label[0] >= NUM_CLASSES {
                    return Err(DataError::malformed(
                        &path,
                        format!("record {record}: label {} outside 0..=9", label[0]),
                    ));
                }
                labels.push(label[0]);
            }
            files.push((path, file));
        }
        Ok(Self { files, labels })
    }
}

fn read_at(file: &mut File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<(), DataError> {
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(buf))
        .map_err(|e| DataError::io(path, e))
}

impl SplitReader for Cifar10Reader {
    fn image_shape(&self) -> [usize; 3] {
        [3, 32, 32]
    }

    fn labels(&self) -> &[u8] {
        &self.labels
    }

    fn read_images(&mut self, rows: &[usize]) -> Result<Vec<f32>, DataError> {
        if let Some((first, _)) = self.files.first() {
            check_rows(rows, self.labels.len(), first)?;
        }
        let mut out = Vec::with_capacity(rows.len() * PIXELS);
        let mut pixels = [0u8; PIXELS];
        for &row in rows {
            let (path, file) = &mut self.files[row / RECORDS_PER_FILE];
            let offset = ((row % RECORDS_PER_FILE) * RECORD_BYTES + 1) as u64;
            read_at(file, path, offset, &mut pixels)?;
            out.extend(pixels.iter().map(|&p| f32::from(p) / 255.0));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_support::{histogram, real_data_dir};

    #[test]
    fn train_labels_match_the_readme() {
        let Some(root) = real_data_dir("cifar10") else {
            return;
        };
        let reader = Cifar10Reader::open(&root, Split::Train).unwrap();
        assert_eq!(reader.labels().len(), 50_000);
        assert_eq!(histogram(reader.labels()), [5000; 10]);
        // README: batch 1 counts, as in the original.
        assert_eq!(
            histogram(&reader.labels()[..10_000]),
            [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]
        );
    }

    #[test]
    fn test_split_pixel_statistics_match_the_readme() {
        let Some(root) = real_data_dir("cifar10") else {
            return;
        };
        let mut reader = Cifar10Reader::open(&root, Split::Test).unwrap();
        assert_eq!(histogram(reader.labels()), [1000; 10]);
        let rows: Vec<usize> = (0..10_000).collect();
        let images = reader.read_images(&rows).unwrap();
        // README: test mean (0.4942, 0.4851, 0.4504), std (0.2467, 0.2429, 0.2616), pixels/255.
        let (mean, std) = ([0.4942, 0.4851, 0.4504], [0.2467, 0.2429, 0.2616]);
        for c in 0..3 {
            let (mut s, mut s2) = (0f64, 0f64);
            for image in images.chunks_exact(PIXELS) {
                for &v in &image[c * 1024..(c + 1) * 1024] {
                    s += f64::from(v);
                    s2 += f64::from(v) * f64::from(v);
                }
            }
            let count = 10_000.0 * 1024.0;
            let m = s / count;
            let sd = (s2 / count - m * m).sqrt();
            assert!((m - mean[c]).abs() < 5e-5, "channel {c}: mean {m}");
            assert!((sd - std[c]).abs() < 5e-5, "channel {c}: std {sd}");
        }
    }

    #[test]
    fn images_are_the_record_bytes_in_any_row_order() {
        let Some(root) = real_data_dir("cifar10") else {
            return;
        };
        let mut reader = Cifar10Reader::open(&root, Split::Train).unwrap();
        let rows = [49_999, 0, 12_345, 0];
        let images = reader.read_images(&rows).unwrap();
        for (k, &row) in rows.iter().enumerate() {
            // Independent read: the whole batch file, record row % 10000, bytes after the label.
            let file = root.join(format!("data_batch_{}.bin", row / 10_000 + 1));
            let bytes = std::fs::read(file).unwrap();
            let start = (row % 10_000) * RECORD_BYTES;
            assert_eq!(bytes[start], reader.labels()[row]);
            let expect: Vec<f32> = bytes[start + 1..start + RECORD_BYTES]
                .iter()
                .map(|&b| f32::from(b) / 255.0)
                .collect();
            assert_eq!(
                images[k * PIXELS..(k + 1) * PIXELS],
                expect[..],
                "row {row}"
            );
        }
    }

    #[test]
    fn missing_and_malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Cifar10Reader::open(dir.path(), Split::Test).err().unwrap();
        let msg = err.to_string();
        assert!(matches!(err, DataError::Missing { .. }), "{msg}");
        assert!(msg.contains("test_batch.bin") && msg.contains(URL), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");

        std::fs::write(dir.path().join("test_batch.bin"), vec![0u8; 3073 * 3]).unwrap();
        let msg = Cifar10Reader::open(dir.path(), Split::Test)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("test_batch.bin: 9219 bytes, expected 30730000"),
            "{msg}"
        );

        let mut records = vec![0u8; RECORDS_PER_FILE * RECORD_BYTES];
        records[5 * RECORD_BYTES] = 10;
        std::fs::write(dir.path().join("test_batch.bin"), records).unwrap();
        let msg = Cifar10Reader::open(dir.path(), Split::Test)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("record 5: label 10 outside 0..=9"), "{msg}");
    }
}
