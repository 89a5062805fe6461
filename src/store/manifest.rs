//! `manifest.json`: what an artifact is, where it came from, and the hashes of its files.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::device::DeviceClass;
use crate::key::Key;

/// The name of the manifest file in every artifact directory.
pub const MANIFEST: &str = "manifest.json";
/// The stage's log, kept with its artifact (not among the hashed outputs: it holds timings).
pub const LOG: &str = "log.txt";
/// The optional JSON object a stage may write; embedded in the manifest under `summary`.
pub const SUMMARY: &str = "summary.json";

/// The keys bound to one input slot: one for a plain slot, a list for a sweep slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InputKeys {
    /// A plain slot.
    One(Key),
    /// A sweep slot, in expansion order.
    Many(Vec<Key>),
}

impl InputKeys {
    /// The keys, in order.
    pub fn keys(&self) -> Vec<&Key> {
        match self {
            InputKeys::One(k) => vec![k],
            InputKeys::Many(ks) => ks.iter().collect(),
        }
    }
}

/// A hashed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// blake3 of the contents, hex.
    pub blake3: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// An external file that entered the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalRecord {
    /// The path as the kind named it.
    pub path: String,
    /// blake3 of the contents, hex.
    pub blake3: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// The contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Stage kind.
    pub kind: String,
    /// Kind version.
    pub version: u32,
    /// The artifact's key.
    pub key: Key,
    /// Key encoding version.
    pub key_format: u32,
    /// The pipeline that first produced it.
    pub pipeline: String,
    /// The instance name that first produced it.
    pub stage: String,
    /// Canonical params.
    pub params: Value,
    /// Input slot → key(s).
    pub inputs: BTreeMap<String, InputKeys>,
    /// Input slot → the one output file it took (`stage:output`), where one was named.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub input_outputs: BTreeMap<String, String>,
    /// External files that entered the key.
    pub external_files: Vec<ExternalRecord>,
    /// Device class.
    pub device: DeviceClass,
    /// Output file (relative path, `/`-separated) → hash and size.
    pub outputs: BTreeMap<String, FileRecord>,
    /// The stage's `summary.json`, if it wrote one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Value>,
    /// `eoss` version that computed it.
    pub tool_version: String,
    /// Start time (RFC 3339).
    pub started: String,
    /// End time (RFC 3339).
    pub finished: String,
    /// Wall-clock seconds of the stage.
    pub seconds: f64,
    /// Host name.
    pub host: String,
}

impl Manifest {
    /// What a reader of a run's output should know beyond "it is published": a run that diverged
    /// (`diverged_at` in its summary) is a valid, cached result, noted with the step.
    pub fn note(&self) -> Option<String> {
        let step = self.summary.as_ref()?.get("diverged_at")?.as_u64()?;
        Some(format!("diverged at step {step}"))
    }
}
