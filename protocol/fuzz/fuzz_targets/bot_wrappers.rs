//! Mass storage's Bulk-Only wrappers on whatever bytes the kernel (a CBW the client's
//! read-ahead reads) or a device (a CSW the probe reads) could hand over, and the SCSI the
//! client reads inside them (a READ it may widen, a READ CAPACITY answer from the device):
//! parsing never panics, and whatever parses writes back to bytes that parse to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::bot::{Cbw, Csw};
use protocol::scsi::{CapacityQuery, Read};

fuzz_target!(|data: &[u8]| {
    if let Ok(cbw) = Cbw::parse(data) {
        assert_eq!(Cbw::parse(&cbw.to_bytes()), Ok(cbw));
        assert!((1..=16).contains(&cbw.command().len()));
    }
    if let Ok(csw) = Csw::parse(data) {
        assert_eq!(csw.to_bytes()[..], data[..]);
    }
    if let Some(read) = Read::parse(data) {
        // A plain READ has no other bits set: it is exactly what it writes back.
        assert_eq!(read.to_cdb().as_deref(), Some(data));
    }
    for query in [CapacityQuery::Short, CapacityQuery::Long] {
        if let Some(capacity) = query.answer(data) {
            assert!(capacity.blocks > 0 && capacity.block_size.is_power_of_two());
        }
    }
});
