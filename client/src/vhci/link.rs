//! The byte pump between our end of the vhci socketpair and the async side.
//!
//! [`KernelLink::start`] takes the socket and gives back a sender of bytes for the kernel, a
//! receiver of bytes from it, and a [`LinkHandle`] that says how the pump ended. Behind it runs
//! either the io_uring pump (one thread; see `uring.rs`) or, where io_uring is disabled or
//! missing, two plain blocking threads. Both apply backpressure the same way: bounded channels,
//! and no reads from the kernel while the async side is not taking bytes.
//!
//! The pump never interprets bytes; framing is the [`PortSession`](super::PortSession)'s job.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use tokio::sync::{mpsc, oneshot};

use super::sys::EventFd;
use super::uring;

/// Which pump runs a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One thread driving an io_uring.
    IoUring,
    /// A blocking reader thread and a blocking writer thread.
    Threads,
}

/// How to start a link.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Use the plain threads even where io_uring works (for comparison, or to rule it out).
    pub force_threads: bool,
    /// Messages each channel holds before its sender waits.
    pub channel_capacity: usize,
    /// Bytes read from the kernel per receive: vhci writes a PDU header and its data with
    /// separate sends, so large reads mostly help bulk OUT.
    pub read_size: usize,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            force_threads: false,
            channel_capacity: 64,
            read_size: 256 * 1024,
        }
    }
}

/// Why a pump stopped.
#[derive(Debug, thiserror::Error)]
pub enum LinkEnd {
    /// The kernel closed its end: the port was detached (or vhci dropped it after an error).
    #[error("the kernel closed the vhci socket (port detached)")]
    KernelClosed,
    /// [`LinkHandle::shutdown`] was called.
    #[error("shut down on request")]
    Shutdown,
    /// Every [`KernelTx`] was dropped and everything sent was written.
    #[error("nothing left to send: every sender was dropped")]
    SenderDropped,
    /// The [`KernelRx`] was dropped.
    #[error("nobody reads the kernel's bytes any more")]
    ReceiverDropped,
    /// An unexpected I/O error on the socket or the ring.
    #[error("vhci socket I/O failed")]
    Failed(#[source] io::Error),
}

impl LinkEnd {
    /// Reads an I/O error from the socket as what it means for the port.
    pub(crate) fn from_io(e: io::Error) -> LinkEnd {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected => LinkEnd::KernelClosed,
            _ => LinkEnd::Failed(e),
        }
    }
}

/// State the io_uring pump shares with the channel ends, so they can wake it only when it
/// sleeps.
#[derive(Debug)]
pub(crate) struct RingShared {
    pub(crate) doorbell: Arc<EventFd>,
    /// The pump is about to wait or waiting: whoever gives it work rings the doorbell.
    pub(crate) sleeping: AtomicBool,
    /// The pump holds kernel bytes the inbound channel had no room for.
    pub(crate) starved: AtomicBool,
    pub(crate) stop: AtomicBool,
}

impl RingShared {
    pub(crate) fn wake_if_sleeping(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.doorbell.ring();
        }
    }
}

#[derive(Debug, Clone)]
enum Waker {
    Ring(Arc<RingShared>),
    /// Blocking threads wake on the channels themselves.
    Threads,
}

impl Waker {
    fn after_send(&self) {
        if let Waker::Ring(shared) = self {
            shared.wake_if_sleeping();
        }
    }

    fn after_recv(&self) {
        if let Waker::Ring(shared) = self
            && shared.starved.load(Ordering::SeqCst)
        {
            shared.wake_if_sleeping();
        }
    }
}

#[derive(Debug)]
struct TxInner {
    /// `Some` until drop; taken first so the pump sees the channel closed when woken.
    tx: Option<mpsc::Sender<Vec<u8>>>,
    waker: Waker,
}

impl Drop for TxInner {
    fn drop(&mut self) {
        drop(self.tx.take());
        self.waker.after_send();
    }
}

/// The error of sending to a link whose pump has stopped; gives the bytes back.
#[derive(Debug, thiserror::Error)]
#[error("the vhci link has stopped")]
pub struct LinkClosed(pub Vec<u8>);

/// Sends bytes to the kernel. Cheap to clone; the pump finishes once every clone is dropped.
#[derive(Debug, Clone)]
pub struct KernelTx {
    inner: Arc<TxInner>,
}

impl KernelTx {
    /// Queues `bytes` (whole PDUs or not; the stream is a stream), waiting while the queue is
    /// full.
    pub async fn send(&self, bytes: Vec<u8>) -> Result<(), LinkClosed> {
        let Some(tx) = &self.inner.tx else {
            return Err(LinkClosed(bytes));
        };
        tx.send(bytes).await.map_err(|e| LinkClosed(e.0))?;
        self.inner.waker.after_send();
        Ok(())
    }

    /// Queues `bytes` from synchronous code, waiting while the queue is full. Must not be
    /// called from inside an async runtime.
    pub fn blocking_send(&self, bytes: Vec<u8>) -> Result<(), LinkClosed> {
        let Some(tx) = &self.inner.tx else {
            return Err(LinkClosed(bytes));
        };
        tx.blocking_send(bytes).map_err(|e| LinkClosed(e.0))?;
        self.inner.waker.after_send();
        Ok(())
    }
}

/// Receives bytes from the kernel, in order, in chunks of any size.
#[derive(Debug)]
pub struct KernelRx {
    rx: mpsc::Receiver<Vec<u8>>,
    waker: Waker,
}

impl KernelRx {
    /// The next chunk; `None` once the pump has stopped and everything read was delivered.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        let bytes = self.rx.recv().await;
        self.waker.after_recv();
        bytes
    }

    /// As [`recv`](Self::recv), from synchronous code outside any async runtime.
    pub fn blocking_recv(&mut self) -> Option<Vec<u8>> {
        let bytes = self.rx.blocking_recv();
        self.waker.after_recv();
        bytes
    }
}

impl Drop for KernelRx {
    fn drop(&mut self) {
        // Close first, so the pump sees it when woken.
        self.rx.close();
        if let Waker::Ring(shared) = &self.waker {
            shared.wake_if_sleeping();
        }
    }
}

/// Both directions of a started link.
#[derive(Debug)]
pub struct KernelLink {
    /// Bytes for the kernel.
    pub tx: KernelTx,
    /// Bytes from the kernel.
    pub rx: KernelRx,
}

#[derive(Debug)]
enum Stopper {
    Ring(Arc<RingShared>),
    Threads {
        socket: UnixStream,
        end: Arc<Mutex<Option<LinkEnd>>>,
        /// Weak, so holding it does not keep the writer's channel open.
        writer: mpsc::WeakSender<Vec<u8>>,
        stop: Arc<AtomicBool>,
    },
}

/// Controls a running pump and reports how it ended.
#[derive(Debug)]
pub struct LinkHandle {
    backend: Backend,
    stopper: Stopper,
    thread: thread::JoinHandle<()>,
    end: oneshot::Receiver<LinkEnd>,
}

impl LinkHandle {
    /// Which pump is running.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Asks the pump to stop. It closes the socket, which makes vhci drop the port.
    pub fn shutdown(&self) {
        match &self.stopper {
            Stopper::Ring(shared) => {
                shared.stop.store(true, Ordering::SeqCst);
                shared.doorbell.ring();
            }
            Stopper::Threads {
                socket,
                end,
                writer,
                stop,
            } => {
                stop.store(true, Ordering::SeqCst);
                record(end, LinkEnd::Shutdown);
                let _ = socket.shutdown(Shutdown::Both);
                wake_writer(writer);
            }
        }
    }

    /// Whether the pump has stopped.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the pump to stop, from async code.
    pub async fn finished(self) -> LinkEnd {
        self.end
            .await
            .unwrap_or_else(|_| LinkEnd::Failed(io::Error::other("the pump thread panicked")))
    }

    /// Waits for the pump to stop, blocking the calling thread.
    pub fn join(self) -> LinkEnd {
        let LinkHandle {
            thread, mut end, ..
        } = self;
        let _ = thread.join();
        end.try_recv()
            .unwrap_or_else(|_| LinkEnd::Failed(io::Error::other("the pump thread panicked")))
    }
}

impl KernelLink {
    /// Starts pumping `socket` (our end of the socketpair) with default options.
    pub fn start(socket: OwnedFd) -> io::Result<(KernelLink, LinkHandle)> {
        Self::start_with(socket, &LinkOptions::default())
    }

    /// Starts pumping `socket`: io_uring if it works here and is not refused by `options`,
    /// else plain threads. The choice is logged.
    pub fn start_with(
        socket: OwnedFd,
        options: &LinkOptions,
    ) -> io::Result<(KernelLink, LinkHandle)> {
        // Both pumps rely on blocking semantics (a nonblocking fd could make io_uring report
        // EAGAIN on older kernels, and would make the threads spin).
        let stream = UnixStream::from(socket);
        stream.set_nonblocking(false)?;
        let socket = OwnedFd::from(stream);
        let socket = if options.force_threads {
            tracing::info!("vhci link: plain threads (io_uring not requested)");
            socket
        } else if io_uring_disabled() {
            tracing::info!("vhci link: plain threads (kernel.io_uring_disabled = 2)");
            socket
        } else {
            match uring::start(socket, options)? {
                Ok(started) => {
                    tracing::debug!("vhci link: io_uring");
                    return Ok(started);
                }
                Err((e, socket)) => {
                    tracing::info!(error = %e, "vhci link: plain threads (io_uring unavailable)");
                    socket
                }
            }
        };
        start_threads(UnixStream::from(socket), options)
    }

    pub(crate) fn assemble(
        tx: mpsc::Sender<Vec<u8>>,
        rx: mpsc::Receiver<Vec<u8>>,
        shared: Option<Arc<RingShared>>,
    ) -> KernelLink {
        let waker = shared.map_or(Waker::Threads, Waker::Ring);
        KernelLink {
            tx: KernelTx {
                inner: Arc::new(TxInner {
                    tx: Some(tx),
                    waker: waker.clone(),
                }),
            },
            rx: KernelRx { rx, waker },
        }
    }
}

impl LinkHandle {
    pub(crate) fn for_ring(
        shared: Arc<RingShared>,
        thread: thread::JoinHandle<()>,
        end: oneshot::Receiver<LinkEnd>,
    ) -> LinkHandle {
        LinkHandle {
            backend: Backend::IoUring,
            stopper: Stopper::Ring(shared),
            thread,
            end,
        }
    }
}

/// `kernel.io_uring_disabled`: 0 allowed, 1 only for `io_uring_group`, 2 refused to all. At 1
/// we still try, and fall back if the ring cannot be created.
fn io_uring_disabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").is_ok_and(|s| s.trim() == "2")
}

/// The first recorded reason wins: later ones are consequences of it.
fn record(end: &Mutex<Option<LinkEnd>>, reason: LinkEnd) {
    let mut slot = end.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        *slot = Some(reason);
    }
}

/// Wakes a writer blocked on an empty channel with an empty message (skipped when writing).
fn wake_writer(writer: &mpsc::WeakSender<Vec<u8>>) {
    if let Some(tx) = writer.upgrade() {
        let _ = tx.try_send(Vec::new());
    }
}

fn start_threads(
    socket: UnixStream,
    options: &LinkOptions,
) -> io::Result<(KernelLink, LinkHandle)> {
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(options.channel_capacity.max(1));
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(options.channel_capacity.max(1));
    let (end_tx, end_rx) = oneshot::channel();
    let end: Arc<Mutex<Option<LinkEnd>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let weak = out_tx.downgrade();

    let mut writer_socket = socket.try_clone()?;
    let writer_end = end.clone();
    let writer_stop = stop.clone();
    let writer = thread::Builder::new()
        .name("vhci-tx".into())
        .spawn(move || {
            let reason = loop {
                let Some(bytes) = out_rx.blocking_recv() else {
                    break LinkEnd::SenderDropped;
                };
                if writer_stop.load(Ordering::SeqCst) {
                    break LinkEnd::Shutdown;
                }
                if let Err(e) = writer_socket.write_all(&bytes) {
                    break LinkEnd::from_io(e);
                }
            };
            record(&writer_end, reason);
            let _ = writer_socket.shutdown(Shutdown::Both);
        })?;

    let mut reader_socket = socket.try_clone()?;
    let reader_end = end.clone();
    let reader_weak = weak.clone();
    let reader_stop = stop.clone();
    let read_size = options.read_size.max(4096);
    let reader = thread::Builder::new()
        .name("vhci-rx".into())
        .spawn(move || {
            let mut buf = vec![0u8; read_size];
            let reason = loop {
                match reader_socket.read(&mut buf) {
                    Ok(0) => break LinkEnd::KernelClosed,
                    Ok(n) => {
                        if in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                            break LinkEnd::ReceiverDropped;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break LinkEnd::from_io(e),
                }
            };
            record(&reader_end, reason);
            let _ = reader_socket.shutdown(Shutdown::Both);
            // The writer may be waiting for bytes that will never come.
            reader_stop.store(true, Ordering::SeqCst);
            wake_writer(&reader_weak);
            let _ = writer.join();
            let reason = reader_end
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or(LinkEnd::KernelClosed);
            tracing::debug!(%reason, "vhci link (threads) stopped");
            let _ = end_tx.send(reason);
        })?;

    let link = KernelLink::assemble(out_tx, in_rx, None);
    let handle = LinkHandle {
        backend: Backend::Threads,
        stopper: Stopper::Threads {
            socket,
            end,
            writer: weak,
            stop,
        },
        thread: reader,
        end: end_rx,
    };
    Ok((link, handle))
}
