//! What both daemons do around their work, written once: where their key and config files
//! live, what a bad config file reports, how they learn to stop, and the peak memory they
//! report. The two binaries differ only in the [`Role`] they pass.

use std::path::{Path, PathBuf};

/// Which daemon is asking: it names the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `p2p-usb-server`.
    Server,
    /// `p2p-usb-client`.
    Client,
}

impl Role {
    fn stem(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Client => "client",
        }
    }
}

/// Whether the effective user is root, which moves config and state under `/etc` and `/run`
/// (the systemd units run as root).
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The secret key's file: `$XDG_STATE_HOME/p2p-usb/<role>.key`, else under
/// `~/.local/state`, else `/var/lib`. State, not config: the key is the daemon's identity and
/// must survive a config reset.
pub fn default_key_path(role: Role) -> PathBuf {
    key_path_from(role, |k| std::env::var_os(k).map(PathBuf::from))
}

fn key_path_from(role: Role, var: impl Fn(&str) -> Option<PathBuf>) -> PathBuf {
    var("XDG_STATE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
        .join(format!("p2p-usb/{}.key", role.stem()))
}

/// The config file: `/etc/p2p-usb/<role>.toml` for root, else `$XDG_CONFIG_HOME/p2p-usb/`,
/// else `~/.config/p2p-usb/`.
pub fn default_config_path(role: Role) -> PathBuf {
    config_path_from(role, running_as_root(), |k| {
        std::env::var_os(k).map(PathBuf::from)
    })
}

fn config_path_from(role: Role, root: bool, var: impl Fn(&str) -> Option<PathBuf>) -> PathBuf {
    let file = format!("p2p-usb/{}.toml", role.stem());
    if root {
        return Path::new("/etc").join(file);
    }
    var("XDG_CONFIG_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".config")))
        .unwrap_or_else(|| PathBuf::from("/etc"))
        .join(file)
}

/// A config file that could not be used, pointing at the spot an editor jumps to.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, a value that is not what its key expects, or rules that do not fit.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What was expected.
        message: String,
    },
    /// An edit (`pair`, `share`, `allow`, ...) could not be written back.
    #[error("{path}: could not write: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    /// [`ConfigError::Invalid`] at byte offset `at` of `text` (clamped to its end); the column
    /// counts characters, as editors do.
    pub fn invalid(text: &str, path: &Path, at: usize, message: &str) -> ConfigError {
        let mut at = at.min(text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let before = &text[..at];
        ConfigError::Invalid {
            path: path.to_owned(),
            line: before.matches('\n').count() + 1,
            column: before[before.rfind('\n').map_or(0, |i| i + 1)..]
                .chars()
                .count()
                + 1,
            message: message.trim().to_owned(),
        }
    }

    /// A read failure of `path`.
    pub fn read(path: &Path, source: std::io::Error) -> ConfigError {
        ConfigError::Read {
            path: path.to_owned(),
            source,
        }
    }

    /// A write failure of `path`.
    pub fn write(path: &Path, source: std::io::Error) -> ConfigError {
        ConfigError::Write {
            path: path.to_owned(),
            source,
        }
    }
}

/// The text of a config file a command is about to edit: a missing file reads as `new`, the
/// commented header and first key a fresh file starts with, so the header stays on top of
/// whatever the edit adds.
pub fn read_for_edit(path: &Path, new: impl FnOnce() -> String) -> Result<String, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(new()),
        Err(source) => Err(ConfigError::read(path, source)),
    }
}

/// Logs to stderr at `RUST_LOG`, or info with iroh's chatter at warn; colour only for people,
/// so journald and log files get plain text.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,iroh=warn,noq=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves on Ctrl-C or SIGTERM (what systemd sends), so both end the same clean way.
pub async fn shutdown_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

/// How often [`watch_runtime_stalls`] looks at the clock.
const STALL_TICK: std::time::Duration = std::time::Duration::from_millis(250);
/// A tick this late is reported: a third of the default idle timeout, so a stall that could
/// cost the connection is in the log before the connection is lost.
const STALL_REPORT: std::time::Duration = std::time::Duration::from_millis(500);

/// Logs a warning whenever the runtime this is spawned on did not get to run for a while.
/// Keep-alives and acknowledgements are sent by the same runtime, so a stall past the idle
/// timeout drops every connection; the warning tells a blocking call on a runtime thread or
/// a starved CPU apart from a network that went quiet. Four wake-ups a second, until the
/// returned guard is dropped.
pub fn watch_runtime_stalls() -> StallWatch {
    StallWatch(tokio::spawn(async {
        let mut tick = tokio::time::interval(STALL_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let now = tokio::time::Instant::now();
            if let Some(late) = stall(now - last) {
                tracing::warn!(
                    late_ms = late.as_millis() as u64,
                    "the runtime did not run for {:.2} s: a blocking call on one of its threads, or no CPU for this process",
                    (now - last).as_secs_f64()
                );
            }
            last = now;
        }
    }))
}

/// The running stall watcher; dropping it stops the watch (when the command that started it
/// ends).
#[must_use = "the watch stops when this is dropped"]
pub struct StallWatch(tokio::task::JoinHandle<()>);

impl Drop for StallWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How late a tick that came `since` after the previous one is, if worth reporting.
fn stall(since: std::time::Duration) -> Option<std::time::Duration> {
    let late = since.saturating_sub(STALL_TICK);
    (late >= STALL_REPORT).then_some(late)
}

/// This process's peak resident set size in MiB (`VmHWM`), 0 where /proc is missing: the
/// memory figure the benchmarks and the status line report.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| vm_hwm_kib(&s))
        .map_or(0.0, |kib| kib / 1024.0)
}

/// CPU seconds this process has used, user and system, all threads (`/proc/self/stat`), 0
/// where /proc is missing: the benchmarks' CPU per byte.
pub fn cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_cpu_secs(&s))
        .unwrap_or(0.0)
}

/// utime + stime from a `/proc/PID/stat` line, in seconds. Linux reports them in USER_HZ,
/// which is 100 on every architecture it ships for.
pub fn stat_cpu_secs(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses; fields count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn vm_hwm_kib(status: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_comes_from_the_fields_after_the_name() {
        let stat = "42 (a (weird) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9";
        assert_eq!(stat_cpu_secs(stat), Some(3.25));
        assert_eq!(stat_cpu_secs("42 (x) S 1"), None);
        assert!(cpu_secs() >= 0.0);
    }

    #[test]
    fn key_and_config_paths_follow_xdg_then_home_then_system() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| PathBuf::from(v))
            }
        };
        let xdg = env(&[
            ("XDG_STATE_HOME", "/x/state"),
            ("XDG_CONFIG_HOME", "/x/config"),
            ("HOME", "/home/u"),
        ]);
        let home = env(&[("HOME", "/home/u")]);
        let none = env(&[]);
        assert_eq!(
            key_path_from(Role::Client, xdg),
            Path::new("/x/state/p2p-usb/client.key")
        );
        assert_eq!(
            key_path_from(Role::Server, home),
            Path::new("/home/u/.local/state/p2p-usb/server.key")
        );
        assert_eq!(
            key_path_from(Role::Server, none),
            Path::new("/var/lib/p2p-usb/server.key")
        );
        assert_eq!(
            config_path_from(Role::Server, false, xdg),
            Path::new("/x/config/p2p-usb/server.toml")
        );
        assert_eq!(
            config_path_from(Role::Client, false, home),
            Path::new("/home/u/.config/p2p-usb/client.toml")
        );
        assert_eq!(
            config_path_from(Role::Client, true, xdg),
            Path::new("/etc/p2p-usb/client.toml")
        );
    }

    #[test]
    fn invalid_points_at_line_and_column() {
        let text = "a = 1\nbé = x\n";
        let e = ConfigError::invalid(text, Path::new("f.toml"), text.find('x').unwrap(), " bad ");
        assert_eq!(e.to_string(), "f.toml:2:6: bad");
        // Past the end and inside a character clamp rather than panic.
        let e = ConfigError::invalid(text, Path::new("f"), 99, "m");
        assert_eq!(e.to_string(), "f:3:1: m");
        let e = ConfigError::invalid(text, Path::new("f"), text.find('é').unwrap() + 1, "m");
        assert_eq!(e.to_string(), "f:2:2: m");
    }

    #[test]
    fn only_ticks_late_by_half_a_second_are_stalls() {
        use std::time::Duration;
        assert_eq!(stall(Duration::from_millis(250)), None);
        assert_eq!(stall(Duration::from_millis(700)), None);
        assert_eq!(
            stall(Duration::from_millis(2250)),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn vm_hwm_is_read_in_kib() {
        assert_eq!(
            vm_hwm_kib("Name:\tx\nVmHWM:\t   2048 kB\nVmRSS: 1 kB\n"),
            Some(2048.0)
        );
        assert_eq!(vm_hwm_kib("Name: x\n"), None);
    }
}
