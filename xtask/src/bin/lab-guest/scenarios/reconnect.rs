//! The network drops and the server restarts: `p2p-usb-client run` (what the systemd service
//! runs) must bring the device back by itself each time, with its data intact and no ghost
//! vhci port. Before that, network interfaces come and go under a read, and the attachment
//! must not even notice.
//!
//! A 10 s cut (netem 100 % loss on the guest's loopback) outlasts the QUIC idle timeout, so
//! both sides end the attachment; the server gives the device back to its kernel driver and
//! the client detaches its port. When the path returns, the client's back-off reconnects and
//! its auto-attach rule attaches the device again. A killed server restarted on the same
//! address with the same key has the same ticket, and the client comes back the same way.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::project::{
    client, client_id, show_client_log, show_server_log, spawn_client, start_server_on,
    stop_supervisor, vhci_port_in_use, vhci_ports_in_use, wait_readable,
};
use crate::bench::{self, MIB};
use crate::gadget::Gadget;
use crate::report::{log, metric};
use crate::usbdev::{self, Via};
use crate::{modules, netem, sys};

const SIZE: usize = 16 * MIB;
const CHECKED: usize = 4 * MIB;
const BIND: &str = "127.0.0.1:47811";
const CUT: Duration = Duration::from_secs(10);
/// Interfaces added and removed under one read, at most.
const MAX_CHURN: usize = 40;
const IP: &str = "/usr/sbin/ip";
/// From the path's return (or the server's restart) to the device readable again: the
/// back-off is capped at 2 s in this config, an attach takes ~3 s under TCG.
const RECOVER: Duration = Duration::from_secs(30);

/// Network cut, then server restart, with the client's supervisor keeping the disk attached.
pub fn run() -> Result<()> {
    modules::load(modules::STORAGE)?;
    modules::load(modules::USBIP)?;
    modules::load(modules::NETEM)?;
    let backing = Path::new("/tmp/reconnect.img");
    bench::pattern_file(backing, SIZE, 0x5e)?;
    let want = bench::md5(backing, Some(CHECKED))?;
    let gadget = Gadget::local_disk(backing)?;
    let vid_pid = gadget.vid_pid();
    let friend = client_id("friend")?;
    let share = ["--share", vid_pid.as_str(), "--allow", friend.as_str()];
    let (server, ticket) = start_server_on(BIND, &share)?;
    let config = Path::new("/tmp/client-run.toml");
    std::fs::write(
        config,
        format!(
            "[servers.lab]\nticket = \"{ticket}\"\n\n[[auto_attach]]\nserver = \"lab\"\n\
             device = \"{vid_pid}\"\n\n[reconnect]\ninitial_ms = 200\nmax_ms = 2000\n"
        ),
    )?;
    let supervisor = spawn_client("friend", &["--config", "/tmp/client-run.toml", "run"])?;
    let remote = || usbdev::find_block_device_for(gadget.vid, gadget.pid, Via::Vhci);
    let disk = wait_readable(
        gadget.vid,
        gadget.pid,
        &want,
        CHECKED,
        Duration::from_secs(30),
    )?;
    log!("auto-attached as {}", disk.display());

    // 1. Network interfaces come and go under a read (a USB network adapter plugged, a VPN
    //    brought up, Wi-Fi roaming): each is a link change to iroh, which rebinds its sockets
    //    and re-checks its paths. The attachment must ride through them: the same port, the
    //    disk never gone, the read byte-exact.
    let port = vhci_port_in_use()?;
    let churned = churn_under_read(&disk, backing, || remote().is_some()).inspect_err(|_| {
        show_client_log("friend");
        show_server_log();
    })?;
    ensure!(
        vhci_port_in_use()? == port,
        "the attachment moved to another port during the interface churn"
    );
    log!(
        "interface churn: {churned} interfaces came and went under a 16 MiB read, the attachment stayed"
    );
    metric("interfaces_churned", churned as f64);

    // 2. The network is cut for 10 s.
    netem::set(Duration::ZERO, 100.0)?;
    let cut_at = Instant::now();
    let went = sys::wait_for("the remote disk to go during the cut", CUT, || {
        remote().is_none().then(|| cut_at.elapsed().as_secs_f64())
    });
    std::thread::sleep(CUT.saturating_sub(cut_at.elapsed()));
    netem::clear()?;
    let back_at = Instant::now();
    let went = went.with_context(|| {
        format!(
            "the attachment outlived a 10 s cut (the daemons' idle timeout is {} ms)",
            super::project::idle_timeout_ms()
        )
    })?;
    log!("network cut: the remote disk went after {went:.2}s (the attachment timed out)");
    let disk = wait_readable(gadget.vid, gadget.pid, &want, CHECKED, RECOVER)
        .context("the client did not re-attach after the network came back")?;
    let recovered = back_at.elapsed().as_secs_f64();
    log!(
        "network back: re-attached as {} and read byte-exact {recovered:.2}s later",
        disk.display()
    );
    metric("net_cut_gone_secs", went);
    metric("net_cut_recover_secs", recovered);
    one_port_in_use()?;

    // 3. The server is killed and started again on the same address with the same key. (A
    //    killed server cannot hand the device back to its kernel driver; the new one claims it
    //    as it finds it.)
    drop(server);
    sys::wait_for("the remote disk to go with the server", RECOVER, || {
        remote().is_none().then_some(())
    })?;
    let (mut server, again) = start_server_on(BIND, &share)?;
    ensure!(
        again == ticket,
        "the restarted server has another ticket: {again}"
    );
    let restarted_at = Instant::now();
    let disk = wait_readable(gadget.vid, gadget.pid, &want, CHECKED, RECOVER)
        .context("the client did not re-attach to the restarted server")?;
    let recovered = restarted_at.elapsed().as_secs_f64();
    log!(
        "server restarted: re-attached as {} and read byte-exact {recovered:.2}s later",
        disk.display()
    );
    metric("server_restart_recover_secs", recovered);
    one_port_in_use()?;

    let (ok, _, err) = client("friend", &["detach", &vhci_port_in_use()?])?;
    ensure!(ok, "detach failed: {err}");
    sys::wait_for("the remote disk to go after detach", RECOVER, || {
        remote().is_none().then_some(())
    })?;
    ensure!(server.alive(), "the restarted server died");
    stop_supervisor(supervisor);
    Ok(())
}

fn one_port_in_use() -> Result<()> {
    let (used, status) = vhci_ports_in_use()?;
    ensure!(used == 1, "{used} vhci ports in use, want 1:\n{status}");
    Ok(())
}

/// Adds and removes a veth pair with addresses, again and again, while `disk` is read whole
/// and checked against `backing`; how many pairs came and went. Fails if the disk went away
/// or the read was not byte-exact.
fn churn_under_read(disk: &Path, backing: &Path, present: impl Fn() -> bool) -> Result<usize> {
    modules::load(modules::NAT)?;
    sys::write("/proc/sys/vm/drop_caches", "3")?;
    let reader = {
        let (disk, backing) = (disk.to_owned(), backing.to_owned());
        std::thread::spawn(move || bench::read_verify_mib_s(&disk, SIZE, &backing))
    };
    let ip = |args: &[&str]| sys::run(Command::new(IP).args(args)).map(drop);
    let mut churned = 0;
    while !reader.is_finished() && churned < MAX_CHURN {
        let (a, b) = (format!("churn{churned}a"), format!("churn{churned}b"));
        let addr = format!("10.77.{}.1/24", churned % 250);
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
        ip(&["addr", "add", &addr, "dev", &a])?;
        ip(&["link", "set", &a, "up"])?;
        ip(&["link", "set", &b, "up"])?;
        std::thread::sleep(Duration::from_millis(300));
        ip(&["link", "del", &a])?;
        churned += 1;
        ensure!(
            present(),
            "the remote disk went away after {churned} interfaces came and went"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mib_s = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader panicked"))?
        .context("the read under interface churn")?;
    metric("churn_read_mib_s", mib_s);
    ensure!(churned > 0, "the read ended before any interface came");
    Ok(churned)
}
