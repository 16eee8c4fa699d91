//! The server exports a real USB device: the mass-storage gadget on dummy_hcd, shared by
//! `p2p-usb-server` and read over iroh on guest loopback by `p2p-usb-client probe`, which
//! speaks Bulk-Only Transport and SCSI through our URB streams (no vhci yet).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::project::{
    SharedDisk, client, client_id, show_client_log, show_server_log, spawn_client,
};

use crate::bench::{self, MIB};

const SIZE: usize = 64 * MIB;
use crate::report::{log, metric};
use crate::sys;
use crate::usbdev::{self, Via};

/// Export the gadget, refuse a stranger, read it byte-exact, give it back, unplug mid-read.
pub fn run() -> Result<()> {
    let SharedDisk {
        mut gadget,
        backing,
        vid_pid,
        ticket,
        mut server,
    } = SharedDisk::start("export", SIZE, 0xe4)?;
    let expected = bench::md5(&backing, None)?;
    log!("server up, ticket {ticket}");

    // A peer not on the allowlist learns nothing.
    client_id("stranger")?;
    let (ok, out, err) = client("stranger", &["list", &ticket])?;
    ensure!(!ok, "a stranger listed devices: {out}");
    ensure!(
        err.contains("allowlist"),
        "a stranger was refused without saying why: {err}"
    );
    log!("stranger refused before any device data");

    let (ok, out, err) = client("friend", &["--json", "list", &ticket])?;
    ensure!(ok, "list failed: {err}");
    ensure!(out.contains(&vid_pid), "the gadget is not listed: {out}");

    let t0 = Instant::now();
    let (ok, out, err) = client(
        "friend",
        &[
            "--json",
            "probe",
            &ticket,
            "--read-mib",
            "64",
            "--out",
            "/tmp/probe.bin",
        ],
    )?;
    if !ok {
        show_server_log();
        bail!("probe failed: {err}");
    }
    let report: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("probe printed {out}"))?;
    let got = bench::md5(Path::new("/tmp/probe.bin"), None)?;
    ensure!(
        got == expected,
        "data read through the server differs from the backing file ({got} != {expected})"
    );
    let mib_s = report["read_mib_s"].as_f64().unwrap_or(0.0);
    log!(
        "probe: {} {} read 64 MiB byte-exact at {mib_s:.1} MiB/s ({:.1}s in all)",
        report["vendor"],
        report["product"],
        t0.elapsed().as_secs_f64()
    );
    metric("probe_read_mib_s", mib_s);
    bench::remove(Path::new("/tmp/probe.bin"));

    // Detach gave the device back to its kernel driver.
    usbdev::wait_block_device(gadget.vid, gadget.pid, Via::Dummy, Duration::from_secs(15))
        .context("after detach the gadget did not come back as a local disk")?;
    log!("after detach the gadget is a local disk again");

    // Unplug in the middle of a long read: the URBs end with a disconnect, the client hears
    // of the removal, and the server keeps serving.
    // The unplug waits for the probe's first progress line: a fixed delay lands before the
    // claim on a slow host, and that tests a refusal instead.
    let mut reader = spawn_client("friend", &["probe", &ticket, "--read-mib", "64"])?;
    let log_path = "/tmp/client-friend.log";
    let progress = sys::wait_for(
        "the probe's first progress line",
        Duration::from_secs(60),
        || {
            let text = std::fs::read_to_string(log_path).ok()?;
            text.contains("probe: read").then_some(())
        },
    );
    if let Err(e) = progress {
        show_client_log("friend");
        return Err(e);
    }
    let t_unplug = Instant::now();
    gadget.unplug()?;
    let exited = reader.wait_exit(Duration::from_secs(30));
    let err = std::fs::read_to_string(log_path).unwrap_or_default();
    let failed_after = t_unplug.elapsed().as_secs_f64();
    ensure!(
        exited == Some(false),
        "the read did not fail after the device was unplugged mid-transfer (exit: {exited:?})"
    );
    // URBs on the device end with the status its host controller gave them; URBs sent after
    // the server ended the attachment end with their stream, which is the protocol's word
    // for the same thing.
    let disconnect = ["NoDevice", "Shutdown", "Protocol", "ended the URB stream"]
        .iter()
        .find(|s| err.contains(*s));
    if disconnect.is_none() {
        show_client_log("friend");
        bail!("the URBs did not end with a disconnect status (client log above)");
    }
    ensure!(
        err.contains("DeviceRemoved"),
        "the client was not told of the removal: {err}"
    );
    log!(
        "unplug mid-read: the client saw the disconnect ({}) and removal {failed_after:.2}s later",
        disconnect.unwrap_or(&"?")
    );
    metric("unplug_to_error_secs", failed_after);
    ensure!(
        server.alive(),
        "the server died when its device was unplugged"
    );
    let (ok, out, err) = client("friend", &["--json", "list", &ticket])?;
    ensure!(ok, "the server stopped answering after the unplug: {err}");
    ensure!(
        !out.contains(&vid_pid),
        "the unplugged gadget is still listed: {out}"
    );
    log!("server still serving after the unplug");
    Ok(())
}
