//! The MIDI kind: `usb_f_midi` on the gadget is an ALSA rawmidi card there, `snd-usb-audio`
//! makes another on the client side. Note-on and note-off bytes cross both ways between the
//! two `/dev/snd/midiC*D0` nodes (packed into USB-MIDI event packets on the wire and out again);
//! the nodes are closed and reopened; `snd-usb-audio` is unbound and bound again.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::{Checks, Ctx, Done, Kind, no_setup, unbind_rebind};
use crate::sys;
use crate::usbdev::{self, Via};

/// The MIDI kind.
pub const KINDS: &[Kind] = &[Kind {
    name: "midi",
    functions: "midi",
    drivers: &["snd-usb-audio"],
    modules: &["snd-usb-audio"],
    covers: "note on/off bytes each way between rawmidi nodes; reopen; unbind/rebind",
    gadget: || super::serial::one("kind-midi", 0x0150, "usb_f_midi", "midi.usb0"),
    setup: no_setup,
    check,
}];

fn check(ctx: &Ctx<'_>, checks: &mut Checks) {
    let (vid, pid, dev) = (ctx.gadget.vid, ctx.gadget.pid, ctx.dev.clone());
    let find = move || -> Result<PathBuf> {
        let node = sys::wait_for(
            "a rawmidi node under vhci_hcd",
            Duration::from_secs(10),
            || usbdev::find_node("/sys/class/sound", "midiC", vid, pid, Via::Vhci),
        )?;
        Ok(Path::new("/dev/snd").join(node.file_name().unwrap_or_default()))
    };
    checks.check("MIDI bytes both ways", Duration::from_secs(30), move || {
        exchange(&find()?, 0x3c)
    });
    checks.check("close and reopen", Duration::from_secs(30), move || {
        exchange(&find()?, 0x3e)
    });
    checks.check(
        "unbind/rebind snd-usb-audio",
        Duration::from_secs(40),
        move || {
            let what = unbind_rebind(&dev, "snd-usb-audio")?;
            Ok(Done::new(format!(
                "{what}; {}",
                exchange(&find()?, 0x40)?.text()
            )))
        },
    );
}

/// The gadget's rawmidi node: the sound card whose device hangs off the dummy UDC.
fn gadget_node() -> Result<PathBuf> {
    fs::read_dir("/sys/class/sound")?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("midiC"))
        .find(|e| {
            fs::canonicalize(e.path()).is_ok_and(|p| p.to_string_lossy().contains("/dummy_udc."))
        })
        .map(|e| Path::new("/dev/snd").join(e.file_name()))
        .context("no rawmidi node of the gadget")
}

/// Note on host -> gadget, note off gadget -> host.
fn exchange(host: &Path, note: u8) -> Result<Done> {
    let gp = gadget_node()?;
    let on = [0x90, note, 0x64];
    let got = read_after(&gp, 3, || write_to(host, &on))?;
    ensure!(got == on, "the gadget read {got:02x?}, sent {on:02x?}");
    let off = [0x80, note, 0x00];
    let got = read_after(host, 3, || write_to(&gp, &off))?;
    ensure!(got == off, "the host read {got:02x?}, sent {off:02x?}");
    Ok(Done::new(format!(
        "{} <-> {}: note {note:#04x} on and off",
        host.display(),
        gp.display()
    )))
}

fn write_to(node: &Path, bytes: &[u8]) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .open(node)
        .with_context(|| format!("opening {} to write", node.display()))?
        .write_all(bytes)
        .with_context(|| format!("writing to {}", node.display()))
}

/// Starts reading `n` bytes from `node`, runs `send`, returns them (10 s at most).
///
/// A rawmidi input drops what arrives before its first read() triggers it (`f_midi` and
/// `snd-usb-audio` both check their trigger bit), so `send` waits until the reader is in read().
fn read_after(node: &Path, n: usize, send: impl FnOnce() -> Result<()>) -> Result<Vec<u8>> {
    let mut reader = File::open(node).with_context(|| format!("opening {}", node.display()))?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut got = vec![0u8; n];
        let _ = tx.send(reader.read_exact(&mut got).map(|()| got));
    });
    thread::sleep(Duration::from_millis(300));
    send()?;
    Ok(rx
        .recv_timeout(Duration::from_secs(10))
        .context("nothing arrived within 10 s")??)
}
