//! HID kinds on `usbhid`: a boot keyboard and a boot mouse. Input reports cross from
//! `/dev/hidg0` to the client's evdev node (key press and release, movement and a button);
//! the keyboard's Caps Lock LED crosses back as an output report on the interrupt OUT
//! endpoint; `usbhid` is unbound and bound again.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::{Checks, Ctx, Done, Kind, no_setup, unbind_rebind};
use crate::gadget::{Function, Gadget, KEYBOARD_REPORT_DESC, VID};
use crate::sys;
use crate::usbdev::{self, Via};

/// A boot mouse (HID spec appendix E.10 shape): 3 buttons, X and Y, 3-byte reports.
const MOUSE_REPORT_DESC: &[u8] = &[
    0x05, 0x01, 0x09, 0x02, 0xa1, 0x01, 0x09, 0x01, 0xa1, 0x00, 0x05, 0x09, 0x19, 0x01, 0x29, 0x03,
    0x15, 0x00, 0x25, 0x01, 0x95, 0x03, 0x75, 0x01, 0x81, 0x02, 0x95, 0x01, 0x75, 0x05, 0x81, 0x03,
    0x05, 0x01, 0x09, 0x30, 0x09, 0x31, 0x15, 0x81, 0x25, 0x7f, 0x75, 0x08, 0x95, 0x02, 0x81, 0x06,
    0xc0, 0xc0,
];

const EVENT_SIZE: usize = 24;
const EV_SYN: u16 = 0;
const EV_KEY: u16 = 1;
const EV_REL: u16 = 2;
const EV_LED: u16 = 0x11;
const KEY_A: u16 = 30;
const BTN_LEFT: u16 = 0x110;
const LED_CAPSL: u16 = 1;
const MODULES: &[&str] = &["usbhid", "hid-generic", "evdev"];

/// The HID kinds.
pub const KINDS: &[Kind] = &[
    Kind {
        name: "hid-keyboard",
        functions: "hid (boot keyboard)",
        drivers: &["usbhid"],
        modules: MODULES,
        covers: "key press+release to evdev; Caps Lock LED output report back; unbind/rebind",
        gadget: || hid_gadget("kind-kbd", 0x0130, 1, 8, KEYBOARD_REPORT_DESC),
        setup: no_setup,
        check: keyboard,
    },
    Kind {
        name: "hid-mouse",
        functions: "hid (boot mouse)",
        drivers: &["usbhid"],
        modules: MODULES,
        covers: "movement and a button click to evdev; unbind/rebind",
        gadget: || hid_gadget("kind-mouse", 0x0131, 2, 3, MOUSE_REPORT_DESC),
        setup: no_setup,
        check: mouse,
    },
];

fn hid_gadget(name: &str, pid: u16, protocol: u8, len: u8, desc: &[u8]) -> Result<Gadget> {
    let (protocol, len) = (protocol.to_string(), len.to_string());
    Gadget::composite(
        name,
        VID,
        pid,
        &[Function {
            module: "usb_f_hid",
            instance: "hid.usb0",
            attrs: &[
                ("protocol", protocol.as_bytes()),
                ("subclass", b"1"),
                ("report_length", len.as_bytes()),
                ("report_desc", desc),
            ],
        }],
    )
}

/// The gadget's `/dev/hidgN`, from the function's `dev` (major:minor).
fn hidg(g: &Gadget) -> Result<PathBuf> {
    let dev = sys::read(g.function_dir("hid.usb0").join("dev"))?;
    let minor = dev
        .split(':')
        .nth(1)
        .context("no minor in the hid function's dev")?;
    Ok(PathBuf::from(format!("/dev/hidg{minor}")))
}

/// Finds the client side's event node.
fn event_node(vid: u16, pid: u16) -> Result<PathBuf> {
    sys::wait_for(
        "an input event node under vhci_hcd",
        Duration::from_secs(10),
        || usbdev::find_input_event_for(vid, pid, Via::Vhci),
    )
}

/// Every event (type, code, value) but EV_SYN from `node`, read by a thread.
fn events(node: &Path) -> Result<mpsc::Receiver<(u16, u16, i32)>> {
    let mut f = File::open(node).with_context(|| format!("opening {}", node.display()))?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; EVENT_SIZE];
        while f.read_exact(&mut buf).is_ok() {
            let kind = u16::from_le_bytes([buf[16], buf[17]]);
            let code = u16::from_le_bytes([buf[18], buf[19]]);
            let value = i32::from_le_bytes([buf[20], buf[21], buf[22], buf[23]]);
            if kind != EV_SYN && tx.send((kind, code, value)).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Writes `reports` to the gadget and waits for `want` among the events, in order.
fn reports_arrive(
    hidg: &Path,
    node: &Path,
    reports: &[&[u8]],
    want: &[(u16, u16, i32)],
) -> Result<String> {
    let rx = events(node)?;
    let mut gadget = OpenOptions::new().write(true).open(hidg)?;
    for r in reports {
        gadget.write_all(r)?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let mut next = 0;
    while next < want.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(ev) = rx.recv_timeout(left) else {
            bail!(
                "saw {seen:?} on {}, waiting for {:?}",
                node.display(),
                want[next]
            );
        };
        seen.push(ev);
        if ev == want[next] {
            next += 1;
        }
    }
    Ok(format!(
        "{} reports -> {} events on {}",
        reports.len(),
        want.len(),
        node.display()
    ))
}

fn keyboard(ctx: &Ctx<'_>, checks: &mut Checks) {
    let (vid, pid, dev) = (ctx.gadget.vid, ctx.gadget.pid, ctx.dev.clone());
    let hidg = match hidg(ctx.gadget) {
        Ok(h) => h,
        Err(e) => return checks.fail("gadget node", format!("{e:#}")),
    };
    let press = move |hidg: &Path| -> Result<String> {
        reports_arrive(
            hidg,
            &event_node(vid, pid)?,
            &[&[0, 0, 0x04, 0, 0, 0, 0, 0], &[0; 8]],
            &[(EV_KEY, KEY_A, 1), (EV_KEY, KEY_A, 0)],
        )
    };
    let (h1, h2, h3) = (hidg.clone(), hidg.clone(), hidg);
    checks.check(
        "key press and release",
        Duration::from_secs(20),
        move || Ok(Done::new(press(&h1)?)),
    );
    checks.check("LED output report", Duration::from_secs(20), move || {
        let node = event_node(vid, pid)?;
        let mut reader = OpenOptions::new().read(true).open(&h2)?;
        let (tx, rx) = mpsc::channel();
        // usbhid sends the LED state it starts with (all off) first; wait for Caps Lock.
        thread::spawn(move || {
            let mut buf = [0u8; 8];
            loop {
                let got = reader.read(&mut buf).map(|n| buf[..n].to_vec());
                let done = got
                    .as_ref()
                    .map_or(true, |r| r.first().is_some_and(|b| b & 0x02 != 0));
                if tx.send(got).is_err() || done {
                    break;
                }
            }
        });
        let mut input = OpenOptions::new().write(true).open(&node)?;
        input.write_all(&event(EV_LED, LED_CAPSL, 1))?;
        input.write_all(&event(EV_SYN, 0, 0))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.first().is_none_or(|b| b & 0x02 == 0) {
            got = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .with_context(|| {
                    format!("no Caps Lock output report within 10 s (last {got:02x?})")
                })??;
        }
        ensure!(
            got.first().is_some_and(|b| b & 0x02 != 0),
            "the gadget read {got:?}, not the Caps Lock bit"
        );
        Ok(Done::new(format!(
            "EV_LED Caps Lock -> report {got:02x?} on {}",
            h2.display()
        )))
    });
    checks.check("unbind/rebind usbhid", Duration::from_secs(30), move || {
        let what = unbind_rebind(&dev, "usbhid")?;
        Ok(Done::new(format!("{what}; {}", press(&h3)?)))
    });
}

fn mouse(ctx: &Ctx<'_>, checks: &mut Checks) {
    let (vid, pid, dev) = (ctx.gadget.vid, ctx.gadget.pid, ctx.dev.clone());
    let hidg = match hidg(ctx.gadget) {
        Ok(h) => h,
        Err(e) => return checks.fail("gadget node", format!("{e:#}")),
    };
    let moves = move |hidg: &Path| -> Result<String> {
        reports_arrive(
            hidg,
            &event_node(vid, pid)?,
            &[&[0, 5, 0xfb], &[1, 0, 0], &[0, 0, 0]],
            &[
                (EV_REL, 0, 5),
                (EV_REL, 1, -5),
                (EV_KEY, BTN_LEFT, 1),
                (EV_KEY, BTN_LEFT, 0),
            ],
        )
    };
    let (h1, h2) = (hidg.clone(), hidg);
    checks.check("movement and click", Duration::from_secs(20), move || {
        Ok(Done::new(moves(&h1)?))
    });
    checks.check("unbind/rebind usbhid", Duration::from_secs(30), move || {
        let what = unbind_rebind(&dev, "usbhid")?;
        Ok(Done::new(format!("{what}; {}", moves(&h2)?)))
    });
}

/// One `struct input_event` (zero timestamp: the kernel ignores it on write).
fn event(kind: u16, code: u16, value: i32) -> [u8; EVENT_SIZE] {
    let mut e = [0u8; EVENT_SIZE];
    e[16..18].copy_from_slice(&kind.to_le_bytes());
    e[18..20].copy_from_slice(&code.to_le_bytes());
    e[20..24].copy_from_slice(&value.to_le_bytes());
    e
}
