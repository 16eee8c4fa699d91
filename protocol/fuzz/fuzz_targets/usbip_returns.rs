//! What a USB/IP server sends the host side: RET_SUBMIT / RET_UNLINK for URBs the first bytes
//! of the input declare as submitted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::usb::Direction;
use protocol::usbip::PduDecoder;

fuzz_target!(|input: (Vec<(u32, bool, u32)>, &[u8])| {
    let (submitted, bytes) = input;
    let mut decoder = PduDecoder::returns();
    for (seqnum, is_in, len) in submitted {
        let direction = if is_in { Direction::In } else { Direction::Out };
        if decoder.expect_return(seqnum, direction, len).is_err() {
            break;
        }
    }
    decoder.push(bytes);
    while let Ok(Some(pdu)) = decoder.next_pdu() {
        let _ = pdu.to_bytes();
    }
    let _ = decoder.finish();
});
