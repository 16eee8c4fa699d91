//! Which way a connection's packets go now: through a relay, or directly between the peers.
//!
//! A connection behind NAT starts on the relay and moves to a direct path once hole punching
//! succeeds (or stays on the relay when the NATs never allow one). Users ask "am I relayed?"
//! first when a device is slow, so both daemons show the path in `status` and their TUIs,
//! count changes, and log each one.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use iroh::TransportAddr;
use iroh::endpoint::{Connection, VarInt};
use serde::{Deserialize, Serialize};
use tracing::info;

/// How often a connection's selected path is looked at.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// The path a connection's data takes now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathView {
    /// Through a relay (else direct).
    pub relay: bool,
    /// The relay's URL or the peer's address.
    pub remote: String,
    /// QUIC's round-trip estimate on it, in milliseconds.
    pub rtt_ms: f64,
}

impl fmt::Display for PathView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.relay { "relay" } else { "direct" };
        write!(f, "{kind} {} ({:.1} ms)", self.remote, self.rtt_ms)
    }
}

/// Closes `conn` with `code` and `reason`, and logs its totals under the `audit` target: packets
/// and bytes each way, loss, the selected path's round trip, congestion window and MTU, and
/// what the packets this side sent carried besides stream data (acknowledgements, flow-control
/// credit, pings). Those explain a slow link (each side's loss is its own sending direction's;
/// a side that sends many packets without data pays for each under a slow CPU), and the path's
/// are gone once the connection is closed.
pub fn close_and_log(conn: &Connection, peer: &str, code: u32, reason: &str) {
    let path = conn
        .paths()
        .iter()
        .find(|p| p.is_selected())
        .map(|p| p.stats())
        .unwrap_or_default();
    conn.close(VarInt::from_u32(code), reason.as_bytes());
    let stats = conn.stats();
    info!(
        target: "audit",
        %peer,
        sent_packets = stats.sent_packets,
        lost_packets = stats.lost_packets,
        udp_tx_datagrams = stats.udp_tx.datagrams,
        udp_tx_bytes = stats.udp_tx.bytes,
        udp_rx_datagrams = stats.udp_rx.datagrams,
        udp_rx_bytes = stats.udp_rx.bytes,
        rtt_us = path.rtt.as_micros() as u64,
        cwnd = path.cwnd,
        congestion_events = path.congestion_events,
        mtu = path.current_mtu,
        stream_frames_tx = stats.frame_tx.stream,
        ack_frames_tx = stats.frame_tx.acks + stats.frame_tx.path_acks,
        max_data_frames_tx = stats.frame_tx.max_data,
        max_stream_data_frames_tx = stats.frame_tx.max_stream_data,
        ping_frames_tx = stats.frame_tx.ping + stats.frame_tx.immediate_ack,
        "disconnected"
    );
}

/// The connection's selected path, if it has one.
pub fn selected(conn: &Connection) -> Option<PathView> {
    let paths = conn.paths();
    let path = paths.iter().find(|p| p.is_selected())?;
    let (relay, remote) = match path.remote_addr() {
        TransportAddr::Relay(url) => (true, url.to_string()),
        TransportAddr::Ip(addr) => (false, addr.to_string()),
        other => (false, format!("{other:?}")),
    };
    Some(PathView {
        relay,
        remote,
        rtt_ms: path.rtt().as_secs_f64() * 1e3,
    })
}

/// Counts the changes of `conn`'s selected path into `changes` and logs each, naming `peer`,
/// until the connection closes.
pub async fn watch(conn: Connection, peer: String, changes: Arc<AtomicU64>) {
    let key = |p: &PathView| (p.relay, p.remote.clone());
    let mut last = selected(&conn);
    if let Some(p) = &last {
        info!(%peer, path = %p, "connection path");
    }
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            _ = tokio::time::sleep(WATCH_EVERY) => {}
        }
        let Some(now) = selected(&conn) else {
            continue;
        };
        if last.as_ref().map(key) != Some(key(&now)) {
            if let Some(before) = &last {
                changes.fetch_add(1, Ordering::Relaxed);
                info!(%peer, from = %before, to = %now, "connection path changed");
            } else {
                info!(%peer, path = %now, "connection path");
            }
            last = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_reads_as_its_kind_address_and_round_trip() {
        let direct = PathView {
            relay: false,
            remote: "10.0.0.2:4000".into(),
            rtt_ms: 3.04,
        };
        assert_eq!(direct.to_string(), "direct 10.0.0.2:4000 (3.0 ms)");
        let relay = PathView {
            relay: true,
            remote: "https://relay.example.org/".into(),
            rtt_ms: 20.0,
        };
        assert_eq!(
            relay.to_string(),
            "relay https://relay.example.org/ (20.0 ms)"
        );
    }
}
