//! Figures laid out like the paper's: a figure is plain data ([`figure`]) — a grid of panels with
//! styled series — built by the `plot` stage from metrics, drawn to PNG and SVG by [`render`], and
//! written as the tidy CSV of exactly the points drawn. [`style`] holds the paper's conventions
//! (batch sharpness green, λmax blue, step sharpness red dots, dashed 2/η, loss on a log twin axis).

pub mod figure;
pub mod render;
pub mod style;

use std::path::PathBuf;

/// Why a figure could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Drawing failed (e.g. no usable font, unwritable file).
    #[error("{path}: drawing failed: {message}")]
    Render {
        /// The output file.
        path: PathBuf,
        /// What plotters reported.
        message: String,
    },
    /// Writing the data table failed.
    #[error("{path}: {message}")]
    Write {
        /// The output file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}
