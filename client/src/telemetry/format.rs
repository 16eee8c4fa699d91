//! The recording's file format, version 1: the records, and the reader's rules for lines it
//! does not know.
//!
//! It lives apart from the recorder because it is a contract: `latency-report`, the lab and
//! scripts read files written by other builds, so a field's meaning never changes without a
//! new `version`, and the tests here freeze the bytes.
//!
//! # Format (version 1)
//!
//! JSON lines, each one object with one key naming the record:
//!
//! - `header`: `format` = `"p2p-usb-telemetry"`, `version` = 1, `clock` = `"CLOCK_MONOTONIC"`,
//!   `started_ns`, `probes` {`attached`: \[function\], `failed`: [{`function`, `reason`}],
//!   `error`: why no probe loaded, or null}. Always the first line.
//! - `port`: a vhci port attached (`port`, `devid`, `bus_id`).
//! - `u`: one URB as the client saw it: `devid`, `seq`, `ep`, `dir` (`in`/`out`), `type`,
//!   `len`, `status` (errno, 0 = success), `actual`, stamps `read`, `fwd`, `done`, `ret` (ns,
//!   null if the URB never got there), `queued_us`, `device_us` (server, null without TIMING).
//! - `k`: one probe event: `devid`, `seq`, `ev` (`enqueue`/`tx`/`rx`/`giveback`), `ts`, `pipe`
//!   (`urb->pipe`), `len`, `status`.
//! - `port_end`: a port's session counters when it ended (`submitted`, `completed`,
//!   `answered_locally`, `unlinked`, `in_flight`, and `iso`: one object per isochronous
//!   endpoint with `endpoint`, `direction`, `urbs`, `answered_ahead`, `depth`, `underruns`,
//!   `missed_frames`, `packet_errors`, `hidden_errors`; absent without one).
//! - `end`: `ended_ns`, `kernel_events`, `lost_events` (ring buffer overflows). Missing if
//!   the client was killed; the reader copes.
//!
//! Readers must ignore unknown keys and unknown record kinds; a change that alters the meaning
//! of a field bumps `version`.

use serde::{Deserialize, Serialize};

use crate::vhci::IsoEndpointStats;

/// The `format` of the header line.
pub const FORMAT: &str = "p2p-usb-telemetry";
/// The record format version this code writes and reads.
pub const VERSION: u32 = 1;

/// One line of a recording.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    /// First line: what was recorded and how.
    Header(Header),
    /// A port was attached.
    Port(PortLine),
    /// One URB's userspace stamps.
    U(UserUrb),
    /// One probe event.
    K(KernelEvent),
    /// A port's counters at its end.
    PortEnd(PortEnd),
    /// The recording ended cleanly.
    End(End),
}

/// The header line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`] when written by this code.
    pub version: u32,
    /// The clock of every `*_ns` and stamp field.
    pub clock: String,
    /// When recording started.
    pub started_ns: u64,
    /// Which probes ran.
    pub probes: ProbeState,
}

/// Which probes were attached.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeState {
    /// Kernel functions with a probe.
    pub attached: Vec<String>,
    /// Probes that did not attach.
    pub failed: Vec<ProbeFailed>,
    /// Why no probe was loaded at all.
    pub error: Option<String>,
}

/// A probe that did not attach.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeFailed {
    /// The kernel function.
    pub function: String,
    /// Why.
    pub reason: String,
}

/// A port that was attached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortLine {
    /// vhci port number.
    pub port: u32,
    /// USB/IP devid on that port.
    pub devid: u32,
    /// The server's bus id of the device.
    pub bus_id: String,
}

/// A URB as the client saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserUrb {
    /// USB/IP devid.
    pub devid: u32,
    /// USB/IP seqnum.
    pub seq: u32,
    /// Endpoint number.
    pub ep: u8,
    /// `in` or `out`.
    pub dir: String,
    /// `control`, `bulk`, `interrupt` or `iso`.
    #[serde(rename = "type")]
    pub transfer_type: String,
    /// Requested length.
    pub len: u32,
    /// Completion status as an errno (0 = success); null if it never completed.
    pub status: Option<i32>,
    /// Bytes moved.
    pub actual: Option<u32>,
    /// CMD_SUBMIT read from the kernel.
    pub read: Option<u64>,
    /// Handed to its URB stream.
    pub fwd: Option<u64>,
    /// Completion received from the server.
    pub done: Option<u64>,
    /// RET_SUBMIT handed to the kernel link.
    pub ret: Option<u64>,
    /// Server: frame arrival to device submission.
    pub queued_us: Option<u32>,
    /// Server: device submission to completion.
    pub device_us: Option<u32>,
}

/// One probe event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelEvent {
    /// USB/IP devid.
    pub devid: u32,
    /// USB/IP seqnum.
    pub seq: u32,
    /// `enqueue`, `tx`, `rx` or `giveback`.
    pub ev: String,
    /// When (ns).
    pub ts: u64,
    /// `urb->pipe`.
    pub pipe: u32,
    /// Requested (enqueue, tx) or actual (rx, giveback) length.
    pub len: u32,
    /// URB status (rx, giveback).
    pub status: i32,
}

/// A port's counters at its end.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PortEnd {
    /// USB/IP devid.
    pub devid: u32,
    /// URBs forwarded to the server.
    pub submitted: u64,
    /// RET_SUBMITs for forwarded URBs.
    pub completed: u64,
    /// URBs answered without the server.
    pub answered_locally: u64,
    /// URBs cancelled by an unlink.
    pub unlinked: u64,
    /// Still at the server when the port ended.
    pub in_flight: u64,
    /// Each isochronous endpoint's stream (absent when the device had none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iso: Vec<IsoEndpointStats>,
}

/// The last line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct End {
    /// When recording stopped.
    pub ended_ns: u64,
    /// Probe events received.
    pub kernel_events: u64,
    /// Probe events dropped by a full ring buffer.
    pub lost_events: u64,
}

/// Parses a recording; lines it does not know (a newer writer) are skipped.
pub fn parse(text: &str) -> Result<Vec<Line>, ParseError> {
    let mut lines = Vec::new();
    let total = text.lines().count();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Line>(raw) {
            Ok(Line::Header(h)) if h.format != FORMAT || h.version != VERSION => {
                return Err(ParseError::Version {
                    format: h.format,
                    version: h.version,
                });
            }
            Ok(l) => lines.push(l),
            Err(_) if is_unknown_kind(raw) => {}
            // The last line of a live or killed recording may be cut short.
            Err(_) if i + 1 == total => break,
            Err(source) => {
                return Err(ParseError::Line {
                    line: i + 1,
                    source,
                });
            }
        }
    }
    match lines.first() {
        Some(Line::Header(_)) => Ok(lines),
        _ => Err(ParseError::NoHeader),
    }
}

fn is_unknown_kind(raw: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(raw)
        .ok()
        .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()))
        .is_some_and(|keys| {
            keys.len() == 1
                && !["header", "port", "u", "k", "port_end", "end"].contains(&keys[0].as_str())
        })
}

/// Why a recording could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The first line is not a header.
    #[error("not a p2p-usb telemetry recording (no header line)")]
    NoHeader,
    /// Written by another format or version.
    #[error(
        "unsupported recording: format {format:?} version {version} (this reads {FORMAT} {VERSION})"
    )]
    Version {
        /// Its format.
        format: String,
        /// Its version.
        version: u32,
    },
    /// A line that is not valid.
    #[error("line {line} is not a valid record")]
    Line {
        /// 1-based.
        line: usize,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_is_frozen() {
        let line = Line::U(UserUrb {
            devid: 1,
            seq: 2,
            ep: 3,
            dir: "out".into(),
            transfer_type: "bulk".into(),
            len: 4,
            status: Some(-32),
            actual: Some(0),
            read: Some(10),
            fwd: Some(11),
            done: Some(12),
            ret: Some(13),
            queued_us: None,
            device_us: Some(5),
        });
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"u":{"devid":1,"seq":2,"ep":3,"dir":"out","type":"bulk","len":4,"status":-32,"actual":0,"read":10,"fwd":11,"done":12,"ret":13,"queued_us":null,"device_us":5}}"#
        );
    }

    #[test]
    fn readers_skip_unknown_records_and_a_cut_last_line_but_refuse_other_versions() {
        let header = r#"{"header":{"format":"p2p-usb-telemetry","version":1,"clock":"CLOCK_MONOTONIC","started_ns":1,"probes":{"attached":[],"failed":[],"error":null}}}"#;
        let text = format!("{header}\n{{\"future\":{{\"x\":1}}}}\n{{\"u\":{{\"devid\":1,");
        assert_eq!(parse(&text).unwrap().len(), 1);
        let v2 = header.replace("\"version\":1", "\"version\":2");
        assert!(matches!(
            parse(&v2),
            Err(ParseError::Version { version: 2, .. })
        ));
        assert!(parse("{\"end\":{}}").is_err());
    }
}
