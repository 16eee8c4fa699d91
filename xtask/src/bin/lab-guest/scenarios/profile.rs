//! Where the CPU goes on our path, by thread, binary and symbol, kernel included: `perf record`
//! samples the whole guest while ours reads the bench's disk at RTT 0, then while it writes it,
//! once with the suite this CPU picks (AES-GCM) and once with ChaCha20-Poly1305.
//! Under TCG our path is CPU-bound (kernel-notes/LAB.md), so this profile is what says which
//! code to make cheaper, and why writes cost more than reads. `cargo xtask bench profile`
//! prints the split as a table; the symbol lists stay in this scenario's log.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::bench::{attach_ours, cpu_secs};
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
/// The daemons' busy threads: the server's runtime workers, the client's runtime (its main
/// thread) and the client's io_uring pump.
const DAEMON_THREADS: &str = "tokio-rt-worker,p2p-usb-client,vhci-uring,nusb-events";

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
    for (suite, env) in [
        ("aes", &[][..]),
        ("chacha20", &[("P2P_USB_CLIENT_CONFIG", CHACHA_CONFIG)][..]),
    ] {
        let ours = attach_ours(&gadget, pair.as_ref(), env)?;
        // One unrecorded pass first: the connection's windows open and read-ahead settles.
        bench::read_mib_s(&ours.disk, 8 * MIB)?;
        for (what, io) in [
            ("read", bench::read_mib_s as fn(&Path, usize) -> Result<f64>),
            ("write", bench::write_mib_s),
        ] {
            let data = format!("/tmp/perf-{suite}-{what}.data");
            let cpu = || cpu_secs(ours.server.pid()) + cpu_secs(ours.client.pid());
            let before = cpu();
            let recording = Recording::start(&data)?;
            let mib_s = io(&ours.disk, SIZE);
            recording.stop()?;
            let mib_s = mib_s?;
            let per_gib = (cpu() - before) / (SIZE as f64 / (1024.0 * MIB as f64));
            log!(
                "ours ({suite}) rtt 0 ms {what}: {mib_s:.1} MiB/s, daemons {per_gib:.0} CPU s per GiB, while recorded"
            );
            metric(&format!("profile_{suite}_{what}_mib_s"), mib_s);
            metric(
                &format!("profile_{suite}_{what}_cpu_secs_per_gib"),
                per_gib.round(),
            );
            report(&format!("{suite}_{what}"), &data)?;
        }
        ours.detach()?;
    }
    Ok(())
}

/// `perf record` over the whole guest, stopped with SIGINT so it writes its file out.
struct Recording(Child);

impl Recording {
    fn start(data: &str) -> Result<Recording> {
        let child = Command::new(PERF)
            .args([
                "record",
                "-a",
                "-e",
                "cpu-clock",
                "-F",
                FREQ,
                "-N",
                "-q",
                "-o",
            ])
            .arg(data)
            .env("HOME", "/tmp")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record")?;
        // perf opens its events and mmaps its buffers before it samples anything.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Recording(child))
    }

    fn stop(mut self) -> Result<()> {
        sys::run(sys::bb("kill").args(["-INT", &self.0.id().to_string()]))?;
        let status = sys::wait_for("perf record to finish", Duration::from_secs(60), || {
            self.0.try_wait().ok().flatten()
        })?;
        // perf exits with the signal's status when it was interrupted; its file says the rest.
        log!("perf record ended: {status}");
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
    log!("ours {what}, top symbols by thread and binary:");
    for row in perf_report(data, "comm,dso,sym", "0.3")?
        .iter()
        .take(TOP_SYMBOLS)
    {
        log!("  {:>6.2}%  {}", row.share, row.columns.join("  "));
    }
    // What the daemons' kernel time is doing: the calls that lead to each costly symbol.
    log!("ours {what}, the daemons' kernel symbols and their callers:");
    let out = Command::new(PERF)
        .args(["report", "--stdio", "--no-children", "--sort", "comm,sym"])
        .args(["--comms", DAEMON_THREADS, "--dsos", "[kernel.kallsyms]"])
        .args(["--percent-limit", "1", "-g", "caller,0.5,callee,function"])
        .args(["-i", data])
        .env("HOME", "/tmp")
        .output()
        .context("running perf report")?;
    if !out.status.success() {
        log!(
            "  perf report failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty() && l.trim() != "|")
        .take(CALLER_LINES)
    {
        log!("  {line}");
    }
    Ok(())
}

/// One line of `perf report`: its share of the samples and the sort keys' values.
struct Row {
    share: f64,
    columns: Vec<String>,
}

/// `perf report --sort <keys>` as rows, those under `min_share` percent left out.
fn perf_report(data: &str, keys: &str, min_share: &str) -> Result<Vec<Row>> {
    let out = Command::new(PERF)
        .args([
            "report",
            "--stdio",
            "--no-children",
            "-t",
            "\t",
            "--sort",
            keys,
        ])
        .args(["--percent-limit", min_share, "-i", data])
        .env("HOME", "/tmp")
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
}
