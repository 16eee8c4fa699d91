//! Test data and measurements: deterministic backing files, md5, direct-I/O throughput.
//!
//! Throughput uses O_DIRECT in 1 MiB blocks like `dd bs=1M iflag=direct`, the method of the
//! baseline figures in LAB-NOTES, so the page cache never flatters a result.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::sys;

/// `O_DIRECT` on x86_64 Linux (the only target the lab runs).
pub const O_DIRECT: i32 = 0o40000;

/// One MiB.
pub const MIB: usize = 1 << 20;

/// Direct I/O needs buffers aligned to the logical block size; a page covers every device.
const ALIGN: usize = 4096;

/// Fills `path` with `size` bytes of a seeded xorshift stream: incompressible, quick to make
/// under TCG (unlike /dev/urandom), and different at every offset so misplaced blocks show.
pub fn pattern_file(path: &Path, size: usize, seed: u64) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut state = seed | 1;
    let mut block = vec![0u8; MIB];
    let mut left = size;
    while left > 0 {
        for chunk in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(MIB);
        f.write_all(&block[..n])?;
        left -= n;
    }
    f.sync_all()?;
    Ok(())
}

/// md5 of the first `len` bytes of `path` (all of it if `None`), via busybox md5sum.
pub fn md5(path: &Path, len: Option<usize>) -> Result<String> {
    let p = path.to_string_lossy();
    let script = match len {
        Some(n) => format!("head -c {n} '{p}' | md5sum"),
        None => format!("md5sum < '{p}'"),
    };
    let out = sys::run(sys::bb("sh").args(["-c", &script]))?;
    let sum = out.split_whitespace().next().unwrap_or("").to_owned();
    if sum.len() != 32 {
        bail!("md5sum of {p} printed {out:?}");
    }
    Ok(sum)
}

/// A 4 KiB-aligned window into a vector, since std has no aligned allocation without unsafe.
fn aligned(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    buf.resize(len + ALIGN, 0);
    let off = buf.as_ptr().align_offset(ALIGN);
    &mut buf[off..off + len]
}

/// Reads `total` bytes from `dev` with O_DIRECT in 1 MiB blocks; returns MiB/s.
pub fn read_mib_s(dev: &Path, total: usize) -> Result<f64> {
    read_direct(dev, total, &[MIB], |_, _| Ok(()))
}

/// [`read_mib_s`] that also checks every block against the same offset of `expected`, so one
/// pass over a slow tunnel both measures and proves the data byte-exact (a second, buffered
/// md5 pass doubled the scenario's time). The comparison is not timed.
pub fn read_verify_mib_s(dev: &Path, total: usize, expected: &Path) -> Result<f64> {
    read_verify_in(dev, total, expected, &[MIB])
}

/// [`read_verify_mib_s`] in reads of `sizes` bytes in turn (each at most 1 MiB, a multiple of
/// 4 KiB), so one sequential reader's commands change length from one to the next.
pub fn read_verify_in(dev: &Path, total: usize, expected: &Path, sizes: &[usize]) -> Result<f64> {
    let mut want =
        File::open(expected).with_context(|| format!("opening {}", expected.display()))?;
    let mut block = vec![0u8; MIB];
    read_direct(dev, total, sizes, |offset, got| {
        let block = &mut block[..got.len()];
        want.read_exact(block)
            .with_context(|| format!("{} ends before {offset}", expected.display()))?;
        if let Some(i) = got.iter().zip(block.iter()).position(|(a, b)| a != b) {
            bail!(
                "{} differs from {} at byte {}",
                dev.display(),
                expected.display(),
                offset + i
            );
        }
        Ok(())
    })
}

/// The O_DIRECT read loop, in reads of `sizes` in turn; `check` sees each block with its
/// offset, outside the timed span.
fn read_direct(
    dev: &Path,
    total: usize,
    sizes: &[usize],
    mut check: impl FnMut(usize, &[u8]) -> Result<()>,
) -> Result<f64> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(O_DIRECT)
        .open(dev)
        .with_context(|| format!("opening {} with O_DIRECT", dev.display()))?;
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, MIB);
    let mut spent = Duration::ZERO;
    let mut done = 0;
    for &size in sizes.iter().cycle() {
        if done >= total {
            break;
        }
        let t = Instant::now();
        let want = (total - done).min(size.clamp(4096, MIB));
        let n = f
            .read(&mut buf[..want])
            .with_context(|| format!("reading {} at {done}", dev.display()))?;
        spent += t.elapsed();
        if n == 0 {
            bail!("{} ended after {done} bytes, wanted {total}", dev.display());
        }
        check(done, &buf[..n])?;
        done += n;
    }
    Ok(mib_per_s(done, spent))
}

/// Writes `total` bytes (a pattern) to `dev` with O_DIRECT in 1 MiB blocks; returns MiB/s.
pub fn write_mib_s(dev: &Path, total: usize) -> Result<f64> {
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(O_DIRECT)
        .open(dev)
        .with_context(|| format!("opening {} with O_DIRECT", dev.display()))?;
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, MIB);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let start = Instant::now();
    let mut done = 0;
    while done < total {
        f.write_all(buf)
            .with_context(|| format!("writing {} at {done}", dev.display()))?;
        done += MIB;
    }
    f.sync_all()?;
    Ok(mib_per_s(done, start.elapsed()))
}

/// What [`write_mib_s`] writes, into `path`: each MiB is `i % 251` for its byte index `i`.
pub fn written_pattern(path: &Path, total: usize) -> Result<()> {
    let block: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    let mut data = Vec::with_capacity(total);
    while data.len() < total {
        data.extend_from_slice(&block);
    }
    std::fs::write(path, &data)?;
    Ok(())
}

/// Copies `src` onto `dev` with O_DIRECT in 1 MiB blocks (so nothing sits in a cache that a
/// read-back could be served from); returns MiB/s.
pub fn copy_to_device(src: &Path, dev: &Path) -> Result<f64> {
    let mut from = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut to = OpenOptions::new()
        .write(true)
        .custom_flags(O_DIRECT)
        .open(dev)
        .with_context(|| format!("opening {} with O_DIRECT", dev.display()))?;
    let len = from.metadata()?.len() as usize;
    if !len.is_multiple_of(MIB) {
        bail!("{} is not a whole number of MiB", src.display());
    }
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, MIB);
    let start = Instant::now();
    let mut done = 0;
    while done < len {
        from.read_exact(buf)?;
        to.write_all(buf)
            .with_context(|| format!("writing {} at {done}", dev.display()))?;
        done += MIB;
    }
    to.sync_all()?;
    Ok(mib_per_s(done, start.elapsed()))
}

fn mib_per_s(bytes: usize, spent: Duration) -> f64 {
    let mib = bytes as f64 / MIB as f64;
    let rate = mib / spent.as_secs_f64().max(1e-9);
    (rate * 10.0).round() / 10.0
}

/// The median of a few runs: one slow run (a TCG hiccup) should not move the figure.
pub fn median(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs.get(runs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Removes a file if present (scenarios reuse fixed names in /tmp).
pub fn remove(path: &Path) {
    let _ = fs::remove_file(path);
}
