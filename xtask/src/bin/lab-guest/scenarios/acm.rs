//! A CDC-ACM gadget: the serial device kind, with bytes crossing from host tty to gadget tty.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::gadget::Gadget;
use crate::report::log;
use crate::usbdev::{self, Via};
use crate::{modules, sys};

const MESSAGE: &[u8] = b"lab-acm-ping\n";

/// Plug, find `/dev/ttyACMn`, send a line to `/dev/ttyGS0`.
pub fn run() -> Result<()> {
    modules::load(&["cdc-acm"])?;
    let mut g = Gadget::acm()?;
    g.plug()?;
    g.wait_enumerated(Duration::from_secs(10))?;
    let tty = sys::wait_for(
        "a ttyACM node for the gadget",
        Duration::from_secs(10),
        || usbdev::find_tty_for(g.vid, g.pid, Via::Dummy),
    )?;
    let gs = Path::new("/dev/ttyGS0");
    sys::wait_for("/dev/ttyGS0", Duration::from_secs(5), || {
        gs.exists().then_some(())
    })?;
    log!(
        "acm: host side {}, gadget side {}",
        tty.display(),
        gs.display()
    );
    for dev in [&tty, &gs.to_path_buf()] {
        sys::run(sys::bb("stty").args(["-F", &dev.to_string_lossy(), "raw", "-echo"]))?;
    }

    let mut gadget_end = OpenOptions::new().read(true).write(true).open(gs)?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while !got.ends_with(b"\n") {
            match gadget_end.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = tx.send(got);
    });
    let mut host_end = OpenOptions::new().read(true).write(true).open(&tty)?;
    host_end.write_all(MESSAGE)?;
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .context("nothing arrived on /dev/ttyGS0 within 10 s")?;
    ensure!(
        got == MESSAGE,
        "ttyGS0 received {:?}, sent {:?}",
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(MESSAGE)
    );
    log!(
        "acm: {} bytes crossed {} -> {}",
        got.len(),
        tty.display(),
        gs.display()
    );
    drop(host_end);
    g.unplug()?;
    Ok(())
}
