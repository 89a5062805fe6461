//! `metrics.csv`: one row per SGD step (plus a final row at the last step), a fixed header shared by
//! every run so pandas reads all runs alike, and empty cells where a quantity was not measured.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Seek;
use std::path::{Path, PathBuf};

use crate::stages::StageError;

/// Columns written for every step.
pub const STEP_COLUMNS: &[&str] = &["step", "epoch", "lr", "batch_size", "loss"];

/// Columns of the periodic evaluation on the whole training subset and the test set.
pub const EVAL_COLUMNS: &[&str] = &["full_loss", "full_accuracy", "test_loss", "test_accuracy"];

/// Curvature columns, each followed in the file by `<name>_stderr` and `<name>_samples` when the
/// quantity is a Monte Carlo estimate (second field `true`).
pub const CURVATURE_COLUMNS: &[(&str, bool)] = &[
    ("lambda_max", false),
    ("batch_sharpness", true),
    ("step_sharpness", false),
    ("gni", true),
    ("ias", true),
    ("batch_sharpness_modified", true),
    ("lambda_max_b", true),
    ("lambda_max_b_max", false),
    ("step_lambda_max_b", false),
    ("hessian_trace", true),
    ("smc_eq37", true),
    ("smc_eq39", true),
    ("lambda_max_gn", false),
    ("batch_sharpness_gn", true),
    ("grad_norm_sq", false),
    ("lambda_max_b_gn", true),
    ("lambda_max_b_gn_max", false),
];

/// The full header, in file order.
pub fn header() -> Vec<String> {
    let mut columns: Vec<String> = STEP_COLUMNS
        .iter()
        .chain(EVAL_COLUMNS)
        .map(|c| c.to_string())
        .collect();
    for (name, monte_carlo) in CURVATURE_COLUMNS {
        columns.push(name.to_string());
        if *monte_carlo {
            columns.push(format!("{name}_stderr"));
            columns.push(format!("{name}_samples"));
        }
    }
    columns
}

/// One row: values by column name; absent columns are written as empty cells.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    values: BTreeMap<String, f64>,
}

impl Row {
    /// A row for `step`.
    pub fn new(step: u64) -> Self {
        let mut row = Self::default();
        row.set("step", step as f64);
        row
    }

    /// Sets a column (the name must be in [`header`]).
    pub fn set(&mut self, column: &str, value: f64) {
        debug_assert!(
            header().iter().any(|c| c == column),
            "unknown column {column}"
        );
        self.values.insert(column.to_string(), value);
    }

    /// A column's value, if set.
    pub fn get(&self, column: &str) -> Option<f64> {
        self.values.get(column).copied()
    }

    /// The step of this row.
    pub fn step(&self) -> u64 {
        self.get("step").unwrap_or(0.0) as u64
    }
}

/// Appends rows to a metrics CSV file, flushing on demand so that what is on disk matches the last
/// checkpoint.
pub struct MetricsLog {
    path: PathBuf,
    columns: Vec<String>,
    writer: csv::Writer<File>,
}

impl MetricsLog {
    /// Creates `path` with `rows` already in it (the prefix kept from a resumed or base run).
    pub fn create(path: &Path, rows: &[Row]) -> Result<Self, StageError> {
        let columns = header();
        let file = File::create(path).map_err(|e| StageError::io(path, e))?;
        let mut log = Self {
            path: path.to_path_buf(),
            columns,
            writer: csv::Writer::from_writer(file),
        };
        let header = log.columns.clone();
        log.writer
            .write_record(&header)
            .map_err(|e| log.csv_error(e))?;
        for row in rows {
            log.append(row)?;
        }
        log.flush()?;
        Ok(log)
    }

    /// Reopens `path`, left by a killed run, for appending after its first `bytes` bytes (what it
    /// held when the run last recorded its progress; anything written after is dropped).
    pub fn resume(path: &Path, bytes: u64) -> Result<Self, StageError> {
        let file = reopen_truncated(path, bytes).map_err(|e| StageError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            columns: header(),
            writer: csv::Writer::from_writer(file),
        })
    }

    /// The file's length in bytes once buffered rows are flushed.
    pub fn flushed_len(&mut self) -> Result<u64, StageError> {
        flushed_len(&mut self.writer).map_err(|e| StageError::io(&self.path, e))
    }

    /// Appends one row (buffered).
    pub fn append(&mut self, row: &Row) -> Result<(), StageError> {
        let cells: Vec<String> = self
            .columns
            .iter()
            .map(|c| row.get(c).map(format_value).unwrap_or_default())
            .collect();
        self.writer
            .write_record(&cells)
            .map_err(|e| self.csv_error(e))
    }

    /// Writes buffered rows to disk.
    pub fn flush(&mut self) -> Result<(), StageError> {
        self.writer
            .flush()
            .map_err(|e| StageError::io(&self.path, e))
    }

    fn csv_error(&self, e: csv::Error) -> StageError {
        StageError::Failed(format!("{}: {e}", self.path.display()))
    }
}

/// Flushes `writer` and returns the length of its file.
pub fn flushed_len(writer: &mut csv::Writer<File>) -> std::io::Result<u64> {
    writer.flush()?;
    Ok(writer.get_ref().metadata()?.len())
}

/// Opens `path` for appending after its first `bytes` bytes, cutting off the rest.
pub fn reopen_truncated(path: &Path, bytes: u64) -> std::io::Result<File> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.set_len(bytes)?;
    file.seek(std::io::SeekFrom::End(0))?;
    Ok(file)
}

/// Shortest decimal that reads back to the same f64; `nan`/`inf` spelled as pandas reads them.
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// Reads the rows of a metrics file written by [`MetricsLog`].
pub fn read_rows(path: &Path) -> Result<Vec<Row>, StageError> {
    read_rows_before(path, u64::MAX, false)
}

/// Reads the rows with step < `before` (for resuming and branching). With `tolerant`, reading stops
/// quietly at the first record that is cut short or out of order: what a killed run left after its
/// last flush.
pub fn read_rows_before(path: &Path, before: u64, tolerant: bool) -> Result<Vec<Row>, StageError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(tolerant)
        .from_path(path)
        .map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))?;
    let columns: Vec<String> = reader
        .headers()
        .map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))?
        .iter()
        .map(str::to_string)
        .collect();
    let mut rows: Vec<Row> = Vec::new();
    for (line, record) in reader.records().enumerate() {
        let record = match record {
            Ok(record) if tolerant && record.len() != columns.len() => break,
            Ok(record) => record,
            Err(_) if tolerant => break,
            Err(e) => return Err(StageError::Failed(format!("{}: {e}", path.display()))),
        };
        let mut row = Row::default();
        for (column, cell) in columns.iter().zip(record.iter()) {
            if cell.is_empty() {
                continue;
            }
            let value: f64 = match cell.parse() {
                Ok(value) => value,
                Err(_) if tolerant => return Ok(rows),
                Err(_) => {
                    return Err(StageError::Failed(format!(
                        "{}:{}: column {column}: `{cell}` is not a number",
                        path.display(),
                        line + 2
                    )))
                }
            };
            row.values.insert(column.clone(), value);
        }
        let in_order = rows.last().is_none_or(|last| last.step() < row.step());
        if row.step() >= before || (tolerant && !in_order) {
            break;
        }
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lists_monte_carlo_companions() {
        let header = header();
        let at = |c: &str| header.iter().position(|h| h == c).unwrap();
        assert_eq!(at("batch_sharpness") + 1, at("batch_sharpness_stderr"));
        assert_eq!(at("batch_sharpness") + 2, at("batch_sharpness_samples"));
        assert!(!header.iter().any(|h| h == "lambda_max_stderr"));
        assert_eq!(&header[..5], STEP_COLUMNS);
    }

    #[test]
    fn rows_round_trip_exactly_with_empty_cells() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        let mut first = Row::new(0);
        first.set("loss", 0.1 + 0.2);
        first.set("lambda_max", 1e-300);
        let mut second = Row::new(1);
        second.set("loss", f64::NAN);
        let mut log = MetricsLog::create(&path, &[first.clone()]).unwrap();
        log.append(&second).unwrap();
        log.flush().unwrap();
        let rows = read_rows(&path).unwrap();
        assert_eq!(rows[0], first);
        assert!(rows[1].get("loss").unwrap().is_nan());
        assert_eq!(rows[1].get("full_loss"), None);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("0,,,,0.30000000000000004,"));
    }
}
