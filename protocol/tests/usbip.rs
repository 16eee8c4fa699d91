//! The USB/IP codec against the kernel: captured bytes, round trips over any split of the
//! stream, and a table of bad inputs with the error each must get.

mod common;

use common::{chunks, cuts, endpoint, hex, iso_layout, setup, status};
use proptest::prelude::*;
use protocol::usb::{Direction, EndpointNumber, IsoPacket, SetupPacket, UrbStatus};
use protocol::usbip::op::{
    DeviceRecord, InterfaceRecord, ListedDevice, OpDecoder, OpError, OpMessage, OpStatus,
};
use protocol::usbip::{
    CmdSubmit, CmdUnlink, Pdu, PduDecoder, RetSubmit, RetUnlink, SubmitBuffer, Transferred,
    UrbError,
};
use protocol::wire::DATA_APART_FROM;

/// The first PDU vhci-hcd sent on a socketpair in the lab (../shared/LAB-NOTES.md): CMD_SUBMIT,
/// seqnum 1, devid 0x00010002, IN, ep 0, flags 0x200, 64 bytes, GET_DESCRIPTOR(device).
const KERNEL_FIRST_SUBMIT: &str = "00000001 00000001 00010002 00000001 00000000 00000200
    00000040 00000000 00000000 00000000 80060001 00004000";

fn kernel_first_submit() -> CmdSubmit {
    CmdSubmit {
        seqnum: 1,
        devid: 0x0001_0002,
        ep: EndpointNumber::CONTROL,
        transfer_flags: 0x200,
        start_frame: 0,
        interval: 0,
        setup: SetupPacket([0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x40, 0x00]),
        buffer: SubmitBuffer::In(64),
        iso: None,
    }
}

fn decode_all(decoder: &mut PduDecoder, bytes: &[u8]) -> Result<Vec<Pdu>, UrbError> {
    decoder.push(bytes);
    let mut out = Vec::new();
    while let Some(pdu) = decoder.next_pdu()? {
        out.push(pdu);
    }
    Ok(out)
}

#[test]
fn decodes_the_kernels_first_cmd_submit() {
    let bytes = hex(KERNEL_FIRST_SUBMIT);
    assert_eq!(bytes.len(), 48);
    let pdus = decode_all(&mut PduDecoder::commands(), &bytes).unwrap();
    assert_eq!(pdus, vec![Pdu::CmdSubmit(kernel_first_submit())]);
    let Pdu::CmdSubmit(cmd) = &pdus[0] else {
        unreachable!()
    };
    assert_eq!(cmd.setup.request(), 6);
    assert_eq!(cmd.setup.value(), 0x0100);
    assert_eq!(cmd.setup.length(), 64);
    assert_eq!(
        pdus[0].to_bytes(),
        bytes,
        "re-encoding gives the kernel's bytes"
    );
}

#[test]
fn decodes_the_kernels_first_cmd_submit_one_byte_at_a_time() {
    let bytes = hex(KERNEL_FIRST_SUBMIT);
    let mut decoder = PduDecoder::commands();
    for (i, b) in bytes.iter().enumerate() {
        decoder.push(std::slice::from_ref(b));
        let got = decoder.next_pdu().unwrap();
        assert_eq!(got.is_some(), i == bytes.len() - 1, "after byte {i}");
    }
    decoder.finish().unwrap();
}

#[test]
fn ret_submit_has_the_layout_vhci_reads() {
    let descriptor: Vec<u8> = (0..18).collect();
    let ret = Pdu::RetSubmit(RetSubmit {
        seqnum: 1,
        devid: 0x0001_0002,
        ep: EndpointNumber::CONTROL,
        status: UrbStatus::Ok,
        transferred: Transferred::In(descriptor.clone()),
        start_frame: 0,
        error_count: 0,
        iso: None,
    });
    let mut expected = hex("00000003 00000001 00010002 00000001 00000000
        00000000 00000012 00000000 00000000 00000000 00000000 00000000");
    expected.extend_from_slice(&descriptor);
    assert_eq!(ret.to_bytes(), expected);

    let stall = Pdu::RetSubmit(RetSubmit {
        seqnum: 7,
        devid: 0,
        ep: EndpointNumber::CONTROL,
        status: UrbStatus::Stall,
        transferred: Transferred::Out(0),
        start_frame: 0,
        error_count: 0,
        iso: None,
    });
    assert_eq!(
        stall.to_bytes(),
        hex("00000003 00000007 00000000 00000000 00000000
             ffffffe0 00000000 00000000 00000000 00000000 00000000 00000000")
    );
}

#[test]
fn unlink_pair_has_the_kernels_layout() {
    let cmd = hex("00000002 00000009 00010002 00000000 00000000
        00000004 00000000 00000000 00000000 00000000 00000000 00000000");
    let pdus = decode_all(&mut PduDecoder::commands(), &cmd).unwrap();
    assert_eq!(
        pdus,
        vec![Pdu::CmdUnlink(CmdUnlink {
            seqnum: 9,
            devid: 0x0001_0002,
            unlink_seqnum: 4
        })]
    );
    let ret = Pdu::RetUnlink(RetUnlink {
        seqnum: 9,
        devid: 0x0001_0002,
        status: UrbStatus::Unlinked,
    });
    assert_eq!(
        ret.to_bytes(),
        hex("00000004 00000009 00010002 00000000 00000000
             ffffff98 00000000 00000000 00000000 00000000 00000000 00000000")
    );
}

#[test]
fn accepts_minus_one_as_not_isochronous() {
    let mut bytes = hex(KERNEL_FIRST_SUBMIT);
    bytes[32..36].copy_from_slice(&[0xff; 4]);
    let pdus = decode_all(&mut PduDecoder::commands(), &bytes).unwrap();
    assert_eq!(pdus, vec![Pdu::CmdSubmit(kernel_first_submit())]);
}

// ---- round trips ----

/// A URB's data, small or from `DATA_APART_FROM` on (the decoder reads those apart from its
/// input buffer, so any split must land in the right place either way).
fn payload() -> impl Strategy<Value = Vec<u8>> {
    let large = DATA_APART_FROM - 2..DATA_APART_FROM + 3000;
    prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..600),
        1 => (large, any::<u8>()).prop_map(|(len, seed)| {
            (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
        }),
    ]
}

fn cmd_submit() -> impl Strategy<Value = CmdSubmit> {
    let plain = (
        any::<u32>(),
        any::<u32>(),
        endpoint(),
        any::<u32>(),
        any::<i32>(),
        setup(),
        prop_oneof![
            payload().prop_map(SubmitBuffer::Out),
            (0u32..=protocol::usb::MAX_TRANSFER_LEN).prop_map(SubmitBuffer::In),
        ],
    )
        .prop_map(
            |(seqnum, devid, ep, transfer_flags, interval, setup, buffer)| CmdSubmit {
                seqnum,
                devid,
                ep,
                transfer_flags,
                start_frame: 0,
                interval,
                setup,
                buffer,
                iso: None,
            },
        );
    let iso = (
        any::<u32>(),
        endpoint(),
        any::<bool>(),
        any::<i32>(),
        iso_layout(false),
    )
        .prop_map(|(seqnum, ep, out, start_frame, (packets, len))| CmdSubmit {
            seqnum,
            devid: 0x0001_0003,
            ep,
            transfer_flags: 0x2,
            start_frame,
            interval: 1,
            setup: SetupPacket::default(),
            buffer: if out {
                SubmitBuffer::Out((0..len).map(|i| i as u8).collect())
            } else {
                SubmitBuffer::In(len)
            },
            iso: Some(packets),
        });
    prop_oneof![3 => plain, 1 => iso]
}

fn command() -> impl Strategy<Value = Pdu> {
    prop_oneof![
        3 => cmd_submit().prop_map(Pdu::CmdSubmit),
        1 => (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(seqnum, devid, unlink_seqnum)| {
            Pdu::CmdUnlink(CmdUnlink { seqnum, devid, unlink_seqnum })
        }),
    ]
}

/// A return together with the buffer length its submission had.
fn ret_submit() -> impl Strategy<Value = (RetSubmit, u32)> {
    let plain = (
        any::<u32>(),
        endpoint(),
        status(),
        prop_oneof![
            payload().prop_map(Transferred::In),
            (0u32..5000).prop_map(Transferred::Out),
        ],
        0u32..100,
    )
        .prop_map(|(seqnum, ep, status, transferred, slack)| {
            let buffer = transferred.actual_length() + slack;
            let ret = RetSubmit {
                seqnum,
                devid: 0,
                ep,
                status,
                transferred,
                start_frame: 0,
                error_count: 0,
                iso: None,
            };
            (ret, buffer)
        });
    let iso = (any::<u32>(), status(), any::<bool>(), iso_layout(true)).prop_map(
        |(seqnum, status, input, (packets, buffer)): (
            u32,
            UrbStatus,
            bool,
            (Vec<IsoPacket>, u32),
        )| {
            let actual: u32 = packets.iter().map(|p| p.actual_length).sum();
            let errors = packets.iter().filter(|p| p.status != UrbStatus::Ok).count() as u32;
            let ret = RetSubmit {
                seqnum,
                devid: 0,
                ep: EndpointNumber::new(3).unwrap(),
                status,
                transferred: if input {
                    Transferred::In((0..actual).map(|i| (i * 7) as u8).collect())
                } else {
                    Transferred::Out(actual)
                },
                start_frame: 17,
                error_count: errors,
                iso: Some(packets),
            };
            (ret, buffer)
        },
    );
    prop_oneof![3 => plain, 1 => iso]
}

proptest! {
    #[test]
    fn commands_round_trip_over_any_split(
        pdus in prop::collection::vec(command(), 1..6),
        raw_cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut bytes = Vec::new();
        for pdu in &pdus {
            let before = bytes.len();
            pdu.encode(&mut bytes);
            prop_assert_eq!(bytes.len() - before, pdu.encoded_len());
        }
        let mut decoder = PduDecoder::commands();
        let mut got = Vec::new();
        for chunk in chunks(&bytes, &cuts(bytes.len(), &raw_cuts)) {
            got.extend(decode_all(&mut decoder, chunk).unwrap());
        }
        decoder.finish().unwrap();
        prop_assert_eq!(got, pdus);
    }

    #[test]
    fn returns_round_trip_over_any_split(
        rets in prop::collection::vec(ret_submit(), 1..6),
        raw_cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut decoder = PduDecoder::returns();
        let mut bytes = Vec::new();
        let mut expected = Vec::new();
        for (i, (mut ret, buffer)) in rets.into_iter().enumerate() {
            ret.seqnum = i as u32; // seqnums are unique on a connection
            decoder.expect_return(ret.seqnum, ret.transferred.direction(), buffer).unwrap();
            let pdu = Pdu::RetSubmit(ret);
            pdu.encode(&mut bytes);
            expected.push(pdu);
        }
        let unlink = Pdu::RetUnlink(RetUnlink { seqnum: 99, devid: 1, status: UrbStatus::Unlinked });
        unlink.encode(&mut bytes);
        expected.push(unlink);
        let mut got = Vec::new();
        for chunk in chunks(&bytes, &cuts(bytes.len(), &raw_cuts)) {
            got.extend(decode_all(&mut decoder, chunk).unwrap());
        }
        decoder.finish().unwrap();
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn a_split_return_is_the_same_bytes((ret, _) in ret_submit()) {
        let mut whole = Vec::new();
        Pdu::RetSubmit(ret.clone()).encode(&mut whole);
        let mut split = vec![0xee];
        let data = ret.encode_split(&mut split);
        split.extend(data.unwrap_or_default());
        prop_assert_eq!(&split[1..], &whole[..]);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for mut decoder in [PduDecoder::commands(), PduDecoder::returns()] {
            decoder.expect_return(1, Direction::In, 64).unwrap();
            decoder.push(&bytes);
            while let Ok(Some(_)) = decoder.next_pdu() {}
        }
        let mut op = OpDecoder::requests();
        op.push(&bytes);
        while let Ok(Some(_)) = op.next_message() {}
    }
}

// ---- bad input ----

/// A CMD_SUBMIT header (IN, ep 0, 64 bytes) with one 32-bit field replaced.
fn header_with(field_at: usize, value: u32) -> Vec<u8> {
    let mut bytes = hex(KERNEL_FIRST_SUBMIT);
    bytes[field_at..field_at + 4].copy_from_slice(&value.to_be_bytes());
    bytes
}

fn iso_out_submit(offset: u32, length: u32) -> Vec<u8> {
    let mut bytes = header_with(12, 0); // OUT
    bytes[24..28].copy_from_slice(&8u32.to_be_bytes()); // 8-byte buffer
    bytes[32..36].copy_from_slice(&1u32.to_be_bytes()); // one packet
    bytes.extend_from_slice(&[0xaa; 8]);
    for v in [offset, length, 0, 0] {
        bytes.extend_from_slice(&v.to_be_bytes());
    }
    bytes
}

#[test]
fn bad_commands_get_typed_errors() {
    use UrbError::*;
    let table: Vec<(&str, Vec<u8>, UrbError)> = vec![
        ("unknown command", header_with(0, 5), UnknownCommand(5)),
        ("zero command", header_with(0, 0), UnknownCommand(0)),
        (
            "a return sent to the device side",
            header_with(0, 3),
            UnexpectedCommand(3),
        ),
        ("direction 2", header_with(12, 2), BadDirection(2)),
        (
            "endpoint 16",
            header_with(16, 16),
            BadEndpoint(protocol::usb::BadEndpoint(16)),
        ),
        (
            "endpoint past u8",
            header_with(16, 0x100),
            BadEndpoint(protocol::usb::BadEndpoint(0x100)),
        ),
        (
            "negative length",
            header_with(24, u32::MAX),
            NegativeLength(-1),
        ),
        (
            "length past the bound",
            header_with(24, protocol::usb::MAX_TRANSFER_LEN + 1),
            TooLong {
                len: protocol::usb::MAX_TRANSFER_LEN + 1,
                max: protocol::usb::MAX_TRANSFER_LEN,
            },
        ),
        (
            "1025 iso packets",
            header_with(32, 1025),
            BadIsoPacketCount(1025),
        ),
        (
            "-2 iso packets",
            header_with(32, (-2i32) as u32),
            BadIsoPacketCount(-2),
        ),
        (
            "iso packet past the buffer",
            iso_out_submit(4, 8),
            IsoPacketOutOfBounds {
                index: 0,
                offset: 4,
                length: 8,
                buffer: 8,
            },
        ),
        (
            "iso offset overflowing u32",
            iso_out_submit(u32::MAX, 2),
            IsoPacketOutOfBounds {
                index: 0,
                offset: u32::MAX,
                length: 2,
                buffer: 8,
            },
        ),
    ];
    for (what, bytes, expected) in table {
        let mut decoder = PduDecoder::commands();
        decoder.push(&bytes);
        assert_eq!(decoder.next_pdu(), Err(expected), "{what}");
        assert_eq!(
            decoder.next_pdu(),
            Err(UrbError::Poisoned),
            "{what}: stays failed"
        );
    }
}

#[test]
fn a_hostile_length_is_refused_before_its_payload_is_buffered() {
    let mut decoder = PduDecoder::commands();
    decoder.push(&header_with(24, 0x7fff_ffff));
    assert!(matches!(decoder.next_pdu(), Err(UrbError::TooLong { .. })));
    assert!(decoder.buffered() <= 48);
}

#[test]
fn a_stream_cut_mid_pdu_is_truncated() {
    let mut decoder = PduDecoder::commands();
    let mut bytes = header_with(12, 0); // OUT, 64 bytes of data announced
    bytes.extend_from_slice(&[1; 10]);
    decoder.push(&bytes);
    assert_eq!(decoder.next_pdu(), Ok(None));
    assert_eq!(decoder.finish(), Err(UrbError::Truncated(58)));
    let mut half = PduDecoder::commands();
    half.push(&bytes[..20]);
    assert_eq!(half.next_pdu(), Ok(None));
    assert_eq!(half.finish(), Err(UrbError::Truncated(20)));
}

fn ret_header(seqnum: u32, status: i32, actual: u32, packets: i32, errors: i32) -> Vec<u8> {
    let mut h = vec![0u8; 48];
    for (at, v) in [
        (0, 3u32),
        (4, seqnum),
        (20, status as u32),
        (24, actual),
        (32, packets as u32),
        (36, errors as u32),
    ] {
        h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    h
}

#[test]
fn bad_returns_get_typed_errors() {
    use UrbError::*;
    let mut iso_mismatch = ret_header(1, 0, 4, 1, 0);
    iso_mismatch.extend_from_slice(&[9; 4]);
    for v in [0u32, 8, 3, 0] {
        iso_mismatch.extend_from_slice(&v.to_be_bytes());
    }
    let table: Vec<(&str, Vec<u8>, UrbError)> = vec![
        (
            "never submitted",
            ret_header(2, 0, 0, 0, 0),
            UnknownSeqnum(2),
        ),
        (
            "more than the buffer",
            ret_header(1, 0, 65, 0, 0),
            ActualExceedsBuffer {
                seqnum: 1,
                actual: 65,
                buffer: 64,
            },
        ),
        (
            "negative actual length",
            ret_header(1, 0, u32::MAX, 0, 0),
            NegativeLength(-1),
        ),
        (
            "errors without packets",
            ret_header(1, 0, 0, 0, 1),
            BadErrorCount(1),
        ),
        (
            "negative error count",
            ret_header(1, 0, 0, 2, -1),
            BadErrorCount(-1),
        ),
        (
            "iso sum differs",
            iso_mismatch,
            IsoLengthMismatch { sum: 3, actual: 4 },
        ),
        (
            "a command sent to the host side",
            header_with(0, 1),
            UnexpectedCommand(1),
        ),
    ];
    for (what, bytes, expected) in table {
        let mut decoder = PduDecoder::returns();
        decoder.expect_return(1, Direction::In, 64).unwrap();
        decoder.push(&bytes);
        assert_eq!(decoder.next_pdu(), Err(expected), "{what}");
    }
}

#[test]
fn the_return_table_is_bounded_and_forgets_unlinked_urbs() {
    let mut decoder = PduDecoder::returns();
    decoder.expect_return(1, Direction::In, 8).unwrap();
    assert_eq!(
        decoder.expect_return(1, Direction::In, 8),
        Err(UrbError::DuplicateSeqnum(1))
    );
    assert!(decoder.forget_return(1));
    assert!(!decoder.forget_return(1));
    for seqnum in 0..protocol::usbip::urb::MAX_PENDING_RETURNS as u32 {
        decoder.expect_return(seqnum, Direction::Out, 8).unwrap();
    }
    assert_eq!(
        decoder.expect_return(u32::MAX, Direction::Out, 8),
        Err(UrbError::TooManyPending)
    );
}

// ---- OP phase ----

fn record(busid: &str) -> DeviceRecord {
    DeviceRecord {
        path: format!("/sys/devices/platform/dummy_hcd.0/usb1/{busid}"),
        busid: busid.into(),
        busnum: 1,
        devnum: 2,
        speed: protocol::usb::Speed::High,
        vendor_id: 0x1d6b,
        product_id: 0x0104,
        bcd_device: 0x0100,
        device_class: 0,
        device_subclass: 0,
        device_protocol: 0,
        configuration_value: 1,
        num_configurations: 1,
        num_interfaces: 1,
    }
}

#[test]
fn op_requests_have_usbips_layout() {
    assert_eq!(OpMessage::ReqDevlist.to_bytes(), hex("0111 8005 00000000"));
    let import = OpMessage::ReqImport {
        busid: "1-1".into(),
    };
    let mut expected = hex("0111 8003 00000000");
    expected.extend_from_slice(b"1-1");
    expected.resize(8 + 32, 0);
    assert_eq!(import.to_bytes(), expected);
    let mut decoder = OpDecoder::requests();
    decoder.push(&expected);
    assert_eq!(decoder.next_message(), Ok(Some(import)));
}

#[test]
fn op_replies_round_trip_and_hand_over_the_urb_phase() {
    let devlist = OpMessage::RepDevlist {
        status: OpStatus::Ok,
        devices: vec![
            ListedDevice {
                device: record("1-1"),
                interfaces: vec![InterfaceRecord {
                    class: 8,
                    subclass: 6,
                    protocol: 0x50,
                }],
            },
            ListedDevice {
                device: DeviceRecord {
                    num_interfaces: 2,
                    ..record("1-2")
                },
                interfaces: vec![
                    InterfaceRecord {
                        class: 2,
                        subclass: 2,
                        protocol: 1,
                    },
                    InterfaceRecord {
                        class: 10,
                        subclass: 0,
                        protocol: 0,
                    },
                ],
            },
        ],
    };
    let import = OpMessage::RepImport {
        status: OpStatus::Ok,
        device: Some(record("1-1")),
    };
    let refused = OpMessage::RepImport {
        status: OpStatus::DeviceBusy,
        device: None,
    };
    let mut bytes = Vec::new();
    for m in [&devlist, &refused, &import] {
        m.encode(&mut bytes);
    }
    assert_eq!(refused.to_bytes().len(), 8, "a refusal is a bare header");
    let urb_phase = hex(KERNEL_FIRST_SUBMIT);
    bytes.extend_from_slice(&urb_phase[..30]);
    for split in [1, 13, 200, 400, 700, 900] {
        let mut decoder = OpDecoder::replies();
        let mut got = Vec::new();
        for chunk in bytes.chunks(split) {
            decoder.push(chunk);
            while let Some(m) = decoder.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![devlist.clone(), refused.clone(), import.clone()]);
        assert_eq!(decoder.into_remaining(), &urb_phase[..30]);
    }
}

#[test]
fn bad_op_messages_get_typed_errors() {
    let mut bad_utf8 = hex("0111 8003 00000000");
    bad_utf8.extend_from_slice(&[0xff; 32]);
    let mut too_many = hex("0111 0005 00000000");
    too_many.extend_from_slice(&257u32.to_be_bytes());
    let mut many_interfaces = hex("0111 0003 00000000");
    let mut r = Vec::new();
    OpMessage::RepImport {
        status: OpStatus::Ok,
        device: Some(record("1-1")),
    }
    .encode(&mut r);
    r[8 + 311] = 33;
    many_interfaces = [many_interfaces, r[8..].to_vec()].concat();
    let table: Vec<(&str, OpDecoder, Vec<u8>, OpError)> = vec![
        (
            "old version",
            OpDecoder::requests(),
            hex("0110 8005 00000000"),
            OpError::Version(0x0110),
        ),
        (
            "unknown code",
            OpDecoder::requests(),
            hex("0111 1234 00000000"),
            OpError::UnknownCode(0x1234),
        ),
        (
            "reply to server",
            OpDecoder::requests(),
            hex("0111 0005 00000000"),
            OpError::UnexpectedCode(5),
        ),
        (
            "request to client",
            OpDecoder::replies(),
            hex("0111 8005 00000000"),
            OpError::UnexpectedCode(0x8005),
        ),
        (
            "status on request",
            OpDecoder::requests(),
            hex("0111 8005 00000001"),
            OpError::StatusOnRequest(1),
        ),
        (
            "busid not UTF-8",
            OpDecoder::requests(),
            bad_utf8,
            OpError::NotUtf8("busid"),
        ),
        (
            "257 devices",
            OpDecoder::replies(),
            too_many,
            OpError::TooManyDevices(257),
        ),
        (
            "33 interfaces",
            OpDecoder::replies(),
            many_interfaces,
            OpError::TooManyInterfaces(33),
        ),
    ];
    for (what, mut decoder, bytes, expected) in table {
        decoder.push(&bytes);
        assert_eq!(decoder.next_message(), Err(expected), "{what}");
        assert_eq!(decoder.next_message(), Err(OpError::Poisoned), "{what}");
    }
    let mut cut = OpDecoder::requests();
    cut.push(&hex("0111 8003 00000000 3131"));
    assert_eq!(cut.next_message(), Ok(None));
    assert_eq!(cut.finish(), Err(OpError::Truncated(10)));
}
