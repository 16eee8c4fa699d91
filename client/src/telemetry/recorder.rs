//! The recorder on the attach path: per-URB clock stamps, kept cheap enough to leave on.
//!
//! The hot path only stamps the clock and sends a small message over a channel; a writer thread
//! joins the userspace stamps of each URB and writes lines. Kernel events are written as they
//! come and joined by the reader ([`crate::latency`]), since a URB's give-back happens after
//! its RET_SUBMIT left us.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use client_ebpf::{UrbEvent, monotonic_ns};
use protocol::usb::{Direction, TransferType, UrbStatus};
use protocol::wire::{UrbComplete, UrbSubmit};

use super::format::{
    End, FORMAT, Header, KernelEvent, Line, PortEnd, PortLine, ProbeFailed, ProbeState, UserUrb,
    VERSION,
};
use crate::vhci::{IsoEndpointStats, SessionStats};

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
    pub fn ended(&mut self, stats: SessionStats, in_flight: usize, iso: Vec<IsoEndpointStats>) {
        let _ = self.tx.send(Msg::PortEnd(PortEnd {
            devid: self.devid,
            submitted: stats.submitted,
            completed: stats.completed,
            answered_locally: stats.answered_locally,
            unlinked: stats.unlinked,
            in_flight: in_flight as u64,
            iso,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::format::parse;
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
}
