//! Binding an iroh endpoint with every network feature explicit.
//!
//! iroh's defaults reach out to relays, DNS discovery and the router's port mapper. A server on
//! a LAN or in a test must start and work with all of them off, and must never wait on any of
//! them without a timeout; so nothing here is implied by a preset.

use std::net::SocketAddr;
use std::time::Duration;

use iroh::address_lookup::{DnsAddressLookup, PkarrPublisher, PkarrResolver};
use iroh::endpoint::{MtuDiscoveryConfig, PortmapperConfig, QuicTransportConfig, VarInt, presets};
use iroh::tls::CaTlsConfig;
use iroh::{Endpoint, RelayMap, RelayMode, SecretKey};

use crate::cipher::{CipherSetting, Suite, crypto_provider};
use crate::relay::Relays;

/// The largest UDP payload over IPv4.
const MAX_UDP_PAYLOAD: u16 = 65_507;

/// Unacknowledged bytes an endpoint holds for one connection. QUIC's default (10 MB) is sized
/// for 100 Mbit/s at 100 ms; this covers USB 2's 40 MB/s up to a 50 ms round trip (the design's
/// real networks are 5-20 ms), and bounds what a connection pins in our memory: the RSS
/// budget is 20 MB per process, and a 1 MiB URB is in flight here while the next is encoded.
const SEND_WINDOW: u64 = 2 * 1024 * 1024;
/// Bytes a peer may send on one connection ahead of what we have read, over all its streams.
/// QUIC's default is unlimited (only each stream's 1.25 MB window bounds it, times up to 256
/// streams); four times the send window leaves room for several endpoints' URBs at once.
const RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;

/// The UDP socket buffers iroh asks the kernel for (netwatch's `SOCKET_BUFFER_SIZE`), each way.
pub const UDP_BUFFER_WANTED: u64 = 7 << 20;

/// Where Linux caps what a socket may ask for.
const UDP_BUFFER_CAPS: [&str; 2] = ["/proc/sys/net/core/rmem_max", "/proc/sys/net/core/wmem_max"];

/// What to tell a user whose kernel caps socket buffers below [`UDP_BUFFER_WANTED`], given the
/// caps as read (`None` where unreadable, e.g. not Linux). Measured in the lab: with Debian's
/// 208 KiB cap the receiving daemon's socket overflowed on bursts (16-40 datagrams per 32 MiB
/// read at RTT 0), each drop a loss and a congestion event for the sender.
pub fn udp_buffer_advice(caps: [Option<u64>; 2]) -> Option<String> {
    let low: Vec<String> = UDP_BUFFER_CAPS
        .iter()
        .zip(caps)
        .filter_map(|(path, cap)| {
            let cap = cap.filter(|&c| c < UDP_BUFFER_WANTED)?;
            let name = path.trim_start_matches("/proc/sys/").replace('/', ".");
            Some(format!("{name} is {} KiB", cap / 1024))
        })
        .collect();
    if low.is_empty() {
        return None;
    }
    Some(format!(
        "{}, below the {} KiB the QUIC socket asks for: bursts of large URBs will drop packets \
         and slow transfers. Raise it with `sudo sysctl -w net.core.rmem_max={UDP_BUFFER_WANTED} \
         net.core.wmem_max={UDP_BUFFER_WANTED}`, or for good by installing \
         server/deploy/99-p2p-usb-udp.conf into /etc/sysctl.d/",
        low.join(" and "),
        UDP_BUFFER_WANTED / 1024
    ))
}

/// Warns once per process when the kernel caps UDP socket buffers below what iroh asks for.
fn warn_if_udp_buffers_capped() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let caps = UDP_BUFFER_CAPS.map(|path| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|v| v.trim().parse().ok())
        });
        if let Some(advice) = udp_buffer_advice(caps) {
            tracing::warn!("{advice}");
        }
    });
}

/// How an endpoint reaches the network.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Local addresses to bind. Empty means iroh's defaults (all interfaces, IPv4 and IPv6).
    pub bind: Vec<SocketAddr>,
    /// The relays for NAT traversal.
    pub relays: Relays,
    /// The AEAD this end puts first (see [`crate::cipher`]).
    pub cipher: Suite,
    /// Ask the local router for a port mapping (UPnP, PCP, NAT-PMP).
    pub port_mapping: bool,
    /// Close a connection after this long without hearing from the peer: that is how a killed
    /// client's claim gets released. See [`NetConfig::dead_peer_bound`] for when that happens.
    pub idle_timeout: Duration,
}

/// The shortest idle timeout: below it a keep-alive (a sixth of it) would go out every few
/// milliseconds and a scheduling hiccup would drop the connection.
const MIN_IDLE_TIMEOUT: Duration = Duration::from_millis(100);
/// The longest: a vanished peer's devices stay claimed this long.
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Keep-alives per idle timeout. QUIC restarts the idle timer at the first ack-eliciting
/// packet sent after the last one received (RFC 9000 §10.1), and when the peer has gone quiet
/// that packet is our next keep-alive; so a dead peer is noticed one keep-alive interval after
/// the idle timeout. At a third of it (quinn's usual advice) that was 2.0 s for 1.5 s, past the
/// 2 s release we promise; a sixth keeps it at 1.75 s for a few dozen bytes every 250 ms.
const KEEP_ALIVES_PER_IDLE: u32 = 6;

impl NetConfig {
    /// Loopback only, no relays, no port mapping: what tests and the lab use.
    pub fn loopback() -> Self {
        NetConfig {
            bind: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            relays: Relays::OFF,
            cipher: CipherSetting::Auto.suite(),
            port_mapping: false,
            idle_timeout: Duration::from_millis(1500),
        }
    }

    /// How often a quiet connection sends a keep-alive, so a live but idle peer is never
    /// dropped.
    pub fn keep_alive_interval(&self) -> Duration {
        self.idle_timeout / KEEP_ALIVES_PER_IDLE
    }

    /// The longest a peer that went silent (killed, cable pulled, frozen) can still hold its
    /// connection, and so its device claims: the idle timeout plus one keep-alive interval.
    pub fn dead_peer_bound(&self) -> Duration {
        dead_peer_bound(self.idle_timeout)
    }
}

/// [`NetConfig::dead_peer_bound`] for an endpoint with `idle_timeout`.
pub fn dead_peer_bound(idle_timeout: Duration) -> Duration {
    idle_timeout + idle_timeout / KEEP_ALIVES_PER_IDLE
}

/// Why an endpoint could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A bind address iroh would not take.
    #[error("invalid bind address {addr}: {reason}")]
    Address {
        /// The address.
        addr: SocketAddr,
        /// iroh's reason.
        reason: String,
    },
    /// The idle timeout is too short to carry keep-alives, or longer than anyone waits.
    #[error("idle timeout {0:?} is out of range; expected 100 ms to 10 minutes")]
    IdleTimeout(Duration),
    /// iroh failed to bind.
    #[error("could not bind the iroh endpoint: {0}")]
    Bind(String),
}

/// Binds an endpoint for `alpns` with `secret` as its identity.
pub async fn bind_endpoint(
    secret: SecretKey,
    alpns: Vec<Vec<u8>>,
    config: &NetConfig,
) -> Result<Endpoint, BindError> {
    if !(MIN_IDLE_TIMEOUT..=MAX_IDLE_TIMEOUT).contains(&config.idle_timeout) {
        return Err(BindError::IdleTimeout(config.idle_timeout));
    }
    warn_if_udp_buffers_capped();
    iroh::endpoint::exclude_interfaces(crate::tunneled::is_usbip_interface);
    let idle = config
        .idle_timeout
        .try_into()
        .map_err(|_| BindError::IdleTimeout(config.idle_timeout))?;
    // Path MTU discovery probes upwards and backs off on loss, so a high ceiling is safe on
    // any path. In effect it stops at 1,472 bytes: iroh builds its QUIC endpoint with noq's
    // default `max_udp_payload_size` (Ethernet's) and offers no way to raise it, and the peer
    // never sends more than that. Measured on loopback: 1,450 bytes per packet, 190,000
    // packets per 256 MiB, the per-packet work most of our CPU time under the lab's TCG.
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    let transport = QuicTransportConfig::builder()
        .mtu_discovery_config(Some(mtu))
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(config.keep_alive_interval())
        .max_concurrent_bidi_streams(VarInt::from_u32(256))
        .send_window(SEND_WINDOW)
        .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        .build();
    let mut builder = Endpoint::builder(presets::Minimal)
        .crypto_provider(crypto_provider(config.cipher))
        .secret_key(secret)
        .alpns(alpns)
        .transport_config(transport)
        .relay_mode(relay_mode(&config.relays));
    if let Some(ca) = &config.relays.ca {
        builder =
            builder.ca_tls_config(CaTlsConfig::embedded().with_extra_roots(ca.iter().cloned()));
    }
    if config.relays.public {
        builder = builder
            .address_lookup(PkarrPublisher::n0_dns())
            .address_lookup(PkarrResolver::n0_dns())
            .address_lookup(DnsAddressLookup::n0_dns());
    }
    if !config.port_mapping {
        builder = builder.portmapper_config(PortmapperConfig::Disabled);
    }
    if !config.bind.is_empty() {
        builder = builder.clear_ip_transports();
        for addr in &config.bind {
            builder = builder.bind_addr(*addr).map_err(|e| BindError::Address {
                addr: *addr,
                reason: e.to_string(),
            })?;
        }
    }
    builder
        .bind()
        .await
        .map_err(|e| BindError::Bind(e.to_string()))
}

/// iroh's relay mode for `relays`: n0's map (staging when iroh is told to) with any others
/// added to it.
fn relay_mode(relays: &Relays) -> RelayMode {
    let own = relays.own.iter().cloned();
    match (relays.public, relays.own.is_empty()) {
        (false, true) => RelayMode::Disabled,
        (false, false) => RelayMode::custom(own),
        (true, true) => iroh::endpoint::default_relay_mode(),
        (true, false) => {
            let map = match iroh::endpoint::default_relay_mode() {
                RelayMode::Staging => iroh::defaults::staging::default_relay_map(),
                _ => iroh::defaults::prod::default_relay_map(),
            };
            map.extend(&RelayMap::from_iter(own));
            RelayMode::Custom(map)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_udp_buffers_are_named_with_the_fix_and_ample_ones_are_not() {
        let debian = Some(212_992);
        let advice = udp_buffer_advice([debian, Some(UDP_BUFFER_WANTED)]).unwrap();
        assert!(advice.starts_with("net.core.rmem_max is 208 KiB, below the 7168 KiB"));
        assert!(!advice.contains("wmem_max is"));
        assert!(advice.contains("sysctl -w net.core.rmem_max=7340032"));
        assert!(advice.contains("99-p2p-usb-udp.conf"));
        let both = udp_buffer_advice([debian, debian]).unwrap();
        assert!(both.contains("rmem_max is 208 KiB and net.core.wmem_max is 208 KiB"));
        assert_eq!(udp_buffer_advice([Some(8 << 20), Some(7 << 20)]), None);
        // Not Linux, or /proc unreadable: nothing to say.
        assert_eq!(udp_buffer_advice([None, None]), None);
    }

    #[test]
    fn public_relays_keep_n0s_and_add_the_others() {
        let mine = crate::parse_relay_url("https://relay.example.org").unwrap();
        assert!(matches!(relay_mode(&Relays::OFF), RelayMode::Disabled));
        assert!(matches!(relay_mode(&Relays::public()), RelayMode::Default));
        let RelayMode::Custom(map) = relay_mode(&Relays::own(mine.clone())) else {
            panic!("own relay");
        };
        assert_eq!(map.len(), 1);
        let RelayMode::Custom(map) = relay_mode(&Relays::public().with(Some(&mine))) else {
            panic!("public and own");
        };
        assert!(map.contains(&mine));
        assert_eq!(
            map.len(),
            iroh::defaults::prod::default_relay_map().len() + 1
        );
    }

    #[tokio::test]
    async fn an_idle_timeout_out_of_range_is_refused_before_binding() {
        for ms in [0, 99, 600_001] {
            let config = NetConfig {
                idle_timeout: Duration::from_millis(ms),
                ..NetConfig::loopback()
            };
            let key = SecretKey::from_bytes(&[7; 32]);
            let e = bind_endpoint(key, vec![], &config).await.unwrap_err();
            assert!(matches!(e, BindError::IdleTimeout(_)), "{ms} ms: {e}");
        }
    }
}
