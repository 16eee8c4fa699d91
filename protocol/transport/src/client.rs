//! The client's side of a connection: handshake, requests matched to responses, events, pings,
//! and opening URB streams.
//!
//! A background task owns the control stream's receiving half and routes what arrives: a
//! response to the request waiting for it, an event to the event channel, a ping answered at
//! once. Every wait on the network has a timeout, so a silent server turns into an error, not
//! a hang.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use iroh::endpoint::{Connection, VarInt};
use iroh::{Endpoint, EndpointAddr};
use protocol::usb::{Direction, EndpointNumber};
use protocol::wire::{
    ALPN, AttachHandle, AttachRefusal, Capabilities, ClientMessage, DeviceId, DeviceInfo, Event,
    HandshakeRefusal, Hello, Ping, Pong, Request, RequestId, Response, ServerMessage,
    UrbClientMessage, UrbServerMessage, UrbStreamOpen, Welcome, close,
};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::framed::{FramedRecv, FramedSend, StreamError};

/// How long a request may wait for its response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why talking to a server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection could be made.
    #[error("could not connect to the server: {0}")]
    Connect(String),
    /// No connection could be made, and the relay that should carry it could not be used
    /// (unreachable, a certificate we do not trust, not a relay at all).
    #[error(
        "could not connect to the server through its relay {url}: {why} (check the relay URL, and relay_ca if the relay has a self-signed certificate)"
    )]
    Relay {
        /// The relay.
        url: String,
        /// What went wrong with it, in iroh's words.
        why: String,
    },
    /// The server closed the connection because we are not on its allowlist.
    #[error(
        "the server refused us: our endpoint id is not on its allowlist (ask its operator to run `p2p-usb-server allow <our id>`)"
    )]
    NotAllowed,
    /// No protocol version in common.
    #[error("the server speaks protocol versions {min}..={max}, we speak {ours}")]
    Version {
        /// Server's oldest.
        min: u16,
        /// Server's newest.
        max: u16,
        /// Ours.
        ours: u16,
    },
    /// The server did not answer in time.
    #[error("the server did not answer within {0:?}")]
    Timeout(Duration),
    /// The server broke the protocol.
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
    /// A stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The connection is gone.
    #[error("the connection is closed: {0}")]
    Closed(String),
    /// An attach was refused.
    #[error("attach refused: {0:?}")]
    Refused(AttachRefusal),
}

/// Why a connect failed, when the relay is to blame: a relay of ours that is down, with its
/// last error, or the server's relay (from its ticket) when no relay could be reached at all.
fn relay_failure(endpoint: &Endpoint, servers: Option<&iroh::RelayUrl>) -> Option<ClientError> {
    use iroh::Watcher;
    let statuses = endpoint.home_relay_status().get();
    let down = statuses.iter().filter(|s| !s.is_connected()).find_map(|s| {
        s.last_error().map(|e| ClientError::Relay {
            url: s.url().to_string(),
            why: format!("{e:#}"),
        })
    });
    if down.is_some() || statuses.iter().any(|s| s.is_connected()) {
        return down;
    }
    servers.map(|url| ClientError::Relay {
        url: url.to_string(),
        why: "no connection to it could be made (unreachable, or its certificate is not one we trust)"
            .to_owned(),
    })
}

type Waiters = Arc<Mutex<HashMap<RequestId, oneshot::Sender<Response>>>>;
type PingWaiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Pong>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// A connection to one server, after a successful handshake.
pub struct ServerConnection {
    /// Dropping the last handle of an endpoint closes it, and with it this connection.
    _endpoint: Endpoint,
    conn: Connection,
    welcome: Welcome,
    tx: tokio::sync::Mutex<FramedSend<ClientMessage>>,
    waiters: Waiters,
    pings: PingWaiters,
    next_id: AtomicU32,
    next_nonce: AtomicU64,
    events: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    /// Changes of the selected path so far ([`crate::path::watch`]).
    path_changes: Arc<AtomicU64>,
}

impl ServerConnection {
    /// Dials `addr`, says hello, and waits for the welcome. The connection is closed once the
    /// server has not been heard from for `silent_after` (the endpoint's
    /// [`crate::NetConfig::dead_peer_bound`]; see [`crate::liveness`]).
    pub async fn connect(
        endpoint: &Endpoint,
        addr: EndpointAddr,
        capabilities: Capabilities,
        agent: &str,
        silent_after: Duration,
    ) -> Result<Arc<Self>, ClientError> {
        let relay = addr.relay_urls().next().cloned();
        let conn = match tokio::time::timeout(REQUEST_TIMEOUT, endpoint.connect(addr, ALPN)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                let failed = relay_failure(endpoint, relay.as_ref());
                return Err(failed.unwrap_or(ClientError::Connect(e.to_string())));
            }
            Err(_) => {
                let failed = relay_failure(endpoint, relay.as_ref());
                return Err(failed.unwrap_or(ClientError::Timeout(REQUEST_TIMEOUT)));
            }
        };
        let (send, recv) = conn.open_bi().await.map_err(|e| closed_error(&conn, e))?;
        let mut tx = FramedSend::new(send);
        let mut rx = FramedRecv::<ServerMessage>::new(recv);
        tx.send(&ClientMessage::Hello(Hello::ours(capabilities, agent)))
            .await
            .map_err(|e| stream_error(&conn, e))?;
        let first = tokio::time::timeout(REQUEST_TIMEOUT, rx.next())
            .await
            .map_err(|_| ClientError::Timeout(REQUEST_TIMEOUT))?
            .map_err(|e| stream_error(&conn, e))?;
        let welcome = match first {
            Some(ServerMessage::Welcome(w)) => w,
            Some(ServerMessage::Refused(HandshakeRefusal::NotAllowed)) => {
                return Err(ClientError::NotAllowed);
            }
            Some(ServerMessage::Refused(HandshakeRefusal::Version { min, max })) => {
                return Err(ClientError::Version {
                    min,
                    max,
                    ours: protocol::wire::PROTOCOL_VERSION,
                });
            }
            Some(other) => {
                return Err(ClientError::Protocol(format!(
                    "expected a welcome, got {other:?}"
                )));
            }
            None => return Err(closed_error(&conn, "stream ended")),
        };
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let this = Arc::new(ServerConnection {
            _endpoint: endpoint.clone(),
            conn,
            welcome,
            tx: tokio::sync::Mutex::new(tx),
            waiters: Arc::default(),
            pings: Arc::default(),
            next_id: AtomicU32::new(1),
            next_nonce: AtomicU64::new(1),
            events: Mutex::new(Some(events_rx)),
            path_changes: Arc::default(),
        });
        tokio::spawn(route(Arc::downgrade(&this), rx, events_tx));
        tokio::spawn(crate::path::watch(
            this.conn.clone(),
            format!("server {}", this.conn.remote_id()),
            this.path_changes.clone(),
        ));
        tokio::spawn(crate::liveness::watch(
            this.conn.clone(),
            silent_after,
            protocol::wire::close::SILENT_PEER,
            format!("server {}", this.conn.remote_id()),
        ));
        Ok(this)
    }

    /// What the server agreed to.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The QUIC connection, for its statistics and to watch it close.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The path the connection's data takes now.
    pub fn path(&self) -> Option<crate::path::PathView> {
        crate::path::selected(&self.conn)
    }

    /// How often the selected path has changed (relay to direct and back).
    pub fn path_changes(&self) -> u64 {
        self.path_changes.load(Ordering::Relaxed)
    }

    /// QUIC's smoothed round-trip estimate on the path in use, once it has one.
    pub fn rtt(&self) -> Option<std::time::Duration> {
        self.conn
            .paths()
            .iter()
            .find(|p| p.is_selected())
            .map(|p| p.rtt())
    }

    /// The server's events; `None` after the first call.
    pub fn take_events(&self) -> Option<mpsc::UnboundedReceiver<Event>> {
        lock(&self.events).take()
    }

    /// Sends a request and waits for its response.
    pub async fn request(&self, request: Request) -> Result<Response, ClientError> {
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(id, tx);
        let sent = self
            .tx
            .lock()
            .await
            .send(&ClientMessage::Request { id, request })
            .await;
        if let Err(e) = sent {
            lock(&self.waiters).remove(&id);
            return Err(stream_error(&self.conn, e));
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(closed_error(&self.conn, "connection closed")),
            Err(_) => {
                lock(&self.waiters).remove(&id);
                Err(ClientError::Timeout(REQUEST_TIMEOUT))
            }
        }
    }

    /// The devices we may attach.
    pub async fn list_devices(&self) -> Result<Vec<DeviceInfo>, ClientError> {
        match self.request(Request::ListDevices).await? {
            Response::Devices(devices) => Ok(devices),
            other => Err(unexpected(other)),
        }
    }

    /// Claims a device.
    pub async fn attach(
        &self,
        device: DeviceId,
        pin: Option<String>,
    ) -> Result<(AttachHandle, DeviceInfo), ClientError> {
        match self.request(Request::Attach { device, pin }).await? {
            Response::Attached { handle, device } => Ok((handle, device)),
            Response::AttachRefused(refusal) => Err(ClientError::Refused(refusal)),
            other => Err(unexpected(other)),
        }
    }

    /// Releases a claim.
    pub async fn detach(&self, handle: AttachHandle) -> Result<(), ClientError> {
        match self.request(Request::Detach { handle }).await? {
            Response::Detached { .. } | Response::UnknownHandle(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Measures one round trip on the control stream.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let nonce = self.next_nonce.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pings).insert(nonce, tx);
        let sent_us = now_us();
        self.tx
            .lock()
            .await
            .send(&ClientMessage::Ping(Ping { nonce, sent_us }))
            .await
            .map_err(|e| stream_error(&self.conn, e))?;
        let pong = tokio::time::timeout(REQUEST_TIMEOUT, rx)
            .await
            .map_err(|_| ClientError::Timeout(REQUEST_TIMEOUT))?
            .map_err(|_| closed_error(&self.conn, "connection closed"))?;
        Ok(Duration::from_micros(
            now_us().saturating_sub(pong.echo_sent_us),
        ))
    }

    /// Opens the URB stream of one endpoint of an attachment.
    pub async fn open_urb_stream(
        &self,
        handle: AttachHandle,
        endpoint: EndpointNumber,
        direction: Direction,
    ) -> Result<(FramedSend<UrbClientMessage>, FramedRecv<UrbServerMessage>), ClientError> {
        let (send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| closed_error(&self.conn, e))?;
        let mut tx = FramedSend::new(send);
        tx.send(&UrbClientMessage::Open(UrbStreamOpen {
            handle,
            endpoint,
            direction,
        }))
        .await
        .map_err(|e| stream_error(&self.conn, e))?;
        Ok((tx, FramedRecv::new(recv)))
    }

    /// Closes this connection gracefully and leaves the endpoint open for the next one (what a
    /// supervisor that reconnects needs); the server releases our claims at once.
    pub fn close_connection(&self) {
        self.close_and_log();
    }

    /// Closes the connection and our endpoint gracefully (the end of a one-shot command); the
    /// server releases every claim of ours at once instead of waiting for its idle timeout.
    /// The endpoint cannot connect again afterwards.
    pub async fn close(&self) {
        self.close_and_log();
        self._endpoint.close().await;
    }

    fn close_and_log(&self) {
        let peer = format!("server {}", self.conn.remote_id());
        crate::path::close_and_log(&self.conn, &peer, close::NORMAL, "bye");
    }
}

/// Routes everything the server sends on the control stream until it ends.
async fn route(
    this: std::sync::Weak<ServerConnection>,
    mut rx: FramedRecv<ServerMessage>,
    events: mpsc::UnboundedSender<Event>,
) {
    loop {
        let msg = match rx.next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            Err(e) => {
                debug!("control stream ended: {e}");
                if e.is_violation()
                    && let Some(this) = this.upgrade()
                {
                    this.conn.close(
                        VarInt::from_u32(close::PROTOCOL_VIOLATION),
                        e.to_string().as_bytes(),
                    );
                }
                break;
            }
        };
        let Some(this) = this.upgrade() else { break };
        match msg {
            ServerMessage::Response { id, response } => {
                if let Some(waiter) = lock(&this.waiters).remove(&id) {
                    let _ = waiter.send(response);
                }
            }
            ServerMessage::Event(event) => {
                let _ = events.send(event);
            }
            ServerMessage::Ping(ping) => {
                let pong = ClientMessage::Pong(Pong {
                    nonce: ping.nonce,
                    echo_sent_us: ping.sent_us,
                    answered_us: now_us(),
                });
                let _ = this.tx.lock().await.send(&pong).await;
            }
            ServerMessage::Pong(pong) => {
                if let Some(waiter) = lock(&this.pings).remove(&pong.nonce) {
                    let _ = waiter.send(pong);
                }
            }
            ServerMessage::Welcome(_) | ServerMessage::Refused(_) => {
                this.conn.close(
                    VarInt::from_u32(close::PROTOCOL_VIOLATION),
                    b"handshake message after the handshake",
                );
                break;
            }
        }
    }
}

fn unexpected(response: Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response {response:?}"))
}

/// The most telling error for a failure on `conn`: the server's close reason if it closed.
fn closed_error(conn: &Connection, fallback: impl std::fmt::Display) -> ClientError {
    match conn.close_reason() {
        Some(iroh::endpoint::ConnectionError::ApplicationClosed(app))
            if app.error_code == VarInt::from_u32(close::NOT_ALLOWED) =>
        {
            ClientError::NotAllowed
        }
        Some(reason) => ClientError::Closed(reason.to_string()),
        None => ClientError::Closed(fallback.to_string()),
    }
}

fn stream_error(conn: &Connection, e: StreamError) -> ClientError {
    if e.is_violation() {
        ClientError::Stream(e)
    } else {
        closed_error(conn, e)
    }
}
