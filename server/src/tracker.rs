//! The URB tracker: what the server knows about the URBs of one URB stream, with no I/O.
//!
//! Client messages and device completions go in; device actions (submit, cancel) and messages
//! for the client come out, in the order the protocol promises: a URB's `Complete` always
//! precedes its `UnlinkDone`, an unlink of a URB we no longer hold is answered at once, and a
//! peer that breaks the rules gets a typed [`Violation`] instead of a panic or a hang.
//!
//! The session reads every frame as it arrives (the client keeps the stream within the URB
//! window, [`protocol::wire::window`]), so an unlink is seen whatever is queued. At most
//! `depth` URBs run on the device at once; later ones wait here in order, and an unlink of a
//! waiting URB is answered at once without the device ever seeing it.
//!
//! A URB sent with `SubmitAfter` also waits, at the head of the queue and holding the ones
//! behind it, until the session reports how the URB it names ended
//! ([`StreamTracker::gated_on`], [`StreamTracker::open_gate`]); every URB's ending is reported
//! for that ([`StreamTracker::poll_outcome`]), whether the device, an unlink or a gate ended it.

use std::collections::{HashMap, VecDeque};

use protocol::usb::{Direction, EndpointNumber, UrbStatus};
use protocol::wire::{
    ServerTiming, URB_WINDOW, URB_WINDOW_BYTES, UrbClientMessage, UrbComplete, UrbId,
    UrbServerMessage, UrbStreamOpen, UrbSubmit, urb_bytes,
};

/// What the device should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceAction {
    /// Start this URB.
    Submit(UrbSubmit),
    /// Cancel this URB, still in flight.
    Cancel(UrbId),
}

/// A client message that breaks the protocol; the connection is closed over it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A second `Open` on a stream.
    #[error("the stream was already opened")]
    Reopen,
    /// A submission for another endpoint than the stream's.
    #[error(
        "URB {id:?} names endpoint {endpoint} {direction:?} on the stream of endpoint {stream_endpoint} {stream_direction:?}"
    )]
    WrongEndpoint {
        /// The URB.
        id: UrbId,
        /// What it names.
        endpoint: u8,
        /// Its direction.
        direction: Direction,
        /// The stream's endpoint.
        stream_endpoint: u8,
        /// The stream's direction.
        stream_direction: Direction,
    },
    /// An id already in flight.
    #[error("URB {0:?} is already in flight")]
    DuplicateId(UrbId),
    /// More URBs outstanding than the URB window (the client ignored it).
    #[error("more than {0} URBs outstanding on one stream")]
    QueueFull(usize),
    /// More buffer bytes outstanding than the URB window allows.
    #[error("more than {0} bytes of URB buffers outstanding on one stream")]
    WindowBytes(u64),
    /// A `SubmitAfter` for an OUT or control URB: only IN phases are sent to follow another
    /// (read-ahead's), so the server never holds a peer's data waiting for an id.
    #[error("URB {0:?} is sent to follow another but is not an IN transfer")]
    OrderedNotIn(UrbId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Behind `depth` others: not on the device yet.
    Waiting,
    Running,
    Cancelling,
}

#[derive(Debug)]
struct InFlight {
    state: State,
    arrived_us: u64,
    /// When it went to the device (its arrival unless it waited).
    started_us: u64,
    bytes: u64,
}

/// The bookkeeping of one URB stream.
#[derive(Debug)]
pub struct StreamTracker {
    endpoint: EndpointNumber,
    direction: Direction,
    depth: usize,
    timing: bool,
    in_flight: HashMap<UrbId, InFlight>,
    /// Waiting URBs, in arrival order, each with the URB it must follow, if any.
    waiting: VecDeque<(UrbSubmit, Option<UrbId>)>,
    /// Running or cancelling on the device.
    running: usize,
    bytes: u64,
    actions: VecDeque<DeviceAction>,
    messages: VecDeque<UrbServerMessage>,
    /// How each URB ended (id, succeeded), for the URBs of other streams that follow one.
    outcomes: VecDeque<(UrbId, bool)>,
}

impl StreamTracker {
    /// A tracker for the stream `open` names, running at most `depth` URBs on the device at
    /// once, adding server timing to completions when `timing` was negotiated.
    pub fn new(open: &UrbStreamOpen, depth: usize, timing: bool) -> Self {
        StreamTracker {
            endpoint: open.endpoint,
            direction: open.direction,
            depth: depth.max(1),
            timing,
            in_flight: HashMap::new(),
            waiting: VecDeque::new(),
            running: 0,
            bytes: 0,
            actions: VecDeque::new(),
            messages: VecDeque::new(),
            outcomes: VecDeque::new(),
        }
    }

    /// URBs submitted and not yet completed, waiting or on the device.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// URBs on the device now.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Takes a client message that arrived at `now_us` (any monotonic microsecond clock).
    pub fn on_client(&mut self, msg: UrbClientMessage, now_us: u64) -> Result<(), Violation> {
        match msg {
            UrbClientMessage::Open(_) => Err(Violation::Reopen),
            UrbClientMessage::Submit(urb) => self.on_submit(urb, None, now_us),
            UrbClientMessage::SubmitAfter { after, urb } => {
                self.on_submit(urb, Some(after), now_us)
            }
            UrbClientMessage::Unlink(id) => {
                match self.in_flight.get_mut(&id).map(|u| u.state.clone()) {
                    Some(State::Running) => {
                        if let Some(urb) = self.in_flight.get_mut(&id) {
                            urb.state = State::Cancelling;
                        }
                        self.actions.push_back(DeviceAction::Cancel(id));
                    }
                    Some(State::Waiting) => {
                        // Never reached the device: cancelled here and now.
                        self.waiting.retain(|(u, _)| u.id != id);
                        self.finish(completion(id, UrbStatus::Unlinked), true, now_us);
                        // It may have been a gated head holding the rest back.
                        self.start_waiting(now_us);
                    }
                    // A second unlink of the same URB adds nothing.
                    Some(State::Cancelling) => {}
                    None => self.messages.push_back(UrbServerMessage::UnlinkDone {
                        id,
                        cancelled: false,
                    }),
                }
                Ok(())
            }
        }
    }

    fn on_submit(
        &mut self,
        urb: UrbSubmit,
        after: Option<UrbId>,
        now_us: u64,
    ) -> Result<(), Violation> {
        let control_stream = self.endpoint == EndpointNumber::CONTROL;
        let same_endpoint =
            urb.endpoint == self.endpoint && (control_stream || urb.direction == self.direction);
        if !same_endpoint {
            return Err(Violation::WrongEndpoint {
                id: urb.id,
                endpoint: urb.endpoint.get(),
                direction: urb.direction,
                stream_endpoint: self.endpoint.get(),
                stream_direction: self.direction,
            });
        }
        if self.in_flight.contains_key(&urb.id) {
            return Err(Violation::DuplicateId(urb.id));
        }
        let ordered_in = urb.direction == Direction::In
            && urb.data.is_empty()
            && self.endpoint != EndpointNumber::CONTROL;
        if after.is_some() && !ordered_in {
            return Err(Violation::OrderedNotIn(urb.id));
        }
        if self.in_flight.len() >= URB_WINDOW {
            return Err(Violation::QueueFull(URB_WINDOW));
        }
        let bytes = urb_bytes(&urb);
        if !self.in_flight.is_empty() && self.bytes + bytes > URB_WINDOW_BYTES {
            return Err(Violation::WindowBytes(URB_WINDOW_BYTES));
        }
        self.bytes += bytes;
        self.in_flight.insert(
            urb.id,
            InFlight {
                state: State::Waiting,
                arrived_us: now_us,
                started_us: now_us,
                bytes,
            },
        );
        self.waiting.push_back((urb, after));
        self.start_waiting(now_us);
        Ok(())
    }

    /// The URB whose end the queue's head waits for, if it waits for one.
    pub fn gated_on(&self) -> Option<UrbId> {
        self.waiting.front().and_then(|(_, after)| *after)
    }

    /// The URB [`Self::gated_on`] names ended, successfully if `ok`: the head may run now, or,
    /// after a failure, never reaches the device and completes `Unlinked` (the device would
    /// not be in the state it was sent for).
    pub fn open_gate(&mut self, ok: bool, now_us: u64) {
        let Some((urb, after)) = self.waiting.front_mut() else {
            return;
        };
        if after.take().is_none() || ok {
            self.start_waiting(now_us);
            return;
        }
        let id = urb.id;
        self.waiting.pop_front();
        // Its whole life was the wait here: timing reports it as queued, none on the device.
        if let Some(u) = self.in_flight.get_mut(&id) {
            u.started_us = now_us;
        }
        self.finish(completion(id, UrbStatus::Unlinked), false, now_us);
        self.start_waiting(now_us);
    }

    /// Moves waiting URBs to the device while fewer than `depth` run there, up to one that
    /// waits for another URB.
    fn start_waiting(&mut self, now_us: u64) {
        while self.running < self.depth
            && self.gated_on().is_none()
            && let Some((urb, _)) = self.waiting.pop_front()
        {
            if let Some(u) = self.in_flight.get_mut(&urb.id) {
                u.state = State::Running;
                u.started_us = now_us;
            }
            self.running += 1;
            self.actions.push_back(DeviceAction::Submit(urb));
        }
    }

    /// Takes a device completion at `now_us`. A completion for a URB this stream does not have
    /// on the device is dropped and reported as `false` (a device bug, never the client's
    /// doing).
    pub fn on_complete(&mut self, done: UrbComplete, now_us: u64) -> bool {
        let on_device = self
            .in_flight
            .get(&done.id)
            .is_some_and(|u| u.state != State::Waiting);
        if !on_device {
            return false;
        }
        self.running -= 1;
        self.finish(done, false, now_us);
        self.start_waiting(now_us);
        true
    }

    /// Reports a URB's end to the client and forgets it.
    fn finish(&mut self, mut done: UrbComplete, unlinked_here: bool, now_us: u64) {
        let Some(urb) = self.in_flight.remove(&done.id) else {
            return;
        };
        self.bytes -= urb.bytes;
        if self.timing {
            let us = |d: u64| u32::try_from(d).unwrap_or(u32::MAX);
            done.timing = Some(ServerTiming {
                queued_us: us(urb.started_us.saturating_sub(urb.arrived_us)),
                device_us: us(now_us.saturating_sub(urb.started_us)),
            });
        }
        let id = done.id;
        self.outcomes.push_back((id, done.status == UrbStatus::Ok));
        let cancelled = done.status == UrbStatus::Unlinked;
        self.messages.push_back(UrbServerMessage::Complete(done));
        if unlinked_here || urb.state == State::Cancelling {
            self.messages
                .push_back(UrbServerMessage::UnlinkDone { id, cancelled });
        }
    }

    /// The next thing the device should do.
    pub fn poll_action(&mut self) -> Option<DeviceAction> {
        self.actions.pop_front()
    }

    /// The next message for the client.
    pub fn poll_message(&mut self) -> Option<UrbServerMessage> {
        self.messages.pop_front()
    }

    /// How the next URB ended (id, succeeded), oldest first.
    pub fn poll_outcome(&mut self) -> Option<(UrbId, bool)> {
        self.outcomes.pop_front()
    }

    /// The URBs still in flight, for completing them when the device is gone.
    pub fn in_flight_ids(&self) -> Vec<UrbId> {
        self.in_flight.keys().copied().collect()
    }

    /// Completes every URB still in flight with `status` (the device is gone and will not).
    pub fn fail_all(&mut self, status: UrbStatus, now_us: u64) {
        self.waiting.clear();
        self.running = 0;
        self.actions
            .retain(|a| !matches!(a, DeviceAction::Submit(_)));
        for id in self.in_flight_ids() {
            self.finish(completion(id, status), false, now_us);
        }
    }
}

/// A completion that moved no data.
pub fn completion(id: UrbId, status: UrbStatus) -> UrbComplete {
    UrbComplete {
        id,
        status,
        actual_length: 0,
        data: Vec::new(),
        iso: None,
        timing: None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use protocol::usb::TransferType;
    use protocol::wire::AttachHandle;

    fn ep(n: u8) -> EndpointNumber {
        EndpointNumber::new(n).unwrap()
    }

    pub(crate) fn open(n: u8, direction: Direction) -> UrbStreamOpen {
        UrbStreamOpen {
            handle: AttachHandle(1),
            endpoint: ep(n),
            direction,
        }
    }

    fn bulk_in(id: u32) -> UrbClientMessage {
        UrbClientMessage::Submit(UrbSubmit {
            id: UrbId(id),
            endpoint: ep(1),
            direction: Direction::In,
            transfer_type: TransferType::Bulk,
            flags: 0,
            setup: None,
            length: 512,
            data: vec![],
            interval: 0,
            iso: None,
        })
    }

    fn drain(t: &mut StreamTracker) -> (Vec<DeviceAction>, Vec<UrbServerMessage>) {
        let actions = std::iter::from_fn(|| t.poll_action()).collect();
        let messages = std::iter::from_fn(|| t.poll_message()).collect();
        (actions, messages)
    }

    #[test]
    fn many_in_flight_complete_in_any_order_with_timing() {
        let mut t = StreamTracker::new(&open(1, Direction::In), 8, true);
        for id in 0..4 {
            t.on_client(bulk_in(id), 100).unwrap();
        }
        let (actions, messages) = drain(&mut t);
        assert_eq!(actions.len(), 4);
        assert!(messages.is_empty());
        for id in [2, 0, 3, 1] {
            assert!(t.on_complete(completion(UrbId(id), UrbStatus::Ok), 350));
        }
        let (_, messages) = drain(&mut t);
        let ids: Vec<u32> = messages
            .iter()
            .map(|m| match m {
                UrbServerMessage::Complete(c) => {
                    assert_eq!(c.timing.unwrap().device_us, 250);
                    c.id.0
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(ids, vec![2, 0, 3, 1]);
        assert_eq!(t.in_flight(), 0);
    }

    /// A bulk IN read on endpoint 1 sent to follow URB `after`.
    pub(crate) fn after(id: u32, after: u32) -> UrbClientMessage {
        let UrbClientMessage::Submit(urb) = bulk_in(id) else {
            unreachable!()
        };
        UrbClientMessage::SubmitAfter {
            after: UrbId(after),
            urb,
        }
    }

    #[test]
    fn a_urb_sent_after_another_holds_the_queue_until_its_gate_opens() {
        let mut t = StreamTracker::new(&open(1, Direction::In), 8, false);
        t.on_client(after(0xffff_ffff, 10), 0).unwrap();
        t.on_client(after(0xffff_fffe, 10), 0).unwrap();
        t.on_client(bulk_in(11), 0).unwrap();
        assert_eq!(t.gated_on(), Some(UrbId(10)));
        let (actions, messages) = drain(&mut t);
        assert!(actions.is_empty() && messages.is_empty(), "{actions:?}");
        t.open_gate(true, 5);
        assert_eq!(t.gated_on(), Some(UrbId(10)), "the second waits its turn");
        t.open_gate(true, 5);
        assert_eq!(t.gated_on(), None);
        let (actions, _) = drain(&mut t);
        let ids: Vec<u32> = actions
            .iter()
            .map(|a| match a {
                DeviceAction::Submit(u) => u.id.0,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, vec![0xffff_ffff, 0xffff_fffe, 11], "in arrival order");
    }

    #[test]
    fn a_refused_urb_reports_its_wait_as_queued_not_device_time() {
        let mut t = StreamTracker::new(&open(1, Direction::In), 8, true);
        t.on_client(after(0xffff_ffff, 10), 100).unwrap();
        t.open_gate(false, 350);
        let (_, messages) = drain(&mut t);
        let UrbServerMessage::Complete(c) = &messages[0] else {
            panic!("{messages:?}")
        };
        let timing = c.timing.unwrap();
        assert_eq!((timing.queued_us, timing.device_us), (250, 0));
    }

    #[test]
    fn a_gate_that_fails_never_lets_its_urb_reach_the_device() {
        let mut t = StreamTracker::new(&open(1, Direction::In), 8, false);
        t.on_client(after(0xffff_ffff, 10), 0).unwrap();
        t.on_client(after(0xffff_fffe, 10), 0).unwrap();
        t.open_gate(false, 1);
        t.open_gate(false, 1);
        let (actions, messages) = drain(&mut t);
        assert!(actions.is_empty(), "{actions:?}");
        assert_eq!(messages.len(), 2);
        assert!(
            messages.iter().all(|m| matches!(m,
            UrbServerMessage::Complete(c) if c.status == UrbStatus::Unlinked && c.data.is_empty()))
        );
        assert_eq!(t.in_flight(), 0);
        // An unlink of one still gated is answered at once, like any waiting URB's.
        t.on_client(after(0xffff_fffd, 12), 2).unwrap();
        t.on_client(UrbClientMessage::Unlink(UrbId(0xffff_fffd)), 2)
            .unwrap();
        let (actions, messages) = drain(&mut t);
        assert!(actions.is_empty());
        assert_eq!(
            messages[1],
            UrbServerMessage::UnlinkDone {
                id: UrbId(0xffff_fffd),
                cancelled: true
            }
        );
        assert_eq!(t.gated_on(), None);
    }

    #[test]
    fn unlinking_a_gated_head_lets_the_urbs_behind_it_run() {
        let mut t = StreamTracker::new(&open(1, Direction::In), 8, false);
        t.on_client(after(0xffff_ffff, 10), 0).unwrap();
        t.on_client(bulk_in(11), 0).unwrap();
        assert!(drain(&mut t).0.is_empty());
        t.on_client(UrbClientMessage::Unlink(UrbId(0xffff_ffff)), 1)
            .unwrap();
        let (actions, _) = drain(&mut t);
        assert!(
            matches!(&actions[..], [DeviceAction::Submit(u)] if u.id == UrbId(11)),
            "{actions:?}"
        );
        let outcomes: Vec<_> = std::iter::from_fn(|| t.poll_outcome()).collect();
        assert_eq!(
            outcomes,
            vec![(UrbId(0xffff_ffff), false)],
            "its ending is reported"
        );
    }

    #[test]
    fn only_in_urbs_may_be_sent_to_follow_another() {
        let mut t = StreamTracker::new(&open(2, Direction::Out), 8, false);
        let out = UrbClientMessage::SubmitAfter {
            after: UrbId(1),
            urb: UrbSubmit {
                id: UrbId(2),
                endpoint: ep(2),
                direction: Direction::Out,
                transfer_type: TransferType::Bulk,
                flags: 0,
                setup: None,
                length: 3,
                data: vec![1, 2, 3],
                interval: 0,
                iso: None,
            },
        };
        assert_eq!(t.on_client(out, 0), Err(Violation::OrderedNotIn(UrbId(2))));
    }

    #[test]
    fn unlink_of_a_running_urb_cancels_it_and_answers_after_its_completion() {
        let mut t = StreamTracker::new(&open(1, Direction::In), 8, false);
        t.on_client(bulk_in(7), 0).unwrap();
        t.on_client(UrbClientMessage::Unlink(UrbId(7)), 0).unwrap();
        t.on_client(UrbClientMessage::Unlink(UrbId(7)), 0).unwrap();
        let (actions, messages) = drain(&mut t);
        assert_eq!(actions[1], DeviceAction::Cancel(UrbId(7)));
        assert_eq!(actions.len(), 2, "a second unlink adds nothing");
        assert!(messages.is_empty(), "nothing until the device answers");
        t.on_complete(completion(UrbId(7), UrbStatus::Unlinked), 1);
        let (_, messages) = drain(&mut t);
        assert!(
            matches!(&messages[0], UrbServerMessage::Complete(c) if c.status == UrbStatus::Unlinked)
        );
        assert_eq!(
            messages[1],
            UrbServerMessage::UnlinkDone {
                id: UrbId(7),
                cancelled: true
            }
        );
    }

    #[test]
    fn unlink_that_loses_the_race_reports_the_real_result() {
        let mut t = StreamTracker::new(&open(1, Direction::In), 8, false);
        t.on_client(bulk_in(7), 0).unwrap();
        t.on_client(UrbClientMessage::Unlink(UrbId(7)), 0).unwrap();
        t.on_complete(completion(UrbId(7), UrbStatus::Ok), 1);
        let (_, messages) = drain(&mut t);
        assert!(matches!(&messages[0], UrbServerMessage::Complete(c) if c.status == UrbStatus::Ok));
        assert_eq!(
            messages[1],
            UrbServerMessage::UnlinkDone {
                id: UrbId(7),
                cancelled: false
            }
        );
    }

    #[test]
    fn unlink_of_an_unknown_urb_is_answered_at_once() {
        let mut t = StreamTracker::new(&open(1, Direction::In), 8, false);
        t.on_client(UrbClientMessage::Unlink(UrbId(9)), 0).unwrap();
        let (actions, messages) = drain(&mut t);
        assert!(actions.is_empty());
        assert_eq!(
            messages,
            vec![UrbServerMessage::UnlinkDone {
                id: UrbId(9),
                cancelled: false
            }]
        );
    }

    #[test]
    fn violations_are_typed() {
        let mut t = StreamTracker::new(&open(1, Direction::In), 2, false);
        assert_eq!(
            t.on_client(UrbClientMessage::Open(open(1, Direction::In)), 0),
            Err(Violation::Reopen)
        );
        t.on_client(bulk_in(1), 0).unwrap();
        assert_eq!(
            t.on_client(bulk_in(1), 0),
            Err(Violation::DuplicateId(UrbId(1)))
        );
        for id in 2..URB_WINDOW as u32 + 1 {
            t.on_client(bulk_in(id), 0).unwrap();
        }
        assert_eq!(t.running(), 2, "the device runs `depth`; the rest wait");
        assert_eq!(
            t.on_client(bulk_in(1000), 0),
            Err(Violation::QueueFull(URB_WINDOW))
        );
        let mut big = StreamTracker::new(&open(1, Direction::In), 2, false);
        let huge = |id| match bulk_in(id) {
            UrbClientMessage::Submit(mut u) => {
                u.length = 4 * 1024 * 1024;
                UrbClientMessage::Submit(u)
            }
            other => other,
        };
        for id in 0..8 {
            big.on_client(huge(id), 0).unwrap();
        }
        assert_eq!(
            big.on_client(huge(8), 0),
            Err(Violation::WindowBytes(URB_WINDOW_BYTES))
        );
        let mut out = StreamTracker::new(&open(2, Direction::Out), 2, false);
        assert!(matches!(
            out.on_client(bulk_in(1), 0),
            Err(Violation::WrongEndpoint { .. })
        ));
    }

    #[test]
    fn urbs_past_the_depth_wait_in_order_and_an_unlink_of_one_is_answered_at_once() {
        let mut t = StreamTracker::new(&open(1, Direction::In), 2, true);
        for id in 0..5 {
            t.on_client(bulk_in(id), 10).unwrap();
        }
        let (actions, _) = drain(&mut t);
        assert_eq!(actions.len(), 2, "only `depth` go to the device");
        // The unlink of a waiting URB never reaches the device.
        t.on_client(UrbClientMessage::Unlink(UrbId(3)), 20).unwrap();
        let (actions, messages) = drain(&mut t);
        assert!(actions.is_empty());
        assert!(
            matches!(&messages[0], UrbServerMessage::Complete(c) if c.id == UrbId(3) && c.status == UrbStatus::Unlinked)
        );
        assert_eq!(
            messages[1],
            UrbServerMessage::UnlinkDone {
                id: UrbId(3),
                cancelled: true
            }
        );
        // A completion lets the next waiting one (2, then 4) start, with its wait timed.
        assert!(
            !t.on_complete(completion(UrbId(2), UrbStatus::Ok), 25),
            "a waiting URB cannot complete"
        );
        t.on_complete(completion(UrbId(0), UrbStatus::Ok), 30);
        t.on_complete(completion(UrbId(1), UrbStatus::Ok), 40);
        let (actions, _) = drain(&mut t);
        let started: Vec<UrbId> = actions
            .iter()
            .map(|a| match a {
                DeviceAction::Submit(u) => u.id,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(started, vec![UrbId(2), UrbId(4)]);
        t.on_complete(completion(UrbId(2), UrbStatus::Ok), 100);
        let (_, messages) = drain(&mut t);
        let UrbServerMessage::Complete(c) = &messages[0] else {
            panic!("expected a completion");
        };
        assert_eq!(
            c.timing,
            Some(ServerTiming {
                queued_us: 20,
                device_us: 70
            })
        );
    }

    #[test]
    fn the_control_stream_takes_both_directions() {
        let mut t = StreamTracker::new(&open(0, Direction::Out), 4, false);
        for (id, direction) in [(1, Direction::In), (2, Direction::Out)] {
            let msg = UrbClientMessage::Submit(UrbSubmit {
                id: UrbId(id),
                endpoint: EndpointNumber::CONTROL,
                direction,
                transfer_type: TransferType::Control,
                flags: 0,
                setup: Some(Default::default()),
                length: 0,
                data: vec![],
                interval: 0,
                iso: None,
            });
            t.on_client(msg, 0).unwrap();
        }
        assert_eq!(t.in_flight(), 2);
    }

    #[test]
    fn failing_all_completes_every_urb_once() {
        let mut t = StreamTracker::new(&open(1, Direction::In), 8, false);
        for id in 0..3 {
            t.on_client(bulk_in(id), 0).unwrap();
        }
        t.on_client(UrbClientMessage::Unlink(UrbId(1)), 0).unwrap();
        t.fail_all(UrbStatus::NoDevice, 5);
        assert!(
            !t.on_complete(completion(UrbId(0), UrbStatus::Ok), 6),
            "late completion dropped"
        );
        let (_, messages) = drain(&mut t);
        let completes = messages
            .iter()
            .filter(
                |m| matches!(m, UrbServerMessage::Complete(c) if c.status == UrbStatus::NoDevice),
            )
            .count();
        assert_eq!(completes, 3);
        assert!(messages.contains(&UrbServerMessage::UnlinkDone {
            id: UrbId(1),
            cancelled: false
        }));
    }
}
