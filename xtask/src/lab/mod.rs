//! `cargo xtask lab`: build the VM image, boot it, run scenarios, report results.
//!
//! `build` is idempotent and cached (see [`cache`]); `run` boots the last build and never
//! builds implicitly unless asked, so a test that runs the lab cannot start a nested cargo.

mod audio;
mod cache;
mod cmd;
mod cpio;
mod initramfs;
pub mod kinds;
mod packages;
pub mod vm;
mod xhci;

pub use packages::install_missing;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::RunArgs;
use cache::{Cache, Key};

/// The project binaries every later scenario runs inside the guest.
const PROJECT_BINS: &[(&str, &str)] = &[
    ("server", "p2p-usb-server"),
    ("client", "p2p-usb-client"),
    ("client", "latency-report"),
    // A local iroh relay for the NAT scenarios; lab-only, never in the product.
    ("lab-relay", "lab-relay"),
];

/// A finished lab build, as recorded in `builds/<key>/manifest.json`.
pub struct Manifest {
    dir: PathBuf,
    json: Value,
}

impl Manifest {
    fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let json =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Manifest {
            dir: dir.to_path_buf(),
            json,
        })
    }

    fn kernel(&self) -> PathBuf {
        PathBuf::from(self.json["kernel"].as_str().unwrap_or_default())
    }

    fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs.cpio")
    }

    /// (name, about, runs by default) for each scenario the guest binary registers.
    fn scenarios(&self) -> Vec<(String, String, bool)> {
        self.json["scenarios"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                (
                    s["name"].as_str().unwrap_or_default().to_owned(),
                    s["about"].as_str().unwrap_or_default().to_owned(),
                    s["default"].as_bool().unwrap_or(false),
                )
            })
            .collect()
    }
}

/// The workspace root: xtask lives one level below it.
pub fn workspace() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// `lab build`: everything needed to boot, cached by content.
pub fn build() -> Result<Manifest> {
    let started = Instant::now();
    let ws = workspace();
    let cache = Cache::open(&ws)?;
    let _lock = cache.lock()?;
    let apt = packages::Apt::new(&cache.dir)?;
    apt.ensure_host_tools()?;

    eprintln!("lab: resolving Debian packages");
    let kernel_name = apt.kernel_package()?;
    let kernel = apt.fetch(&kernel_name)?;
    let guest_pkgs = initramfs::GUEST_PACKAGES
        .iter()
        .map(|p| apt.fetch(p))
        .collect::<Result<Vec<_>>>()?;

    // The client embeds the eBPF probes: the lab's build must carry the real ones.
    crate::ebpf::ensure_toolchain()?;
    let bins = build_binaries(&ws)?;
    let plan = initramfs::plan(&apt, &kernel, &guest_pkgs, &bins)?;
    let mut key = Key::new();
    // The assembling code is an input too: a layout change must not reuse old builds. Its
    // source, not the running binary, which `cargo test` may relink while we run.
    key.add(include_bytes!("initramfs.rs"));
    key.add(include_bytes!("cpio.rs"));
    plan.add_to_key(&mut key)?;
    let key = key.hex();
    let dir = cache.build_dir(&key);
    if dir.join("manifest.json").is_file() {
        cache.set_current(&key)?;
        eprintln!(
            "lab: up to date ({key}, checked in {:.1}s)",
            started.elapsed().as_secs_f64()
        );
        return Manifest::load(&dir);
    }

    let kernel_dir = cache.kernel_dir(
        kernel
            .root
            .file_name()
            .unwrap_or_default()
            .to_str()
            .unwrap_or("kernel"),
    );
    let vmlinuz = kernel.root.join(format!("boot/vmlinuz-{}", plan.kver));
    let boot_image = match initramfs::extract_vmlinux(&vmlinuz, &kernel_dir.join("vmlinux"))? {
        Some(vmlinux) => vmlinux,
        None => vmlinuz,
    };

    eprintln!(
        "lab: assembling initramfs ({} modules for {})",
        plan.module_count(),
        plan.kver
    );
    if !plan.missing_optional.is_empty() {
        eprintln!(
            "lab: this kernel lacks optional modules {}; scenarios using them will skip",
            plan.missing_optional.join(", ")
        );
    }
    fs::create_dir_all(&dir)?;
    let size = plan.assemble(&cache.dir.join("stage"), &dir.join("initramfs.cpio"))?;
    let scenarios = list_guest_scenarios(&bins.guest)?;
    let manifest = json!({
        "key": key,
        "kernel_release": plan.kver,
        "kernel": boot_image,
        "initramfs_bytes": size,
        "packages": plan.packages.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>(),
        "modules": plan.module_count(),
        "missing_optional_modules": plan.missing_optional,
        "scenarios": scenarios,
    });
    fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?,
    )?;
    cache.set_current(&key)?;
    eprintln!(
        "lab: built {key}: initramfs {:.1} MiB, kernel {} ({:.1}s)",
        size as f64 / (1024.0 * 1024.0),
        plan.kver,
        started.elapsed().as_secs_f64()
    );
    Manifest::load(&dir)
}

/// Builds the guest init and the project's release binaries with the same cargo that runs us.
fn build_binaries(ws: &Path) -> Result<initramfs::Binaries> {
    eprintln!(
        "lab: building release binaries (lab-guest, {})",
        PROJECT_BINS
            .iter()
            .map(|b| b.1)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    build.env(crate::ebpf::REQUIRE_ENV, "1");
    build.current_dir(ws).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "xtask",
        "--bin",
        "lab-guest",
    ]);
    for (pkg, bin) in PROJECT_BINS {
        build.args(["-p", pkg, "--bin", bin]);
    }
    cmd::status(&mut build).context("building the lab's binaries failed")?;
    let meta = cmd::output(Command::new(&cargo).current_dir(ws).args([
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
    ]))?;
    let meta: Value = serde_json::from_str(&meta)?;
    let target = PathBuf::from(
        meta["target_directory"]
            .as_str()
            .context("cargo metadata has no target_directory")?,
    );
    let release = target.join("release");
    let bins = initramfs::Binaries {
        guest: release.join("lab-guest"),
        project: PROJECT_BINS.iter().map(|(_, b)| release.join(b)).collect(),
    };
    for b in std::iter::once(&bins.guest).chain(&bins.project) {
        if !b.is_file() {
            bail!("cargo build did not produce {}", b.display());
        }
    }
    Ok(bins)
}

/// The guest binary is a normal host program too: it lists its own scenario registry, so
/// the names live in one place.
fn list_guest_scenarios(guest: &Path) -> Result<Value> {
    let out = cmd::output(Command::new(guest).arg("--list-json"))?;
    serde_json::from_str(&out).context("lab-guest --list-json printed bad JSON")
}

fn current() -> Result<Manifest> {
    let cache = Cache::open(&workspace())?;
    let dir = cache
        .current()
        .context("no lab has been built yet; run `cargo xtask lab build` first")?;
    Manifest::load(&dir)
}

/// `lab list`.
pub fn list() -> Result<()> {
    let m = current()?;
    for (name, about, default) in m.scenarios() {
        let mark = if default {
            ""
        } else {
            "  (not run by default)"
        };
        println!("{name:16} {about}{mark}");
    }
    Ok(())
}

/// `xtask demo`: the whole product on a fresh machine, in one command. Builds and boots the
/// lab, where a USB mass-storage gadget is shared by `p2p-usb-server`, attached by
/// `p2p-usb-client` through vhci-hcd over iroh, read and written as /dev/sdX by the kernel's
/// own driver, and detached; then prints a summary, with the per-URB latency split when the
/// lab has the telemetry scenario.
pub fn demo() -> Result<()> {
    println!(
        "demo: 1/3 building the lab (Debian kernel, guest init, release binaries; cached after the first run)"
    );
    let manifest = build()?;
    let mut scenarios = vec!["attach".to_owned()];
    let has_telemetry = manifest.scenarios().iter().any(|s| s.0 == "telemetry");
    if has_telemetry {
        scenarios.push("telemetry".into());
    }
    println!(
        "demo: 2/3 booting the VM to run {}: gadget -> p2p-usb-server -> iroh -> p2p-usb-client -> vhci-hcd -> /dev/sdX",
        scenarios.join(" + ")
    );
    let report = run_report(&RunArgs {
        scenarios,
        timeout_secs: 240,
        keep_going: false,
        accel: vm::Accel::Auto,
        results: None,
        build: false,
    })?;
    if let Some(f) = report.failure {
        bail!("{f}");
    }
    let metrics = |name: &str| {
        report
            .results
            .iter()
            .find(|r| r["scenario"] == name)
            .map(|r| r["metrics"].clone())
            .unwrap_or_default()
    };
    let attach = metrics("attach");
    let fmt = |v: &Value, unit: &str| {
        v.as_f64()
            .map_or("?".to_owned(), |v| format!("{v:.2} {unit}"))
    };
    println!();
    println!("demo: 3/3 summary");
    println!(
        "demo:   a USB mass-storage gadget on the VM's dummy_hcd was shared by p2p-usb-server,"
    );
    println!("demo:   attached by p2p-usb-client through vhci-hcd over iroh (QUIC) on loopback,");
    println!("demo:   and used by the kernel's usb-storage driver as /dev/sdX:");
    println!(
        "demo:   attached and enumerated as a disk in {}",
        fmt(&attach["attach_to_disk_secs"], "s")
    );
    println!(
        "demo:   read 64 MiB byte-exact (md5) at   {}",
        fmt(&attach["read_mib_s"], "MiB/s")
    );
    println!(
        "demo:   wrote 16 MiB, read back exact at  {}",
        fmt(&attach["write_mib_s"], "MiB/s")
    );
    println!(
        "demo:   detached: the port is free and the gadget is local again with the written data"
    );
    if has_telemetry {
        let t = metrics("telemetry");
        println!("demo:   per-URB latency (latency-report over the recording), p50 / p99:");
        for (part, name) in [
            ("total", "whole round trip"),
            ("kernel", "kernel (vhci)"),
            ("client", "p2p-usb-client"),
            ("network", "network"),
            ("server", "server + device"),
        ] {
            println!(
                "demo:     {name:<17} {} / {}",
                fmt(&t[format!("{part}_p50_ms")], "ms"),
                fmt(&t[format!("{part}_p99_ms")], "ms")
            );
        }
    }
    println!(
        "demo: to use it for real, see README.md (\"Use it for real\") and kernel-notes/DEPLOYMENT.md"
    );
    Ok(())
}

/// `xtask kinds`: builds, runs every `kinds-*` scenario of the build in one boot (going on
/// past failures, so every kind is in the table), and regenerates the tables; fails as the
/// run does.
pub fn kinds() -> Result<()> {
    let manifest = build()?;
    let scenarios: Vec<String> = manifest
        .scenarios()
        .into_iter()
        .map(|s| s.0)
        .filter(|n| n.starts_with("kinds-"))
        .collect();
    run(&RunArgs {
        scenarios,
        timeout_secs: 180,
        keep_going: true,
        accel: vm::Accel::Auto,
        results: None,
        build: false,
    })
}

/// One `lab run`, summarised for callers that count results.
pub struct Report {
    /// Scenarios that passed.
    pub passed: usize,
    /// Scenarios that failed or never reported.
    pub failed: usize,
    /// Scenarios that skipped (kernel lacks a feature).
    pub skipped: usize,
    /// Human summary of the first failure, if any.
    pub failure: Option<String>,
    /// The `LAB-RESULT` objects, in run order.
    pub results: Vec<Value>,
}

/// `lab run`: boots, runs, prints results; fails if any scenario failed.
pub fn run(args: &RunArgs) -> Result<()> {
    let report = run_report(args)?;
    if let Some(failure) = report.failure {
        bail!("{failure}");
    }
    Ok(())
}

/// Runs scenarios and reports; errors only when the lab itself cannot run.
pub fn run_report(args: &RunArgs) -> Result<Report> {
    if args.build {
        build()?;
    }
    let cache = Cache::open(&workspace())?;
    let _lock = cache.lock()?;
    let manifest = current()?;
    let known = manifest.scenarios();
    let names: Vec<String> = if args.scenarios.is_empty() {
        known.iter().filter(|s| s.2).map(|s| s.0.clone()).collect()
    } else {
        args.scenarios.clone()
    };
    for n in &names {
        if !known.iter().any(|s| &s.0 == n) {
            let all: Vec<&str> = known.iter().map(|s| s.0.as_str()).collect();
            bail!(
                "unknown scenario `{n}`; the built lab has: {} (rebuild with `cargo xtask lab build` after adding one)",
                all.join(", ")
            );
        }
    }
    let accel = vm::resolve_accel(
        args.accel,
        &manifest.kernel(),
        &manifest.initramfs(),
        &vm::probe_file(&cache.dir),
    )?;
    eprintln!(
        "lab: booting {} with {:?} to run {}",
        manifest.json["kernel_release"].as_str().unwrap_or("?"),
        accel,
        names.join(", ")
    );
    let devices = xhci::Plan::prepare(&cache.dir.join("run"))?;
    if !devices.has_xhci() {
        eprintln!("lab: this QEMU has no qemu-xhci; scenarios that plug QEMU's USB devices skip");
    }
    let outcome = vm::boot(&vm::Boot {
        kernel: &manifest.kernel(),
        initramfs: &manifest.initramfs(),
        scenarios: &names,
        timeout_secs: args.timeout_secs,
        keep_going: args.keep_going,
        accel,
        echo: true,
        devices: Some(&devices),
    })?;

    let mut report = Report {
        passed: 0,
        failed: 0,
        skipped: 0,
        results: outcome.results.clone(),
        failure: None,
    };
    let mut lines = Vec::new();
    for r in &outcome.results {
        match r["status"].as_str() {
            Some("pass") => report.passed += 1,
            Some("skip") => report.skipped += 1,
            _ => report.failed += 1,
        }
        lines.push(xtask::format_line(xtask::tag::RESULT, r));
    }
    let ran: Vec<&str> = outcome
        .results
        .iter()
        .filter_map(|r| r["scenario"].as_str())
        .collect();
    let not_run: Vec<&String> = names
        .iter()
        .filter(|n| !ran.contains(&n.as_str()))
        .collect();
    let run_line = json!({
        "accel": format!("{accel:?}").to_lowercase(),
        "boot_secs": outcome.boot_secs,
        "wall_secs": outcome.wall_secs,
        "qemu_peak_rss_mib": outcome.peak_rss_mib,
        "initramfs_bytes": manifest.json["initramfs_bytes"],
        "kernel_release": manifest.json["kernel_release"],
        "not_run": not_run,
        "aborted": outcome.aborted,
        "run_dir": devices.dir(),
        "xhci": devices.has_xhci(),
    });
    lines.extend(
        outcome
            .kinds
            .iter()
            .map(|k| xtask::format_line(xtask::tag::KIND, k)),
    );
    lines.push(format!("LAB-RUN {run_line}"));
    // The device-kind tables follow the suite's latest complete run.
    let suite: Vec<&String> = known
        .iter()
        .filter(|s| s.0.starts_with("kinds-"))
        .map(|s| &s.0)
        .collect();
    if !suite.is_empty() && suite.iter().all(|s| ran.contains(&s.as_str())) {
        let kernel = manifest.json["kernel_release"].as_str().unwrap_or("?");
        if let Err(e) = kinds::write(&workspace(), &outcome.kinds, kernel) {
            eprintln!("lab: device-kind tables not written: {e:#}");
        }
    }
    let results_file = args
        .results
        .clone()
        .unwrap_or_else(|| cache.dir.join("results.jsonl"));
    let mut f = fs::File::create(&results_file)
        .with_context(|| format!("writing {}", results_file.display()))?;
    for l in &lines {
        println!("{l}");
        writeln!(f, "{l}")?;
    }

    for r in &outcome.results {
        if matches!(r["status"].as_str(), Some("pass") | Some("skip")) {
            continue;
        }
        let name = r["scenario"].as_str().unwrap_or("?");
        let reason = r["reason"].as_str().unwrap_or("no reason given");
        eprintln!("lab: scenario {name} FAILED: {reason}");
        eprintln!("lab: last log lines of {name}:");
        for l in r["log_tail"].as_array().into_iter().flatten() {
            eprintln!("  | {}", l.as_str().unwrap_or_default());
        }
        report
            .failure
            .get_or_insert_with(|| format!("lab scenario {name} failed: {reason}"));
    }
    if report.failure.is_none() && !outcome.completed {
        let why = outcome
            .aborted
            .clone()
            .unwrap_or_else(|| "the guest stopped early".into());
        eprintln!("lab: the VM stopped outside any scenario: {why}; last console lines:");
        for l in &outcome.console_tail {
            eprintln!("  | {l}");
        }
        report.failed += not_run.len().max(1);
        report.failure = Some(format!("lab run did not complete: {why}"));
    }
    eprintln!(
        "lab: {} passed, {} failed, {} skipped; boot {:.2}s, wall {:.1}s, QEMU peak RSS {} MiB",
        report.passed,
        report.failed,
        report.skipped,
        outcome.boot_secs.unwrap_or(f64::NAN),
        outcome.wall_secs,
        outcome.peak_rss_mib.map_or("?".into(), |m| m.to_string())
    );
    Ok(report)
}
