//! Peer to peer for real: the server behind one NAT, the client behind another, a relay on the
//! "internet" between them (`crate::nat`). With NATs that allow it the connection starts on
//! the relay and moves to a direct path; with direct UDP blocked it stays on the relay. A disk
//! reads byte-exact either way, through vhci on the client.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::project::{CLIENT, Daemon, SERVER, idle_timeout_ms};
use crate::bench::{self, MIB};
use crate::nat::{self, Internet};
use crate::report::{log, metric};
use crate::{modules, sys, usbdev};

/// The simulated disk the server shares (its `vid:pid`).
const SIM: (u16, u16) = (0x1209, 0x0001);
const DISK: &str = "/tmp/p2p.img";
const SIZE: usize = 64 * MIB;
/// How long hole punching may take to find the direct path, at the reference pace.
/// iroh tries again at once when an address changes, and once a minute anyway.
const DIRECT_WITHIN: Duration = Duration::from_secs(75);
/// How long the relay-only connection is watched for a switch that must not come.
const RELAY_WATCH: Duration = Duration::from_secs(10);
/// From the relay's return to the disk readable again: both peers reconnect to the relay
/// (iroh backs off), then the client's supervisor (back-off capped at 2 s here) re-attaches.
const RELAY_RETURN: Duration = Duration::from_secs(60);
const LOG: &str =
    "info,server=debug,client=debug,transport=debug,iroh=debug,noq=warn,noq_proto=info";

/// Starts the server in `home`, sharing a simulated disk, with the relay; its ticket.
fn serve(internet: &Internet) -> Result<(Daemon, String)> {
    let ticket_file = Path::new("/tmp/p2p.ticket");
    let _ = std::fs::remove_file(ticket_file);
    std::fs::create_dir_all("/tmp/keys")?;
    let relay = format!("--relay={}", internet.relay_url());
    let child = nat::in_ns("home", SERVER)
        .args(["--simulate", DISK, "--allow-any", &relay, "--relay-ca"])
        .arg(internet.ca())
        .arg("--ticket-file")
        .arg(ticket_file)
        .args(["--status-file", "/tmp/p2p-status.json"])
        .env("P2P_USB_SERVER_KEY", "/tmp/keys/p2p-server.key")
        .env("P2P_USB_SERVER_CONFIG", "/tmp/p2p-server.toml")
        .env("RUST_LOG", LOG)
        .env("P2P_USB_IDLE_TIMEOUT_MS", idle_timeout_ms().to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create("/tmp/server.log")?)
        .spawn()
        .context("starting p2p-usb-server in the home network")?;
    let server = Daemon::adopt(child, "p2p-usb-server");
    let ticket = sys::wait_for("the server's ticket", Duration::from_secs(20), || {
        std::fs::read_to_string(ticket_file)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    })
    .inspect_err(|_| super::project::show_server_log())?;
    ensure!(
        ticket.contains(&internet.relay_url()),
        "the ticket does not name the relay: {ticket}"
    );
    Ok((server, ticket))
}

/// `p2p-usb-client attach` in `cafe`, trusting the relay's certificate; the disk it makes.
fn attach(internet: &Internet, ticket: &str) -> Result<(Daemon, std::path::PathBuf)> {
    let log_file = std::fs::File::create("/tmp/client-p2p.log")?;
    let child = nat::in_ns("cafe", CLIENT)
        .arg("--relay-ca")
        .arg(internet.ca())
        .args(["attach", ticket, "--device", "1209:0001"])
        .env("P2P_USB_CLIENT_KEY", "/tmp/keys/p2p-client.key")
        .env("P2P_USB_CLIENT_CONFIG", "/tmp/p2p-client.toml")
        .env("RUST_LOG", LOG)
        .env("P2P_USB_IDLE_TIMEOUT_MS", idle_timeout_ms().to_string())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("starting p2p-usb-client in the café network")?;
    let client = Daemon::adopt(child, "p2p-usb-client");
    let disk = usbdev::wait_block_device(SIM.0, SIM.1, usbdev::Via::Vhci, Duration::from_secs(60))
        .inspect_err(|_| {
            super::project::show_client_log("p2p");
            super::project::show_server_log();
        })
        .context("the remote disk never appeared through the NATs")?;
    Ok((client, disk))
}

/// A client that trusts another certificate than the relay's cannot reach the server (the
/// relay is its only way): it says so, naming the relay, within its connect timeout. So does
/// one whose ticket names a "relay" that answers something else (the relay host's plain HTTP
/// port).
fn wrong_certificate(internet: &Internet, ticket: &str) -> Result<()> {
    let wrong = internet.wrong_ca()?;
    refused(
        &wrong,
        ticket,
        &internet.relay_url(),
        "wrong_certificate_secs",
    )?;
    let garbage = format!("https://{}:80/", nat::RELAY_IP);
    let ticket = ticket.replace(&internet.relay_url(), &garbage);
    refused(&internet.ca(), &ticket, &garbage, "not_a_relay_secs")
}

/// `list` through `ticket` trusting `ca` must fail, naming `relay`; records how long it took.
fn refused(ca: &Path, ticket: &str, relay: &str, figure: &str) -> Result<()> {
    let started = Instant::now();
    let out = nat::in_ns("cafe", CLIENT)
        .arg("--relay-ca")
        .arg(ca)
        .args(["list", ticket])
        .env("P2P_USB_CLIENT_KEY", "/tmp/keys/p2p-client.key")
        .env("P2P_USB_CLIENT_CONFIG", "/tmp/p2p-client.toml")
        .env("RUST_LOG", "error")
        .output()
        .context("running p2p-usb-client list")?;
    let took = started.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{figure}: the client listed devices");
    ensure!(
        err.contains(relay),
        "the error does not name {relay}: {err}"
    );
    log!(
        "{figure}: refused in {took:.1}s: {}",
        err.trim().lines().last().unwrap_or_default()
    );
    metric(figure, took);
    Ok(())
}

/// The `live` report of the client's port as `p2p-usb-client --json status` shows it.
fn live_port() -> Option<serde_json::Value> {
    let out = Command::new(CLIENT)
        .args(["--json", "status"])
        .env("P2P_USB_CLIENT_CONFIG", "/tmp/p2p-client.toml")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|p| p["live"].clone())
        .find(|l| l.is_object())
}

/// The port's path: relayed or not, the remote, and how often it changed.
fn live_path() -> Option<(bool, String, u64)> {
    let live = live_port()?;
    let path = &live["path"];
    Some((
        path["relay"].as_bool()?,
        path["remote"].as_str()?.to_owned(),
        live["path_changes"].as_u64().unwrap_or(0),
    ))
}

/// What the client logged as its first path to the server.
fn first_path_was_relay() -> bool {
    let log = std::fs::read_to_string("/tmp/client-p2p.log").unwrap_or_default();
    log.lines()
        .find(|l| l.contains("connection path") && l.contains("peer=server"))
        .is_some_and(|l| l.contains("relay https://"))
}

fn setup() -> Result<()> {
    modules::load(&[modules::USBIP, modules::STORAGE].concat())?;
    bench::pattern_file(Path::new(DISK), SIZE, 0x2b2b)
}

/// NATs that allow hole punching, opened while a read runs on the relay: the path goes
/// direct under the read, which stays byte-exact with no URB lost or repeated; then the relay
/// goes away and the direct attachment carries on.
pub fn holepunch() -> Result<()> {
    setup()?;
    // Direct UDP starts blocked so that the disk is attached and reading on the relay before
    // hole punching can succeed; the routers let it through mid-read.
    let mut internet = Internet::build()?;
    let (mut server, ticket) = serve(&internet)?;
    log!("server behind NAT, ticket {ticket}");
    let started = Instant::now();
    let (mut client, disk) = attach(&internet, &ticket)?;
    log!(
        "attached through the NATs: {} in {:.1}s",
        disk.display(),
        started.elapsed().as_secs_f64()
    );
    let first = sys::wait_for("the port's report", Duration::from_secs(10), live_path)?;
    ensure!(first.0, "the first path is not the relay: {}", first.1);
    ensure!(
        first_path_was_relay(),
        "the client's log shows no relay path first"
    );
    let reader = {
        let disk = disk.clone();
        std::thread::spawn(move || bench::read_verify_mib_s(&disk, SIZE, Path::new(DISK)))
    };
    std::thread::sleep(Duration::from_secs(3).mul_f64(sys::pace()));
    internet.allow_direct()?;
    let opened = Instant::now();
    let direct = sys::wait_for("the client's path to become direct", DIRECT_WITHIN, || {
        live_path().filter(|(relay, _, _)| !relay)
    })
    .inspect_err(|_| show_paths())?;
    let to_direct = opened.elapsed().as_secs_f64();
    log!(
        "path: the relay first, direct {} {to_direct:.1}s after the NATs let it ({} changes)",
        direct.1,
        direct.2
    );
    ensure!(
        direct.1.starts_with("203.0.113.2:"),
        "the direct path is not to the server's NAT: {}",
        direct.1
    );
    metric("seconds_to_direct", to_direct);
    let mib_s = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader panicked"))?
        .context("the read across the switch")?;
    log!("read 64 MiB byte-exact across the switch at {mib_s:.2} MiB/s");
    metric("switch_read_mib_s", mib_s);
    // The report is at most a second old: wait for one with nothing in flight.
    let urbs = sys::wait_for("the port to be idle", Duration::from_secs(10), || {
        port_counts().ok().filter(|(sent, done, _)| sent == done)
    })
    .context("URBs forwarded and completed never matched: some were lost or repeated")?;
    ensure!(urbs.2 == 0, "{} URBs were unlinked", urbs.2);
    log!(
        "{} URBs forwarded, each completed once, none unlinked",
        urbs.0
    );

    // The relay goes away once the direct path exists: nothing changes for the attachment.
    internet.stop_relay();
    let again = bench::read_verify_mib_s(&disk, 8 * MIB, Path::new(DISK))?;
    ensure!(client.alive(), "the client ended when the relay went away");
    let Some((false, remote, _)) = live_path() else {
        bail!("the path left the direct one when the relay went away");
    };
    log!("relay gone: 8 MiB more byte-exact at {again:.2} MiB/s, still direct to {remote}");
    metric("direct_read_mib_s", again);
    ensure!(server.alive(), "the server died");
    Ok(())
}

/// Every path line both daemons logged, for a failure's report.
fn show_paths() {
    for (who, path) in [
        ("client", "/tmp/client-p2p.log"),
        ("server", "/tmp/server.log"),
    ] {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines = text.lines().filter(|l| {
            ["path", "holepunch", "qnt", "QadProbe", "direct_addrs"]
                .iter()
                .any(|k| l.contains(k))
        });
        for line in lines.take(60) {
            log!("{who}: {}", &line[..line.len().min(300)]);
        }
    }
}

/// The port's URBs forwarded, completed and unlinked, from `status --json`.
fn port_counts() -> Result<(u64, u64, u64)> {
    let live = live_port().context("status --json shows no live port")?;
    let n = |k: &str| live[k].as_u64().unwrap_or(0);
    Ok((n("submitted"), n("completed"), n("unlinked")))
}

/// Direct UDP between the NATs blocked: the connection stays on the relay and the disk still
/// reads and writes byte-exact. Then the relay goes away with no direct path to fall back on:
/// `p2p-usb-client run` says so, naming the relay, and re-attaches by itself once the relay is
/// back.
pub fn relay_only() -> Result<()> {
    setup()?;
    let mut internet = Internet::build()?;
    let (mut server, ticket) = serve(&internet)?;
    wrong_certificate(&internet, &ticket)?;
    let (_client, disk) = supervise(&internet, &ticket)?;
    let watch = Instant::now();
    while watch.elapsed() < RELAY_WATCH.mul_f64(sys::pace()) {
        if let Some((false, remote, _)) = live_path() {
            bail!("the connection went direct ({remote}) with direct UDP blocked");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let Some((true, remote, changes)) = live_path() else {
        bail!("status --json shows no relay path for the port");
    };
    log!("after {RELAY_WATCH:?} the path is still the relay {remote} ({changes} changes)");
    let mib_s = bench::read_verify_mib_s(&disk, 16 * MIB, Path::new(DISK))?;
    log!("read 16 MiB byte-exact through the relay at {mib_s:.2} MiB/s");
    metric("relay_read_mib_s", mib_s);
    let write_mib_s = bench::write_mib_s(&disk, 4 * MIB)?;
    let written = Path::new("/tmp/p2p-written.bin");
    bench::written_pattern(written, 4 * MIB)?;
    bench::read_verify_mib_s(&disk, 4 * MIB, written)
        .context("reading back what went through the relay")?;
    log!("wrote 4 MiB through the relay at {write_mib_s:.2} MiB/s, read back byte-exact");
    metric("relay_write_mib_s", write_mib_s);

    // The relay goes away; nothing else connects the two.
    internet.stop_relay();
    let stopped = Instant::now();
    let gone = || usbdev::find_block_device_for(SIM.0, SIM.1, usbdev::Via::Vhci).is_none();
    sys::wait_for(
        "the relayed attachment to end",
        Duration::from_secs(30),
        || gone().then_some(()),
    )?;
    let said = sys::wait_for(
        "the client to say the relay is unreachable",
        Duration::from_secs(30),
        || {
            let log = std::fs::read_to_string("/tmp/client-p2p.log").ok()?;
            log.lines()
                .find(|l| l.contains("reconnecting in") && l.contains(&internet.relay_url()))
                .map(str::to_owned)
        },
    )
    .inspect_err(|_| super::project::show_client_log("p2p"))?;
    log!(
        "relay down: the disk went {:.1}s later; the client said: {}",
        stopped.elapsed().as_secs_f64(),
        said.split("WARN").last().unwrap_or(&said).trim()
    );
    internet.start_relay()?;
    let back = Instant::now();
    let want = bench::md5(written, None)?;
    super::project::wait_readable(SIM.0, SIM.1, &want, 4 * MIB, RELAY_RETURN)
        .context("the client did not re-attach once the relay was back")?;
    let reattached = back.elapsed().as_secs_f64();
    log!("relay back: re-attached by itself {reattached:.1}s later, what was written intact");
    metric("reattach_after_relay_secs", reattached);
    ensure!(server.alive(), "the server died");
    Ok(())
}

/// `p2p-usb-client run` in `cafe` with an auto-attach rule for the simulated disk (what the
/// systemd service runs), trusting the relay's certificate; the disk it makes.
fn supervise(internet: &Internet, ticket: &str) -> Result<(Daemon, std::path::PathBuf)> {
    let config = "/tmp/p2p-client-run.toml";
    std::fs::write(
        config,
        format!(
            "[servers.home]\nticket = \"{ticket}\"\n\n[[auto_attach]]\nserver = \"home\"\n\
             device = \"1209:0001\"\n\n[reconnect]\ninitial_ms = 200\nmax_ms = 2000\n"
        ),
    )?;
    let log_file = std::fs::File::create("/tmp/client-p2p.log")?;
    let child = nat::in_ns("cafe", CLIENT)
        .arg("--relay-ca")
        .arg(internet.ca())
        .args(["--config", config, "run"])
        .env("P2P_USB_CLIENT_KEY", "/tmp/keys/p2p-client.key")
        .env("RUST_LOG", LOG)
        .env("P2P_USB_IDLE_TIMEOUT_MS", idle_timeout_ms().to_string())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("starting p2p-usb-client run in the café network")?;
    let client = Daemon::adopt(child, "p2p-usb-client");
    let disk = usbdev::wait_block_device(SIM.0, SIM.1, usbdev::Via::Vhci, Duration::from_secs(60))
        .inspect_err(|_| {
            super::project::show_client_log("p2p");
            super::project::show_server_log();
        })
        .context("the remote disk never appeared through the relay")?;
    Ok((client, disk))
}
