//! Running a plan: walks the instances in topological order, asks the store for each key, runs the
//! kinds on misses (independent ones in parallel), and emits [`Event`]s. It never prints.
//!
//! ```text
//! pipeline.yaml ─spec::load─▶ Pipeline ─expand─▶ instances ─graph::build─▶ Plan (keys known)
//!      Plan ─exec::run─▶ per instance: Store::claim ─▶ Hit (cached) | Miss (lock held)
//!                                                   └─▶ Stage::run in the work dir ─▶ Claim::publish
//!      Events ─▶ report (progress lines or bars on stderr, JSON report file)
//! ```
//!
//! A failed stage fails only its descendants (reported as skipped); the others finish. Stages on a
//! device that must be used one at a time (CUDA) never overlap; the rest use up to `jobs` threads.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use serde_json::Value;

use crate::graph::{Plan, PlannedStage};
use crate::stages::{InputArtifact, StageContext, StageError, StageReporter};
use crate::store::{InputKeys, Lookup, Manifest, Store, StoreError, LOG};

/// What happened to one instance, as it happens.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Its artifact was already published.
    Cached {
        /// Index into the plan.
        index: usize,
        /// What the result says of itself ([`Manifest::note`]).
        note: Option<String>,
    },
    /// Another process holds its key; waiting for it to finish.
    Waiting {
        /// Index into the plan.
        index: usize,
    },
    /// It started computing.
    Started {
        /// Index into the plan.
        index: usize,
    },
    /// It announced how much work it has.
    Length {
        /// Index into the plan.
        index: usize,
        /// Units of work.
        total: u64,
    },
    /// It reported progress.
    Position {
        /// Index into the plan.
        index: usize,
        /// Units done.
        done: u64,
    },
    /// It finished and its artifact is published.
    Computed {
        /// Index into the plan.
        index: usize,
        /// Wall-clock seconds.
        seconds: f64,
        /// What the result says of itself ([`Manifest::note`]).
        note: Option<String>,
    },
    /// It failed; its work directory and log are kept.
    Failed {
        /// Index into the plan.
        index: usize,
        /// Why.
        message: String,
        /// Its log file.
        log: Option<PathBuf>,
    },
    /// It did not run because an input failed.
    Skipped {
        /// Index into the plan.
        index: usize,
        /// The failed ancestor.
        because: usize,
    },
}

/// Receives events from the executor (from several threads).
pub trait EventSink: Send + Sync {
    /// Handles one event.
    fn event(&self, plan: &Plan, event: Event);
}

/// The final status of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Computed and published by this run.
    Computed,
    /// Already published.
    Cached,
    /// Failed.
    Failed,
    /// Not run because an input failed.
    Skipped,
}

impl Status {
    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Computed => "computed",
            Status::Cached => "cached",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
        }
    }
}

/// How one instance ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Final status.
    pub status: Status,
    /// Seconds spent (0 unless computed or failed).
    pub seconds: f64,
    /// For a failure: why; for a skip: which input failed; for a result: its
    /// [`Manifest::note`] (a run that diverged).
    pub message: Option<String>,
    /// The log file (published or in the failed work directory).
    pub log: Option<PathBuf>,
}

/// Execution settings.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Instances computed at once (at least 1).
    pub jobs: usize,
    /// Host name recorded in manifests.
    pub host: String,
}

/// Runs `plan` against `store`; returns one outcome per instance, in plan order.
pub fn run(plan: &Plan, store: &Store, opts: &RunOptions, sink: &dyn EventSink) -> Vec<Outcome> {
    let n = plan.stages.len();
    let consumers = plan.consumers();
    let mut waiting_on: Vec<usize> = plan
        .stages
        .iter()
        .map(|s| s.inputs.values().flatten().collect::<BTreeSet<_>>().len())
        .collect();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| waiting_on[i] == 0).collect();
    let (tx, rx) = mpsc::channel::<(usize, Outcome)>();
    let jobs = opts.jobs.max(1);
    std::thread::scope(|scope| {
        let mut running = 0usize;
        let mut exclusive_busy = false;
        loop {
            while running < jobs {
                let next = ready
                    .iter()
                    .copied()
                    .find(|&i| !(exclusive_busy && plan.stages[i].device.is_exclusive()));
                let Some(i) = next else { break };
                ready.remove(&i);
                running += 1;
                exclusive_busy |= plan.stages[i].device.is_exclusive();
                let tx = tx.clone();
                scope.spawn(move || {
                    let outcome = run_one(plan, i, store, opts, sink);
                    let _ = tx.send((i, outcome));
                });
            }
            if running == 0 {
                break;
            }
            let Ok((i, outcome)) = rx.recv() else { break };
            running -= 1;
            if plan.stages[i].device.is_exclusive() {
                exclusive_busy = false;
            }
            let ok = matches!(outcome.status, Status::Computed | Status::Cached);
            outcomes[i] = Some(outcome);
            if ok {
                for &c in &consumers[i] {
                    waiting_on[c] -= 1;
                    if waiting_on[c] == 0 && outcomes[c].is_none() {
                        ready.insert(c);
                    }
                }
            } else {
                let mut stack = consumers[i].clone();
                let mut skipped = BTreeSet::new();
                while let Some(c) = stack.pop() {
                    if outcomes[c].is_none() && skipped.insert(c) {
                        stack.extend(consumers[c].iter().copied());
                    }
                }
                for c in skipped {
                    outcomes[c] = Some(Outcome {
                        status: Status::Skipped,
                        seconds: 0.0,
                        message: Some(format!("input `{}` failed", plan.stages[i].name)),
                        log: None,
                    });
                    sink.event(
                        plan,
                        Event::Skipped {
                            index: c,
                            because: i,
                        },
                    );
                }
            }
        }
    });
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or(Outcome {
                status: Status::Skipped,
                seconds: 0.0,
                message: Some("not reached".into()),
                log: None,
            })
        })
        .collect()
}

/// Streams a stage's progress to the sink and its log lines to `log.txt`.
struct Reporter<'a> {
    plan: &'a Plan,
    index: usize,
    sink: &'a dyn EventSink,
    log: Mutex<File>,
}

impl StageReporter for Reporter<'_> {
    fn set_length(&self, total: u64) {
        self.sink.event(
            self.plan,
            Event::Length {
                index: self.index,
                total,
            },
        );
    }
    fn set_position(&self, done: u64) {
        self.sink.event(
            self.plan,
            Event::Position {
                index: self.index,
                done,
            },
        );
    }
    fn log(&self, line: &str) {
        if let Ok(mut f) = self.log.lock() {
            let _ = writeln!(f, "{line}");
        }
    }
}

fn failed(message: String, log: Option<PathBuf>) -> Outcome {
    Outcome {
        status: Status::Failed,
        seconds: 0.0,
        message: Some(message),
        log,
    }
}

fn run_one(
    plan: &Plan,
    i: usize,
    store: &Store,
    opts: &RunOptions,
    sink: &dyn EventSink,
) -> Outcome {
    let st = &plan.stages[i];
    // A failure before the stage has a log file: reported without one.
    let failed_before_log = |message: String| {
        sink.event(
            plan,
            Event::Failed {
                index: i,
                message: message.clone(),
                log: None,
            },
        );
        failed(message, None)
    };
    let lookup = store.claim(&st.kind_name, &st.key, &mut || {
        sink.event(plan, Event::Waiting { index: i })
    });
    let claim = match lookup {
        Ok(Lookup::Hit(manifest)) => {
            let note = manifest.note();
            sink.event(
                plan,
                Event::Cached {
                    index: i,
                    note: note.clone(),
                },
            );
            return Outcome {
                status: Status::Cached,
                seconds: 0.0,
                message: note,
                log: Some(store.artifact_dir(&st.kind_name, &st.key).join(LOG)),
            };
        }
        Ok(Lookup::Miss(claim)) => claim,
        Err(e) => return failed_before_log(e.to_string()),
    };
    let log_path = claim.work_dir().join(LOG);
    let prepared = (if st.kind.resumable() {
        Ok(())
    } else {
        claim.reset()
    })
    .and_then(|()| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| StoreError::Io {
                path: log_path.clone(),
                source: e,
            })
    });
    let log = match prepared {
        Ok(f) => f,
        Err(e) => return failed_before_log(e.to_string()),
    };
    let started = chrono::Utc::now();
    let reporter = Reporter {
        plan,
        index: i,
        sink,
        log: Mutex::new(log),
    };
    reporter.log(&format!(
        "== {} ({} v{}) key {} started {} on {}",
        st.name,
        st.kind_name,
        st.kind_version,
        st.key,
        started.to_rfc3339(),
        opts.host
    ));
    let inputs = input_artifacts(plan, st, store);
    sink.event(plan, Event::Started { index: i });
    let t0 = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| {
        check_named_outputs(&inputs)?;
        st.kind.run(&StageContext {
            name: &st.name,
            params: &st.params,
            inputs: &inputs,
            work_dir: claim.work_dir(),
            reporter: &reporter,
        })
    }));
    let seconds = t0.elapsed().as_secs_f64();
    let error = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(panic) => Some(format!(
            "the stage panicked: {}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
        )),
    };
    if let Some(message) = error {
        reporter.log(&format!("== failed after {seconds:.3} s: {message}"));
        let outcome = Outcome {
            seconds,
            ..failed(message.clone(), Some(log_path.clone()))
        };
        sink.event(
            plan,
            Event::Failed {
                index: i,
                message,
                log: Some(log_path),
            },
        );
        return outcome;
    }
    let finished = chrono::Utc::now();
    reporter.log(&format!("== done in {seconds:.3} s"));
    drop(reporter);
    let manifest = Manifest {
        kind: st.kind_name.clone(),
        version: st.kind_version,
        key: st.key.clone(),
        key_format: crate::key::KEY_FORMAT,
        pipeline: plan.pipeline.clone(),
        stage: st.name.clone(),
        params: st.params.clone(),
        inputs: st
            .inputs
            .iter()
            .map(|(slot, ups)| {
                let keys: Vec<_> = ups.iter().map(|&u| plan.stages[u].key.clone()).collect();
                let v = if st.sweep_slots.contains(slot) {
                    InputKeys::Many(keys)
                } else {
                    InputKeys::One(keys[0].clone())
                };
                (slot.clone(), v)
            })
            .collect(),
        input_outputs: st.input_outputs.clone(),
        external_files: st.external_files.clone(),
        device: st.device,
        outputs: BTreeMap::new(),
        summary: None,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        started: started.to_rfc3339(),
        finished: finished.to_rfc3339(),
        seconds,
        host: opts.host.clone(),
    };
    let artifact_log = store.artifact_dir(&st.kind_name, &st.key).join(LOG);
    match claim.publish(manifest) {
        Ok(manifest) => {
            let note = manifest.note();
            sink.event(
                plan,
                Event::Computed {
                    index: i,
                    seconds,
                    note: note.clone(),
                },
            );
            Outcome {
                status: Status::Computed,
                seconds,
                message: note,
                log: Some(artifact_log),
            }
        }
        Err(e) => {
            let message = format!("publishing the outputs failed: {e}");
            if let Ok(mut f) = OpenOptions::new().append(true).open(&log_path) {
                let _ = writeln!(f, "== {message}");
            }
            sink.event(
                plan,
                Event::Failed {
                    index: i,
                    message: message.clone(),
                    log: Some(log_path.clone()),
                },
            );
            Outcome {
                seconds,
                ..failed(message, Some(log_path))
            }
        }
    }
}

fn input_artifacts(
    plan: &Plan,
    st: &PlannedStage,
    store: &Store,
) -> BTreeMap<String, Vec<InputArtifact>> {
    st.inputs
        .iter()
        .map(|(slot, ups)| {
            let arts = ups
                .iter()
                .map(|&u| {
                    let up = &plan.stages[u];
                    InputArtifact {
                        stage: up.name.clone(),
                        key: up.key.to_string(),
                        dir: store.artifact_dir(&up.kind_name, &up.key),
                        params: up.params.clone(),
                        upstream_params: up.upstream_params(&plan.stages),
                        output: st.input_outputs.get(slot).cloned(),
                    }
                })
                .collect();
            (slot.clone(), arts)
        })
        .collect()
}

/// Fails when an input names an output (`stage:output`) that its artifact does not have.
fn check_named_outputs(inputs: &BTreeMap<String, Vec<InputArtifact>>) -> Result<(), StageError> {
    for (slot, arts) in inputs {
        for a in arts.iter().filter(|a| a.output.is_some()) {
            let path = a.file("");
            if !path.exists() {
                return Err(StageError::input(
                    slot.clone(),
                    format!(
                        "`{}` has no output `{}`",
                        a.stage,
                        a.output.as_deref().unwrap_or_default()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Whether an instance's artifact exists, and if not, why it must be computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    /// Published already.
    pub cached: bool,
    /// Why it is stale: `new`, `params changed (lr)`, `input changed (data)`, `version bumped (1 -> 2)`,
    /// ...; empty when cached.
    pub reason: String,
}

/// Says for every instance whether it is cached, and why it is stale otherwise (by comparing with
/// the latest artifact the same pipeline produced for the same instance name). Computes nothing.
pub fn assess(plan: &Plan, store: &Store) -> Result<Vec<Assessment>, StoreError> {
    let mut previous: Option<HashMap<String, Manifest>> = None;
    let mut out = Vec::with_capacity(plan.stages.len());
    for st in &plan.stages {
        if store.published(&st.kind_name, &st.key)?.is_some() {
            out.push(Assessment {
                cached: true,
                reason: String::new(),
            });
            continue;
        }
        if previous.is_none() {
            let mut latest: HashMap<String, Manifest> = HashMap::new();
            for (_, m) in store.artifacts()? {
                let Ok(m) = m else { continue };
                if m.pipeline != plan.pipeline {
                    continue;
                }
                if latest
                    .get(&m.stage)
                    .is_none_or(|old| old.finished < m.finished)
                {
                    latest.insert(m.stage.clone(), m);
                }
            }
            previous = Some(latest);
        }
        let prev = previous.as_ref().and_then(|p| p.get(&st.name));
        out.push(Assessment {
            cached: false,
            reason: stale_reason(plan, st, prev),
        });
    }
    Ok(out)
}

fn stale_reason(plan: &Plan, st: &PlannedStage, prev: Option<&Manifest>) -> String {
    let Some(prev) = prev else {
        return "new".into();
    };
    if prev.kind != st.kind_name {
        return format!("kind changed ({} -> {})", prev.kind, st.kind_name);
    }
    if prev.version != st.kind_version {
        return format!("version bumped ({} -> {})", prev.version, st.kind_version);
    }
    if prev.params != st.params {
        let mut paths = Vec::new();
        diff_paths(&prev.params, &st.params, "", &mut paths);
        return format!("params changed ({})", paths.join(", "));
    }
    let changed: Vec<&str> = st
        .inputs
        .iter()
        .filter(|(slot, ups)| {
            let now: Vec<&crate::key::Key> = ups.iter().map(|&u| &plan.stages[u].key).collect();
            prev.inputs.get(*slot).map(InputKeys::keys) != Some(now)
        })
        .map(|(slot, _)| slot.as_str())
        .chain(
            prev.inputs
                .keys()
                .filter(|s| !st.inputs.contains_key(*s))
                .map(String::as_str),
        )
        .collect();
    if !changed.is_empty() {
        return format!("input changed ({})", changed.join(", "));
    }
    if prev.external_files != st.external_files {
        return "external file changed".into();
    }
    if prev.device != st.device {
        return "device changed".into();
    }
    "key format changed".into()
}

/// Dotted paths at which two JSON values differ.
fn diff_paths(a: &Value, b: &Value, at: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let sub = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => diff_paths(p, q, &sub, out),
                    _ => out.push(sub),
                }
            }
        }
        _ if a != b => out.push(if at.is_empty() {
            "params".into()
        } else {
            at.to_string()
        }),
        _ => {}
    }
}

#[cfg(test)]
pub(crate) mod tests;
