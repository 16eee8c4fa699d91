//! The OP phase from both sides, then the URB phase that follows an import.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::usbip::{OpDecoder, PduDecoder};

fuzz_target!(|input: (bool, &[u8])| {
    let (server_side, bytes) = input;
    let mut decoder = if server_side {
        OpDecoder::requests()
    } else {
        OpDecoder::replies()
    };
    decoder.push(bytes);
    while let Ok(Some(msg)) = decoder.next_message() {
        let _ = msg.to_bytes();
    }
    if decoder.is_handed_over() {
        let mut urbs = PduDecoder::commands();
        urbs.push(&decoder.into_remaining());
        while let Ok(Some(_)) = urbs.next_pdu() {}
    }
});
