//! The per-endpoint worker: carries out [`queue::EndpointQueue`]'s actions on an endpoint.
//!
//! The worker owns the endpoint through [`EndpointIo`] (nusb's `Endpoint` on a real device, a
//! scripted one in tests) and keeps every submitted URB in flight at once (usbfs queues them in
//! order), so mass storage streams and a network adapter's ~60 receive URBs all wait on the
//! device together. There is no depth limit here: the session bounds how many URBs a stream
//! may have. What to do with each submit, unlink and completion (and why unlinking one URB
//! takes a cancel round) is the queue's business; this file is only the I/O around it.

mod queue;

use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::task::{Context, Poll};

use nusb::transfer::{Buffer, BulkOrInterrupt, Completion, EndpointDirection};
use protocol::usb::{EndpointNumber, UrbStatus};
use protocol::wire::{UrbId, UrbSubmit};
use tokio::sync::mpsc;
use tracing::warn;

use super::CompletionSender;
use crate::tracker::completion;
use queue::{Action, EndpointQueue};
pub use queue::{status_of, suggests_unplug};

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

enum Event {
    Cmd(Option<EpCmd>),
    Done(Completion),
}

/// Runs one endpoint until its command channel closes, then ends whatever is in flight with
/// `NoDevice` (or `Unlinked` if asked), each URB exactly once.
pub async fn run_endpoint<E: EndpointIo>(
    mut ep: E,
    mut rx: mpsc::UnboundedReceiver<EpCmd>,
    rescan: Arc<tokio::sync::Notify>,
) {
    let (_, direction) = EndpointNumber::from_address(ep.address());
    let mut queue = EndpointQueue::new(direction, ep.max_packet_size());
    loop {
        carry_out(&mut queue, &mut ep, &rescan).await;
        debug_assert_eq!(
            queue.in_flight(),
            ep.pending(),
            "the queue mirrors the endpoint"
        );
        // Commands first: the unlinks a driver sends together then join one cancel round
        // before its reaping requeues the URBs they name.
        let event = poll_fn(|cx| {
            if let Poll::Ready(cmd) = rx.poll_recv(cx) {
                return Poll::Ready(Event::Cmd(cmd));
            }
            if ep.pending() > 0 {
                return ep.poll_next_complete(cx).map(Event::Done);
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Cmd(Some(EpCmd::Submit(urb, done))) => queue.submit(urb, done),
            Event::Cmd(Some(EpCmd::Cancel(id))) => queue.cancel(id),
            Event::Cmd(Some(EpCmd::ClearHalt(id, done))) => queue.clear_halt(id, done),
            Event::Cmd(None) => break,
            Event::Done(c) => queue.completed(c),
        }
    }
    // The device is being released (or the interface's alternate setting changes).
    queue.close();
    carry_out(&mut queue, &mut ep, &rescan).await;
    while ep.pending() > 0 {
        let c = poll_fn(|cx| ep.poll_next_complete(cx)).await;
        queue.completed(c);
        carry_out(&mut queue, &mut ep, &rescan).await;
    }
    queue.abandon();
    carry_out(&mut queue, &mut ep, &rescan).await;
}

/// Does what the queue asked, in order. Clearing a halt is awaited here (off the runtime's
/// threads, see [`EndpointIo::clear_halt`]): the kernel sends nothing else to the endpoint
/// until it is answered.
async fn carry_out<E: EndpointIo>(
    queue: &mut EndpointQueue<CompletionSender>,
    ep: &mut E,
    rescan: &tokio::sync::Notify,
) {
    while let Some(action) = queue.poll_action() {
        match action {
            Action::Submit(buffer) => ep.submit(buffer),
            Action::CancelAll => ep.cancel_all(),
            Action::Complete(done, c) => {
                let _ = done.send(c);
            }
            Action::Rescan => rescan.notify_one(),
            Action::ClearHalt => {
                let status = match ep.clear_halt().await {
                    Ok(()) => UrbStatus::Ok,
                    Err(HaltError::Disconnected) => UrbStatus::NoDevice,
                    Err(e) => {
                        warn!(endpoint = ep.address(), "CLEAR_FEATURE(HALT): {e}");
                        UrbStatus::Stall
                    }
                };
                queue.halt_cleared(status);
            }
        }
    }
}

#[cfg(test)]
mod tests;
