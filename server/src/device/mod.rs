//! Where URBs meet devices: the interface between the server's sessions and a device source.
//!
//! A [`DeviceSource`] lists devices and opens (claims) them; an [`OpenedDevice`] runs URBs.
//! Real USB devices ([`usb`], on nusb/usbfs) and the simulated ones ([`sim`]) implement the same
//! two traits, so everything above this module runs the same code for both.

mod endpoint;
pub mod iso;
pub mod sim;
pub mod usb;

use protocol::usb::{Direction, EndpointNumber};
use protocol::wire::{DeviceId, DeviceInfo, UrbComplete, UrbId, UrbSubmit};
use tokio::sync::mpsc;

/// Where a device sends each finished URB. One sender per URB stream; unbounded because the
/// session bounds how many URBs are in flight (the queue depth), not the channel.
pub type CompletionSender = mpsc::UnboundedSender<UrbComplete>;

/// A change in the set of devices a source offers.
#[derive(Debug, Clone)]
pub enum DeviceEvent {
    /// A device appeared (or became exportable).
    Arrived(DeviceInfo),
    /// A device went away. URBs in flight on it have completed or will complete with
    /// `NoDevice`.
    Removed(DeviceId),
}

/// Why a device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The id names no device (it was unplugged, or never existed).
    #[error("no device with id {0:?}")]
    Gone(DeviceId),
    /// The OS refused us the device node or an interface: what fixes it is the operator's.
    #[error(
        "no permission to claim the device ({0}); run the server as root, or install its udev rule (server/deploy/70-p2p-usb.rules)"
    )]
    Permission(String),
    /// Someone else holds it: a kernel driver that would not let go, another program, or
    /// (for a simulated disk) another attachment.
    #[error("the device is in use: {0}")]
    Busy(String),
    /// Anything else the OS said.
    #[error("could not claim the device: {0}")]
    Claim(String),
}

/// A provider of exportable devices.
pub trait DeviceSource: Send + Sync + 'static {
    /// The devices it offers now.
    fn devices(&self) -> Vec<DeviceInfo>;

    /// Opens and exclusively claims a device: detaches its kernel drivers and claims every
    /// interface of its active configuration.
    fn open(&self, id: DeviceId) -> Result<Box<dyn OpenedDevice>, OpenError>;

    /// Hot-plug events from now on. A source without hot-plug returns a receiver that never
    /// yields.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<DeviceEvent>;
}

/// A claimed device that runs URBs.
///
/// Every submitted URB completes exactly once on the sender it was submitted with: with its
/// result, with `Unlinked` after [`cancel`](Self::cancel), or with `NoDevice` when the device
/// goes away or is released. Methods never block on the device.
pub trait OpenedDevice: Send {
    /// Starts a URB. Many may be in flight per endpoint.
    fn submit(&mut self, urb: UrbSubmit, done: CompletionSender);

    /// Asks for a URB still in flight to end early with `Unlinked`. A URB that already finished
    /// is not affected.
    fn cancel(&mut self, endpoint: EndpointNumber, direction: Direction, id: UrbId);

    /// Ends every URB in flight and gives the device back to its kernel drivers.
    fn release(self: Box<Self>);
}
