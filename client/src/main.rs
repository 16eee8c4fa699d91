//! `p2p-usb-client`: use USB devices plugged into another machine as if they were plugged in
//! here.

mod cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use transport::Ticket;
use transport::daemon::{self, Role};

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
    #[command(flatten)]
    relay: transport::relay::RelayArgs,
    /// Give up on a silent server after this many milliseconds without a packet (its devices
    /// are detached here, and `run` reconnects) [default: the config's idle_timeout_ms, else
    /// 1500]. Longer rides out network blips; the server's own setting decides when it frees
    /// the devices of a client that vanished.
    #[arg(long, global = true, env = "P2P_USB_IDLE_TIMEOUT_MS")]
    idle_timeout_ms: Option<u64>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Turn mass-storage read-ahead off. It is on by default: a disk's READ costs one round
    /// trip instead of three (its command is answered at once, its data and status fetched with
    /// it), a WRITE one instead of two (its data follows the command at once). Off, every URB
    /// waits for the kernel to send it and for the device to answer; a rule's
    /// `read_ahead = false` does this for one device.
    #[arg(long, global = true, env = "P2P_USB_NO_READ_AHEAD",
          value_parser = clap::builder::BoolishValueParser::new())]
    no_read_ahead: bool,
    /// Read-ahead is the default now; the flag is accepted so older command lines still run.
    #[arg(
        long = "read-ahead",
        global = true,
        hide = true,
        conflicts_with = "no_read_ahead"
    )]
    _read_ahead: bool,
    /// An attached usb-storage disk's SCSI command size, in 512-byte sectors [default: 2048,
    /// 1 MiB, so a MiB read costs as few as one round trip instead of the nine of the kernel's
    /// 240; vhci's 32 scatter-gather segments cut commands over scattered pages shorter, so a
    /// READ that continues the one before it is widened to this size on the device and the
    /// kernel's next READs are answered from what it brought]. Only a disk at the kernel's
    /// default is raised: a quirk's lower cap for a device known to fail large transfers
    /// stays, and READs are widened only to the cap the disk ends with. 240 leaves every disk
    /// as the kernel set it.
    #[arg(long, global = true, env = "P2P_USB_SCSI_MAX_SECTORS", value_name = "SECTORS",
          value_parser = clap::value_parser!(u16).range(1..=i64::from(client::vhci::disk::MAX_SECTORS_CEILING)))]
    scsi_max_sectors: Option<u16>,
    /// Turn interrupt-IN streaming off. It is on by default: for keyboards, mice, game pads
    /// the device is polled a few URBs ahead of the kernel's one, so reports are not spaced a
    /// round trip apart. A rule's `interrupt_streaming = false` does this for one device.
    #[arg(long, global = true, env = "P2P_USB_NO_INTERRUPT_STREAMING",
          value_parser = clap::builder::BoolishValueParser::new())]
    no_interrupt_streaming: bool,
    /// Streaming is the default now; the flag is accepted so older command lines still run.
    #[arg(
        long = "interrupt-streaming",
        global = true,
        hide = true,
        conflicts_with = "no_interrupt_streaming"
    )]
    _interrupt_streaming: bool,
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

// One thread: a URB crosses several tasks per round trip, and hops between runtime threads
// cost more than they give for one client (measured in the lab: probe reads 9.4 -> 12.4 MiB/s).
// The vhci byte pump has its own thread either way.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    transport::alloc::map_large_buffers();
    transport::daemon::init_logging();
    let cli = Cli::parse();
    match &cli.command {
        Command::Id => cmd::pair::id(&cli).await,
        Command::Pair { ticket, name } => cmd::pair::pair(&cli, ticket, name.as_deref()).await,
        Command::Run => cmd::run::run(&cli).await,
        Command::Tui { servers } => cmd::tui::run(&cli, servers).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "p2p-usb-client",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::List { ticket } => cmd::list::run(&cli, ticket).await,
        Command::Attach {
            ticket,
            usbip_listen: Some(addr),
            ..
        } => cmd::bridge::run(&cli, ticket, *addr).await,
        Command::Attach {
            ticket,
            devices,
            pin,
            usbip_listen: None,
            telemetry,
        } => cmd::attach::run(&cli, ticket, devices, pin.clone(), telemetry).await,
        Command::Ping { ticket, count } => cmd::ping::run(&cli, ticket, *count).await,
        Command::Detach { port } => cmd::ports::detach(*port),
        Command::Status => cmd::ports::status(&cli),
        Command::Probe {
            ticket,
            device,
            read_mib,
            out,
            round_trips,
        } => {
            cmd::probe::run(
                &cli,
                ticket,
                device.as_deref(),
                *read_mib,
                out.as_deref(),
                *round_trips,
            )
            .await
        }
    }
}
