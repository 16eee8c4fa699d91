//! How a joined recording is shown: the text tables, the JSON summary for the lab and
//! scripts, and the SVG histogram. Only presentation; every number comes from
//! [`super::analysis`].

use std::fmt::Write as _;

use super::analysis::{Joined, Miss, PARTS, PartHistograms, QUANTILES, Recording, Stats};

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
    for p in &rec.ports {
        for s in &p.iso {
            let _ = writeln!(
                out,
                "devid {:#010x} {}",
                p.devid,
                crate::port_report::iso_line(s)
            );
        }
    }
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
        "iso": rec.ports.iter().flat_map(|p| p.iso.iter().map(move |s| serde_json::json!({"devid": p.devid, "stream": s}))).collect::<Vec<_>>(),
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
        for (i, v) in s.parts().into_iter().enumerate() {
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
    use crate::latency::analysis::Budget;
    use crate::latency::fixtures::{header, port, user};
    use crate::telemetry::Line;

    #[test]
    fn iso_streams_are_reported_per_port() {
        let end = crate::telemetry::PortEnd {
            devid: 0x10002,
            iso: vec![crate::vhci::IsoEndpointStats {
                endpoint: 1,
                direction: crate::vhci::iso_ahead::IsoDirection::Out,
                urbs: 500,
                underruns: 3,
                missed_frames: 24,
                ..Default::default()
            }],
            ..Default::default()
        };
        let rec = Recording::join(vec![header(), port(), Line::PortEnd(end)]);
        let text = render_table(&rec, &rec.stats());
        assert!(
            text.contains(
                "devid 0x00010002 iso ep 1 out: 500 URBs, 3 underruns (24 frames missed)"
            ),
            "{text}"
        );
        let json = summary_json(&rec, &rec.stats(), &[]);
        assert_eq!(json["iso"][0]["stream"]["underruns"], 3);
        assert_eq!(json["iso"][0]["stream"]["direction"], "out");
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
