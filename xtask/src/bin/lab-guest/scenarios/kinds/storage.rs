//! Mass storage with two LUNs (`usb-storage`): both disks appear and read back their backing
//! files; a write to the second LUN reaches its backing file and reads back; an unknown SCSI
//! command with a data-in phase makes f_mass_storage halt bulk-in, which usb-storage clears
//! (CLEAR_FEATURE ENDPOINT_HALT) before reading the status, and the disk still reads after;
//! `usb-storage` is unbound and bound again.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::{Checks, Ctx, Done, Kind, no_setup, unbind_rebind};
use crate::bench::{self, MIB};
use crate::gadget::{Function, Gadget, VID};
use crate::{modules, sys};

const LUN_BYTES: usize = 4 * MIB;
const LUN0: &str = "/tmp/kind-lun0.img";
const LUN1: &str = "/tmp/kind-lun1.img";
/// What the write check puts on LUN 1.
const WRITTEN: &str = "/tmp/kind-lun1-new.img";

/// The storage kind.
pub const KINDS: &[Kind] = &[Kind {
    name: "storage-2lun",
    functions: "mass_storage (2 LUNs)",
    drivers: &["usb-storage"],
    modules: modules::STORAGE,
    covers: "both LUNs read back byte-exact; write + read back; bulk-in stall and clear (unknown SCSI opcode); unbind/rebind",
    gadget,
    setup: no_setup,
    check,
}];

fn gadget() -> Result<Gadget> {
    bench::pattern_file(Path::new(LUN0), LUN_BYTES, 0x10)?;
    bench::pattern_file(Path::new(LUN1), LUN_BYTES, 0x11)?;
    Gadget::composite(
        "kind-msc",
        VID,
        0x0160,
        &[Function {
            module: "usb_f_mass_storage",
            instance: "mass_storage.0",
            attrs: &[
                ("lun.0/removable", b"0"),
                ("lun.0/file", LUN0.as_bytes()),
                ("lun.1/removable", b"0"),
                ("lun.1/file", LUN1.as_bytes()),
            ],
        }],
    )
}

/// The client side's disks of `dev`, ordered by SCSI LUN.
pub fn disks(dev: &Path) -> Vec<PathBuf> {
    let prefix = fs::canonicalize(dev).unwrap_or_default();
    let mut found: Vec<(String, PathBuf)> = fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("sd"))
        .filter_map(|e| {
            let real = fs::canonicalize(e.path().join("device")).ok()?;
            real.starts_with(&prefix).then(|| {
                let hctl = real
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                let lun = hctl.rsplit(':').next().unwrap_or("").to_owned();
                (lun, Path::new("/dev").join(e.file_name()))
            })
        })
        .filter(|(_, node)| fs::File::open(node).is_ok())
        .collect();
    found.sort();
    found.into_iter().map(|(_, d)| d).collect()
}

/// Waits for `n` disks of `dev`.
pub fn wait_disks(dev: &Path, n: usize) -> Result<Vec<PathBuf>> {
    sys::wait_for(
        &format!("{n} disks under {}", dev.display()),
        Duration::from_secs(20),
        || Some(disks(dev)).filter(|d| d.len() == n),
    )
}

/// Reads `disk` with O_DIRECT and compares it to `expected`.
pub fn reads_back(disk: &Path, expected: &Path) -> Result<f64> {
    let len = fs::metadata(expected)?.len() as usize;
    bench::read_verify_mib_s(disk, len, expected)
        .with_context(|| format!("{} against {}", disk.display(), expected.display()))
}

fn check(ctx: &Ctx<'_>, checks: &mut Checks) {
    let (d1, d2, d3, d4) = (
        ctx.dev.clone(),
        ctx.dev.clone(),
        ctx.dev.clone(),
        ctx.dev.clone(),
    );
    checks.check("both LUNs read back", Duration::from_secs(60), move || {
        let disks = wait_disks(&d1, 2)?;
        let a = reads_back(&disks[0], Path::new(LUN0))?;
        let b = reads_back(&disks[1], Path::new(LUN1))?;
        Ok(Done::new(format!(
            "{} at {a} MiB/s, {} at {b} MiB/s",
            disks[0].display(),
            disks[1].display()
        ))
        .figure("read_mib_s", a))
    });
    checks.check(
        "write LUN 1, read back",
        Duration::from_secs(60),
        move || {
            let disks = wait_disks(&d2, 2)?;
            bench::pattern_file(Path::new(WRITTEN), LUN_BYTES, 0x12)?;
            let rate = bench::copy_to_device(Path::new(WRITTEN), &disks[1])?;
            ensure!(
                fs::read(LUN1)? == fs::read(WRITTEN)?,
                "the gadget's LUN 1 file does not hold what was written"
            );
            reads_back(&disks[1], Path::new(WRITTEN))?;
            fs::copy(WRITTEN, LUN1)?;
            Ok(Done::new(format!(
                "{} MiB at {rate} MiB/s, in the backing file, read back",
                LUN_BYTES / MIB
            ))
            .figure("write_mib_s", rate))
        },
    );
    checks.check("stall and clear", Duration::from_secs(40), move || {
        let disks = wait_disks(&d3, 2)?;
        let out = Command::new("/usr/bin/sg_raw")
            .args(["-r", "512"])
            .arg(&disks[0])
            .args(["c0", "00", "00", "00", "00", "00"])
            .output()
            .context("running sg_raw")?;
        let said = String::from_utf8_lossy(&out.stderr)
            .trim()
            .replace('\n', " / ");
        ensure!(
            said.to_lowercase().contains("illegal request"),
            "sg_raw did not report ILLEGAL REQUEST: {said}"
        );
        reads_back(&disks[0], Path::new(LUN0)).context("after the stall")?;
        Ok(Done::new(format!(
            "unknown opcode 0xc0 with 512-byte data-in: {said}; LUN 0 reads back after"
        )))
    });
    checks.check(
        "unbind/rebind usb-storage",
        Duration::from_secs(60),
        move || {
            let what = unbind_rebind(&d4, "usb-storage")?;
            let disks = wait_disks(&d4, 2)?;
            reads_back(&disks[0], Path::new(LUN0))?;
            reads_back(&disks[1], Path::new(LUN1))?;
            Ok(Done::new(format!("{what}; both LUNs read back")))
        },
    );
}
