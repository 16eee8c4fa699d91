//! SourceSink and Loopback (`usb_f_ss_lb`), the functions of the kernel's gadget zero, with the
//! kernel's test driver `usbtest` on the client side. usbtest's cases run only through its
//! `USBDEVFS_IOCTL`, which needs `testusb` (no Debian package ships it) or unsafe code (the
//! lab forbids it), so the check is that usbtest binds and probes the endpoints it expects
//! (its probe line in dmesg) and that unbinding and rebinding it works. Data through these
//! functions is not covered here.

use std::time::Duration;

use anyhow::Result;

use super::{Checks, Ctx, Done, Kind, no_setup, unbind_rebind};
use crate::gadget::{Function, Gadget};
use crate::sys;

/// usbtest knows gadget zero by the ids of the Linux-USB gadget zero, for both functions.
const GZ_VID: u16 = 0x0525;
const GZ_PID: u16 = 0xa4a0;

/// SourceSink and Loopback.
pub const KINDS: &[Kind] = &[
    Kind {
        name: "sourcesink",
        functions: "SourceSink",
        drivers: &["usbtest"],
        modules: &["usbtest"],
        covers: COVERS,
        gadget: || zero("kind-ss", "SourceSink.0"),
        setup: no_setup,
        check,
    },
    Kind {
        name: "loopback",
        functions: "Loopback",
        drivers: &["usbtest"],
        modules: &["usbtest"],
        covers: COVERS,
        gadget: || zero("kind-lb", "Loopback.0"),
        setup: no_setup,
        check,
    },
];

const COVERS: &str = "usbtest binds and probes (dmesg); unbind/rebind; no data (no testusb)";

fn zero(name: &str, instance: &str) -> Result<Gadget> {
    Gadget::composite(
        name,
        GZ_VID,
        GZ_PID,
        &[Function {
            module: "usb_f_ss_lb",
            instance,
            attrs: &[],
        }],
    )
}

fn check(ctx: &Ctx<'_>, checks: &mut Checks) {
    let dev = ctx.dev.clone();
    let dev2 = ctx.dev.clone();
    checks.check("usbtest probe line", Duration::from_secs(10), move || {
        let name = dev
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let line = sys::wait_for("usbtest's probe line", Duration::from_secs(5), || {
            let out = sys::bb("dmesg").output().ok()?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .find(|l| l.contains(&format!("usbtest {name}:1.0:")))
                .map(|l| l.split("] ").nth(1).unwrap_or(l).to_owned())
        })?;
        Ok(Done::new(line))
    });
    checks.check(
        "unbind/rebind usbtest",
        Duration::from_secs(30),
        move || Ok(Done::new(unbind_rebind(&dev2, "usbtest")?)),
    );
}
