//! The per-endpoint worker: every URB of one bulk or interrupt endpoint, many in flight.
//!
//! The worker owns the endpoint through [`EndpointIo`] (nusb's `Endpoint` on a real device, a
//! scripted one in tests) and keeps every submitted URB in flight at once (usbfs queues them in
//! order), so mass storage streams and a network adapter's ~60 receive URBs all wait on the
//! device together. There is no depth limit here: the session bounds how many URBs a stream
//! may have.
//!
//! nusb can only cancel *all* transfers of an endpoint. To unlink exactly one, the worker cancels
//! all, reports the one asked for as `Unlinked`, and resubmits the others that had not moved
//! any data yet, holding back new submissions until they are requeued so order is kept. One that
//! had moved part of its data cannot be repeated safely; it is reported `Unlinked` with what
//! moved (a warning is logged). Class drivers unlink when they are aborting the endpoint anyway.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::task::{Context, Poll};

use nusb::transfer::{Buffer, BulkOrInterrupt, Completion, EndpointDirection, TransferError};
use protocol::usb::{Direction, EndpointNumber, UrbStatus, transfer_flags};
use protocol::wire::{UrbComplete, UrbId, UrbSubmit};
use tokio::sync::mpsc;
use tracing::warn;

use super::CompletionSender;
use crate::tracker::completion;

/// What the worker needs of an endpoint: nusb's `Endpoint` API, narrowed so a test can script
/// a device (stalls, short and oversized packets, disappearance) without a kernel.
pub trait EndpointIo: Send + 'static {
    /// The endpoint address (bit 7 set for IN).
    fn address(&self) -> u8;
    /// wMaxPacketSize: IN requests are whole packets.
    fn max_packet_size(&self) -> usize;
    /// Transfers submitted and not yet reaped.
    fn pending(&self) -> usize;
    /// Queues a transfer behind the others.
    fn submit(&mut self, buffer: Buffer);
    /// Asks every pending transfer to end; each still completes (as `Cancelled` if it had not).
    fn cancel_all(&mut self);
    /// The oldest pending transfer's completion, once it has one.
    fn poll_next_complete(&mut self, cx: &mut Context<'_>) -> Poll<Completion>;
    /// CLEAR_FEATURE(ENDPOINT_HALT) and the host-side toggle reset. A blocking ioctl on usbfs:
    /// the future runs it off the runtime's threads.
    fn clear_halt(&mut self) -> impl Future<Output = Result<(), HaltError>> + Send + 'static;
}

/// Why CLEAR_FEATURE(ENDPOINT_HALT) failed.
#[derive(Debug, thiserror::Error)]
pub enum HaltError {
    /// The device went away: the client's driver gets `-ENODEV`.
    #[error("the device is gone")]
    Disconnected,
    /// The device or usbfs refused the request: the client's driver sees a stall.
    #[error("the request failed: {0}")]
    Refused(#[source] std::io::Error),
}

impl From<nusb::Error> for HaltError {
    fn from(e: nusb::Error) -> Self {
        match e.kind() {
            nusb::ErrorKind::Disconnected => HaltError::Disconnected,
            _ => HaltError::Refused(e.into()),
        }
    }
}

impl<T, D> EndpointIo for nusb::Endpoint<T, D>
where
    T: BulkOrInterrupt + Send + 'static,
    D: EndpointDirection + Send + 'static,
{
    fn address(&self) -> u8 {
        self.endpoint_address()
    }
    fn max_packet_size(&self) -> usize {
        nusb::Endpoint::max_packet_size(self)
    }
    fn pending(&self) -> usize {
        nusb::Endpoint::pending(self)
    }
    fn submit(&mut self, buffer: Buffer) {
        nusb::Endpoint::submit(self, buffer)
    }
    fn cancel_all(&mut self) {
        nusb::Endpoint::cancel_all(self)
    }
    fn poll_next_complete(&mut self, cx: &mut Context<'_>) -> Poll<Completion> {
        nusb::Endpoint::poll_next_complete(self, cx)
    }
    fn clear_halt(&mut self) -> impl Future<Output = Result<(), HaltError>> + Send + 'static {
        // nusb's future for this is its blocking-call wrapper: with its `tokio` feature it runs
        // on the blocking pool (without it, awaiting it panicked: the bug this replaced).
        let call = std::future::IntoFuture::into_future(nusb::Endpoint::clear_halt(self));
        async move { call.await.map_err(HaltError::from) }
    }
}

/// Commands to an endpoint worker.
pub enum EpCmd {
    /// Run this URB; its completion goes to the sender.
    Submit(UrbSubmit, CompletionSender),
    /// End this URB early with `Unlinked`, if it is still in flight.
    Cancel(UrbId),
    /// Clear the endpoint's halt, answering the control URB that asked for it.
    ClearHalt(UrbId, CompletionSender),
}

impl EpCmd {
    /// Answers the command with `status` without running it (the worker is gone).
    pub fn refuse(self, status: UrbStatus) {
        match self {
            EpCmd::Submit(urb, done) => {
                let _ = done.send(completion(urb.id, status));
            }
            EpCmd::ClearHalt(id, done) => {
                let _ = done.send(completion(id, status));
            }
            EpCmd::Cancel(_) => {}
        }
    }
}

/// One transfer in flight, in submission order.
struct Pending {
    id: UrbId,
    /// The URB's own length (IN requests are rounded up to wMaxPacketSize for nusb).
    length: u32,
    done: CompletionSender,
    /// Bytes moved by an earlier part (the data stage before a zero-length packet).
    moved_before: u32,
    /// A zero-length OUT packet follows this part.
    zlp_follows: bool,
    /// The client asked for this URB to be cancelled.
    unlink_asked: bool,
    /// URB_SHORT_NOT_OK: an IN transfer that ends short is an error (`-EREMOTEIO`).
    short_not_ok: bool,
}

struct EndpointState<E> {
    ep: E,
    direction: Direction,
    pending: VecDeque<Pending>,
    /// Told when the device reports itself gone, so the source notices without udev.
    rescan: Arc<tokio::sync::Notify>,
    /// Transfers still to be reaped after a `cancel_all`; new work waits until then so the
    /// resubmitted ones keep their order.
    reaping: usize,
    /// An unlink arrived for a URB already requeued in this round: cancel again after it.
    recancel: bool,
    held: VecDeque<EpCmd>,
}

enum Event {
    Cmd(Option<EpCmd>),
    Done(Completion),
}

/// Runs one endpoint until its command channel closes, then ends whatever is in flight with
/// `NoDevice`, each URB exactly once.
pub async fn run_endpoint<E: EndpointIo>(
    ep: E,
    mut rx: mpsc::UnboundedReceiver<EpCmd>,
    rescan: Arc<tokio::sync::Notify>,
) {
    let (_, direction) = EndpointNumber::from_address(ep.address());
    let mut st = EndpointState {
        ep,
        direction,
        pending: VecDeque::new(),
        rescan,
        reaping: 0,
        recancel: false,
        held: VecDeque::new(),
    };
    loop {
        // Commands first: the unlinks a driver sends together then join one cancel round
        // before its reaping requeues the URBs they name.
        let event = poll_fn(|cx| {
            if let Poll::Ready(cmd) = rx.poll_recv(cx) {
                return Poll::Ready(Event::Cmd(cmd));
            }
            if st.ep.pending() > 0 {
                return st.ep.poll_next_complete(cx).map(Event::Done);
            }
            Poll::Pending
        })
        .await;
        match event {
            // Unlinks join the round in progress: a driver stopping an endpoint unlinks every
            // URB on it (usbnet ~60), and a round each would requeue the rest 60 times.
            Event::Cmd(Some(EpCmd::Cancel(id))) => st.cancel(id),
            Event::Cmd(Some(cmd)) if st.reaping > 0 => st.held.push_back(cmd),
            Event::Cmd(Some(cmd)) => st.command(cmd).await,
            Event::Cmd(None) => break,
            Event::Done(c) => {
                let was_reaping = st.reaping > 0;
                st.reaping = st.reaping.saturating_sub(1);
                st.completed(c);
                if was_reaping && st.reaping == 0 {
                    if std::mem::take(&mut st.recancel) {
                        st.cancel_round();
                    }
                    while st.reaping == 0
                        && let Some(cmd) = st.held.pop_front()
                    {
                        st.command(cmd).await;
                    }
                }
            }
        }
    }
    // The device is being released (or the interface's alternate setting changes): end
    // everything still in flight.
    st.ep.cancel_all();
    while st.ep.pending() > 0 {
        let c = poll_fn(|cx| st.ep.poll_next_complete(cx)).await;
        st.finish(c, Some(UrbStatus::NoDevice));
    }
    // Parts whose transfer never reached the device (none in practice) still answer once.
    while let Some(p) = st.pending.pop_front() {
        let _ = p.done.send(completion(p.id, UrbStatus::NoDevice));
    }
    for cmd in st.held {
        cmd.refuse(UrbStatus::NoDevice);
    }
}

impl<E: EndpointIo> EndpointState<E> {
    async fn command(&mut self, cmd: EpCmd) {
        match cmd {
            EpCmd::Submit(urb, done) => self.submit(urb, done),
            EpCmd::Cancel(id) => self.cancel(id),
            EpCmd::ClearHalt(id, done) => {
                // The kernel clears a halt with the endpoint idle; anything still queued is
                // ended first so usbfs accepts the request.
                if self.ep.pending() > 0 {
                    self.ep.cancel_all();
                    while self.ep.pending() > 0 {
                        let c = poll_fn(|cx| self.ep.poll_next_complete(cx)).await;
                        self.finish(c, Some(UrbStatus::Unlinked));
                    }
                }
                let status = match self.ep.clear_halt().await {
                    Ok(()) => UrbStatus::Ok,
                    Err(HaltError::Disconnected) => {
                        self.rescan.notify_one();
                        UrbStatus::NoDevice
                    }
                    Err(e) => {
                        warn!(endpoint = self.ep.address(), "CLEAR_FEATURE(HALT): {e}");
                        UrbStatus::Stall
                    }
                };
                let _ = done.send(completion(id, status));
            }
        }
    }

    /// Ends one URB early. nusb cancels the whole endpoint, so a round cancels all and requeues
    /// the others as they are reaped; an unlink during a round joins it.
    fn cancel(&mut self, id: UrbId) {
        let Some(pos) = self.pending.iter().position(|p| p.id == id) else {
            return; // already finished: the tracker answers the unlink
        };
        for p in self.pending.iter_mut().filter(|p| p.id == id) {
            p.unlink_asked = true;
        }
        if self.reaping == 0 {
            self.cancel_round();
        } else if pos >= self.reaping {
            // Requeued (or queued) after this round's cancel: it needs another round.
            self.recancel = true;
        }
    }

    fn cancel_round(&mut self) {
        self.reaping = self.ep.pending();
        self.ep.cancel_all();
    }

    fn submit(&mut self, urb: UrbSubmit, done: CompletionSender) {
        let mps = self.ep.max_packet_size().max(1);
        let part = |length, zlp_follows, done| Pending {
            id: urb.id,
            length,
            done,
            moved_before: 0,
            zlp_follows,
            unlink_asked: false,
            short_not_ok: urb.flags & transfer_flags::SHORT_NOT_OK != 0,
        };
        match self.direction {
            Direction::In => {
                // nusb (like usbfs) wants IN requests in whole packets; the true length is
                // kept to report a device that sends more as an overflow.
                let requested = (urb.length as usize).div_ceil(mps).max(1) * mps;
                self.ep.submit(Buffer::new(requested));
                self.pending.push_back(part(urb.length, false, done));
            }
            Direction::Out => {
                let length = urb.data.len() as u32;
                let zlp = urb.flags & transfer_flags::ZERO_PACKET != 0
                    && length > 0
                    && urb.data.len().is_multiple_of(mps);
                self.ep.submit(Buffer::from(urb.data));
                if zlp {
                    self.pending.push_back(part(length, true, done.clone()));
                    self.ep.submit(Buffer::new(0));
                    // It reports for the whole URB: its length is the URB's, not its own 0.
                    self.pending.push_back(part(length, false, done));
                } else {
                    self.pending.push_back(part(length, false, done));
                }
            }
        }
    }

    /// Handles the endpoint's next completion, which belongs to the front of `pending`.
    fn completed(&mut self, c: Completion) {
        let resubmit = matches!(c.status, Err(TransferError::Cancelled))
            && self.pending.front().is_some_and(|p| !p.unlink_asked)
            && c.actual_len == 0;
        if resubmit {
            // Cancelled only because nusb cancels the whole endpoint: nothing moved, so it is
            // safe to queue again, behind the others being reaped, in the same order.
            if let Some(p) = self.pending.pop_front() {
                let mut buffer = c.buffer;
                if self.direction == Direction::In {
                    buffer.clear();
                }
                self.ep.submit(buffer);
                self.pending.push_back(p);
            }
            return;
        }
        self.finish(c, None);
    }

    /// Reports a completion to the client (or holds it for the zero-length packet that ends
    /// the URB). `forced` is the status a transfer cancelled by the worker itself gets.
    fn finish(&mut self, c: Completion, forced: Option<UrbStatus>) {
        let Some(p) = self.pending.pop_front() else {
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
            self.rescan.notify_one();
        }
        if p.zlp_follows && status == UrbStatus::Ok {
            if let Some(next) = self.pending.front_mut() {
                next.moved_before = moved;
            }
            return;
        }
        if p.zlp_follows {
            // The data stage failed; its zero-length packet must not report a second time.
            if let Some(next) = self.pending.front_mut() {
                next.done = closed_sender();
            }
        }
        let result = if self.direction == Direction::In {
            let mut data = c.buffer.into_vec();
            data.truncate(c.actual_len);
            if data.len() > p.length as usize {
                data.truncate(p.length as usize);
                status = UrbStatus::Overflow;
            } else if p.short_not_ok && status == UrbStatus::Ok && data.len() < p.length as usize {
                // What a host controller does for URB_SHORT_NOT_OK; nusb has no such flag.
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
        let _ = p.done.send(result);
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

/// A sender whose messages go nowhere: for a transfer part that must not report.
fn closed_sender() -> CompletionSender {
    mpsc::unbounded_channel().0
}

#[cfg(test)]
mod tests;
