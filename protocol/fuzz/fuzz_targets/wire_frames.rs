//! Frames of our QUIC protocol as a hostile peer could send them, for all four message types:
//! decoded messages must re-encode to frames that decode to the same message, and bytes that
//! arrive in pieces (large URB data is then read apart from its frame) must decode to exactly
//! what the same bytes give at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::wire::{
    ClientMessage, DataApart, FrameDecoder, FrameError, ServerMessage, UrbClientMessage,
    UrbServerMessage, Validate, frame_bytes,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Every message the bytes hold, fed `piece` bytes at a time (0: all at once), until the
/// first error.
fn decode<T>(bytes: &[u8], piece: usize) -> Result<Vec<T>, FrameError>
where
    T: DeserializeOwned + Validate + DataApart,
{
    let mut decoder = FrameDecoder::<T>::new();
    let mut out = Vec::new();
    for chunk in bytes.chunks(if piece == 0 { bytes.len().max(1) } else { piece }) {
        decoder.push(chunk);
        while let Some(msg) = decoder.next_message()? {
            out.push(msg);
        }
    }
    decoder.finish()?;
    Ok(out)
}

fn check<T>(bytes: &[u8], piece: usize)
where
    T: DeserializeOwned + Serialize + Validate + DataApart + PartialEq + std::fmt::Debug,
{
    let at_once = decode::<T>(bytes, 0);
    assert_eq!(decode::<T>(bytes, piece), at_once, "in pieces of {piece}");
    for msg in at_once.into_iter().flatten() {
        let again = frame_bytes(&msg).expect("an accepted message re-encodes");
        assert_eq!(decode::<T>(&again, 0), Ok(vec![msg]), "re-encoded frame decodes");
    }
}

fuzz_target!(|input: (u8, u16, &[u8])| {
    let (kind, piece, bytes) = input;
    let piece = usize::from(piece);
    match kind % 4 {
        0 => check::<ClientMessage>(bytes, piece),
        1 => check::<ServerMessage>(bytes, piece),
        2 => check::<UrbClientMessage>(bytes, piece),
        _ => check::<UrbServerMessage>(bytes, piece),
    }
});
