//! The specs in `kernel-notes/` stay true: every message variant of our protocol is named in
//! PROTOCOL.md, every USB/IP command and op code we decode is named in USBIP.md, and every
//! file ARCHITECTURE.md's code map names exists.

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

/// The backticked names in a Markdown table cell.
fn backticked(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// `xtask/src/{ci,bench}.rs` as `xtask/src/ci.rs`, `xtask/src/bench.rs`.
fn expand_braces(path: &str) -> Vec<String> {
    match (path.find('{'), path.find('}')) {
        (Some(a), Some(b)) if a < b => path[a + 1..b]
            .split(',')
            .map(|part| format!("{}{part}{}", &path[..a], &path[b + 1..]))
            .collect(),
        _ => vec![path.to_owned()],
    }
}

#[test]
fn the_code_map_names_only_files_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let map = read("../kernel-notes/ARCHITECTURE.md");
    let rows = map
        .lines()
        .skip_while(|l| !l.starts_with("## Code map"))
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .filter(|l| l.starts_with("| `"));
    let mut checked = 0;
    for row in rows {
        let cells: Vec<&str> = row.split(" | ").collect();
        let dirs: Vec<String> = backticked(cells[0])
            .into_iter()
            .flat_map(expand_braces)
            .collect();
        for path in &dirs {
            assert!(
                root.join(path).exists(),
                "ARCHITECTURE.md's code map names {path}, which does not exist"
            );
            checked += 1;
        }
        // Files a directory's row names in its description: ours are `.rs` files (kernel
        // sources the map cites are not in this tree), found in the directory or its `src/`.
        for dir in dirs.iter().filter(|d| d.ends_with('/')) {
            let rest = cells.get(1).copied().unwrap_or_default();
            for name in backticked(rest).into_iter().filter(|n| n.ends_with(".rs")) {
                let found = [
                    root.join(dir).join(name),
                    root.join(dir).join("src").join(name),
                ]
                .iter()
                .any(|p| p.exists());
                assert!(
                    found,
                    "ARCHITECTURE.md's code map names {dir}{name}, which does not exist"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 20, "only {checked} paths found in the code map");
}
