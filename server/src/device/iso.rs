//! Isochronous URBs between the wire and usbfs, as plain data: no device, no runtime.
//!
//! A wire URB carries up to USB/IP's 1,024 packets with offsets into its buffer; usbfs takes at
//! most 128 packets per URB, packed back to back, and gives IN data back at each packet's
//! *requested* position. The client's kernel (vhci) wants IN data packed by *actual* length and
//! every packet's result. [`IsoPlan`] splits a wire URB into usbfs URBs and puts their results
//! back together into exactly one completion, whatever order or shape they come back in.

use protocol::usb::{Direction, IsoPacket, MAX_ISO_PACKETS, MAX_TRANSFER_LEN, UrbStatus};
use protocol::wire::{IsoComplete, UrbComplete, UrbId, UrbSubmit};

/// usbfs refuses an iso URB of more packets (`proc_do_submiturb`).
pub const USBFS_MAX_PACKETS: usize = 128;

/// Why a wire URB cannot be run as isochronous: it is answered `Invalid`, nothing else moves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IsoError {
    /// No packet descriptors at all.
    #[error("an isochronous URB without packets")]
    NoPackets,
    /// More packets than USB/IP allows.
    #[error("{0} iso packets; at most {MAX_ISO_PACKETS}")]
    TooManyPackets(usize),
    /// A packet that does not fit the URB's buffer.
    #[error(
        "iso packet {index} (offset {offset}, {length} bytes) lies outside the {buffer}-byte buffer"
    )]
    OutsideBuffer {
        /// Which packet.
        index: usize,
        /// Its offset.
        offset: u32,
        /// Its length.
        length: u32,
        /// The buffer's size.
        buffer: u32,
    },
    /// Packets that together ask for more than one transfer may move.
    #[error("iso packets ask for {0} bytes; at most {MAX_TRANSFER_LEN}")]
    TooLong(u64),
}

/// One usbfs URB of a plan: its packets' lengths and its buffer (OUT data packed, or room for
/// IN data at each packet's requested length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Requested length of each packet.
    pub lengths: Vec<u32>,
    /// The buffer usbfs reads (OUT) or fills (IN).
    pub buffer: Vec<u8>,
}

/// What usbfs gave back for one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkResult {
    /// The URB's status (0 or a negative errno).
    pub status: i32,
    /// The frame it started at.
    pub start_frame: i32,
    /// Each packet's (actual length, status).
    pub packets: Vec<(u32, i32)>,
    /// The buffer as usbfs left it (IN data at the requested positions).
    pub buffer: Vec<u8>,
}

impl ChunkResult {
    /// A chunk that never reached the device (its submission failed, or the device went away
    /// with it queued): every packet ends with `status`.
    pub fn failed(chunk_packets: usize, status: UrbStatus) -> ChunkResult {
        let errno = status.to_errno();
        ChunkResult {
            status: errno,
            start_frame: 0,
            packets: vec![(0, errno); chunk_packets],
            buffer: Vec::new(),
        }
    }
}

/// One wire URB on its way through usbfs.
#[derive(Debug)]
pub struct IsoPlan {
    id: UrbId,
    direction: Direction,
    packets: Vec<IsoPacket>,
    /// How many packets each chunk carries, in order.
    chunk_sizes: Vec<usize>,
    results: Vec<Option<ChunkResult>>,
    /// The completion went out; nothing more comes from this plan.
    finished: bool,
}

impl IsoPlan {
    /// Checks a wire URB's packets and splits it into usbfs URBs.
    pub fn new(urb: &UrbSubmit) -> Result<(IsoPlan, Vec<Chunk>), IsoError> {
        let packets = urb.iso.as_ref().map_or(&[][..], |i| &i.packets[..]);
        if packets.is_empty() {
            return Err(IsoError::NoPackets);
        }
        if packets.len() > MAX_ISO_PACKETS as usize {
            return Err(IsoError::TooManyPackets(packets.len()));
        }
        let buffer = match urb.direction {
            Direction::Out => urb.data.len().min(u32::MAX as usize) as u32,
            Direction::In => urb.length,
        };
        for (index, p) in packets.iter().enumerate() {
            if u64::from(p.offset) + u64::from(p.length) > u64::from(buffer) {
                return Err(IsoError::OutsideBuffer {
                    index,
                    offset: p.offset,
                    length: p.length,
                    buffer,
                });
            }
        }
        let total: u64 = packets.iter().map(|p| u64::from(p.length)).sum();
        if total > u64::from(MAX_TRANSFER_LEN) {
            return Err(IsoError::TooLong(total));
        }
        let chunks: Vec<Chunk> = packets
            .chunks(USBFS_MAX_PACKETS)
            .map(|group| Chunk {
                lengths: group.iter().map(|p| p.length).collect(),
                buffer: match urb.direction {
                    Direction::Out => group
                        .iter()
                        .flat_map(|p| {
                            let at = p.offset as usize;
                            &urb.data[at..at + p.length as usize]
                        })
                        .copied()
                        .collect(),
                    Direction::In => vec![0; group.iter().map(|p| p.length as usize).sum()],
                },
            })
            .collect();
        let plan = IsoPlan {
            id: urb.id,
            direction: urb.direction,
            packets: packets.to_vec(),
            chunk_sizes: chunks.iter().map(|c| c.lengths.len()).collect(),
            results: vec![None; chunks.len()],
            finished: false,
        };
        Ok((plan, chunks))
    }

    /// The wire URB this plan runs.
    pub fn id(&self) -> UrbId {
        self.id
    }

    /// How many chunks it was split into.
    pub fn chunks(&self) -> usize {
        self.chunk_sizes.len()
    }

    /// Packets in chunk `index`.
    pub fn chunk_packets(&self, index: usize) -> usize {
        self.chunk_sizes.get(index).copied().unwrap_or(0)
    }

    /// Whether chunk `index` has its result.
    pub fn has_result(&self, index: usize) -> bool {
        self.results.get(index).is_some_and(Option::is_some)
    }

    /// Records chunk `index`'s result; once every chunk has one, the wire URB's completion,
    /// exactly once. A second result for a chunk, or one for a chunk that does not exist, is
    /// ignored.
    pub fn chunk_done(&mut self, index: usize, result: ChunkResult) -> Option<UrbComplete> {
        let slot = self.results.get_mut(index)?;
        if slot.is_none() {
            *slot = Some(result);
        }
        if !self.finished && self.results.iter().all(Option::is_some) {
            self.finished = true;
            Some(self.assemble())
        } else {
            None
        }
    }

    /// Puts the chunks' results back together. Results the kernel should never give (more
    /// bytes than asked, fewer packets than sent, a short buffer) are clamped and marked, never
    /// trusted: vhci would copy whatever lengths it is told.
    fn assemble(&mut self) -> UrbComplete {
        let mut status = UrbStatus::Ok;
        let mut start_frame = None;
        let mut packets = Vec::with_capacity(self.packets.len());
        let mut data = Vec::new();
        let mut wire = self.packets.iter();
        for (result, &count) in self.results.iter().zip(&self.chunk_sizes) {
            let result = result.as_ref().expect("assembled only when complete");
            if result.status != 0 && status == UrbStatus::Ok {
                status = UrbStatus::from_errno(result.status);
            }
            start_frame.get_or_insert(result.start_frame);
            let mut at = 0usize;
            for i in 0..count {
                let Some(asked) = wire.next() else { break };
                let (actual, packet_status) = match result.packets.get(i) {
                    Some(&(actual, s)) if actual <= asked.length => (actual, s),
                    Some(_) => (0, UrbStatus::Overflow.to_errno()),
                    None => (0, UrbStatus::Invalid.to_errno()),
                };
                let mut actual = actual;
                if self.direction == Direction::In {
                    let from = at.min(result.buffer.len());
                    let to = (at + actual as usize).min(result.buffer.len());
                    actual = (to - from) as u32;
                    data.extend_from_slice(&result.buffer[from..to]);
                }
                at += asked.length as usize;
                packets.push(IsoPacket {
                    offset: asked.offset,
                    length: asked.length,
                    actual_length: actual,
                    status: UrbStatus::from_errno(packet_status),
                });
            }
        }
        let error_count = packets.iter().filter(|p| p.status != UrbStatus::Ok).count() as u32;
        UrbComplete {
            id: self.id,
            status,
            actual_length: packets.iter().map(|p| p.actual_length).sum(),
            data,
            iso: Some(IsoComplete {
                start_frame: start_frame.unwrap_or(0),
                error_count,
                packets,
            }),
            timing: None,
        }
    }
}

#[cfg(test)]
mod tests;
