//! Per-URB timing records: what `attach --telemetry FILE` writes and `latency-report` reads.
//!
//! Every URB is timed at up to eight points on one clock (CLOCK_MONOTONIC, ns): four in the
//! kernel by the eBPF probes of `client-ebpf` (enqueue into vhci, CMD_SUBMIT built for our
//! socket, our RET_SUBMIT received, given back to the class driver), four here (CMD_SUBMIT read
//! from the kernel, forwarded to its URB stream, completion received, RET_SUBMIT handed to the
//! kernel), plus the server's own `ServerTiming`. The join key is the USB/IP (devid, seqnum).
//!
//! Two halves with different readers: [`format`](mod@format) is the file, a contract with
//! `latency-report`, the lab and anyone's scripts, so it changes only with its version;
//! [`recorder`] is the code on the attach path, which changes with the port loop it stamps.

pub mod format;
pub mod recorder;

pub use format::{
    End, FORMAT, Header, KernelEvent, Line, ParseError, PortEnd, PortLine, ProbeFailed, ProbeState,
    UserUrb, VERSION, parse,
};
pub use recorder::{PortRecorder, Recording, TelemetryArgs, TelemetryError};
