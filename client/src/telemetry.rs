//! Per-URB timing records: what `attach --telemetry FILE` writes and `latency-report` reads.
//!
//! Every URB is timed at up to eight points on one clock (CLOCK_MONOTONIC, ns): four in the
//! kernel by the eBPF probes of `client-ebpf` (enqueue into vhci, CMD_SUBMIT built for our
//! socket, our RET_SUBMIT received, given back to the class driver), four here (CMD_SUBMIT read
//! from the kernel, forwarded to its URB stream, completion received, RET_SUBMIT handed to the
//! kernel), plus the server's own `ServerTiming`. The join key is the USB/IP (devid, seqnum).
//!
//! The hot path only stamps the clock and sends a small message over a channel; a writer thread
//! joins the userspace stamps of each URB and writes lines. Kernel events are written as they
//! come and joined by the reader ([`crate::latency`]), since a URB's give-back happens after
//! its RET_SUBMIT left us.
//!
//! # Format (version 1)
//!
//! JSON lines, each one object with one key naming the record:
//!
//! - `header`: `format` = `"p2p-usb-telemetry"`, `version` = 1, `clock` = `"CLOCK_MONOTONIC"`,
//!   `started_ns`, `probes` {`attached`: [function], `failed`: [{`function`, `reason`}],
//!   `error`: why no probe loaded, or null}. Always the first line.
//! - `port`: a vhci port attached (`port`, `devid`, `bus_id`).
//! - `u`: one URB as the client saw it: `devid`, `seq`, `ep`, `dir` (`in`/`out`), `type`,
//!   `len`, `status` (errno, 0 = success), `actual`, stamps `read`, `fwd`, `done`, `ret` (ns,
//!   null if the URB never got there), `queued_us`, `device_us` (server, null without TIMING).
//! - `k`: one probe event: `devid`, `seq`, `ev` (`enqueue`/`tx`/`rx`/`giveback`), `ts`, `pipe`
//!   (`urb->pipe`), `len`, `status`.
//! - `port_end`: a port's session counters when it ended (`submitted`, `completed`,
//!   `answered_locally`, `unlinked`, `in_flight`).
//! - `end`: `ended_ns`, `kernel_events`, `lost_events` (ring buffer overflows). Missing if
//!   the client was killed; the reader copes.
//!
//! Readers must ignore unknown keys and unknown record kinds; a change that alters the meaning
//! of a field bumps `version`.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use client_ebpf::{UrbEvent, monotonic_ns};
use protocol::usb::{Direction, TransferType, UrbStatus};
use protocol::wire::{UrbComplete, UrbSubmit};
use serde::{Deserialize, Serialize};

use crate::vhci::SessionStats;

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

impl From<UrbEvent> for KernelEvent {
    fn from(e: UrbEvent) -> Self {
        KernelEvent {
            devid: e.devid,
            seq: e.seqnum,
            ev: e.kind.name().to_owned(),
            ts: e.ts_ns,
            pipe: e.pipe,
            len: e.length,
            status: e.status,
        }
    }
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

/// Why a recording could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The file could not be created or written.
    #[error("writing the telemetry file {path}")]
    File {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The writer thread could not start or died.
    #[error("the telemetry writer thread failed")]
    Writer(#[source] std::io::Error),
}

/// What the hot path sends the writer.
enum Msg {
    Port(PortLine),
    Submit(UserUrb),
    Done {
        devid: u32,
        seq: u32,
        ns: u64,
        status: i32,
        actual: u32,
        queued_us: Option<u32>,
        device_us: Option<u32>,
    },
    Ret {
        devid: u32,
        seq: u32,
        ns: u64,
    },
    Kernel(UrbEvent),
    PortEnd(PortEnd),
    End {
        kernel_events: u64,
        lost_events: u64,
    },
}

/// The `attach` options that turn recording on.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// Record every URB's timestamps (kernel probes, this client, the server) to FILE, for
    /// `latency-report FILE`. Loading the probes needs CAP_BPF + CAP_PERFMON or root; without
    /// them the recording has userspace timestamps only.
    #[arg(long, value_name = "FILE")]
    pub telemetry: Option<std::path::PathBuf>,
    /// With --telemetry: do not load the eBPF probes (userspace timestamps only).
    #[arg(long, requires = "telemetry")]
    pub no_probes: bool,
}

impl TelemetryArgs {
    /// Starts recording if asked, logging which probes run and which could not attach.
    pub fn start(&self) -> Result<Option<Recording>, TelemetryError> {
        let Some(path) = &self.telemetry else {
            return Ok(None);
        };
        let rec = Recording::start(path, !self.no_probes)?;
        let probes = rec.probes();
        if !probes.attached.is_empty() {
            tracing::info!(probes = ?probes.attached, file = %path.display(), "URB telemetry: eBPF probes attached");
        }
        for f in &probes.failed {
            tracing::warn!(function = %f.function, reason = %f.reason, "URB telemetry: probe not attached");
        }
        if let Some(e) = &probes.error {
            tracing::warn!(
                "URB telemetry without kernel probes ({e}); recording userspace timestamps only"
            );
        }
        Ok(Some(rec))
    }
}

/// A recording in progress: the writer thread and, when they loaded, the probes.
pub struct Recording {
    tx: mpsc::Sender<Msg>,
    writer: JoinHandle<std::io::Result<()>>,
    probes: Option<client_ebpf::Reader>,
    state: ProbeState,
}

impl Recording {
    /// Creates `path` and starts recording; with `probes`, loads the eBPF probes first. A probe
    /// that cannot load or attach is reported in the header and by [`Recording::probes`]; the
    /// recording goes on with userspace stamps.
    pub fn start(path: &Path, probes: bool) -> Result<Self, TelemetryError> {
        let file = std::fs::File::create(path).map_err(|source| TelemetryError::File {
            path: path.display().to_string(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        let (reader, state) = if probes {
            match client_ebpf::Telemetry::load() {
                Ok(t) => {
                    let state = ProbeState {
                        attached: t.attached().iter().map(|f| (*f).to_owned()).collect(),
                        failed: t
                            .failed()
                            .iter()
                            .map(|f| ProbeFailed {
                                function: f.function.to_owned(),
                                reason: f.reason.clone(),
                            })
                            .collect(),
                        error: None,
                    };
                    let events = tx.clone();
                    match t.start(move |e| {
                        let _ = events.send(Msg::Kernel(e));
                    }) {
                        Ok(r) => (Some(r), state),
                        Err(e) => (None, ProbeState::failed(&e)),
                    }
                }
                Err(e) => (None, ProbeState::failed(&e)),
            }
        } else {
            (
                None,
                ProbeState {
                    error: Some("probes not requested".into()),
                    ..ProbeState::default()
                },
            )
        };
        let header = Line::Header(Header {
            format: FORMAT.into(),
            version: VERSION,
            clock: "CLOCK_MONOTONIC".into(),
            started_ns: monotonic_ns(),
            probes: state.clone(),
        });
        let writer = std::thread::Builder::new()
            .name("telemetry-writer".into())
            .spawn(move || write_all(BufWriter::new(file), header, rx))
            .map_err(TelemetryError::Writer)?;
        Ok(Recording {
            tx,
            writer,
            probes: reader,
            state,
        })
    }

    /// Which probes run, and why the others do not.
    pub fn probes(&self) -> &ProbeState {
        &self.state
    }

    /// A recorder for one attached port.
    pub fn port(&self, port: u32, devid: u32, bus_id: &str) -> PortRecorder {
        let _ = self.tx.send(Msg::Port(PortLine {
            port,
            devid,
            bus_id: bus_id.to_owned(),
        }));
        PortRecorder {
            tx: self.tx.clone(),
            devid,
            read_ns: 0,
            awaiting_ret: Vec::new(),
        }
    }

    /// Stops the probes (after a moment for the last give-backs to arrive) and finishes the
    /// file.
    pub fn finish(self) -> Result<(), TelemetryError> {
        let stats = self.probes.map(|p| {
            std::thread::sleep(Duration::from_millis(50));
            p.stop()
        });
        let stats = stats.unwrap_or_default();
        let _ = self.tx.send(Msg::End {
            kernel_events: stats.events,
            lost_events: stats.lost,
        });
        drop(self.tx);
        match self.writer.join() {
            Ok(r) => r.map_err(TelemetryError::Writer),
            Err(_) => Err(TelemetryError::Writer(std::io::Error::other(
                "the writer panicked",
            ))),
        }
    }
}

impl ProbeState {
    fn failed(e: &client_ebpf::LoadError) -> Self {
        let mut failed = Vec::new();
        if let client_ebpf::LoadError::NothingAttached(list) = e {
            failed = list
                .iter()
                .map(|f| ProbeFailed {
                    function: f.function.to_owned(),
                    reason: f.reason.clone(),
                })
                .collect();
        }
        ProbeState {
            attached: Vec::new(),
            failed,
            error: Some(e.to_string()),
        }
    }
}

/// The hot-path hooks of one port: each stamps the clock and sends one message.
pub struct PortRecorder {
    tx: mpsc::Sender<Msg>,
    devid: u32,
    /// When the last batch of kernel bytes arrived.
    read_ns: u64,
    /// Completions received whose RET_SUBMIT is not yet handed to the kernel.
    awaiting_ret: Vec<u32>,
}

impl PortRecorder {
    /// Bytes from the kernel arrived (the CMD_SUBMITs in them are stamped with this).
    pub fn kernel_bytes(&mut self) {
        self.read_ns = monotonic_ns();
    }

    /// A URB was handed to its stream's writer.
    pub fn forwarded(&mut self, urb: &UrbSubmit) {
        let _ = self.tx.send(Msg::Submit(UserUrb {
            devid: self.devid,
            seq: urb.id.0,
            ep: urb.endpoint.get(),
            dir: direction_name(urb.direction).into(),
            transfer_type: transfer_type_name(urb.transfer_type).into(),
            len: urb.length,
            read: Some(self.read_ns),
            fwd: Some(monotonic_ns()),
            ..UserUrb::default()
        }));
    }

    /// A completion arrived from the server.
    pub fn completion(&mut self, c: &UrbComplete) {
        let _ = self.tx.send(Msg::Done {
            devid: self.devid,
            seq: c.id.0,
            ns: monotonic_ns(),
            status: errno(c.status),
            actual: c.actual_length,
            queued_us: c.timing.map(|t| t.queued_us),
            device_us: c.timing.map(|t| t.device_us),
        });
        self.awaiting_ret.push(c.id.0);
    }

    /// RET_SUBMIT bytes were handed to the kernel link: every completion since the last call
    /// is answered now.
    pub fn to_kernel(&mut self) {
        if self.awaiting_ret.is_empty() {
            return;
        }
        let ns = monotonic_ns();
        for seq in self.awaiting_ret.drain(..) {
            let _ = self.tx.send(Msg::Ret {
                devid: self.devid,
                seq,
                ns,
            });
        }
    }

    /// The port ended with these counters.
    pub fn ended(&mut self, stats: SessionStats, in_flight: usize) {
        let _ = self.tx.send(Msg::PortEnd(PortEnd {
            devid: self.devid,
            submitted: stats.submitted,
            completed: stats.completed,
            answered_locally: stats.answered_locally,
            unlinked: stats.unlinked,
            in_flight: in_flight as u64,
        }));
    }
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::In => "in",
        Direction::Out => "out",
    }
}

fn transfer_type_name(t: TransferType) -> &'static str {
    match t {
        TransferType::Control => "control",
        TransferType::Bulk => "bulk",
        TransferType::Interrupt => "interrupt",
        TransferType::Isochronous => "iso",
    }
}

/// The errno the kernel sees for `status` (negative, 0 for success), as a plain number.
fn errno(status: UrbStatus) -> i32 {
    status.to_errno()
}

/// The writer thread: joins userspace stamps per URB, writes every line.
fn write_all<W: Write>(mut out: W, header: Line, rx: mpsc::Receiver<Msg>) -> std::io::Result<()> {
    let line = |out: &mut W, l: &Line| -> std::io::Result<()> {
        serde_json::to_writer(&mut *out, l).map_err(std::io::Error::other)?;
        out.write_all(b"\n")
    };
    line(&mut out, &header)?;
    let mut open: HashMap<(u32, u32), UserUrb> = HashMap::new();
    let mut end = None;
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Port(p) => line(&mut out, &Line::Port(p))?,
            Msg::Submit(u) => {
                open.insert((u.devid, u.seq), u);
            }
            Msg::Done {
                devid,
                seq,
                ns,
                status,
                actual,
                queued_us,
                device_us,
            } => {
                if let Some(u) = open.get_mut(&(devid, seq)) {
                    u.done = Some(ns);
                    u.status = Some(status);
                    u.actual = Some(actual);
                    u.queued_us = queued_us;
                    u.device_us = device_us;
                }
            }
            Msg::Ret { devid, seq, ns } => {
                if let Some(mut u) = open.remove(&(devid, seq)) {
                    u.ret = Some(ns);
                    line(&mut out, &Line::U(u))?;
                }
            }
            Msg::Kernel(e) => line(&mut out, &Line::K(e.into()))?,
            Msg::PortEnd(p) => line(&mut out, &Line::PortEnd(p))?,
            Msg::End {
                kernel_events,
                lost_events,
            } => {
                end = Some(End {
                    ended_ns: monotonic_ns(),
                    kernel_events,
                    lost_events,
                });
                break;
            }
        }
    }
    // URBs that never completed (in flight at the end) are still worth a line.
    let mut rest: Vec<UserUrb> = open.into_values().collect();
    rest.sort_by_key(|u| (u.devid, u.seq));
    for u in rest {
        line(&mut out, &Line::U(u))?;
    }
    if let Some(end) = end {
        line(&mut out, &Line::End(end))?;
    }
    out.flush()
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
    use protocol::usb::EndpointNumber;
    use protocol::wire::{ServerTiming, UrbId};

    fn recorder() -> (PortRecorder, mpsc::Receiver<Msg>) {
        let (tx, rx) = mpsc::channel();
        (
            PortRecorder {
                tx,
                devid: 0x10002,
                read_ns: 0,
                awaiting_ret: Vec::new(),
            },
            rx,
        )
    }

    fn submit(seq: u32) -> UrbSubmit {
        UrbSubmit {
            id: UrbId(seq),
            endpoint: EndpointNumber::new(1).unwrap(),
            direction: Direction::In,
            transfer_type: TransferType::Bulk,
            flags: 0,
            setup: None,
            length: 512,
            data: Vec::new(),
            interval: 0,
            iso: None,
        }
    }

    fn record(msgs: impl FnOnce(&mut PortRecorder), kernel: &[UrbEvent]) -> String {
        let (mut rec, rx) = recorder();
        let tx = rec.tx.clone();
        msgs(&mut rec);
        for e in kernel {
            tx.send(Msg::Kernel(*e)).unwrap();
        }
        tx.send(Msg::End {
            kernel_events: kernel.len() as u64,
            lost_events: 0,
        })
        .unwrap();
        let header = Line::Header(Header {
            format: FORMAT.into(),
            version: VERSION,
            clock: "CLOCK_MONOTONIC".into(),
            started_ns: 1,
            probes: ProbeState::default(),
        });
        let mut out = Vec::new();
        write_all(&mut out, header, rx).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_urb_becomes_one_joined_line_with_server_timing() {
        let text = record(
            |r| {
                r.kernel_bytes();
                r.forwarded(&submit(7));
                r.completion(&UrbComplete {
                    id: UrbId(7),
                    status: UrbStatus::Ok,
                    actual_length: 512,
                    data: vec![0; 512],
                    iso: None,
                    timing: Some(ServerTiming {
                        queued_us: 3,
                        device_us: 250,
                    }),
                });
                r.to_kernel();
                r.forwarded(&submit(8)); // never completes
            },
            &[],
        );
        let lines = parse(&text).unwrap();
        let urbs: Vec<&UserUrb> = lines
            .iter()
            .filter_map(|l| match l {
                Line::U(u) => Some(u),
                _ => None,
            })
            .collect();
        assert_eq!(urbs.len(), 2);
        let u = urbs[0];
        assert_eq!((u.devid, u.seq, u.ep, u.len), (0x10002, 7, 1, 512));
        assert_eq!((u.dir.as_str(), u.transfer_type.as_str()), ("in", "bulk"));
        assert_eq!((u.status, u.actual), (Some(0), Some(512)));
        assert_eq!((u.queued_us, u.device_us), (Some(3), Some(250)));
        let (read, fwd, done, ret) = (
            u.read.unwrap(),
            u.fwd.unwrap(),
            u.done.unwrap(),
            u.ret.unwrap(),
        );
        assert!(read <= fwd && fwd <= done && done <= ret);
        assert_eq!((urbs[1].seq, urbs[1].ret), (8, None));
        assert!(matches!(lines.last(), Some(Line::End(_))));
    }

    #[test]
    fn kernel_events_are_written_as_they_come() {
        let e = UrbEvent {
            ts_ns: 42,
            kind: client_ebpf::EventKind::Giveback,
            seqnum: 9,
            devid: 0x10002,
            pipe: 0xc000_8080,
            length: 31,
            status: 0,
        };
        let text = record(|_| {}, &[e]);
        let lines = parse(&text).unwrap();
        assert!(lines.contains(&Line::K(KernelEvent {
            devid: 0x10002,
            seq: 9,
            ev: "giveback".into(),
            ts: 42,
            pipe: 0xc000_8080,
            len: 31,
            status: 0,
        })));
    }

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
