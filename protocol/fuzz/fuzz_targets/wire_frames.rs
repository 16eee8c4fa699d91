//! Frames of our QUIC protocol as a hostile peer could send them, for all four message types:
//! decoded messages must re-encode to frames that decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::wire::{
    ClientMessage, FrameDecoder, ServerMessage, UrbClientMessage, UrbServerMessage, Validate,
    frame_bytes,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn check<T>(bytes: &[u8])
where
    T: DeserializeOwned + Serialize + Validate + PartialEq + std::fmt::Debug,
{
    let mut decoder = FrameDecoder::<T>::new();
    decoder.push(bytes);
    while let Ok(Some(msg)) = decoder.next_message() {
        let again = frame_bytes(&msg).expect("an accepted message re-encodes");
        let mut second = FrameDecoder::<T>::new();
        second.push(&again);
        assert_eq!(second.next_message().expect("re-encoded frame decodes"), Some(msg));
    }
}

fuzz_target!(|input: (u8, &[u8])| {
    let (kind, bytes) = input;
    match kind % 4 {
        0 => check::<ClientMessage>(bytes),
        1 => check::<ServerMessage>(bytes),
        2 => check::<UrbClientMessage>(bytes),
        _ => check::<UrbServerMessage>(bytes),
    }
});
