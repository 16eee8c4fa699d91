//! Interrupt-IN streaming for keyboards, mice, game pads: the device polled ahead of the
//! kernel, so reports are not spaced a round trip apart.
//!
//! It rides on read-ahead's queues (its speculations, ids and matching rules), which is why it
//! lives under [`super`]; this file is what differs for interrupt endpoints.
//!
//! A driver keeps one interrupt URB posted and resubmits it when it completes, so over
//! the tunnel the device is polled once per round trip. With streaming on, every kernel
//! interrupt IN URB also tops up [`STREAM_DEPTH`] speculative URBs of its length behind it:
//! the server keeps polling while a report travels, and the kernel's next URB usually finds
//! the next report already here. When the kernel unlinks its URB (the driver stopped polling,
//! e.g. the device was closed), the running speculations are cancelled; reports the device
//! already sent are kept for the kernel's next URB, in order, as the device's own.

use protocol::usb::{EndpointNumber, TransferType, transfer_flags};

use super::{LOWEST_ID, MAX_QUEUED, ReadAhead, Speculate, cancel_from, push_speculation};

/// Speculations streamed ahead of the kernel's interrupt IN URB on one endpoint; with the
/// kernel's own, the device is polled this many plus one times per round trip.
pub const STREAM_DEPTH: usize = MAX_QUEUED - 1;

impl ReadAhead {
    /// Turns interrupt-IN streaming on or off.
    pub fn set_streaming(&mut self, on: bool) {
        self.streaming = on;
    }

    /// Whether interrupt IN URBs go through [`ReadAhead::claim`] and
    /// [`ReadAhead::on_interrupt_in`].
    pub fn streams_interrupts(&self) -> bool {
        self.streaming
    }

    /// The kernel's interrupt IN URB on `endpoint` (`length` bytes, its `URB_*` `flags` and
    /// polling `interval`) was claimed, forwarded or answered: the URBs like it to queue behind
    /// it, so that [`STREAM_DEPTH`] unclaimed ones are running or done.
    pub fn on_interrupt_in(
        &mut self,
        endpoint: EndpointNumber,
        length: u32,
        flags: u32,
        interval: i32,
    ) -> Vec<Speculate> {
        if !self.streaming {
            return Vec::new();
        }
        let queue = self.queues.entry(endpoint).or_default();
        let ready = queue
            .iter()
            .filter(|s| s.unclaimed() && !s.cancelling)
            .count();
        let room = MAX_QUEUED.saturating_sub(queue.len());
        let wanted = STREAM_DEPTH.saturating_sub(ready).min(room);
        if self.next_id < LOWEST_ID + wanted as u32 {
            return Vec::new();
        }
        let spec = Speculate {
            id: 0,
            endpoint,
            length,
            flags: flags & transfer_flags::FORWARDED,
            transfer_type: TransferType::Interrupt,
            interval,
            after: None,
        };
        let out: Vec<Speculate> = (0..wanted)
            .map(|_| push_speculation(&mut self.next_id, queue, spec))
            .collect();
        self.stats.speculated += out.len() as u64;
        out
    }

    /// The kernel unlinked its URB on the streamed interrupt `endpoint`: its driver stopped
    /// polling, so the speculations still running are cancelled. Reports the device already
    /// sent stay for the kernel's next URB.
    pub fn on_kernel_unlink(&mut self, endpoint: EndpointNumber) {
        if let Some(queue) = self.queues.get_mut(&endpoint) {
            cancel_from(queue, 0, endpoint, &mut self.cancels);
        }
    }
}

#[cfg(test)]
mod tests {
    use protocol::usb::{TransferType, UrbStatus, transfer_flags};

    use super::STREAM_DEPTH;
    use crate::vhci::readahead::tests::{done, ep, kernel_in, reading};
    use crate::vhci::readahead::{Claim, ReadAhead, Settled};

    const INT_FLAGS: u32 = transfer_flags::DIR_IN;

    #[test]
    fn streaming_keeps_the_device_polled_ahead_and_hands_reports_over_in_order() {
        let mut ra = ReadAhead::new(false);
        ra.set_streaming(true);
        assert!(ra.on_cbw(ep(1), reading(512), 100).is_empty());
        // The kernel's first URB goes to the server; three more poll behind it.
        assert!(matches!(
            ra.claim(ep(1), kernel_in(1, 8, INT_FLAGS)),
            Claim::Forward(_)
        ));
        let specs = ra.on_interrupt_in(ep(1), 8, INT_FLAGS | 0x0004, 8);
        assert_eq!(specs.len(), STREAM_DEPTH);
        assert!(
            specs
                .iter()
                .all(|s| s.transfer_type == TransferType::Interrupt
                    && s.interval == 8
                    && s.length == 8
                    && s.flags == INT_FLAGS)
        );
        // Two reports arrive while the kernel's answer travels.
        for (i, spec) in specs.iter().take(2).enumerate() {
            assert!(matches!(
                ra.on_completion(done(spec.id, UrbStatus::Ok, vec![i as u8; 8])),
                Settled::Absorbed
            ));
        }
        // The kernel's next URBs take them at once, in order, and each tops the queue up.
        for (seqnum, report) in [(2, 0u8), (3, 1)] {
            match ra.claim(ep(1), kernel_in(seqnum, 8, INT_FLAGS)) {
                Claim::Answer(cmd, c) => {
                    assert_eq!(cmd.seqnum, seqnum);
                    assert_eq!(c.data, vec![report; 8]);
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(ra.on_interrupt_in(ep(1), 8, INT_FLAGS, 8).len(), 1);
        }
        // The next takes over the one still running.
        assert!(matches!(
            ra.claim(ep(1), kernel_in(4, 8, INT_FLAGS)),
            Claim::Bound(_, id) if id == specs[2].id
        ));
        assert_eq!(ra.stats().hits, 3);
    }

    #[test]
    fn an_unlink_stops_the_stream_but_keeps_what_the_device_sent() {
        let mut ra = ReadAhead::new(false);
        ra.set_streaming(true);
        ra.claim(ep(1), kernel_in(1, 8, INT_FLAGS));
        let specs = ra.on_interrupt_in(ep(1), 8, INT_FLAGS, 8);
        ra.on_completion(done(specs[0].id, UrbStatus::Ok, vec![9; 8]));
        ra.on_kernel_unlink(ep(1));
        let cancels: Vec<u32> = ra.take_cancels().iter().map(|c| c.id).collect();
        assert_eq!(cancels, vec![specs[1].id, specs[2].id]);
        for spec in &specs[1..] {
            assert!(matches!(
                ra.on_completion(done(spec.id, UrbStatus::Unlinked, vec![])),
                Settled::Absorbed
            ));
        }
        // The driver polls again: the report the device sent comes first, then polling
        // resumes behind it.
        match ra.claim(ep(1), kernel_in(2, 8, INT_FLAGS)) {
            Claim::Answer(_, c) => assert_eq!(c.data, vec![9; 8]),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ra.on_interrupt_in(ep(1), 8, INT_FLAGS, 8).len(),
            STREAM_DEPTH
        );
        assert!(!ra.owns(specs[1].id));
    }

    #[test]
    fn streaming_is_off_unless_asked_for() {
        let mut ra = ReadAhead::new(true);
        assert!(!ra.streams_interrupts());
        assert!(ra.on_interrupt_in(ep(1), 8, INT_FLAGS, 8).is_empty());
    }
}
