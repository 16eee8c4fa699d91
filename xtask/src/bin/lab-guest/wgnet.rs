//! The bench's two hosts on one wire: network namespaces `bsrv` and `bcli` joined by a veth
//! pair, with a WireGuard tunnel (the kernel's `wireguard` module, Debian's `wg`) over it.
//! A careful user runs the kernel's USB/IP inside WireGuard, because USB/IP itself has no
//! encryption and no authentication: that is the anchor our tunnel is measured against, over
//! the same veth pair and the same netem delay.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::nat::{in_ns, ip};
use crate::report::log;
use crate::{modules, sys};

const IP: &str = "/usr/sbin/ip";
const TC: &str = "/usr/sbin/tc";
const WG: &str = "/usr/bin/wg";
const WG_PORT: &str = "51820";

/// The server's side: its veth address (what our tunnel's server binds) and its WireGuard
/// address (what the kernel's USB/IP is reached at).
pub const SERVER_NS: &str = "bsrv";
pub const SERVER_VETH_IP: &str = "10.99.0.1";
pub const SERVER_WG_IP: &str = "10.98.0.1";
/// The client's side.
pub const CLIENT_NS: &str = "bcli";
const CLIENT_VETH_IP: &str = "10.99.0.2";
const CLIENT_WG_IP: &str = "10.98.0.2";
/// (namespace, veth end) of each side, for netem.
const ENDS: [(&str, &str); 2] = [(SERVER_NS, "vsrv"), (CLIENT_NS, "vcli")];

/// The two namespaces, deleted (with everything in them) on drop.
pub struct WirePair(());

/// Whether this kernel and initramfs can build the pair (the module and `wg` are optional).
pub fn available() -> bool {
    modules::available("wireguard") && std::path::Path::new(WG).exists()
}

/// A fresh WireGuard private key and its public key, from `wg`.
fn keypair() -> Result<(String, String)> {
    let out = Command::new(WG).arg("genkey").output()?;
    ensure!(out.status.success(), "wg genkey failed");
    let private = String::from_utf8(out.stdout)?.trim().to_owned();
    let mut child = Command::new(WG)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("wg pubkey's stdin")?
        .write_all(format!("{private}\n").as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "wg pubkey failed");
    Ok((private, String::from_utf8(out.stdout)?.trim().to_owned()))
}

impl WirePair {
    /// Builds both namespaces, the veth pair and the WireGuard tunnel, and checks that a ping
    /// crosses the tunnel.
    pub fn build() -> Result<WirePair> {
        modules::load(&["veth", "wireguard"])?;
        for ns in [SERVER_NS, CLIENT_NS] {
            let _ = sys::run(Command::new(IP).args(["netns", "del", ns]));
        }
        let pair = WirePair(());
        for ns in [SERVER_NS, CLIENT_NS] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "link", "add", "vsrv", "netns", SERVER_NS, "type", "veth", "peer", "name", "vcli",
            "netns", CLIENT_NS,
        ])?;
        let server_key = keypair()?;
        let client_key = keypair()?;
        for (ns, dev, veth_ip, wg_ip, own, peer, peer_ip, peer_wg) in [
            (
                SERVER_NS,
                "vsrv",
                SERVER_VETH_IP,
                SERVER_WG_IP,
                &server_key,
                &client_key,
                CLIENT_VETH_IP,
                CLIENT_WG_IP,
            ),
            (
                CLIENT_NS,
                "vcli",
                CLIENT_VETH_IP,
                CLIENT_WG_IP,
                &client_key,
                &server_key,
                SERVER_VETH_IP,
                SERVER_WG_IP,
            ),
        ] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{veth_ip}/24"),
                "dev",
                dev,
            ])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "add", "wg0", "type", "wireguard"])?;
            let key_file = format!("/tmp/wg-{ns}.key");
            std::fs::write(&key_file, format!("{}\n", own.0))?;
            sys::run(in_ns(ns, WG).args([
                "set",
                "wg0",
                "listen-port",
                WG_PORT,
                "private-key",
                &key_file,
                "peer",
                &peer.1,
                "allowed-ips",
                &format!("{peer_wg}/32"),
                "endpoint",
                &format!("{peer_ip}:{WG_PORT}"),
            ]))?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{wg_ip}/24"),
                "dev",
                "wg0",
            ])?;
            ip(&["-n", ns, "link", "set", "wg0", "up"])?;
        }
        sys::wait_for("a ping through WireGuard", Duration::from_secs(20), || {
            in_ns(CLIENT_NS, "/bin/busybox")
                .args(["ping", "-c", "1", "-W", "2", SERVER_WG_IP])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()
                .filter(|s| s.success())
        })?;
        log!(
            "namespaces {SERVER_NS} ({SERVER_VETH_IP}, WireGuard {SERVER_WG_IP}) and {CLIENT_NS} ({CLIENT_VETH_IP}, WireGuard {CLIENT_WG_IP}) on one veth pair"
        );
        Ok(pair)
    }

    /// A round trip of `rtt` on the veth pair (half on each end), or none.
    pub fn set_rtt(&self, rtt: Duration) -> Result<()> {
        modules::load(modules::NETEM)?;
        for (ns, dev) in ENDS {
            if rtt.is_zero() {
                let _ = sys::run(in_ns(ns, TC).args(["qdisc", "del", "dev", dev, "root"]));
            } else {
                let half = format!("{}us", rtt.as_micros() / 2);
                sys::run(in_ns(ns, TC).args([
                    "qdisc", "replace", "dev", dev, "root", "netem", "delay", &half,
                ]))?;
            }
        }
        Ok(())
    }
}

impl Drop for WirePair {
    fn drop(&mut self) {
        for ns in [SERVER_NS, CLIENT_NS] {
            let _ = sys::run(Command::new(IP).args(["netns", "del", ns]));
        }
    }
}
