//! The kernel's own USB/IP in the guest, as scenarios use it to import a gadget over
//! loopback: `usbipd`, `usbip bind` and `usbip attach -r 127.0.0.1`. It is the control every
//! measurement and device-kind check of our tunnel is read against.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::sys;

/// usbipd's TCP port, 3240, as it appears in /proc/net/tcp.
const USBIP_PORT_HEX: &str = ":0CA8";
const USBIP: &str = "/usr/sbin/usbip";

/// usbipd in the foreground as our child, so the scenario (not a pid file) owns its lifetime.
pub struct Usbipd(Child);

impl Usbipd {
    /// Starts `usbipd -4` and waits until it listens.
    pub fn start() -> Result<Usbipd> {
        let child = Command::new("/usr/sbin/usbipd")
            .arg("-4")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting usbipd")?;
        let usbipd = Usbipd(child);
        sys::wait_for(
            "usbipd to listen on port 3240",
            Duration::from_secs(10),
            || {
                let tcp = fs::read_to_string("/proc/net/tcp").ok()?;
                // State 0A is LISTEN.
                tcp.lines()
                    .any(|l| {
                        l.contains(USBIP_PORT_HEX) && l.split_whitespace().nth(3) == Some("0A")
                    })
                    .then_some(())
            },
        )?;
        Ok(usbipd)
    }
}

impl Drop for Usbipd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A device bound to usbip-host and imported through vhci; detached and unbound on drop,
/// which gives the device back to its drivers on the exporting side.
pub struct Attached {
    busid: String,
}

impl Attached {
    /// `usbip bind -b busid` then `usbip attach -r 127.0.0.1 -b busid`.
    pub fn import(busid: &str) -> Result<Attached> {
        sys::run(Command::new(USBIP).args(["bind", "-b", busid]))?;
        let attached = Attached {
            busid: busid.to_owned(),
        };
        sys::run(Command::new(USBIP).args(["attach", "-r", "127.0.0.1", "-b", busid]))?;
        Ok(attached)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Ok(out) = sys::run(Command::new(USBIP).arg("port")) {
            for port in out
                .lines()
                .filter_map(|l| l.strip_prefix("Port "))
                .filter_map(|l| l.split(':').next())
            {
                let _ = sys::run(Command::new(USBIP).args(["detach", "-p", port.trim()]));
            }
        }
        let _ = sys::run(Command::new(USBIP).args(["unbind", "-b", &self.busid]));
    }
}
