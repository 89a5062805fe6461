//! Content hashes of files: blake3 of whole files, and the memo that keeps large external inputs from
//! being re-hashed on every run (keyed by path, size and modification time, stored in the store).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// blake3 and size of a file: memory-mapped and hashed on all cores (as `b3sum` does), falling back
/// to buffered reads for files that cannot be mapped.
pub fn hash_file(path: &Path) -> io::Result<(blake3::Hash, u64)> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path)?;
    Ok((hasher.finalize(), hasher.count()))
}

/// One memo entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MemoEntry {
    path: String,
    bytes: u64,
    mtime_ns: i128,
    blake3: String,
}

/// Hashes `path`, reusing the entry in `memo_dir` when the file's absolute path, size and
/// modification time are unchanged. Returns (blake3 hex, bytes).
pub fn hash_file_memoized(path: &Path, memo_dir: &Path) -> io::Result<(String, u64)> {
    let abs = std::fs::canonicalize(path)?;
    let meta = std::fs::metadata(&abs)?;
    let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    let abs_text = abs.to_string_lossy().into_owned();
    let entry_path = memo_dir.join(format!(
        "{}.json",
        blake3::hash(abs_text.as_bytes()).to_hex()
    ));
    if let Ok(text) = std::fs::read_to_string(&entry_path) {
        if let Ok(e) = serde_json::from_str::<MemoEntry>(&text) {
            if e.path == abs_text && e.bytes == meta.len() && e.mtime_ns == mtime_ns {
                return Ok((e.blake3, e.bytes));
            }
        }
    }
    let (hash, bytes) = hash_file(&abs)?;
    let entry = MemoEntry {
        path: abs_text,
        bytes,
        mtime_ns,
        blake3: hash.to_hex().to_string(),
    };
    // A memo that cannot be written only costs a re-hash next time.
    let _ = super::write_atomically(
        &entry_path,
        serde_json::to_string(&entry).unwrap_or_default().as_bytes(),
    );
    Ok((entry.blake3, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_one_shot_blake3_and_memo_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.bin");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&file, &data).unwrap();
        let (h, n) = hash_file(&file).unwrap();
        assert_eq!((h, n), (blake3::hash(&data), data.len() as u64));

        let memo = dir.path().join("memo");
        std::fs::create_dir(&memo).unwrap();
        let first = hash_file_memoized(&file, &memo).unwrap();
        assert_eq!(
            first,
            (blake3::hash(&data).to_hex().to_string(), data.len() as u64)
        );
        assert_eq!(std::fs::read_dir(&memo).unwrap().count(), 1);
        // A memo entry whose (size, mtime) still match is trusted: poison it to prove it is read.
        let entry = std::fs::read_dir(&memo)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let poisoned = std::fs::read_to_string(&entry)
            .unwrap()
            .replace(&first.0, "feed");
        std::fs::write(&entry, poisoned).unwrap();
        assert_eq!(hash_file_memoized(&file, &memo).unwrap().0, "feed");
        // Changing the file (size and mtime) invalidates it.
        std::fs::write(&file, b"other").unwrap();
        let h = hash_file_memoized(&file, &memo).unwrap();
        assert_eq!(h, (blake3::hash(b"other").to_hex().to_string(), 5));
    }
}
