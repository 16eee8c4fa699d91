//! PID 1: prepare the system, run the scenarios the host asked for, report, power off.
//!
//! Every path out of here powers the VM off, so the host sees QEMU exit instead of waiting
//! for its timeout; a failure before the scenarios start is printed as a plain error line
//! and the host reports the run as incomplete with the console tail.

use std::fs;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::json;
use xtask::{cmdline, format_line, pace, tag};

use crate::report::log;
use crate::{modules, runner, scenarios, sys};

/// What the host asked for on the kernel command line.
struct Request {
    scenarios: Vec<String>,
    timeout: Duration,
    keep_going: bool,
}

/// Runs as PID 1 and never returns to the kernel: powers off at the end.
pub fn main() -> ExitCode {
    if let Err(e) = setup() {
        log!("lab-guest: setup failed: {e:#}");
    } else if let Err(e) = run_all() {
        log!("lab-guest: {e:#}");
    }
    power_off()
}

fn setup() -> Result<()> {
    for (key, value) in cmdline::DAEMON_ENV {
        let got = std::env::var(key).unwrap_or_default();
        ensure!(
            got == *value,
            "init's environment has {key}={got:?}, not {value:?}: the kernel command line lost it"
        );
    }
    let mounts: &[(&str, &str, &str)] = &[
        ("proc", "proc", "/proc"),
        ("sysfs", "sysfs", "/sys"),
        ("devtmpfs", "devtmpfs", "/dev"),
        ("tmpfs", "tmpfs", "/tmp"),
        ("tmpfs", "tmpfs", "/run"),
    ];
    for (fstype, src, dir) in mounts {
        sys::run(sys::bb("mount").args(["-t", fstype, src, dir]))
            .with_context(|| format!("mounting {dir}"))?;
    }
    // The kernel's own module requests (e.g. a gadget function by name) use this helper.
    let _ = fs::write("/proc/sys/kernel/modprobe", "/sbin/modprobe");
    // The sysctl file the deployment guide installs on both machines: the lab runs an
    // installed system.
    for (key, value) in sysctl_settings(DEPLOY_SYSCTL) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        sys::write(&path, value).with_context(|| format!("applying {key} = {value}"))?;
    }
    // configfs is a module in Debian's kernel; /sys/kernel/config appears once it loads.
    modules::load(&["configfs"])?;
    sys::run(sys::bb("mount").args(["-t", "configfs", "configfs", "/sys/kernel/config"]))
        .context("mounting configfs")?;
    // tracefs is for later eBPF/kprobe scenarios; a kernel without it still runs the rest.
    if sys::run(sys::bb("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])).is_err()
    {
        log!("lab-guest: no tracefs; tracing scenarios will skip");
    }
    sys::run(sys::bb("ip").args(["link", "set", "lo", "up"]))?;
    Ok(())
}

/// `server/deploy/99-p2p-usb-udp.conf`, which DEPLOYMENT.md installs into /etc/sysctl.d/.
const DEPLOY_SYSCTL: &str = include_str!("../../../../server/deploy/99-p2p-usb-udp.conf");

/// The `key = value` lines of a sysctl.d file (comments and blank lines skipped).
fn sysctl_settings(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
}

fn run_all() -> Result<()> {
    let kernel = sys::read("/proc/sys/kernel/osrelease").unwrap_or_default();
    let boot_uptime = sys::uptime();
    println!(
        "{}",
        format_line(tag::BOOT, &json!({"uptime": boot_uptime, "kernel": kernel}))
    );
    // Every timestamp our daemons take costs a syscall, not a vDSO read, unless this is tsc.
    let clocks = "/sys/devices/system/clocksource/clocksource0";
    log!(
        "lab-guest: clocksource {} (available: {})",
        sys::read(format!("{clocks}/current_clocksource")).unwrap_or_default(),
        sys::read(format!("{clocks}/available_clocksource")).unwrap_or_default()
    );
    let mut req = request()?;
    let scale = pace::timeout_scale(boot_uptime);
    sys::set_pace(scale);
    if scale > 1.0 {
        req.timeout = req.timeout.mul_f64(scale);
        log!(
            "lab-guest: init ready {boot_uptime:.1}s after kernel start (reference {}s): scenario \
             timeouts x{scale:.1}, {}s each",
            pace::REFERENCE_BOOT_SECS,
            req.timeout.as_secs()
        );
    }
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for name in &req.scenarios {
        println!(
            "{}",
            format_line(
                tag::START,
                &json!({"scenario": name, "timeout_secs": req.timeout.as_secs()})
            )
        );
        let result = if scenarios::find(name).is_some() {
            runner::run(name, req.timeout)
        } else {
            runner::unknown(name)
        };
        println!("{}", format_line(tag::RESULT, &result));
        match result["status"].as_str() {
            Some("pass") => passed += 1,
            Some("skip") => skipped += 1,
            _ => {
                failed += 1;
                if !req.keep_going {
                    break;
                }
            }
        }
    }
    println!(
        "{}",
        format_line(
            tag::SUMMARY,
            &json!({"passed": passed, "failed": failed, "skipped": skipped})
        )
    );
    Ok(())
}

fn request() -> Result<Request> {
    let line = sys::read("/proc/cmdline")?;
    let mut req = Request {
        scenarios: Vec::new(),
        timeout: Duration::from_secs(120),
        keep_going: false,
    };
    for word in line.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            k if k == cmdline::SCENARIOS => {
                req.scenarios = value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            k if k == cmdline::TIMEOUT => {
                let secs: u64 = value.parse().with_context(|| format!("bad {k}={value}"))?;
                req.timeout = Duration::from_secs(secs);
            }
            k if k == cmdline::KEEP_GOING => req.keep_going = value == "1",
            _ => {}
        }
    }
    Ok(req)
}

/// busybox `poweroff -f` calls reboot(RB_POWER_OFF) directly, which keeps unsafe code out of
/// this crate. If even that fails, returning from PID 1 panics the kernel, which the host
/// also treats as the end of the run.
fn power_off() -> ExitCode {
    let _ = sys::bb("sync").status();
    let _ = sys::bb("poweroff").arg("-f").status();
    std::thread::sleep(Duration::from_secs(5));
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deploy_sysctl_file_reads_as_two_settings() {
        let settings: Vec<_> = sysctl_settings(DEPLOY_SYSCTL).collect();
        assert_eq!(
            settings,
            [
                ("net.core.rmem_max", "7340032"),
                ("net.core.wmem_max", "7340032")
            ]
        );
    }
}
