//! A scenario that always fails, so the suite can prove failures are caught and reported.

use anyhow::bail;

use crate::report::log;

/// Logs a recognisable trail, then fails.
pub fn run() -> anyhow::Result<()> {
    log!("selftest: step 1 of 3: this scenario fails on purpose");
    log!("selftest: step 2 of 3: the host must print these lines as the log tail");
    log!("selftest: step 3 of 3: SELFTEST-MARKER-7f3a");
    bail!("deliberate failure (selftest-fail)")
}
