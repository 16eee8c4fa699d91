//! Asking the host for what only it can do: plug and pull QEMU's USB devices, inject keys,
//! read the serial adapter's far end (see `xtask::qemu_usb` for the operations).
//!
//! A request is a `LAB-HOST {json}` line on the console, which the host follows anyway; the
//! answer comes back as one JSON line on the guest's second serial port. Each request carries
//! a sequence number unique to this process, so an answer that arrives after its scenario gave
//! up on it is never taken for the next one's.

use std::fs::File;
use std::io::Read;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use xtask::qemu_usb::{self, GUEST_ANSWER_TTY, QemuDevice, op};
use xtask::tag;

use crate::report::{log, skip};
use crate::sys;

/// How long the host may take to answer at the reference pace: QMP calls return at once, but
/// the console line has to cross a busy TCG guest first.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// The answer port, opened and set raw once per process; requests take turns on it.
static PORT: Mutex<Option<File>> = Mutex::new(None);
static SEQ: AtomicU32 = AtomicU32::new(0);

/// Plugs the lab device `name` into the xHCI and returns it; skips the scenario if this
/// QEMU lacks it.
pub fn plug(name: &str) -> Result<&'static QemuDevice> {
    // The host checks the name (and answers with the lab's list); this only finds it again.
    ask(json!({"op": op::PLUG, "device": name}))?;
    let device = qemu_usb::device(name).with_context(|| {
        format!("the host plugged {name:?}, which this lab-guest does not know")
    })?;
    log!("host: plugged QEMU's {} ({})", name, device.driver);
    Ok(device)
}

/// Pulls the lab device `name` out, with no warning to the guest.
pub fn unplug(name: &str) -> Result<()> {
    ask(json!({"op": op::UNPLUG, "device": name}))?;
    log!("host: pulled QEMU's {name}");
    Ok(())
}

/// Presses and releases each QEMU key (`qcode`: "a", "b", "ret", ...) in order on the plugged
/// keyboard.
pub fn keys(qcodes: &[&str]) -> Result<()> {
    ask(json!({"op": op::KEYS, "keys": qcodes}))?;
    Ok(())
}

/// What the serial adapter's far end saw since [`serial_reset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialStats {
    /// Bytes received (each one echoed back).
    pub bytes: u64,
    /// Their FNV-1a hash ([`qemu_usb::fnv1a`]).
    pub fnv: u64,
    /// The last baud rate the guest's driver set, as QEMU saw it.
    pub baud: Option<u64>,
}

/// The far end's counters.
pub fn serial_stats() -> Result<SerialStats> {
    let v = ask(json!({"op": op::SERIAL_STATS}))?;
    Ok(SerialStats {
        bytes: v["bytes"].as_u64().context("serial-stats without bytes")?,
        fnv: v["fnv"].as_u64().context("serial-stats without fnv")?,
        baud: v["baud"].as_u64(),
    })
}

/// Zeroes the far end's counters.
pub fn serial_reset() -> Result<()> {
    ask(json!({"op": op::SERIAL_RESET}))?;
    Ok(())
}

/// What QEMU's audio device played since `from` (an earlier answer's [`Played::end`]; `None`
/// for everything).
#[derive(Debug, Clone, Copy)]
pub struct Played {
    /// Where the recording ends now: the `from` of the next question.
    pub end: u64,
    /// 16-bit stereo frames recorded.
    pub frames: u64,
    /// Frames in 1 ms blocks that carry tone.
    pub tone_frames: u64,
    /// Silent 1 ms blocks inside the tone.
    pub gap_blocks: u64,
    /// The tone's frequency.
    pub freq_hz: f64,
}

/// Asks the host to analyse QEMU's audio recording from `from` on.
pub fn played(from: Option<u64>) -> Result<Played> {
    let mut request = json!({"op": op::AUDIO});
    if let Some(from) = from {
        request["from"] = json!(from);
    }
    let v = ask(request)?;
    let n = |k: &str| {
        v[k].as_u64()
            .with_context(|| format!("audio answer without {k}"))
    };
    Ok(Played {
        end: n("end")?,
        frames: n("frames")?,
        tone_frames: n("tone_frames")?,
        gap_blocks: n("gap_blocks")?,
        freq_hz: v["freq_hz"]
            .as_f64()
            .context("audio answer without freq_hz")?,
    })
}

/// Sends one request and waits for its answer: `ok`'s value, a failure with the host's (QMP's)
/// message, or a skip when this QEMU lacks what was asked.
fn ask(mut request: Value) -> Result<Value> {
    let mut port = port()?;
    let seq =
        (u64::from(std::process::id()) << 20) | u64::from(SEQ.fetch_add(1, Ordering::Relaxed));
    request["seq"] = json!(seq);
    println!("{} {request}", tag::HOST);
    let limit = ANSWER_WITHIN.mul_f64(sys::pace());
    let deadline = Instant::now() + limit;
    let file = port.as_mut().expect("port() opened it");
    let mut line = Vec::new();
    while Instant::now() < deadline {
        let mut buf = [0u8; 256];
        // The port is in raw mode with a 0.5 s read timeout: 0 bytes is "nothing yet".
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading the host's answer from {GUEST_ANSWER_TTY}"))?;
        for &b in &buf[..n] {
            if b != b'\n' {
                line.push(b);
                continue;
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            line.clear();
            let Ok(answer) = serde_json::from_str::<Value>(text.trim()) else {
                log!("host: ignoring a line that is not an answer: {text:?}");
                continue;
            };
            if answer["seq"].as_u64() != Some(seq) {
                // A late answer to a request its scenario already gave up on.
                continue;
            }
            if let Some(ok) = answer.get("ok") {
                return Ok(ok.clone());
            }
            if let Some(missing) = answer["missing"].as_str() {
                return skip(missing.to_owned());
            }
            let error = answer["error"]
                .as_str()
                .unwrap_or("an answer without a verdict");
            bail!("the host could not {}: {error}", request["op"]);
        }
    }
    bail!(
        "the host did not answer {request} within {:.0} s (is this lab-guest run by `cargo xtask lab`?)",
        limit.as_secs_f64()
    )
}

/// The answer port, raw (no echo back to the host, no line editing) with reads that return
/// after 0.5 s of silence.
fn port() -> Result<MutexGuard<'static, Option<File>>> {
    let mut port = PORT.lock().unwrap_or_else(|p| p.into_inner());
    if port.is_none() {
        // Opened before stty so the settings hold for as long as this process keeps it open.
        let file = File::open(GUEST_ANSWER_TTY)
            .with_context(|| format!("opening {GUEST_ANSWER_TTY}, the host's answer port"))?;
        sys::run(Command::new("/bin/busybox").args([
            "stty",
            "-F",
            GUEST_ANSWER_TTY,
            "raw",
            "-echo",
            "min",
            "0",
            "time",
            "5",
        ]))
        .with_context(|| format!("setting {GUEST_ANSWER_TTY} raw"))?;
        *port = Some(file);
    }
    Ok(port)
}
