//! SVHN cropped digits: the official MATLAB v5 files `train_32x32.mat` (73,257 images) and
//! `test_32x32.mat` (26,032). `X` is a 32×32×3×N uint8 array (column-major: row, column, channel,
//! sample) and `y` an N×1 double array of labels 1–10, where 10 stands for the digit 0.

use std::path::{Path, PathBuf};

use matfile::{MatFile, NumericData};

use super::source::{check_rows, SourceKind, Split, SplitReader};
use super::DataError;

/// Where the official files come from.
pub const URL: &str = "http://ufldl.stanford.edu/housenumbers/ (train_32x32.mat, test_32x32.mat)";
/// What the files must hold.
pub const EXPECTED: &str = "an SVHN cropped-digits MATLAB v5 file (train_32x32.mat or \
                            test_32x32.mat) with X (32x32x3xN uint8) and y (Nx1 double, labels 1-10)";

const SIDE: usize = 32;
const CHANNELS: usize = 3;
const PIXELS: usize = CHANNELS * SIDE * SIDE;

/// The file of a split.
pub fn file_names(split: Split) -> &'static [&'static str] {
    match split {
        Split::Train => &["train_32x32.mat"],
        Split::Test => &["test_32x32.mat"],
    }
}

/// An opened SVHN split, fully in memory (MAT files are read whole).
pub struct SvhnReader {
    path: PathBuf,
    /// `X` as stored: column-major 32×32×3×N.
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

impl SvhnReader {
    /// Reads and checks the `.mat` file of `split` in `root`; labels 10 become 0.
    pub fn open(root: &Path, split: Split) -> Result<Self, DataError> {
        let path = SourceKind::Svhn.existing_files(split, root)?.remove(0);
        let bad = |message: String| {
            DataError::malformed(&path, format!("{message}; expected {EXPECTED}"))
        };
        let file = std::fs::File::open(&path).map_err(|e| DataError::io(&path, e))?;
        let mat = MatFile::parse(std::io::BufReader::new(file)).map_err(|e| match e {
            matfile::Error::IOError(source) => DataError::io(&path, source),
            other => bad(format!(
                "not a MATLAB v5 file that can be parsed ({other}; v7.3/HDF5 files are not supported)"
            )),
        })?;
        let x = mat
            .find_by_name("X")
            .ok_or_else(|| bad("no numeric array `X`".into()))?;
        let y = mat
            .find_by_name("y")
            .ok_or_else(|| bad("no numeric array `y`".into()))?;

        let n = match x.size().as_slice() {
            &[SIDE, SIDE, CHANNELS, n] => n,
            other => {
                return Err(bad(format!(
                    "`X` has size {other:?}, expected [32, 32, 3, N]"
                )))
            }
        };
        let pixels = match x.data() {
            NumericData::UInt8 { real, imag: None } => real.clone(),
            _ => return Err(bad("`X` is not a real uint8 array".into())),
        };
        if !matches!(y.size().as_slice(), &[rows, 1] | &[1, rows] if rows == n) {
            return Err(bad(format!(
                "`y` has size {:?}, expected [{n}, 1] to match `X`",
                y.size()
            )));
        }
        let raw_labels: Vec<f64> = match y.data() {
            NumericData::Double { real, imag: None } => real.clone(),
            NumericData::UInt8 { real, imag: None } => real.iter().map(|&v| f64::from(v)).collect(),
            _ => return Err(bad("`y` is not a real double array".into())),
        };
        let labels = raw_labels
            .iter()
            .enumerate()
            .map(|(i, &v)| match v {
                10.0 => Ok(0),
                v if v.fract() == 0.0 && (1.0..=9.0).contains(&v) => Ok(v as u8),
                v => Err(bad(format!(
                    "`y`({}) is {v}, expected an integer label 1-10",
                    i + 1
                ))),
            })
            .collect::<Result<Vec<u8>, DataError>>()?;
        Ok(Self {
            path,
            pixels,
            labels,
        })
    }
}

impl SplitReader for SvhnReader {
    fn image_shape(&self) -> [usize; 3] {
        [CHANNELS, SIDE, SIDE]
    }

    fn labels(&self) -> &[u8] {
        &self.labels
    }

    fn read_images(&mut self, rows: &[usize]) -> Result<Vec<f32>, DataError> {
        check_rows(rows, self.labels.len(), &self.path)?;
        let mut out = Vec::with_capacity(rows.len() * PIXELS);
        for &row in rows {
            let sample = &self.pixels[row * PIXELS..(row + 1) * PIXELS];
            // Column-major X(h, w, c, n) sits at h + 32 w + 1024 c within its sample.
            for c in 0..CHANNELS {
                for h in 0..SIDE {
                    for w in 0..SIDE {
                        out.push(f32::from(sample[h + SIDE * w + SIDE * SIDE * c]) / 255.0);
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[path = "svhn_fixture.rs"]
mod fixture;

#[cfg(test)]
mod tests {
    use super::fixture::{matrix, write_mat};
    use super::*;

    #[test]
    fn reads_generated_mat_files() {
        for compressed in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_mat(
                &dir.path().join("test_32x32.mat"),
                &[10.0, 1.0, 3.0, 10.0, 9.0],
                compressed,
            );
            let mut reader = SvhnReader::open(dir.path(), Split::Test).unwrap();
            assert_eq!(reader.labels(), &[0, 1, 3, 0, 9], "label 10 is digit 0");
            let images = reader.read_images(&[4, 0]).unwrap();
            for (k, i) in [4usize, 0].into_iter().enumerate() {
                for c in 0..3 {
                    for h in 0..32 {
                        for w in 0..32 {
                            let got = images[k * PIXELS + c * 1024 + h * 32 + w];
                            let want = ((h + 2 * w + 7 * c + 11 * i) % 256) as f32 / 255.0;
                            assert_eq!(
                                got, want,
                                "sample {i} c{c} h{h} w{w} compressed={compressed}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn missing_files_name_both_svhn_files_and_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let msg = SvhnReader::open(dir.path(), Split::Train)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("train_32x32.mat: not found"), "{msg}");
        assert!(
            msg.contains("test_32x32.mat") && msg.contains("ufldl.stanford.edu"),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("put it in {}", dir.path().display())),
            "{msg}"
        );
    }

    #[test]
    fn malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test_32x32.mat");
        std::fs::write(&path, b"this is not a MAT file").unwrap();
        let msg = SvhnReader::open(dir.path(), Split::Test)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("test_32x32.mat: not a MATLAB v5 file"),
            "{msg}"
        );

        write_mat(&path, &[1.0, 11.0], false);
        let msg = SvhnReader::open(dir.path(), Split::Test)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("`y`(2) is 11, expected an integer label 1-10"),
            "{msg}"
        );

        // X of the wrong shape.
        let mut file = std::fs::read(&path).unwrap()[..128].to_vec();
        file.extend(matrix(9, &[28, 28, 1, 1], "X", 2, &[0u8; 784]));
        file.extend(matrix(6, &[1, 1], "y", 9, &1f64.to_le_bytes()));
        std::fs::write(&path, file).unwrap();
        let msg = SvhnReader::open(dir.path(), Split::Test)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("`X` has size [28, 28, 1, 1], expected [32, 32, 3, N]"),
            "{msg}"
        );
    }
}
