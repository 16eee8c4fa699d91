//! Loading kernel modules, in the order LAB-NOTES measured to work.
//!
//! busybox `modprobe` follows `modules.dep` but not softdeps, so the few softdeps that
//! matter are loaded here first. A module that is neither in `modules.dep` nor built in
//! makes the calling scenario skip with the module's name, never fail obscurely later.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::report::skip;
use crate::sys;

/// The USB host side and USB/IP: vhci first so its buses come before dummy_hcd's.
pub const USBIP: &[&str] = &["usbcore", "usbip-core", "vhci-hcd", "usbip-host"];
/// A virtual UDC plus configfs gadgets.
pub const GADGET: &[&str] = &["udc-core", "dummy_hcd", "configfs", "libcomposite"];
/// The host-side drivers that turn a mass-storage device into `/dev/sdX`.
pub const STORAGE: &[&str] = &["scsi_mod", "usb-storage", "sd_mod"];
/// QEMU's xHCI, where the lab's emulated USB devices are plugged (`xtask::qemu_usb`).
pub const XHCI: &[&str] = &["usbcore", "xhci-hcd", "xhci-pci"];
/// The FTDI serial adapter's driver, `/dev/ttyUSBn`.
pub const FTDI: &[&str] = &["usbserial", "ftdi_sio"];
/// USB sound cards (ALSA).
pub const AUDIO: &[&str] = &["snd-usb-audio"];
/// HID devices as evdev nodes.
pub const HID: &[&str] = &["usbhid", "hid-generic", "evdev"];
/// `tc qdisc ... netem` on loopback.
pub const NETEM: &[&str] = &["sch_netem"];
/// Network namespaces joined by veth pairs, with NAT routers (nftables masquerade).
pub const NAT: &[&str] = &[
    "veth",
    "nf_tables",
    "nft_chain_nat",
    "nft_masq",
    "nft_ct",
    "sch_netem",
];

/// Softdeps busybox modprobe ignores: `sd_mod` pulls in `crc_t10dif`/`crc64_rocksoft`, and
/// `nf_tables` pulls in `libcrc32c`, which fail to load without a registered crypto
/// implementation.
const SOFTDEPS: &[(&str, &[&str])] = &[
    (
        "sd_mod",
        &[
            "crct10dif_generic",
            "crct10dif-pclmul",
            "crc64_rocksoft_generic",
        ],
    ),
    ("nf_tables", &["crc32c_generic"]),
];

/// Loads each module (and its dependencies) unless already loaded or built in; skips the
/// scenario if this kernel does not have one.
pub fn load(names: &[&str]) -> Result<()> {
    for name in names {
        if loaded(name) {
            continue;
        }
        if !available(name) {
            return skip(format!("this kernel has no module {name}"));
        }
        for (module, pre) in SOFTDEPS {
            if norm(module) == norm(name) {
                for p in pre.iter().filter(|p| available(p) && !loaded(p)) {
                    sys::run(sys::bb("modprobe").arg(p))?;
                }
            }
        }
        let mut modprobe = sys::bb("modprobe");
        modprobe.arg(name);
        if norm(name) == "dummy_hcd" {
            // Two UDCs, so a scenario can plug two gadgets at once (several devices).
            modprobe.arg("num=2");
        }
        sys::run(&mut modprobe).with_context(|| format!("loading module {name}"))?;
    }
    Ok(())
}

/// Whether `name` is in this kernel's `modules.dep` or built in.
pub fn available(name: &str) -> bool {
    listed_in("modules.dep", name) || listed_in("modules.builtin", name)
}

/// Loaded modules have `/sys/module/<name>/initstate`; built-in ones count as loaded.
fn loaded(name: &str) -> bool {
    Path::new("/sys/module")
        .join(norm(name))
        .join("initstate")
        .exists()
        || listed_in("modules.builtin", name)
}

fn listed_in(index: &str, name: &str) -> bool {
    let release = sys::read("/proc/sys/kernel/osrelease").unwrap_or_default();
    let path = Path::new("/lib/modules").join(release).join(index);
    let want = norm(name);
    fs::read_to_string(path).is_ok_and(|text| {
        text.lines().any(|l| {
            let file = l
                .split(':')
                .next()
                .unwrap_or("")
                .rsplit('/')
                .next()
                .unwrap_or("");
            norm(file.split(".ko").next().unwrap_or("")) == want
        })
    })
}

fn norm(name: &str) -> String {
    name.replace('-', "_")
}
