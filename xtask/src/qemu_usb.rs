//! QEMU's own USB devices in the lab, as host and guest both name them.
//!
//! The lab VM has a real host controller (QEMU's xHCI) next to `dummy_hcd`. Nothing is plugged
//! into it at boot, so every other scenario sees the bus it always saw; a scenario plugs the
//! devices it needs by name and unplugs them when done. Plugging is the host's job (QMP), so a
//! scenario asks for it with a `LAB-HOST` line on the console and reads the host's answer, one
//! JSON line, from the guest's second serial port. The host also keeps the devices' host-side
//! ends (a disk image, the serial adapter's far end) in the run's directory.

/// The xHCI's id on QEMU's command line; its USB bus is `xhci.0`.
pub const XHCI_ID: &str = "xhci";
/// The bus every lab device is plugged into.
pub const XHCI_BUS: &str = "xhci.0";
/// Where the guest reads the host's answers (an `isa-serial` port, COM2).
pub const GUEST_ANSWER_TTY: &str = "/dev/ttyS1";

/// One device a scenario can plug.
pub struct QemuDevice {
    /// The name scenarios use; also its QEMU device id.
    pub name: &'static str,
    /// QEMU's device model.
    pub driver: &'static str,
    /// Extra `device_add` properties (backends the host creates at boot).
    pub props: &'static [(&'static str, &'static str)],
    /// Its USB vendor id, for finding it in sysfs.
    pub vid: u16,
    /// Its USB product id.
    pub pid: u16,
    /// One line for listings.
    pub about: &'static str,
}

/// Every device the lab can plug. Backends (`blockdev`, `chardev`) with these ids exist from
/// boot, so a device can be plugged, pulled and plugged again.
pub const DEVICES: &[QemuDevice] = &[
    QemuDevice {
        name: "ssd",
        driver: "usb-storage",
        props: &[("drive", "ssd-img")],
        vid: 0x46f4,
        pid: 0x0001,
        about: "mass storage on a SuperSpeed port (5000 Mb/s), backed by .lab/run/ssd.img",
    },
    QemuDevice {
        name: "ftdi",
        driver: "usb-serial",
        props: &[("chardev", "ftdi-far")],
        vid: 0x0403,
        pid: 0x6001,
        about: "FTDI FT232 serial adapter (full speed); the host echoes what it receives",
    },
    QemuDevice {
        name: "audio",
        driver: "usb-audio",
        props: &[("audiodev", "lab-audio")],
        vid: 0x46f4,
        pid: 0x0002,
        about: "USB audio playback (UAC1, isochronous OUT, 48 kHz S16LE stereo, full speed), \
                recorded by QEMU into .lab/run/audio.wav",
    },
    QemuDevice {
        name: "kbd",
        driver: "usb-kbd",
        props: &[],
        vid: 0x0627,
        pid: 0x0001,
        about: "HID keyboard (interrupt IN); keys injected with QMP input-send-event",
    },
];

/// The device a scenario names, if the lab has it.
pub fn device(name: &str) -> Option<&'static QemuDevice> {
    DEVICES.iter().find(|d| d.name == name)
}

/// The operations of a `LAB-HOST` request `{"seq":n,"op":...}`. The answer is
/// `{"seq":n,"ok":{...}}`, `{"seq":n,"error":"..."}` (the scenario fails with it) or
/// `{"seq":n,"missing":"..."}` (this QEMU lacks what was asked: the scenario skips).
pub mod op {
    /// `{"device":"ssd"}`: `device_add`, answered once QEMU has it.
    pub const PLUG: &str = "plug";
    /// `{"device":"ssd"}`: `device_del`, a surprise removal for the guest.
    pub const UNPLUG: &str = "unplug";
    /// `{"keys":["a","b"]}`: each key pressed and released, in order, on the plugged keyboard.
    pub const KEYS: &str = "keys";
    /// `{}`: what the serial adapter's far end has received since the last reset:
    /// `{"bytes":n,"fnv":h}`, and the last baud rate QEMU was asked for (`"baud":n` or null).
    pub const SERIAL_STATS: &str = "serial-stats";
    /// `{}`: zero the serial adapter's far-end counters.
    pub const SERIAL_RESET: &str = "serial-reset";
    /// `{"from":n}` (`n` from an earlier answer's `end`, or absent for the whole file): what
    /// the audio device has played since: `{"end":n,"frames","tone_frames","gap_blocks",
    /// "freq_hz"}` (see the host's `lab::audio`).
    pub const AUDIO: &str = "audio";
}

/// FNV-1a over a byte stream, continued from `state` (start with [`FNV_START`]): both ends of
/// the serial adapter hash what they saw and compare.
pub fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        state ^= u64::from(*b);
        state = state.wrapping_mul(0x0100_0000_01b3);
    }
    state
}

/// FNV-1a's offset basis.
pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_continues_across_chunks() {
        let whole = fnv1a(FNV_START, b"hello world");
        let split = fnv1a(fnv1a(FNV_START, b"hello"), b" world");
        assert_eq!(whole, split);
        assert_eq!(fnv1a(FNV_START, b""), FNV_START);
        assert_eq!(fnv1a(FNV_START, b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn names_are_unique_and_found() {
        for d in DEVICES {
            assert_eq!(device(d.name).unwrap().driver, d.driver);
            assert_eq!(DEVICES.iter().filter(|o| o.name == d.name).count(), 1);
        }
        assert!(device("nope").is_none());
    }
}
