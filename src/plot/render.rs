//! Draws a [`Figure`] with plotters to PNG (bitmap backend) or SVG.
//!
//! Log axes are drawn by plotting log₁₀ of the values on a linear coordinate and labelling ticks
//! with 10^v, which keeps one coordinate type for every panel (linear/log × with/without twin axis).
//! Text needs a system sans-serif font found through fontconfig (plotters' `ttf` feature); on
//! Debian that is the `fonts-dejavu-core` package.

use std::path::Path;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::figure::{Axis, Figure, Mark, Panel, Scale, Style};
use super::PlotError;

const FONT: &str = "sans-serif";

/// Renders `figure` to a PNG file.
pub fn write_png(figure: &Figure, path: &Path) -> Result<(), PlotError> {
    let root = BitMapBackend::new(path, canvas_size(figure)).into_drawing_area();
    draw(figure, &root).map_err(|message| PlotError::Render {
        path: path.to_path_buf(),
        message,
    })
}

/// Renders `figure` to an SVG file.
pub fn write_svg(figure: &Figure, path: &Path) -> Result<(), PlotError> {
    let root = SVGBackend::new(path, canvas_size(figure)).into_drawing_area();
    draw(figure, &root).map_err(|message| PlotError::Render {
        path: path.to_path_buf(),
        message,
    })
}

fn title_height(figure: &Figure) -> u32 {
    if figure.title.is_empty() {
        0
    } else {
        40
    }
}

fn canvas_size(figure: &Figure) -> (u32, u32) {
    let cols = figure.columns.clamp(1, figure.panels.len().max(1)) as u32;
    let rows = figure.rows().max(1) as u32;
    (
        cols * figure.panel_size.0,
        rows * figure.panel_size.1 + title_height(figure),
    )
}

/// Maps a value onto its drawing coordinate (log₁₀ on log axes); `None` if it cannot be drawn.
fn to_coord(v: f64, scale: Scale) -> Option<f64> {
    match scale {
        Scale::Linear if v.is_finite() => Some(v),
        Scale::Log if v.is_finite() && v > 0.0 => Some(v.log10()),
        _ => None,
    }
}

/// The smallest and largest of `values` ((∞, −∞) when there are none).
fn extent(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    })
}

/// The drawing-coordinate range covering `values`, padded by 5 %.
fn range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = extent(values);
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 0.5 };
    (lo - pad)..(hi + pad)
}

/// Tick positions (drawing coordinates) on `range`: 1-2-5 steps on linear axes; on log axes
/// 1-2-5 (or 1-2-3-5) multiples of each decade when the range spans few decades, else decades.
fn ticks(range: &std::ops::Range<f64>, scale: Scale) -> Vec<f64> {
    let (lo, hi) = (range.start, range.end);
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return vec![lo];
    }
    match scale {
        Scale::Linear => {
            // The smallest 1-2-5 step giving at most about six ticks, or the next smaller one when
            // that leaves fewer than four (b = 8…128: 20, 40, …, not just 50 and 100).
            let raw = span / 6.0;
            let decade = 10f64.powf(raw.log10().floor());
            let steps: Vec<f64> = [0.5, 1.0, 2.0, 5.0, 10.0]
                .iter()
                .map(|m| m * decade)
                .collect();
            let fit = steps
                .iter()
                .position(|&st| st >= raw)
                .unwrap_or(steps.len() - 1);
            let on = |step: f64| {
                let (first, last) = ((lo / step).ceil() as i64, (hi / step).floor() as i64);
                (first..=last)
                    .map(|i| i as f64 * step)
                    .collect::<Vec<f64>>()
            };
            let ticks = on(steps[fit]);
            if ticks.len() < 4 && fit > 0 {
                on(steps[fit - 1])
            } else {
                ticks
            }
        }
        Scale::Log => {
            let multiples: &[f64] = if span <= 1.2 {
                &[1.0, 2.0, 3.0, 5.0]
            } else if span <= 3.0 {
                &[1.0, 2.0, 5.0]
            } else {
                &[1.0]
            };
            let stride = (span / 7.0).ceil().max(1.0) as i64;
            let on = |multiples: &[f64]| -> Vec<f64> {
                (lo.floor() as i64..=hi.ceil() as i64)
                    .filter(|k| multiples.len() > 1 || k.rem_euclid(stride) == 0)
                    .flat_map(|k| multiples.iter().map(move |m| m.log10() + k as f64))
                    .filter(|v| (lo..=hi).contains(v))
                    .collect()
            };
            // Under a decade, fewer than three ticks take every integer multiple (λ from 12 to
            // 45: 20, 30, 40), and then, on a still narrower axis, the linear axis' round values.
            let mut ticks_on = on(multiples);
            if ticks_on.len() < 3 && span <= 1.2 {
                ticks_on = on(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
            }
            if ticks_on.len() < 3 {
                let values = 10f64.powf(lo)..10f64.powf(hi);
                ticks_on = ticks(&values, Scale::Linear)
                    .into_iter()
                    .filter(|&v| v > 0.0)
                    .map(f64::log10)
                    .collect();
            }
            ticks_on
        }
    }
}

/// A linear f64 coordinate whose ticks are given ([`ticks`]) instead of chosen by plotters.
struct Ticked {
    inner: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Ticked {
    fn new(range: &std::ops::Range<f64>, scale: Scale) -> Self {
        Ticked {
            inner: range.clone().into(),
            ticks: ticks(range, scale),
        }
    }
}

impl Ranged for Ticked {
    type ValueType = f64;
    type FormatOption = DefaultFormatting;

    fn range(&self) -> std::ops::Range<f64> {
        self.inner.range()
    }

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }
}

/// How an axis writes its tick labels.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Labels {
    /// Round numbers (`0.01`, `250`), with an exponent beyond (`2e4`) on linear axes.
    Plain,
    /// Powers of ten (`10⁻³`, `1`, `10⁶`, `2×10⁵`): a log axis any of whose ticks lies outside
    /// [0.01, 10⁴), labelled alike throughout as matplotlib does, instead of `100` beside `1e4`.
    Powers,
}

impl Labels {
    fn of(range: &std::ops::Range<f64>, scale: Scale) -> Labels {
        let plain = |v: &f64| (-2.0..4.0).contains(v);
        if scale == Scale::Log && !ticks(range, scale).iter().all(plain) {
            Labels::Powers
        } else {
            Labels::Plain
        }
    }
}

/// `k` in superscript digits (`⁻³`).
fn superscript(k: i64) -> String {
    k.to_string()
        .chars()
        .map(|c| match c {
            '-' => '⁻',
            d => ['⁰', '¹', '²', '³', '⁴', '⁵', '⁶', '⁷', '⁸', '⁹'][d as usize - '0' as usize],
        })
        .collect()
}

fn tick_label(v: f64, scale: Scale, labels: Labels) -> String {
    if labels == Labels::Powers {
        // v = log10(m × 10^k) with m a small integer (the 1-2-5 multiples).
        let k = (v + 1e-9).floor();
        let m = 10f64.powf(v - k).round();
        let power = if k == 0.0 {
            "1".to_string()
        } else {
            format!("10{}", superscript(k as i64))
        };
        return match m {
            1.0 => power,
            m if k == 0.0 => format!("{m}"),
            m => format!("{m}×{power}"),
        };
    }
    let value = match scale {
        Scale::Linear => v,
        Scale::Log => 10f64.powf(v),
    };
    let a = value.abs();
    // Ticks stepped in floating point land a rounding error away from zero (−2e-16).
    if a < 1e-12 {
        "0".to_string()
    } else if (1e-2..1e4).contains(&a) {
        let s = format!("{value:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{value:.0e}")
    }
}

fn points_on(s: &super::figure::Series, xs: Scale, ys: Scale) -> Vec<(f64, f64)> {
    s.points
        .iter()
        .filter_map(|&(x, y)| Some((to_coord(x, xs)?, to_coord(y, ys)?)))
        .collect()
}

/// The share of a dot series that sets its axis' range when the rest would stretch it.
const DOT_RANGE_QUANTILE: f64 = 0.99;

/// `panel` without the outlying dots that would flatten its curves (step sharpness at small b has
/// a heavy upper tail): on each y axis, when the dots above their series' 99th percentile stretch
/// the axis' span by more than half, the dots above what remains are left out and counted in their
/// series' legend name. The figure's CSV keeps every point.
fn without_outlying_dots(panel: &Panel) -> Panel {
    let mut panel = panel.clone();
    let y2s = panel.y2.as_ref().map_or(Scale::Linear, |a| a.scale);
    for (axis, ys) in [(Axis::Left, panel.y.scale), (Axis::Right, y2s)] {
        let (mut all, mut kept) = (Vec::new(), Vec::new());
        for s in panel.series.iter().filter(|s| s.axis == axis) {
            let mut v: Vec<f64> = points_on(s, panel.x.scale, ys)
                .into_iter()
                .map(|p| p.1)
                .collect();
            all.extend_from_slice(&v);
            if s.style.mark == Mark::Dots {
                v.sort_by(f64::total_cmp);
                v.truncate((DOT_RANGE_QUANTILE * v.len() as f64).ceil() as usize);
            }
            kept.extend(v);
        }
        let ((lo, hi), (_, top)) = (extent(all.into_iter()), extent(kept.into_iter()));
        if hi - lo <= 1.5 * (top - lo) {
            continue;
        }
        for s in panel
            .series
            .iter_mut()
            .filter(|s| s.axis == axis && s.style.mark == Mark::Dots)
        {
            let before = s.points.len();
            s.points
                .retain(|p| to_coord(p.1, ys).is_none_or(|y| y <= top));
            let above = before - s.points.len();
            if above > 0 {
                s.name = format!("{} ({above} above the axis)", s.name);
            }
        }
    }
    panel
}

/// Legend font size in pixels.
const LEGEND_FONT: f64 = 12.0;

/// A panel's layout in pixels: margin on every side, x-label height, y-label widths (left, and
/// right when there is a twin axis), and the caption's font size and its height estimate.
const MARGIN: u32 = 8;
const X_LABELS: u32 = 40;
const Y_LABELS: u32 = 55;
const Y2_LABELS: u32 = 60;
const CAPTION_FONT: f64 = 18.0;
const CAPTION_HEIGHT: u32 = 26;

/// The legend box's size as fractions of the plotting area (clamped to 0.9): one row per series
/// and the widest label at the legend font, plus the sample mark and padding. The plotting area
/// is `area` less the label areas, caption and margins that [`draw_panel`] lays out.
fn legend_box<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &Panel) -> (f64, f64) {
    let (w, h) = area.dim_in_pixel();
    let right_labels = if panel.y2.is_some() { Y2_LABELS } else { 0 };
    let plot_w = f64::from(
        w.saturating_sub(Y_LABELS + right_labels + 2 * MARGIN)
            .max(1),
    );
    let plot_h = f64::from(
        h.saturating_sub(X_LABELS + CAPTION_HEIGHT + 2 * MARGIN)
            .max(1),
    );
    let style = (FONT, LEGEND_FONT).into_text_style(area);
    let widest = panel
        .series
        .iter()
        .map(|s| {
            area.estimate_text_size(&s.name, &style)
                .map_or(0, |(w, _)| w)
        })
        .max()
        .unwrap_or(0);
    let rows = panel.series.len() as f64;
    let box_w = f64::from(widest) + 45.0;
    let box_h = rows * 18.0 + 12.0;
    ((box_w / plot_w).min(0.9), (box_h / plot_h).min(0.9))
}

/// The legend corner whose region of size `size` (fractions of the plotting area) holds the
/// fewest of `points` (normalised to [0, 1]² of the plotting area), with that count; ties go to
/// upper left, upper right, lower right, lower left.
fn legend_corner(
    points: impl Iterator<Item = (f64, f64)>,
    size: (f64, f64),
) -> (SeriesLabelPosition, usize) {
    let mut counts = [0usize; 4];
    for (u, v) in points {
        let (left, right) = (u <= size.0, u >= 1.0 - size.0);
        let (low, high) = (v <= size.1, v >= 1.0 - size.1);
        let inside = [high && left, high && right, low && right, low && left];
        for (count, hit) in counts.iter_mut().zip(inside) {
            *count += usize::from(hit);
        }
    }
    let corners = [
        SeriesLabelPosition::UpperLeft,
        SeriesLabelPosition::UpperRight,
        SeriesLabelPosition::LowerRight,
        SeriesLabelPosition::LowerLeft,
    ];
    // `min_by_key` keeps the first of equal minima, which is the tie order.
    let best = (0..4).min_by_key(|&i| counts[i]).unwrap_or(0);
    (corners[best].clone(), counts[best])
}

/// Where the legend of `panel` goes on the drawing-coordinate ranges `x`, `y` (left axis) and
/// `y2` (right axis), each series' points mapped through the range of its own y axis: the corner
/// with the fewest points under a `size` box, and, when every corner has some, both y ranges
/// raised by the box's height so that the legend sits above the data in an upper corner.
fn legend_layout(
    panel: &Panel,
    x: &std::ops::Range<f64>,
    (y, y2): (std::ops::Range<f64>, std::ops::Range<f64>),
    size: (f64, f64),
) -> (
    SeriesLabelPosition,
    std::ops::Range<f64>,
    std::ops::Range<f64>,
) {
    let corner = |y: &std::ops::Range<f64>, y2: &std::ops::Range<f64>| {
        let unit = |v: f64, r: &std::ops::Range<f64>| (v - r.start) / (r.end - r.start);
        let y2s = panel.y2.as_ref().map_or(Scale::Linear, |a| a.scale);
        let points = panel.series.iter().flat_map(|s| {
            let (scale, yr) = match s.axis {
                Axis::Left => (panel.y.scale, y),
                Axis::Right => (y2s, y2),
            };
            points_on(s, panel.x.scale, scale)
                .into_iter()
                .map(move |(px, py)| (unit(px, x), unit(py, yr)))
        });
        legend_corner(points, size)
    };
    let (position, crowded) = corner(&y, &y2);
    if crowded == 0 || size.1 >= 0.9 {
        return (position, y, y2);
    }
    // The data's top lands 2 % of the height below the legend box.
    let raise = |r: std::ops::Range<f64>| r.start..r.start + (r.end - r.start) / (0.98 - size.1);
    let (y, y2) = (raise(y), raise(y2));
    (corner(&y, &y2).0, y, y2)
}

/// Splits a polyline into runs that meet at its sharp turns in pixels (interior angle under 60°).
/// The bitmap backend strokes a wide line as a polygon whose inner corner at a turn of angle φ lies
/// (width/2)/sin(φ/2) from the line, unbounded as the line doubles back: a dense, noisy series (a
/// per-step loss) grew thin spikes far outside its panel. Each run is stroked on its own.
fn split_at_sharp_turns(
    points: &[(f64, f64)],
    pixel: impl Fn(&(f64, f64)) -> (i32, i32),
) -> Vec<Vec<(f64, f64)>> {
    // Points at distinct pixels, as the backend sees the line.
    let mut distinct: Vec<(usize, (i32, i32))> = Vec::new();
    for (i, p) in points.iter().enumerate() {
        let at = pixel(p);
        if distinct.last().is_none_or(|&(_, last)| last != at) {
            distinct.push((i, at));
        }
    }
    let sharp = |a: (i32, i32), b: (i32, i32), c: (i32, i32)| {
        let (u, v) = (
            (f64::from(a.0 - b.0), f64::from(a.1 - b.1)),
            (f64::from(c.0 - b.0), f64::from(c.1 - b.1)),
        );
        let cos = (u.0 * v.0 + u.1 * v.1) / ((u.0.hypot(u.1)) * (v.0.hypot(v.1)));
        cos > 0.5
    };
    let mut runs = Vec::new();
    let mut start = 0;
    for w in distinct.windows(3) {
        if sharp(w[0].1, w[1].1, w[2].1) {
            runs.push(points[start..=w[1].0].to_vec());
            start = w[1].0;
        }
    }
    runs.push(points[start..].to_vec());
    runs
}

fn rgb(style: &Style) -> RGBColor {
    RGBColor(style.color.0, style.color.1, style.color.2)
}

/// The largest font size, up to 24 px, at which `title` fits the canvas width (10 px at least).
fn title_font_size<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str) -> f64 {
    let width = root.dim_in_pixel().0.saturating_sub(20);
    (10..=24)
        .rev()
        .map(f64::from)
        .find(|&size| {
            root.estimate_text_size(title, &(FONT, size).into_text_style(root))
                .is_ok_and(|(w, _)| w <= width)
        })
        .unwrap_or(10.0)
}

fn draw<DB: DrawingBackend>(figure: &Figure, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
    let text = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|e| text(&e))?;
    let body = if figure.title.is_empty() {
        root.clone()
    } else {
        let size = title_font_size(root, &figure.title);
        root.titled(&figure.title, (FONT, size))
            .map_err(|e| text(&e))?
    };
    let cols = figure.columns.clamp(1, figure.panels.len().max(1));
    let areas = body.split_evenly((figure.rows().max(1), cols));
    for (panel, area) in figure.panels.iter().zip(&areas) {
        draw_panel(panel, area).map_err(|e| format!("panel `{}`: {e}", panel.title))?;
    }
    root.present().map_err(|e| text(&e))
}

fn draw_panel<DB: DrawingBackend>(
    panel: &Panel,
    area: &DrawingArea<DB, Shift>,
) -> Result<(), String> {
    let text = |e: &dyn std::fmt::Display| e.to_string();
    let panel = &without_outlying_dots(panel);
    let (xs, ys) = (panel.x.scale, panel.y.scale);
    let y2s = panel.y2.as_ref().map_or(Scale::Linear, |a| a.scale);
    let left: Vec<_> = panel
        .series
        .iter()
        .filter(|s| s.axis == Axis::Left)
        .collect();
    let right: Vec<_> = panel
        .series
        .iter()
        .filter(|s| s.axis == Axis::Right)
        .collect();
    let xr = range(
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().filter_map(|p| to_coord(p.0, xs))),
    );
    let yr = range(left.iter().flat_map(|s| points_on(s, xs, ys)).map(|p| p.1));
    let y2r = range(
        right
            .iter()
            .flat_map(|s| points_on(s, xs, y2s))
            .map(|p| p.1),
    );
    let (legend, yr, y2r) = legend_layout(panel, &xr, (yr, y2r), legend_box(area, panel));
    let (x_labels, y_labels, y2_labels) = (
        Labels::of(&xr, xs),
        Labels::of(&yr, ys),
        Labels::of(&y2r, y2s),
    );
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, CAPTION_FONT))
        .margin(MARGIN)
        .x_label_area_size(X_LABELS)
        .y_label_area_size(Y_LABELS)
        .right_y_label_area_size(if panel.y2.is_some() { Y2_LABELS } else { 0 })
        .build_cartesian_2d(Ticked::new(&xr, xs), Ticked::new(&yr, ys))
        .map_err(|e| text(&e))?
        .set_secondary_coord(Ticked::new(&xr, xs), Ticked::new(&y2r, y2s));
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .bold_line_style(BLACK.mix(0.08))
        .x_desc(panel.x.label.as_str())
        .y_desc(panel.y.label.as_str())
        .x_label_formatter(&|v| tick_label(*v, xs, x_labels))
        .y_label_formatter(&|v| tick_label(*v, ys, y_labels))
        .label_style((FONT, 13))
        .draw()
        .map_err(|e| text(&e))?;
    if let Some(y2) = &panel.y2 {
        chart
            .configure_secondary_axes()
            .y_desc(y2.label.as_str())
            .y_label_formatter(&|v| tick_label(*v, y2s, y2_labels))
            .label_style((FONT, 13))
            .draw()
            .map_err(|e| text(&e))?;
    }
    // Right-axis series (losses) first, so the curvature quantities are drawn on top.
    for s in right.iter().chain(left.iter()) {
        let pts = points_on(s, xs, if s.axis == Axis::Left { ys } else { y2s });
        let color = rgb(&s.style);
        let line = ShapeStyle::from(&color).stroke_width(2);
        let anno = match (s.style.mark, s.axis) {
            (Mark::Line, Axis::Left) => {
                let runs = split_at_sharp_turns(&pts, |p| chart.backend_coord(p));
                chart.draw_series(runs.into_iter().map(|r| PathElement::new(r, line)))
            }
            (Mark::Line, Axis::Right) => {
                let secondary = chart.borrow_secondary();
                let runs = split_at_sharp_turns(&pts, |p| secondary.backend_coord(p));
                chart.draw_secondary_series(runs.into_iter().map(|r| PathElement::new(r, line)))
            }
            (Mark::Dashed, Axis::Left) => chart.draw_series(DashedLineSeries::new(pts, 8, 5, line)),
            (Mark::Dashed, Axis::Right) => {
                chart.draw_secondary_series(DashedLineSeries::new(pts, 8, 5, line))
            }
            (Mark::Dots, Axis::Left) => chart.draw_series(
                pts.into_iter()
                    .map(|p| Circle::new(p, 2, color.mix(0.6).filled())),
            ),
            (Mark::Dots, Axis::Right) => chart.draw_secondary_series(
                pts.into_iter()
                    .map(|p| Circle::new(p, 2, color.mix(0.6).filled())),
            ),
            (Mark::LineDots, Axis::Left) => {
                chart.draw_series(LineSeries::new(pts, line).point_size(4))
            }
            (Mark::LineDots, Axis::Right) => {
                chart.draw_secondary_series(LineSeries::new(pts, line).point_size(4))
            }
        }
        .map_err(|e| text(&e))?;
        // A short line for lines, two dashes for dashed lines, a dot for dots.
        let (first, second, radius) = match s.style.mark {
            Mark::Dots => ((0, 0), (0, 0), 3),
            Mark::Dashed => ((0, 7), (11, 18), 0),
            Mark::Line | Mark::LineDots => ((0, 18), (0, 18), 0),
        };
        let dot = if radius > 0 {
            color.filled()
        } else {
            TRANSPARENT.filled()
        };
        anno.label(s.name.as_str()).legend(move |(x, y)| {
            EmptyElement::at((x, y))
                + PathElement::new(vec![(first.0, 0), (first.1, 0)], line)
                + PathElement::new(vec![(second.0, 0), (second.1, 0)], line)
                + Circle::new((9, 0), radius, dot)
        });
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.5))
        .label_font((FONT, LEGEND_FONT))
        .draw()
        .map_err(|e| text(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_titles_shrink_to_fit_the_canvas() {
        let mut buffer = vec![0u8; 520 * 380 * 3];
        let root = BitMapBackend::with_buffer(&mut buffer, (520, 380)).into_drawing_area();
        assert_eq!(title_font_size(&root, "b = 8"), 24.0);
        let long = "Easy CIFAR-10: GNI follows 2/η through η changes, λmax does not move";
        let size = title_font_size(&root, long);
        assert!(size < 24.0, "{size}");
        let (w, _) = root
            .estimate_text_size(long, &(FONT, size).into_text_style(&root))
            .unwrap();
        assert!(w <= 500, "{w}");
    }

    use super::*;
    use crate::plot::figure::{AxisSpec, Series};
    use crate::plot::style::{column_style, threshold_style, BLUE};

    fn figure() -> Figure {
        let steps: Vec<f64> = (0..200).map(f64::from).collect();
        let lam: Vec<(f64, f64)> = steps
            .iter()
            .map(|&s| (s, 40.0 * (1.0 - (-s / 50.0).exp())))
            .collect();
        let loss: Vec<(f64, f64)> = steps
            .iter()
            .map(|&s| (s, 2.0 * (-s / 40.0).exp()))
            .collect();
        let panel = Panel {
            title: "b = 8".into(),
            x: AxisSpec::linear("step"),
            y: AxisSpec::linear("sharpness"),
            y2: Some(AxisSpec::log("loss")),
            series: vec![
                Series {
                    name: "2/η".into(),
                    style: threshold_style(),
                    axis: Axis::Left,
                    points: vec![(0.0, 50.0), (199.0, 50.0)],
                },
                Series {
                    name: "λmax".into(),
                    style: column_style("lambda_max", 0),
                    axis: Axis::Left,
                    points: lam,
                },
                Series {
                    name: "loss".into(),
                    style: column_style("loss", 1),
                    axis: Axis::Right,
                    points: loss,
                },
            ],
        };
        let mut loglog = panel.clone();
        loglog.x = AxisSpec::log("b");
        loglog.y = AxisSpec::log("gap");
        loglog.y2 = None;
        loglog.series.truncate(2);
        Figure {
            title: "test".into(),
            columns: 2,
            panel_size: (400, 300),
            panels: vec![panel, loglog],
        }
    }

    fn dots(name: &str, ys: impl Iterator<Item = f64>) -> Series {
        Series {
            name: name.into(),
            style: column_style("step_sharpness", 0),
            axis: Axis::Left,
            points: ys.enumerate().map(|(i, y)| (i as f64, y)).collect(),
        }
    }

    #[test]
    fn a_few_outlying_dots_are_left_out_of_the_range_and_counted() {
        let mut panel = figure().panels[0].clone();
        // 300 dots between 5 and 20, and 2 at 300: the rest of the panel spans 0–50.
        let spread = (0..300).map(|i| 5.0 + f64::from(i % 16));
        panel.series.push(dots("SS", spread.chain([300.0, 310.0])));
        let clipped = without_outlying_dots(&panel);
        let ss = clipped.series.last().unwrap();
        assert_eq!(ss.points.len(), 300);
        assert_eq!(ss.name, "SS (2 above the axis)");
        assert!(ss.points.iter().all(|p| p.1 < 21.0));
        assert_eq!(
            clipped.series[..3],
            panel.series[..3],
            "lines are untouched"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut f = figure();
        f.panels[0] = panel;
        write_svg(&f, &dir.path().join("f.svg")).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("f.svg")).unwrap();
        assert!(svg.contains("SS (2 above the axis)"));
    }

    #[test]
    fn dots_without_outliers_are_all_drawn() {
        let mut panel = figure().panels[0].clone();
        // A rising cloud whose top percent is not far above the rest; and a short series, where
        // the 99th percentile is the maximum.
        panel
            .series
            .push(dots("rising", (0..300).map(|i| f64::from(i) / 3.0)));
        panel
            .series
            .push(dots("few", [1.0, 2.0, 500.0].into_iter()));
        let clipped = without_outlying_dots(&panel);
        assert_eq!(clipped, panel);
    }

    #[test]
    fn png_and_svg_are_written_with_series_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let f = figure();
        write_png(&f, &dir.path().join("f.png")).unwrap();
        write_svg(&f, &dir.path().join("f.svg")).unwrap();
        let img = image::open(dir.path().join("f.png")).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (800, 340));
        let blue = img
            .pixels()
            .filter(|p| p.0 == [BLUE.0, BLUE.1, BLUE.2])
            .count();
        assert!(blue > 300, "λmax line missing: {blue} blue pixels");
        let svg = std::fs::read_to_string(dir.path().join("f.svg")).unwrap();
        assert!(svg.contains("λmax") && svg.contains("polyline"));
    }

    #[test]
    fn csv_lists_every_point() {
        let dir = tempfile::tempdir().unwrap();
        let f = figure();
        f.write_csv(&dir.path().join("f.csv")).unwrap();
        let text = std::fs::read_to_string(dir.path().join("f.csv")).unwrap();
        let n: usize = f
            .panels
            .iter()
            .flat_map(|p| &p.series)
            .map(|s| s.points.len())
            .sum();
        assert_eq!(text.lines().count(), n + 1);
        assert!(text.starts_with("panel,series,axis,x,y\nb = 8,2/η,left,0,50\n"));
    }

    #[test]
    fn log_axes_drop_nonpositive_values_and_label_decades() {
        assert_eq!(to_coord(-1.0, Scale::Log), None);
        assert_eq!(to_coord(100.0, Scale::Log), Some(2.0));
        assert_eq!(tick_label(2.0, Scale::Log, Labels::Plain), "100");
        assert_eq!(tick_label(-5.0, Scale::Log, Labels::Plain), "1e-5");
    }

    #[test]
    fn ticks_are_round_numbers() {
        let labels = |r: std::ops::Range<f64>, s: Scale| -> Vec<String> {
            let format = Labels::of(&r, s);
            ticks(&r, s)
                .iter()
                .map(|&v| tick_label(v, s, format))
                .collect()
        };
        assert_eq!(
            labels(-3.0..52.0, Scale::Linear),
            ["0", "10", "20", "30", "40", "50"]
        );
        // Batch sizes 8…128, linear: at least four ticks (step 50 would give two).
        assert_eq!(
            labels(8.0..128.0, Scale::Linear),
            ["20", "40", "60", "80", "100", "120"]
        );
        assert_eq!(labels(0.0..4000.0, Scale::Linear).len(), 5);
        // Batch sizes 8…128 (log): 1-2-5 multiples, not 10^0.2 steps.
        let b = 8f64.log10()..128f64.log10();
        assert_eq!(labels(b, Scale::Log), ["10", "20", "50", "100"]);
        // A log axis reaching beyond [0.01, 10⁴) writes every tick as a power of ten.
        assert_eq!(
            labels(-6.0..1.0, Scale::Log),
            ["10⁻⁶", "10⁻⁵", "10⁻⁴", "10⁻³", "10⁻²", "10⁻¹", "1", "10¹"]
        );
        assert_eq!(
            labels(-9.5..3.5, Scale::Log),
            ["10⁻⁸", "10⁻⁶", "10⁻⁴", "10⁻²", "1", "10²"]
        );
        assert_eq!(
            labels(0.0..8.2, Scale::Log),
            ["1", "10²", "10⁴", "10⁶", "10⁸"]
        );
        let wide = 2e4f64.log10()..6e5f64.log10();
        assert_eq!(
            labels(wide, Scale::Log),
            ["2×10⁴", "5×10⁴", "10⁵", "2×10⁵", "5×10⁵"]
        );
        assert_eq!(
            labels(-2.0..3.9, Scale::Log),
            ["0.01", "0.1", "1", "10", "100", "1000"]
        );
        // Under a decade, at least three ticks: integer multiples, then round linear values.
        let lambda = 12f64.log10()..45f64.log10();
        assert_eq!(labels(lambda, Scale::Log), ["20", "30", "40"]);
        let narrow = 30f64.log10()..45f64.log10();
        assert_eq!(labels(narrow, Scale::Log), ["30", "35", "40", "45"]);
        assert_eq!(tick_label(0.25, Scale::Linear, Labels::Plain), "0.25");
    }

    /// A legend box of 35 % × 30 % of the plotting area.
    const BOX: (f64, f64) = (0.35, 0.30);

    #[test]
    fn legend_avoids_the_corners_a_rising_curve_crosses() {
        use SeriesLabelPosition::{LowerRight, UpperLeft};
        let rising = |f: fn(f64) -> f64| {
            (0..=50).map(move |i| {
                let t = f64::from(i) / 50.0;
                (t, f(t))
            })
        };
        let curves: [fn(f64) -> f64; 3] = [|t| t, |t| t * t, f64::sqrt];
        for f in curves {
            let (corner, crowded) = legend_corner(rising(f), BOX);
            assert!(matches!(corner, UpperLeft | LowerRight), "{corner:?}");
            assert_eq!(crowded, 0);
        }
        // With a point in the upper left too, the lower right is the free corner.
        let with_point = rising(|t| t).chain([(0.1, 0.9)]);
        assert_eq!(legend_corner(with_point, BOX), (LowerRight, 0));
    }

    #[test]
    fn legend_leaves_a_filled_corner() {
        use SeriesLabelPosition::{LowerLeft, UpperLeft, UpperRight};
        assert_eq!(legend_corner(std::iter::empty(), BOX), (UpperLeft, 0));
        let grid = |u0: f64, v0: f64| {
            (0..10).flat_map(move |i| {
                (0..10).map(move |j| (u0 + 0.03 * f64::from(i), v0 + 0.03 * f64::from(j)))
            })
        };
        assert_eq!(legend_corner(grid(0.0, 0.72), BOX), (UpperRight, 0));
        // Upper left full, one point at upper right and lower right each: lower left wins.
        let more = grid(0.0, 0.72).chain([(0.9, 0.9), (0.9, 0.1)]);
        assert_eq!(legend_corner(more, BOX), (LowerLeft, 0));
    }

    #[test]
    fn legend_counts_twin_axis_series_on_their_own_range() {
        let mut panel = figure().panels.remove(0);
        panel.series = vec![
            Series {
                name: "λmax".into(),
                style: column_style("lambda_max", 0),
                axis: Axis::Left,
                points: (0..=20).map(|i| (f64::from(i), f64::from(i))).collect(),
            },
            // 1e-2 tops the log twin axis (upper left) but is 0 on the left axis (lower left).
            Series {
                name: "loss".into(),
                style: column_style("loss", 1),
                axis: Axis::Right,
                points: (0..=5).map(|i| (f64::from(i), 1e-2)).collect(),
            },
        ];
        let ranges = (0.0..20.0, -4.0..-2.0);
        let (corner, y, y2) = legend_layout(&panel, &(0.0..20.0), ranges.clone(), BOX);
        assert_eq!(corner, SeriesLabelPosition::LowerRight);
        assert_eq!((y, y2), ranges);
    }

    /// The test figure's first panel holding only `points` of `column`, on the left axis.
    fn panel_of(column: &str, points: Vec<(f64, f64)>) -> Panel {
        let mut panel = figure().panels.remove(0);
        panel.series = vec![Series {
            name: column.into(),
            style: column_style(column, 0),
            axis: Axis::Left,
            points,
        }];
        panel
    }

    #[test]
    fn a_legend_with_no_free_corner_gets_headroom_above_the_data() {
        // Points over the whole plotting area: every corner is crowded.
        let mut panel = panel_of(
            "batch_sharpness",
            (0..=20)
                .flat_map(|i| (0..=20).map(move |j| (f64::from(i), f64::from(j))))
                .collect(),
        );
        let x = 0.0..20.0;
        let (corner, y, y2) = legend_layout(&panel, &x, (0.0..20.0, 0.0..1.0), BOX);
        assert_eq!(corner, SeriesLabelPosition::UpperLeft);
        // The top 32 % of the raised range holds no data.
        assert!(
            (y.end - 20.0 / 0.68).abs() < 1e-9 && y.start == 0.0,
            "{y:?}"
        );
        assert!((y2.end - 1.0 / 0.68).abs() < 1e-9, "{y2:?}");
        // The box is sized from the panel: more series, a taller box.
        let mut pixels = vec![0u8; 520 * 380 * 3];
        let area = BitMapBackend::with_buffer(&mut pixels, (520, 380)).into_drawing_area();
        let one = legend_box(&area, &panel);
        panel.series.extend(panel.series.clone());
        let two = legend_box(&area, &panel);
        assert!(two.1 > one.1 && two.0 == one.0, "{one:?} {two:?}");
    }

    #[test]
    fn lines_split_only_where_they_double_back() {
        let pixel = |p: &(f64, f64)| (p.0 as i32, p.1 as i32);
        let zigzag = [(0.0, 0.0), (1.0, 10.0), (2.0, 0.0), (2.0, 0.2), (3.0, 10.0)];
        // (2, 0.2) is the pixel of (2, 0): the turn at it is the turn at (2, 0).
        assert_eq!(
            split_at_sharp_turns(&zigzag, pixel),
            vec![
                zigzag[..2].to_vec(),
                zigzag[1..3].to_vec(),
                zigzag[2..].to_vec()
            ]
        );
        let gentle = [(0.0, 0.0), (10.0, 1.0), (20.0, 0.0), (30.0, 5.0)];
        assert_eq!(split_at_sharp_turns(&gentle, pixel), vec![gentle.to_vec()]);
    }

    #[test]
    fn a_dense_zigzag_stays_inside_its_panel() {
        let panel = panel_of(
            "lambda_max",
            (0..400).map(|i| (f64::from(i), f64::from(i % 2))).collect(),
        );
        let (w, h) = (520, 380);
        let mut pixels = vec![0u8; w * h * 3];
        {
            let area =
                BitMapBackend::with_buffer(&mut pixels, (w as u32, h as u32)).into_drawing_area();
            draw_panel(&panel, &area).unwrap();
            area.present().unwrap();
        }
        let blue_in_rows = |rows: std::ops::Range<usize>| {
            rows.flat_map(|y| (0..w).map(move |x| (y * w + x) * 3))
                .filter(|&i| pixels[i..i + 3] == [BLUE.0, BLUE.1, BLUE.2])
                .count()
        };
        assert!(blue_in_rows(h / 3..2 * h / 3) > 1000, "the line is drawn");
        // The caption above the plotting area and the tick labels below it hold no line.
        assert_eq!(blue_in_rows(0..20), 0);
        assert_eq!(blue_in_rows(h - 30..h), 0);
    }

    #[test]
    fn unwritable_path_is_an_error_naming_it() {
        let err = write_png(&figure(), Path::new("/nonexistent-dir/f.png")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/f.png"));
    }
}
