//! Which URBs of one attachment have ended, for the URBs that wait on them.
//!
//! A client's read-ahead sends a mass-storage command's IN phases with `SubmitAfter`, naming
//! the URB before each (the CBW or a write's last data, then the data phase for the CSW): none
//! may reach the device before it, and the CBW rides another URB stream, each with its own
//! task here. Every stream but control records how each of its URBs ended (the device, an
//! unlink or a refused gate); one whose queue head waits looks the outcome up, and is woken
//! when a new one is recorded. The book keeps the last [`RECENT`] outcomes: the URB named is
//! one the client sent just before, so it is there or still to come; one that never comes
//! leaves the URB waiting until the client unlinks it or the stream ends, within the client's
//! URB window (and only IN URBs, which carry no data, may wait: the tracker refuses others).

use std::collections::VecDeque;
use std::sync::Mutex;

use protocol::wire::UrbId;
use tokio::sync::watch;

use crate::sync::lock;
use crate::tracker::StreamTracker;

/// Outcomes kept per attachment.
pub const RECENT: usize = 256;

/// The last [`RECENT`] outcomes, oldest first, as (id, succeeded).
#[derive(Debug, Default)]
pub struct Book {
    recent: VecDeque<(UrbId, bool)>,
}

impl Book {
    /// Records how `id` ended, forgetting the oldest past [`RECENT`].
    pub fn record(&mut self, id: UrbId, ok: bool) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((id, ok));
    }

    /// How `id` ended, if it has (the latest record wins).
    pub fn outcome(&self, id: UrbId) -> Option<bool> {
        self.recent
            .iter()
            .rev()
            .find(|(i, _)| *i == id)
            .map(|&(_, ok)| ok)
    }
}

/// The book of one attachment, shared by its URB stream tasks.
#[derive(Debug)]
pub struct Gates {
    book: Mutex<Book>,
    recorded: watch::Sender<u64>,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            book: Mutex::default(),
            recorded: watch::channel(0).0,
        }
    }
}

impl Gates {
    /// Changes each time an outcome is recorded.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.recorded.subscribe()
    }

    /// Records every ending the tracker reports (with `record`; not for the control stream)
    /// and lets its head go as far as the book allows, until neither moves: a head may wait
    /// on a URB of its own stream (a CSW read on the data read before it).
    pub fn settle(&self, tracker: &mut StreamTracker, record: bool, closing: bool, now_us: u64) {
        loop {
            self.open(tracker, closing, now_us);
            // All of this round's endings under one lock, and one wake-up for them.
            let mut ended = false;
            {
                let mut book = lock(&self.book);
                while let Some((id, ok)) = tracker.poll_outcome() {
                    if record {
                        book.record(id, ok);
                    }
                    ended = true;
                }
            }
            if !ended {
                return;
            }
            if record {
                self.recorded.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// Lets the tracker's waiting head go for every URB it waits on that has ended; with
    /// `closing` (the stream or attachment is ending, nothing more will come) the rest are
    /// refused too.
    fn open(&self, tracker: &mut StreamTracker, closing: bool, now_us: u64) {
        while let Some(after) = tracker.gated_on() {
            let outcome = lock(&self.book).outcome(after);
            match outcome {
                Some(ok) => tracker.open_gate(ok, now_us),
                None if closing => tracker.open_gate(false, now_us),
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::tests::{after, open};
    use protocol::usb::{Direction, UrbStatus};
    use protocol::wire::UrbServerMessage;

    #[test]
    fn a_failed_command_refuses_its_data_read_and_the_status_read_behind_that() {
        let mut t = StreamTracker::new(&open(1, Direction::In), 8, false);
        t.on_client(after(100, 10), 0).unwrap();
        t.on_client(after(99, 100), 0).unwrap();
        let gates = Gates::default();
        gates.settle(&mut t, true, false, 1);
        assert_eq!(t.gated_on(), Some(UrbId(10)), "the CBW has not ended yet");
        lock(&gates.book).record(UrbId(10), false);
        gates.settle(&mut t, true, false, 2);
        assert_eq!(t.in_flight(), 0);
        assert!(t.poll_action().is_none(), "neither reached the device");
        let refused = std::iter::from_fn(|| t.poll_message())
            .filter(
                |m| matches!(m, UrbServerMessage::Complete(c) if c.status == UrbStatus::Unlinked),
            )
            .count();
        assert_eq!(refused, 2);
        assert_eq!(lock(&gates.book).outcome(UrbId(100)), Some(false));
    }

    #[test]
    fn the_book_keeps_the_latest_outcomes() {
        let mut book = Book::default();
        assert_eq!(book.outcome(UrbId(1)), None);
        book.record(UrbId(1), true);
        book.record(UrbId(2), false);
        assert_eq!(book.outcome(UrbId(1)), Some(true));
        assert_eq!(book.outcome(UrbId(2)), Some(false));
        for i in 0..RECENT as u32 {
            book.record(UrbId(100 + i), true);
        }
        assert_eq!(book.outcome(UrbId(1)), None, "forgotten past RECENT");
        assert_eq!(book.recent.len(), RECENT);
    }
}
