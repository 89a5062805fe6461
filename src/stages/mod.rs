//! Stage kinds: the `Stage` trait every YAML `kind:` implements, and the registry of kinds.
//!
//! A kind turns resolved params plus its input artifacts into files in a work directory; the engine
//! owns keys, locking, manifests and publication. Kinds never print: they report through
//! [`StageReporter`].

pub mod analysis;
pub mod dataset;
pub mod measure;
pub mod plot;
pub mod quadratic;
pub mod train;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Serialize};

use crate::device::DeviceClass;

/// A parameter problem found while resolving a stage's params.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ParamError {
    /// Dotted path of the field at fault inside `params` (e.g. `model.width`), empty for the root.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// What a kind derives from raw params before anything runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Canonical params with every default filled in; they enter the key.
    pub params: serde_json::Value,
    /// External files whose content enters the key (hashed by the engine).
    pub external_files: Vec<PathBuf>,
    /// The device the stage computes on (enters the key; CUDA stages run one at a time).
    pub device: DeviceClass,
    /// Optional input slots these params make necessary, each with the param that needs it
    /// (e.g. `base` for `branch_step`); the planner reports a missing one before anything runs.
    pub needs_inputs: Vec<(&'static str, &'static str)>,
}

impl Resolved {
    /// Params of a kind that computes on the CPU from its inputs alone.
    pub fn cpu(params: serde_json::Value) -> Self {
        Resolved {
            params,
            external_files: Vec::new(),
            device: DeviceClass::Cpu,
            needs_inputs: Vec::new(),
        }
    }
}

/// One input artifact handed to a running stage.
#[derive(Debug, Clone, PartialEq)]
pub struct InputArtifact {
    /// Instance name of the producing stage, e.g. `train[lr=0.01,batch=16]`.
    pub stage: String,
    /// Its key.
    pub key: String,
    /// Its published directory.
    pub dir: PathBuf,
    /// Its resolved params.
    pub params: serde_json::Value,
    /// The params of its own inputs, by slot (an object, or an array for a sweep slot), so that
    /// a plot can group runs by e.g. `data.n`.
    pub upstream_params: BTreeMap<String, serde_json::Value>,
    /// The one output file the consumer named (`stage:output`), if any.
    pub output: Option<String>,
}

impl InputArtifact {
    /// The file to read: the named output (`stage:output`) if there is one, else `default`.
    pub fn file(&self, default: &str) -> PathBuf {
        self.dir.join(self.output.as_deref().unwrap_or(default))
    }
}

/// Progress and log sink given to a running stage. Implemented by the engine.
pub trait StageReporter: Send + Sync {
    /// Sets the amount of work (e.g. total steps) for a progress bar with ETA.
    fn set_length(&self, total: u64);
    /// Sets the amount of work done so far.
    fn set_position(&self, done: u64);
    /// Appends a line to the stage's log (kept with its artifact).
    fn log(&self, line: &str);
}

/// Everything a running stage may use.
pub struct StageContext<'a> {
    /// Instance name, e.g. `train[lr=0.01]`.
    pub name: &'a str,
    /// Resolved params (as returned by [`Stage::resolve`]).
    pub params: &'a serde_json::Value,
    /// Inputs by name: one artifact, or every instance of a sweep in expansion order.
    pub inputs: &'a BTreeMap<String, Vec<InputArtifact>>,
    /// Private directory for this key, held under the key's lock. Outputs go here. It survives a
    /// killed run, so a resumable kind may find its own earlier partial work in it.
    pub work_dir: &'a Path,
    /// Progress and log sink.
    pub reporter: &'a dyn StageReporter,
}

impl StageContext<'_> {
    /// The resolved params as the kind's typed params.
    pub fn typed_params<P: DeserializeOwned>(&self) -> Result<P, StageError> {
        serde_json::from_value(self.params.clone())
            .map_err(|e| StageError::Failed(format!("params: {e}")))
    }
}

/// Why a stage failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A candle operation failed.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An input artifact is missing or malformed.
    #[error("input `{input}`: {message}")]
    Input {
        /// The input name.
        input: String,
        /// What is wrong.
        message: String,
    },
    /// Anything else, as a message naming what was at fault.
    #[error("{0}")]
    Failed(String),
}

impl StageError {
    /// A problem with input `input` (missing, malformed, or unfit for these params).
    pub fn input(input: impl Into<String>, message: impl std::fmt::Display) -> Self {
        StageError::Input {
            input: input.into(),
            message: message.to_string(),
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StageError::Io {
            path: path.into(),
            source,
        }
    }
}

/// A stage kind: what a YAML `kind:` names.
pub trait Stage: Send + Sync {
    /// The YAML name of the kind, e.g. `dataset`.
    fn kind(&self) -> &'static str;
    /// Bumped whenever the kind's results change for the same params; enters every key. `params`
    /// are the canonical params, so a kind can bump only the params whose results changed.
    fn version(&self, params: &serde_json::Value) -> u32;
    /// Checks raw params (unknown fields and types are errors) and fills defaults.
    fn resolve(&self, params: &serde_json::Value) -> Result<Resolved, ParamError>;
    /// The input names this kind accepts, and whether each takes a whole sweep.
    fn inputs(&self) -> &'static [InputSlot];
    /// Checks resolved `params` against the stages feeding each input slot (e.g. a batch size no
    /// larger than the dataset's `n`, a plotted column some run writes) before anything runs.
    /// Accepts by default.
    fn check_inputs(
        &self,
        _params: &serde_json::Value,
        _inputs: &PlannedInputs<'_>,
    ) -> Result<(), ParamError> {
        Ok(())
    }
    /// The header of the `metrics.csv` this kind writes for `params`, which `plot` and `analysis`
    /// read; `None` for a kind that writes none.
    fn metrics_columns(&self, _params: &serde_json::Value) -> Option<Vec<String>> {
        None
    }
    /// Computes the outputs into `ctx.work_dir`. If the kind writes `summary.json` (a JSON object),
    /// the engine embeds it in the manifest under `summary`.
    fn run(&self, ctx: &StageContext) -> Result<(), StageError>;
    /// Whether the kind continues from partial work left in its work dir by a killed run (the engine
    /// empties the work dir before running a kind that is not resumable).
    fn resumable(&self) -> bool {
        false
    }
}

/// What [`Stage::check_inputs`] sees of one planned stage feeding an input slot.
#[derive(Clone, Copy)]
pub struct PlannedInput<'a> {
    /// Its kind.
    pub kind: &'a dyn Stage,
    /// Its resolved params.
    pub params: &'a serde_json::Value,
    /// The params of its own inputs, by slot (as in [`InputArtifact::upstream_params`]).
    pub upstream: &'a BTreeMap<String, serde_json::Value>,
    /// The one output file the consumer named (`stage:output`), if any.
    pub output: Option<&'a str>,
}

impl<'a> PlannedInput<'a> {
    /// A stage of `kind` with `params`, read through its default output.
    #[cfg(test)]
    pub fn of(kind: &'a dyn Stage, params: &'a serde_json::Value) -> Self {
        static NO_INPUTS: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        PlannedInput {
            kind,
            params,
            upstream: &NO_INPUTS,
            output: None,
        }
    }

    /// The columns of the `metrics.csv` read from this input, when its kind declares them and the
    /// consumer did not name another output.
    pub fn metrics_columns(&self) -> Option<Vec<String>> {
        match self.output {
            None | Some("metrics.csv") => self.kind.metrics_columns(self.params),
            Some(_) => None,
        }
    }
}

/// The planned stages feeding each input slot, by slot name.
pub type PlannedInputs<'a> = BTreeMap<String, Vec<PlannedInput<'a>>>;

/// One input slot fed by one stage of `kind` with `params` (for tests of `check_inputs`).
#[cfg(test)]
pub fn single_input<'a>(
    slot: &str,
    kind: &'a dyn Stage,
    params: &'a serde_json::Value,
) -> PlannedInputs<'a> {
    BTreeMap::from([(slot.to_string(), vec![PlannedInput::of(kind, params)])])
}

/// Checks that each column a kind reads (`(field path, column)`) is written by some stage feeding
/// `slot`, when all of them declare their `metrics.csv` header (a typo fails before the runs it
/// reads are computed, with the nearest column named).
fn check_columns_written<'a>(
    inputs: &PlannedInputs<'_>,
    slot: &str,
    columns: impl IntoIterator<Item = (String, &'a str)>,
) -> Result<(), ParamError> {
    let headers: Option<Vec<Vec<String>>> = inputs
        .get(slot)
        .and_then(|stages| stages.iter().map(PlannedInput::metrics_columns).collect());
    let Some(headers) = headers else {
        return Ok(());
    };
    // In header order, each column once.
    let mut written: Vec<&str> = Vec::new();
    for column in headers.iter().flatten() {
        if !written.contains(&column.as_str()) {
            written.push(column);
        }
    }
    for (path, column) in columns {
        if !written.contains(&column) {
            let nearest = crate::analysis::closest_name(column, written.iter().copied());
            let hint = match nearest {
                Some(_) => crate::analysis::did_you_mean(&nearest),
                None => format!("; the columns are {}", written.join(", ")),
            };
            return Err(ParamError {
                path,
                message: format!("no stage feeding `{slot}` writes a column `{column}`{hint}"),
            });
        }
    }
    Ok(())
}

/// Checks that each count of a kind's params (`(field path, value, what it counts)`, e.g. a batch
/// size) fits in the subset feeding its `data` input, when that subset has an `n` (without one it is
/// the whole collection, checked when the stage runs). Absent (null) counts pass.
fn check_fits_data<'a>(
    inputs: &PlannedInputs<'_>,
    counts: impl IntoIterator<Item = (String, &'a serde_json::Value, &'static str)>,
) -> Result<(), ParamError> {
    let Some(n) = inputs
        .get("data")
        .and_then(|data| data.first())
        .and_then(|data| data.params["n"].as_u64())
    else {
        return Ok(());
    };
    for (path, value, what) in counts {
        if let Some(count) = value.as_u64().filter(|&count| count > n) {
            return Err(ParamError {
                path,
                message: format!(
                    "{what} {count} is larger than the training set (the `data` input has n = {n})"
                ),
            });
        }
    }
    Ok(())
}

/// One input a kind accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputSlot {
    /// The name used under `inputs:`.
    pub name: &'static str,
    /// Must be given.
    pub required: bool,
    /// Takes every instance of a sweep (otherwise exactly one artifact).
    pub sweep: bool,
}

/// Deserializes raw params into a kind's typed params (unknown fields rejected), naming the field
/// path at fault, and returns them with their canonical JSON (defaults filled in).
pub fn resolve_typed<P: DeserializeOwned + Serialize>(
    raw: &serde_json::Value,
) -> Result<(P, serde_json::Value), ParamError> {
    let typed: P = deserialize_located(raw)?;
    let canonical = serde_json::to_value(&typed).map_err(|e| ParamError {
        path: String::new(),
        message: e.to_string(),
    })?;
    Ok((typed, canonical))
}

/// Deserializes `raw` as `P`, naming the field at fault. An internally tagged enum (a `model:`
/// with its `arch`, an analysis with its `mode`) reads its fields from a buffer, so serde reports
/// any error inside it at the enum itself; there the field at fault is the one whose removal
/// changes the error (the others are read and pass, or are missing only after it fails), found
/// field by field and then inside that field. A missing field stays at its enclosing map, and so
/// does an error in a required field (its removal reads as missing, like the tag's).
fn deserialize_located<P: DeserializeOwned>(raw: &serde_json::Value) -> Result<P, ParamError> {
    let error = |e: serde_path_to_error::Error<serde_json::Error>| ParamError {
        path: e.path().to_string().trim_start_matches('.').to_string(),
        message: e.inner().to_string(),
    };
    let mut found = match serde_path_to_error::deserialize(raw) {
        Ok(typed) => return Ok(typed),
        Err(e) => error(e),
    };
    if found.message.starts_with("missing field") {
        return Err(found);
    }
    loop {
        let pointer = json_pointer(&crate::spec::parse_field_path(&found.path));
        let Some(serde_json::Value::Object(fields)) = raw.pointer(&pointer) else {
            return Err(found);
        };
        let culprit = fields.keys().find(|key| {
            let mut probe = raw.clone();
            if let Some(serde_json::Value::Object(m)) = probe.pointer_mut(&pointer) {
                m.remove(*key);
            }
            match serde_path_to_error::deserialize::<_, P>(&probe)
                .err()
                .map(error)
            {
                None => true,
                // A required field or the enum's tag: at fault only if it is the tag and names
                // no variant.
                Some(e) if e.message == format!("missing field `{key}`") => fields[*key]
                    .as_str()
                    .is_some_and(|v| found.message.starts_with(&format!("unknown variant `{v}`"))),
                Some(e) => e != found,
            }
        });
        let Some(key) = culprit else {
            return Err(found);
        };
        found.path = if found.path.is_empty() {
            key.clone()
        } else {
            format!("{}.{key}", found.path)
        };
    }
}

/// The JSON pointer (RFC 6901) of a field path.
fn json_pointer(path: &[crate::spec::Segment]) -> String {
    path.iter()
        .map(|s| match s {
            crate::spec::Segment::Key(k) => format!("/{}", k.replace('~', "~0").replace('/', "~1")),
            crate::spec::Segment::Index(i) => format!("/{i}"),
        })
        .collect()
}

/// The stage kinds an engine knows, by YAML name.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: Vec<std::sync::Arc<dyn Stage>>,
}

impl Registry {
    /// Every built-in kind. Adding a kind is one line in this list.
    pub fn builtin() -> Registry {
        Registry::new(vec![
            std::sync::Arc::new(dataset::DatasetStage),
            std::sync::Arc::new(train::TrainStage),
            std::sync::Arc::new(measure::MeasureStage),
            std::sync::Arc::new(analysis::AnalysisStage),
            std::sync::Arc::new(plot::PlotStage),
            std::sync::Arc::new(quadratic::QuadraticStage),
        ])
    }

    /// A registry of the given kinds (tests use their own).
    pub fn new(kinds: Vec<std::sync::Arc<dyn Stage>>) -> Registry {
        Registry { kinds }
    }

    /// The kind named `name`.
    pub fn get(&self, name: &str) -> Option<&std::sync::Arc<dyn Stage>> {
        self.kinds.iter().find(|k| k.kind() == name)
    }

    /// The names of all kinds.
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.kind()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ModelSpec;
    use analysis::AnalysisParams;
    use serde_json::json;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Holder {
        model: ModelSpec,
    }

    fn fault<P: DeserializeOwned + std::fmt::Debug>(raw: serde_json::Value) -> ParamError {
        deserialize_located::<P>(&raw).unwrap_err()
    }

    #[test]
    fn errors_inside_tagged_enums_name_the_field() {
        let e = fault::<Holder>(json!({"model": {"arch": "mlp", "depth": 2, "width": "big"}}));
        assert_eq!(e.path, "model.width");
        assert_eq!(e.message, "invalid type: string \"big\", expected usize");
        let e = fault::<Holder>(json!({"model": {"arch": "mlpx", "width": 8}}));
        assert_eq!(e.path, "model.arch");
        assert!(e.message.starts_with("unknown variant `mlpx`"), "{e}");
        let e = fault::<Holder>(json!({"model": {"arch": "mlp", "activation": "relux"}}));
        assert_eq!(e.path, "model.activation");
        let e = fault::<AnalysisParams>(json!({"mode": "plateau", "window": {"from": 0.5}}));
        assert_eq!(e.path, "window.from");
        let e = fault::<AnalysisParams>(json!({"mode": "plateau", "levl": 0.9}));
        assert_eq!(e.path, "levl");
    }

    #[test]
    fn missing_and_ambiguous_faults_stay_at_the_enclosing_map() {
        // Missing: the map lacks it.
        let e = fault::<Holder>(json!({"model": {"arch": "resnet"}}));
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            ("model", "missing field `depth`")
        );
        let e = fault::<Holder>(json!({"model": {"width": 8}}));
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            ("model", "missing field `arch`")
        );
        // A required field's removal reads as missing, so it cannot be told from the tag's.
        let e = fault::<Holder>(json!({"model": {"arch": "resnet", "depth": "x"}}));
        assert_eq!(e.path, "model");
        // Two fields with the same fault: removing either leaves the same error.
        let e = fault::<Holder>(json!({"model": {"arch": "mlp", "depth": "x", "width": "x"}}));
        assert_eq!(e.path, "model");
        // Outside tagged enums serde's own path stands.
        let e = fault::<Holder>(json!({"model": {"arch": "cnn"}, "extra": 1}));
        assert_eq!(e.path, "extra");
        assert!(e.message.starts_with("unknown field `extra`"), "{e}");
    }
}
