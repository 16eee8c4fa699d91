//! A small internet inside the VM for the peer-to-peer scenarios: a relay, a "home" network
//! with the server behind one NAT router and a "café" network with the client behind another,
//! each a network namespace joined to the next by a veth pair. The routers masquerade with
//! nftables, as a home router does; netem delays make the relay path slower than the direct
//! one, so a switch shows in the round trip. The VM has no network card: nothing here can
//! leave it.
//!
//! ```text
//!  home 192.168.1.2 ─ homenat (NAT) 203.0.113.2 ─┐
//!                                                inet ─ 192.0.2.1 relay
//!  cafe 192.168.2.2 ─ cafenat (NAT) 198.51.100.2 ─┘
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::report::log;
use crate::{modules, sys};

const IP: &str = "/usr/sbin/ip";
const NFT: &str = "/usr/sbin/nft";
const TC: &str = "/usr/sbin/tc";
const RELAY: &str = "/usr/bin/lab-relay";
const NAMESPACES: &[&str] = &["inet", "relay", "homenat", "cafenat", "home", "cafe"];
/// The relay's address, in its own namespace behind `inet`.
pub const RELAY_IP: &str = "192.0.2.1";
/// Where the relay writes its self-signed certificate, for the peers' `--relay-ca`.
pub const RELAY_CA: &str = "/tmp/relay-ca.pem";
/// One way on each link to the relay: the relay path's round trip is 4x this longer.
const RELAY_DELAY: &str = "15ms";
/// One way on each NAT's uplink: the direct path's round trip is 2x this.
const UPLINK_DELAY: &str = "5ms";

/// A home router's rules: masquerade out of `wan`; from `wan`, only replies.
const HOME_ROUTER: &str = "\
table ip nat {
 chain post {
  type nat hook postrouting priority srcnat; policy accept;
  oifname \"wan\" masquerade
 }
}
table ip filter {
 chain input {
  type filter hook input priority filter; policy drop;
  iifname != \"wan\" accept
  ct state established,related accept
 }
 chain forward {
  type filter hook forward priority filter; policy drop;
  iifname \"lan\" accept
  ct state established,related accept
 }
}
";

/// The namespaces and the relay; torn down on drop.
pub struct Internet {
    relay: Option<Child>,
}

/// `program` run inside namespace `ns`.
pub fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new(IP);
    c.args(["netns", "exec", ns, program]);
    c
}

/// Runs Debian's `ip` with `args`.
pub fn ip(args: &[&str]) -> Result<()> {
    sys::run(Command::new(IP).args(args)).map(drop)
}

/// A veth pair from `a` (address `a_addr`) to `b` (address `b_addr`), both up.
fn link(a: (&str, &str, &str), b: (&str, &str, &str)) -> Result<()> {
    let ((a_ns, a_if, a_addr), (b_ns, b_if, b_addr)) = (a, b);
    ip(&[
        "link", "add", a_if, "netns", a_ns, "type", "veth", "peer", "name", b_if, "netns", b_ns,
    ])?;
    for (ns, dev, addr) in [(a_ns, a_if, a_addr), (b_ns, b_if, b_addr)] {
        ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
    }
    Ok(())
}

fn nft(ns: &str, name: &str, rules: &str) -> Result<()> {
    let path = format!("/tmp/{name}.nft");
    std::fs::write(&path, rules)?;
    sys::run(in_ns(ns, NFT).args(["-f", &path])).map(drop)
}

fn delay(ns: &str, dev: &str, by: &str) -> Result<()> {
    sys::run(in_ns(ns, TC).args(["qdisc", "add", "dev", dev, "root", "netem", "delay", by]))
        .map(drop)
}

impl Internet {
    /// Builds the networks and starts the relay; waits until it listens. `inet` drops traffic
    /// between the two NATs until [`Internet::allow_direct`], so only the relay connects them.
    pub fn build() -> Result<Internet> {
        modules::load(modules::NAT)?;
        // A scenario that failed half-way may have left some behind.
        for ns in NAMESPACES {
            let _ = sys::run(Command::new(IP).args(["netns", "del", ns]));
        }
        let mut internet = Internet { relay: None };
        for ns in NAMESPACES {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        link(
            ("home", "lan0", "192.168.1.2/24"),
            ("homenat", "lan", "192.168.1.1/24"),
        )?;
        link(
            ("cafe", "lan0", "192.168.2.2/24"),
            ("cafenat", "lan", "192.168.2.1/24"),
        )?;
        link(
            ("homenat", "wan", "203.0.113.2/24"),
            ("inet", "home", "203.0.113.1/24"),
        )?;
        link(
            ("cafenat", "wan", "198.51.100.2/24"),
            ("inet", "cafe", "198.51.100.1/24"),
        )?;
        link(
            ("relay", "r0", "192.0.2.1/24"),
            ("inet", "relay", "192.0.2.254/24"),
        )?;
        for (ns, via) in [
            ("home", "192.168.1.1"),
            ("cafe", "192.168.2.1"),
            ("homenat", "203.0.113.1"),
            ("cafenat", "198.51.100.1"),
            ("relay", "192.0.2.254"),
        ] {
            ip(&["-n", ns, "route", "add", "default", "via", via])?;
        }
        for ns in ["inet", "homenat", "cafenat"] {
            sys::run(in_ns(ns, "/bin/busybox").args([
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward",
            ]))?;
        }
        // Each router rewrites what leaves through its uplink to its own address and lets back
        // only what answers it, dropping the rest unanswered: a home router. (Answering an
        // unsolicited packet would leave a conntrack entry on the port its NAT mapping uses,
        // and the next mapping would move to another port, as a symmetric NAT does.)
        for ns in ["homenat", "cafenat"] {
            nft(ns, ns, HOME_ROUTER)?;
        }
        nft(
            "inet",
            "no-direct",
            "table ip filter {\n chain forward {\n  type filter hook forward priority filter; policy accept;\n  ip saddr 203.0.113.0/24 ip daddr 198.51.100.0/24 drop\n  ip saddr 198.51.100.0/24 ip daddr 203.0.113.0/24 drop\n }\n}\n",
        )?;
        delay("relay", "r0", RELAY_DELAY)?;
        delay("inet", "relay", RELAY_DELAY)?;
        delay("inet", "home", UPLINK_DELAY)?;
        delay("inet", "cafe", UPLINK_DELAY)?;

        // A fresh certificate per scenario; a restart within one keeps it.
        let _ = std::fs::remove_file(RELAY_CA);
        let _ = std::fs::remove_file(Path::new(RELAY_CA).with_extension("key"));
        internet.start_relay()?;
        log!(
            "networks up: server side behind NAT 203.0.113.2, client side behind NAT 198.51.100.2, relay https://{RELAY_IP}/; nothing between the NATs but through the relay yet"
        );
        Ok(internet)
    }

    /// Lets traffic between the NATs through: hole punching can work from now on. The café
    /// network also gains an address (as a DHCP renewal or a second uplink gives), which makes
    /// iroh try hole punching again at once rather than at its next one-minute check.
    pub fn allow_direct(&self) -> Result<()> {
        sys::run(in_ns("inet", NFT).args(["delete", "table", "ip", "filter"]))?;
        ip(&["-n", "cafe", "addr", "add", "192.168.2.3/24", "dev", "lan0"])?;
        log!("the NATs can reach each other now");
        Ok(())
    }

    /// Starts the relay (again, with the same certificate) and waits until it listens.
    pub fn start_relay(&mut self) -> Result<()> {
        let log_file = std::fs::File::create("/tmp/relay.log")?;
        let child = in_ns("relay", RELAY)
            .args([RELAY_IP, RELAY_CA])
            .env("RUST_LOG", "warn")
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .stdin(Stdio::null())
            .spawn()
            .context("starting lab-relay")?;
        self.relay = Some(child);
        let ready = sys::wait_for("the relay to listen", Duration::from_secs(30), || {
            let log = std::fs::read_to_string("/tmp/relay.log").ok()?;
            log.contains("lab-relay: ready").then_some(())
        });
        if ready.is_err() {
            for line in std::fs::read_to_string("/tmp/relay.log")
                .unwrap_or_default()
                .lines()
            {
                log!("relay: {line}");
            }
            bail!("lab-relay did not start");
        }
        Ok(())
    }

    /// Stops the relay, as an outage would.
    pub fn stop_relay(&mut self) {
        if let Some(mut relay) = self.relay.take() {
            let _ = relay.kill();
            let _ = relay.wait();
            log!("relay stopped");
        }
    }

    /// The relay's URL, as peers configure it.
    pub fn relay_url(&self) -> String {
        format!("https://{RELAY_IP}/")
    }

    /// A certificate that is not the relay's, for the peers to wrongly trust.
    pub fn wrong_ca(&self) -> Result<PathBuf> {
        let path = PathBuf::from("/tmp/wrong-ca.pem");
        sys::run(
            Command::new(RELAY)
                .args(["--cert-only", RELAY_IP])
                .arg(&path),
        )?;
        Ok(path)
    }

    /// The relay's CA file.
    pub fn ca(&self) -> PathBuf {
        PathBuf::from(RELAY_CA)
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        if let Some(mut relay) = self.relay.take() {
            let _ = relay.kill();
            let _ = relay.wait();
        }
        for ns in NAMESPACES {
            let _ = Command::new(IP).args(["netns", "del", ns]).status();
        }
    }
}
