//! Network impairment on the guest's loopback with Debian's `tc` (busybox's cannot do netem).

use std::time::Duration;

use anyhow::Result;

use crate::{modules, sys};

const TC: &str = "/usr/sbin/tc";

/// Replaces `lo`'s root qdisc with netem: `delay` each way and `loss_percent` packet loss.
/// Loopback traffic crosses `lo` twice, so the round trip grows by twice `delay`.
pub fn set(delay: Duration, loss_percent: f64) -> Result<()> {
    modules::load(modules::NETEM)?;
    let delay = format!("{}us", delay.as_micros());
    let loss = format!("{loss_percent}%");
    sys::run(std::process::Command::new(TC).args([
        "qdisc", "replace", "dev", "lo", "root", "netem", "delay", &delay, "loss", &loss,
    ]))?;
    Ok(())
}

/// Removes any qdisc from `lo`; not an error if none was set.
pub fn clear() -> Result<()> {
    let _ = sys::run(std::process::Command::new(TC).args(["qdisc", "del", "dev", "lo", "root"]));
    Ok(())
}
