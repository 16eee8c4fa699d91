//! What the host (`xtask lab`) and the guest (`lab-guest`, PID 1 in the VM) agree on.
//!
//! The serial console is the only channel between them, and the kernel prints on it too, so
//! every message the host acts on is one line that starts with a fixed tag followed by a JSON
//! object. Anything else on the console is log text.

/// Kernel command-line keys the host sets and the guest reads from `/proc/cmdline`.
///
/// Dotted names are treated by the kernel as parameters of a module called `lab`, which does
/// not exist, so they are neither passed to init as arguments nor reported as unknown.
pub mod cmdline {
    /// Comma-separated scenario names, run in this order.
    pub const SCENARIOS: &str = "lab.scenarios";
    /// Per-scenario timeout in whole seconds, before the guest stretches it by its pace
    /// ([`crate::pace`]).
    pub const TIMEOUT: &str = "lab.timeout";
    /// `1` runs the remaining scenarios after one fails.
    pub const KEEP_GOING: &str = "lab.keep_going";
    /// Undotted `KEY=VALUE` words the kernel hands to init as its environment, so every
    /// process in the VM inherits them. Relays and discovery default to n0's public ones; no
    /// test may reach those (the VM has no network card either), so both daemons start with
    /// them off, and a scenario that wants a relay names its own with `--relay=URL`, which
    /// wins over this.
    pub const DAEMON_ENV: &[(&str, &str)] = &[("P2P_USB_RELAY", "off")];
}

pub mod qemu_usb;

/// Line tags, each followed by a space and one JSON object.
pub mod tag {
    /// Guest init is running: `{"uptime":1.8,"kernel":"6.1.0-56-amd64"}`.
    pub const BOOT: &str = "LAB-BOOT";
    /// A scenario starts: `{"scenario":"baseline","timeout_secs":120}`, the timeout already
    /// stretched by the guest's pace.
    pub const START: &str = "LAB-START";
    /// A scenario ended: `{"scenario","status","secs","metrics","reason","log_tail"}`.
    pub const RESULT: &str = "LAB-RESULT";
    /// One device kind through one route, from the `kinds-*` scenarios:
    /// `{"kind","functions","drivers","covers","route","status","reason","checks","figures","secs","notes"}`.
    pub const KIND: &str = "LAB-KIND";
    /// A scenario asks the host for something only it can do (see [`crate::qemu_usb`]):
    /// `{"seq":1,"op":"plug","device":"ssd"}`.
    pub const HOST: &str = "LAB-HOST";
    /// All scenarios ended: `{"passed":n,"failed":n,"skipped":n}`; the guest powers off next.
    pub const SUMMARY: &str = "LAB-SUMMARY";
}

/// Scenario timeouts are written for the guest speed the lab was built on; a slower host (TCG
/// runs 4-6x slower on some CI machines) stretches them so that it fails on behaviour, not on
/// time. The guest measures its own pace as the uptime at which init is ready, announces the
/// stretched timeout in `LAB-START`, and the host's backstop follows that announcement.
pub mod pace {
    /// Kernel start to init ready on the machines the timeouts were written on (1.6-2.0 s),
    /// with some headroom so that ordinary jitter does not stretch anything.
    pub const REFERENCE_BOOT_SECS: f64 = 2.5;
    /// The most a timeout is stretched: beyond this the host is too slow to be told apart
    /// from a hang, and the CI time limit would not hold either.
    pub const MAX_SCALE: f64 = 4.0;

    /// The factor for a guest whose init was ready `boot_uptime` seconds after kernel start.
    pub fn timeout_scale(boot_uptime: f64) -> f64 {
        if boot_uptime.is_finite() {
            (boot_uptime / REFERENCE_BOOT_SECS).clamp(1.0, MAX_SCALE)
        } else {
            1.0
        }
    }
}

/// How many log lines a failing result carries back; enough to see the failing step and
/// the commands just before it without flooding the console.
pub const LOG_TAIL_LINES: usize = 40;

/// Splits `"<TAG> {json}"` into the tag and its parsed object, if the line is a lab message.
///
/// Kernel messages can land in front of a guest line on the console, so the tag is searched
/// for anywhere in the line, not only at its start.
pub fn parse_line(line: &str) -> Option<(&'static str, serde_json::Value)> {
    for t in [
        tag::BOOT,
        tag::START,
        tag::RESULT,
        tag::KIND,
        tag::HOST,
        tag::SUMMARY,
    ] {
        let marker = format!("{t} {{");
        if let Some(at) = line.find(&marker) {
            let json = &line[at + t.len() + 1..];
            return serde_json::from_str(json.trim_end()).ok().map(|v| (t, v));
        }
    }
    None
}

/// Formats one lab message line.
pub fn format_line(t: &str, value: &serde_json::Value) -> String {
    format!("{t} {value}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_prefixed_lines() {
        let v = serde_json::json!({"scenario": "smoke", "status": "pass"});
        let line = format_line(tag::RESULT, &v);
        assert_eq!(parse_line(&line), Some((tag::RESULT, v.clone())));
        let noisy = format!("[   12.5] usb 1-1: new device{line}");
        assert_eq!(parse_line(&noisy), Some((tag::RESULT, v)));
        assert_eq!(parse_line("LAB-RESULT not json"), None);
        assert_eq!(parse_line("plain log line"), None);
    }

    #[test]
    fn timeouts_stretch_with_a_slow_boot_within_bounds() {
        assert_eq!(pace::timeout_scale(1.7), 1.0);
        assert_eq!(pace::timeout_scale(5.0), 2.0);
        assert_eq!(pace::timeout_scale(40.0), pace::MAX_SCALE);
        assert_eq!(pace::timeout_scale(f64::NAN), 1.0);
        assert_eq!(pace::timeout_scale(-1.0), 1.0);
    }
}
