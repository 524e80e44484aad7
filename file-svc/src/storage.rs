//! Content-addressed storage: bytes live at `<dir>/<first two hex digits>/<sha256>`, so
//! equal bytes are stored once and no name from a client ever reaches the file system.
//! Each file is written under a temporary name in `<dir>/tmp`, flushed to disk, then
//! renamed into place: a reader finds the whole file or none.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use uuid::Uuid;

use crate::domain::ContentHash;

/// Temporary files this old were left by a process that died mid-write.
const STALE_TEMPORARY: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug)]
pub struct Storage {
    dir: PathBuf,
}

impl Storage {
    /// Creates the directory if needed and clears temporary files left by a crash.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let storage = Self {
            dir: dir.to_path_buf(),
        };
        fs::create_dir_all(storage.tmp())
            .with_context(|| format!("creating {} (COMMERCE__FILES__DIR)", dir.display()))?;
        storage.remove_stale_temporaries();
        Ok(storage)
    }

    fn tmp(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    pub fn path(&self, hash: &ContentHash) -> PathBuf {
        self.dir.join(&hash.as_str()[..2]).join(hash.as_str())
    }

    /// Stores `bytes` under `hash` unless they are there already. Blocking.
    pub fn put(&self, hash: &ContentHash, bytes: &[u8]) -> io::Result<()> {
        let path = self.path(hash);
        if path.is_file() {
            return Ok(());
        }
        let shard = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(shard)?;
        let temporary = self.tmp().join(Uuid::now_v7().to_string());
        let written = (|| {
            let mut file = File::create_new(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&temporary, &path)
        })();
        if let Err(error) = written {
            let _ = fs::remove_file(&temporary);
            return Err(error);
        }
        // The rename itself is durable only once the directory is.
        File::open(shard)?.sync_all()
    }

    fn remove_stale_temporaries(&self) {
        let Ok(entries) = fs::read_dir(self.tmp()) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.filter_map(Result::ok) {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|at| now.duration_since(at).unwrap_or_default() > STALE_TEMPORARY);
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_land_under_their_hash_once_with_no_temporary_left() {
        let dir = std::env::temp_dir().join(format!("file-svc-storage-{}", Uuid::now_v7()));
        let storage = Storage::open(&dir).expect("open");
        let hash = ContentHash::of(b"hello");
        storage.put(&hash, b"hello").expect("put");
        storage.put(&hash, b"hello").expect("put again");
        let path = storage.path(&hash);
        assert_eq!(path, dir.join("2c").join(hash.as_str()));
        assert_eq!(fs::read(&path).expect("read"), b"hello");
        assert_eq!(fs::read_dir(dir.join("tmp")).expect("tmp").count(), 0);
        let shards: Vec<_> = fs::read_dir(&dir)
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(shards.len(), 2, "tmp and one shard: {shards:?}");
        fs::remove_dir_all(dir).expect("cleanup");
    }
}
