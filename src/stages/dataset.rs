//! The `dataset` stage kind: one split of a collection, filtered, subset and normalised, written as
//! `dataset.safetensors` (see [`crate::data::Dataset::save`]) plus a `summary.json`.
//!
//! ```yaml
//! data:
//!   kind: dataset
//!   params:
//!     source: cifar10        # cifar10 | fashion-mnist | svhn | synthetic
//!     split: train           # train (default) | test
//!     n: 8192                # subset size; absent = every sample
//!     seed: 0                # seed of the subset choice
//!     normalize: default     # default (the paper's constants) | none | {mean: [..], std: [..]}
//!     classes: [1, 9]        # keep these, relabelled 0..k-1 in this order
//!     binary: false          # the ±1 two-class variant (classes default to [1, 9])
//!     easy: {norm: 20.0, seed: 0}   # figure 11's "easy" offsets (see data::EasyOffset)
//!     synthetic: {channels: 3, height: 8, width: 8, num_classes: 10, train_size: 1024,
//!                 test_size: 512, separation: 4.0, noise: 1.0, seed: 0}   # synthetic only
//!     root: /data/cifar10    # the folder holding the files; see below
//! ```
//!
//! Where files are read from: `root` when given, else `$EOSS_DATA/<source>` when the variable is set,
//! else `../shared/data/<source>` relative to the working directory. The files themselves enter the
//! key by content hash ([`Resolved::external_files`]), so a key never depends on where the data sits
//! unless `root` is written into the pipeline: an explicit `root` stays in the canonical params (the
//! running stage reads it back from there), so prefer `EOSS_DATA` in pipelines shared between
//! machines.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{resolve_typed, InputSlot, ParamError, Resolved, Stage, StageContext, StageError};
use crate::data::SyntheticSpec;
use crate::data::{self, DataError, DatasetSpec, EasyOffset, Normalization, SourceKind, Split};
use crate::device::DeviceClass;

/// The output file of the kind.
pub const OUTPUT_FILE: &str = "dataset.safetensors";
/// The environment variable naming the folder that holds one folder per collection.
pub const DATA_ENV: &str = "EOSS_DATA";

/// The `dataset` kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct DatasetStage;

/// The params as written in YAML.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasetParams {
    source: SourceKind,
    #[serde(default)]
    root: Option<PathBuf>,
    #[serde(default)]
    split: Split,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    normalize: NormalizeParam,
    #[serde(default)]
    classes: Option<Vec<u8>>,
    #[serde(default)]
    binary: bool,
    #[serde(default)]
    easy: Option<EasyOffset>,
    #[serde(default)]
    synthetic: Option<SyntheticSpec>,
}

/// `normalize:` as written: a name or explicit constants.
#[derive(Debug, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "`default`, `none`, or {mean: [...], std: [...]} with one value per channel"
)]
enum NormalizeParam {
    Named(NormalizeName),
    Explicit(Normalization),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum NormalizeName {
    Default,
    None,
}

impl Default for NormalizeParam {
    fn default() -> Self {
        NormalizeParam::Named(NormalizeName::Default)
    }
}

impl DatasetParams {
    fn into_spec(self) -> DatasetSpec {
        let source = self.source;
        DatasetSpec {
            source,
            split: self.split,
            n: self.n,
            seed: self.seed,
            normalize: match self.normalize {
                NormalizeParam::Named(NormalizeName::Default) => {
                    Normalization::paper_default(source)
                }
                NormalizeParam::Named(NormalizeName::None) => None,
                NormalizeParam::Explicit(norm) => Some(norm),
            },
            classes: self.classes,
            binary: self.binary,
            easy: self.easy,
            synthetic: match (source, self.synthetic) {
                (SourceKind::Synthetic, s) => Some(s.unwrap_or_default()),
                (_, s) => s,
            },
        }
    }
}

/// The folder a collection is read from: `root` when given, else `$EOSS_DATA/<source>`, else
/// `../shared/data/<source>`.
pub fn data_root(source: SourceKind, root: Option<&Path>) -> PathBuf {
    match root {
        Some(root) => root.to_path_buf(),
        None => source.default_root(std::env::var_os(DATA_ENV).as_deref().map(Path::new)),
    }
}

fn param_error(e: DataError) -> ParamError {
    match e {
        DataError::Invalid { field, message } => ParamError {
            path: field.to_string(),
            message,
        },
        other => ParamError {
            path: String::new(),
            message: other.to_string(),
        },
    }
}

fn stage_error(e: DataError) -> StageError {
    match e {
        DataError::Io { file, source } => StageError::Io { path: file, source },
        other => StageError::Failed(other.to_string()),
    }
}

impl Stage for DatasetStage {
    fn kind(&self) -> &'static str {
        "dataset"
    }

    fn version(&self, _params: &serde_json::Value) -> u32 {
        1
    }

    fn resolve(&self, params: &serde_json::Value) -> Result<Resolved, ParamError> {
        let (raw, _) = resolve_typed::<DatasetParams>(params)?;
        let explicit_root = raw.root.clone();
        let spec = raw.into_spec();
        spec.validate().map_err(param_error)?;
        let root = data_root(spec.source, explicit_root.as_deref());
        let external_files =
            spec.source
                .existing_files(spec.split, &root)
                .map_err(|e| ParamError {
                    path: if explicit_root.is_some() {
                        "root"
                    } else {
                        "source"
                    }
                    .to_string(),
                    message: e.to_string(),
                })?;
        let mut canonical = serde_json::to_value(&spec).map_err(|e| ParamError {
            path: String::new(),
            message: e.to_string(),
        })?;
        if let (Some(root), Some(map)) = (explicit_root, canonical.as_object_mut()) {
            map.insert(
                "root".into(),
                serde_json::Value::String(root.display().to_string()),
            );
        }
        Ok(Resolved {
            params: canonical,
            external_files,
            device: DeviceClass::Cpu,
            needs_inputs: Vec::new(),
        })
    }

    fn inputs(&self) -> &'static [InputSlot] {
        &[]
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let bad_params = |e: serde_json::Error| {
            StageError::Failed(format!(
                "stage `{}`: resolved params unreadable: {e}",
                ctx.name
            ))
        };
        let mut params = ctx.params.clone();
        let root = params
            .as_object_mut()
            .and_then(|map| map.remove("root"))
            .map(serde_json::from_value::<PathBuf>)
            .transpose()
            .map_err(bad_params)?;
        let spec: DatasetSpec = serde_json::from_value(params).map_err(bad_params)?;
        let root = data_root(spec.source, root.as_deref());
        ctx.reporter.set_length(2);
        ctx.reporter.log(&format!(
            "reading the {} split of {} from {}",
            spec.split.name(),
            spec.source.name(),
            root.display()
        ));
        let dataset = data::build(&spec, &root).map_err(stage_error)?;
        ctx.reporter.set_position(1);

        let mut class_counts = vec![0u64; dataset.num_classes];
        for &label in &dataset.labels {
            class_counts[label as usize] += 1;
        }
        ctx.reporter.log(&format!(
            "{} samples of shape {:?}, {} classes, counts {class_counts:?}",
            dataset.len(),
            &dataset.shape[1..],
            dataset.num_classes
        ));
        dataset
            .save(ctx.work_dir.join(OUTPUT_FILE), spec.source.name())
            .map_err(stage_error)?;
        let summary = serde_json::json!({
            "samples": dataset.len(),
            "shape": dataset.shape,
            "num_classes": dataset.num_classes,
            "encoding": dataset.encoding,
            "class_counts": class_counts,
        });
        let summary_path = ctx.work_dir.join("summary.json");
        let text = serde_json::to_string_pretty(&summary)
            .map_err(|e| StageError::Failed(format!("summary.json: {e}")))?;
        std::fs::write(&summary_path, text).map_err(|e| StageError::io(&summary_path, e))?;
        ctx.reporter.set_position(2);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;
    use crate::data::Dataset;
    use crate::stages::StageReporter;

    /// Records what a stage reports.
    #[derive(Default)]
    struct Recorder {
        lines: Mutex<Vec<String>>,
        position: Mutex<(u64, u64)>,
    }

    impl StageReporter for Recorder {
        fn set_length(&self, total: u64) {
            self.position.lock().unwrap().1 = total;
        }
        fn set_position(&self, done: u64) {
            self.position.lock().unwrap().0 = done;
        }
        fn log(&self, line: &str) {
            self.lines.lock().unwrap().push(line.to_string());
        }
    }

    /// Resolves `params` and runs the stage in `work_dir`, as the engine would.
    fn run_in(work_dir: &Path, params: serde_json::Value) -> (Result<(), StageError>, Recorder) {
        let resolved = DatasetStage.resolve(&params).unwrap();
        let inputs = BTreeMap::new();
        let recorder = Recorder::default();
        let ctx = StageContext {
            name: "data",
            params: &resolved.params,
            inputs: &inputs,
            work_dir,
            reporter: &recorder,
        };
        (DatasetStage.run(&ctx), recorder)
    }

    fn synthetic_params() -> serde_json::Value {
        json!({"source": "synthetic", "n": 15, "seed": 3, "classes": [4, 2],
               "synthetic": {"height": 4, "width": 4, "train_size": 100}})
    }

    #[test]
    fn resolve_fills_defaults() {
        let r = DatasetStage
            .resolve(&json!({"source": "synthetic"}))
            .unwrap();
        assert_eq!(r.external_files, Vec::<PathBuf>::new());
        assert_eq!(r.device, DeviceClass::Cpu);
        let spec: DatasetSpec = serde_json::from_value(r.params.clone()).unwrap();
        assert_eq!(spec, DatasetSpec::new(SourceKind::Synthetic, Split::Train));
        assert_eq!(r.params["normalize"], serde_json::Value::Null);
        assert!(r.params.get("root").is_none());

        // `default` resolves to the paper's constants, so both spellings give one key.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t10k-images-idx3-ubyte.gz"), b"").unwrap();
        std::fs::write(dir.path().join("t10k-labels-idx1-ubyte.gz"), b"").unwrap();
        let root = dir.path().display().to_string();
        let named = DatasetStage
            .resolve(&json!({"source": "fashion-mnist", "split": "test", "root": root}))
            .unwrap();
        let explicit = DatasetStage
            .resolve(
                &json!({"source": "fashion-mnist", "split": "test", "root": root,
                             "normalize": {"mean": [0.2860], "std": [0.3530]}}),
            )
            .unwrap();
        assert_eq!(named, explicit);
        assert_eq!(
            named.params["normalize"],
            json!({"mean": [0.2860], "std": [0.3530]})
        );
        assert_eq!(named.params["root"], json!(root));
        assert_eq!(
            named.external_files,
            vec![
                dir.path().join("t10k-images-idx3-ubyte.gz"),
                dir.path().join("t10k-labels-idx1-ubyte.gz")
            ]
        );
    }

    #[test]
    fn resolve_names_the_field_at_fault() {
        let cases = [
            (
                json!({"source": "synthetic", "colour": true}),
                "colour",
                "unknown field `colour`",
            ),
            (
                json!({"source": "imagenet"}),
                "source",
                "unknown variant `imagenet`",
            ),
            (
                json!({"source": "synthetic", "n": -1}),
                "n",
                "invalid value",
            ),
            (
                json!({"source": "synthetic", "normalize": "zscore"}),
                "normalize",
                "`default`, `none`",
            ),
            (
                json!({"source": "synthetic", "normalize": {"mean": [0.0]}}),
                "normalize",
                "`default`, `none`",
            ),
            (
                json!({"source": "synthetic", "synthetic": {"depth": 3}}),
                "synthetic.depth",
                "unknown field `depth`",
            ),
            (
                json!({"source": "synthetic", "classes": [12]}),
                "classes",
                "class 12 outside 0..10",
            ),
            (
                json!({"source": "synthetic", "binary": true, "n": 3}),
                "n",
                "even",
            ),
            (
                json!({"source": "cifar10", "synthetic": {}, "root": "/x"}),
                "synthetic",
                "only for source",
            ),
        ];
        for (params, path, text) in cases {
            let err = DatasetStage.resolve(&params).unwrap_err();
            assert_eq!(err.path, path, "{params}: {err}");
            assert!(err.message.contains(text), "{params}: {err}");
        }
    }

    #[test]
    fn resolve_reports_missing_files_with_where_to_get_them() {
        let dir = tempfile::tempdir().unwrap();
        let err = DatasetStage
            .resolve(&json!({"source": "svhn", "root": dir.path()}))
            .unwrap_err();
        assert_eq!(err.path, "root");
        assert!(err.message.contains("train_32x32.mat: not found"), "{err}");
        assert!(
            err.message.contains("test_32x32.mat") && err.message.contains("ufldl"),
            "{err}"
        );
    }

    #[test]
    fn run_writes_the_dataset_and_a_summary_byte_identically() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (result, recorder) = run_in(a.path(), synthetic_params());
        result.unwrap();
        run_in(b.path(), synthetic_params()).0.unwrap();
        for file in [OUTPUT_FILE, "summary.json"] {
            assert_eq!(
                std::fs::read(a.path().join(file)).unwrap(),
                std::fs::read(b.path().join(file)).unwrap(),
                "{file} differs between runs"
            );
        }
        // The file holds what the library builds from the same spec.
        let spec: DatasetSpec =
            serde_json::from_value(DatasetStage.resolve(&synthetic_params()).unwrap().params)
                .unwrap();
        let expected = data::build(&spec, Path::new("")).unwrap();
        let saved = Dataset::load(a.path().join(OUTPUT_FILE)).unwrap();
        assert_eq!(saved, expected);
        assert_eq!((saved.len(), saved.num_classes), (15, 2));

        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.path().join("summary.json")).unwrap()).unwrap();
        let zeros = saved.labels.iter().filter(|&&l| l == 0).count();
        assert_eq!(summary["class_counts"], json!([zeros, 15 - zeros]));
        assert_eq!(summary["shape"], json!([15, 3, 4, 4]));
        assert_eq!(*recorder.position.lock().unwrap(), (2, 2));
        assert!(recorder.lines.lock().unwrap()[0].contains("train split of synthetic"));
    }

    #[test]
    fn run_on_real_cifar_subset() {
        let Some(root) = crate::data::test_support::real_data_dir("cifar10") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let params =
            json!({"source": "cifar10", "split": "test", "n": 64, "seed": 1, "root": root});
        run_in(dir.path(), params).0.unwrap();
        let saved = Dataset::load(dir.path().join(OUTPUT_FILE)).unwrap();
        assert_eq!(saved.shape, [64, 3, 32, 32]);
        // Independent check of one pixel: ((byte / 255) − mean) / std from the raw record.
        let bytes = std::fs::read(root.join("test_batch.bin")).unwrap();
        for row in [0, 63] {
            let record = saved.source_indices[row] as usize * 3073;
            assert_eq!(saved.labels[row], i64::from(bytes[record]));
            let blue = bytes[record + 1 + 2048 + 5];
            let want = ((f64::from(blue) / 255.0) as f32 as f64 - 0.4465) / 0.2010;
            let got = f64::from(saved.images[row * 3072 + 2048 + 5]);
            assert!((got - want).abs() < 1e-6, "row {row}: {got} vs {want}");
        }
    }

    #[test]
    fn run_fails_cleanly_when_files_vanish_or_break() {
        let data = tempfile::tempdir().unwrap();
        std::fs::write(data.path().join("test_batch.bin"), b"short").unwrap();
        let work = tempfile::tempdir().unwrap();
        let (result, _) = run_in(
            work.path(),
            json!({"source": "cifar10", "split": "test", "root": data.path()}),
        );
        let msg = result.unwrap_err().to_string();
        assert!(
            msg.contains("test_batch.bin: 5 bytes, expected 30730000"),
            "{msg}"
        );
        assert!(!work.path().join(OUTPUT_FILE).exists());
    }

    #[test]
    fn default_root_prefers_the_environment_value() {
        assert_eq!(
            SourceKind::Svhn.default_root(Some(Path::new("/data"))),
            PathBuf::from("/data/svhn")
        );
        assert_eq!(
            SourceKind::FashionMnist.default_root(None),
            PathBuf::from("../shared/data/fashion-mnist")
        );
        assert_eq!(
            data_root(SourceKind::Cifar10, Some(Path::new("/x"))),
            PathBuf::from("/x")
        );
    }
}
