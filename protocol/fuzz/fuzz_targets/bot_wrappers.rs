//! Mass storage's Bulk-Only wrappers on whatever bytes the kernel (a CBW the client's
//! read-ahead reads) or a device (a CSW the probe reads) could hand over: parsing never panics,
//! and whatever parses writes back to bytes that parse to the same wrapper.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::bot::{Cbw, Csw};

fuzz_target!(|data: &[u8]| {
    if let Ok(cbw) = Cbw::parse(data) {
        assert_eq!(Cbw::parse(&cbw.to_bytes()), Ok(cbw));
        assert!((1..=16).contains(&cbw.command().len()));
    }
    if let Ok(csw) = Csw::parse(data) {
        assert_eq!(csw.to_bytes()[..], data[..]);
    }
});
