//! `cargo xtask fuzz`: every decoder that reads untrusted bytes, fuzzed for a bounded time.
//!
//! Runs each cargo-fuzz target in `protocol/fuzz/` from the committed seeds plus the corpus
//! earlier runs grew (`protocol/fuzz/corpus/`, git-ignored), so CI explores a little further
//! each time on a machine it is given back. The fuzz build alone uses `RUSTC_BOOTSTRAP=1`:
//! cargo-fuzz passes `-Z` sanitizer flags and only a stable toolchain exists here.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::lab;

/// The targets, named as in `protocol/fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "usbip_commands",
    "usbip_returns",
    "usbip_op",
    "wire_frames",
    "config_files",
    "urb_streams",
    "bot_wrappers",
];

/// Fuzzes `targets` (all when empty) for `secs` seconds each.
pub fn fuzz(targets: &[String], secs: u64) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let installed = Command::new(&cargo)
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("fuzz: installing cargo-fuzz (once per machine)");
        let st = Command::new(&cargo)
            .args(["install", "cargo-fuzz", "--locked", "--quiet"])
            .status()
            .context("running cargo install cargo-fuzz")?;
        if !st.success() {
            bail!("`cargo install cargo-fuzz --locked` failed");
        }
    }
    let dir = lab::workspace().join("protocol");
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    for target in chosen {
        if !TARGETS.contains(&target) {
            bail!(
                "unknown fuzz target `{target}`; the targets are {}",
                TARGETS.join(", ")
            );
        }
        let corpus = format!("fuzz/corpus/{target}");
        std::fs::create_dir_all(dir.join(&corpus))?;
        let seeds = format!("fuzz/seeds/{target}");
        let mut run = Command::new(&cargo);
        run.current_dir(&dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", "-O", target, &corpus]);
        if dir.join(&seeds).is_dir() {
            run.arg(&seeds);
        }
        run.args([
            "--",
            &format!("-max_total_time={secs}"),
            "-print_final_stats=0",
        ]);
        eprintln!("fuzz: {target} for {secs}s");
        let out = run
            .output()
            .with_context(|| format!("running the {target} fuzzer"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            for line in tail.into_iter().rev() {
                eprintln!("  | {line}");
            }
            // cargo-fuzz says this when the target did not build; libFuzzer never does.
            if log.contains("failed to build fuzz script") {
                bail!("fuzz target {target} did not build (the compiler's errors are above)");
            }
            bail!(
                "fuzz target {target} found a failure; the input is in protocol/fuzz/artifacts/{target}/"
            );
        }
        if let Some(done) = log.lines().rev().find(|l| l.starts_with("Done ")) {
            eprintln!("fuzz: {target}: {done}");
        }
    }
    Ok(())
}
