//! The lab's own health check: a gadget on dummy_hcd behaves like a real USB disk.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};

use crate::bench::{self, MIB};
use crate::gadget::Gadget;
use crate::report::{log, metric};
use crate::usbdev::{self, Via};
use crate::{modules, sys};

/// Plug a 16 MiB mass-storage gadget, check speed, driver and data, unplug, replug.
pub fn run() -> Result<()> {
    modules::load(modules::STORAGE)?;
    let backing = Path::new("/tmp/smoke.img");
    bench::pattern_file(backing, 16 * MIB, 0x5eed)?;
    let mut g = Gadget::mass_storage(backing)?;
    let t0 = Instant::now();
    g.plug()?;
    let dev = g.wait_enumerated(Duration::from_secs(10))?;
    let speed = sys::read(dev.join("speed"))?;
    ensure!(
        speed == "480",
        "gadget enumerated at {speed} Mb/s, expected high speed (480)"
    );
    let disk = usbdev::wait_block_device(g.vid, g.pid, Via::Dummy, Duration::from_secs(15))?;
    let secs = t0.elapsed().as_secs_f64();
    let busid = g.busid()?;
    let driver = std::fs::read_link(dev.join(format!("{busid}:1.0/driver")))?;
    let driver = driver
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    ensure!(
        driver == "usb-storage",
        "interface driver is {driver}, expected usb-storage"
    );
    log!(
        "smoke: {busid} at {speed} Mb/s, driver {driver}, disk {} after {secs:.2}s",
        disk.display()
    );
    metric("enumerate_secs", (secs * 100.0).round() / 100.0);

    let want = bench::md5(backing, Some(MIB))?;
    let got = bench::md5(&disk, Some(MIB))?;
    ensure!(
        got == want,
        "first MiB of {} has md5 {got}, backing file {want}",
        disk.display()
    );
    log!("smoke: first MiB md5 {got} matches");

    g.unplug()?;
    sys::wait_for(
        "the disk to disappear after unplug",
        Duration::from_secs(10),
        || {
            usbdev::find_block_device_for(g.vid, g.pid, Via::Dummy)
                .is_none()
                .then_some(())
        },
    )?;
    log!("smoke: unplug removed {}", disk.display());

    // Replug: later scenarios rely on a gadget coming back after an unbind.
    g.plug()?;
    let again = usbdev::wait_block_device(g.vid, g.pid, Via::Dummy, Duration::from_secs(15))?;
    log!("smoke: replug brought back {}", again.display());
    g.unplug()?;
    drop(g);
    bench::remove(backing);
    Ok(())
}
