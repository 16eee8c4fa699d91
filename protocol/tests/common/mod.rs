//! Generators and helpers shared by the codec tests.

#![allow(dead_code)]

use proptest::prelude::*;
use protocol::usb::{EndpointNumber, IsoPacket, SetupPacket, UrbStatus};

/// Decodes hex with optional whitespace.
pub fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// Errnos that [`UrbStatus`] names; `Other` must avoid them to round-trip.
const NAMED_ERRNOS: [i32; 16] = [
    32, 75, 71, 84, 62, 110, 2, 104, 108, 19, 121, 18, 22, 70, 63, 115,
];

pub fn status() -> impl Strategy<Value = UrbStatus> {
    prop_oneof![
        Just(UrbStatus::Ok),
        Just(UrbStatus::Stall),
        Just(UrbStatus::Overflow),
        Just(UrbStatus::Protocol),
        Just(UrbStatus::Crc),
        Just(UrbStatus::NoResponse),
        Just(UrbStatus::Timeout),
        Just(UrbStatus::Killed),
        Just(UrbStatus::Unlinked),
        Just(UrbStatus::Shutdown),
        Just(UrbStatus::NoDevice),
        Just(UrbStatus::ShortPacket),
        Just(UrbStatus::IsoPartial),
        Just(UrbStatus::Invalid),
        Just(UrbStatus::Comm),
        Just(UrbStatus::NoStreamResources),
        Just(UrbStatus::InProgress),
        (1i32..4096)
            .prop_filter("named errno", |e| !NAMED_ERRNOS.contains(e))
            .prop_map(UrbStatus::Other),
    ]
}

pub fn endpoint() -> impl Strategy<Value = EndpointNumber> {
    (0u8..16).prop_map(|n| EndpointNumber::new(n).unwrap())
}

pub fn setup() -> impl Strategy<Value = SetupPacket> {
    any::<[u8; 8]>().prop_map(SetupPacket)
}

/// Iso packets laid out back to back in a buffer, returning `(packets, buffer_len)`. With
/// `completed`, each packet gets an actual length and a status.
pub fn iso_layout(completed: bool) -> impl Strategy<Value = (Vec<IsoPacket>, u32)> {
    prop::collection::vec((0u32..64, 0u32..=64, status()), 1..12).prop_map(move |spec| {
        let mut offset = 0;
        let packets = spec
            .into_iter()
            .map(|(length, actual, status)| {
                let p = IsoPacket {
                    offset,
                    length,
                    actual_length: if completed { actual.min(length) } else { 0 },
                    status: if completed { status } else { UrbStatus::Ok },
                };
                offset += length;
                p
            })
            .collect();
        (packets, offset)
    })
}

/// Split points for `len` bytes: sorted, deduplicated cut positions.
pub fn cuts(len: usize, raw: &[usize]) -> Vec<usize> {
    let mut c: Vec<usize> = raw.iter().map(|r| r % (len + 1)).collect();
    c.sort_unstable();
    c.dedup();
    c
}

/// `bytes` cut at `cuts`.
pub fn chunks<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    for &c in cuts {
        out.push(&bytes[at..c]);
        at = c;
    }
    out.push(&bytes[at..]);
    out
}
