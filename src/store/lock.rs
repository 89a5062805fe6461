//! Per-key exclusive locks on lock files (`std::fs::File::lock`, i.e. `flock`), safe against the lock
//! file being removed and recreated by `gc` while another process waits on it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// An exclusive lock held on a lock file; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct KeyLock {
    _file: File,
    path: PathBuf,
}

impl KeyLock {
    /// Takes the lock, blocking while another process holds it; `on_wait` is called once before
    /// blocking.
    pub fn acquire(path: &Path, on_wait: &mut dyn FnMut()) -> io::Result<KeyLock> {
        let mut waited = false;
        loop {
            let file = open(path)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    if !waited {
                        on_wait();
                        waited = true;
                    }
                    file.lock()?;
                }
                Err(TryLockError::Error(e)) => return Err(e),
            }
            if still_linked(&file, path)? {
                return Ok(KeyLock {
                    _file: file,
                    path: path.to_path_buf(),
                });
            }
        }
    }

    /// Takes the lock if nobody holds it.
    pub fn try_acquire(path: &Path) -> io::Result<Option<KeyLock>> {
        let file = open(path)?;
        match file.try_lock() {
            Ok(()) if still_linked(&file, path)? => Ok(Some(KeyLock {
                _file: file,
                path: path.to_path_buf(),
            })),
            Ok(()) | Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }

    /// Removes the lock file while holding the lock (waiters notice and retry on a fresh file).
    pub fn remove(self) -> io::Result<()> {
        std::fs::remove_file(&self.path)
    }
}

fn open(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    // Group members must be able to lock it too; only the owner may chmod, which is fine to skip.
    let _ = file.set_permissions(std::fs::Permissions::from_mode(0o664));
    Ok(file)
}

/// Whether `path` still names the locked file (it may have been removed before we got the lock).
fn still_linked(file: &File, path: &Path) -> io::Result<bool> {
    let held = file.metadata()?;
    Ok(match std::fs::metadata(path) {
        Ok(now) => now.ino() == held.ino() && now.dev() == held.dev(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_waits_and_removed_files_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lock");
        let first = KeyLock::acquire(&path, &mut || panic!("nobody holds it yet")).unwrap();
        assert!(KeyLock::try_acquire(&path).unwrap().is_none());
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut waited = false;
                let lock = KeyLock::acquire(&path, &mut || waited = true).unwrap();
                (waited, lock)
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        // Removing the file while held: the waiter must not end up holding the orphaned inode.
        first.remove().unwrap();
        let (waited, lock) = waiter.join().unwrap();
        assert!(waited);
        assert!(path.exists());
        assert!(KeyLock::try_acquire(&path).unwrap().is_none());
        drop(lock);
        assert!(KeyLock::try_acquire(&path).unwrap().is_some());
    }
}
