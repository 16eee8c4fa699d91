//! The arithmetic of a recording: which stamps belong to one URB, where its time went, and
//! the percentiles and budgets over all of them. Presentation lives in [`super::render`], so
//! these numbers are tested as numbers.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use hdrhistogram::Histogram;

use crate::telemetry::{KernelEvent, Line, PortEnd, ProbeState, UserUrb};

/// The parts of the split, in report order.
pub const PARTS: [&str; 5] = ["kernel", "client", "network", "server+device", "total"];

/// One URB with every stamp that was recorded for it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Joined {
    /// USB/IP devid.
    pub devid: u32,
    /// USB/IP seqnum.
    pub seq: u32,
    /// The client's record, if it read the URB.
    pub user: Option<UserUrb>,
    /// Probe stamps.
    pub enqueue: Option<u64>,
    /// vhci built the CMD_SUBMIT.
    pub tx: Option<u64>,
    /// vhci read our RET_SUBMIT.
    pub rx: Option<u64>,
    /// Given back to the class driver.
    pub giveback: Option<u64>,
    /// `urb->pipe` from the probes, for URBs the client never saw.
    pub pipe: Option<u32>,
}

/// Where one URB's time went, in nanoseconds; `None` where the stamps to tell are missing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Split {
    /// vhci and usbcore.
    pub kernel: Option<u64>,
    /// Our software on the client.
    pub client: u64,
    /// The network round trip (including the server's share when it sent no timing).
    pub network: u64,
    /// The server and the device.
    pub server: Option<u64>,
    /// End to end: enqueue to give-back with probes, else read to RET.
    pub total: u64,
}

impl Split {
    /// The parts in [`PARTS`] order, so every table and histogram lists them alike.
    pub fn parts(&self) -> [Option<u64>; 5] {
        [
            self.kernel,
            Some(self.client),
            Some(self.network),
            self.server,
            Some(self.total),
        ]
    }
}

impl Joined {
    /// The split of a URB the client completed; `None` for one still in flight at the end.
    pub fn split(&self) -> Option<Split> {
        let u = self.user.as_ref()?;
        let (read, fwd, done, ret) = (u.read?, u.fwd?, u.done?, u.ret?);
        let d = |a: u64, b: u64| b.saturating_sub(a);
        let mut client = d(read, fwd) + d(done, ret);
        let mut total = d(read, ret);
        if let Some(tx) = self.tx {
            client += d(tx, read);
        }
        if let Some(rx) = self.rx {
            client += d(ret, rx);
        }
        let server = match (u.queued_us, u.device_us) {
            (None, None) => None,
            (q, dev) => Some((u64::from(q.unwrap_or(0)) + u64::from(dev.unwrap_or(0))) * 1000),
        };
        let round_trip = d(fwd, done);
        let network = round_trip.saturating_sub(server.unwrap_or(0));
        let server = server.map(|s| s.min(round_trip));
        let kernel = match (self.enqueue, self.tx, self.rx, self.giveback) {
            (Some(e), Some(t), Some(r), Some(g)) => {
                total = d(e, g);
                Some(d(e, t) + d(r, g))
            }
            _ => None,
        };
        if kernel.is_none() {
            total = client + round_trip;
        }
        Some(Split {
            kernel,
            client,
            network,
            server,
            total,
        })
    }

    /// "ep1 in bulk": the group this URB is reported under.
    pub fn group(&self) -> String {
        if let Some(u) = &self.user {
            return format!("ep{} {} {}", u.ep, u.dir, u.transfer_type);
        }
        let p = client_ebpf::Pipe(self.pipe.unwrap_or(0));
        format!(
            "ep{} {} {}",
            p.endpoint(),
            if p.is_in() { "in" } else { "out" },
            p.transfer_type()
        )
    }
}

/// A recording, joined.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    /// Which probes ran.
    pub probes: ProbeState,
    /// Every URB of the recorded ports, by (devid, seqnum).
    pub urbs: Vec<Joined>,
    /// The ports' counters (absent if the client was killed).
    pub ports: Vec<PortEnd>,
    /// Whether the recording has its `end` line.
    pub complete: bool,
    /// Probe events lost to a full ring buffer.
    pub lost_events: u64,
}

impl Recording {
    /// Joins parsed lines. Kernel events of devids the client never attached (another client
    /// on the same machine) are left out.
    pub fn join(lines: Vec<Line>) -> Self {
        let mut rec = Recording::default();
        let mut devids = BTreeSet::new();
        let mut urbs: HashMap<(u32, u32), Joined> = HashMap::new();
        let mut kernel: Vec<KernelEvent> = Vec::new();
        for line in lines {
            match line {
                Line::Header(h) => rec.probes = h.probes,
                Line::Port(p) => {
                    devids.insert(p.devid);
                }
                Line::U(u) => {
                    let j = urbs.entry((u.devid, u.seq)).or_default();
                    j.devid = u.devid;
                    j.seq = u.seq;
                    j.user = Some(u);
                }
                Line::K(k) => kernel.push(k),
                Line::PortEnd(p) => rec.ports.push(p),
                Line::End(e) => {
                    rec.complete = true;
                    rec.lost_events = e.lost_events;
                }
            }
        }
        for k in kernel {
            if !devids.contains(&k.devid) {
                continue;
            }
            let j = urbs.entry((k.devid, k.seq)).or_default();
            j.devid = k.devid;
            j.seq = k.seq;
            j.pipe.get_or_insert(k.pipe);
            let slot = match k.ev.as_str() {
                "enqueue" => &mut j.enqueue,
                "tx" => &mut j.tx,
                "rx" => &mut j.rx,
                "giveback" => &mut j.giveback,
                _ => continue,
            };
            *slot = Some(k.ts);
        }
        rec.urbs = urbs.into_values().collect();
        rec.urbs.sort_by_key(|j| (j.devid, j.seq));
        rec
    }

    /// URB counts for the check that the probes and the client saw the same traffic.
    pub fn counts(&self) -> Counts {
        let port = |f: fn(&PortEnd) -> u64| self.ports.iter().map(f).sum::<u64>();
        Counts {
            probe_sent: self.urbs.iter().filter(|j| j.tx.is_some()).count() as u64,
            probe_given_back: self.urbs.iter().filter(|j| j.giveback.is_some()).count() as u64,
            client_forwarded: self
                .urbs
                .iter()
                .filter(|j| j.user.as_ref().is_some_and(|u| u.fwd.is_some()))
                .count() as u64,
            client_completed: self.urbs.iter().filter(|j| j.split().is_some()).count() as u64,
            answered_locally: port(|p| p.answered_locally),
            in_flight_at_stop: port(|p| p.in_flight),
            session_submitted: port(|p| p.submitted),
        }
    }

    /// Histograms per group, plus `all`.
    pub fn stats(&self) -> Stats {
        let mut groups: BTreeMap<String, PartHistograms> = BTreeMap::new();
        let mut all = PartHistograms::new();
        for j in &self.urbs {
            let Some(s) = j.split() else { continue };
            all.record(&s);
            groups
                .entry(j.group())
                .or_insert_with(PartHistograms::new)
                .record(&s);
        }
        Stats { groups, all }
    }
}

/// How many URBs each side saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// URBs vhci wrote to our socket (tx probe).
    pub probe_sent: u64,
    /// URBs given back after our RET_SUBMIT (give-back probe).
    pub probe_given_back: u64,
    /// URBs the client forwarded to the server.
    pub client_forwarded: u64,
    /// URBs the client completed (all four userspace stamps).
    pub client_completed: u64,
    /// URBs the client answered itself.
    pub answered_locally: u64,
    /// URBs at the server when the ports ended.
    pub in_flight_at_stop: u64,
    /// The sessions' own count of forwarded URBs.
    pub session_submitted: u64,
}

impl Counts {
    /// Whether the probes saw the URBs the client handled, give or take the ones in flight
    /// when recording stopped.
    pub fn agree(&self) -> bool {
        let client = self.client_forwarded + self.answered_locally;
        self.probe_sent.abs_diff(client) <= self.in_flight_at_stop
    }
}

/// One histogram per part of the split.
#[derive(Debug, Clone)]
pub struct PartHistograms {
    /// Indexed like [`PARTS`].
    pub parts: [Histogram<u64>; 5],
    /// Sum per part (ns), for the mean.
    pub sums: [u128; 5],
}

impl PartHistograms {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds");
        PartHistograms {
            parts: [h(), h(), h(), h(), h()],
            sums: [0; 5],
        }
    }

    fn record(&mut self, s: &Split) {
        for (i, v) in s.parts().into_iter().enumerate() {
            if let Some(v) = v {
                self.parts[i].saturating_record(v.max(1));
                self.sums[i] += u128::from(v);
            }
        }
    }

    /// URBs in this group.
    pub fn count(&self) -> u64 {
        self.parts[4].len()
    }

    /// Part `i`'s `q`-quantile (0..=1) in ms, `None` if it has no samples.
    pub fn quantile_ms(&self, i: usize, q: f64) -> Option<f64> {
        let h = &self.parts[i];
        (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1e6)
    }

    /// Part `i`'s mean in ms.
    pub fn mean_ms(&self, i: usize) -> Option<f64> {
        let n = self.parts[i].len();
        (n > 0).then(|| self.sums[i] as f64 / n as f64 / 1e6)
    }
}

/// Histograms for a whole recording.
#[derive(Debug, Clone)]
pub struct Stats {
    /// By "epN dir type".
    pub groups: BTreeMap<String, PartHistograms>,
    /// Every URB.
    pub all: PartHistograms,
}

/// The quantiles printed, as fractions and labels.
pub const QUANTILES: [(f64, &str); 5] = [
    (0.5, "p50"),
    (0.9, "p90"),
    (0.99, "p99"),
    (0.999, "p99.9"),
    (1.0, "max"),
];

/// What the command line allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// End-to-end latency at `quantile` must not exceed this (ms).
    pub total_ms: f64,
    /// Our own (client) overhead at `quantile` must not exceed this (ms).
    pub overhead_ms: f64,
    /// The quantile both are judged at (0..=1).
    pub quantile: f64,
}

/// A budget that was missed.
#[derive(Debug, Clone, PartialEq)]
pub struct Miss {
    /// Which part.
    pub what: &'static str,
    /// Measured (ms).
    pub measured_ms: f64,
    /// Allowed (ms).
    pub budget_ms: f64,
}

impl Budget {
    /// The budgets `stats` misses; empty when everything is within budget. A recording with
    /// no completed URB misses nothing (and says so elsewhere).
    pub fn check(&self, stats: &Stats) -> Vec<Miss> {
        let mut misses = Vec::new();
        let mut check = |what, part, budget_ms| {
            if let Some(measured_ms) = stats.all.quantile_ms(part, self.quantile)
                && measured_ms > budget_ms
            {
                misses.push(Miss {
                    what,
                    measured_ms,
                    budget_ms,
                });
            }
        };
        check("end-to-end latency", 4, self.total_ms);
        check("client overhead", 1, self.overhead_ms);
        misses
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::fixtures::{header, k, port, user};

    #[test]
    fn the_parts_add_up_to_the_kernels_end_to_end_time() {
        let r = 1_000_000;
        let rec = Recording::join(vec![
            header(),
            port(),
            k(5, "enqueue", r - 50_000),
            k(5, "tx", r - 20_000),
            Line::U(user(5, r, Some(600))),
            k(5, "rx", r + 1_040_000),
            k(5, "giveback", r + 1_070_000),
        ]);
        let s = rec.urbs[0].split().unwrap();
        // kernel: 30 us before, 30 us after; client: 20 + 10 + 20 + 10 us.
        assert_eq!(s.kernel, Some(60_000));
        assert_eq!(s.client, 60_000);
        assert_eq!(s.server, Some(600_000));
        assert_eq!(s.network, 400_000);
        assert_eq!(s.total, 1_120_000);
        assert_eq!(
            s.kernel.unwrap() + s.client + s.network + s.server.unwrap(),
            s.total
        );
        assert_eq!(rec.urbs[0].group(), "ep1 in bulk");
    }

    #[test]
    fn without_probes_or_server_timing_the_split_degrades_honestly() {
        let rec = Recording::join(vec![header(), port(), Line::U(user(1, 0, None))]);
        let s = rec.urbs[0].split().unwrap();
        assert_eq!(s.kernel, None);
        assert_eq!(s.server, None);
        assert_eq!(s.client, 30_000);
        assert_eq!(s.network, 1_000_000);
        assert_eq!(s.total, 1_030_000);
    }

    #[test]
    fn counts_agree_within_the_urbs_in_flight() {
        let mut lines = vec![header(), port()];
        for seq in 1..=10 {
            lines.push(k(seq, "tx", u64::from(seq)));
            if seq <= 9 {
                lines.push(Line::U(user(seq, 100, Some(1))));
            }
        }
        // Kernel events of a device this client never attached are not ours.
        lines.push(Line::K(KernelEvent {
            devid: 99,
            seq: 1,
            ev: "tx".into(),
            ts: 1,
            pipe: 0,
            len: 0,
            status: 0,
        }));
        let mut ports = PortEnd {
            devid: 1,
            submitted: 9,
            ..PortEnd::default()
        };
        lines.push(Line::PortEnd(ports.clone()));
        let rec = Recording::join(lines.clone());
        let c = rec.counts();
        assert_eq!((c.probe_sent, c.client_forwarded), (10, 9));
        assert!(!c.agree());
        ports.in_flight = 1;
        lines.pop();
        lines.push(Line::PortEnd(ports));
        assert!(Recording::join(lines).counts().agree());
    }
}
