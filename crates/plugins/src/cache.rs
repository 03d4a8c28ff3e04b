//! The compiled-plugin cache: the machine code wasmtime compiled for a plugin, one file per .wasm
//! and engine settings (`<key>.cwasm`), so that a restart or a reload loads it instead of
//! compiling again. Processes that share the directory share the files.
//!
//! Policy: the directory is kept under a size budget, `server.plugin_cache_max_bytes`. Once a
//! config is in service (at startup, after a reload), the files it does not use are removed, the
//! oldest compiled first,
//! until the directory fits; the files it uses are never removed, even when they alone are over
//! the budget. Without it, every plugin version a reload ever loaded stayed on disk for good (a
//! JavaScript or Python plugin compiles to about 36 MB). A file removed while another process
//! uses it costs that process a compile on its next load, nothing more: loaded code lives in
//! memory (a mapped file stays readable after it is removed). A file half-written by a process that
//! died (`<key>.<pid>.partial`) goes at the next trim once it is an hour old.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use wasmtime::Engine;
use wasmtime::component::Component;

/// How old a `.partial` file must be before [`CodeCache::trim`] takes it for a dead process's.
const STALE_PARTIAL: Duration = Duration::from_secs(3600);

/// The cache directory and its budget.
pub struct CodeCache {
    dir: PathBuf,
    max_bytes: u64,
}

/// A cached file, as [`evictions`] weighs it.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    key: String,
    bytes: u64,
    compiled: SystemTime,
}

impl CodeCache {
    /// The cache in `dir` (made when first written), kept under `max_bytes`.
    pub fn new(dir: &Path, max_bytes: u64) -> Self {
        Self { dir: dir.to_owned(), max_bytes }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.cwasm"))
    }

    /// The code compiled for `key` before, if its file is there and this engine can use it.
    pub fn get(&self, engine: &Engine, key: &str) -> Option<Component> {
        let path = self.path(key);
        if !path.is_file() {
            return None;
        }
        // SAFETY: the cache directory is the operator's (like the .wasm files) and the file name
        // carries the hash of both the source and the engine's settings.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unusable cached plugin code");
                None
            }
        }
    }

    /// Keeps `compiled` as the code for `key`.
    pub fn put(&self, key: &str, compiled: &[u8]) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(key);
        // Named for this process: servers sharing the directory may compile the same plugin at once.
        let partial = path.with_extension(format!("{}.partial", std::process::id()));
        let written = std::fs::write(&partial, compiled).and_then(|()| std::fs::rename(&partial, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        written
    }

    /// Removes the files not `in_use`, oldest first, until the directory fits its budget (see the
    /// module's policy); answers how many files and bytes went.
    pub fn trim(&self, in_use: &HashSet<String>) -> io::Result<(usize, u64)> {
        let files = match std::fs::read_dir(&self.dir) {
            // Nothing was ever cached (no tenants yet, or no plugin could be written).
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
            files => files?,
        };
        let mut entries = Vec::new();
        for file in files {
            let path = file?.path();
            // Gone already: another process trimmed it.
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            let modified = meta.modified()?;
            match path.extension().and_then(|ext| ext.to_str()) {
                Some("cwasm") => {
                    let key = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
                    entries.push(Entry { key, bytes: meta.len(), compiled: modified });
                }
                // Half-written by a process that died (a live one renames it within seconds).
                Some("partial") if modified.elapsed().unwrap_or_default() > STALE_PARTIAL => {
                    let _ = std::fs::remove_file(&path);
                }
                _ => {}
            }
        }
        let (mut files, mut bytes) = (0, 0);
        for entry in evictions(entries, self.max_bytes, in_use) {
            match std::fs::remove_file(self.path(&entry.key)) {
                Ok(()) => (files, bytes) = (files + 1, bytes + entry.bytes),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok((files, bytes))
    }
}

/// The entries to remove so that the rest fit `max_bytes`: those not `in_use`, oldest first.
fn evictions(mut entries: Vec<Entry>, max_bytes: u64, in_use: &HashSet<String>) -> Vec<Entry> {
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    entries.sort_by_key(|e| e.compiled);
    let mut out = Vec::new();
    for entry in entries {
        if total <= max_bytes {
            break;
        }
        if !in_use.contains(&entry.key) {
            total -= entry.bytes;
            out.push(entry);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(key: usize, bytes: u64, age_s: u64) -> Entry {
        Entry { key: key.to_string(), bytes, compiled: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 - age_s) }
    }

    proptest! {
        /// Whatever the files, their ages and the budget: files in use stay, the rest fits the
        /// budget unless the files in use alone do not, every file removed is older than every
        /// unused file kept, and no file is removed that the budget did not need.
        #[test]
        fn trimming_keeps_files_in_use_and_removes_the_oldest_until_the_rest_fits(
            files in prop::collection::vec((0u64..100, 0u64..1_000, any::<bool>()), 0..20),
            max_bytes in 0u64..1_000,
        ) {
            let entries: Vec<Entry> = files.iter().enumerate().map(|(i, (bytes, age, _))| entry(i, *bytes, *age)).collect();
            let in_use: HashSet<String> =
                files.iter().enumerate().filter(|(_, (_, _, used))| *used).map(|(i, _)| i.to_string()).collect();
            let removed = evictions(entries.clone(), max_bytes, &in_use);
            let kept: Vec<&Entry> = entries.iter().filter(|e| !removed.contains(e)).collect();
            let kept_bytes: u64 = kept.iter().map(|e| e.bytes).sum();
            let in_use_bytes: u64 = entries.iter().filter(|e| in_use.contains(&e.key)).map(|e| e.bytes).sum();

            prop_assert!(removed.iter().all(|e| !in_use.contains(&e.key)));
            prop_assert!(kept_bytes <= max_bytes.max(in_use_bytes));
            for gone in &removed {
                prop_assert!(kept.iter().filter(|e| !in_use.contains(&e.key)).all(|e| e.compiled >= gone.compiled));
            }
            // The newest file removed was needed: without removing it, the rest would not fit.
            if let Some(last) = removed.last() {
                prop_assert!(kept_bytes + last.bytes > max_bytes);
            }
        }
    }

    #[test]
    fn trim_removes_old_unused_files_and_dead_partial_ones_and_leaves_other_files_alone() {
        let dir = std::env::temp_dir().join(format!("batchbox-code-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = CodeCache::new(&dir, 250);
        let now = SystemTime::now();
        for (key, age_s) in [("old", 30), ("used", 20), ("new", 10)] {
            cache.put(key, &[0; 100]).unwrap();
            let file = std::fs::File::options().write(true).open(cache.path(key)).unwrap();
            file.set_modified(now - Duration::from_secs(age_s)).unwrap();
        }
        std::fs::write(dir.join("notes.txt"), [0; 1000]).unwrap();
        // Half-written files: one by a process that died two hours ago, one being written now.
        let (dead, live) = (dir.join("dead.1.partial"), dir.join("live.2.partial"));
        for partial in [&dead, &live] {
            std::fs::write(partial, [0; 1000]).unwrap();
        }
        let file = std::fs::File::options().write(true).open(&dead).unwrap();
        file.set_modified(now - Duration::from_secs(7200)).unwrap();

        let in_use = HashSet::from(["used".to_string()]);
        assert_eq!(cache.trim(&in_use).unwrap(), (1, 100), "300 bytes over a budget of 250: the oldest went");
        assert!(!cache.path("old").exists() && cache.path("used").exists() && cache.path("new").exists());
        assert!(dir.join("notes.txt").exists(), "only .cwasm files are the cache's");
        assert!(!dead.exists() && live.exists(), "a dead process's partial file goes, a live one's stays");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
