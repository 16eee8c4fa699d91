//! Real USB devices through Linux usbfs, on nusb.
//!
//! Two concerns that change for different reasons: which devices there are (`source.rs`:
//! listing, hot-plug, the share filter, what a client is told about each device) and what an
//! opened device does (`opened.rs`: claims, the standard requests the server carries out,
//! one worker per endpoint in `device::endpoint`). nusb has no isochronous transfers:
//! interfaces with iso endpoints are claimed and run on a usbfs file of their own (`iso.rs`,
//! with the raw calls fenced in `usbfs.rs`).
//!
//! Nothing here blocks a runtime thread: nusb's transfers are futures, and its blocking calls
//! (claims, configuration and alternate-setting switches, clearing a halt) run on the blocking
//! pool, either through `spawn_blocking` or awaited with nusb's `tokio` feature.

mod iso;
mod opened;
mod source;
mod usbfs;

pub use source::{DeviceFilter, UsbError, UsbSource};
