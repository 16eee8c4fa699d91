//! `latency-report` without I/O: joining a recording's kernel and userspace stamps per URB,
//! splitting each URB's time into kernel / client / network / server+device, and showing it.
//! The binary only reads the file and writes what these return, so every number is
//! unit-tested.
//!
//! [`analysis`] computes (join, split, percentiles, budgets); [`render`] presents (text
//! tables, the JSON summary, the SVG). Kept apart so a change to how a report looks cannot
//! move a number, and the numbers are tested without parsing output.
//!
//! With all eight stamps of a URB (see [`crate::telemetry`]) the parts add up exactly to the
//! kernel's enqueue-to-give-back time:
//!
//! - kernel: enqueue -> tx, plus rx -> give-back (vhci and usbcore, not ours);
//! - client: tx -> read -> forwarded, plus completion -> RET handed over -> rx: our software,
//!   including the socketpair hop both ways (the overhead the 0.2 ms budget is about);
//! - network: forwarded -> completion, minus the server's own time;
//! - server+device: the server's `queued_us + device_us`.
//!
//! Without probes the kernel part is unknown and the client part is only our process's share;
//! without the server's timing, network and server+device are reported together as network.

pub mod analysis;
pub mod render;

pub use analysis::{
    Budget, Counts, Joined, Miss, PARTS, PartHistograms, QUANTILES, Recording, Split, Stats,
};
pub use render::{render_svg, render_table, summary_json};

/// Records the tests of both halves build recordings from.
#[cfg(test)]
mod fixtures {
    use crate::telemetry::{Header, KernelEvent, Line, PortLine, ProbeState, UserUrb};

    pub(super) fn user(seq: u32, read: u64, dev_us: Option<u32>) -> UserUrb {
        UserUrb {
            devid: 1,
            seq,
            ep: 1,
            dir: "in".into(),
            transfer_type: "bulk".into(),
            len: 512,
            status: Some(0),
            actual: Some(512),
            read: Some(read),
            fwd: Some(read + 10_000),
            done: Some(read + 1_010_000),
            ret: Some(read + 1_030_000),
            queued_us: dev_us.map(|_| 0),
            device_us: dev_us,
        }
    }

    pub(super) fn k(seq: u32, ev: &str, ts: u64) -> Line {
        Line::K(KernelEvent {
            devid: 1,
            seq,
            ev: ev.into(),
            ts,
            pipe: (3 << 30) | (1 << 15) | 0x80,
            len: 512,
            status: 0,
        })
    }

    pub(super) fn header() -> Line {
        Line::Header(Header {
            format: crate::telemetry::FORMAT.into(),
            version: 1,
            clock: "CLOCK_MONOTONIC".into(),
            started_ns: 0,
            probes: ProbeState {
                attached: vec!["vhci_urb_enqueue".into()],
                ..ProbeState::default()
            },
        })
    }

    pub(super) fn port() -> Line {
        Line::Port(PortLine {
            port: 0,
            devid: 1,
            bus_id: "1-1".into(),
        })
    }
}
