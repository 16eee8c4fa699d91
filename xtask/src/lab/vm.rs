//! Booting the lab VM and following its serial console.
//!
//! QEMU runs with the guest's console on stdout; every line is echoed with a `[guest] `
//! prefix and checked for lab messages (see `xtask::tag`). The host does not trust the guest
//! to finish: it kills QEMU on a kernel panic or lockup, when a scenario overruns its timeout
//! (the guest enforces it too, this is the backstop for a hung guest), or when the whole run
//! overruns, and then reports the scenario that was running with its console tail.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use xtask::{LOG_TAIL_LINES, cmdline, pace, tag};

use super::{cmd, xhci};

/// Which accelerator QEMU uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM if a probe boot with it completes (cached), else TCG.
    Auto,
    /// Software emulation: slow but works everywhere.
    Tcg,
    /// Hardware virtualisation: fails on hosts whose /dev/kvm cannot run a stock kernel.
    Kvm,
}

/// Console text that means the guest kernel is gone or wedged: stop instead of waiting.
const FATAL_MARKERS: &[&str] = &["Kernel panic", "soft lockup", "hard LOCKUP"];

/// Time from QEMU start to the guest's first message before the boot counts as hung.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Host slack on top of the guest's own per-scenario timeout, for its kill and report.
const SCENARIO_SLACK: Duration = Duration::from_secs(30);

/// Time QEMU gets to exit after the guest's summary (it powers off right away).
const POWEROFF_GRACE: Duration = Duration::from_secs(15);

/// Console lines kept after a fatal marker, because the trace follows a lockup message.
const FATAL_GRACE: Duration = Duration::from_secs(2);

/// What to boot and run.
pub struct Boot<'a> {
    /// Uncompressed vmlinux (PVH) or bzImage.
    pub kernel: &'a Path,
    /// The newc initramfs.
    pub initramfs: &'a Path,
    /// Scenario names, in order; empty boots, reports, and powers off.
    pub scenarios: &'a [String],
    /// Per-scenario timeout, enforced in the guest and (with slack) here.
    pub timeout_secs: u64,
    /// Keep running after a failure.
    pub keep_going: bool,
    /// `Tcg` or `Kvm` (resolve `Auto` first with [`resolve_accel`]).
    pub accel: Accel,
    /// Echo the console with the `[guest] ` prefix.
    pub echo: bool,
    /// The xHCI, its devices' backends and the host channel, for a boot that runs scenarios.
    pub devices: Option<&'a xhci::Plan>,
}

/// What came back from one boot.
pub struct Outcome {
    /// One `LAB-RESULT` object per scenario that ran (synthesised if the guest died in one).
    pub results: Vec<Value>,
    /// The `LAB-KIND` objects of the device-kind suite, in run order.
    pub kinds: Vec<Value>,
    /// QEMU start to the guest's `LAB-BOOT` line.
    pub boot_secs: Option<f64>,
    /// QEMU start to exit.
    pub wall_secs: f64,
    /// QEMU's peak resident memory, from /proc (VmHWM).
    pub peak_rss_mib: Option<u64>,
    /// Why the host stopped the VM early, if it did.
    pub aborted: Option<String>,
    /// The guest printed `LAB-SUMMARY`, i.e. it ran every scenario it meant to.
    pub completed: bool,
    /// The last console lines, for errors that happen outside any scenario.
    pub console_tail: Vec<String>,
}

enum Event {
    Line(String),
    Closed,
}

/// Boots the VM and follows it until the guest powers off or the host gives up.
pub fn boot(b: &Boot) -> Result<Outcome> {
    let mut append = format!(
        "console=ttyS0 rdinit=/init panic=-1 loglevel=4 quiet {}={} {}={} {}={}",
        cmdline::SCENARIOS,
        b.scenarios.join(","),
        cmdline::TIMEOUT,
        b.timeout_secs,
        cmdline::KEEP_GOING,
        u8::from(b.keep_going),
    );
    for (key, value) in cmdline::DAEMON_ENV {
        append.push_str(&format!(" {key}={value}"));
    }
    if !cmd::exists("qemu-system-x86_64") {
        anyhow::bail!(
            "QEMU is not installed; `cargo xtask lab build` installs it, or run: \
             apt-get install -y --no-install-recommends qemu-system-x86"
        );
    }
    let mut qemu = Command::new("qemu-system-x86_64");
    match b.accel {
        Accel::Kvm => qemu.args(["-accel", "kvm", "-cpu", "host"]),
        _ => qemu.args(["-accel", "tcg", "-cpu", "max"]),
    };
    // -smp 1: on a 2-core host a second vCPU made every URB round trip ~10x slower.
    qemu.args(["-smp", "1", "-m", "1024", "-machine", "q35"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(b.kernel)
        .arg("-initrd")
        .arg(b.initramfs)
        .arg("-append")
        .arg(&append)
        .args(b.devices.map(xhci::Plan::qemu_args).unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = cmd::display(&qemu);
    let started = Instant::now();
    let mut child = qemu
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    let (tx, rx) = mpsc::channel();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let _ = tx.send(Event::Line(clean(&buf)));
                buf.clear();
            }
            let _ = tx.send(Event::Closed);
        });
    }
    drop(tx);
    let mut follow = Follow::new(b, started);
    if let Some(plan) = b.devices {
        // QEMU creates its sockets before the guest starts; a failure here is reported and
        // the boot goes on (scenarios that need the host then fail with "no answer").
        match plan.connect() {
            Ok(host) => follow.host = Some(host),
            Err(e) => eprintln!("lab: the host side of the xHCI devices is not available: {e:#}"),
        }
    }
    let outcome = follow.run(&mut child, &rx);
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

/// Strips carriage returns, ANSI escapes and other control bytes SeaBIOS and the kernel emit.
fn clean(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ params final-byte; other escapes: ESC + one char.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if c == '\t' || !c.is_control() {
            out.push(c);
        }
    }
    out
}

/// The scenario the guest announced last.
struct Running {
    name: String,
    since: Instant,
    /// Its timeout as `LAB-START` announced it (stretched by the guest's pace).
    timeout: Duration,
    lines: VecDeque<String>,
}

/// The host's view of a running boot.
struct Follow<'a> {
    b: &'a Boot<'a>,
    started: Instant,
    results: Vec<Value>,
    kinds: Vec<Value>,
    boot_secs: Option<f64>,
    current: Option<Running>,
    tail: VecDeque<String>,
    peak_rss_kib: Option<u64>,
    aborted: Option<String>,
    completed_at: Option<Instant>,
    /// Answers scenarios' `LAB-HOST` requests (plugging QEMU's devices).
    host: Option<xhci::Host>,
}

impl<'a> Follow<'a> {
    fn new(b: &'a Boot<'a>, started: Instant) -> Self {
        Follow {
            b,
            started,
            results: Vec::new(),
            kinds: Vec::new(),
            boot_secs: None,
            current: None,
            tail: VecDeque::new(),
            peak_rss_kib: None,
            aborted: None,
            completed_at: None,
            host: None,
        }
    }

    fn run(&mut self, child: &mut Child, rx: &Receiver<Event>) -> Result<Outcome> {
        let longest = Duration::from_secs(self.b.timeout_secs).mul_f64(pace::MAX_SCALE);
        let overall =
            BOOT_TIMEOUT + (longest + SCENARIO_SLACK) * (self.b.scenarios.len() as u32 + 1);
        let mut open_streams = 2;
        let mut fatal_at: Option<Instant> = None;
        while open_streams > 0 {
            self.sample_rss(child.id());
            match rx.recv_timeout(Duration::from_millis(250)) {
                Ok(Event::Line(line)) => {
                    if fatal_at.is_none()
                        && let Some(m) = FATAL_MARKERS.iter().find(|m| line.contains(*m))
                    {
                        self.aborted = Some(format!("guest kernel reported \"{m}\": {line}"));
                        fatal_at = Some(Instant::now());
                    }
                    self.line(line);
                }
                Ok(Event::Closed) => open_streams -= 1,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if fatal_at.is_some_and(|t| t.elapsed() > FATAL_GRACE) {
                break;
            }
            let now = Instant::now();
            let hung = if let Some(done) = self.completed_at {
                // The guest powers off right after its summary; if QEMU lingers, stop it.
                if now - done > POWEROFF_GRACE {
                    break;
                }
                None
            } else if self.boot_secs.is_none() {
                (now - self.started > BOOT_TIMEOUT).then(|| {
                    format!(
                        "no {} line within {BOOT_TIMEOUT:?} of starting QEMU",
                        tag::BOOT
                    )
                })
            } else if let Some(r) = &self.current {
                (now - r.since > r.timeout + SCENARIO_SLACK).then(|| {
                    format!(
                        "scenario {} ran past its {}s timeout and the guest did not stop it",
                        r.name,
                        r.timeout.as_secs()
                    )
                })
            } else {
                (now - self.started > overall)
                    .then(|| format!("the whole run exceeded {overall:?}"))
            };
            if let Some(reason) = hung {
                self.aborted = Some(reason);
                break;
            }
        }
        self.sample_rss(child.id());
        if self.completed_at.is_none() && self.aborted.is_none() {
            let status = child.try_wait().ok().flatten();
            self.aborted = Some(match status {
                Some(s) => format!(
                    "QEMU exited ({s}) before the guest reported {}",
                    tag::SUMMARY
                ),
                None => format!(
                    "QEMU closed its console before the guest reported {}",
                    tag::SUMMARY
                ),
            });
        }
        if let (Some(reason), Some(r)) = (&self.aborted, self.current.take()) {
            let tail = crash_tail(&r.lines);
            self.results.push(json!({
                "scenario": r.name,
                "status": "fail",
                "secs": round2(r.since.elapsed().as_secs_f64()),
                "metrics": {},
                "reason": reason,
                "log_tail": tail,
            }));
        }
        Ok(Outcome {
            results: std::mem::take(&mut self.results),
            kinds: std::mem::take(&mut self.kinds),
            boot_secs: self.boot_secs,
            wall_secs: round2(self.started.elapsed().as_secs_f64()),
            peak_rss_mib: self.peak_rss_kib.map(|k| k / 1024),
            aborted: self.aborted.take(),
            completed: self.completed_at.is_some(),
            console_tail: self.tail.iter().cloned().collect(),
        })
    }

    fn line(&mut self, line: String) {
        if self.b.echo {
            println!("[guest] {line}");
        }
        push_bounded(&mut self.tail, line.clone(), LOG_TAIL_LINES);
        if let Some(r) = &mut self.current {
            push_bounded(&mut r.lines, line.clone(), 400);
        }
        if let Some(host) = &mut self.host {
            host.console_line(&line);
        }
        let Some((t, v)) = xtask::parse_line(&line) else {
            return;
        };
        match t {
            tag::BOOT => self.boot_secs = Some(round2(self.started.elapsed().as_secs_f64())),
            tag::START => {
                let name = v["scenario"].as_str().unwrap_or("?").to_owned();
                // A guest that announces no timeout (or a wild one) gets the unstretched
                // one, capped at the longest any stretch allows.
                let asked = Duration::from_secs(self.b.timeout_secs);
                let timeout = v["timeout_secs"]
                    .as_u64()
                    .map(Duration::from_secs)
                    .unwrap_or(asked)
                    .min(asked.mul_f64(pace::MAX_SCALE));
                self.current = Some(Running {
                    name,
                    since: Instant::now(),
                    timeout,
                    lines: VecDeque::new(),
                });
            }
            tag::RESULT => {
                self.current = None;
                self.results.push(v);
            }
            tag::KIND => self.kinds.push(v),
            tag::HOST => match &mut self.host {
                Some(host) => host.request(&v),
                None => eprintln!(
                    "lab: a scenario asked the host for {v}, but this boot has no host channel"
                ),
            },
            tag::SUMMARY => self.completed_at = Some(Instant::now()),
            _ => {}
        }
    }

    /// VmHWM is the process's own peak, so sampling now and then loses nothing.
    fn sample_rss(&mut self, pid: u32) {
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            return;
        };
        let hwm = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
        if let Some(kib) = hwm {
            self.peak_rss_kib = Some(self.peak_rss_kib.unwrap_or(0).max(kib));
        }
    }
}

/// The log tail of a scenario the run was aborted in: when the guest kernel reported a fatal
/// error, the lines leading up to it (what the scenario was doing) and the start of the
/// kernel's report, not the end of a stack dump that can be longer than the whole tail.
fn crash_tail(lines: &VecDeque<String>) -> Vec<&String> {
    let fatal = lines
        .iter()
        .position(|l| FATAL_MARKERS.iter().any(|m| l.contains(m)));
    let start = match fatal {
        Some(at) => at.saturating_sub(LOG_TAIL_LINES / 2),
        None => lines.len().saturating_sub(LOG_TAIL_LINES),
    };
    lines.iter().skip(start).take(LOG_TAIL_LINES).collect()
}

fn push_bounded(q: &mut VecDeque<String>, line: String, max: usize) {
    if q.len() == max {
        q.pop_front();
    }
    q.push_back(line);
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Picks TCG or KVM for `Auto`: KVM only if /dev/kvm opens and a probe boot with it reaches
/// the guest's init. On some hosts /dev/kvm exists but cannot run a stock kernel
/// ("emulation failure"), so existence proves nothing. The verdict is cached per QEMU
/// version and kernel in `probe_file`.
pub fn resolve_accel(
    requested: Accel,
    kernel: &Path,
    initramfs: &Path,
    probe_file: &Path,
) -> Result<Accel> {
    if requested != Accel::Auto {
        return Ok(requested);
    }
    let usable = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        return Ok(Accel::Tcg);
    }
    let qemu_version = cmd::output(Command::new("qemu-system-x86_64").arg("--version"))
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let probe_key = format!("{qemu_version}|{}", kernel.display());
    if let Ok(text) = fs::read_to_string(probe_file)
        && let Some((key, verdict)) = text.trim().rsplit_once('|')
        && key == probe_key
    {
        return Ok(if verdict == "kvm" {
            Accel::Kvm
        } else {
            Accel::Tcg
        });
    }
    eprintln!(
        "lab: probing KVM with one short boot (cached in {})",
        probe_file.display()
    );
    let probe = Boot {
        kernel,
        initramfs,
        scenarios: &[],
        timeout_secs: 10,
        keep_going: false,
        accel: Accel::Kvm,
        echo: false,
        devices: None,
    };
    let works = probe_boot(&probe);
    let verdict = if works { Accel::Kvm } else { Accel::Tcg };
    eprintln!(
        "lab: KVM {}; using {}",
        if works {
            "works"
        } else {
            "does not boot this kernel"
        },
        if works { "KVM" } else { "TCG" }
    );
    let word = if works { "kvm" } else { "tcg" };
    fs::write(probe_file, format!("{probe_key}|{word}\n"))?;
    Ok(verdict)
}

/// A KVM probe must not hang the run: a broken KVM typically stops the VM and leaves QEMU
/// waiting, so the probe gets its own short limit.
fn probe_boot(b: &Boot) -> bool {
    const PROBE_LIMIT: Duration = Duration::from_secs(30);
    let (tx, rx) = mpsc::channel();
    let kernel = b.kernel.to_path_buf();
    let initramfs = b.initramfs.to_path_buf();
    let append = format!(
        "console=ttyS0 rdinit=/init panic=-1 quiet {}=",
        cmdline::SCENARIOS
    );
    thread::spawn(move || {
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "1024"])
            .args([
                "-machine",
                "q35",
                "-nographic",
                "-no-reboot",
                "-nic",
                "none",
            ])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initramfs)
            .arg("-append")
            .arg(&append)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let _ = tx.send(child);
    });
    let Ok(Ok(mut child)) = rx.recv_timeout(Duration::from_secs(5)) else {
        return false;
    };
    let (ltx, lrx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        thread::spawn(move || {
            for line in BufReader::new(out).split(b'\n').map_while(|l| l.ok()) {
                if ltx.send(clean(&line)).is_err() {
                    break;
                }
            }
        });
    }
    let deadline = Instant::now() + PROBE_LIMIT;
    let mut ok = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lrx.recv_timeout(left) {
            // Reaching our init is the proof; whether its setup works is not KVM's business.
            Ok(line) if line.contains(tag::BOOT) || line.contains("lab-guest:") => {
                ok = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    ok
}

/// Where the KVM verdict is cached.
pub fn probe_file(lab_dir: &Path) -> PathBuf {
    lab_dir.join("kvm-probe")
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Instant;

    use std::collections::VecDeque;

    use super::{Accel, Boot, Follow, LOG_TAIL_LINES, clean, crash_tail};

    #[test]
    fn console_messages_drive_the_run_state() {
        let boot = Boot {
            kernel: Path::new("vmlinux"),
            initramfs: Path::new("initramfs.cpio"),
            scenarios: &["smoke".to_owned()],
            timeout_secs: 10,
            keep_going: false,
            accel: Accel::Tcg,
            echo: false,
            devices: None,
        };
        let mut f = Follow::new(&boot, Instant::now());
        for line in [
            "SeaBIOS (version 1.16.2)",
            r#"LAB-BOOT {"uptime":1.7,"kernel":"6.1.0"}"#,
            r#"LAB-START {"scenario":"smoke","timeout_secs":10}"#,
            "[smoke] + modprobe usb-storage",
        ] {
            f.line(line.to_owned());
        }
        assert!(f.boot_secs.is_some());
        let r = f.current.as_ref().expect("a scenario is running");
        assert_eq!(r.name, "smoke");
        assert_eq!(r.timeout, std::time::Duration::from_secs(10));
        assert_eq!(
            r.lines.back().map(String::as_str),
            Some("[smoke] + modprobe usb-storage")
        );

        f.line(r#"[  3.1] usb 1-1: x LAB-RESULT {"scenario":"smoke","status":"pass"}"#.to_owned());
        assert!(f.current.is_none());
        assert_eq!(f.results.len(), 1);
        f.line(r#"LAB-SUMMARY {"passed":1,"failed":0,"skipped":0}"#.to_owned());
        assert!(f.completed_at.is_some());
    }

    #[test]
    fn a_crash_tail_keeps_what_led_up_to_the_panic() {
        let mut lines: VecDeque<String> = (0..30).map(|i| format!("step {i}")).collect();
        lines.push_back("Kernel panic - not syncing: sysrq triggered crash".into());
        lines.extend((0..100).map(|i| format!(" trace {i}")));
        let tail = crash_tail(&lines);
        assert_eq!(tail.len(), LOG_TAIL_LINES);
        assert!(tail.iter().any(|l| *l == "step 29"));
        assert!(tail.iter().any(|l| l.starts_with("Kernel panic")));
        let calm: VecDeque<String> = (0..100).map(|i| format!("line {i}")).collect();
        assert_eq!(
            crash_tail(&calm).last().map(|l| l.as_str()),
            Some("line 99")
        );
    }

    #[test]
    fn console_noise_is_stripped() {
        assert_eq!(clean(b"\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\r\n"), "SeaBIOS");
        assert_eq!(clean(b"a\tb\xff"), "a\tb\u{fffd}");
    }
}
