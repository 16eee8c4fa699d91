//! `latency-report`: where each URB's time went, from a `p2p-usb-client attach --telemetry`
//! recording. Prints percentiles per endpoint and the kernel / client / network /
//! server+device split, writes an SVG histogram, and exits 2 when a budget is missed, so a
//! script or CI can hold the product to its latency target.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use client::latency::{Budget, Recording, render_svg, render_table, summary_json};
use client::telemetry;

/// Report the latency of every URB a `p2p-usb-client attach --telemetry FILE` recorded.
///
/// Exit status: 0 within budget, 2 when a budget is missed, 1 on errors.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// The recording (`-` for standard input).
    file: PathBuf,
    /// Write an SVG histogram of each part of the split here.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// End-to-end budget (ms) at the budget quantile: the product's 5-20 ms target.
    #[arg(long, default_value_t = 20.0)]
    budget_p99_ms: f64,
    /// Budget (ms) for our own client-side overhead at the budget quantile.
    #[arg(long, default_value_t = 0.2)]
    budget_overhead_ms: f64,
    /// The percentile both budgets are judged at.
    #[arg(long, default_value_t = 99.0)]
    budget_percentile: f64,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Live: re-read the recording every this many seconds and print, until it ends.
    #[arg(long, value_name = "SECS")]
    follow: Option<f64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read(args: &Args) -> anyhow::Result<Recording> {
    let text = if args.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let lines = telemetry::parse(&text).with_context(|| format!("in {}", args.file.display()))?;
    Ok(Recording::join(lines))
}

/// Whether every budget held.
fn run(args: &Args) -> anyhow::Result<bool> {
    anyhow::ensure!(
        (0.0..=100.0).contains(&args.budget_percentile),
        "--budget-percentile must be within 0..=100"
    );
    let budget = Budget {
        total_ms: args.budget_p99_ms,
        overhead_ms: args.budget_overhead_ms,
        quantile: args.budget_percentile / 100.0,
    };
    let mut rec = read(args)?;
    if let Some(secs) = args.follow {
        while !rec.complete {
            print!("{}", render_table(&rec, &rec.stats()));
            println!("--- following {} ---", args.file.display());
            std::thread::sleep(Duration::from_secs_f64(secs.max(0.1)));
            rec = read(args)?;
        }
    }
    let stats = rec.stats();
    let misses = budget.check(&stats);
    if let Some(path) = &args.svg {
        let title = format!(
            "URB latency split: {} URBs from {}",
            stats.all.count(),
            args.file.display()
        );
        std::fs::write(path, render_svg(&rec, &title))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", summary_json(&rec, &stats, &misses));
    } else {
        print!("{}", render_table(&rec, &stats));
        if stats.all.count() == 0 {
            println!("\nno completed URB in the recording: nothing to judge");
        }
        let p = args.budget_percentile;
        for m in &misses {
            println!(
                "BUDGET MISSED: {} p{p} {:.3} ms > {:.3} ms",
                m.what, m.measured_ms, m.budget_ms
            );
        }
        if misses.is_empty() && stats.all.count() > 0 {
            println!(
                "\nwithin budget: end to end p{p} <= {} ms, client overhead p{p} <= {} ms",
                budget.total_ms, budget.overhead_ms
            );
        }
        if let Some(path) = &args.svg {
            println!("histogram written to {}", path.display());
        }
    }
    Ok(misses.is_empty())
}
