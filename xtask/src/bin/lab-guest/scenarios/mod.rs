//! The scenario registry: the one list of what the lab can run.
//!
//! To add a scenario: write `fn run() -> anyhow::Result<()>` in a new module here using the
//! guest helpers (`modules`, `gadget`, `usbdev`, `netem`, `bench`), report figures with
//! `report::metric`, return `report::skip(..)` when the kernel lacks something, and add an
//! entry to [`ALL`]. The host learns the list from `lab-guest --list-json` at build time.

mod acm;
mod attach;
mod baseline;
mod bench;
mod bridge;
mod cycles;
mod export;
mod faults;
mod hid;
mod hid_remote;
mod hiding;
mod kinds;
mod multi;
mod p2p;
mod profile;
mod project;
mod reconnect;
mod selftest;
mod smoke;
mod soak;
mod sourcesink;
mod telemetry;
mod tunnel;
mod usbip;
mod xhci;
mod xhci_audio;

/// One runnable scenario.
pub struct Scenario {
    /// The name used on the command line.
    pub name: &'static str,
    /// One line for `lab list`.
    pub about: &'static str,
    /// Part of a plain `lab run` / `xtask test`; false for scenarios that fail on purpose.
    pub default: bool,
    /// Runs in a child of PID 1; `Err` fails the scenario, `Err(Skip)` skips it.
    pub run: fn() -> anyhow::Result<()>,
}

/// Every scenario, in the order a default run executes them.
pub const ALL: &[Scenario] = &[
    Scenario {
        name: "smoke",
        about: "mass-storage gadget enumerates at high speed as /dev/sdX; first MiB md5 matches",
        default: true,
        run: smoke::run,
    },
    Scenario {
        name: "acm",
        about: "CDC-ACM gadget becomes /dev/ttyACMn and carries bytes to /dev/ttyGS0",
        default: true,
        run: acm::run,
    },
    Scenario {
        name: "hid",
        about: "HID keyboard gadget becomes /dev/input/eventN and delivers a key press",
        default: true,
        run: hid::run,
    },
    Scenario {
        name: "sourcesink",
        about: "SourceSink gadget (usb_f_ss_lb) via the generic function builder enumerates",
        default: true,
        run: sourcesink::run,
    },
    Scenario {
        name: "baseline",
        about: "kernel USB/IP (usbipd + usbip attach over loopback) on the mass-storage gadget: md5, read/write MiB/s",
        default: true,
        run: baseline::run,
    },
    Scenario {
        name: "export",
        about: "p2p-usb-server exports the mass-storage gadget; probe reads it over iroh byte-exact; stranger refused; unplug mid-read",
        default: true,
        run: export::run,
    },
    Scenario {
        name: "attach",
        about: "p2p-usb-client attaches the exported gadget through vhci-hcd: /dev/sdX, 64 MiB md5, write/read-back, detach gives it back",
        default: true,
        run: attach::run,
    },
    Scenario {
        name: "bridge",
        about: "p2p-usb-client --usbip-listen: Linux's own usbip list/attach import the gadget through the tunnel, md5 matches",
        default: true,
        run: bridge::run,
    },
    Scenario {
        name: "hid-remote",
        about: "HID keyboard through the tunnel over 20 ms RTT: every press and release reaches the client's evdev in order, without and with interrupt-IN streaming",
        default: true,
        run: hid_remote::run,
    },
    Scenario {
        name: "hiding",
        about: "attach with no flags over 2 ms RTT: read-ahead and 1 MiB SCSI commands are on by default (the disk's cap is raised, read-ahead answers URBs), direct and buffered reads and a write are byte-exact",
        default: true,
        run: hiding::run,
    },
    Scenario {
        name: "tunnel",
        about: "p2p-usb-server --simulate read by probe over iroh inside the VM: our userspace path without USB",
        default: true,
        run: tunnel::run,
    },
    Scenario {
        name: "bench",
        about: "kernel USB/IP on lo, kernel USB/IP inside WireGuard on a veth pair, and ours on that veth pair, side by side at netem RTT 0/2/20 ms: read/write MiB/s, 4 KiB read latency, RSS, CPU/GiB",
        default: false,
        run: bench::run,
    },
    Scenario {
        name: "profile",
        about: "perf record over the whole guest while ours reads, then writes, the bench's disk at RTT 0: CPU share by thread, binary and symbol",
        default: false,
        run: profile::run,
    },
    Scenario {
        name: "faults",
        about: "integrity at 1% loss + 20 ms RTT, unplug during dd (gone <= 1 s, EIO, no D state), client SIGKILL (released <= 2 s)",
        default: true,
        run: faults::run,
    },
    Scenario {
        name: "reconnect",
        about: "p2p-usb-client run keeps the disk attached: a 10 s network cut and a server restart each end in a re-attach with the data byte-exact, one vhci port",
        default: true,
        run: reconnect::run,
    },
    Scenario {
        name: "cycles",
        about: "attach/detach repeatedly: no growth in the server's fds or RSS, no vhci port left in use",
        default: true,
        run: cycles::run,
    },
    Scenario {
        name: "multi",
        about: "two disks through one server and one client connection, read at once, both byte-exact",
        default: true,
        run: multi::run,
    },
    Scenario {
        name: "telemetry",
        about: "eBPF probes time every URB in vhci: probe/client URB counts agree, latency-report split + SVG, budgets exit 2/0, netem 5 ms shows as network, probe cost",
        default: true,
        run: telemetry::run,
    },
    Scenario {
        name: "kinds-serial",
        about: "device kinds, kernel USB/IP beside ours: CDC ACM, generic serial, OBEX (tty lines both ways, reopen, unbind/rebind)",
        default: true,
        run: kinds::serial,
    },
    Scenario {
        name: "kinds-net",
        about: "device kinds, kernel USB/IP beside ours: ECM, ECM subset, EEM (ping, TCP both ways byte-exact, link down/up < 1 s, unbind/rebind)",
        default: true,
        run: kinds::net_cdc,
    },
    Scenario {
        name: "kinds-net2",
        about: "device kinds, kernel USB/IP beside ours: NCM, RNDIS (ping, TCP both ways byte-exact, link down/up < 1 s, unbind/rebind)",
        default: true,
        run: kinds::net_more,
    },
    Scenario {
        name: "kinds-misc",
        about: "device kinds, kernel USB/IP beside ours: HID keyboard and mouse, printer, MIDI (reports, LED, bytes both ways, unbind/rebind)",
        default: true,
        run: kinds::misc,
    },
    Scenario {
        name: "kinds-storage",
        about: "device kinds, kernel USB/IP beside ours: mass storage with 2 LUNs (stall and clear), SourceSink, Loopback, ACM+ECM+storage composite",
        default: true,
        run: kinds::storage,
    },
    Scenario {
        name: "xhci-disk",
        about: "QEMU's usb-storage at 5000 Mb/s on the VM's xHCI: kernel USB/IP anchor, then ours on a SuperSpeed vhci port, 64 MiB byte-exact, write read back, detach gives it back",
        default: true,
        run: xhci::disk,
    },
    Scenario {
        name: "xhci-serial",
        about: "QEMU's FTDI usb-serial through the tunnel: ftdi_sio's ttyUSB carries 64 KiB each way to the host's chardev byte-exact; a baud change reaches QEMU",
        default: true,
        run: xhci::serial,
    },
    Scenario {
        name: "xhci-unplug",
        about: "QMP device_del of QEMU's disk during dd on the client: gone <= 1 s, dd fails, no D state, the server keeps its keyboard; device_add re-attaches via client run, byte-exact",
        default: true,
        run: xhci::unplug,
    },
    Scenario {
        name: "xhci-kbd",
        about: "QEMU's usb-kbd through the tunnel: keys injected with QMP input-send-event reach the client's evdev, every press and release in order",
        default: true,
        run: xhci::kbd,
    },
    Scenario {
        name: "xhci-audio",
        about: "QEMU's usb-audio (isochronous OUT) through the tunnel: aplay's 1 kHz tone comes out of the device at 1 kHz at RTT 0 and 20 ms, missing share beside the kernel's USB/IP; stop/start twice; detach mid-stream",
        default: true,
        run: xhci_audio::run,
    },
    Scenario {
        name: "p2p-holepunch",
        about: "server and client behind two NATs (network namespaces, nftables) with a local iroh relay: the connection starts on the relay, goes direct, and the disk reads 64 MiB byte-exact",
        default: true,
        run: p2p::holepunch,
    },
    Scenario {
        name: "p2p-relay-only",
        about: "the same NATs with direct UDP between them blocked: the connection stays on the relay; 16 MiB read and 4 MiB written byte-exact through it",
        default: true,
        run: p2p::relay_only,
    },
    Scenario {
        name: "soak-cycles",
        about: "cycles, a thousand times (cargo xtask soak)",
        default: false,
        run: soak::cycles,
    },
    Scenario {
        name: "soak-integrity",
        about: "1 GiB written and read back byte-exact at 1% loss + 20 ms RTT, in 64 MiB passes of distinct data (cargo xtask soak)",
        default: false,
        run: soak::integrity,
    },
    Scenario {
        name: "selftest-fail",
        about: "fails on purpose, to prove a failing scenario fails the run with its log tail",
        default: false,
        run: selftest::fail,
    },
    Scenario {
        name: "selftest-hang",
        about: "hangs on purpose, to prove the per-scenario timeout kills it and fails the run",
        default: false,
        run: selftest::hang,
    },
    Scenario {
        name: "selftest-panic",
        about: "panics the guest kernel on purpose, to prove the host stops QEMU and reports it",
        default: false,
        run: selftest::panic,
    },
];

/// The scenario called `name`.
pub fn find(name: &str) -> Option<&'static Scenario> {
    ALL.iter().find(|s| s.name == name)
}
