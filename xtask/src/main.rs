//! `cargo xtask`: the project's own build, lab and CI tasks.
//!
//! The lab exists because the machines this project is built on have no USB stack: a QEMU VM
//! with a stock Debian kernel gives the tests real `dummy_hcd`, `vhci-hcd` and USB/IP.

mod bench;
mod ci;
mod ebpf;
mod fuzz;
mod lab;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, lab and CI tasks for rust-p2p-usb",
    long_about = "Build, lab and CI tasks for rust-p2p-usb.\n\n\
        The lab is a QEMU VM running Debian's kernel with a real Linux USB stack \
        (dummy_hcd gadgets, vhci-hcd, USB/IP, netem). Start with `cargo xtask test`, \
        which runs every check CI runs."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the lab VM image or run scenarios inside it.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// Run everything CI runs: fmt, clippy, cargo test, then the lab scenarios.
    Test(ci::TestArgs),
    /// The whole product in one command: boot the lab, share a USB disk with p2p-usb-server,
    /// attach it with p2p-usb-client, read and write it, detach, and print a summary.
    Demo,
    /// Measure: our tunnel against the kernel's USB/IP in the lab (default), or our userspace
    /// path on host loopback (`bench tunnel`). Prints a table; writes JSON and SVG under
    /// target/bench/.
    Bench {
        #[command(subcommand)]
        target: Option<bench::Target>,
    },
    /// The long runs behind CI's short ones, in the lab: 1 GiB written and read back over a
    /// 1 % loss, 20 ms link, and a thousand attach/detach cycles (hours under TCG).
    Soak,
    /// The device-kind suite: build the lab, run every `kinds-*` scenario (each kind through
    /// the kernel's USB/IP and through ours), and regenerate kernel-notes/DEVICE-KINDS.md and
    /// the README's table from the results.
    Kinds,
    /// Build the client's eBPF probes (installs clang and libbpf-dev with apt if missing).
    BuildEbpf,
    /// Fuzz the protocol decoders (every target, or those named) for a bounded time each.
    Fuzz {
        /// Targets to run (default: all).
        targets: Vec<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Fetch the Debian kernel and tools with apt, build the guest and project binaries
    /// and assemble the initramfs (cached under .lab/, keyed by its inputs).
    Build,
    /// Boot the lab VM and run scenarios in it (all default scenarios when none are named).
    Run(RunArgs),
    /// List the scenarios of the last built lab.
    List,
}

/// Options for `lab run`, shared with `xtask test`.
#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Scenario names, run in order in one boot. Default: every scenario marked default.
    pub scenarios: Vec<String>,
    /// Per-scenario timeout inside the guest, on a guest of the reference pace; a slower one
    /// stretches it up to 4x (kernel-notes/LAB.md).
    #[arg(long, default_value_t = 180)]
    pub timeout_secs: u64,
    /// Run the remaining scenarios after one fails (default: stop at the first failure).
    #[arg(long)]
    pub keep_going: bool,
    /// CPU accelerator: `auto` uses KVM only if a probe boot works, else TCG.
    #[arg(long, value_enum, default_value_t = lab::vm::Accel::Auto)]
    pub accel: lab::vm::Accel,
    /// Write the result lines (LAB-RESULT and LAB-RUN JSON) here instead of .lab/results.jsonl.
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Run `lab build` first (it is fast when nothing changed).
    #[arg(long)]
    pub build: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.cmd {
        Cmd::Lab { cmd } => match cmd {
            LabCmd::Build => lab::build().map(|_| ()),
            LabCmd::Run(args) => lab::run(&args).map(|_| ()),
            LabCmd::List => lab::list(),
        },
        Cmd::Test(args) => ci::test(&args),
        Cmd::Demo => lab::demo(),
        Cmd::Bench { target } => bench::bench(target),
        Cmd::Soak => lab::run(&RunArgs {
            scenarios: vec!["soak-integrity".into(), "soak-cycles".into()],
            timeout_secs: 4 * 3600,
            keep_going: true,
            accel: lab::vm::Accel::Auto,
            results: None,
            build: true,
        })
        .map(|_| ()),
        Cmd::Kinds => lab::kinds(),
        Cmd::BuildEbpf => ebpf::build(),
        Cmd::Fuzz { targets, secs } => fuzz::fuzz(&targets, secs),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
