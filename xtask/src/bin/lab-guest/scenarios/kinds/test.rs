//! SourceSink and Loopback (`usb_f_ss_lb`), the functions of the kernel's gadget zero, with the
//! kernel's test driver `usbtest` on the client side: it binds and probes the endpoints it
//! expects (its probe line in dmesg) and survives an unbind and rebind. usbtest's own cases run
//! only through its `USBDEVFS_IOCTL`, which needs `testusb` (no Debian package ships it) or
//! unsafe code (the lab forbids it), so the data cases are ours, through usbfs ([`crate::usbfs`]):
//! the source's pattern read and checked, the sink fed the pattern, a wrong byte making the sink
//! halt its endpoint, the stall seen and cleared with CLEAR_FEATURE(ENDPOINT_HALT), and loopback
//! data returned byte for byte.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use nusb::transfer::TransferError;

use super::{Checks, Ctx, Done, Kind, no_setup, unbind_rebind};
use crate::gadget::{Function, Gadget};
use crate::sys;
use crate::usbfs::BulkPair;

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

const COVERS: &str = "usbtest binds and probes (dmesg); unbind/rebind; bulk data through usbfs (source pattern, sink, a stall and its clear; loopback byte-exact)";

/// Gadget zero's `pattern=1`: byte `i` of every packet is `i % 63`.
fn pattern_byte(offset: usize, packet: usize) -> u8 {
    ((offset % packet) % 63) as u8
}

/// Bytes per data case: 64 KiB, sixteen of loopback's 4 KiB requests.
const DATA_LEN: usize = 64 * 1024;

fn zero(name: &str, instance: &str) -> Result<Gadget> {
    Gadget::composite(
        name,
        GZ_VID,
        GZ_PID,
        &[Function {
            module: "usb_f_ss_lb",
            instance,
            attrs: if instance.starts_with("SourceSink") {
                &[("pattern", b"1")]
            } else {
                &[]
            },
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
    let dev3 = ctx.dev.clone();
    let source_sink = ctx.gadget.has_function("SourceSink");
    checks.check(
        "bulk data through usbfs",
        Duration::from_secs(60),
        move || {
            let mut pair = BulkPair::open(&dev3, 0)?;
            if source_sink {
                source_sink_data(&mut pair)
            } else {
                loopback_data(&mut pair)
            }
        },
    );
}

/// The source's pattern read and checked; the sink fed it; a wrong byte halts the sink, the
/// next write stalls, CLEAR_HALT clears it, and the sink takes data again.
fn source_sink_data(pair: &mut BulkPair) -> Result<Done> {
    let mps = pair.packet_size();
    let got = pair
        .read(DATA_LEN)
        .map_err(|e| anyhow!("reading the source: {e}"))?;
    ensure!(
        got.len() == DATA_LEN,
        "the source sent {} bytes of {DATA_LEN}",
        got.len()
    );
    if let Some(at) = (0..got.len()).find(|&i| got[i] != pattern_byte(i, mps)) {
        bail!(
            "the source's byte {at} is {:#04x}, not the pattern's",
            got[at]
        );
    }
    let good: Vec<u8> = (0..DATA_LEN).map(|i| pattern_byte(i, mps)).collect();
    let took = pair
        .write(&good)
        .map_err(|e| anyhow!("feeding the sink: {e}"))?;
    ensure!(took == DATA_LEN, "the sink took {took} bytes of {DATA_LEN}");
    // The sink checks every byte; a wrong one makes it halt its endpoint.
    let bad = vec![0xff; mps];
    let _ = pair.write(&bad);
    let stalled = (0..10).find_map(|_| match pair.write(&good[..mps]) {
        Err(TransferError::Stall) => Some(()),
        _ => None,
    });
    ensure!(
        stalled.is_some(),
        "the sink never stalled after a wrong byte"
    );
    pair.clear_out_halt()
        .context("CLEAR_FEATURE(ENDPOINT_HALT)")?;
    let took = pair
        .write(&good)
        .map_err(|e| anyhow!("feeding the sink after the clear: {e}"))?;
    ensure!(
        took == DATA_LEN,
        "after the clear the sink took {took} bytes"
    );
    Ok(Done::new(format!(
        "{} KiB of the source's pattern checked, {} KiB into the sink; a wrong byte stalled it, CLEAR_HALT cleared it",
        DATA_LEN / 1024,
        DATA_LEN / 1024
    )))
}

/// Data written to the loopback comes back byte for byte, in its 4 KiB requests.
fn loopback_data(pair: &mut BulkPair) -> Result<Done> {
    const CHUNK: usize = 4096;
    let sent: Vec<u8> = (0..DATA_LEN).map(|i| (i * 7 % 251) as u8).collect();
    let mut back = Vec::with_capacity(DATA_LEN);
    for chunk in sent.chunks(CHUNK) {
        pair.write(chunk)
            .map_err(|e| anyhow!("writing to the loopback: {e}"))?;
        back.extend(
            pair.read(CHUNK)
                .map_err(|e| anyhow!("reading it back: {e}"))?,
        );
    }
    ensure!(back == sent, "the loopback returned different bytes");
    Ok(Done::new(format!(
        "{} KiB written and read back byte-exact",
        DATA_LEN / 1024
    )))
}
