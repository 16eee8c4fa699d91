//! The files an operator installs: the systemd unit passes `systemd-analyze verify` (where the
//! tool exists) with no warning, and the udev rules parse.

use std::path::Path;
use std::process::Command;

fn deploy(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Verifies a unit with its `ExecStart` pointed at the binary cargo just built (verify checks
/// that the program exists). Any output is a warning about the unit, so it fails the test.
pub fn verify_unit(name: &str, text: &str, installed: &str, built: &str) {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join(name);
    std::fs::write(&unit, text.replace(installed, built)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "{name}:\n{said}"
    );
}

#[test]
fn the_server_unit_verifies() {
    let text = deploy("p2p-usb-server.service");
    assert!(text.contains("Type=notify"), "the server reports readiness");
    assert!(
        text.contains("WatchdogSec="),
        "the server pings the watchdog"
    );
    assert!(
        text.contains("User=p2p-usb"),
        "the server does not run as root"
    );
    verify_unit(
        "p2p-usb-server.service",
        &text,
        "/usr/local/bin/p2p-usb-server",
        env!("CARGO_BIN_EXE_p2p-usb-server"),
    );
}

/// A small udev rules parser: every rule is comma-separated `KEY[{attr}]OP"value"` pairs with
/// known keys and operators, at least one match and one assignment. (`udevadm verify` arrived
/// in systemd 253; Debian bookworm has 252.)
fn check_udev_rules(text: &str) -> Result<usize, String> {
    const MATCH_KEYS: &[&str] = &[
        "SUBSYSTEM",
        "ENV",
        "ATTR",
        "ATTRS",
        "ACTION",
        "KERNEL",
        "DRIVER",
    ];
    const ASSIGN_KEYS: &[&str] = &["GROUP", "MODE", "OWNER", "TAG", "ENV"];
    let mut rules = 0;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (mut matches, mut assigns) = (0, 0);
        for pair in line.split(", ") {
            let at = |why: &str| format!("line {}: `{pair}`: {why}", n + 1);
            let op_at = pair
                .find(['=', '!', '+', ':'])
                .ok_or_else(|| at("no operator"))?;
            let (key, rest) = pair.split_at(op_at);
            let op = ["==", "!=", "+=", ":=", "="]
                .into_iter()
                .find(|op| rest.starts_with(op))
                .ok_or_else(|| at("unknown operator"))?;
            let value = &rest[op.len()..];
            if !(value.len() >= 2 && value.starts_with('"') && value.ends_with('"')) {
                return Err(at("value not in double quotes"));
            }
            let base = key.split('{').next().unwrap_or_default();
            if key.contains('{') && !key.ends_with('}') {
                return Err(at("unclosed {"));
            }
            let is_match = op == "==" || op == "!=";
            let known = if is_match { MATCH_KEYS } else { ASSIGN_KEYS };
            if !known.contains(&base) {
                return Err(at("unknown key for this operator"));
            }
            if is_match {
                matches += 1;
            } else {
                assigns += 1;
            }
        }
        if matches == 0 || assigns == 0 {
            return Err(format!(
                "line {}: a rule needs a match and an assignment",
                n + 1
            ));
        }
        rules += 1;
    }
    Ok(rules)
}

#[test]
fn the_udev_rules_parse_and_grant_the_server_user() {
    let text = deploy("70-p2p-usb.rules");
    assert_eq!(check_udev_rules(&text), Ok(1));
    assert!(text.contains("GROUP=\"p2p-usb\""));
    assert!(check_udev_rules("SUBSYSTEM==\"usb\", GROUP=p2p-usb\n").is_err());
    assert!(check_udev_rules("SUBSYSTEM=\"usb\", GROUP=\"x\"\n").is_err());
    assert!(check_udev_rules("SUBSYSTEM==\"usb\"\n").is_err());
}

#[test]
fn the_sysusers_file_creates_the_user_the_unit_and_rules_name() {
    let text = deploy("p2p-usb.sysusers.conf");
    assert!(text.lines().any(|l| l.starts_with("u p2p-usb ")));
    assert!(text.lines().any(|l| l.starts_with("g p2p-usb ")));
}

#[test]
fn the_sysctl_file_gives_the_socket_buffers_iroh_asks_for() {
    let text = deploy("99-p2p-usb-udp.conf");
    let mut keys = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=').expect("key = value");
        let value: u64 = value.trim().parse().expect("a number of bytes");
        assert!(value >= transport::endpoint::UDP_BUFFER_WANTED, "{line}");
        keys.push(key.trim().to_owned());
    }
    assert_eq!(keys, ["net.core.rmem_max", "net.core.wmem_max"]);
    // The warning the daemons print names this file.
    let advice = transport::endpoint::udp_buffer_advice([Some(0), Some(0)]).unwrap();
    assert!(advice.contains("server/deploy/99-p2p-usb-udp.conf"));
}
