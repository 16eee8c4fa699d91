//! Small system helpers: busybox commands, sysfs/configfs writes, waiting for the kernel.
//!
//! The kernel starts init without `PATH`, so every program is named by absolute path, and
//! busybox applets are run as `/bin/busybox <applet>`.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::report::log;

/// The `PATH` scenario children and their programs get.
pub const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// A command for a busybox applet.
pub fn bb(applet: &str) -> Command {
    let mut c = Command::new("/bin/busybox");
    c.arg(applet).env("PATH", PATH);
    c
}

/// Runs `cmd`, logging it and its output; fails with the output tail if it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    log!("+ {shown}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stdout.lines().chain(stderr.lines()).take(30) {
        log!("  {line}");
    }
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("`{shown}` failed ({}): {}", out.status, tail.join(" / "));
    }
    Ok(stdout)
}

/// A printable command line.
pub fn display(cmd: &Command) -> String {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    let mut parts: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if prog != "/bin/busybox" {
        parts.insert(0, prog);
    }
    parts.join(" ")
}

/// Writes a sysfs/configfs attribute, naming the file and value when the kernel refuses.
pub fn write(path: impl AsRef<Path>, value: impl AsRef<[u8]>) -> Result<()> {
    let path = path.as_ref();
    fs::write(path, value.as_ref()).with_context(|| {
        format!(
            "writing {:?} to {}",
            String::from_utf8_lossy(value.as_ref()).trim(),
            path.display()
        )
    })
}

/// Reads a sysfs attribute without its trailing newline.
pub fn read(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    Ok(fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

/// Polls `probe` every 50 ms until it yields a value or `timeout` passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Seconds since boot, from /proc/uptime.
pub fn uptime() -> f64 {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}
