//! The printer kind (`usblp`): a job line crosses from `/dev/usb/lpN` to the gadget's
//! `/dev/g_printerN`, and a status line back (the function is bidirectional, protocol 2);
//! the node is closed and reopened; `usblp` is unbound and bound again.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::{Checks, Ctx, Done, Kind, no_setup, read_line_after, unbind_rebind};
use crate::gadget::{Function, Gadget, VID};
use crate::sys;
use crate::usbdev::{self, Via};

/// The printer kind.
pub const KINDS: &[Kind] = &[Kind {
    name: "printer",
    functions: "printer",
    drivers: &["usblp"],
    modules: &["usblp"],
    covers: "a line each way through /dev/usb/lpN; close and reopen; unbind/rebind",
    gadget: || {
        Gadget::composite(
            "kind-printer",
            VID,
            0x0140,
            &[Function {
                module: "usb_f_printer",
                instance: "printer.usb0",
                attrs: &[
                    ("pnp_string", b"MFG:lab;MDL:kinds;CMD:PS;"),
                    ("q_len", b"10"),
                ],
            }],
        )
    },
    setup: no_setup,
    check,
}];

fn check(ctx: &Ctx<'_>, checks: &mut Checks) {
    let (vid, pid, dev) = (ctx.gadget.vid, ctx.gadget.pid, ctx.dev.clone());
    let find = move || -> Result<PathBuf> {
        let node = sys::wait_for("an lp node under vhci_hcd", Duration::from_secs(10), || {
            usbdev::find_node("/sys/class/usbmisc", "lp", vid, pid, Via::Vhci)
        })?;
        Ok(Path::new("/dev/usb").join(node.file_name().unwrap_or_default()))
    };
    checks.check("a line each way", Duration::from_secs(30), move || {
        exchange(&find()?, 1)
    });
    checks.check("close and reopen", Duration::from_secs(30), move || {
        exchange(&find()?, 2)
    });
    checks.check("unbind/rebind usblp", Duration::from_secs(40), move || {
        let what = unbind_rebind(&dev, "usblp")?;
        Ok(Done::new(format!(
            "{what}; {}",
            exchange(&find()?, 3)?.text()
        )))
    });
}

/// The gadget's printer node (one printer function at a time in the lab).
fn gadget_node() -> Result<PathBuf> {
    fs::read_dir("/dev")?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("g_printer"))
        })
        .context("no /dev/g_printer* node")
}

/// A job line host -> printer, then a status line printer -> host.
fn exchange(lp: &Path, n: u32) -> Result<Done> {
    let gp = gadget_node()?;
    // f_printer allows one opener at a time: one descriptor, cloned for the reader.
    let mut gadget = OpenOptions::new().read(true).write(true).open(&gp)?;
    let mut host = OpenOptions::new().read(true).write(true).open(lp)?;
    let job = format!("lab-job-{n}\n");
    let got = read_line_after(&gadget, || host.write_all(job.as_bytes()))?;
    ensure!(
        got == job.as_bytes(),
        "the printer read {:?}, sent {job:?}",
        lossy(&got)
    );
    let status = format!("lab-status-{n}\n");
    let got = read_line_after(&host, || gadget.write_all(status.as_bytes()))?;
    ensure!(
        got == status.as_bytes(),
        "the host read {:?}, sent {status:?}",
        lossy(&got)
    );
    Ok(Done::new(format!(
        "{} <-> {}: a line each way",
        lp.display(),
        gp.display()
    )))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
