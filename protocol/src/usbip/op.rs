//! The OP phase of USB/IP: device list and import, as `usbip list -r` and `usbip attach -r` speak
//! it over TCP before the URB phase starts (`tools/usb/usbip/src/usbip_network.h`).
//!
//! Every message starts with an 8-byte header: `version` (0x0111), `code`, `status`. A request
//! that fails gets a reply header with a non-zero status and no body, which is how `usbipd`
//! answers too.

use super::be::{u16_at, u32_at};
use crate::buf::InBuf;
use crate::usb::Speed;

/// The only USB/IP protocol version in use since Linux 3.x.
pub const USBIP_VERSION: u16 = 0x0111;
/// `OP_REQ_DEVLIST`.
pub const OP_REQ_DEVLIST: u16 = 0x8005;
/// `OP_REP_DEVLIST`.
pub const OP_REP_DEVLIST: u16 = 0x0005;
/// `OP_REQ_IMPORT`.
pub const OP_REQ_IMPORT: u16 = 0x8003;
/// `OP_REP_IMPORT`.
pub const OP_REP_IMPORT: u16 = 0x0003;
/// Size of the common header.
pub const OP_HEADER_LEN: usize = 8;
/// Size of `struct usbip_usb_device`.
pub const DEVICE_RECORD_LEN: usize = 312;
/// Size of `struct usbip_usb_interface`.
pub const INTERFACE_RECORD_LEN: usize = 4;
/// `SYSFS_PATH_MAX` as the record lays it out.
pub const PATH_LEN: usize = 256;
/// `SYSFS_BUS_ID_SIZE`.
pub const BUSID_LEN: usize = 32;
/// The most devices a list reply may carry: far past any real hub tree, small enough to bound.
pub const MAX_DEVLIST_DEVICES: u32 = 256;
/// The most interfaces USB allows in one configuration.
pub const MAX_INTERFACES: u8 = 32;

/// The status word of an OP reply (`ST_*` in usbip_network.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpStatus {
    /// `ST_OK`.
    Ok,
    /// `ST_NA`: the request is not available (for example an unknown bus id).
    NotAvailable,
    /// `ST_DEV_BUSY`: the device is already exported to someone.
    DeviceBusy,
    /// `ST_DEV_ERR`: the device is in an error state.
    DeviceError,
    /// `ST_NODEV`: no such device.
    NoDevice,
    /// `ST_ERROR`: anything else.
    Error,
    /// A status this crate does not name.
    Other(u32),
}

impl OpStatus {
    /// The wire value.
    pub fn code(self) -> u32 {
        match self {
            OpStatus::Ok => 0,
            OpStatus::NotAvailable => 1,
            OpStatus::DeviceBusy => 2,
            OpStatus::DeviceError => 3,
            OpStatus::NoDevice => 4,
            OpStatus::Error => 5,
            OpStatus::Other(code) => code,
        }
    }

    /// The status for a wire value.
    pub fn from_code(code: u32) -> Self {
        match code {
            0 => OpStatus::Ok,
            1 => OpStatus::NotAvailable,
            2 => OpStatus::DeviceBusy,
            3 => OpStatus::DeviceError,
            4 => OpStatus::NoDevice,
            5 => OpStatus::Error,
            other => OpStatus::Other(other),
        }
    }
}

/// `struct usbip_usb_device`: one exported device as USB/IP describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The device's sysfs path on the exporting machine (at most 255 bytes).
    pub path: String,
    /// Its bus id, e.g. `1-1.2` (at most 31 bytes); what `usbip attach -b` names.
    pub busid: String,
    /// Bus number.
    pub busnum: u32,
    /// Device number on that bus.
    pub devnum: u32,
    /// Signalling speed.
    pub speed: Speed,
    /// `idVendor`.
    pub vendor_id: u16,
    /// `idProduct`.
    pub product_id: u16,
    /// `bcdDevice`.
    pub bcd_device: u16,
    /// `bDeviceClass`.
    pub device_class: u8,
    /// `bDeviceSubClass`.
    pub device_subclass: u8,
    /// `bDeviceProtocol`.
    pub device_protocol: u8,
    /// The active `bConfigurationValue`.
    pub configuration_value: u8,
    /// `bNumConfigurations`.
    pub num_configurations: u8,
    /// `bNumInterfaces` of the active configuration.
    pub num_interfaces: u8,
}

/// `struct usbip_usb_interface`: the class triple of one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceRecord {
    /// `bInterfaceClass`.
    pub class: u8,
    /// `bInterfaceSubClass`.
    pub subclass: u8,
    /// `bInterfaceProtocol`.
    pub protocol: u8,
}

/// One entry of a device list: the device and its interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedDevice {
    /// The device. Its `num_interfaces` is `interfaces.len()` on the wire.
    pub device: DeviceRecord,
    /// Its interfaces.
    pub interfaces: Vec<InterfaceRecord>,
}

/// Any OP-phase message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpMessage {
    /// `OP_REQ_DEVLIST`: what do you export?
    ReqDevlist,
    /// `OP_REP_DEVLIST`: the exported devices (empty unless the status is OK).
    RepDevlist {
        /// Outcome.
        status: OpStatus,
        /// Devices.
        devices: Vec<ListedDevice>,
    },
    /// `OP_REQ_IMPORT`: attach me to this bus id.
    ReqImport {
        /// The bus id to import.
        busid: String,
    },
    /// `OP_REP_IMPORT`: the device record when the status is OK; the URB phase follows.
    RepImport {
        /// Outcome.
        status: OpStatus,
        /// The device, present exactly when `status` is OK.
        device: Option<DeviceRecord>,
    },
}

/// Why an OP-phase byte stream was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// Not USB/IP 1.1.1.
    #[error("USB/IP version {0:#06x} is not the supported {USBIP_VERSION:#06x}")]
    Version(u16),
    /// An op code that is not one of the four.
    #[error("unknown USB/IP op code {0:#06x}")]
    UnknownCode(u16),
    /// A known op code that this side never receives.
    #[error("USB/IP op code {0:#06x} does not belong on this side of the connection")]
    UnexpectedCode(u16),
    /// A device list longer than [`MAX_DEVLIST_DEVICES`].
    #[error("device list of {0} entries exceeds the maximum {MAX_DEVLIST_DEVICES}")]
    TooManyDevices(u32),
    /// More interfaces than USB allows.
    #[error("{0} interfaces exceeds the maximum {MAX_INTERFACES}")]
    TooManyInterfaces(u8),
    /// A string field that is not UTF-8.
    #[error("the {0} field is not UTF-8")]
    NotUtf8(&'static str),
    /// A request header that carries a non-zero status.
    #[error("request carries status {0}, requests must carry 0")]
    StatusOnRequest(u32),
    /// The stream ended part-way through a message.
    #[error("the stream ended inside an OP message ({0} bytes of it buffered)")]
    Truncated(usize),
    /// A previous call already failed.
    #[error("the stream already failed and cannot be resynchronised")]
    Poisoned,
}

/// Which messages a decoder reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Requests,
    Replies,
}

/// Incremental decoder for one direction of the OP phase.
///
/// After an import (a successful `OP_REP_IMPORT` on either side) the stream switches to the URB
/// phase: take the bytes already buffered with [`into_remaining`](Self::into_remaining) and push
/// them into a [`super::PduDecoder`].
#[derive(Debug)]
pub struct OpDecoder {
    side: Side,
    buf: InBuf,
    failed: bool,
    /// Set after an import: the bytes that follow belong to the URB phase.
    handed_over: bool,
}

impl OpDecoder {
    /// Decodes what a USB/IP server receives: `OP_REQ_DEVLIST`, `OP_REQ_IMPORT`.
    pub fn requests() -> Self {
        OpDecoder {
            side: Side::Requests,
            buf: InBuf::default(),
            failed: false,
            handed_over: false,
        }
    }

    /// Decodes what a USB/IP client receives: `OP_REP_DEVLIST`, `OP_REP_IMPORT`.
    pub fn replies() -> Self {
        OpDecoder {
            side: Side::Replies,
            ..Self::requests()
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.push(bytes);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed or the OP phase is over.
    ///
    /// The phase ends after an `OP_REQ_IMPORT` (usbipd closes the connection if the import then
    /// fails) and after an `OP_REP_IMPORT` that succeeded.
    pub fn next_message(&mut self) -> Result<Option<OpMessage>, OpError> {
        if self.failed {
            return Err(OpError::Poisoned);
        }
        if self.handed_over {
            return Ok(None);
        }
        match parse(self.side, self.buf.unread()) {
            Ok(Some((msg, used))) => {
                self.buf.consume(used);
                self.handed_over = matches!(
                    msg,
                    OpMessage::ReqImport { .. }
                        | OpMessage::RepImport {
                            status: OpStatus::Ok,
                            ..
                        }
                );
                Ok(Some(msg))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Whether an import ended the OP phase.
    pub fn is_handed_over(&self) -> bool {
        self.handed_over
    }

    /// Call at end of stream: an error if it stopped inside a message.
    pub fn finish(&self) -> Result<(), OpError> {
        match self.buf.unread().len() {
            0 => Ok(()),
            n => Err(OpError::Truncated(n)),
        }
    }

    /// The bytes after the last decoded message: the start of the URB phase.
    pub fn into_remaining(mut self) -> Vec<u8> {
        self.buf.take_all()
    }
}

/// Reads fixed-size fields front to back from a slice, reporting `None` when it runs out.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let slice = self.bytes.get(self.at..self.at.checked_add(N)?)?;
        self.at += N;
        let mut a = [0u8; N];
        a.copy_from_slice(slice);
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_be_bytes)
    }
}

/// Parses one message from the front of `bytes`: `Ok(None)` while incomplete, otherwise the
/// message and how many bytes it used. Counts are checked as soon as they are readable.
fn parse(side: Side, bytes: &[u8]) -> Result<Option<(OpMessage, usize)>, OpError> {
    let mut r = Reader { bytes, at: 0 };
    let Some(h) = r.take::<OP_HEADER_LEN>() else {
        return Ok(None);
    };
    let version = u16_at(&h, 0);
    let code = u16_at(&h, 2);
    let status = u32_at(&h, 4);
    if version != USBIP_VERSION {
        return Err(OpError::Version(version));
    }
    let expected = match code {
        OP_REQ_DEVLIST | OP_REQ_IMPORT => Side::Requests,
        OP_REP_DEVLIST | OP_REP_IMPORT => Side::Replies,
        other => return Err(OpError::UnknownCode(other)),
    };
    if expected != side {
        return Err(OpError::UnexpectedCode(code));
    }
    if side == Side::Requests && status != 0 {
        return Err(OpError::StatusOnRequest(status));
    }
    let status = OpStatus::from_code(status);
    let msg = match code {
        OP_REQ_DEVLIST => OpMessage::ReqDevlist,
        OP_REQ_IMPORT => {
            let Some(busid) = r.take::<BUSID_LEN>() else {
                return Ok(None);
            };
            OpMessage::ReqImport {
                busid: c_string(&busid, "busid")?,
            }
        }
        OP_REP_IMPORT => {
            let device = if status == OpStatus::Ok {
                match read_device(&mut r)? {
                    Some(d) => Some(d),
                    None => return Ok(None),
                }
            } else {
                None
            };
            OpMessage::RepImport { status, device }
        }
        _ => {
            let mut devices = Vec::new();
            if status == OpStatus::Ok {
                let Some(count) = r.u32() else {
                    return Ok(None);
                };
                if count > MAX_DEVLIST_DEVICES {
                    return Err(OpError::TooManyDevices(count));
                }
                for _ in 0..count {
                    let Some(device) = read_device(&mut r)? else {
                        return Ok(None);
                    };
                    let mut interfaces = Vec::with_capacity(device.num_interfaces.into());
                    for _ in 0..device.num_interfaces {
                        let Some(i) = r.take::<INTERFACE_RECORD_LEN>() else {
                            return Ok(None);
                        };
                        interfaces.push(InterfaceRecord {
                            class: i[0],
                            subclass: i[1],
                            protocol: i[2],
                        });
                    }
                    devices.push(ListedDevice { device, interfaces });
                }
            }
            OpMessage::RepDevlist { status, devices }
        }
    };
    Ok(Some((msg, r.at)))
}

fn read_device(r: &mut Reader<'_>) -> Result<Option<DeviceRecord>, OpError> {
    let Some(d) = r.take::<DEVICE_RECORD_LEN>() else {
        return Ok(None);
    };
    let num_interfaces = d[311];
    if num_interfaces > MAX_INTERFACES {
        return Err(OpError::TooManyInterfaces(num_interfaces));
    }
    let at = PATH_LEN + BUSID_LEN;
    Ok(Some(DeviceRecord {
        path: c_string(&d[..PATH_LEN], "path")?,
        busid: c_string(&d[PATH_LEN..at], "busid")?,
        busnum: u32_at(&d, at),
        devnum: u32_at(&d, at + 4),
        speed: Speed::from_kernel_code(u32_at(&d, at + 8)),
        vendor_id: u16_at(&d, at + 12),
        product_id: u16_at(&d, at + 14),
        bcd_device: u16_at(&d, at + 16),
        device_class: d[at + 18],
        device_subclass: d[at + 19],
        device_protocol: d[at + 20],
        configuration_value: d[at + 21],
        num_configurations: d[at + 22],
        num_interfaces,
    }))
}

/// A NUL-padded C string field; a field with no NUL uses all its bytes, as `strncpy` leaves it.
fn c_string(field: &[u8], name: &'static str) -> Result<String, OpError> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    std::str::from_utf8(&field[..end])
        .map(str::to_owned)
        .map_err(|_| OpError::NotUtf8(name))
}

// ---- encoding ----

fn put_header(out: &mut Vec<u8>, code: u16, status: OpStatus) {
    out.extend_from_slice(&USBIP_VERSION.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&status.code().to_be_bytes());
}

/// Writes `s` NUL-padded into an `N`-byte field, cut to `N - 1` bytes so a NUL always ends it.
fn put_c_string<const N: usize>(out: &mut Vec<u8>, s: &str) {
    let mut field = [0u8; N];
    let mut len = s.len().min(N - 1);
    while !s.is_char_boundary(len) {
        len -= 1;
    }
    field[..len].copy_from_slice(&s.as_bytes()[..len]);
    out.extend_from_slice(&field);
}

fn put_device(out: &mut Vec<u8>, d: &DeviceRecord, num_interfaces: u8) {
    put_c_string::<PATH_LEN>(out, &d.path);
    put_c_string::<BUSID_LEN>(out, &d.busid);
    out.extend_from_slice(&d.busnum.to_be_bytes());
    out.extend_from_slice(&d.devnum.to_be_bytes());
    out.extend_from_slice(&d.speed.kernel_code().to_be_bytes());
    out.extend_from_slice(&d.vendor_id.to_be_bytes());
    out.extend_from_slice(&d.product_id.to_be_bytes());
    out.extend_from_slice(&d.bcd_device.to_be_bytes());
    out.extend_from_slice(&[
        d.device_class,
        d.device_subclass,
        d.device_protocol,
        d.configuration_value,
        d.num_configurations,
        num_interfaces,
    ]);
}

impl OpMessage {
    /// Appends the message's wire bytes to `out`. A reply whose status is not OK is sent as a
    /// bare header, as `usbipd` does.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            OpMessage::ReqDevlist => put_header(out, OP_REQ_DEVLIST, OpStatus::Ok),
            OpMessage::ReqImport { busid } => {
                put_header(out, OP_REQ_IMPORT, OpStatus::Ok);
                put_c_string::<BUSID_LEN>(out, busid);
            }
            OpMessage::RepImport { status, device } => {
                let status = match (status, device) {
                    (OpStatus::Ok, None) => OpStatus::Error,
                    (s, _) => *s,
                };
                put_header(out, OP_REP_IMPORT, status);
                if let (OpStatus::Ok, Some(d)) = (status, device) {
                    put_device(out, d, d.num_interfaces);
                }
            }
            OpMessage::RepDevlist { status, devices } => {
                put_header(out, OP_REP_DEVLIST, *status);
                if *status == OpStatus::Ok {
                    let devices = &devices[..devices.len().min(MAX_DEVLIST_DEVICES as usize)];
                    out.extend_from_slice(&(devices.len() as u32).to_be_bytes());
                    for listed in devices {
                        let interfaces = &listed.interfaces
                            [..listed.interfaces.len().min(MAX_INTERFACES.into())];
                        put_device(out, &listed.device, interfaces.len() as u8);
                        for i in interfaces {
                            out.extend_from_slice(&[i.class, i.subclass, i.protocol, 0]);
                        }
                    }
                }
            }
        }
    }

    /// The message's wire bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}
