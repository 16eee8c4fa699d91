//! `p2p-usb-client`: use USB devices plugged into another machine as if they were plugged in
//! here.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use client::config::Config;
use client::probe::Probe;
use client::supervisor::{Backoff, Rule};
use client::vhci::{RealSys, Vhci};
use protocol::select::{DeviceFacts, DeviceMatch};
use protocol::wire::{Capabilities, DeviceInfo, Event};
use transport::daemon::{self, Role};
use transport::{NetConfig, ServerConnection, Ticket, bind_endpoint, load_or_create_secret_key};

/// Bytes between `probe`'s progress lines.
const PROGRESS_STEP: u64 = 4 * 1024 * 1024;

/// Attach USB devices shared by a `p2p-usb-server` to this machine's kernel, peer to peer over
/// iroh.
///
/// First time:
///   p2p-usb-client id                        give this id to the server's operator
///                                            (they run `p2p-usb-server allow <id>`)
///   p2p-usb-client pair <ticket> --name pi   remember the server's ticket as `pi`
///   p2p-usb-client list pi                   what it shares
///   sudo p2p-usb-client attach pi --device 0781:5581
///                                            attach it; `lsusb` shows it here
///   p2p-usb-client tui                       servers, latency, devices, ports at a glance
///
/// For devices that should always be attached, add [[auto_attach]] rules to the config and
/// run `p2p-usb-client run` (the p2p-usb-client systemd service does). Settings live in
/// /etc/p2p-usb/client.toml as root, else ~/.config/p2p-usb/client.toml (`--config`).
#[derive(Parser)]
#[command(version, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// Secret key file (created with mode 0600 on first run): this client's identity
    /// [default: the config's key_file, else ~/.local/state/p2p-usb/client.key].
    #[arg(long, global = true, env = "P2P_USB_CLIENT_KEY")]
    key_file: Option<PathBuf>,
    /// The config file.
    #[arg(long, global = true, env = "P2P_USB_CLIENT_CONFIG", default_value_os_t = daemon::default_config_path(Role::Client))]
    config: PathBuf,
    /// Use n0's public relays to reach servers behind NAT.
    #[arg(long, global = true)]
    relay: bool,
    /// Give up on a silent server after this many milliseconds without a packet (its devices
    /// are detached here, and `run` reconnects) [default: the config's idle_timeout_ms, else
    /// 1500]. Longer rides out network blips; the server's own setting decides when it frees
    /// the devices of a client that vanished.
    #[arg(long, global = true, env = "P2P_USB_IDLE_TIMEOUT_MS")]
    idle_timeout_ms: Option<u64>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Mass-storage read-ahead: a disk's READ costs one round trip instead of three (its data
    /// and status are read as soon as the command is sent). Off by default while an unplug
    /// under read-ahead still takes seconds to reach the kernel (see kernel-notes/LAB.md).
    #[arg(long, global = true, env = "P2P_USB_READ_AHEAD",
          value_parser = clap::builder::BoolishValueParser::new())]
    read_ahead: bool,
    /// Raise an attached usb-storage disk's SCSI command size to this many 512-byte sectors
    /// (at most 2048, 1 MiB; the kernel's default is 240), so a MiB read costs one round trip
    /// instead of nine. Only a disk at the kernel's default is raised: a quirk's lower cap for
    /// a device known to fail large transfers stays.
    #[arg(long, global = true, env = "P2P_USB_SCSI_MAX_SECTORS", value_name = "SECTORS",
          value_parser = clap::value_parser!(u16).range(1..=i64::from(client::vhci::disk::MAX_SECTORS_CEILING)))]
    scsi_max_sectors: Option<u16>,
    /// Interrupt-IN streaming for keyboards, mice, game pads: the server keeps polling a few
    /// URBs ahead of the kernel's one, so reports are not spaced a round trip apart.
    #[arg(long, global = true, env = "P2P_USB_INTERRUPT_STREAMING",
          value_parser = clap::builder::BoolishValueParser::new())]
    interrupt_streaming: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print this client's endpoint id, for the server's `--allow`.
    Id,
    /// List the devices a server shares with us.
    List {
        /// The server: its ticket (`p2pusb1:...`) or a name given to `pair`.
        ticket: String,
    },
    /// Attach remote devices to this machine's kernel through vhci-hcd and keep them attached
    /// until Ctrl-C, `p2p-usb-client detach`, or the server removes them. Needs root (or
    /// CAP_SYS_ADMIN) and the vhci-hcd module.
    Attach {
        /// The server: its ticket or a name given to `pair`.
        ticket: String,
        /// Which devices: `vid:pid`, a port like `1-1.2`, `serial=S`, `product=P`, `class=N`
        /// (joined by commas, all must hold; repeatable; default: the first one listed).
        #[arg(long = "device")]
        devices: Vec<String>,
        /// The devices' PIN, if the server asks for one.
        #[arg(long)]
        pin: Option<String>,
        /// Bridge mode: instead of attaching here, serve standard USB/IP on this address so
        /// unmodified clients (`usbip attach -r`, usbip-win2) import the server's devices
        /// through our tunnel.
        #[arg(long, value_name = "ADDR")]
        usbip_listen: Option<std::net::SocketAddr>,
        #[command(flatten)]
        telemetry: client::telemetry::TelemetryArgs,
    },
    /// Measure round trips to a server on the control stream.
    Ping {
        /// The server: its ticket or a name given to `pair`.
        ticket: String,
        /// How many pings.
        #[arg(long, default_value_t = 20)]
        count: u32,
    },
    /// Remember a server's ticket under a name, for every command that takes a server.
    Pair {
        /// The ticket `p2p-usb-server` printed.
        ticket: Ticket,
        /// The name to use for it [default: the start of its id].
        #[arg(long)]
        name: Option<String>,
    },
    /// Keep the devices the config's [[auto_attach]] rules name attached: when they appear,
    /// and again after a drop (reconnecting with back-off). What the systemd service runs.
    Run,
    /// A live view: servers with their round-trip percentiles, remote devices, vhci ports.
    Tui {
        /// Servers to watch (tickets or paired names) [default: every paired server].
        servers: Vec<String>,
    },
    /// Print a shell completion script, e.g. `p2p-usb-client completions bash >
    /// /etc/bash_completion.d/p2p-usb-client`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Detach the device on a vhci port (see `status`).
    Detach {
        /// The vhci port number.
        port: u32,
    },
    /// Show the vhci ports in use on this machine.
    Status,
    /// Check a remote mass-storage device end to end without the kernel: descriptors, INQUIRY,
    /// READ CAPACITY and a timed read.
    Probe {
        /// The server: its ticket or a name given to `pair`.
        ticket: String,
        /// Which device: `vid:pid`, a port like `1-1.2`, `serial=S`, `product=P`, `class=N`
        /// (joined by commas; default: the first one listed).
        #[arg(long)]
        device: Option<String>,
        /// MiB to read from the start of the disk.
        #[arg(long, default_value_t = 4)]
        read_mib: u64,
        /// Write what was read to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also time this many control round trips, one at a time.
        #[arg(long, default_value_t = 0)]
        round_trips: u32,
    },
}

fn config(cli: &Cli) -> anyhow::Result<Config> {
    Ok(Config::load_or_default(&cli.config)?)
}

fn key_path(cli: &Cli) -> anyhow::Result<PathBuf> {
    Ok(match &cli.key_file {
        Some(k) => k.clone(),
        None => config(cli)?
            .key_file
            .unwrap_or_else(|| daemon::default_key_path(Role::Client)),
    })
}

// One thread: a URB crosses several tasks per round trip, and hops between runtime threads
// cost more than they give for one client (measured in the lab: probe reads 9.4 -> 12.4 MiB/s).
// The vhci byte pump has its own thread either way.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    transport::alloc::map_large_buffers();
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
    match &cli.command {
        Command::Id => {
            let key = load_or_create_secret_key(&key_path(&cli)?).await?;
            println!("{}", key.public());
            Ok(())
        }
        Command::Pair { ticket, name } => {
            let name = name
                .clone()
                .unwrap_or_else(|| ticket.id.to_string().chars().take(8).collect());
            client::config::pair(&cli.config, &name, ticket)?;
            let key = load_or_create_secret_key(&key_path(&cli)?).await?;
            println!("{}: paired `{name}`", cli.config.display());
            println!(
                "ask the server's operator to run: p2p-usb-server allow {}",
                key.public()
            );
            println!("then: p2p-usb-client list {name}");
            Ok(())
        }
        Command::Run => run(&cli).await,
        Command::Tui { servers } => tui(&cli, servers).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "p2p-usb-client",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::List { ticket } => {
            let conn = connect(&cli, ticket).await?;
            let devices = conn.list_devices().await?;
            if cli.json {
                for d in &devices {
                    println!("{}", device_json(d));
                }
            } else if devices.is_empty() {
                println!("the server shares no devices with us");
            } else {
                for d in &devices {
                    println!(
                        "{:<10} {:04x}:{:04x} {:<9} {} {} {}",
                        d.bus_id,
                        d.vendor_id,
                        d.product_id,
                        format!("{:?}", d.speed),
                        d.manufacturer.as_deref().unwrap_or("-"),
                        d.product.as_deref().unwrap_or("-"),
                        d.serial.as_deref().unwrap_or("-"),
                    );
                }
            }
            conn.close().await;
            Ok(())
        }
        Command::Attach {
            ticket,
            usbip_listen: Some(addr),
            ..
        } => bridge(&cli, ticket, *addr).await,
        Command::Attach {
            ticket,
            devices,
            pin,
            usbip_listen: None,
            telemetry,
        } => attach(&cli, ticket, devices, pin.clone(), telemetry).await,
        Command::Ping { ticket, count } => {
            let conn = connect(&cli, ticket).await?;
            let mut rtts = Vec::new();
            for _ in 0..*count {
                rtts.push(conn.ping().await?);
            }
            conn.close().await;
            rtts.sort();
            let at = |q: f64| percentile_us(&rtts, q) / 1e3;
            let (p50, p90, max) = (at(0.5), at(0.9), at(1.0));
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"count": rtts.len(), "p50_ms": p50, "p90_ms": p90, "p99_ms": at(0.99), "max_ms": max})
                );
            } else {
                println!(
                    "{} pings: p50 {p50:.3} ms, p90 {p90:.3} ms, max {max:.3} ms",
                    rtts.len()
                );
            }
            Ok(())
        }
        Command::Detach { port } => {
            Vhci::new(RealSys::default()).detach(*port)?;
            println!("detached vhci port {port}");
            Ok(())
        }
        Command::Status => {
            let ports = Vhci::new(RealSys::default()).ports()?;
            let used: Vec<_> = ports.iter().filter(|p| !p.is_free()).collect();
            if cli.json {
                for p in &used {
                    println!(
                        "{}",
                        serde_json::json!({"port": p.port, "speed": p.speed, "devid": p.devid, "local_busid": p.local_busid})
                    );
                }
            } else if used.is_empty() {
                println!("no vhci port in use ({} free)", ports.len());
            } else {
                for p in used {
                    println!(
                        "port {:<3} {:?} devid {:#010x} local bus id {}",
                        p.port, p.hub, p.devid, p.local_busid
                    );
                }
            }
            Ok(())
        }
        Command::Probe {
            ticket,
            device,
            read_mib,
            out,
            round_trips,
        } => {
            let conn = connect(&cli, ticket).await?;
            let devices = conn.list_devices().await?;
            let chosen = choose(&devices, device.as_deref())?;
            let mut events = conn.take_events().context("events already taken")?;
            let (handle, info) = conn.attach(chosen.id, None).await?;
            let mut probe = Probe::open(&conn, handle, info).await?;
            let mut trips = probe.control_round_trips(*round_trips).await?;
            trips.sort();
            let mut file = match out {
                Some(path) => Some(
                    std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?,
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
                    while let Ok(Some(event)) =
                        tokio::time::timeout_at(deadline, events.recv()).await
                    {
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
    }
}

async fn attach(
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
            client::attach::Tuning {
                read_ahead: cli.read_ahead,
                scsi_max_sectors: cli.scsi_max_sectors,
                interrupt_streaming: cli.interrupt_streaming,
            },
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
                "attached {} ({:04x}:{:04x} {}) on vhci port {}",
                d.bus_id,
                d.vendor_id,
                d.product_id,
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

async fn bridge(cli: &Cli, ticket: &str, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let conn = connect(cli, ticket).await?;
    let events_tx = forward_events(&conn);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = daemon::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    println!(
        "serving USB/IP on {addr}: `usbip list -r {}` then `usbip attach -r {} -b <bus id>`",
        addr.ip(),
        addr.ip()
    );
    std::io::stdout().flush()?;
    client::bridge::serve(conn.clone(), addr, events_tx, stop_rx, cli.read_ahead).await?;
    conn.close().await;
    Ok(())
}

/// The `q` quantile of sorted durations, in microseconds.
fn percentile_us(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// Fans the connection's server events out to every attachment.
fn forward_events(conn: &ServerConnection) -> tokio::sync::broadcast::Sender<Event> {
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

async fn connect(cli: &Cli, server: &str) -> anyhow::Result<Arc<ServerConnection>> {
    let config = config(cli)?;
    let ticket = &config.resolve(server).map_err(anyhow::Error::msg)?;
    let endpoint = client_endpoint(cli).await?;
    let agent = format!("p2p-usb-client/{}", env!("CARGO_PKG_VERSION"));
    ServerConnection::connect(
        &endpoint,
        ticket.endpoint_addr(),
        Capabilities::TIMING,
        &agent,
    )
    .await
    .with_context(|| format!("connecting to {}", ticket.id))
}

async fn client_endpoint(cli: &Cli) -> anyhow::Result<iroh::Endpoint> {
    let key = load_or_create_secret_key(&key_path(cli)?).await?;
    let config = config(cli)?;
    let net = NetConfig {
        bind: vec![],
        relays: cli.relay || config.relay,
        port_mapping: false,
        idle_timeout: Duration::from_millis(
            cli.idle_timeout_ms
                .or(config.idle_timeout_ms)
                .unwrap_or(1500),
        ),
    };
    Ok(bind_endpoint(key, vec![], &net).await?)
}

/// `run`: one supervisor per server that an auto-attach rule names, until Ctrl-C/SIGTERM.
async fn run(cli: &Cli) -> anyhow::Result<()> {
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
    let endpoint = client_endpoint(cli).await?;
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
                tuning: client::attach::Tuning {
                    read_ahead: r.read_ahead || cli.read_ahead,
                    scsi_max_sectors: cli.scsi_max_sectors.or(r.scsi_max_sectors),
                    interrupt_streaming: r.interrupt_streaming || cli.interrupt_streaming,
                },
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
                ServerConnection::connect(&endpoint, addr, Capabilities::TIMING, &agent).await
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

/// `tui`: one task per server pings it every second and refreshes its device list; the screen
/// redraws four times a second.
async fn tui(cli: &Cli, servers: &[String]) -> anyhow::Result<()> {
    use client::tui::{App, Link, PortView, ServerView};
    use crossterm::event::{self, Event as Key, KeyCode, KeyEventKind};
    let config = config(cli)?;
    let named: Vec<(String, Ticket)> = if servers.is_empty() {
        config
            .servers
            .iter()
            .map(|(n, s)| (n.clone(), s.ticket.clone()))
            .collect()
    } else {
        servers
            .iter()
            .map(|s| {
                let t = config.resolve(s).map_err(anyhow::Error::msg)?;
                let name = if config.servers.contains_key(s) {
                    s.clone()
                } else {
                    t.id.to_string().chars().take(8).collect()
                };
                Ok((name, t))
            })
            .collect::<anyhow::Result<_>>()?
    };
    if named.is_empty() {
        bail!(
            "no servers to show: pair one (`p2p-usb-client pair <ticket> --name NAME`) or name a ticket"
        );
    }
    let endpoint = client_endpoint(cli).await?;
    let app = Arc::new(std::sync::Mutex::new(App {
        servers: named
            .iter()
            .map(|(name, t)| ServerView {
                name: name.clone(),
                id: t.id.to_string(),
                ..ServerView::default()
            })
            .collect(),
        ports: Ok(vec![]),
    }));
    let mut watchers = tokio::task::JoinSet::new();
    for (i, (_, ticket)) in named.into_iter().enumerate() {
        let (endpoint, app) = (endpoint.clone(), app.clone());
        watchers.spawn(async move {
            let agent = format!("p2p-usb-client/{} tui", env!("CARGO_PKG_VERSION"));
            loop {
                let set = |link: Link| lock(&app).servers[i].link = link;
                let conn = match ServerConnection::connect(
                    &endpoint,
                    ticket.endpoint_addr(),
                    Capabilities::TIMING,
                    &agent,
                )
                .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        set(Link::Down(e.to_string()));
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        continue;
                    }
                };
                set(Link::Connected);
                let mut tick = 0u32;
                let why = loop {
                    if tick.is_multiple_of(5) {
                        match conn.list_devices().await {
                            Ok(d) => lock(&app).servers[i].devices = d,
                            Err(e) => break e.to_string(),
                        }
                    }
                    match conn.ping().await {
                        Ok(rtt) => lock(&app).servers[i].push_rtt(rtt),
                        Err(e) => break e.to_string(),
                    }
                    tick += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                };
                set(Link::Down(why));
                conn.close_connection();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let vhci = Vhci::new(RealSys::default());
    let mut terminal = ratatui::init();
    let result = async {
        loop {
            lock(&app).ports = vhci
                .ports()
                .map(|ports| {
                    ports
                        .iter()
                        .filter(|p| !p.is_free())
                        .map(|p| PortView {
                            port: p.port,
                            devid: p.devid,
                            local_busid: p.local_busid.clone(),
                        })
                        .collect()
                })
                .map_err(|e| e.to_string());
            terminal.draw(|f| client::tui::draw(f, &lock(&app)))?;
            // Never block the one runtime thread on the terminal: the pings run on it.
            while event::poll(Duration::ZERO)? {
                if let Key::Key(key) = event::read()?
                    && key.kind == KeyEventKind::Press
                    && matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
                {
                    return anyhow::Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    .await;
    ratatui::restore();
    watchers.abort_all();
    endpoint.close().await;
    result
}

fn lock(app: &std::sync::Mutex<client::tui::App>) -> std::sync::MutexGuard<'_, client::tui::App> {
    app.lock().unwrap_or_else(|p| p.into_inner())
}

/// The device `spec` names (the grammar of `protocol::select`); the first device if none.
fn choose<'a>(devices: &'a [DeviceInfo], spec: Option<&str>) -> anyhow::Result<&'a DeviceInfo> {
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

fn device_json(d: &DeviceInfo) -> serde_json::Value {
    serde_json::json!({
        "id": d.id.0, "bus_id": d.bus_id,
        "vid_pid": format!("{:04x}:{:04x}", d.vendor_id, d.product_id),
        "speed": format!("{:?}", d.speed), "manufacturer": d.manufacturer,
        "product": d.product, "serial": d.serial,
    })
}
