//! Both peers' state machines in one process: the client's `PortSession` and URB windows, the
//! server's `StreamTracker`, and a scripted device, joined with no network and a fake clock.
//! Every message crosses exactly as the protocol carries it, so ordering rules between the two
//! sides (an unlink behind a full queue, a cancel racing a completion) are tested here.

mod common;

use std::collections::{HashMap, HashSet};

use client::vhci::{Action, PortSession};
use common::*;
use proptest::prelude::*;
use protocol::usb::{Direction, EndpointNumber, UrbStatus};
use protocol::usbip::{Pdu, Transferred};
use protocol::wire::{
    AttachHandle, URB_WINDOW, UrbClientMessage, UrbComplete, UrbId, UrbServerMessage,
    UrbStreamOpen, UrbWindow,
};
use server::gate::Gates;
use server::tracker::{DeviceAction, StreamTracker};

type Key = (EndpointNumber, Direction);

/// The server's default device queue depth.
const DEPTH: usize = 32;
const LEN: u32 = 512;

struct Pair {
    session: PortSession,
    windows: HashMap<Key, UrbWindow>,
    trackers: HashMap<Key, StreamTracker>,
    /// URBs the device is running, oldest first.
    on_device: Vec<UrbId>,
    /// Every URB the device was ever given, with its endpoint.
    device_saw: HashSet<UrbId>,
    endpoint_of: HashMap<UrbId, Key>,
    /// The most URBs one endpoint ever had on the device.
    most_on_device: usize,
    to_kernel: Vec<u8>,
    now_us: u64,
    /// Server messages are held on the wire (not delivered) while set.
    hold_to_client: bool,
    /// Server messages on the wire, in order.
    wire: Vec<(Key, UrbServerMessage)>,
    /// The device ignores cancels while set (it is finishing the transfer anyway).
    deaf_to_cancels: bool,
    /// The server's book of OUT outcomes, for URBs sent to follow one.
    gates: Gates,
}

impl Pair {
    fn new() -> Pair {
        Pair {
            session: PortSession::new(&device()),
            windows: HashMap::new(),
            trackers: HashMap::new(),
            on_device: Vec::new(),
            device_saw: HashSet::new(),
            endpoint_of: HashMap::new(),
            most_on_device: 0,
            to_kernel: Vec::new(),
            now_us: 0,
            hold_to_client: false,
            wire: Vec::new(),
            deaf_to_cancels: false,
            gates: Gates::default(),
        }
    }

    /// Delivers what the wire holds to the client, in order, and lets both sides settle.
    fn release_wire(&mut self) {
        self.hold_to_client = false;
        for (key, msg) in std::mem::take(&mut self.wire) {
            self.windows.entry(key).or_default().on_server(&msg);
            deliver(&mut self.session, msg);
        }
        self.settle();
    }

    fn kernel(&mut self, bytes: &[u8]) {
        self.session.on_kernel_bytes(bytes);
        self.settle();
    }

    /// The device ends a URB it is running: an IN one with 13 bytes if it succeeded, an OUT
    /// one having taken no data.
    fn device_completes(&mut self, id: UrbId, status: UrbStatus) {
        self.on_device.retain(|i| *i != id);
        self.now_us += 100;
        for (key, tracker) in &mut self.trackers {
            let data = if status == UrbStatus::Ok && key.1 == Direction::In {
                vec![id.0 as u8; 13]
            } else {
                Vec::new()
            };
            let done = UrbComplete {
                id,
                status,
                actual_length: data.len() as u32,
                data,
                iso: None,
                timing: None,
            };
            tracker.on_complete(done, self.now_us);
        }
        self.settle();
    }

    /// Shuttles messages between the two sides until neither has anything more to say.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            while let Some(action) = self.session.poll_action() {
                moved = true;
                match action {
                    Action::Submit {
                        endpoint,
                        direction,
                        urb,
                        after,
                    } => {
                        let window = self.windows.entry((endpoint, direction)).or_default();
                        match after {
                            Some(after) => window.submit_after(urb, after),
                            None => window.submit(urb),
                        }
                    }
                    Action::Unlink {
                        endpoint,
                        direction,
                        id,
                    } => self
                        .windows
                        .entry((endpoint, direction))
                        .or_default()
                        .unlink(id),
                    Action::ToKernel(bytes) => self.to_kernel.extend(bytes),
                    Action::Close(reason) => panic!("the port closed: {reason}"),
                }
            }
            let keys: Vec<Key> = self.windows.keys().copied().collect();
            for key in keys {
                let window = self.windows.get_mut(&key).unwrap();
                let mut sent = Vec::new();
                while let Some(msg) = window.poll_send() {
                    sent.push(msg);
                }
                let mut answers = Vec::new();
                while let Some(answer) = window.poll_answer() {
                    answers.push(answer);
                }
                moved |= !sent.is_empty() || !answers.is_empty();
                let tracker = self.trackers.entry(key).or_insert_with(|| {
                    let open = UrbStreamOpen {
                        handle: AttachHandle(1),
                        endpoint: key.0,
                        direction: key.1,
                    };
                    StreamTracker::new(&open, DEPTH, false)
                });
                for msg in sent {
                    tracker
                        .on_client(msg, self.now_us)
                        .expect("the client kept the protocol");
                }
                let record = key.0 != EndpointNumber::CONTROL;
                self.gates.settle(tracker, record, false, self.now_us);
                for answer in answers {
                    deliver(&mut self.session, answer);
                }
                let mut cancels = Vec::new();
                while let Some(action) = tracker.poll_action() {
                    moved = true;
                    match action {
                        DeviceAction::Submit(urb) => {
                            self.device_saw.insert(urb.id);
                            self.endpoint_of.insert(urb.id, key);
                            self.on_device.push(urb.id);
                        }
                        DeviceAction::Cancel(id) => cancels.push(id),
                    }
                }
                let here = self
                    .on_device
                    .iter()
                    .filter(|id| self.endpoint_of[id] == key)
                    .count();
                self.most_on_device = self.most_on_device.max(here);
                let mut messages = Vec::new();
                while let Some(msg) = tracker.poll_message() {
                    messages.push(msg);
                }
                let window = self.windows.get_mut(&key).unwrap();
                for msg in messages {
                    moved = true;
                    if self.hold_to_client {
                        self.wire.push((key, msg));
                    } else {
                        window.on_server(&msg);
                        deliver(&mut self.session, msg);
                    }
                }
                for id in cancels {
                    // The device honours a cancel at once, unless told to finish regardless.
                    if !self.deaf_to_cancels {
                        self.device_completes(id, UrbStatus::Unlinked);
                    }
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// What reached the kernel, decoded, given the bulk IN URBs it submitted.
    fn kernel_saw(&self, submitted: &[u32]) -> Vec<Pdu> {
        let expected: Vec<(u32, Direction, u32)> =
            submitted.iter().map(|&s| (s, Direction::In, LEN)).collect();
        self.kernel_saw_of(&expected)
    }

    /// What reached the kernel, decoded, given every URB it submitted (seqnum, direction,
    /// length).
    fn kernel_saw_of(&self, submitted: &[(u32, Direction, u32)]) -> Vec<Pdu> {
        returns(&self.to_kernel, submitted)
    }
}

fn deliver(session: &mut PortSession, msg: UrbServerMessage) {
    match msg {
        UrbServerMessage::Complete(c) => session.on_completion(c),
        UrbServerMessage::UnlinkDone { id, cancelled } => session.on_unlink_done(id, cancelled),
    }
}

#[test]
fn an_unlink_behind_more_urbs_than_the_server_queue_reaches_the_device_at_once() {
    // usbnet keeps ~60 receive URBs queued on one endpoint; the server runs 32 of them on the
    // device. A version 1 server stopped reading the stream there, so the unlink of the first
    // sat behind the other 28 until a frame arrived, and the kernel's unlink timed out.
    let mut pair = Pair::new();
    let seqnums: Vec<u32> = (1..=100).collect();
    let script: Vec<u8> = seqnums.iter().flat_map(|&s| bulk_in(s, LEN)).collect();
    pair.kernel(&script);
    assert_eq!(pair.on_device.len(), DEPTH);
    // 1 runs on the device, 50 waits on the server, 90 is still held by the client's window.
    const { assert!(URB_WINDOW < 90) };
    pair.kernel(&[unlink_pdu(101, 1), unlink_pdu(102, 50), unlink_pdu(103, 90)].concat());
    assert!(
        !pair.on_device.contains(&UrbId(1)),
        "the cancel reached the device"
    );
    assert!(!pair.device_saw.contains(&UrbId(50)));
    assert!(!pair.device_saw.contains(&UrbId(90)));
    let mut unlinks: Vec<(u32, i32)> = pair
        .kernel_saw(&seqnums)
        .iter()
        .map(ret_unlink_of)
        .collect();
    unlinks.sort();
    assert_eq!(
        unlinks,
        vec![(101, ECONNRESET), (102, ECONNRESET), (103, ECONNRESET)]
    );
    // The rest still run, in order, as the device completes them.
    while let Some(&id) = pair.on_device.first() {
        pair.device_completes(id, UrbStatus::Ok);
    }
    let pdus = pair.kernel_saw(&seqnums);
    let completed: Vec<u32> = pdus
        .iter()
        .filter_map(|p| match p {
            Pdu::RetSubmit(r) => Some(r.seqnum),
            _ => None,
        })
        .collect();
    let want: Vec<u32> = seqnums
        .iter()
        .copied()
        .filter(|s| ![1, 50, 90].contains(s))
        .collect();
    assert_eq!(completed, want);
    assert_eq!(pair.most_on_device, DEPTH);
    assert_eq!(pair.session.in_flight(), 0);
}

/// How many times the kernel heard about each URB and each unlink: RET_SUBMITs, and
/// RET_UNLINKs (one that says -ECONNRESET also answers its target).
fn answers(
    pair: &Pair,
    submitted: &[(u32, Direction, u32)],
    unlinks: &HashMap<u32, u32>,
) -> (HashMap<u32, usize>, HashMap<u32, usize>) {
    let mut urbs: HashMap<u32, usize> = HashMap::new();
    let mut unlinked: HashMap<u32, usize> = HashMap::new();
    for pdu in pair.kernel_saw_of(submitted) {
        match pdu {
            Pdu::RetSubmit(r) => *urbs.entry(r.seqnum).or_default() += 1,
            Pdu::RetUnlink(r) => {
                *unlinked.entry(r.seqnum).or_default() += 1;
                if r.status.to_errno() == ECONNRESET {
                    *urbs.entry(unlinks[&r.seqnum]).or_default() += 1;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    (urbs, unlinked)
}

/// A kernel unlink racing the device's completion of the same URB, in both orders: the kernel
/// hears exactly one answer for the URB and one for the unlink either way.
#[test]
fn an_unlink_racing_a_completion_is_answered_once_in_both_orders() {
    let unlinks = HashMap::from([(2, 1)]);
    let once = HashMap::from([(1, 1)]);
    let unlink_once = HashMap::from([(2, 1)]);

    // The completion wins: it is on the wire to the client when the kernel's unlink leaves,
    // so the server no longer knows the URB.
    let mut pair = Pair::new();
    pair.kernel(&bulk_in(1, LEN));
    pair.hold_to_client = true;
    pair.device_completes(UrbId(1), UrbStatus::Ok);
    pair.kernel(&unlink_pdu(2, 1));
    pair.release_wire();
    let (urbs, unlinked) = answers(&pair, &[(1, Direction::In, LEN)], &unlinks);
    assert_eq!((urbs, unlinked), (once.clone(), unlink_once.clone()));
    assert_eq!(pair.session.in_flight(), 0);

    // The unlink wins at the server, but the device finishes the transfer before it acts on
    // the cancel: its completion is the answer, and the unlink is told it cancelled nothing.
    let mut pair = Pair::new();
    pair.kernel(&bulk_in(1, LEN));
    pair.deaf_to_cancels = true;
    pair.hold_to_client = true;
    pair.kernel(&unlink_pdu(2, 1));
    pair.device_completes(UrbId(1), UrbStatus::Ok);
    pair.release_wire();
    let (urbs, unlinked) = answers(&pair, &[(1, Direction::In, LEN)], &unlinks);
    assert_eq!((urbs, unlinked), (once.clone(), unlink_once.clone()));
    assert_eq!(pair.session.in_flight(), 0);

    // The unlink wins and the device honours it.
    let mut pair = Pair::new();
    pair.kernel(&bulk_in(1, LEN));
    pair.hold_to_client = true;
    pair.kernel(&unlink_pdu(2, 1));
    pair.release_wire();
    let (urbs, unlinked) = answers(&pair, &[(1, Direction::In, LEN)], &unlinks);
    assert_eq!((urbs, unlinked), (once, unlink_once));
    assert_eq!(pair.session.in_flight(), 0);
}

/// One step of a random interleaving.
#[derive(Debug, Clone)]
enum Step {
    /// The kernel submits this many more bulk IN URBs.
    Submit(u8),
    /// The kernel sends a read's CBW: answered at once, its data and CSW read ahead, held on
    /// the server behind it (the bulk reads then take them or miss them).
    Cbw,
    /// The kernel unlinks the n-th URB it submitted (if that exists and is unanswered).
    Unlink(u8),
    /// The device completes the n-th URB it runs (if any).
    Complete(u8),
    /// The device stalls the n-th URB it runs (if any): a refused CBW among them.
    Stall(u8),
    /// Server messages stay on the wire from now on (races their answers with the kernel's
    /// next unlinks).
    Hold,
    /// The wire delivers what it holds.
    Release,
    /// The device ignores (true) or honours (false) cancels from now on.
    Deaf(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u8..40).prop_map(Step::Submit),
        Just(Step::Cbw),
        any::<u8>().prop_map(Step::Unlink),
        any::<u8>().prop_map(Step::Complete),
        any::<u8>().prop_map(Step::Stall),
        Just(Step::Hold),
        Just(Step::Release),
        any::<bool>().prop_map(Step::Deaf),
    ]
}

proptest! {
    /// Whatever the order of submissions (bulk reads, and read CBWs answered ahead with their
    /// phases held behind them), unlinks, completions and stalls: every URB the kernel
    /// submitted is answered exactly once (a RET_SUBMIT, or a RET_UNLINK that cancelled it),
    /// every unlink gets one RET_UNLINK, the client never breaks the window, and the device
    /// never runs more than the server's depth.
    #[test]
    fn every_urb_and_every_unlink_is_answered_once(steps in proptest::collection::vec(step(), 1..40)) {
        let mut pair = Pair::new();
        let mut submitted: Vec<(u32, Direction, u32)> = Vec::new();
        let mut unlinks: HashMap<u32, u32> = HashMap::new(); // unlink seqnum -> target
        let mut next = 1u32;
        for step in steps {
            match step {
                Step::Submit(n) => {
                    let mut script = Vec::new();
                    for _ in 0..n {
                        script.extend(bulk_in(next, LEN));
                        submitted.push((next, Direction::In, LEN));
                        next += 1;
                    }
                    pair.kernel(&script);
                }
                Step::Cbw => {
                    pair.kernel(&cbw_pdu(next, LEN, Direction::In));
                    submitted.push((next, Direction::Out, 31));
                    next += 1;
                }
                Step::Unlink(n) if !submitted.is_empty() => {
                    let target = submitted[n as usize % submitted.len()].0;
                    if !unlinks.values().any(|&t| t == target) {
                        unlinks.insert(next, target);
                        pair.kernel(&unlink_pdu(next, target));
                        next += 1;
                    }
                }
                Step::Complete(n) if !pair.on_device.is_empty() => {
                    let id = pair.on_device[n as usize % pair.on_device.len()];
                    pair.device_completes(id, UrbStatus::Ok);
                }
                Step::Stall(n) if !pair.on_device.is_empty() => {
                    let id = pair.on_device[n as usize % pair.on_device.len()];
                    pair.device_completes(id, UrbStatus::Stall);
                }
                Step::Hold => pair.hold_to_client = true,
                Step::Release => pair.release_wire(),
                Step::Deaf(deaf) => pair.deaf_to_cancels = deaf,
                _ => {}
            }
        }
        // Then the wire delivers and the device finishes everything.
        pair.release_wire();
        while let Some(&id) = pair.on_device.first() {
            pair.device_completes(id, UrbStatus::Ok);
        }
        pair.release_wire();
        prop_assert!(pair.most_on_device <= DEPTH);
        let (answered, unlink_answers) = answers(&pair, &submitted, &unlinks);
        for (s, _, _) in &submitted {
            prop_assert_eq!(answered.get(s).copied(), Some(1), "URB {} answered once", s);
        }
        for u in unlinks.keys() {
            prop_assert_eq!(unlink_answers.get(u).copied(), Some(1), "unlink {} answered once", u);
        }
        prop_assert_eq!(pair.session.in_flight(), 0);
    }
}

#[test]
fn a_client_over_the_window_is_a_violation_not_a_hang() {
    let open = UrbStreamOpen {
        handle: AttachHandle(1),
        endpoint: EndpointNumber::new(1).unwrap(),
        direction: Direction::In,
    };
    let mut tracker = StreamTracker::new(&open, DEPTH, false);
    let mut session = PortSession::new(&device());
    let script: Vec<u8> = (1..=URB_WINDOW as u32 + 1)
        .flat_map(|s| bulk_in(s, LEN))
        .collect();
    session.on_kernel_bytes(&script);
    // Straight to the server, past the window a well-behaved client keeps.
    let mut verdict = Ok(());
    while let Some(action) = session.poll_action() {
        if let Action::Submit { urb, .. } = action {
            verdict = verdict.and(tracker.on_client(UrbClientMessage::Submit(urb), 0));
        }
    }
    assert_eq!(
        verdict,
        Err(server::tracker::Violation::QueueFull(URB_WINDOW))
    );
}

/// Read-ahead's IN phases reach the server with (or before) the CBW on another stream; a
/// device may stall an IN that arrives before its command, or hold a CSW read queued behind
/// the data phase (QEMU's usb-storage does both), so the server runs each phase only after the
/// one before it, and none after a failure.
#[test]
fn read_ahead_reaches_the_device_only_after_its_command() {
    let mut pair = Pair::new();
    pair.kernel(&cbw_pdu(1, LEN, Direction::In));
    assert_eq!(
        pair.on_device,
        vec![UrbId(1)],
        "only the CBW runs; its read-ahead waits on the server"
    );
    pair.device_completes(UrbId(1), UrbStatus::Ok);
    let data = pair.on_device.clone();
    assert_eq!(
        data.len(),
        1,
        "the data phase runs, the CSW read waits for it: {data:?}"
    );
    assert!(data[0].0 > 0xf000_0000);
    pair.device_completes(data[0], UrbStatus::Ok);
    let csw = pair.on_device.clone();
    assert_eq!(csw.len(), 1, "then the CSW read");
    pair.device_completes(csw[0], UrbStatus::Ok);

    // A command the device refuses, after the kernel was told its CBW went and sent its data
    // read: nothing after the CBW reaches the device, and the kernel's read fails with a
    // transport error (usb-storage then resets the device).
    pair.kernel(&cbw_pdu(2, LEN, Direction::In));
    pair.kernel(&storage_in(3, LEN, true));
    let saw_before = pair.device_saw.len();
    pair.device_completes(UrbId(2), UrbStatus::Stall);
    assert_eq!(
        pair.device_saw.len(),
        saw_before,
        "nothing ran after the stall"
    );
    assert!(pair.on_device.is_empty());
    let pdus = returns(
        &pair.to_kernel,
        &[
            (1, Direction::Out, 31),
            (2, Direction::Out, 31),
            (3, Direction::In, LEN),
        ],
    );
    assert_eq!(
        ret_submit_of(&pdus[2]),
        (3, UrbStatus::Protocol, &Transferred::In(Vec::new()))
    );
    assert_eq!(pair.session.in_flight(), 0);
}
