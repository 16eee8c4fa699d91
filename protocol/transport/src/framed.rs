//! Frames over QUIC streams: the async edge around `protocol::wire::FrameDecoder`.

use bytes::Bytes;
use iroh::endpoint::{ReadError, RecvStream, SendStream, WriteError};
use protocol::wire::{
    AroundData, DATA_APART_FROM, DataApart, FrameDecoder, FrameError, UrbClientMessage,
    UrbServerMessage, Validate, complete_around_data, encode_frame, submit_around_data,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// How much to read from a stream at once. A whole frame is not needed at once: the decoder
/// takes any split.
const READ_CHUNK: usize = 256 * 1024;

/// Why a framed stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer sent bytes that are not a valid frame: a protocol violation.
    #[error("peer sent an invalid frame: {0}")]
    Frame(#[from] FrameError),
    /// Reading failed (connection lost, stream reset).
    #[error("reading the stream failed: {0}")]
    Read(#[from] ReadError),
    /// Writing failed (connection lost, stream stopped).
    #[error("writing the stream failed: {0}")]
    Write(#[from] WriteError),
}

impl StreamError {
    /// Whether the peer broke the protocol (as opposed to the connection going away).
    pub fn is_violation(&self) -> bool {
        matches!(self, StreamError::Frame(_))
    }

    /// Whether the peer stopped reading the stream: a server does that to a URB stream when
    /// its attachment ends (detached, device removed), so a submit written after that fails
    /// here instead of being answered.
    pub fn is_stopped(&self) -> bool {
        matches!(self, StreamError::Write(WriteError::Stopped(_)))
    }
}

/// The receiving half of a stream, yielding messages of type `T`.
#[derive(Debug)]
pub struct FramedRecv<T> {
    stream: RecvStream,
    decoder: FrameDecoder<T>,
}

impl<T: DeserializeOwned + Validate + DataApart> FramedRecv<T> {
    /// Wraps a receive stream.
    pub fn new(stream: RecvStream) -> Self {
        FramedRecv {
            stream,
            decoder: FrameDecoder::new(),
        }
    }

    /// The next message; `Ok(None)` when the peer finished the stream cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<T>, StreamError> {
        loop {
            if let Some(msg) = self.decoder.next_message()? {
                return Ok(Some(msg));
            }
            let want = self.decoder.wanted().clamp(1, READ_CHUNK);
            match self.stream.read_chunk(want).await? {
                Some(chunk) => self.decoder.push(&chunk),
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    /// The underlying stream, to stop it.
    pub fn stream_mut(&mut self) -> &mut RecvStream {
        &mut self.stream
    }
}

/// The sending half of a stream, writing messages of type `T`.
#[derive(Debug)]
pub struct FramedSend<T> {
    stream: SendStream,
    buf: Vec<u8>,
    /// Pieces queued before `buf`, in order: frames, and large payloads in their own buffers.
    chunks: Vec<Bytes>,
    _message: std::marker::PhantomData<fn(T)>,
}

impl<T: Serialize> FramedSend<T> {
    /// Wraps a send stream.
    pub fn new(stream: SendStream) -> Self {
        FramedSend {
            stream,
            buf: Vec::new(),
            chunks: Vec::new(),
            _message: std::marker::PhantomData,
        }
    }

    /// Queues a message without writing it; [`flush`](Self::flush) writes everything queued in
    /// one go, which batches many small completions into few QUIC frames.
    pub fn queue(&mut self, msg: &T) -> Result<(), StreamError> {
        encode_frame(msg, &mut self.buf)?;
        Ok(())
    }

    /// Writes everything queued.
    ///
    /// The buffer is handed to the stream rather than copied into it (`write_all` would copy
    /// every byte once more, and keep our buffer at the size of the largest batch ever sent:
    /// a MiB per stream after one 1 MiB URB). The next message starts a fresh one.
    pub async fn flush(&mut self) -> Result<(), StreamError> {
        self.seal();
        if !self.chunks.is_empty() {
            self.stream.write_all_chunks(&mut self.chunks).await?;
            self.chunks.clear();
        }
        Ok(())
    }

    /// Moves what `buf` holds to the chunks.
    fn seal(&mut self) {
        if !self.buf.is_empty() {
            self.chunks.push(Bytes::from(std::mem::take(&mut self.buf)));
        }
    }

    /// Writes one message now.
    pub async fn send(&mut self, msg: &T) -> Result<(), StreamError> {
        self.queue(msg)?;
        self.flush().await
    }

    /// Ends the stream cleanly after what was written.
    pub fn finish(&mut self) {
        // Finishing a stream the peer already stopped is not an error worth reporting.
        let _ = self.stream.finish();
    }
}

impl<T: Serialize + Payload> FramedSend<T> {
    /// Queues a message; a URB's data of [`DATA_APART_FROM`] bytes or more goes to the stream
    /// as its own chunk behind the frame's head rather than being copied into the frame.
    pub fn queue_owned(&mut self, msg: T) -> Result<(), StreamError> {
        if msg.payload_len() < DATA_APART_FROM {
            return self.queue(&msg);
        }
        let (AroundData { head, tail }, data) = msg.into_parts()?;
        self.buf.extend_from_slice(&head);
        self.seal();
        self.chunks.push(Bytes::from(data));
        self.buf = tail;
        Ok(())
    }
}

/// A message that may carry a URB's data, which [`FramedSend::queue_owned`] sends from its
/// own buffer.
pub trait Payload: Sized {
    /// Bytes of URB data it carries.
    fn payload_len(&self) -> usize;
    /// Its frame around the data, and the data.
    fn into_parts(self) -> Result<(AroundData, Vec<u8>), FrameError>;
}

impl Payload for UrbServerMessage {
    fn payload_len(&self) -> usize {
        match self {
            UrbServerMessage::Complete(c) => c.data.len(),
            UrbServerMessage::UnlinkDone { .. } => 0,
        }
    }
    fn into_parts(self) -> Result<(AroundData, Vec<u8>), FrameError> {
        match self {
            UrbServerMessage::Complete(c) => Ok((complete_around_data(&c)?, c.data)),
            other => whole(&other),
        }
    }
}

impl Payload for UrbClientMessage {
    fn payload_len(&self) -> usize {
        match self {
            UrbClientMessage::Submit(u) | UrbClientMessage::SubmitAfter { urb: u, .. } => {
                u.data.len()
            }
            UrbClientMessage::Open(_) | UrbClientMessage::Unlink(_) => 0,
        }
    }
    fn into_parts(self) -> Result<(AroundData, Vec<u8>), FrameError> {
        match self {
            UrbClientMessage::Submit(u) => Ok((submit_around_data(None, &u)?, u.data)),
            UrbClientMessage::SubmitAfter { after, urb } => {
                Ok((submit_around_data(Some(after), &urb)?, urb.data))
            }
            other => whole(&other),
        }
    }
}

/// A message with no data to split out: all of it is the head.
fn whole<T: Serialize>(msg: &T) -> Result<(AroundData, Vec<u8>), FrameError> {
    let head = protocol::wire::frame_bytes(msg)?;
    Ok((
        AroundData {
            head,
            tail: Vec::new(),
        },
        Vec::new(),
    ))
}
