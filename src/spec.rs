//! Pipeline files as written: serde types mirroring the YAML (unknown fields are errors), the source
//! text kept for diagnostics, and [`locate`], which finds the line and column of any field path.
//!
//! Nothing here knows stage kinds or sweeps: [`crate::expand`] applies profiles, `--set` overrides and
//! matrices; the kinds check params.
//!
//! ```yaml
//! name: quickstart
//! defaults:              # per kind, merged under every stage of that kind
//!   dataset: {source: synthetic}
//! profiles:
//!   smoke:
//!     defaults: {dataset: {n: 64}}
//!     stages: {train: {params: {steps: 10}}}
//! stages:
//!   data: {kind: dataset, params: {n: 256}}
//!   train:
//!     kind: train
//!     inputs: {data: data}
//!     matrix: {lr: [0.01, 0.02]}
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::error::{Invalid, Location, Problem, SourceFile};

/// A free-form YAML mapping (params, matrices), checked later by the stage kind.
pub type Mapping = serde_yaml::Mapping;

/// The top level of a pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// The pipeline's name (recorded in manifests).
    pub name: String,
    /// Params merged under every stage of a kind: kind → params.
    #[serde(default)]
    pub defaults: BTreeMap<String, Mapping>,
    /// Named profiles selected with `--profile NAME`.
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
    /// The stages, in file order.
    pub stages: StageList,
}

/// A named profile: overrides applied on top of the file (e.g. `smoke` vs `paper` scale).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Per-kind params merged over the file's `defaults`.
    #[serde(default)]
    pub defaults: BTreeMap<String, Mapping>,
    /// Per-stage overrides.
    #[serde(default)]
    pub stages: BTreeMap<String, StageOverride>,
}

/// A profile's override of one stage.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageOverride {
    /// Params merged (deeply) over the stage's own.
    #[serde(default)]
    pub params: Mapping,
    /// Replaces the stage's matrix.
    #[serde(default)]
    pub matrix: Option<Mapping>,
}

/// One stage as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// The stage kind (`dataset`, `train`, ...).
    pub kind: String,
    /// Free-form params, checked by the kind.
    #[serde(default)]
    pub params: Mapping,
    /// Input slot → the stage (or stages, for a sweep slot) it takes.
    #[serde(default)]
    pub inputs: BTreeMap<String, InputRefs>,
    /// A sweep: param name (dotted for nested params) → values, plus optional `include` and
    /// `exclude` lists of combinations.
    #[serde(default)]
    pub matrix: Option<Mapping>,
}

/// What an input slot names: one reference, or a list of them (sweep slots).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum InputRefs {
    /// `data: dataset` or `run: train[lr=0.01]`.
    One(String),
    /// `runs: [train_a, train_b]`.
    Many(Vec<String>),
}

impl InputRefs {
    /// The references, in order.
    pub fn refs(&self) -> Vec<&str> {
        match self {
            InputRefs::One(r) => vec![r.as_str()],
            InputRefs::Many(rs) => rs.iter().map(String::as_str).collect(),
        }
    }
}

/// The `stages:` mapping in file order, with repeated names recorded instead of silently merged.
#[derive(Debug, Clone, Default)]
pub struct StageList {
    /// Stage name and spec, in file order (first occurrence of each name).
    pub entries: Vec<(String, StageSpec)>,
    /// Names that occur more than once, with the 0-based occurrence index of each repeat.
    pub duplicates: Vec<(String, usize)>,
}

impl<'de> Deserialize<'de> for StageList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ListVisitor;
        impl<'de> Visitor<'de> for ListVisitor {
            type Value = StageList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping from stage names to stages")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StageList, A::Error> {
                let mut list = StageList::default();
                let mut seen: BTreeMap<String, usize> = BTreeMap::new();
                while let Some(name) = map.next_key::<String>()? {
                    let spec: StageSpec = map.next_value()?;
                    let count = seen.entry(name.clone()).or_insert(0);
                    if *count == 0 {
                        list.entries.push((name.clone(), spec));
                    } else {
                        list.duplicates.push((name.clone(), *count));
                    }
                    *count += 1;
                }
                Ok(list)
            }
        }
        d.deserialize_map(ListVisitor)
    }
}

/// A parsed pipeline file with its source text.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The file and its text.
    pub source: SourceFile,
    /// The typed contents.
    pub file: PipelineFile,
}

/// Reads and parses a pipeline file. Syntax errors and unknown or mistyped top-level fields are
/// reported with file:line:column.
pub fn load(path: &Path) -> Result<Pipeline, Invalid> {
    let text = std::fs::read_to_string(path).map_err(|e| Invalid {
        what: path.display().to_string(),
        problems: vec![Problem::argument(
            &path.display().to_string(),
            format!("cannot read the pipeline file: {e}"),
        )],
    })?;
    parse(path, text)
}

/// Parses pipeline text read from `path` (the path is only used in messages).
pub fn parse(path: &Path, text: String) -> Result<Pipeline, Invalid> {
    let source = SourceFile {
        path: path.to_path_buf(),
        text: Arc::new(text),
    };
    match serde_yaml::from_str::<PipelineFile>(&source.text) {
        Ok(file) => {
            let problems: Vec<Problem> = file
                .stages
                .duplicates
                .iter()
                .map(|(name, occurrence)| {
                    let loc = locate_nth(&source.text, &keys(&["stages", name]), *occurrence);
                    Problem::at(
                        &source,
                        loc,
                        &format!("stages.{name}"),
                        format!("duplicate stage name `{name}`"),
                    )
                    .with_help("stage names must be unique within a pipeline")
                })
                .collect();
            if problems.is_empty() {
                Ok(Pipeline { source, file })
            } else {
                Err(Invalid {
                    what: path.display().to_string(),
                    problems,
                })
            }
        }
        Err(e) => {
            let location = e
                .location()
                .map(|l| location_at(&source.text, l.line(), l.column(), 1));
            let message = strip_positions(&e.to_string());
            // serde_yaml prefixes the field path (`stages.data: unknown field ...`).
            let (field, what) = match message.split_once(": ") {
                Some((path, rest)) if !path.contains(' ') => (path.to_string(), rest.to_string()),
                _ => (String::new(), message),
            };
            let problem = Problem::at(&source, location, &field, what);
            Err(Invalid {
                what: path.display().to_string(),
                problems: vec![problem],
            })
        }
    }
}

/// Removes serde_yaml's ` at line N column M` (the position is reported separately).
fn strip_positions(message: &str) -> String {
    let mut out = message.to_string();
    while let Some(start) = out.find(" at line ") {
        let rest = &out[start + " at line ".len()..];
        let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let line_len = digits(rest);
        let Some(after) = rest[line_len..].strip_prefix(" column ") else {
            break;
        };
        let end = start + " at line ".len() + line_len + " column ".len() + digits(after);
        out.replace_range(start..end, "");
    }
    out
}

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A mapping key.
    Key(String),
    /// A sequence index.
    Index(usize),
}

/// Builds a path of mapping keys.
pub fn keys(parts: &[&str]) -> Vec<Segment> {
    parts
        .iter()
        .map(|p| Segment::Key((*p).to_string()))
        .collect()
}

/// Splits a dotted field path as written by `serde_path_to_error` (`model.widths[2]`) into segments.
pub fn parse_field_path(path: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            out.push(Segment::Key(name.to_string()));
        }
        while let Some(end) = rest.find(']') {
            if let Ok(i) = rest[1..end].parse() {
                out.push(Segment::Index(i));
            }
            rest = &rest[end + 1..];
        }
    }
    out
}

/// Finds where the field at `path` is written in YAML `text`: the key for a mapping entry, the
/// element for a sequence index. `None` when the path is not in the text.
pub fn locate(text: &str, path: &[Segment]) -> Option<Location> {
    locate_nth(text, path, 0)
}

/// Like [`locate`], but for the `occurrence`-th (0-based) repeat of the last key in its mapping.
pub fn locate_nth(text: &str, path: &[Segment], occurrence: usize) -> Option<Location> {
    let walk = Walk { path, occurrence };
    let err = walk
        .deserialize(serde_yaml::Deserializer::from_str(text))
        .err()?;
    let message = err.to_string();
    let start = message.find(FOUND)? + FOUND.len();
    let len = message[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let l = err.location()?;
    Some(location_at(text, l.line(), l.column(), len))
}

/// A [`Location`] from a 1-based line and column (in characters), converted to a byte offset.
fn location_at(text: &str, line: usize, column: usize, len: usize) -> Location {
    let line_start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    let col_bytes: usize = text[line_start.min(text.len())..]
        .chars()
        .take(column.saturating_sub(1))
        .map(char::len_utf8)
        .sum();
    let offset = (line_start + col_bytes).min(text.len());
    Location {
        offset,
        len: len.min(text.len() - offset).max(1),
        line,
        column,
    }
}

/// Marker of the deliberate error that carries a found location out of the deserializer.
const FOUND: &str = "\u{1}eoss-found:";

fn found<E: de::Error>(len: usize) -> E {
    E::custom(format!("{FOUND}{len}"))
}

/// Walks a YAML document along a path; fails with [`FOUND`] at the target so that serde_yaml attaches
/// the target's position to the error.
struct Walk<'p> {
    path: &'p [Segment],
    occurrence: usize,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.path.split_first() {
            None => d.deserialize_any(Target),
            Some((segment, rest)) => d.deserialize_any(Step {
                segment,
                rest,
                occurrence: self.occurrence,
            }),
        }
    }
}

/// Fails with [`FOUND`] whatever the value is.
struct Target;

impl<'de> Visitor<'de> for Target {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        Err(found(v.to_string().len()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        Err(found(v.to_string().len()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        Err(found(v.to_string().len()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        Err(found(v.to_string().len()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        Err(found(v.len()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(found(1))
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(found(1))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(found(1))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(found(1))
    }
}

/// Descends one path segment.
struct Step<'p> {
    segment: &'p Segment,
    rest: &'p [Segment],
    occurrence: usize,
}

impl<'de> Visitor<'de> for Step<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            let more = if self.segment == &Segment::Index(i) {
                seq.next_element_seed(Walk {
                    path: self.rest,
                    occurrence: self.occurrence,
                })?
            } else {
                seq.next_element::<IgnoredAny>()?.map(|_| ())
            };
            if more.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Segment::Key(wanted) = self.segment else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let mut seen = 0;
        let last = self.rest.is_empty();
        // The occurrence counts repeats of the last key only.
        let wanted_occurrence = if last { self.occurrence } else { 0 };
        while let Some(matched) = map.next_key_seed(KeySeed {
            wanted,
            fail_on_match: last && seen == wanted_occurrence,
        })? {
            if matched && seen == wanted_occurrence {
                return map.next_value_seed(Walk {
                    path: self.rest,
                    occurrence: self.occurrence,
                });
            }
            if matched {
                seen += 1;
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

/// Reads a mapping key and says whether it is the wanted one (failing with [`FOUND`] when asked to,
/// which locates the key itself).
struct KeySeed<'p> {
    wanted: &'p str,
    fail_on_match: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        let matched = v == self.wanted;
        if matched && self.fail_on_match {
            return Err(found(v.len()));
        }
        Ok(matched)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

/// Converts free-form YAML to JSON for the kinds. Errors name the offending sub-path (relative to
/// `value`) and why: non-string mapping keys, YAML tags, and non-finite numbers have no JSON form.
pub fn to_json(value: &serde_yaml::Value) -> Result<serde_json::Value, (String, String)> {
    use serde_yaml::Value as Y;
    Ok(match value {
        Y::Null => serde_json::Value::Null,
        Y::Bool(b) => serde_json::Value::Bool(*b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into()
            } else if let Some(u) = n.as_u64() {
                u.into()
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(serde_json::Value::Number)
                    .ok_or_else(|| (String::new(), format!("`{f}` is not a finite number")))?
            }
        }
        Y::String(s) => serde_json::Value::String(s.clone()),
        Y::Sequence(items) => serde_json::Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| to_json(v).map_err(|(p, m)| (format!("[{i}]{}", dotted(&p)), m)))
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(map) => serde_json::Value::Object(mapping_to_json(map)?),
        Y::Tagged(t) => {
            return Err((
                String::new(),
                format!("YAML tags (`{}`) are not supported here", t.tag),
            ))
        }
    })
}

/// [`to_json`] for a mapping.
pub fn mapping_to_json(
    map: &Mapping,
) -> Result<serde_json::Map<String, serde_json::Value>, (String, String)> {
    let mut out = serde_json::Map::new();
    for (k, v) in map {
        let key = match k {
            serde_yaml::Value::String(s) => s.clone(),
            other => {
                return Err((
                    String::new(),
                    format!(
                        "mapping keys must be strings, found `{}`",
                        scalar_text(other)
                    ),
                ))
            }
        };
        let value = to_json(v).map_err(|(p, m)| (format!("{key}{}", dotted(&p)), m))?;
        out.insert(key, value);
    }
    Ok(out)
}

fn dotted(sub: &str) -> String {
    if sub.is_empty() || sub.starts_with('[') {
        sub.to_string()
    } else {
        format!(".{sub}")
    }
}

/// A short rendering of a YAML value for messages.
pub fn scalar_text(v: &serde_yaml::Value) -> String {
    serde_yaml::to_string(v)
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "name: p\nstages:\n  data:\n    kind: dataset\n    params:\n      n: 64\n      model: {width: 512, depths: [1, 2, 3]}\n  train:\n    kind: train\n";

    #[test]
    fn locate_finds_keys_and_flow_values() {
        let at = |p: &str| {
            let l = locate(TEXT, &parse_field_path(p)).unwrap();
            (l.line, l.column, &TEXT[l.offset..l.offset + l.len])
        };
        assert_eq!(at("stages.data.params.n"), (6, 7, "n"));
        assert_eq!(at("stages.train.kind"), (9, 5, "kind"));
        assert_eq!(at("stages.data.params.model.width"), (7, 15, "width"));
        assert_eq!(at("stages.data.params.model.depths[2]"), (7, 42, "3"));
        assert!(locate(TEXT, &parse_field_path("stages.data.params.missing")).is_none());
        assert!(locate(TEXT, &parse_field_path("stages.train.params.n")).is_none());
    }

    #[test]
    fn duplicate_stage_names_are_reported_at_the_repeat() {
        let text = "name: p\nstages:\n  a: {kind: x}\n  b: {kind: x}\n  a: {kind: y}\n";
        let err = parse(Path::new("p.yaml"), text.into()).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        let msg = &err.problems[0].message;
        assert!(
            msg.starts_with("p.yaml:5:3: stages.a: duplicate stage name `a`"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_fields_are_syntax_errors_with_positions() {
        let text = "name: p\nstages:\n  a:\n    kind: x\n    parms: {}\n";
        let err = parse(Path::new("p.yaml"), text.into()).unwrap_err();
        let msg = &err.problems[0].message;
        assert!(
            msg.starts_with("p.yaml:5:5: stages.a: unknown field `parms`"),
            "{msg}"
        );
    }

    #[test]
    fn yaml_to_json_rejects_what_json_cannot_hold() {
        let v: serde_yaml::Value = serde_yaml::from_str("{a: {b: [1, .nan]}}").unwrap();
        assert_eq!(to_json(&v).unwrap_err().0, "a.b[1]");
        let v: serde_yaml::Value = serde_yaml::from_str("{1: 2}").unwrap();
        assert!(to_json(&v).unwrap_err().1.contains("keys must be strings"));
        let v: serde_yaml::Value = serde_yaml::from_str("{a: [1, 2.5, x, true, null]}").unwrap();
        assert_eq!(
            to_json(&v).unwrap(),
            serde_json::json!({"a": [1, 2.5, "x", true, null]})
        );
    }

    #[test]
    fn field_paths_split_keys_and_indices() {
        assert_eq!(
            parse_field_path("a.b[2].c"),
            vec![
                Segment::Key("a".into()),
                Segment::Key("b".into()),
                Segment::Index(2),
                Segment::Key("c".into())
            ]
        );
    }
}
