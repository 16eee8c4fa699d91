//! A URB's data apart from the rest of its frame, both ways.
//!
//! A frame is one postcard body, but a large URB's data is most of it. Sending, the data goes
//! to the stream from its own buffer behind the frame's head ([`AroundData`]); receiving, it is
//! read straight into the buffer the message will own ([`DataApart`], used by
//! [`FrameDecoder`](super::FrameDecoder)). Either way each payload byte is copied once less
//! than encoding or decoding the whole body would. The head and tail layouts below are the
//! messages' own postcard layouts, written out once for both directions; tests hold that
//! head, data and tail are byte for byte the whole frame, and decode to the same message.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::control::{ClientMessage, ServerMessage};
use super::frame::{FrameError, LENGTH_PREFIX_LEN, MAX_FRAME_LEN};
use super::urb::{
    IsoComplete, IsoSubmit, ServerTiming, UrbClientMessage, UrbComplete, UrbId, UrbServerMessage,
    UrbSubmit,
};
use crate::usb::{Direction, EndpointNumber, SetupPacket, TransferType, UrbStatus};

/// URB data from this size on travels apart from its frame: sent from its own buffer, read
/// into its own buffer (as the USB/IP decoder reads a PDU's). Below it, one more chunk on the
/// stream costs more than the copy.
pub const DATA_APART_FROM: usize = 16 * 1024;

/// A frame in two pieces around a URB's data, so a large payload can be sent from its own
/// buffer instead of being copied into the frame: `head` (the length prefix and the message up
/// to the data's length) and `tail` (the fields after the data). `head`, the data, then `tail`
/// is byte for byte [`encode_frame`](super::encode_frame) of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AroundData {
    /// Everything before the data's bytes.
    pub head: Vec<u8>,
    /// Everything after them.
    pub tail: Vec<u8>,
}

// Postcard writes an enum as its variant index (a varint), then the variant's fields in order;
// bytes as their length (a varint), then the bytes. So a message around its data is a head
// tuple ending in the data's length, the data, and a tail tuple.

/// `UrbServerMessage::Complete`'s variant index.
const COMPLETE: u32 = 0;
/// `UrbClientMessage::Submit`'s and `SubmitAfter`'s variant indices.
const SUBMIT: u32 = 1;
const SUBMIT_AFTER: u32 = 3;

/// `Complete`: variant, then `UrbComplete`'s fields up to its data's length.
type CompleteHead = (u32, UrbId, UrbStatus, u32, u32);
/// `UrbComplete`'s fields after its data.
type CompleteTail = (Option<IsoComplete>, Option<ServerTiming>);
/// `UrbSubmit`'s fields up to its data's length.
type SubmitFields = (
    UrbId,
    EndpointNumber,
    Direction,
    TransferType,
    u32,
    Option<SetupPacket>,
    u32,
    u32,
);
/// `UrbSubmit`'s fields after its data.
type SubmitTail = (i32, Option<IsoSubmit>);

/// `UrbServerMessage::Complete(c)` around `c.data`.
pub fn complete_around_data(c: &UrbComplete) -> Result<AroundData, FrameError> {
    let len = data_len(&c.data)?;
    let head: CompleteHead = (COMPLETE, c.id, c.status, c.actual_length, len);
    // The tail by reference: postcard writes `&T` as `T`, so this is `CompleteTail`'s layout.
    around(&head, len, &(&c.iso, &c.timing))
}

/// `UrbClientMessage::Submit(urb)`, or `SubmitAfter { after, urb }`, around `urb.data`.
pub fn submit_around_data(after: Option<UrbId>, u: &UrbSubmit) -> Result<AroundData, FrameError> {
    let len = data_len(&u.data)?;
    let fields: SubmitFields = (
        u.id,
        u.endpoint,
        u.direction,
        u.transfer_type,
        u.flags,
        u.setup,
        u.length,
        len,
    );
    let tail = (u.interval, &u.iso);
    match after {
        None => around(&(SUBMIT, fields), len, &tail),
        Some(after) => around(&(SUBMIT_AFTER, after, fields), len, &tail),
    }
}

fn data_len(data: &[u8]) -> Result<u32, FrameError> {
    u32::try_from(data.len()).map_err(|_| FrameError::TooLarge {
        len: data.len() as u64,
    })
}

fn around<H: Serialize, T: Serialize>(
    head: &H,
    len: u32,
    tail: &T,
) -> Result<AroundData, FrameError> {
    let mut head =
        postcard::to_extend(head, vec![0; LENGTH_PREFIX_LEN]).map_err(FrameError::Encode)?;
    let tail = postcard::to_extend(tail, Vec::new()).map_err(FrameError::Encode)?;
    let body = (head.len() - LENGTH_PREFIX_LEN) as u64 + u64::from(len) + tail.len() as u64;
    if body > u64::from(MAX_FRAME_LEN) {
        return Err(FrameError::TooLarge { len: body });
    }
    head[..LENGTH_PREFIX_LEN].copy_from_slice(&(body as u32).to_be_bytes());
    Ok(AroundData { head, tail })
}

/// Where a frame body's URB data sits, as far as its first bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataAt {
    /// Too few bytes yet to tell.
    NeedMore,
    /// This message carries no data to read apart (or its head does not decode, which the
    /// whole body's decoding will report).
    Nowhere,
    /// The data starts `head` bytes into the body and is `len` bytes long.
    At {
        /// Bytes of the body before the data.
        head: usize,
        /// The data's length.
        len: usize,
    },
}

/// A message whose URB data [`FrameDecoder`](super::FrameDecoder) can read into the message's
/// own buffer as it arrives, instead of buffering the whole frame and copying the data out.
pub trait DataApart: Sized {
    /// Where the data of the body that starts with `body` is.
    fn data_at(body: &[u8]) -> DataAt;
    /// The message from the body's bytes before the data, the data, and the bytes after it,
    /// for a body [`data_at`](Self::data_at) placed; not yet validated.
    fn from_parts(head: &[u8], data: Vec<u8>, tail: &[u8]) -> Result<Self, FrameError>;
}

impl DataApart for UrbServerMessage {
    fn data_at(body: &[u8]) -> DataAt {
        match variant(body) {
            Some(COMPLETE) => locate::<CompleteHead>(body, |h| h.4),
            Some(_) => DataAt::Nowhere,
            None => DataAt::NeedMore,
        }
    }

    fn from_parts(head: &[u8], data: Vec<u8>, tail: &[u8]) -> Result<Self, FrameError> {
        let (_, id, status, actual_length, _): CompleteHead = whole(head)?;
        let (iso, timing): CompleteTail = whole(tail)?;
        Ok(UrbServerMessage::Complete(UrbComplete {
            id,
            status,
            actual_length,
            data,
            iso,
            timing,
        }))
    }
}

impl DataApart for UrbClientMessage {
    fn data_at(body: &[u8]) -> DataAt {
        match variant(body) {
            Some(SUBMIT) => locate::<(u32, SubmitFields)>(body, |h| h.1.7),
            Some(SUBMIT_AFTER) => locate::<(u32, UrbId, SubmitFields)>(body, |h| h.2.7),
            Some(_) => DataAt::Nowhere,
            None => DataAt::NeedMore,
        }
    }

    fn from_parts(head: &[u8], data: Vec<u8>, tail: &[u8]) -> Result<Self, FrameError> {
        let (interval, iso): SubmitTail = whole(tail)?;
        let submit =
            |(id, endpoint, direction, transfer_type, flags, setup, length, _)| UrbSubmit {
                id,
                endpoint,
                direction,
                transfer_type,
                flags,
                setup,
                length,
                data,
                interval,
                iso,
            };
        match variant(head) {
            Some(SUBMIT_AFTER) => {
                let (_, after, fields): (u32, UrbId, SubmitFields) = whole(head)?;
                Ok(UrbClientMessage::SubmitAfter {
                    after,
                    urb: submit(fields),
                })
            }
            _ => {
                let (_, fields): (u32, SubmitFields) = whole(head)?;
                Ok(UrbClientMessage::Submit(submit(fields)))
            }
        }
    }
}

/// The control streams' messages carry no URB data.
macro_rules! no_data_apart {
    ($($message:ty),*) => {$(
        impl DataApart for $message {
            fn data_at(_: &[u8]) -> DataAt {
                DataAt::Nowhere
            }
            fn from_parts(_: &[u8], _: Vec<u8>, _: &[u8]) -> Result<Self, FrameError> {
                Err(FrameError::Malformed(postcard::Error::DeserializeBadEncoding))
            }
        }
    )*};
}
no_data_apart!(ClientMessage, ServerMessage);

/// The body's variant index, once its varint is complete.
fn variant(body: &[u8]) -> Option<u32> {
    postcard::take_from_bytes::<u32>(body).ok().map(|(v, _)| v)
}

/// Where the data is in a body whose head decodes as `H`, ending in the data's length.
fn locate<H: DeserializeOwned>(body: &[u8], len: impl Fn(&H) -> u32) -> DataAt {
    match postcard::take_from_bytes::<H>(body) {
        Ok((h, rest)) => DataAt::At {
            head: body.len() - rest.len(),
            len: len(&h) as usize,
        },
        Err(postcard::Error::DeserializeUnexpectedEnd) => DataAt::NeedMore,
        Err(_) => DataAt::Nowhere,
    }
}

/// `bytes` as exactly one `T`, with the errors decoding a whole body gives.
fn whole<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    let (value, rest) = postcard::take_from_bytes::<T>(bytes).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(value)
}
