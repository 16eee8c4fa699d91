//! `attach`: remote devices on this machine's vhci ports until Ctrl-C, a detach, or the
//! server removes them; with `--telemetry`, every URB's timing recorded on the way.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, bail};
use client::vhci::{RealSys, Vhci};
use protocol::wire::DeviceInfo;
use transport::daemon;

use super::{choose, connect, device_json, forward_events};
use crate::Cli;

/// Attaches the devices `specs` name (the first shared one if none) from `ticket`'s server
/// and waits for them to end.
pub async fn run(
    cli: &Cli,
    ticket: &str,
    specs: &[String],
    pin: Option<String>,
    telemetry: &client::telemetry::TelemetryArgs,
) -> anyhow::Result<()> {
    let _stalls = daemon::watch_runtime_stalls();
    let vhci = Arc::new(Vhci::new(RealSys::default()));
    // Fail before touching the network if this machine cannot attach anything.
    vhci.nports()?;
    // Before the attach, so the probes see the device's first URB.
    let recording = telemetry.start()?;
    let conn = connect(cli, ticket).await?;
    let listed = conn.list_devices().await?;
    let chosen: Vec<DeviceInfo> = if specs.is_empty() {
        vec![choose(&listed, None)?.clone()]
    } else {
        specs
            .iter()
            .map(|s| choose(&listed, Some(s)).cloned())
            .collect::<anyhow::Result<_>>()?
    };
    let events_tx = forward_events(&conn);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut attached = Vec::new();
    for device in chosen {
        let (handle, info) = conn
            .attach(device.id, pin.clone())
            .await
            .with_context(|| format!("attaching {} on the server", device.bus_id))?;
        let a = client::attach::attach(
            conn.clone(),
            handle,
            info,
            vhci.clone(),
            events_tx.subscribe(),
            stop_rx.clone(),
            recording.as_ref(),
            super::tuning(cli, None),
        )
        .await;
        let a = match a {
            Ok(a) => a,
            Err(e) => {
                let _ = conn.detach(handle).await;
                let _ = stop_tx.send(true);
                return Err(e).context("attaching to the local kernel");
            }
        };
        let d = &a.device;
        if cli.json {
            println!(
                "{}",
                serde_json::json!({"event": "attached", "port": a.port, "device": device_json(d)})
            );
        } else {
            println!(
                "attached {} ({} {}) on vhci port {}",
                d.bus_id,
                d.vid_pid(),
                d.product.as_deref().unwrap_or("-"),
                a.port
            );
        }
        std::io::stdout().flush()?;
        attached.push(a);
    }
    let stop = tokio::spawn(async move {
        let _ = daemon::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let mut failed = false;
    for a in attached {
        let end = a.task.await.context("attachment task failed")?;
        failed |= matches!(
            end,
            client::attach::AttachEnd::Violation(_) | client::attach::AttachEnd::ConnectionLost(_)
        );
        if cli.json {
            println!(
                "{}",
                serde_json::json!({"event": "detached", "port": a.port, "why": format!("{end:?}")})
            );
        } else {
            println!("detached vhci port {}: {end:?}", a.port);
        }
    }
    stop.abort();
    conn.close().await;
    if let Some(recording) = recording {
        recording.finish()?;
    }
    if failed {
        bail!("an attachment ended abnormally");
    }
    Ok(())
}
