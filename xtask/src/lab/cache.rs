//! The lab cache under `<workspace>/.lab/`, keyed by a hash of everything a build consumes.
//!
//! Layout: `debs/` (apt downloads), `pkgs/` (unpacked packages), `kernels/` (uncompressed
//! vmlinux per kernel package), `builds/<key>/` (initramfs + manifest), and `current` (the key
//! of the last successful build, which `lab run` boots).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Bump when the initramfs layout or the guest contract changes, to invalidate old builds.
const FORMAT: &str = "lab-format-1";

/// How many builds to keep besides the current one; each is ~50 MiB.
const KEEP_OLD_BUILDS: usize = 2;

/// Incremental FNV-1a (64-bit): the key only has to change when an input changes, not
/// resist an adversary, so a few lines beat a hashing dependency.
pub struct Key(u64);

impl Key {
    /// A key seeded with the cache format version.
    pub fn new() -> Self {
        let mut k = Key(0xcbf2_9ce4_8422_2325);
        k.add(FORMAT.as_bytes());
        k
    }

    /// Mixes in `bytes`, length-prefixed so adjacent inputs cannot run together.
    pub fn add(&mut self, bytes: &[u8]) {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Mixes in a file's name and content.
    pub fn add_file(&mut self, path: &Path) -> Result<()> {
        self.add(path.to_string_lossy().as_bytes());
        let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        self.add(&data);
        Ok(())
    }

    /// The key as a directory name.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Paths inside the lab cache.
pub struct Cache {
    /// `<workspace>/.lab`.
    pub dir: PathBuf,
}

impl Cache {
    /// The cache of the workspace this xtask belongs to.
    pub fn open(workspace: &Path) -> Result<Self> {
        let dir = workspace.join(".lab");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Cache { dir })
    }

    /// Holds `.lab/lock` until dropped. Builds share the staging directory and runs share
    /// the machine's two cores, so only one lab build or run proceeds at a time, across
    /// every process and user of this workspace; others wait here. An OS file lock is
    /// released when its holder exits, so a killed run never leaves a stale lock.
    pub fn lock(&self) -> Result<fs::File> {
        let path = self.dir.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if file.try_lock().is_err() {
            eprintln!("lab: waiting for another lab build or run in this workspace to finish");
            file.lock()
                .with_context(|| format!("locking {}", path.display()))?;
        }
        Ok(file)
    }

    /// Where the build with this key lives (whether or not it exists yet).
    pub fn build_dir(&self, key: &str) -> PathBuf {
        self.dir.join("builds").join(key)
    }

    /// Where an uncompressed kernel for one kernel package version is kept.
    pub fn kernel_dir(&self, pkg_dir_name: &str) -> PathBuf {
        self.dir.join("kernels").join(pkg_dir_name)
    }

    /// The last successful build, if any.
    pub fn current(&self) -> Option<PathBuf> {
        let key = fs::read_to_string(self.dir.join("current")).ok()?;
        let dir = self.build_dir(key.trim());
        dir.join("manifest.json").is_file().then_some(dir)
    }

    /// Marks `key` as the build `lab run` uses and prunes older builds.
    pub fn set_current(&self, key: &str) -> Result<()> {
        let tmp = self.dir.join("current.tmp");
        fs::write(&tmp, key)?;
        fs::rename(&tmp, self.dir.join("current"))?;
        self.prune(key)
    }

    fn prune(&self, keep: &str) -> Result<()> {
        let Ok(entries) = fs::read_dir(self.dir.join("builds")) else {
            return Ok(());
        };
        let mut old: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name() != keep)
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        old.sort();
        let excess = old.len().saturating_sub(KEEP_OLD_BUILDS);
        for (_, path) in old.into_iter().take(excess) {
            fs::remove_dir_all(&path)
                .with_context(|| format!("removing old lab build {}", path.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Key;

    #[test]
    fn key_depends_on_every_input_and_its_boundaries() {
        let key = |parts: &[&[u8]]| {
            let mut k = Key::new();
            parts.iter().for_each(|p| k.add(p));
            k.hex()
        };
        assert_eq!(key(&[b"a", b"b"]), key(&[b"a", b"b"]));
        assert_ne!(key(&[b"a", b"b"]), key(&[b"ab"]));
        assert_ne!(key(&[b"a"]), key(&[b"b"]));
        assert_eq!(key(&[]).len(), 16);
    }
}
