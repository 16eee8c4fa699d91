//! A writer for the `newc` cpio format the kernel unpacks as an initramfs.
//!
//! Written here rather than shelling out to `cpio` so the archive is reproducible (fixed
//! mtimes, owners and inode numbers) and can hold `/dev/console` without `mknod` on the host.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams entries into a newc archive; [`Writer::finish`] writes the trailer.
pub struct Writer<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Writer<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Writer {
            out,
            ino: 1,
            written: 0,
        }
    }

    /// Adds every file, directory and symlink under `root`, sorted, with paths relative to it.
    pub fn add_tree(&mut self, root: &Path) -> Result<()> {
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let mut entries: Vec<_> = fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .collect::<io::Result<_>>()?;
            entries.sort_by_key(|e| e.file_name());
            for entry in entries.iter().rev() {
                let path = entry.path();
                let name = path
                    .strip_prefix(root)
                    .context("path outside the tree")?
                    .to_string_lossy()
                    .into_owned();
                let meta = fs::symlink_metadata(&path)?;
                let ft = meta.file_type();
                if ft.is_dir() {
                    self.entry(&name, S_IFDIR | (meta.mode() & 0o7777), 2, 0, &[])?;
                    stack.push(path);
                } else if ft.is_symlink() {
                    let target = fs::read_link(&path)?;
                    let target = target.to_string_lossy();
                    self.entry(&name, S_IFLNK | 0o777, 1, 0, target.as_bytes())?;
                } else if ft.is_file() {
                    let data =
                        fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                    let perm = meta.permissions().mode() & 0o7777;
                    self.entry(&name, S_IFREG | perm, 1, 0, &data)?;
                }
            }
        }
        Ok(())
    }

    /// Adds a character device node, e.g. `dev/console` as (5, 1).
    pub fn add_char_device(&mut self, name: &str, major: u32, minor: u32) -> Result<()> {
        self.entry(name, S_IFCHR | 0o600, 1, (major << 8) | minor, &[])
    }

    /// Writes the trailer and returns the archive size in bytes.
    pub fn finish(mut self) -> Result<u64> {
        self.entry("TRAILER!!!", 0, 1, 0, &[])?;
        self.out.flush()?;
        Ok(self.written)
    }

    /// `rdev` packs major in bits 8.. and minor in bits 0..8, enough for console and null.
    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: u32, data: &[u8]) -> Result<()> {
        let ino = if name == "TRAILER!!!" { 0 } else { self.ino };
        self.ino += 1;
        let size = u32::try_from(data.len()).context("file larger than 4 GiB in initramfs")?;
        let name_len = u32::try_from(name.len() + 1).context("path too long")?;
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev >> 8,
            rdev & 0xff,
            name_len,
            0,
        ];
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::Writer;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        w.add_char_device("dev", 1, 3).unwrap();
        w.add_char_device("dev/console", 5, 1).unwrap();
        let size = w.finish().unwrap();
        assert_eq!(size as usize, buf.len());
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&buf);
        assert!(text.contains("dev/console\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // The second header starts on a 4-byte boundary: 110-byte header + "dev\0" = 114 -> 116.
        assert_eq!(&buf[116..122], b"070701");
    }
}
