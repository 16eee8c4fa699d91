//! Our userspace path alone, inside the VM: `p2p-usb-server --simulate` (no USB stack) read by
//! `p2p-usb-client probe` over iroh on loopback. Set beside `export` (the same probe against
//! the real gadget) it splits the cost of the tunnel from the cost of usbfs and the device.

use std::path::Path;

use anyhow::{Context, Result, ensure};

use super::project::{client, client_id, show_server_log, start_server};
use crate::bench::{self, MIB};
use crate::report::{log, metric};

/// Probe a 64 MiB simulated disk; report MiB/s.
pub fn run() -> Result<()> {
    let disk = Path::new("/tmp/sim.img");
    bench::pattern_file(disk, 64 * MIB, 0x51)?;
    let expected = bench::md5(disk, None)?;
    let friend = client_id("friend")?;
    let (_server, ticket) = start_server(&["--simulate", "/tmp/sim.img", "--allow", &friend])?;
    let (ok, out, err) = client("friend", &["--json", "ping", &ticket, "--count", "50"])?;
    ensure!(ok, "ping failed: {err}");
    let ping: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("ping printed {out}"))?;
    let p50 = ping["p50_ms"].as_f64().unwrap_or(f64::NAN);
    log!(
        "control-stream round trip: p50 {p50:.3} ms, p90 {:.3} ms",
        ping["p90_ms"]
    );
    metric("ping_p50_ms", p50);
    let (ok, out, err) = client(
        "friend",
        &[
            "--json",
            "probe",
            &ticket,
            "--read-mib",
            "64",
            "--out",
            "/tmp/sim-read.bin",
        ],
    )?;
    if !ok {
        show_server_log();
    }
    ensure!(ok, "probe of the simulated disk failed: {err}");
    let report: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("probe printed {out}"))?;
    let got = bench::md5(Path::new("/tmp/sim-read.bin"), None)?;
    ensure!(
        got == expected,
        "simulated disk read differs: {got} != {expected}"
    );
    let mib_s = report["read_mib_s"].as_f64().unwrap_or(0.0);
    log!("simulated disk through the tunnel: 64 MiB byte-exact at {mib_s:.1} MiB/s");
    metric("tunnel_read_mib_s", mib_s);
    Ok(())
}
