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

/// How much slower than the reference this guest runs (1.0 to [`xtask::pace::MAX_SCALE`]),
/// set once at boot: the factor every timeout gets, and the one a scenario's wall-clock limit
/// on a user-visible promise ("gone within 1 s") is stretched by, so the promise is checked
/// at the pace it was made for and a slower host is not a failure.
pub fn pace() -> f64 {
    PACE.get().copied().unwrap_or(1.0)
}

/// Records the guest's pace; the first call wins.
pub fn set_pace(scale: f64) {
    let _ = PACE.set(scale);
}

static PACE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// Seconds since boot, from /proc/uptime.
pub fn uptime() -> f64 {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Logs where every thread of the processes named `names` is: state, wait channel and kernel
/// stack, then asks the kernel for its blocked (state D) tasks (`sysrq w`, into dmesg). What a
/// stalled daemon was waiting on is gone by the time a scenario's wait times out, so scenarios
/// call this while the stall lasts.
pub fn log_threads(names: &[&str]) {
    let Ok(procs) = fs::read_dir("/proc") else {
        return;
    };
    for proc in procs.flatten() {
        let dir = proc.path();
        let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !names.contains(&comm.trim()) {
            continue;
        }
        let Ok(tasks) = fs::read_dir(dir.join("task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let t = task.path();
            let field = |f: &str| fs::read_to_string(t.join(f)).unwrap_or_default();
            let stat = field("stat");
            // The state follows the parenthesised name, which may itself hold spaces.
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            log!(
                "thread {}/{} {} state {} wchan {}: {}",
                comm.trim(),
                task.file_name().to_string_lossy(),
                field("comm").trim(),
                state.unwrap_or("?"),
                field("wchan").trim(),
                field("stack").trim().replace('\n', " | ")
            );
        }
    }
    if write("/proc/sysrq-trigger", "w").is_err() {
        return;
    }
    thread::sleep(Duration::from_millis(200));
    let Ok(kmsg) = run(&mut bb("dmesg")) else {
        return;
    };
    let lines: Vec<&str> = kmsg.lines().collect();
    let from = lines
        .iter()
        .rposition(|l| l.contains("Show Blocked State"))
        .unwrap_or(lines.len());
    for line in lines[from..].iter().take(200) {
        log!("blocked: {line}");
    }
}

/// Waits up to 5 s for no user process to be in uninterruptible sleep. The hub's kernel
/// workers sleep in D briefly while tearing a device down; what must never happen is a user
/// process (dd, our daemons) left stuck there.
pub fn wait_no_user_process_in_d_state() -> Result<()> {
    let settled = wait_for("D states to settle", Duration::from_secs(5), || {
        processes_in_d_state()
            .iter()
            .all(|(_, user)| !user)
            .then_some(())
    });
    let stuck = processes_in_d_state();
    anyhow::ensure!(settled.is_ok(), "processes stuck in D state: {stuck:?}");
    if !stuck.is_empty() {
        log!("kernel workers still in D state (not user processes): {stuck:?}");
    }
    Ok(())
}

/// Processes in uninterruptible sleep: `"pid (name)"` and whether it is a user process (one
/// with a command line; kernel threads have none).
fn processes_in_d_state() -> Vec<(String, bool)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            if rest.split_whitespace().next() != Some("D") {
                return None;
            }
            let user = fs::read(e.path().join("cmdline")).is_ok_and(|c| !c.is_empty());
            Some((head.to_owned() + ")", user))
        })
        .collect()
}
