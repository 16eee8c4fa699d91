//! `cargo xtask build-ebpf`: the toolchain for the client's eBPF probes, and the probes.
//!
//! The probes are C compiled by Debian's clang against libbpf's headers (LAB-NOTES: Rust eBPF
//! needs a nightly toolchain here). `client-ebpf/build.rs` does the compiling; this makes sure
//! clang and libbpf-dev are installed and that the object really got built.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::lab;

/// Tells `client-ebpf/build.rs` to fail rather than embed an empty object.
pub const REQUIRE_ENV: &str = "P2P_USB_REQUIRE_EBPF";

/// (file that proves it is installed, Debian package).
const TOOLCHAIN: &[(&str, &str)] = &[
    ("/usr/bin/clang", "clang"),
    ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
];

/// Installs clang and libbpf-dev with apt if they are missing.
pub fn ensure_toolchain() -> Result<()> {
    lab::install_missing("building the eBPF probes", TOOLCHAIN, |file| {
        Path::new(file).exists()
    })
}

/// `build-ebpf`: toolchain, then `client-ebpf` with the object required.
pub fn build() -> Result<()> {
    ensure_toolchain()?;
    let ws = lab::workspace();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(&cargo)
        .current_dir(&ws)
        .args(["build", "-p", "client-ebpf"])
        .env(REQUIRE_ENV, "1")
        .status()
        .context("running cargo")?;
    if !st.success() {
        bail!("building client-ebpf failed");
    }
    let out = ws.join("target/debug/build");
    let object = std::fs::read_dir(&out)
        .with_context(|| format!("reading {}", out.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("client-ebpf-"))
        .map(|e| e.path().join("out/urb.bpf.o"))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    match object {
        Some(p) if p.metadata().map(|m| m.len()).unwrap_or(0) > 0 => {
            eprintln!(
                "ebpf: built {} ({} bytes); the client embeds it",
                p.display(),
                p.metadata().map(|m| m.len()).unwrap_or(0)
            );
            Ok(())
        }
        _ => bail!(
            "cargo built client-ebpf but no eBPF object is in {}",
            out.display()
        ),
    }
}
