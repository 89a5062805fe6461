//! A figure as plain data: a grid of panels, each with axes and styled series of (x, y) points.
//! Builders (the `plot` stage) fill it from metrics; [`super::render`] draws it; [`Figure::write_csv`]
//! writes exactly the points it draws as a tidy table.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::PlotError;

/// Axis scale. Log axes drop non-positive values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scale {
    /// Linear.
    #[default]
    Linear,
    /// Base-10 logarithmic.
    Log,
}

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    /// A solid line through the points.
    Line,
    /// A dashed line (thresholds such as 2/η).
    Dashed,
    /// Unconnected dots (e.g. step sharpness).
    Dots,
    /// A solid line with a dot on every point (sweep summaries).
    LineDots,
}

/// Colour and mark of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Style {
    /// RGB colour.
    pub color: (u8, u8, u8),
    /// Mark kind.
    pub mark: Mark,
}

/// Which y axis a series is drawn against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    /// The left (primary) axis.
    Left,
    /// The right (twin) axis, e.g. the loss on a log scale.
    Right,
}

/// One named series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// How it is drawn.
    pub style: Style,
    /// The y axis it belongs to.
    pub axis: Axis,
    /// The points, in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// Label and scale of one axis.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AxisSpec {
    /// Axis label.
    pub label: String,
    /// Scale.
    pub scale: Scale,
}

impl AxisSpec {
    /// A linear axis with this label.
    pub fn linear(label: &str) -> Self {
        AxisSpec {
            label: label.to_string(),
            scale: Scale::Linear,
        }
    }

    /// A log axis with this label.
    pub fn log(label: &str) -> Self {
        AxisSpec {
            label: label.to_string(),
            scale: Scale::Log,
        }
    }
}

/// One panel of the grid.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Panel {
    /// Panel title (also its name in the CSV).
    pub title: String,
    /// The x axis.
    pub x: AxisSpec,
    /// The left y axis.
    pub y: AxisSpec,
    /// The right y axis, present when some series use [`Axis::Right`].
    pub y2: Option<AxisSpec>,
    /// The series, drawn in order (later on top).
    pub series: Vec<Series>,
}

/// A whole figure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figure {
    /// Title above the grid (empty for none).
    pub title: String,
    /// Panels per row.
    pub columns: usize,
    /// Size of one panel in pixels.
    pub panel_size: (u32, u32),
    /// The panels, row by row.
    pub panels: Vec<Panel>,
}

impl Figure {
    /// Rows of the grid.
    pub fn rows(&self) -> usize {
        self.panels.len().div_ceil(self.columns.max(1))
    }

    /// Writes the tidy CSV `panel,series,axis,x,y`: one row per plotted point.
    pub fn write_csv(&self, path: &Path) -> Result<(), PlotError> {
        let err = |e: csv::Error| PlotError::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut w = csv::Writer::from_path(path).map_err(err)?;
        w.write_record(["panel", "series", "axis", "x", "y"])
            .map_err(err)?;
        for panel in &self.panels {
            for s in &panel.series {
                let axis = match s.axis {
                    Axis::Left => "left",
                    Axis::Right => "right",
                };
                for (x, y) in &s.points {
                    w.write_record([
                        panel.title.as_str(),
                        s.name.as_str(),
                        axis,
                        &x.to_string(),
                        &y.to_string(),
                    ])
                    .map_err(err)?;
                }
            }
        }
        w.flush().map_err(|e| PlotError::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}
