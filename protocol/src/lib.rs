//! Wire formats, no I/O.

/// The version of our QUIC wire protocol.
pub const PROTOCOL_VERSION: u16 = 1;
