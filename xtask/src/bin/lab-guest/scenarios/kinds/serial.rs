//! Serial kinds: CDC ACM (`cdc_acm`), the generic serial function (`usbserial_generic`, which
//! binds only to the ids it is told) and CDC OBEX (no Linux host driver). Lines cross the
//! tty both ways; the tty is closed and reopened (the driver kills and resubmits its URBs, and
//! ACM drops and raises DTR); the driver is unbound and bound again.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::{Checks, Ctx, Done, Kind, no_setup, read_line_after, unbind_rebind};
use crate::gadget::{Function, Gadget, VID};
use crate::sys;
use crate::usbdev::{self, Via};

/// Product id of the generic serial gadget; `usbserial` is loaded with it as its `product`.
const PID_GSER: u16 = 0x0111;

/// The serial family.
pub const KINDS: &[Kind] = &[
    Kind {
        name: "acm",
        functions: "acm",
        drivers: &["cdc_acm"],
        modules: &["cdc-acm"],
        covers: "tty lines both ways; close and reopen; unbind/rebind",
        gadget: || one("kind-acm", 0x0110, "usb_f_acm", "acm.usb0"),
        setup: no_setup,
        check: |ctx, checks| tty_checks(ctx, checks, "ttyACM", "cdc_acm", "acm.usb0"),
    },
    Kind {
        name: "serial",
        functions: "gser",
        drivers: &["usbserial_generic"],
        modules: &[],
        covers: "tty lines both ways; close and reopen; unbind/rebind",
        gadget: generic_serial,
        setup: no_setup,
        check: |ctx, checks| tty_checks(ctx, checks, "ttyUSB", "usbserial_generic", "gser.usb0"),
    },
    Kind {
        name: "obex",
        functions: "obex",
        drivers: &[],
        modules: &[],
        covers: "enumerates (once the gadget's tty is open) with its CDC OBEX interface; no Linux host driver, so no data",
        gadget: || one("kind-obex", 0x0112, "usb_f_obex", "obex.usb0"),
        setup: hold_obex_tty,
        check: obex,
    },
];

/// A gadget of one function and no attributes.
pub fn one(name: &str, pid: u16, module: &str, instance: &str) -> Result<Gadget> {
    Gadget::composite(
        name,
        VID,
        pid,
        &[Function {
            module,
            instance,
            attrs: &[],
        }],
    )
}

/// The generic serial gadget. `usbserial`'s generic driver binds only to the one vid:pid its
/// module parameters name, so it is loaded here with this gadget's.
fn generic_serial() -> Result<Gadget> {
    crate::modules::load(crate::modules::GADGET)?;
    if !Path::new("/sys/module/usbserial").exists() {
        sys::run(sys::bb("modprobe").args([
            "usbserial",
            &format!("vendor={VID:#06x}"),
            &format!("product={PID_GSER:#06x}"),
        ]))?;
    }
    one("kind-gser", PID_GSER, "usb_f_serial", "gser.usb0")
}

/// The gadget-side tty of a serial function: `/dev/ttyGS<port_num>`.
pub fn gadget_tty(g: &Gadget, instance: &str) -> Result<PathBuf> {
    let port = sys::read(g.function_dir(instance).join("port_num"))?;
    Ok(PathBuf::from(format!("/dev/ttyGS{port}")))
}

/// The checks of a tty kind: host node `prefix*` bound to `driver`, gadget function `instance`.
pub fn tty_checks(
    ctx: &Ctx<'_>,
    checks: &mut Checks,
    prefix: &'static str,
    driver: &'static str,
    instance: &str,
) {
    let gs = match gadget_tty(ctx.gadget, instance) {
        Ok(gs) => gs,
        Err(e) => return checks.fail("gadget tty", format!("{e:#}")),
    };
    let (vid, pid, dev) = (ctx.gadget.vid, ctx.gadget.pid, ctx.dev.clone());
    let find = move || {
        sys::wait_for(
            &format!("a {prefix} tty under vhci_hcd"),
            Duration::from_secs(10),
            || usbdev::find_node("/sys/class/tty", prefix, vid, pid, Via::Vhci),
        )
    };
    let (gs1, gs2, gs3) = (gs.clone(), gs.clone(), gs);
    checks.check("tty lines both ways", Duration::from_secs(30), move || {
        exchange(&find()?, &gs1, 1)
    });
    checks.check("close and reopen", Duration::from_secs(30), move || {
        let tty = find()?;
        for _ in 0..2 {
            drop(File::open(&tty)?);
        }
        exchange(&tty, &gs2, 2)
    });
    checks.check(
        &format!("unbind/rebind {driver}"),
        Duration::from_secs(40),
        move || {
            let what = unbind_rebind(&dev, driver)?;
            let after = exchange(&find()?, &gs3, 3)?;
            Ok(Done::new(format!("{what}; {}", after.text())))
        },
    );
}

/// Opens both ends, makes them raw, sends a line host -> gadget and one gadget -> host.
pub fn exchange(host: &Path, gadget: &Path, n: u32) -> Result<Done> {
    let open = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .with_context(|| format!("opening {}", p.display()))
    };
    let mut h = open(host)?;
    let mut g = open(gadget)?;
    for p in [host, gadget] {
        sys::run(sys::bb("stty").args(["-F", &p.to_string_lossy(), "raw", "-echo"]))?;
    }
    let down = format!("lab-h2g-{n}\n");
    let up = format!("lab-g2h-{n}\n");
    let got = send_line(&mut h, &g, down.as_bytes())
        .with_context(|| format!("{} -> {}", host.display(), gadget.display()))?;
    ensure!(
        got == down.as_bytes(),
        "sent {down:?}, got {:?}",
        lossy(&got)
    );
    let got = send_line(&mut g, &h, up.as_bytes())
        .with_context(|| format!("{} -> {}", gadget.display(), host.display()))?;
    ensure!(got == up.as_bytes(), "sent {up:?}, got {:?}", lossy(&got));
    Ok(Done::new(format!(
        "{} <-> {}: a line each way",
        host.display(),
        gadget.display()
    )))
}

/// Writes `line` to `to` and reads a line from `from` within 10 s.
fn send_line(to: &mut File, from: &File, line: &[u8]) -> Result<Vec<u8>> {
    read_line_after(from, || to.write_all(line))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// f_obex keeps the gadget disconnected (`usb_function_deactivate`) until its tty is open,
/// as an OBEX server would hold it: open it for as long as the kind runs.
fn hold_obex_tty(g: &Gadget) -> Result<Option<super::Guard>> {
    let gs = gadget_tty(g, "obex.usb0")?;
    let tty = File::open(&gs).with_context(|| format!("opening {}", gs.display()))?;
    Ok(Some(super::Guard::new(move || drop(tty))))
}

/// OBEX: the client side sees the CDC OBEX interface (class 2, subclass 0x0b) and its data
/// interface; the gadget has its tty. Linux has no host driver for it (OBEX clients use
/// libusb), so nothing binds and no data is checked.
fn obex(ctx: &Ctx<'_>, checks: &mut Checks) {
    let dev = ctx.dev.clone();
    let gs = gadget_tty(ctx.gadget, "obex.usb0");
    checks.check("CDC OBEX interface", Duration::from_secs(5), move || {
        let name = dev.file_name().unwrap_or_default().to_string_lossy();
        let found = (0..4).any(|i| {
            let iface = dev.join(format!("{name}:1.{i}"));
            sys::read(iface.join("bInterfaceClass")).is_ok_and(|c| c == "02")
                && sys::read(iface.join("bInterfaceSubClass")).is_ok_and(|c| c == "0b")
        });
        ensure!(found, "no interface of class 02 subclass 0b");
        let gs = gs?;
        ensure!(gs.exists(), "the gadget has no {}", gs.display());
        Ok(Done::new(format!(
            "class 02/0b interface; gadget tty {}",
            gs.display()
        )))
    });
}
