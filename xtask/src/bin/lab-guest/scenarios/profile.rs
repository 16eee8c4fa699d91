//! Where the CPU goes on our path, by thread, binary and symbol, kernel included: `perf record`
//! samples the whole guest while ours reads the bench's disk at RTT 0, then while it writes it,
//! with the suite this CPU picks (AES-GCM), the same with iroh's send-side trace log (to count
//! the transmits it drops), and with ChaCha20-Poly1305.
//! Under TCG our path is CPU-bound (kernel-notes/LAB.md), so this profile is what says which
//! code to make cheaper, and why writes cost more than reads. `cargo xtask bench profile`
//! prints the split as a table; the symbol lists stay in this scenario's log.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::bench::{attach_ours, cpu_secs};
use super::project::{DAEMON_LOG, client_log, program_in};
use crate::bench::{self, MIB};
use crate::gadget::Gadget;
use crate::report::{log, metric};
use crate::wgnet::{self, WirePair};
use crate::{modules, sys};

const PERF: &str = "/usr/bin/perf";
/// A client config that puts ChaCha20-Poly1305 first (the client's order decides the suite):
/// what a Raspberry Pi 4, which has no AES instructions, runs.
const CHACHA_CONFIG: &str = "/tmp/client-chacha20.toml";
/// Bytes moved per direction while recording: enough samples at the rate below (TCG moves a
/// few MiB/s) that a 1 % line means something.
const SIZE: usize = 32 * MIB;
/// Samples per second of guest time; `cpu-clock` because TCG has no PMU.
const FREQ: &str = "499";
/// A thread and binary below this share of the samples is left out of the table.
const MIN_SHARE: &str = "1";
/// Symbols listed per direction.
const TOP_SYMBOLS: usize = 40;
/// Lines of kernel call chains listed per direction.
const CALLER_LINES: usize = 160;
/// The daemons' busy threads: the server's runtime workers and nusb's event thread, the
/// client's runtime (its main thread) and its io_uring pump.
const DAEMON_THREADS: [&str; 4] = [
    "tokio-rt-worker",
    "nusb-events",
    "p2p-usb-client",
    "vhci-uring",
];

pub fn run() -> Result<()> {
    if !Path::new(PERF).exists() {
        return crate::report::skip("no perf in this lab (linux-perf is a guest package)");
    }
    modules::load(modules::STORAGE)?;
    modules::load(modules::USBIP)?;
    modules::load(modules::NETEM)?;
    // Kernel symbols by name, and sampling the whole system as root.
    sys::write("/proc/sys/kernel/kptr_restrict", "0")?;
    sys::write("/proc/sys/kernel/perf_event_paranoid", "-1")?;
    let backing = Path::new("/tmp/profile.img");
    bench::pattern_file(backing, SIZE, 0x9f)?;
    let gadget = Gadget::local_disk(backing)?;
    // The bench's veth pair, so the packets take the path the bench measures.
    let pair = if wgnet::available() {
        Some(WirePair::build()?)
    } else {
        None
    };
    fs::write(CHACHA_CONFIG, "cipher = \"chacha20\"\n")?;
    let chacha = [("P2P_USB_CLIENT_CONFIG", CHACHA_CONFIG)];
    let iroh_trace = format!("{DAEMON_LOG},{IROH_SEND_TRACE}");
    let trace = [("RUST_LOG", iroh_trace.as_str())];
    for (variant, env) in [
        ("aes", &[][..]),
        ("aes_iroh_trace", &trace[..]),
        ("chacha20", &chacha[..]),
    ] {
        profile_variant(variant, &gadget, pair.as_ref(), env)?;
    }
    Ok(())
}

/// Where iroh logs, at trace level, each transmit it drops because the UDP socket was not
/// writable: it turns the socket's back-pressure into packet loss (iroh 1.4,
/// `socket/transports.rs`), and QUIC answers loss by shrinking its congestion window.
const IROH_SEND_TRACE: &str = "iroh::socket::transports=trace";
const IROH_SEND_DROP: &str = "transport pending, dropped transmit";

/// Attaches ours with `client_env`, records a read and a write, and detaches.
fn profile_variant(
    variant: &str,
    gadget: &Gadget,
    pair: Option<&WirePair>,
    client_env: &[(&str, &str)],
) -> Result<()> {
    let ours = attach_ours(gadget, pair, client_env)?;
    // One unrecorded pass first: the connection's windows open and read-ahead settles.
    bench::read_mib_s(&ours.disk, 8 * MIB)?;
    let server_ns = pair.map(|_| wgnet::SERVER_NS);
    let client_ns = pair.map(|_| wgnet::CLIENT_NS);
    for (what, io) in [
        ("read", bench::read_mib_s as fn(&Path, usize) -> Result<f64>),
        ("write", bench::write_mib_s),
    ] {
        let data = format!("/tmp/perf-{variant}-{what}.data");
        let cpu = || cpu_secs(ours.server.pid()) + cpu_secs(ours.client.pid());
        let (before, drops_before) = (cpu(), Drops::now(server_ns, client_ns));
        let recording = Recording::start(&data)?;
        let mib_s = io(&ours.disk, SIZE);
        recording.stop()?;
        let mib_s = mib_s?;
        let per_gib = (cpu() - before) / (SIZE as f64 / (1024.0 * MIB as f64));
        let drops = Drops::now(server_ns, client_ns).since(&drops_before);
        log!(
            "ours ({variant}) rtt 0 ms {what}: {mib_s:.1} MiB/s, daemons {per_gib:.0} CPU s per GiB, \
             while recorded; datagrams dropped for a full receive buffer: server {}, client {}; \
             packets dropped for a full input backlog: {}; transmits the client's iroh dropped \
             (logged only with {IROH_SEND_TRACE}): {}",
            drops.server_rcvbuf,
            drops.client_rcvbuf,
            drops.backlog,
            drops.iroh_send
        );
        let figure = |name: &str, value: f64| {
            metric(&format!("profile_{variant}_{what}_{name}"), value);
        };
        figure("iroh_send_drops", drops.iroh_send as f64);
        figure("backlog_drops", drops.backlog as f64);
        figure("mib_s", mib_s);
        figure("cpu_secs_per_gib", per_gib.round());
        figure(
            "rcvbuf_drops",
            (drops.server_rcvbuf + drops.client_rcvbuf) as f64,
        );
        report(&format!("{variant}_{what}"), &data)?;
    }
    ours.detach(SIZE)
}

/// Packets dropped on our path that the network did not lose, counted so far.
struct Drops {
    /// UDP datagrams the server's receive buffer had no room for.
    server_rcvbuf: u64,
    /// The same at the client.
    client_rcvbuf: u64,
    /// Packets dropped for a full input backlog, guest-wide.
    backlog: u64,
    /// Transmits the client's iroh dropped (counted only when it logs them, at trace level).
    iroh_send: u64,
}

impl Drops {
    fn now(server_ns: Option<&str>, client_ns: Option<&str>) -> Drops {
        Drops {
            server_rcvbuf: rcvbuf_errors(server_ns),
            client_rcvbuf: rcvbuf_errors(client_ns),
            backlog: backlog_drops(),
            iroh_send: client_log("friend").matches(IROH_SEND_DROP).count() as u64,
        }
    }

    fn since(&self, before: &Drops) -> Drops {
        Drops {
            server_rcvbuf: self.server_rcvbuf.saturating_sub(before.server_rcvbuf),
            client_rcvbuf: self.client_rcvbuf.saturating_sub(before.client_rcvbuf),
            backlog: self.backlog.saturating_sub(before.backlog),
            iroh_send: self.iroh_send.saturating_sub(before.iroh_send),
        }
    }
}

/// Packets the kernel dropped so far because a CPU's input backlog was full
/// (`net.core.netdev_max_backlog`; the second column of `/proc/net/softnet_stat`, in hex):
/// where a veth pair drops what one side sends faster than the other's softirq takes it.
fn backlog_drops() -> u64 {
    fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|v| u64::from_str_radix(v, 16).ok())
        .sum()
}

/// UDP datagrams dropped for a full receive buffer so far (`RcvbufErrors` in `/proc/net/snmp`)
/// in network namespace `ns` (the guest's own if `None`).
fn rcvbuf_errors(ns: Option<&str>) -> u64 {
    let out = program_in(ns, "/bin/busybox")
        .args(["cat", "/proc/net/snmp"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut udp = out.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// A `perf` command, its home (where it would keep a build-id cache) in the guest's tmpfs.
fn perf() -> Command {
    let mut c = Command::new(PERF);
    c.env("HOME", "/tmp");
    c
}

/// `perf record` over the whole guest, stopped with SIGINT so it writes its file out.
struct Recording(Child, String);

impl Recording {
    fn start(data: &str) -> Result<Recording> {
        let child = perf()
            .args([
                "record",
                "-a",
                "-g",
                "-e",
                "cpu-clock",
                "-F",
                FREQ,
                "-N",
                "-q",
                "-o",
            ])
            .arg(data)
            .stdout(Stdio::null())
            .stderr(fs::File::create(format!("{data}.log"))?)
            .spawn()
            .context("starting perf record")?;
        // perf opens its events and mmaps its buffers before it samples anything.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Recording(child, data.to_owned()))
    }

    fn stop(mut self) -> Result<()> {
        sys::run(sys::bb("kill").args(["-INT", &self.0.id().to_string()]))?;
        let status = sys::wait_for("perf record to finish", Duration::from_secs(60), || {
            self.0.try_wait().ok().flatten()
        })?;
        // perf exits with the signal's status when it was interrupted; its file says the rest.
        log!("perf record ended: {status}");
        for line in fs::read_to_string(format!("{}.log", self.1))
            .unwrap_or_default()
            .lines()
            .take(10)
        {
            log!("  perf record: {line}");
        }
        Ok(())
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Logs the recording's split by thread and binary (also as metrics, for the host's table)
/// and its top symbols.
fn report(what: &str, data: &str) -> Result<()> {
    let by_binary = perf_report(data, "comm,dso", MIN_SHARE)?;
    if by_binary.is_empty() {
        bail!("perf recorded no samples in {data}");
    }
    log!("ours {what}, share of all samples by thread and binary:");
    for row in &by_binary {
        log!("  {:>6.2}%  {}", row.share, row.columns.join("  "));
        metric(
            &format!("profile_{what}_{}", metric_key(&row.columns)),
            row.share,
        );
    }
    let symbols = perf_report(data, "comm,dso,sym", "0")?;
    log!("ours {what}, top symbols by thread and binary:");
    for row in symbols.iter().take(TOP_SYMBOLS) {
        log!("  {:>6.2}%  {}", row.share, row.columns.join("  "));
    }
    log!("ours {what}, share of all samples by kind of work:");
    for (kind, share) in by_kind(&symbols) {
        log!("  {share:>6.2}%  {kind}");
        metric(&format!("profile_{what}_kind_{kind}"), share);
    }
    // What the daemons' kernel time is doing: the calls that lead to each costly symbol.
    log!("ours {what}, the daemons' kernel symbols and their callers:");
    let out = perf()
        .args(["report", "--stdio", "--no-children", "--sort", "comm,sym"])
        .args(["--percent-limit", "1", "-g", "caller,0.5,callee,function"])
        .args(["-i", data])
        .output()
        .context("running perf report")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let chains = kernel_chains(&text);
    if !out.status.success() || chains.is_empty() {
        log!(
            "  perf report ({}) gave no kernel call chains: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    for line in chains.iter().take(CALLER_LINES) {
        log!("  {line}");
    }
    Ok(())
}

/// Whether a sample (its thread, binary and symbol) is of one kind of work.
type IsKind = fn(&str, &str, &str) -> bool;

/// Kinds of work, each a test on a sample's thread, binary and symbol; the first that matches
/// takes it. Names are metric name parts.
const KINDS: &[(&str, IsKind)] = &[
    ("idle", |comm, _, sym| {
        comm == "swapper" || sym.contains("safe_halt")
    }),
    ("other_processes", |comm, _, _| {
        !DAEMON_THREADS.contains(&comm)
            && !KERNEL_USB_THREADS.contains(&comm)
            && !["iou-", "kworker", "ksoftirqd"]
                .iter()
                .any(|p| comm.starts_with(p))
    }),
    ("crypto", |_, _, sym| {
        ["aes", "gcm", "ghash", "chacha", "poly1305", "ring::aead"]
            .iter()
            .any(|k| sym.contains(k))
    }),
    ("page_alloc_zero_fault", |_, dso, sym| {
        in_kernel(dso)
            && [
                "clear_page",
                "fault",
                "alloc_pages",
                "get_page_from_freelist",
                "rmqueue",
                "free_pages",
                "free_unref",
                "folio",
                "zap_",
                "unmap",
                "mmap",
                "lru",
                "memcg",
                "release_pages",
                "page_frag",
            ]
            .iter()
            .any(|k| sym.contains(k))
    }),
    ("copies", |_, dso, sym| {
        dso.starts_with("libc")
            || [
                "memcpy",
                "memmove",
                "copy_user",
                "copy_to_iter",
                "copy_from_iter",
                "copy_page",
            ]
            .iter()
            .any(|k| sym.contains(k))
    }),
    ("scheduling_and_wakeups", |_, dso, sym| {
        in_kernel(dso)
            && [
                "schedule",
                "task_switch",
                "spin_unlock",
                "wake_up",
                "futex",
                "epoll",
                "enqueue_",
                "dequeue_",
                "update_curr",
                "pick_next",
                "hrtimer",
                "switch_to",
            ]
            .iter()
            .any(|k| sym.contains(k))
    }),
    ("kernel_usb_and_storage", |comm, dso, sym| {
        in_kernel(dso)
            && (KERNEL_USB_THREADS.contains(&comm)
                || ["usb", "urb", "vhci", "dummy", "hcd", "scsi", "blk", "fsg_"]
                    .iter()
                    .any(|k| sym.contains(k)))
    }),
    ("kernel_network", |_, dso, sym| {
        in_kernel(dso)
            && [
                "udp",
                "ip_",
                "skb",
                "sock",
                "net_",
                "napi",
                "veth",
                "dev_queue",
                "inet",
                "dst_",
                "nf_",
                "csum",
                "netif",
                "recvmsg",
                "sendmsg",
                "recvmmsg",
                "fib_",
            ]
            .iter()
            .any(|k| sym.contains(k))
    }),
    ("kernel_other", |_, dso, _| in_kernel(dso)),
    ("quic", |_, _, sym| {
        ["noq", "iroh", "quinn"].iter().any(|k| sym.contains(k))
    }),
    ("daemons_other", |_, _, _| true),
];

/// Whether a sample's binary is the kernel.
fn in_kernel(dso: &str) -> bool {
    dso.starts_with("[kernel")
}

/// Kernel threads that move our path's USB data: vhci's, and the mass-storage gadget's.
const KERNEL_USB_THREADS: [&str; 3] = ["vhci_rx", "vhci_tx", "file-storage"];

/// Every sample's share summed by [`KINDS`], largest first.
fn by_kind(symbols: &[Row]) -> Vec<(&'static str, f64)> {
    let mut shares: Vec<(&'static str, f64)> = KINDS.iter().map(|(k, _)| (*k, 0.0)).collect();
    for row in symbols {
        let [comm, dso, sym] = [0, 1, 2].map(|i| row.columns.get(i).map_or("", String::as_str));
        if let Some(i) = KINDS.iter().position(|(_, test)| test(comm, dso, sym)) {
            shares[i].1 += row.share;
        }
    }
    shares.retain(|&(_, share)| share > 0.0);
    for share in &mut shares {
        share.1 = (share.1 * 100.0).round() / 100.0;
    }
    shares.sort_by(|a, b| b.1.total_cmp(&a.1));
    shares
}

/// One line of `perf report`: its share of the samples and the sort keys' values.
struct Row {
    share: f64,
    columns: Vec<String>,
}

/// `perf report --sort <keys>` as rows, those under `min_share` percent left out.
fn perf_report(data: &str, keys: &str, min_share: &str) -> Result<Vec<Row>> {
    let out = perf()
        .args([
            "report",
            "--stdio",
            "--no-children",
            "-g",
            "none",
            "-t",
            "\t",
            "--sort",
            keys,
        ])
        .args(["--percent-limit", min_share, "-i", data])
        .stderr(Stdio::null())
        .output()
        .context("running perf report")?;
    if !out.status.success() {
        bail!("perf report on {data} failed ({})", out.status);
    }
    Ok(parse_report(&String::from_utf8_lossy(&out.stdout)))
}

/// The data lines of `perf report -t '\t'` ('#' lines are its header), e.g.
/// `12.50%\ttokio-rt-worker\tp2p-usb-server\t[.] memcpy`.
fn parse_report(text: &str) -> Vec<Row> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let mut fields = l.split('\t').map(str::trim);
            let share = fields.next()?.strip_suffix('%')?.parse().ok()?;
            Some(Row {
                share,
                columns: fields.map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// The blocks of a `perf report -g` listing (a share line, then its call chain, then a blank
/// line) whose symbol is the kernel's (`[k]`) in one of the daemons' threads, without blank
/// lines.
fn kernel_chains(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut keep = false;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if line.trim().is_empty() {
            keep = false;
        } else if line
            .trim_start()
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
        {
            keep = line.contains("[k]") && DAEMON_THREADS.iter().any(|t| line.contains(t));
            if keep {
                lines.push(line);
            }
        } else if keep && line.trim() != "|" {
            lines.push(line);
        }
    }
    lines
}

/// A metric name part from a thread and binary: lowercase letters, digits and `_` only.
fn metric_key(columns: &[String]) -> String {
    columns
        .join("_")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect::<String>()
        .split('_')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_parse_and_headers_do_not() {
        let text = "# Samples: 10K of event 'cpu-clock'\n#\n\
                    \x20   12.50%\ttokio-rt-worker\tp2p-usb-server\n\
                    \x20    3.10%\tswapper\t[kernel.kallsyms]\n\n";
        let rows = parse_report(text);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].share, 12.5);
        assert_eq!(rows[1].columns, ["swapper", "[kernel.kallsyms]"]);
        assert_eq!(metric_key(&rows[1].columns), "swapper_kernel_kallsyms");
    }

    #[test]
    fn only_the_daemons_kernel_chains_are_kept() {
        let text = "# header\n\
                    \x20   12.50%  tokio-rt-worker  [k] copy_user_enhanced_fast_string\n\
                    \x20           |\n\
                    \x20           ---copy_user_enhanced_fast_string\n\
                    \x20              udp_sendmsg\n\
                    \n\
                    \x20    9.00%  p2p-usb-client  [.] _aesni_ctr32_ghash_6x\n\
                    \x20           ---_aesni_ctr32_ghash_6x\n\
                    \n\
                    \x20    3.00%  swapper  [k] native_safe_halt\n\
                    \x20           ---native_safe_halt\n";
        let chains = kernel_chains(text);
        assert_eq!(chains.len(), 3, "{chains:?}");
        assert!(chains[0].contains("copy_user"));
        assert!(chains[2].contains("udp_sendmsg"));
    }

    #[test]
    fn samples_sum_by_kind_of_work() {
        let row = |share: f64, cols: [&str; 3]| Row {
            share,
            columns: cols.map(str::to_owned).to_vec(),
        };
        let symbols = [
            row(
                10.0,
                [
                    "p2p-usb-client",
                    "p2p-usb-client",
                    "[.] _aesni_ctr32_ghash_6x",
                ],
            ),
            row(
                3.0,
                [
                    "tokio-rt-worker",
                    "p2p-usb-server",
                    "[.] chacha20_poly1305_open_avx2",
                ],
            ),
            row(
                2.0,
                [
                    "tokio-rt-worker",
                    "[kernel.kallsyms]",
                    "[k] clear_page_erms",
                ],
            ),
            row(
                1.5,
                ["p2p-usb-client", "libc.so.6", "[.] 0x0000000000152d8a"],
            ),
            row(
                1.0,
                ["p2p-usb-client", "[kernel.kallsyms]", "[k] udp_sendmsg"],
            ),
            row(
                1.0,
                ["swapper", "[kernel.kallsyms]", "[k] native_safe_halt"],
            ),
            row(
                0.5,
                [
                    "p2p-usb-client",
                    "p2p-usb-client",
                    "[.] noq_proto::Connection::poll",
                ],
            ),
            row(0.25, ["lab-guest", "lab-guest", "[.] main"]),
        ];
        let kinds = by_kind(&symbols);
        assert_eq!(kinds[0], ("crypto", 13.0));
        let get = |k: &str| kinds.iter().find(|(n, _)| *n == k).map(|(_, s)| *s);
        assert_eq!(get("page_alloc_zero_fault"), Some(2.0));
        assert_eq!(get("copies"), Some(1.5));
        assert_eq!(get("kernel_network"), Some(1.0));
        assert_eq!(get("idle"), Some(1.0));
        assert_eq!(get("quic"), Some(0.5));
        assert_eq!(get("other_processes"), Some(0.25));
    }
}
