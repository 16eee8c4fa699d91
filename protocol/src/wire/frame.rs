//! Length-prefixed postcard frames: a 4-byte big-endian body length, then the postcard body.
//!
//! QUIC streams are byte streams, so every message needs a boundary. The length is checked
//! against [`MAX_FRAME_LEN`] the moment its four bytes arrive, before any body is buffered, and
//! every decoded message is then checked against its own bounds ([`Validate`]).

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::urb::{UrbComplete, UrbId, UrbSubmit};
use crate::buf::InBuf;
use crate::usb::MAX_TRANSFER_LEN;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// The largest frame body: one URB of [`MAX_TRANSFER_LEN`] bytes plus room for its header and
/// up to 1,024 iso packet descriptors. A device list is bounded to fit too (see
/// [`super::MAX_DEVICES_PER_LIST`]).
pub const MAX_FRAME_LEN: u32 = MAX_TRANSFER_LEN + 64 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A length prefix past [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the maximum {MAX_FRAME_LEN}")]
    TooLarge {
        /// The declared or encoded length.
        len: u64,
    },
    /// The body is not a valid postcard encoding of the expected message type (this includes
    /// an unknown enum variant from a newer peer that was not negotiated).
    #[error("frame body does not decode: {0}")]
    Malformed(postcard::Error),
    /// The body decoded but left bytes over.
    #[error("frame body has {0} bytes left over after the message")]
    TrailingBytes(usize),
    /// The message decoded but breaks a bound or an invariant.
    #[error("message is invalid: {0}")]
    Invalid(#[from] Invalid),
    /// The stream ended part-way through a frame.
    #[error("the stream ended inside a frame ({0} bytes of it buffered)")]
    Truncated(usize),
    /// A previous call already failed.
    #[error("the stream already failed and cannot be resynchronised")]
    Poisoned,
    /// Serialising a message of ours failed.
    #[error("could not encode message: {0}")]
    Encode(postcard::Error),
}

/// A bound or invariant that a decoded message breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// A count or length past its maximum.
    #[error("{what} is {got}, the maximum is {max}")]
    TooMany {
        /// Which field.
        what: &'static str,
        /// What the peer sent.
        got: u64,
        /// Our bound.
        max: u64,
    },
    /// Fields that contradict each other.
    #[error("{0}")]
    Inconsistent(&'static str),
}

/// Bounds a message must meet after decoding. Serde checks the shape; this checks that every
/// length and count from the peer is within what we are willing to hold.
pub trait Validate {
    /// `Ok` if the message is within every bound.
    fn validate(&self) -> Result<(), Invalid>;
}

/// Checks `got <= max` for a named field.
pub(crate) fn at_most(what: &'static str, got: usize, max: u64) -> Result<(), Invalid> {
    let got = got as u64;
    if got > max {
        return Err(Invalid::TooMany { what, got, max });
    }
    Ok(())
}

/// Appends one frame holding `msg` to `out`.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; LENGTH_PREFIX_LEN]);
    let taken = std::mem::take(out);
    *out = postcard::to_extend(msg, taken).map_err(FrameError::Encode)?;
    let body = out.len() - start - LENGTH_PREFIX_LEN;
    if body > MAX_FRAME_LEN as usize {
        out.truncate(start);
        return Err(FrameError::TooLarge { len: body as u64 });
    }
    out[start..start + LENGTH_PREFIX_LEN].copy_from_slice(&(body as u32).to_be_bytes());
    Ok(())
}

/// A frame in two pieces around a URB's data, so a large payload can be sent from its own
/// buffer instead of being copied into the frame: `head` (the length prefix and the message up
/// to the data's length) and `tail` (the fields after the data). `head`, the data, then `tail`
/// is byte for byte [`encode_frame`] of the message (tests hold that for every kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AroundData {
    /// Everything before the data's bytes.
    pub head: Vec<u8>,
    /// Everything after them.
    pub tail: Vec<u8>,
}

/// `UrbServerMessage::Complete(c)` around `c.data`.
pub fn complete_around_data(c: &UrbComplete) -> Result<AroundData, FrameError> {
    // Variant 0 (Complete), then `UrbComplete`'s fields in order; the data is postcard bytes:
    // its length as a varint, then the bytes.
    const COMPLETE: u32 = 0;
    let len = data_len(&c.data)?;
    around(
        &(COMPLETE, c.id, c.status, c.actual_length, len),
        len,
        &(&c.iso, &c.timing),
    )
}

/// `UrbClientMessage::Submit(urb)`, or `SubmitAfter { after, urb }`, around `urb.data`.
pub fn submit_around_data(after: Option<UrbId>, u: &UrbSubmit) -> Result<AroundData, FrameError> {
    const SUBMIT: u32 = 1;
    const SUBMIT_AFTER: u32 = 3;
    let len = data_len(&u.data)?;
    let fields = (
        u.id,
        u.endpoint,
        u.direction,
        u.transfer_type,
        u.flags,
        &u.setup,
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

/// One frame holding `msg`.
pub fn frame_bytes<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_frame(msg, &mut out)?;
    Ok(out)
}

/// Incremental decoder of frames carrying messages of type `T`.
#[derive(Debug)]
pub struct FrameDecoder<T> {
    buf: InBuf,
    failed: bool,
    _message: std::marker::PhantomData<fn() -> T>,
}

impl<T> Default for FrameDecoder<T> {
    fn default() -> Self {
        FrameDecoder {
            buf: InBuf::default(),
            failed: false,
            _message: std::marker::PhantomData,
        }
    }
}

impl<T: DeserializeOwned + Validate> FrameDecoder<T> {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.push(bytes);
    }

    /// Bytes pushed but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.unread().len()
    }

    /// How many more bytes the frame in progress needs; lets a reader size its next read.
    pub fn wanted(&self) -> usize {
        let unread = self.buf.unread();
        match self.buf.peek_array::<LENGTH_PREFIX_LEN>() {
            None => LENGTH_PREFIX_LEN - unread.len(),
            Some(prefix) => {
                let total = LENGTH_PREFIX_LEN + u32::from_be_bytes(prefix) as usize;
                total.saturating_sub(unread.len())
            }
        }
    }

    /// The next whole message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<T>, FrameError> {
        if self.failed {
            return Err(FrameError::Poisoned);
        }
        let result = self.decode_one();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    /// Call at end of stream: an error if it stopped inside a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buffered() {
            0 => Ok(()),
            n => Err(FrameError::Truncated(n)),
        }
    }

    fn decode_one(&mut self) -> Result<Option<T>, FrameError> {
        let Some(prefix) = self.buf.peek_array::<LENGTH_PREFIX_LEN>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(prefix);
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge { len: len.into() });
        }
        let total = LENGTH_PREFIX_LEN + len as usize;
        let Some(frame) = self.buf.unread().get(LENGTH_PREFIX_LEN..total) else {
            return Ok(None);
        };
        let msg = decode_body::<T>(frame)?;
        self.buf.consume(total);
        Ok(Some(msg))
    }
}

/// Decodes and validates one frame body (without its length prefix).
pub fn decode_body<T: DeserializeOwned + Validate>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes::<T>(body).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    msg.validate()?;
    Ok(msg)
}
