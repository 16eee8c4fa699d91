//! Connections: who may talk to us, what they may claim, and the URB streams of each claim.
//!
//! One task per connection runs the control stream; one task per URB stream runs a
//! [`StreamTracker`] between the peer and the device. A claim is released on every path out
//! of a connection (detach, device removal, peer gone silent, protocol violation), so a device
//! is never left held by a peer that is no longer there.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use iroh::endpoint::{Connection, RecvStream, SendStream, VarInt};
use iroh::{Endpoint, EndpointId};
use protocol::usb::{EndpointNumber, UrbStatus};
use protocol::wire::{
    AttachHandle, AttachRefusal, Capabilities, ClientMessage, EndReason, Event,
    MAX_DEVICES_PER_LIST, Pong, Request, Response, ServerMessage, UrbClientMessage,
    UrbServerMessage, close, negotiate,
};
use protocol::wire::{DeviceId, DeviceInfo};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, warn};
use transport::{FramedRecv, FramedSend, StreamError};

use crate::config::ShareRule;
use crate::device::{DeviceEvent, DeviceSource, OpenError, OpenedDevice};
use crate::gate::Gates;
use crate::sync::lock;
use crate::tracker::{DeviceAction, StreamTracker, Violation, completion};

/// What this server can do: time its URBs, and hold a URB for the one it follows (the
/// ordering a client's read-ahead needs, [`crate::gate`]).
pub const CAPABILITIES: Capabilities = Capabilities::TIMING.union(Capabilities::ORDERED_SUBMIT);

/// Who may connect.
#[derive(Debug, Clone)]
pub enum Allowlist {
    /// Anyone who knows our endpoint id (demos on a trusted network only).
    Anyone,
    /// Exactly these endpoint ids.
    Only(HashSet<EndpointId>),
}

impl Allowlist {
    fn allows(&self, peer: &EndpointId) -> bool {
        match self {
            Allowlist::Anyone => true,
            Allowlist::Only(ids) => ids.contains(peer),
        }
    }
}

/// How the server treats its peers.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Who may connect.
    pub allow: Allowlist,
    /// URBs running on the device per endpoint stream; later ones (up to the URB window) wait
    /// on the server in order.
    pub queue_depth: usize,
    /// How long a new peer has to open its control stream and say hello.
    pub handshake_timeout: Duration,
    /// Software name for the handshake.
    pub agent: String,
    /// Share rules; the first matching one with a PIN guards a device.
    pub pins: Vec<ShareRule>,
    /// How long a wrong PIN waits before its refusal, so guessing is slow.
    pub pin_penalty: Duration,
    /// A client not heard from this long is gone, whatever QUIC's idle timer says
    /// ([`transport::liveness`]); its claims are released. The endpoint's
    /// [`transport::NetConfig::dead_peer_bound`].
    pub silent_after: Duration,
}

/// What a config reload can change while clients are connected.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Who may connect; a connected peer no longer on it is disconnected.
    pub allow: Allowlist,
    /// Share rules; the first matching one with a PIN guards a device.
    pub pins: Vec<ShareRule>,
}

impl Policy {
    fn pin_for(&self, device: &DeviceInfo) -> Option<&str> {
        let facts = crate::config::DeviceFacts::from_wire(device);
        self.pins
            .iter()
            .filter(|r| r.matcher.matches(&facts))
            .find_map(|r| r.pin.as_deref())
    }
}

/// Compares without stopping at the first difference, so timing tells a guesser nothing.
fn same_pin(given: &str, wanted: &str) -> bool {
    given.len() == wanted.len()
        && given
            .bytes()
            .zip(wanted.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            allow: Allowlist::Only(HashSet::new()),
            queue_depth: 32,
            handshake_timeout: Duration::from_secs(5),
            agent: format!("p2p-usb-server/{}", env!("CARGO_PKG_VERSION")),
            pins: Vec::new(),
            pin_penalty: Duration::from_millis(500),
            silent_after: transport::NetConfig::loopback().dead_peer_bound(),
        }
    }
}

/// Microseconds on a process-wide monotonic clock.
fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Bytes and URBs through one device, over every attachment since the server started.
#[derive(Debug, Default)]
struct Traffic {
    to_device: AtomicU64,
    from_device: AtomicU64,
    urbs: AtomicU64,
}

/// One device claimed by one connection.
struct Attachment {
    device: DeviceId,
    traffic: Arc<Traffic>,
    opened: Mutex<Option<Box<dyn OpenedDevice>>>,
    /// Becomes true when the attachment ends; its URB streams finish after their last
    /// completion.
    ended: watch::Sender<bool>,
    /// How its URBs ended, for the URBs sent to follow one.
    gates: Gates,
}

impl Attachment {
    fn with_device<R>(&self, f: impl FnOnce(Option<&mut Box<dyn OpenedDevice>>) -> R) -> R {
        f(lock(&self.opened).as_mut())
    }
}

/// A connected client, for [`Server::snapshot`].
struct Peer {
    id: EndpointId,
    agent: String,
    since: Instant,
    conn: Connection,
    path_changes: Arc<AtomicU64>,
}

/// The server's state at one moment, for `status` and the TUI.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// Every device offered, claimed or not.
    pub devices: Vec<DeviceStatus>,
    /// Every connected client.
    pub clients: Vec<ClientStatus>,
}

/// One offered device.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceStatus {
    /// The server's id for it.
    pub id: u32,
    /// Its sysfs bus id.
    pub bus_id: String,
    /// `vid:pid` in hex.
    pub vid_pid: String,
    /// Product string, if any.
    pub product: Option<String>,
    /// Manufacturer string, if any.
    pub manufacturer: Option<String>,
    /// Serial string, if any.
    pub serial: Option<String>,
    /// Signalling speed.
    pub speed: String,
    /// Whether attaching it needs a PIN.
    pub pin: bool,
    /// The endpoint id of the client it is attached to.
    pub attached_to: Option<String>,
    /// Bytes sent to the device since the server started.
    pub bytes_to_device: u64,
    /// Bytes read from the device since the server started.
    pub bytes_from_device: u64,
    /// URBs completed since the server started.
    pub urbs: u64,
}

/// One connected client.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ClientStatus {
    /// Its endpoint id.
    pub id: String,
    /// The software it said it runs.
    pub agent: String,
    /// Seconds since it connected.
    pub connected_secs: u64,
    /// The path its packets take now.
    #[serde(default)]
    pub path: Option<transport::path::PathView>,
    /// How often that path changed (relay to direct and back).
    #[serde(default)]
    pub path_changes: u64,
}

/// The server: a device source shared by every connection.
pub struct Server {
    source: Arc<dyn DeviceSource>,
    config: ServerConfig,
    /// Replaced by [`Server::set_policy`]; every session watches it.
    policy: watch::Sender<Arc<Policy>>,
    /// Which device is claimed, by whom. Checked and set under one lock, so of two clients
    /// racing for a device exactly one wins.
    claims: Mutex<HashMap<DeviceId, EndpointId>>,
    traffic: Mutex<HashMap<DeviceId, Arc<Traffic>>>,
    peers: Mutex<HashMap<u64, Peer>>,
    next_peer: AtomicU64,
    next_handle: AtomicU32,
}

impl Server {
    /// A server offering `source`'s devices.
    pub fn new(source: Arc<dyn DeviceSource>, config: ServerConfig) -> Arc<Self> {
        let policy = Policy {
            allow: config.allow.clone(),
            pins: config.pins.clone(),
        };
        Arc::new(Server {
            source,
            config,
            policy: watch::channel(Arc::new(policy)).0,
            claims: Mutex::new(HashMap::new()),
            traffic: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            next_peer: AtomicU64::new(1),
            next_handle: AtomicU32::new(1),
        })
    }

    /// Applies a reloaded config: new PINs hold for the next attach, and a connected client
    /// that is no longer allowed is disconnected (its devices are released) at once.
    pub fn set_policy(&self, policy: Policy) {
        self.policy.send_replace(Arc::new(policy));
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.borrow().clone()
    }

    /// Devices, who holds them, traffic so far, and who is connected.
    pub fn snapshot(&self) -> Snapshot {
        let policy = self.policy.borrow().clone();
        let claims = lock(&self.claims).clone();
        let traffic = lock(&self.traffic).clone();
        let devices = self
            .source
            .devices()
            .into_iter()
            .map(|d| {
                let t = traffic.get(&d.id).cloned().unwrap_or_default();
                DeviceStatus {
                    id: d.id.0,
                    vid_pid: d.vid_pid().to_string(),
                    speed: format!("{:?}", d.speed),
                    pin: policy.pin_for(&d).is_some(),
                    attached_to: claims.get(&d.id).map(ToString::to_string),
                    bytes_to_device: t.to_device.load(Ordering::Relaxed),
                    bytes_from_device: t.from_device.load(Ordering::Relaxed),
                    urbs: t.urbs.load(Ordering::Relaxed),
                    bus_id: d.bus_id,
                    product: d.product,
                    manufacturer: d.manufacturer,
                    serial: d.serial,
                }
            })
            .collect();
        let mut clients: Vec<ClientStatus> = lock(&self.peers)
            .values()
            .map(|p| ClientStatus {
                id: p.id.to_string(),
                agent: p.agent.clone(),
                connected_secs: p.since.elapsed().as_secs(),
                path: transport::path::selected(&p.conn),
                path_changes: p.path_changes.load(Ordering::Relaxed),
            })
            .collect();
        clients.sort_by(|a, b| a.id.cmp(&b.id));
        Snapshot { devices, clients }
    }

    /// Accepts connections until the endpoint closes.
    pub async fn run(self: Arc<Self>, endpoint: Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let server = self.clone();
            tokio::spawn(async move {
                let accepting = match incoming.accept() {
                    Ok(a) => a,
                    Err(e) => return debug!("incoming connection failed: {e}"),
                };
                match accepting.await {
                    Ok(conn) => server.serve(conn).await,
                    Err(e) => debug!("handshake failed: {e}"),
                }
            });
        }
    }

    /// Serves one connection to its end.
    pub async fn serve(self: Arc<Self>, conn: Connection) {
        let peer = conn.remote_id();
        if !self.policy.borrow().allow.allows(&peer) {
            info!(target: "audit", %peer, "refused: not on the allowlist");
            conn.close(
                VarInt::from_u32(close::NOT_ALLOWED),
                b"not on the allowlist",
            );
            return;
        }
        info!(target: "audit", %peer, "accepted");
        let key = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let path_changes = Arc::new(AtomicU64::new(0));
        tokio::spawn(transport::path::watch(
            conn.clone(),
            format!("client {peer}"),
            path_changes.clone(),
        ));
        tokio::spawn(transport::liveness::watch(
            conn.clone(),
            self.config.silent_after,
            close::SILENT_PEER,
            format!("client {peer}"),
        ));
        lock(&self.peers).insert(
            key,
            Peer {
                id: peer,
                agent: String::new(),
                since: Instant::now(),
                conn: conn.clone(),
                path_changes,
            },
        );
        let session = Arc::new(Session {
            server: self.clone(),
            conn: conn.clone(),
            peer,
            key,
            attachments: Mutex::new(HashMap::new()),
            timing: OnceLock::new(),
        });
        let (code, reason) = match session.clone().run().await {
            Ok(()) => (close::NORMAL, "bye".to_owned()),
            Err(e) => {
                warn!(%peer, "closing connection: {e}");
                (e.close_code(), e.to_string())
            }
        };
        session.end_all(EndReason::ServerShutdown);
        transport::path::close_and_log(&conn, &peer.to_string(), code, &reason);
        lock(&self.peers).remove(&key);
    }

    /// Claims a device for `peer`, or says why not.
    fn claim(
        &self,
        device: DeviceId,
        peer: EndpointId,
    ) -> Result<Box<dyn OpenedDevice>, AttachRefusal> {
        {
            let mut claims = lock(&self.claims);
            if claims.contains_key(&device) {
                return Err(AttachRefusal::Busy);
            }
            claims.insert(device, peer);
        }
        self.source.open(device).map_err(|e| {
            lock(&self.claims).remove(&device);
            match e {
                OpenError::Gone(_) => AttachRefusal::Gone,
                // The reason crosses to the client, which shows it: the whole message, with
                // what to do, cut to a bound.
                e @ (OpenError::Permission(_) | OpenError::Busy(_) | OpenError::Claim(_)) => {
                    AttachRefusal::ClaimFailed(e.to_string().chars().take(200).collect())
                }
            }
        })
    }

    fn traffic(&self, device: DeviceId) -> Arc<Traffic> {
        lock(&self.traffic).entry(device).or_default().clone()
    }

    fn unclaim(&self, device: DeviceId) {
        lock(&self.claims).remove(&device);
    }

    fn visible_devices(&self) -> Vec<DeviceInfo> {
        let mut devices = self.source.devices();
        devices.truncate(MAX_DEVICES_PER_LIST);
        devices
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("no hello within the handshake timeout")]
    HandshakeTimeout,
    #[error("the first frame was not a hello")]
    NoHello,
    #[error("no common protocol version")]
    Version,
    #[error("control stream: {0}")]
    Stream(#[from] StreamError),
    #[error("URB stream: {0}")]
    Urb(#[from] Violation),
    #[error("URB stream did not start with Open")]
    NoOpen,
    #[error("connection lost: {0}")]
    Connection(#[from] iroh::endpoint::ConnectionError),
    #[error("no longer on the allowlist")]
    Revoked,
}

impl SessionError {
    fn close_code(&self) -> u32 {
        match self {
            SessionError::Version => close::VERSION_MISMATCH,
            SessionError::Revoked => close::NOT_ALLOWED,
            SessionError::Connection(_) => close::SILENT_PEER,
            SessionError::Stream(e) if !e.is_violation() => close::SILENT_PEER,
            _ => close::PROTOCOL_VIOLATION,
        }
    }
}

struct Session {
    server: Arc<Server>,
    conn: Connection,
    peer: EndpointId,
    /// Its entry in the server's peer table.
    key: u64,
    attachments: Mutex<HashMap<AttachHandle, Arc<Attachment>>>,
    timing: OnceLock<bool>,
}

impl Session {
    async fn run(self: Arc<Self>) -> Result<(), SessionError> {
        let timeout = self.server.config.handshake_timeout;
        let (send, recv) = tokio::time::timeout(timeout, self.conn.accept_bi())
            .await
            .map_err(|_| SessionError::HandshakeTimeout)??;
        let mut rx = FramedRecv::<ClientMessage>::new(recv);
        let mut tx = FramedSend::<ServerMessage>::new(send);
        let hello = match tokio::time::timeout(timeout, rx.next()).await {
            Err(_) => return Err(SessionError::HandshakeTimeout),
            Ok(Ok(Some(ClientMessage::Hello(hello)))) => hello,
            Ok(Ok(_)) => return Err(SessionError::NoHello),
            Ok(Err(e)) => return Err(e.into()),
        };
        match negotiate(&hello, CAPABILITIES, &self.server.config.agent) {
            Ok(welcome) => {
                let _ = self
                    .timing
                    .set(welcome.capabilities.contains(Capabilities::TIMING));
                info!(%self.peer, agent = %hello.agent, version = welcome.version, "session ready");
                if let Some(p) = lock(&self.server.peers).get_mut(&self.key) {
                    p.agent = hello.agent.chars().take(64).collect();
                }
                tx.send(&ServerMessage::Welcome(welcome)).await?;
            }
            Err(refusal) => {
                tx.send(&ServerMessage::Refused(refusal)).await?;
                return Err(SessionError::Version);
            }
        }

        let (violations_tx, mut violations) = mpsc::unbounded_channel();
        let acceptor = tokio::spawn(self.clone().accept_urb_streams(violations_tx));
        let mut events = self.server.source.subscribe();
        let mut policy = self.server.policy.subscribe();
        let result = loop {
            tokio::select! {
                msg = rx.next() => match msg {
                    Ok(Some(msg)) => self.on_message(msg, &mut tx).await?,
                    Ok(None) => break Ok(()),
                    Err(_) if closed_normally(&self.conn) => break Ok(()),
                    Err(e) => break Err(e.into()),
                },
                event = events.recv() => match event {
                    Ok(event) => self.on_device_event(event, &mut tx).await?,
                    Err(broadcast::error::RecvError::Lagged(n)) => warn!("missed {n} device events"),
                    Err(broadcast::error::RecvError::Closed) => {}
                },
                Some(violation) = violations.recv() => break Err(violation),
                Ok(()) = policy.changed() => {
                    if !policy.borrow_and_update().allow.allows(&self.peer) {
                        info!(target: "audit", peer = %self.peer, "revoked: disconnecting");
                        break Err(SessionError::Revoked);
                    }
                },
                e = self.conn.closed() => break if closed_normally(&self.conn) {
                    Ok(())
                } else {
                    Err(e.into())
                },
            }
        };
        acceptor.abort();
        result
    }

    async fn on_message(
        &self,
        msg: ClientMessage,
        tx: &mut FramedSend<ServerMessage>,
    ) -> Result<(), SessionError> {
        let reply = match msg {
            ClientMessage::Hello(_) => return Err(SessionError::NoHello),
            ClientMessage::Ping(ping) => ServerMessage::Pong(Pong {
                nonce: ping.nonce,
                echo_sent_us: ping.sent_us,
                answered_us: now_us(),
            }),
            ClientMessage::Pong(_) => return Ok(()),
            ClientMessage::Request { id, request } => ServerMessage::Response {
                id,
                response: self.on_request(request).await,
            },
        };
        tx.send(&reply).await?;
        Ok(())
    }

    async fn on_request(&self, request: Request) -> Response {
        match request {
            Request::ListDevices => Response::Devices(self.server.visible_devices()),
            Request::Attach { device, pin } => {
                let Some(info) = self
                    .server
                    .source
                    .devices()
                    .into_iter()
                    .find(|d| d.id == device)
                else {
                    return Response::AttachRefused(AttachRefusal::Gone);
                };
                let wanted = self
                    .server
                    .policy
                    .borrow()
                    .pin_for(&info)
                    .map(str::to_owned);
                if let Some(wanted) = wanted {
                    let refusal = match pin {
                        None => Some(AttachRefusal::PinRequired),
                        Some(p) if !same_pin(&p, &wanted) => Some(AttachRefusal::PinWrong),
                        Some(_) => None,
                    };
                    if let Some(refusal) = refusal {
                        info!(target: "audit", peer = %self.peer, ?device, ?refusal, "attach refused");
                        if refusal == AttachRefusal::PinWrong {
                            tokio::time::sleep(self.server.config.pin_penalty).await;
                        }
                        return Response::AttachRefused(refusal);
                    }
                }
                // Claiming unbinds kernel drivers, which can take a while: off the runtime.
                let server = self.server.clone();
                let peer = self.peer;
                let claimed = tokio::task::spawn_blocking(move || server.claim(device, peer))
                    .await
                    .unwrap_or_else(|e| Err(AttachRefusal::ClaimFailed(e.to_string())));
                match claimed {
                    Ok(opened) => {
                        let handle =
                            AttachHandle(self.server.next_handle.fetch_add(1, Ordering::Relaxed));
                        let attachment = Arc::new(Attachment {
                            device,
                            traffic: self.server.traffic(device),
                            opened: Mutex::new(Some(opened)),
                            ended: watch::channel(false).0,
                            gates: Gates::default(),
                        });
                        lock(&self.attachments).insert(handle, attachment);
                        info!(target: "audit", peer = %self.peer, ?device, ?handle, bus_id = %info.bus_id, "attached");
                        Response::Attached {
                            handle,
                            device: info,
                        }
                    }
                    Err(refusal) => {
                        info!(target: "audit", peer = %self.peer, ?device, ?refusal, "attach refused");
                        Response::AttachRefused(refusal)
                    }
                }
            }
            Request::Detach { handle } => match lock(&self.attachments).remove(&handle) {
                Some(attachment) => {
                    self.end(handle, &attachment, "detached");
                    Response::Detached { handle }
                }
                None => Response::UnknownHandle(handle),
            },
        }
    }

    async fn on_device_event(
        &self,
        event: DeviceEvent,
        tx: &mut FramedSend<ServerMessage>,
    ) -> Result<(), SessionError> {
        match event {
            DeviceEvent::Arrived(info) => {
                tx.send(&ServerMessage::Event(Event::DeviceArrived(info)))
                    .await?
            }
            DeviceEvent::Removed(device) => {
                let ended: Vec<(AttachHandle, Arc<Attachment>)> = {
                    let mut attachments = lock(&self.attachments);
                    let handles: Vec<AttachHandle> = attachments
                        .iter()
                        .filter(|(_, a)| a.device == device)
                        .map(|(h, _)| *h)
                        .collect();
                    handles
                        .into_iter()
                        .filter_map(|h| attachments.remove(&h).map(|a| (h, a)))
                        .collect()
                };
                for (handle, attachment) in ended {
                    self.end(handle, &attachment, "device removed");
                    tx.queue(&ServerMessage::Event(Event::AttachmentEnded {
                        handle,
                        reason: EndReason::DeviceRemoved,
                    }))?;
                }
                tx.send(&ServerMessage::Event(Event::DeviceRemoved(device)))
                    .await?;
            }
        }
        Ok(())
    }

    /// Releases an attachment's device and ends its streams.
    fn end(&self, handle: AttachHandle, attachment: &Attachment, why: &str) {
        if let Some(opened) = lock(&attachment.opened).take() {
            opened.release();
        }
        self.server.unclaim(attachment.device);
        attachment.ended.send_replace(true);
        info!(target: "audit", peer = %self.peer, device = ?attachment.device, ?handle, why, "detached");
    }

    fn end_all(&self, reason: EndReason) {
        let all: Vec<_> = lock(&self.attachments).drain().collect();
        for (handle, attachment) in all {
            self.end(handle, &attachment, &format!("{reason:?}"));
        }
    }

    async fn accept_urb_streams(self: Arc<Self>, violations: mpsc::UnboundedSender<SessionError>) {
        while let Ok((send, recv)) = self.conn.accept_bi().await {
            let session = self.clone();
            let violations = violations.clone();
            tokio::spawn(async move {
                if let Err(e) = session.urb_stream(send, recv).await {
                    let is_violation = !matches!(&e, SessionError::Stream(s) if !s.is_violation());
                    if is_violation {
                        let _ = violations.send(e);
                    } else {
                        debug!("URB stream ended: {e}");
                    }
                }
            });
        }
    }

    async fn urb_stream(&self, send: SendStream, recv: RecvStream) -> Result<(), SessionError> {
        let mut rx = FramedRecv::<UrbClientMessage>::new(recv);
        let mut tx = FramedSend::<UrbServerMessage>::new(send);
        let open = match rx.next().await? {
            Some(UrbClientMessage::Open(open)) => open,
            Some(_) => return Err(SessionError::NoOpen),
            None => return Ok(()),
        };
        let Some(attachment) = lock(&self.attachments).get(&open.handle).cloned() else {
            debug!(handle = ?open.handle, "URB stream for an unknown attachment");
            tx.finish();
            return Ok(());
        };
        let timing = self.timing.get().copied().unwrap_or(false);
        let mut tracker = StreamTracker::new(&open, self.server.config.queue_depth, timing);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let mut ended = attachment.ended.subscribe();
        let mut gate_changes = attachment.gates.subscribe();
        // What read-ahead's IN phases wait for: how a URB before them ended.
        let records_outcomes = open.endpoint != EndpointNumber::CONTROL;
        let mut client_finished = false;
        loop {
            let gone = *ended.borrow();
            let gated = tracker.gated_on().is_some();
            tokio::select! {
                // Every frame is read at once, so an unlink is never stuck behind submissions;
                // the URB window bounds them (a client over it is a violation).
                msg = rx.next(), if !client_finished && !gone => match msg? {
                    Some(msg) => {
                        if let UrbClientMessage::Submit(urb) | UrbClientMessage::SubmitAfter { urb, .. } = &msg {
                            attachment.traffic.to_device.fetch_add(urb.data.len() as u64, Ordering::Relaxed);
                        }
                        tracker.on_client(msg, now_us())?;
                    }
                    None => client_finished = true,
                },
                Some(done) = done_rx.recv() => {
                    let mut take = |done: protocol::wire::UrbComplete| {
                        let t = &attachment.traffic;
                        t.from_device.fetch_add(done.data.len() as u64, Ordering::Relaxed);
                        t.urbs.fetch_add(1, Ordering::Relaxed);
                        tracker.on_complete(done, now_us());
                    };
                    take(done);
                    while let Ok(done) = done_rx.try_recv() {
                        take(done);
                    }
                },
                _ = ended.changed(), if !gone => {},
                _ = gate_changes.changed(), if gated => {},
            }
            let closing = client_finished || *ended.borrow();
            attachment
                .gates
                .settle(&mut tracker, records_outcomes, closing, now_us());
            // A completion (or an opened gate) can start URBs that waited, as a submit can.
            while let Some(action) = tracker.poll_action() {
                run_action(&attachment, action, &open, &done_tx);
            }
            while let Some(msg) = tracker.poll_message() {
                tx.queue_owned(msg)?;
            }
            tx.flush().await?;
            if closing && tracker.in_flight() == 0 {
                break;
            }
        }
        tx.finish();
        Ok(())
    }
}

/// Whether the peer closed the connection with a goodbye rather than failing.
fn closed_normally(conn: &Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(iroh::endpoint::ConnectionError::ApplicationClosed(app))
            if app.error_code == VarInt::from_u32(close::NORMAL)
    )
}

fn run_action(
    attachment: &Attachment,
    action: DeviceAction,
    open: &protocol::wire::UrbStreamOpen,
    done: &mpsc::UnboundedSender<protocol::wire::UrbComplete>,
) {
    attachment.with_device(|device| match (device, action) {
        (Some(device), DeviceAction::Submit(urb)) => device.submit(urb, done.clone()),
        (None, DeviceAction::Submit(urb)) => {
            let _ = done.send(completion(urb.id, UrbStatus::NoDevice));
        }
        (Some(device), DeviceAction::Cancel(id)) => {
            device.cancel(open.endpoint, open.direction, id)
        }
        (None, DeviceAction::Cancel(_)) => {}
    });
}
