//! Artifact keys: everything that determines an artifact, gathered in one struct ([`KeyInput`]) and
//! hashed with blake3 over a canonical encoding (JSON with sorted keys, no whitespace).
//!
//! Keys are computed before anything runs, from the kind, its version, the canonical params, the keys
//! of the inputs, the content hashes of external files and the device class, so `plan` executes
//! nothing. Changing the encoding changes every key: bump [`KEY_FORMAT`] when doing so.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::device::DeviceClass;

/// Version of the key encoding; part of every key.
pub const KEY_FORMAT: u32 = 1;

/// A content key: 64 lowercase hex digits of a blake3 hash.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Key(String);

impl Key {
    /// The hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, for display.
    pub fn short(&self) -> &str {
        &self.0[..12.min(self.0.len())]
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<blake3::Hash> for Key {
    fn from(h: blake3::Hash) -> Self {
        Key(h.to_hex().to_string())
    }
}

/// Everything that determines an artifact.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyInput<'a> {
    /// [`KEY_FORMAT`].
    pub key_format: u32,
    /// The stage kind.
    pub kind: &'a str,
    /// The kind's version.
    pub kind_version: u32,
    /// Canonical params (defaults filled in by the kind).
    pub params: &'a Value,
    /// Input slot → keys of the bound artifacts, in binding order.
    pub inputs: BTreeMap<&'a str, Vec<&'a Key>>,
    /// Input slot → the one output file it takes (`stage:output`); left out of the encoding when
    /// empty, so keys of stages that name no output are those of earlier versions.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub input_outputs: BTreeMap<&'a str, &'a str>,
    /// Content hashes (blake3 hex) of the external files the kind named, in its order.
    pub external_files: Vec<&'a str>,
    /// Where the stage computes.
    pub device: DeviceClass,
}

impl KeyInput<'_> {
    /// The canonical bytes that are hashed.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let value = serde_json::to_value(self).expect("a KeyInput always serializes to JSON");
        let mut out = Vec::new();
        write_canonical(&value, &mut out);
        out
    }

    /// The key.
    pub fn key(&self) -> Key {
        blake3::hash(&self.canonical_bytes()).into()
    }
}

/// Writes JSON with object keys sorted and no whitespace, whatever the map implementation.
pub fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            out.push(b'{');
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => out.extend(scalar.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample<'a>(params: &'a Value, input: &'a Key) -> KeyInput<'a> {
        KeyInput {
            key_format: KEY_FORMAT,
            kind: "train",
            kind_version: 3,
            params,
            inputs: [("data", vec![input])].into_iter().collect(),
            input_outputs: BTreeMap::new(),
            external_files: vec!["ab"],
            device: DeviceClass::Cpu,
        }
    }

    #[test]
    fn canonical_bytes_are_sorted_compact_json() {
        let params = json!({"lr": 0.01, "b": 16, "model": {"w": 2, "a": [1, "x"]}});
        let input = Key("00".repeat(32));
        let bytes = sample(&params, &input).canonical_bytes();
        let expected = format!(
            r#"{{"device":"cpu","external_files":["ab"],"inputs":{{"data":["{}"]}},"key_format":1,"kind":"train","kind_version":3,"params":{{"b":16,"lr":0.01,"model":{{"a":[1,"x"],"w":2}}}}}}"#,
            "00".repeat(32)
        );
        assert_eq!(String::from_utf8(bytes).unwrap(), expected);
        // Golden: pins the encoding; a change here means every stored key changes (bump KEY_FORMAT).
        assert_eq!(
            sample(&params, &input).key().as_str(),
            blake3::hash(expected.as_bytes()).to_hex().as_str()
        );
        assert_eq!(
            sample(&params, &input).key().as_str(),
            "f390e969727e98013bbd195b52e781d621102f374e6c420a4ab08e959bcd5aa7"
        );
    }

    #[test]
    fn every_field_changes_the_key() {
        let params = json!({"lr": 0.01});
        let input = Key("11".repeat(32));
        let other_input = Key("22".repeat(32));
        let base = sample(&params, &input);
        let p2 = json!({"lr": 0.02});
        let variants = [
            KeyInput {
                key_format: KEY_FORMAT + 1,
                ..base.clone()
            },
            KeyInput {
                kind: "measure",
                ..base.clone()
            },
            KeyInput {
                kind_version: 4,
                ..base.clone()
            },
            KeyInput {
                params: &p2,
                ..base.clone()
            },
            KeyInput {
                inputs: [("data", vec![&other_input])].into_iter().collect(),
                ..base.clone()
            },
            KeyInput {
                inputs: [("train", vec![&input])].into_iter().collect(),
                ..base.clone()
            },
            KeyInput {
                input_outputs: [("data", "dataset.safetensors")].into_iter().collect(),
                ..base.clone()
            },
            KeyInput {
                external_files: vec!["cd"],
                ..base.clone()
            },
            KeyInput {
                device: DeviceClass::Cuda,
                ..base.clone()
            },
        ];
        let mut keys: Vec<Key> = variants.iter().map(KeyInput::key).collect();
        keys.push(base.key());
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n);
    }

    #[test]
    fn key_ignores_the_order_params_were_written_in() {
        let a: Value = serde_json::from_str(r#"{"x": 1, "y": {"p": 1, "q": 2}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"y": {"q": 2, "p": 1}, "x": 1}"#).unwrap();
        let input = Key("11".repeat(32));
        assert_eq!(sample(&a, &input).key(), sample(&b, &input).key());
    }
}
