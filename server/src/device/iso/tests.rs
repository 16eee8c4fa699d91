use proptest::prelude::*;
use protocol::usb::{EndpointNumber, IsoPacket, TransferType, UrbStatus};
use protocol::wire::{IsoSubmit, UrbId, UrbSubmit};

use super::*;

fn urb(direction: Direction, packets: &[(u32, u32)], data: Vec<u8>, length: u32) -> UrbSubmit {
    UrbSubmit {
        id: UrbId(9),
        endpoint: EndpointNumber::new(1).unwrap(),
        direction,
        transfer_type: TransferType::Isochronous,
        flags: 0,
        setup: None,
        length,
        data,
        interval: 1,
        iso: Some(IsoSubmit {
            start_frame: 0,
            packets: packets
                .iter()
                .map(|&(offset, length)| IsoPacket {
                    offset,
                    length,
                    actual_length: 0,
                    status: UrbStatus::Ok,
                })
                .collect(),
        }),
    }
}

/// `n` OUT packets of `size` bytes back to back, filled with their index.
fn out_urb(n: usize, size: u32) -> UrbSubmit {
    let packets: Vec<(u32, u32)> = (0..n as u32).map(|i| (i * size, size)).collect();
    let data: Vec<u8> = (0..n).flat_map(|i| vec![i as u8; size as usize]).collect();
    let len = data.len() as u32;
    urb(Direction::Out, &packets, data, len)
}

fn ok(packets: &[u32], buffer: Vec<u8>) -> ChunkResult {
    ChunkResult {
        status: 0,
        start_frame: 100,
        packets: packets.iter().map(|&a| (a, 0)).collect(),
        buffer,
    }
}

#[test]
fn out_packets_are_gathered_by_offset_and_split_at_128() {
    let (plan, chunks) = IsoPlan::new(&out_urb(300, 192)).unwrap();
    assert_eq!(plan.chunks(), 3);
    assert_eq!(
        chunks.iter().map(|c| c.lengths.len()).collect::<Vec<_>>(),
        [128, 128, 44]
    );
    assert_eq!(chunks[1].buffer.len(), 128 * 192);
    assert_eq!(chunks[1].buffer[0], 128);
    assert_eq!(chunks[2].buffer[44 * 192 - 1], 299u32 as u8);
}

#[test]
fn out_data_with_gaps_between_packets_is_packed_for_usbfs() {
    let data: Vec<u8> = (0..40).collect();
    let u = urb(Direction::Out, &[(0, 4), (10, 4), (30, 2)], data, 40);
    let (_, chunks) = IsoPlan::new(&u).unwrap();
    assert_eq!(chunks[0].buffer, [0, 1, 2, 3, 10, 11, 12, 13, 30, 31]);
}

#[test]
fn in_data_comes_back_packed_by_actual_length_with_every_packet() {
    let u = urb(Direction::In, &[(0, 4), (4, 4), (8, 4)], vec![], 12);
    let (mut plan, chunks) = IsoPlan::new(&u).unwrap();
    assert_eq!(chunks[0].buffer.len(), 12);
    // usbfs leaves each packet at its requested position: 2, 4 and 0 bytes arrived.
    let buffer = vec![1, 1, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0];
    let done = plan.chunk_done(0, ok(&[2, 4, 0], buffer)).unwrap();
    assert_eq!(done.status, UrbStatus::Ok);
    assert_eq!(done.data, [1, 1, 2, 2, 2, 2]);
    assert_eq!(done.actual_length, 6);
    let iso = done.iso.unwrap();
    assert_eq!(iso.start_frame, 100);
    assert_eq!(iso.error_count, 0);
    assert_eq!(
        iso.packets
            .iter()
            .map(|p| (p.offset, p.length, p.actual_length))
            .collect::<Vec<_>>(),
        [(0, 4, 2), (4, 4, 4), (8, 4, 0)]
    );
}

#[test]
fn the_completion_waits_for_every_chunk_in_any_order_and_comes_once() {
    let (mut plan, chunks) = IsoPlan::new(&out_urb(200, 8)).unwrap();
    assert_eq!(chunks.len(), 2);
    assert!(plan.chunk_done(1, ok(&[8; 72], vec![])).is_none());
    assert!(plan.has_result(1) && !plan.has_result(0));
    let done = plan.chunk_done(0, ok(&[8; 128], vec![])).unwrap();
    assert_eq!(done.actual_length, 200 * 8);
    assert_eq!(done.iso.as_ref().unwrap().packets.len(), 200);
    assert!(plan.chunk_done(0, ok(&[8; 128], vec![])).is_none());
    assert!(plan.chunk_done(7, ok(&[], vec![])).is_none());
}

#[test]
fn packet_errors_are_counted_and_a_discarded_chunk_makes_the_urb_unlinked() {
    let (mut plan, _) = IsoPlan::new(&out_urb(130, 8)).unwrap();
    let mut first = ok(&[8; 128], vec![]);
    first.packets[3].1 = UrbStatus::Crc.to_errno();
    assert!(plan.chunk_done(0, first).is_none());
    let done = plan
        .chunk_done(1, ChunkResult::failed(2, UrbStatus::Unlinked))
        .unwrap();
    assert_eq!(done.status, UrbStatus::Unlinked);
    let iso = done.iso.unwrap();
    assert_eq!(iso.error_count, 3);
    assert_eq!(iso.packets[3].status, UrbStatus::Crc);
    assert_eq!(iso.packets[129].status, UrbStatus::Unlinked);
}

#[test]
fn a_result_the_kernel_should_never_give_is_clamped_not_trusted() {
    let u = urb(Direction::In, &[(0, 4), (4, 4)], vec![], 8);
    let (mut plan, _) = IsoPlan::new(&u).unwrap();
    // More than asked for the first packet, no entry for the second, a short buffer.
    let done = plan.chunk_done(0, ok(&[9], vec![7; 3])).unwrap();
    let iso = done.iso.unwrap();
    assert_eq!(iso.packets[0].actual_length, 0);
    assert_eq!(iso.packets[0].status, UrbStatus::Overflow);
    assert_eq!(iso.packets[1].status, UrbStatus::Invalid);
    assert!(done.data.is_empty());
    assert_eq!(iso.error_count, 2);
}

#[test]
fn bad_shapes_are_typed_errors() {
    let none = urb(Direction::Out, &[], vec![], 0);
    assert_eq!(IsoPlan::new(&none).unwrap_err(), IsoError::NoPackets);
    let outside = urb(Direction::Out, &[(0, 4), (6, 4)], vec![0; 8], 8);
    assert!(matches!(
        IsoPlan::new(&outside).unwrap_err(),
        IsoError::OutsideBuffer { index: 1, .. }
    ));
    let wrapping = urb(Direction::In, &[(u32::MAX, 2)], vec![], 8);
    assert!(matches!(
        IsoPlan::new(&wrapping).unwrap_err(),
        IsoError::OutsideBuffer { index: 0, .. }
    ));
    let many: Vec<(u32, u32)> = (0..1025).map(|_| (0, 0)).collect();
    assert_eq!(
        IsoPlan::new(&urb(Direction::In, &many, vec![], 0)).unwrap_err(),
        IsoError::TooManyPackets(1025)
    );
    let huge: Vec<(u32, u32)> = (0..3).map(|_| (0, 2 << 20)).collect();
    assert!(matches!(
        IsoPlan::new(&urb(Direction::In, &huge, vec![], 2 << 20)).unwrap_err(),
        IsoError::TooLong(_)
    ));
}

proptest! {
    /// Whatever the packets and however usbfs fills them, the completion has one result per
    /// packet, never more data than asked, IN data that is exactly the packed actual bytes,
    /// and the same bytes as usbfs delivered.
    #[test]
    fn any_in_urb_round_trips(
        lengths in proptest::collection::vec(0u32..64, 1..300),
        fill in proptest::collection::vec(0u32..80, 300),
    ) {
        let mut at = 0;
        let packets: Vec<(u32, u32)> = lengths.iter().map(|&l| { let p = (at, l); at += l; p }).collect();
        let u = urb(Direction::In, &packets, vec![], at);
        let (mut plan, chunks) = IsoPlan::new(&u).unwrap();
        let mut want = Vec::new();
        let mut done = None;
        let mut k = 0;
        for (i, c) in chunks.iter().enumerate() {
            let mut buffer = vec![0u8; c.buffer.len()];
            let mut pos = 0;
            let mut actuals = Vec::new();
            for &len in &c.lengths {
                let actual = fill[k % fill.len()].min(len);
                k += 1;
                for b in 0..actual as usize {
                    buffer[pos + b] = (pos + b) as u8 ^ i as u8;
                }
                want.extend_from_slice(&buffer[pos..pos + actual as usize]);
                actuals.push(actual);
                pos += len as usize;
            }
            done = plan.chunk_done(i, ok(&actuals, buffer));
        }
        let done = done.unwrap();
        let iso = done.iso.unwrap();
        prop_assert_eq!(iso.packets.len(), lengths.len());
        prop_assert_eq!(&done.data, &want);
        prop_assert_eq!(done.actual_length as usize, want.len());
        let sum: u32 = iso.packets.iter().map(|p| p.actual_length).sum();
        prop_assert_eq!(sum as usize, done.data.len());
        for (p, &l) in iso.packets.iter().zip(&lengths) {
            prop_assert!(p.actual_length <= l);
        }
    }

    /// OUT: the chunks carry exactly the packets' bytes in order, at most 128 packets each.
    #[test]
    fn any_out_urb_is_gathered_exactly(
        lengths in proptest::collection::vec(0u32..40, 1..400),
        gap in 0u32..5,
    ) {
        let mut at = 0;
        let packets: Vec<(u32, u32)> = lengths.iter().map(|&l| { let p = (at, l); at += l + gap; p }).collect();
        let data: Vec<u8> = (0..at).map(|i| (i % 251) as u8).collect();
        let u = urb(Direction::Out, &packets, data.clone(), at);
        let (plan, chunks) = IsoPlan::new(&u).unwrap();
        let want: Vec<u8> = packets.iter().flat_map(|&(o, l)| data[o as usize..(o + l) as usize].to_vec()).collect();
        let got: Vec<u8> = chunks.iter().flat_map(|c| c.buffer.clone()).collect();
        prop_assert_eq!(got, want);
        prop_assert!(chunks.iter().all(|c| c.lengths.len() <= USBFS_MAX_PACKETS));
        prop_assert_eq!(plan.chunks(), chunks.len());
    }
}
