//! The only `unsafe` in the client: an io_uring that owns every buffer the kernel may touch,
//! and the eventfd that wakes it.
//!
//! io_uring's submission API is unsafe because the kernel writes into (or reads from) memory
//! after `push` returns. [`Ring`] makes that safe by owning the socket, the receive buffer, the
//! buffers being sent and their `msghdr`/`iovec`s, allowing one operation of each kind in flight,
//! and, when dropped, cancelling and waiting out every operation before any of that memory is
//! freed. The pump in `uring.rs` drives it with safe calls only.

#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use io_uring::{IoUring, Probe, opcode, types};

const RECV: u64 = 1;
const SEND: u64 = 2;
const WAKE: u64 = 3;
const CANCEL: u64 = 4;

/// The most buffers one `sendmsg` gathers (`IOV_MAX`).
const MAX_IOV: usize = 1024;

/// An eventfd used as a doorbell: writers add 1, the ring's pending read completes.
#[derive(Debug)]
pub(crate) struct EventFd(File);

impl EventFd {
    /// A blocking eventfd (io_uring waits on it by polling; a non-blocking one could make the
    /// read complete with `EAGAIN` on some kernels).
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd(2), is valid and owned by nobody else.
        Ok(EventFd(File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Rings the doorbell. The counter cannot overflow in practice (2^64 - 2 rings), so the
    /// write never blocks; an error could only mean the fd is gone, and then nobody listens.
    pub(crate) fn ring(&self) {
        let _ = (&self.0).write(&1u64.to_ne_bytes());
    }
}

/// What a completion meant.
#[derive(Debug)]
pub(crate) enum Event {
    /// The receive finished with this many bytes in [`Ring::received`]; 0 is end of stream.
    Received(usize),
    /// The receive failed.
    RecvFailed(io::Error),
    /// Everything handed to [`Ring::start_send`] is written (short writes were continued).
    Sent,
    /// The send failed.
    SendFailed(io::Error),
    /// The eventfd was rung; re-arm with [`Ring::arm_wake`].
    Woken,
}

/// Buffers of one `sendmsg` in flight, continued after short writes.
struct PendingSend {
    /// Owns the bytes the iovecs point into; moving a `Vec` leaves its heap data in place.
    _bufs: Vec<Vec<u8>>,
    iov: Vec<libc::iovec>,
    /// Index of the first iovec with bytes left.
    first: usize,
    /// Boxed so its address stays put while the kernel reads it.
    msg: Box<libc::msghdr>,
}

impl PendingSend {
    fn new(bufs: Vec<Vec<u8>>) -> Self {
        let iov = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        PendingSend {
            _bufs: bufs,
            iov,
            first: 0,
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            msg: Box::new(unsafe { std::mem::zeroed() }),
        }
    }

    /// Accounts `n` written bytes; true if bytes remain.
    fn advance(&mut self, mut n: usize) -> bool {
        while n > 0 && self.first < self.iov.len() {
            let v = &mut self.iov[self.first];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.first += 1;
            } else {
                v.iov_base = (v.iov_base as *mut u8).wrapping_add(n) as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
        self.first < self.iov.len()
    }

    fn is_empty(&self) -> bool {
        self.first >= self.iov.len()
    }

    /// Points the header at the iovecs still to send and returns it for the SQE.
    fn header(&mut self) -> *const libc::msghdr {
        let rest = &mut self.iov[self.first..];
        let count = rest.len().min(MAX_IOV);
        self.msg.msg_iov = rest.as_mut_ptr();
        self.msg.msg_iovlen = count as _;
        &*self.msg
    }
}

/// An io_uring bound to one stream socket and one doorbell.
pub(crate) struct Ring {
    ring: IoUring,
    socket: OwnedFd,
    wake: std::sync::Arc<EventFd>,
    recv_buf: Box<[u8]>,
    recv_busy: bool,
    send: Option<PendingSend>,
    send_busy: bool,
    wake_buf: Box<[u8; 8]>,
    wake_busy: bool,
    /// Cancel requests whose own completion has not arrived yet.
    cancels: usize,
}

impl Ring {
    /// A ring for `socket`, or the reason io_uring cannot be used here (and the socket back).
    pub(crate) fn new(
        socket: OwnedFd,
        wake: std::sync::Arc<EventFd>,
        recv_len: usize,
    ) -> Result<Ring, (io::Error, OwnedFd)> {
        let ring = match IoUring::new(16) {
            Ok(ring) => ring,
            Err(e) => return Err((e, socket)),
        };
        let mut probe = Probe::new();
        if let Err(e) = ring.submitter().register_probe(&mut probe) {
            return Err((e, socket));
        }
        let needed = [
            opcode::Recv::CODE,
            opcode::SendMsg::CODE,
            opcode::Read::CODE,
            opcode::AsyncCancel::CODE,
        ];
        if !needed.iter().all(|&code| probe.is_supported(code)) {
            return Err((io::Error::from(io::ErrorKind::Unsupported), socket));
        }
        Ok(Ring {
            ring,
            socket,
            wake,
            recv_buf: vec![0; recv_len].into_boxed_slice(),
            recv_busy: false,
            send: None,
            send_busy: false,
            wake_buf: Box::new([0; 8]),
            wake_busy: false,
            cancels: 0,
        })
    }

    /// Whether a receive may be started.
    pub(crate) fn recv_idle(&self) -> bool {
        !self.recv_busy
    }

    /// Whether a send may be started.
    pub(crate) fn send_idle(&self) -> bool {
        !self.send_busy
    }

    /// The bytes of the last [`Event::Received`].
    pub(crate) fn received(&self, n: usize) -> &[u8] {
        &self.recv_buf[..n]
    }

    /// Starts receiving into the ring's buffer. One receive at a time: several on one stream
    /// socket could complete out of order.
    pub(crate) fn start_recv(&mut self) -> io::Result<()> {
        assert!(!self.recv_busy, "one receive at a time");
        let len = u32::try_from(self.recv_buf.len()).unwrap_or(u32::MAX);
        let sqe = opcode::Recv::new(
            types::Fd(self.socket.as_raw_fd()),
            self.recv_buf.as_mut_ptr(),
            len,
        )
        .build()
        .user_data(RECV);
        // SAFETY: the buffer is owned by `self` and not touched until the RECV completion is
        // reaped (`recv_busy` guards it); `Drop` waits for that completion before freeing it.
        // The socket fd is owned by `self` and outlives the operation the same way.
        self.push(&sqe)?;
        self.recv_busy = true;
        Ok(())
    }

    /// Starts sending `bufs` in order with one `sendmsg`, continued after short writes.
    pub(crate) fn start_send(&mut self, bufs: Vec<Vec<u8>>) -> io::Result<()> {
        assert!(!self.send_busy, "one send at a time");
        let pending = PendingSend::new(bufs);
        if pending.is_empty() {
            return Ok(());
        }
        self.send = Some(pending);
        self.submit_send()
    }

    fn submit_send(&mut self) -> io::Result<()> {
        let Some(pending) = self.send.as_mut() else {
            return Ok(());
        };
        let header = pending.header();
        let sqe = opcode::SendMsg::new(types::Fd(self.socket.as_raw_fd()), header)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(SEND);
        // SAFETY: the msghdr, the iovecs it points to and the bytes they point to are owned by
        // `self.send`, which is neither moved out nor changed until the SEND completion is
        // reaped; `Drop` waits for that completion before freeing them.
        self.push(&sqe)?;
        self.send_busy = true;
        Ok(())
    }

    /// Keeps a read pending on the doorbell so ringing it ends a wait.
    pub(crate) fn arm_wake(&mut self) -> io::Result<()> {
        if self.wake_busy {
            return Ok(());
        }
        let sqe = opcode::Read::new(
            types::Fd(self.wake.0.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(WAKE);
        // SAFETY: the 8-byte buffer is boxed and owned by `self`; the eventfd is kept alive by
        // the `Arc` in `self`; `Drop` waits for the completion before freeing either.
        self.push(&sqe)?;
        self.wake_busy = true;
        Ok(())
    }

    /// Submits what is queued and waits for at least one completion.
    pub(crate) fn wait(&mut self) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves every available completion into `events`, continuing short sends on the way.
    pub(crate) fn reap(&mut self, events: &mut Vec<Event>) -> io::Result<()> {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (tag, result) in done {
            let error = || io::Error::from_raw_os_error(-result);
            match tag {
                RECV => {
                    self.recv_busy = false;
                    events.push(match usize::try_from(result) {
                        Ok(n) => Event::Received(n),
                        Err(_) => Event::RecvFailed(error()),
                    });
                }
                SEND => {
                    self.send_busy = false;
                    match usize::try_from(result) {
                        Ok(0) => events.push(Event::SendFailed(io::ErrorKind::WriteZero.into())),
                        Ok(n) => {
                            let more = self.send.as_mut().is_some_and(|p| p.advance(n));
                            if more {
                                self.submit_send()?;
                            } else {
                                self.send = None;
                                events.push(Event::Sent);
                            }
                        }
                        Err(_) => {
                            self.send = None;
                            events.push(Event::SendFailed(error()));
                        }
                    }
                }
                WAKE => {
                    self.wake_busy = false;
                    events.push(Event::Woken);
                }
                _ => self.cancels = self.cancels.saturating_sub(1),
            }
        }
        Ok(())
    }

    fn push(&mut self, sqe: &io_uring::squeue::Entry) -> io::Result<()> {
        // At most four entries are ever queued at once (recv, send, wake, cancels), well
        // under the 16 slots; submitting first covers a full queue anyway.
        if self.ring.submission().is_full() {
            self.ring.submit()?;
        }
        // SAFETY: every caller documents why the memory the entry names outlives the
        // operation; `push` itself only copies the entry into the submission queue.
        unsafe { self.ring.submission().push(sqe) }.map_err(|_| io::ErrorKind::WouldBlock.into())
    }

    fn busy(&self) -> bool {
        self.recv_busy || self.send_busy || self.wake_busy || self.cancels > 0
    }

    /// Cancels whatever is in flight and waits until the kernel has let go of our memory.
    fn drain(&mut self) -> io::Result<()> {
        for (busy, tag) in [
            (self.recv_busy, RECV),
            (self.send_busy, SEND),
            (self.wake_busy, WAKE),
        ] {
            if busy {
                let sqe = opcode::AsyncCancel::new(tag).build().user_data(CANCEL);
                self.push(&sqe)?;
                self.cancels += 1;
            }
        }
        let mut events = Vec::new();
        while self.busy() {
            self.wait()?;
            self.reap(&mut events)?;
            // A send continued after a short write is cancelled on the next pass.
            if self.send_busy && self.cancels == 0 {
                let sqe = opcode::AsyncCancel::new(SEND).build().user_data(CANCEL);
                self.push(&sqe)?;
                self.cancels += 1;
            }
        }
        Ok(())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if let Err(e) = self.drain() {
            // The kernel may still write into our buffers: leak them rather than free memory
            // it can reach. This needs io_uring_enter itself to fail, which we have not seen.
            tracing::error!(error = %e, "io_uring drain failed; leaking its buffers");
            std::mem::forget(std::mem::take(&mut self.recv_buf));
            std::mem::forget(self.send.take());
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_writes_continue_where_they_stopped() {
        let mut send = PendingSend::new(vec![vec![1, 2, 3], Vec::new(), vec![4, 5], vec![6]]);
        assert_eq!(send.iov.len(), 3, "empty buffers are skipped");
        assert!(send.advance(2));
        assert_eq!((send.first, send.iov[0].iov_len), (0, 1));
        // SAFETY: test-only read of a pointer into `send`'s own live buffer.
        assert_eq!(unsafe { *(send.iov[0].iov_base as *const u8) }, 3);
        assert!(send.advance(2));
        assert_eq!((send.first, send.iov[1].iov_len), (1, 1));
        let header = send.header();
        // SAFETY: `header` points into `send`, which is alive.
        assert_eq!(unsafe { (*header).msg_iovlen }, 2);
        assert!(!send.advance(2));
        assert!(send.is_empty());
    }

    #[test]
    fn the_doorbell_ends_a_wait() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let wake = std::sync::Arc::new(EventFd::new().unwrap());
        let Ok(mut ring) = Ring::new(OwnedFd::from(a), wake.clone(), 4096) else {
            return; // io_uring unavailable here: the link tests cover the fallback
        };
        ring.arm_wake().unwrap();
        ring.start_recv().unwrap();
        wake.ring();
        let mut events = Vec::new();
        while events.is_empty() {
            ring.wait().unwrap();
            ring.reap(&mut events).unwrap();
        }
        assert!(matches!(events[..], [Event::Woken]));
        // Dropping with a receive still pending cancels it and waits it out.
        drop(ring);
    }
}
