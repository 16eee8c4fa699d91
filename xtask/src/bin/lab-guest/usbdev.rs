//! Finding what a USB device turned into: its sysfs device, block device, tty or input node.
//!
//! Everything is found from sysfs by vendor:product and by which host controller it hangs
//! off (the gadget appears under dummy_hcd; the same device imported over USB/IP appears
//! under vhci_hcd with the same ids), so scenarios never guess `/dev/sda`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::sys;

/// Which host controller a device must be attached through.
#[derive(Clone, Copy, Debug)]
pub enum Via {
    /// The local gadget, through dummy_hcd.
    Dummy,
    /// Imported over USB/IP (kernel or ours), through vhci_hcd.
    Vhci,
    /// One of QEMU's devices, on the VM's PCI xHCI.
    Xhci,
}

impl Via {
    fn matches(self, real_path: &Path) -> bool {
        let s = real_path.to_string_lossy();
        match self {
            Via::Dummy => s.contains("/dummy_hcd."),
            Via::Vhci => s.contains("/vhci_hcd."),
            Via::Xhci => s.starts_with("/sys/devices/pci"),
        }
    }
}

/// The sysfs directory of the USB device `vid:pid` under `via`, e.g. `/sys/bus/usb/devices/17-1`.
pub fn find_usb_device(vid: u16, pid: u16, via: Via) -> Option<PathBuf> {
    let entries = fs::read_dir("/sys/bus/usb/devices").ok()?;
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|dev| {
            ids(dev) == Some((vid, pid))
                && fs::canonicalize(dev).is_ok_and(|real| via.matches(&real))
        })
}

/// The `/dev/sdX` of mass-storage device `vid:pid` under `via`.
pub fn find_block_device_for(vid: u16, pid: u16, via: Via) -> Option<PathBuf> {
    find_node("/sys/block", "sd", vid, pid, via)
}

/// The `/dev/ttyACMn` of CDC-ACM device `vid:pid` under `via`.
pub fn find_tty_for(vid: u16, pid: u16, via: Via) -> Option<PathBuf> {
    find_node("/sys/class/tty", "ttyACM", vid, pid, via)
}

/// The `/dev/input/eventN` of HID device `vid:pid` under `via`.
pub fn find_input_event_for(vid: u16, pid: u16, via: Via) -> Option<PathBuf> {
    find_node("/sys/class/input", "event", vid, pid, via)
        .map(|p| Path::new("/dev/input").join(p.file_name().unwrap_or_default()))
}

/// Waits up to `timeout` for [`find_block_device_for`], and for its node to open: sysfs lists
/// a disk a moment before it is usable, and a name just freed by another disk (the server's
/// side of the same gadget, removed when the server claimed it) can still open as the old,
/// dying one (`ENXIO`).
pub fn wait_block_device(vid: u16, pid: u16, via: Via, timeout: Duration) -> Result<PathBuf> {
    sys::wait_for(
        &format!("a block device for {vid:04x}:{pid:04x} via {via:?}"),
        timeout,
        || find_block_device_for(vid, pid, via).filter(|dev| fs::File::open(dev).is_ok()),
    )
}

/// A class device whose sysfs ancestry contains the USB device `vid:pid` under `via`, as
/// `/dev/<name>` (for `/sys/class/net` only the name is meaningful).
pub fn find_node(class_dir: &str, prefix: &str, vid: u16, pid: u16, via: Via) -> Option<PathBuf> {
    let mut names: Vec<String> = fs::read_dir(class_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names.into_iter().find_map(|name| {
        let real = fs::canonicalize(Path::new(class_dir).join(&name)).ok()?;
        if !via.matches(&real) {
            return None;
        }
        let owner = real.ancestors().find(|a| a.join("idVendor").is_file())?;
        (ids(owner) == Some((vid, pid))).then(|| Path::new("/dev").join(&name))
    })
}

fn ids(dev: &Path) -> Option<(u16, u16)> {
    let hex = |f: &str| u16::from_str_radix(sys::read(dev.join(f)).ok()?.as_str(), 16).ok();
    Some((hex("idVendor")?, hex("idProduct")?))
}

/// Waits for usb-storage's SCSI command cap (`max_sectors`) of `disk` to read `sectors`: the
/// client raises it just after the disk appears.
pub fn wait_max_sectors(disk: &Path, sectors: u16) -> Result<()> {
    let name = disk.file_name().unwrap_or_default().to_string_lossy();
    let attr = format!("/sys/block/{name}/device/max_sectors");
    sys::wait_for(
        &format!("{attr} to be raised to {sectors}"),
        Duration::from_secs(10),
        || (sys::read(&attr).ok()? == sectors.to_string()).then_some(()),
    )
}

/// The block layer's limits on one request to `disk`, as `name=value` pairs: what bounds a
/// SCSI command's size besides usb-storage's `max_sectors` (the segments of a scattered
/// user buffer, among others).
pub fn queue_limits(disk: &Path) -> String {
    let name = disk.file_name().unwrap_or_default().to_string_lossy();
    [
        "max_sectors_kb",
        "max_hw_sectors_kb",
        "max_segments",
        "max_segment_size",
    ]
    .iter()
    .map(|f| {
        let value =
            sys::read(format!("/sys/block/{name}/queue/{f}")).unwrap_or_else(|_| "?".into());
        format!("{f}={value}")
    })
    .collect::<Vec<_>>()
    .join(" ")
}
