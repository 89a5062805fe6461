//! Catapult detection: loss spikes above a running baseline (figure 4, figure 7's catapults).
//!
//! The baseline at a point is the median of the `window` values before it (a median, so earlier
//! spikes barely move it). A spike starts where the loss exceeds `factor` × baseline, and lasts,
//! with the baseline frozen at its start, until the loss falls back below that threshold; each
//! spike is one [`Catapult`] with its start, peak and end steps. Non-finite values are skipped.

use serde::Serialize;

use super::AnalysisError;

/// One loss spike.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Catapult {
    /// First step above the threshold.
    pub start_step: f64,
    /// Step of the largest value.
    pub peak_step: f64,
    /// The largest value.
    pub peak: f64,
    /// The running baseline when the spike started.
    pub baseline: f64,
    /// peak / baseline.
    pub ratio: f64,
    /// First step back below the threshold; `None` if the run ended inside the spike.
    pub end_step: Option<f64>,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        0.5 * (values[n / 2 - 1] + values[n / 2])
    }
}

/// Why `window` and `factor` detect nothing sensible (a window under 1 point, a factor not above
/// the baseline), naming the field at fault, or `None`.
pub fn settings_error(window: usize, factor: f64) -> Option<(&'static str, String)> {
    if window == 0 {
        Some(("window", "must be at least 1 point".to_string()))
    } else if factor.is_nan() || factor <= 1.0 {
        Some(("factor", format!("must be larger than 1, got {factor}")))
    } else {
        None
    }
}

/// Finds loss spikes in `(step, loss)` points; see the module docs for the rule. The first
/// `window` points only build the baseline.
pub fn detect_catapults(
    points: &[(f64, f64)],
    window: usize,
    factor: f64,
) -> Result<Vec<Catapult>, AnalysisError> {
    if let Some((field, problem)) = settings_error(window, factor) {
        return Err(AnalysisError::Invalid(format!(
            "catapult detection: {field} {problem}"
        )));
    }
    let pts: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
    let mut events = Vec::new();
    let mut current: Option<Catapult> = None;
    for i in window..pts.len() {
        let (step, value) = pts[i];
        match current.as_mut() {
            Some(ev) => {
                if value > factor * ev.baseline {
                    if value > ev.peak {
                        ev.peak = value;
                        ev.peak_step = step;
                        ev.ratio = value / ev.baseline;
                    }
                } else {
                    ev.end_step = Some(step);
                    events.push(*ev);
                    current = None;
                }
            }
            None => {
                let mut prev: Vec<f64> = pts[i - window..i].iter().map(|p| p.1).collect();
                let baseline = median(&mut prev);
                if baseline > 0.0 && value > factor * baseline {
                    current = Some(Catapult {
                        start_step: step,
                        peak_step: step,
                        peak: value,
                        baseline,
                        ratio: value / baseline,
                        end_step: None,
                    });
                }
            }
        }
    }
    events.extend(current);
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, LogNormal};

    #[test]
    fn finds_injected_spikes_and_nothing_else() {
        // Exponentially decaying loss with ±10 % log-normal noise and two injected spikes: steps
        // 400–409 (×20 peaking at 405) and 1500–1502 (×5).
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let noise = LogNormal::new(0.0, 0.1).unwrap();
        let points: Vec<(f64, f64)> = (0..2000)
            .map(|s| {
                let base = 2.0 * (-(s as f64) / 500.0).exp();
                let spike = match s {
                    400..=409 => 20.0 - 2.0 * (s as f64 - 405.0).abs(),
                    1500..=1502 => 5.0,
                    _ => 1.0,
                };
                (s as f64, base * spike * noise.sample(&mut rng))
            })
            .collect();
        let events = detect_catapults(&points, 50, 3.0).unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].start_step, 400.0);
        assert_eq!(events[0].peak_step, 405.0);
        assert_eq!(events[0].end_step, Some(410.0));
        assert!((events[0].ratio / 20.0 - 1.0).abs() < 0.5);
        assert_eq!(events[1].start_step, 1500.0);
        assert_eq!(events[1].end_step, Some(1503.0));
    }

    #[test]
    fn spike_running_to_the_end_is_open() {
        let mut points: Vec<(f64, f64)> = (0..20).map(|s| (s as f64, 1.0)).collect();
        points.push((20.0, 10.0));
        points.push((21.0, f64::NAN));
        let events = detect_catapults(&points, 5, 2.0).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].end_step, None);
        assert!(detect_catapults(&points, 0, 2.0).is_err());
        assert!(detect_catapults(&points, 5, 1.0).is_err());
    }
}
