//! The artifact store: a directory shared by processes and users, with one published directory per
//! key and crash-safe publication.
//!
//! Layout of a store `S`:
//! - `S/<kind>/<key>/`: a published artifact, its outputs plus `manifest.json` and `log.txt`. It
//!   appears by one `rename`, complete, so readers never take locks and never see partial work.
//!   Published files are read-only; directories are group-writable and setgid so a group can share
//!   the store.
//! - `S/tmp/<kind>-<key>/`: the stable work directory of a key, used only under the exclusive lock
//!   `S/tmp/<kind>-<key>.lock`. A killed run leaves it behind (resumable kinds continue from it, the
//!   others start it afresh); a failed run leaves it with its `log.txt`.
//! - `S/memo/`: content hashes of external files, keyed by (path, size, mtime).
//!
//! [`Store::claim`] returns [`Lookup::Hit`] with the manifest, or [`Lookup::Miss`] carrying the lock:
//! only the holder of a [`Claim`] publishes, and another process asking for the same key waits for the
//! lock, then finds the published artifact.

pub mod hash;
pub mod lock;
pub mod manifest;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::key::Key;
pub use lock::KeyLock;
pub use manifest::{FileRecord, InputKeys, Manifest, LOG, MANIFEST, SUMMARY};

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory of the store could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path at fault.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A manifest does not parse.
    #[error("{path}: corrupt manifest: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// The parse error.
        message: String,
    },
    /// A stage's `summary.json` is not a JSON object.
    #[error("{path}: a stage's summary must be a JSON object: {message}")]
    Summary {
        /// The summary file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Permissions of store directories: group-writable, setgid (new entries keep the group).
const DIR_MODE: u32 = 0o2775;
/// Permissions of published files: read-only for everybody who can read the store.
const PUBLISHED_FILE_MODE: u32 = 0o444;

/// Creates a directory (and parents) and makes it group-shareable. Only the owner may chmod; for a
/// directory created by someone else the existing mode is kept.
fn make_dir(path: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(path).map_err(io_err(path))?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE));
    Ok(())
}

/// Writes a file by writing a temporary sibling and renaming it over the target.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Published artifact directories with their manifests (or why each cannot be read).
pub type Listing = Vec<(PathBuf, Result<Manifest, StoreError>)>;

/// A store on disk.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// The answer to [`Store::claim`].
#[derive(Debug)]
pub enum Lookup {
    /// Already published.
    Hit(Box<Manifest>),
    /// Not published; the caller holds the key's lock and must compute it.
    Miss(Claim),
}

/// The right to compute one key: its lock and its work directory.
#[derive(Debug)]
pub struct Claim {
    lock: KeyLock,
    work_dir: PathBuf,
    artifact_dir: PathBuf,
}

/// A leftover work directory under `tmp/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkDir {
    /// Its path.
    pub path: PathBuf,
    /// `<kind>-<key>`.
    pub name: String,
    /// Whether a process holds its lock right now (a stage is running).
    pub running: bool,
}

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        make_dir(root)?;
        make_dir(&root.join("tmp"))?;
        make_dir(&root.join("memo"))?;
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the artifact of `key` is (or would be) published.
    pub fn artifact_dir(&self, kind: &str, key: &Key) -> PathBuf {
        self.root.join(kind).join(key.as_str())
    }

    /// The work directory of `key`.
    pub fn work_dir(&self, kind: &str, key: &Key) -> PathBuf {
        self.root.join("tmp").join(format!("{kind}-{key}"))
    }

    /// The published manifest of `key`, if any. Never blocks.
    pub fn published(&self, kind: &str, key: &Key) -> Result<Option<Manifest>, StoreError> {
        read_manifest(&self.artifact_dir(kind, key))
    }

    /// Returns the published artifact, or the lock and work directory to compute it. Waits (calling
    /// `on_wait` first) while another process computes the same key.
    pub fn claim(
        &self,
        kind: &str,
        key: &Key,
        on_wait: &mut dyn FnMut(),
    ) -> Result<Lookup, StoreError> {
        if let Some(m) = self.published(kind, key)? {
            return Ok(Lookup::Hit(Box::new(m)));
        }
        let lock_path = self.root.join("tmp").join(format!("{kind}-{key}.lock"));
        let lock = KeyLock::acquire(&lock_path, on_wait).map_err(io_err(&lock_path))?;
        if let Some(m) = self.published(kind, key)? {
            // Published while we waited: the lock file we just made is not needed (best effort:
            // `gc` removes what is left).
            let _ = lock.remove();
            return Ok(Lookup::Hit(Box::new(m)));
        }
        let work_dir = self.work_dir(kind, key);
        make_dir(&work_dir)?;
        Ok(Lookup::Miss(Claim {
            lock,
            work_dir,
            artifact_dir: self.artifact_dir(kind, key),
        }))
    }

    /// Every published artifact directory, with its manifest (or why it cannot be read).
    pub fn artifacts(&self) -> Result<Listing, StoreError> {
        let mut out = Vec::new();
        for kind_dir in sorted_entries(&self.root)? {
            let name = kind_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name == "tmp" || name == "memo" || !kind_dir.is_dir() {
                continue;
            }
            for dir in sorted_entries(&kind_dir)? {
                if dir.is_dir() {
                    let m = read_manifest(&dir).and_then(|m| {
                        m.ok_or_else(|| StoreError::Manifest {
                            path: dir.join(MANIFEST),
                            message: "missing".into(),
                        })
                    });
                    out.push((dir, m));
                }
            }
        }
        Ok(out)
    }

    /// Work directories under `tmp/`, with whether each is in use.
    pub fn work_dirs(&self) -> Result<Vec<WorkDir>, StoreError> {
        let mut out = Vec::new();
        for path in sorted_entries(&self.root.join("tmp"))? {
            if !path.is_dir() {
                continue;
            }
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string();
            let lock_path = self.root.join("tmp").join(format!("{name}.lock"));
            let running = lock_path.exists()
                && KeyLock::try_acquire(&lock_path)
                    .map_err(io_err(&lock_path))?
                    .is_none();
            out.push(WorkDir {
                path,
                name,
                running,
            });
        }
        Ok(out)
    }

    /// Removes a published artifact: renamed out of sight first, so readers see it whole or not at all.
    pub fn remove_artifact(&self, dir: &Path) -> Result<(), StoreError> {
        let trash = self.root.join("tmp").join(format!(
            "trash-{}-{}",
            dir.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("artifact"),
            std::process::id()
        ));
        std::fs::rename(dir, &trash).map_err(io_err(dir))?;
        std::fs::remove_dir_all(&trash).map_err(io_err(&trash))
    }

    /// Removes a work directory and its lock file if nobody holds the lock. Returns whether it did.
    pub fn remove_work_dir(&self, w: &WorkDir) -> Result<bool, StoreError> {
        let lock_path = self.root.join("tmp").join(format!("{}.lock", w.name));
        let Some(lock) = KeyLock::try_acquire(&lock_path).map_err(io_err(&lock_path))? else {
            return Ok(false);
        };
        make_writable(&w.path);
        std::fs::remove_dir_all(&w.path).map_err(io_err(&w.path))?;
        lock.remove().map_err(io_err(&lock_path))?;
        Ok(true)
    }

    /// Lock files under `tmp/` with no work directory beside them (left by keys published before
    /// publishing removed its lock file, or by a process killed between the two).
    pub fn idle_lock_files(&self) -> Result<Vec<PathBuf>, StoreError> {
        Ok(sorted_entries(&self.root.join("tmp"))?
            .into_iter()
            .filter(|p| {
                p.extension().is_some_and(|e| e == "lock") && !p.with_extension("").is_dir()
            })
            .collect())
    }

    /// Removes a lock file if nobody holds it. Returns whether it did.
    pub fn remove_lock_file(&self, path: &Path) -> Result<bool, StoreError> {
        match KeyLock::try_acquire(path).map_err(io_err(path))? {
            Some(lock) => lock.remove().map_err(io_err(path)).map(|()| true),
            None => Ok(false),
        }
    }

    /// The directory holding the external-file hash memo.
    pub fn memo_dir(&self) -> PathBuf {
        self.root.join("memo")
    }
}

/// Reads `dir/manifest.json` if present.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>, StoreError> {
    let path = dir.join(MANIFEST);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Manifest {
                path,
                message: e.to_string(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io { path, source: e }),
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(StoreError::Io {
                path: dir.to_path_buf(),
                source: e,
            })
        }
    };
    v.sort();
    Ok(v)
}

/// Every regular file under `dir`, as `/`-separated relative paths, sorted.
pub fn list_files(dir: &Path) -> Result<Vec<String>, StoreError> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), StoreError> {
        for p in sorted_entries(dir)? {
            let meta = std::fs::symlink_metadata(&p).map_err(io_err(&p))?;
            if meta.is_dir() {
                walk(base, &p, out)?;
            } else if meta.is_file() {
                let rel = p.strip_prefix(base).unwrap_or(&p);
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// Hashes the outputs of an artifact directory (everything except the manifest and the log).
pub fn hash_outputs(dir: &Path) -> Result<BTreeMap<String, FileRecord>, StoreError> {
    let mut out = BTreeMap::new();
    for rel in list_files(dir)? {
        if rel == MANIFEST || rel == LOG {
            continue;
        }
        let path = dir.join(&rel);
        let (hash, bytes) = hash::hash_file(&path).map_err(io_err(&path))?;
        out.insert(
            rel,
            FileRecord {
                blake3: hash.to_hex().to_string(),
                bytes,
            },
        );
    }
    Ok(out)
}

/// Makes a tree writable by its owner again (published files are read-only), before removal.
fn make_writable(dir: &Path) {
    if let Ok(files) = list_files(dir) {
        for rel in files {
            let _ = std::fs::set_permissions(dir.join(rel), std::fs::Permissions::from_mode(0o664));
        }
    }
}

fn set_tree_permissions(dir: &Path) -> Result<(), StoreError> {
    for p in sorted_entries(dir)? {
        let meta = std::fs::symlink_metadata(&p).map_err(io_err(&p))?;
        if meta.is_dir() {
            set_tree_permissions(&p)?;
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(DIR_MODE));
        } else if meta.is_file() {
            let f = std::fs::File::open(&p).map_err(io_err(&p))?;
            f.sync_all().map_err(io_err(&p))?;
            f.set_permissions(std::fs::Permissions::from_mode(PUBLISHED_FILE_MODE))
                .map_err(io_err(&p))?;
        }
    }
    Ok(())
}

impl Claim {
    /// The work directory (exclusively ours while the claim lives).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// Empties the work directory (for kinds that are not resumable).
    pub fn reset(&self) -> Result<(), StoreError> {
        make_writable(&self.work_dir);
        std::fs::remove_dir_all(&self.work_dir).map_err(io_err(&self.work_dir))?;
        make_dir(&self.work_dir)
    }

    /// Publishes the work directory: hashes the outputs into `manifest` (and embeds `summary.json`),
    /// writes `manifest.json`, makes the files read-only and renames the directory into place.
    pub fn publish(self, mut manifest: Manifest) -> Result<Manifest, StoreError> {
        let dir = &self.work_dir;
        manifest.outputs = hash_outputs(dir)?;
        let summary_path = dir.join(SUMMARY);
        if summary_path.exists() {
            let bytes = std::fs::read(&summary_path).map_err(io_err(&summary_path))?;
            let value: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Summary {
                    path: summary_path.clone(),
                    message: e.to_string(),
                })?;
            if !value.is_object() {
                return Err(StoreError::Summary {
                    path: summary_path,
                    message: format!("found `{value}`"),
                });
            }
            manifest.summary = Some(value);
        }
        let manifest_path = dir.join(MANIFEST);
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| StoreError::Manifest {
            path: manifest_path.clone(),
            message: e.to_string(),
        })?;
        write_atomically(&manifest_path, &text).map_err(io_err(&manifest_path))?;
        set_tree_permissions(dir)?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE));
        let kind_dir = self.artifact_dir.parent().unwrap_or(&self.artifact_dir);
        make_dir(kind_dir)?;
        std::fs::rename(dir, &self.artifact_dir).map_err(io_err(&self.artifact_dir))?;
        if let Ok(d) = std::fs::File::open(kind_dir) {
            let _ = d.sync_all();
        }
        // The key is published: its lock file goes too (removed while held, so a waiter retries on
        // a fresh file and then finds the artifact). Best effort: the artifact stands either way,
        // and `gc` removes a lock file left behind.
        let _ = self.lock.remove();
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceClass;

    pub(crate) fn manifest(kind: &str, key: &Key) -> Manifest {
        Manifest {
            kind: kind.into(),
            version: 1,
            key: key.clone(),
            key_format: crate::key::KEY_FORMAT,
            pipeline: "p".into(),
            stage: "s".into(),
            params: serde_json::json!({}),
            inputs: BTreeMap::new(),
            input_outputs: BTreeMap::new(),
            external_files: vec![],
            device: DeviceClass::Cpu,
            outputs: BTreeMap::new(),
            summary: None,
            tool_version: "0".into(),
            started: String::new(),
            finished: String::new(),
            seconds: 0.0,
            host: String::new(),
        }
    }

    #[test]
    fn claim_publish_then_hit_with_hashes_and_summary() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key: Key = blake3::hash(b"k").into();
        let Lookup::Miss(claim) = store.claim("dataset", &key, &mut || {}).unwrap() else {
            panic!("empty store must miss")
        };
        std::fs::create_dir(claim.work_dir().join("sub")).unwrap();
        std::fs::write(claim.work_dir().join("sub/x.bin"), b"hello").unwrap();
        std::fs::write(claim.work_dir().join(SUMMARY), br#"{"diverged_at": 12}"#).unwrap();
        std::fs::write(claim.work_dir().join(LOG), b"log line\n").unwrap();
        assert!(store.published("dataset", &key).unwrap().is_none());
        let m = claim.publish(manifest("dataset", &key)).unwrap();
        assert_eq!(
            m.outputs["sub/x.bin"],
            FileRecord {
                blake3: blake3::hash(b"hello").to_hex().to_string(),
                bytes: 5
            }
        );
        assert!(m.outputs.contains_key(SUMMARY) && !m.outputs.contains_key(LOG));
        // Nothing of the finished key is left in tmp/: no work directory, no lock file.
        let left: Vec<_> = std::fs::read_dir(dir.path().join("tmp")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(m.summary, Some(serde_json::json!({"diverged_at": 12})));
        let art = store.artifact_dir("dataset", &key);
        let mode = std::fs::metadata(art.join("sub/x.bin"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444);
        // A group shares the store: every directory is group-writable and setgid, so entries
        // made by any member keep the store's group.
        for d in [
            dir.path().to_path_buf(),
            art.parent().unwrap().to_path_buf(),
            art.clone(),
            art.join("sub"),
        ] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode();
            assert_eq!(mode & 0o7777, DIR_MODE, "{}", d.display());
        }
        assert!(!store.work_dir("dataset", &key).exists());
        match store.claim("dataset", &key, &mut || {}).unwrap() {
            Lookup::Hit(h) => assert_eq!(*h, m),
            Lookup::Miss(_) => panic!("published key must hit"),
        }
        assert_eq!(hash_outputs(&art).unwrap(), m.outputs);
        store.remove_artifact(&art).unwrap();
        assert!(store.artifacts().unwrap().is_empty());
    }

    #[test]
    fn summary_that_is_not_an_object_is_refused_and_nothing_is_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key: Key = blake3::hash(b"k").into();
        let Lookup::Miss(claim) = store.claim("k", &key, &mut || {}).unwrap() else {
            panic!()
        };
        std::fs::write(claim.work_dir().join(SUMMARY), b"[1]").unwrap();
        assert!(matches!(
            claim.publish(manifest("k", &key)),
            Err(StoreError::Summary { .. })
        ));
        assert!(store.published("k", &key).unwrap().is_none());
        let w = store.work_dirs().unwrap();
        assert_eq!(w.len(), 1);
        assert!(!w[0].running);
        assert!(store.remove_work_dir(&w[0]).unwrap());
        assert!(store.work_dirs().unwrap().is_empty());
    }
}
