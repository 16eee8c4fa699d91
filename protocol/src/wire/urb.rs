//! Messages of the URB streams: one bidirectional QUIC stream per attached endpoint.
//!
//! The client opens the stream and names the attachment and endpoint in its first frame
//! ([`UrbStreamOpen`]); then it sends submissions and unlinks, and the server sends completions
//! back on the same stream. One stream per endpoint keeps each endpoint's URBs in order (USB
//! requires that) while a bulk endpoint with megabytes queued never delays a control or
//! interrupt endpoint: QUIC flow-controls and retransmits each stream on its own.

use serde::{Deserialize, Serialize};

use super::control::AttachHandle;
use super::frame::{Invalid, Validate, at_most};
use crate::usb::{
    Direction, EndpointNumber, IsoPacket, MAX_ISO_PACKETS, MAX_TRANSFER_LEN, SetupPacket,
    TransferType, UrbStatus,
};

/// The client's name for one URB, unique among its URBs in flight on one attachment. The
/// client uses the kernel's USB/IP seqnum, so no translation table is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UrbId(pub u32);

/// The first frame on a URB stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrbStreamOpen {
    /// The attachment the endpoint belongs to.
    pub handle: AttachHandle,
    /// The endpoint this stream carries.
    pub endpoint: EndpointNumber,
    /// Its direction. Endpoint 0 carries both directions on one stream; its direction here is
    /// `Out` by convention.
    pub direction: Direction,
}

/// Isochronous scheduling and packets of a submission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsoSubmit {
    /// Frame to start at, unless the flags say ASAP.
    pub start_frame: i32,
    /// The packets, with offsets into the URB's buffer.
    pub packets: Vec<IsoPacket>,
}

/// A URB for the server to run on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrbSubmit {
    /// The client's id for it.
    pub id: UrbId,
    /// Endpoint number (the stream's, repeated so a submission is self-describing in logs).
    pub endpoint: EndpointNumber,
    /// Data direction (for control transfers, the data stage's).
    pub direction: Direction,
    /// Transfer type, from the device's endpoint descriptor.
    pub transfer_type: TransferType,
    /// `URB_*` flags the server honours (see [`crate::usb::transfer_flags::FORWARDED`]).
    pub flags: u32,
    /// The SETUP packet, present exactly for control transfers.
    pub setup: Option<SetupPacket>,
    /// Buffer length: for OUT, `data.len()`; for IN, the most bytes to receive.
    pub length: u32,
    /// OUT data; empty for IN.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Polling interval for interrupt and iso endpoints, as the kernel gave it.
    pub interval: i32,
    /// Isochronous packets, present exactly for isochronous transfers.
    pub iso: Option<IsoSubmit>,
}

/// Where the time of one URB went on the server, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ServerTiming {
    /// From the frame's arrival to its submission to the device.
    pub queued_us: u32,
    /// From submission to the device until its completion.
    pub device_us: u32,
}

/// Isochronous results of a completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsoComplete {
    /// Frame the URB started at.
    pub start_frame: i32,
    /// Packets that ended in error.
    pub error_count: u32,
    /// Per-packet results.
    pub packets: Vec<IsoPacket>,
}

/// How a URB ended on the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrbComplete {
    /// The submission's id.
    pub id: UrbId,
    /// Its status, mapping 1:1 to the errno the client's kernel expects.
    pub status: UrbStatus,
    /// Bytes moved. For IN this is `data.len()`; for OUT, what the device accepted.
    pub actual_length: u32,
    /// IN data; empty for OUT. Iso IN data is packed (packets back to back).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Isochronous results, present exactly for isochronous URBs.
    pub iso: Option<IsoComplete>,
    /// Server-side timing, when negotiated.
    pub timing: Option<ServerTiming>,
}

/// What the client sends on a URB stream. The variants' order is wire format (postcard's
/// variant index; [`super::frame::submit_around_data`] writes two of them by hand).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UrbClientMessage {
    /// First frame, exactly once.
    Open(UrbStreamOpen),
    /// Run a URB.
    Submit(UrbSubmit),
    /// Cancel a URB submitted earlier on this stream.
    Unlink(UrbId),
    /// Run a URB once the URB `after`, sent earlier on any stream of the attachment but
    /// control, has completed on the device ([`super::Capabilities::ORDERED_SUBMIT`]).
    /// Read-ahead's IN phases go this way: a device may stall an IN that reaches it before the
    /// command it answers, or take a status read queued behind a data phase for more data
    /// (QEMU's usb-storage does both), and the streams race to the server. The URB waits at the
    /// head of its stream, holding the ones behind it; if `after` fails, it never reaches the
    /// device and completes `Unlinked`.
    SubmitAfter {
        /// The URB it follows.
        after: UrbId,
        /// The URB.
        urb: UrbSubmit,
    },
}

/// What the server sends on a URB stream. The variants' order is wire format
/// ([`super::frame::complete_around_data`] writes `Complete` by hand).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UrbServerMessage {
    /// A URB ended (an unlinked one with [`UrbStatus::Unlinked`]).
    Complete(UrbComplete),
    /// The answer to an unlink, always after the URB's own completion: `cancelled` says
    /// whether the unlink stopped it, or it had already ended on its own.
    UnlinkDone {
        /// The URB the unlink named.
        id: UrbId,
        /// Whether the unlink cancelled it.
        cancelled: bool,
    },
}

fn iso_packets(packets: &[IsoPacket], buffer: u32) -> Result<(), Invalid> {
    at_most("iso packet count", packets.len(), MAX_ISO_PACKETS.into())?;
    let inside = |p: &IsoPacket| u64::from(p.offset) + u64::from(p.length) <= u64::from(buffer);
    if !packets.iter().all(inside) {
        return Err(Invalid::Inconsistent("iso packet lies outside the buffer"));
    }
    Ok(())
}

impl Validate for UrbSubmit {
    fn validate(&self) -> Result<(), Invalid> {
        at_most(
            "transfer length",
            self.length as usize,
            MAX_TRANSFER_LEN.into(),
        )?;
        match self.direction {
            Direction::Out if self.data.len() != self.length as usize => Err(
                Invalid::Inconsistent("OUT data length differs from the transfer length"),
            ),
            Direction::In if !self.data.is_empty() => {
                Err(Invalid::Inconsistent("IN submission carries data"))
            }
            _ => Ok(()),
        }?;
        if (self.transfer_type == TransferType::Control) != self.setup.is_some() {
            return Err(Invalid::Inconsistent(
                "a setup packet belongs to exactly the control transfers",
            ));
        }
        if (self.transfer_type == TransferType::Isochronous) != self.iso.is_some() {
            return Err(Invalid::Inconsistent(
                "iso packets belong to exactly the isochronous transfers",
            ));
        }
        match &self.iso {
            Some(iso) => iso_packets(&iso.packets, self.length),
            None => Ok(()),
        }
    }
}

impl Validate for UrbComplete {
    fn validate(&self) -> Result<(), Invalid> {
        at_most("IN data length", self.data.len(), MAX_TRANSFER_LEN.into())?;
        at_most(
            "actual length",
            self.actual_length as usize,
            MAX_TRANSFER_LEN.into(),
        )?;
        if !self.data.is_empty() && self.data.len() != self.actual_length as usize {
            return Err(Invalid::Inconsistent(
                "IN data length differs from the actual length",
            ));
        }
        if let Some(iso) = &self.iso {
            at_most(
                "iso packet count",
                iso.packets.len(),
                MAX_ISO_PACKETS.into(),
            )?;
            at_most(
                "iso error count",
                iso.error_count as usize,
                iso.packets.len() as u64,
            )?;
        }
        Ok(())
    }
}

impl Validate for UrbClientMessage {
    fn validate(&self) -> Result<(), Invalid> {
        match self {
            UrbClientMessage::Submit(s) | UrbClientMessage::SubmitAfter { urb: s, .. } => {
                s.validate()
            }
            UrbClientMessage::Open(_) | UrbClientMessage::Unlink(_) => Ok(()),
        }
    }
}

impl Validate for UrbServerMessage {
    fn validate(&self) -> Result<(), Invalid> {
        match self {
            UrbServerMessage::Complete(c) => c.validate(),
            UrbServerMessage::UnlinkDone { .. } => Ok(()),
        }
    }
}
