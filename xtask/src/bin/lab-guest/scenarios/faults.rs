//! Faults the users of tools like ours meet most: data integrity on a lossy, slow link; a
//! device unplugged mid-transfer; a client killed outright. Each must end cleanly: no ghost
//! port, no process stuck in D state, no claim left behind, and the server still serving.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::project::{
    SharedDisk, attach_disk, client, show_server_log, vhci_port_in_use, vhci_ports_in_use,
};
use crate::bench::{self, MIB};
use crate::report::{log, metric};
use crate::usbdev::{self, Via};
use crate::{modules, netem, sys};

const SIZE: usize = 64 * MIB;
/// Bytes written and read back over the lossy link (CI-sized; `cargo xtask soak` runs more).
const LOSSY: usize = 8 * MIB;

/// Integrity under loss, unplug during dd, SIGKILL of the client.
pub fn run() -> Result<()> {
    modules::load(modules::NETEM)?;
    let SharedDisk {
        mut gadget,
        vid_pid,
        ticket,
        mut server,
        ..
    } = SharedDisk::start_for("faults", SIZE, 0xfa, &["first", "second"])?;

    // 1. Integrity with 1 % packet loss and 20 ms round trips.
    let (mut attached, disk) = attach_disk("first", &ticket, &vid_pid, gadget.vid, gadget.pid)?;
    let pattern = Path::new("/tmp/faults-written.bin");
    let block: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    std::fs::write(pattern, block.repeat(LOSSY / MIB))?;
    netem::set(Duration::from_millis(10), 1.0)?;
    let lossy = (|| -> Result<(f64, f64)> {
        let w = bench::write_mib_s(&disk, LOSSY)?;
        let r = bench::read_verify_mib_s(&disk, LOSSY, pattern)
            .context("data written over the lossy link came back different")?;
        Ok((w, r))
    })();
    netem::clear()?;
    let (w, r) = lossy?;
    log!("1% loss + 20 ms RTT: wrote {w} MiB/s, read {r} MiB/s, 8 MiB byte-exact");
    metric("lossy_write_mib_s", w);
    metric("lossy_read_mib_s", r);

    // 2. Unplug during dd: the disk goes, dd gets an I/O error, nothing hangs.
    let gone = unplug_during_dd(&disk, || gadget.unplug())?;
    metric("unplug_to_disk_gone_secs", gone);
    ensure!(
        server.alive(),
        "the server died when its device was unplugged"
    );
    let ended = attached.wait_exit(Duration::from_secs(5));
    ensure!(
        ended.is_some(),
        "the attach process kept running for a device that is gone"
    );
    let (used, vhci) = vhci_ports_in_use()?;
    ensure!(
        used == 0,
        "a ghost vhci port is left after the unplug:\n{vhci}"
    );

    // 3. The client is killed outright: the server releases the claim within 2 s, and the
    //    next client can attach.
    gadget.plug()?;
    gadget.wait_enumerated(Duration::from_secs(10))?;
    usbdev::wait_block_device(gadget.vid, gadget.pid, Via::Dummy, Duration::from_secs(15))?;
    let (victim, _) = attach_disk("first", &ticket, &vid_pid, gadget.vid, gadget.pid)?;
    let detached_before = server_log_count("detached");
    let t_kill = Instant::now();
    sys::run(Command::new("/bin/busybox").args(["kill", "-9", &victim.pid().to_string()]))?;
    let released = sys::wait_for(
        "the server to release the claim",
        Duration::from_secs(5),
        || (server_log_count("detached") > detached_before).then(|| t_kill.elapsed().as_secs_f64()),
    );
    let released = match released {
        Ok(secs) => secs,
        Err(e) => {
            show_server_log();
            return Err(e);
        }
    };
    log!("client killed with SIGKILL: the server released its claim after {released:.2}s");
    metric("sigkill_to_release_secs", released);
    ensure!(
        released <= 2.0 * sys::pace(),
        "release took {released:.2}s (more than 2 s at this guest's pace, {:.2} s)",
        2.0 * sys::pace()
    );
    drop(victim);
    let (next, disk) = attach_disk("second", &ticket, &vid_pid, gadget.vid, gadget.pid)
        .context("the next client could not attach after the kill")?;
    bench::read_mib_s(&disk, 4 * MIB)?;
    log!("the next client attached and read from the device");
    let (ok, _, err) = client("second", &["detach", &vhci_port_in_use()?])?;
    ensure!(ok, "detach failed: {err}");
    drop(next);
    ensure!(server.alive(), "the server died");
    Ok(())
}

fn server_log_count(needle: &str) -> usize {
    std::fs::read_to_string("/tmp/server.log")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Reads `disk` with `dd` and pulls its device out from under it with `unplug`: the disk must
/// go within 1 s (at this guest's pace), `dd` must fail, and no user process may be left in D
/// state. Returns how long the disk took to go.
pub fn unplug_during_dd(disk: &Path, unplug: impl FnOnce() -> Result<()>) -> Result<f64> {
    let disk_name = disk
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("sda")
        .to_owned();
    let mut dd = Command::new("/bin/busybox")
        .args([
            "dd",
            &format!("if={}", disk.display()),
            "of=/dev/null",
            "bs=1M",
            "iflag=direct",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(800));
    let t_unplug = Instant::now();
    unplug()?;
    sys::wait_for("the remote disk to go away", Duration::from_secs(5), || {
        (!Path::new("/sys/block").join(&disk_name).exists()).then_some(())
    })?;
    let gone = t_unplug.elapsed().as_secs_f64();
    let status = sys::wait_for("dd to end", Duration::from_secs(10), || {
        dd.try_wait().ok().flatten()
    })?;
    ensure!(
        !status.success(),
        "dd succeeded although its device was unplugged"
    );
    sys::wait_no_user_process_in_d_state()?;
    log!(
        "unplug during dd: remote disk gone after {gone:.2}s, dd failed with an I/O error, no user process in D state"
    );
    let limit = sys::pace();
    ensure!(
        gone <= limit,
        "the remote disk took {gone:.2}s to go (more than 1 s at this guest's pace, {limit:.2} s)"
    );
    Ok(gone)
}
