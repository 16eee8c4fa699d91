//! eBPF probes that time every URB inside the client kernel, and the loader that runs them.
//!
//! The probes are C (`src/bpf/urb.bpf.c`), built by `build.rs` with Debian's clang and
//! embedded here, so running the client needs no compiler. They fire at four points of a URB's
//! path through vhci-hcd (see [`EventKind`]) and send [`UrbEvent`]s through a ring buffer,
//! keyed by the USB/IP seqnum and devid that the client's own records carry too.
//!
//! Loading needs CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN) and a kernel with kprobes. Each
//! probe attaches on its own, so a kernel that lacks one function still gives the others;
//! [`Telemetry::failed`] says which did not attach and why.

pub mod event;

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use aya::Ebpf;
use aya::maps::{Array, MapData, RingBuf};
use aya::programs::KProbe;

pub use event::{EVENT_SIZE, EventKind, Pipe, UrbEvent};

/// The compiled probes; empty when clang was missing at build time.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/urb.bpf.o"));

/// Each probe: (program in the object, kernel function it attaches to).
pub const PROBES: &[(&str, &str)] = &[
    ("on_enqueue", "vhci_urb_enqueue"),
    ("on_pack_pdu", "usbip_pack_pdu"),
    ("on_giveback", "usb_hcd_giveback_urb"),
];

/// Whether this binary carries the real probes.
pub fn probes_built() -> bool {
    !OBJECT.is_empty()
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns()` reads, so userspace
/// timestamps and probe timestamps subtract directly.
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Why the probes could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The binary was built without clang.
    #[error(
        "the eBPF probes are not built into this binary: run `cargo xtask build-ebpf`, then rebuild"
    )]
    NotBuilt,
    /// The process lacks the capabilities to load BPF programs.
    #[error("loading eBPF probes needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN (run as root)")]
    NoPermission,
    /// The kernel refused the object (no BPF syscall, no BTF to relocate against, ...).
    #[error("the kernel refused the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    /// Not one probe attached; each reason is listed.
    #[error("no probe attached: {}", list_failures(.0))]
    NothingAttached(Vec<ProbeFailure>),
    /// The object lacks a map the reader needs.
    #[error("the eBPF object has no `{0}` map")]
    MissingMap(&'static str),
    /// A map exists but could not be opened.
    #[error("opening the `{name}` map")]
    Map {
        /// The map.
        name: &'static str,
        /// Why.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// The reader thread could not start.
    #[error("starting the probe reader thread")]
    Thread(#[source] std::io::Error),
}

/// A probe that did not attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFailure {
    /// The kernel function.
    pub function: &'static str,
    /// Why, as the kernel or aya put it (for people; never matched on).
    pub reason: String,
}

fn list_failures(failures: &[ProbeFailure]) -> String {
    failures
        .iter()
        .map(|f| format!("{} ({})", f.function, f.reason))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The loaded probes, attached as far as the kernel allowed.
pub struct Telemetry {
    ebpf: Ebpf,
    attached: Vec<&'static str>,
    failed: Vec<ProbeFailure>,
}

impl Telemetry {
    /// Loads the embedded object and attaches every probe it can.
    pub fn load() -> Result<Self, LoadError> {
        if !probes_built() {
            return Err(LoadError::NotBuilt);
        }
        if !may_load_bpf() {
            return Err(LoadError::NoPermission);
        }
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| {
            if is_permission(&e) {
                LoadError::NoPermission
            } else {
                LoadError::Load(Box::new(e))
            }
        })?;
        let mut attached = Vec::new();
        let mut failed = Vec::new();
        for &(program, function) in PROBES {
            match attach(&mut ebpf, program, function) {
                Ok(()) => attached.push(function),
                Err(reason) => failed.push(ProbeFailure { function, reason }),
            }
        }
        if attached.is_empty() {
            return Err(LoadError::NothingAttached(failed));
        }
        Ok(Telemetry {
            ebpf,
            attached,
            failed,
        })
    }

    /// Kernel functions with a probe attached.
    pub fn attached(&self) -> &[&'static str] {
        &self.attached
    }

    /// Probes that did not attach.
    pub fn failed(&self) -> &[ProbeFailure] {
        &self.failed
    }

    /// Hands every event to `sink` on a thread of its own until [`Reader::stop`]. The thread
    /// owns the probes: they detach when it ends.
    pub fn start<F>(mut self, mut sink: F) -> Result<Reader, LoadError>
    where
        F: FnMut(UrbEvent) + Send + 'static,
    {
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(LoadError::MissingMap(name))
        };
        let map_err = |name: &'static str| {
            move |e: aya::maps::MapError| LoadError::Map {
                name,
                source: Box::new(e),
            }
        };
        let mut ring =
            RingBuf::try_from(take(&mut self.ebpf, "EVENTS")?).map_err(map_err("EVENTS"))?;
        let lost: Array<MapData, u64> =
            Array::try_from(take(&mut self.ebpf, "LOST")?).map_err(map_err("LOST"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let ebpf = self.ebpf;
        let thread = std::thread::Builder::new()
            .name("urb-probes".into())
            .spawn(move || {
                let _probes = ebpf;
                let mut events = 0u64;
                let mut drain = |ring: &mut RingBuf<MapData>, events: &mut u64| {
                    while let Some(item) = ring.next() {
                        if let Some(e) = UrbEvent::decode(&item) {
                            *events += 1;
                            sink(e);
                        }
                    }
                };
                loop {
                    let done = stopping.load(Ordering::Acquire);
                    wait_readable(&ring, Duration::from_millis(100));
                    drain(&mut ring, &mut events);
                    if done {
                        break;
                    }
                }
                ReaderStats {
                    events,
                    lost: lost.get(&0, 0).unwrap_or(0),
                }
            })
            .map_err(LoadError::Thread)?;
        Ok(Reader { stop, thread })
    }
}

/// What the reader saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Events handed to the sink.
    pub events: u64,
    /// Events the probes dropped because the ring buffer was full.
    pub lost: u64,
}

/// The running reader thread.
pub struct Reader {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<ReaderStats>,
}

impl Reader {
    /// Drains what is left, detaches the probes and says what was seen.
    pub fn stop(self) -> ReaderStats {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or_default()
    }
}

fn attach(ebpf: &mut Ebpf, program: &str, function: &str) -> Result<(), String> {
    let prog = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the object"))?;
    let probe: &mut KProbe = prog.try_into().map_err(|e| chain(&e))?;
    probe.load().map_err(|e| chain(&e))?;
    probe.attach(function, 0).map_err(|e| chain(&e))?;
    Ok(())
}

/// An error with its sources, for a person to read.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn is_permission(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::PermissionDenied
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Whether our effective capabilities allow loading kprobes (checked up front so the error
/// says what is missing rather than "operation not permitted" from some map).
fn may_load_bpf() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return true; // let the kernel decide
    };
    let Some(caps) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return true;
    };
    caps_allow_bpf(caps)
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn caps_allow_bpf(caps: u64) -> bool {
    let has = |cap: u32| caps & (1 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

fn wait_readable(ring: &RingBuf<MapData>, timeout: Duration) {
    let fd = ring.as_fd();
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::time::Timespec {
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    // An error (EINTR) just means we drain now and poll again.
    let _ = rustix::event::poll(&mut fds, Some(&timeout));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_that_allow_loading() {
        assert!(caps_allow_bpf(1 << CAP_SYS_ADMIN));
        assert!(caps_allow_bpf((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(!caps_allow_bpf(1 << CAP_BPF));
        assert!(!caps_allow_bpf(0));
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }

    #[test]
    fn failures_are_listed_by_function() {
        let e = LoadError::NothingAttached(vec![ProbeFailure {
            function: "vhci_urb_enqueue",
            reason: "no kprobes".into(),
        }]);
        assert_eq!(
            e.to_string(),
            "no probe attached: vhci_urb_enqueue (no kprobes)"
        );
    }
}

#[cfg(test)]
mod on_this_kernel {
    /// Loads the real probes on the machine running the tests (root only; the lab's kernel
    /// has kprobes, build hosts may not). Prints what attached.
    #[test]
    #[ignore = "needs root and a kernel with BPF; run with --ignored"]
    fn load_and_report() {
        match super::Telemetry::load() {
            Ok(t) => println!("attached {:?}, failed {:?}", t.attached(), t.failed()),
            Err(e) => println!("not loaded: {e}"),
        }
    }
}
