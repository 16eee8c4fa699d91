//! A composite device of three functions in one configuration, ACM + ECM + mass storage:
//! each interface gets its own driver on the client side (`cdc_acm`, `cdc_ether`,
//! `usb-storage`) and each works at once: a line each way through the tty, a ping through the
//! network namespace, the disk read back.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use super::{Checks, Ctx, Done, Kind};
use crate::bench::{self, MIB};
use crate::gadget::{Function, Gadget, VID};
use crate::sys;
use crate::usbdev::{self, Via};

const LUN: &str = "/tmp/kind-composite.img";

/// The composite kind.
pub const KINDS: &[Kind] = &[Kind {
    name: "composite",
    functions: "acm + ecm + mass_storage",
    drivers: &["cdc_acm", "cdc_ether", "usb-storage"],
    modules: &["cdc-acm", "cdc_ether", "scsi_mod", "usb-storage", "sd_mod"],
    covers: "each function's driver binds; tty line each way; ping; disk reads back",
    gadget,
    setup: |g| super::net::gadget_ns(g, "ecm.usb0"),
    check,
}];

fn gadget() -> Result<Gadget> {
    bench::pattern_file(Path::new(LUN), 4 * MIB, 0x20)?;
    Gadget::composite(
        "kind-composite",
        VID,
        0x0170,
        &[
            Function {
                module: "usb_f_acm",
                instance: "acm.usb0",
                attrs: &[],
            },
            Function {
                module: "usb_f_ecm",
                instance: "ecm.usb0",
                attrs: &[],
            },
            Function {
                module: "usb_f_mass_storage",
                instance: "mass_storage.0",
                attrs: &[("lun.0/removable", b"0"), ("lun.0/file", LUN.as_bytes())],
            },
        ],
    )
}

fn check(ctx: &Ctx<'_>, checks: &mut Checks) {
    let (vid, pid, dev) = (ctx.gadget.vid, ctx.gadget.pid, ctx.dev.clone());
    match super::serial::gadget_tty(ctx.gadget, "acm.usb0") {
        Ok(gs) => checks.check("tty lines both ways", Duration::from_secs(30), move || {
            let tty = sys::wait_for("a ttyACM under vhci_hcd", Duration::from_secs(10), || {
                usbdev::find_node("/sys/class/tty", "ttyACM", vid, pid, Via::Vhci)
            })?;
            super::serial::exchange(&tty, &gs, 1)
        }),
        Err(e) => checks.fail("gadget tty", format!("{e:#}")),
    }
    super::net::ping_check(ctx, checks);
    checks.check("disk reads back", Duration::from_secs(40), move || {
        let disks = super::storage::wait_disks(&dev, 1)?;
        let rate = super::storage::reads_back(&disks[0], Path::new(LUN))?;
        Ok(Done::new(format!("{} at {rate} MiB/s", disks[0].display())))
    });
}
