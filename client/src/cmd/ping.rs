//! `ping`: round trips on the control stream, the first thing to look at when a device feels
//! slow.

use super::{connect, percentile_us};
use crate::Cli;

/// Pings `ticket`'s server `count` times and prints the percentiles.
pub async fn run(cli: &Cli, ticket: &str, count: u32) -> anyhow::Result<()> {
    let conn = connect(cli, ticket).await?;
    let mut rtts = Vec::new();
    for _ in 0..count {
        rtts.push(conn.ping().await?);
    }
    conn.close().await;
    rtts.sort();
    let at = |q: f64| percentile_us(&rtts, q) / 1e3;
    let (p50, p90, max) = (at(0.5), at(0.9), at(1.0));
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"count": rtts.len(), "p50_ms": p50, "p90_ms": p90, "p99_ms": at(0.99), "max_ms": max})
        );
    } else {
        println!(
            "{} pings: p50 {p50:.3} ms, p90 {p90:.3} ms, max {max:.3} ms",
            rtts.len()
        );
    }
    Ok(())
}
