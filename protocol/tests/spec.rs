//! The specs in `kernel-notes/` stay true: every message variant of our protocol is named in
//! PROTOCOL.md, and every USB/IP command and op code we decode is named in USBIP.md.

use std::path::Path;

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `(enum, variant)` for every `pub enum` in a Rust source file, read top to bottom.
fn enum_variants(source: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in source.lines() {
        if let Some(rest) = line.strip_prefix("pub enum ") {
            current = rest.split_whitespace().next().map(str::to_owned);
            continue;
        }
        if line == "}" {
            current = None;
            continue;
        }
        let Some(name) = &current else { continue };
        // Variants sit at four spaces of indent and start with a capital letter.
        let Some(rest) = line.strip_prefix("    ") else {
            continue;
        };
        let variant: String = rest.chars().take_while(|c| c.is_alphanumeric()).collect();
        if variant.starts_with(|c: char| c.is_ascii_uppercase()) && !rest.starts_with(' ') {
            out.push((name.clone(), variant));
        }
    }
    out
}

#[test]
fn protocol_md_names_every_message() {
    let spec = read("../kernel-notes/PROTOCOL.md");
    let mut checked = 0;
    for file in ["src/wire/control.rs", "src/wire/urb.rs", "src/usb.rs"] {
        for (name, variant) in enum_variants(&read(file)) {
            if ["Direction", "TransferType", "Speed"].contains(&name.as_str()) {
                continue; // USB's own vocabulary, not messages
            }
            assert!(
                spec.contains(&format!("`{variant}")) || spec.contains(&format!(" {variant}")),
                "kernel-notes/PROTOCOL.md does not mention {name}::{variant} (from {file})"
            );
            checked += 1;
        }
    }
    assert!(
        checked > 40,
        "only {checked} variants found: is the parser still right?"
    );
}

#[test]
fn usbip_md_names_every_command_and_op_code() {
    let spec = read("../kernel-notes/USBIP.md");
    for name in [
        "CMD_SUBMIT",
        "RET_SUBMIT",
        "CMD_UNLINK",
        "RET_UNLINK",
        "OP_REQ_DEVLIST",
        "OP_REP_DEVLIST",
        "OP_REQ_IMPORT",
        "OP_REP_IMPORT",
        "0x8005",
        "0x0005",
        "0x8003",
        "0x0003",
        "0x0111",
    ] {
        assert!(
            spec.contains(name),
            "kernel-notes/USBIP.md does not mention {name}"
        );
    }
}
