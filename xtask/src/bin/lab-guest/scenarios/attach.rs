//! The whole product in one boot: the mass-storage gadget exported by `p2p-usb-server`,
//! attached by `p2p-usb-client` through vhci-hcd over iroh on guest loopback, used by the
//! kernel's own usb-storage as /dev/sdX, then detached and given back.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::project::{
    SharedDisk, attach_disk, client, show_client_log, show_server_log, vhci_port_in_use,
    vhci_ports_in_use,
};
use crate::bench::{self, MIB};
use crate::report::{log, metric};
use crate::sys;
use crate::usbdev::{self, Via};

const SIZE: usize = 64 * MIB;
const WRITE: usize = 16 * MIB;
const BUFFERED: usize = 4 * MIB;

/// Attach, read, write, read back, detach, check the gadget is local again.
pub fn run() -> Result<()> {
    let SharedDisk {
        gadget,
        backing,
        vid_pid,
        ticket,
        mut server,
    } = SharedDisk::start("attach", SIZE, 0xa7)?;
    let backing = backing.as_path();
    let t0 = Instant::now();
    let (mut attached, disk) = attach_disk("friend", &ticket, &vid_pid, gadget.vid, gadget.pid)?;
    let secs = t0.elapsed().as_secs_f64();
    log!("attached as {} via vhci_hcd in {secs:.2}s", disk.display());
    metric("attach_to_disk_secs", secs);
    let vhci_dev = usbdev::find_usb_device(gadget.vid, gadget.pid, Via::Vhci)
        .context("no USB device under vhci_hcd")?;
    let speed = sys::read(vhci_dev.join("speed"))?;
    ensure!(speed == "480", "attached at {speed} Mb/s, expected 480");

    let read = match bench::read_verify_mib_s(&disk, SIZE, backing) {
        Ok(r) => r,
        Err(e) => {
            show_client_log("friend");
            show_server_log();
            return Err(e);
        }
    };
    log!("read 64 MiB byte-exact at {read:.1} MiB/s (direct I/O)");
    metric("read_mib_s", read);

    // The page cache's path too: readahead sends differently shaped requests (many-page
    // scatter lists) than direct I/O does.
    let t = Instant::now();
    let got = bench::md5(&disk, Some(BUFFERED))?;
    let buffered = (BUFFERED / MIB) as f64 / t.elapsed().as_secs_f64();
    ensure!(
        got == bench::md5(backing, Some(BUFFERED))?,
        "the first {} MiB read through the page cache differ from the backing file",
        BUFFERED / MIB
    );
    log!(
        "buffered read of {} MiB byte-exact at {buffered:.1} MiB/s",
        BUFFERED / MIB
    );
    metric("buffered_read_mib_s", buffered);

    let write = bench::write_mib_s(&disk, WRITE)?;
    let written = Path::new("/tmp/written.bin");
    bench::written_pattern(written, WRITE)?;
    let want = bench::md5(written, None)?;
    bench::read_verify_mib_s(&disk, WRITE, written)
        .context("16 MiB written then read back differ")?;
    log!("wrote 16 MiB at {write:.1} MiB/s, read back byte-exact");
    metric("write_mib_s", write);

    // Detach on command: the client's attachment ends, the vhci port is free, the server
    // gives the gadget back to its kernel driver.
    let port = vhci_port_in_use()?;
    let (ok, _, err) = client("friend", &["detach", &port])?;
    ensure!(ok, "detach failed: {err}");
    let exited = attached.wait_exit(Duration::from_secs(10));
    ensure!(
        exited == Some(true),
        "the attach process did not end cleanly after detach: {exited:?}"
    );
    sys::wait_for("the vhci disk to go away", Duration::from_secs(10), || {
        usbdev::find_block_device_for(gadget.vid, gadget.pid, Via::Vhci)
            .is_none()
            .then_some(())
    })?;
    let (used, status) = vhci_ports_in_use()?;
    ensure!(
        used == 0,
        "a vhci port is still in use after detach:\n{status}"
    );
    let local =
        usbdev::wait_block_device(gadget.vid, gadget.pid, Via::Dummy, Duration::from_secs(15))
            .context("after detach the gadget did not come back as a local disk")?;
    let written_on_gadget = bench::md5(&local, Some(WRITE))?;
    ensure!(
        written_on_gadget == want,
        "the write did not reach the gadget's backing store"
    );
    log!("detached: no ghost port, the gadget is local again with the written data");
    ensure!(server.alive(), "the server died");
    Ok(())
}
