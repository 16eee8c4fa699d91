//! Isochronous OUT for real: QEMU's `usb-audio` (UAC1, 48 kHz S16LE stereo, full speed) on
//! the VM's xHCI, played into with `aplay` on the client. The host analyses what the device
//! recorded (`crate::host::played`): the tone must come out at 1 kHz, with the share of it
//! that never arrived reported beside the same play through the kernel's own USB/IP.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::project::{client, detach_and_wait, show_client_log, show_server_log, spawn_client};
use super::usbip::{Attached, Usbipd};
use super::xhci::{Plugged, load, serve};
use crate::report::{log, metric};
use crate::usbdev::{self, Via};
use crate::{host, modules, netem, sys};

/// The tone: 1 kHz, which one 1 ms iso packet (48 frames) holds exactly one period of.
const TONE_HZ: f64 = 1000.0;
/// Seconds of tone per measured play.
const PLAY_SECS: u32 = 4;
/// Frames per second.
const RATE: u32 = 48_000;
/// The most of a play that may go missing through our tunnel. TCG runs the guest ~10-50x
/// slower than hardware; the kernel's own USB/IP in the same boot is the anchor beside it.
const MISSING_BOUND: f64 = 0.25;
/// How much slower a play through ours may run at 20 ms than the same attachment's play at
/// RTT 0 just before it: the client answers iso OUT ahead by the round trip, so the round trip
/// must not stretch the stream (without that it took 1.85x). The anchor is our own RTT 0 play,
/// not the kernel's: on a slow host both our plays take longer to set up and drain (1.27x at
/// RTT 0 against the kernel's 1.04x in one boot), and that is CPU, not the round trip.
const STRETCH_SLACK: f64 = 0.25;

/// Plays through the kernel's USB/IP, then ours at RTT 0 and 20 ms; stops and starts twice;
/// detaches mid-stream.
pub fn run() -> Result<()> {
    load(&[modules::AUDIO, modules::NETEM].concat())?;
    let dev = Plugged::new("audio")?;
    let (vid, pid) = (dev.device.vid, dev.device.pid);
    let tone = Path::new("/tmp/tone-1k.wav");
    write_tone(tone, PLAY_SECS)?;
    let short = Path::new("/tmp/tone-1k-short.wav");
    write_tone(short, 1)?;
    let long = Path::new("/tmp/tone-1k-long.wav");
    write_tone(long, 30)?;

    // The anchor: the kernel's own USB/IP, in this boot.
    let kernel = {
        let _usbipd = Usbipd::start()?;
        let _attached = Attached::import(&dev.busid())?;
        let card = wait_card(vid, pid)?;
        play(card, tone, PLAY_SECS).context("playing through the kernel's USB/IP")?
    };
    let (kernel, kernel_stretch) = kernel;
    metric("kernel_play_stretch", kernel_stretch);
    let kernel_missing = missing(&kernel, PLAY_SECS);
    log!(
        "kernel USB/IP: {:.1} Hz, {:.1} % missing, {} gaps",
        kernel.freq_hz,
        100.0 * kernel_missing,
        kernel.gap_blocks
    );
    metric("kernel_missing_share", kernel_missing);
    sys::wait_for(
        "the kernel's USB/IP to let go",
        Duration::from_secs(15),
        || {
            usbdev::find_usb_device(vid, pid, Via::Vhci)
                .is_none()
                .then_some(())
        },
    )?;

    let (mut server, ticket) = serve(&[&dev.vid_pid()])?;
    let mut attached = spawn_client("friend", &["attach", &ticket, "--device", &dev.vid_pid()])?;
    let card = wait_card(vid, pid).inspect_err(|_| {
        show_client_log("friend");
        show_server_log();
    })?;
    // Nothing has streamed yet: every counter starts at 0.
    let mut before = serde_json::json!({});
    let mut stretch_rtt0 = kernel_stretch;
    for (label, rtt_ms) in [("rtt0", 0u64), ("rtt20", 20)] {
        netem::set(Duration::from_millis(rtt_ms / 2), 0.0)?;
        let played = play(card, tone, PLAY_SECS);
        netem::clear()?;
        let played = played
            .inspect_err(|_| {
                show_client_log("friend");
                show_server_log();
            })
            .with_context(|| format!("playing through our tunnel at RTT {rtt_ms} ms"))?;
        let (played, stretch) = played;
        let lost = missing(&played, PLAY_SECS);
        metric(&format!("play_stretch_{label}"), stretch);
        log!(
            "our tunnel, RTT {rtt_ms} ms: {:.1} Hz, {:.1} % missing (bound {:.0} %), {} gaps, played in {stretch:.2}x real time",
            played.freq_hz,
            100.0 * lost,
            100.0 * MISSING_BOUND,
            played.gap_blocks
        );
        metric(&format!("missing_share_{label}"), lost);
        metric(&format!("gap_blocks_{label}"), played.gap_blocks as f64);
        ensure!(
            lost <= MISSING_BOUND,
            "{:.1} % of the tone went missing at RTT {rtt_ms} ms (bound {:.0} %; the kernel's USB/IP lost {:.1} %)",
            100.0 * lost,
            100.0 * MISSING_BOUND,
            100.0 * kernel_missing
        );
        // What the client counted for this play, as `status --json` shows it.
        let after = iso_stream(&dev.vid_pid())?;
        let field = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        let count = |k: &str| field(&after, k).saturating_sub(field(&before, k));
        let (underruns, ahead) = (count("underruns"), count("answered_ahead"));
        log!(
            "status --json, RTT {rtt_ms} ms: {} URBs, {underruns} underruns ({} frames), {ahead} answered ahead at depth {}",
            count("urbs"),
            count("missed_frames"),
            field(&after, "depth")
        );
        metric(&format!("underruns_{label}"), underruns as f64);
        metric(&format!("answered_ahead_{label}"), ahead as f64);
        if rtt_ms > 0 {
            ensure!(
                ahead > 0,
                "no iso OUT URB was answered ahead at RTT {rtt_ms} ms"
            );
            ensure!(
                stretch <= stretch_rtt0 + STRETCH_SLACK,
                "at RTT {rtt_ms} ms the play took {stretch:.2}x real time (ours at RTT 0: {stretch_rtt0:.2}x, slack {STRETCH_SLACK}; the kernel's USB/IP at RTT 0: {kernel_stretch:.2}x)"
            );
        } else {
            stretch_rtt0 = stretch;
        }
        before = after;
    }

    // Stop (alt 0) and start (alt 1) twice in a row: each play is one of each.
    for round in 1..=2 {
        play(card, short, 1).with_context(|| format!("short play {round} after a stop"))?;
    }
    log!("stopped and started twice: each play came out as the tone");

    // Detach mid-stream: aplay ends with an error, nothing is left in D state, the port frees.
    let mut aplay = aplay(card, long)?;
    std::thread::sleep(Duration::from_millis(1500).mul_f64(sys::pace()));
    detach_and_wait("friend", &mut attached)?;
    let status = sys::wait_for(
        "aplay to end after the detach",
        Duration::from_secs(15),
        || aplay.try_wait().ok().flatten(),
    )
    .inspect_err(|_| {
        let _ = aplay.kill();
    })?;
    sys::wait_no_user_process_in_d_state()?;
    log!("detached mid-stream: aplay ended ({status}), no D state, the port is free");
    ensure!(server.alive(), "the server died");
    Ok(())
}

/// The iso OUT stream of `vid_pid`'s port as `p2p-usb-client --json status` reports it, once
/// the attachment has refreshed its report after a play.
fn iso_stream(vid_pid: &str) -> Result<serde_json::Value> {
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, out, err) = client("friend", &["--json", "status"])?;
    ensure!(ok, "status failed: {err}");
    let stream = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|p| p["live"]["device"] == vid_pid)
        .flat_map(|p| p["live"]["iso"].as_array().cloned().unwrap_or_default())
        .find(|s| s["direction"] == "out");
    stream.with_context(|| format!("status --json shows no iso OUT stream for {vid_pid}: {out}"))
}

/// The share of `secs` of tone that the device never played.
fn missing(p: &host::Played, secs: u32) -> f64 {
    let want = f64::from(secs * RATE);
    (1.0 - p.tone_frames as f64 / want).max(0.0)
}

/// Waits for the ALSA card of `vid:pid` under vhci; its number.
fn wait_card(vid: u16, pid: u16) -> Result<u32> {
    let node = sys::wait_for(
        "a sound card of QEMU's audio device under vhci_hcd",
        Duration::from_secs(30),
        || usbdev::find_node("/sys/class/sound", "card", vid, pid, Via::Vhci),
    )?;
    let n = node
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("card"))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{} is not a card", node.display()))?;
    sys::wait_for("the card's PCM node", Duration::from_secs(10), || {
        Path::new(&format!("/dev/snd/pcmC{n}D0p"))
            .exists()
            .then_some(())
    })?;
    Ok(n)
}

/// Starts `aplay` of `wav` into card `card`.
fn aplay(card: u32, wav: &Path) -> Result<Child> {
    Command::new("/usr/bin/aplay")
        .args(["-q", "-D", &format!("plughw:{card},0")])
        .arg(wav)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting aplay")
}

/// Plays `wav` (`secs` of tone) into `card` and asks the host what the device recorded; the
/// tone must be there at 1 kHz ± 1 %. Also how much longer than `secs` the play took: QEMU
/// records every packet whenever it comes, so a stream that falls behind real time (what a
/// real device hears as underruns) shows there, not as missing frames.
fn play(card: u32, wav: &Path, secs: u32) -> Result<(host::Played, f64)> {
    let mark = host::played(None)?.end;
    let started = Instant::now();
    let mut child = aplay(card, wav)?;
    let limit = Duration::from_secs(u64::from(secs) * 3 + 20).mul_f64(sys::pace());
    let status = sys::wait_for("aplay to finish", limit, || child.try_wait().ok().flatten())
        .inspect_err(|_| {
            let _ = child.kill();
        })?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        bail!("aplay failed ({status}): {}", err.trim());
    }
    let took = started.elapsed().as_secs_f64();
    // QEMU writes the recording from a timer; give it a moment to catch up.
    std::thread::sleep(Duration::from_millis(300));
    let played = host::played(Some(mark))?;
    log!(
        "aplay of {secs} s took {took:.1} s; the device recorded {} frames, {} of them tone, at {:.1} Hz",
        played.frames,
        played.tone_frames,
        played.freq_hz
    );
    ensure!(
        played.tone_frames > 0,
        "the device recorded no tone ({} frames in all)",
        played.frames
    );
    ensure!(
        (played.freq_hz - TONE_HZ).abs() <= TONE_HZ / 100.0,
        "the device played {:.1} Hz, not {TONE_HZ} Hz ± 1 %",
        played.freq_hz
    );
    Ok((played, took / f64::from(secs)))
}

/// A 48 kHz 16-bit stereo WAV of `secs` seconds of a 1 kHz sine.
fn write_tone(path: &Path, secs: u32) -> Result<()> {
    let frames = secs * RATE;
    let data_len = frames * 4;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&2u16.to_le_bytes()); // channels
    out.extend_from_slice(&RATE.to_le_bytes());
    out.extend_from_slice(&(RATE * 4).to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for i in 0..frames {
        let phase = 2.0 * std::f64::consts::PI * TONE_HZ * f64::from(i) / f64::from(RATE);
        let s = (12_000.0 * phase.sin()) as i16;
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::File::create(path)?.write_all(&out)?;
    Ok(())
}
