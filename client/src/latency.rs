//! The arithmetic of `latency-report`: joining a recording's kernel and userspace stamps per
//! URB, splitting each URB's time into kernel / client / network / server+device, percentiles
//! per endpoint, budgets, and the SVG. No I/O here, so every number is unit-tested.
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

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
        let values = [
            s.kernel,
            Some(s.client),
            Some(s.network),
            s.server,
            Some(s.total),
        ];
        for (i, v) in values.into_iter().enumerate() {
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

/// The text report.
pub fn render_table(rec: &Recording, stats: &Stats) -> String {
    let mut out = String::new();
    let c = rec.counts();
    let probes = if rec.probes.attached.is_empty() {
        format!(
            "none ({})",
            rec.probes.error.as_deref().unwrap_or("not loaded")
        )
    } else {
        rec.probes.attached.join(", ")
    };
    let _ = writeln!(out, "probes attached: {probes}");
    for f in &rec.probes.failed {
        let _ = writeln!(out, "probe not attached: {} ({})", f.function, f.reason);
    }
    let _ = writeln!(
        out,
        "URBs: probes saw {} sent by vhci and {} given back; the client forwarded {}, answered {} \
         itself, completed {}; {} in flight at stop{}{}",
        c.probe_sent,
        c.probe_given_back,
        c.client_forwarded,
        c.answered_locally,
        c.client_completed,
        c.in_flight_at_stop,
        if rec.lost_events > 0 {
            format!("; {} probe events lost", rec.lost_events)
        } else {
            String::new()
        },
        if rec.complete {
            ""
        } else {
            " (recording not finished)"
        }
    );
    let _ = writeln!(out, "\nend-to-end latency per endpoint (ms)");
    let _ = write!(out, "{:<24} {:>7}", "endpoint", "count");
    for (_, label) in QUANTILES {
        let _ = write!(out, " {label:>9}");
    }
    out.push('\n');
    let rows = stats
        .groups
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .chain(std::iter::once(("all", &stats.all)));
    for (name, h) in rows {
        let _ = write!(out, "{name:<24} {:>7}", h.count());
        for (q, _) in QUANTILES {
            let _ = write!(out, " {}", ms(h.quantile_ms(4, q)));
        }
        out.push('\n');
    }
    let _ = writeln!(out, "\nwhere the time went, all URBs (ms)");
    let _ = write!(out, "{:<24} {:>7}", "part", "count");
    for (_, label) in QUANTILES {
        let _ = write!(out, " {label:>9}");
    }
    let _ = writeln!(out, " {:>9} {:>6}", "mean", "share");
    let total_mean = stats.all.mean_ms(4).unwrap_or(0.0);
    for (i, part) in PARTS.iter().enumerate() {
        let label = match *part {
            "kernel" => "kernel (vhci, usbcore)",
            "client" => "client (ours)",
            other => other,
        };
        let _ = write!(out, "{label:<24} {:>7}", stats.all.parts[i].len());
        for (q, _) in QUANTILES {
            let _ = write!(out, " {}", ms(stats.all.quantile_ms(i, q)));
        }
        let mean = stats.all.mean_ms(i);
        let share = match mean {
            Some(m) if total_mean > 0.0 => format!("{:>5.1}%", 100.0 * m / total_mean),
            _ => format!("{:>6}", "-"),
        };
        let _ = writeln!(out, " {} {share}", ms(mean));
    }
    out
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("{v:>9.3}"),
        None => format!("{:>9}", "-"),
    }
}

/// Machine-readable summary (for the lab and scripts).
pub fn summary_json(rec: &Recording, stats: &Stats, misses: &[Miss]) -> serde_json::Value {
    let c = rec.counts();
    let parts = |h: &PartHistograms| -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (i, part) in PARTS.iter().enumerate() {
            let mut p = serde_json::Map::new();
            p.insert("count".into(), h.parts[i].len().into());
            for (q, label) in QUANTILES {
                p.insert(format!("{label}_ms"), h.quantile_ms(i, q).into());
            }
            p.insert("mean_ms".into(), h.mean_ms(i).into());
            m.insert((*part).into(), p.into());
        }
        m.into()
    };
    serde_json::json!({
        "probes": {"attached": rec.probes.attached, "failed": rec.probes.failed.iter().map(|f| serde_json::json!({"function": f.function, "reason": f.reason})).collect::<Vec<_>>(), "error": rec.probes.error},
        "counts": {
            "probe_sent": c.probe_sent, "probe_given_back": c.probe_given_back,
            "client_forwarded": c.client_forwarded, "client_completed": c.client_completed,
            "answered_locally": c.answered_locally, "in_flight_at_stop": c.in_flight_at_stop,
            "session_submitted": c.session_submitted, "agree": c.agree(),
        },
        "lost_events": rec.lost_events,
        "complete": rec.complete,
        "all": parts(&stats.all),
        "groups": stats.groups.iter().map(|(k, v)| (k.clone(), parts(v))).collect::<serde_json::Map<_, _>>(),
        "budget_misses": misses.iter().map(|m| serde_json::json!({"what": m.what, "measured_ms": m.measured_ms, "budget_ms": m.budget_ms})).collect::<Vec<_>>(),
    })
}

/// Log-spaced bins: 10 per decade from 1 us to 10 s.
const BINS_PER_DECADE: usize = 10;
const FIRST_DECADE: i32 = 3; // 1e3 ns
const DECADES: usize = 7;

fn bin_of(ns: u64) -> usize {
    let x = (ns.max(1) as f64).log10() - f64::from(FIRST_DECADE);
    ((x * BINS_PER_DECADE as f64).floor().max(0.0) as usize).min(BINS_PER_DECADE * DECADES - 1)
}

/// An SVG histogram: one step line per part of the split over log-spaced latency bins.
pub fn render_svg(rec: &Recording, title: &str) -> String {
    const COLORS: [&str; 5] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#333333"];
    let nbins = BINS_PER_DECADE * DECADES;
    let mut counts = vec![vec![0u64; nbins]; PARTS.len()];
    for s in rec.urbs.iter().filter_map(Joined::split) {
        let values = [
            s.kernel,
            Some(s.client),
            Some(s.network),
            s.server,
            Some(s.total),
        ];
        for (i, v) in values.into_iter().enumerate() {
            if let Some(v) = v {
                counts[i][bin_of(v)] += 1;
            }
        }
    }
    let max = counts.iter().flatten().copied().max().unwrap_or(0).max(1);
    let (w, h, left, right, top, bottom) = (900.0, 420.0, 60.0, 20.0, 40.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let x = |bin: f64| left + pw * bin / nbins as f64;
    let y = |c: u64| top + ph - ph * c as f64 / max as f64;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="22" font-size="15">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        top + ph,
        left + pw,
        top + ph
    );
    let _ = writeln!(
        svg,
        r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"#,
        top + ph
    );
    for (d, label) in [
        "1 us", "10 us", "100 us", "1 ms", "10 ms", "100 ms", "1 s", "10 s",
    ]
    .iter()
    .enumerate()
    {
        let xx = x((d * BINS_PER_DECADE) as f64);
        let _ = writeln!(
            svg,
            r##"<line x1="{xx}" y1="{top}" x2="{xx}" y2="{}" stroke="#ddd"/><text x="{xx}" y="{}" text-anchor="middle">{label}</text>"##,
            top + ph,
            top + ph + 16.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">latency per URB (log scale)</text>"#,
        left + pw / 2.0,
        h - 10.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">URBs (max {max})</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    for (i, part) in PARTS.iter().enumerate() {
        if counts[i].iter().all(|&c| c == 0) {
            continue;
        }
        let mut points = String::new();
        for (b, &c) in counts[i].iter().enumerate() {
            let _ = write!(
                points,
                "{:.1},{:.1} {:.1},{:.1} ",
                x(b as f64),
                y(c),
                x(b as f64 + 1.0),
                y(c)
            );
        }
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
            COLORS[i],
            points.trim_end()
        );
        let ly = top + 14.0 * i as f64 + 4.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{part}</text>"#,
            left + pw - 120.0,
            ly,
            COLORS[i],
            left + pw - 105.0,
            ly + 9.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{Header, PortLine};

    fn user(seq: u32, read: u64, dev_us: Option<u32>) -> UserUrb {
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

    fn k(seq: u32, ev: &str, ts: u64) -> Line {
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

    fn header() -> Line {
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

    fn port() -> Line {
        Line::Port(PortLine {
            port: 0,
            devid: 1,
            bus_id: "1-1".into(),
        })
    }

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

    #[test]
    fn percentiles_and_budgets() {
        let mut lines = vec![header(), port()];
        // 100 URBs, read -> ret of 1.03 ms each, except one of ~101 ms.
        for seq in 0..100u32 {
            let mut u = user(seq, 0, Some(500));
            if seq == 99 {
                u.done = Some(100_010_000);
                u.ret = Some(100_030_000);
            }
            lines.push(Line::U(u));
        }
        let rec = Recording::join(lines);
        let stats = rec.stats();
        assert_eq!(stats.all.count(), 100);
        let p50 = stats.all.quantile_ms(4, 0.5).unwrap();
        assert!((p50 - 1.03).abs() < 0.01, "p50 {p50}");
        let max = stats.all.quantile_ms(4, 1.0).unwrap();
        assert!((max - 100.03).abs() < 0.1, "max {max}");
        let client_p99 = stats.all.quantile_ms(1, 0.99).unwrap();
        assert!((client_p99 - 0.03).abs() < 0.001);
        let ok = Budget {
            total_ms: 200.0,
            overhead_ms: 0.2,
            quantile: 0.99,
        };
        assert!(ok.check(&stats).is_empty());
        let tight = Budget {
            total_ms: 0.001,
            overhead_ms: 0.001,
            quantile: 0.99,
        };
        let misses = tight.check(&stats);
        assert_eq!(misses.len(), 2);
        assert_eq!(misses[0].what, "end-to-end latency");
        let table = render_table(&rec, &stats);
        assert!(table.contains("ep1 in bulk"), "{table}");
        assert!(table.contains("client (ours)"), "{table}");
        let svg = render_svg(&rec, "t<1>");
        assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("t&lt;1&gt;"));
        let json = summary_json(&rec, &stats, &misses);
        assert_eq!(json["all"]["total"]["count"], 100);
        assert_eq!(json["budget_misses"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn bins_are_log_spaced_and_clamped() {
        assert_eq!(bin_of(1), 0);
        assert_eq!(bin_of(1_000), 0);
        assert_eq!(bin_of(10_000), 10);
        assert_eq!(bin_of(1_000_000), 30);
        assert_eq!(bin_of(u64::MAX), BINS_PER_DECADE * DECADES - 1);
    }
}
