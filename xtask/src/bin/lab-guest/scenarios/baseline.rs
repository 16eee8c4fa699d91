//! The reference figures: the kernel's own USB/IP exporting the mass-storage gadget over
//! guest loopback. Every benchmark of this project is read against these numbers, measured
//! in the same boot, kernel and VM.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::bench::{self, MIB};
use crate::gadget::Gadget;
use crate::report::{log, metric};
use crate::usbdev::{self, Via};
use crate::{modules, netem, sys};

/// Size of the backing file, and of each read or write run.
const SIZE: usize = 64 * MIB;
/// Runs per direction; the median is reported.
const RUNS: usize = 3;
/// Read size under netem: at ~10 MiB/s a full run would take too long for its value.
const NETEM_SIZE: usize = 16 * MIB;
/// usbipd's TCP port, 3240, as it appears in /proc/net/tcp.
const USBIP_PORT_HEX: &str = ":0CA8";

/// usbipd in the foreground as our child, so the scenario (not a pid file) owns its lifetime.
struct Usbipd(Child);

impl Drop for Usbipd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Imported port and bus id, detached and unbound on drop.
struct Attached {
    busid: String,
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Ok(out) = sys::run(Command::new("/usr/sbin/usbip").arg("port")) {
            for port in out
                .lines()
                .filter_map(|l| l.strip_prefix("Port "))
                .filter_map(|l| l.split(':').next())
            {
                let _ =
                    sys::run(Command::new("/usr/sbin/usbip").args(["detach", "-p", port.trim()]));
            }
        }
        let _ = sys::run(Command::new("/usr/sbin/usbip").args(["unbind", "-b", &self.busid]));
    }
}

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

    let usbipd = Command::new("/usr/sbin/usbipd")
        .arg("-4")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting usbipd")?;
    let _usbipd = Usbipd(usbipd);
    sys::wait_for(
        "usbipd to listen on port 3240",
        Duration::from_secs(10),
        || {
            let tcp = fs::read_to_string("/proc/net/tcp").ok()?;
            // State 0A is LISTEN.
            tcp.lines()
                .any(|l| l.contains(USBIP_PORT_HEX) && l.split_whitespace().nth(3) == Some("0A"))
                .then_some(())
        },
    )?;

    sys::run(Command::new("/usr/sbin/usbip").args(["bind", "-b", &busid]))?;
    let _attached = Attached {
        busid: busid.clone(),
    };
    let t0 = Instant::now();
    sys::run(Command::new("/usr/sbin/usbip").args(["attach", "-r", "127.0.0.1", "-b", &busid]))?;
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
