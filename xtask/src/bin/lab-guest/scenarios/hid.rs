//! A HID keyboard gadget: the input device kind, with a key press reaching evdev.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::gadget::Gadget;
use crate::report::log;
use crate::usbdev::{self, Via};
use crate::{modules, sys};

/// `struct input_event` on x86_64: 16-byte timeval, u16 type, u16 code, i32 value.
const EVENT_SIZE: usize = 24;
const EV_KEY: u16 = 1;
pub const KEY_A: u16 = 30;
/// HID usage id of the `a` key in a boot keyboard report.
pub const USAGE_A: u8 = 0x04;

/// `EV_KEY` events (code, value) read from the input node `event` by a thread, until it closes.
pub fn key_events(event: &Path) -> Result<mpsc::Receiver<(u16, i32)>> {
    let mut events = File::open(event).with_context(|| format!("opening {}", event.display()))?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; EVENT_SIZE];
        while events.read_exact(&mut buf).is_ok() {
            let kind = u16::from_le_bytes([buf[16], buf[17]]);
            let code = u16::from_le_bytes([buf[18], buf[19]]);
            let value = i32::from_le_bytes([buf[20], buf[21], buf[22], buf[23]]);
            if kind == EV_KEY && tx.send((code, value)).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Plug, find `/dev/input/eventN`, press and release `a` through `/dev/hidg0`.
pub fn run() -> Result<()> {
    modules::load(&["usbhid", "hid-generic", "evdev"])?;
    let mut g = Gadget::hid_keyboard()?;
    g.plug()?;
    g.wait_enumerated(Duration::from_secs(10))?;
    let event = sys::wait_for(
        "an input event node for the gadget",
        Duration::from_secs(10),
        || usbdev::find_input_event_for(g.vid, g.pid, Via::Dummy),
    )?;
    let hidg = Path::new("/dev/hidg0");
    sys::wait_for("/dev/hidg0", Duration::from_secs(5), || {
        hidg.exists().then_some(())
    })?;
    log!(
        "hid: host side {}, gadget side {}",
        event.display(),
        hidg.display()
    );

    let rx = key_events(&event)?;
    let mut keyboard = OpenOptions::new().write(true).open(hidg)?;
    keyboard.write_all(&[0, 0, USAGE_A, 0, 0, 0, 0, 0])?;
    keyboard.write_all(&[0; 8])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (code, value) = rx
            .recv_timeout(left)
            .context("no KEY_A press arrived on the event node within 10 s")?;
        log!("hid: EV_KEY code {code} value {value}");
        if code == KEY_A && value == 1 {
            break;
        }
    }
    log!(
        "hid: key press crossed {} -> {}",
        hidg.display(),
        event.display()
    );
    g.unplug()?;
    Ok(())
}
