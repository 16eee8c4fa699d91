//! What a running attachment tells `status` and the TUI about its vhci port.
//!
//! `status` and `tui` run as other processes than the `attach` or `run` that holds a port, and
//! vhci's sysfs only knows the port's socket. So each attachment writes a small JSON report per
//! port into the runtime directory, once a second, and removes it when the port ends. A report
//! whose writer is gone (killed, crashed) is ignored, never shown as live.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vhci::IsoEndpointStats;

/// Where reports live unless `P2P_USB_RUN_DIR` says otherwise: `/run/p2p-usb` (the client
/// runs as root to use vhci), or the user's runtime directory.
pub fn dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("P2P_USB_RUN_DIR") {
        return PathBuf::from(dir);
    }
    if Path::new("/run").is_dir() && is_root() {
        return PathBuf::from("/run/p2p-usb");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("p2p-usb"),
        None => std::env::temp_dir().join("p2p-usb"),
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// One port's live figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PortReport {
    /// vhci port number.
    pub port: u32,
    /// The process that holds the port.
    pub pid: u32,
    /// The device, as `vid:pid`.
    pub device: String,
    /// QUIC's round-trip estimate to the server, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// The path to the server now: relayed or direct.
    #[serde(default)]
    pub path: Option<transport::path::PathView>,
    /// How often that path changed.
    #[serde(default)]
    pub path_changes: u64,
    /// URBs forwarded to the server.
    pub submitted: u64,
    /// URBs completed to the kernel.
    pub completed: u64,
    /// URBs cancelled by an unlink.
    pub unlinked: u64,
    /// Bytes to the device.
    pub bytes_out: u64,
    /// Bytes from the device.
    pub bytes_in: u64,
    /// Each isochronous endpoint's stream.
    #[serde(default)]
    pub iso: Vec<IsoEndpointStats>,
}

/// One isochronous stream in a line, as `status`, the TUI and `latency-report` show it.
pub fn iso_line(s: &IsoEndpointStats) -> String {
    let direction = direction(s);
    let mut line = format!(
        "iso ep {} {direction}: {} URBs, {} underruns ({} frames missed), {} packet errors",
        s.endpoint, s.urbs, s.underruns, s.missed_frames, s.packet_errors
    );
    if s.answered_ahead > 0 {
        line += &format!(
            ", {} answered ahead (depth {}, {} errors hidden)",
            s.answered_ahead, s.depth, s.hidden_errors
        );
    }
    line
}

/// The same, short enough for a table cell.
pub fn iso_cell(s: &IsoEndpointStats) -> String {
    format!(
        "ep{} {}: {} underruns",
        s.endpoint,
        direction(s),
        s.underruns
    )
}

fn direction(s: &IsoEndpointStats) -> &'static str {
    match s.direction {
        crate::vhci::iso_ahead::IsoDirection::In => "in",
        crate::vhci::iso_ahead::IsoDirection::Out => "out",
    }
}

fn path(dir: &Path, port: u32) -> PathBuf {
    dir.join(format!("port-{port}.json"))
}

/// Writes `report` whole (a reader never sees half of it).
pub fn write(dir: &Path, report: &PortReport) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".port-{}.{}.tmp", report.port, report.pid));
    std::fs::write(&tmp, serde_json::to_vec(report)?)?;
    std::fs::rename(&tmp, path(dir, report.port))
}

/// The report for `port`, if a live process wrote one.
pub fn read(dir: &Path, port: u32) -> Option<PortReport> {
    let bytes = std::fs::read(path(dir, port)).ok()?;
    let report: PortReport = serde_json::from_slice(&bytes).ok()?;
    let alive = Path::new(&format!("/proc/{}", report.pid)).exists();
    (alive && report.port == port).then_some(report)
}

/// Removes `port`'s report if this process wrote it.
pub fn remove(dir: &Path, port: u32) {
    if read(dir, port).is_some_and(|r| r.pid == std::process::id()) {
        let _ = std::fs::remove_file(path(dir, port));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhci::iso_ahead::IsoDirection;

    #[test]
    fn a_report_round_trips_and_a_dead_writers_is_ignored() {
        let dir = std::env::temp_dir().join(format!("port-report-{}", std::process::id()));
        let mut report = PortReport {
            port: 3,
            pid: std::process::id(),
            device: "46f4:0002".into(),
            rtt_ms: Some(20.5),
            iso: vec![IsoEndpointStats {
                endpoint: 1,
                direction: IsoDirection::Out,
                underruns: 2,
                ..IsoEndpointStats::default()
            }],
            ..PortReport::default()
        };
        write(&dir, &report).unwrap();
        assert_eq!(read(&dir, 3), Some(report.clone()));
        assert_eq!(read(&dir, 4), None);
        remove(&dir, 3);
        assert_eq!(read(&dir, 3), None, "removed by its writer");
        report.pid = u32::MAX; // no such process
        write(&dir, &report).unwrap();
        assert_eq!(read(&dir, 3), None, "its writer is gone");
        std::fs::write(path(&dir, 5), b"{not json").unwrap();
        assert_eq!(read(&dir, 5), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
