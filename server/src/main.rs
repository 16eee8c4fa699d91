//! `p2p-usb-server`: share this machine's USB devices with allowed peers over iroh.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use iroh::EndpointId;
use protocol::wire::ALPN;
use server::device::DeviceSource;
use server::device::usb::{DeviceFilter, UsbSource};
use server::session::{Allowlist, Server, ServerConfig};
use transport::{NetConfig, Ticket, bind_endpoint, load_or_create_secret_key};

/// Share USB devices plugged into this machine with allowed peers, peer to peer over iroh.
///
/// The server prints a ticket; a client attaches with `p2p-usb-client attach <ticket> ...`.
/// Only clients whose endpoint ids are allowed with `--allow` can connect, and they see
/// nothing before that check.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Share devices (the default).
    Run,
    /// List the USB devices on this machine that `--share` would match.
    List,
    /// Print this server's endpoint id (creating its key if needed).
    Id,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Secret key file (created with mode 0600 on first run): the server's identity.
    #[arg(long, env = "P2P_USB_SERVER_KEY", default_value_os_t = default_key_path())]
    key_file: PathBuf,
    /// Local address to listen on (repeatable). Default: every interface, a random port.
    #[arg(long = "bind", value_name = "ADDR")]
    bind: Vec<SocketAddr>,
    /// A client endpoint id allowed to connect (repeatable).
    #[arg(long = "allow", value_name = "ENDPOINT_ID")]
    allow: Vec<EndpointId>,
    /// Let any client that knows the ticket connect. For demos on a network you trust.
    #[arg(long)]
    allow_any: bool,
    /// A device to share: `vid:pid` in hex, a bus id like `1-1.2`, or `all` for every
    /// non-hub device (repeatable).
    #[arg(long = "share", value_name = "SPEC")]
    share: Vec<String>,
    /// Share a simulated USB disk backed by FILE (created with --simulate-size if missing),
    /// instead of real devices: for machines with no USB hardware.
    #[arg(long, value_name = "FILE")]
    simulate: Vec<PathBuf>,
    /// Size of a simulated disk that does not exist yet, in MiB.
    #[arg(long, default_value_t = 64)]
    simulate_size: u64,
    /// URBs in flight per endpoint.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    queue_depth: u16,
    /// Use n0's public relays so clients behind NAT can reach us.
    #[arg(long)]
    relay: bool,
    /// Ask the router for a port mapping (UPnP, PCP, NAT-PMP).
    #[arg(long)]
    port_mapping: bool,
    /// Release a silent client's devices after this many milliseconds.
    #[arg(long, default_value_t = 1500)]
    idle_timeout_ms: u64,
    /// Also write the ticket to this file (for scripts).
    #[arg(long)]
    ticket_file: Option<PathBuf>,
}

fn default_key_path() -> PathBuf {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    state.join("p2p-usb/server.key")
}

// Multi-threaded: a Pi serving several devices and clients spreads their crypto over its cores.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,iroh=warn,noq=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for people: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Id => {
            let key = load_or_create_secret_key(&cli.run.key_file).await?;
            println!("{}", key.public());
            Ok(())
        }
        Command::List => list(&cli.run).await,
        Command::Run => run(cli.run).await,
    }
}

async fn source(args: &RunArgs) -> anyhow::Result<Arc<dyn DeviceSource>> {
    if !args.simulate.is_empty() {
        let source = server::device::sim::SimSource::with_files(
            &args.simulate,
            args.simulate_size * 1024 * 1024,
        )
        .context("could not set up the simulated disks")?;
        return Ok(source);
    }
    let filter = DeviceFilter {
        all: args.share.iter().any(|s| s == "all"),
        rules: args.share.iter().filter(|s| *s != "all").cloned().collect(),
    };
    let source = UsbSource::start(filter)
        .await
        .context("could not read this machine's USB devices (is usbfs mounted? are you allowed to open /dev/bus/usb?)")?;
    Ok(source)
}

async fn list(args: &RunArgs) -> anyhow::Result<()> {
    let source = source(args).await?;
    let devices = source.devices();
    if devices.is_empty() {
        println!("no devices match (use --share vid:pid, --share <bus id> or --share all)");
    }
    for d in devices {
        println!(
            "{:<8} {:04x}:{:04x} {:?} {} {}",
            d.bus_id,
            d.vendor_id,
            d.product_id,
            d.speed,
            d.manufacturer.as_deref().unwrap_or("-"),
            d.product.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.allow.is_empty() && !args.allow_any {
        bail!(
            "no client may connect: add `--allow <client endpoint id>` (the client prints its id with `p2p-usb-client id`), or `--allow-any` for a demo"
        );
    }
    if args.share.is_empty() && args.simulate.is_empty() {
        bail!(
            "nothing to share: add `--share vid:pid`, `--share <bus id>`, `--share all`, or `--simulate disk.img`"
        );
    }
    let key = load_or_create_secret_key(&args.key_file).await?;
    let net = NetConfig {
        bind: args.bind.clone(),
        relays: args.relay,
        port_mapping: args.port_mapping,
        idle_timeout: Duration::from_millis(args.idle_timeout_ms),
    };
    let endpoint = bind_endpoint(key, vec![ALPN.to_vec()], &net).await?;
    let allow = if args.allow_any {
        tracing::warn!(
            "--allow-any: every peer that knows this server's ticket may attach its devices"
        );
        Allowlist::Anyone
    } else {
        Allowlist::Only(args.allow.iter().copied().collect::<HashSet<_>>())
    };
    let source = source(&args).await?;
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
    };
    println!("{ticket}");
    if let Some(path) = &args.ticket_file {
        std::fs::write(path, format!("{ticket}\n"))
            .with_context(|| format!("writing the ticket to {}", path.display()))?;
    }
    tracing::info!(id = %endpoint.id(), devices = source.devices().len(), "serving");
    let config = ServerConfig {
        allow,
        queue_depth: args.queue_depth.into(),
        ..ServerConfig::default()
    };
    let server = Server::new(source, config);
    tokio::select! {
        () = server.run(endpoint.clone()) => {}
        _ = shutdown_signal() => tracing::info!("shutting down"),
    }
    endpoint.close().await;
    Ok(())
}

async fn shutdown_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}
