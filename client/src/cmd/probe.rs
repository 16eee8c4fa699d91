//! `probe`: a remote mass-storage device checked end to end without the kernel (descriptors,
//! INQUIRY, READ CAPACITY, a timed read), for diagnostics and the lab.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use client::probe::Probe;
use transport::daemon;

use super::{choose, connect, percentile_us};
use crate::Cli;

/// Bytes between `probe`'s progress lines.
const PROGRESS_STEP: u64 = 4 * 1024 * 1024;

/// Probes the device `device` names (the first shared one if `None`) on `ticket`'s server:
/// reads `read_mib` MiB (saved to `out` if given) and times `round_trips` control round trips.
pub async fn run(
    cli: &Cli,
    ticket: &str,
    device: Option<&str>,
    read_mib: u64,
    out: Option<&Path>,
    round_trips: u32,
) -> anyhow::Result<()> {
    let conn = connect(cli, ticket).await?;
    let devices = conn.list_devices().await?;
    let chosen = choose(&devices, device)?;
    let mut events = conn.take_events().context("events already taken")?;
    let (handle, info) = conn.attach(chosen.id, None).await?;
    let mut probe = Probe::open(&conn, handle, info).await?;
    let mut trips = probe.control_round_trips(round_trips).await?;
    trips.sort();
    let mut file = match out {
        Some(path) => Some(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        ),
        None => None,
    };
    // A progress line per 4 MiB on stderr (stdout stays the report): long reads on a
    // slow link show they are moving, and the lab waits for the first one before it
    // unplugs the device mid-read.
    let mut read = 0u64;
    let report = probe
        .run(read_mib * 1024 * 1024, |chunk| {
            let before = read / PROGRESS_STEP;
            read += chunk.len() as u64;
            if read / PROGRESS_STEP > before {
                eprintln!("probe: read {} of {read_mib} MiB", read / (1024 * 1024));
            }
            match &mut file {
                Some(f) => f.write_all(chunk),
                None => Ok(()),
            }
        })
        .await;
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            // Say what the server told us meanwhile: a removal explains most failures.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
                eprintln!("server event: {event:?}");
            }
            conn.close().await;
            return Err(e).context("probe failed");
        }
    };
    let _ = conn.detach(handle).await;
    conn.close().await;
    let mib_s = report.read_bytes as f64 / (1024.0 * 1024.0) / report.read_secs.max(1e-9);
    if cli.json {
        println!(
            "{}",
            serde_json::json!({
                "vendor": report.vendor, "product": report.product,
                "blocks": report.blocks, "block_size": report.block_size,
                "read_bytes": report.read_bytes, "read_secs": report.read_secs,
                "read_mib_s": mib_s,
                "round_trips": trips.len(),
                "round_trip_p50_us": percentile_us(&trips, 0.5),
                "round_trip_p99_us": percentile_us(&trips, 0.99),
                "peak_rss_mib": daemon::peak_rss_mib(),
                "cpu_secs": daemon::cpu_secs(),
            })
        );
    } else {
        println!(
            "{} {}: {} blocks of {} bytes; read {} MiB in {:.2} s ({mib_s:.1} MiB/s)",
            report.vendor,
            report.product,
            report.blocks,
            report.block_size,
            report.read_bytes / (1024 * 1024),
            report.read_secs
        );
    }
    Ok(())
}
