//! The URB window: how much a client may have outstanding on one URB stream.
//!
//! A server that paused reading a stream whenever its device queue was full let a full queue
//! hide a cancel: an `Unlink` sent behind more submissions than the queue holds sat unread in
//! QUIC's buffers until the device completed something, which a network adapter's receive
//! URBs only do when a frame arrives. So the rule is split in two (protocol version 2):
//!
//! - the **client** never has more than [`URB_WINDOW`] URBs, or [`URB_WINDOW_BYTES`] of buffers,
//!   outstanding (submitted and not completed) on one stream. [`UrbWindow`] keeps that rule,
//!   holding later submissions on the client and answering an unlink of a held one itself;
//! - the **server** reads every frame as it arrives, so an `Unlink` is seen at once whatever
//!   is queued, runs as many URBs on the device as its own queue depth allows and keeps the
//!   rest waiting, and treats a client over the window as a protocol violation.
//!
//! The kernel's drivers keep fewer than this queued per endpoint (usbnet ~60 receive URBs,
//! usb-storage one command, audio a handful), so a window this size almost never holds
//! anything back; it exists to bound what a peer can make the server hold.

use std::collections::{HashMap, VecDeque};

use crate::usb::UrbStatus;

use super::urb::{UrbClientMessage, UrbComplete, UrbId, UrbServerMessage, UrbSubmit};

/// Most URBs outstanding on one URB stream.
pub const URB_WINDOW: usize = 64;

/// Most buffer bytes (OUT data, IN lengths) outstanding on one URB stream. Any one URB fits
/// (`MAX_TRANSFER_LEN` is 4 MiB): a URB that would cross this waits only for others to finish.
pub const URB_WINDOW_BYTES: u64 = 32 * 1024 * 1024;

/// The buffer bytes a submission holds on the server while it is outstanding.
pub fn urb_bytes(urb: &UrbSubmit) -> u64 {
    u64::from(urb.length).max(urb.data.len() as u64)
}

/// The client's side of one stream's window, sans-IO: submissions and unlinks go in, frames to
/// send and answers the window gave itself come out.
#[derive(Debug, Default)]
pub struct UrbWindow {
    /// Sent and not yet completed, with the bytes each holds.
    outstanding: HashMap<UrbId, u64>,
    bytes: u64,
    /// Not sent yet: the window was full. With the URB each must follow, if any.
    held: VecDeque<(UrbSubmit, Option<UrbId>)>,
    to_send: VecDeque<UrbClientMessage>,
    answers: VecDeque<UrbServerMessage>,
}

impl UrbWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    /// A submission from the kernel: sent now if it fits, held otherwise (behind any held
    /// before it, so the endpoint's order is kept).
    pub fn submit(&mut self, urb: UrbSubmit) {
        self.held.push_back((urb, None));
        self.release();
    }

    /// [`Self::submit`] for a URB the server must hold until `after` has completed
    /// ([`UrbClientMessage::SubmitAfter`]).
    pub fn submit_after(&mut self, urb: UrbSubmit, after: UrbId) {
        self.held.push_back((urb, Some(after)));
        self.release();
    }

    /// An unlink: sent if its URB was sent; answered here, exactly as the server would, if the
    /// URB was still held (it never reached the server, so it was cancelled).
    pub fn unlink(&mut self, id: UrbId) {
        if let Some(pos) = self.held.iter().position(|(u, _)| u.id == id) {
            self.held.remove(pos);
            self.answers
                .push_back(UrbServerMessage::Complete(UrbComplete {
                    id,
                    status: UrbStatus::Unlinked,
                    actual_length: 0,
                    data: Vec::new(),
                    iso: None,
                    timing: None,
                }));
            self.answers.push_back(UrbServerMessage::UnlinkDone {
                id,
                cancelled: true,
            });
        } else {
            self.to_send.push_back(UrbClientMessage::Unlink(id));
        }
    }

    /// A message from the server on this stream: a completion frees its room. True when that
    /// let a held submission out, so the caller knows this window has frames to send.
    pub fn on_server(&mut self, msg: &UrbServerMessage) -> bool {
        if let UrbServerMessage::Complete(c) = msg
            && let Some(bytes) = self.outstanding.remove(&c.id)
        {
            self.bytes -= bytes;
            self.release();
        }
        !self.to_send.is_empty()
    }

    /// The next frame to send on the stream.
    pub fn poll_send(&mut self) -> Option<UrbClientMessage> {
        self.to_send.pop_front()
    }

    /// The next answer the window made itself, to be handled as if the server had sent it.
    pub fn poll_answer(&mut self) -> Option<UrbServerMessage> {
        self.answers.pop_front()
    }

    /// URBs sent and not completed.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// URBs held back by the window.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn release(&mut self) {
        while let Some((next, _)) = self.held.front() {
            let bytes = urb_bytes(next);
            let fits = self.outstanding.len() < URB_WINDOW
                && (self.outstanding.is_empty() || self.bytes + bytes <= URB_WINDOW_BYTES);
            if !fits {
                break;
            }
            let Some((urb, after)) = self.held.pop_front() else {
                break;
            };
            self.outstanding.insert(urb.id, bytes);
            self.bytes += bytes;
            self.to_send.push_back(match after {
                Some(after) => UrbClientMessage::SubmitAfter { after, urb },
                None => UrbClientMessage::Submit(urb),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usb::{Direction, EndpointNumber, TransferType};

    fn bulk_in(id: u32, length: u32) -> UrbSubmit {
        UrbSubmit {
            id: UrbId(id),
            endpoint: EndpointNumber::new(1).unwrap(),
            direction: Direction::In,
            transfer_type: TransferType::Bulk,
            flags: 0,
            setup: None,
            length,
            data: Vec::new(),
            interval: 0,
            iso: None,
        }
    }

    fn sent(w: &mut UrbWindow) -> Vec<UrbClientMessage> {
        std::iter::from_fn(|| w.poll_send()).collect()
    }

    fn done(id: u32) -> UrbServerMessage {
        UrbServerMessage::Complete(UrbComplete {
            id: UrbId(id),
            status: UrbStatus::Ok,
            actual_length: 0,
            data: Vec::new(),
            iso: None,
            timing: None,
        })
    }

    #[test]
    fn holds_what_is_over_the_window_and_sends_it_in_order_as_room_frees() {
        let mut w = UrbWindow::new();
        for id in 0..(URB_WINDOW as u32 + 3) {
            w.submit(bulk_in(id, 1514));
        }
        assert_eq!(sent(&mut w).len(), URB_WINDOW);
        assert_eq!(w.held(), 3);
        w.on_server(&done(5));
        w.on_server(&done(6));
        let ids: Vec<UrbClientMessage> = sent(&mut w);
        assert_eq!(
            ids,
            vec![
                UrbClientMessage::Submit(bulk_in(URB_WINDOW as u32, 1514)),
                UrbClientMessage::Submit(bulk_in(URB_WINDOW as u32 + 1, 1514)),
            ]
        );
        // A completion of something never sent (or twice) frees nothing.
        w.on_server(&done(5));
        assert!(sent(&mut w).is_empty());
    }

    #[test]
    fn an_unlink_is_sent_for_a_sent_urb_and_answered_here_for_a_held_one() {
        let mut w = UrbWindow::new();
        for id in 0..(URB_WINDOW as u32 + 1) {
            w.submit(bulk_in(id, 512));
        }
        sent(&mut w);
        w.unlink(UrbId(3));
        assert_eq!(sent(&mut w), vec![UrbClientMessage::Unlink(UrbId(3))]);
        assert!(w.poll_answer().is_none());
        let held = URB_WINDOW as u32;
        w.unlink(UrbId(held));
        assert!(sent(&mut w).is_empty(), "the server never saw it");
        let answers: Vec<UrbServerMessage> = std::iter::from_fn(|| w.poll_answer()).collect();
        assert!(
            matches!(&answers[0], UrbServerMessage::Complete(c) if c.id == UrbId(held) && c.status == UrbStatus::Unlinked)
        );
        assert_eq!(
            answers[1],
            UrbServerMessage::UnlinkDone {
                id: UrbId(held),
                cancelled: true
            }
        );
        assert_eq!(w.held(), 0);
    }

    #[test]
    fn the_byte_window_holds_big_urbs_but_always_lets_one_through() {
        let mut w = UrbWindow::new();
        let big = 4 * 1024 * 1024;
        for id in 0..10 {
            w.submit(bulk_in(id, big));
        }
        assert_eq!(
            sent(&mut w).len(),
            (URB_WINDOW_BYTES / u64::from(big)) as usize
        );
        for id in 0..8 {
            w.on_server(&done(id));
        }
        assert_eq!(sent(&mut w).len(), 2);
        assert_eq!(w.outstanding(), 2);
    }
}
