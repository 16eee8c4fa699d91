//! `PortSession` driven by scripted kernel byte streams and server answers, with a model of
//! vhci that fails the test where the real one would kill the port.

use std::collections::{HashMap, HashSet};

use client::vhci::{Action, BadCompletion, CloseReason, PortSession};
use proptest::prelude::*;
use protocol::usb::{Direction, EndpointNumber, IsoPacket, SetupPacket, TransferType, UrbStatus};
use protocol::usbip::{Pdu, PduDecoder, SubmitBuffer, Transferred, UrbError};
use protocol::wire::{IsoComplete, UrbComplete, UrbId};

mod common;

use common::*;

#[test]
fn the_kernels_first_submit_split_anywhere_becomes_one_control_urb() {
    let bytes = hex(KERNEL_FIRST_SUBMIT);
    for cut in 0..=bytes.len() {
        let mut session = PortSession::new(&device());
        session.on_kernel_bytes(&bytes[..cut]);
        let early = drain(&mut session);
        if cut < bytes.len() {
            assert!(
                early.is_empty(),
                "an action before the PDU was whole (cut {cut})"
            );
        }
        session.on_kernel_bytes(&bytes[cut..]);
        let actions = [early, drain(&mut session)].concat();
        let [
            Action::Submit {
                endpoint,
                direction,
                urb,
                after: None,
            },
        ] = &actions[..]
        else {
            panic!("cut {cut}: {actions:?}");
        };
        assert_eq!(*endpoint, EndpointNumber::CONTROL);
        assert_eq!(*direction, Direction::Out, "ep0 is routed as OUT");
        assert_eq!(urb.id, UrbId(1));
        assert_eq!(urb.direction, Direction::In);
        assert_eq!(urb.transfer_type, TransferType::Control);
        assert_eq!(urb.flags, 0x200);
        assert_eq!(urb.length, 64);
        assert!(urb.data.is_empty());
        assert_eq!(
            urb.setup,
            Some(SetupPacket([
                0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x40, 0x00
            ]))
        );
        assert_eq!(urb.iso, None);
    }
}

#[test]
fn answers_the_first_submit_with_the_descriptor() {
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&hex(KERNEL_FIRST_SUBMIT));
    drain(&mut session);
    let descriptor = device().device_descriptor;
    session.on_completion(completed_in(1, descriptor.clone()));
    let actions = drain(&mut session);
    let pdus = returns(&kernel_bytes(&actions), &[(1, Direction::In, 64)]);
    let (seq, status, transferred) = ret_submit_of(&pdus[0]);
    assert_eq!((seq, status), (1, UrbStatus::Ok));
    assert_eq!(transferred, &Transferred::In(descriptor));
    let stats = session.stats();
    assert_eq!(
        (stats.submitted, stats.completed, stats.bytes_in),
        (1, 1, 18)
    );
}

#[test]
fn many_urbs_complete_in_any_order() {
    let mut session = PortSession::new(&device());
    let n = 40u32;
    let mut script = Vec::new();
    for seq in 1..=n {
        if seq % 2 == 0 {
            script.extend(bulk_in(seq, 512));
        } else {
            let data = vec![seq as u8; seq as usize * 3];
            script.extend(submit_pdu(seq, 2, SubmitBuffer::Out(data), [0; 8], None));
        }
    }
    session.on_kernel_bytes(&script);
    let submits = drain(&mut session);
    assert_eq!(submits.len(), n as usize);
    for (i, a) in submits.iter().enumerate() {
        let Action::Submit { urb, direction, .. } = a else {
            panic!("{a:?}")
        };
        assert_eq!(urb.id, UrbId(i as u32 + 1));
        assert_eq!(urb.transfer_type, TransferType::Bulk);
        assert_eq!(urb.setup, None);
        assert_eq!(
            urb.flags & 0x0004,
            0,
            "DMA-mapping flags stay on this machine"
        );
        assert_eq!(*direction, urb.direction);
    }
    assert_eq!(session.in_flight(), n as usize);

    // Completions in a scrambled order: every one still becomes its own RET_SUBMIT.
    let order: Vec<u32> = (1..=n).map(|i| (i * 17) % n + 1).collect();
    assert_eq!(order.iter().collect::<HashSet<_>>().len(), n as usize);
    let mut out = Vec::new();
    for &seq in &order {
        if seq % 2 == 0 {
            session.on_completion(completed_in(seq, vec![!(seq as u8); seq as usize]));
        } else {
            session.on_completion(UrbComplete {
                actual_length: seq * 3,
                ..completed_with(seq, UrbStatus::Ok)
            });
        }
        out.extend(kernel_bytes(&drain(&mut session)));
    }
    let expectations: Vec<_> = (1..=n)
        .map(|s| match s % 2 {
            0 => (s, Direction::In, 512),
            _ => (s, Direction::Out, s * 3),
        })
        .collect();
    let pdus = returns(&out, &expectations);
    let seen: Vec<u32> = pdus.iter().map(|p| ret_submit_of(p).0).collect();
    assert_eq!(seen, order);
    for p in &pdus {
        let (seq, _, transferred) = ret_submit_of(p);
        match seq % 2 {
            0 => assert_eq!(
                transferred,
                &Transferred::In(vec![!(seq as u8); seq as usize])
            ),
            _ => assert_eq!(transferred, &Transferred::Out(seq * 3)),
        }
    }
    assert_eq!(session.in_flight(), 0);
    let stats = session.stats();
    assert_eq!(stats.submitted, u64::from(n));
    assert_eq!(stats.completed, u64::from(n));
    assert_eq!(
        stats.bytes_out,
        (1..=n)
            .filter(|s| s % 2 == 1)
            .map(|s| u64::from(s) * 3)
            .sum::<u64>()
    );
}

#[test]
fn unlink_before_completion_cancels_without_a_ret_submit() {
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&bulk_in(5, 512));
    drain(&mut session);
    session.on_kernel_bytes(&unlink_pdu(6, 5));
    assert_eq!(
        drain(&mut session),
        vec![Action::Unlink {
            endpoint: ep(1),
            direction: Direction::In,
            id: UrbId(5),
        }]
    );
    session.on_completion(completed_with(5, UrbStatus::Unlinked));
    let pdus = returns(&kernel_bytes(&drain(&mut session)), &[]);
    assert_eq!(pdus.len(), 1);
    assert_eq!(ret_unlink_of(&pdus[0]), (6, ECONNRESET));
    // The server's confirmation and any repeated completion change nothing.
    session.on_unlink_done(UrbId(5), true);
    session.on_completion(completed_in(5, vec![1; 10]));
    assert!(drain(&mut session).is_empty());
    assert_eq!(session.stats().unlinked, 1);
    assert_eq!(session.stats().stray_completions, 1);
}

#[test]
fn completion_that_beat_the_unlink_keeps_its_data_then_unlink_status_0() {
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&bulk_in(5, 512));
    drain(&mut session);
    session.on_kernel_bytes(&unlink_pdu(6, 5));
    drain(&mut session);
    session.on_completion(completed_in(5, vec![0xab; 300]));
    let pdus = returns(
        &kernel_bytes(&drain(&mut session)),
        &[(5, Direction::In, 512)],
    );
    assert_eq!(pdus.len(), 2);
    let (seq, status, transferred) = ret_submit_of(&pdus[0]);
    assert_eq!((seq, status), (5, UrbStatus::Ok));
    assert_eq!(transferred, &Transferred::In(vec![0xab; 300]));
    assert_eq!(ret_unlink_of(&pdus[1]), (6, 0));
    session.on_unlink_done(UrbId(5), false);
    assert!(drain(&mut session).is_empty());
}

#[test]
fn unlink_of_an_answered_urb_is_answered_at_once() {
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&bulk_in(5, 512));
    drain(&mut session);
    session.on_completion(completed_in(5, vec![1; 4]));
    drain(&mut session);
    session.on_kernel_bytes(&unlink_pdu(6, 5));
    let actions = drain(&mut session);
    assert!(actions.iter().all(|a| matches!(a, Action::ToKernel(_))));
    let pdus = returns(&kernel_bytes(&actions), &[]);
    assert_eq!(pdus.iter().map(ret_unlink_of).collect::<Vec<_>>(), [(6, 0)]);
}

#[test]
fn an_early_cancelled_unlink_done_settles_the_urb() {
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&bulk_in(5, 512));
    session.on_kernel_bytes(&unlink_pdu(6, 5));
    drain(&mut session);
    session.on_unlink_done(UrbId(5), true);
    let pdus = returns(&kernel_bytes(&drain(&mut session)), &[]);
    assert_eq!(ret_unlink_of(&pdus[0]), (6, ECONNRESET));
    session.on_completion(completed_in(5, vec![1; 4]));
    assert!(
        drain(&mut session).is_empty(),
        "no RET_SUBMIT after the unlink"
    );
}

#[test]
fn bad_kernel_bytes_close_the_port() {
    let mut bad_command = hex(KERNEL_FIRST_SUBMIT);
    bad_command[3] = 9;
    let mut bad_direction = hex(KERNEL_FIRST_SUBMIT);
    bad_direction[15] = 2;
    let mut a_return = hex(KERNEL_FIRST_SUBMIT);
    a_return[3] = 3;
    let mut too_long = hex(KERNEL_FIRST_SUBMIT);
    too_long[24..28].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    for (bytes, expected) in [
        (bad_command, UrbError::UnknownCommand(9)),
        (bad_direction, UrbError::BadDirection(2)),
        (a_return, UrbError::UnexpectedCommand(3)),
        (
            too_long,
            UrbError::TooLong {
                len: 0x7fff_ffff,
                max: 4 * 1024 * 1024,
            },
        ),
    ] {
        let mut session = PortSession::new(&device());
        session.on_kernel_bytes(&bytes);
        assert_eq!(
            drain(&mut session),
            vec![Action::Close(CloseReason::Kernel(expected))]
        );
        assert!(session.is_closed());
        session.on_kernel_bytes(&hex(KERNEL_FIRST_SUBMIT));
        session.on_completion(completed_in(1, vec![]));
        assert!(
            drain(&mut session).is_empty(),
            "a closed session stays quiet"
        );
    }
}

#[test]
fn a_reused_seqnum_closes_the_port() {
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&[bulk_in(5, 512), bulk_in(5, 512)].concat());
    let actions = drain(&mut session);
    assert_eq!(
        actions.last(),
        Some(&Action::Close(CloseReason::DuplicateSeqnum(5)))
    );
}

#[test]
fn out_of_bounds_completions_close_the_port() {
    let cases: Vec<(Vec<u8>, UrbComplete, BadCompletion)> = vec![
        (
            bulk_in(1, 16),
            completed_in(1, vec![0; 17]),
            BadCompletion::TooLong {
                actual: 17,
                buffer: 16,
            },
        ),
        (
            bulk_in(1, 16),
            UrbComplete {
                actual_length: 9,
                ..completed_in(1, vec![0; 8])
            },
            BadCompletion::LengthMismatch { data: 8, actual: 9 },
        ),
        (
            submit_pdu(1, 2, SubmitBuffer::Out(vec![1; 8]), [0; 8], None),
            UrbComplete {
                actual_length: 9,
                ..completed_with(1, UrbStatus::Ok)
            },
            BadCompletion::TooLong {
                actual: 9,
                buffer: 8,
            },
        ),
        (
            bulk_in(1, 16),
            UrbComplete {
                iso: Some(IsoComplete {
                    start_frame: 0,
                    error_count: 0,
                    packets: vec![],
                }),
                ..completed_in(1, vec![])
            },
            BadCompletion::UnexpectedIso,
        ),
    ];
    for (submit, completion, problem) in cases {
        let mut session = PortSession::new(&device());
        session.on_kernel_bytes(&submit);
        drain(&mut session);
        session.on_completion(completion);
        assert_eq!(
            drain(&mut session),
            vec![Action::Close(CloseReason::BadCompletion { id: 1, problem })]
        );
    }
}

#[test]
fn an_unknown_endpoint_stalls_locally() {
    let mut session = PortSession::new(&device());
    // ep 3 IN exists only in configuration 2; ep 1 OUT exists nowhere.
    session.on_kernel_bytes(&submit_pdu(1, 3, SubmitBuffer::In(8), [0; 8], None));
    session.on_kernel_bytes(&submit_pdu(
        2,
        1,
        SubmitBuffer::Out(vec![1, 2]),
        [0; 8],
        None,
    ));
    let actions = drain(&mut session);
    assert!(actions.iter().all(|a| matches!(a, Action::ToKernel(_))));
    let pdus = returns(
        &kernel_bytes(&actions),
        &[(1, Direction::In, 8), (2, Direction::Out, 2)],
    );
    let got: Vec<_> = pdus
        .iter()
        .map(|p| (ret_submit_of(p).0, ret_submit_of(p).1))
        .collect();
    assert_eq!(got, [(1, UrbStatus::Stall), (2, UrbStatus::Stall)]);
    assert_eq!(session.stats().answered_locally, 2);
    assert_eq!(session.in_flight(), 0);
}

/// SET_CONFIGURATION(2) as the kernel's ep0 CMD_SUBMIT carries it.
const SET_CONFIGURATION_2: [u8; 8] = [0x00, 0x09, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00];
/// SET_INTERFACE(interface 0, alternate 1).
const SET_INTERFACE_0_1: [u8; 8] = [0x01, 0x0b, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00];

fn control_out(session: &mut PortSession, seqnum: u32, setup: [u8; 8], status: UrbStatus) {
    session.on_kernel_bytes(&submit_pdu(
        seqnum,
        0,
        SubmitBuffer::Out(vec![]),
        setup,
        None,
    ));
    drain(session);
    session.on_completion(completed_with(seqnum, status));
    drain(session);
}

fn first_action(session: &mut PortSession, bytes: &[u8]) -> Action {
    session.on_kernel_bytes(bytes);
    drain(session).remove(0)
}

#[test]
fn stale_setup_bytes_on_a_bulk_endpoint_are_ignored() {
    let mut session = PortSession::new(&device());
    // A bulk URB whose buffer last held SET_CONFIGURATION(2).
    let action = first_action(
        &mut session,
        &submit_pdu(1, 1, SubmitBuffer::In(512), SET_CONFIGURATION_2, None),
    );
    let Action::Submit { urb, .. } = action else {
        panic!("{action:?}")
    };
    assert_eq!(urb.transfer_type, TransferType::Bulk);
    assert_eq!(urb.setup, None);
    session.on_completion(completed_in(1, vec![0; 13]));
    drain(&mut session);
    // The table did not move: ep 1 still forwards, ep 3 still stalls.
    assert!(matches!(
        first_action(&mut session, &bulk_in(2, 512)),
        Action::Submit { .. }
    ));
    assert!(matches!(
        first_action(
            &mut session,
            &submit_pdu(3, 3, SubmitBuffer::In(8), [0; 8], None)
        ),
        Action::ToKernel(_)
    ));
}

#[test]
fn set_configuration_and_set_interface_move_the_endpoint_table() {
    let mut session = PortSession::new(&device());
    // A refused SET_CONFIGURATION changes nothing.
    control_out(&mut session, 1, SET_CONFIGURATION_2, UrbStatus::Stall);
    assert!(matches!(
        first_action(&mut session, &bulk_in(2, 512)),
        Action::Submit { .. }
    ));

    control_out(&mut session, 3, SET_CONFIGURATION_2, UrbStatus::Ok);
    let action = first_action(
        &mut session,
        &submit_pdu(4, 3, SubmitBuffer::In(8), [0; 8], None),
    );
    let Action::Submit { urb, .. } = action else {
        panic!("{action:?}")
    };
    assert_eq!(urb.transfer_type, TransferType::Interrupt);
    // Configuration 1's bulk endpoint is gone.
    assert!(matches!(
        first_action(&mut session, &bulk_in(5, 512)),
        Action::ToKernel(_)
    ));

    control_out(&mut session, 6, SET_INTERFACE_0_1, UrbStatus::Ok);
    let packets = vec![
        IsoPacket {
            offset: 0,
            length: 192,
            actual_length: 0,
            status: UrbStatus::Ok,
        },
        IsoPacket {
            offset: 192,
            length: 192,
            actual_length: 0,
            status: UrbStatus::Ok,
        },
    ];
    let action = first_action(
        &mut session,
        &submit_pdu(7, 4, SubmitBuffer::In(384), [0; 8], Some(packets.clone())),
    );
    let Action::Submit { urb, .. } = action else {
        panic!("{action:?}")
    };
    assert_eq!(urb.transfer_type, TransferType::Isochronous);
    assert_eq!(urb.iso.as_ref().map(|i| &i.packets), Some(&packets));

    // The iso completion goes back packed, with the kernel's own offsets.
    session.on_completion(UrbComplete {
        iso: Some(IsoComplete {
            start_frame: 42,
            error_count: 1,
            packets: vec![
                IsoPacket {
                    offset: 999,
                    length: 192,
                    actual_length: 100,
                    status: UrbStatus::Ok,
                },
                IsoPacket {
                    offset: 999,
                    length: 192,
                    actual_length: 0,
                    status: UrbStatus::Overflow,
                },
            ],
        }),
        ..completed_in(7, vec![5; 100])
    });
    let pdus = returns(
        &kernel_bytes(&drain(&mut session)),
        &[(7, Direction::In, 384)],
    );
    let Pdu::RetSubmit(ret) = &pdus[0] else {
        panic!("{pdus:?}")
    };
    assert_eq!(ret.start_frame, 42);
    assert_eq!(ret.error_count, 1);
    let iso = ret.iso.as_ref().unwrap();
    assert_eq!((iso[0].offset, iso[0].actual_length), (0, 100));
    assert_eq!((iso[1].offset, iso[1].status), (192, UrbStatus::Overflow));
}

#[test]
fn an_iso_urb_that_failed_whole_still_returns_every_packet() {
    let mut session = PortSession::new(&device());
    control_out(&mut session, 1, SET_CONFIGURATION_2, UrbStatus::Ok);
    control_out(&mut session, 2, SET_INTERFACE_0_1, UrbStatus::Ok);
    let packets: Vec<IsoPacket> = (0..3)
        .map(|i| IsoPacket {
            offset: i * 64,
            length: 64,
            actual_length: 0,
            status: UrbStatus::Ok,
        })
        .collect();
    session.on_kernel_bytes(&submit_pdu(
        3,
        4,
        SubmitBuffer::In(192),
        [0; 8],
        Some(packets),
    ));
    drain(&mut session);
    session.on_completion(completed_with(3, UrbStatus::NoDevice));
    let pdus = returns(
        &kernel_bytes(&drain(&mut session)),
        &[(3, Direction::In, 192)],
    );
    let Pdu::RetSubmit(ret) = &pdus[0] else {
        panic!("{pdus:?}")
    };
    assert_eq!(ret.iso.as_ref().map(Vec::len), Some(3));
    assert_eq!(ret.error_count, 3);

    // Iso on a bulk endpoint (or none on an iso one) is refused locally.
    session.on_kernel_bytes(&submit_pdu(4, 4, SubmitBuffer::In(192), [0; 8], None));
    let pdus = returns(
        &kernel_bytes(&drain(&mut session)),
        &[(4, Direction::In, 192)],
    );
    assert_eq!(ret_submit_of(&pdus[0]).1, UrbStatus::Invalid);
}

// ---- a model of vhci and the server, for random interleavings ----

/// What vhci does with our answers, failing where the real one would kill the port or give
/// a URB back wrongly.
struct VhciModel {
    decoder: PduDecoder,
    next_seqnum: u32,
    /// URBs vhci holds, with what an IN completion must carry.
    pending: HashMap<u32, Direction>,
    /// URBs vhci has asked to unlink (it never asks twice).
    unlinking: HashSet<u32>,
    /// CMD_UNLINK seqnum -> target.
    unlinks: HashMap<u32, u32>,
    given_back: HashMap<u32, UrbStatus>,
    in_data: HashMap<u32, Vec<u8>>,
}

impl VhciModel {
    fn new() -> Self {
        VhciModel {
            decoder: PduDecoder::returns(),
            next_seqnum: 1,
            pending: HashMap::new(),
            unlinking: HashSet::new(),
            unlinks: HashMap::new(),
            given_back: HashMap::new(),
            in_data: HashMap::new(),
        }
    }

    fn submit(&mut self, kind: u8) -> Vec<u8> {
        let seq = self.next_seqnum;
        self.next_seqnum += 1;
        let (direction, bytes, len) = match kind % 5 {
            0 => (Direction::In, bulk_in(seq, 64), 64),
            1 => (
                Direction::Out,
                submit_pdu(seq, 2, SubmitBuffer::Out(vec![seq as u8; 32]), [0; 8], None),
                32,
            ),
            // A write's CBW: answered at once, its server completion dropped.
            2 => (Direction::Out, cbw_pdu(seq, 512, Direction::Out), 31),
            // A read's CBW: answered at once, its data and CSW read ahead behind it (the bulk
            // reads above then take them, or miss them and turn read-ahead off).
            3 => (Direction::Out, cbw_pdu(seq, 64, Direction::In), 31),
            _ => (
                Direction::In,
                submit_pdu(
                    seq,
                    0,
                    SubmitBuffer::In(18),
                    [0x80, 6, 0, 1, 0, 0, 18, 0],
                    None,
                ),
                64,
            ),
        };
        self.decoder.expect_return(seq, direction, len).unwrap();
        self.pending.insert(seq, direction);
        bytes
    }

    /// Unlinks a URB vhci still holds and has not unlinked yet, if any.
    fn unlink(&mut self, pick: usize) -> Option<Vec<u8>> {
        let mut candidates: Vec<u32> = self
            .pending
            .keys()
            .copied()
            .filter(|s| !self.unlinking.contains(s))
            .collect();
        candidates.sort_unstable();
        let target = *candidates.get(pick % candidates.len().max(1))?;
        let seq = self.next_seqnum;
        self.next_seqnum += 1;
        self.unlinking.insert(target);
        self.unlinks.insert(seq, target);
        Some(unlink_pdu(seq, target))
    }

    fn receive(&mut self, bytes: &[u8]) {
        self.decoder.push(bytes);
        loop {
            let pdu = match self.decoder.next_pdu() {
                Ok(Some(pdu)) => pdu,
                Ok(None) => break,
                Err(e) => panic!("vhci would kill the port: {e}"),
            };
            match pdu {
                Pdu::RetSubmit(r) => {
                    assert!(
                        self.pending.remove(&r.seqnum).is_some(),
                        "RET_SUBMIT {} for a URB vhci no longer holds",
                        r.seqnum
                    );
                    self.given_back.insert(r.seqnum, r.status);
                    if let Transferred::In(data) = r.transferred {
                        self.in_data.insert(r.seqnum, data);
                    }
                }
                Pdu::RetUnlink(r) => {
                    let target = self
                        .unlinks
                        .remove(&r.seqnum)
                        .expect("RET_UNLINK for an unknown CMD_UNLINK");
                    match r.status {
                        UrbStatus::Unlinked => {
                            assert!(
                                self.pending.remove(&target).is_some(),
                                "-ECONNRESET for URB {target} that was already answered"
                            );
                            self.decoder.forget_return(target);
                            self.given_back.insert(target, UrbStatus::Unlinked);
                        }
                        UrbStatus::Ok => assert!(
                            !self.pending.contains_key(&target),
                            "RET_UNLINK(0) would give URB {target} back as an empty success"
                        ),
                        other => panic!("unexpected RET_UNLINK status {other:?}"),
                    }
                }
                other => panic!("{other:?} sent to vhci"),
            }
        }
    }
}

/// A server that runs URBs and answers unlinks in its stream order: a completion always
/// before the matching UnlinkDone.
#[derive(Default)]
struct ServerModel {
    inbox: Vec<Action>,
    running: Vec<(u32, Direction, u32)>,
    outbox: Vec<ServerMsg>,
    done: HashSet<u32>,
}

#[derive(Debug, Clone)]
enum ServerMsg {
    Complete(UrbComplete),
    UnlinkDone(u32, bool),
}

impl ServerModel {
    fn take_action(&mut self) {
        if self.inbox.is_empty() {
            return;
        }
        match self.inbox.remove(0) {
            Action::Submit { urb, .. } => self.running.push((urb.id.0, urb.direction, urb.length)),
            Action::Unlink { id, .. } => {
                if let Some(i) = self.running.iter().position(|(s, _, _)| *s == id.0) {
                    self.running.remove(i);
                    self.outbox.push(ServerMsg::Complete(completed_with(
                        id.0,
                        UrbStatus::Unlinked,
                    )));
                    self.outbox.push(ServerMsg::UnlinkDone(id.0, true));
                } else {
                    assert!(self.done.contains(&id.0), "unlink of a URB never submitted");
                    self.outbox.push(ServerMsg::UnlinkDone(id.0, false));
                }
            }
            other => panic!("{other:?} sent to the server"),
        }
    }

    fn complete(&mut self, pick: usize) {
        if self.running.is_empty() {
            return;
        }
        let (id, direction, length) = self.running.remove(pick % self.running.len());
        self.done.insert(id);
        let completion = match direction {
            Direction::In => completed_in(id, vec![id as u8; (id % 18) as usize]),
            Direction::Out => UrbComplete {
                actual_length: length,
                ..completed_with(id, UrbStatus::Ok)
            },
        };
        self.outbox.push(ServerMsg::Complete(completion));
    }
}

fn run_interleaving(ops: &[(u8, u8)]) {
    let mut kernel = VhciModel::new();
    let mut server = ServerModel::default();
    let mut session = PortSession::new(&device());
    let mut to_kernel: Vec<u8> = Vec::new();
    let step = |session: &mut PortSession, server: &mut ServerModel, to_kernel: &mut Vec<u8>| {
        while let Some(action) = session.poll_action() {
            match action {
                Action::ToKernel(bytes) => to_kernel.extend(bytes),
                Action::Close(reason) => panic!("session closed: {reason}"),
                other => server.inbox.push(other),
            }
        }
    };
    for &(op, arg) in ops {
        match op % 6 {
            0 => session.on_kernel_bytes(&kernel.submit(arg)),
            1 => {
                if let Some(bytes) = kernel.unlink(arg.into()) {
                    session.on_kernel_bytes(&bytes);
                }
            }
            // The kernel reads what we wrote only now: its unlinks race our answers.
            2 => kernel.receive(&std::mem::take(&mut to_kernel)),
            3 => server.take_action(),
            4 => server.complete(arg.into()),
            _ => {
                if !server.outbox.is_empty() {
                    match server.outbox.remove(0) {
                        ServerMsg::Complete(c) => session.on_completion(c),
                        ServerMsg::UnlinkDone(id, cancelled) => {
                            session.on_unlink_done(UrbId(id), cancelled)
                        }
                    }
                }
            }
        }
        step(&mut session, &mut server, &mut to_kernel);
    }
    // Let everything settle: the server finishes all URBs and every message is delivered.
    loop {
        step(&mut session, &mut server, &mut to_kernel);
        kernel.receive(&std::mem::take(&mut to_kernel));
        if !server.inbox.is_empty() {
            server.take_action();
        } else if !server.running.is_empty() {
            server.complete(0);
        } else if !server.outbox.is_empty() {
            match server.outbox.remove(0) {
                ServerMsg::Complete(c) => session.on_completion(c),
                ServerMsg::UnlinkDone(id, cancelled) => {
                    session.on_unlink_done(UrbId(id), cancelled)
                }
            }
        } else {
            break;
        }
    }
    assert!(
        kernel.pending.is_empty(),
        "URBs never given back: {:?}",
        kernel.pending
    );
    assert!(kernel.unlinks.is_empty(), "unlinks never answered");
    assert_eq!(session.in_flight(), 0);
    // A URB that completed for real keeps its data even when an unlink raced it: its own, or
    // that of the read-ahead it took (ids from the top of the range down, so its low byte
    // names it).
    for (seq, data) in &kernel.in_data {
        if kernel.given_back[seq] == UrbStatus::Ok && !data.is_empty() {
            let ahead = 0xffff_ff00 | u32::from(data[0]);
            if data != &vec![*seq as u8; (*seq % 18) as usize] {
                assert_eq!(data, &vec![ahead as u8; (ahead % 18) as usize], "URB {seq}");
            }
        }
    }
}

#[test]
fn a_scripted_interleaving_with_every_race() {
    run_interleaving(&[
        // Three URBs reach the server.
        (0, 0),
        (0, 1),
        (0, 2),
        (3, 0),
        (3, 0),
        (3, 0),
        // The kernel unlinks URB 1; the server completes it before reading the unlink.
        (1, 0),
        (4, 0),
        (3, 0),
        // The completion, then UnlinkDone(false): RET_SUBMIT 1, then RET_UNLINK(0).
        (5, 0),
        (5, 0),
        // URB 2 is unlinked and cancelled: Complete(Unlinked), UnlinkDone(true).
        (1, 0),
        (3, 0),
        (5, 0),
        (5, 0),
        // URB 3 completes and its RET_SUBMIT is queued, but the kernel unlinks it before
        // reading it.
        (4, 0),
        (5, 0),
        (1, 0),
        (2, 0),
    ]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the order of submits, unlinks, server completions and deliveries: no
    /// RET_SUBMIT after an unlinking RET_UNLINK (or for any URB vhci no longer holds), no
    /// RET_UNLINK(0) for a URB vhci still holds, and every URB and unlink answered once.
    #[test]
    fn random_interleavings_keep_vhci_alive(
        ops in prop::collection::vec((any::<u8>(), any::<u8>()), 0..160)
    ) {
        run_interleaving(&ops);
    }
}

fn out_done(id: u32, actual: u32) -> UrbComplete {
    UrbComplete {
        actual_length: actual,
        ..completed_with(id, UrbStatus::Ok)
    }
}

/// The URB each read-ahead on 0x81 IN must follow on the server.
fn read_ahead_after(actions: &[Action]) -> Vec<Option<UrbId>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Submit {
                endpoint,
                direction: Direction::In,
                after,
                ..
            } if *endpoint == ep(1) => Some(*after),
            _ => None,
        })
        .collect()
}

/// Whether the kernel's URB `seqnum` went to the server as a plain submission.
fn sent_as_its_own(actions: &[Action], seqnum: u32) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::Submit { urb, after: None, .. } if urb.id == UrbId(seqnum)))
}

/// What the kernel URB `seqnum`, sent to the server, waits on there: `None` if not sent.
fn sent_after(actions: &[Action], seqnum: u32) -> Option<Option<UrbId>> {
    actions.iter().find_map(|a| match a {
        Action::Submit { urb, after, .. } if urb.id == UrbId(seqnum) => Some(*after),
        _ => None,
    })
}

/// The ids and lengths of the URBs sent to the server on 0x81 IN.
fn read_ahead_ids(actions: &[Action]) -> Vec<(u32, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Submit {
                endpoint,
                direction: Direction::In,
                urb,
                ..
            } if *endpoint == ep(1) => Some((urb.id.0, urb.length)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_read_costs_one_round_trip_its_data_and_status_come_from_read_ahead() {
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&cbw_pdu(10, 4096, Direction::In));
    let actions = drain(&mut session);
    assert_eq!(sent_after(&actions, 10), Some(None));
    // The CBW is answered at once: its phases cannot pass it on the server.
    returns(&kernel_bytes(&actions), &[(10, Direction::Out, 31)]);
    let ahead = read_ahead_ids(&actions);
    assert_eq!(
        ahead.len(),
        2,
        "data and CSW are queued with the CBW: {actions:?}"
    );
    assert_eq!((ahead[0].1, ahead[1].1), (4096, 13));
    assert_eq!(
        read_ahead_after(&actions),
        vec![Some(UrbId(10)), Some(UrbId(ahead[0].0))],
        "on the server, the data waits for the CBW and the CSW for the data"
    );
    let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    // The kernel's data URB takes the running read-ahead while the CBW is still out.
    session.on_kernel_bytes(&storage_in(11, 4096, true));
    assert!(drain(&mut session).is_empty(), "bound, nothing sent");
    session.on_completion(out_done(10, 31));
    assert!(
        kernel_bytes(&drain(&mut session)).is_empty(),
        "the CBW's own completion is dropped: the kernel had its answer"
    );
    session.on_completion(completed_in(ahead[0].0, data.clone()));
    session.on_completion(completed_in(ahead[1].0, vec![0x53; 13]));
    // The CSW URB is answered at once, without the server.
    session.on_kernel_bytes(&storage_in(12, 13, false));
    let actions = drain(&mut session);
    assert!(
        actions.iter().all(|a| matches!(a, Action::ToKernel(_))),
        "{actions:?}"
    );
    let pdus = returns(
        &kernel_bytes(&actions),
        &[(11, Direction::In, 4096), (12, Direction::In, 13)],
    );
    assert_eq!(
        ret_submit_of(&pdus[0]),
        (11, UrbStatus::Ok, &Transferred::In(data))
    );
    assert_eq!(
        ret_submit_of(&pdus[1]),
        (12, UrbStatus::Ok, &Transferred::In(vec![0x53; 13]))
    );
    assert_eq!(session.stats().read_ahead.hits, 2);
    assert_eq!(session.in_flight(), 0);
    let stats = session.stats();
    assert_eq!(
        (stats.submitted, stats.completed),
        (3, 3),
        "URBs answered by read-ahead count as taken and completed"
    );
    assert_eq!((stats.read_cbws_ahead, stats.cbws_failed_late), (1, 0));
}

#[test]
fn a_write_reads_its_status_ahead_behind_its_last_data_urb() {
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&cbw_pdu(20, 8192, Direction::Out));
    let actions = drain(&mut session);
    assert!(
        read_ahead_ids(&actions).is_empty(),
        "nothing is read before the data is sent: {actions:?}"
    );
    assert!(sent_as_its_own(&actions, 20), "the CBW goes to the device");
    let pdus = returns(&kernel_bytes(&actions), &[(20, Direction::Out, 31)]);
    assert_eq!(
        ret_submit_of(&pdus[0]),
        (20, UrbStatus::Ok, &Transferred::Out(31)),
        "and is answered at once, so the data follows it without a round trip"
    );
    // The data phase in two URBs: the CSW is read ahead behind the second.
    let data = SubmitBuffer::Out(vec![0xa5; 4096]);
    session.on_kernel_bytes(&submit_pdu(21, 2, data.clone(), [0; 8], None));
    assert!(read_ahead_ids(&drain(&mut session)).is_empty());
    session.on_kernel_bytes(&submit_pdu(22, 2, data, [0; 8], None));
    let actions = drain(&mut session);
    let ahead = read_ahead_ids(&actions);
    assert_eq!(ahead.iter().map(|a| a.1).collect::<Vec<_>>(), vec![13]);
    assert_eq!(read_ahead_after(&actions), vec![Some(UrbId(22))]);
    // The CBW's own completion is dropped: vhci has had its answer.
    session.on_completion(out_done(20, 31));
    assert!(kernel_bytes(&drain(&mut session)).is_empty());
    for (id, len) in [(21, 4096), (22, 4096)] {
        session.on_completion(out_done(id, len));
    }
    session.on_completion(completed_in(ahead[0].0, vec![0x53; 13]));
    returns(
        &kernel_bytes(&drain(&mut session)),
        &[(21, Direction::Out, 4096), (22, Direction::Out, 4096)],
    );
    // The kernel's CSW read is answered without the server.
    session.on_kernel_bytes(&storage_in(23, 13, false));
    let actions = drain(&mut session);
    assert!(
        actions.iter().all(|a| matches!(a, Action::ToKernel(_))),
        "{actions:?}"
    );
    assert_eq!(session.stats().read_ahead.hits, 1);
    assert_eq!(session.in_flight(), 0);
    let stats = session.stats();
    assert_eq!((stats.submitted, stats.completed), (4, 4));
    assert_eq!((stats.write_cbws_ahead, stats.cbws_failed_late), (1, 0));
}

#[test]
fn a_write_cbw_the_device_refuses_after_its_answer_leaves_the_data_phase_to_fail() {
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&cbw_pdu(20, 4096, Direction::Out));
    drain(&mut session);
    session.on_kernel_bytes(&submit_pdu(
        21,
        2,
        SubmitBuffer::Out(vec![0xa5; 4096]),
        [0; 8],
        None,
    ));
    drain(&mut session);
    // The device stalls the CBW, then the data on its halted endpoint: the kernel hears of the
    // second, once, and runs its recovery from there.
    session.on_completion(completed_with(20, UrbStatus::Stall));
    assert!(kernel_bytes(&drain(&mut session)).is_empty());
    session.on_completion(completed_with(21, UrbStatus::Stall));
    let pdus = returns(
        &kernel_bytes(&drain(&mut session)),
        &[(21, Direction::Out, 4096)],
    );
    assert_eq!(
        ret_submit_of(&pdus[0]),
        (21, UrbStatus::Stall, &Transferred::Out(0))
    );
    assert_eq!(session.stats().cbws_failed_late, 1);
    assert_eq!(session.in_flight(), 0);
}

#[test]
fn a_read_cbw_the_device_refuses_after_its_answer_fails_the_kernels_next_urb_once() {
    // The CBW failed on the device, so the server never ran what followed it: both come back
    // Unlinked with nothing moved. The kernel, told the CBW went, reads its data: that read
    // fails at once with a transport error (usb-storage resets the device), and after the
    // reset's control request the port forwards as usual.
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&cbw_pdu(30, 512, Direction::In));
    let ahead = read_ahead_ids(&drain(&mut session));
    session.on_completion(completed_with(30, UrbStatus::Stall));
    session.on_completion(completed_with(ahead[0].0, UrbStatus::Unlinked));
    session.on_completion(completed_with(ahead[1].0, UrbStatus::Unlinked));
    assert!(kernel_bytes(&drain(&mut session)).is_empty());
    session.on_kernel_bytes(&storage_in(31, 512, true));
    let pdus = returns(
        &kernel_bytes(&drain(&mut session)),
        &[(31, Direction::In, 512)],
    );
    assert_eq!(
        ret_submit_of(&pdus[0]),
        (31, UrbStatus::Protocol, &Transferred::In(Vec::new()))
    );
    assert_eq!(session.stats().cbws_failed_late, 1);
    // Only once: the next read goes to the server.
    session.on_kernel_bytes(&storage_in(32, 13, false));
    assert!(sent_as_its_own(&drain(&mut session), 32));
}

#[test]
fn a_kernel_read_sent_on_its_own_waits_on_a_cbw_answered_ahead() {
    // The kernel's data URB does not match the read-ahead (read-ahead turns off for the
    // port): it goes to the server itself, still behind the CBW the kernel was told had gone.
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&cbw_pdu(50, 4096, Direction::In));
    let ahead = read_ahead_ids(&drain(&mut session));
    session.on_kernel_bytes(&storage_in(51, 2048, true));
    assert_eq!(
        sent_after(&drain(&mut session), 51),
        None,
        "it waits for the cancel"
    );
    session.on_completion(completed_with(ahead[0].0, UrbStatus::Unlinked));
    session.on_completion(completed_with(ahead[1].0, UrbStatus::Unlinked));
    let actions = drain(&mut session);
    assert_eq!(
        sent_after(&actions, 51),
        Some(Some(UrbId(50))),
        "{actions:?}"
    );
    // Once the CBW has completed, nothing waits on it.
    session.on_completion(out_done(50, 31));
    session.on_completion(completed_in(51, vec![1; 2048]));
    drain(&mut session);
    session.on_kernel_bytes(&storage_in(52, 13, false));
    let actions = drain(&mut session);
    assert_eq!(sent_after(&actions, 52), Some(None), "{actions:?}");
}

#[test]
fn a_kernel_urb_on_a_refused_read_ahead_goes_to_the_server_itself() {
    // The kernel's read took over a speculation that the server then never ran (the URB
    // before it failed, as far as this port knows yet): the read is sent as its own URB, not
    // answered -ECONNRESET, behind the CBW answered ahead (the server refuses it too if the
    // CBW failed, and usb-storage resets).
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&cbw_pdu(40, 512, Direction::In));
    let ahead = read_ahead_ids(&drain(&mut session));
    session.on_kernel_bytes(&storage_in(41, 512, true));
    assert!(
        read_ahead_ids(&drain(&mut session)).is_empty(),
        "bound, not sent"
    );
    session.on_completion(completed_with(ahead[0].0, UrbStatus::Unlinked));
    let actions = drain(&mut session);
    assert_eq!(
        sent_after(&actions, 41),
        Some(Some(UrbId(40))),
        "{actions:?}"
    );
    assert!(
        !actions.iter().any(|a| matches!(a, Action::ToKernel(_))),
        "nothing reached the kernel yet: {actions:?}"
    );
    session.on_completion(out_done(40, 31));
    session.on_completion(completed_in(41, vec![9; 512]));
    let pdus = returns(
        &kernel_bytes(&drain(&mut session)),
        &[(41, Direction::In, 512)],
    );
    assert_eq!(
        ret_submit_of(&pdus[0]),
        (41, UrbStatus::Ok, &Transferred::In(vec![9; 512]))
    );
    let stats = session.stats();
    assert_eq!(stats.submitted, stats.completed);
    assert_eq!(session.in_flight(), 0);
}

#[test]
fn a_kernel_urb_bound_to_a_read_behind_a_refused_cbw_fails_with_a_transport_error() {
    // The kernel's data URB took over the running read-ahead; then the device refuses the CBW
    // answered ahead, and the server the read held behind it: the kernel hears -EPROTO, once.
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&cbw_pdu(60, 512, Direction::In));
    let ahead = read_ahead_ids(&drain(&mut session));
    session.on_kernel_bytes(&storage_in(61, 512, true));
    drain(&mut session);
    session.on_completion(completed_with(60, UrbStatus::Protocol));
    session.on_completion(completed_with(ahead[0].0, UrbStatus::Unlinked));
    let actions = drain(&mut session);
    assert!(!sent_as_its_own(&actions, 61), "{actions:?}");
    let pdus = returns(&kernel_bytes(&actions), &[(61, Direction::In, 512)]);
    assert_eq!(
        ret_submit_of(&pdus[0]),
        (61, UrbStatus::Protocol, &Transferred::In(Vec::new()))
    );
    session.on_completion(completed_with(ahead[1].0, UrbStatus::Unlinked));
    assert!(kernel_bytes(&drain(&mut session)).is_empty());
    assert_eq!(session.in_flight(), 0);
    let stats = session.stats();
    assert_eq!(stats.submitted, stats.completed);
    assert_eq!(stats.cbws_failed_late, 1);
}

#[test]
fn a_kernel_urb_parked_behind_a_read_refused_with_its_cbw_fails_with_a_transport_error() {
    // The kernel's data URB does not match the read-ahead (another length): it waits for the
    // cancelled speculation to settle. Then the device refuses the CBW answered ahead, and the
    // speculation comes back unrun: sent now, the URB would wait on a device with no command.
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&cbw_pdu(70, 512, Direction::In));
    let ahead = read_ahead_ids(&drain(&mut session));
    session.on_kernel_bytes(&storage_in(71, 1024, true));
    let actions = drain(&mut session);
    assert!(!sent_as_its_own(&actions, 71), "parked: {actions:?}");
    session.on_completion(completed_with(70, UrbStatus::Protocol));
    session.on_completion(completed_with(ahead[0].0, UrbStatus::Unlinked));
    let actions = drain(&mut session);
    assert_eq!(sent_after(&actions, 71), None, "{actions:?}");
    let pdus = returns(&kernel_bytes(&actions), &[(71, Direction::In, 1024)]);
    assert_eq!(
        ret_submit_of(&pdus[0]),
        (71, UrbStatus::Protocol, &Transferred::In(Vec::new()))
    );
    session.on_completion(completed_with(ahead[1].0, UrbStatus::Unlinked));
    assert!(kernel_bytes(&drain(&mut session)).is_empty());
    assert_eq!(session.in_flight(), 0);
    assert_eq!(session.stats().cbws_failed_late, 1);
}

#[test]
fn a_kernel_urb_that_took_over_a_read_ahead_can_be_unlinked() {
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&cbw_pdu(10, 512, Direction::In));
    let ahead = read_ahead_ids(&drain(&mut session));
    session.on_completion(out_done(10, 31));
    drain(&mut session);
    // The kernel's data URB arrives while the read-ahead one still runs: it takes it over.
    session.on_kernel_bytes(&storage_in(11, 512, true));
    assert!(drain(&mut session).is_empty());
    assert_eq!(session.in_flight(), 1);
    session.on_kernel_bytes(&unlink_pdu(20, 11));
    assert_eq!(
        drain(&mut session),
        vec![Action::Unlink {
            endpoint: ep(1),
            direction: Direction::In,
            id: UrbId(ahead[0].0),
        }]
    );
    session.on_completion(completed_with(ahead[0].0, UrbStatus::Unlinked));
    let actions = drain(&mut session);
    let pdus = returns(&kernel_bytes(&actions), &[]);
    assert_eq!(pdus.len(), 1);
    assert_eq!(ret_unlink_of(&pdus[0]), (20, ECONNRESET));
    assert_eq!(session.in_flight(), 0);
}

#[test]
fn a_stalled_data_phase_cancels_the_status_read_and_the_kernel_reads_it_itself() {
    let mut session = PortSession::new(&device());
    session.on_kernel_bytes(&cbw_pdu(10, 512, Direction::In));
    let ahead = read_ahead_ids(&drain(&mut session));
    session.on_completion(out_done(10, 31));
    session.on_completion(completed_with(ahead[0].0, UrbStatus::Stall));
    let actions = drain(&mut session);
    assert!(actions.contains(&Action::Unlink {
        endpoint: ep(1),
        direction: Direction::In,
        id: UrbId(ahead[1].0),
    }));
    session.on_kernel_bytes(&storage_in(11, 512, true));
    let pdus = returns(
        &kernel_bytes(&drain(&mut session)),
        &[(11, Direction::In, 512)],
    );
    assert_eq!(ret_submit_of(&pdus[0]).1, UrbStatus::Stall);
    // The kernel's CSW read waits for the cancel; once it took effect the URB goes out.
    session.on_kernel_bytes(&storage_in(12, 13, false));
    assert!(drain(&mut session).is_empty());
    session.on_completion(completed_with(ahead[1].0, UrbStatus::Unlinked));
    let actions = drain(&mut session);
    assert!(
        matches!(&actions[..], [Action::Submit { urb, .. }] if urb.id == UrbId(12)),
        "{actions:?}"
    );
}

/// A READ(10) CBW of `blocks` 512-byte blocks from `lba`, as usb-storage sends it.
fn read10_pdu(seqnum: u32, lba: u32, blocks: u16) -> Vec<u8> {
    let cdb = protocol::scsi::Read {
        lba: lba.into(),
        blocks: blocks.into(),
        long: false,
    }
    .to_cdb()
    .unwrap();
    let cbw = protocol::bot::Cbw::new(seqnum, u32::from(blocks) * 512, true, 0, &cdb)
        .unwrap()
        .to_bytes()
        .to_vec();
    submit_pdu(seqnum, 2, SubmitBuffer::Out(cbw), [0; 8], None)
}

fn csw_of(tag: u32, status: protocol::bot::CswStatus) -> Vec<u8> {
    protocol::bot::Csw {
        tag,
        residue: 0,
        status,
    }
    .to_bytes()
    .to_vec()
}

/// What a disk holds at `lba`: each block filled with its number.
fn blocks_at(lba: u32, blocks: u32) -> Vec<u8> {
    (lba..lba + blocks).flat_map(|b| [b as u8; 512]).collect()
}

/// The CBW bytes the kernel's URB `seqnum` carried to the server.
fn cbw_sent(actions: &[Action], seqnum: u32) -> protocol::bot::Cbw {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Submit { urb, .. } if urb.id == UrbId(seqnum) => {
                Some(protocol::bot::Cbw::parse(&urb.data).unwrap())
            }
            _ => None,
        })
        .expect("the CBW went to the server")
}

/// Runs one READ command from CBW `seqnum` (data URB `seqnum + 1`, CSW `seqnum + 2`) with the
/// device answering what the server is asked, and the CSW status `status`: the kernel's data
/// and CSW results, and the CBW the server got (`None` if none went).
fn run_read(
    session: &mut PortSession,
    seqnum: u32,
    lba: u32,
    blocks: u16,
    status: protocol::bot::CswStatus,
) -> (Pdu, Pdu, Option<protocol::bot::Cbw>) {
    session.on_kernel_bytes(&read10_pdu(seqnum, lba, blocks));
    let actions = drain(session);
    let ahead = read_ahead_ids(&actions);
    let sent = actions
        .iter()
        .any(|a| matches!(a, Action::Submit { urb, .. } if urb.id == UrbId(seqnum)))
        .then(|| cbw_sent(&actions, seqnum));
    let len = u32::from(blocks) * 512;
    session.on_kernel_bytes(&storage_in(seqnum + 1, len, true));
    let mut out = kernel_bytes(&actions);
    out.extend(kernel_bytes(&drain(session)));
    if let Some(cbw) = sent {
        let read = protocol::scsi::Read::parse(cbw.command()).unwrap();
        assert_eq!(ahead[0].1, cbw.data_len, "the data read ahead is the CBW's");
        session.on_completion(out_done(seqnum, 31));
        session.on_completion(completed_in(ahead[0].0, blocks_at(lba, read.blocks)));
        session.on_completion(completed_in(ahead[1].0, csw_of(cbw.tag, status)));
    }
    out.extend(kernel_bytes(&drain(session)));
    session.on_kernel_bytes(&storage_in(seqnum + 2, 13, false));
    out.extend(kernel_bytes(&drain(session)));
    let mut pdus = returns(
        &out,
        &[
            (seqnum, Direction::Out, 31),
            (seqnum + 1, Direction::In, len),
            (seqnum + 2, Direction::In, 13),
        ],
    );
    assert_eq!(pdus.len(), 3, "{pdus:?}");
    assert_eq!(ret_submit_of(&pdus[0]).1, UrbStatus::Ok, "the CBW's answer");
    let csw = pdus.pop().unwrap();
    let data = pdus.pop().unwrap();
    (data, csw, sent)
}

/// A session that has read the disk's capacity (10,000 blocks of 512 bytes) through
/// read-ahead, and widens READs up to 64 KiB.
fn knowing_the_disk() -> PortSession {
    let mut session = PortSession::new(&device()).with_widened_reads(64 * 1024);
    let capacity = protocol::bot::Cbw::new(1, 8, true, 0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap()
        .to_bytes()
        .to_vec();
    session.on_kernel_bytes(&submit_pdu(1, 2, SubmitBuffer::Out(capacity), [0; 8], None));
    let ahead = read_ahead_ids(&drain(&mut session));
    session.on_completion(out_done(1, 31));
    session.on_completion(completed_in(ahead[0].0, vec![0, 0, 0x27, 0x0f, 0, 0, 2, 0]));
    session.on_completion(completed_in(
        ahead[1].0,
        csw_of(1, protocol::bot::CswStatus::Passed),
    ));
    session.on_kernel_bytes(&storage_in(2, 8, true));
    session.on_kernel_bytes(&storage_in(3, 13, false));
    drain(&mut session);
    session
}

#[test]
fn sequential_reads_are_widened_and_the_next_ones_answered_from_the_kept_data() {
    use protocol::bot::CswStatus::Passed;
    let mut session = knowing_the_disk();
    // The first READ goes as the kernel wrote it.
    let (_, _, sent) = run_read(&mut session, 10, 0, 16, Passed);
    assert_eq!(sent.unwrap().data_len, 8192);
    // The second continues it: the device reads 64 KiB, the kernel gets its 8 KiB.
    let (data, csw, sent) = run_read(&mut session, 20, 16, 16, Passed);
    let sent = sent.unwrap();
    assert_eq!((sent.tag, sent.data_len), (20, 65536));
    let read = protocol::scsi::Read::parse(sent.command()).unwrap();
    assert_eq!((read.lba, read.blocks), (16, 128));
    assert_eq!(
        ret_submit_of(&data),
        (21, UrbStatus::Ok, &Transferred::In(blocks_at(16, 16)))
    );
    assert_eq!(
        ret_submit_of(&csw),
        (22, UrbStatus::Ok, &Transferred::In(csw_of(20, Passed)))
    );
    // The next seven are answered here, each with its own tag, and nothing goes out.
    for i in 0..7 {
        let seqnum = 30 + 10 * i;
        let lba = 32 + 16 * i;
        let (data, csw, sent) = run_read(&mut session, seqnum, lba, 16, Passed);
        assert!(sent.is_none(), "READ {seqnum} went to the server");
        assert_eq!(
            ret_submit_of(&data),
            (
                seqnum + 1,
                UrbStatus::Ok,
                &Transferred::In(blocks_at(lba, 16))
            )
        );
        assert_eq!(
            ret_submit_of(&csw),
            (
                seqnum + 2,
                UrbStatus::Ok,
                &Transferred::In(csw_of(seqnum, Passed))
            )
        );
    }
    // Then the device again, widened anew.
    let (_, _, sent) = run_read(&mut session, 100, 144, 16, Passed);
    assert_eq!(sent.unwrap().data_len, 65536);
    let stats = session.stats();
    assert_eq!(
        (
            stats.read_ahead.widened,
            stats.read_ahead.served,
            stats.read_ahead.widen_failed
        ),
        (2, 7, 0)
    );
    assert_eq!(session.in_flight(), 0);
}

#[test]
fn a_widened_read_that_fails_costs_the_kernel_a_transport_error_and_a_plain_retry() {
    use protocol::bot::CswStatus::{Failed, Passed};
    let mut session = knowing_the_disk();
    run_read(&mut session, 10, 0, 16, Passed);
    // The device fails the widened READ (a bad block past the kernel's part, say).
    let (data, csw, sent) = run_read(&mut session, 20, 16, 16, Failed);
    assert_eq!(sent.unwrap().data_len, 65536);
    assert_eq!(ret_submit_of(&data).1, UrbStatus::Ok);
    assert_eq!(
        ret_submit_of(&csw).1,
        UrbStatus::Protocol,
        "a transport error: usb-storage resets and the SCSI layer retries"
    );
    // The reset, then the retry: as the kernel wrote it, and so is every READ after it.
    session.on_kernel_bytes(&submit_pdu(
        25,
        0,
        SubmitBuffer::Out(Vec::new()),
        [0x21, 0xff, 0, 0, 0, 0, 0, 0],
        None,
    ));
    let actions = drain(&mut session);
    session.on_completion(out_done(25, 0));
    assert!(sent_as_its_own(&actions, 25));
    drain(&mut session);
    let (_, _, sent) = run_read(&mut session, 30, 16, 16, Passed);
    assert_eq!(sent.unwrap().data_len, 8192);
    let (_, _, sent) = run_read(&mut session, 40, 32, 16, Passed);
    assert_eq!(sent.unwrap().data_len, 8192);
    assert_eq!(session.stats().read_ahead.widen_failed, 1);
}

#[test]
fn the_kernel_can_unlink_a_widened_reads_data_urb() {
    use protocol::bot::CswStatus::Passed;
    let mut session = knowing_the_disk();
    run_read(&mut session, 10, 0, 16, Passed);
    session.on_kernel_bytes(&read10_pdu(20, 16, 16));
    let ahead = read_ahead_ids(&drain(&mut session));
    assert_eq!(ahead[0].1, 65536);
    session.on_kernel_bytes(&storage_in(21, 8192, true));
    drain(&mut session);
    // The SCSI layer's timeout: usb-storage unlinks the data URB.
    session.on_kernel_bytes(&unlink_pdu(22, 21));
    let actions = drain(&mut session);
    assert!(
        actions.contains(&Action::Unlink {
            endpoint: ep(1),
            direction: Direction::In,
            id: UrbId(ahead[0].0),
        }),
        "{actions:?}"
    );
    session.on_completion(out_done(20, 31));
    session.on_completion(completed_with(ahead[0].0, UrbStatus::Unlinked));
    let pdus = returns(&kernel_bytes(&drain(&mut session)), &[]);
    assert_eq!(
        ret_unlink_of(&pdus[0]),
        (22, -104),
        "-ECONNRESET, as unlinked"
    );
    assert_eq!(session.in_flight(), 0);
    // Widening is off after it: the device may choke on long READs.
    assert_eq!(session.stats().read_ahead.widen_failed, 1);
}

#[test]
fn a_write_between_reads_drops_the_kept_data() {
    use protocol::bot::CswStatus::Passed;
    let mut session = knowing_the_disk();
    run_read(&mut session, 10, 0, 16, Passed);
    run_read(&mut session, 20, 16, 16, Passed);
    // A WRITE of block 40, which the kept data holds.
    let write = protocol::bot::Cbw::new(30, 512, false, 0, &[0x2a, 0, 0, 0, 0, 40, 0, 0, 1, 0])
        .unwrap()
        .to_bytes()
        .to_vec();
    session.on_kernel_bytes(&submit_pdu(30, 2, SubmitBuffer::Out(write), [0; 8], None));
    drain(&mut session);
    session.on_completion(out_done(30, 31));
    session.on_kernel_bytes(&submit_pdu(
        31,
        2,
        SubmitBuffer::Out(vec![7; 512]),
        [0; 8],
        None,
    ));
    let ahead = read_ahead_ids(&drain(&mut session));
    session.on_completion(out_done(31, 512));
    session.on_completion(completed_in(ahead[0].0, csw_of(30, Passed)));
    session.on_kernel_bytes(&storage_in(32, 13, false));
    drain(&mut session);
    // The READ that would have been served goes to the device.
    let (_, _, sent) = run_read(&mut session, 40, 32, 16, Passed);
    assert!(sent.is_some());
    assert_eq!(session.stats().read_ahead.served, 0);
}

#[test]
fn no_read_ahead_forwards_every_urb() {
    let mut session = PortSession::new(&device()).with_read_ahead(false);
    session.on_kernel_bytes(&cbw_pdu(10, 4096, Direction::In));
    let actions = drain(&mut session);
    assert_eq!(actions.len(), 1);
    assert!(read_ahead_ids(&actions).is_empty());
    // Nor is a write's CBW answered before the device has it.
    session.on_kernel_bytes(&cbw_pdu(11, 4096, Direction::Out));
    let actions = drain(&mut session);
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(kernel_bytes(&actions).is_empty());
}

/// The ids of the interrupt URBs sent to the server on 0x83 IN.
fn interrupt_ids(actions: &[Action]) -> Vec<u32> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Submit { urb, .. }
                if urb.endpoint == ep(3) && urb.transfer_type == TransferType::Interrupt =>
            {
                Some(urb.id.0)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn interrupt_streaming_answers_the_next_poll_from_reports_already_here() {
    let mut session = PortSession::new(&device())
        .with_read_ahead(false)
        .with_interrupt_streaming(true);
    control_out(&mut session, 1, SET_CONFIGURATION_2, UrbStatus::Ok);
    drain(&mut session);
    session.on_kernel_bytes(&submit_pdu(2, 3, SubmitBuffer::In(8), [0; 8], None));
    let sent = interrupt_ids(&drain(&mut session));
    assert_eq!(sent.len(), 1 + client::vhci::readahead::STREAM_DEPTH);
    assert_eq!(sent[0], 2, "the kernel's own URB goes first");
    // The device answers the kernel's URB and the first speculation.
    session.on_completion(completed_in(2, vec![1; 8]));
    session.on_completion(completed_in(sent[1], vec![2; 8]));
    let pdus = returns(
        &kernel_bytes(&drain(&mut session)),
        &[(2, Direction::In, 8)],
    );
    assert_eq!(
        ret_submit_of(&pdus[0]),
        (2, UrbStatus::Ok, &Transferred::In(vec![1; 8]))
    );
    // The driver resubmits: answered at once with the second report, and one more URB polls.
    session.on_kernel_bytes(&submit_pdu(3, 3, SubmitBuffer::In(8), [0; 8], None));
    let actions = drain(&mut session);
    assert_eq!(interrupt_ids(&actions).len(), 1, "{actions:?}");
    let pdus = returns(&kernel_bytes(&actions), &[(3, Direction::In, 8)]);
    assert_eq!(
        ret_submit_of(&pdus[0]),
        (3, UrbStatus::Ok, &Transferred::In(vec![2; 8]))
    );
    // Closing the device unlinks the kernel's URB: the stream stops polling.
    session.on_kernel_bytes(&submit_pdu(4, 3, SubmitBuffer::In(8), [0; 8], None));
    drain(&mut session);
    session.on_kernel_bytes(&unlink_pdu(5, 4));
    let unlinks = drain(&mut session)
        .iter()
        .filter(|a| matches!(a, Action::Unlink { .. }))
        .count();
    // The kernel's (it took over a running speculation) and every speculation behind it.
    assert_eq!(unlinks, 1 + client::vhci::readahead::STREAM_DEPTH);
    assert_eq!(session.stats().read_ahead.hits, 2);
}

#[test]
fn large_in_data_reaches_the_kernel_as_its_own_buffer_in_order() {
    let mut session = PortSession::new(&device()).with_read_ahead(false);
    let big: Vec<u8> = (0..64 * 1024).map(|i| (i % 253) as u8).collect();
    session.on_kernel_bytes(&bulk_in(1, 64 * 1024));
    session.on_kernel_bytes(&bulk_in(2, 64));
    session.on_kernel_bytes(&unlink_pdu(3, 2));
    drain(&mut session);
    session.on_completion(completed_in(1, big.clone()));
    session.on_completion(completed_in(2, vec![5; 64]));
    let actions = drain(&mut session);
    let buffers: Vec<usize> = actions
        .iter()
        .filter_map(|a| match a {
            Action::ToKernel(b) => Some(b.len()),
            _ => None,
        })
        .collect();
    assert!(
        buffers.contains(&big.len()),
        "the 64 KiB is not copied: {buffers:?}"
    );
    let pdus = returns(
        &kernel_bytes(&actions),
        &[(1, Direction::In, 64 * 1024), (2, Direction::In, 64)],
    );
    assert_eq!(
        ret_submit_of(&pdus[0]),
        (1, UrbStatus::Ok, &Transferred::In(big))
    );
    assert_eq!(
        ret_submit_of(&pdus[1]),
        (2, UrbStatus::Ok, &Transferred::In(vec![5; 64]))
    );
    assert_eq!(ret_unlink_of(&pdus[2]), (3, 0));
}

/// A full-speed speaker: configuration 1's interface 0 has no endpoints in alternate 0 and
/// isochronous OUT endpoint 1 in alternate 1, as a UAC1 streaming interface does.
fn speaker() -> protocol::wire::DeviceInfo {
    let playback = config(
        1,
        &[
            &[9, 4, 0, 0, 0, 1, 2, 0, 0],
            &[9, 4, 0, 1, 1, 1, 2, 0, 0],
            &[7, 5, 0x01, 1, 192, 0, 1],
        ],
    );
    protocol::wire::DeviceInfo {
        speed: protocol::usb::Speed::Full,
        configurations: vec![playback.into()],
        active_configuration: 1,
        ..device()
    }
}

/// An iso OUT URB of eight 192-byte packets: 8 ms of 48 kHz stereo sound.
fn sound(seqnum: u32) -> Vec<u8> {
    let packets = (0..8)
        .map(|i| IsoPacket {
            offset: i * 192,
            length: 192,
            actual_length: 0,
            status: UrbStatus::Ok,
        })
        .collect();
    submit_pdu(
        seqnum,
        1,
        SubmitBuffer::Out(vec![seqnum as u8; 1536]),
        [0; 8],
        Some(packets),
    )
}

fn played(id: u32, start_frame: i32) -> UrbComplete {
    let packets = (0..8)
        .map(|i| IsoPacket {
            offset: i * 192,
            length: 192,
            actual_length: 192,
            status: UrbStatus::Ok,
        })
        .collect();
    UrbComplete {
        actual_length: 1536,
        iso: Some(IsoComplete {
            start_frame,
            error_count: 0,
            packets,
        }),
        ..completed_with(id, UrbStatus::Ok)
    }
}

fn answered(session: &mut PortSession, seqnums: &[u32]) -> Vec<u32> {
    let expected: Vec<_> = seqnums.iter().map(|&s| (s, Direction::Out, 1536)).collect();
    returns(&kernel_bytes(&drain(session)), &expected)
        .iter()
        .map(|pdu| {
            let Pdu::RetSubmit(ret) = pdu else {
                panic!("{pdu:?}")
            };
            assert_eq!(ret.status, UrbStatus::Ok);
            assert_eq!(ret.transferred, Transferred::Out(1536));
            let iso = ret.iso.as_ref().unwrap();
            assert!(iso.iter().all(|p| p.actual_length == 192), "{iso:?}");
            ret.seqnum
        })
        .collect()
}

#[test]
fn iso_out_urbs_are_answered_ahead_of_the_server_by_the_round_trip() {
    let mut session = PortSession::new(&speaker());
    session.set_rtt(std::time::Duration::from_millis(20));
    control_out(&mut session, 1, SET_INTERFACE_0_1, UrbStatus::Ok);
    for seqnum in 10..18 {
        session.on_kernel_bytes(&sound(seqnum));
    }
    // 30 ms of 8 ms URBs: four are answered at once; all eight go to the server.
    let actions = drain(&mut session);
    let sent = actions
        .iter()
        .filter(|a| matches!(a, Action::Submit { .. }))
        .count();
    assert_eq!(sent, 8);
    let expected: Vec<_> = (10..14).map(|s| (s, Direction::Out, 1536)).collect();
    let early = returns(&kernel_bytes(&actions), &expected);
    assert_eq!(early.len(), 4);
    // The server playing URB 10 frees room for 14; 10's own answer is not repeated.
    session.on_completion(played(10, 100));
    assert_eq!(answered(&mut session, &[14]), [14]);
    for (id, frame) in [(11, 108), (12, 116), (13, 124)] {
        session.on_completion(played(id, frame));
    }
    assert_eq!(answered(&mut session, &[15, 16, 17]), [15, 16, 17]);
    // The device ran dry for 20 frames before URB 14.
    session.on_completion(played(14, 152));
    let stats = session.iso_stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(
        (
            stats[0].endpoint,
            stats[0].answered_ahead,
            stats[0].underruns
        ),
        (1, 8, 1)
    );
    assert_eq!(stats[0].missed_frames, 20);
    assert_eq!(session.stats().stray_completions, 0);
}

#[test]
fn without_a_measured_round_trip_iso_out_waits_for_the_server() {
    let mut session = PortSession::new(&speaker());
    control_out(&mut session, 1, SET_INTERFACE_0_1, UrbStatus::Ok);
    session.on_kernel_bytes(&sound(10));
    assert!(
        drain(&mut session)
            .iter()
            .all(|a| matches!(a, Action::Submit { .. }))
    );
    session.on_completion(played(10, 0));
    assert_eq!(answered(&mut session, &[10]), [10]);
}

#[test]
fn an_unlinked_iso_out_urb_is_not_answered_ahead() {
    let mut session = PortSession::new(&speaker());
    session.set_rtt(std::time::Duration::from_millis(1));
    control_out(&mut session, 1, SET_INTERFACE_0_1, UrbStatus::Ok);
    session.on_kernel_bytes(&sound(10));
    session.on_kernel_bytes(&sound(11));
    assert_eq!(answered(&mut session, &[10]), [10], "depth 1");
    session.on_kernel_bytes(&unlink_pdu(50, 11));
    drain(&mut session);
    // Room frees while 11 is being unlinked: it stays the server's to answer.
    session.on_completion(played(10, 0));
    assert!(drain(&mut session).is_empty());
    session.on_completion(completed_with(11, UrbStatus::Unlinked));
    let pdus = returns(&kernel_bytes(&drain(&mut session)), &[]);
    assert_eq!(pdus.len(), 1);
    assert_eq!(ret_unlink_of(&pdus[0]).0, 50);
}
