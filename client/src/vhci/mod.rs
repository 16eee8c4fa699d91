//! The client's kernel-facing half: presenting a remote device through vhci-hcd.
//!
//! - [`session`]: the USB/IP conversation of one port, sans-IO.
//! - [`readahead`]: Bulk-Only Transport read-ahead, so a READ costs one round trip, not three.
//!   Interrupt-IN streaming ([`readahead::interrupt`]) polls HID devices ahead on the same queues.
//! - [`disk`]: bigger SCSI commands for a usb-storage disk on a vhci port.
//! - [`sysfs`]: finding a free vhci port, attaching and detaching through sysfs.
//! - [`link`]: moving bytes between our end of the socketpair and the async side, with
//!   io_uring on a dedicated thread or plain threads where io_uring is unavailable.
//! - `sys`: the only module with `unsafe` (the ring's submissions, eventfd, raw fds).

pub mod disk;
pub mod iso_ahead;
pub mod link;
pub mod readahead;
pub mod session;
mod sys;
pub mod sysfs;
mod uring;

pub use iso_ahead::IsoEndpointStats;
pub use link::{Backend, KernelLink, KernelRx, KernelTx, LinkEnd, LinkHandle, LinkOptions};
pub use session::{Action, BadCompletion, CloseReason, PortSession, SessionStats};
pub use sysfs::{PortStatus, RealSys, Vhci, VhciError, VhciSys};
