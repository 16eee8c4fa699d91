//! The endpoint queue against a model endpoint that behaves as usbfs does: transfers complete
//! in order, "cancel all" makes each still-running one complete as cancelled, possibly after
//! moving part of its data.

use std::collections::{BTreeMap, VecDeque};

use nusb::transfer::{Buffer, Completion, TransferError};
use proptest::prelude::*;
use protocol::usb::{Direction, EndpointNumber, TransferType, UrbStatus, transfer_flags};
use protocol::wire::{UrbComplete, UrbId, UrbSubmit};

use super::{Action, EndpointQueue};

const MPS: usize = 512;

/// One transfer on the model endpoint.
struct Transfer {
    buffer: Buffer,
    cancelled: bool,
}

/// The queue wired to a model endpoint; actions are carried out by [`Rig::pump`].
struct Rig {
    q: EndpointQueue<()>,
    direction: Direction,
    endpoint: VecDeque<Transfer>,
    /// Every transfer queued on the endpoint: requested IN length or OUT bytes.
    queued: Vec<(usize, Vec<u8>)>,
    /// Data of the OUT transfers that completed successfully, in order.
    delivered: Vec<Vec<u8>>,
    answers: Vec<UrbComplete>,
    cancel_rounds: usize,
    halts_cleared: usize,
    halt_answer: UrbStatus,
    rescans: usize,
    /// Cancelled transfers that had moved data.
    partial_moves: usize,
}

impl Rig {
    fn new(direction: Direction) -> Rig {
        Rig {
            q: EndpointQueue::new(direction, MPS),
            direction,
            endpoint: VecDeque::new(),
            queued: Vec::new(),
            delivered: Vec::new(),
            answers: Vec::new(),
            cancel_rounds: 0,
            halts_cleared: 0,
            halt_answer: UrbStatus::Ok,
            rescans: 0,
            partial_moves: 0,
        }
    }

    fn urb(&self, id: u32, length: u32, flags: u32) -> UrbSubmit {
        let data = match self.direction {
            Direction::Out => (0..length).map(|i| (id as u8) ^ (i as u8)).collect(),
            Direction::In => Vec::new(),
        };
        UrbSubmit {
            id: UrbId(id),
            endpoint: EndpointNumber::new(1).unwrap(),
            direction: self.direction,
            transfer_type: TransferType::Bulk,
            flags,
            setup: None,
            length,
            data,
            interval: 0,
            iso: None,
        }
    }

    fn submit(&mut self, id: u32, length: u32, flags: u32) {
        let urb = self.urb(id, length, flags);
        self.q.submit(urb, ());
        self.pump();
    }

    fn cancel(&mut self, id: u32) {
        self.q.cancel(UrbId(id));
        self.pump();
    }

    fn clear_halt(&mut self, id: u32) {
        self.q.clear_halt(UrbId(id), ());
        self.pump();
    }

    fn close(&mut self) {
        self.q.close();
        self.pump();
        while !self.endpoint.is_empty() {
            self.device_ends(Ok(()), None);
        }
        self.q.abandon();
        self.pump();
    }

    /// Carries out the queue's actions as usbfs would.
    fn pump(&mut self) {
        while let Some(action) = self.q.poll_action() {
            match action {
                Action::Submit(buffer) => {
                    let out = match self.direction {
                        Direction::Out => buffer.to_vec(),
                        Direction::In => Vec::new(),
                    };
                    self.queued.push((buffer.requested_len(), out));
                    self.endpoint.push_back(Transfer {
                        buffer,
                        cancelled: false,
                    });
                }
                Action::CancelAll => {
                    self.cancel_rounds += 1;
                    self.endpoint.iter_mut().for_each(|t| t.cancelled = true);
                }
                Action::ClearHalt => {
                    assert!(
                        self.endpoint.is_empty(),
                        "a halt is cleared with the endpoint idle"
                    );
                    self.halts_cleared += 1;
                    self.q.halt_cleared(self.halt_answer);
                }
                Action::Complete((), c) => self.answers.push(c),
                Action::Rescan => self.rescans += 1,
            }
        }
        assert_eq!(
            self.q.in_flight(),
            self.endpoint.len(),
            "the queue's count is the endpoint's"
        );
    }

    /// The oldest transfer ends: a cancelled one as `Cancelled` having moved `moved` bytes (0
    /// when `None`); a running one with `status`, an IN one delivering `data`.
    fn device_ends(&mut self, status: Result<(), TransferError>, data: Option<&[u8]>) {
        let t = self
            .endpoint
            .pop_front()
            .expect("no transfer on the endpoint");
        let mut buffer = t.buffer;
        let (status, actual_len) = if t.cancelled {
            let moved = data.map_or(0, <[u8]>::len);
            self.partial_moves += usize::from(moved > 0);
            if self.direction == Direction::In {
                buffer.clear();
                buffer.extend_from_slice(data.unwrap_or(&[]));
            }
            (Err(TransferError::Cancelled), moved)
        } else if self.direction == Direction::In {
            buffer.clear();
            buffer.extend_from_slice(data.unwrap_or(&[]));
            (status, buffer.len())
        } else {
            if status.is_ok() {
                self.delivered.push(buffer.to_vec());
            }
            (status, if status.is_ok() { buffer.len() } else { 0 })
        };
        self.q.completed(Completion {
            buffer,
            actual_len,
            status,
        });
        self.pump();
    }

    /// Reaps every cancelled transfer at the front (what usbfs does right after a cancel).
    fn reap_cancelled(&mut self) {
        while self.endpoint.front().is_some_and(|t| t.cancelled) {
            self.device_ends(Ok(()), None);
        }
    }

    fn answered(&self) -> Vec<(u32, UrbStatus)> {
        self.answers.iter().map(|c| (c.id.0, c.status)).collect()
    }
}

#[test]
fn unlinking_the_first_a_middle_or_the_last_requeues_the_others_in_order() {
    for target in [0, 2, 4] {
        let mut rig = Rig::new(Direction::In);
        for id in 0..5 {
            rig.submit(id, 512, 0);
        }
        rig.cancel(target);
        assert_eq!(rig.cancel_rounds, 1);
        // New work arriving during the round waits behind the requeued URBs.
        rig.submit(5, 512, 0);
        assert_eq!(rig.endpoint.len(), 5, "held until the round is reaped");
        rig.reap_cancelled();
        assert_eq!(rig.answered(), [(target, UrbStatus::Unlinked)]);
        for id in (0..6).filter(|&id| id != target) {
            rig.device_ends(Ok(()), Some(&[id as u8; 3]));
            let c = rig.answers.last().unwrap();
            assert_eq!(
                (c.id, c.status, &c.data[..]),
                (UrbId(id), UrbStatus::Ok, &[id as u8; 3][..])
            );
        }
        assert_eq!(rig.answers.len(), 6);
        assert_eq!(rig.cancel_rounds, 1);
        assert!(rig.queued.iter().all(|(len, _)| *len == 512));
    }
}

#[test]
fn an_unlinked_urb_that_moved_part_of_its_data_reports_what_moved_and_is_not_repeated() {
    let mut rig = Rig::new(Direction::Out);
    rig.submit(1, 4096, 0);
    rig.submit(2, 4096, 0);
    rig.cancel(1);
    let moved = vec![0xAA; 1024];
    rig.device_ends(Ok(()), Some(&moved));
    assert_eq!(rig.answers[0].status, UrbStatus::Unlinked);
    assert_eq!(rig.answers[0].actual_length, 1024);
    // URB 2, cancelled only because usbfs cancels the whole endpoint, goes again whole.
    rig.reap_cancelled();
    assert_eq!(
        rig.queued.len(),
        3,
        "1 and 2, then 2 requeued; 1 not repeated"
    );
    assert_eq!(rig.queued[2].1, rig.queued[1].1);
    rig.device_ends(Ok(()), None);
    assert_eq!(
        rig.answered(),
        [(1, UrbStatus::Unlinked), (2, UrbStatus::Ok)]
    );
    assert_eq!(rig.answers[1].actual_length, 4096);
}

#[test]
fn a_bystander_that_moved_data_when_cancelled_is_reported_unlinked_with_its_data() {
    let mut rig = Rig::new(Direction::In);
    rig.submit(1, 2048, 0);
    rig.submit(2, 2048, 0);
    rig.cancel(2);
    // URB 1 had received a frame's first packet: repeating it would lose that packet.
    rig.device_ends(Ok(()), Some(&[9; 512]));
    rig.reap_cancelled();
    let got: Vec<_> = rig
        .answers
        .iter()
        .map(|c| (c.id.0, c.status, c.data.len()))
        .collect();
    assert_eq!(
        got,
        [(1, UrbStatus::Unlinked, 512), (2, UrbStatus::Unlinked, 0)]
    );
    assert!(rig.endpoint.is_empty(), "nothing requeued");
}

#[test]
fn transfers_the_kernel_kills_on_unplug_end_as_shutdown_and_are_not_repeated() {
    let mut rig = Rig::new(Direction::In);
    for id in 1..=3 {
        rig.submit(id, 2048, 0);
    }
    // usbfs kills every URB of a device being unplugged: no round of ours asked for it.
    rig.endpoint.iter_mut().for_each(|t| t.cancelled = true);
    rig.device_ends(Ok(()), None);
    rig.device_ends(Ok(()), Some(&[7; 512]));
    rig.device_ends(Ok(()), None);
    assert_eq!(
        rig.answered(),
        [
            (1, UrbStatus::Shutdown),
            (2, UrbStatus::Shutdown),
            (3, UrbStatus::Shutdown)
        ]
    );
    assert_eq!(rig.answers[1].data.len(), 512, "what moved is reported");
    assert_eq!(rig.queued.len(), 3, "nothing requeued onto a dying device");
    assert_eq!(rig.cancel_rounds, 0);
    assert!(rig.rescans > 0, "a kernel cancel is worth a rescan");
}

#[test]
fn zero_length_packets_follow_whole_packet_out_urbs_and_report_once() {
    let mut rig = Rig::new(Direction::Out);
    rig.submit(1, 1024, transfer_flags::ZERO_PACKET);
    let lens: Vec<_> = rig.queued.iter().map(|(_, d)| d.len()).collect();
    assert_eq!(
        lens,
        [1024, 0],
        "the data stage, then its zero-length packet"
    );
    rig.device_ends(Ok(()), None);
    assert!(
        rig.answers.is_empty(),
        "the URB ends with its zero-length packet"
    );
    rig.device_ends(Ok(()), None);
    assert_eq!(rig.answered(), [(1, UrbStatus::Ok)]);
    assert_eq!(rig.answers[0].actual_length, 1024);

    // Not a whole number of packets, or no data, or no flag: no zero-length packet.
    rig.submit(2, 1000, transfer_flags::ZERO_PACKET);
    rig.submit(3, 0, transfer_flags::ZERO_PACKET);
    rig.submit(4, 512, 0);
    assert_eq!(rig.endpoint.len(), 3);

    // A data stage that stalls reports once; its zero-length packet stays silent and is
    // not requeued by the next unlink.
    let mut rig = Rig::new(Direction::Out);
    rig.submit(1, 512, transfer_flags::ZERO_PACKET);
    rig.submit(2, 512, 0);
    rig.device_ends(Err(TransferError::Stall), None);
    assert_eq!(rig.answered(), [(1, UrbStatus::Stall)]);
    rig.cancel(2);
    rig.reap_cancelled();
    assert_eq!(
        rig.answered(),
        [(1, UrbStatus::Stall), (2, UrbStatus::Unlinked)]
    );
    assert!(rig.endpoint.is_empty());
}

#[test]
fn an_unlink_cancelling_a_zero_length_packet_urb_requeues_both_parts_in_order() {
    let mut rig = Rig::new(Direction::Out);
    rig.submit(1, 512, transfer_flags::ZERO_PACKET);
    rig.submit(2, 64, 0);
    rig.cancel(2);
    rig.reap_cancelled();
    let lens: Vec<_> = rig.endpoint.iter().map(|t| t.buffer.len()).collect();
    assert_eq!(lens, [512, 0]);
    rig.device_ends(Ok(()), None);
    rig.device_ends(Ok(()), None);
    assert_eq!(
        rig.answered(),
        [(2, UrbStatus::Unlinked), (1, UrbStatus::Ok)]
    );
    assert_eq!(rig.answers[1].actual_length, 512);
}

#[test]
fn completions_keep_their_order_when_some_finish_before_the_cancel_reaches_them() {
    let mut rig = Rig::new(Direction::In);
    for id in 0..5 {
        rig.submit(id, 512, 0);
    }
    // 0 and 1 had already finished on the device when the unlink of 3 cancelled the rest.
    rig.cancel(3);
    for t in rig.endpoint.iter_mut().take(2) {
        t.cancelled = false;
    }
    rig.device_ends(Ok(()), Some(&[0]));
    rig.device_ends(Ok(()), Some(&[1]));
    rig.device_ends(Ok(()), None); // 2, requeued behind the round
    // An unlink of a URB requeued during the round takes a second round, after this one.
    rig.cancel(2);
    assert_eq!(rig.cancel_rounds, 1, "not while the first round is reaped");
    rig.reap_cancelled(); // 3 unlinked, 4 requeued
    assert_eq!(rig.cancel_rounds, 2);
    rig.reap_cancelled(); // 2 unlinked, 4 requeued again
    rig.device_ends(Ok(()), Some(&[4]));
    assert_eq!(
        rig.answered(),
        [
            (0, UrbStatus::Ok),
            (1, UrbStatus::Ok),
            (3, UrbStatus::Unlinked),
            (2, UrbStatus::Unlinked),
            (4, UrbStatus::Ok)
        ]
    );
    assert!(rig.endpoint.is_empty());
}

#[test]
fn an_unlink_of_a_urb_held_behind_a_round_answers_it_without_the_device() {
    let mut rig = Rig::new(Direction::In);
    rig.submit(0, 512, 0);
    rig.submit(1, 512, 0);
    rig.cancel(0);
    rig.submit(2, 512, 0);
    rig.cancel(2);
    assert_eq!(rig.answered(), [(2, UrbStatus::Unlinked)]);
    rig.reap_cancelled();
    rig.device_ends(Ok(()), Some(&[1]));
    assert_eq!(
        rig.queued.len(),
        3,
        "0 and 1, then 1 requeued: 2 never queued"
    );
    assert_eq!(
        rig.answered(),
        [
            (2, UrbStatus::Unlinked),
            (0, UrbStatus::Unlinked),
            (1, UrbStatus::Ok)
        ]
    );
}

#[test]
fn clearing_a_halt_drains_the_endpoint_first_and_holds_what_comes_after() {
    let mut rig = Rig::new(Direction::Out);
    rig.submit(1, 8, 0);
    rig.device_ends(Err(TransferError::Stall), None);
    rig.submit(2, 8, 0);
    rig.clear_halt(100);
    rig.submit(3, 8, 0);
    assert_eq!(rig.halts_cleared, 0);
    rig.reap_cancelled();
    assert_eq!(rig.halts_cleared, 1);
    assert_eq!(
        rig.answered(),
        [
            (1, UrbStatus::Stall),
            (2, UrbStatus::Unlinked),
            (100, UrbStatus::Ok)
        ]
    );
    assert_eq!(rig.endpoint.len(), 1, "3 queued after the halt was cleared");

    // A halt clear that finds the device gone answers NoDevice and asks for a rescan.
    let mut rig = Rig::new(Direction::In);
    rig.halt_answer = UrbStatus::NoDevice;
    rig.clear_halt(7);
    assert_eq!(rig.answered(), [(7, UrbStatus::NoDevice)]);
    assert_eq!(rig.rescans, 1);
}

#[test]
fn closing_ends_every_urb_once_held_and_unlinked_ones_too() {
    let mut rig = Rig::new(Direction::In);
    for id in 0..3 {
        rig.submit(id, 512, 0);
    }
    rig.cancel(1);
    rig.submit(3, 512, 0);
    rig.close();
    let mut got = rig.answered();
    got.sort_by_key(|(id, _)| *id);
    assert_eq!(
        got,
        [
            (0, UrbStatus::NoDevice),
            (1, UrbStatus::Unlinked),
            (2, UrbStatus::NoDevice),
            (3, UrbStatus::NoDevice)
        ]
    );
    rig.submit(4, 512, 0);
    assert_eq!(rig.answers.last().unwrap().status, UrbStatus::NoDevice);
    assert!(rig.endpoint.is_empty());
}

#[test]
fn in_requests_are_whole_packets_and_overflow_and_short_not_ok_are_reported() {
    let mut rig = Rig::new(Direction::In);
    rig.submit(1, 1514, 0);
    rig.submit(2, 1024, transfer_flags::SHORT_NOT_OK);
    assert_eq!(rig.queued[0].0, 1536);
    rig.device_ends(Ok(()), Some(&[7; 1536]));
    rig.device_ends(Ok(()), Some(&[1; 100]));
    let got: Vec<_> = rig
        .answers
        .iter()
        .map(|c| (c.status, c.data.len()))
        .collect();
    assert_eq!(
        got,
        [(UrbStatus::Overflow, 1514), (UrbStatus::ShortPacket, 100)]
    );
}

/// A step of a driver and a device acting at once.
#[derive(Debug, Clone)]
enum Step {
    Submit {
        packets: u32,
        zlp: bool,
    },
    /// Unlinks the n-th URB submitted so far (wrapping).
    Unlink(usize),
    /// The oldest transfer ends; a cancelled one having moved some bytes if `partial`.
    DeviceEnds {
        partial: bool,
    },
    ClearHalt,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u32..3, any::<bool>()).prop_map(|(packets, zlp)| Step::Submit { packets, zlp }),
        2 => (0usize..64).prop_map(Step::Unlink),
        4 => any::<bool>().prop_map(|partial| Step::DeviceEnds { partial }),
        1 => Just(Step::ClearHalt),
    ]
}

proptest! {
    /// Whatever the interleaving: every URB is answered exactly once; only an unlink, a
    /// partial move under a cancel, or the close makes it anything but a success; successes
    /// are answered in submission order; no OUT URB's data reaches the device twice.
    #[test]
    fn every_urb_is_answered_once_in_order_and_never_sent_twice(
        steps in proptest::collection::vec(step(), 1..80),
        out in any::<bool>(),
    ) {
        let mut rig = Rig::new(if out { Direction::Out } else { Direction::In });
        let mut next = 0u32;
        let mut submitted = Vec::new();
        let mut unlinked = Vec::new();
        for s in steps {
            match s {
                Step::Submit { packets, zlp } => {
                    let flags = if zlp { transfer_flags::ZERO_PACKET } else { 0 };
                    // OUT: whole packets when a zero-length packet may follow; IN: never
                    // shorter than what the model device may send.
                    let odd = u32::from(!zlp || !out) * 7;
                    rig.submit(next, packets * MPS as u32 + odd, flags);
                    submitted.push(next);
                    next += 1;
                }
                Step::Unlink(n) if !submitted.is_empty() => {
                    let id = submitted[n % submitted.len()];
                    unlinked.push(id);
                    rig.cancel(id);
                }
                Step::Unlink(_) => {}
                Step::DeviceEnds { partial } if !rig.endpoint.is_empty() => {
                    let moved = [0u8; 3];
                    rig.device_ends(Ok(()), partial.then_some(&moved[..]));
                }
                Step::DeviceEnds { .. } => {}
                Step::ClearHalt => {
                    // A halt clear ends (as unlinked) whatever was queued before it.
                    unlinked.extend(&submitted);
                    rig.clear_halt(10_000 + next);
                    next += 1;
                }
            }
        }
        rig.close();

        let mut count = BTreeMap::new();
        for c in &rig.answers {
            *count.entry(c.id.0).or_insert(0) += 1;
        }
        for id in &submitted {
            prop_assert_eq!(count.get(id), Some(&1), "URB {} answered once", id);
        }
        prop_assert!(count.values().all(|&n| n == 1));
        let oks: Vec<u32> = rig
            .answers
            .iter()
            .filter(|c| c.status == UrbStatus::Ok && c.id.0 < 10_000)
            .map(|c| c.id.0)
            .collect();
        prop_assert!(oks.windows(2).all(|w| w[0] < w[1]), "successes in order: {:?}", oks);
        for c in rig.answers.iter().filter(|c| c.id.0 < 10_000) {
            match c.status {
                UrbStatus::Ok | UrbStatus::NoDevice => {}
                // Asked, or a bystander that had moved data (logged).
                UrbStatus::Unlinked => {}
                other => prop_assert!(false, "URB {} ended {:?}", c.id.0, other),
            }
        }
        // Each URB's data stage completed on the device at most once.
        let mut seen = BTreeMap::new();
        for d in rig.delivered.iter().filter(|d| !d.is_empty()) {
            *seen.entry(d.clone()).or_insert(0) += 1;
        }
        prop_assert!(seen.values().all(|&n| n == 1), "an OUT URB's data went twice");
        // A URB nobody unlinked (nor drained for a halt clear) is reported Unlinked only
        // when a cancel caught it mid-way.
        let asked: std::collections::BTreeSet<u32> = unlinked.into_iter().collect();
        let bystanders = rig
            .answers
            .iter()
            .filter(|c| c.status == UrbStatus::Unlinked && !asked.contains(&c.id.0))
            .count();
        prop_assert!(bystanders <= rig.partial_moves);
    }
}
