//! From a parsed pipeline to concrete stage instances: profiles and `--set` overrides
//! ([`declare`]), then matrix sweeps and input binding ([`expand`]).
//!
//! Sweeps: `matrix: {lr: [0.01, 0.02], batch: [8, 16]}` gives one instance per combination, in file
//! order with the last key varying fastest, minus the `exclude` entries (a combination is excluded when
//! it matches every key of an entry), plus the `include` entries (whole combinations appended). Matrix
//! keys are param names, dotted for nested params (`model.width`). Instances are named
//! `train[lr=0.01,batch=16]`.
//!
//! Binding: every instance carries an *assignment*, its own matrix values plus those inherited from
//! its inputs. A non-sweep input naming a swept stage binds to the instances whose assignment agrees
//! with the downstream instance's on the keys they share; when several agree the downstream stage fans
//! out over them (so `measure` taking a swept `train` becomes `measure[lr=...]`). A sweep input slot
//! takes every agreeing instance in expansion order. An input may also name one instance explicitly
//! (`train[lr=0.01]`, key order free).

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

use crate::error::{Problem, SourceFile};
use crate::spec::{keys, locate, mapping_to_json, to_json, Mapping, Pipeline, Segment};

/// Command-line overrides of a pipeline.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--profile NAME`.
    pub profile: Option<String>,
    /// `--set stage.param=value`, as given (the value is read as YAML).
    pub sets: Vec<String>,
}

/// One matrix value per key: a combination.
pub type Assignment = Vec<(String, Value)>;

/// A stage after overrides, before sweeps are expanded.
#[derive(Debug, Clone, PartialEq)]
pub struct StageDecl {
    /// The stage name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// Merged params: kind defaults, profile defaults, stage params, profile stage params, `--set`.
    pub params: serde_json::Map<String, Value>,
    /// The stage's own combinations (one empty combination without a matrix).
    pub combinations: Vec<Assignment>,
    /// Input slot → references, as written.
    pub inputs: BTreeMap<String, Vec<String>>,
}

/// Applies the chosen profile and `--set` overrides and parses matrices. All problems are returned
/// together.
pub fn declare(p: &Pipeline, o: &Overrides) -> Result<Vec<StageDecl>, Vec<Problem>> {
    let src = &p.source;
    let f = &p.file;
    let mut problems = Vec::new();
    let profile = match &o.profile {
        None => None,
        Some(name) => match f.profiles.get(name) {
            Some(prof) => Some((name.as_str(), prof)),
            None => {
                let known: Vec<&str> = f.profiles.keys().map(String::as_str).collect();
                problems.push(Problem::argument(
                    &format!("--profile {name}"),
                    format!(
                        "{} defines no profile `{name}` (it defines: {})",
                        src.path.display(),
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
                None
            }
        },
    };
    if let Some((pname, prof)) = profile {
        for stage in prof.stages.keys() {
            if !f.stages.entries.iter().any(|(n, _)| n == stage) {
                let path = keys(&["profiles", pname, "stages", stage]);
                problems.push(Problem::at(
                    src,
                    locate(&src.text, &path),
                    &format!("profiles.{pname}.stages.{stage}"),
                    format!("no stage named `{stage}`"),
                ));
            }
        }
    }

    let mut decls = Vec::new();
    for (name, spec) in &f.stages.entries {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            problems.push(Problem::at(
                src,
                locate(&src.text, &keys(&["stages", name])),
                &format!("stages.{name}"),
                "stage names may contain only ASCII letters, digits, `_` and `-`",
            ));
            continue;
        }
        let mut layers: Vec<(Vec<Segment>, &Mapping)> = Vec::new();
        if let Some(d) = f.defaults.get(&spec.kind) {
            layers.push((keys(&["defaults", &spec.kind]), d));
        }
        if let Some((pname, prof)) = profile {
            if let Some(d) = prof.defaults.get(&spec.kind) {
                layers.push((keys(&["profiles", pname, "defaults", &spec.kind]), d));
            }
        }
        layers.push((keys(&["stages", name, "params"]), &spec.params));
        let mut matrix = (keys(&["stages", name, "matrix"]), spec.matrix.as_ref());
        if let Some((pname, prof)) = profile {
            if let Some(ov) = prof.stages.get(name) {
                layers.push((
                    keys(&["profiles", pname, "stages", name, "params"]),
                    &ov.params,
                ));
                if let Some(m) = &ov.matrix {
                    matrix = (
                        keys(&["profiles", pname, "stages", name, "matrix"]),
                        Some(m),
                    );
                }
            }
        }
        let mut params = serde_json::Map::new();
        for (path, layer) in layers {
            match mapping_to_json(layer) {
                Ok(obj) => merge(&mut params, obj),
                Err((sub, msg)) => problems.push(yaml_problem(src, &path, &sub, msg)),
            }
        }
        let combinations = match matrix.1 {
            None => Ok(vec![Vec::new()]),
            Some(m) => parse_matrix(src, &matrix.0, m),
        };
        match combinations {
            Ok(combinations) => decls.push(StageDecl {
                name: name.clone(),
                kind: spec.kind.clone(),
                params,
                combinations,
                inputs: spec
                    .inputs
                    .iter()
                    .map(|(slot, r)| {
                        (
                            slot.clone(),
                            r.refs().into_iter().map(String::from).collect(),
                        )
                    })
                    .collect(),
            }),
            Err(mut ps) => problems.append(&mut ps),
        }
    }
    for set in &o.sets {
        if let Err(p) = apply_set(&mut decls, set) {
            problems.push(*p);
        }
    }
    if problems.is_empty() {
        Ok(decls)
    } else {
        Err(problems)
    }
}

fn yaml_problem(src: &SourceFile, base: &[Segment], sub: &str, msg: String) -> Problem {
    let mut path = base.to_vec();
    path.extend(crate::spec::parse_field_path(sub));
    let field = render_path(&path);
    Problem::at(src, locate(&src.text, &path), &field, msg)
}

/// Renders a path as `a.b[2].c`.
pub fn render_path(path: &[Segment]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Segment::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Deep merge: objects merge key by key, anything else is replaced.
fn merge(base: &mut serde_json::Map<String, Value>, over: serde_json::Map<String, Value>) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Object(b)), Value::Object(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn parse_matrix(
    src: &SourceFile,
    at: &[Segment],
    m: &Mapping,
) -> Result<Vec<Assignment>, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut axes: Vec<(String, Vec<Value>)> = Vec::new();
    let mut include = Vec::new();
    let mut exclude = Vec::new();
    let problem = |sub: &[&str], msg: String| {
        let mut path = at.to_vec();
        path.extend(sub.iter().map(|s| Segment::Key((*s).to_string())));
        Problem::at(src, locate(&src.text, &path), &render_path(&path), msg)
    };
    for (k, v) in m {
        let Some(key) = k.as_str() else {
            problems.push(problem(&[], "matrix keys must be param names".into()));
            continue;
        };
        let list = match v.as_sequence() {
            Some(list) if !list.is_empty() => list,
            _ => {
                problems.push(problem(&[key], "expected a non-empty list".into()));
                continue;
            }
        };
        if key == "include" || key == "exclude" {
            for entry in list {
                let combo = entry
                    .as_mapping()
                    .ok_or_else(|| {
                        "each entry must be a mapping of param names to values".to_string()
                    })
                    .and_then(|map| {
                        mapping_to_json(map).map_err(|(sub, msg)| format!("{sub}: {msg}"))
                    })
                    .and_then(|obj| {
                        obj.into_iter()
                            .map(|(k, v)| scalar(&v).map(|_| (k, v)))
                            .collect::<Result<Assignment, _>>()
                    });
                match combo {
                    Ok(c) if key == "include" => include.push(c),
                    Ok(c) => exclude.push(c),
                    Err(msg) => problems.push(problem(&[key], msg)),
                }
            }
        } else {
            let values: Result<Vec<Value>, String> = list
                .iter()
                .map(|y| {
                    to_json(y)
                        .map_err(|(_, m)| m)
                        .and_then(|v| scalar(&v).map(|_| v))
                })
                .collect();
            match values {
                Ok(vals) => axes.push((key.to_string(), vals)),
                Err(msg) => problems.push(problem(&[key], msg)),
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut combos: Vec<Assignment> = vec![Vec::new()];
    for (key, values) in &axes {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((key.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    if axes.is_empty() {
        combos.clear();
    }
    combos.retain(|c| {
        !exclude
            .iter()
            .any(|e| e.iter().all(|(k, v)| value_of(c, k) == Some(v)))
    });
    let axis = |k: &String| axes.iter().position(|(a, _)| a == k).unwrap_or(axes.len());
    for mut inc in include {
        inc.sort_by_key(|(k, _)| axis(k));
        if !combos.iter().any(|c| same_combination(c, &inc)) {
            combos.push(inc);
        }
    }
    if combos.is_empty() {
        return Err(vec![problem(
            &[],
            "the matrix leaves no combination".into(),
        )]);
    }
    Ok(combos)
}

/// Matrix values must be scalars (they appear in instance names).
fn scalar(v: &Value) -> Result<(), String> {
    match v {
        Value::Array(_) | Value::Object(_) => {
            Err(format!("matrix values must be scalars, found `{v}`"))
        }
        _ => Ok(()),
    }
}

fn value_of<'a>(c: &'a Assignment, key: &str) -> Option<&'a Value> {
    c.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn same_combination(a: &Assignment, b: &Assignment) -> bool {
    a.len() == b.len() && a.iter().all(|(k, v)| value_of(b, k) == Some(v))
}

/// Applies one `--set stage.param=value`. Setting a swept key narrows the sweep to that value.
fn apply_set(decls: &mut [StageDecl], set: &str) -> Result<(), Box<Problem>> {
    let arg = format!("--set {set}");
    let bad = |what: String| Box::new(Problem::argument(&arg, what));
    let Some((target, raw)) = set.split_once('=') else {
        return Err(bad("expected `stage.param=value`".into()));
    };
    let Some((stage, param)) = target.split_once('.') else {
        return Err(bad(
            "expected `stage.param=value` (no `.` before `=`)".into()
        ));
    };
    // The stage part may be a glob (`train*.device=cuda` sets every stage named train...).
    let pattern = glob::Pattern::new(stage)
        .map_err(|e| bad(format!("`{stage}` is not a stage name or pattern: {e}")))?;
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(raw).map_err(|e| bad(format!("the value is not valid YAML: {e}")))?;
    let value = to_json(&yaml).map_err(|(_, m)| bad(m))?;
    let mut matched = false;
    for decl in decls.iter_mut().filter(|d| pattern.matches(&d.name)) {
        matched = true;
        let swept = decl
            .combinations
            .iter()
            .any(|c| value_of(c, param).is_some());
        if swept {
            decl.combinations
                .retain(|c| value_of(c, param).is_none_or(|v| *v == value));
            if decl.combinations.is_empty() {
                return Err(bad(format!(
                    "`{param}` is swept by the matrix of `{}` and `{raw}` is not one of its values",
                    decl.name
                )));
            }
        } else {
            set_path(&mut decl.params, param, value.clone()).map_err(&bad)?;
        }
    }
    if matched {
        Ok(())
    } else {
        Err(bad(format!("the pipeline has no stage named `{stage}`")))
    }
}

/// Sets a dotted path in a params object, creating intermediate objects.
pub fn set_path(
    params: &mut serde_json::Map<String, Value>,
    path: &str,
    value: Value,
) -> Result<(), String> {
    let mut parts = path.split('.').peekable();
    let mut obj = params;
    while let Some(part) = parts.next() {
        if part.is_empty() {
            return Err(format!("`{path}` is not a param path"));
        }
        if parts.peek().is_none() {
            obj.insert(part.to_string(), value);
            return Ok(());
        }
        let next = obj
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
        obj = next
            .as_object_mut()
            .ok_or_else(|| format!("`{part}` in `{path}` is not a mapping"))?;
    }
    Ok(())
}

/// A concrete stage instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// Instance name, e.g. `train[lr=0.01,batch=16]`.
    pub name: String,
    /// Index of its [`StageDecl`].
    pub decl: usize,
    /// Own matrix values, then those inherited from inputs.
    pub assignment: Assignment,
    /// Raw params: the declaration's with its own matrix values set (checked later by the kind).
    pub params: serde_json::Map<String, Value>,
    /// Input slot → instance indices (one for a plain slot, all agreeing ones for a sweep slot).
    pub inputs: BTreeMap<String, Vec<usize>>,
}

/// Renders a matrix value as it appears in instance names.
pub fn render_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The instance name for a stage and an assignment.
pub fn instance_name(stage: &str, assignment: &Assignment) -> String {
    if assignment.is_empty() {
        return stage.to_string();
    }
    let parts: Vec<String> = assignment
        .iter()
        .map(|(k, v)| format!("{k}={}", render_value(v)))
        .collect();
    format!("{stage}[{}]", parts.join(","))
}

/// Splits a reference into the instance part and the one output it names, if any:
/// `train:metrics.csv` → (`train`, `metrics.csv`), `train[lr=0.01]:x` → (`train[lr=0.01]`, `x`).
fn split_output(r: &str) -> (&str, Option<&str>) {
    let tail_from = r.rfind(']').map_or(0, |i| i + 1);
    match r[tail_from..].find(':') {
        Some(i) => (&r[..tail_from + i], Some(&r[tail_from + i + 1..])),
        None => (r, None),
    }
}

/// The output file a reference names (`train:metrics.csv` → `metrics.csv`), if any.
pub fn referenced_output(r: &str) -> Option<&str> {
    split_output(r).1
}

/// Splits `train[lr=0.01,batch=16]` into `train` and its `key=value` pairs (`None` if not of that
/// form), ignoring a `:output` suffix.
fn parse_reference(r: &str) -> (&str, Option<Vec<(&str, &str)>>) {
    let r = split_output(r).0;
    match r.strip_suffix(']').and_then(|s| s.split_once('[')) {
        Some((base, body)) => {
            let pairs = body
                .split(',')
                .map(|p| p.split_once('=').unwrap_or((p, "")))
                .collect();
            (base, Some(pairs))
        }
        None => (r, None),
    }
}

/// The stage a reference names (`train[lr=0.01]` → `train`).
pub fn referenced_stage(r: &str) -> &str {
    parse_reference(r).0
}

fn agrees(a: &Assignment, b: &Assignment) -> bool {
    a.iter().all(|(k, v)| value_of(b, k).is_none_or(|w| w == v))
}

/// Expands sweeps and binds inputs. `order` lists declaration indices upstream first (every
/// reference has been checked to exist and the stage graph to be acyclic); `is_sweep(decl, slot)`
/// says whether a slot takes a whole sweep.
pub fn expand(
    src: &SourceFile,
    decls: &[StageDecl],
    order: &[usize],
    is_sweep: &dyn Fn(usize, &str) -> bool,
) -> Result<Vec<Instance>, Vec<Problem>> {
    let mut instances: Vec<Instance> = Vec::new();
    let mut of_decl: Vec<Vec<usize>> = vec![Vec::new(); decls.len()];
    let mut problems = Vec::new();
    let by_name: BTreeMap<&str, usize> = decls
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    for &di in order {
        let d = &decls[di];
        type Partial = (Assignment, usize, BTreeMap<String, Vec<usize>>);
        let mut partial: Vec<Partial> = d
            .combinations
            .iter()
            .map(|c| (c.clone(), c.len(), BTreeMap::new()))
            .collect();
        for (slot, refs) in &d.inputs {
            let field = format!("stages.{}.inputs.{slot}", d.name);
            let here = || locate(&src.text, &keys(&["stages", &d.name, "inputs", slot]));
            let sweep = is_sweep(di, slot);
            if !sweep && refs.len() != 1 {
                problems.push(Problem::at(
                    src,
                    here(),
                    &field,
                    format!(
                        "`{slot}` takes exactly one stage, found a list of {}",
                        refs.len()
                    ),
                ));
                partial.clear();
                break;
            }
            let mut next = Vec::new();
            for (asg, own, bound) in partial {
                let mut chosen: Vec<usize> = Vec::new();
                for r in refs {
                    let (base, pairs) = parse_reference(r);
                    let Some(&up) = by_name.get(base) else {
                        continue;
                    };
                    let candidates = of_decl[up].iter().copied().filter(|&i| match &pairs {
                        Some(pairs) => {
                            let a = &instances[i].assignment;
                            pairs.len() == a.len()
                                && pairs.iter().all(|(k, v)| {
                                    value_of(a, k).is_some_and(|w| render_value(w) == *v)
                                })
                        }
                        None => agrees(&asg, &instances[i].assignment),
                    });
                    chosen.extend(candidates);
                }
                if chosen.is_empty() {
                    let mut p = Problem::at(
                        src,
                        here(),
                        &field,
                        format!(
                            "no instance of `{}` matches `{}`",
                            refs.join(", "),
                            instance_name(&d.name, &asg)
                        ),
                    );
                    if let Some(&up) = refs.first().and_then(|r| by_name.get(referenced_stage(r))) {
                        let names: Vec<&str> = of_decl[up]
                            .iter()
                            .map(|&i| instances[i].name.as_str())
                            .collect();
                        p = p.with_help(format!("its instances are: {}", names.join(", ")));
                    }
                    problems.push(p);
                    continue;
                }
                if sweep {
                    let mut b = bound.clone();
                    b.insert(slot.clone(), chosen);
                    next.push((asg, own, b));
                } else {
                    for c in chosen {
                        let mut a = asg.clone();
                        for (k, v) in &instances[c].assignment {
                            if value_of(&a, k).is_none() {
                                a.push((k.clone(), v.clone()));
                            }
                        }
                        let mut b = bound.clone();
                        b.insert(slot.clone(), vec![c]);
                        next.push((a, own, b));
                    }
                }
            }
            partial = next;
        }
        let mut names = HashSet::new();
        for (asg, own, bound) in partial {
            let name = instance_name(&d.name, &asg);
            if !names.insert(name.clone()) {
                problems.push(Problem::at(
                    src,
                    locate(&src.text, &keys(&["stages", &d.name])),
                    &format!("stages.{}", d.name),
                    format!("the sweep produces the instance `{name}` twice"),
                ));
                continue;
            }
            let mut params = d.params.clone();
            for (k, v) in &asg[..own] {
                if let Err(m) = set_path(&mut params, k, v.clone()) {
                    problems.push(Problem::at(
                        src,
                        locate(&src.text, &keys(&["stages", &d.name, "matrix", k])),
                        &format!("stages.{}.matrix.{k}", d.name),
                        m,
                    ));
                }
            }
            of_decl[di].push(instances.len());
            instances.push(Instance {
                name,
                decl: di,
                assignment: asg,
                params,
                inputs: bound,
            });
        }
    }
    if problems.is_empty() {
        Ok(instances)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn decls(text: &str, o: &Overrides) -> (Pipeline, Result<Vec<StageDecl>, Vec<Problem>>) {
        let p = crate::spec::parse(Path::new("p.yaml"), text.to_string()).unwrap();
        let d = declare(&p, o);
        (p, d)
    }

    fn names(text: &str, sweep_slots: &[&str]) -> Vec<String> {
        let (p, d) = decls(text, &Overrides::default());
        let d = d.unwrap();
        let order: Vec<usize> = (0..d.len()).collect();
        let sweep = |_: usize, s: &str| sweep_slots.contains(&s);
        let inst = expand(&p.source, &d, &order, &sweep).unwrap();
        inst.iter()
            .map(|i| {
                let ins: Vec<String> = i
                    .inputs
                    .iter()
                    .map(|(s, v)| {
                        let v: Vec<&str> = v.iter().map(|&j| inst[j].name.as_str()).collect();
                        format!("{s}<-{}", v.join("+"))
                    })
                    .collect();
                if ins.is_empty() {
                    i.name.clone()
                } else {
                    format!("{} {}", i.name, ins.join(" "))
                }
            })
            .collect()
    }

    #[test]
    fn matrix_with_include_and_exclude_enumerates_in_order() {
        let text = "name: p\nstages:\n  t:\n    kind: k\n    matrix:\n      lr: [0.01, 0.02]\n      b: [8, 16]\n      exclude: [{lr: 0.02, b: 16}]\n      include: [{lr: 0.5, b: 8}, {lr: 0.01, b: 8}]\n";
        assert_eq!(
            names(text, &[]),
            [
                "t[lr=0.01,b=8]",
                "t[lr=0.01,b=16]",
                "t[lr=0.02,b=8]",
                "t[lr=0.5,b=8]"
            ]
        );
    }

    #[test]
    fn references_may_name_one_output() {
        assert_eq!(split_output("train"), ("train", None));
        assert_eq!(
            split_output("train:metrics.csv"),
            ("train", Some("metrics.csv"))
        );
        assert_eq!(
            split_output("train[lr=0.01]:checkpoints/step-1.safetensors"),
            ("train[lr=0.01]", Some("checkpoints/step-1.safetensors"))
        );
        assert_eq!(split_output("train[lr=0.01]"), ("train[lr=0.01]", None));
        assert_eq!(referenced_stage("train[lr=0.01]:metrics.csv"), "train");
        assert_eq!(
            parse_reference("train[lr=0.01]:x").1,
            Some(vec![("lr", "0.01")])
        );
    }

    #[test]
    fn non_sweep_inputs_bind_by_shared_keys_and_fan_out() {
        let text = "name: p\nstages:\n  d:\n    kind: k\n    matrix: {seed: [1, 2]}\n  t:\n    kind: k\n    inputs: {data: d}\n    matrix: {seed: [1, 2], lr: [0.1, 0.2]}\n  m:\n    kind: k\n    inputs: {run: t}\n  g:\n    kind: k\n    inputs: {runs: t}\n  one:\n    kind: k\n    inputs: {run: 't[lr=0.2,seed=1]'}\n";
        assert_eq!(
            names(text, &["runs"]),
            [
                "d[seed=1]",
                "d[seed=2]",
                "t[seed=1,lr=0.1] data<-d[seed=1]",
                "t[seed=1,lr=0.2] data<-d[seed=1]",
                "t[seed=2,lr=0.1] data<-d[seed=2]",
                "t[seed=2,lr=0.2] data<-d[seed=2]",
                "m[seed=1,lr=0.1] run<-t[seed=1,lr=0.1]",
                "m[seed=1,lr=0.2] run<-t[seed=1,lr=0.2]",
                "m[seed=2,lr=0.1] run<-t[seed=2,lr=0.1]",
                "m[seed=2,lr=0.2] run<-t[seed=2,lr=0.2]",
                "g runs<-t[seed=1,lr=0.1]+t[seed=1,lr=0.2]+t[seed=2,lr=0.1]+t[seed=2,lr=0.2]",
                "one[seed=1,lr=0.2] run<-t[seed=1,lr=0.2]",
            ]
        );
    }

    #[test]
    fn matrix_values_enter_params_at_dotted_paths() {
        let text = "name: p\nstages:\n  t:\n    kind: k\n    params: {model: {depth: 2}}\n    matrix: {model.width: [4]}\n";
        let (p, d) = decls(text, &Overrides::default());
        let inst = expand(&p.source, &d.unwrap(), &[0], &|_, _| false).unwrap();
        assert_eq!(
            Value::Object(inst[0].params.clone()),
            json!({"model": {"depth": 2, "width": 4}})
        );
    }

    #[test]
    fn layers_merge_in_documented_order() {
        let text = "name: p\ndefaults:\n  k: {a: 1, b: 1, c: 1, d: {x: 1, y: 1}}\nprofiles:\n  smoke:\n    defaults: {k: {b: 2}}\n    stages: {t: {params: {c: 3}}}\nstages:\n  t:\n    kind: k\n    params: {c: 2, d: {y: 2}}\n";
        let o = Overrides {
            profile: Some("smoke".into()),
            sets: vec!["t.d.x=5".into()],
        };
        let (_, d) = decls(text, &o);
        assert_eq!(
            Value::Object(d.unwrap()[0].params.clone()),
            json!({"a": 1, "b": 2, "c": 3, "d": {"x": 5, "y": 2}})
        );
    }

    #[test]
    fn set_on_a_swept_key_narrows_the_sweep() {
        let text = "name: p\nstages:\n  t:\n    kind: k\n    matrix: {lr: [0.1, 0.2], b: [1, 2]}\n";
        let o = Overrides {
            profile: None,
            sets: vec!["t.lr=0.2".into()],
        };
        let (p, d) = decls(text, &o);
        let inst = expand(&p.source, &d.unwrap(), &[0], &|_, _| false).unwrap();
        let n: Vec<&str> = inst.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(n, ["t[lr=0.2,b=1]", "t[lr=0.2,b=2]"]);
        let o = Overrides {
            profile: None,
            sets: vec!["t.lr=0.3".into(), "u.x=1".into(), "t".into()],
        };
        let msgs: Vec<String> = decls(text, &o)
            .1
            .unwrap_err()
            .into_iter()
            .map(|p| p.message)
            .collect();
        assert_eq!(msgs.len(), 3);
        assert!(msgs[0].contains("not one of its values"), "{msgs:?}");
        assert!(msgs[1].contains("no stage named `u`"));
        assert!(msgs[2].contains("expected `stage.param=value`"));
    }

    #[test]
    fn set_with_a_stage_pattern_sets_every_matching_stage() {
        let text = "name: p\nstages:\n  train-a:\n    kind: k\n  train-b:\n    kind: k\n  plot:\n    kind: k\n";
        let o = Overrides {
            profile: None,
            sets: vec!["train*.device=cuda".into()],
        };
        let d = decls(text, &o).1.unwrap();
        let devices: Vec<Option<&Value>> = d.iter().map(|d| d.params.get("device")).collect();
        let cuda = Value::String("cuda".into());
        assert_eq!(devices, [Some(&cuda), Some(&cuda), None]);
        let o = Overrides {
            profile: None,
            sets: vec!["eval*.x=1".into()],
        };
        let msgs = decls(text, &o).1.unwrap_err();
        assert!(
            msgs[0].message.contains("no stage named `eval*`"),
            "{msgs:?}"
        );
    }

    #[test]
    fn unknown_profile_and_bad_matrix_are_reported_together() {
        let text = "name: p\nprofiles: {smoke: {}}\nstages:\n  t:\n    kind: k\n    matrix: {lr: [], w: [[1]]}\n";
        let o = Overrides {
            profile: Some("paper".into()),
            sets: vec![],
        };
        let msgs: Vec<String> = decls(text, &o)
            .1
            .unwrap_err()
            .into_iter()
            .map(|p| p.message)
            .collect();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert!(msgs[0].contains("no profile `paper` (it defines: smoke)"));
        assert!(
            msgs[1].starts_with("p.yaml:6:14: stages.t.matrix.lr: expected a non-empty list"),
            "{msgs:?}"
        );
        assert!(msgs[2].contains("stages.t.matrix.w: matrix values must be scalars"));
    }

    #[test]
    fn unmatched_explicit_instance_is_an_error() {
        let text = "name: p\nstages:\n  t:\n    kind: k\n    matrix: {lr: [0.1]}\n  m:\n    kind: k\n    inputs: {run: 't[lr=0.5]'}\n";
        let (p, d) = decls(text, &Overrides::default());
        let err = expand(&p.source, &d.unwrap(), &[0, 1], &|_, _| false).unwrap_err();
        assert!(err[0]
            .message
            .starts_with("p.yaml:8:14: stages.m.inputs.run: no instance of `t[lr=0.5]`"));
        assert_eq!(err[0].help.as_deref(), Some("its instances are: t[lr=0.1]"));
    }
}
