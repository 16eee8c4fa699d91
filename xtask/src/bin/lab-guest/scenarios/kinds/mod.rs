//! The device-kind conformance suite (issue 17): for every configfs function the lab kernel
//! ships, the gadget is imported through the kernel's own USB/IP and through ours, in the same
//! boot, and the same checks run on the client side each time: the real host class driver
//! binds, data crosses both ways and is compared, and the driver-lifecycle operations the
//! kind's users do (reopen a tty, take a link down and up, unbind and rebind the driver, a
//! stall and its clear) keep it working.
//!
//! Each kind and route ends in one `LAB-KIND {json}` line (the host turns a run's lines into
//! `kernel-notes/DEVICE-KINDS.md` and the README table) and `kind_<kind>_<route>_pass`
//! metrics. A family scenario fails when a kind passes through the kernel's USB/IP and fails
//! through ours; a kind that fails through the kernel's is noted, not hidden, and not ours to
//! fix. Kinds are split into families, one scenario each, so each stays within the lab's
//! per-scenario timeout and one family's hang cannot hide the others' results.

mod check;
mod composite;
mod hid;
mod import;
mod midi;
mod net;
mod printer;
mod serial;
mod storage;
mod test;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;

pub use check::{Checks, Done};
use import::Route;

use super::usbip::Usbipd;
use crate::gadget::Gadget;
use crate::report::{Skip, log, metric};
use crate::{modules, sys};

/// One device kind: how to build its gadget and what to check on the client side.
pub struct Kind {
    /// Short name, used in metric names and the table (`ecm`, `hid-keyboard`).
    pub name: &'static str,
    /// The configfs function(s) the gadget is made of.
    pub functions: &'static str,
    /// The host-side drivers expected to bind (names under /sys/bus/usb/drivers).
    pub drivers: &'static [&'static str],
    /// Host-side modules to load before the gadget is plugged.
    pub modules: &'static [&'static str],
    /// What the checks cover, for the table.
    pub covers: &'static str,
    /// Builds the (unplugged) gadget.
    pub gadget: fn() -> Result<Gadget>,
    /// Gadget-side set-up once the gadget is plugged (a network namespace, an open tty);
    /// what it returns is dropped after both routes.
    pub setup: fn(&Gadget) -> Result<Option<Guard>>,
    /// The kind's checks on the imported device.
    pub check: fn(&Ctx<'_>, &mut Checks),
}

/// Undoes a kind's gadget-side set-up when dropped.
pub struct Guard(Option<Box<dyn FnOnce()>>);

impl Guard {
    /// Runs `undo` on drop.
    pub fn new(undo: impl FnOnce() + 'static) -> Guard {
        Guard(Some(Box::new(undo)))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(undo) = self.0.take() {
            undo();
        }
    }
}

/// No gadget-side set-up.
pub fn no_setup(_: &Gadget) -> Result<Option<Guard>> {
    Ok(None)
}

/// What a kind's checks get: the gadget and the imported device.
pub struct Ctx<'a> {
    /// The gadget (its function directories name gadget-side nodes).
    pub gadget: &'a Gadget,
    /// The device's sysfs directory under vhci_hcd.
    pub dev: PathBuf,
}

/// Runs every kind of `kinds`, both routes; fails if ours fails where the kernel's passed.
pub fn run_family(family: &str, kinds: &[&Kind]) -> Result<()> {
    modules::load(modules::USBIP)?;
    modules::load(modules::GADGET)?;
    let _usbipd = Usbipd::start()?;
    let mut regressions = Vec::new();
    for kind in kinds {
        let results = run_kind(kind);
        let [kernel, ours] = &results;
        match (kernel, ours) {
            (Some(Ok(())), Some(Err(why))) if known_gap(kind.name, why) => log!(
                "kinds: KNOWN {} fails through ours (kernel-notes/LAB.md, known findings): {why}",
                kind.name
            ),
            (Some(Ok(())), Some(Err(why))) => regressions.push(format!("{}: {why}", kind.name)),
            (Some(Err(why)), _) => {
                log!(
                    "kinds: NOTE {} fails through the kernel's own USB/IP: {why}",
                    kind.name
                )
            }
            _ => {}
        }
    }
    if !regressions.is_empty() {
        bail!(
            "{family}: through ours but not through the kernel's USB/IP, failed: {}",
            regressions.join("; ")
        );
    }
    Ok(())
}

/// Failures through ours that are understood but not fixed yet, each documented in
/// kernel-notes/LAB.md: they stay red in the tables but do not fail the run. Keep this short.
fn known_gap(_kind: &str, why: &str) -> bool {
    // Under the lab's load the QUIC connection is sometimes lost during a network kind's
    // driver rebind or stream (no packet for the idle timeout; seen on ECM, ECM subset and EEM;
    // CI's one NCM stream stall may be the same), and the import ends with it. Only failures where the server's log shows
    // that loss are exempt; any other failure through ours fails the run.
    why.ends_with(CONNECTION_LOST)
}

/// Both routes of one kind: `[kernel, ours]`, `None` when skipped.
fn run_kind(kind: &Kind) -> [Option<Result<(), String>>; 2] {
    log!("kinds: === {} ({}) ===", kind.name, kind.functions);
    let prepared = (|| -> Result<(Gadget, Option<Guard>)> {
        modules::load(kind.modules)?;
        let mut g = (kind.gadget)()?;
        g.plug()?;
        // Set-up comes before enumeration: OBEX connects only once its tty is open.
        let guard = (kind.setup)(&g)?;
        g.wait_enumerated(Duration::from_secs(15))?;
        Ok((g, guard))
    })();
    let (g, guard) = match prepared {
        Ok(x) => x,
        Err(e) => {
            let skipped = e.downcast_ref::<Skip>().map(|s| s.0.clone());
            let why = skipped.clone().unwrap_or_else(|| format!("{e:#}"));
            let kmsg = kernel_log();
            let notes: Vec<String> = kmsg[kmsg.len().saturating_sub(8)..]
                .iter()
                .map(|l| format!("dmesg: {l}"))
                .collect();
            for n in &notes {
                log!("kinds: {}: {n}", kind.name);
            }
            for route in [Route::Kernel, Route::Ours] {
                let mut checks = Checks::default();
                checks.fail("gadget", why.clone());
                emit(kind, route, &checks, skipped.is_some(), 0.0, notes.clone());
            }
            return match skipped {
                Some(_) => [None, None],
                None => [Some(Err(why.clone())), Some(Err(why))],
            };
        }
    };
    let out = [Route::Kernel, Route::Ours].map(|route| Some(run_route(kind, &g, route)));
    drop(guard);
    drop(g);
    out
}

/// Imports the gadget over `route`, runs the kind's checks, releases it, reports.
fn run_route(kind: &Kind, g: &Gadget, route: Route) -> Result<(), String> {
    let started = Instant::now();
    let kmsg_from = kernel_log().len();
    let mut checks = Checks::default();
    match import::import(route, g) {
        Err(e) => checks.fail("import", format!("{e:#}")),
        Ok(imported) => {
            let ctx = Ctx {
                gadget: g,
                dev: imported.dev.clone(),
            };
            descriptors(&ctx, &mut checks);
            for driver in kind.drivers {
                driver_binds(&ctx, &mut checks, driver);
            }
            (kind.check)(&ctx, &mut checks);
            if let Err(e) = imported.release() {
                checks.fail("detach", format!("{e:#}"));
            }
        }
    }
    // Our daemons' logs, read once: `(who, text)`, none for the kernel's route.
    let logs: Vec<(&str, String)> = match route {
        Route::Ours => [
            ("server", "/tmp/server.log"),
            ("client", "/tmp/client-friend.log"),
        ]
        .into_iter()
        .map(|(who, file)| (who, fs::read_to_string(file).unwrap_or_default()))
        .collect(),
        Route::Kernel => Vec::new(),
    };
    // Passing or not: a daemon whose runtime stalled says so (transport::daemon), and a stall
    // near the idle timeout is what costs a connection here; and which network paths the
    // connection took. A path onto the attached adapter's own address would run the connection
    // through the adapter it carries: both daemons leave such interfaces out of what they offer
    // (transport::tunneled), so one is a failure.
    let onto_adapter = format!("to=direct {}:", net::HOST_IP);
    for (who, text) in &logs {
        for l in text.lines() {
            if l.contains("did not run") {
                log!("kinds: {} {who} stalled: {}", kind.name, strip_ansi(l));
            } else if l.contains("path changed") {
                log!("kinds: {} {who} path: {}", kind.name, strip_ansi(l));
                if l.contains(&onto_adapter) {
                    checks.fail(
                        "no path over the adapter",
                        format!(
                            "the connection moved onto {}: {}",
                            net::HOST_IP,
                            strip_ansi(l)
                        ),
                    );
                }
            }
        }
    }
    let mut notes = Vec::new();
    if !checks.passed() {
        let kmsg = kernel_log();
        let new: Vec<&String> = kmsg[kmsg_from.min(kmsg.len())..].iter().collect();
        notes.extend(
            new[new.len().saturating_sub(8)..]
                .iter()
                .map(|l| format!("dmesg: {l}")),
        );
        for (who, text) in &logs {
            notes.extend(log_problems(text, who));
        }
        for n in &notes {
            log!("kinds: {} {}: {n}", kind.name, route.name());
        }
        // The console gets the daemons' last lines too (timestamps to set beside dmesg's):
        // whether a daemon stalled, lost its connection or ended a stream, and when.
        for (who, text) in &logs {
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines[lines.len().saturating_sub(15)..] {
                log!("kinds: {} {who} log: {}", kind.name, strip_ansi(l));
            }
        }
    }
    emit(
        kind,
        route,
        &checks,
        false,
        started.elapsed().as_secs_f64(),
        notes,
    );
    let lost = logs
        .iter()
        .any(|(who, text)| *who == "server" && text.contains("connection lost"));
    match checks.reason() {
        None => Ok(()),
        Some(why) if lost => Err(format!("{why}; {CONNECTION_LOST}")),
        Some(why) => Err(why.to_owned()),
    }
}

/// What a failure through ours says when the server lost the QUIC connection meanwhile.
const CONNECTION_LOST: &str = "the server lost the connection (idle timeout) meanwhile";

/// Prints the `LAB-KIND` line and the metrics of one kind through one route.
fn emit(kind: &Kind, route: Route, checks: &Checks, skipped: bool, secs: f64, notes: Vec<String>) {
    let status = if skipped {
        "skip"
    } else if checks.passed() {
        "pass"
    } else {
        "fail"
    };
    let figures: serde_json::Map<String, serde_json::Value> = checks
        .figures()
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    let line = json!({
        "kind": kind.name,
        "functions": kind.functions,
        "drivers": kind.drivers,
        "covers": kind.covers,
        "route": route.name(),
        "status": status,
        "reason": checks.reason(),
        "checks": checks.list(),
        "figures": figures,
        "secs": (secs * 10.0).round() / 10.0,
        "notes": notes,
    });
    println!("{}", xtask::format_line(xtask::tag::KIND, &line));
    let prefix = format!("kind_{}_{}", kind.name.replace('-', "_"), route.name());
    if !skipped {
        metric(
            &format!("{prefix}_pass"),
            f64::from(u8::from(checks.passed())),
        );
    }
    for (k, v) in checks.figures() {
        metric(&format!("{prefix}_{k}"), *v);
    }
}

/// The raw descriptors the client side read through the route equal the gadget's own.
fn descriptors(ctx: &Ctx<'_>, checks: &mut Checks) {
    let (vid, pid) = (ctx.gadget.vid, ctx.gadget.pid);
    let remote = ctx.dev.join("descriptors");
    checks.check("descriptors", Duration::from_secs(5), move || {
        let local = crate::usbdev::find_usb_device(vid, pid, crate::usbdev::Via::Dummy)
            .map(|d| d.join("descriptors"));
        let local = fs::read(local.unwrap_or_default())?;
        let remote = fs::read(&remote)?;
        anyhow::ensure!(
            local == remote,
            "the client side read {} bytes of descriptors, the gadget has {} (differ)",
            remote.len(),
            local.len()
        );
        Ok(Done::new(format!("{} bytes identical", remote.len())))
    });
}

/// `driver` binds one of the device's interfaces within 15 s.
fn driver_binds(ctx: &Ctx<'_>, checks: &mut Checks, driver: &'static str) {
    let dev = ctx.dev.clone();
    checks.check(
        &format!("{driver} binds"),
        Duration::from_secs(20),
        move || {
            let iface = sys::wait_for(
                &format!("{driver} to bind an interface"),
                Duration::from_secs(15),
                || interface_bound(&dev, driver),
            )?;
            Ok(Done::new(iface))
        },
    );
}

/// The first interface of `dev` (`3-1:1.0`) bound to `driver`.
pub fn interface_bound(dev: &Path, driver: &str) -> Option<String> {
    interfaces_bound(dev, driver).into_iter().next()
}

/// Every interface of `dev` bound to `driver`, in order.
fn interfaces_bound(dev: &Path, driver: &str) -> Vec<String> {
    let name = dev.file_name().unwrap_or_default().to_string_lossy();
    let mut found: Vec<String> = fs::read_dir(dev)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{name}:")))
        .filter(|n| {
            fs::read_link(dev.join(n).join("driver"))
                .is_ok_and(|d| d.file_name().is_some_and(|f| f == driver))
        })
        .collect();
    found.sort();
    found
}

/// Unbinds `driver` from every interface of `dev` it holds, then binds it to the first
/// again through sysfs, as an administrator (or a hot-plug daemon) does; waits until it is
/// bound again. The caller checks the device works afterwards.
pub fn unbind_rebind(dev: &Path, driver: &str) -> Result<String> {
    let held = interfaces_bound(dev, driver);
    let Some(first) = held.first().cloned() else {
        bail!("{driver} holds no interface of {}", dev.display());
    };
    let drv = Path::new("/sys/bus/usb/drivers").join(driver);
    // Unbinding the interface a driver probed releases the ones it claimed with it (a CDC
    // data interface); whatever is still bound after that is unbound on its own.
    sys::write(drv.join("unbind"), &first)?;
    for iface in interfaces_bound(dev, driver) {
        sys::write(drv.join("unbind"), &iface)?;
    }
    sys::wait_for(
        &format!("{driver} to let go of {first}"),
        Duration::from_secs(5),
        || interfaces_bound(dev, driver).is_empty().then_some(()),
    )?;
    sys::write(drv.join("bind"), &first)?;
    sys::wait_for(
        &format!("{driver} to bind {first} again"),
        Duration::from_secs(10),
        || interface_bound(dev, driver).filter(|i| *i == first),
    )?;
    Ok(format!("{first} unbound and bound again"))
}

/// The kernel log, one entry a line.
fn kernel_log() -> Vec<String> {
    sys::bb("dmesg")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The last warnings, errors and panics in one of our daemons' logs.
fn log_problems(text: &str, who: &str) -> Vec<String> {
    let all: Vec<&str> = text.lines().collect();
    let mut lines: Vec<String> = Vec::new();
    for (i, l) in all.iter().enumerate() {
        if l.contains("WARN") || l.contains("ERROR") || l.contains("panicked") {
            lines.push(format!("{who}: {}", strip_ansi(l)));
        }
        // A panic's message is on the line after the location.
        if l.contains("panicked")
            && let Some(next) = all.get(i + 1)
        {
            lines.push(format!("{who}: {}", strip_ansi(next)));
        }
    }
    let keep = lines.len().saturating_sub(6);
    lines.drain(..keep);
    lines
}

/// Log lines without terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `kinds-serial`: CDC ACM, generic serial, OBEX.
pub fn serial() -> Result<()> {
    run_family("kinds-serial", &serial::KINDS.iter().collect::<Vec<_>>())
}

/// `kinds-net`: ECM, ECM subset, EEM.
pub fn net_cdc() -> Result<()> {
    run_family("kinds-net", &net::CDC.iter().collect::<Vec<_>>())
}

/// `kinds-net2`: NCM, RNDIS.
pub fn net_more() -> Result<()> {
    run_family("kinds-net2", &net::MORE.iter().collect::<Vec<_>>())
}

/// `kinds-misc`: HID keyboard and mouse, printer, MIDI.
pub fn misc() -> Result<()> {
    let kinds: Vec<&Kind> = hid::KINDS
        .iter()
        .chain(printer::KINDS)
        .chain(midi::KINDS)
        .collect();
    run_family("kinds-misc", &kinds)
}

/// `kinds-storage`: mass storage with two LUNs, SourceSink, Loopback, a composite.
pub fn storage() -> Result<()> {
    let kinds: Vec<&Kind> = storage::KINDS
        .iter()
        .chain(test::KINDS)
        .chain(composite::KINDS)
        .collect();
    run_family("kinds-storage", &kinds)
}

/// Starts reading a line from `from`, runs `send`, returns the line (10 s at most).
pub fn read_line_after(
    from: &std::fs::File,
    send: impl FnOnce() -> std::io::Result<()>,
) -> Result<Vec<u8>> {
    let mut reader = from.try_clone()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while !got.ends_with(b"\n") {
            match std::io::Read::read(&mut reader, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = tx.send(got);
    });
    send()?;
    anyhow::Context::context(
        rx.recv_timeout(Duration::from_secs(10)),
        "no line arrived within 10 s",
    )
}
