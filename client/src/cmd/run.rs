//! `run`: the daemon. Keeps the devices the config's `[[auto_attach]]` rules name attached,
//! reconnecting with back-off; what the systemd service runs.

use std::sync::Arc;

use anyhow::bail;
use client::supervisor::{Backoff, Rule};
use client::vhci::{RealSys, Vhci};
use transport::ServerConnection;
use transport::daemon;

use super::{client_endpoint, config, silent_after, tuning};
use crate::Cli;

/// `run`: one supervisor per server that an auto-attach rule names, until Ctrl-C/SIGTERM.
pub async fn run(cli: &Cli) -> anyhow::Result<()> {
    let _stalls = daemon::watch_runtime_stalls();
    let config = config(cli)?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    if config.auto_attach.is_empty() {
        bail!(
            "{} has no [[auto_attach]] rules: nothing to keep attached (see client/examples/client.toml)",
            cli.config.display()
        );
    }
    let vhci = Arc::new(Vhci::new(RealSys::default()));
    vhci.nports()?;
    let endpoint = client_endpoint(cli, config.servers.values().map(|s| &s.ticket)).await?;
    let silent_after = silent_after(cli, &config);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut supervisors = tokio::task::JoinSet::new();
    for (name, server) in &config.servers {
        let rules: Vec<Rule> = config
            .auto_attach
            .iter()
            .filter(|r| &r.server == name)
            .map(|r| Rule {
                device: r.device.matcher.clone(),
                pin: r.pin.clone(),
                tuning: tuning(cli, Some(r)),
            })
            .collect();
        if rules.is_empty() {
            continue;
        }
        let (endpoint, addr) = (endpoint.clone(), server.ticket.endpoint_addr());
        let connect = move || {
            let (endpoint, addr) = (endpoint.clone(), addr.clone());
            async move {
                let agent = format!("p2p-usb-client/{}", env!("CARGO_PKG_VERSION"));
                ServerConnection::connect(
                    &endpoint,
                    addr,
                    client::attach::CAPABILITIES,
                    &agent,
                    silent_after,
                )
                .await
            }
        };
        let backoff = Backoff::new(config.reconnect.initial(), config.reconnect.max());
        supervisors.spawn(client::supervisor::supervise(
            name.clone(),
            connect,
            rules,
            vhci.clone(),
            backoff,
            stop_rx.clone(),
        ));
    }
    tracing::info!(servers = supervisors.len(), "keeping devices attached");
    let _ = daemon::shutdown_signal().await;
    let _ = stop_tx.send(true);
    while supervisors.join_next().await.is_some() {}
    endpoint.close().await;
    Ok(())
}
