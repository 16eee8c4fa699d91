//! QEMU's own USB devices on a real (emulated) host controller, through our tunnel: what
//! `dummy_hcd` cannot give the lab. A SuperSpeed disk, an FTDI serial adapter, a keyboard,
//! and a surprise removal that comes from outside the guest (QMP `device_del`), each against
//! the guest's real class drivers on both ends. The host plugs and pulls the devices when a
//! scenario asks (`crate::host`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use xtask::qemu_usb::{self, QemuDevice};

use super::faults::unplug_during_dd;
use super::hid::key_events;
use super::project::{
    Daemon, attach_disk, client, client_id, detach_and_wait, show_client_log, show_server_log,
    spawn_client, start_server, stop_supervisor, vhci_ports_in_use, wait_listed, wait_readable,
};
use super::usbip::{Attached, Usbipd};
use crate::bench::{self, MIB};
use crate::report::{log, metric};
use crate::usbdev::{self, Via};
use crate::{host, modules, sys};

/// Read through each route, of the 96 MiB disk.
const DISK_READ: usize = 64 * MIB;
/// Written through our route and read back.
const DISK_WRITE: usize = 16 * MIB;
/// Checked byte-exact after the unplug scenario's re-attach.
const REATTACH_CHECK: usize = 4 * MIB;
/// Bytes sent each way through the serial adapter.
const SERIAL_BYTES: usize = 64 * 1024;
/// A baud rate no driver defaults to, so seeing it in QEMU proves the request crossed.
const BAUD: u32 = 57600;

/// A QEMU device plugged for one scenario, pulled out again when the scenario ends however it
/// ends, so the next scenario finds the bus as it was.
pub(super) struct Plugged {
    pub(super) device: &'static QemuDevice,
    /// Its sysfs directory on the guest's xHCI.
    sysfs: PathBuf,
}

impl Plugged {
    /// Plugs `name` and waits until the guest enumerated it on the xHCI.
    pub(super) fn new(name: &str) -> Result<Plugged> {
        let device = host::plug(name)?;
        let sysfs = wait_on_xhci(device)?;
        Ok(Plugged { device, sysfs })
    }

    /// `vid:pid`, as `--share` and `--device` take it.
    pub(super) fn vid_pid(&self) -> String {
        format!("{:04x}:{:04x}", self.device.vid, self.device.pid)
    }

    /// Its bus id (`3-1`), as usbip takes it.
    pub(super) fn busid(&self) -> String {
        self.sysfs
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Plugged {
    fn drop(&mut self) {
        if let Err(e) = host::unplug(self.device.name) {
            log!("could not pull {} at the end: {e:#}", self.device.name);
        }
    }
}

/// Waits for `device` to enumerate on the guest's xHCI; its sysfs directory.
fn wait_on_xhci(device: &QemuDevice) -> Result<PathBuf> {
    sys::wait_for(
        &format!("QEMU's {} to enumerate on the xHCI", device.name),
        Duration::from_secs(15),
        || usbdev::find_usb_device(device.vid, device.pid, Via::Xhci),
    )
}

/// The host controller and the class drivers every scenario here needs.
pub(super) fn load(extra: &[&str]) -> Result<()> {
    modules::load(modules::USBIP)?;
    modules::load(modules::XHCI)?;
    modules::load(extra)
}

/// Our server sharing `vid_pids` to the client `friend`; its ticket.
pub(super) fn serve(vid_pids: &[&str]) -> Result<(Daemon, String)> {
    let friend = client_id("friend")?;
    let mut args = vec!["--allow", friend.as_str()];
    for v in vid_pids {
        args.extend(["--share", v]);
    }
    let (server, ticket) = start_server(&args)?;
    for v in vid_pids {
        wait_listed("friend", &ticket, v)?;
    }
    Ok((server, ticket))
}

/// A SuperSpeed disk: the kernel's USB/IP as the anchor, then ours, 64 MiB byte-exact each,
/// a write read back, and the disk given back on detach.
pub fn disk() -> Result<()> {
    load(modules::STORAGE)?;
    let ssd = Plugged::new("ssd")?;
    let speed = sys::read(ssd.sysfs.join("speed"))?;
    ensure!(
        speed == "5000",
        "QEMU's disk enumerated at {speed} Mb/s, expected 5000"
    );
    let (vid, pid) = (ssd.device.vid, ssd.device.pid);
    let local = usbdev::wait_block_device(vid, pid, Via::Xhci, Duration::from_secs(15))?;
    let pattern = Path::new("/tmp/xhci-disk.bin");
    bench::pattern_file(pattern, DISK_READ, 0x55)?;
    let wrote = bench::copy_to_device(pattern, &local)?;
    log!(
        "QEMU's disk is {} at 5000 Mb/s; wrote a 64 MiB pattern at {wrote:.1} MiB/s",
        local.display()
    );

    // The anchor: the same device through the kernel's own USB/IP, in this boot.
    let kernel = {
        let _usbipd = Usbipd::start()?;
        let _attached = Attached::import(&ssd.busid())?;
        let disk = usbdev::wait_block_device(vid, pid, Via::Vhci, Duration::from_secs(20))
            .context("the kernel's USB/IP did not import QEMU's disk")?;
        vhci_speed_is_5000(vid, pid)?;
        bench::read_verify_mib_s(&disk, DISK_READ, pattern)
            .context("reading through the kernel's USB/IP")?
    };
    log!("kernel USB/IP: read 64 MiB byte-exact at {kernel:.1} MiB/s, on a SuperSpeed port");
    metric("kernel_read_mib_s", kernel);
    usbdev::wait_block_device(vid, pid, Via::Xhci, Duration::from_secs(20))
        .context("after usbip detach the disk did not come back locally")?;

    let (mut server, ticket) = serve(&[&ssd.vid_pid()])?;
    let (mut attached, disk) = attach_disk("friend", &ticket, &ssd.vid_pid(), vid, pid)?;
    vhci_speed_is_5000(vid, pid)?;
    let ours = bench::read_verify_mib_s(&disk, DISK_READ, pattern).inspect_err(|_| {
        show_client_log("friend");
        show_server_log();
    })?;
    log!("our tunnel: read 64 MiB byte-exact at {ours:.1} MiB/s, on a SuperSpeed port");
    metric("read_mib_s", ours);
    metric("read_vs_kernel", ours / kernel);
    let write = bench::write_mib_s(&disk, DISK_WRITE)?;
    let written = Path::new("/tmp/xhci-written.bin");
    bench::written_pattern(written, DISK_WRITE)?;
    bench::read_verify_mib_s(&disk, DISK_WRITE, written)
        .context("16 MiB written then read back differ")?;
    log!("wrote 16 MiB at {write:.1} MiB/s, read back byte-exact");
    metric("write_mib_s", write);

    detach_and_wait("friend", &mut attached)?;
    let local = usbdev::wait_block_device(vid, pid, Via::Xhci, Duration::from_secs(20))
        .context("after detach QEMU's disk did not come back as a local disk")?;
    ensure!(
        bench::md5(&local, Some(DISK_WRITE))? == bench::md5(written, None)?,
        "the write did not reach QEMU's disk"
    );
    let (used, status) = vhci_ports_in_use()?;
    ensure!(
        used == 0,
        "a vhci port is still in use after detach:\n{status}"
    );
    ensure!(server.alive(), "the server died");
    log!("detached: the disk is local again with the written data");
    Ok(())
}

/// The imported device's speed under vhci is SuperSpeed.
fn vhci_speed_is_5000(vid: u16, pid: u16) -> Result<()> {
    let dev = usbdev::find_usb_device(vid, pid, Via::Vhci).context("no device under vhci")?;
    let speed = sys::read(dev.join("speed"))?;
    ensure!(
        speed == "5000",
        "imported at {speed} Mb/s, expected 5000 (a SuperSpeed port)"
    );
    Ok(())
}

/// An FTDI adapter: 64 KiB each way through `ftdi_sio` and the host's echo, byte-exact, and a
/// baud-rate change (a vendor control request) seen by QEMU.
pub fn serial() -> Result<()> {
    load(modules::FTDI)?;
    let ftdi = Plugged::new("ftdi")?;
    let (vid, pid) = (ftdi.device.vid, ftdi.device.pid);
    let (mut server, ticket) = serve(&[&ftdi.vid_pid()])?;
    let mut attached = spawn_client("friend", &["attach", &ticket, "--device", &ftdi.vid_pid()])?;
    let tty = sys::wait_for(
        "a ttyUSB of the adapter under vhci_hcd",
        Duration::from_secs(30),
        || usbdev::find_node("/sys/class/tty", "ttyUSB", vid, pid, Via::Vhci),
    )
    .inspect_err(|_| show_client_log("friend"))?;
    log!(
        "QEMU's FTDI adapter is {} through the tunnel",
        tty.display()
    );

    host::serial_reset()?;
    let port = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&tty)
        .with_context(|| format!("opening {}", tty.display()))?;
    // Raw, no flow control, and reads that give up after 1 s of silence.
    let baud = BAUD.to_string();
    let tty_arg = tty.to_string_lossy();
    sys::run(sys::bb("stty").args([
        "-F", &tty_arg, "raw", "-echo", "-crtscts", &baud, "min", "0", "time", "10",
    ]))?;
    let seen = sys::wait_for(
        "QEMU to see the new baud rate",
        Duration::from_secs(10),
        || {
            host::serial_stats()
                .ok()
                .and_then(|s| s.baud)
                // An FTDI divisor only approximates a rate (57600 is 57553); ftdi_sio accepts 3 %.
                .filter(|b| b.abs_diff(u64::from(BAUD)) * 100 <= 3 * u64::from(BAUD))
        },
    )
    .context("the baud-rate request did not reach QEMU's adapter")?;
    log!("stty {BAUD}: QEMU's adapter was set to {seen} baud");

    let data: Vec<u8> = {
        let mut x: u32 = 0x1234_5678;
        (0..SERIAL_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    };
    let t = Instant::now();
    let echoed = exchange(&port, &data).inspect_err(|_| {
        show_client_log("friend");
        show_server_log();
    })?;
    let secs = t.elapsed().as_secs_f64();
    if echoed != data {
        let at = echoed.iter().zip(&data).take_while(|(a, b)| a == b).count();
        bail!(
            "the echo differs from what was sent at byte {at} of {} (got {} bytes)",
            data.len(),
            echoed.len()
        );
    }
    let stats = host::serial_stats()?;
    ensure!(
        stats.bytes == SERIAL_BYTES as u64
            && stats.fnv == qemu_usb::fnv1a(qemu_usb::FNV_START, &data),
        "the host's end received {} bytes (hash {:x}), not the {SERIAL_BYTES} sent",
        stats.bytes,
        stats.fnv
    );
    let kib_s = (2 * SERIAL_BYTES) as f64 / 1024.0 / secs;
    log!("64 KiB each way through ftdi_sio and the tunnel, byte-exact, in {secs:.1}s");
    metric("serial_kib_s_both_ways", kib_s);

    drop(port);
    detach_and_wait("friend", &mut attached)?;
    ensure!(server.alive(), "the server died");
    Ok(())
}

/// Writes `data` to the tty from a thread while reading the echo here; what came back. Stops
/// at the length sent or after a deadline.
fn exchange(port: &File, data: &[u8]) -> Result<Vec<u8>> {
    let mut writer = port.try_clone()?;
    let out = data.to_vec();
    let sent = std::thread::spawn(move || writer.write_all(&out));
    let mut reader = port.try_clone()?;
    let mut got = Vec::with_capacity(data.len());
    let deadline = Duration::from_secs(120).mul_f64(sys::pace());
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while got.len() < data.len() && start.elapsed() < deadline {
        let n = reader.read(&mut buf)?;
        got.extend_from_slice(&buf[..n]);
    }
    if got.len() < data.len() {
        bail!(
            "only {} of {} bytes came back within {:.0} s",
            got.len(),
            data.len(),
            deadline.as_secs_f64()
        );
    }
    match sent.join() {
        Ok(r) => r.context("writing to the tty")?,
        Err(_) => bail!("the writer thread panicked"),
    }
    Ok(got)
}

/// QMP `device_del` of the disk under a `dd` on the client: the disk goes within 1 s, nothing
/// hangs, the server keeps serving its keyboard; plugged again, `client run` re-attaches it.
pub fn unplug() -> Result<()> {
    load(&[modules::STORAGE, modules::HID].concat())?;
    let ssd = Plugged::new("ssd")?;
    let kbd = Plugged::new("kbd")?;
    let (vid, pid) = (ssd.device.vid, ssd.device.pid);
    let local = usbdev::wait_block_device(vid, pid, Via::Xhci, Duration::from_secs(15))?;
    let pattern = Path::new("/tmp/xhci-unplug.bin");
    bench::pattern_file(pattern, REATTACH_CHECK, 0x3c)?;
    bench::copy_to_device(pattern, &local)?;
    let want = bench::md5(pattern, None)?;

    let (mut server, ticket) = serve(&[&ssd.vid_pid(), &kbd.vid_pid()])?;
    let config = Path::new("/tmp/client-xhci.toml");
    std::fs::write(
        config,
        format!(
            "[servers.lab]\nticket = \"{ticket}\"\n\n[[auto_attach]]\nserver = \"lab\"\n\
             device = \"{}\"\n\n[reconnect]\ninitial_ms = 200\nmax_ms = 2000\n",
            ssd.vid_pid()
        ),
    )?;
    let supervisor = spawn_client("friend", &["--config", &config.to_string_lossy(), "run"])?;
    let disk = wait_readable(vid, pid, &want, REATTACH_CHECK, Duration::from_secs(40))?;
    log!("auto-attached QEMU's disk as {}", disk.display());

    let gone = unplug_during_dd(&disk, || host::unplug("ssd"))?;
    metric("qmp_unplug_to_disk_gone_secs", gone);
    ensure!(
        server.alive(),
        "the server died when QEMU pulled its device"
    );
    let (ok, out, err) = client("friend", &["--json", "list", &ticket])?;
    ensure!(ok, "list after the unplug failed: {err}");
    ensure!(
        out.contains(&kbd.vid_pid()) && !out.contains(&ssd.vid_pid()),
        "after the unplug the server should list the keyboard and not the disk: {out}"
    );
    log!("the server still serves the keyboard and no longer lists the disk");

    host::plug("ssd")?;
    let replugged = Instant::now();
    wait_on_xhci(ssd.device)?;
    let disk = wait_readable(vid, pid, &want, REATTACH_CHECK, Duration::from_secs(40))
        .context("`client run` did not attach the replugged disk")?;
    let secs = replugged.elapsed().as_secs_f64();
    log!(
        "replugged: auto-attached again as {} and read byte-exact {secs:.2}s after device_add",
        disk.display()
    );
    metric("replug_to_reattached_secs", secs);
    let (used, status) = vhci_ports_in_use()?;
    ensure!(used == 1, "{used} vhci ports in use, want 1:\n{status}");
    stop_supervisor(supervisor);
    ensure!(server.alive(), "the server died");
    Ok(())
}

/// Keys injected into QEMU's keyboard (QMP `input-send-event`), with the evdev codes the
/// client must see for them.
const KEYS: &[(&str, u16)] = &[
    ("a", 30),
    ("b", 48),
    ("c", 46),
    ("d", 32),
    ("e", 18),
    ("f", 33),
    ("g", 34),
    ("h", 35),
    ("i", 23),
    ("j", 36),
    ("k", 37),
    ("l", 38),
];
/// Keys per request: QEMU's keyboard queues 16 events, a press and a release each.
const KEYS_AT_ONCE: usize = 4;

/// QEMU's keyboard through the tunnel: every injected press and release reaches the client's
/// evdev node, in order.
pub fn kbd() -> Result<()> {
    load(modules::HID)?;
    let kbd = Plugged::new("kbd")?;
    // Bad requests fail with the reason, QEMU's own where QEMU refused.
    let again = host::plug("kbd").err().map(|e| format!("{e:#}"));
    ensure!(
        again.as_deref().is_some_and(|e| e.contains("Duplicate")),
        "plugging the keyboard twice should fail with QEMU's duplicate-id error, got {again:?}"
    );
    let unknown = host::plug("webcam").err().map(|e| format!("{e:#}"));
    ensure!(
        unknown.as_deref().is_some_and(|e| e.contains("ssd")),
        "an unknown device should fail naming the lab's devices, got {unknown:?}"
    );
    log!(
        "bad requests fail with their reason: {}; {}",
        again.unwrap_or_default(),
        unknown.unwrap_or_default()
    );
    let (vid, pid) = (kbd.device.vid, kbd.device.pid);
    let (mut server, ticket) = serve(&[&kbd.vid_pid()])?;
    let mut attached = spawn_client("friend", &["attach", &ticket, "--device", &kbd.vid_pid()])?;
    let event = sys::wait_for(
        "an input event node for QEMU's keyboard under vhci_hcd",
        Duration::from_secs(30),
        || usbdev::find_input_event_for(vid, pid, Via::Vhci),
    )
    .inspect_err(|_| show_client_log("friend"))?;
    let events = key_events(&event)?;
    // The driver polls once it has the node open; let its first interrupt URBs be queued.
    std::thread::sleep(Duration::from_millis(500));

    let start = Instant::now();
    let mut seen = Vec::new();
    for batch in KEYS.chunks(KEYS_AT_ONCE) {
        let qcodes: Vec<&str> = batch.iter().map(|(q, _)| *q).collect();
        host::keys(&qcodes)?;
        let want = seen.len() + 2 * batch.len();
        while seen.len() < want {
            let (code, value) = events
                .recv_timeout(Duration::from_secs(20).mul_f64(sys::pace()))
                .with_context(|| {
                    show_client_log("friend");
                    format!("after {} key events ({seen:?}), no more", seen.len())
                })?;
            // Autorepeat (value 2) is evdev's own, from a key held across a slow poll.
            if value != 2 {
                seen.push((code, value));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let want: Vec<(u16, i32)> = KEYS
        .iter()
        .flat_map(|(_, code)| [(*code, 1), (*code, 0)])
        .collect();
    ensure!(
        seen == want,
        "evdev saw {seen:?}, expected each key pressed and released in order: {want:?}"
    );
    log!(
        "{} keys injected by QMP reached the client's {} in order, in {secs:.1}s",
        KEYS.len(),
        event.display()
    );
    metric("key_events_per_s", want.len() as f64 / secs);
    detach_and_wait("friend", &mut attached)?;
    ensure!(server.alive(), "the server died");
    Ok(())
}
