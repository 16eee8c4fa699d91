//! Compiles the C probes into the eBPF object the crate embeds.
//!
//! Debian's clang (`-target bpf`) and libbpf's headers build objects aya 0.14 loads; Rust eBPF
//! needs a nightly-only toolchain here. A checkout without clang still builds: it embeds an
//! empty object and the loader says how to get the real one (`cargo xtask build-ebpf`).
//! `P2P_USB_REQUIRE_EBPF=1` (set by xtask for the lab and CI) turns a missing clang into a
//! build error, so a shipped binary never lacks its probes by accident.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[&str] = &["src/bpf/urb.bpf.c", "src/bpf/kernel.h"];

fn main() {
    for s in SOURCES {
        println!("cargo:rerun-if-changed={s}");
    }
    println!("cargo:rerun-if-env-changed=P2P_USB_REQUIRE_EBPF");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("urb.bpf.o");
    let required = env::var_os("P2P_USB_REQUIRE_EBPF").is_some_and(|v| v == "1");
    let clang = env::var_os("CLANG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/clang"));
    // Cargo reruns this script while that path is missing, so installing clang later is
    // enough to get the real object on the next build.
    println!("cargo:rerun-if-changed={}", clang.display());
    let headers = Path::new("/usr/include/bpf/bpf_helpers.h");
    println!("cargo:rerun-if-changed={}", headers.display());
    if !clang.exists() || !headers.exists() {
        if required {
            panic!(
                "P2P_USB_REQUIRE_EBPF=1 but {} or libbpf's headers are missing: \
                 run `cargo xtask build-ebpf` (it installs clang and libbpf-dev)",
                clang.display()
            );
        }
        println!(
            "cargo:warning=clang or libbpf-dev missing: the eBPF probes are not built \
             (run `cargo xtask build-ebpf`)"
        );
        std::fs::write(&object, []).expect("writing the placeholder object");
        return;
    }
    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => ("arm64", "aarch64-linux-gnu"),
        Ok("arm") => ("arm", "arm-linux-gnueabihf"),
        _ => ("x86", "x86_64-linux-gnu"),
    };
    let status = Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg(format!("-D__TARGET_ARCH_{}", arch.0))
        .arg(format!("-I/usr/include/{}", arch.1))
        .args(["-c", "src/bpf/urb.bpf.c", "-o"])
        .arg(&object)
        .status()
        .expect("running clang");
    assert!(status.success(), "clang failed to build the eBPF probes");
}
