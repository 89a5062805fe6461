//! Reading a training run's `metrics.csv`: a header row, then one row per SGD step; an empty cell
//! means "not measured at this step". Columns are kept by name as `Option<f64>` vectors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::AnalysisError;

/// The columns of one metrics file, by name, all of the same length (one entry per row).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsTable {
    /// Where the table was read from (for error messages).
    pub source: PathBuf,
    columns: BTreeMap<String, Vec<Option<f64>>>,
    rows: usize,
}

impl MetricsTable {
    /// Reads a metrics CSV. Empty cells become `None`; a cell that is neither empty nor a number
    /// (`nan`, `inf` are numbers) is an error naming the file, line and column.
    pub fn read(path: &Path) -> Result<Self, AnalysisError> {
        let file = std::fs::File::open(path).map_err(|source| AnalysisError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_reader(file, path)
    }

    /// Parses a metrics CSV from any reader; `source` names it in errors.
    pub fn from_reader(reader: impl std::io::Read, source: &Path) -> Result<Self, AnalysisError> {
        let csv_error = |e: csv::Error| AnalysisError::Csv {
            path: source.to_path_buf(),
            message: e.to_string(),
        };
        let mut rdr = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_reader(reader);
        let headers: Vec<String> = rdr
            .headers()
            .map_err(csv_error)?
            .iter()
            .map(str::to_string)
            .collect();
        let mut values: Vec<Vec<Option<f64>>> = vec![Vec::new(); headers.len()];
        let mut rows = 0;
        for record in rdr.records() {
            let record = record.map_err(csv_error)?;
            let line = record.position().map_or(0, |p| p.line());
            for (i, cell) in record.iter().enumerate() {
                let value = if cell.is_empty() {
                    None
                } else {
                    Some(cell.parse::<f64>().map_err(|_| AnalysisError::Cell {
                        path: source.to_path_buf(),
                        line,
                        column: headers[i].clone(),
                        value: cell.to_string(),
                    })?)
                };
                values[i].push(value);
            }
            rows += 1;
        }
        Ok(MetricsTable {
            source: source.to_path_buf(),
            columns: headers.into_iter().zip(values).collect(),
            rows,
        })
    }

    /// Number of data rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether the table has a column of this name.
    pub fn has(&self, name: &str) -> bool {
        self.columns.contains_key(name)
    }

    /// A column by name, or an error naming the file and the columns it does have.
    pub fn column(&self, name: &str) -> Result<&[Option<f64>], AnalysisError> {
        self.columns
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| AnalysisError::MissingColumn {
                path: self.source.clone(),
                column: name.to_string(),
                closest: super::closest_name(name, self.columns.keys().map(String::as_str)),
                available: self.columns.keys().cloned().collect::<Vec<_>>().join(","),
            })
    }

    /// The rows where both `x` and `y` are present, as `(x, y)` pairs in file order.
    pub fn pairs(&self, x: &str, y: &str) -> Result<Vec<(f64, f64)>, AnalysisError> {
        let xs = self.column(x)?;
        let ys = self.column(y)?;
        Ok(xs
            .iter()
            .zip(ys)
            .filter_map(|(a, b)| Some(((*a)?, (*b)?)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "step,epoch,lr,batch_size,loss,lambda_max\n\
                          0,0,0.1,8,2.5,3.0\n\
                          1,0,0.1,8,2.4,\n\
                          2,1,0.1,8,2.2,4.5\n";

    #[test]
    fn empty_cells_are_missing() {
        let t = MetricsTable::from_reader(SAMPLE.as_bytes(), Path::new("m.csv")).unwrap();
        assert_eq!(t.rows(), 3);
        assert_eq!(
            t.column("lambda_max").unwrap(),
            &[Some(3.0), None, Some(4.5)]
        );
        assert_eq!(
            t.pairs("step", "lambda_max").unwrap(),
            vec![(0.0, 3.0), (2.0, 4.5)]
        );
    }

    #[test]
    fn missing_column_names_file_and_alternatives() {
        let t = MetricsTable::from_reader(SAMPLE.as_bytes(), Path::new("runs/m.csv")).unwrap();
        let msg = t.column("gni").unwrap_err().to_string();
        assert!(msg.contains("runs/m.csv") && msg.contains("gni") && msg.contains("lambda_max"));
        assert!(!msg.contains("did you mean"), "{msg}");
        // A typo gets the nearest name.
        let msg = t.column("lambda_maxx").unwrap_err().to_string();
        assert!(
            msg.contains("no column `lambda_maxx`; did you mean `lambda_max`?"),
            "{msg}"
        );
        let msg = t.column("los").unwrap_err().to_string();
        assert!(msg.contains("did you mean `loss`?"), "{msg}");
    }

    #[test]
    fn bad_cell_names_line_and_column() {
        let bad = "step,loss\n0,1.0\n1,oops\n";
        let err = MetricsTable::from_reader(bad.as_bytes(), Path::new("m.csv")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("line 3") && msg.contains("loss") && msg.contains("oops"),
            "{msg}"
        );
    }
}
