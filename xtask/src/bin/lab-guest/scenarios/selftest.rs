//! Scenarios that fail on purpose, so the suite can prove failures and hangs are caught
//! and reported rather than passing silently.

use std::time::Duration;

use anyhow::bail;

use crate::report::log;

/// Logs a recognisable trail, then fails.
pub fn fail() -> anyhow::Result<()> {
    log!("selftest: step 1 of 3: this scenario fails on purpose");
    log!("selftest: step 2 of 3: the host must print these lines as the log tail");
    log!("selftest: step 3 of 3: SELFTEST-MARKER-7f3a");
    bail!("deliberate failure (selftest-fail)")
}

/// Hangs past any timeout; the runner must kill it and report the timeout.
pub fn hang() -> anyhow::Result<()> {
    log!("selftest: hanging on purpose; the runner must kill this after its timeout");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Crashes the guest kernel (sysrq `c`); the host must notice the panic, stop QEMU and
/// report this scenario with the console tail.
pub fn panic() -> anyhow::Result<()> {
    log!("selftest: crashing the kernel on purpose via /proc/sysrq-trigger");
    crate::sys::write("/proc/sysrq-trigger", "c")?;
    bail!("the kernel survived sysrq-trigger c")
}
