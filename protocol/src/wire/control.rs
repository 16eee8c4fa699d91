//! Messages of the control stream: handshake, device list, attach and detach, events, ping.
//!
//! Postcard encodes an enum variant as its index, so every enum here is append-only: a new
//! variant goes at the end, and changing or removing one bumps [`PROTOCOL_VERSION`].

use serde::{Deserialize, Serialize};

use super::device::{DeviceId, DeviceInfo};
use super::frame::{Invalid, Validate, at_most};

/// The version of our wire protocol this crate speaks. Version 2: the client keeps each URB
/// stream within the URB window and the server reads every frame at once ([`super::window`]);
/// a version 1 server paused reading at its queue depth, which could hide an unlink.
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest version this crate still speaks: a version 1 client does not keep the window.
pub const MIN_PROTOCOL_VERSION: u16 = 2;
/// The most devices one list response or one session may carry.
pub const MAX_DEVICES_PER_LIST: usize = 64;
/// The longest PIN.
pub const MAX_PIN_LEN: usize = 64;
/// The longest free-text field (software name, refusal detail).
pub const MAX_TEXT_LEN: usize = 256;

/// Optional features, negotiated as the intersection of both sides' sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// Isochronous URBs are carried (with packet descriptors).
    pub const ISOCHRONOUS: Capabilities = Capabilities(1 << 0);
    /// The server may answer bulk IN phases of mass-storage commands ahead of time.
    pub const BULK_READ_AHEAD: Capabilities = Capabilities(1 << 1);
    /// The server may keep polling interrupt IN endpoints and push the results.
    pub const INTERRUPT_STREAMING: Capabilities = Capabilities(1 << 2);
    /// Completions carry the server's timing split.
    pub const TIMING: Capabilities = Capabilities(1 << 3);
    /// The server holds a URB sent with `SubmitAfter` until the URB it names has completed:
    /// what read-ahead needs to be safe on every device, so a client speculates only with it.
    pub const ORDERED_SUBMIT: Capabilities = Capabilities(1 << 4);

    /// Both sets.
    pub const fn union(self, other: Capabilities) -> Capabilities {
        Capabilities(self.0 | other.0)
    }
    /// Only what both sets have.
    pub const fn intersection(self, other: Capabilities) -> Capabilities {
        Capabilities(self.0 & other.0)
    }
    /// Whether every bit of `other` is set here.
    pub const fn contains(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }
}

/// The client's first frame on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The newest version the client speaks.
    pub max_version: u16,
    /// The oldest version the client speaks.
    pub min_version: u16,
    /// What the client can do.
    pub capabilities: Capabilities,
    /// Software name and version, for logs.
    pub agent: String,
}

impl Hello {
    /// The hello this crate sends.
    pub fn ours(capabilities: Capabilities, agent: impl Into<String>) -> Hello {
        Hello {
            max_version: PROTOCOL_VERSION,
            min_version: MIN_PROTOCOL_VERSION,
            capabilities,
            agent: agent.into(),
        }
    }
}

/// The server's answer to a [`Hello`] it accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version both now speak.
    pub version: u16,
    /// What both can do.
    pub capabilities: Capabilities,
    /// Software name and version, for logs.
    pub agent: String,
}

/// Why the server ends a connection during the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandshakeRefusal {
    /// No version in common; the server speaks `min..=max`.
    Version {
        /// Oldest the server speaks.
        min: u16,
        /// Newest the server speaks.
        max: u16,
    },
    /// The client's endpoint id is not on the allowlist. Sent before anything else.
    NotAllowed,
}

/// Picks the version and capabilities for a session, as the server does on a [`Hello`]: the
/// newest version in both ranges.
pub fn negotiate(
    hello: &Hello,
    ours: Capabilities,
    agent: &str,
) -> Result<Welcome, HandshakeRefusal> {
    let version = hello.max_version.min(PROTOCOL_VERSION);
    if version < hello.min_version || version < MIN_PROTOCOL_VERSION {
        return Err(HandshakeRefusal::Version {
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        });
    }
    Ok(Welcome {
        version,
        capabilities: hello.capabilities.intersection(ours),
        agent: agent.to_owned(),
    })
}

/// Matches a response to its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId(pub u32);

/// A server's name for one attachment of one device by one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachHandle(pub u32);

/// What a client asks on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The devices this client may attach.
    ListDevices,
    /// Claim a device exclusively.
    Attach {
        /// Which device.
        device: DeviceId,
        /// The device's PIN, if it has one.
        pin: Option<String>,
    },
    /// Release an attachment; its URB streams end.
    Detach {
        /// Which attachment.
        handle: AttachHandle,
    },
}

/// Why an attach was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttachRefusal {
    /// Another client holds it.
    Busy,
    /// This client may not use this device.
    NotAllowed,
    /// The device is no longer there.
    Gone,
    /// The device needs a PIN and none was given.
    PinRequired,
    /// The PIN given is wrong.
    PinWrong,
    /// The server could not claim it (a kernel driver would not let go, permissions).
    ClaimFailed(String),
}

/// The server's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::ListDevices`].
    Devices(Vec<DeviceInfo>),
    /// The device is claimed for this client.
    Attached {
        /// Name of the attachment; URB streams open with it.
        handle: AttachHandle,
        /// The device as it is now.
        device: DeviceInfo,
    },
    /// The attach was refused.
    AttachRefused(AttachRefusal),
    /// The attachment is released.
    Detached {
        /// Which attachment.
        handle: AttachHandle,
    },
    /// The handle names no attachment of this client.
    UnknownHandle(AttachHandle),
}

/// Why an attachment ended without the client asking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// The device was unplugged.
    DeviceRemoved,
    /// The client's permission was revoked.
    Revoked,
    /// The server is shutting down.
    ServerShutdown,
    /// The device failed in a way the server could not recover from.
    DeviceError(String),
}

/// Something that happened on the server, pushed to every client with a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A device this client may use appeared.
    DeviceArrived(DeviceInfo),
    /// A device disappeared.
    DeviceRemoved(DeviceId),
    /// One of this client's attachments ended.
    AttachmentEnded {
        /// Which attachment.
        handle: AttachHandle,
        /// Why.
        reason: EndReason,
    },
}

/// A round-trip probe; the timestamps are the sender's clock, echoed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Matches the pong.
    pub nonce: u64,
    /// Sender's monotonic clock when sent, in microseconds.
    pub sent_us: u64,
}

/// The answer to a [`Ping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The ping's nonce.
    pub nonce: u64,
    /// The ping's `sent_us`, echoed.
    pub echo_sent_us: u64,
    /// The answerer's monotonic clock when it answered, in microseconds.
    pub answered_us: u64,
}

/// Everything a client sends on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// First frame, exactly once.
    Hello(Hello),
    /// A request; the server answers with the same id.
    Request {
        /// Matches the response.
        id: RequestId,
        /// What is asked.
        request: Request,
    },
    /// RTT probe.
    Ping(Ping),
    /// Answer to a server's ping.
    Pong(Pong),
}

/// Everything a server sends on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// Handshake accepted.
    Welcome(Welcome),
    /// Handshake refused; the server closes the connection after this.
    Refused(HandshakeRefusal),
    /// Answer to a request.
    Response {
        /// The request's id.
        id: RequestId,
        /// The answer.
        response: Response,
    },
    /// Unprompted news.
    Event(Event),
    /// RTT probe (the server watches for silent peers too).
    Ping(Ping),
    /// Answer to a client's ping.
    Pong(Pong),
}

fn text(what: &'static str, s: &str) -> Result<(), Invalid> {
    at_most(what, s.len(), MAX_TEXT_LEN as u64)
}

impl Validate for ClientMessage {
    fn validate(&self) -> Result<(), Invalid> {
        match self {
            ClientMessage::Hello(h) => text("agent length", &h.agent),
            ClientMessage::Request {
                request: Request::Attach { pin: Some(pin), .. },
                ..
            } => at_most("PIN length", pin.len(), MAX_PIN_LEN as u64),
            ClientMessage::Request { .. } | ClientMessage::Ping(_) | ClientMessage::Pong(_) => {
                Ok(())
            }
        }
    }
}

impl Validate for ServerMessage {
    fn validate(&self) -> Result<(), Invalid> {
        match self {
            ServerMessage::Welcome(w) => text("agent length", &w.agent),
            ServerMessage::Response { response, .. } => match response {
                Response::Devices(devices) => {
                    at_most("device count", devices.len(), MAX_DEVICES_PER_LIST as u64)?;
                    devices.iter().try_for_each(Validate::validate)
                }
                Response::Attached { device, .. } => device.validate(),
                Response::AttachRefused(AttachRefusal::ClaimFailed(why)) => {
                    text("refusal detail", why)
                }
                _ => Ok(()),
            },
            ServerMessage::Event(Event::DeviceArrived(device)) => device.validate(),
            ServerMessage::Event(Event::AttachmentEnded {
                reason: EndReason::DeviceError(why),
                ..
            }) => text("end reason", why),
            ServerMessage::Event(_)
            | ServerMessage::Refused(_)
            | ServerMessage::Ping(_)
            | ServerMessage::Pong(_) => Ok(()),
        }
    }
}
