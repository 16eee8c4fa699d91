//! The lab must be able to fail: a scenario that fails or hangs has to fail `lab run` and
//! show its log tail, otherwise every green lab result would be worthless.
//!
//! Needs a built lab and QEMU, so it only runs when `P2P_USB_LAB=1` (set by
//! `cargo xtask test` after `lab build`); otherwise it passes with a note saying so.

use std::process::Command;
use std::sync::Mutex;

/// One QEMU at a time: the tests in this file run on parallel threads, and two TCG guests on
/// a 2-core host would slow each other and every other job on the machine.
static ONE_VM: Mutex<()> = Mutex::new(());

fn lab_enabled() -> bool {
    if std::env::var_os("P2P_USB_LAB").is_some_and(|v| v == "1") {
        return true;
    }
    eprintln!(
        "skipped: the lab self-test needs a built lab VM; run `cargo xtask test` \
         (or `cargo xtask lab build` then `P2P_USB_LAB=1 cargo test -p xtask --test lab`)"
    );
    false
}

fn xtask(args: &[&str]) -> (bool, String, String) {
    let _vm = ONE_VM
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("running the xtask binary");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), stdout, stderr)
}

#[test]
fn failing_and_hanging_scenarios_fail_the_run_with_their_log_tails() {
    if !lab_enabled() {
        return;
    }
    let (ok, stdout, stderr) = xtask(&[
        "lab",
        "run",
        "selftest-fail",
        "selftest-hang",
        "--keep-going",
        "--timeout-secs",
        "5",
    ]);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(!ok, "lab run must exit non-zero when a scenario fails");

    let results: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("LAB-RESULT "))
        .map(|j| serde_json::from_str(j).expect("LAB-RESULT carries JSON"))
        .collect();
    assert_eq!(results.len(), 2, "one result per scenario");
    assert!(results.iter().all(|r| r["status"] == "fail"));
    assert!(
        results[1]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("timed out")
    );

    assert!(stderr.contains("last log lines of selftest-fail"));
    assert!(
        stderr.contains("SELFTEST-MARKER-7f3a"),
        "the failing scenario's tail is printed"
    );
    assert!(
        stderr.contains("hanging on purpose"),
        "the hung scenario's tail is printed"
    );
}

#[test]
fn a_guest_kernel_panic_stops_the_vm_and_fails_the_scenario() {
    if !lab_enabled() {
        return;
    }
    let (ok, stdout, stderr) = xtask(&["lab", "run", "selftest-panic", "--timeout-secs", "30"]);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        !ok,
        "lab run must exit non-zero when the guest kernel panics"
    );
    let result: serde_json::Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("LAB-RESULT "))
        .map(|j| serde_json::from_str(j).expect("LAB-RESULT carries JSON"))
        .expect("the host synthesises a result for the scenario that was running");
    assert_eq!(result["scenario"], "selftest-panic");
    assert_eq!(result["status"], "fail");
    let reason = result["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("Kernel panic"),
        "reason names the panic: {reason}"
    );
    assert!(
        stderr.contains("crashing the kernel on purpose"),
        "the tail is printed"
    );
}

#[test]
fn unknown_scenario_is_refused_before_booting() {
    if !lab_enabled() {
        return;
    }
    let (ok, _, stderr) = xtask(&["lab", "run", "no-such-scenario"]);
    assert!(!ok);
    assert!(
        stderr.contains("unknown scenario `no-such-scenario`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("baseline"),
        "the error lists the known scenarios: {stderr}"
    );
}
