//! URB telemetry end to end: the client's eBPF probes on vhci's path of every URB, joined with
//! the client's and the server's own timestamps, and `latency-report` over the recording.
//!
//! Checks that the probes load and attach in this kernel, that they saw as many URBs as the
//! client forwarded (give or take those in flight at the stop), that the report prints the
//! split and writes its SVG, that a tight budget fails it (exit 2) and a loose one passes; then
//! with netem 5 ms each way on `lo`, that the network part is ~10 ms while our own overhead
//! stays separate. The probes' cost is measured as read throughput with and without them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use super::project::{
    Daemon, client, client_id, show_client_log, show_server_log, spawn_client, start_server,
    vhci_port_in_use,
};
use crate::bench::{self, MIB};
use crate::gadget::Gadget;
use crate::report::{log, metric};
use crate::usbdev::{self, Via};
use crate::{modules, netem};

const REPORT: &str = "/usr/bin/latency-report";
const SIZE: usize = 32 * MIB;
const READ: usize = 16 * MIB;
const NETEM_READ: usize = 4 * MIB;

pub fn run() -> Result<()> {
    modules::load(modules::STORAGE)?;
    modules::load(modules::USBIP)?;
    let backing = Path::new("/tmp/telemetry.img");
    bench::pattern_file(backing, SIZE, 0x5e)?;
    let gadget = Gadget::local_disk(backing)?;
    let vid_pid = gadget.vid_pid();
    let friend = client_id("friend")?;
    let (mut server, ticket) = start_server(&["--share", &vid_pid, "--allow", &friend])?;
    let g = (gadget.vid, gadget.pid);

    // Probe cost: the same reads without and with the probes (alternating, median of 3).
    let plain = session(&ticket, &vid_pid, g, None, |disk| reads(disk, READ))?;
    let rec = Path::new("/tmp/t.rec");
    let probed = session(&ticket, &vid_pid, g, Some(rec), |disk| reads(disk, READ))?;
    let cost = 100.0 * (plain - probed) / plain;
    log!(
        "read without telemetry {plain:.1} MiB/s, with probes {probed:.1} MiB/s ({cost:+.1}% cost)"
    );
    metric("read_mib_s_plain", plain);
    metric("read_mib_s_probes", probed);
    metric("probe_cost_percent", cost);

    let s = report_json(rec, &[])?;
    let attached = s["probes"]["attached"].as_array().map_or(0, Vec::len);
    for f in s["probes"]["failed"].as_array().into_iter().flatten() {
        log!("probe not attached: {} ({})", f["function"], f["reason"]);
    }
    ensure!(
        attached == client_ebpf_probes(),
        "only {attached} probes attached: {}",
        s["probes"]
    );
    let c = &s["counts"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    log!(
        "URBs: probes saw {} sent / {} given back; client forwarded {}, answered locally {}, in flight at stop {}",
        n("probe_sent"),
        n("probe_given_back"),
        n("client_forwarded"),
        n("answered_locally"),
        n("in_flight_at_stop")
    );
    metric("urbs_probe_sent", n("probe_sent") as f64);
    metric("urbs_client_forwarded", n("client_forwarded") as f64);
    ensure!(n("client_forwarded") > 100, "too few URBs recorded: {c}");
    ensure!(c["agree"] == true, "probe and client counts disagree: {c}");
    ensure!(
        s["lost_events"] == 0,
        "probe events were lost: {}",
        s["lost_events"]
    );
    ensure!(s["complete"] == true, "the recording has no end line");
    let all = &s["all"];
    let ms = |part: &str, q: &str| all[part][format!("{q}_ms")].as_f64().unwrap_or(f64::NAN);
    for (part, name) in [
        ("total", "total"),
        ("kernel", "kernel"),
        ("client", "client"),
        ("network", "network"),
        ("server+device", "server"),
    ] {
        metric(&format!("{name}_p50_ms"), ms(part, "p50"));
        metric(&format!("{name}_p99_ms"), ms(part, "p99"));
    }
    ensure!(
        all["kernel"]["count"] == all["total"]["count"],
        "not every completed URB has its kernel stamps: {all}"
    );

    // The human report, the SVG, and the budgets.
    let svg = Path::new("/tmp/t.svg");
    let (code, text) = report(rec, &["--svg", "/tmp/t.svg"])?;
    for line in text.lines() {
        log!("report: {line}");
    }
    ensure!(
        text.contains("client (ours)") && text.contains("kernel (vhci, usbcore)"),
        "the report has no split"
    );
    let svg_text = std::fs::read_to_string(svg).context("latency-report wrote no SVG")?;
    ensure!(
        svg_text.starts_with("<svg") && svg_text.contains("polyline"),
        "the SVG is empty"
    );
    log!("default budget (p99 <= 20 ms, client overhead p99 <= 0.2 ms): exit {code:?}");
    metric("default_budget_exit", code.map_or(-1.0, f64::from));
    let (tight, _) = report(rec, &["--budget-p99-ms", "0.001"])?;
    ensure!(
        tight == Some(2),
        "a 1 us budget should exit 2, got {tight:?}"
    );
    let (loose, _) = report(
        rec,
        &[
            "--budget-p99-ms",
            "100000",
            "--budget-overhead-ms",
            "100000",
        ],
    )?;
    ensure!(
        loose == Some(0),
        "a loose budget should exit 0, got {loose:?}"
    );

    // What a small-I/O user waits on: 4 KiB synchronous reads, split the same way. Each is
    // three URB round trips here (telemetry times every URB's own trip, so it turns read-ahead
    // off); without telemetry read-ahead makes it one round trip and two device turns.
    let rec_small = Path::new("/tmp/t-small.rec");
    let (p50, _) = session(&ticket, &vid_pid, g, Some(rec_small), |disk| {
        super::bench::small_read_latency(disk, SIZE)
    })?;
    let (_, text) = report(rec_small, &[])?;
    log!("4 KiB synchronous reads: p50 {p50:.2} ms each (telemetry turns read-ahead off)");
    for line in text.lines().filter(|l| !l.contains("BUDGET")) {
        log!("small reads: {line}");
    }
    metric("small_read_p50_ms", p50);

    // 5 ms each way: the network part is the ~10 ms round trip, our overhead stays apart.
    let rec5 = Path::new("/tmp/t5.rec");
    netem::set(Duration::from_millis(5), 0.0)?;
    let slow = session(&ticket, &vid_pid, g, Some(rec5), |disk| {
        bench::read_mib_s(disk, NETEM_READ)
    });
    netem::clear()?;
    let slow = slow?;
    let s5 = report_json(rec5, &[])?;
    let a5 = &s5["all"];
    let ms5 = |part: &str, q: &str| a5[part][format!("{q}_ms")].as_f64().unwrap_or(f64::NAN);
    let (net, ours, total) = (
        ms5("network", "p50"),
        ms5("client", "p50"),
        ms5("total", "p50"),
    );
    log!(
        "netem 5 ms each way: read {slow:.1} MiB/s; p50 network {net:.2} ms, client {ours:.3} ms, \
         kernel {:.3} ms, server+device {:.3} ms, total {total:.2} ms",
        ms5("kernel", "p50"),
        ms5("server+device", "p50")
    );
    metric("netem5_network_p50_ms", net);
    metric("netem5_client_p50_ms", ours);
    metric("netem5_total_p50_ms", total);
    ensure!(
        (9.0..=30.0).contains(&net),
        "with a 10 ms round trip the network part should be ~10 ms, got {net:.2} ms"
    );
    ensure!(
        ours < net / 2.0,
        "client overhead {ours:.3} ms is not apart from the network"
    );
    ensure!(server.alive(), "the server died");
    Ok(())
}

/// The probes the client carries (all must attach in this kernel).
fn client_ebpf_probes() -> usize {
    3
}

/// Reads `total` bytes three times; the median MiB/s.
fn reads(disk: &Path, total: usize) -> Result<f64> {
    let runs = (0..3)
        .map(|_| bench::read_mib_s(disk, total))
        .collect::<Result<Vec<_>>>()?;
    Ok(bench::median(runs))
}

/// Attaches the gadget (recording to `rec` if given), runs `work` on the disk, detaches and
/// waits for the client to exit cleanly (which finishes the recording).
fn session<T>(
    ticket: &str,
    device: &str,
    (vid, pid): (u16, u16),
    rec: Option<&Path>,
    work: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let mut args = vec!["--json", "attach", ticket, "--device", device];
    let rec_arg;
    if let Some(rec) = rec {
        rec_arg = rec.display().to_string();
        args.extend(["--telemetry", &rec_arg]);
    }
    let mut attached: Daemon = spawn_client("friend", &args)?;
    let disk = match usbdev::wait_block_device(vid, pid, Via::Vhci, Duration::from_secs(30)) {
        Ok(d) => d,
        Err(e) => {
            show_client_log("friend");
            show_server_log();
            return Err(e.context("the remote device never became a disk under vhci_hcd"));
        }
    };
    let out = work(&disk);
    let port = vhci_port_in_use()?;
    let (ok, _, err) = client("friend", &["detach", &port])?;
    ensure!(ok, "detach failed: {err}");
    let exited = attached.wait_exit(Duration::from_secs(15));
    if exited != Some(true) {
        show_client_log("friend");
        bail!("the attach process did not end cleanly after detach: {exited:?}");
    }
    usbdev::wait_block_device(vid, pid, Via::Dummy, Duration::from_secs(15))
        .context("after detach the gadget did not come back as a local disk")?;
    if out.is_err() {
        show_client_log("friend");
    }
    out
}

/// Runs latency-report on `rec` with `args`; (exit code, stdout).
fn report(rec: &Path, args: &[&str]) -> Result<(Option<i32>, String)> {
    let out = Command::new(REPORT)
        .arg(rec)
        .args(args)
        .output()
        .context("running latency-report")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(1) {
        bail!("latency-report failed: {stderr}");
    }
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// latency-report's JSON summary of `rec` (budgets loose: only the figures matter here).
fn report_json(rec: &Path, extra: &[&str]) -> Result<Value> {
    let mut args = vec![
        "--json",
        "--budget-p99-ms",
        "1e9",
        "--budget-overhead-ms",
        "1e9",
    ];
    args.extend_from_slice(extra);
    let (_, text) = report(rec, &args)?;
    serde_json::from_str(&text).with_context(|| format!("latency-report printed bad JSON: {text}"))
}
