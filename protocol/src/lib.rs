//! Wire formats of rust-p2p-usb, with no I/O in them.
//!
//! Bytes go in, typed messages come out, and back: no sockets, no runtime, no kernel. That is
//! what lets the client's USB/IP session and the server's URB tracker be tested from plain unit
//! tests and fuzzed.
//!
//! - [`wire`]: our protocol between client and server over QUIC (postcard frames).
//! - [`usbip`]: the kernel's USB/IP protocol, as vhci-hcd and `usbip` tools speak it.
//! - [`usb`]: the USB vocabulary both share (directions, speeds, statuses as errnos).
//! - [`descriptors`]: the descriptor parsing both sides need to tell endpoint types apart.
//! - [`bot`]: mass storage's Bulk-Only wrappers (CBW, CSW), read and written on both sides.
//! - [`select`]: the one grammar people use to name a device, on either side.

pub mod bot;
mod buf;
pub mod descriptors;
pub mod scsi;
pub mod select;
pub mod usb;
pub mod usbip;
pub mod wire;

pub use wire::PROTOCOL_VERSION;
