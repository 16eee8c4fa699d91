//! The rust-p2p-usb server: exports USB devices to allowed iroh peers.

pub mod config;
pub mod device;
pub mod session;
pub mod status;
pub mod tracker;
pub mod tui;
