//! Running the project's own binaries inside the guest: the server as a daemon with its ticket,
//! the client as a command or a daemon, each with its own key under /tmp/keys.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::report::log;
use crate::sys;

pub const SERVER: &str = "/usr/bin/p2p-usb-server";
pub const CLIENT: &str = "/usr/bin/p2p-usb-client";
/// The daemons' log filter: our own crates' debug lines (standard requests carried out, port
/// and stream ends; a few per attachment), everything else at info or quieter.
pub const DAEMON_LOG: &str = "info,server=debug,client=debug,transport=debug,iroh=warn,noq=warn";

/// A project daemon running as our child, killed when the scenario ends.
pub struct Daemon {
    child: Child,
    name: &'static str,
}

impl Daemon {
    /// Takes a started child as a daemon, killed when dropped.
    pub fn adopt(child: Child, name: &'static str) -> Daemon {
        Daemon { child, name }
    }

    /// Its process id, for /proc readings.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        log!("{} stopped", self.name);
    }
}

/// The daemons' idle timeout here: their 1.5 s default at the reference pace, stretched like
/// every other wall-clock limit on a slower guest. Under TCG a daemon's runtime can go
/// unscheduled for a second or more while the guest kernel works (the daemons warn when it
/// does), and a connection lost to that is the lab's pace, not the product's behaviour.
pub fn idle_timeout_ms() -> u64 {
    (1500.0 * sys::pace()).round() as u64
}

/// Starts `p2p-usb-server` with `args`, its log in /tmp, and waits for its ticket.
pub fn start_server(args: &[&str]) -> Result<(Daemon, String)> {
    start_server_on("127.0.0.1:0", args)
}

/// [`start_server`] on a fixed address, so a restarted server has the same ticket (its key
/// stays in /tmp/keys).
pub fn start_server_on(bind: &str, args: &[&str]) -> Result<(Daemon, String)> {
    start_server_in(None, bind, args)
}

/// [`start_server_on`] inside network namespace `ns`, if given.
pub fn start_server_in(ns: Option<&str>, bind: &str, args: &[&str]) -> Result<(Daemon, String)> {
    std::fs::create_dir_all("/tmp/keys")?;
    let ticket_file = Path::new("/tmp/server.ticket");
    let _ = std::fs::remove_file(ticket_file);
    let log_file = std::fs::File::create("/tmp/server.log")?;
    let child = program_in(ns, SERVER)
        .args(args)
        .args(["--bind", bind, "--ticket-file"])
        .arg(ticket_file)
        .env("P2P_USB_SERVER_KEY", "/tmp/keys/server.key")
        .env("RUST_LOG", DAEMON_LOG)
        .env("P2P_USB_IDLE_TIMEOUT_MS", idle_timeout_ms().to_string())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .context("starting p2p-usb-server")?;
    let mut server = Daemon {
        child,
        name: "p2p-usb-server",
    };
    let ticket = sys::wait_for("the server's ticket", Duration::from_secs(10), || {
        std::fs::read_to_string(ticket_file)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    });
    if !server.alive() || ticket.is_err() {
        let tail = std::fs::read_to_string("/tmp/server.log").unwrap_or_default();
        for line in tail
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            log!("server: {line}");
        }
        bail!("p2p-usb-server did not start");
    }
    Ok((server, ticket?))
}

/// `program`, inside network namespace `ns` if given.
pub fn program_in(ns: Option<&str>, program: &str) -> Command {
    match ns {
        Some(ns) => crate::nat::in_ns(ns, program),
        None => Command::new(program),
    }
}

/// Runs `p2p-usb-client` with the key named `who`; returns (success, stdout, stderr).
pub fn client(who: &str, args: &[&str]) -> Result<(bool, String, String)> {
    std::fs::create_dir_all("/tmp/keys")?;
    let out = Command::new(CLIENT)
        .args(args)
        .env("P2P_USB_CLIENT_KEY", format!("/tmp/keys/{who}.key"))
        .env("RUST_LOG", "warn")
        .env("P2P_USB_IDLE_TIMEOUT_MS", idle_timeout_ms().to_string())
        .output()
        .context("running p2p-usb-client")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Waits until `who` sees `vid_pid` in the server's list. A device the guest's sysfs already
/// shows may not have its usbfs node yet when the server enumerates, and then reaches the
/// server through hot-plug a moment later: attaching before that fails with "no shared device
/// matches".
pub fn wait_listed(who: &str, ticket: &str, vid_pid: &str) -> Result<()> {
    let mut last = String::new();
    sys::wait_for(
        &format!("the server to list {vid_pid}"),
        Duration::from_secs(20).mul_f64(sys::pace()),
        || match client(who, &["--json", "list", ticket]) {
            Ok((true, out, _)) if out.contains(vid_pid) => Some(()),
            Ok((_, out, err)) => {
                last = format!("{out}{err}");
                None
            }
            Err(e) => {
                last = format!("{e:#}");
                None
            }
        },
    )
    .with_context(|| format!("the last list said: {last}"))
}

/// The client's endpoint id (creating its key).
pub fn client_id(who: &str) -> Result<String> {
    let (ok, out, err) = client(who, &["id"])?;
    ensure!(ok, "p2p-usb-client id failed: {err}");
    Ok(out.trim().to_owned())
}

/// Prints the last lines of the server's log into the scenario's log.
pub fn show_server_log() {
    let text = std::fs::read_to_string("/tmp/server.log").unwrap_or_default();
    for line in text
        .lines()
        .rev()
        .take(15)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        log!("server: {line}");
    }
}

/// Starts `p2p-usb-client` with `args` as a daemon (e.g. `attach`), its output in
/// `/tmp/client-<who>.log`.
pub fn spawn_client(who: &str, args: &[&str]) -> Result<Daemon> {
    spawn_client_in(None, who, args)
}

/// [`spawn_client`] inside network namespace `ns`, if given.
pub fn spawn_client_in(ns: Option<&str>, who: &str, args: &[&str]) -> Result<Daemon> {
    spawn_client_with(ns, who, &[], args)
}

/// [`spawn_client_in`] with more environment for the daemon (a config file, say), which
/// overrides the lab's own (`RUST_LOG`, say).
pub fn spawn_client_with(
    ns: Option<&str>,
    who: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> Result<Daemon> {
    let log_file = std::fs::File::create(format!("/tmp/client-{who}.log"))?;
    let child = program_in(ns, CLIENT)
        .args(args)
        .env("P2P_USB_CLIENT_KEY", format!("/tmp/keys/{who}.key"))
        .env("RUST_LOG", DAEMON_LOG)
        .env("P2P_USB_IDLE_TIMEOUT_MS", idle_timeout_ms().to_string())
        .envs(env.iter().copied())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("starting p2p-usb-client")?;
    Ok(Daemon {
        child,
        name: "p2p-usb-client",
    })
}

/// Starts `p2p-usb-client attach` for `device` as `who` and waits for the remote device to be
/// a disk under vhci_hcd; prints both logs if it never is.
pub fn attach_disk(
    who: &str,
    ticket: &str,
    device: &str,
    vid: u16,
    pid: u16,
) -> Result<(Daemon, std::path::PathBuf)> {
    attach_disk_with(who, &[], ticket, device, vid, pid)
}

/// [`attach_disk`] with the client's global `flags` (`--read-ahead`, ...).
pub fn attach_disk_with(
    who: &str,
    flags: &[&str],
    ticket: &str,
    device: &str,
    vid: u16,
    pid: u16,
) -> Result<(Daemon, std::path::PathBuf)> {
    let mut args = flags.to_vec();
    args.extend(["--json", "attach", ticket, "--device", device]);
    let daemon = spawn_client(who, &args)?;
    let wait = |secs| {
        crate::usbdev::wait_block_device(
            vid,
            pid,
            crate::usbdev::Via::Vhci,
            Duration::from_secs(secs),
        )
    };
    // A disk normally shows within 3-6 s here; past 12, record where our daemons are stuck
    // while they still are.
    let found = wait(12).or_else(|_| {
        log!("no disk after 12 s; where the daemons are:");
        sys::log_threads(&["p2p-usb-server", "p2p-usb-client"]);
        wait(18)
    });
    match found {
        Ok(disk) => Ok((daemon, disk)),
        Err(e) => {
            show_client_log(who);
            show_server_log();
            Err(e.context("the remote device never became a disk under vhci_hcd"))
        }
    }
}

/// What a client daemon started by [`spawn_client`] has logged so far (empty if nothing).
pub fn client_log(who: &str) -> String {
    std::fs::read_to_string(format!("/tmp/client-{who}.log")).unwrap_or_default()
}

/// The number `name=N` in a daemon's log line (the client's `read-ahead` line, both daemons'
/// connection totals), if the line has one.
pub fn log_count(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .and_then(|n| n.parse().ok())
}

/// Prints the last lines of a client daemon's log into the scenario's log.
pub fn show_client_log(who: &str) {
    for line in client_log(who)
        .lines()
        .rev()
        .take(15)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        log!("client: {line}");
    }
}

impl Daemon {
    /// Waits up to `timeout` for the process to exit on its own; its success if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<bool> {
        sys::wait_for("the process to exit", timeout, || {
            self.child.try_wait().ok().flatten()
        })
        .ok()
        .map(|status| status.success())
    }
}

/// Stops a `p2p-usb-client run` as systemd would (SIGTERM), so it detaches what it holds.
pub fn stop_supervisor(mut supervisor: Daemon) {
    let pid = supervisor.pid().to_string();
    let _ = sys::run(sys::bb("kill").args(["-TERM", &pid]));
    let _ = supervisor.wait_exit(Duration::from_secs(10));
}

/// Waits up to `timeout` until `vid:pid` is a disk under vhci whose first `checked` bytes hash
/// to `want` (an md5 from [`crate::bench::md5`]); prints both daemons' logs if it never is.
pub fn wait_readable(
    vid: u16,
    pid: u16,
    want: &str,
    checked: usize,
    timeout: Duration,
) -> Result<std::path::PathBuf> {
    let started = std::time::Instant::now();
    let outcome = sys::wait_for("the remote disk to be readable", timeout, || {
        let disk = crate::usbdev::find_block_device_for(vid, pid, crate::usbdev::Via::Vhci)?;
        // A disk that is still being set up (or torn down) refuses opens for a moment.
        let got = crate::bench::md5(&disk, Some(checked)).ok()?;
        Some((disk, got))
    });
    match outcome {
        Ok((disk, got)) => {
            ensure!(
                got == want,
                "{} read back different data after {:.1}s",
                disk.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(disk)
        }
        Err(e) => {
            show_client_log("friend");
            show_server_log();
            Err(e)
        }
    }
}

/// Detaches the one port in use with `p2p-usb-client detach` as `who`, and checks that the
/// `attach` process `attached` then ends on its own, successfully.
pub fn detach_and_wait(who: &str, attached: &mut Daemon) -> Result<()> {
    let (ok, _, err) = client(who, &["detach", &vhci_port_in_use()?])?;
    ensure!(ok, "detach failed: {err}");
    ensure!(
        attached.wait_exit(Duration::from_secs(10)) == Some(true),
        "the attach process did not end cleanly after detach"
    );
    Ok(())
}

const VHCI_STATUS: &str = "/sys/devices/platform/vhci_hcd.0/status";

/// vhci's status lines (after the header) of the ports in use; state 004 is a free port.
fn used_lines(status: &str) -> impl Iterator<Item = &str> {
    status
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(2) != Some("004"))
}

/// How many vhci ports are in use, with vhci's status text for messages.
pub fn vhci_ports_in_use() -> Result<(usize, String)> {
    let status = sys::read(VHCI_STATUS)?;
    Ok((used_lines(&status).count(), status))
}

/// The number of the first vhci port in use, as `detach` takes it.
pub fn vhci_port_in_use() -> Result<String> {
    let status = sys::read(VHCI_STATUS)?;
    let port = used_lines(&status)
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no vhci port in use")?
        .trim_start_matches('0')
        .to_owned();
    Ok(if port.is_empty() { "0".into() } else { port })
}

/// The set-up most scenarios start from: a patterned disk gadget plugged into dummy_hcd and
/// shared by our server (on loopback) to named clients only. Dropped, it stops the server
/// first and unplugs the gadget after, the order the scenarios always had.
pub struct SharedDisk {
    /// The server daemon.
    pub server: Daemon,
    /// Its ticket.
    pub ticket: String,
    /// The gadget's `vid:pid`, as `--share` and `--device` take it.
    pub vid_pid: String,
    /// The backing file, for comparing what the client reads.
    pub backing: std::path::PathBuf,
    /// The disk gadget, enumerated locally.
    pub gadget: crate::gadget::Gadget,
}

impl SharedDisk {
    /// A `size`-byte disk at `/tmp/<name>.img` filled from `seed`, shared to `friend`.
    pub fn start(name: &str, size: usize, seed: u64) -> Result<SharedDisk> {
        SharedDisk::start_for(name, size, seed, &["friend"])
    }

    /// The same, allowed to every client of `clients` (each gets its key now).
    pub fn start_for(name: &str, size: usize, seed: u64, clients: &[&str]) -> Result<SharedDisk> {
        crate::modules::load(crate::modules::STORAGE)?;
        crate::modules::load(crate::modules::USBIP)?;
        let backing = std::path::PathBuf::from(format!("/tmp/{name}.img"));
        crate::bench::pattern_file(&backing, size, seed)?;
        let gadget = crate::gadget::Gadget::local_disk(&backing)?;
        let vid_pid = gadget.vid_pid();
        let mut args = vec!["--share".to_owned(), vid_pid.clone()];
        for who in clients {
            args.extend(["--allow".to_owned(), client_id(who)?]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (server, ticket) = start_server(&args)?;
        Ok(SharedDisk {
            server,
            ticket,
            vid_pid,
            backing,
            gadget,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::log_count;

    #[test]
    fn log_count_reads_only_the_named_field() {
        let line = "INFO client::attach: read-ahead speculated=115 hits=111 write_cbws_ahead=84";
        assert_eq!(log_count(line, "hits"), Some(111));
        assert_eq!(log_count(line, "write_cbws_ahead"), Some(84));
        assert_eq!(
            log_count(line, "write_cbws"),
            None,
            "a prefix of a name is not the name"
        );
        assert_eq!(log_count(line, "ahead"), None);
        assert_eq!(log_count("hits=many", "hits"), None);
    }
}
