//! The subcommands of `p2p-usb-client`, one module each, and what several of them share:
//! the config and key the global flags name, connecting to a server, choosing a device.
//! `main.rs` keeps only the command line and the dispatch, so a subcommand reads top to
//! bottom in its own file.

pub mod attach;
pub mod bridge;
pub mod list;
pub mod pair;
pub mod ping;
pub mod ports;
pub mod probe;
pub mod run;
pub mod tui;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use client::config::Config;
use protocol::select::{DeviceFacts, DeviceMatch};
use protocol::wire::{DeviceInfo, Event};
use transport::daemon::{self, Role};
use transport::{NetConfig, ServerConnection, Ticket, bind_endpoint, load_or_create_secret_key};

use crate::Cli;

/// The config file `--config` names.
pub fn config(cli: &Cli) -> anyhow::Result<Config> {
    Ok(Config::load_or_default(&cli.config)?)
}

/// This client's key file: `--key-file`, else the config's `key_file`, else the default.
pub fn key_path(cli: &Cli) -> anyhow::Result<PathBuf> {
    Ok(match &cli.key_file {
        Some(k) => k.clone(),
        None => config(cli)?
            .key_file
            .unwrap_or_else(|| daemon::default_key_path(Role::Client)),
    })
}

/// The `q` quantile of sorted durations, in microseconds.
pub fn percentile_us(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// Fans the connection's server events out to every attachment.
pub fn forward_events(conn: &ServerConnection) -> tokio::sync::broadcast::Sender<Event> {
    let (events_tx, _) = tokio::sync::broadcast::channel(64);
    if let Some(mut events) = conn.take_events() {
        let events_tx = events_tx.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let _ = events_tx.send(event);
            }
        });
    }
    events_tx
}

/// Connects to `server` (a ticket or a paired name) as this client.
pub async fn connect(cli: &Cli, server: &str) -> anyhow::Result<Arc<ServerConnection>> {
    let config = config(cli)?;
    let ticket = &config.resolve(server).map_err(anyhow::Error::msg)?;
    let endpoint = client_endpoint(cli, [ticket]).await?;
    let agent = format!("p2p-usb-client/{}", env!("CARGO_PKG_VERSION"));
    ServerConnection::connect(
        &endpoint,
        ticket.endpoint_addr(),
        client::attach::CAPABILITIES,
        &agent,
        silent_after(cli, &config),
    )
    .await
    .with_context(|| format!("connecting to {}", ticket.id))
}

/// This client's iroh endpoint, with the relay and idle timeout the flags and config ask for,
/// and the relays of the servers it will dial (from their tickets).
pub async fn client_endpoint<'a>(
    cli: &Cli,
    tickets: impl IntoIterator<Item = &'a Ticket>,
) -> anyhow::Result<iroh::Endpoint> {
    let key = load_or_create_secret_key(&key_path(cli)?).await?;
    let config = config(cli)?;
    let relays = cli
        .relay
        .relays(&config.relay, config.relay_ca.as_deref())?;
    let relays = tickets
        .into_iter()
        .fold(relays, |r, t| r.with(t.relay.as_ref()));
    let net = NetConfig {
        bind: vec![],
        relays,
        cipher: transport::cipher::chosen(config.cipher),
        port_mapping: false,
        idle_timeout: idle_timeout(cli, &config),
    };
    Ok(bind_endpoint(key, vec![], &net).await?)
}

/// The idle timeout the flags and config ask for.
fn idle_timeout(cli: &Cli, config: &Config) -> Duration {
    Duration::from_millis(
        cli.idle_timeout_ms
            .or(config.idle_timeout_ms)
            .unwrap_or(1500),
    )
}

/// How long a server may go unheard before its connection is given up
/// ([`transport::liveness`]): the dead-peer bound of [`client_endpoint`]'s idle timeout.
pub fn silent_after(cli: &Cli, config: &Config) -> Duration {
    transport::endpoint::dead_peer_bound(idle_timeout(cli, config))
}

/// How a device is attached: the latency hiding on by default, less where the flags or the
/// device's `[[auto_attach]]` rule say. Flags win over the rule.
pub fn tuning(cli: &Cli, rule: Option<&client::config::AutoAttach>) -> client::attach::Tuning {
    client::attach::Tuning {
        read_ahead: !cli.no_read_ahead && rule.is_none_or(|r| r.read_ahead),
        scsi_max_sectors: Some(
            cli.scsi_max_sectors
                .or(rule.and_then(|r| r.scsi_max_sectors))
                .unwrap_or(client::vhci::disk::MAX_SECTORS_CEILING),
        ),
        interrupt_streaming: !cli.no_interrupt_streaming
            && rule.is_none_or(|r| r.interrupt_streaming),
    }
}

/// The device `spec` names (the grammar of `protocol::select`); the first device if none.
pub fn choose<'a>(devices: &'a [DeviceInfo], spec: Option<&str>) -> anyhow::Result<&'a DeviceInfo> {
    let Some(spec) = spec else {
        return devices
            .first()
            .context("the server shares no devices with us");
    };
    let parsed = DeviceMatch::parse(spec)?;
    if let Some(note) = &parsed.deprecated {
        eprintln!("warning: {note}");
    }
    let matching: Vec<&DeviceInfo> = devices
        .iter()
        .filter(|d| parsed.matcher.matches(&DeviceFacts::from_wire(d)))
        .collect();
    match matching[..] {
        [one] => Ok(one),
        [] => bail!("no shared device matches `{spec}` (see `p2p-usb-client list <ticket>`)"),
        _ => bail!(
            "`{spec}` matches {} devices; name one by its port (e.g. {})",
            matching.len(),
            matching[0].bus_id
        ),
    }
}

/// A device as `--json` prints it.
pub fn device_json(d: &DeviceInfo) -> serde_json::Value {
    serde_json::json!({
        "id": d.id.0, "bus_id": d.bus_id,
        "vid_pid": d.vid_pid().to_string(),
        "speed": format!("{:?}", d.speed), "manufacturer": d.manufacturer,
        "product": d.product, "serial": d.serial,
    })
}
