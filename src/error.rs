//! The top-level error of the `eoss` library and binary, the validation diagnostics that point at
//! file:line:column, and the documented exit codes.
//!
//! Module errors ([`crate::store::StoreError`], [`Invalid`]) are wrapped here; `main` renders the
//! result with miette and exits with [`Error::exit_code`].

use std::path::PathBuf;
use std::sync::Arc;

use miette::{Diagnostic, NamedSource, SourceSpan};

use crate::store::StoreError;

/// Exit code: everything succeeded.
pub const EXIT_OK: i32 = 0;
/// Exit code: at least one stage failed (or `verify` found corruption); the rest finished.
pub const EXIT_STAGE_FAILED: i32 = 1;
/// Exit code: invalid input (pipeline file, command-line overrides, unknown artifact); nothing ran.
pub const EXIT_INVALID: i32 = 2;
/// Exit code: every stage completed, but a training run diverged (its result is cached).
pub const EXIT_DIVERGED: i32 = 3;

/// A pipeline file's text, kept so that diagnostics can point into it.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The path as the user gave it (shown in messages).
    pub path: PathBuf,
    /// The file's text.
    pub text: Arc<String>,
}

/// A position in a [`SourceFile`]: byte offset and 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Byte offset of the start.
    pub offset: usize,
    /// Length in bytes of the highlighted text (at least 1).
    pub len: usize,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

/// One problem found while validating a pipeline, pointing at the field at fault when known.
#[derive(Debug, Clone, thiserror::Error, Diagnostic)]
#[error("{message}")]
pub struct Problem {
    /// `file:line:column: field.path: what is wrong`.
    pub message: String,
    /// The file, for the snippet.
    #[source_code]
    pub source_code: Option<NamedSource<Arc<String>>>,
    /// Where in the file.
    #[label("{label}")]
    pub span: Option<SourceSpan>,
    /// The label under the snippet.
    pub label: String,
    /// How to fix it, when there is something useful to say.
    #[help]
    pub help: Option<String>,
}

impl Problem {
    /// A problem at `location` of `file` (or at the file as a whole when the location is unknown).
    /// `field` is the dotted path of the field at fault, e.g. `stages.train.params.lr`.
    pub fn at(
        file: &SourceFile,
        location: Option<Location>,
        field: &str,
        what: impl Into<String>,
    ) -> Self {
        let what = what.into();
        let display = file.path.display().to_string();
        let place = match location {
            Some(l) => format!("{display}:{}:{}", l.line, l.column),
            None => display.clone(),
        };
        let message = if field.is_empty() {
            format!("{place}: {what}")
        } else {
            format!("{place}: {field}: {what}")
        };
        Problem {
            message,
            source_code: location.map(|_| NamedSource::new(display, file.text.clone())),
            span: location.map(|l| SourceSpan::new(l.offset.into(), l.len.max(1))),
            label: what,
            help: None,
        }
    }

    /// A problem in a command-line argument (e.g. `--set`), with no file to point at.
    pub fn argument(argument: &str, what: impl Into<String>) -> Self {
        let what = what.into();
        Problem {
            message: format!("{argument}: {what}"),
            source_code: None,
            span: None,
            label: what,
            help: None,
        }
    }

    /// Adds a hint on how to fix the problem.
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// Invalid input: every problem found, reported together. Exit code 2.
#[derive(Debug, thiserror::Error, Diagnostic)]
#[error("{what}: {} problem(s) found, nothing was run", problems.len())]
pub struct Invalid {
    /// What was being validated (usually the pipeline file).
    pub what: String,
    /// The problems, in file order where known.
    #[related]
    pub problems: Vec<Problem>,
}

/// Everything that can go wrong in a command.
#[derive(Debug, thiserror::Error, Diagnostic)]
pub enum Error {
    /// Invalid pipeline or arguments.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Invalid(#[from] Invalid),
    /// The artifact store failed (I/O, permissions, a corrupt manifest).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Some stages failed; the summary already named them and their logs.
    #[error("{failed} stage(s) failed")]
    StagesFailed {
        /// How many failed.
        failed: usize,
    },
    /// Training runs diverged (cached as results; the summary named each with its step).
    #[error(
        "{} training run(s) diverged: {}; lower the step size or raise `divergence_loss`, or \
         pass --allow-divergence to take diverged runs as results",
        .runs.len(),
        .runs.join(", ")
    )]
    Diverged {
        /// Each diverged run: its stage name and where it diverged.
        runs: Vec<String>,
    },
    /// `verify` found artifacts whose files no longer match their manifests.
    #[error("{corrupt} artifact(s) do not match their manifests")]
    Corrupt {
        /// How many.
        corrupt: usize,
    },
    /// A command-line request that cannot be satisfied (unknown artifact, glob matching nothing).
    #[error("{0}")]
    Usage(String),
    /// `eoss fetch` could not download or check a file.
    #[error(transparent)]
    Fetch(#[from] crate::data::DataError),
    /// `eoss bench` failed (a case, or the PyTorch reference).
    #[error(transparent)]
    Bench(#[from] Box<crate::bench::BenchError>),
}

impl Error {
    /// The documented exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Invalid(_) | Error::Usage(_) => EXIT_INVALID,
            Error::Diverged { .. } => EXIT_DIVERGED,
            Error::Store(_)
            | Error::Io { .. }
            | Error::StagesFailed { .. }
            | Error::Corrupt { .. }
            | Error::Fetch(_)
            | Error::Bench(_) => EXIT_STAGE_FAILED,
        }
    }
}
