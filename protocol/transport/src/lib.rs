//! The I/O edge of the wire protocol, shared by server and client.
//!
//! `protocol` turns bytes into messages and never touches a socket; this crate is where the
//! bytes come from: iroh endpoints configured the one safe way ([`endpoint`]), the secret key
//! on disk ([`key`]), the cipher suite ([`cipher`]), relays ([`relay`]), the path a connection
//! takes ([`path`]), ending a connection whose peer went silent ([`liveness`]), connection
//! tickets ([`ticket`]), frames read from and written to QUIC streams ([`framed`]), and the
//! interfaces never offered to a peer because they run over USB/IP ([`tunneled`]).
//! [`alloc`] sets the allocator policy both daemons run with, and [`daemon`] holds what else
//! they share around their work (paths, config errors, signals).

pub mod alloc;
pub mod cipher;
pub mod client;
pub mod daemon;
pub mod endpoint;
pub mod framed;
pub mod key;
pub mod liveness;
pub mod path;
pub mod relay;
pub mod ticket;
pub mod tunneled;

pub use client::{ClientError, ServerConnection};
pub use endpoint::{NetConfig, bind_endpoint};
pub use framed::{FramedRecv, FramedSend, StreamError};
pub use key::load_or_create_secret_key;
pub use relay::{Relays, parse_relay_url};
pub use ticket::Ticket;
