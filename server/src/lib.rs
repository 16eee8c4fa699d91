//! The rust-p2p-usb server: exports USB devices to allowed iroh peers.

pub mod device;
pub mod session;
pub mod tracker;
