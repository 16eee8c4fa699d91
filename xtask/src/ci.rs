//! `cargo xtask test`: the one command CI and contributors run.
//!
//! Order matters: cheap static checks first so a formatting slip fails in seconds, then unit
//! tests, then the lab (minutes), and last the check that a failing scenario really fails
//! the run, which is what makes every other green lab result trustworthy.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{RunArgs, lab};

/// Options for `xtask test`.
#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip the lab (fmt, clippy and cargo test only), e.g. on a machine without QEMU.
    #[arg(long)]
    pub no_lab: bool,
    /// Per-scenario timeout inside the guest, on a guest of the reference pace; a slower one
    /// stretches it up to 4x (kernel-notes/LAB.md).
    #[arg(long, default_value_t = 180)]
    pub timeout_secs: u64,
    /// Seconds of fuzzing per decoder target.
    #[arg(long, default_value_t = 20)]
    pub fuzz_secs: u64,
}

/// The env var that tells `xtask/tests/lab.rs` a built lab is available.
pub const LAB_ENV: &str = "P2P_USB_LAB";

/// Runs every check in order and stops at the first failing step.
pub fn test(args: &TestArgs) -> Result<()> {
    let ws = lab::workspace();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // CI's log keeps only its tail; each phase's time says where a slow machine spent it.
    let timed = |what: &str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let started = Instant::now();
        let r = f();
        eprintln!("test: {what} took {:.0} s", started.elapsed().as_secs_f64());
        r
    };
    let step = |what: &str, args: &[&str], lab_env: bool| -> Result<()> {
        eprintln!("test: {what}: cargo {}", args.join(" "));
        let mut c = Command::new(&cargo);
        c.current_dir(&ws).args(args);
        if lab_env {
            c.env(LAB_ENV, "1");
        } else {
            c.env_remove(LAB_ENV);
        }
        timed(what, &mut || {
            let st = c
                .status()
                .with_context(|| format!("could not run cargo for {what}"))?;
            if !st.success() {
                bail!("{what} failed (`cargo {}`)", args.join(" "));
            }
            Ok(())
        })
    };
    let all = Instant::now();
    // The client embeds the eBPF probes; tests and the lab need the real object.
    timed("eBPF toolchain", &mut crate::ebpf::ensure_toolchain)?;
    step("format", &["fmt", "--all", "--check"], false)?;
    step(
        "clippy",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        false,
    )?;
    step(
        "unit and integration tests",
        &["test", "--workspace"],
        false,
    )?;
    eprintln!("test: fuzz every decoder for {} s", args.fuzz_secs);
    timed("fuzzing", &mut || crate::fuzz::fuzz(&[], args.fuzz_secs))?;
    if args.no_lab {
        eprintln!("test: lab skipped (--no-lab)");
        return Ok(());
    }

    timed("lab build", &mut || lab::build().map(drop))?;
    let started = Instant::now();
    let report = lab::run_report(&RunArgs {
        scenarios: Vec::new(),
        timeout_secs: args.timeout_secs,
        keep_going: true,
        accel: lab::vm::Accel::Auto,
        results: None,
        build: false,
    })?;
    eprintln!(
        "test: lab run took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let (mut passed, mut failed) = (report.passed, report.failed);

    // The lab must be able to fail: run the deliberately failing scenario through the
    // integration test that CI also runs, with the lab enabled.
    let selftest = step(
        "failing-scenario check",
        &["test", "-p", "xtask", "--test", "lab", "--", "--nocapture"],
        true,
    );
    match &selftest {
        Ok(()) => passed += 1,
        Err(e) => {
            eprintln!("test: {e:#}");
            failed += 1;
        }
    }
    println!("lab: {passed} passed, {failed} failed");
    eprintln!("test: all steps took {:.0} s", all.elapsed().as_secs_f64());
    if let Some(f) = report.failure {
        bail!("{f}");
    }
    selftest
}
