//! The one integration test binary: drives the real `eoss` binary on temporary stores and tiny
//! synthetic pipelines (the `dataset` kind with `source: synthetic`, small MLPs for `train`), plus
//! one small real CIFAR-10 run when `../shared/data/cifar10` exists, and SVHN pipelines on generated
//! files in the official layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "../../src/data/svhn_fixture.rs"]
mod svhn_fixture;

/// A temporary working directory with a store inside.
struct Env {
    dir: tempfile::TempDir,
    /// `EOSS_DATA` for the commands (unset when `None`).
    data: Option<PathBuf>,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
            data: None,
        }
    }

    /// An environment whose commands read real data from `data` (as `EOSS_DATA`).
    fn with_data(data: PathBuf) -> Env {
        Env {
            data: Some(data),
            ..Env::new()
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn store(&self) -> PathBuf {
        self.path().join("store")
    }

    /// Writes a pipeline file and returns its path.
    fn pipeline(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_eoss"));
        c.current_dir(self.path())
            .env("EOSS_ARTIFACTS", self.store());
        match &self.data {
            Some(data) => c.env("EOSS_DATA", data),
            None => c.env_remove("EOSS_DATA"),
        };
        c
    }

    /// Runs eoss; returns (exit code, stdout, stderr).
    fn eoss(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.cmd().args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `eoss run` with `--report`; returns name → status, asserting the exit code.
    fn run(&self, pipeline: &Path, extra: &[&str], code: i32) -> Vec<(String, String)> {
        let report = self.path().join("report.json");
        let mut args = vec![
            "run",
            pipeline.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (c, _, err) = self.eoss(&args);
        assert_eq!(c, code, "{err}");
        statuses(&std::fs::read_to_string(report).unwrap())
    }

    /// `plan --json` as (name, status, reason).
    fn plan(&self, pipeline: &Path, extra: &[&str]) -> Vec<(String, String, String)> {
        let mut args = vec!["plan", pipeline.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        let (c, out, err) = self.eoss(&args);
        assert_eq!(c, 0, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let f = |k: &str| s[k].as_str().unwrap().to_string();
                (f("name"), f("status"), f("reason"))
            })
            .collect()
    }
}

fn statuses(report: &str) -> Vec<(String, String)> {
    let v: Value = serde_json::from_str(report).unwrap();
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert!(s["key"].as_str().unwrap().len() == 64 && s["seconds"].is_number());
            (
                s["name"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

const TWO: &str = "name: two\nstages:\n  small:\n    kind: dataset\n    params: {source: synthetic, n: 32, seed: 1, synthetic: {channels: 1, height: 4, width: 4, num_classes: 2, train_size: 64}}\n  swept:\n    kind: dataset\n    params: {source: synthetic, n: 16, synthetic: {channels: 1, height: 4, width: 4, num_classes: 2, train_size: 64}}\n    matrix: {seed: [1, 2]}\n";

/// A dataset big enough to take seconds in a debug build.
fn slow(name: &str) -> String {
    format!("name: {name}\nstages:\n  big:\n    kind: dataset\n    params: {{source: synthetic, n: 30000, synthetic: {{channels: 3, height: 16, width: 16, num_classes: 10, train_size: 30000}}}}\n")
}

fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() != "log.txt"
                && p.file_name().unwrap() != "manifest.json"
            {
                out.push((
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn second_run_computes_nothing_and_artifacts_are_byte_identical() {
    let env = Env::new();
    let p = env.pipeline("two.yaml", TWO);
    let first = env.run(&p, &["--jobs", "2"], 0);
    assert_eq!(
        first,
        pairs(&[
            ("small", "computed"),
            ("swept[seed=1]", "computed"),
            ("swept[seed=2]", "computed")
        ])
    );
    let before = all_files(&env.store().join("dataset"));
    assert_eq!(
        before.len(),
        3 * 2,
        "dataset.safetensors and summary.json per artifact"
    );
    let second = env.run(&p, &[], 0);
    assert!(second.iter().all(|(_, s)| s == "cached"), "{second:?}");
    assert!(env.plan(&p, &[]).iter().all(|(_, s, _)| s == "cached"));
    // Computing again from scratch in another store gives the same bytes.
    std::fs::rename(env.store(), env.path().join("old")).unwrap();
    env.run(&p, &[], 0);
    assert_eq!(all_files(&env.store().join("dataset")), before);
}

#[test]
fn changing_one_param_recomputes_exactly_that_stage() {
    // `dataset` has no inputs, so descendants are covered by exec's unit tests; here the changed
    // stage is recomputed and its siblings are not.
    let env = Env::new();
    let p = env.pipeline("two.yaml", TWO);
    env.run(&p, &[], 0);
    let plan = env.plan(&p, &["--set", "small.n=48"]);
    assert_eq!(plan[0].1, "stale");
    assert_eq!(plan[0].2, "params changed (n)");
    assert!(plan[1..].iter().all(|(_, s, _)| s == "cached"));
    let second = env.run(&p, &["--set", "small.n=48"], 0);
    assert_eq!(
        second,
        pairs(&[
            ("small", "computed"),
            ("swept[seed=1]", "cached"),
            ("swept[seed=2]", "cached")
        ])
    );
    let narrowed = env.run(&p, &["--set", "swept.seed=2"], 0);
    assert_eq!(
        narrowed,
        pairs(&[("small", "cached"), ("swept[seed=2]", "cached")])
    );
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `eoss run pipeline` and kills it (SIGKILL: no destructor, no cleanup) once `ready` holds.
fn kill_run_when(
    env: &Env,
    pipeline: &Path,
    what: &str,
    timeout: Duration,
    ready: impl FnMut() -> bool,
) {
    let mut child = env
        .cmd()
        .args(["run", pipeline.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(what, timeout, ready);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The artifact of `stage` after running `text` (as `file`) in a fresh store, which is returned too
/// (the artifact lives in it).
fn uninterrupted_artifact(file: &str, text: &str, stage: &str) -> (Env, PathBuf) {
    let env = Env::new();
    let p = env.pipeline(file, text);
    env.run(&p, &[], 0);
    let dir = artifact(&env, &p, &[], stage);
    (env, dir)
}

fn work_dirs(store: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(store.join("tmp"))
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_concurrent_runs_compute_each_key_once() {
    let env = Env::new();
    let p = env.pipeline("slow.yaml", &slow("concurrent"));
    let start = |report: &str| {
        env.cmd()
            .args(["run", p.to_str().unwrap(), "--report", report])
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut a = start("a.json");
    let mut b = start("b.json");
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    let ra = statuses(&std::fs::read_to_string(env.path().join("a.json")).unwrap());
    let rb = statuses(&std::fs::read_to_string(env.path().join("b.json")).unwrap());
    let mut both = vec![ra[0].1.clone(), rb[0].1.clone()];
    both.sort();
    assert_eq!(both, ["cached", "computed"]);
    // The published key leaves no lock file behind, whichever run waited.
    let locks: Vec<_> = std::fs::read_dir(env.store().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(locks.is_empty(), "{locks:?}");
}

#[test]
fn kill_during_a_stage_leaves_no_artifact_and_the_rerun_completes() {
    let env = Env::new();
    let p = env.pipeline("slow.yaml", &slow("killed"));
    // Killed 300 ms into the stage.
    kill_run_when(
        &env,
        &p,
        "the stage to start",
        Duration::from_secs(20),
        || {
            let started = work_dirs(&env.store())
                .iter()
                .any(|d| d.join("log.txt").exists());
            if started {
                std::thread::sleep(Duration::from_millis(300));
            }
            started
        },
    );
    assert!(
        !env.store().join("dataset").exists()
            || std::fs::read_dir(env.store().join("dataset"))
                .unwrap()
                .next()
                .is_none()
    );
    assert_eq!(env.plan(&p, &[])[0].1, "stale");
    let (code, out, _) = env.eoss(&["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("leftover (failed or killed)"), "{out}");
    assert_eq!(env.run(&p, &[], 0), pairs(&[("big", "computed")]));
    assert!(
        work_dirs(&env.store()).is_empty(),
        "the work dir was published"
    );
}

fn redact(text: &str, env: &Env) -> String {
    text.replace(env.path().to_str().unwrap(), "[TMP]")
}

#[test]
fn invalid_pipelines_get_precise_messages_and_exit_2() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert!(names.len() >= 9);
    for path in names {
        let env = Env::new();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let local = env.pipeline(&name, &std::fs::read_to_string(&path).unwrap());
        let (code, out, err) = env.eoss(&["plan", local.file_name().unwrap().to_str().unwrap()]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(out.is_empty(), "{name}");
        insta::assert_snapshot!(name.trim_end_matches(".yaml"), redact(&err, &env));
        // `run` validates the same way and computes nothing.
        let (code, _, _) = env.eoss(&["run", local.to_str().unwrap()]);
        assert_eq!(code, 2);
        assert!(!env.store().join("dataset").exists());
    }
}

#[test]
fn command_line_mistakes_exit_2() {
    let env = Env::new();
    let p = env.pipeline("two.yaml", TWO);
    let cases: &[(&[&str], &str)] = &[
        (
            &["plan", "two.yaml", "--set", "nosuch.n=1"],
            "the pipeline has no stage named `nosuch`",
        ),
        (
            &["plan", "two.yaml", "--set", "small.n=-3"],
            "--set small.n=-3: invalid value",
        ),
        (
            &["plan", "two.yaml", "--profile", "paper"],
            "defines no profile `paper`",
        ),
        // A field inside a set value: the `--set` is the location, the field is named.
        (
            &[
                "plan",
                "two.yaml",
                "--set",
                "small.synthetic={channels: x, height: 4, width: 4, num_classes: 2}",
            ],
            "--set small.synthetic={channels: x, height: 4, width: 4, num_classes: 2}: \
             synthetic.channels: invalid type",
        ),
        (&["plan", "missing.yaml"], "cannot read the pipeline file"),
        (&["show", "nothing-like-this"], "no artifact named or keyed"),
        (&["gc", "--keep", "nomatch/*.yaml"], "matches no file"),
    ];
    for (args, expected) in cases {
        let (code, _, err) = env.eoss(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    assert!(p.exists());
}

#[test]
fn verify_finds_a_flipped_byte() {
    let env = Env::new();
    let p = env.pipeline("two.yaml", TWO);
    env.run(&p, &[], 0);
    let (code, out, _) = env.eoss(&["verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("verified 3 artifact(s): 0 corrupt"));
    let (_, dag, _) = env.eoss(&["plan", "two.yaml", "--json"]);
    let key = serde_json::from_str::<Value>(&dag).unwrap()["stages"][0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    let file = env
        .store()
        .join("dataset")
        .join(&key)
        .join("dataset.safetensors");
    let mut perms = std::fs::metadata(&file).unwrap().permissions();
    assert!(perms.readonly(), "published files are read-only");
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&file, perms).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let (code, out, _) = env.eoss(&["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "CORRUPT {}: dataset.safetensors: blake3",
            env.store().join("dataset").join(&key).display()
        )),
        "{out}"
    );
    assert!(out.contains("verified 3 artifact(s): 1 corrupt"));
}

#[test]
fn gc_keeps_what_the_kept_pipelines_reach() {
    let env = Env::new();
    let keep = env.pipeline("keep.yaml", TWO);
    let other = TWO
        .replace("name: two", "name: other")
        .replace("seed: [1, 2]", "seed: [3]");
    let drop = env.pipeline("drop.yaml", &other);
    env.run(&keep, &[], 0);
    env.run(&drop, &[], 0);
    // A lock file of a key published by an older eoss (which left them behind).
    let idle = env.store().join("tmp/dataset-0000.lock");
    std::fs::write(&idle, b"").unwrap();
    // `small` is shared by both pipelines; only swept[seed=3] is unreached.
    let (code, out, err) = env.eoss(&["gc", "--keep", "keep.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("would remove ") && !l.contains("lock file"))
            .count(),
        1,
        "{out}"
    );
    assert!(
        out.contains("would remove 1 idle lock file(s)") && idle.exists(),
        "{out}"
    );
    assert!(
        out.contains("swept[seed=3]") && out.contains("dry run"),
        "{out}"
    );
    let (code, out, _) = env.eoss(&["gc", "--keep", "keep*.yaml", "--delete"]);
    assert_eq!(code, 0);
    assert!(out.contains("removed 1 item(s)"), "{out}");
    assert!(!idle.exists(), "{out}");
    assert!(env.run(&keep, &[], 0).iter().all(|(_, s)| s == "cached"));
    assert_eq!(env.plan(&drop, &[])[1].1, "stale");
    let (code, out, _) = env.eoss(&["verify"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn plan_dag_show_and_status_describe_the_pipeline() {
    let env = Env::new();
    let p = env.pipeline("two.yaml", TWO);
    let plan = env.plan(&p, &[]);
    assert_eq!(plan.len(), 3);
    assert!(plan.iter().all(|(_, s, r)| s == "stale" && r == "new"));
    let (code, dot, _) = env.eoss(&["dag", "two.yaml", "--format", "dot"]);
    assert_eq!(code, 0);
    assert!(
        dot.starts_with("digraph \"two\"") && dot.contains("swept[seed=2]\\ndataset"),
        "{dot}"
    );
    let (_, mermaid, _) = env.eoss(&["dag", "two.yaml", "--format", "mermaid"]);
    assert!(mermaid.starts_with("flowchart LR"));
    env.run(&p, &[], 0);
    let (code, out, err) = env.eoss(&["show", "swept[seed=2]"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("swept[seed=2] (dataset v1)"), "{out}");
    assert!(
        out.contains("dataset.safetensors") && out.contains("summary "),
        "{out}"
    );
    let (code, by_pipeline, _) = env.eoss(&["show", "swept[seed=2]", "--pipeline", "two.yaml"]);
    assert_eq!(code, 0);
    assert_eq!(by_pipeline, out);
    let key = out
        .lines()
        .nth(1)
        .unwrap()
        .trim_start_matches("key")
        .trim()
        .to_string();
    let (code, _, err) = env.eoss(&["show", "swept[seed=9]", "--pipeline", "two.yaml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("no stage instance `swept[seed=9]`; it has: swept[seed=1], swept[seed=2]"),
        "{err}"
    );
    let (code, _, err) = env.eoss(&["show", "swept[seed=9]"]);
    assert_eq!(code, 2);
    // (miette wraps long messages: join its lines.)
    assert!(
        err.replace("\n  | ", " ")
            .contains("named `swept…` there: swept[seed=1], swept[seed=2]"),
        "{err}"
    );
    let (_, by_key, _) = env.eoss(&["show", &key[..10]]);
    assert_eq!(by_key, out);
    let (code, status, _) = env.eoss(&["status", "two.yaml"]);
    assert_eq!(code, 0);
    assert!(
        status.contains("3 artifact(s)") && status.contains("3 cached, 0 to compute"),
        "{status}"
    );
    // Overrides apply to every file; a file that cannot be assessed is named, the rest reported.
    let (code, status, err) = env.eoss(&["status", "gone.yaml", "two.yaml", "--set", "small.n=8"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        status.contains("pipeline gone.yaml: not assessed, 1 problem(s)")
            && status.contains("3 instance(s), 2 cached, 1 to compute"),
        "{status}"
    );
    assert!(
        err.contains("gone.yaml: cannot read the pipeline file"),
        "{err}"
    );
    let (code, _, err) = env.eoss(&["status", "two.yaml", "--profile", "smoke"]);
    assert_eq!(code, 2);
    assert!(err.contains("defines no profile `smoke`"), "{err}");
}

/// The published directory of instance `name` of `pipeline` (its key from `plan --json`).
fn artifact(env: &Env, pipeline: &Path, extra: &[&str], name: &str) -> PathBuf {
    let mut args = vec!["plan", pipeline.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = env.eoss(&args);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let stage = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no instance {name} in {out}"));
    env.store()
        .join(stage["kind"].as_str().unwrap())
        .join(stage["key"].as_str().unwrap())
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn summary(dir: &Path) -> Value {
    serde_json::from_slice(&read(&dir.join("summary.json"))).unwrap()
}

/// A metrics table: the header and, per row, the cells parsed as numbers (`None` when empty).
struct Metrics {
    columns: Vec<String>,
    rows: Vec<Vec<Option<f64>>>,
}

impl Metrics {
    fn read(dir: &Path) -> Metrics {
        let mut reader = csv::Reader::from_path(dir.join("metrics.csv")).unwrap();
        let columns = reader.headers().unwrap().iter().map(String::from).collect();
        let rows = reader
            .records()
            .map(|r| {
                r.unwrap()
                    .iter()
                    .map(|cell| (!cell.is_empty()).then(|| cell.parse::<f64>().unwrap()))
                    .collect()
            })
            .collect();
        Metrics { columns, rows }
    }

    /// The value of `column` at `step` (panics when either is absent).
    fn at(&self, step: u64, column: &str) -> Option<f64> {
        let c = self
            .columns
            .iter()
            .position(|h| h == column)
            .unwrap_or_else(|| panic!("no column {column} in {:?}", self.columns));
        self.rows
            .iter()
            .find(|r| r[0] == Some(step as f64))
            .unwrap_or_else(|| panic!("no row for step {step}"))[c]
    }
}

/// Params of the synthetic dataset the training tests use (3×8×8 images, 10 classes).
const SYNTHETIC: &str = "source: synthetic, synthetic: {channels: 3, height: 8, width: 8, num_classes: 10, train_size: 4096}";

/// A pipeline `data` (n samples) → `train` (the given params besides the model) with an MLP of
/// width 16.
fn trained(name: &str, n: usize, train: &str) -> String {
    format!(
        "name: {name}\nstages:\n  data:\n    kind: dataset\n    params: {{{SYNTHETIC}, n: {n}}}\n  train:\n    kind: train\n    inputs: {{data: data}}\n    params: {{model: {{arch: mlp, width: 16}}, init_scale: 1.0, {train}}}\n"
    )
}

#[test]
fn train_downstream_of_a_dataset_recomputes_with_its_input() {
    let env = Env::new();
    let p = env.pipeline(
        "trained.yaml",
        &trained(
            "trained",
            256,
            "lr: 0.05, batch_size: 32, steps: 100, checkpoint_every: 50, eval: {every: 50}",
        ),
    );
    let computed = pairs(&[("data", "computed"), ("train", "computed")]);
    let cached = pairs(&[("data", "cached"), ("train", "cached")]);
    assert_eq!(env.run(&p, &[], 0), computed);
    assert_eq!(env.run(&p, &[], 0), cached);
    let first = artifact(&env, &p, &[], "train");
    assert_eq!(summary(&first)["status"], "completed");

    // A dataset param: the dataset and its descendant.
    let seed = ["--set", "data.seed=1"];
    assert_eq!(
        env.plan(&p, &seed),
        [
            ("data", "stale", "params changed (seed)"),
            ("train", "stale", "input changed (data)"),
        ]
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    );
    assert_eq!(env.run(&p, &seed, 0), computed);
    assert_eq!(env.run(&p, &seed, 0), cached);
    assert_ne!(artifact(&env, &p, &seed, "train"), first);

    // A train param: only the train stage.
    let lr = ["--set", "train.lr=0.03"];
    let plan = env.plan(&p, &lr);
    assert_eq!(plan[0].1, "cached");
    assert_eq!(
        (plan[1].1.as_str(), plan[1].2.as_str()),
        ("stale", "params changed (lr)")
    );
    assert_eq!(
        env.run(&p, &lr, 0),
        pairs(&[("data", "cached"), ("train", "computed")])
    );
    assert_eq!(env.run(&p, &lr, 0), cached);
    assert_eq!(env.run(&p, &[], 0), cached, "the first results are kept");
    let runs = std::fs::read_dir(env.store().join("train"))
        .unwrap()
        .count();
    assert_eq!(runs, 3);
}

/// The outputs of a train artifact but a checkpoint's temporary file (`checkpoints/.tmp*`), which a
/// kill during a checkpoint's write leaves behind and which the rerun currently publishes.
fn train_outputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    all_files(dir)
        .into_iter()
        .filter(|(p, _)| !p.file_name().unwrap().to_str().unwrap().starts_with(".tmp"))
        .collect()
}

/// The number of checkpoints (`step-*.safetensors`, complete by construction) in work directories.
fn work_checkpoints(store: &Path) -> usize {
    work_dirs(store)
        .iter()
        .filter_map(|d| std::fs::read_dir(d.join("checkpoints")).ok())
        .flatten()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_str().unwrap().starts_with("step-")
        })
        .count()
}

#[test]
fn a_killed_training_resumes_from_its_checkpoint_bit_identically() {
    // Long enough (seconds in a debug build) to be killed between checkpoints.
    let text = trained(
        "resumed",
        4096,
        "lr: 0.05, batch_size: 256, steps: 1500, checkpoint_every: 20, eval: {every: 100}",
    );
    let env = Env::new();
    let p = env.pipeline("resumed.yaml", &text);
    kill_run_when(
        &env,
        &p,
        "three checkpoints",
        Duration::from_secs(60),
        || work_checkpoints(&env.store()) >= 3,
    );
    let dir = artifact(&env, &p, &[], "train");
    assert!(!dir.exists(), "a killed run published its artifact");
    assert_eq!(
        env.run(&p, &[], 0),
        pairs(&[("data", "cached"), ("train", "computed")])
    );
    let log = String::from_utf8(read(&dir.join("log.txt"))).unwrap();
    let resumed_at: u64 = log
        .split("resuming from own checkpoint at step ")
        .nth(1)
        .unwrap_or_else(|| panic!("the rerun did not resume:\n{log}"))
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (60..1500).contains(&resumed_at) && resumed_at.is_multiple_of(20),
        "{resumed_at}"
    );

    let (_fresh, uninterrupted) = uninterrupted_artifact("resumed.yaml", &text, "train");
    assert_eq!(uninterrupted.file_name(), dir.file_name());
    for file in [
        "metrics.csv",
        "summary.json",
        "checkpoints/step-00001500.safetensors",
    ] {
        assert!(
            read(&dir.join(file)) == read(&uninterrupted.join(file)),
            "{file} differs after resuming at step {resumed_at}"
        );
    }
    assert!(train_outputs(&dir) == train_outputs(&uninterrupted));
}

#[test]
fn a_killed_measure_resumes_after_its_last_measured_checkpoint_bit_identically() {
    // A short training with many checkpoints, then λmax (warm-started from checkpoint to
    // checkpoint) and batch sharpness on each: seconds, long enough to be killed part way.
    let text = format!(
        "{}  measure:\n    kind: measure\n    inputs: {{run: train, data: data}}\n    params: {{measure: {{lambda_max: {{every: 10, rel_tol: 1.0e-4, max_iter: 40}}, batch_sharpness: {{every: 10, min_samples: 10, max_samples: 20}}}}}}\n",
        trained(
            "measured",
            2048,
            "lr: 0.05, batch_size: 32, steps: 400, checkpoint_every: 10",
        )
    );
    let env = Env::new();
    let p = env.pipeline("measured.yaml", &text);
    kill_run_when(
        &env,
        &p,
        "a measured checkpoint",
        Duration::from_secs(120),
        || {
            work_dirs(&env.store())
                .iter()
                .any(|d| d.join("progress.safetensors").exists())
        },
    );
    let dir = artifact(&env, &p, &[], "measure");
    assert!(!dir.exists(), "a killed run published its artifact");
    assert_eq!(
        env.run(&p, &[], 0),
        pairs(&[
            ("data", "cached"),
            ("train", "cached"),
            ("measure", "computed")
        ])
    );
    let log = String::from_utf8(read(&dir.join("log.txt"))).unwrap();
    assert!(
        log.contains("resuming after checkpoint "),
        "the rerun did not resume:\n{log}"
    );

    let (_fresh, uninterrupted) = uninterrupted_artifact("measured.yaml", &text, "measure");
    assert_eq!(uninterrupted.file_name(), dir.file_name());
    assert!(
        read(&dir.join("metrics.csv")) == read(&uninterrupted.join("metrics.csv")),
        "metrics.csv differs after resuming:\n{log}"
    );
    assert!(!dir.join("progress.safetensors").exists());
}

#[test]
fn a_branch_continues_its_base_and_names_the_available_steps() {
    let env = Env::new();
    let text = format!(
        "name: branch\ndefaults:\n  train: {{model: {{arch: mlp, width: 16}}, init_scale: 1.0, lr: 0.05, batch_size: 32, steps: 200, checkpoint_every: 50, eval: {{every: 50}}}}\nstages:\n  data:\n    kind: dataset\n    params: {{{SYNTHETIC}, n: 256}}\n  base:\n    kind: train\n    inputs: {{data: data}}\n  branch:\n    kind: train\n    inputs: {{data: data, base: base}}\n    params: {{branch_step: 100}}\n"
    );
    let p = env.pipeline("branch.yaml", &text);
    assert_eq!(
        env.run(&p, &[], 0),
        pairs(&[
            ("data", "computed"),
            ("base", "computed"),
            ("branch", "computed")
        ])
    );
    let base = artifact(&env, &p, &[], "base");
    let branch = artifact(&env, &p, &[], "branch");
    assert_ne!(base, branch);
    let log = String::from_utf8(read(&branch.join("log.txt"))).unwrap();
    assert!(log.contains("branching from `base` at step 100"), "{log}");
    for file in [
        "metrics.csv",
        "summary.json",
        "checkpoints/step-00000200.safetensors",
    ] {
        assert!(
            read(&base.join(file)) == read(&branch.join(file)),
            "{file} of the branch differs from the base run's"
        );
    }
    assert_eq!(
        read(&base.join("checkpoints/step-00000150.safetensors")),
        read(&branch.join("checkpoints/step-00000150.safetensors"))
    );

    // Off the base's checkpoints: refused before anything runs.
    let (code, _, err) = env.eoss(&["run", "branch.yaml", "--set", "branch.branch_step=75"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--set branch.branch_step=75: the `base` input saves checkpoints at steps 50")
            && err.contains("none at"),
        "{err}"
    );
    // A base that may stop early could have its last checkpoint there: the branch finds out when
    // it starts, and names the steps the base has.
    let missing = [
        "--set",
        "branch.branch_step=75",
        "--set",
        "base.stop_loss=1e-12",
    ];
    let report = env.path().join("report.json");
    let mut args = vec!["run", "branch.yaml", "--report", report.to_str().unwrap()];
    args.extend(missing);
    let (code, _, err) = env.eoss(&args);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("has no checkpoint at step 75; it has [50, 100, 150, 200]"),
        "{err}"
    );
    assert_eq!(
        statuses(&std::fs::read_to_string(report).unwrap()),
        pairs(&[
            ("data", "cached"),
            ("base", "computed"),
            ("branch", "failed")
        ])
    );
    assert!(!artifact(&env, &p, &missing, "branch").exists());
}

#[test]
fn a_diverging_run_is_cached_named_with_its_step_and_exits_3() {
    let env = Env::new();
    let p = env.pipeline(
        "diverged.yaml",
        &trained("diverged", 256, "lr: 1000.0, batch_size: 32, steps: 100"),
    );
    assert_eq!(
        env.run(&p, &[], 3),
        pairs(&[("data", "computed"), ("train", "computed")])
    );
    let dir = artifact(&env, &p, &[], "train");
    let s = summary(&dir);
    assert_eq!(s["status"], "diverged", "{s}");
    let at = s["diverged_at"].as_u64().unwrap();
    assert!(at < 100 && s["steps_run"] == at, "{s}");
    let metrics = Metrics::read(&dir);
    assert_eq!(metrics.rows.last().unwrap()[0], Some(at as f64));
    let (code, out, err) = env.eoss(&["show", "train"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\"status\": \"diverged\"") && out.contains(&format!("\"diverged_at\": {at}")),
        "{out}"
    );
    // A diverged run is a result like any other: cached on the next run, which says where it
    // diverged on its line, in the summary and in the report, and exits 3 again.
    assert!(env.run(&p, &[], 3).iter().all(|(_, s)| s == "cached"));
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(env.path().join("report.json")).unwrap())
            .unwrap();
    let note = format!("diverged at step {at}");
    assert_eq!(report["stages"][1]["message"], note.as_str(), "{report}");
    assert!(report["stages"][0]["message"].is_null(), "{report}");
    let (code, _, err) = env.eoss(&["run", p.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&format!(
            "train {short}); {note}",
            short = &dir.file_name().unwrap().to_string_lossy()[..12]
        )) && err.contains(&format!("\n  train: {note}"))
            && err.contains(&format!("1 training run(s) diverged: train ({note})"))
            && err.contains("--allow-divergence"),
        "{err}"
    );
    // Taken as a result: exit 0.
    let (code, _, err) = env.eoss(&["run", p.to_str().unwrap(), "--allow-divergence"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_small_cifar10_run_measures_sharpness_and_plots() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if !data.join("cifar10").is_dir() {
        eprintln!("skipped: {} absent", data.join("cifar10").display());
        return;
    }
    let env = Env::with_data(data);
    let p = env.pipeline(
        "cifar.yaml",
        "name: cifar\nstages:\n  data:\n    kind: dataset\n    params: {source: cifar10, n: 256}\n  train:\n    kind: train\n    inputs: {data: data}\n    params:\n      model: {arch: mlp, width: 32}\n      init_scale: 0.3\n      lr: 0.005\n      batch_size: 32\n      steps: 100\n      eval: {every: 50}\n      measure: {lambda_max: {every: 50}, batch_sharpness: {every: 50, min_samples: 5, max_samples: 20, rel_tol: 0.05}, step_sharpness: {every: 10}}\n  figure:\n    kind: plot\n    inputs: {runs: train}\n",
    );
    assert_eq!(
        env.run(&p, &[], 0),
        pairs(&[
            ("data", "computed"),
            ("train", "computed"),
            ("figure", "computed")
        ])
    );
    let dir = artifact(&env, &p, &[], "train");
    assert_eq!(summary(&dir)["status"], "completed");
    let m = Metrics::read(&dir);
    assert_eq!(m.rows.len(), 101);
    let positive = |step: u64, column: &str| {
        let v = m
            .at(step, column)
            .unwrap_or_else(|| panic!("{column} not measured at step {step}"));
        assert!(v.is_finite() && v > 0.0, "{column} at {step}: {v}");
    };
    // The final state (step 100) is measured too, except for the live batch's step sharpness.
    for step in [0, 50, 100] {
        positive(step, "lambda_max");
        positive(step, "batch_sharpness");
        positive(step, "batch_sharpness_stderr");
        let samples = m.at(step, "batch_sharpness_samples").unwrap();
        assert!((5.0..=20.0).contains(&samples), "{samples}");
    }
    for step in (0..100).step_by(10) {
        positive(step, "step_sharpness");
    }
    for step in [1, 25, 99] {
        assert_eq!(m.at(step, "lambda_max"), None);
        assert_eq!(m.at(step, "batch_sharpness"), None);
    }
    assert_eq!(m.at(15, "step_sharpness"), None);
    assert_eq!(m.at(100, "step_sharpness"), None);
    let (start, end) = (
        m.at(0, "full_loss").unwrap(),
        m.at(100, "full_loss").unwrap(),
    );
    assert!(end < start, "the full loss went from {start} to {end}");

    let figure = artifact(&env, &p, &[], "figure");
    let png = image::open(figure.join("figure.png")).unwrap();
    assert!(png.width() > 100 && png.height() > 100);
    let svg = String::from_utf8(read(&figure.join("figure.svg"))).unwrap();
    assert!(svg.contains("<svg"), "{svg}");
    // Tidy data: the 2/η line (two points), 10 step sharpness, 3 batch sharpness and 3 λmax points.
    let mut table = csv::Reader::from_path(figure.join("figure.csv")).unwrap();
    assert_eq!(
        table.headers().unwrap(),
        vec!["panel", "series", "axis", "x", "y"]
    );
    let ys: Vec<f64> = table
        .records()
        .map(|r| r.unwrap()[4].parse().unwrap())
        .collect();
    assert_eq!(ys.len(), 18, "{ys:?}");
    for step in [0, 50, 100] {
        let lambda = m.at(step, "lambda_max").unwrap();
        assert!(ys.contains(&lambda), "λmax {lambda} not drawn: {ys:?}");
    }
}

#[test]
fn alignment_histograms_at_listed_checkpoints_are_measured_and_plotted() {
    let env = Env::new();
    let base = trained(
        "aligned",
        64,
        "lr: 0.05, batch_size: 8, steps: 20, checkpoint_every: 10, checkpoint_at: [0]",
    );
    let text = format!(
        "{base}  alignment:\n    kind: measure\n    inputs: {{run: train, data: data}}\n    params:\n      steps: [0, 20]\n      alignment: {{samples: 12, bins: {{dots: {{from: -1, to: 1, bins: 10}}, cosines: {{from: -1, to: 1, bins: 8}}, sq_norms: [0, 0.5, 1, 2]}}}}\n  figure:\n    kind: plot\n    inputs: {{runs: alignment}}\n    params: {{mode: alignment, stem: align}}\n"
    );
    let p = env.pipeline("aligned.yaml", &text);
    assert_eq!(
        env.run(&p, &[], 0),
        pairs(&[
            ("data", "computed"),
            ("train", "computed"),
            ("alignment", "computed"),
            ("figure", "computed")
        ])
    );
    // The listed step-0 checkpoint is saved and does not change the run.
    let with = artifact(&env, &p, &[], "train");
    let steps: Vec<String> = std::fs::read_dir(with.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        steps.contains(&"step-00000000.safetensors".to_string()),
        "{steps:?}"
    );
    let plain = env.pipeline(
        "plain.yaml",
        &trained(
            "plain",
            64,
            "lr: 0.05, batch_size: 8, steps: 20, checkpoint_every: 10",
        ),
    );
    env.run(&plain, &[], 0);
    let without = artifact(&env, &plain, &[], "train");
    assert_eq!(
        read(&with.join("metrics.csv")),
        read(&without.join("metrics.csv"))
    );

    // Every pair (66 of 12 samples) and every sample is counted once per step, out-of-range
    // values in the open end bins.
    let dir = artifact(&env, &p, &[], "alignment");
    let mut totals: BTreeMap<(u64, String), (u64, usize)> = BTreeMap::new();
    for r in csv::Reader::from_path(dir.join("alignment.csv"))
        .unwrap()
        .records()
    {
        let r = r.unwrap();
        let e = totals
            .entry((r[0].parse().unwrap(), r[1].to_string()))
            .or_default();
        e.0 += r[4].parse::<u64>().unwrap();
        e.1 += 1;
    }
    for step in [0, 20] {
        let at = |s: &str| totals[&(step, s.to_string())];
        assert_eq!(at("dots"), (66, 12));
        assert_eq!(at("cosines"), (66, 10));
        assert_eq!(at("sq_norms"), (12, 5));
    }
    let figure = artifact(&env, &p, &[], "figure");
    let drawn: std::collections::BTreeSet<(String, String)> =
        csv::Reader::from_path(figure.join("align.csv"))
            .unwrap()
            .records()
            .map(|r| {
                let r = r.unwrap();
                (r[0].to_string(), r[1].to_string())
            })
            .collect();
    assert_eq!(drawn.len(), 6, "3 panels × 2 steps: {drawn:?}");
}

#[test]
fn an_input_may_name_one_output_of_its_stage() {
    let env = Env::new();
    let base = trained(
        "outputs",
        64,
        "lr: 0.05, batch_size: 8, steps: 20, checkpoint_every: 10, measure: {lambda_max: {every: 10, max_iter: 8}}",
    );
    // `measure` on one named checkpoint only; the data by its file name, which reads the same.
    let text = format!(
        "{base}  at-ten:\n    kind: measure\n    inputs: {{run: 'train:checkpoints/step-00000010.safetensors', data: 'data:dataset.safetensors'}}\n    params: {{measure: {{lambda_max: {{every: 1, max_iter: 8}}}}}}\n  all:\n    kind: measure\n    inputs: {{run: train, data: data}}\n    params: {{measure: {{lambda_max: {{every: 1, max_iter: 8}}}}}}\n"
    );
    let p = env.pipeline("outputs.yaml", &text);
    env.run(&p, &[], 0);
    let lambda_at = |dir: &Path| -> Vec<(String, String)> {
        let mut r = csv::Reader::from_path(dir.join("metrics.csv")).unwrap();
        let h = r.headers().unwrap().clone();
        let (s, l) = (
            h.iter().position(|c| c == "step").unwrap(),
            h.iter().position(|c| c == "lambda_max").unwrap(),
        );
        r.records()
            .map(|x| x.unwrap())
            .filter(|x| !x[l].is_empty())
            .map(|x| (x[s].to_string(), x[l].to_string()))
            .collect()
    };
    let one = lambda_at(&artifact(&env, &p, &[], "at-ten"));
    let all = lambda_at(&artifact(&env, &p, &[], "all"));
    assert_eq!(one.len(), 1, "{one:?}");
    assert!(all.len() >= 2 && all.contains(&one[0]), "{one:?} {all:?}");

    // Naming an output changes the key (a different output is a different input).
    let (_, plan, _) = env.eoss(&["plan", "outputs.yaml", "--json"]);
    let keys: Vec<String> = serde_json::from_str::<Value>(&plan).unwrap()["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys.len(), 4);
    assert_ne!(keys[2], keys[3]);
    let (_, shown, _) = env.eoss(&["show", "at-ten"]);
    assert!(
        shown.contains("run <- train:checkpoints/step-00000010.safetensors (train"),
        "{shown}"
    );
    let (_, dot, _) = env.eoss(&["dag", "outputs.yaml"]);
    assert!(
        dot.contains("[label=\"run: checkpoints/step-00000010.safetensors\"]"),
        "{dot}"
    );

    // An output the artifact lacks fails that stage only, naming it; a path leaving the
    // artifact is invalid input (exit 2) before anything runs.
    let missing = text.replace("step-00000010", "step-00000015");
    let p = env.pipeline("missing.yaml", &missing);
    let (code, _, err) = env.eoss(&["run", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("has no output `checkpoints/step-00000015.safetensors`"),
        "{err}"
    );
    let p = env.pipeline(
        "escape.yaml",
        &text.replace("data:dataset", "data:../dataset"),
    );
    let (code, _, err) = env.eoss(&["plan", p.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not an output file name"), "{err}");
}

#[test]
fn every_shipped_pipeline_plans_under_each_of_its_profiles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = root.join("../shared/data");
    if !data.join("cifar10").is_dir() {
        eprintln!("skipped: {} has no cifar10/ folder", data.display());
        return;
    }
    let env = Env::with_data(data.clone());
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 44, "{files:?}");
    let svhn_present = data.join("svhn/train_32x32.mat").is_file();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut variants = vec![Vec::new()];
        for profile in ["smoke", "paper"] {
            if text.contains(&format!("\n  {profile}:")) {
                variants.push(vec!["--profile", profile]);
            }
        }
        for extra in variants {
            let mut args = vec!["plan", file.to_str().unwrap(), "--json"];
            args.extend_from_slice(&extra);
            let (code, out, err) = env.eoss(&args);
            if text.contains("source: svhn") && !svhn_present {
                // Without the SVHN files the plan stops, naming what to fetch.
                assert_eq!(code, 2, "{}: {err}", file.display());
                assert!(err.contains("train_32x32.mat"), "{}: {err}", file.display());
                continue;
            }
            assert_eq!(code, 0, "{} {extra:?}: {err}", file.display());
            let plan: Value = serde_json::from_str(&out).unwrap();
            assert!(!plan["stages"].as_array().unwrap().is_empty());
        }
    }
}

/// With the SVHN files in place, figures 39–41 plan and an SVHN pipeline (train and test splits)
/// trains, evaluates and measures.
#[test]
fn svhn_figures_plan_and_an_svhn_pipeline_runs_once_the_files_are_there() {
    // The official file names and layout (MAT v5, X 32×32×3×N uint8, y N×1 labels 1–10),
    // generated: 1100 training images (figures 39–41 take 1024 at smoke scale), 40 test images.
    let data = tempfile::tempdir().unwrap();
    let svhn = data.path().join("svhn");
    std::fs::create_dir(&svhn).unwrap();
    let labels = |n: usize| -> Vec<f64> { (0..n).map(|i| (i % 10 + 1) as f64).collect() };
    svhn_fixture::write_mat(&svhn.join("train_32x32.mat"), &labels(1100), true);
    svhn_fixture::write_mat(&svhn.join("test_32x32.mat"), &labels(40), false);
    let env = Env::with_data(data.path().to_path_buf());

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for figure in ["fig39", "fig40", "fig41"] {
        let file = root.join(format!("pipelines/{figure}.yaml"));
        let plan = env.plan(&file, &["--profile", "smoke"]);
        assert!(
            plan.iter().any(|(name, status, reason)| name == "data"
                && status == "stale"
                && reason == "new"),
            "{figure}: {plan:?}"
        );
    }

    let p = env.pipeline(
        "svhn.yaml",
        "name: svhn\nstages:\n  data:\n    kind: dataset\n    params: {source: svhn, n: 64, seed: 0}\n  test:\n    kind: dataset\n    params: {source: svhn, split: test, n: 32, seed: 0}\n  train:\n    kind: train\n    inputs: {data: data, test: test}\n    params: {model: {arch: mlp, width: 16}, init_scale: 0.1, lr: 0.01, batch_size: 8, steps: 10, checkpoint_every: 10, eval: {every: 5}, measure: {lambda_max: {every: 5, max_iter: 8}}}\n",
    );
    assert_eq!(
        env.run(&p, &[], 0),
        pairs(&[
            ("data", "computed"),
            ("test", "computed"),
            ("train", "computed")
        ])
    );
    let m = Metrics::read(&artifact(&env, &p, &[], "train"));
    for column in ["loss", "full_loss", "test_accuracy", "lambda_max"] {
        let v = m
            .at(5, column)
            .unwrap_or_else(|| panic!("no {column} at step 5"));
        assert!(v.is_finite(), "{column} = {v}");
    }
}
