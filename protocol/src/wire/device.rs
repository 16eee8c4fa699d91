//! How a server describes a device: everything a client needs to present it to its kernel (or
//! to a USB/IP client) without asking the device again.

use serde::{Deserialize, Serialize};

use super::frame::{Invalid, Validate, at_most};
use crate::descriptors::{Configuration, DEVICE_DESCRIPTOR_LEN};
use crate::select::VidPid;
use crate::usb::Speed;

/// The longest bus id (`SYSFS_BUS_ID_SIZE` less its NUL), so it fits USB/IP's device record.
pub const MAX_BUS_ID_LEN: usize = 31;
/// The longest string we carry: a USB string descriptor holds at most 126 UTF-16 units.
pub const MAX_STRING_LEN: usize = 255;
/// The most configurations a device may list.
pub const MAX_CONFIGURATIONS: usize = 16;
/// The most configuration-descriptor bytes per device (`wTotalLength` is 16 bits).
pub const MAX_CONFIGURATION_BYTES: usize = 64 * 1024;

/// A server's name for a device while it stays plugged in. A device that is unplugged and
/// plugged back in gets a new id, so a stale attach cannot reach the wrong device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(pub u32);

/// `bDeviceClass`, `bDeviceSubClass`, `bDeviceProtocol` (or an interface's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClassTriple {
    /// Class code.
    pub class: u8,
    /// Subclass code.
    pub subclass: u8,
    /// Protocol code.
    pub protocol: u8,
}

/// One exportable device on a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The server's id for it.
    pub id: DeviceId,
    /// Its bus id on the server, e.g. `1-1.2`: stable across replugs into the same port.
    pub bus_id: String,
    /// Bus number on the server.
    pub bus_number: u8,
    /// Device address on that bus.
    pub device_address: u8,
    /// `idVendor`.
    pub vendor_id: u16,
    /// `idProduct`.
    pub product_id: u16,
    /// `bcdDevice`.
    pub bcd_device: u16,
    /// Device class triple.
    pub class: ClassTriple,
    /// Signalling speed.
    pub speed: Speed,
    /// `iManufacturer` string, if the device has one.
    pub manufacturer: Option<String>,
    /// `iProduct` string.
    pub product: Option<String>,
    /// `iSerialNumber` string.
    pub serial: Option<String>,
    /// The 18-byte device descriptor.
    #[serde(with = "serde_bytes")]
    pub device_descriptor: Vec<u8>,
    /// Each configuration descriptor with everything below it (`wTotalLength` bytes).
    pub configurations: Vec<serde_bytes::ByteBuf>,
    /// The active `bConfigurationValue` (0 if unconfigured).
    pub active_configuration: u8,
}

impl DeviceInfo {
    /// idVendor:idProduct, which prints as users type it in share rules and `--device`.
    pub fn vid_pid(&self) -> VidPid {
        VidPid {
            vendor: self.vendor_id,
            product: self.product_id,
        }
    }

    /// One line for a device listing, the same in both binaries: bus id, vid:pid, speed,
    /// manufacturer and product (`-` where the device has none), and `serial=S` if it has one.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{:<10} {} {:<9} {} {}",
            self.bus_id,
            self.vid_pid(),
            format!("{:?}", self.speed),
            self.manufacturer.as_deref().unwrap_or("-"),
            self.product.as_deref().unwrap_or("-"),
        );
        if let Some(serial) = &self.serial {
            line += &format!(" serial={serial}");
        }
        line
    }

    /// USB/IP's device id for this device: `busnum << 16 | devnum`, as `usbipd` forms it.
    pub fn usbip_devid(&self) -> u32 {
        u32::from(self.bus_number) << 16 | u32::from(self.device_address)
    }

    /// The active configuration descriptor's bytes, if the device is configured.
    pub fn active_configuration_bytes(&self) -> Option<&[u8]> {
        self.configurations
            .iter()
            .find(|c| c.get(5) == Some(&self.active_configuration))
            .map(|c| c.as_slice())
    }

    /// The class triple of each interface of the active configuration (none if unconfigured
    /// or its descriptor does not parse): what a USB/IP device list shows, and how a client
    /// tells a disk from a keyboard before any driver binds.
    pub fn interface_classes(&self) -> Vec<[u8; 3]> {
        self.active_configuration_bytes()
            .and_then(|c| Configuration::parse(c).ok())
            .map(|c| c.interface_classes())
            .unwrap_or_default()
    }
}

impl Validate for DeviceInfo {
    fn validate(&self) -> Result<(), Invalid> {
        at_most("bus id length", self.bus_id.len(), MAX_BUS_ID_LEN as u64)?;
        for s in [&self.manufacturer, &self.product, &self.serial]
            .into_iter()
            .flatten()
        {
            at_most("string length", s.len(), MAX_STRING_LEN as u64)?;
        }
        if self.device_descriptor.len() != DEVICE_DESCRIPTOR_LEN {
            return Err(Invalid::Inconsistent(
                "device descriptor is not 18 bytes long",
            ));
        }
        at_most(
            "configuration count",
            self.configurations.len(),
            MAX_CONFIGURATIONS as u64,
        )?;
        let total: usize = self.configurations.iter().map(|c| c.len()).sum();
        at_most(
            "configuration descriptor bytes",
            total,
            MAX_CONFIGURATION_BYTES as u64,
        )
    }
}
