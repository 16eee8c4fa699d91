//! Running one scenario in a child process with a timeout, and turning what it printed into
//! a result object.
//!
//! A child keeps PID 1 alive whatever the scenario does: a hang is killed with its whole
//! process group (usbip, dd, shells it started), a crash is just a non-zero exit.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use xtask::LOG_TAIL_LINES;

use crate::report::{self, METRIC, SKIP, SKIP_EXIT, Skip};
use crate::{gadget, scenarios, sys};

/// Set by PID 1 for its children: `--scenario` refuses to run anywhere else, because
/// scenarios load modules and rewrite sysfs.
const INSIDE_LAB: &str = "LAB_GUEST_CHILD";

/// How long output may keep arriving after the child exited (daemons it started may still
/// hold the pipe; they are killed right after).
const DRAIN: Duration = Duration::from_millis(300);

/// Whether this process was started by the lab's PID 1.
pub fn inside_lab() -> bool {
    std::env::var_os(INSIDE_LAB).is_some()
}

/// The scenario child: runs it and maps the outcome to the exit code the runner reads.
pub fn child_main(name: &str) -> ExitCode {
    let Some(scenario) = scenarios::find(name) else {
        println!("error: unknown scenario {name}");
        return ExitCode::FAILURE;
    };
    match (scenario.run)() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<Skip>() {
            Some(Skip(reason)) => {
                println!("{SKIP} {reason}");
                ExitCode::from(SKIP_EXIT)
            }
            None => {
                println!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The result for a name not in the registry (the host checks names, this is a backstop).
pub fn unknown(name: &str) -> Value {
    json!({
        "scenario": name, "status": "fail", "secs": 0.0, "metrics": {},
        "reason": format!("no scenario named {name} in this lab-guest"), "log_tail": [],
    })
}

/// Runs scenario `name` in a child and returns its result object.
pub fn run(name: &str, timeout: Duration) -> Value {
    let started = Instant::now();
    let spawned = std::io::pipe().and_then(|(reader, writer)| {
        let mut cmd = Command::new("/init");
        cmd.args(["--scenario", name])
            .env(INSIDE_LAB, "1")
            .env("PATH", sys::PATH)
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer)
            .process_group(0);
        let child = cmd.spawn()?;
        // `cmd` holds our copies of the pipe's write end; drop them so EOF can happen.
        drop(cmd);
        Ok((child, reader))
    });
    let (mut child, reader) = match spawned {
        Ok(x) => x,
        Err(e) => {
            return fail(
                name,
                started,
                format!("could not start the scenario: {e}"),
                &[],
            );
        }
    };

    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(reader).split(b'\n').map_while(|l| l.ok()) {
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });

    let mut tail: VecDeque<String> = VecDeque::new();
    let mut metrics = Map::new();
    let mut skip_reason = None;
    let mut exited_at: Option<Instant> = None;
    let mut status = None;
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix(METRIC) {
                    let mut parts = rest.split_whitespace();
                    if let (Some(k), Some(v)) = (
                        parts.next(),
                        parts.next().and_then(|v| v.parse::<f64>().ok()),
                    ) {
                        metrics.insert(k.to_owned(), json!(v));
                    }
                } else if let Some(reason) = line.strip_prefix(SKIP) {
                    skip_reason = Some(reason.trim().to_owned());
                }
                println!("[{name}] {line}");
                if tail.len() == LOG_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            Err(RecvTimeoutError::Disconnected) => {
                if status.is_none() {
                    status = child.wait().ok();
                }
                break;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if status.is_none()
            && let Ok(Some(st)) = child.try_wait()
        {
            status = Some(st);
            exited_at = Some(Instant::now());
        }
        if exited_at.is_some_and(|t| t.elapsed() > DRAIN) {
            break;
        }
        if status.is_none() && started.elapsed() > timeout {
            timed_out = true;
            kill_group(child.id());
            let _ = child.kill();
            status = child.wait().ok();
            break;
        }
    }
    // Whatever the scenario left running in its group (a usbipd, a stuck dd) goes now, so
    // the next scenario starts clean.
    kill_group(child.id());
    gadget::remove_leftovers();
    clear_scratch();

    let tail: Vec<String> = tail.into_iter().collect();
    let secs = round2(started.elapsed().as_secs_f64());
    let code = status.and_then(|s| s.code());
    let (status, reason) = if timed_out {
        (
            "fail",
            Some(format!("timed out after {}s", timeout.as_secs())),
        )
    } else if code == Some(0) {
        ("pass", None)
    } else if code == Some(i32::from(report::SKIP_EXIT)) {
        (
            "skip",
            Some(skip_reason.unwrap_or_else(|| "no reason given".into())),
        )
    } else {
        let last_error = tail
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .map(str::to_owned);
        let why = last_error.unwrap_or_else(|| match code {
            Some(c) => format!("exited with status {c}"),
            None => "killed by a signal".into(),
        });
        ("fail", Some(why))
    };
    if status == "fail" {
        // What the kernel said last (SCSI errors, resets, OOM) is often why.
        for line in kernel_log_tail(60) {
            println!("[{name}] dmesg: {line}");
        }
        if let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo")
            && let Some(available) = meminfo.lines().find(|l| l.starts_with("MemAvailable"))
        {
            println!("[{name}] {available}");
        }
    }
    let log_tail: &[String] = if status == "pass" { &[] } else { &tail };
    json!({
        "scenario": name,
        "status": status,
        "secs": secs,
        "metrics": metrics,
        "reason": reason,
        "log_tail": log_tail,
    })
}

/// The last `n` lines of the kernel log.
fn kernel_log_tail(n: usize) -> Vec<String> {
    let Ok(out) = Command::new("/bin/busybox").arg("dmesg").output() else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| (*l).to_owned())
        .collect()
}

/// Empties `/tmp`, the guest's RAM-backed scratch space: each scenario leaves backing files
/// and read-back copies of tens of MiB there, and a dozen scenarios in one boot would fill
/// the VM's memory. Scenarios create what they need (keys, logs) anew.
fn clear_scratch() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

fn fail(name: &str, started: Instant, reason: String, tail: &[String]) -> Value {
    json!({
        "scenario": name, "status": "fail", "secs": round2(started.elapsed().as_secs_f64()),
        "metrics": {}, "reason": reason, "log_tail": tail,
    })
}

/// The child leads its own process group (`process_group(0)`), so its id is the group id.
fn kill_group(pgid: u32) {
    let _ = sys::bb("kill")
        .args(["-9", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
