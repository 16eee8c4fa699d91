//! Our own wire protocol between client and server, carried over iroh's QUIC connections.
//!
//! Every stream carries length-prefixed postcard frames ([`frame`]). One connection has:
//!
//! - **one control stream**: the first bidirectional stream, opened by the client. The client
//!   sends [`ClientMessage`]s (a [`Hello`] first), the server [`ServerMessage`]s (a [`Welcome`]
//!   or a [`HandshakeRefusal`] first, then responses, events and pings);
//! - **one URB stream per attached endpoint**, opened by the client after an attach
//!   ([`urb`]), so a slow bulk endpoint never holds up control or interrupt traffic.
//!
//! `kernel-notes/PROTOCOL.md` is the full specification.

pub mod control;
pub mod device;
pub mod frame;
pub mod urb;

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
