//! Attach and detach over and over: nothing may grow. The server's open files and memory, and
//! the vhci ports in use, must be the same after the last cycle as after the first. (CI runs
//! a few dozen cycles; that is enough to see a leak of one fd or one port per cycle.)

use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::project::{SharedDisk, attach_disk, detach_and_wait, vhci_ports_in_use};
use crate::bench::{self, MIB};
use crate::report::{log, metric};
use crate::sys;
use crate::usbdev::{self, Via};

const CYCLES: usize = 12;
/// Cycles before the baseline is taken: allocator arenas and caches fill during the first few.
const WARM_UP: usize = 4;

/// Attach, read a little, detach; `CYCLES` times; compare fds, RSS and ports.
pub fn run() -> Result<()> {
    cycles(CYCLES)
}

/// The soak's thousand cycles (`cargo xtask soak`).
pub fn soak() -> Result<()> {
    cycles(1000)
}

fn cycles(count: usize) -> Result<()> {
    let SharedDisk {
        gadget,
        vid_pid,
        ticket,
        mut server,
        ..
    } = SharedDisk::start("cycles", 16 * MIB, 0xc1)?;
    let mut first = None;
    let mut first_fds = None;
    for cycle in 1..=count {
        let (mut daemon, disk) = attach_disk("friend", &ticket, &vid_pid, gadget.vid, gadget.pid)?;
        bench::read_mib_s(&disk, MIB)?;
        detach_and_wait("friend", &mut daemon).with_context(|| format!("cycle {cycle}"))?;
        usbdev::wait_block_device(gadget.vid, gadget.pid, Via::Dummy, Duration::from_secs(15))?;
        sys::wait_for(
            "the remote disk to be gone",
            Duration::from_secs(10),
            || {
                usbdev::find_block_device_for(gadget.vid, gadget.pid, Via::Vhci)
                    .is_none()
                    .then_some(())
            },
        )?;
        // The server has released the claim once the gadget is a local disk again. Sampled
        // only on the cycles that use it: a sample takes half a second.
        if cycle <= WARM_UP || cycle % 50 == 0 || cycle == count {
            let now = (open_fds(server.pid()), rss_kib(server.pid()));
            if cycle == 1 {
                first_fds = Some(now.0);
            }
            if cycle == WARM_UP {
                first = Some(now);
            }
            log!("cycle {cycle}: server fds {}, RSS {} KiB", now.0, now.1);
        }
    }
    let last = (open_fds(server.pid()), rss_kib(server.pid()));
    let first = first.unwrap_or(last);
    let (used, _) = vhci_ports_in_use()?;
    metric("cycles", count as f64);
    metric(
        "server_fd_growth",
        last.0 as f64 - first_fds.unwrap_or(last.0) as f64,
    );
    metric("server_rss_growth_kib", last.1 as f64 - first.1 as f64);
    ensure!(
        used == 0,
        "{used} vhci ports still in use after {count} cycles"
    );
    let first_fds = first_fds.unwrap_or(last.0);
    ensure!(
        last.0 <= first_fds,
        "the server's open files grew from {first_fds} to {} over {count} cycles",
        last.0
    );
    ensure!(
        last.1 <= first.1 + 1024,
        "the server's RSS grew from {} to {} KiB between cycle {WARM_UP} and cycle {count}",
        first.1,
        last.1
    );
    ensure!(server.alive(), "the server died");
    log!("{count} cycles: no fd, memory or vhci port growth");
    Ok(())
}

/// The fewest open files over a few samples: the once-a-second rescan holds sysfs files open
/// for a moment, which is not a leak.
fn open_fds(pid: u32) -> usize {
    (0..5)
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
        })
        .min()
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
