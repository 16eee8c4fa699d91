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
    // verify checks that ExecStart's program exists: point it at the one cargo built.
    let text = text.replace(
        "/usr/local/bin/p2p-usb-client",
        env!("CARGO_BIN_EXE_p2p-usb-client"),
    );
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
