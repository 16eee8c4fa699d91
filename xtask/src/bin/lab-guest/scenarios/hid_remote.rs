//! A HID keyboard through the tunnel: interrupt IN, the transfer type of keyboards, mice and
//! game pads, against the real kernel on both ends. Over a 20 ms round trip every key press
//! and release the gadget sends reaches the client's evdev node, in order, once, with plain
//! forwarding and with interrupt-IN streaming; the rates of both are the scenario's figures.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::hid::{KEY_A, USAGE_A, key_events};
use super::project::{
    client_id, detach_and_wait, show_client_log, spawn_client, start_server, vhci_ports_in_use,
};
use crate::gadget::Gadget;
use crate::report::{log, metric};
use crate::usbdev::{self, Via};
use crate::{modules, netem, sys};

/// Key presses per run: each is a press report and a release report.
const PRESSES: usize = 20;

/// Share the keyboard, then type through the tunnel without and with streaming.
pub fn run() -> Result<()> {
    modules::load(&["usbhid", "hid-generic", "evdev"])?;
    modules::load(modules::USBIP)?;
    modules::load(modules::NETEM)?;
    let mut g = Gadget::hid_keyboard()?;
    g.plug()?;
    g.wait_enumerated(Duration::from_secs(10))?;
    let vid_pid = g.vid_pid();
    let friend = client_id("friend")?;
    let (_server, ticket) = start_server(&["--share", &vid_pid, "--allow", &friend])?;
    for (label, flags) in [
        ("plain", &["--no-interrupt-streaming"][..]),
        ("streaming", &[][..]),
    ] {
        let rate = type_through(&g, &ticket, flags)
            .with_context(|| format!("typing through the tunnel ({label})"))?;
        log!("{label}: {PRESSES} key presses over 20 ms RTT at {rate:.1} reports/s");
        metric(&format!("reports_per_s_rtt20_{label}"), rate);
    }
    g.unplug()?;
    Ok(())
}

/// Attaches the keyboard with the client's `flags`, types [`PRESSES`] presses of `a` over a
/// 20 ms round trip, checks evdev saw exactly them, detaches; returns reports per second.
fn type_through(g: &Gadget, ticket: &str, flags: &[&str]) -> Result<f64> {
    let mut args = flags.to_vec();
    args.extend(["attach", ticket, "--device"]);
    let vid_pid = g.vid_pid();
    args.push(&vid_pid);
    let mut attached = spawn_client("friend", &args)?;
    let event = sys::wait_for(
        "an input event node for the keyboard under vhci_hcd",
        Duration::from_secs(30),
        || usbdev::find_input_event_for(g.vid, g.pid, Via::Vhci),
    )
    .inspect_err(|_| show_client_log("friend"))?;
    let events = key_events(&event)?;
    let hidg = Path::new("/dev/hidg0");
    let mut keyboard = OpenOptions::new()
        .write(true)
        .open(hidg)
        .with_context(|| format!("opening {}", hidg.display()))?;

    netem::set(Duration::from_millis(10), 0.0)?;
    let typed = (|| -> Result<f64> {
        let start = Instant::now();
        // f_hid's write waits until the host took the previous report, so this paces itself
        // at the rate the host polls through the tunnel.
        for _ in 0..PRESSES {
            keyboard.write_all(&[0, 0, USAGE_A, 0, 0, 0, 0, 0])?;
            keyboard.write_all(&[0; 8])?;
        }
        let mut seen = Vec::with_capacity(2 * PRESSES);
        while seen.len() < 2 * PRESSES {
            let (code, value) = events
                .recv_timeout(Duration::from_secs(20))
                .with_context(|| format!("after {} key events, no more within 20 s", seen.len()))?;
            // Autorepeat (value 2) is evdev's own, from a key held across a slow poll.
            if value != 2 {
                seen.push((code, value));
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let want: Vec<(u16, i32)> = (0..PRESSES)
            .flat_map(|_| [(KEY_A, 1), (KEY_A, 0)])
            .collect();
        ensure!(
            seen == want,
            "evdev saw {seen:?}, expected {PRESSES} presses and releases of KEY_A in order"
        );
        Ok((2 * PRESSES) as f64 / secs)
    })();
    netem::clear()?;
    if typed.is_err() {
        show_client_log("friend");
    }
    let rate = typed?;

    detach_and_wait("friend", &mut attached)?;
    sys::wait_for("the vhci port to be free", Duration::from_secs(10), || {
        vhci_ports_in_use()
            .ok()
            .filter(|(used, _)| *used == 0)
            .map(|_| ())
    })?;
    Ok(rate)
}
