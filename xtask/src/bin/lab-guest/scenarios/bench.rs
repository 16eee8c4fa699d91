//! Side by side in one boot, against the same gadget, at netem round trips of 0, 2 and 20 ms:
//! the kernel's own USB/IP on loopback (fast, but neither encrypted nor authenticated: the
//! ceiling), the kernel's USB/IP inside WireGuard between two namespaces on a veth pair (what a
//! careful user runs: the anchor to beat), and our tunnel over that same veth pair. `cargo xtask bench` turns
//! the metrics into the comparison table.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::project::{
    Daemon, client, client_id, client_log, log_count, program_in, show_client_log,
    spawn_client_with, start_server_in, vhci_port_in_use, vhci_ports_in_use,
};
use crate::bench::{self, MIB};
use crate::gadget::Gadget;
use crate::report::{log, metric};
use crate::usbdev::{self, Via};
use crate::wgnet::{self, WirePair};
use crate::{modules, netem, sys};

const SIZE: usize = 64 * MIB;
const USBIP: &str = "/usr/sbin/usbip";
/// Round trips measured, in ms, with the bytes each sequential run moves and the runs (fewer
/// on slow links so the whole bench stays within a few minutes, but at 20 ms still 8 MiB: at 4
/// a good part of each run was both sides' congestion windows still opening).
const RTTS: &[(u64, usize, usize)] = &[(0, 32 * MIB, 3), (2, 16 * MIB, 1), (20, 8 * MIB, 1)];
/// Small reads per latency measurement.
const SMALL_READS: usize = 60;

/// Where a path's round trip is made: `lo` (plain USB/IP, the unencrypted ceiling) or the
/// veth pair between the bench's two namespaces (USB/IP inside WireGuard, and ours).
#[derive(Clone, Copy)]
enum Link<'a> {
    Lo,
    Pair(&'a WirePair),
}

impl Link<'_> {
    fn set_rtt(self, rtt_ms: u64) -> Result<()> {
        match self {
            // Loopback traffic crosses `lo` twice: half the round trip each way.
            Link::Lo if rtt_ms == 0 => netem::clear(),
            Link::Lo => netem::set(Duration::from_micros(rtt_ms * 500), 0.0),
            Link::Pair(pair) => pair.set_rtt(Duration::from_millis(rtt_ms)),
        }
    }
}

/// Measure the kernel's USB/IP on `lo`, the kernel's USB/IP inside WireGuard, then ours over the
/// same veth pair, at each round trip.
pub fn run() -> Result<()> {
    modules::load(modules::STORAGE)?;
    modules::load(modules::USBIP)?;
    modules::load(modules::NETEM)?;
    let backing = Path::new("/tmp/bench.img");
    bench::pattern_file(backing, SIZE, 0xbe)?;
    let gadget = Gadget::local_disk(backing)?;

    kernel_usbip("kernel", &gadget, None, "127.0.0.1", Link::Lo)?;
    let pair = if wgnet::available() {
        Some(WirePair::build()?)
    } else {
        log!("no wireguard module or wg in this lab: the WireGuard anchor is skipped");
        None
    };
    if let Some(pair) = &pair {
        kernel_usbip(
            "kernelwg",
            &gadget,
            Some((wgnet::SERVER_NS, wgnet::CLIENT_NS)),
            wgnet::SERVER_WG_IP,
            Link::Pair(pair),
        )?;
    }

    let ours = attach_ours(&gadget, pair.as_ref(), &[])?;
    measure(
        "ours",
        &ours.disk,
        ours.link,
        Some((&ours.server, &ours.client)),
    )?;
    ours.detach(RTTS.iter().map(|&(_, size, runs)| size * runs).sum())
}

/// Our two daemons with the gadget attached through them, over the bench's veth pair when
/// there is one: what the bench measures and what `profile` records.
pub(super) struct Ours<'a> {
    pub server: Daemon,
    pub client: Daemon,
    pub disk: PathBuf,
    link: Link<'a>,
}

/// Shares the gadget and attaches it with no client flags: what a user gets (read-ahead and
/// 1 MiB SCSI commands are the defaults). `client_env` is more environment for the client.
pub(super) fn attach_ours<'a>(
    gadget: &Gadget,
    pair: Option<&'a WirePair>,
    client_env: &[(&str, &str)],
) -> Result<Ours<'a>> {
    let vid_pid = gadget.vid_pid();
    let friend = client_id("friend")?;
    let (server_ns, client_ns, bind, link) = match pair {
        Some(pair) => (
            Some(wgnet::SERVER_NS),
            Some(wgnet::CLIENT_NS),
            format!("{}:7788", wgnet::SERVER_VETH_IP),
            Link::Pair(pair),
        ),
        None => (None, None, "127.0.0.1:0".to_owned(), Link::Lo),
    };
    let (server, ticket) =
        start_server_in(server_ns, &bind, &["--share", &vid_pid, "--allow", &friend])?;
    let client = spawn_client_with(
        client_ns,
        "friend",
        client_env,
        &["attach", &ticket, "--device", &vid_pid],
    )?;
    let disk =
        match usbdev::wait_block_device(gadget.vid, gadget.pid, Via::Vhci, Duration::from_secs(30))
        {
            Ok(d) => d,
            Err(e) => {
                show_client_log("friend");
                return Err(e);
            }
        };
    // The client raises the disk's SCSI command size just after it appears: measure what a
    // user gets from then on, not the moment before.
    usbdev::wait_max_sectors(&disk, 2048).inspect_err(|_| show_client_log("friend"))?;
    log!("ours: {} {}", disk.display(), usbdev::queue_limits(&disk));
    Ok(Ours {
        server,
        client,
        disk,
        link,
    })
}

impl Ours<'_> {
    /// Detaches, then logs what read-ahead did and the connection's packet counts, loss and
    /// final congestion window as each side saw them (each side's loss is its own sending's).
    /// `written`, the bytes written through the attachment in whole direct 1 MiB writes, with
    /// the write commands the client counted, gives the size of a command: vhci's 32
    /// scatter-gather segments make it anything from 128 KiB to 1 MiB (kernel-notes/LAB.md).
    pub(super) fn detach(mut self, written: usize) -> Result<()> {
        let (ok, _, err) = client("friend", &["detach", &vhci_port_in_use()?])?;
        ensure!(ok, "detach failed: {err}");
        // `attach` closes its connection and exits once its only device is detached.
        self.client.wait_exit(Duration::from_secs(10));
        drop(self.client);
        // What read-ahead did (its counts, and why it stopped if it did), and the client's
        // connection totals.
        for line in client_log("friend")
            .lines()
            .filter(|l| l.contains("read-ahead") || l.contains("disconnected"))
        {
            log!("client: {}", line.trim());
            if let Some(commands) = log_count(line, "write_cbws_ahead").filter(|&n| n > 0) {
                let kib = written as f64 / 1024.0 / commands as f64;
                log!(
                    "ours: {commands} write commands for {} MiB, {kib:.0} KiB each",
                    written / MIB
                );
                metric("ours_kib_per_write_command", kib.round());
            }
        }
        let line = sys::wait_for(
            "the server to log the disconnect",
            Duration::from_secs(10),
            || {
                fs::read_to_string("/tmp/server.log")
                    .ok()?
                    .lines()
                    .find(|l| l.contains("disconnected"))
                    .map(str::to_owned)
            },
        );
        if let Ok(line) = line {
            log!("server: {}", line.trim());
        }
        Ok(())
    }
}

/// The kernel's own USB/IP, recorded as `who`: `usbipd` (in the server namespace, if given)
/// exports the gadget, `usbip attach` (in the client namespace) imports it from `server_ip`.
fn kernel_usbip(
    who: &str,
    gadget: &Gadget,
    namespaces: Option<(&str, &str)>,
    server_ip: &str,
    link: Link,
) -> Result<()> {
    let busid = gadget.busid()?;
    let (server_ns, client_ns) = namespaces.unzip();
    {
        let _usbipd = Killed(
            program_in(server_ns, "/usr/sbin/usbipd")
                .arg("-4")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        sys::wait_for("usbipd", Duration::from_secs(20), || {
            program_in(client_ns, USBIP)
                .args(["list", "-r", server_ip])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        })?;
        sys::run(Command::new(USBIP).args(["bind", "-b", &busid]))?;
        sys::run(program_in(client_ns, USBIP).args(["attach", "-r", server_ip, "-b", &busid]))?;
        let disk =
            usbdev::wait_block_device(gadget.vid, gadget.pid, Via::Vhci, Duration::from_secs(20))?;
        measure(who, &disk, link, None)?;
        detach_all_usbip()?;
        sys::run(Command::new(USBIP).args(["unbind", "-b", &busid]))?;
    }
    usbdev::wait_block_device(gadget.vid, gadget.pid, Via::Dummy, Duration::from_secs(15))
        .with_context(|| format!("the gadget did not come back after {who}'s USB/IP"))?;
    Ok(())
}

/// Reads, writes and small-read latency at every round trip, recorded as `<who>_<what>_rtt<ms>`;
/// then CPU seconds per GiB moved: our two daemons' own (`procs`), or for the kernel's path
/// the guest's system, irq and softirq time.
fn measure(who: &str, disk: &Path, link: Link, procs: Option<(&Daemon, &Daemon)>) -> Result<()> {
    let cpu_before = cpu_of(procs);
    let pids: Vec<(&str, u32)> = procs
        .map(|(s, c)| vec![("server", s.pid()), ("client", c.pid())])
        .unwrap_or_default();
    log_peaks(&format!("{who} idle"), &pids);
    let mut moved = 0usize;
    for &(rtt, size, runs) in RTTS {
        link.set_rtt(rtt)?;
        let result = (|| -> Result<()> {
            // Reads, then writes, each with its own CPU split: the two directions cost
            // differently, and the split says on which side.
            let before_reads = CpuSplit::take(&pids);
            let reads = (0..runs)
                .map(|_| bench::read_mib_s(disk, size))
                .collect::<Result<Vec<_>>>()?;
            let before_writes = CpuSplit::take(&pids);
            let writes = (0..runs)
                .map(|_| bench::write_mib_s(disk, size))
                .collect::<Result<Vec<_>>>()?;
            let after_writes = CpuSplit::take(&pids);
            moved += 2 * size * runs;
            let (read, write) = (bench::median(reads), bench::median(writes));
            let (p50, p99) = small_read_latency(disk, SIZE)?;
            log!(
                "{who} rtt {rtt} ms, where the CPU went reading {} MiB:",
                size * runs / MIB
            );
            before_writes.log_since(&before_reads);
            log!(
                "{who} rtt {rtt} ms, where the CPU went writing {} MiB:",
                size * runs / MIB
            );
            after_writes.log_since(&before_writes);
            // Which load sets a daemon's peak: the peak so far, after each round trip's run.
            log_peaks(&format!("{who} rtt {rtt} ms"), &pids);
            log!(
                "{who} rtt {rtt} ms: read {read} MiB/s, write {write} MiB/s, 4 KiB read p50 {p50:.2} ms p99 {p99:.2} ms"
            );
            metric(&format!("{who}_read_mib_s_rtt{rtt}"), read);
            metric(&format!("{who}_write_mib_s_rtt{rtt}"), write);
            metric(&format!("{who}_small_read_p50_ms_rtt{rtt}"), p50);
            metric(&format!("{who}_small_read_p99_ms_rtt{rtt}"), p99);
            Ok(())
        })();
        link.set_rtt(0)?;
        result?;
    }
    let cpu = cpu_of(procs) - cpu_before;
    let gib = moved as f64 / (1024.0 * MIB as f64);
    metric(
        &format!("{who}_cpu_secs_per_gib"),
        (cpu / gib * 100.0).round() / 100.0,
    );
    log!("{who}: {:.1} CPU s per GiB", cpu / gib);
    if let Some((server, client)) = procs {
        metric(&format!("{who}_server_rss_mib"), peak_rss_mib(server.pid()));
        metric(&format!("{who}_client_rss_mib"), peak_rss_mib(client.pid()));
        log!(
            "{who}: peak RSS server {:.1} MiB, client {:.1} MiB; now server {}, client {}",
            peak_rss_mib(server.pid()),
            peak_rss_mib(client.pid()),
            rss_split(server.pid()),
            rss_split(client.pid())
        );
    }
    Ok(())
}

/// CPU seconds so far: the two daemons' user and system time, or without them the guest's
/// system, irq and softirq time (where the kernel's USB/IP, TCP and WireGuard run).
fn cpu_of(procs: Option<(&Daemon, &Daemon)>) -> f64 {
    match procs {
        Some((server, client)) => cpu_secs(server.pid()) + cpu_secs(client.pid()),
        None => {
            let tick = guest_secs();
            tick(2) + tick(5) + tick(6)
        }
    }
}

/// p50 and p99 of 4 KiB O_DIRECT reads spread over the disk's first `span` bytes: three URB
/// round trips each (command, data, status), so this is what a small-I/O user feels.
pub(super) fn small_read_latency(disk: &Path, span: usize) -> Result<(f64, f64)> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(bench::O_DIRECT)
        .open(disk)?;
    let mut storage = vec![0u8; 8192];
    let off = storage.as_ptr().align_offset(4096);
    let buf = &mut storage[off..off + 4096];
    let mut times = Vec::with_capacity(SMALL_READS);
    for i in 0..SMALL_READS {
        let at = ((i * 7919) % (span / 4096)) as u64 * 4096;
        let t = Instant::now();
        f.read_exact_at(buf, at)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Ok((
        (at(0.5) * 100.0).round() / 100.0,
        (at(0.99) * 100.0).round() / 100.0,
    ))
}

/// The fields of a `/proc/.../stat` line after the parenthesised command name (which may hold
/// spaces): index 7 is minor page faults, 11 utime, 12 stime (in clock ticks).
fn stat_fields(path: &str) -> Vec<f64> {
    let stat = fs::read_to_string(path).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0))
        .collect()
}

/// User plus system CPU seconds of a process so far.
pub(super) fn cpu_secs(pid: u32) -> f64 {
    let f = stat_fields(&format!("/proc/{pid}/stat"));
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

/// The whole guest's CPU seconds so far by the index of the first line of /proc/stat: 0 user,
/// 1 nice, 2 system, 3 idle, 4 iowait, 5 irq, 6 softirq.
fn guest_secs() -> impl Fn(usize) -> f64 {
    let line = fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = line
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    move |i| ticks.get(i).unwrap_or(&0.0) / 100.0
}

/// Where CPU time goes: user and system seconds and minor page faults per thread name of each
/// process (tokio's workers share one name and are summed), and the whole guest's split from
/// `/proc/stat`. Under TCG our path is CPU-bound, so this says which part to make cheaper. The
/// faults were a suspect (each daemon faults in every 1 MiB URB buffer afresh); taking them
/// away did not move the CPU time (kernel-notes/LAB.md).
#[derive(Default)]
struct CpuSplit(BTreeMap<String, (f64, f64, f64)>);

impl CpuSplit {
    fn take(procs: &[(&str, u32)]) -> CpuSplit {
        let mut split = BTreeMap::new();
        for &(who, pid) in procs {
            let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let dir = task.path();
                let name = fs::read_to_string(dir.join("comm")).unwrap_or_default();
                let f = stat_fields(&dir.join("stat").to_string_lossy());
                let e = split
                    .entry(format!("{who}/{}", name.trim()))
                    .or_insert((0.0, 0.0, 0.0));
                e.0 += f.get(11).unwrap_or(&0.0) / 100.0;
                e.1 += f.get(12).unwrap_or(&0.0) / 100.0;
                e.2 += f.get(7).unwrap_or(&0.0);
            }
        }
        let tick = guest_secs();
        split.insert("guest/user+nice".into(), (tick(0) + tick(1), 0.0, 0.0));
        split.insert("guest/system".into(), (0.0, tick(2), 0.0));
        split.insert("guest/irq+softirq".into(), (0.0, tick(5) + tick(6), 0.0));
        split.insert("guest/idle+iowait".into(), (tick(3) + tick(4), 0.0, 0.0));
        CpuSplit(split)
    }

    /// Logs what was spent since `before`, largest first.
    fn log_since(&self, before: &CpuSplit) {
        let mut spent: Vec<(&String, f64, f64, f64)> = self
            .0
            .iter()
            .map(|(k, &(u, s, f))| {
                let (bu, bs, bf) = before.0.get(k).copied().unwrap_or((0.0, 0.0, 0.0));
                (k, u - bu, s - bs, f - bf)
            })
            .filter(|&(_, u, s, _)| u + s >= 0.01)
            .collect();
        spent.sort_by(|a, b| (b.1 + b.2).total_cmp(&(a.1 + a.2)));
        for (name, user, sys, faults) in spent {
            if name.starts_with("guest/") {
                log!("cpu {name}: user {user:.2} s, system {sys:.2} s");
            } else {
                log!("cpu {name}: user {user:.2} s, system {sys:.2} s, {faults} page faults");
            }
        }
    }
}

/// A process's resident memory now, split into its own (heap, stacks) and its binary's pages
/// it touched: which of the two a peak RSS is made of. The guest runs binaries from its
/// initramfs, whose pages count as shared memory there rather than as file pages.
fn rss_split(pid: u32) -> String {
    format!(
        "anon {:.1} MiB + file {:.1} MiB + shmem {:.1} MiB",
        status_mib(pid, "RssAnon:"),
        status_mib(pid, "RssFile:"),
        status_mib(pid, "RssShmem:")
    )
}

/// Each daemon's peak RSS so far and what it holds now, under `when`.
fn log_peaks(when: &str, pids: &[(&str, u32)]) {
    for &(name, pid) in pids {
        log!(
            "{when}: {name} peak RSS so far {:.1} MiB, now {}",
            peak_rss_mib(pid),
            rss_split(pid)
        );
    }
}

/// Peak resident set size of a process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    (status_mib(pid, "VmHWM:") * 10.0).round() / 10.0
}

/// A `kB` field of `/proc/<pid>/status`, in MiB (0 if missing).
fn status_mib(pid: u32, field: &str) -> f64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn detach_all_usbip() -> Result<()> {
    let port = vhci_port_in_use()?;
    sys::run(Command::new(USBIP).args(["detach", "-p", &port]))?;
    sys::wait_for(
        "the USB/IP disk to go away",
        Duration::from_secs(10),
        || {
            vhci_ports_in_use()
                .ok()
                .filter(|(used, _)| *used == 0)
                .map(|_| ())
        },
    )?;
    Ok(())
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
