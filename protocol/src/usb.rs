//! USB vocabulary shared by both wire formats.
//!
//! Both our QUIC protocol and the kernel's USB/IP carry the same facts about a URB: which
//! endpoint, which direction, what setup packet, which Linux status it ended with. Keeping one
//! set of types means the client translates between the two formats field by field, with no
//! lossy re-encoding in between.

use serde::{Deserialize, Serialize};

/// The largest transfer buffer one URB may carry, in either format.
///
/// usbfs caps a single URB at `usbfs_memory_mb` (16 MiB by default) and mass storage never
/// exceeds a few hundred KiB; 4 MiB keeps every real device working while bounding what a
/// hostile peer can make us allocate per URB.
pub const MAX_TRANSFER_LEN: u32 = 4 * 1024 * 1024;

/// The most isochronous packets one URB may carry: the kernel's `USBIP_MAX_ISO_PACKETS`
/// (`drivers/usb/usbip/usbip_common.h`).
pub const MAX_ISO_PACKETS: u32 = 1024;

/// Data direction of a transfer, as USB defines it: relative to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// Host to device.
    Out,
    /// Device to host.
    In,
}

/// How an endpoint moves data. Comes from the endpoint descriptor, never from the setup bytes:
/// usb-storage reuses URB buffers, so a bulk URB can carry stale setup bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TransferType {
    /// Endpoint 0 and any endpoint whose descriptor says control.
    Control,
    /// Isochronous: timed, unacknowledged packets (audio, video).
    Isochronous,
    /// Bulk: reliable, no timing guarantee (storage, printers).
    Bulk,
    /// Interrupt: small, polled (keyboards, mice, serial status).
    Interrupt,
}

impl TransferType {
    /// The transfer type encoded in `bmAttributes` bits 0-1 of an endpoint descriptor.
    pub fn from_attributes(bm_attributes: u8) -> Self {
        match bm_attributes & 0b11 {
            0 => TransferType::Control,
            1 => TransferType::Isochronous,
            2 => TransferType::Bulk,
            _ => TransferType::Interrupt,
        }
    }
}

/// Signalling speed, numbered as the kernel's `enum usb_device_speed`: these numbers are what
/// vhci's `attach` file and USB/IP's device records carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Speed {
    /// The kernel could not tell.
    Unknown,
    /// 1.5 Mbit/s.
    Low,
    /// 12 Mbit/s.
    Full,
    /// 480 Mbit/s.
    High,
    /// Wireless USB (obsolete, kept so the numbering stays the kernel's).
    Wireless,
    /// 5 Gbit/s.
    Super,
    /// 10 Gbit/s and faster.
    SuperPlus,
}

impl Speed {
    /// The kernel's `enum usb_device_speed` value.
    pub fn kernel_code(self) -> u32 {
        match self {
            Speed::Unknown => 0,
            Speed::Low => 1,
            Speed::Full => 2,
            Speed::High => 3,
            Speed::Wireless => 4,
            Speed::Super => 5,
            Speed::SuperPlus => 6,
        }
    }

    /// The speed for a kernel code; unknown codes map to [`Speed::Unknown`] because a newer
    /// kernel may add speeds and a device record must still be shown.
    pub fn from_kernel_code(code: u32) -> Self {
        match code {
            1 => Speed::Low,
            2 => Speed::Full,
            3 => Speed::High,
            4 => Speed::Wireless,
            5 => Speed::Super,
            6 => Speed::SuperPlus,
            _ => Speed::Unknown,
        }
    }
}

/// An endpoint address without its direction bit: 0 to 15.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct EndpointNumber(u8);

impl EndpointNumber {
    /// The default control endpoint.
    pub const CONTROL: EndpointNumber = EndpointNumber(0);

    /// `Some` for 0..=15, the only endpoint numbers USB has.
    pub fn new(n: u8) -> Option<Self> {
        (n < 16).then_some(EndpointNumber(n))
    }

    /// The number, 0 to 15.
    pub fn get(self) -> u8 {
        self.0
    }

    /// The `bEndpointAddress` byte for this number in `dir`.
    pub fn address(self, dir: Direction) -> u8 {
        match dir {
            Direction::In => self.0 | 0x80,
            Direction::Out => self.0,
        }
    }

    /// The number and direction a `bEndpointAddress` byte (or a request's `wIndex` naming an
    /// endpoint) names; the reserved bits 4-6 are ignored, as the kernel does.
    pub fn from_address(address: u8) -> (EndpointNumber, Direction) {
        let direction = if address & 0x80 != 0 {
            Direction::In
        } else {
            Direction::Out
        };
        (EndpointNumber(address & 0x0f), direction)
    }
}

/// The error a decoder reports for an endpoint number outside 0..=15.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("endpoint number {0} is out of range 0..=15")]
pub struct BadEndpoint(pub u32);

impl TryFrom<u8> for EndpointNumber {
    type Error = BadEndpoint;
    fn try_from(n: u8) -> Result<Self, BadEndpoint> {
        EndpointNumber::new(n).ok_or(BadEndpoint(n.into()))
    }
}

impl From<EndpointNumber> for u8 {
    fn from(ep: EndpointNumber) -> u8 {
        ep.0
    }
}

/// The 8-byte SETUP packet of a control transfer, kept as the raw bytes the wire carries
/// (little-endian `wValue`, `wIndex`, `wLength` as USB defines them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct SetupPacket(pub [u8; 8]);

impl SetupPacket {
    /// `bmRequestType`.
    pub fn request_type(&self) -> u8 {
        self.0[0]
    }
    /// `bRequest`.
    pub fn request(&self) -> u8 {
        self.0[1]
    }
    /// `wValue`.
    pub fn value(&self) -> u16 {
        u16::from_le_bytes([self.0[2], self.0[3]])
    }
    /// `wIndex`.
    pub fn index(&self) -> u16 {
        u16::from_le_bytes([self.0[4], self.0[5]])
    }
    /// `wLength`.
    pub fn length(&self) -> u16 {
        u16::from_le_bytes([self.0[6], self.0[7]])
    }
}

/// `bRequest` codes of the standard requests (USB 2.0 table 9-4).
pub mod request {
    /// GET_STATUS.
    pub const GET_STATUS: u8 = 0;
    /// CLEAR_FEATURE.
    pub const CLEAR_FEATURE: u8 = 1;
    /// SET_FEATURE.
    pub const SET_FEATURE: u8 = 3;
    /// SET_ADDRESS.
    pub const SET_ADDRESS: u8 = 5;
    /// GET_DESCRIPTOR.
    pub const GET_DESCRIPTOR: u8 = 6;
    /// GET_CONFIGURATION.
    pub const GET_CONFIGURATION: u8 = 8;
    /// SET_CONFIGURATION.
    pub const SET_CONFIGURATION: u8 = 9;
    /// GET_INTERFACE.
    pub const GET_INTERFACE: u8 = 10;
    /// SET_INTERFACE.
    pub const SET_INTERFACE: u8 = 11;
    /// The ENDPOINT_HALT feature selector (`wValue` of CLEAR_FEATURE/SET_FEATURE).
    pub const ENDPOINT_HALT: u16 = 0;
}

/// `bmRequestType` values: direction, type (standard or class) and recipient.
pub mod request_type {
    /// Standard, host to device, to the device.
    pub const OUT_DEVICE: u8 = 0x00;
    /// Standard, host to device, to an interface.
    pub const OUT_INTERFACE: u8 = 0x01;
    /// Standard, host to device, to an endpoint.
    pub const OUT_ENDPOINT: u8 = 0x02;
    /// Standard, device to host, from the device.
    pub const IN_DEVICE: u8 = 0x80;
    /// Standard, device to host, from an interface.
    pub const IN_INTERFACE: u8 = 0x81;
    /// Standard, device to host, from an endpoint.
    pub const IN_ENDPOINT: u8 = 0x82;
    /// Class, host to device, to an interface.
    pub const CLASS_OUT_INTERFACE: u8 = 0x21;
    /// Class, device to host, from an interface.
    pub const CLASS_IN_INTERFACE: u8 = 0xa1;
}

/// The standard requests that change which endpoints a device has or whether one is halted.
/// Whoever sits between a host and a device must act on these three and not merely pass
/// them: the client's session follows them (its endpoint table), the server carries them out
/// through its claims, and the simulated disk's bulk endpoints start over on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateChange {
    /// SET_CONFIGURATION(`bConfigurationValue`).
    SetConfiguration(u8),
    /// SET_INTERFACE: `interface` to alternate setting `alt`.
    SetInterface {
        /// `bInterfaceNumber`.
        interface: u8,
        /// `bAlternateSetting`.
        alt: u8,
    },
    /// CLEAR_FEATURE(ENDPOINT_HALT) of `endpoint` (its `bEndpointAddress`).
    ClearHalt {
        /// `bEndpointAddress`.
        endpoint: u8,
    },
}

impl SetupPacket {
    /// The state change this request asks for, if it is one of the three. Values past a
    /// byte (which no device accepts) are truncated, as the kernel's own `usb_set_interface`
    /// callers never send them.
    pub fn state_change(&self) -> Option<StateChange> {
        use request::*;
        use request_type::*;
        match (self.request_type(), self.request()) {
            (OUT_DEVICE, SET_CONFIGURATION) => {
                Some(StateChange::SetConfiguration(self.value() as u8))
            }
            (OUT_INTERFACE, SET_INTERFACE) => Some(StateChange::SetInterface {
                interface: self.index() as u8,
                alt: self.value() as u8,
            }),
            (OUT_ENDPOINT, CLEAR_FEATURE) if self.value() == ENDPOINT_HALT => {
                Some(StateChange::ClearHalt {
                    endpoint: self.index() as u8,
                })
            }
            _ => None,
        }
    }
}

/// How a URB ended, one variant per Linux errno a host controller driver gives back.
///
/// The client hands this to the kernel as `-errno` in RET_SUBMIT, so every variant maps to
/// exactly one errno and back (see `usb/error-codes.rst` in the kernel docs). `Other` keeps
/// errnos we do not name instead of squashing them into a wrong one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UrbStatus {
    /// Completed; `actual_length` says how much moved.
    Ok,
    /// `-EPIPE`: the endpoint stalled (or a control request was refused).
    Stall,
    /// `-EOVERFLOW`: the device sent more than the buffer holds (babble).
    Overflow,
    /// `-EPROTO`: bit-stuff error, no response in time, or unknown USB error.
    Protocol,
    /// `-EILSEQ`: CRC mismatch.
    Crc,
    /// `-ETIME`: no response packet in the expected time.
    NoResponse,
    /// `-ETIMEDOUT`: the transfer's own timeout (synchronous APIs) expired.
    Timeout,
    /// `-ENOENT`: unlinked by `usb_kill_urb` (synchronous unlink).
    Killed,
    /// `-ECONNRESET`: unlinked by `usb_unlink_urb` (asynchronous unlink).
    Unlinked,
    /// `-ESHUTDOWN`: the host controller or the device's port went away.
    Shutdown,
    /// `-ENODEV`: the device was removed.
    NoDevice,
    /// `-EREMOTEIO`: a short packet with `URB_SHORT_NOT_OK` set.
    ShortPacket,
    /// `-EXDEV`: an isochronous URB completed only partly; see the packet statuses.
    IsoPartial,
    /// `-EINVAL`: the request made no sense (for example a bad iso frame).
    Invalid,
    /// `-ECOMM`: data arrived faster than it could be written to memory.
    Comm,
    /// `-ENOSR`: data could not be fetched from memory fast enough.
    NoStreamResources,
    /// `-EINPROGRESS`: still queued; only ever valid inside the kernel, kept for completeness.
    InProgress,
    /// Any other errno, as a positive number.
    Other(i32),
}

impl UrbStatus {
    /// The negative errno the kernel expects in `urb->status`, 0 for success.
    pub fn to_errno(self) -> i32 {
        match self {
            UrbStatus::Ok => 0,
            UrbStatus::Stall => -32,
            UrbStatus::Overflow => -75,
            UrbStatus::Protocol => -71,
            UrbStatus::Crc => -84,
            UrbStatus::NoResponse => -62,
            UrbStatus::Timeout => -110,
            UrbStatus::Killed => -2,
            UrbStatus::Unlinked => -104,
            UrbStatus::Shutdown => -108,
            UrbStatus::NoDevice => -19,
            UrbStatus::ShortPacket => -121,
            UrbStatus::IsoPartial => -18,
            UrbStatus::Invalid => -22,
            UrbStatus::Comm => -70,
            UrbStatus::NoStreamResources => -63,
            UrbStatus::InProgress => -115,
            UrbStatus::Other(errno) => -errno.saturating_abs(),
        }
    }

    /// The status for a kernel `urb->status` value (0 or a negative errno; a positive value is
    /// read as its negation so that a sign slip from a peer cannot become success).
    pub fn from_errno(status: i32) -> Self {
        match -status.saturating_abs() {
            0 => UrbStatus::Ok,
            -32 => UrbStatus::Stall,
            -75 => UrbStatus::Overflow,
            -71 => UrbStatus::Protocol,
            -84 => UrbStatus::Crc,
            -62 => UrbStatus::NoResponse,
            -110 => UrbStatus::Timeout,
            -2 => UrbStatus::Killed,
            -104 => UrbStatus::Unlinked,
            -108 => UrbStatus::Shutdown,
            -19 => UrbStatus::NoDevice,
            -121 => UrbStatus::ShortPacket,
            -18 => UrbStatus::IsoPartial,
            -22 => UrbStatus::Invalid,
            -70 => UrbStatus::Comm,
            -63 => UrbStatus::NoStreamResources,
            -115 => UrbStatus::InProgress,
            negative => UrbStatus::Other(negative.saturating_neg()),
        }
    }
}

/// One packet of an isochronous URB, laid out as USB/IP's `usbip_iso_packet_descriptor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IsoPacket {
    /// Byte offset of this packet in the URB's (unpacked) transfer buffer.
    pub offset: u32,
    /// Bytes requested for this packet.
    pub length: u32,
    /// Bytes that moved; 0 in a submission.
    pub actual_length: u32,
    /// How this packet ended.
    pub status: UrbStatus,
}

/// URB transfer flags that cross the wire, with the kernel's `URB_*` bit values
/// (`include/linux/usb.h`), so USB/IP's `transfer_flags` carries over unchanged.
pub mod transfer_flags {
    /// Report a short IN transfer as an error (`-EREMOTEIO`).
    pub const SHORT_NOT_OK: u32 = 0x0001;
    /// Schedule an iso URB as soon as possible rather than at `start_frame`.
    pub const ISO_ASAP: u32 = 0x0002;
    /// End an OUT transfer whose length is a multiple of wMaxPacketSize with a zero-length
    /// packet.
    pub const ZERO_PACKET: u32 = 0x0040;
    /// Data stage direction IN (set by the kernel for IN URBs; informational).
    pub const DIR_IN: u32 = 0x0200;
    /// The flags a remote host controller may honour; the rest (DMA mapping hints, free-buffer
    /// requests) are meaningless off the machine that set them and are dropped.
    pub const FORWARDED: u32 = SHORT_NOT_OK | ISO_ASAP | ZERO_PACKET | DIR_IN;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_three_requests_change_state() {
        let of = |setup: [u8; 8]| SetupPacket(setup).state_change();
        assert_eq!(
            of([0x00, 0x09, 0x02, 0, 0, 0, 0, 0]),
            Some(StateChange::SetConfiguration(2))
        );
        assert_eq!(
            of([0x01, 0x0b, 0x01, 0, 0x01, 0, 0, 0]),
            Some(StateChange::SetInterface {
                interface: 1,
                alt: 1
            })
        );
        assert_eq!(
            of([0x02, 0x01, 0x00, 0, 0x81, 0, 0, 0]),
            Some(StateChange::ClearHalt { endpoint: 0x81 })
        );
        // Everything else passes through to the device: CLEAR_FEATURE of another feature,
        // SET_FEATURE(ENDPOINT_HALT), class and vendor requests, GET_STATUS.
        for setup in [
            [0x02, 0x01, 0x01, 0, 0x81, 0, 0, 0],
            [0x02, 0x03, 0x00, 0, 0x81, 0, 0, 0],
            [0x21, 0x0b, 0x01, 0, 0x01, 0, 0, 0],
            [0x41, 0x09, 0x02, 0, 0, 0, 0, 0],
            [0x80, 0x00, 0x00, 0, 0, 0, 2, 0],
        ] {
            assert_eq!(of(setup), None, "{setup:02x?}");
        }
    }

    #[test]
    fn an_endpoint_address_splits_into_number_and_direction_and_back() {
        for n in 0..16 {
            for dir in [Direction::In, Direction::Out] {
                let ep = EndpointNumber::new(n).unwrap();
                assert_eq!(EndpointNumber::from_address(ep.address(dir)), (ep, dir));
            }
        }
        assert_eq!(
            EndpointNumber::from_address(0xf2),
            (EndpointNumber::new(2).unwrap(), Direction::In),
            "reserved bits ignored"
        );
    }

    #[test]
    fn every_status_maps_to_one_errno_and_back() {
        let named = [
            UrbStatus::Ok,
            UrbStatus::Stall,
            UrbStatus::Overflow,
            UrbStatus::Protocol,
            UrbStatus::Crc,
            UrbStatus::NoResponse,
            UrbStatus::Timeout,
            UrbStatus::Killed,
            UrbStatus::Unlinked,
            UrbStatus::Shutdown,
            UrbStatus::NoDevice,
            UrbStatus::ShortPacket,
            UrbStatus::IsoPartial,
            UrbStatus::Invalid,
            UrbStatus::Comm,
            UrbStatus::NoStreamResources,
            UrbStatus::InProgress,
        ];
        let mut errnos: Vec<i32> = named.iter().map(|s| s.to_errno()).collect();
        for (status, errno) in named.iter().zip(&errnos) {
            assert_eq!(UrbStatus::from_errno(*errno), *status);
        }
        errnos.sort();
        errnos.dedup();
        assert_eq!(errnos.len(), named.len(), "two statuses share an errno");
        assert_eq!(UrbStatus::from_errno(-5), UrbStatus::Other(5));
        assert_eq!(UrbStatus::Other(5).to_errno(), -5);
        assert_eq!(UrbStatus::from_errno(32), UrbStatus::Stall);
        assert_eq!(UrbStatus::from_errno(i32::MIN).to_errno(), -i32::MAX);
    }

    #[test]
    fn speed_codes_are_the_kernels() {
        assert_eq!(Speed::High.kernel_code(), 3);
        assert_eq!(Speed::Full.kernel_code(), 2);
        assert_eq!(Speed::Super.kernel_code(), 5);
        for code in 0..=6 {
            assert_eq!(Speed::from_kernel_code(code).kernel_code(), code);
        }
        assert_eq!(Speed::from_kernel_code(99), Speed::Unknown);
    }

    #[test]
    fn endpoint_numbers_stop_at_15() {
        assert!(EndpointNumber::new(15).is_some());
        assert!(EndpointNumber::new(16).is_none());
        assert_eq!(EndpointNumber::new(2).unwrap().address(Direction::In), 0x82);
    }
}
