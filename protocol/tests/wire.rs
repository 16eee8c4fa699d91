//! Our QUIC wire protocol: frozen bytes, round trips over any split, and bad inputs.

mod common;

use common::{chunks, cuts, endpoint, hex, iso_layout, setup, status};
use proptest::prelude::*;
use protocol::usb::{Direction, EndpointNumber, Speed, TransferType, UrbStatus};
use protocol::wire::frame::{MAX_FRAME_LEN, decode_body};
use protocol::wire::*;
use serde_bytes::ByteBuf;

fn device(id: u32) -> DeviceInfo {
    DeviceInfo {
        id: DeviceId(id),
        bus_id: "1-1".into(),
        bus_number: 1,
        device_address: 2,
        vendor_id: 0x1d6b,
        product_id: 0x0104,
        bcd_device: 0x0100,
        class: ClassTriple {
            class: 0,
            subclass: 0,
            protocol: 0,
        },
        speed: Speed::High,
        manufacturer: Some("lab".into()),
        product: Some("disk".into()),
        serial: Some("0123456789".into()),
        device_descriptor: vec![18, 1, 0, 2, 0, 0, 0, 64, 0x6b, 0x1d, 4, 1, 0, 1, 1, 2, 3, 1],
        configurations: vec![ByteBuf::from(vec![9, 2, 9, 0, 0, 1, 0, 0x80, 50])],
        active_configuration: 1,
    }
}

fn decode_stream<T>(bytes: &[u8], cut_at: &[usize]) -> Result<Vec<T>, FrameError>
where
    T: serde::de::DeserializeOwned + Validate + DataApart,
{
    let mut decoder = FrameDecoder::<T>::new();
    let mut out = Vec::new();
    for chunk in chunks(bytes, cut_at) {
        decoder.push(chunk);
        while let Some(m) = decoder.next_message()? {
            out.push(m);
        }
    }
    decoder.finish()?;
    Ok(out)
}

// ---- frozen bytes: postcard enums are append-only; a change here bumps PROTOCOL_VERSION ----

#[test]
fn hello_bytes_are_frozen() {
    let hello = ClientMessage::Hello(Hello {
        max_version: 1,
        min_version: 1,
        capabilities: Capabilities::ISOCHRONOUS.union(Capabilities::TIMING),
        agent: "t".into(),
    });
    assert_eq!(
        frame_bytes(&hello).unwrap(),
        hex("00000006 00 01 01 09 01 74")
    );
}

#[test]
fn urb_messages_bytes_are_frozen() {
    let submit = UrbClientMessage::Submit(UrbSubmit {
        id: UrbId(5),
        endpoint: EndpointNumber::new(2).unwrap(),
        direction: Direction::Out,
        transfer_type: TransferType::Bulk,
        flags: 0,
        setup: None,
        length: 3,
        data: vec![0xaa, 0xbb, 0xcc],
        interval: 0,
        iso: None,
    });
    // variant 1 (Submit), id 5, ep 2, Out=0, Bulk=2, flags 0, no setup, length 3, 3 bytes,
    // interval 0, no iso.
    assert_eq!(
        frame_bytes(&submit).unwrap(),
        hex("0000000e 01 05 02 00 02 00 00 03 03 aabbcc 00 00")
    );
    let UrbClientMessage::Submit(urb) = submit else {
        unreachable!()
    };
    let after = UrbClientMessage::SubmitAfter {
        after: UrbId(4),
        urb,
    };
    // variant 3 (SubmitAfter), after 4, then the same submission.
    assert_eq!(
        frame_bytes(&after).unwrap(),
        hex("0000000f 03 04 05 02 00 02 00 00 03 03 aabbcc 00 00")
    );
    let complete = UrbServerMessage::Complete(UrbComplete {
        id: UrbId(5),
        status: UrbStatus::Stall,
        actual_length: 0,
        data: vec![],
        iso: None,
        timing: Some(ServerTiming {
            queued_us: 1,
            device_us: 300,
        }),
    });
    // variant 0, id 5, Stall=1, actual 0, no data, no iso, Some(1, 300 = ac 02).
    assert_eq!(
        frame_bytes(&complete).unwrap(),
        hex("0000000a 00 05 01 00 00 00 01 01 ac02")
    );
}

// ---- round trips ----

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 ._-]{0,40}"
}

fn device_info() -> impl Strategy<Value = DeviceInfo> {
    (
        any::<u32>(),
        "[0-9]-[0-9.]{1,20}",
        any::<(u8, u8, u16, u16, u16)>(),
        any::<[u8; 3]>(),
        prop::option::of(text()),
        prop::option::of(text()),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 9..200), 0..3),
    )
        .prop_map(
            |(id, bus_id, (bus, addr, vid, pid, bcd), class, product, serial, configs)| {
                DeviceInfo {
                    id: DeviceId(id),
                    bus_id,
                    bus_number: bus,
                    device_address: addr,
                    vendor_id: vid,
                    product_id: pid,
                    bcd_device: bcd,
                    class: ClassTriple {
                        class: class[0],
                        subclass: class[1],
                        protocol: class[2],
                    },
                    speed: Speed::from_kernel_code(u32::from(addr % 7)),
                    manufacturer: None,
                    product,
                    serial,
                    device_descriptor: vec![18; 18],
                    configurations: configs.into_iter().map(ByteBuf::from).collect(),
                    active_configuration: 1,
                }
            },
        )
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), any::<u64>(), text()).prop_map(|(max, min, caps, agent)| {
            ClientMessage::Hello(Hello {
                max_version: max,
                min_version: min,
                capabilities: Capabilities(caps),
                agent,
            })
        }),
        (
            any::<u32>(),
            prop_oneof![
                Just(Request::ListDevices),
                (any::<u32>(), prop::option::of("[0-9]{0,64}")).prop_map(|(d, pin)| {
                    Request::Attach {
                        device: DeviceId(d),
                        pin,
                    }
                }),
                any::<u32>().prop_map(|h| Request::Detach {
                    handle: AttachHandle(h)
                }),
            ]
        )
            .prop_map(|(id, request)| ClientMessage::Request {
                id: RequestId(id),
                request
            }),
        any::<(u64, u64)>()
            .prop_map(|(nonce, sent_us)| ClientMessage::Ping(Ping { nonce, sent_us })),
        any::<(u64, u64, u64)>().prop_map(|(nonce, echo_sent_us, answered_us)| {
            ClientMessage::Pong(Pong {
                nonce,
                echo_sent_us,
                answered_us,
            })
        }),
    ]
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    let refusal = prop_oneof![
        Just(AttachRefusal::Busy),
        Just(AttachRefusal::NotAllowed),
        Just(AttachRefusal::Gone),
        Just(AttachRefusal::PinRequired),
        Just(AttachRefusal::PinWrong),
        text().prop_map(AttachRefusal::ClaimFailed),
    ];
    let response = prop_oneof![
        prop::collection::vec(device_info(), 0..4).prop_map(Response::Devices),
        (any::<u32>(), device_info()).prop_map(|(h, device)| Response::Attached {
            handle: AttachHandle(h),
            device
        }),
        refusal.prop_map(Response::AttachRefused),
        any::<u32>().prop_map(|h| Response::Detached {
            handle: AttachHandle(h)
        }),
        any::<u32>().prop_map(|h| Response::UnknownHandle(AttachHandle(h))),
    ];
    let reason = prop_oneof![
        Just(EndReason::DeviceRemoved),
        Just(EndReason::Revoked),
        Just(EndReason::ServerShutdown),
        text().prop_map(EndReason::DeviceError),
    ];
    prop_oneof![
        (any::<u16>(), any::<u64>(), text()).prop_map(|(version, caps, agent)| {
            ServerMessage::Welcome(Welcome {
                version,
                capabilities: Capabilities(caps),
                agent,
            })
        }),
        prop_oneof![
            any::<(u16, u16)>().prop_map(|(min, max)| HandshakeRefusal::Version { min, max }),
            Just(HandshakeRefusal::NotAllowed),
        ]
        .prop_map(ServerMessage::Refused),
        (any::<u32>(), response).prop_map(|(id, response)| ServerMessage::Response {
            id: RequestId(id),
            response
        }),
        prop_oneof![
            device_info().prop_map(Event::DeviceArrived),
            any::<u32>().prop_map(|d| Event::DeviceRemoved(DeviceId(d))),
            (any::<u32>(), reason).prop_map(|(h, reason)| Event::AttachmentEnded {
                handle: AttachHandle(h),
                reason
            }),
        ]
        .prop_map(ServerMessage::Event),
        any::<(u64, u64)>()
            .prop_map(|(nonce, sent_us)| ServerMessage::Ping(Ping { nonce, sent_us })),
    ]
}

fn urb_submit() -> impl Strategy<Value = UrbSubmit> {
    (
        any::<u32>(),
        endpoint(),
        any::<bool>(),
        prop_oneof![
            Just(TransferType::Control),
            Just(TransferType::Bulk),
            Just(TransferType::Interrupt),
            Just(TransferType::Isochronous),
        ],
        any::<u32>(),
        setup(),
        prop::collection::vec(any::<u8>(), 0..300),
        iso_layout(false),
        any::<(i32, i32)>(),
    )
        .prop_map(
            |(
                id,
                endpoint,
                out,
                transfer_type,
                flags,
                setup,
                data,
                (packets, iso_len),
                (interval, start_frame),
            )| {
                let is_iso = transfer_type == TransferType::Isochronous;
                let length = if is_iso { iso_len } else { data.len() as u32 };
                UrbSubmit {
                    id: UrbId(id),
                    endpoint,
                    direction: if out { Direction::Out } else { Direction::In },
                    transfer_type,
                    flags,
                    setup: (transfer_type == TransferType::Control).then_some(setup),
                    length,
                    data: match (out, is_iso) {
                        (false, _) => vec![],
                        (true, false) => data,
                        (true, true) => vec![7; iso_len as usize],
                    },
                    interval,
                    iso: is_iso.then_some(IsoSubmit {
                        start_frame,
                        packets,
                    }),
                }
            },
        )
}

fn urb_complete() -> impl Strategy<Value = UrbComplete> {
    (
        any::<u32>(),
        status(),
        prop::collection::vec(any::<u8>(), 0..300),
        prop::option::of(iso_layout(true)),
        prop::option::of(any::<(u32, u32)>()),
    )
        .prop_map(|(id, status, data, iso, timing)| UrbComplete {
            id: UrbId(id),
            status,
            actual_length: data.len() as u32,
            data,
            iso: iso.map(|(packets, _)| IsoComplete {
                start_frame: 3,
                error_count: 0,
                packets,
            }),
            timing: timing.map(|(queued_us, device_us)| ServerTiming {
                queued_us,
                device_us,
            }),
        })
}

proptest! {
    #[test]
    fn control_messages_round_trip_over_any_split(
        client in prop::collection::vec(client_message(), 1..5),
        server in prop::collection::vec(server_message(), 1..5),
        raw_cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut bytes = Vec::new();
        for m in &client { encode_frame(m, &mut bytes).unwrap(); }
        prop_assert_eq!(decode_stream::<ClientMessage>(&bytes, &cuts(bytes.len(), &raw_cuts)).unwrap(), client);
        let mut bytes = Vec::new();
        for m in &server { encode_frame(m, &mut bytes).unwrap(); }
        prop_assert_eq!(decode_stream::<ServerMessage>(&bytes, &cuts(bytes.len(), &raw_cuts)).unwrap(), server);
    }

    #[test]
    fn a_message_encoded_around_its_data_is_the_same_frame(
        c in urb_complete(),
        s in urb_submit(),
        after in any::<u32>(),
    ) {
        let AroundData { head, tail } = complete_around_data(&c).unwrap();
        let whole = [head, c.data.clone(), tail].concat();
        prop_assert_eq!(whole, frame_bytes(&UrbServerMessage::Complete(c)).unwrap());
        let AroundData { head, tail } = submit_around_data(None, &s).unwrap();
        let whole = [head, s.data.clone(), tail].concat();
        prop_assert_eq!(whole, frame_bytes(&UrbClientMessage::Submit(s.clone())).unwrap());
        let AroundData { head, tail } = submit_around_data(Some(UrbId(after)), &s).unwrap();
        let whole = [head, s.data.clone(), tail].concat();
        let message = UrbClientMessage::SubmitAfter { after: UrbId(after), urb: s };
        prop_assert_eq!(whole, frame_bytes(&message).unwrap());
    }

    #[test]
    fn urb_messages_round_trip_over_any_split(
        submits in prop::collection::vec(urb_submit(), 1..5),
        completes in prop::collection::vec(urb_complete(), 1..5),
        open in (any::<u32>(), endpoint()),
        raw_cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut client = vec![UrbClientMessage::Open(UrbStreamOpen {
            handle: AttachHandle(open.0),
            endpoint: open.1,
            direction: Direction::In,
        })];
        let after = submits.first().map(|s| s.id);
        client.extend(submits.iter().cloned().map(UrbClientMessage::Submit));
        if let Some(after) = after {
            client.extend(submits.into_iter().map(|urb| UrbClientMessage::SubmitAfter { after, urb }));
        }
        client.push(UrbClientMessage::Unlink(UrbId(4)));
        let mut bytes = Vec::new();
        for m in &client { encode_frame(m, &mut bytes).unwrap(); }
        prop_assert_eq!(decode_stream::<UrbClientMessage>(&bytes, &cuts(bytes.len(), &raw_cuts)).unwrap(), client);

        let mut server: Vec<_> = completes.into_iter().map(UrbServerMessage::Complete).collect();
        server.push(UrbServerMessage::UnlinkDone { id: UrbId(4), cancelled: true });
        let mut bytes = Vec::new();
        for m in &server { encode_frame(m, &mut bytes).unwrap(); }
        prop_assert_eq!(decode_stream::<UrbServerMessage>(&bytes, &cuts(bytes.len(), &raw_cuts)).unwrap(), server);
    }

    #[test]
    fn large_urb_data_read_apart_decodes_as_the_whole_frame(
        c in urb_complete(),
        s in urb_submit(),
        after in any::<u32>(),
        len in DATA_APART_FROM..3 * DATA_APART_FROM,
        fill in any::<u8>(),
        raw_cuts in prop::collection::vec(any::<usize>(), 0..12),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1..=255u8), 0..3),
    ) {
        // Large data in otherwise arbitrary messages (the iso fields go: they bound the data).
        let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
        let complete = UrbComplete { actual_length: len as u32, data: data.clone(), iso: None, ..c };
        let urb = UrbSubmit {
            direction: Direction::Out,
            transfer_type: TransferType::Bulk,
            setup: None,
            length: len as u32,
            data,
            iso: None,
            ..s
        };
        let server = vec![UrbServerMessage::Complete(complete)];
        let client = vec![
            UrbClientMessage::Submit(urb.clone()),
            UrbClientMessage::SubmitAfter { after: UrbId(after), urb },
        ];
        let cut = |bytes: &[u8]| cuts(bytes.len(), &raw_cuts);
        let server_bytes = frame_bytes(&server[0]).unwrap();
        prop_assert_eq!(decode_stream::<UrbServerMessage>(&server_bytes, &cut(&server_bytes)).unwrap(), server);
        let mut client_bytes = Vec::new();
        for m in &client { encode_frame(m, &mut client_bytes).unwrap(); }
        prop_assert_eq!(decode_stream::<UrbClientMessage>(&client_bytes, &cut(&client_bytes)).unwrap(), client);

        // A peer's damage to a head or tail: read apart or whole, the same message or error.
        for (index, xor) in &flips {
            let near_an_end = index.index(128);
            let at = if near_an_end < 64 {
                near_an_end
            } else {
                client_bytes.len() - 128 + near_an_end
            };
            client_bytes[at] ^= xor;
        }
        let cuts_now = cut(&client_bytes);
        prop_assert_eq!(
            decode_stream::<UrbClientMessage>(&client_bytes, &cuts_now),
            decode_stream::<UrbClientMessage>(&client_bytes, &[])
        );
    }

    #[test]
    fn arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_body::<ClientMessage>(&body);
        let _ = decode_body::<ServerMessage>(&body);
        let _ = decode_body::<UrbClientMessage>(&body);
        let _ = decode_body::<UrbServerMessage>(&body);
    }
}

// ---- bad input ----

fn framed(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn first_error<T: serde::de::DeserializeOwned + Validate + DataApart + std::fmt::Debug>(
    bytes: &[u8],
) -> FrameError {
    let mut decoder = FrameDecoder::<T>::new();
    decoder.push(bytes);
    let err = loop {
        match decoder.next_message() {
            Ok(Some(_)) => continue,
            Ok(None) => break decoder.finish().unwrap_err(),
            Err(e) => break e,
        }
    };
    if !matches!(err, FrameError::Truncated(_)) {
        assert_eq!(decoder.next_message().unwrap_err(), FrameError::Poisoned);
    }
    err
}

fn submit_frame(edit: impl FnOnce(&mut UrbSubmit)) -> Vec<u8> {
    let mut s = UrbSubmit {
        id: UrbId(1),
        endpoint: EndpointNumber::new(1).unwrap(),
        direction: Direction::In,
        transfer_type: TransferType::Bulk,
        flags: 0,
        setup: None,
        length: 512,
        data: vec![],
        interval: 0,
        iso: None,
    };
    edit(&mut s);
    frame_bytes(&UrbClientMessage::Submit(s)).unwrap()
}

#[test]
fn bad_frames_get_typed_errors() {
    let long_agent = frame_bytes(&ClientMessage::Hello(Hello::ours(
        Capabilities(0),
        "x".repeat(257),
    )))
    .unwrap();
    let long_pin = frame_bytes(&ClientMessage::Request {
        id: RequestId(1),
        request: Request::Attach {
            device: DeviceId(1),
            pin: Some("1".repeat(65)),
        },
    })
    .unwrap();
    let mut hello = frame_bytes(&ClientMessage::Hello(Hello::ours(Capabilities(0), "a"))).unwrap();
    hello.extend_from_slice(&[0, 0, 0, 1, 0x6e]);

    let cases: Vec<(&str, FrameError, FrameError)> = vec![
        (
            "length past the bound",
            first_error::<ClientMessage>(&(MAX_FRAME_LEN + 1).to_be_bytes()),
            FrameError::TooLarge {
                len: u64::from(MAX_FRAME_LEN) + 1,
            },
        ),
        (
            "trailing bytes",
            first_error::<ClientMessage>(&framed(&[2, 1, 0, 0xff])),
            FrameError::TrailingBytes(1),
        ),
        (
            "truncated frame",
            first_error::<ClientMessage>(&framed(&[2, 1, 0])[..5]),
            FrameError::Truncated(5),
        ),
        (
            "agent too long",
            first_error::<ClientMessage>(&long_agent),
            FrameError::Invalid(Invalid::TooMany {
                what: "agent length",
                got: 257,
                max: 256,
            }),
        ),
        (
            "PIN too long",
            first_error::<ClientMessage>(&long_pin),
            FrameError::Invalid(Invalid::TooMany {
                what: "PIN length",
                got: 65,
                max: 64,
            }),
        ),
        (
            "IN submit with data",
            first_error::<UrbClientMessage>(&submit_frame(|s| s.data = vec![1])),
            FrameError::Invalid(Invalid::Inconsistent("IN submission carries data")),
        ),
        (
            "OUT data shorter than length",
            first_error::<UrbClientMessage>(&submit_frame(|s| {
                s.direction = Direction::Out;
                s.data = vec![1; 3];
            })),
            FrameError::Invalid(Invalid::Inconsistent(
                "OUT data length differs from the transfer length",
            )),
        ),
        (
            "control without setup",
            first_error::<UrbClientMessage>(&submit_frame(|s| {
                s.transfer_type = TransferType::Control
            })),
            FrameError::Invalid(Invalid::Inconsistent(
                "a setup packet belongs to exactly the control transfers",
            )),
        ),
        (
            "transfer past the bound",
            first_error::<UrbClientMessage>(&submit_frame(|s| {
                s.length = protocol::usb::MAX_TRANSFER_LEN + 1
            })),
            FrameError::Invalid(Invalid::TooMany {
                what: "transfer length",
                got: u64::from(protocol::usb::MAX_TRANSFER_LEN) + 1,
                max: u64::from(protocol::usb::MAX_TRANSFER_LEN),
            }),
        ),
        (
            "a frame after a good one with an unknown variant",
            first_error::<ClientMessage>(&hello),
            FrameError::Malformed(postcard::Error::SerdeDeCustom),
        ),
    ];
    for (what, got, expected) in cases {
        assert_eq!(got, expected, "{what}");
    }
    for (what, body) in [
        ("empty body", vec![]),
        ("unknown variant", vec![200]),
        ("bad varint", vec![1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
    ] {
        assert!(
            matches!(
                first_error::<ClientMessage>(&framed(&body)),
                FrameError::Malformed(_)
            ),
            "{what}"
        );
    }
}

#[test]
fn a_device_list_past_its_bounds_is_refused() {
    let too_many = ServerMessage::Response {
        id: RequestId(1),
        response: Response::Devices((0..65).map(device).collect()),
    };
    assert!(matches!(
        first_error::<ServerMessage>(&frame_bytes(&too_many).unwrap()),
        FrameError::Invalid(Invalid::TooMany {
            what: "device count",
            ..
        })
    ));
    let mut bad = device(1);
    bad.device_descriptor.pop();
    let event = ServerMessage::Event(Event::DeviceArrived(bad));
    assert!(matches!(
        first_error::<ServerMessage>(&frame_bytes(&event).unwrap()),
        FrameError::Invalid(Invalid::Inconsistent(_))
    ));
    let mut huge = device(2);
    huge.configurations = vec![
        ByteBuf::from(vec![0; 40_000]),
        ByteBuf::from(vec![0; 40_000]),
    ];
    let event = ServerMessage::Event(Event::DeviceArrived(huge));
    assert!(matches!(
        first_error::<ServerMessage>(&frame_bytes(&event).unwrap()),
        FrameError::Invalid(Invalid::TooMany {
            what: "configuration descriptor bytes",
            ..
        })
    ));
}

#[test]
fn an_oversized_message_of_ours_is_not_sent() {
    let huge = UrbServerMessage::Complete(UrbComplete {
        id: UrbId(1),
        status: UrbStatus::Ok,
        actual_length: MAX_FRAME_LEN,
        data: vec![0; MAX_FRAME_LEN as usize],
        iso: None,
        timing: None,
    });
    let mut out = vec![9];
    assert!(matches!(
        encode_frame(&huge, &mut out),
        Err(FrameError::TooLarge { .. })
    ));
    assert_eq!(out, vec![9], "nothing half-written");
}

#[test]
fn negotiation_picks_the_newest_common_version() {
    let ours = Capabilities::ISOCHRONOUS.union(Capabilities::TIMING);
    let hello = Hello::ours(
        Capabilities::TIMING.union(Capabilities::BULK_READ_AHEAD),
        "client",
    );
    let welcome = negotiate(&hello, ours, "server").unwrap();
    assert_eq!(welcome.version, PROTOCOL_VERSION);
    assert_eq!(welcome.capabilities, Capabilities::TIMING);
    let future = Hello {
        max_version: 9,
        min_version: 5,
        ..hello.clone()
    };
    assert_eq!(
        negotiate(&future, ours, "server"),
        Err(HandshakeRefusal::Version {
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION
        })
    );
    let newer_but_compatible = Hello {
        max_version: 9,
        min_version: 1,
        ..hello
    };
    assert_eq!(
        negotiate(&newer_but_compatible, ours, "s").unwrap().version,
        PROTOCOL_VERSION
    );
}

#[test]
fn device_info_knows_its_usbip_devid() {
    assert_eq!(device(1).usbip_devid(), 0x0001_0002);
    assert_eq!(
        device(1).active_configuration_bytes().map(<[u8]>::len),
        Some(9)
    );
}
