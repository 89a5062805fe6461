//! The `eoss` command line (clap): `run`, `plan`, `dag`, `show`, `status`, `verify`, `gc`. Each
//! command loads, plans and hands over to the library; human output goes to stdout (plans, tables)
//! or stderr (progress), machine output to stdout (`plan --json`) or a file (`run --report`).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::error::{Error, Invalid};
use crate::expand::Overrides;
use crate::graph::{self, Plan};
use crate::key::Key;
use crate::report;
use crate::stages::Registry;
use crate::store::{self, Manifest, Store};

/// Declarative, cached pipelines reproducing "Edge of Stochastic Stability".
///
/// Exit codes: 0 success, 1 a stage failed (or `verify` found corruption), 2 invalid input, 3 a
/// training run diverged (`run`, without `--allow-divergence`).
#[derive(Debug, Parser)]
#[command(name = "eoss", version, about, long_about = None)]
pub struct Cli {
    /// The artifact store.
    #[arg(
        long,
        global = true,
        env = "EOSS_ARTIFACTS",
        default_value = "artifacts"
    )]
    pub artifacts: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options selecting a pipeline variant.
#[derive(Debug, Clone, clap::Args)]
pub struct Variant {
    /// Overrides a param: `stage.param=value` (dotted for nested params; the value is YAML). Setting a
    /// swept param narrows the sweep to that value. Repeatable.
    #[arg(long = "set", value_name = "STAGE.PARAM=VALUE")]
    pub sets: Vec<String>,
    /// Applies a profile defined in the pipeline file (e.g. `smoke` or `paper`).
    #[arg(long)]
    pub profile: Option<String>,
}

impl Variant {
    fn overrides(&self) -> Overrides {
        Overrides {
            profile: self.profile.clone(),
            sets: self.sets.clone(),
        }
    }
}

/// DAG output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DagFormat {
    /// Graphviz dot.
    Dot,
    /// Mermaid flowchart.
    Mermaid,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Computes what is missing or stale, reuses the rest.
    Run {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Profile and overrides.
        #[command(flatten)]
        variant: Variant,
        /// Stages computed at once (CUDA stages always run one at a time).
        #[arg(long, short, default_value_t = 1)]
        jobs: usize,
        /// Writes `{"stages":[{"name","kind","key","status","seconds","message"}]}` to this file
        /// (`message`: why a stage failed or was skipped, or a note such as "diverged at step 7").
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// Copies the figures of every `plot` stage (PNG, SVG and CSV) into this directory.
        #[arg(long, value_name = "DIR")]
        export: Option<PathBuf>,
        /// Exits 0 when training runs diverged (a sweep mapping where training becomes unstable);
        /// without it, a diverged `train` run (cached as a result all the same) makes the exit code 3.
        #[arg(long)]
        allow_divergence: bool,
    },
    /// Shows what would run and why, computing nothing.
    Plan {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Profile and overrides.
        #[command(flatten)]
        variant: Variant,
        /// Prints `{"stages":[{"name","kind","key","status":"cached"|"stale","reason"}]}`.
        #[arg(long)]
        json: bool,
    },
    /// Prints the DAG of stage instances.
    Dag {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Profile and overrides.
        #[command(flatten)]
        variant: Variant,
        /// Output format.
        #[arg(long, value_enum, default_value = "dot")]
        format: DagFormat,
    },
    /// Shows the manifest and lineage of one artifact.
    Show {
        /// An instance name (e.g. `train[lr=0.01]`), a key, or a key prefix (at least 6 hex digits).
        target: String,
        /// Resolves an instance name through this pipeline (otherwise: the latest artifact of that
        /// name in the store).
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// Profile and overrides (with `--pipeline`).
        #[command(flatten)]
        variant: Variant,
    },
    /// Summarises the store, and the state of the given pipelines in it (a pipeline that cannot be
    /// assessed is named, the others are still reported).
    Status {
        /// Pipeline files to assess.
        pipelines: Vec<PathBuf>,
        /// Profile (e.g. `--profile smoke`, as `make figNN` runs) and overrides, for every file.
        #[command(flatten)]
        variant: Variant,
    },
    /// Re-hashes every artifact's outputs against its manifest.
    Verify,
    /// Removes artifacts that no kept pipeline reaches (under any of its profiles). Dry run unless
    /// `--delete`.
    Gc {
        /// Pipeline files to keep (glob patterns, e.g. `pipelines/*.yaml`). Repeatable.
        #[arg(long, required = true, value_name = "GLOB")]
        keep: Vec<String>,
        /// Actually removes (otherwise only lists what would go).
        #[arg(long)]
        delete: bool,
    },
    /// Downloads a collection's official files (`cifar10`, `fashion-mnist`, `svhn`), checking their
    /// published MD5s, into `--root` (default: `$EOSS_DATA/<source>`, else `../shared/data/<source>`).
    Fetch {
        /// The collection: `cifar10`, `fashion-mnist` or `svhn`.
        source: String,
        /// The folder to put the files in.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// Base URL of a mirror to download from instead of the official address.
        #[arg(long, value_name = "URL")]
        mirror: Option<String>,
    },
    /// Times the SGD step, HVPs, λmax solves, batch sharpness and the per-sample gradient
    /// alignment of the paper's MLP, CNN and ResNet-20, next to PyTorch when `--torch` names a Python that has it (the ratio column is
    /// eoss / PyTorch).
    Bench {
        /// Device to time on.
        #[arg(long, value_enum, default_value = "cpu")]
        device: crate::device::DeviceClass,
        /// Which cases.
        #[arg(long, value_enum, default_value = "all")]
        suite: crate::bench::Suite,
        /// Only cases whose name (`op/model/size`) contains this.
        #[arg(long)]
        filter: Option<String>,
        /// A Python interpreter with PyTorch: times the same cases there, in the same run.
        #[arg(long, value_name = "PYTHON")]
        torch: Option<PathBuf>,
        /// Seconds of repetitions per case (at least 3 repetitions after one warm-up).
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Also writes the timings as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
}

/// Parses arguments and runs the command.
pub fn main(args: impl IntoIterator<Item = OsString>) -> Result<(), Error> {
    let cli = Cli::parse_from(args);
    let registry = Registry::builtin();
    let store = Store::open(&cli.artifacts)?;
    let mut stdout = std::io::stdout().lock();
    let out: &mut dyn Write = &mut stdout;
    match cli.command {
        Command::Run {
            pipeline,
            variant,
            jobs,
            report: report_path,
            export,
            allow_divergence,
        } => {
            let plan = load_plan(&pipeline, &variant.overrides(), &registry, &store)?;
            let reporter = report::HumanReporter::stderr(std::io::stderr().is_terminal());
            let opts = crate::exec::RunOptions {
                jobs,
                host: host_name(),
            };
            let outcomes = crate::exec::run(&plan, &store, &opts, &reporter);
            eprintln!("{}", report::summary(&plan, &outcomes));
            if let Some(path) = report_path {
                let text = serde_json::to_string_pretty(&report::run_report(&plan, &outcomes))
                    .unwrap_or_default();
                std::fs::write(&path, text).map_err(|e| Error::Io { path, source: e })?;
            }
            if let Some(dir) = export {
                export_figures(&plan, &outcomes, &store, &dir)?;
            }
            let failed = outcomes
                .iter()
                .filter(|o| o.status == crate::exec::Status::Failed)
                .count();
            if failed > 0 {
                return Err(Error::StagesFailed { failed });
            }
            let diverged = report::diverged_runs(&plan, &outcomes);
            if !diverged.is_empty() && !allow_divergence {
                return Err(Error::Diverged { runs: diverged });
            }
        }
        Command::Plan {
            pipeline,
            variant,
            json,
        } => {
            let plan = load_plan(&pipeline, &variant.overrides(), &registry, &store)?;
            let assessments = crate::exec::assess(&plan, &store)?;
            let text = if json {
                let doc = report::plan_report(&plan, &assessments);
                format!(
                    "{}\n",
                    serde_json::to_string_pretty(&doc).unwrap_or_default()
                )
            } else {
                report::plan_text(&plan, &assessments)
            };
            write(out, &text);
        }
        Command::Dag {
            pipeline,
            variant,
            format,
        } => {
            let plan = load_plan(&pipeline, &variant.overrides(), &registry, &store)?;
            write(
                out,
                &match format {
                    DagFormat::Dot => report::dag_dot(&plan),
                    DagFormat::Mermaid => report::dag_mermaid(&plan),
                },
            );
        }
        Command::Show {
            target,
            pipeline,
            variant,
        } => {
            let dir = match pipeline {
                Some(p) => {
                    let plan = load_plan(&p, &variant.overrides(), &registry, &store)?;
                    let st = plan
                        .stages
                        .iter()
                        .find(|s| s.name == target)
                        .ok_or_else(|| {
                            Error::Usage(format!(
                                "{} has no stage instance `{target}`{}; it has: {}",
                                p.display(),
                                variant
                                    .profile
                                    .as_ref()
                                    .map(|name| format!(" under profile `{name}`"))
                                    .unwrap_or_default(),
                                instance_names(&plan, &target)
                            ))
                        })?;
                    let dir = store.artifact_dir(&st.kind_name, &st.key);
                    if !dir.join(store::MANIFEST).exists() {
                        return Err(Error::Usage(format!(
                            "`{target}` (key {}) is not computed yet; `eoss run {}` computes it",
                            st.key,
                            p.display()
                        )));
                    }
                    dir
                }
                None => find_artifact(&store, &target)?,
            };
            write(out, &show(&store, &dir)?);
        }
        Command::Status { pipelines, variant } => {
            let (text, problems) = status(&store, &pipelines, &variant.overrides(), &registry)?;
            write(out, &text);
            if !problems.is_empty() {
                return Err(Invalid {
                    what: format!("{} pipeline(s) not assessed", problems.len()),
                    problems: problems.into_iter().flat_map(|i| i.problems).collect(),
                }
                .into());
            }
        }
        Command::Verify => {
            let (text, corrupt) = verify(&store)?;
            write(out, &text);
            if corrupt > 0 {
                return Err(Error::Corrupt { corrupt });
            }
        }
        Command::Gc { keep, delete } => {
            write(out, &gc(&store, &keep, delete, &registry)?);
        }
        Command::Fetch {
            source,
            root,
            mirror,
        } => {
            use crate::data::source::SourceKind;
            let kind: SourceKind = serde_json::from_value(serde_json::Value::String(
                source.clone(),
            ))
            .map_err(|_| {
                Error::Usage(format!(
                    "unknown collection `{source}`: expected cifar10, fashion-mnist or svhn"
                ))
            })?;
            let eoss_data = std::env::var_os("EOSS_DATA").map(PathBuf::from);
            let dir = root.unwrap_or_else(|| kind.default_root(eoss_data.as_deref()));
            for file in crate::data::fetch::fetch(kind, &dir, mirror.as_deref())? {
                write(out, &format!("{}\n", file.display()));
            }
        }
        Command::Bench {
            device,
            suite,
            filter,
            torch,
            seconds,
            json,
        } => {
            let opts = crate::bench::BenchOptions {
                device,
                suite,
                filter,
                torch,
                seconds,
            };
            let timings = crate::bench::run(&opts)?;
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&timings).expect("timings serialise");
                std::fs::write(&path, text).map_err(|source| Error::Io { path, source })?;
            }
        }
    }
    Ok(())
}

fn write(out: &mut dyn Write, text: &str) {
    // A closed pipe (e.g. `| head`) is not an error worth reporting.
    let _ = out.write_all(text.as_bytes());
}

fn host_name() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// Loads, validates and plans one pipeline file.
pub fn load_plan(
    path: &Path,
    overrides: &Overrides,
    registry: &Registry,
    store: &Store,
) -> Result<Plan, Error> {
    let pipeline = crate::spec::load(path)?;
    Ok(graph::build(&pipeline, overrides, registry, store)?)
}

/// The stage an instance name belongs to: `train` for `train[lr=0.01]`.
fn stage_of(instance: &str) -> &str {
    instance.split('[').next().unwrap_or(instance)
}

/// The instances of `target`'s stage, or every instance when it names no stage of the plan,
/// comma-separated.
fn instance_names(plan: &Plan, target: &str) -> String {
    let stage = stage_of(target);
    let same_stage: Vec<&str> = plan
        .stages
        .iter()
        .filter(|s| s.stage == stage)
        .map(|s| s.name.as_str())
        .collect();
    if same_stage.is_empty() {
        plan.stages
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        same_stage.join(", ")
    }
}

/// Finds a published artifact by key, key prefix or instance name (latest by end time).
fn find_artifact(store: &Store, target: &str) -> Result<PathBuf, Error> {
    let all = store.artifacts()?;
    let is_hex = target.len() >= 6 && target.chars().all(|c| c.is_ascii_hexdigit());
    if is_hex {
        let hits: Vec<&PathBuf> = all
            .iter()
            .map(|(d, _)| d)
            .filter(|d| {
                d.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(target))
            })
            .collect();
        match hits.as_slice() {
            [one] => return Ok((*one).clone()),
            [] => {}
            many => {
                return Err(Error::Usage(format!(
                    "key prefix `{target}` matches {} artifacts; give more digits",
                    many.len()
                )))
            }
        }
    }
    all.iter()
        .filter_map(|(d, m)| {
            m.as_ref()
                .ok()
                .filter(|m| m.stage == target)
                .map(|m| (d, m))
        })
        .max_by(|a, b| a.1.finished.cmp(&b.1.finished))
        .map(|(d, _)| d.clone())
        .ok_or_else(|| {
            let stage = stage_of(target);
            let names: BTreeSet<&str> = all
                .iter()
                .filter_map(|(_, m)| m.as_ref().ok())
                .map(|m| m.stage.as_str())
                .filter(|name| stage_of(name) == stage)
                .collect();
            const SHOWN: usize = 12;
            let hint = match names.len() {
                0 => String::new(),
                n => format!(
                    "; named `{stage}…` there: {}{}",
                    names
                        .iter()
                        .take(SHOWN)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", "),
                    if n > SHOWN {
                        format!(" and {} more", n - SHOWN)
                    } else {
                        String::new()
                    }
                ),
            };
            Error::Usage(format!(
                "no artifact named or keyed `{target}` in {}{hint}",
                store.root().display()
            ))
        })
}

fn find_by_key(store: &Store, key: &Key) -> Option<PathBuf> {
    let entries = std::fs::read_dir(store.root()).ok()?;
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(key.as_str()))
        .find(|d| d.join(store::MANIFEST).exists())
}

/// `eoss show`: the manifest in readable form, then the lineage tree.
fn show(store: &Store, dir: &Path) -> Result<String, Error> {
    let m = store::read_manifest(dir)?
        .ok_or_else(|| Error::Usage(format!("{} has no manifest", dir.display())))?;
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let mut out = format!("{} ({} v{})\n", m.stage, m.kind, m.version);
    out.push_str(&format!(
        "key       {}\ndir       {}\n",
        m.key,
        dir.display()
    ));
    out.push_str(&format!(
        "pipeline  {}\ndevice    {:?}\n",
        m.pipeline, m.device
    ));
    out.push_str(&format!(
        "computed  {} .. {} ({:.2} s) on {} by eoss {}\n",
        m.started, m.finished, m.seconds, m.host, m.tool_version
    ));
    out.push_str(&format!(
        "params    {}\n",
        pretty(&m.params).replace('\n', "\n          ")
    ));
    if let Some(s) = &m.summary {
        out.push_str(&format!(
            "summary   {}\n",
            pretty(s).replace('\n', "\n          ")
        ));
    }
    out.push_str("outputs\n");
    for (file, rec) in &m.outputs {
        out.push_str(&format!(
            "  {file}  {} bytes  blake3 {}\n",
            rec.bytes,
            &rec.blake3[..16]
        ));
    }
    for e in &m.external_files {
        out.push_str(&format!(
            "external  {} ({} bytes, blake3 {})\n",
            e.path,
            e.bytes,
            &e.blake3[..16]
        ));
    }
    out.push_str("lineage\n");
    lineage(store, &m, 1, &mut out);
    Ok(out)
}

fn lineage(store: &Store, m: &Manifest, depth: usize, out: &mut String) {
    for (slot, keys) in &m.inputs {
        for key in keys.keys() {
            let pad = "  ".repeat(depth);
            match find_by_key(store, key).and_then(|d| store::read_manifest(&d).ok().flatten()) {
                Some(up) => {
                    let output = m
                        .input_outputs
                        .get(slot)
                        .map_or(String::new(), |o| format!(":{o}"));
                    out.push_str(&format!(
                        "{pad}{slot} <- {}{output} ({} {})\n",
                        up.stage,
                        up.kind,
                        key.short()
                    ));
                    lineage(store, &up, depth + 1, out);
                }
                None => out.push_str(&format!(
                    "{pad}{slot} <- {} (not in the store)\n",
                    key.short()
                )),
            }
        }
    }
}

fn dir_size(dir: &Path) -> u64 {
    store::list_files(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `eoss status`: the summary, and the problems of each pipeline that could not be assessed.
fn status(
    store: &Store,
    pipelines: &[PathBuf],
    overrides: &Overrides,
    registry: &Registry,
) -> Result<(String, Vec<Invalid>), Error> {
    let mut out = format!("store {}\n", store.root().display());
    let mut per_kind: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    let mut broken = 0;
    for (dir, m) in store.artifacts()? {
        match m {
            Ok(m) => {
                let e = per_kind.entry(m.kind).or_default();
                e.0 += 1;
                e.1 += dir_size(&dir);
            }
            Err(_) => broken += 1,
        }
    }
    for (kind, (n, bytes)) in &per_kind {
        out.push_str(&format!(
            "  {kind:<12} {n:>6} artifact(s)  {}\n",
            human_size(*bytes)
        ));
    }
    if per_kind.is_empty() {
        out.push_str("  no artifacts\n");
    }
    if broken > 0 {
        out.push_str(&format!(
            "  {broken} artifact(s) with an unreadable manifest (run `eoss verify`)\n"
        ));
    }
    for w in store.work_dirs()? {
        let state = if w.running {
            "running"
        } else {
            "leftover (failed or killed)"
        };
        out.push_str(&format!("  work dir {}: {state}\n", w.name));
    }
    let mut invalid = Vec::new();
    for p in pipelines {
        let plan = match load_plan(p, overrides, registry, store) {
            Ok(plan) => plan,
            Err(Error::Invalid(problems)) => {
                out.push_str(&format!(
                    "pipeline {}: not assessed, {} problem(s) (below)\n",
                    p.display(),
                    problems.problems.len()
                ));
                invalid.push(problems);
                continue;
            }
            Err(e) => return Err(e),
        };
        let a = crate::exec::assess(&plan, store)?;
        let cached = a.iter().filter(|a| a.cached).count();
        out.push_str(&format!(
            "pipeline {} ({}): {} instance(s), {cached} cached, {} to compute\n",
            plan.pipeline,
            p.display(),
            a.len(),
            a.len() - cached
        ));
    }
    Ok((out, invalid))
}

/// `eoss run --export DIR`: copies the figure files of every plot stage that is now in the store.
fn export_figures(
    plan: &crate::graph::Plan,
    outcomes: &[crate::exec::Outcome],
    store: &Store,
    dir: &Path,
) -> Result<(), Error> {
    use crate::exec::Status;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for (stage, outcome) in plan.stages.iter().zip(outcomes) {
        if stage.kind_name != "plot" || !matches!(outcome.status, Status::Computed | Status::Cached)
        {
            continue;
        }
        let artifact = store.artifact_dir(&stage.kind_name, &stage.key);
        for entry in std::fs::read_dir(&artifact).map_err(io(&artifact))? {
            let source = entry.map_err(io(&artifact))?.path();
            let figure = matches!(
                source.extension().and_then(|e| e.to_str()),
                Some("png" | "svg" | "csv")
            );
            if let (true, Some(name)) = (figure, source.file_name()) {
                let target = dir.join(name);
                // Published files are read-only: replace rather than overwrite in place.
                let _ = std::fs::remove_file(&target);
                std::fs::copy(&source, &target).map_err(io(&target))?;
                let mut permissions = std::fs::metadata(&target)
                    .map_err(io(&target))?
                    .permissions();
                #[allow(clippy::permissions_set_readonly_false)]
                permissions.set_readonly(false);
                std::fs::set_permissions(&target, permissions).map_err(io(&target))?;
            }
        }
    }
    Ok(())
}

/// `eoss verify`: returns the report and the number of corrupt artifacts.
fn verify(store: &Store) -> Result<(String, usize), Error> {
    let mut out = String::new();
    let mut corrupt = 0;
    let all = store.artifacts()?;
    for (dir, m) in &all {
        let problems: Vec<String> = match m {
            Err(e) => vec![e.to_string()],
            Ok(m) => match store::hash_outputs(dir) {
                Err(e) => vec![e.to_string()],
                Ok(now) => {
                    let files: BTreeSet<&String> = now.keys().chain(m.outputs.keys()).collect();
                    files
                        .into_iter()
                        .filter_map(|f| match (m.outputs.get(f), now.get(f)) {
                            (Some(a), Some(b)) if a == b => None,
                            (Some(a), Some(b)) => Some(format!(
                                "{f}: blake3 {} ({} bytes) expected, found {} ({} bytes)",
                                a.blake3, a.bytes, b.blake3, b.bytes
                            )),
                            (Some(_), None) => Some(format!("{f}: missing")),
                            _ => Some(format!("{f}: not in the manifest")),
                        })
                        .collect()
                }
            },
        };
        if !problems.is_empty() {
            corrupt += 1;
            for p in problems {
                out.push_str(&format!("CORRUPT {}: {p}\n", dir.display()));
            }
        }
    }
    out.push_str(&format!(
        "verified {} artifact(s): {corrupt} corrupt\n",
        all.len()
    ));
    Ok((out, corrupt))
}

/// `eoss gc`.
fn gc(store: &Store, keep: &[String], delete: bool, registry: &Registry) -> Result<String, Error> {
    let mut files = BTreeSet::new();
    for pattern in keep {
        let paths =
            glob::glob(pattern).map_err(|e| Error::Usage(format!("--keep {pattern}: {e}")))?;
        let before = files.len();
        files.extend(paths.filter_map(Result::ok));
        if files.len() == before {
            return Err(Error::Usage(format!(
                "--keep {pattern} matches no file; refusing to collect everything"
            )));
        }
    }
    let mut reached: BTreeSet<Key> = BTreeSet::new();
    for f in &files {
        let pipeline = crate::spec::load(f)?;
        let profiles: Vec<Option<String>> = std::iter::once(None)
            .chain(pipeline.file.profiles.keys().cloned().map(Some))
            .collect();
        for profile in profiles {
            let o = Overrides {
                profile,
                sets: vec![],
            };
            let plan = graph::build(&pipeline, &o, registry, store)?;
            reached.extend(plan.stages.into_iter().map(|s| s.key));
        }
    }
    let verb = if delete { "removed" } else { "would remove" };
    let mut out = String::new();
    let (mut count, mut total) = (0usize, 0u64);
    for (dir, m) in store.artifacts()? {
        let key = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        if reached.iter().any(|k| k.as_str() == key) {
            continue;
        }
        let size = dir_size(&dir);
        let what = m
            .map(|m| m.stage)
            .unwrap_or_else(|_| "unreadable manifest".into());
        if delete {
            store.remove_artifact(&dir)?;
        }
        out.push_str(&format!(
            "{verb} {} ({what}, {})\n",
            dir.display(),
            human_size(size)
        ));
        count += 1;
        total += size;
    }
    for w in store.work_dirs()? {
        let reached_key = reached.iter().any(|k| w.name.ends_with(k.as_str()));
        if w.running || (reached_key && !w.name.starts_with("trash-")) {
            continue;
        }
        let size = dir_size(&w.path);
        if delete && !store.remove_work_dir(&w)? {
            continue;
        }
        out.push_str(&format!(
            "{verb} {} (work dir, {})\n",
            w.path.display(),
            human_size(size)
        ));
        count += 1;
        total += size;
    }
    let mut locks = 0;
    for path in store.idle_lock_files()? {
        if !delete || store.remove_lock_file(&path)? {
            locks += 1;
        }
    }
    if locks > 0 {
        out.push_str(&format!("{verb} {locks} idle lock file(s) under tmp/\n"));
    }
    out.push_str(&if delete {
        format!("gc: removed {count} item(s), {}\n", human_size(total))
    } else {
        format!(
            "gc: {count} item(s), {} would be removed (dry run; --delete removes them)\n",
            human_size(total)
        )
    });
    Ok(out)
}
