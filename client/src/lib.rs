//! rust-p2p-usb's client library: the pieces that present a remote USB device to this
//! machine's kernel.
//!
//! The kernel side lives in [`vhci`]: a sans-IO USB/IP session per attached port, the sysfs
//! calls that attach a socketpair to a vhci-hcd port, and the byte pump between that socket and
//! the async networking code. The networking glue that carries URBs to the server over iroh
//! builds on these.

pub mod attach;
pub mod bridge;
pub mod config;
pub mod latency;
pub mod port_report;
pub mod probe;
pub mod supervisor;
pub mod telemetry;
pub mod tui;
pub mod vhci;
