//! `run`: the daemon. Binds the endpoint, prints the ticket, serves until Ctrl-C/SIGTERM,
//! reloads on SIGHUP, publishes its status every second, and talks to systemd.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use protocol::wire::ALPN;
use server::connection::{Allowlist, Policy, Server, ServerConfig};
use server::device::usb::DeviceFilter;
use server::status::Status;
use transport::daemon;
use transport::{NetConfig, Relays, Ticket, bind_endpoint, load_or_create_secret_key};

use super::{Settings, Source, key_path, settings, source};
use crate::Cli;

/// Serves until stopped.
pub async fn run(cli: &Cli) -> anyhow::Result<()> {
    let _stalls = daemon::watch_runtime_stalls();
    let Settings {
        config,
        share,
        allow,
    } = settings(cli)?;
    if matches!(&allow, Allowlist::Only(ids) if ids.is_empty()) {
        bail!(
            "no client may connect: run `p2p-usb-server allow <client endpoint id>` (the client prints its id with `p2p-usb-client id`), pass `--allow <id>`, or `--allow-any` for a demo"
        );
    }
    if share.share.is_empty() && cli.run.simulate.is_empty() {
        bail!(
            "nothing to share: run `p2p-usb-server share <vid:pid | port | all>`, pass `--share ...`, or `--simulate disk.img` (config: {})",
            cli.config.display()
        );
    }
    let args = &cli.run;
    let key = load_or_create_secret_key(&key_path(cli)?).await?;
    let net = NetConfig {
        bind: if args.bind.is_empty() {
            config.bind.clone()
        } else {
            args.bind.clone()
        },
        relays: args
            .relay
            .relays(&config.relay, config.relay_ca.as_deref())?,
        cipher: transport::cipher::chosen(config.cipher),
        port_mapping: args.port_mapping || config.port_mapping,
        idle_timeout: Duration::from_millis(
            args.idle_timeout_ms
                .or(config.idle_timeout_ms)
                .unwrap_or(1500),
        ),
    };
    let endpoint = bind_endpoint(key, vec![ALPN.to_vec()], &net).await?;
    if matches!(allow, Allowlist::Anyone) {
        tracing::warn!(
            "allow-any: every peer that knows this server's ticket may attach its devices"
        );
    }
    let source = source(cli, share).await?;
    // A socket bound to every interface is not an address a client can dial; iroh's own view of
    // its direct addresses is then the better hint.
    let mut addrs: Vec<SocketAddr> = endpoint
        .bound_sockets()
        .into_iter()
        .filter(|a| !a.ip().is_unspecified())
        .collect();
    if addrs.is_empty() {
        addrs = endpoint.addr().ip_addrs().copied().collect();
    }
    let ticket = Ticket {
        id: endpoint.id(),
        addrs,
        relay: home_relay(&endpoint, &net.relays).await,
    };
    println!("{ticket}");
    std::io::stdout().flush()?;
    if let Some(path) = &args.ticket_file {
        std::fs::write(path, format!("{ticket}\n"))
            .with_context(|| format!("writing the ticket to {}", path.display()))?;
    }
    let devices = source.shared().devices().len();
    tracing::info!(id = %endpoint.id(), devices, config = %cli.config.display(), "serving");
    let server_config = ServerConfig {
        allow: allow.clone(),
        queue_depth: args
            .queue_depth
            .or(config.queue_depth.map(|q| q.0))
            .unwrap_or(32)
            .into(),
        pins: config.share.clone(),
        silent_after: net.dead_peer_bound(),
        ..ServerConfig::default()
    };
    let server = Server::new(source.shared(), server_config);
    let publisher = tokio::spawn(publish_status(
        server.clone(),
        cli.status_file.clone(),
        cli.config.clone(),
        ticket.to_string(),
    ));
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("serving {devices} device(s)")),
    ]);
    if let Some(every) = sd_notify::watchdog_enabled() {
        // Pinged from the runtime, so a wedged runtime gets the service restarted.
        tokio::spawn(async move {
            loop {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                tokio::time::sleep(every / 2).await;
            }
        });
    }
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let serving = server.clone().run(endpoint.clone());
    tokio::pin!(serving);
    let shutdown = daemon::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut serving => break,
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                break;
            }
            _ = hangup.recv() => reload(cli, &server, &source),
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    publisher.abort();
    let _ = std::fs::remove_file(&cli.status_file);
    endpoint.close().await;
    Ok(())
}

/// How long the ticket waits for the home relay of n0's public relays to be known.
const PUBLIC_RELAY_WAIT: Duration = Duration::from_secs(5);

/// The relay the ticket names: our own (known from the settings), or the public one the
/// endpoint chose as its home, if it found one in time; none without relays.
async fn home_relay(endpoint: &iroh::Endpoint, relays: &Relays) -> Option<iroh::RelayUrl> {
    if let Some(own) = relays.own.first() {
        return Some(own.clone());
    }
    if !relays.public {
        return None;
    }
    if tokio::time::timeout(PUBLIC_RELAY_WAIT, endpoint.online())
        .await
        .is_err()
    {
        tracing::warn!(
            "no public relay reached within {PUBLIC_RELAY_WAIT:?}; the ticket names none"
        );
    }
    endpoint.addr().relay_urls().next().cloned()
}

/// SIGHUP: re-read the config. A broken file is logged and the old settings stay.
fn reload(cli: &Cli, server: &Server, source: &Source) {
    let mut states = vec![sd_notify::NotifyState::Reloading];
    states.extend(sd_notify::NotifyState::monotonic_usec_now());
    let _ = sd_notify::notify(&states);
    match settings(cli) {
        Ok(s) => {
            if let Source::Usb(usb) = source {
                usb.set_filter(DeviceFilter(s.share));
            }
            server.set_policy(Policy {
                allow: s.allow,
                pins: s.config.share,
            });
            tracing::info!(config = %cli.config.display(), "reloaded");
        }
        Err(e) => tracing::error!("reload failed, keeping the old settings: {e:#}"),
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
}

/// Rewrites the status file every second for `status`, `ticket` and `tui`.
async fn publish_status(server: Arc<Server>, path: PathBuf, config: PathBuf, ticket: String) {
    let mut warned = false;
    loop {
        let snapshot = server.snapshot();
        let (allow_any, allowed) = match &server.policy().allow {
            Allowlist::Anyone => (true, 0),
            Allowlist::Only(ids) => (false, ids.len()),
        };
        let status = Status {
            pid: std::process::id(),
            id: ticket
                .trim_start_matches("p2pusb1:")
                .split('@')
                .next()
                .unwrap_or_default()
                .to_owned(),
            ticket: ticket.clone(),
            config: Some(config.clone()),
            allow_any,
            allowed,
            updated_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            snapshot,
        };
        let path2 = path.clone();
        match tokio::task::spawn_blocking(move || status.write(&path2)).await {
            Ok(Err(e)) if !warned => {
                tracing::warn!("no status file (status/tui will not see this server): {e}");
                warned = true;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
