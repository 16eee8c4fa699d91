//! The client's systemd unit passes `systemd-analyze verify` (where the tool exists) with no
//! warning.

use std::path::Path;
use std::process::Command;

#[test]
fn the_client_unit_verifies() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/p2p-usb-client.service");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains(" run "),
        "the service runs the auto-attach supervisor"
    );
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("p2p-usb-client.service");
    // verify checks that every Exec* program exists: point ExecStart at the one cargo built,
    // and ExecStartPre's modprobe at a stand-in where this machine has no kmod (a build
    // container); the unit's own text is what is being checked, not this machine.
    let mut text = text.replace(
        "/usr/local/bin/p2p-usb-client",
        env!("CARGO_BIN_EXE_p2p-usb-client"),
    );
    if !Path::new("/sbin/modprobe").exists() {
        text = text.replace("/sbin/modprobe", "/bin/true");
    }
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}
