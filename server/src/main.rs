//! `p2p-usb-server`: share this machine's USB devices with allowed peers over iroh.

use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser, Subcommand};
use iroh::EndpointId;
use protocol::wire::ALPN;
use server::config::{Config, DeviceMatch, SharePolicy, edit, rule_from_spec};
use server::device::DeviceSource;
use server::device::usb::{DeviceFilter, UsbSource};
use server::session::{Allowlist, Policy, Server, ServerConfig};
use server::status::{self, Status, StatusError};
use transport::daemon::{self, Role};
use transport::{NetConfig, Ticket, bind_endpoint, load_or_create_secret_key};

/// Share USB devices plugged into this machine with allowed peers, peer to peer over iroh.
///
/// First time:
///   p2p-usb-server list --all                 see what is plugged in
///   p2p-usb-server share 0781:5581            share a device (vid:pid, port, serial=, class=)
///   p2p-usb-server allow <client id>          the client prints its id with `p2p-usb-client id`
///   p2p-usb-server run                        serve; prints the ticket clients pair with
///   p2p-usb-server ticket --qr                the ticket again, as a QR code
///
/// Settings live in a TOML file (`--config`; /etc/p2p-usb/server.toml as root, else
/// ~/.config/p2p-usb/server.toml); flags override it. `share`, `unshare`, `allow` and `revoke`
/// edit that file and make a running server reload it; a revoked client is disconnected at once.
#[derive(Parser)]
#[command(version, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "P2P_USB_SERVER_CONFIG", default_value_os_t = daemon::default_config_path(Role::Server))]
    config: PathBuf,
    /// Where a running server publishes its status (read by `status`, `ticket`, `tui`).
    #[arg(long, global = true, env = "P2P_USB_SERVER_STATUS", default_value_os_t = status::default_path())]
    status_file: PathBuf,
    /// Print machine-readable JSON (`list`, `status`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Share devices until stopped (the default). Reloads the config on SIGHUP.
    Run,
    /// List the USB devices this server would share (`--all`: every device, and why not).
    List {
        /// Show every device plugged in, shared or not.
        #[arg(long)]
        all: bool,
    },
    /// Print this server's endpoint id (creating its key if needed).
    Id,
    /// Print the running server's ticket, the one string a client needs to pair.
    Ticket {
        /// Also draw it as a QR code, to scan with a phone.
        #[arg(long)]
        qr: bool,
    },
    /// Share devices: `vid:pid`, a port path like `1-1.2`, `serial=S`, `product=P`, `class=N`
    /// (joined by commas, all must hold), or `all`.
    Share {
        /// What to share.
        spec: String,
        /// Clients must give this PIN to attach (`p2p-usb-client attach --pin`).
        #[arg(long)]
        pin: Option<String>,
    },
    /// Stop sharing what `share <spec>` shared; a client using it is detached.
    Unshare {
        /// The spec given to `share`.
        spec: String,
    },
    /// Allow a client (its `p2p-usb-client id`) to connect.
    Allow {
        /// The client's endpoint id.
        id: EndpointId,
    },
    /// Revoke a client: it is disconnected now and refused from now on.
    Revoke {
        /// The client's endpoint id.
        id: EndpointId,
    },
    /// Show the running server: its devices, who holds them, traffic, connected clients.
    Status,
    /// A live terminal view of the running server (q quits).
    Tui,
    /// Print a shell completion script, e.g. `p2p-usb-server completions bash >
    /// /etc/bash_completion.d/p2p-usb-server`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Secret key file (created with mode 0600 on first run): the server's identity.
    #[arg(global = true, long, env = "P2P_USB_SERVER_KEY")]
    key_file: Option<PathBuf>,
    /// Local address to listen on (repeatable). Default: every interface, a random port.
    #[arg(global = true, long = "bind", value_name = "ADDR")]
    bind: Vec<SocketAddr>,
    /// A client endpoint id allowed to connect (repeatable; added to the config's `allow`).
    #[arg(global = true, long = "allow", value_name = "ENDPOINT_ID")]
    allow: Vec<EndpointId>,
    /// Let any client that knows the ticket connect. For demos on a network you trust.
    #[arg(global = true, long)]
    allow_any: bool,
    /// A device to share: `vid:pid`, a port path like `1-1.2`, `serial=S`, `product=P`,
    /// `class=N` (joined by commas) or `all` (repeatable; replaces the config's share rules,
    /// its deny rules still apply).
    #[arg(global = true, long = "share", value_name = "SPEC")]
    share: Vec<String>,
    /// Share a simulated USB disk backed by FILE (created with --simulate-size if missing),
    /// instead of real devices: for machines with no USB hardware.
    #[arg(global = true, long, value_name = "FILE")]
    simulate: Vec<PathBuf>,
    /// Size of a simulated disk that does not exist yet, in MiB.
    #[arg(global = true, long, default_value_t = 64)]
    simulate_size: u64,
    /// URBs running on the device at once per endpoint; more wait in order, up to the URB
    /// window of 64 [default: 32].
    #[arg(global = true, long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    queue_depth: Option<u16>,
    /// Use n0's public relays so clients behind NAT can reach us.
    #[arg(global = true, long)]
    relay: bool,
    /// Ask the router for a port mapping (UPnP, PCP, NAT-PMP).
    #[arg(global = true, long)]
    port_mapping: bool,
    /// Release a silent client's devices after this many milliseconds without a packet, plus
    /// one keep-alive interval (a sixth of it) [default: 1500, so 1.75 s].
    #[arg(global = true, long, env = "P2P_USB_IDLE_TIMEOUT_MS")]
    idle_timeout_ms: Option<u64>,
    /// Also write the ticket to this file (for scripts).
    #[arg(global = true, long)]
    ticket_file: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    transport::alloc::map_large_buffers();
    let cli = Cli::parse();
    // Multi-threaded: a Pi serving several devices and clients spreads their crypto over its
    // cores. At least two workers even on one core: a usbfs ioctl can wait on a device lock the
    // kernel holds for seconds, and one worker stuck there must not stop every keep-alive.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(main_async(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with every cause, for people and for journald alike.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn main_async(cli: Cli) -> anyhow::Result<()> {
    let command = cli.command.as_ref().unwrap_or(&Command::Run);
    if !matches!(command, Command::Tui) {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,iroh=warn,noq=warn".into()),
            )
            .with_writer(std::io::stderr)
            // Colour only for people: journald and log files get plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match command {
        Command::Id => {
            let key = load_or_create_secret_key(&key_path(&cli)?).await?;
            println!("{}", key.public());
            Ok(())
        }
        Command::List { all } => list(&cli, *all).await,
        Command::Run => run(&cli).await,
        Command::Ticket { qr } => {
            let status = Status::read(&cli.status_file)?;
            println!("{}", status.ticket);
            if *qr {
                for line in status::qr(&status.ticket) {
                    println!("{line}");
                }
            }
            Ok(())
        }
        Command::Share { spec, pin } => {
            let rule = rule_from_spec(spec).map_err(anyhow::Error::msg)?;
            let added = edit::share(&cli.config, &rule, pin.as_deref())?;
            let what = if added {
                "now shares"
            } else {
                "already shared"
            };
            println!("{}: {what} {rule}", cli.config.display());
            reload_running(&cli)
        }
        Command::Unshare { spec } => {
            let rule = rule_from_spec(spec).map_err(anyhow::Error::msg)?;
            match edit::unshare(&cli.config, &rule)? {
                0 => bail!(
                    "{} has no share rule for exactly `{rule}` (see the file)",
                    cli.config.display()
                ),
                n => println!("{}: removed {n} rule(s) for {rule}", cli.config.display()),
            }
            reload_running(&cli)
        }
        Command::Allow { id } => {
            let added = edit::allow(&cli.config, &id.to_string())?;
            let what = if added { "allows" } else { "already allows" };
            println!("{}: {what} {id}", cli.config.display());
            reload_running(&cli)
        }
        Command::Revoke { id } => {
            if !edit::revoke(&cli.config, &id.to_string())? {
                bail!("{} does not allow {id}", cli.config.display());
            }
            println!("{}: revoked {id}", cli.config.display());
            reload_running(&cli)
        }
        Command::Status => show_status(&cli),
        Command::Tui => tui(&cli.status_file),
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "p2p-usb-server",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

fn key_path(cli: &Cli) -> anyhow::Result<PathBuf> {
    let config = Config::load_or_default(&cli.config)?;
    Ok(cli
        .run
        .key_file
        .clone()
        .or(config.key_file)
        .unwrap_or_else(|| daemon::default_key_path(Role::Server)))
}

/// The settings in force: the config file with the command line's flags on top.
struct Settings {
    config: Config,
    share: SharePolicy,
    allow: Allowlist,
}

fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    let config = Config::load_or_default(&cli.config)?;
    let share = if cli.run.share.is_empty() {
        config.share.iter().map(|r| r.matcher.clone()).collect()
    } else {
        cli.run
            .share
            .iter()
            .map(|s| rule_from_spec(s))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?
    };
    let share = SharePolicy {
        share,
        deny: config.deny.clone(),
    };
    let allow = if cli.run.allow_any || config.allow_any {
        Allowlist::Anyone
    } else {
        let ids = config
            .allow
            .iter()
            .map(|c| c.0)
            .chain(cli.run.allow.iter().copied());
        Allowlist::Only(ids.collect::<HashSet<_>>())
    };
    Ok(Settings {
        config,
        share,
        allow,
    })
}

/// Where the devices come from: simulated disks, or this machine's USB devices.
enum Source {
    Sim(Arc<dyn DeviceSource>),
    Usb(Arc<UsbSource>),
}

impl Source {
    fn shared(&self) -> Arc<dyn DeviceSource> {
        match self {
            Source::Sim(s) => s.clone(),
            Source::Usb(u) => u.clone(),
        }
    }
}

async fn source(cli: &Cli, share: SharePolicy) -> anyhow::Result<Source> {
    let args = &cli.run;
    if !args.simulate.is_empty() {
        let source = server::device::sim::SimSource::with_files(
            &args.simulate,
            args.simulate_size * 1024 * 1024,
        )
        .context("could not set up the simulated disks")?;
        return Ok(Source::Sim(source));
    }
    let source = UsbSource::start(DeviceFilter(share))
        .await
        .context("could not read this machine's USB devices (is usbfs mounted? may this user open /dev/bus/usb? see kernel-notes/DEPLOYMENT.md)")?;
    Ok(Source::Usb(source))
}

async fn list(cli: &Cli, all: bool) -> anyhow::Result<()> {
    let settings = settings(cli)?;
    let devices = if all {
        let everything = SharePolicy {
            share: vec![DeviceMatch {
                all: true,
                ..DeviceMatch::default()
            }],
            deny: vec![],
        };
        source(cli, everything).await?.shared().devices()
    } else {
        source(cli, settings.share.clone())
            .await?
            .shared()
            .devices()
    };
    let is_shared = |d: &protocol::wire::DeviceInfo| {
        !all || settings
            .share
            .offers(&server::config::DeviceFacts::from_wire(d))
    };
    if cli.json {
        for d in &devices {
            println!(
                "{}",
                serde_json::json!({
                    "bus_id": d.bus_id,
                    "vid_pid": format!("{:04x}:{:04x}", d.vendor_id, d.product_id),
                    "speed": format!("{:?}", d.speed),
                    "manufacturer": d.manufacturer, "product": d.product, "serial": d.serial,
                    "shared": is_shared(d),
                    "pin": settings.config.pin_for(d).is_some(),
                })
            );
        }
        return Ok(());
    }
    if devices.is_empty() {
        if all {
            println!("no USB devices (other than hubs) are plugged in");
        } else {
            println!(
                "nothing is shared: `p2p-usb-server list --all` shows what is plugged in, `p2p-usb-server share <vid:pid>` shares it"
            );
        }
    }
    for d in &devices {
        let mark = match (all, is_shared(d)) {
            (false, _) => "",
            (true, true) => "shared  ",
            (true, false) => "-       ",
        };
        let pin = if settings.config.pin_for(d).is_some() {
            " [PIN]"
        } else {
            ""
        };
        println!(
            "{mark}{:<8} {:04x}:{:04x} {:<6} {} {} {}{pin}",
            d.bus_id,
            d.vendor_id,
            d.product_id,
            format!("{:?}", d.speed),
            d.manufacturer.as_deref().unwrap_or("-"),
            d.product.as_deref().unwrap_or("-"),
            d.serial
                .as_deref()
                .map_or(String::new(), |s| format!("serial={s}")),
        );
    }
    Ok(())
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
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
        relays: args.relay || config.relay,
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

/// After an edit: tell a running server to reload, or say it will apply on the next start.
fn reload_running(cli: &Cli) -> anyhow::Result<()> {
    match Status::read(&cli.status_file) {
        Ok(status) => {
            let sent = std::process::Command::new("kill")
                .args(["-HUP", &status.pid.to_string()])
                .status()
                .context("running kill")?;
            if !sent.success() {
                bail!(
                    "could not signal the running server (pid {}); run `systemctl reload p2p-usb-server` or restart it",
                    status.pid
                );
            }
            println!(
                "the running server (pid {}) reloaded its config",
                status.pid
            );
        }
        Err(StatusError::NotRunning { .. } | StatusError::Stale { .. }) => {
            println!("no server is running; the change applies when it starts");
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

fn show_status(cli: &Cli) -> anyhow::Result<()> {
    let status = Status::read(&cli.status_file)?;
    if cli.json {
        println!("{}", serde_json::to_string(&status)?);
        return Ok(());
    }
    println!("server {} (pid {})", status.id, status.pid);
    println!("ticket {}", status.ticket);
    if let Some(c) = &status.config {
        println!("config {}", c.display());
    }
    if status.allow_any {
        println!("allow  any client with the ticket");
    } else {
        println!("allow  {} client id(s)", status.allowed);
    }
    println!("devices:");
    if status.snapshot.devices.is_empty() {
        println!("  none shared");
    }
    for d in &status.snapshot.devices {
        println!(
            "  {:<8} {} {:<20} {:<10} {:>8.1} MiB in, {:>8.1} MiB out{}",
            d.bus_id,
            d.vid_pid,
            d.product.as_deref().unwrap_or("-"),
            d.attached_to
                .as_deref()
                .map_or("free".to_owned(), |id| id.chars().take(10).collect()),
            d.bytes_from_device as f64 / 1048576.0,
            d.bytes_to_device as f64 / 1048576.0,
            if d.pin { " [PIN]" } else { "" },
        );
    }
    println!("clients:");
    if status.snapshot.clients.is_empty() {
        println!("  none connected");
    }
    for c in &status.snapshot.clients {
        println!("  {} {} for {}s", c.id, c.agent, c.connected_secs);
    }
    Ok(())
}

fn tui(path: &Path) -> anyhow::Result<()> {
    use crossterm::event::{self, Event, KeyCode, KeyEventKind};
    let mut app = server::tui::App::default();
    let mut terminal = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        loop {
            app.update(Status::read(path).map_err(|e| e.to_string()));
            terminal.draw(|f| server::tui::draw(f, &app))?;
            if event::poll(Duration::from_millis(1000))?
                && let Event::Key(key) = event::read()?
                && key.kind == KeyEventKind::Press
            {
                match key.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('r') => {
                        if let Ok(s) = Status::read(path) {
                            let _ = std::process::Command::new("kill")
                                .args(["-HUP", &s.pid.to_string()])
                                .status();
                        }
                    }
                    _ => {}
                }
            }
        }
    })();
    ratatui::restore();
    result
}
