//! `--usbip-listen`: Linux's own `usbip attach` imports the exported gadget through our
//! tunnel, as an unmodified USB/IP client would.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::project::{SharedDisk, show_client_log, show_server_log, spawn_client};
use crate::bench::{self, MIB};
use crate::report::{log, metric};
use crate::sys;
use crate::usbdev::{self, Via};

const SIZE: usize = 32 * MIB;
const USBIP: &str = "/usr/sbin/usbip";

/// Bridge, list, import with `usbip attach`, read byte-exact, detach.
pub fn run() -> Result<()> {
    let SharedDisk {
        gadget,
        backing,
        ticket,
        mut server,
        ..
    } = SharedDisk::start("bridge", SIZE, 0xb1)?;
    let backing = backing.as_path();
    let busid = gadget.busid()?;
    let _bridge = spawn_client(
        "friend",
        &["attach", &ticket, "--usbip-listen", "127.0.0.1:3240"],
    )?;
    let listed = sys::wait_for(
        "the bridge to list the device",
        Duration::from_secs(15),
        || {
            let out = Command::new(USBIP)
                .args(["list", "-r", "127.0.0.1"])
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains(&busid).then_some(text)
        },
    );
    let listed = match listed {
        Ok(l) => l,
        Err(e) => {
            if let Ok(out) = Command::new(USBIP)
                .args(["list", "-r", "127.0.0.1"])
                .output()
            {
                log!(
                    "usbip list stdout: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
                log!(
                    "usbip list stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            log!("gadget bus id {busid}");
            show_client_log("friend");
            show_server_log();
            return Err(e);
        }
    };
    log!("usbip list -r 127.0.0.1:\n{}", listed.trim_end());

    let t0 = Instant::now();
    let out = Command::new(USBIP)
        .args(["attach", "-r", "127.0.0.1", "-b", &busid])
        .output()?;
    ensure!(
        out.status.success(),
        "usbip attach failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let disk =
        match usbdev::wait_block_device(gadget.vid, gadget.pid, Via::Vhci, Duration::from_secs(30))
        {
            Ok(d) => d,
            Err(e) => {
                show_client_log("friend");
                show_server_log();
                return Err(e.context("usbip attach through the bridge gave no disk"));
            }
        };
    log!(
        "usbip attach through the bridge: {} in {:.2}s",
        disk.display(),
        t0.elapsed().as_secs_f64()
    );
    let read = bench::read_verify_mib_s(&disk, SIZE, backing).context("read through the bridge")?;
    log!("read 32 MiB byte-exact at {read:.1} MiB/s");
    metric("bridge_read_mib_s", read);

    let port = Command::new(USBIP).arg("port").output()?;
    let port = String::from_utf8_lossy(&port.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("Port "))
        .filter_map(|l| l.split(':').next())
        .map(|p| p.trim().trim_start_matches('0').to_owned())
        .next()
        .context("usbip port shows no imported device")?;
    let port = if port.is_empty() {
        "0".to_owned()
    } else {
        port
    };
    let out = Command::new(USBIP).args(["detach", "-p", &port]).output()?;
    ensure!(out.status.success(), "usbip detach failed");
    sys::wait_for(
        "the bridged disk to go away",
        Duration::from_secs(10),
        || {
            usbdev::find_block_device_for(gadget.vid, gadget.pid, Via::Vhci)
                .is_none()
                .then_some(())
        },
    )?;
    usbdev::wait_block_device(gadget.vid, gadget.pid, Via::Dummy, Duration::from_secs(15))
        .context("after usbip detach the gadget did not come back as a local disk")?;
    log!("usbip detach: the gadget is local again");
    ensure!(server.alive(), "the server died");
    Ok(())
}
