//! Connections: who may talk to us, what they may claim, and the URB streams of each claim.
//!
//! One task per connection runs the control stream; one task per URB stream runs a
//! [`StreamTracker`] between the peer and the device. A claim is released on every path out
//! of a connection (detach, device removal, peer gone silent, protocol violation), so a device
//! is never left held by a peer that is no longer there.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use iroh::endpoint::{Connection, RecvStream, SendStream, VarInt};
use iroh::{Endpoint, EndpointId};
use protocol::usb::UrbStatus;
use protocol::wire::{
    AttachHandle, AttachRefusal, Capabilities, ClientMessage, EndReason, Event,
    MAX_DEVICES_PER_LIST, Pong, Request, Response, ServerMessage, UrbClientMessage,
    UrbServerMessage, close, negotiate,
};
use protocol::wire::{DeviceId, DeviceInfo};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, warn};
use transport::{FramedRecv, FramedSend, StreamError};

use crate::device::{DeviceEvent, DeviceSource, OpenError, OpenedDevice};
use crate::tracker::{DeviceAction, StreamTracker, Violation, completion};

/// What this server can do.
pub const CAPABILITIES: Capabilities = Capabilities::TIMING;

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
    /// URBs in flight per endpoint stream; reading from a stream pauses at this depth.
    pub queue_depth: usize,
    /// How long a new peer has to open its control stream and say hello.
    pub handshake_timeout: Duration,
    /// Software name for the handshake.
    pub agent: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            allow: Allowlist::Only(HashSet::new()),
            queue_depth: 32,
            handshake_timeout: Duration::from_secs(5),
            agent: format!("p2p-usb-server/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Microseconds on a process-wide monotonic clock.
fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// One device claimed by one connection.
struct Attachment {
    device: DeviceId,
    opened: Mutex<Option<Box<dyn OpenedDevice>>>,
    /// Becomes true when the attachment ends; its URB streams finish after their last
    /// completion.
    ended: watch::Sender<bool>,
}

impl Attachment {
    fn with_device<R>(&self, f: impl FnOnce(Option<&mut Box<dyn OpenedDevice>>) -> R) -> R {
        f(lock(&self.opened).as_mut())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The server: a device source shared by every connection.
pub struct Server {
    source: Arc<dyn DeviceSource>,
    config: ServerConfig,
    /// Which device is claimed, by whom. Checked and set under one lock, so of two clients
    /// racing for a device exactly one wins.
    claims: Mutex<HashMap<DeviceId, EndpointId>>,
    next_handle: AtomicU32,
}

impl Server {
    /// A server offering `source`'s devices.
    pub fn new(source: Arc<dyn DeviceSource>, config: ServerConfig) -> Arc<Self> {
        Arc::new(Server {
            source,
            config,
            claims: Mutex::new(HashMap::new()),
            next_handle: AtomicU32::new(1),
        })
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
        if !self.config.allow.allows(&peer) {
            info!(target: "audit", %peer, "refused: not on the allowlist");
            conn.close(
                VarInt::from_u32(close::NOT_ALLOWED),
                b"not on the allowlist",
            );
            return;
        }
        info!(target: "audit", %peer, "accepted");
        let session = Arc::new(Session {
            server: self.clone(),
            conn: conn.clone(),
            peer,
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
        conn.close(VarInt::from_u32(code), reason.as_bytes());
        info!(target: "audit", %peer, "disconnected");
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
                OpenError::Claim(why) => {
                    AttachRefusal::ClaimFailed(why.chars().take(200).collect())
                }
            }
        })
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
}

impl SessionError {
    fn close_code(&self) -> u32 {
        match self {
            SessionError::Version => close::VERSION_MISMATCH,
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
            Request::Attach { device, pin: _ } => {
                let Some(info) = self
                    .server
                    .source
                    .devices()
                    .into_iter()
                    .find(|d| d.id == device)
                else {
                    return Response::AttachRefused(AttachRefusal::Gone);
                };
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
                            opened: Mutex::new(Some(opened)),
                            ended: watch::channel(false).0,
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
        let mut client_finished = false;
        loop {
            let gone = *ended.borrow();
            tokio::select! {
                msg = rx.next(), if !client_finished && !gone && tracker.can_accept() => match msg? {
                    Some(msg) => {
                        tracker.on_client(msg, now_us())?;
                        while let Some(action) = tracker.poll_action() {
                            run_action(&attachment, action, &open, &done_tx);
                        }
                    }
                    None => client_finished = true,
                },
                Some(done) = done_rx.recv() => {
                    tracker.on_complete(done, now_us());
                    while let Ok(done) = done_rx.try_recv() {
                        tracker.on_complete(done, now_us());
                    }
                },
                _ = ended.changed(), if !gone => {},
            }
            while let Some(msg) = tracker.poll_message() {
                tx.queue(&msg)?;
            }
            tx.flush().await?;
            if (client_finished || *ended.borrow()) && tracker.in_flight() == 0 {
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
