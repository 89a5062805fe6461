//! From a pipeline to a sealed [`Plan`]: stage-level checks (unknown kinds and inputs, references to
//! missing stages, cycles named in full), sweep expansion, params resolved by each kind, external
//! files hashed and keys computed, in topological order. Every problem is collected and reported
//! together, each pointing at its file:line:column.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use serde_json::Value;

use crate::device::DeviceClass;
use crate::error::{Invalid, Location, Problem};
use crate::expand::{self, Overrides, StageDecl};
use crate::key::{Key, KeyInput, KEY_FORMAT};
use crate::spec::{keys, locate, parse_field_path, Pipeline, Segment};
use crate::stages::{PlannedInput, Registry, Stage};
use crate::store::manifest::ExternalRecord;
use crate::store::Store;

/// One stage instance, ready to run.
#[derive(Clone)]
pub struct PlannedStage {
    /// Instance name, e.g. `train[lr=0.01]`.
    pub name: String,
    /// The stage (declaration) name, e.g. `train`.
    pub stage: String,
    /// The kind's YAML name.
    pub kind_name: String,
    /// The kind.
    pub kind: Arc<dyn Stage>,
    /// The kind's version for these params.
    pub kind_version: u32,
    /// Canonical params.
    pub params: Value,
    /// Device class.
    pub device: DeviceClass,
    /// Input slot → indices into [`Plan::stages`] (all earlier in the plan).
    pub inputs: BTreeMap<String, Vec<usize>>,
    /// Input slot → the one output file of its stage(s) it takes (`stage:output`), where named.
    pub input_outputs: BTreeMap<String, String>,
    /// Whether each input slot takes a sweep.
    pub sweep_slots: BTreeSet<String>,
    /// External files and their content hashes.
    pub external_files: Vec<ExternalRecord>,
    /// The artifact key.
    pub key: Key,
}

impl PlannedStage {
    /// The params of its inputs by slot, among the plan's `stages`: an object for a single
    /// input, an array for a sweep slot.
    pub fn upstream_params(&self, stages: &[PlannedStage]) -> BTreeMap<String, Value> {
        self.inputs
            .iter()
            .map(|(slot, ups)| {
                let mut params = ups.iter().map(|&u| stages[u].params.clone());
                let value = if self.sweep_slots.contains(slot) {
                    Value::Array(params.collect())
                } else {
                    params.next().unwrap_or_default()
                };
                (slot.clone(), value)
            })
            .collect()
    }
}

/// A validated pipeline: instances in topological order with their keys.
pub struct Plan {
    /// The pipeline's name.
    pub pipeline: String,
    /// Instances, every input before its consumers.
    pub stages: Vec<PlannedStage>,
}

impl Plan {
    /// The instance graph (node weights are indices into [`Plan::stages`], edges point downstream).
    pub fn graph(&self) -> DiGraph<usize, ()> {
        let mut g = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..self.stages.len()).map(|i| g.add_node(i)).collect();
        for (i, s) in self.stages.iter().enumerate() {
            for ups in s.inputs.values() {
                for &u in ups {
                    g.update_edge(nodes[u], nodes[i], ());
                }
            }
        }
        g
    }

    /// The direct descendants of every instance.
    pub fn consumers(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.stages.len()];
        for (i, s) in self.stages.iter().enumerate() {
            let ups: BTreeSet<usize> = s.inputs.values().flatten().copied().collect();
            for u in ups {
                out[u].push(i);
            }
        }
        out
    }
}

/// Validates a pipeline under `overrides` and computes its plan. External files are hashed through
/// the store's memo.
pub fn build(
    p: &Pipeline,
    overrides: &Overrides,
    registry: &Registry,
    store: &Store,
) -> Result<Plan, Invalid> {
    let invalid = |problems| Invalid {
        what: p.source.path.display().to_string(),
        problems,
    };
    let decls = expand::declare(p, overrides).map_err(invalid)?;
    let order = check_stages(p, &decls, registry).map_err(invalid)?;
    let is_sweep = |d: usize, slot: &str| {
        registry
            .get(&decls[d].kind)
            .is_some_and(|k| k.inputs().iter().any(|s| s.name == slot && s.sweep))
    };
    let instances = expand::expand(&p.source, &decls, &order, &is_sweep).map_err(invalid)?;

    let mut problems = Vec::new();
    let mut stages: Vec<PlannedStage> = Vec::with_capacity(instances.len());
    for inst in &instances {
        let decl = &decls[inst.decl];
        let kind = registry
            .get(&decl.kind)
            .expect("kinds were checked")
            .clone();
        let resolved = match kind.resolve(&Value::Object(inst.params.clone())) {
            Ok(r) => r,
            Err(e) => {
                problems.push(param_problem(
                    p, overrides, decl, &inst.name, &e.path, &e.message,
                ));
                continue;
            }
        };
        for (slot, field) in &resolved.needs_inputs {
            if !inst.inputs.contains_key(*slot) {
                problems.push(param_problem(
                    p,
                    overrides,
                    decl,
                    &inst.name,
                    field,
                    &format!("needs the input `{slot}`"),
                ));
            }
        }
        let mut external_files = Vec::new();
        for f in &resolved.external_files {
            match crate::store::hash::hash_file_memoized(f, &store.memo_dir()) {
                Ok((blake3, bytes)) => external_files.push(ExternalRecord {
                    path: f.display().to_string(),
                    blake3,
                    bytes,
                }),
                Err(e) => problems.push(Problem::at(
                    &p.source,
                    stage_location(p, &decl.name),
                    &format!("stages.{}", decl.name),
                    format!(
                        "{}: cannot read the input file {}: {e}",
                        inst.name,
                        f.display()
                    ),
                )),
            }
        }
        if !problems.is_empty() {
            continue;
        }
        // Instances come upstream first, so every input index is already planned.
        let inputs: BTreeMap<String, Vec<usize>> = inst.inputs.clone();
        let input_outputs: BTreeMap<String, String> = decl
            .inputs
            .iter()
            .filter_map(|(slot, refs)| Some((slot.clone(), slot_output(refs).ok()??.to_string())))
            .collect();
        let upstream: BTreeMap<usize, BTreeMap<String, Value>> = inputs
            .values()
            .flatten()
            .map(|&u| (u, stages[u].upstream_params(&stages)))
            .collect();
        let planned_inputs = inputs
            .iter()
            .map(|(slot, ups)| {
                let planned = ups.iter().map(|&u| PlannedInput {
                    kind: stages[u].kind.as_ref(),
                    params: &stages[u].params,
                    upstream: &upstream[&u],
                    output: input_outputs.get(slot).map(String::as_str),
                });
                (slot.clone(), planned.collect())
            })
            .collect();
        if let Err(e) = kind.check_inputs(&resolved.params, &planned_inputs) {
            problems.push(param_problem(
                p, overrides, decl, &inst.name, &e.path, &e.message,
            ));
            continue;
        }
        let input_keys = inputs
            .iter()
            .map(|(slot, ups)| (slot.as_str(), ups.iter().map(|&u| &stages[u].key).collect()))
            .collect();
        let kind_version = kind.version(&resolved.params);
        let key = KeyInput {
            key_format: KEY_FORMAT,
            kind: kind.kind(),
            kind_version,
            params: &resolved.params,
            inputs: input_keys,
            input_outputs: input_outputs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            external_files: external_files.iter().map(|e| e.blake3.as_str()).collect(),
            device: resolved.device,
        }
        .key();
        let sweep_slots = kind
            .inputs()
            .iter()
            .filter(|s| s.sweep)
            .map(|s| s.name.to_string())
            .collect();
        stages.push(PlannedStage {
            name: inst.name.clone(),
            stage: decl.name.clone(),
            kind_name: decl.kind.clone(),
            kind,
            kind_version,
            params: resolved.params,
            device: resolved.device,
            inputs,
            input_outputs,
            sweep_slots,
            external_files,
            key,
        });
    }
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    Ok(Plan {
        pipeline: p.file.name.clone(),
        stages,
    })
}

fn stage_location(p: &Pipeline, stage: &str) -> Option<Location> {
    locate(&p.source.text, &keys(&["stages", stage]))
}

/// Maps a kind's param error back to where the param was written: the stage's params, its matrix,
/// the profile, or the defaults (first that holds the path), else the `--set` that set it.
fn param_problem(
    p: &Pipeline,
    o: &Overrides,
    decl: &StageDecl,
    instance: &str,
    path: &str,
    message: &str,
) -> Problem {
    let name = decl.name.as_str();
    let what = if instance == name {
        message.to_string()
    } else {
        format!("{message} (in instance `{instance}`)")
    };
    // The field, or a field holding it (`--set figure.columns=[..]` for `columns[0]`), was set.
    let mut enclosing = std::iter::successors(Some(path), |p| p.rfind(['.', '[']).map(|i| &p[..i]));
    let set = enclosing.find_map(|field| {
        let prefix = format!("{name}.{field}=");
        Some((field, o.sets.iter().find(|s| s.starts_with(&prefix))?))
    });
    if let Some((field, set)) = set {
        let what = if field == path {
            what
        } else {
            format!("{path}: {what}")
        };
        return Problem::argument(&format!("--set {set}"), what);
    }
    let segs = parse_field_path(path);
    let mut candidates: Vec<Vec<Segment>> = Vec::new();
    let with = |base: &[&str]| {
        let mut v = keys(base);
        v.extend(segs.iter().cloned());
        v
    };
    if let Some(prof) = &o.profile {
        candidates.push(with(&["profiles", prof, "stages", name, "params"]));
    }
    candidates.push(with(&["stages", name, "params"]));
    candidates.push(keys(&["stages", name, "matrix", path]));
    if let Some(prof) = &o.profile {
        candidates.push(with(&["profiles", prof, "defaults", &decl.kind]));
    }
    candidates.push(with(&["defaults", &decl.kind]));
    let text = &p.source.text;
    for c in &candidates {
        if let Some(loc) = locate(text, c) {
            return Problem::at(&p.source, Some(loc), &expand::render_path(c), what);
        }
    }
    let field = if path.is_empty() {
        format!("stages.{name}.params")
    } else {
        format!("stages.{name}.params.{path}")
    };
    let loc = locate(text, &keys(&["stages", name, "params"])).or_else(|| stage_location(p, name));
    Problem::at(&p.source, loc, &field, what)
}

/// The one output file the references of a slot name (`train:metrics.csv`), if any: every
/// reference of the slot names the same one, a relative path inside the artifact.
fn slot_output(refs: &[String]) -> Result<Option<&str>, String> {
    let outputs: BTreeSet<Option<&str>> =
        refs.iter().map(|r| expand::referenced_output(r)).collect();
    if outputs.len() > 1 {
        return Err("the stages of one input must all name the same output (or none)".into());
    }
    let output = outputs.into_iter().next().flatten();
    if let Some(o) = output {
        let path = std::path::Path::new(o);
        let inside = path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if o.is_empty() || !inside {
            return Err(format!(
                "`{o}` is not an output file name: give a path inside the artifact, e.g. `metrics.csv`"
            ));
        }
    }
    Ok(output)
}

/// Checks kinds, input slots and references, and finds cycles. Returns the declarations in
/// topological order (file order where free).
fn check_stages(
    p: &Pipeline,
    decls: &[StageDecl],
    registry: &Registry,
) -> Result<Vec<usize>, Vec<Problem>> {
    let src = &p.source;
    let mut problems = Vec::new();
    let index: BTreeMap<&str, usize> = decls
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    let mut g: DiGraph<usize, ()> = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..decls.len()).map(|i| g.add_node(i)).collect();
    for (i, d) in decls.iter().enumerate() {
        let kind = registry.get(&d.kind);
        if kind.is_none() {
            problems.push(
                Problem::at(
                    src,
                    locate(&src.text, &keys(&["stages", &d.name, "kind"])),
                    &format!("stages.{}.kind", d.name),
                    format!("unknown stage kind `{}`", d.kind),
                )
                .with_help(format!("known kinds: {}", registry.names().join(", "))),
            );
        }
        for (slot, refs) in &d.inputs {
            let here = locate(&src.text, &keys(&["stages", &d.name, "inputs", slot]));
            let field = format!("stages.{}.inputs.{slot}", d.name);
            if let Some(k) = kind {
                if !k.inputs().iter().any(|s| s.name == slot) {
                    let names: Vec<&str> = k.inputs().iter().map(|s| s.name).collect();
                    problems.push(Problem::at(
                        src,
                        here,
                        &field,
                        format!(
                            "kind `{}` takes no input `{slot}` (it takes: {})",
                            d.kind,
                            if names.is_empty() {
                                "none".to_string()
                            } else {
                                names.join(", ")
                            }
                        ),
                    ));
                }
            }
            if let Err(message) = slot_output(refs) {
                problems.push(Problem::at(src, here, &field, message));
            }
            for r in refs {
                match index.get(expand::referenced_stage(r)) {
                    Some(&u) => {
                        g.update_edge(nodes[u], nodes[i], ());
                    }
                    None => problems.push(Problem::at(
                        src,
                        here,
                        &field,
                        format!("no stage named `{}`", expand::referenced_stage(r)),
                    )),
                }
            }
        }
        if let Some(k) = kind {
            for s in k
                .inputs()
                .iter()
                .filter(|s| s.required && !d.inputs.contains_key(s.name))
            {
                problems.push(Problem::at(
                    src,
                    stage_location(p, &d.name),
                    &format!("stages.{}.inputs", d.name),
                    format!("kind `{}` needs the input `{}`", d.kind, s.name),
                ));
            }
        }
    }
    for scc in tarjan_scc(&g) {
        let cyclic = scc.len() > 1 || g.contains_edge(scc[0], scc[0]);
        if !cyclic {
            continue;
        }
        let members: BTreeSet<usize> = scc.iter().map(|n| g[*n]).collect();
        let cycle = find_cycle(decls, &members);
        let names: Vec<&str> = cycle.iter().map(|&i| decls[i].name.as_str()).collect();
        let first = &decls[cycle[0]].name;
        problems.push(Problem::at(
            src,
            locate(&src.text, &keys(&["stages", first, "inputs"]))
                .or_else(|| stage_location(p, first)),
            &format!("stages.{first}.inputs"),
            format!("dependency cycle: {} -> {}", names.join(" -> "), names[0]),
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    // Kahn's algorithm, always taking the earliest ready stage in file order.
    let mut indegree: Vec<usize> = nodes
        .iter()
        .map(|&n| g.neighbors_directed(n, petgraph::Incoming).count())
        .collect();
    let mut ready: BTreeSet<usize> = (0..decls.len()).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(decls.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for n in g.neighbors_directed(nodes[i], petgraph::Outgoing) {
            indegree[g[n]] -= 1;
            if indegree[g[n]] == 0 {
                ready.insert(g[n]);
            }
        }
    }
    Ok(order)
}

/// A cycle through the members of a strongly connected component, starting at its first member in
/// file order, following downstream edges (a stage → the stages that consume it).
fn find_cycle(decls: &[StageDecl], members: &BTreeSet<usize>) -> Vec<usize> {
    let start = *members.iter().next().expect("an SCC is not empty");
    let consumers = |u: usize| -> Vec<usize> {
        members
            .iter()
            .copied()
            .filter(|&c| {
                decls[c]
                    .inputs
                    .values()
                    .flatten()
                    .any(|r| expand::referenced_stage(r) == decls[u].name)
            })
            .collect()
    };
    // Breadth-first search for the shortest way back to `start`.
    let mut parent: BTreeMap<usize, usize> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(u) = queue.pop_front() {
        for c in consumers(u) {
            if c == start {
                let mut path = vec![u];
                let mut x = u;
                while x != start {
                    x = parent[&x];
                    path.push(x);
                }
                path.reverse();
                return path;
            }
            if let std::collections::btree_map::Entry::Vacant(e) = parent.entry(c) {
                e.insert(u);
                queue.push_back(c);
            }
        }
    }
    vec![start]
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::exec::tests::{plan_with, Echo};
    use crate::expand::Overrides;
    use crate::store::Store;

    fn messages(text: &str, o: &Overrides) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        match plan_with(text, &Arc::new(Echo::default()), &store, o) {
            Ok(_) => vec![],
            Err(e) => e.problems.into_iter().map(|p| p.message).collect(),
        }
    }

    #[test]
    fn stage_level_problems_are_all_reported_with_positions() {
        let text = "name: bad\nstages:\n  a:\n    kind: echo\n    params: {value: A}\n    inputs: {up: c}\n  b:\n    kind: nope\n  c:\n    kind: echo\n    params: {value: C}\n    inputs: {up: a, all: [ghost], bogus: a}\n";
        let m = messages(text, &Overrides::default());
        assert_eq!(
            m,
            [
                "p.yaml:8:5: stages.b.kind: unknown stage kind `nope`",
                "p.yaml:12:21: stages.c.inputs.all: no stage named `ghost`",
                "p.yaml:12:35: stages.c.inputs.bogus: kind `echo` takes no input `bogus` (it takes: up, needed, all)",
                "p.yaml:6:5: stages.a.inputs: dependency cycle: a -> c -> a",
            ]
        );
    }

    #[test]
    fn param_errors_point_at_the_param_in_stage_defaults_or_set() {
        let text = "name: p\ndefaults:\n  echo: {sleep_ms: slow}\nstages:\n  a:\n    kind: echo\n    params:\n      value: A\n      colour: red\n  b:\n    kind: echo\n    matrix: {value: ['', x]}\n";
        let m = messages(text, &Overrides::default());
        let slow = "invalid type: string \"slow\", expected u64";
        assert_eq!(
            m,
            [
                "p.yaml:9:7: stages.a.params.colour: unknown field `colour`, expected one of `value`, `sleep_ms`, `fail`, `cuda`".to_string(),
                format!("p.yaml:3:10: defaults.echo.sleep_ms: {slow} (in instance `b[value=]`)"),
                format!("p.yaml:3:10: defaults.echo.sleep_ms: {slow} (in instance `b[value=x]`)"),
            ]
        );
        let text = "name: p\nstages:\n  a:\n    kind: echo\n    params:\n      value: A\n      colour: red\n  b:\n    kind: echo\n    matrix: {value: ['', x]}\n";
        let m = messages(text, &Overrides::default());
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(
            m[0].starts_with("p.yaml:7:7: stages.a.params.colour: unknown field `colour`"),
            "{}",
            m[0]
        );
        assert_eq!(
            m[1],
            "p.yaml:10:14: stages.b.matrix.value: must not be empty (in instance `b[value=]`)"
        );
        let o = Overrides {
            profile: None,
            sets: vec!["a.sleep_ms=-1".into()],
        };
        let m = messages(
            "name: p\nstages:\n  a: {kind: echo, params: {value: A}}\n",
            &o,
        );
        assert_eq!(m.len(), 1);
        assert!(
            m[0].starts_with("--set a.sleep_ms=-1: invalid value: integer `-1`"),
            "{}",
            m[0]
        );
    }
}
