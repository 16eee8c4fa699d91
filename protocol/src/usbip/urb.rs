//! The URB phase of USB/IP: CMD_SUBMIT, RET_SUBMIT, CMD_UNLINK, RET_UNLINK.
//!
//! Every PDU starts with the same 48-byte big-endian header (`struct usbip_header`): a 20-byte
//! basic part (command, seqnum, devid, direction, ep) and a 28-byte union. An OUT CMD_SUBMIT is
//! followed by `transfer_buffer_length` bytes of data, an IN RET_SUBMIT by `actual_length`
//! bytes, and an isochronous PDU of either kind by `number_of_packets` 16-byte packet
//! descriptors.
//!
//! The kernel's stub writes 0 into the direction, ep and devid of its RET_SUBMITs, so the length
//! of a return's payload cannot be read from its header: the side that decodes returns must say
//! which seqnums it submitted and in which direction ([`PduDecoder::expect_return`]), exactly as
//! vhci looks them up in its own URB table.

use std::collections::HashMap;

use super::be::{i32_at, u32_at};
use crate::buf::InBuf;
use crate::usb::{
    BadEndpoint, Direction, EndpointNumber, IsoPacket, MAX_ISO_PACKETS, MAX_TRANSFER_LEN,
    SetupPacket, UrbStatus,
};
use crate::wire::DATA_APART_FROM;

/// Size of every URB-phase header.
pub const HEADER_LEN: usize = 48;
/// Size of one `usbip_iso_packet_descriptor`.
pub const ISO_DESCRIPTOR_LEN: usize = 16;
/// `USBIP_CMD_SUBMIT`.
pub const CMD_SUBMIT: u32 = 1;
/// `USBIP_CMD_UNLINK`.
pub const CMD_UNLINK: u32 = 2;
/// `USBIP_RET_SUBMIT`.
pub const RET_SUBMIT: u32 = 3;
/// `USBIP_RET_UNLINK`.
pub const RET_UNLINK: u32 = 4;
/// The most submitted URBs a returns decoder remembers. vhci keeps far fewer in flight per
/// device; the bound stops a peer that never answers from growing the table without limit.
pub const MAX_PENDING_RETURNS: usize = 4096;

/// usbip-win and some older stacks mark "not isochronous" with -1 instead of 0.
const NON_ISO_ALL_ONES: i32 = -1;

/// CMD_SUBMIT: the kernel asks for a URB to be run on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdSubmit {
    /// Identifies this URB on this connection; its RET_SUBMIT or RET_UNLINK echoes it.
    pub seqnum: u32,
    /// `busnum << 16 | devnum` of the device as the attaching side named it.
    pub devid: u32,
    /// Endpoint number; its transfer type comes from the device's descriptors, not from here.
    pub ep: EndpointNumber,
    /// The kernel's `URB_*` flags (see [`crate::usb::transfer_flags`]).
    pub transfer_flags: u32,
    /// Frame to start an iso URB at, unless `ISO_ASAP`.
    pub start_frame: i32,
    /// Polling interval of interrupt and iso endpoints, in (micro)frames.
    pub interval: i32,
    /// SETUP packet; meaningful on control endpoints only (stale bytes elsewhere).
    pub setup: SetupPacket,
    /// OUT data, or the size of the IN buffer.
    pub buffer: SubmitBuffer,
    /// `Some` for an isochronous URB: one descriptor per packet.
    pub iso: Option<Vec<IsoPacket>>,
}

/// What a submission carries: the bytes to send, or room for the bytes to receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitBuffer {
    /// Host to device: the data.
    Out(Vec<u8>),
    /// Device to host: the buffer length.
    In(u32),
}

impl SubmitBuffer {
    /// The transfer direction this buffer implies.
    pub fn direction(&self) -> Direction {
        match self {
            SubmitBuffer::Out(_) => Direction::Out,
            SubmitBuffer::In(_) => Direction::In,
        }
    }

    /// `transfer_buffer_length` as USB/IP carries it.
    pub fn len(&self) -> u32 {
        match self {
            SubmitBuffer::Out(data) => data.len() as u32,
            SubmitBuffer::In(len) => *len,
        }
    }

    /// Whether the transfer moves no data (a zero-length packet or a data-less control request).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// CMD_UNLINK: the kernel asks for an earlier submission to be cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdUnlink {
    /// This request's own seqnum; the RET_UNLINK echoes it.
    pub seqnum: u32,
    /// As in [`CmdSubmit::devid`].
    pub devid: u32,
    /// The seqnum of the CMD_SUBMIT to cancel.
    pub unlink_seqnum: u32,
}

/// RET_SUBMIT: how a submitted URB ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetSubmit {
    /// The CMD_SUBMIT's seqnum.
    pub seqnum: u32,
    /// Echoed devid (the kernel's stub writes 0; vhci ignores it).
    pub devid: u32,
    /// Echoed endpoint (the kernel's stub writes 0; vhci ignores it).
    pub ep: EndpointNumber,
    /// The URB's final status.
    pub status: UrbStatus,
    /// What moved.
    pub transferred: Transferred,
    /// Frame the iso URB started at.
    pub start_frame: i32,
    /// Iso packets that ended in error.
    pub error_count: u32,
    /// `Some` for an isochronous URB: the per-packet results. IN data is packed: the packets'
    /// `actual_length` bytes back to back, no gaps.
    pub iso: Option<Vec<IsoPacket>>,
}

/// What a completed URB moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transferred {
    /// Host to device: how many bytes the device accepted.
    Out(u32),
    /// Device to host: the bytes received.
    In(Vec<u8>),
}

impl Transferred {
    /// `actual_length` as USB/IP carries it.
    pub fn actual_length(&self) -> u32 {
        match self {
            Transferred::Out(n) => *n,
            Transferred::In(data) => data.len() as u32,
        }
    }

    /// The transfer direction.
    pub fn direction(&self) -> Direction {
        match self {
            Transferred::Out(_) => Direction::Out,
            Transferred::In(_) => Direction::In,
        }
    }
}

/// RET_UNLINK: how a CMD_UNLINK ended.
///
/// `-ECONNRESET` when the URB was still pending and is now cancelled (no RET_SUBMIT follows
/// for it), 0 when it had already completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetUnlink {
    /// The CMD_UNLINK's own seqnum.
    pub seqnum: u32,
    /// Echoed devid.
    pub devid: u32,
    /// The unlink's outcome.
    pub status: UrbStatus,
}

/// Any URB-phase PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pdu {
    /// See [`CmdSubmit`].
    CmdSubmit(CmdSubmit),
    /// See [`CmdUnlink`].
    CmdUnlink(CmdUnlink),
    /// See [`RetSubmit`].
    RetSubmit(RetSubmit),
    /// See [`RetUnlink`].
    RetUnlink(RetUnlink),
}

/// Why a URB-phase byte stream was rejected. After any of these the stream is out of step and
/// the connection (or vhci port) must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrbError {
    /// The command word is none of the four.
    #[error("unknown USB/IP command {0:#x}")]
    UnknownCommand(u32),
    /// A known command that this side never receives (a RET_* sent to the device side).
    #[error("USB/IP command {0:#x} does not belong on this side of the connection")]
    UnexpectedCommand(u32),
    /// Direction is neither 0 nor 1.
    #[error("direction {0} is neither OUT (0) nor IN (1)")]
    BadDirection(u32),
    /// Endpoint number past 15.
    #[error(transparent)]
    BadEndpoint(#[from] BadEndpoint),
    /// A negative transfer or actual length.
    #[error("length {0} is negative")]
    NegativeLength(i32),
    /// A length past [`MAX_TRANSFER_LEN`].
    #[error("length {len} exceeds the maximum of {max} bytes")]
    TooLong {
        /// The length the peer sent.
        len: u32,
        /// Our bound.
        max: u32,
    },
    /// More iso packets than [`MAX_ISO_PACKETS`], or a negative count other than -1.
    #[error("{0} isochronous packets is out of range 0..={MAX_ISO_PACKETS}")]
    BadIsoPacketCount(i32),
    /// An iso descriptor that points outside the transfer buffer.
    #[error(
        "iso packet {index} (offset {offset}, length {length}) lies outside the {buffer}-byte buffer"
    )]
    IsoPacketOutOfBounds {
        /// Packet index.
        index: usize,
        /// Its offset.
        offset: u32,
        /// Its length.
        length: u32,
        /// The URB's buffer length.
        buffer: u32,
    },
    /// An iso packet that moved more than it asked for.
    #[error("iso packet {index} moved {actual} bytes of a {length}-byte packet")]
    IsoPacketOverrun {
        /// Packet index.
        index: usize,
        /// Its actual length.
        actual: u32,
        /// Its length.
        length: u32,
    },
    /// Packed iso IN data whose size is not the sum of the packets' actual lengths.
    #[error("iso packets sum to {sum} bytes but the URB's actual length is {actual}")]
    IsoLengthMismatch {
        /// Sum of per-packet actual lengths.
        sum: u64,
        /// The URB's actual length.
        actual: u32,
    },
    /// A negative error count, or more errors than packets.
    #[error("error count {0} is out of range")]
    BadErrorCount(i32),
    /// More data came back than the URB had room for.
    #[error("RET_SUBMIT {seqnum} returns {actual} bytes for a {buffer}-byte buffer")]
    ActualExceedsBuffer {
        /// The URB.
        seqnum: u32,
        /// What the peer claims moved.
        actual: u32,
        /// The submitted buffer length.
        buffer: u32,
    },
    /// A RET_SUBMIT for a seqnum that was never submitted or already answered.
    #[error("RET_SUBMIT for seqnum {0}, which is not awaiting a return")]
    UnknownSeqnum(u32),
    /// The same seqnum submitted twice while the first is still awaiting its return.
    #[error("seqnum {0} is already awaiting a return")]
    DuplicateSeqnum(u32),
    /// More than [`MAX_PENDING_RETURNS`] submissions awaiting returns.
    #[error("more than {MAX_PENDING_RETURNS} URBs awaiting their return")]
    TooManyPending,
    /// The stream ended part-way through a PDU.
    #[error("the stream ended inside a PDU ({0} bytes of it buffered)")]
    Truncated(usize),
    /// A previous call already failed.
    #[error("the stream already failed and cannot be resynchronised")]
    Poisoned,
}

/// Which half of the conversation a decoder reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// What a device side (our client on vhci's socket, or a usbip server) receives.
    Commands,
    /// What a host side (vhci) receives.
    Returns,
}

/// A header that passed validation, waiting for its body.
#[derive(Debug)]
enum Head {
    CmdSubmit {
        seqnum: u32,
        devid: u32,
        ep: EndpointNumber,
        direction: Direction,
        transfer_flags: u32,
        buffer_len: u32,
        start_frame: i32,
        iso_count: Option<u32>,
        interval: i32,
        setup: SetupPacket,
    },
    RetSubmit {
        seqnum: u32,
        devid: u32,
        ep: EndpointNumber,
        direction: Direction,
        status: UrbStatus,
        actual: u32,
        start_frame: i32,
        iso_count: Option<u32>,
        error_count: u32,
    },
}

impl Head {
    /// Bytes of payload and iso descriptors after the header.
    fn body_len(&self) -> usize {
        let (data, iso) = self.parts();
        data as usize + iso.unwrap_or(0) as usize * ISO_DESCRIPTOR_LEN
    }

    /// Bytes of payload after the header (the iso descriptors follow it).
    fn data_len(&self) -> usize {
        self.parts().0 as usize
    }

    /// A payload of [`DATA_APART_FROM`] bytes or more with nothing after it: read apart.
    fn reads_apart(&self) -> bool {
        let (data, iso) = self.parts();
        iso.is_none() && data as usize >= DATA_APART_FROM
    }

    /// The payload's length and the iso descriptors' count.
    fn parts(&self) -> (u32, Option<u32>) {
        match self {
            Head::CmdSubmit {
                direction,
                buffer_len,
                iso_count,
                ..
            } => (
                if *direction == Direction::Out {
                    *buffer_len
                } else {
                    0
                },
                *iso_count,
            ),
            Head::RetSubmit {
                direction,
                actual,
                iso_count,
                ..
            } => (
                if *direction == Direction::In {
                    *actual
                } else {
                    0
                },
                *iso_count,
            ),
        }
    }
}

/// Incremental decoder for one direction of a URB-phase stream.
///
/// Push bytes as they arrive, in any split, then call [`next_pdu`](Self::next_pdu) until it
/// returns `Ok(None)`. A header is validated as soon as its 48 bytes are in, so a hostile
/// length is refused before any of its payload is buffered. A large payload (a write's data
/// from the kernel, a read's from a device) is read apart, straight into the buffer its PDU
/// keeps: one copy of each byte instead of two, and the input buffer stays the size of a
/// header instead of growing to the largest URB seen.
#[derive(Debug)]
pub struct PduDecoder {
    side: Side,
    buf: InBuf,
    head: Option<Head>,
    /// The payload of `head`, filling, when it is read apart.
    apart: Option<Vec<u8>>,
    /// Returns side only: submitted seqnum -> (direction, buffer length).
    awaiting: HashMap<u32, (Direction, u32)>,
    failed: bool,
}

impl PduDecoder {
    /// Decodes what the device side receives: CMD_SUBMIT and CMD_UNLINK.
    pub fn commands() -> Self {
        Self::new(Side::Commands)
    }

    /// Decodes what the host side receives: RET_SUBMIT and RET_UNLINK. Register every
    /// submission with [`expect_return`](Self::expect_return) before its return can arrive.
    pub fn returns() -> Self {
        Self::new(Side::Returns)
    }

    fn new(side: Side) -> Self {
        PduDecoder {
            side,
            buf: InBuf::default(),
            head: None,
            apart: None,
            awaiting: HashMap::new(),
            failed: false,
        }
    }

    /// Records that `seqnum` was submitted in `direction` with a `buffer_len`-byte buffer, so
    /// its RET_SUBMIT can be framed and checked.
    pub fn expect_return(
        &mut self,
        seqnum: u32,
        direction: Direction,
        buffer_len: u32,
    ) -> Result<(), UrbError> {
        if self.awaiting.len() >= MAX_PENDING_RETURNS {
            return Err(UrbError::TooManyPending);
        }
        if self
            .awaiting
            .insert(seqnum, (direction, buffer_len))
            .is_some()
        {
            return Err(UrbError::DuplicateSeqnum(seqnum));
        }
        Ok(())
    }

    /// Forgets a submission that will get no RET_SUBMIT (it was unlinked). Returns whether it
    /// was awaited.
    pub fn forget_return(&mut self, seqnum: u32) -> bool {
        self.awaiting.remove(&seqnum).is_some()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, mut bytes: &[u8]) {
        if let (Some(data), Some(head)) = (&mut self.apart, &self.head) {
            let (to_data, rest) = bytes.split_at(bytes.len().min(head.data_len() - data.len()));
            data.extend_from_slice(to_data);
            bytes = rest;
        }
        if !bytes.is_empty() {
            self.buf.push(bytes);
        }
    }

    /// Bytes pushed but not yet returned as PDUs.
    pub fn buffered(&self) -> usize {
        self.buf.unread().len()
            + self.apart.as_ref().map_or(0, Vec::len)
            + if self.head.is_some() { HEADER_LEN } else { 0 }
    }

    /// The next whole PDU, `Ok(None)` if more bytes are needed.
    pub fn next_pdu(&mut self) -> Result<Option<Pdu>, UrbError> {
        if self.failed {
            return Err(UrbError::Poisoned);
        }
        let result = self.decode_one();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    /// Call at end of stream: an error if it stopped inside a PDU.
    pub fn finish(&self) -> Result<(), UrbError> {
        match self.buffered() {
            0 => Ok(()),
            n => Err(UrbError::Truncated(n)),
        }
    }

    fn decode_one(&mut self) -> Result<Option<Pdu>, UrbError> {
        if self.head.is_none() {
            let Some(header) = self.buf.peek_array::<HEADER_LEN>() else {
                return Ok(None);
            };
            let head = match self.parse_header(&header)? {
                Parsed::Done(pdu) => {
                    self.buf.consume(HEADER_LEN);
                    return Ok(Some(pdu));
                }
                Parsed::NeedsBody(head) => head,
            };
            self.buf.consume(HEADER_LEN);
            if head.reads_apart() {
                let mut data = Vec::with_capacity(head.data_len());
                let early = self.buf.unread().len().min(head.data_len());
                data.extend_from_slice(&self.buf.unread()[..early]);
                self.buf.consume(early);
                self.apart = Some(data);
            }
            self.head = Some(head);
        }
        let Some((body_len, data_len)) = self.head.as_ref().map(|h| (h.body_len(), h.data_len()))
        else {
            return Ok(None);
        };
        if let Some(data) = &self.apart {
            if data.len() < data_len {
                return Ok(None);
            }
            let (Some(head), Some(data)) = (self.head.take(), self.apart.take()) else {
                return Ok(None);
            };
            return finish_body(head, data, &[], &mut self.awaiting).map(Some);
        }
        if self.buf.unread().len() < body_len {
            return Ok(None);
        }
        let Some(head) = self.head.take() else {
            return Ok(None);
        };
        let (data, descriptors) = self.buf.unread()[..body_len].split_at(data_len);
        let pdu = finish_body(head, data.to_vec(), descriptors, &mut self.awaiting)?;
        self.buf.consume(body_len);
        Ok(Some(pdu))
    }

    fn parse_header(&self, h: &[u8; HEADER_LEN]) -> Result<Parsed, UrbError> {
        let command = u32_at(h, 0);
        let seqnum = u32_at(h, 4);
        let devid = u32_at(h, 8);
        let direction = match u32_at(h, 12) {
            0 => Direction::Out,
            1 => Direction::In,
            other => return Err(UrbError::BadDirection(other)),
        };
        let raw_ep = u32_at(h, 16);
        let ep = u8::try_from(raw_ep)
            .ok()
            .and_then(EndpointNumber::new)
            .ok_or(BadEndpoint(raw_ep))?;
        let expected = match command {
            CMD_SUBMIT | CMD_UNLINK => Side::Commands,
            RET_SUBMIT | RET_UNLINK => Side::Returns,
            other => return Err(UrbError::UnknownCommand(other)),
        };
        if expected != self.side {
            return Err(UrbError::UnexpectedCommand(command));
        }
        match command {
            CMD_SUBMIT => {
                let buffer_len = checked_len(i32_at(h, 24))?;
                let iso_count = iso_count(i32_at(h, 32))?;
                let mut setup = [0u8; 8];
                setup.copy_from_slice(&h[40..48]);
                Ok(Parsed::NeedsBody(Head::CmdSubmit {
                    seqnum,
                    devid,
                    ep,
                    direction,
                    transfer_flags: u32_at(h, 20),
                    buffer_len,
                    start_frame: i32_at(h, 28),
                    iso_count,
                    interval: i32_at(h, 36),
                    setup: SetupPacket(setup),
                }))
            }
            CMD_UNLINK => Ok(Parsed::Done(Pdu::CmdUnlink(CmdUnlink {
                seqnum,
                devid,
                unlink_seqnum: u32_at(h, 20),
            }))),
            RET_SUBMIT => {
                let (direction, buffer) = *self
                    .awaiting
                    .get(&seqnum)
                    .ok_or(UrbError::UnknownSeqnum(seqnum))?;
                let actual = checked_len(i32_at(h, 24))?;
                if actual > buffer {
                    return Err(UrbError::ActualExceedsBuffer {
                        seqnum,
                        actual,
                        buffer,
                    });
                }
                let iso_count = iso_count(i32_at(h, 32))?;
                let raw_errors = i32_at(h, 36);
                let error_count = u32::try_from(raw_errors)
                    .ok()
                    .filter(|n| *n <= iso_count.unwrap_or(0))
                    .ok_or(UrbError::BadErrorCount(raw_errors))?;
                Ok(Parsed::NeedsBody(Head::RetSubmit {
                    seqnum,
                    devid,
                    ep,
                    direction,
                    status: UrbStatus::from_errno(i32_at(h, 20)),
                    actual,
                    start_frame: i32_at(h, 28),
                    iso_count,
                    error_count,
                }))
            }
            _ => Ok(Parsed::Done(Pdu::RetUnlink(RetUnlink {
                seqnum,
                devid,
                status: UrbStatus::from_errno(i32_at(h, 20)),
            }))),
        }
    }
}

enum Parsed {
    Done(Pdu),
    NeedsBody(Head),
}

fn checked_len(raw: i32) -> Result<u32, UrbError> {
    let len = u32::try_from(raw).map_err(|_| UrbError::NegativeLength(raw))?;
    if len > MAX_TRANSFER_LEN {
        return Err(UrbError::TooLong {
            len,
            max: MAX_TRANSFER_LEN,
        });
    }
    Ok(len)
}

fn iso_count(raw: i32) -> Result<Option<u32>, UrbError> {
    match raw {
        0 | NON_ISO_ALL_ONES => Ok(None),
        n if n > 0 && n as u32 <= MAX_ISO_PACKETS => Ok(Some(n as u32)),
        n => Err(UrbError::BadIsoPacketCount(n)),
    }
}

/// The PDU `head` starts, from its payload (`data`, empty when the payload goes the other
/// way) and the iso descriptors after it.
fn finish_body(
    head: Head,
    data: Vec<u8>,
    descriptors: &[u8],
    awaiting: &mut HashMap<u32, (Direction, u32)>,
) -> Result<Pdu, UrbError> {
    match head {
        Head::CmdSubmit {
            seqnum,
            devid,
            ep,
            direction,
            transfer_flags,
            buffer_len,
            start_frame,
            iso_count,
            interval,
            setup,
        } => {
            let iso = iso_count
                .map(|_| parse_iso(descriptors, buffer_len))
                .transpose()?;
            let buffer = match direction {
                Direction::Out => SubmitBuffer::Out(data),
                Direction::In => SubmitBuffer::In(buffer_len),
            };
            Ok(Pdu::CmdSubmit(CmdSubmit {
                seqnum,
                devid,
                ep,
                transfer_flags,
                start_frame,
                interval,
                setup,
                buffer,
                iso,
            }))
        }
        Head::RetSubmit {
            seqnum,
            devid,
            ep,
            direction,
            status,
            actual,
            start_frame,
            iso_count,
            error_count,
        } => {
            let buffer = awaiting.get(&seqnum).map_or(0, |(_, len)| *len);
            let iso = iso_count
                .map(|_| parse_iso(descriptors, buffer))
                .transpose()?;
            if let (Some(packets), Direction::In) = (&iso, direction) {
                let sum: u64 = packets.iter().map(|p| u64::from(p.actual_length)).sum();
                if sum != u64::from(actual) {
                    return Err(UrbError::IsoLengthMismatch { sum, actual });
                }
            }
            awaiting.remove(&seqnum);
            let transferred = match direction {
                Direction::In => Transferred::In(data),
                Direction::Out => Transferred::Out(actual),
            };
            Ok(Pdu::RetSubmit(RetSubmit {
                seqnum,
                devid,
                ep,
                status,
                transferred,
                start_frame,
                error_count,
                iso,
            }))
        }
    }
}

fn parse_iso(bytes: &[u8], buffer: u32) -> Result<Vec<IsoPacket>, UrbError> {
    bytes
        .chunks_exact(ISO_DESCRIPTOR_LEN)
        .enumerate()
        .map(|(index, chunk)| {
            let mut d = [0u8; ISO_DESCRIPTOR_LEN];
            d.copy_from_slice(chunk);
            let packet = IsoPacket {
                offset: u32_at(&d, 0),
                length: u32_at(&d, 4),
                actual_length: u32_at(&d, 8),
                status: UrbStatus::from_errno(i32_at(&d, 12)),
            };
            if u64::from(packet.offset) + u64::from(packet.length) > u64::from(buffer) {
                return Err(UrbError::IsoPacketOutOfBounds {
                    index,
                    offset: packet.offset,
                    length: packet.length,
                    buffer,
                });
            }
            if packet.actual_length > packet.length {
                return Err(UrbError::IsoPacketOverrun {
                    index,
                    actual: packet.actual_length,
                    length: packet.length,
                });
            }
            Ok(packet)
        })
        .collect()
}

// ---- encoding ----

/// The 48-byte header under construction.
struct HeaderWriter([u8; HEADER_LEN]);

impl HeaderWriter {
    fn new(command: u32, seqnum: u32, devid: u32, direction: Direction, ep: u8) -> Self {
        let mut w = HeaderWriter([0; HEADER_LEN]);
        w.u32(0, command);
        w.u32(4, seqnum);
        w.u32(8, devid);
        w.u32(12, direction as u32);
        w.u32(16, ep.into());
        w
    }
    fn u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn i32(&mut self, at: usize, v: i32) {
        self.u32(at, v as u32);
    }
}

fn iso_count_field(iso: &Option<Vec<IsoPacket>>) -> i32 {
    iso.as_ref().map_or(0, |p| p.len() as i32)
}

fn put_iso(out: &mut Vec<u8>, iso: &Option<Vec<IsoPacket>>) {
    for p in iso.iter().flatten() {
        out.extend_from_slice(&p.offset.to_be_bytes());
        out.extend_from_slice(&p.length.to_be_bytes());
        out.extend_from_slice(&p.actual_length.to_be_bytes());
        out.extend_from_slice(&p.status.to_errno().to_be_bytes());
    }
}

impl RetSubmit {
    fn header(&self) -> HeaderWriter {
        let direction = self.transferred.direction();
        let mut h = HeaderWriter::new(
            RET_SUBMIT,
            self.seqnum,
            self.devid,
            direction,
            self.ep.get(),
        );
        h.i32(20, self.status.to_errno());
        h.u32(24, self.transferred.actual_length());
        h.i32(28, self.start_frame);
        h.i32(32, iso_count_field(&self.iso));
        h.u32(36, self.error_count);
        h
    }

    /// Appends the wire bytes to `out` up to the IN data, and hands the data back to be sent
    /// right after them: the same bytes as [`Pdu::encode`] without copying a large buffer.
    /// Isochronous and OUT results, whose bytes do not end with the data, are appended whole
    /// and give `None`.
    pub fn encode_split(self, out: &mut Vec<u8>) -> Option<Vec<u8>> {
        if self.iso.is_some() || !matches!(self.transferred, Transferred::In(_)) {
            Pdu::RetSubmit(self).encode(out);
            return None;
        }
        out.extend_from_slice(&self.header().0);
        match self.transferred {
            Transferred::In(data) => Some(data),
            Transferred::Out(_) => None,
        }
    }
}

impl Pdu {
    /// Appends the PDU's wire bytes to `out`.
    ///
    /// Encoding trusts the values it is given (they come from our own code); the decoders are
    /// where untrusted bytes are checked.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        match self {
            Pdu::CmdSubmit(c) => {
                let mut h = HeaderWriter::new(
                    CMD_SUBMIT,
                    c.seqnum,
                    c.devid,
                    c.buffer.direction(),
                    c.ep.get(),
                );
                h.u32(20, c.transfer_flags);
                h.u32(24, c.buffer.len());
                h.i32(28, c.start_frame);
                h.i32(32, iso_count_field(&c.iso));
                h.i32(36, c.interval);
                h.0[40..48].copy_from_slice(&c.setup.0);
                out.extend_from_slice(&h.0);
                if let SubmitBuffer::Out(data) = &c.buffer {
                    out.extend_from_slice(data);
                }
                put_iso(out, &c.iso);
            }
            Pdu::CmdUnlink(u) => {
                let mut h = HeaderWriter::new(CMD_UNLINK, u.seqnum, u.devid, Direction::Out, 0);
                h.u32(20, u.unlink_seqnum);
                out.extend_from_slice(&h.0);
            }
            Pdu::RetSubmit(r) => {
                out.extend_from_slice(&r.header().0);
                if let Transferred::In(data) = &r.transferred {
                    out.extend_from_slice(data);
                }
                put_iso(out, &r.iso);
            }
            Pdu::RetUnlink(r) => {
                let mut h = HeaderWriter::new(RET_UNLINK, r.seqnum, r.devid, Direction::Out, 0);
                h.i32(20, r.status.to_errno());
                out.extend_from_slice(&h.0);
            }
        }
    }

    /// Bytes [`encode`](Self::encode) appends.
    pub fn encoded_len(&self) -> usize {
        let iso = |iso: &Option<Vec<IsoPacket>>| iso.as_ref().map_or(0, Vec::len);
        HEADER_LEN
            + match self {
                Pdu::CmdSubmit(c) => {
                    let data = match &c.buffer {
                        SubmitBuffer::Out(d) => d.len(),
                        SubmitBuffer::In(_) => 0,
                    };
                    data + iso(&c.iso) * ISO_DESCRIPTOR_LEN
                }
                Pdu::RetSubmit(r) => {
                    let data = match &r.transferred {
                        Transferred::In(d) => d.len(),
                        Transferred::Out(_) => 0,
                    };
                    data + iso(&r.iso) * ISO_DESCRIPTOR_LEN
                }
                Pdu::CmdUnlink(_) | Pdu::RetUnlink(_) => 0,
            }
    }

    /// The PDU's wire bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}
