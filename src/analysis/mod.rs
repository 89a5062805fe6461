//! Analysis of training metrics, as pure functions on plain data (no candle, no pipelines):
//! reading `metrics.csv` ([`metrics`]), per-run summaries such as the plateau level of a quantity or
//! the final λmax ([`run`]), sweep-level fits of λmax against the batch size — the power law of the
//! gap 2/η − λmax and the critical batch size ([`sweep`]) — and catapult detection ([`catapult`]).
//! The `analysis` and `plot` stage kinds turn artifacts into these inputs.

pub mod catapult;
pub mod metrics;
pub mod run;
pub mod stats;
pub mod sweep;

use std::path::PathBuf;

/// Why an analysis could not be done.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The CSV structure is broken (ragged rows, bad quoting, ...).
    #[error("{path}: malformed CSV: {message}")]
    Csv {
        /// The file at fault.
        path: PathBuf,
        /// What the CSV reader reported.
        message: String,
    },
    /// A cell is neither empty nor a number.
    #[error("{path}: line {line}, column `{column}`: `{value}` is not a number")]
    Cell {
        /// The file at fault.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The column name.
        column: String,
        /// The offending text.
        value: String,
    },
    /// A column the analysis needs is absent.
    #[error("{path}: no column `{column}`{} (columns: {available})", did_you_mean(.closest))]
    MissingColumn {
        /// The file at fault.
        path: PathBuf,
        /// The missing column.
        column: String,
        /// The file's column nearest in spelling, if one is near (a likely typo).
        closest: Option<String>,
        /// The columns the file has, comma-separated.
        available: String,
    },
    /// Too few usable data points for the requested analysis.
    #[error("{what}: needs at least {needed} usable points, got {got}")]
    NotEnoughData {
        /// What was being computed, and on which data.
        what: String,
        /// Points needed.
        needed: usize,
        /// Points available.
        got: usize,
    },
    /// A setting is out of its valid range.
    #[error("{0}")]
    Invalid(String),
}

/// `"; did you mean `x`?"` for a near name, or nothing.
pub fn did_you_mean(closest: &Option<String>) -> String {
    closest
        .as_ref()
        .map(|name| format!("; did you mean `{name}`?"))
        .unwrap_or_default()
}

/// The candidate nearest to `name` if it is within a few edits (at most a third of its length):
/// the name a typo most likely meant.
pub fn closest_name<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|candidate| (strsim::levenshtein(name, candidate), candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min()
        .map(|(_, candidate)| candidate.to_string())
}
