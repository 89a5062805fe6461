//! The one integration test binary: drives the real `eoss` binary on temporary stores and tiny
//! synthetic pipelines (the `dataset` kind with `source: synthetic`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A temporary working directory with a store inside.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
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
            .env("EOSS_ARTIFACTS", self.store())
            .env_remove("EOSS_DATA");
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
}

#[test]
fn kill_during_a_stage_leaves_no_artifact_and_the_rerun_completes() {
    let env = Env::new();
    let p = env.pipeline("slow.yaml", &slow("killed"));
    let mut child = env
        .cmd()
        .args(["run", p.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the stage to start", Duration::from_secs(20), || {
        work_dirs(&env.store())
            .iter()
            .any(|d| d.join("log.txt").exists())
    });
    std::thread::sleep(Duration::from_millis(300));
    // SIGKILL: no destructor, no cleanup.
    child.kill().unwrap();
    child.wait().unwrap();
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
    // `small` is shared by both pipelines; only swept[seed=3] is unreached.
    let (code, out, err) = env.eoss(&["gc", "--keep", "keep.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("would remove "))
            .count(),
        1,
        "{out}"
    );
    assert!(
        out.contains("swept[seed=3]") && out.contains("dry run"),
        "{out}"
    );
    let (code, out, _) = env.eoss(&["gc", "--keep", "keep*.yaml", "--delete"]);
    assert_eq!(code, 0);
    assert!(out.contains("removed 1 item(s)"), "{out}");
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
    let (_, by_key, _) = env.eoss(&["show", &key[..10]]);
    assert_eq!(by_key, out);
    let (code, status, _) = env.eoss(&["status", "two.yaml"]);
    assert_eq!(code, 0);
    assert!(
        status.contains("3 artifact(s)") && status.contains("3 cached, 0 to compute"),
        "{status}"
    );
}
