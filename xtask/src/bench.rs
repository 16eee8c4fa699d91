//! `cargo xtask bench`: the figures we claim, measured, as tables.
//!
//! - `bench lab` (the default): one VM boot runs the guest's `bench` scenario, the kernel's own
//!   USB/IP and our tunnel side by side on the same gadget, at netem round trips of 0, 2 and
//!   20 ms; the table gives each figure for both and the ratio ours/kernel.
//! - `bench net`: USB network adapters (the configfs ECM, ECM subset, EEM, NCM and RNDIS
//!   functions) through the kernel's USB/IP and through ours in one boot: ping round trip and
//!   TCP MiB/s each way across the adapter, from the device-kind suite's network scenarios.
//! - `bench tunnel`: on this host's loopback, our whole userspace path (client → iroh → server →
//!   simulated disk → back) against a bare iroh round trip, so what we add per URB is visible.
//! - `bench profile`: `perf` over the whole lab guest while ours reads and writes at RTT 0, with
//!   each cipher suite: where the CPU goes by kind of work and by thread, the symbols and the
//!   kernel's call chains in the guest log. Under TCG our path is CPU-bound, so this is the map
//!   for making it cheaper.
//!
//! Both write JSON and the lab bench an SVG chart under `target/bench/`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{RunArgs, lab};
use xtask::cmdline::DAEMON_ENV;

/// Which bench to run.
#[derive(clap::Subcommand, Clone, Copy)]
pub enum Target {
    /// The kernel's USB/IP and ours side by side in the lab VM (the default).
    Lab,
    /// USB network adapters through the kernel's USB/IP and ours: ping RTT, TCP MiB/s.
    Net,
    /// Our userspace path on host loopback against a bare iroh round trip.
    Tunnel,
    /// Where ours spends the CPU in the lab at RTT 0, reading and writing: `perf` over the whole
    /// guest, by thread and binary (the symbols are in the guest's log above the table).
    Profile,
}

/// Runs a bench and prints its table.
pub fn bench(target: Option<Target>) -> Result<()> {
    let out = lab::workspace().join("target/bench");
    fs::create_dir_all(&out)?;
    match target.unwrap_or(Target::Lab) {
        Target::Lab => lab_bench(&out),
        Target::Net => net_bench(&out),
        Target::Tunnel => tunnel_bench(&out),
        Target::Profile => profile(&out),
    }
}

/// The network kinds of the device-kind suite, in its order.
const NET_KINDS: &[&str] = &["ecm", "ecm-subset", "eem", "ncm", "rndis"];

fn net_bench(out: &Path) -> Result<()> {
    let args = RunArgs {
        scenarios: vec!["kinds-net".into(), "kinds-net2".into()],
        timeout_secs: 600,
        keep_going: true,
        accel: lab::vm::Accel::Auto,
        results: None,
        build: true,
    };
    let report = lab::run_report(&args)?;
    let metrics = metrics_of(&report.results);
    println!();
    println!(
        "{:<34} {:>10} {:>10} {:>8}",
        "USB network adapters (TCG lab)", "kernel", "ours", "ours/k"
    );
    let mut rows = Vec::new();
    for kind in NET_KINDS {
        for (figure, unit, higher_is_better) in [
            ("ping_ms", "ping RTT ms", false),
            ("to_gadget_mib_s", "TCP to device MiB/s", true),
            ("from_gadget_mib_s", "TCP from device MiB/s", true),
        ] {
            let key = |route: &str| format!("kind_{}_{route}_{figure}", kind.replace('-', "_"));
            let (k, o) = (
                metrics.get(&key("kernel")).copied(),
                metrics.get(&key("ours")).copied(),
            );
            let ratio = match (k, o) {
                (Some(k), Some(o)) if k > 0.0 => Some(o / k),
                _ => None,
            };
            println!(
                "{:<34} {:>10} {:>10} {:>8}",
                format!("{kind} {unit}"),
                fmt(k),
                fmt(o),
                ratio.map_or("-".into(), |r| format!("{r:.2}x"))
            );
            rows.push(
                json!({"kind": kind, "metric": figure, "kernel": k, "ours": o,
                "ratio": ratio, "higher_is_better": higher_is_better}),
            );
        }
    }
    let json_path = out.join("net.json");
    fs::write(
        &json_path,
        serde_json::to_string_pretty(&json!({"rows": rows}))?,
    )?;
    println!("\nwrote {}", json_path.display());
    if let Some(failure) = report.failure {
        bail!("a network kind failed: {failure}");
    }
    Ok(())
}

/// The guest's `profile` scenario as a table, a column per variant and direction: the
/// figures (MiB/s, CPU per GiB, drops), then the share of all samples by kind of work and by
/// thread and binary.
fn profile(out: &Path) -> Result<()> {
    let metrics = scenario_metrics("profile", 900)?;
    // Columns: each suite reading, then writing.
    let columns: Vec<String> = PROFILE_SUITES
        .iter()
        .flat_map(|suite| ["read", "write"].map(|dir| format!("profile_{suite}_{dir}_")))
        .collect();
    let mut rows: BTreeMap<&str, Vec<Option<f64>>> = BTreeMap::new();
    for (key, &value) in &metrics {
        for (i, prefix) in columns.iter().enumerate() {
            if let Some(row) = key.strip_prefix(prefix.as_str()) {
                rows.entry(row).or_insert_with(|| vec![None; columns.len()])[i] = Some(value);
            }
        }
    }
    // The figures first, then the kinds of work, then threads and binaries; each by size.
    let figures = [
        ("mib_s", "MiB/s while recorded"),
        ("cpu_secs_per_gib", "daemons' CPU s per GiB"),
        ("rcvbuf_drops", "UDP drops, receive buffer full"),
        ("backlog_drops", "drops, input backlog full"),
        ("iroh_send_drops", "client transmits iroh dropped"),
    ];
    let (kinds, threads) = (figures.len(), figures.len() + 1);
    let section = |row: &str| match figures.iter().position(|(f, _)| *f == row) {
        Some(i) => i,
        None if row.starts_with("kind_") => kinds,
        None => threads,
    };
    let mut rows: Vec<_> = rows.into_iter().collect();
    rows.sort_by(|a, b| {
        let total = |values: &Vec<Option<f64>>| -> f64 { values.iter().flatten().sum() };
        section(a.0)
            .cmp(&section(b.0))
            .then(total(&b.1).total_cmp(&total(&a.1)))
    });
    println!();
    print!("{:<40}", "ours at RTT 0 (TCG lab)");
    for suite in PROFILE_SUITES {
        print!(
            " {:>18} {:>18}",
            format!("{suite} rd"),
            format!("{suite} wr")
        );
    }
    println!();
    let mut last_section = None;
    for (row, values) in &rows {
        let this = section(row);
        if last_section != Some(this) {
            if this == kinds {
                println!("% of guest CPU samples, by kind of work:");
            } else if this == threads {
                println!(
                    "% of guest CPU samples, by thread_binary (kernel_kallsyms: its kernel time):"
                );
            }
            last_section = Some(this);
        }
        let label = match figures.iter().find(|(f, _)| f == row) {
            Some((_, label)) => label,
            None => row.strip_prefix("kind_").unwrap_or(row),
        };
        print!("{label:<40}");
        for v in values {
            print!(" {:>18}", fmt(*v));
        }
        println!();
    }
    println!("(the top symbols and the kernel's call chains are in the guest log above)");
    let json_path = out.join("profile.json");
    let json_rows: Vec<Value> = rows
        .iter()
        .map(|(row, values)| json!({"row": row, "columns": columns, "values": values}))
        .collect();
    fs::write(
        &json_path,
        serde_json::to_string_pretty(&json!({"rows": json_rows}))?,
    )?;
    println!("\nwrote {}", json_path.display());
    Ok(())
}

/// What the guest's `profile` scenario records, in its metric names: the suite this CPU picks
/// (AES-GCM), the same with iroh's send-side trace log (which counts the transmits it drops),
/// and ChaCha20-Poly1305.
const PROFILE_SUITES: [&str; 3] = ["aes", "aes_iroh_trace", "chacha20"];

/// Builds the lab, runs one scenario in it and returns its metrics, or why it failed.
fn scenario_metrics(name: &str, timeout_secs: u64) -> Result<BTreeMap<String, f64>> {
    let args = RunArgs {
        scenarios: vec![name.into()],
        timeout_secs,
        keep_going: false,
        accel: lab::vm::Accel::Auto,
        results: None,
        build: true,
    };
    let report = lab::run_report(&args)?;
    if let Some(failure) = report.failure {
        bail!("the {name} scenario failed: {failure}");
    }
    Ok(metrics_of(&report.results))
}

fn lab_bench(out: &Path) -> Result<()> {
    let metrics = scenario_metrics("bench", 1800)?;
    let get = |k: &str| metrics.get(k).copied();

    let mut rows = Vec::new();
    println!();
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "lab (TCG, -smp 1)", "kernel", "kernel+wg", "ours", "ours/wg", "ours/k"
    );
    let ratio = |o: Option<f64>, base: Option<f64>| match (o, base) {
        (Some(o), Some(b)) if b > 0.0 => Some(o / b),
        _ => None,
    };
    let shown = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.2}x"));
    for rtt in [0, 2, 20] {
        for (what, unit, higher_is_better) in [
            ("read_mib_s", "read MiB/s", true),
            ("write_mib_s", "write MiB/s", true),
            ("small_read_p50_ms", "4 KiB read p50 ms", false),
            ("small_read_p99_ms", "4 KiB read p99 ms", false),
        ] {
            let key = |who: &str| format!("{who}_{what}_rtt{rtt}");
            let (k, wg, o) = (
                get(&key("kernel")),
                get(&key("kernelwg")),
                get(&key("ours")),
            );
            let label = format!("RTT {rtt:>2} ms {unit}");
            println!(
                "{label:<28} {:>9} {:>9} {:>9} {:>8} {:>8}",
                fmt(k),
                fmt(wg),
                fmt(o),
                shown(ratio(o, wg)),
                shown(ratio(o, k)),
            );
            rows.push(
                json!({"rtt_ms": rtt, "metric": what, "kernel": k, "kernel_wireguard": wg,
                "ours": o, "ratio_wireguard": ratio(o, wg), "ratio": ratio(o, k),
                "higher_is_better": higher_is_better}),
            );
        }
    }
    let cpu = |who: &str| get(&format!("{who}_cpu_secs_per_gib"));
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "CPU s per GiB",
        fmt(cpu("kernel")),
        fmt(cpu("kernelwg")),
        fmt(cpu("ours")),
        shown(ratio(cpu("ours"), cpu("kernelwg"))),
        shown(ratio(cpu("ours"), cpu("kernel"))),
    );
    for (key, label) in [
        ("ours_server_rss_mib", "our server peak RSS MiB"),
        ("ours_client_rss_mib", "our client peak RSS MiB"),
        // The kernel's commands are 120 KiB (usb-storage's cap); ours between 128 KiB and
        // 1 MiB, as contiguous as the writer's pages are (vhci's 32 segments).
        ("ours_kib_per_write_command", "our KiB per write command"),
    ] {
        println!("{label:<28} {:>9} {:>9} {:>9}", "", "", fmt(get(key)));
    }
    println!(
        "(kernel: USB/IP on lo, unencrypted; kernel+wg: USB/IP inside WireGuard on a veth pair; ours: the same veth pair; CPU: ours both daemons, the kernel's system + irq + softirq)"
    );
    println!("\ngoals (issue 21):");
    let rw = |who: &str, dir: &str, rtt: u32| get(&format!("{who}_{dir}_mib_s_rtt{rtt}"));
    let goals = [
        (
            "RTT 0 read >= 1.0x kernel+wg",
            ratio(rw("ours", "read", 0), rw("kernelwg", "read", 0)),
            Bound::AtLeast(1.0),
        ),
        (
            "RTT 0 write >= 1.0x kernel+wg",
            ratio(rw("ours", "write", 0), rw("kernelwg", "write", 0)),
            Bound::AtLeast(1.0),
        ),
        (
            "RTT 2 ms read >= 1.0x kernel",
            ratio(rw("ours", "read", 2), rw("kernel", "read", 2)),
            Bound::AtLeast(1.0),
        ),
        (
            "RTT 20 ms read >= 3x kernel",
            ratio(rw("ours", "read", 20), rw("kernel", "read", 20)),
            Bound::AtLeast(3.0),
        ),
        (
            "RTT 20 ms write >= 2x kernel",
            ratio(rw("ours", "write", 20), rw("kernel", "write", 20)),
            Bound::AtLeast(2.0),
        ),
        (
            "CPU s per GiB (ours) <= 140",
            cpu("ours"),
            Bound::AtMost(140.0),
        ),
        (
            "4 KiB read p50 at RTT 0 <= 2x kernel",
            ratio(
                get("ours_small_read_p50_ms_rtt0"),
                get("kernel_small_read_p50_ms_rtt0"),
            ),
            Bound::AtMost(2.0),
        ),
        (
            "server peak RSS MiB <= 20",
            get("ours_server_rss_mib"),
            Bound::AtMost(20.0),
        ),
        (
            "client peak RSS MiB <= 20",
            get("ours_client_rss_mib"),
            Bound::AtMost(20.0),
        ),
    ];
    for (goal, got, bound) in goals {
        let verdict = match got {
            Some(g) if bound.met(g) => "met",
            Some(_) => "NOT met",
            None => "not measured",
        };
        println!("  {goal:<36} {:>8}  {verdict}", fmt(got));
    }
    let json_path = out.join("lab.json");
    fs::write(
        &json_path,
        serde_json::to_string_pretty(&json!({"rows": rows, "metrics": metrics}))?,
    )?;
    let svg_path = out.join("lab.svg");
    fs::write(&svg_path, chart(&metrics))?;
    println!("\nwrote {} and {}", json_path.display(), svg_path.display());
    Ok(())
}

/// The side of a bound a goal's figure must fall on.
#[derive(Clone, Copy)]
enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

impl Bound {
    fn met(self, got: f64) -> bool {
        match self {
            Bound::AtLeast(b) => got >= b,
            Bound::AtMost(b) => got <= b,
        }
    }
}

/// Every scenario's metrics, by name.
fn metrics_of(results: &[Value]) -> BTreeMap<String, f64> {
    results
        .iter()
        .filter_map(|r| r["metrics"].as_object())
        .flatten()
        .filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v)))
        .collect()
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

/// A grouped bar chart of read and write MiB/s per round trip: the kernel's USB/IP plain and
/// inside WireGuard, and ours.
fn chart(m: &BTreeMap<String, f64>) -> String {
    const PATHS: [(&str, &str); 3] = [
        ("kernel", "#999"),
        ("kernelwg", "#c77"),
        ("ours", "#2a6fdb"),
    ];
    let groups: Vec<(String, [f64; 3])> = [0, 2, 20]
        .iter()
        .flat_map(|rtt| {
            ["read", "write"].map(|dir| {
                let v = PATHS.map(|(who, _)| {
                    m.get(&format!("{who}_{dir}_mib_s_rtt{rtt}"))
                        .copied()
                        .unwrap_or(0.0)
                });
                (format!("{dir} {rtt}ms"), v)
            })
        })
        .collect();
    let max = groups.iter().flat_map(|g| g.1).fold(1.0, f64::max);
    let (w, h, base) = (90.0 * groups.len() as f64 + 60.0, 300.0, 250.0);
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><text x="10" y="16" font-size="13">MiB/s: kernel USB/IP (grey), inside WireGuard (red), rust-p2p-usb (blue), lab VM</text>"##
    );
    for (i, (label, values)) in groups.iter().enumerate() {
        let x = 40.0 + 90.0 * i as f64;
        for (j, (v, (_, colour))) in values.iter().zip(PATHS).enumerate() {
            let bh = 200.0 * *v / max;
            let bx = x + 26.0 * j as f64;
            svg += &format!(
                r#"<rect x="{bx}" y="{}" width="24" height="{bh}" fill="{colour}"/><text x="{bx}" y="{}" font-size="9">{v:.1}</text>"#,
                base - bh,
                base - bh - 3.0
            );
        }
        svg += &format!(r#"<text x="{x}" y="{}">{label}</text>"#, base + 15.0);
    }
    svg + "</svg>\n"
}

// ---- host tunnel bench ----

fn tunnel_bench(out: &Path) -> Result<()> {
    let ws = lab::workspace();
    eprintln!("bench: building release p2p-usb-server and p2p-usb-client");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(&ws)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "server",
            "-p",
            "client",
        ])
        .status()?;
    if !status.success() {
        bail!("building the release binaries failed");
    }
    let release = ws.join("target/release");
    let dir = out.join("tunnel");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let disk = dir.join("sim.img");
    fs::File::create(&disk)?.set_len(256 * 1024 * 1024)?;
    let mut runs = Vec::new();
    for cipher in CIPHERS {
        eprintln!(
            "bench: {cipher}: 2000 bare iroh round trips, then 2000 URB round trips and a 256 MiB read"
        );
        runs.push((cipher, tunnel_run(&release, &dir, &disk, cipher)?));
    }
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    type Row = (
        &'static str,
        Box<dyn Fn(&TunnelRun) -> String>,
        &'static str,
    );
    let rows: Vec<Row> = vec![
        (
            "bare iroh round trip p50 / p99 (us)",
            Box::new(move |r| format!("{:.0} / {:.0}", r.ping50(), r.ping99())),
            "",
        ),
        (
            "URB round trip p50 / p99 (us)",
            Box::new(move |r| format!("{:.0} / {:.0}", r.urb50(), r.urb99())),
            "",
        ),
        (
            "added per URB p50 / p99 (us)",
            Box::new(move |r| {
                format!(
                    "{:.0} / {:.0}",
                    r.urb50() - r.ping50(),
                    r.urb99() - r.ping99()
                )
            }),
            "<= 50 / <= 200",
        ),
        (
            "URB/s, one at a time",
            Box::new(move |r| format!("{:.0}", 1e6 / r.urb50())),
            "",
        ),
        (
            "read MiB/s (256 MiB, 16 KiB URBs)",
            Box::new(move |r| format!("{:.1}", f(&r.probe, "read_mib_s"))),
            "",
        ),
        (
            "CPU s per GiB, both daemons",
            Box::new(move |r| format!("{:.1}", r.cpu_per_gib())),
            "",
        ),
        (
            "server peak RSS MiB",
            Box::new(move |r| format!("{:.1}", r.server_rss)),
            "<= 20",
        ),
        (
            "client peak RSS MiB",
            Box::new(move |r| format!("{:.1}", f(&r.probe, "peak_rss_mib"))),
            "<= 20",
        ),
    ];
    println!();
    println!(
        "host loopback tunnel (this CPU {} AES instructions)",
        if transport_has_aes() { "has" } else { "has no" }
    );
    print!("{:<38}", "");
    for (cipher, _) in &runs {
        print!(" {cipher:>16}");
    }
    println!(" {:>16}", "goal");
    for (label, value, goal) in &rows {
        print!("{label:<38}");
        for (_, run) in &runs {
            print!(" {:>16}", value(run));
        }
        println!(" {goal:>16}");
    }
    let json_path = out.join("tunnel.json");
    let json: serde_json::Map<String, Value> = runs
        .iter()
        .map(|(cipher, r)| {
            (
                cipher.to_string(),
                json!({"ping": r.ping, "probe": r.probe, "server_peak_rss_mib": r.server_rss,
                       "server_cpu_secs": r.server_cpu, "cpu_secs_per_gib": r.cpu_per_gib()}),
            )
        })
        .collect();
    fs::write(&json_path, serde_json::to_string_pretty(&json)?)?;
    println!("\nwrote {}", json_path.display());
    Ok(())
}

/// The `cipher` settings the tunnel bench runs with, one pass each.
const CIPHERS: [&str; 2] = ["aes-gcm", "chacha20"];
/// Bytes the tunnel bench's probe reads.
const TUNNEL_READ_MIB: u32 = 256;

/// One pass of the tunnel bench.
struct TunnelRun {
    ping: Value,
    probe: Value,
    server_rss: f64,
    server_cpu: f64,
}

impl TunnelRun {
    fn get(v: &Value, k: &str) -> f64 {
        v[k].as_f64().unwrap_or(f64::NAN)
    }
    fn ping50(&self) -> f64 {
        Self::get(&self.ping, "p50_ms") * 1e3
    }
    fn ping99(&self) -> f64 {
        Self::get(&self.ping, "p99_ms") * 1e3
    }
    fn urb50(&self) -> f64 {
        Self::get(&self.probe, "round_trip_p50_us")
    }
    fn urb99(&self) -> f64 {
        Self::get(&self.probe, "round_trip_p99_us")
    }
    /// Both daemons' CPU over the whole pass (round trips included) per GiB read.
    fn cpu_per_gib(&self) -> f64 {
        (self.server_cpu + Self::get(&self.probe, "cpu_secs"))
            / (f64::from(TUNNEL_READ_MIB) / 1024.0)
    }
}

/// Whether this host's CPU has AES instructions (what `cipher = "auto"` looks at).
fn transport_has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Starts a server sharing `disk` and runs the client's ping and probe against it, both with
/// `cipher = "<cipher>"` in their configs.
fn tunnel_run(release: &Path, dir: &Path, disk: &Path, cipher: &str) -> Result<TunnelRun> {
    let setting = format!("cipher = \"{cipher}\"\n");
    fs::write(dir.join("client.toml"), &setting)?;
    fs::write(dir.join("server.toml"), &setting)?;
    let client_key = dir.join("client.key");
    let client = |args: &[&str]| -> Result<Value> {
        let o = Command::new(release.join("p2p-usb-client"))
            .args(args)
            .envs(DAEMON_ENV.iter().copied())
            .env("P2P_USB_CLIENT_CONFIG", dir.join("client.toml"))
            .env("P2P_USB_CLIENT_KEY", &client_key)
            .env("RUST_LOG", "warn")
            .output()?;
        if !o.status.success() {
            bail!(
                "p2p-usb-client {args:?} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let text = String::from_utf8_lossy(&o.stdout);
        serde_json::from_str(text.trim()).with_context(|| format!("client printed {text}"))
    };
    let id = Command::new(release.join("p2p-usb-client"))
        .arg("id")
        .envs(DAEMON_ENV.iter().copied())
        .env("P2P_USB_CLIENT_CONFIG", dir.join("client.toml"))
        .env("P2P_USB_CLIENT_KEY", &client_key)
        .output()?;
    let id = String::from_utf8_lossy(&id.stdout).trim().to_owned();
    let ticket_file = dir.join("ticket");
    let _ = fs::remove_file(&ticket_file);
    let mut server = Command::new(release.join("p2p-usb-server"))
        .envs(DAEMON_ENV.iter().copied())
        .env("P2P_USB_SERVER_CONFIG", dir.join("server.toml"))
        .arg("--simulate")
        .arg(disk)
        .args(["--allow", &id, "--bind", "127.0.0.1:0", "--ticket-file"])
        .arg(&ticket_file)
        .env("P2P_USB_SERVER_KEY", dir.join("server.key"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> Result<TunnelRun> {
        let start = Instant::now();
        let ticket = loop {
            if let Ok(t) = fs::read_to_string(&ticket_file)
                && !t.trim().is_empty()
            {
                break t.trim().to_owned();
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the server wrote no ticket");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let ping = client(&["--json", "ping", &ticket, "--count", "2000"])?;
        let probe = client(&[
            "--json",
            "probe",
            &ticket,
            "--read-mib",
            &TUNNEL_READ_MIB.to_string(),
            "--round-trips",
            "2000",
        ])?;
        let server_cpu = fs::read_to_string(format!("/proc/{}/stat", server.id()))
            .ok()
            .and_then(|s| stat_cpu_secs(&s))
            .unwrap_or(f64::NAN);
        Ok(TunnelRun {
            ping,
            probe,
            server_rss: peak_rss_mib(server.id()),
            server_cpu,
        })
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

/// utime + stime of a `/proc/PID/stat` line in seconds (USER_HZ is 100); the daemons report
/// their own the same way (`transport::daemon::cpu_secs`), which xtask does not link.
fn stat_cpu_secs(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn peak_rss_mib(pid: u32) -> f64 {
    fs::read_to_string(PathBuf::from(format!("/proc/{pid}/status")))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
