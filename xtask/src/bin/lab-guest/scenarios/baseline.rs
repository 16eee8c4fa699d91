//! The reference figures: the kernel's own USB/IP exporting the mass-storage gadget over
//! guest loopback. Every benchmark of this project is read against these numbers, measured
//! in the same boot, kernel and VM.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};

use super::usbip::{Attached, Usbipd};

use crate::bench::{self, MIB};
use crate::gadget::Gadget;
use crate::report::{log, metric};
use crate::usbdev::{self, Via};
use crate::{modules, netem};

/// Size of the backing file, and of each read or write run.
const SIZE: usize = 64 * MIB;
/// Runs per direction; the median is reported.
const RUNS: usize = 3;
/// Read size under netem: at ~10 MiB/s a full run would take too long for its value.
const NETEM_SIZE: usize = 16 * MIB;
/// Export, import, verify, measure.
pub fn run() -> Result<()> {
    modules::load(modules::USBIP)?;
    modules::load(modules::STORAGE)?;
    let backing = Path::new("/tmp/baseline.img");
    bench::pattern_file(backing, SIZE, 0xba5e)?;
    let backing_md5 = bench::md5(backing, None)?;
    let mut g = Gadget::mass_storage(backing)?;
    g.plug()?;
    g.wait_enumerated(Duration::from_secs(10))?;
    // Let usb-storage finish probing before usbip-host takes the device over.
    let local = usbdev::wait_block_device(g.vid, g.pid, Via::Dummy, Duration::from_secs(15))?;
    let busid = g.busid()?;
    log!("baseline: gadget {busid} is {} locally", local.display());

    let _usbipd = Usbipd::start()?;
    let t0 = Instant::now();
    let _attached = Attached::import(&busid)?;
    let disk = usbdev::wait_block_device(g.vid, g.pid, Via::Vhci, Duration::from_secs(20))?;
    let attach_secs = t0.elapsed().as_secs_f64();
    log!(
        "baseline: imported over USB/IP as {} in {attach_secs:.2}s",
        disk.display()
    );
    metric("attach_secs", (attach_secs * 100.0).round() / 100.0);

    let got = bench::md5(&disk, None)?;
    ensure!(
        got == backing_md5,
        "md5 over USB/IP {got} differs from the backing file's {backing_md5}"
    );
    log!(
        "baseline: md5 of all {} MiB over USB/IP matches ({got})",
        SIZE / MIB
    );

    let mut reads = Vec::new();
    for i in 0..RUNS {
        let r = bench::read_mib_s(&disk, SIZE)?;
        log!("baseline: read run {}: {r} MiB/s", i + 1);
        reads.push(r);
    }
    let mut writes = Vec::new();
    for i in 0..RUNS {
        let w = bench::write_mib_s(&disk, SIZE)?;
        log!("baseline: write run {}: {w} MiB/s", i + 1);
        writes.push(w);
    }
    let (read, write) = (bench::median(reads), bench::median(writes));
    log!(
        "baseline: kernel USB/IP over loopback: read {read} MiB/s, write {write} MiB/s (median of {RUNS} x {} MiB, O_DIRECT)",
        SIZE / MIB
    );
    metric("read_mib_s", read);
    metric("write_mib_s", write);
    metric("size_mib", (SIZE / MIB) as f64);

    // The same read with 1 ms each way on loopback (2 ms RTT), the WAN-ish anchor figure.
    netem::set(Duration::from_millis(1), 0.0)?;
    let slow = bench::read_mib_s(&disk, NETEM_SIZE);
    netem::clear()?;
    let slow = slow?;
    log!(
        "baseline: with netem delay 1ms on lo: read {slow} MiB/s ({} MiB)",
        NETEM_SIZE / MIB
    );
    metric("read_mib_s_netem_1ms", slow);
    Ok(())
}
