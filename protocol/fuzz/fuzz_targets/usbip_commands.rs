//! What vhci-hcd (or a remote `usbip attach`) sends us, in arbitrary splits: the decoder must
//! return PDUs or a typed error, never panic, and what it accepted must re-encode to bytes that
//! decode to the same PDUs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::usbip::{Pdu, PduDecoder};

fn decode(bytes: &[u8], step: usize) -> (Vec<Pdu>, bool) {
    let mut decoder = PduDecoder::commands();
    let mut pdus = Vec::new();
    for chunk in bytes.chunks(step) {
        decoder.push(chunk);
        loop {
            match decoder.next_pdu() {
                Ok(Some(pdu)) => pdus.push(pdu),
                Ok(None) => break,
                Err(_) => return (pdus, false),
            }
        }
    }
    (pdus, true)
}

fuzz_target!(|input: (u8, &[u8])| {
    let (split, bytes) = input;
    let (pdus, _) = decode(bytes, usize::from(split).max(1));
    let mut again = Vec::new();
    for pdu in &pdus {
        pdu.encode(&mut again);
    }
    let (redecoded, ok) = decode(&again, 4096);
    assert!(ok, "re-encoded PDUs must decode");
    assert_eq!(redecoded, pdus);
});
