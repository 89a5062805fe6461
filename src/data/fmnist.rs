//! Fashion-MNIST: the official IDX files, gzip-compressed (`train-images-idx3-ubyte.gz`,
//! `train-labels-idx1-ubyte.gz`, `t10k-…` for test). IDX is big-endian: a magic number (0x0803 for
//! 3-D u8 images, 0x0801 for 1-D u8 labels), the dimensions as u32, then the bytes row-major.
//! Images are decompressed as a stream and only up to the last row asked for.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use super::source::{check_rows, SourceKind, Split, SplitReader};
use super::DataError;

/// Where the official files come from.
pub const URL: &str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/";
/// What the files must hold.
pub const EXPECTED: &str = "a gzip-compressed Fashion-MNIST IDX file (images: magic 0x00000803, \
                            N×28×28 bytes; labels: magic 0x00000801, N bytes)";

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;
const SIDE: usize = 28;
const PIXELS: usize = SIDE * SIDE;
const NUM_CLASSES: u8 = 10;

/// The files of a split: images, then labels.
pub fn file_names(split: Split) -> &'static [&'static str] {
    match split {
        Split::Train => &["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"],
        Split::Test => &["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"],
    }
}

/// An opened Fashion-MNIST split: labels read, images decompressed on demand.
pub struct FashionMnistReader {
    images_path: PathBuf,
    labels: Vec<u8>,
}

fn gz_reader(path: &Path) -> Result<MultiGzDecoder<BufReader<File>>, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    Ok(MultiGzDecoder::new(BufReader::new(file)))
}

/// Reads from a decompressing stream; a short or corrupt stream names the file and what was read.
fn read_exact(
    reader: &mut impl Read,
    buf: &mut [u8],
    path: &Path,
    what: &str,
) -> Result<(), DataError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            DataError::malformed(path, format!("ends inside {what}; expected {EXPECTED}"))
        }
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => DataError::malformed(
            path,
            format!("not valid gzip data ({e}) while reading {what}; expected {EXPECTED}"),
        ),
        _ => DataError::io(path, e),
    })
}

/// Reads an IDX header with `dims` dimensions and checks its magic number.
fn read_header(
    reader: &mut impl Read,
    path: &Path,
    magic: u32,
    dims: usize,
) -> Result<Vec<usize>, DataError> {
    let mut word = [0u8; 4];
    read_exact(reader, &mut word, path, "the IDX header")?;
    let found = u32::from_be_bytes(word);
    if found != magic {
        return Err(DataError::malformed(
            path,
            format!("IDX magic number {found:#010x}, expected {magic:#010x}; expected {EXPECTED}"),
        ));
    }
    (0..dims)
        .map(|_| {
            read_exact(reader, &mut word, path, "the IDX header")?;
            Ok(u32::from_be_bytes(word) as usize)
        })
        .collect()
}

impl FashionMnistReader {
    /// Opens `split` in `root`: reads all labels and checks the image file's header against them.
    pub fn open(root: &Path, split: Split) -> Result<Self, DataError> {
        let files = SourceKind::FashionMnist.existing_files(split, root)?;
        let (images_path, labels_path) = (files[0].clone(), files[1].clone());

        let mut reader = gz_reader(&labels_path)?;
        let count = read_header(&mut reader, &labels_path, LABELS_MAGIC, 1)?[0];
        let mut labels = vec![0u8; count];
        read_exact(&mut reader, &mut labels, &labels_path, "the labels")?;
        if let Some(i) = labels.iter().position(|&l| l >= NUM_CLASSES) {
            return Err(DataError::malformed(
                &labels_path,
                format!("label {} of item {i} outside 0..=9", labels[i]),
            ));
        }

        let mut reader = gz_reader(&images_path)?;
        let dims = read_header(&mut reader, &images_path, IMAGES_MAGIC, 3)?;
        if dims != [count, SIDE, SIDE] {
            return Err(DataError::malformed(
                &images_path,
                format!(
                    "IDX dimensions {dims:?}, expected [{count}, {SIDE}, {SIDE}] ({count} labels in {})",
                    labels_path.display()
                ),
            ));
        }
        Ok(Self {
            images_path,
            labels,
        })
    }
}

impl SplitReader for FashionMnistReader {
    fn image_shape(&self) -> [usize; 3] {
        [1, SIDE, SIDE]
    }

    fn labels(&self) -> &[u8] {
        &self.labels
    }

    fn read_images(&mut self, rows: &[usize]) -> Result<Vec<f32>, DataError> {
        check_rows(rows, self.labels.len(), &self.images_path)?;
        let path = &self.images_path;
        let mut reader = gz_reader(path)?;
        read_header(&mut reader, path, IMAGES_MAGIC, 3)?;
        // Visit the wanted rows in file order, writing each where the caller wants it.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&k| rows[k]);
        let mut out = vec![0f32; rows.len() * PIXELS];
        let mut pixels = [0u8; PIXELS];
        let mut next_row = 0;
        for k in order {
            let row = rows[k];
            if row >= next_row {
                let skip = ((row - next_row) * PIXELS) as u64;
                let skipped = io::copy(&mut (&mut reader).take(skip), &mut io::sink())
                    .map_err(|e| DataError::malformed(path, format!("not valid gzip data: {e}")))?;
                if skipped != skip {
                    return Err(DataError::malformed(
                        path,
                        format!("ends before image {row}; expected {EXPECTED}"),
                    ));
                }
                read_exact(&mut reader, &mut pixels, path, &format!("image {row}"))?;
                next_row = row + 1;
            }
            out[k * PIXELS..(k + 1) * PIXELS]
                .iter_mut()
                .zip(pixels)
                .for_each(|(o, p)| *o = f32::from(p) / 255.0);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_support::{histogram, real_data_dir};
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write;

    #[test]
    fn real_files_match_the_readme() {
        let Some(root) = real_data_dir("fashion-mnist") else {
            return;
        };
        let train = FashionMnistReader::open(&root, Split::Train).unwrap();
        assert_eq!(histogram(train.labels()), [6000; 10]);
        let mut test = FashionMnistReader::open(&root, Split::Test).unwrap();
        assert_eq!(histogram(test.labels()), [1000; 10]);
        // README: test mean 0.2868, std 0.3524 (x/255).
        let rows: Vec<usize> = (0..10_000).collect();
        let images = test.read_images(&rows).unwrap();
        let n = images.len() as f64;
        let mean = images.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = images
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!((mean - 0.2868).abs() < 5e-5, "mean {mean}");
        assert!((var.sqrt() - 0.3524).abs() < 5e-5, "std {}", var.sqrt());
        // Rows in any order, repeated, equal the rows of the full read.
        let some = [9_999, 2, 5, 2];
        let picked = test.read_images(&some).unwrap();
        for (k, &row) in some.iter().enumerate() {
            assert_eq!(
                picked[k * PIXELS..(k + 1) * PIXELS],
                images[row * PIXELS..(row + 1) * PIXELS]
            );
        }
    }

    fn gz(path: &Path, bytes: &[u8]) {
        let mut enc = GzEncoder::new(std::fs::File::create(path).unwrap(), Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap();
    }

    /// A valid tiny split of `n` images whose pixels are (7·i + j) mod 256 and labels i mod 10.
    fn write_split(dir: &Path, n: u32) {
        let mut labels = [0x0000_0801u32, n]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<_>>();
        labels.extend((0..n).map(|i| (i % 10) as u8));
        gz(&dir.join("t10k-labels-idx1-ubyte.gz"), &labels);
        let mut images = [0x0000_0803u32, n, 28, 28]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<_>>();
        for i in 0..n as usize {
            images.extend((0..PIXELS).map(|j| ((7 * i + j) % 256) as u8));
        }
        gz(&dir.join("t10k-images-idx3-ubyte.gz"), &images);
    }

    #[test]
    fn tiny_written_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), 5);
        let mut reader = FashionMnistReader::open(dir.path(), Split::Test).unwrap();
        assert_eq!(reader.labels(), &[0, 1, 2, 3, 4]);
        let images = reader.read_images(&[4, 1]).unwrap();
        for (k, i) in [4usize, 1].into_iter().enumerate() {
            for j in 0..PIXELS {
                assert_eq!(images[k * PIXELS + j], ((7 * i + j) % 256) as f32 / 255.0);
            }
        }
        let err = reader.read_images(&[5]).unwrap_err().to_string();
        assert!(err.contains("row 5") && err.contains("holds 5"), "{err}");
    }

    #[test]
    fn missing_and_malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let msg = FashionMnistReader::open(dir.path(), Split::Test)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("t10k-images-idx3-ubyte.gz: not found") && msg.contains(URL),
            "{msg}"
        );

        write_split(dir.path(), 5);
        let labels = dir.path().join("t10k-labels-idx1-ubyte.gz");
        std::fs::write(&labels, b"plain text, not gzip").unwrap();
        let msg = FashionMnistReader::open(dir.path(), Split::Test)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("t10k-labels-idx1-ubyte.gz: not valid gzip"),
            "{msg}"
        );

        gz(&labels, &[0, 0, 8, 3, 0, 0, 0, 5]);
        let msg = FashionMnistReader::open(dir.path(), Split::Test)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("magic number 0x00000803, expected 0x00000801"),
            "{msg}"
        );

        // Six labels for five images.
        let mut six = [0x0000_0801u32, 6]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<_>>();
        six.extend([0u8; 6]);
        gz(&labels, &six);
        let msg = FashionMnistReader::open(dir.path(), Split::Test)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains(
                "t10k-images-idx3-ubyte.gz: IDX dimensions [5, 28, 28], expected [6, 28, 28]"
            ),
            "{msg}"
        );

        // Header promises more images than the stream holds.
        let mut short = [0x0000_0803u32, 6, 28, 28]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<_>>();
        short.extend(vec![0u8; 5 * PIXELS]);
        gz(&dir.path().join("t10k-images-idx3-ubyte.gz"), &short);
        let mut reader = FashionMnistReader::open(dir.path(), Split::Test).unwrap();
        let msg = reader.read_images(&[5]).unwrap_err().to_string();
        assert!(
            msg.contains("ends before image 5") || msg.contains("ends inside image 5"),
            "{msg}"
        );
    }
}
