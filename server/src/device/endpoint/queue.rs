//! The endpoint queue: every URB of one bulk or interrupt endpoint, as a state machine.
//!
//! It takes the client's submits, unlinks and halt clears and the endpoint's completions, and
//! answers with [`Action`]s: transfers to queue, "cancel all", a halt to clear, completions to
//! send. No I/O and no runtime, so every race between a driver's unlink and a device's
//! completion is a plain unit test; [`super::run_endpoint`] carries the actions out on nusb.
//!
//! Why it is intricate: usbfs (and nusb) can only cancel *all* transfers of an endpoint. To
//! unlink exactly one, a **cancel round** cancels all, reports the one asked for as `Unlinked`
//! and requeues the others that had not moved any data, in their order, holding new work back
//! until the round's transfers are all reaped. One that had moved part of its data cannot be
//! repeated safely; it is reported `Unlinked` with what moved (a warning is logged). Class
//! drivers unlink when they are aborting the endpoint anyway. Unlinks that arrive during a
//! round join it, so a driver unlinking its ~60 receive URBs costs one or two rounds, not 60.

use std::collections::VecDeque;

use nusb::transfer::{Buffer, Completion, TransferError};
use protocol::usb::{Direction, UrbStatus, transfer_flags};
use protocol::wire::{UrbComplete, UrbId, UrbSubmit};
use tracing::warn;

use crate::tracker::completion;

/// What the queue asks its driver to do, in order.
#[derive(Debug)]
pub enum Action<R> {
    /// Queue this transfer behind the endpoint's others.
    Submit(Buffer),
    /// Cancel every transfer on the endpoint; each still completes, in order.
    CancelAll,
    /// Send CLEAR_FEATURE(ENDPOINT_HALT) now (the endpoint is idle) and report the outcome
    /// with [`EndpointQueue::halt_cleared`].
    ClearHalt,
    /// A URB is finished: send its completion to its reply channel.
    Complete(R, UrbComplete),
    /// The device looks unplugged: worth a rescan now rather than waiting for udev.
    Rescan,
}

/// One transfer on the endpoint, in the endpoint's order. A URB is one transfer, or two when a
/// zero-length packet ends it.
struct Part<R> {
    id: UrbId,
    /// The URB's own length (IN requests are rounded up to whole packets for usbfs).
    length: u32,
    /// Where the URB's completion goes: held by the URB's last part (its zero-length packet,
    /// if it has one); `None` once answered or for a data stage.
    reply: Option<R>,
    /// Bytes moved by the data stage before this zero-length packet.
    moved_before: u32,
    /// A zero-length OUT packet follows this part and reports for the URB.
    zlp_follows: bool,
    /// The client asked for this URB to be unlinked (or it must not be requeued).
    unlink_asked: bool,
    /// URB_SHORT_NOT_OK: an IN transfer that ends short is an error (`-EREMOTEIO`).
    short_not_ok: bool,
}

/// Transfers cancelled together and not yet all reaped.
#[derive(Clone, Copy)]
struct Round {
    /// Completions still to come for the transfers that were on the endpoint at the cancel.
    remaining: usize,
    /// The status a cancelled transfer gets instead of being requeued: `Unlinked` while
    /// draining for a halt clear, `NoDevice` when the endpoint closes; `None` for an unlink.
    forced: Option<UrbStatus>,
}

/// Work that waits for a round (or a halt clear) to end, in the order it arrived.
enum Held<R> {
    Submit(UrbSubmit, R),
    ClearHalt(UrbId, R),
}

/// The queue of one endpoint. `R` is where a URB's completion goes (a channel sender in the
/// server, anything in a test).
pub struct EndpointQueue<R> {
    direction: Direction,
    max_packet_size: usize,
    parts: VecDeque<Part<R>>,
    round: Option<Round>,
    /// An unlink arrived for a URB queued after this round's cancel: cancel again after it.
    recancel: bool,
    held: VecDeque<Held<R>>,
    /// The CLEAR_HALT request waiting for the endpoint to drain, or being carried out.
    halt: Option<(UrbId, R)>,
    closed: bool,
    actions: VecDeque<Action<R>>,
}

impl<R> EndpointQueue<R> {
    /// An idle queue for an endpoint of this direction and wMaxPacketSize.
    pub fn new(direction: Direction, max_packet_size: usize) -> Self {
        EndpointQueue {
            direction,
            max_packet_size: max_packet_size.max(1),
            parts: VecDeque::new(),
            round: None,
            recancel: false,
            held: VecDeque::new(),
            halt: None,
            closed: false,
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do, oldest first.
    pub fn poll_action(&mut self) -> Option<Action<R>> {
        self.actions.pop_front()
    }

    /// Transfers the queue has put on the endpoint and not yet seen complete.
    pub fn in_flight(&self) -> usize {
        self.parts.len()
    }

    /// Runs a URB: now, or after the round or halt clear in progress.
    pub fn submit(&mut self, urb: UrbSubmit, reply: R) {
        if self.closed {
            self.answer(reply, completion(urb.id, UrbStatus::NoDevice));
        } else if self.busy() {
            self.held.push_back(Held::Submit(urb, reply));
        } else {
            self.queue(urb, reply);
        }
    }

    /// Ends one URB early with `Unlinked`, if it has not finished; one already finished is
    /// not affected (the tracker answers that unlink).
    pub fn cancel(&mut self, id: UrbId) {
        if let Some(at) = self
            .held
            .iter()
            .position(|h| matches!(h, Held::Submit(urb, _) if urb.id == id))
        {
            // Never reached the device: nothing to cancel there.
            if let Some(Held::Submit(urb, reply)) = self.held.remove(at) {
                self.answer(reply, completion(urb.id, UrbStatus::Unlinked));
            }
            return;
        }
        let Some(pos) = self.parts.iter().position(|p| p.id == id) else {
            return;
        };
        for p in self.parts.iter_mut().filter(|p| p.id == id) {
            p.unlink_asked = true;
        }
        match self.round {
            None => self.start_round(None),
            // Queued or requeued after this round's cancel: it needs a round of its own.
            Some(round) if pos >= round.remaining => self.recancel = true,
            Some(_) => {}
        }
    }

    /// CLEAR_FEATURE(ENDPOINT_HALT), asked by the URB `id`. The kernel clears a halt with the
    /// endpoint idle, so anything still queued is ended (`Unlinked`) first.
    pub fn clear_halt(&mut self, id: UrbId, reply: R) {
        if self.closed {
            self.answer(reply, completion(id, UrbStatus::NoDevice));
        } else if self.busy() {
            self.held.push_back(Held::ClearHalt(id, reply));
        } else {
            self.halt = Some((id, reply));
            if self.parts.is_empty() {
                self.actions.push_back(Action::ClearHalt);
            } else {
                self.start_round(Some(UrbStatus::Unlinked));
            }
        }
    }

    /// The outcome of an [`Action::ClearHalt`]: `Ok`, `Stall` (refused) or `NoDevice`.
    pub fn halt_cleared(&mut self, status: UrbStatus) {
        if let Some((id, reply)) = self.halt.take() {
            if suggests_unplug(status) {
                self.actions.push_back(Action::Rescan);
            }
            self.answer(reply, completion(id, status));
        }
        self.release_held();
    }

    /// The endpoint's next completion, which belongs to the oldest transfer.
    pub fn completed(&mut self, c: Completion) {
        // A cancel outside a round is the kernel's, not ours: usbfs kills a device's URBs
        // (-ENOENT) as it is unplugged or its interface is taken away. Such a transfer is
        // neither repeated nor reported as an unlink the driver never asked for; the endpoint
        // is being shut down, which an HCD reports as -ESHUTDOWN.
        let forced = match self.round {
            Some(round) => round.forced,
            None => Some(UrbStatus::Shutdown),
        };
        if let Some(round) = &mut self.round {
            round.remaining = round.remaining.saturating_sub(1);
        }
        let requeue = forced.is_none()
            && matches!(c.status, Err(TransferError::Cancelled))
            && c.actual_len == 0
            && self.parts.front().is_some_and(|p| !p.unlink_asked);
        if requeue {
            // Cancelled only because usbfs cancels the whole endpoint: nothing moved, so it is
            // safe to queue again, behind the others being reaped, in the same order.
            if let Some(p) = self.parts.pop_front() {
                let mut buffer = c.buffer;
                if self.direction == Direction::In {
                    buffer.clear();
                }
                self.actions.push_back(Action::Submit(buffer));
                self.parts.push_back(p);
            }
        } else {
            self.finish(c, forced);
        }
        if self.round.is_some_and(|r| r.remaining == 0) {
            self.round = None;
            self.round_ended();
        }
    }

    /// The endpoint is being released (or its interface's alternate setting changes): every
    /// URB still to answer ends with `NoDevice` (or `Unlinked` if asked), each once. The
    /// driver keeps reaping until [`in_flight`](Self::in_flight) is 0, or calls
    /// [`abandon`](Self::abandon) when the endpoint has nothing more to give.
    pub fn close(&mut self) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        for held in std::mem::take(&mut self.held) {
            let (reply, id) = match held {
                Held::Submit(urb, reply) => (reply, urb.id),
                Held::ClearHalt(id, reply) => (reply, id),
            };
            self.answer(reply, completion(id, UrbStatus::NoDevice));
        }
        self.recancel = false;
        if !self.parts.is_empty() {
            self.start_round(Some(UrbStatus::NoDevice));
        } else if let Some((id, reply)) = self.halt.take() {
            self.answer(reply, completion(id, UrbStatus::NoDevice));
        }
    }

    /// Answers `NoDevice` for whatever the endpoint will never complete (none in practice).
    pub fn abandon(&mut self) {
        self.closed = true;
        for p in std::mem::take(&mut self.parts) {
            if let Some(reply) = p.reply {
                self.answer(reply, completion(p.id, UrbStatus::NoDevice));
            }
        }
        if let Some((id, reply)) = self.halt.take() {
            self.answer(reply, completion(id, UrbStatus::NoDevice));
        }
        self.round = None;
    }

    fn busy(&self) -> bool {
        self.round.is_some() || self.halt.is_some()
    }

    fn start_round(&mut self, forced: Option<UrbStatus>) {
        self.round = Some(Round {
            remaining: self.parts.len(),
            forced,
        });
        self.actions.push_back(Action::CancelAll);
    }

    fn round_ended(&mut self) {
        if self.closed {
            if let Some((id, reply)) = self.halt.take() {
                self.answer(reply, completion(id, UrbStatus::NoDevice));
            }
        } else if self.halt.is_some() {
            // Drained for the halt clear: the endpoint is idle now.
            self.actions.push_back(Action::ClearHalt);
        } else if std::mem::take(&mut self.recancel) {
            self.start_round(None);
        } else {
            self.release_held();
        }
    }

    fn release_held(&mut self) {
        while !self.busy()
            && let Some(held) = self.held.pop_front()
        {
            match held {
                Held::Submit(urb, reply) => self.queue(urb, reply),
                Held::ClearHalt(id, reply) => self.clear_halt(id, reply),
            }
        }
    }

    fn queue(&mut self, urb: UrbSubmit, reply: R) {
        let part = |length, zlp_follows, reply| Part {
            id: urb.id,
            length,
            reply,
            moved_before: 0,
            zlp_follows,
            unlink_asked: false,
            short_not_ok: urb.flags & transfer_flags::SHORT_NOT_OK != 0,
        };
        match self.direction {
            Direction::In => {
                // usbfs wants IN requests in whole packets; the URB's own length is kept to
                // report a device that sends more as an overflow.
                let mps = self.max_packet_size;
                let requested = (urb.length as usize).div_ceil(mps).max(1) * mps;
                self.actions
                    .push_back(Action::Submit(Buffer::new(requested)));
                self.parts.push_back(part(urb.length, false, Some(reply)));
            }
            Direction::Out => {
                let length = urb.data.len() as u32;
                let zlp = urb.flags & transfer_flags::ZERO_PACKET != 0
                    && length > 0
                    && urb.data.len().is_multiple_of(self.max_packet_size);
                self.actions
                    .push_back(Action::Submit(Buffer::from(urb.data)));
                if zlp {
                    self.parts.push_back(part(length, true, None));
                    self.actions.push_back(Action::Submit(Buffer::new(0)));
                    // It reports for the whole URB: its length is the URB's, not its own 0.
                    self.parts.push_back(part(length, false, Some(reply)));
                } else {
                    self.parts.push_back(part(length, false, Some(reply)));
                }
            }
        }
    }

    /// Reports the oldest transfer's completion (or keeps it for the zero-length packet that
    /// ends the URB). `forced` is the status for a transfer the queue itself cancelled.
    fn finish(&mut self, c: Completion, forced: Option<UrbStatus>) {
        let Some(p) = self.parts.pop_front() else {
            return;
        };
        let moved = p.moved_before + c.actual_len as u32;
        let mut status = match (c.status, forced) {
            (Ok(()), _) => UrbStatus::Ok,
            (Err(TransferError::Cancelled), _) if p.unlink_asked => UrbStatus::Unlinked,
            (Err(TransferError::Cancelled), Some(forced)) => forced,
            (Err(TransferError::Cancelled), None) => {
                warn!(id = ?p.id, moved, "URB cancelled with the endpoint after moving data; reported as unlinked");
                UrbStatus::Unlinked
            }
            (Err(e), _) => status_of(e),
        };
        if suggests_unplug(status) {
            self.actions.push_back(Action::Rescan);
        }
        let reply = if p.zlp_follows {
            // The URB's zero-length packet holds its reply. Looked up by id, not taken as the
            // next part: a close can come between requeueing the two parts.
            let Some(zlp) = self
                .parts
                .iter_mut()
                .find(|q| q.id == p.id && !q.zlp_follows)
            else {
                return; // already answered for the URB
            };
            if status == UrbStatus::Ok {
                zlp.moved_before = moved;
                return;
            }
            // The data stage failed: it answers for the URB, and its zero-length packet must
            // neither answer nor be requeued.
            zlp.unlink_asked = true;
            zlp.reply.take()
        } else {
            p.reply
        };
        let Some(reply) = reply else {
            return;
        };
        let result = if self.direction == Direction::In {
            let mut data = c.buffer.into_vec();
            data.truncate(c.actual_len);
            if data.len() > p.length as usize {
                data.truncate(p.length as usize);
                status = UrbStatus::Overflow;
            } else if p.short_not_ok && status == UrbStatus::Ok && data.len() < p.length as usize {
                // What a host controller does for URB_SHORT_NOT_OK; usbfs has no such flag.
                status = UrbStatus::ShortPacket;
            }
            UrbComplete {
                actual_length: data.len() as u32,
                data,
                ..completion(p.id, status)
            }
        } else {
            UrbComplete {
                actual_length: moved.min(p.length),
                ..completion(p.id, status)
            }
        };
        self.answer(reply, result);
    }

    fn answer(&mut self, reply: R, c: UrbComplete) {
        self.actions.push_back(Action::Complete(reply, c));
    }
}

/// Statuses a host controller gives transfers of a device that is being unplugged (dummy_hcd
/// and xHCI report EPROTO or ESHUTDOWN before usbfs reports ENODEV): worth a rescan now.
pub fn suggests_unplug(status: UrbStatus) -> bool {
    matches!(
        status,
        UrbStatus::NoDevice | UrbStatus::Protocol | UrbStatus::Shutdown
    )
}

/// The URB status a Linux host controller gives for nusb's transfer error.
pub fn status_of(e: TransferError) -> UrbStatus {
    match e {
        TransferError::Cancelled => UrbStatus::Unlinked,
        TransferError::Stall => UrbStatus::Stall,
        TransferError::Disconnected => UrbStatus::NoDevice,
        TransferError::Fault => UrbStatus::Protocol,
        TransferError::InvalidArgument => UrbStatus::Invalid,
        TransferError::Unknown(errno) => UrbStatus::from_errno(-(errno as i32)),
    }
}

#[cfg(test)]
mod tests;
