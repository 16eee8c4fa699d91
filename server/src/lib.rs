//! The rust-p2p-usb server: exports USB devices to allowed iroh peers.

pub mod config;
pub mod connection;
pub mod device;
pub mod gate;
pub mod status;
mod sync;
pub mod tracker;
pub mod tui;
