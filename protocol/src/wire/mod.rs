//! Our own wire protocol between client and server, carried over iroh's QUIC connections.
//!
//! Every stream carries length-prefixed postcard frames ([`frame`]). One connection has:
//!
//! - **one control stream**: the first bidirectional stream, opened by the client. The client
//!   sends [`ClientMessage`]s (a [`Hello`] first), the server [`ServerMessage`]s (a [`Welcome`]
//!   or a [`HandshakeRefusal`] first, then responses, events and pings);
//! - **one URB stream per attached endpoint**, opened by the client after an attach
//!   ([`urb`]), so a slow bulk endpoint never holds up control or interrupt traffic; a
//!   client keeps each within the URB window ([`window`]), so the server reads them at once.
//!
//! `kernel-notes/PROTOCOL.md` is the full specification.

/// The ALPN our QUIC connections negotiate. The number is the major protocol generation: a
/// peer that does not speak it fails the TLS handshake instead of misreading frames.
pub const ALPN: &[u8] = b"rust-p2p-usb/1";

/// QUIC application close codes: why a peer ended the connection.
pub mod close {
    /// Orderly shutdown.
    pub const NORMAL: u32 = 0;
    /// A frame was malformed, out of bounds or out of order; the reason is logged.
    pub const PROTOCOL_VIOLATION: u32 = 1;
    /// The peer's endpoint id is not on the allowlist (or was revoked).
    pub const NOT_ALLOWED: u32 = 2;
    /// No common protocol version.
    pub const VERSION_MISMATCH: u32 = 3;
    /// The server is shutting down.
    pub const SHUTTING_DOWN: u32 = 4;
    /// The peer answered no ping in time.
    pub const SILENT_PEER: u32 = 5;
}

pub mod around;
pub mod control;
pub mod device;
pub mod frame;
pub mod urb;
pub mod window;

pub use around::{
    AroundData, DATA_APART_FROM, DataApart, DataAt, complete_around_data, submit_around_data,
};
pub use control::{
    AttachHandle, AttachRefusal, Capabilities, ClientMessage, EndReason, Event, HandshakeRefusal,
    Hello, MAX_DEVICES_PER_LIST, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Ping, Pong, Request,
    RequestId, Response, ServerMessage, Welcome, negotiate,
};
pub use device::{ClassTriple, DeviceId, DeviceInfo};
pub use frame::{
    FrameDecoder, FrameError, Invalid, MAX_FRAME_LEN, Validate, encode_frame, frame_bytes,
};
pub use urb::{
    IsoComplete, IsoSubmit, ServerTiming, UrbClientMessage, UrbComplete, UrbId, UrbServerMessage,
    UrbStreamOpen, UrbSubmit,
};
pub use window::{URB_WINDOW, URB_WINDOW_BYTES, UrbWindow, urb_bytes};
