//! Executor tests with small test kinds: caching, failure propagation, parallelism, exclusive
//! devices, resumable work dirs, concurrent runs and stale reasons. Also used by `graph`'s tests.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;
use crate::device::DeviceClass;
use crate::expand::Overrides;
use crate::stages::{resolve_typed, InputSlot, ParamError, Registry, Resolved, Stage, StageError};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EchoParams {
    value: String,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    fail: bool,
    #[serde(default)]
    cuda: bool,
}

/// Writes `out.txt` = its `value` followed by the `out.txt` of its inputs; counts its runs, the
/// most runs and the most exclusive-device runs seen at once.
#[derive(Default)]
pub(crate) struct Echo {
    pub runs: AtomicUsize,
    pub version: u32,
    active: AtomicUsize,
    pub max_active: AtomicUsize,
    active_cuda: AtomicUsize,
    pub max_cuda: AtomicUsize,
    /// When set, the next run writes `partial.txt` and fails (once).
    pub fail_once: AtomicBool,
    pub resumable: bool,
    pub saw_partial: AtomicBool,
}

const SLOTS: &[InputSlot] = &[
    InputSlot {
        name: "up",
        required: false,
        sweep: false,
    },
    InputSlot {
        name: "needed",
        required: false,
        sweep: false,
    },
    InputSlot {
        name: "all",
        required: false,
        sweep: true,
    },
];

impl Stage for Echo {
    fn kind(&self) -> &'static str {
        "echo"
    }
    fn version(&self, _params: &serde_json::Value) -> u32 {
        self.version.max(1)
    }
    fn resolve(&self, params: &serde_json::Value) -> Result<Resolved, ParamError> {
        let (p, canonical): (EchoParams, _) = resolve_typed(params)?;
        if p.value.is_empty() {
            return Err(ParamError {
                path: "value".into(),
                message: "must not be empty".into(),
            });
        }
        let device = if p.cuda {
            DeviceClass::Cuda
        } else {
            DeviceClass::Cpu
        };
        Ok(Resolved {
            params: canonical,
            external_files: vec![],
            device,
            needs_inputs: Vec::new(),
        })
    }
    fn inputs(&self) -> &'static [InputSlot] {
        SLOTS
    }
    fn resumable(&self) -> bool {
        self.resumable
    }
    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let p: EchoParams = serde_json::from_value(ctx.params.clone()).unwrap();
        let partial = ctx.work_dir.join("partial.txt");
        if partial.exists() {
            self.saw_partial.store(true, Ordering::SeqCst);
        }
        if self.fail_once.swap(false, Ordering::SeqCst) {
            std::fs::write(&partial, "half").unwrap();
            return Err(StageError::Failed("interrupted".into()));
        }
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(now, Ordering::SeqCst);
        if p.cuda {
            let now = self.active_cuda.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_cuda.fetch_max(now, Ordering::SeqCst);
        }
        ctx.reporter.set_length(2);
        ctx.reporter.log(&format!("echo {}", p.value));
        std::thread::sleep(Duration::from_millis(p.sleep_ms));
        ctx.reporter.set_position(2);
        self.active.fetch_sub(1, Ordering::SeqCst);
        if p.cuda {
            self.active_cuda.fetch_sub(1, Ordering::SeqCst);
        }
        if p.fail {
            return Err(StageError::Failed("asked to fail".into()));
        }
        let mut text = p.value.clone();
        for arts in ctx.inputs.values() {
            for a in arts {
                let path = a.dir.join("out.txt");
                text.push_str(
                    &std::fs::read_to_string(&path).map_err(|e| StageError::io(path, e))?,
                );
            }
        }
        let out = ctx.work_dir.join("out.txt");
        std::fs::write(&out, text).map_err(|e| StageError::io(out, e))?;
        std::fs::write(ctx.work_dir.join("summary.json"), r#"{"ok": true}"#).unwrap();
        Ok(())
    }
}

/// Collects events.
#[derive(Default)]
pub(crate) struct Recorder(Mutex<Vec<Event>>);

impl EventSink for Recorder {
    fn event(&self, _: &Plan, event: Event) {
        self.0.lock().unwrap().push(event);
    }
}

pub(crate) fn plan_for(text: &str, echo: &Arc<Echo>, store: &Store) -> Plan {
    plan_with(text, echo, store, &Overrides::default()).unwrap()
}

pub(crate) fn plan_with(
    text: &str,
    echo: &Arc<Echo>,
    store: &Store,
    o: &Overrides,
) -> Result<Plan, crate::error::Invalid> {
    let p = crate::spec::parse(Path::new("p.yaml"), text.to_string())?;
    let registry = Registry::new(vec![echo.clone() as Arc<dyn Stage>]);
    crate::graph::build(&p, o, &registry, store)
}

fn opts(jobs: usize) -> RunOptions {
    RunOptions {
        jobs,
        host: "test".into(),
    }
}

fn statuses(outcomes: &[Outcome]) -> Vec<&'static str> {
    outcomes.iter().map(|o| o.status.as_str()).collect()
}

const CHAIN: &str = "name: chain\nstages:\n  a: {kind: echo, params: {value: A}}\n  b: {kind: echo, params: {value: B}, inputs: {up: a}}\n  c: {kind: echo, params: {value: C}, inputs: {up: b}}\n";

#[test]
fn chain_computes_once_then_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let echo = Arc::new(Echo::default());
    let plan = plan_for(CHAIN, &echo, &store);
    let first = run(&plan, &store, &opts(2), &Recorder::default());
    assert_eq!(statuses(&first), ["computed", "computed", "computed"]);
    let c = store.artifact_dir("echo", &plan.stages[2].key);
    assert_eq!(std::fs::read_to_string(c.join("out.txt")).unwrap(), "CBA");
    let m = crate::store::read_manifest(&c).unwrap().unwrap();
    assert_eq!(m.summary, Some(serde_json::json!({"ok": true})));
    assert_eq!(m.inputs["up"], InputKeys::One(plan.stages[1].key.clone()));
    assert!(std::fs::read_to_string(c.join(LOG))
        .unwrap()
        .contains("echo C"));
    let second = run(&plan, &store, &opts(2), &Recorder::default());
    assert_eq!(statuses(&second), ["cached", "cached", "cached"]);
    assert_eq!(echo.runs.load(Ordering::SeqCst), 3);
}

#[test]
fn a_failure_skips_only_descendants_and_keeps_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let echo = Arc::new(Echo::default());
    let text = "name: f\nstages:\n  a: {kind: echo, params: {value: A}}\n  b: {kind: echo, params: {value: B, fail: true}, inputs: {up: a}}\n  c: {kind: echo, params: {value: C}, inputs: {up: b}}\n  d: {kind: echo, params: {value: D}, inputs: {up: a}}\n  e: {kind: echo, params: {value: E}, inputs: {up: d, needed: c}}\n";
    let plan = plan_for(text, &echo, &store);
    let rec = Recorder::default();
    let out = run(&plan, &store, &opts(1), &rec);
    assert_eq!(
        statuses(&out),
        ["computed", "failed", "skipped", "computed", "skipped"]
    );
    let log = out[1].log.clone().unwrap();
    assert_eq!(log, store.work_dir("echo", &plan.stages[1].key).join(LOG));
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("asked to fail"));
    assert!(store
        .published("echo", &plan.stages[1].key)
        .unwrap()
        .is_none());
    let events = rec.0.lock().unwrap();
    assert!(events.contains(&Event::Skipped {
        index: 4,
        because: 1
    }));
}

#[test]
fn independent_stages_run_in_parallel_but_exclusive_devices_do_not_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let echo = Arc::new(Echo::default());
    let text = "name: par\nstages:\n  s:\n    kind: echo\n    params: {value: x, sleep_ms: 300}\n    matrix: {value: [a, b, c, d]}\n  g:\n    kind: echo\n    params: {value: y, sleep_ms: 50, cuda: true}\n    matrix: {value: [a, b, c, d]}\n";
    let plan = plan_for(text, &echo, &store);
    let out = run(&plan, &store, &opts(4), &Recorder::default());
    assert!(out.iter().all(|o| o.status == Status::Computed));
    // Four 300 ms stages on four jobs overlap (counted, not timed: a loaded machine may be slow);
    // the exclusive-device stages never do.
    assert!(echo.max_active.load(Ordering::SeqCst) >= 2);
    assert_eq!(echo.max_cuda.load(Ordering::SeqCst), 1);
}

#[test]
fn resumable_kinds_keep_their_work_dir_and_others_start_afresh() {
    for resumable in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let echo = Arc::new(Echo {
            resumable,
            ..Echo::default()
        });
        echo.fail_once.store(true, Ordering::SeqCst);
        let plan = plan_for(
            "name: r\nstages:\n  a: {kind: echo, params: {value: A}}\n",
            &echo,
            &store,
        );
        assert_eq!(
            statuses(&run(&plan, &store, &opts(1), &Recorder::default())),
            ["failed"]
        );
        assert_eq!(
            statuses(&run(&plan, &store, &opts(1), &Recorder::default())),
            ["computed"]
        );
        assert_eq!(echo.saw_partial.load(Ordering::SeqCst), resumable);
        // The log of a resumable kind keeps both attempts.
        let log =
            std::fs::read_to_string(store.artifact_dir("echo", &plan.stages[0].key).join(LOG))
                .unwrap();
        assert_eq!(
            log.matches("started").count(),
            if resumable { 2 } else { 1 }
        );
    }
}

#[test]
fn concurrent_runs_on_one_store_compute_each_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let echo = Arc::new(Echo::default());
    let text = "name: c\nstages:\n  s:\n    kind: echo\n    params: {value: x, sleep_ms: 100}\n    matrix: {value: [a, b, c]}\n  t: {kind: echo, params: {value: t}, inputs: {all: s}}\n";
    let plan = plan_for(text, &echo, &store);
    let results: Vec<Vec<Outcome>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| run(&plan, &store, &opts(2), &Recorder::default())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(echo.runs.load(Ordering::SeqCst), 4);
    for i in 0..4 {
        let computed = results
            .iter()
            .filter(|r| r[i].status == Status::Computed)
            .count();
        assert_eq!(computed, 1, "instance {i}");
        assert!(results.iter().all(|r| r[i].status != Status::Failed));
    }
    let t = store.artifact_dir("echo", &plan.stages[3].key);
    assert_eq!(std::fs::read_to_string(t.join("out.txt")).unwrap(), "tabc");
}

#[test]
fn plan_reasons_name_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let echo = Arc::new(Echo::default());
    let plan = plan_for(CHAIN, &echo, &store);
    let reasons = |plan: &Plan| -> Vec<String> {
        assess(plan, &store)
            .unwrap()
            .into_iter()
            .map(|a| if a.cached { "cached".into() } else { a.reason })
            .collect()
    };
    assert_eq!(reasons(&plan), ["new", "new", "new"]);
    run(&plan, &store, &opts(1), &Recorder::default());
    assert_eq!(reasons(&plan), ["cached", "cached", "cached"]);
    let changed = plan_with(
        CHAIN,
        &echo,
        &store,
        &Overrides {
            profile: None,
            sets: vec!["b.sleep_ms=1".into()],
        },
    )
    .unwrap();
    assert_eq!(
        reasons(&changed),
        ["cached", "params changed (sleep_ms)", "input changed (up)"]
    );
    let v2 = Arc::new(Echo {
        version: 2,
        ..Echo::default()
    });
    let bumped = plan_for(CHAIN, &v2, &store);
    assert_eq!(reasons(&bumped)[0], "version bumped (1 -> 2)");
}
