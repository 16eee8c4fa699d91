//! `p2p-usb-server`: share this machine's USB devices with allowed peers over iroh.

mod cmd;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};
use iroh::EndpointId;
use server::status;
use transport::daemon::{self, Role};
use transport::load_or_create_secret_key;

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
    #[command(flatten)]
    relay: transport::relay::RelayArgs,
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
        transport::daemon::init_logging();
    }
    match command {
        Command::Id => {
            let key = load_or_create_secret_key(&cmd::key_path(&cli)?).await?;
            println!("{}", key.public());
            Ok(())
        }
        Command::List { all } => cmd::list::run(&cli, *all).await,
        Command::Run => cmd::run::run(&cli).await,
        Command::Ticket { qr } => cmd::status::ticket(&cli, *qr),
        Command::Share { spec, pin } => cmd::edit::share(&cli, spec, pin.as_deref()),
        Command::Unshare { spec } => cmd::edit::unshare(&cli, spec),
        Command::Allow { id } => cmd::edit::allow(&cli, id),
        Command::Revoke { id } => cmd::edit::revoke(&cli, id),
        Command::Status => cmd::status::show(&cli),
        Command::Tui => cmd::tui::run(&cli.status_file),
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
