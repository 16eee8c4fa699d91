//! The running server's status file: how `status`, `ticket`, `tui` and the config editing
//! commands find a server that is already running, without a control socket to secure.
//!
//! The server rewrites the file about once a second (write, then rename, so a reader never
//! sees half of it) and removes it on a clean exit. A file whose process is gone is stale.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::connection::Snapshot;

/// Everything a status reader shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// The server's process id: `allow`/`revoke`/`share` send it SIGHUP to reload.
    pub pid: u32,
    /// The server's endpoint id.
    pub id: String,
    /// The ticket clients use.
    pub ticket: String,
    /// The config file it loaded, if any.
    pub config: Option<PathBuf>,
    /// Whether any client with the ticket may connect.
    pub allow_any: bool,
    /// How many client ids are allowed.
    pub allowed: usize,
    /// Milliseconds since the Unix epoch when this was written.
    pub updated_unix_ms: u64,
    /// Devices and clients.
    #[serde(flatten)]
    pub snapshot: Snapshot,
}

/// Why the status file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No server is running (or it runs with another `--status-file`).
    #[error("no running server found ({path} does not exist); is p2p-usb-server running?")]
    NotRunning {
        /// Where we looked.
        path: PathBuf,
    },
    /// The file names a process that is gone: the server was killed.
    #[error("{path} is stale: process {pid} is gone")]
    Stale {
        /// The file.
        path: PathBuf,
        /// Its process id.
        pid: u32,
    },
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a status file.
    #[error("{path}: not a status file: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

impl Status {
    /// Reads the status of a live server.
    pub fn read(path: &Path) -> Result<Status, StatusError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StatusError::NotRunning {
                    path: path.to_owned(),
                });
            }
            Err(source) => {
                return Err(StatusError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let status: Status = serde_json::from_str(&text).map_err(|source| StatusError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if !Path::new(&format!("/proc/{}", status.pid)).exists() {
            return Err(StatusError::Stale {
                path: path.to_owned(),
                pid: status.pid,
            });
        }
        Ok(status)
    }

    /// Writes atomically.
    pub fn write(&self, path: &Path) -> Result<(), StatusError> {
        let io = |source| StatusError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).expect("a status serializes");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// `/run/p2p-usb/server.json` for root (and the systemd unit), else under `$XDG_RUNTIME_DIR`.
pub fn default_path() -> PathBuf {
    if transport::daemon::running_as_root() {
        return PathBuf::from("/run/p2p-usb/server.json");
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("p2p-usb/server.json")
}

/// The ticket as a QR code of Unicode half blocks, light modules drawn, so it scans off a dark
/// terminal (as `qrencode -t UTF8` does).
pub fn qr(text: &str) -> Vec<String> {
    use qrcode::render::unicode::Dense1x2;
    let Ok(code) = qrcode::QrCode::new(text.as_bytes()) else {
        return vec!["(too long for a QR code)".into()];
    };
    code.render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_round_trips_and_a_dead_pid_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/server.json");
        assert!(matches!(
            Status::read(&path),
            Err(StatusError::NotRunning { .. })
        ));
        let mut s = Status {
            pid: std::process::id(),
            id: "abc".into(),
            ..Status::default()
        };
        s.write(&path).unwrap();
        assert_eq!(Status::read(&path).unwrap().id, "abc");
        s.pid = u32::MAX;
        s.write(&path).unwrap();
        assert!(matches!(
            Status::read(&path),
            Err(StatusError::Stale { .. })
        ));
    }

    #[test]
    fn a_ticket_fits_a_terminal_as_a_qr_code() {
        let ticket = format!(
            "p2pusb1:{}@192.168.1.20:7788,[fe80::1]:7788",
            "a".repeat(64)
        );
        let lines = qr(&ticket);
        assert!(lines.len() < 40, "{} rows", lines.len());
        assert!(lines.iter().all(|l| l.chars().count() < 80));
        assert!(
            lines[0]
                .chars()
                .all(|c| c == '█' || c == '▀' || c == '▄' || c == ' ')
        );
    }
}
