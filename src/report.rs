//! Turning executor events and plans into output: a line per stage (cached / running / done /
//! failed / skipped) with indicatif bars and ETA on a terminal, plain lines otherwise; the JSON of
//! `--report FILE` and `plan --json`; the human plan table; the DAG as dot or mermaid.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::exec::{Assessment, Event, EventSink, Outcome, Status};
use crate::graph::{Plan, PlannedStage};

/// Where human progress goes.
enum Mode {
    /// Bars on a terminal.
    Bars {
        multi: MultiProgress,
        bars: Mutex<HashMap<usize, ProgressBar>>,
    },
    /// Plain lines on a writer (stderr when not a terminal).
    Lines(Mutex<Box<dyn Write + Send>>),
}

/// Progress for people: bars with ETA on a terminal, one line per stage event otherwise.
pub struct HumanReporter {
    mode: Mode,
}

impl HumanReporter {
    /// Progress on stderr; `terminal` says whether stderr is one (decided by the caller).
    pub fn stderr(terminal: bool) -> HumanReporter {
        if terminal {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            HumanReporter {
                mode: Mode::Bars {
                    multi,
                    bars: Mutex::new(HashMap::new()),
                },
            }
        } else {
            HumanReporter::lines(Box::new(std::io::stderr()))
        }
    }

    /// Plain lines on any writer.
    pub fn lines(out: Box<dyn Write + Send>) -> HumanReporter {
        HumanReporter {
            mode: Mode::Lines(Mutex::new(out)),
        }
    }

    fn line(&self, text: &str) {
        match &self.mode {
            Mode::Bars { multi, .. } => {
                let _ = multi.println(text);
            }
            Mode::Lines(out) => {
                if let Ok(mut w) = out.lock() {
                    let _ = writeln!(w, "{text}");
                }
            }
        }
    }

    fn bar(&self, index: usize, f: impl FnOnce(&ProgressBar)) {
        if let Mode::Bars { bars, .. } = &self.mode {
            if let Some(b) = bars.lock().ok().and_then(|b| b.get(&index).cloned()) {
                f(&b);
            }
        }
    }
}

/// `"; diverged at step 7"` after a line, or nothing.
fn with_note(note: Option<&str>) -> String {
    note.map(|n| format!("; {n}")).unwrap_or_default()
}

fn label(plan: &Plan, index: usize) -> String {
    let s = &plan.stages[index];
    format!("{} ({} {})", s.name, s.kind_name, s.key.short())
}

impl EventSink for HumanReporter {
    fn event(&self, plan: &Plan, event: Event) {
        match event {
            Event::Cached { index, note } => self.line(&format!(
                "cached   {}{}",
                label(plan, index),
                with_note(note.as_deref())
            )),
            Event::Waiting { index } => self.line(&format!(
                "waiting  {}: another process is computing it",
                label(plan, index)
            )),
            Event::Started { index } => match &self.mode {
                Mode::Bars { multi, bars } => {
                    let b = multi.add(ProgressBar::new_spinner());
                    b.set_style(
                        ProgressStyle::with_template("{spinner} {prefix} {elapsed}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    b.set_prefix(label(plan, index));
                    b.enable_steady_tick(Duration::from_millis(200));
                    if let Ok(mut m) = bars.lock() {
                        m.insert(index, b);
                    }
                }
                Mode::Lines(_) => self.line(&format!("running  {}", label(plan, index))),
            },
            Event::Length { index, total } => self.bar(index, |b| {
                b.set_length(total);
                b.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {pos}/{len} {elapsed} ETA {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
            }),
            Event::Position { index, done } => self.bar(index, |b| b.set_position(done)),
            Event::Computed {
                index,
                seconds,
                note,
            } => {
                self.finish_bar(index);
                self.line(&format!(
                    "done     {} in {seconds:.2} s{}",
                    label(plan, index),
                    with_note(note.as_deref())
                ));
            }
            Event::Failed {
                index,
                message,
                log,
            } => {
                self.finish_bar(index);
                let log = log
                    .map(|l| format!(" (log: {})", l.display()))
                    .unwrap_or_default();
                self.line(&format!("failed   {}: {message}{log}", label(plan, index)));
            }
            Event::Skipped { index, because } => self.line(&format!(
                "skipped  {}: input {} failed",
                label(plan, index),
                plan.stages[because].name
            )),
        }
    }
}

impl HumanReporter {
    fn finish_bar(&self, index: usize) {
        if let Mode::Bars { multi, bars } = &self.mode {
            if let Some(b) = bars.lock().ok().and_then(|mut m| m.remove(&index)) {
                b.finish_and_clear();
                multi.remove(&b);
            }
        }
    }
}

/// The end-of-run summary: counts, the results that carry a note (runs that diverged), then every
/// failure with its log.
pub fn summary(plan: &Plan, outcomes: &[Outcome]) -> String {
    let count = |s: Status| outcomes.iter().filter(|o| o.status == s).count();
    let mut out = format!(
        "{}: {} computed, {} cached, {} failed, {} skipped",
        plan.pipeline,
        count(Status::Computed),
        count(Status::Cached),
        count(Status::Failed),
        count(Status::Skipped)
    );
    for (i, o) in outcomes.iter().enumerate() {
        if let (Status::Computed | Status::Cached, Some(note)) = (o.status, &o.message) {
            out.push_str(&format!("\n  {}: {note}", plan.stages[i].name));
        }
    }
    for (i, o) in outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| o.status == Status::Failed)
    {
        out.push_str(&format!(
            "\n  FAILED {}: {}",
            plan.stages[i].name,
            o.message.as_deref().unwrap_or("")
        ));
        if let Some(log) = &o.log {
            out.push_str(&format!("\n         log: {}", log.display()));
        }
    }
    out
}

/// The `train` runs of the plan that diverged (computed now or cached), as `name (diverged at
/// step k)`. Other kinds' divergence (the `quadratic`'s, which figure 3 is about) is their result.
pub fn diverged_runs(plan: &Plan, outcomes: &[Outcome]) -> Vec<String> {
    plan.stages
        .iter()
        .zip(outcomes)
        .filter(|(stage, _)| stage.kind_name == "train")
        .filter_map(|(stage, o)| match (o.status, &o.message) {
            (Status::Computed | Status::Cached, Some(note)) => {
                Some(format!("{} ({note})", stage.name))
            }
            _ => None,
        })
        .collect()
}

/// The `--report FILE` document: `{"stages":[{"name","kind","key","status","seconds","message"}]}`
/// (`message`: why it failed or was skipped, a result's note such as "diverged at step 7", or null).
pub fn run_report(plan: &Plan, outcomes: &[Outcome]) -> Value {
    let stages: Vec<Value> = plan
        .stages
        .iter()
        .zip(outcomes)
        .map(|(s, o)| {
            json!({
                "name": s.name,
                "kind": s.kind_name,
                "key": s.key.as_str(),
                "status": o.status.as_str(),
                "seconds": o.seconds,
                "message": o.message,
            })
        })
        .collect();
    json!({ "stages": stages })
}

/// The `plan --json` document: `{"stages":[{"name","kind","key","status":"cached"|"stale","reason"}]}`.
pub fn plan_report(plan: &Plan, assessments: &[Assessment]) -> Value {
    let stages: Vec<Value> = plan
        .stages
        .iter()
        .zip(assessments)
        .map(|(s, a)| {
            json!({
                "name": s.name,
                "kind": s.kind_name,
                "key": s.key.as_str(),
                "status": if a.cached { "cached" } else { "stale" },
                "reason": a.reason,
            })
        })
        .collect();
    json!({ "stages": stages })
}

/// The human plan: one line per instance, then a count.
pub fn plan_text(plan: &Plan, assessments: &[Assessment]) -> String {
    let width = plan.stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (s, a) in plan.stages.iter().zip(assessments) {
        let status = if a.cached { "cached" } else { "stale " };
        let reason = if a.cached {
            String::new()
        } else {
            format!("  {}", a.reason)
        };
        out.push_str(&format!(
            "{status}  {:width$}  {:<10} {}{reason}\n",
            s.name,
            s.kind_name,
            s.key.short()
        ));
    }
    let stale = assessments.iter().filter(|a| !a.cached).count();
    out.push_str(&format!(
        "{}: {} instance(s), {stale} to compute, {} cached\n",
        plan.pipeline,
        plan.stages.len(),
        plan.stages.len() - stale
    ));
    out
}

/// The DAG in Graphviz dot.
pub fn dag_dot(plan: &Plan) -> String {
    let mut out = format!("digraph \"{}\" {{\n  rankdir=LR;\n", escape(&plan.pipeline));
    for (i, s) in plan.stages.iter().enumerate() {
        out.push_str(&format!(
            "  n{i} [label=\"{}\\n{}\"];\n",
            escape(&s.name),
            escape(&s.kind_name)
        ));
    }
    for (i, s) in plan.stages.iter().enumerate() {
        for (slot, ups) in &s.inputs {
            for u in ups {
                let label = escape(&edge_label(s, slot));
                out.push_str(&format!("  n{u} -> n{i} [label=\"{label}\"];\n"));
            }
        }
    }
    out.push_str("}\n");
    out
}

/// The DAG as a mermaid flowchart.
pub fn dag_mermaid(plan: &Plan) -> String {
    let mut out = String::from("flowchart LR\n");
    for (i, s) in plan.stages.iter().enumerate() {
        let text = format!("{}<br/>{}", s.name, s.kind_name).replace('"', "#quot;");
        out.push_str(&format!("  n{i}[\"{text}\"]\n"));
    }
    for (i, s) in plan.stages.iter().enumerate() {
        for (slot, ups) in &s.inputs {
            for u in ups {
                let label = edge_label(s, slot).replace('"', "#quot;");
                out.push_str(&format!("  n{u} -->|\"{label}\"| n{i}\n"));
            }
        }
    }
    out
}

/// An edge's label: the input slot, with the one output it takes (`run: metrics.csv`) if named.
fn edge_label(consumer: &PlannedStage, slot: &str) -> String {
    match consumer.input_outputs.get(slot) {
        Some(output) => format!("{slot}: {output}"),
        None => slot.to_string(),
    }
}

/// Escapes a string for a quoted dot identifier.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}
