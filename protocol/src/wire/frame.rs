//! Length-prefixed postcard frames: a 4-byte big-endian body length, then the postcard body.
//!
//! QUIC streams are byte streams, so every message needs a boundary. The length is checked
//! against [`MAX_FRAME_LEN`] the moment its four bytes arrive, before any body is buffered, and
//! every decoded message is then checked against its own bounds ([`Validate`]).

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::around::{DATA_APART_FROM, DataApart, DataAt};
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

/// One frame holding `msg`.
pub fn frame_bytes<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_frame(msg, &mut out)?;
    Ok(out)
}

/// Incremental decoder of frames carrying messages of type `T`.
///
/// A frame of [`DATA_APART_FROM`] bytes or more whose head places URB data ([`DataApart`]) is
/// not buffered whole: once its head is in, the data goes straight into the buffer the message
/// will own as bytes arrive, so each data byte is copied once, not twice.
#[derive(Debug)]
pub struct FrameDecoder<T> {
    buf: InBuf,
    /// The frame being read apart, if one is; it comes before everything in `buf`.
    apart: Option<Apart>,
    failed: bool,
    _message: std::marker::PhantomData<fn() -> T>,
}

impl<T> Default for FrameDecoder<T> {
    fn default() -> Self {
        FrameDecoder {
            buf: InBuf::default(),
            apart: None,
            failed: false,
            _message: std::marker::PhantomData,
        }
    }
}

impl<T: DeserializeOwned + Validate + DataApart> FrameDecoder<T> {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, mut bytes: &[u8]) {
        if let Some(apart) = &mut self.apart {
            bytes = apart.fill(bytes);
        }
        if !bytes.is_empty() {
            self.buf.push(bytes);
        }
    }

    /// Bytes pushed but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.apart.as_ref().map_or(0, Apart::received) + self.buf.unread().len()
    }

    /// How many more bytes the frame in progress needs; lets a reader size its next read.
    pub fn wanted(&self) -> usize {
        if let Some(apart) = &self.apart {
            return apart.missing();
        }
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
        if let Some(apart) = &self.apart {
            if apart.missing() > 0 {
                return Ok(None);
            }
            let Apart {
                head, data, tail, ..
            } = self.apart.take().expect("checked above");
            let msg = T::from_parts(&head, data, &tail)?;
            msg.validate()?;
            return Ok(Some(msg));
        }
        let Some(prefix) = self.buf.peek_array::<LENGTH_PREFIX_LEN>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(prefix);
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge { len: len.into() });
        }
        let total = LENGTH_PREFIX_LEN + len as usize;
        let Some(frame) = self.buf.unread().get(LENGTH_PREFIX_LEN..total) else {
            self.start_apart(len as usize)?;
            return Ok(None);
        };
        let msg = decode_body::<T>(frame)?;
        self.buf.consume(total);
        Ok(Some(msg))
    }

    /// Moves the incomplete frame at the front of `buf`, of `len` body bytes, to `apart` if
    /// it is large and its head already says where its data is.
    fn start_apart(&mut self, len: usize) -> Result<(), FrameError> {
        if len < DATA_APART_FROM {
            return Ok(());
        }
        let body = &self.buf.unread()[LENGTH_PREFIX_LEN..];
        let DataAt::At {
            head,
            len: data_len,
        } = T::data_at(body)
        else {
            return Ok(());
        };
        let Some(tail_len) = len.checked_sub(head).and_then(|l| l.checked_sub(data_len)) else {
            // Decoding the whole body would run out of bytes inside the data the same way.
            return Err(FrameError::Malformed(
                postcard::Error::DeserializeUnexpectedEnd,
            ));
        };
        let mut apart = Apart {
            head: body[..head].to_vec(),
            data: Vec::with_capacity(data_len),
            data_len,
            tail: Vec::new(),
            tail_len,
        };
        let rest = apart.fill(&body[head..]);
        debug_assert!(rest.is_empty(), "the frame was incomplete");
        let taken = self.buf.unread().len();
        self.buf.consume(taken);
        self.apart = Some(apart);
        Ok(())
    }
}

/// A large frame read apart: its head, its data filling toward `data_len`, then its tail.
#[derive(Debug)]
struct Apart {
    head: Vec<u8>,
    data: Vec<u8>,
    data_len: usize,
    tail: Vec<u8>,
    tail_len: usize,
}

impl Apart {
    /// Takes what belongs to this frame from the front of `bytes`; returns the rest.
    fn fill<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let (to_data, bytes) = bytes.split_at(bytes.len().min(self.data_len - self.data.len()));
        self.data.extend_from_slice(to_data);
        let (to_tail, rest) = bytes.split_at(bytes.len().min(self.tail_len - self.tail.len()));
        self.tail.extend_from_slice(to_tail);
        rest
    }

    fn missing(&self) -> usize {
        (self.data_len - self.data.len()) + (self.tail_len - self.tail.len())
    }

    /// Bytes of the frame received so far, its length prefix included.
    fn received(&self) -> usize {
        LENGTH_PREFIX_LEN + self.head.len() + self.data.len() + self.tail.len()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usb::UrbStatus;
    use crate::wire::{UrbComplete, UrbId, UrbServerMessage};

    fn completion(len: usize) -> UrbServerMessage {
        UrbServerMessage::Complete(UrbComplete {
            id: UrbId(7),
            status: UrbStatus::Ok,
            actual_length: len as u32,
            data: (0..len).map(|i| i as u8).collect(),
            iso: None,
            timing: None,
        })
    }

    #[test]
    fn large_data_is_read_apart_and_what_follows_it_is_buffered() {
        let big = completion(DATA_APART_FROM * 2);
        let small = completion(10);
        let mut bytes = frame_bytes(&big).unwrap();
        let first_frame = bytes.len();
        encode_frame(&small, &mut bytes).unwrap();
        let mut decoder = FrameDecoder::<UrbServerMessage>::new();
        let mut got = Vec::new();
        for (i, piece) in bytes.chunks(1000).enumerate() {
            decoder.push(piece);
            while let Some(m) = decoder.next_message().unwrap() {
                got.push(m);
            }
            if (i + 1) * 1000 < first_frame {
                // Past the head, the large frame's bytes never sit in the shared buffer.
                assert!(decoder.apart.is_some(), "piece {i}");
                assert!(decoder.buf.unread().is_empty(), "piece {i}");
                assert_eq!(decoder.buffered(), (i + 1) * 1000);
                assert_eq!(decoder.wanted(), first_frame - (i + 1) * 1000);
            }
        }
        decoder.finish().unwrap();
        assert_eq!(got, vec![big, small]);
    }

    #[test]
    fn a_stream_that_ends_inside_data_read_apart_is_truncated() {
        let bytes = frame_bytes(&completion(DATA_APART_FROM)).unwrap();
        let mut decoder = FrameDecoder::<UrbServerMessage>::new();
        decoder.push(&bytes[..100]);
        assert_eq!(decoder.next_message(), Ok(None));
        decoder.push(&bytes[100..bytes.len() - 1]);
        assert_eq!(decoder.next_message(), Ok(None));
        assert_eq!(
            decoder.finish(),
            Err(FrameError::Truncated(bytes.len() - 1))
        );
    }

    #[test]
    fn data_longer_than_its_frame_is_refused_as_soon_as_the_head_is_in() {
        let mut bytes = frame_bytes(&completion(DATA_APART_FROM * 2)).unwrap();
        // Shrink the frame's length prefix below the data it declares.
        let short = bytes.len() - LENGTH_PREFIX_LEN - 100;
        bytes[..LENGTH_PREFIX_LEN].copy_from_slice(&(short as u32).to_be_bytes());
        let refused = Err(FrameError::Malformed(
            postcard::Error::DeserializeUnexpectedEnd,
        ));
        let mut decoder = FrameDecoder::<UrbServerMessage>::new();
        decoder.push(&bytes[..64]);
        assert_eq!(decoder.next_message(), refused);
        // The same error as decoding the whole frame gives.
        let mut whole = FrameDecoder::<UrbServerMessage>::new();
        whole.push(&bytes[..LENGTH_PREFIX_LEN + short]);
        assert_eq!(whole.next_message(), refused);
    }
}
