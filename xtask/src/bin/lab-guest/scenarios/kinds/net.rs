//! Network-adapter kinds: ECM (`cdc_ether`), ECM subset (`cdc_subset`), EEM (`cdc_eem`),
//! NCM (`cdc_ncm`), RNDIS (`rndis_host`). The gadget's interface lives in a network namespace
//! of its own, so the only way between 10.9.0.1 (client side) and 10.9.0.2 (gadget side) is
//! the USB link: ping, a TCP stream each way compared byte for byte (the figures: MiB/s and
//! RTT), the link taken down and up (each within a second: usbnet kills its URBs on the way
//! down), and the driver unbound and bound again.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::{Checks, Ctx, Done, Guard, Kind, unbind_rebind};
use crate::gadget::{Function, Gadget, VID};
use crate::report::log;
use crate::sys;
use crate::usbdev::{self, Via};

const IP: &str = "/usr/sbin/ip";
/// The gadget side's network namespace.
pub const NETNS: &str = "gadget";
/// The client side's address on the adapter (the daemons' own namespace).
pub const HOST_IP: &str = "10.9.0.1";
const GADGET_IP: &str = "10.9.0.2";
/// The link's prefix length: both addresses are on one /24.
const PREFIX: u8 = 24;
/// Bytes per TCP stream: enough for a rate, little enough for TCG.
const STREAM_BYTES: usize = 2 << 20;

/// ECM, ECM subset, EEM.
pub const CDC: &[Kind] = &[
    Kind {
        name: "ecm",
        functions: "ecm",
        drivers: &["cdc_ether"],
        modules: &["cdc_ether"],
        covers: COVERS,
        gadget: || one("kind-ecm", VID, 0x0120, "usb_f_ecm", "ecm.usb0"),
        setup: |g| gadget_ns(g, "ecm.usb0"),
        check: |ctx, checks| net_checks(ctx, checks, "cdc_ether"),
    },
    Kind {
        name: "ecm-subset",
        functions: "geth",
        drivers: &["cdc_subset"],
        modules: &["cdc_subset"],
        covers: COVERS,
        // cdc_subset binds only to the ids of the devices it knows: this is the Linux-USB
        // Ethernet gadget's.
        gadget: || one("kind-geth", 0x0525, 0xa4a2, "usb_f_ecm_subset", "geth.usb0"),
        setup: |g| gadget_ns(g, "geth.usb0"),
        check: |ctx, checks| net_checks(ctx, checks, "cdc_subset"),
    },
    Kind {
        name: "eem",
        functions: "eem",
        drivers: &["cdc_eem"],
        modules: &["cdc_eem"],
        covers: COVERS,
        gadget: || one("kind-eem", VID, 0x0122, "usb_f_eem", "eem.usb0"),
        setup: |g| gadget_ns(g, "eem.usb0"),
        check: |ctx, checks| net_checks(ctx, checks, "cdc_eem"),
    },
];

/// NCM, RNDIS.
pub const MORE: &[Kind] = &[
    Kind {
        name: "ncm",
        functions: "ncm",
        drivers: &["cdc_ncm"],
        modules: &["cdc_ncm"],
        covers: COVERS,
        gadget: || one("kind-ncm", VID, 0x0123, "usb_f_ncm", "ncm.usb0"),
        setup: |g| gadget_ns(g, "ncm.usb0"),
        check: |ctx, checks| net_checks(ctx, checks, "cdc_ncm"),
    },
    Kind {
        name: "rndis",
        functions: "rndis",
        drivers: &["rndis_host"],
        modules: &["rndis_host"],
        covers: COVERS,
        gadget: || one("kind-rndis", VID, 0x0124, "usb_f_rndis", "rndis.usb0"),
        setup: |g| gadget_ns(g, "rndis.usb0"),
        check: |ctx, checks| net_checks(ctx, checks, "rndis_host"),
    },
];

const COVERS: &str = "ping; 2 MiB TCP each way byte-exact; link down+up each < 1 s; unbind/rebind";

fn one(name: &str, vid: u16, pid: u16, module: &str, instance: &str) -> Result<Gadget> {
    Gadget::composite(
        name,
        vid,
        pid,
        &[Function {
            module,
            instance,
            attrs: &[],
        }],
    )
}

/// Moves the gadget's interface of function `instance` into [`NETNS`] with 10.9.0.2; the
/// namespace is deleted when the guard drops.
pub fn gadget_ns(g: &Gadget, instance: &str) -> Result<Option<Guard>> {
    let ifname = sys::read(g.function_dir(instance).join("ifname"))?;
    let _ = Command::new(IP).args(["netns", "del", NETNS]).output();
    sys::run(Command::new(IP).args(["netns", "add", NETNS]))?;
    let guard = Guard::new(|| {
        let _ = Command::new(IP).args(["netns", "del", NETNS]).output();
    });
    sys::run(Command::new(IP).args(["link", "set", &ifname, "netns", NETNS]))?;
    let gadget_addr = format!("{GADGET_IP}/{PREFIX}");
    sys::run(Command::new(IP).args(["-n", NETNS, "addr", "add", &gadget_addr, "dev", &ifname]))?;
    sys::run(Command::new(IP).args(["-n", NETNS, "link", "set", &ifname, "up"]))?;
    sys::run(Command::new(IP).args(["-n", NETNS, "link", "set", "lo", "up"]))?;
    log!("kinds: gadget interface {ifname} is {gadget_addr} in netns {NETNS}");
    Ok(Some(guard))
}

/// Finds the client side's interface of `vid:pid`, gives it 10.9.0.1 and brings it up.
fn host_up(vid: u16, pid: u16) -> Result<String> {
    let iface = sys::wait_for(
        "a network interface under vhci_hcd",
        Duration::from_secs(10),
        || usbdev::find_node("/sys/class/net", "", vid, pid, Via::Vhci),
    )?;
    let iface = iface
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    sys::run(Command::new(IP).args(["addr", "flush", "dev", &iface]))?;
    let host_addr = format!("{HOST_IP}/{PREFIX}");
    sys::run(Command::new(IP).args(["addr", "add", &host_addr, "dev", &iface]))?;
    sys::run(Command::new(IP).args(["link", "set", &iface, "up"]))?;
    Ok(iface)
}

/// The client side's interface comes up and the gadget answers pings through it.
pub fn ping_check(ctx: &Ctx<'_>, checks: &mut Checks) {
    let (vid, pid) = (ctx.gadget.vid, ctx.gadget.pid);
    checks.check("ping", Duration::from_secs(40), move || {
        let iface = host_up(vid, pid)?;
        wait_ping()?;
        let rtt = ping_rtt_ms()?;
        Ok(Done::new(format!("{iface}: 10.9.0.2 answers, RTT {rtt:.2} ms")).figure("ping_ms", rtt))
    });
}

/// The checks of a network kind whose client-side driver is `driver`.
pub fn net_checks(ctx: &Ctx<'_>, checks: &mut Checks, driver: &'static str) {
    let (vid, pid, dev) = (ctx.gadget.vid, ctx.gadget.pid, ctx.dev.clone());
    ping_check(ctx, checks);
    checks.check("TCP to gadget", Duration::from_secs(60), || {
        let mib_s = to_gadget()?;
        Ok(Done::new(format!(
            "{} MiB byte-exact at {mib_s:.2} MiB/s",
            STREAM_BYTES >> 20
        ))
        .figure("to_gadget_mib_s", mib_s))
    });
    checks.check("TCP from gadget", Duration::from_secs(60), || {
        let mib_s = from_gadget()?;
        Ok(Done::new(format!(
            "{} MiB byte-exact at {mib_s:.2} MiB/s",
            STREAM_BYTES >> 20
        ))
        .figure("from_gadget_mib_s", mib_s))
    });
    let (vid2, pid2) = (vid, pid);
    checks.check("link down+up < 1 s", Duration::from_secs(40), move || {
        let iface = usbdev::find_node("/sys/class/net", "", vid2, pid2, Via::Vhci)
            .context("the interface is gone")?;
        let iface = iface
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let mut took = Vec::new();
        for state in ["down", "up"] {
            let t = Instant::now();
            sys::run(Command::new(IP).args(["link", "set", &iface, state]))?;
            took.push(t.elapsed().as_secs_f64());
        }
        let limit = sys::pace();
        ensure!(
            took.iter().all(|s| *s < limit),
            "ip link set down took {:.2} s, up {:.2} s (limit 1 s at this guest's pace, {limit:.2} s)",
            took[0],
            took[1]
        );
        wait_ping().context("after the link came back up")?;
        Ok(Done::new(format!(
            "down {:.2} s, up {:.2} s, ping again",
            took[0], took[1]
        )))
    });
    checks.check(
        &format!("unbind/rebind {driver}"),
        Duration::from_secs(50),
        move || {
            let what = unbind_rebind(&dev, driver)?;
            let iface = host_up(vid, pid)?;
            wait_ping()?;
            Ok(Done::new(format!("{what}; {iface} pings again")))
        },
    );
}

/// Pings the gadget once a second until it answers (carrier, ARP), up to 20 s.
fn wait_ping() -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        let ok = sys::bb("ping")
            .args(["-c", "1", "-W", "1", GADGET_IP])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
    }
    bail!("{GADGET_IP} did not answer a ping within 20 s")
}

/// Average of 5 pings, in ms.
fn ping_rtt_ms() -> Result<f64> {
    let out = sys::run(sys::bb("ping").args(["-c", "5", "-i", "0.2", "-W", "2", GADGET_IP]))?;
    // "round-trip min/avg/max = 0.512/0.734/1.034 ms"
    out.lines()
        .find_map(|l| l.split_once(" = ")?.1.split('/').nth(1)?.parse().ok())
        .context("no round-trip line in ping's output")
}

/// The bytes each stream carries: not compressible, not periodic at any small length.
fn pattern() -> Vec<u8> {
    (0..STREAM_BYTES)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// `busybox nc -l -p port` in the gadget's namespace, stdin and stdout as given.
fn listen(port: u16, stdin: Stdio, stdout: Stdio) -> Result<Child> {
    Command::new(IP)
        .args(["netns", "exec", NETNS, "/bin/busybox", "nc", "-l", "-p"])
        .arg(port.to_string())
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .context("starting nc in the gadget's namespace")
}

/// Connects to the gadget's `port`, retrying while its listener starts.
fn connect(port: u16) -> Result<TcpStream> {
    let addr: SocketAddr = format!("{GADGET_IP}:{port}").parse()?;
    let start = Instant::now();
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > Duration::from_secs(8) => {
                return Err(e).context(format!("connecting to {addr}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Kills the listener if it is still there when the check ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends [`STREAM_BYTES`] to a listener on the gadget side; MiB/s once it has them all.
fn to_gadget() -> Result<f64> {
    let data = pattern();
    let out = Path::new("/tmp/kind-net-recv");
    let mut nc = Reaped(listen(
        5001,
        Stdio::null(),
        Stdio::from(File::create(out)?),
    )?);
    let mut s = connect(5001)?;
    let t = Instant::now();
    s.write_all(&data)?;
    s.shutdown(Shutdown::Write)?;
    sys::wait_for(
        "the gadget-side nc to see the end of the stream",
        Duration::from_secs(40),
        || nc.0.try_wait().ok().flatten(),
    )
    .with_context(link_stats)?;
    let secs = t.elapsed().as_secs_f64();
    let got = fs::read(out)?;
    ensure!(
        got == data,
        "the gadget received {} bytes, not the {} sent (or different ones)",
        got.len(),
        data.len()
    );
    Ok(STREAM_BYTES as f64 / (1 << 20) as f64 / secs)
}

/// Both ends' interface counters and TCP retransmissions, for a failed stream's message: they
/// tell a lossy link (drops, errors, retransmits) from a stalled one.
fn link_stats() -> String {
    // Each namespace has `lo` and the one USB network interface.
    let side = |ns: Option<&str>| -> String {
        let run = |args: &[&str]| {
            let mut cmd = match ns {
                Some(ns) => {
                    let mut c = Command::new(IP);
                    c.args(["netns", "exec", ns]).args(args);
                    c
                }
                None => {
                    let mut c = Command::new(args[0]);
                    c.args(&args[1..]);
                    c
                }
            };
            cmd.output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let links = run(&[IP, "-s", "-o", "link", "show"]);
        let links: Vec<String> = links
            .lines()
            .filter(|l| !l.contains(" lo:"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        let snmp = run(&["/bin/busybox", "cat", "/proc/net/snmp"]);
        format!(
            "{}; TCP RetransSegs {}",
            links.join(" | "),
            retrans(&snmp).unwrap_or_else(|| "?".into())
        )
    };
    format!(
        "client side: {}; gadget side: {}",
        side(None),
        side(Some(NETNS))
    )
}

/// `RetransSegs` out of /proc/net/snmp's two Tcp: lines (names, then values).
fn retrans(snmp: &str) -> Option<String> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let at = names.split_whitespace().position(|n| n == "RetransSegs")?;
    values.split_whitespace().nth(at).map(str::to_owned)
}

/// Reads [`STREAM_BYTES`] a listener on the gadget side sends; MiB/s.
fn from_gadget() -> Result<f64> {
    let data = pattern();
    let src = Path::new("/tmp/kind-net-send");
    fs::write(src, &data)?;
    let _nc = Reaped(listen(5002, Stdio::from(File::open(src)?), Stdio::null())?);
    let mut s = connect(5002)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let t = Instant::now();
    let mut got = vec![0u8; data.len()];
    let mut at = 0;
    while at < got.len() {
        match s.read(&mut got[at..]) {
            Ok(0) => bail!(
                "the gadget closed the stream after {at} bytes; {}",
                link_stats()
            ),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => bail!(
                "the stream from the gadget stopped after {at} of {} bytes ({e}); {}",
                got.len(),
                link_stats()
            ),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        got == data,
        "the bytes from the gadget differ from those sent"
    );
    Ok(STREAM_BYTES as f64 / (1 << 20) as f64 / secs)
}
