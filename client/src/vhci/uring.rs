//! The io_uring pump: one thread, one receive and one gathered send in flight, and a doorbell.
//!
//! Per pass the pump reaps completions, hands received bytes to the async side, gathers every
//! queued outbound buffer into one `sendmsg`, keeps a receive posted unless the async side is
//! behind, and then sleeps in `io_uring_enter` until the kernel or the doorbell wakes it. The
//! channel ends ring the doorbell only while the pump sleeps, so a busy link costs no extra
//! syscalls. All `unsafe` is in `sys.rs`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use tokio::sync::mpsc::error::{TryRecvError, TrySendError};
use tokio::sync::{mpsc, oneshot};

use super::link::{KernelLink, LinkEnd, LinkHandle, LinkOptions, RingShared};
use super::sys::{Event, EventFd, Ring};

/// Outbound bytes pulled off the channel per send; the rest waits in the channel, so the async
/// side feels backpressure instead of the pump buffering without limit.
const MAX_SEND_BATCH: usize = 4 * 1024 * 1024;

type Started = (KernelLink, LinkHandle);

/// Starts the pump thread. The outer error is a failure to spawn; the inner one says io_uring
/// cannot be used here and returns the socket for the fallback.
pub(crate) fn start(
    socket: OwnedFd,
    options: &LinkOptions,
) -> io::Result<Result<Started, (io::Error, OwnedFd)>> {
    let shared = Arc::new(RingShared {
        doorbell: Arc::new(EventFd::new()?),
        sleeping: AtomicBool::new(false),
        starved: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(options.channel_capacity.max(1));
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(options.channel_capacity.max(1));
    let (end_tx, end_rx) = oneshot::channel();
    // The ring holds raw pointers and stays on the thread that made it; the thread reports
    // whether it could make one before `start` returns.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), (io::Error, OwnedFd)>>();
    let pump_shared = shared.clone();
    let read_size = options.read_size.max(4096);
    let thread = thread::Builder::new()
        .name("vhci-uring".into())
        .spawn(move || {
            let ring = match Ring::new(socket, pump_shared.doorbell.clone(), read_size) {
                Ok(ring) => {
                    let _ = ready_tx.send(Ok(()));
                    ring
                }
                Err(failed) => {
                    let _ = ready_tx.send(Err(failed));
                    return;
                }
            };
            let reason = Pump {
                ring,
                shared: pump_shared,
                out_rx,
                in_tx,
                outbound: VecDeque::new(),
                outbound_bytes: 0,
                stash: None,
                senders_gone: false,
            }
            .run();
            tracing::debug!(%reason, "vhci link (io_uring) stopped");
            let _ = end_tx.send(reason);
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => {
            let link = KernelLink::assemble(out_tx, in_rx, Some(shared.clone()));
            Ok(Ok((link, LinkHandle::for_ring(shared, thread, end_rx))))
        }
        Ok(Err(failed)) => {
            let _ = thread.join();
            Ok(Err(failed))
        }
        Err(_) => {
            let _ = thread.join();
            Err(io::Error::other(
                "the io_uring pump thread died while starting",
            ))
        }
    }
}

struct Pump {
    ring: Ring,
    shared: Arc<RingShared>,
    out_rx: mpsc::Receiver<Vec<u8>>,
    in_tx: mpsc::Sender<Vec<u8>>,
    /// Taken off the channel, not yet handed to the ring.
    outbound: VecDeque<Vec<u8>>,
    outbound_bytes: usize,
    /// Kernel bytes the inbound channel had no room for; no receive is posted meanwhile.
    stash: Option<Vec<u8>>,
    senders_gone: bool,
}

impl Pump {
    fn run(mut self) -> LinkEnd {
        match self.pump() {
            Ok(reason) => reason,
            Err(e) => LinkEnd::Failed(e),
        }
        // Dropping the ring cancels and waits out what is still in flight.
    }

    fn pump(&mut self) -> io::Result<LinkEnd> {
        self.ring.arm_wake()?;
        let mut events = Vec::new();
        loop {
            events.clear();
            self.ring.reap(&mut events)?;
            for event in events.drain(..) {
                if let Some(end) = self.on_event(event)? {
                    return Ok(end);
                }
            }
            if self.shared.stop.load(Ordering::SeqCst) {
                return Ok(LinkEnd::Shutdown);
            }
            if self.in_tx.is_closed() {
                return Ok(LinkEnd::ReceiverDropped);
            }
            if let Some(end) = self.deliver_stash() {
                return Ok(end);
            }
            self.pull_outbound();
            if self.ring.send_idle() && !self.outbound.is_empty() {
                let batch: Vec<Vec<u8>> = self.outbound.drain(..).collect();
                self.outbound_bytes = 0;
                self.ring.start_send(batch)?;
            }
            if self.senders_gone && self.outbound.is_empty() && self.ring.send_idle() {
                return Ok(LinkEnd::SenderDropped);
            }
            if self.ring.recv_idle() && self.stash.is_none() {
                self.ring.start_recv()?;
            }
            self.sleep()?;
        }
    }

    fn on_event(&mut self, event: Event) -> io::Result<Option<LinkEnd>> {
        Ok(match event {
            Event::Received(0) => Some(LinkEnd::KernelClosed),
            Event::Received(n) => {
                let bytes = self.ring.received(n).to_vec();
                match self.in_tx.try_send(bytes) {
                    Ok(()) => None,
                    Err(TrySendError::Full(bytes)) => {
                        self.stash = Some(bytes);
                        self.shared.starved.store(true, Ordering::SeqCst);
                        None
                    }
                    Err(TrySendError::Closed(_)) => Some(LinkEnd::ReceiverDropped),
                }
            }
            Event::RecvFailed(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Event::RecvFailed(e) | Event::SendFailed(e) => Some(LinkEnd::from_io(e)),
            Event::Sent => None,
            Event::Woken => {
                self.ring.arm_wake()?;
                None
            }
        })
    }

    fn deliver_stash(&mut self) -> Option<LinkEnd> {
        let bytes = self.stash.take()?;
        match self.in_tx.try_send(bytes) {
            Ok(()) => {
                self.shared.starved.store(false, Ordering::SeqCst);
                None
            }
            Err(TrySendError::Full(bytes)) => {
                self.stash = Some(bytes);
                None
            }
            Err(TrySendError::Closed(_)) => Some(LinkEnd::ReceiverDropped),
        }
    }

    fn pull_outbound(&mut self) {
        while self.outbound_bytes < MAX_SEND_BATCH {
            match self.out_rx.try_recv() {
                Ok(bytes) if bytes.is_empty() => {}
                Ok(bytes) => {
                    self.outbound_bytes += bytes.len();
                    self.outbound.push_back(bytes);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.senders_gone = true;
                    break;
                }
            }
        }
    }

    /// Waits in the ring unless work arrived since this pass looked. Announcing the sleep
    /// before the last look means a sender either sees `sleeping` and rings, or its bytes are
    /// seen by the look.
    fn sleep(&mut self) -> io::Result<()> {
        self.shared.sleeping.store(true, Ordering::SeqCst);
        let work = (self.ring.send_idle() && !self.out_rx.is_empty())
            || (self.senders_gone && self.ring.send_idle())
            || (self.out_rx.is_closed() && !self.senders_gone)
            || (self.stash.is_some() && self.in_tx.capacity() > 0)
            || self.in_tx.is_closed()
            || self.shared.stop.load(Ordering::SeqCst);
        if !work {
            self.ring.wait()?;
        }
        self.shared.sleeping.store(false, Ordering::SeqCst);
        Ok(())
    }
}
