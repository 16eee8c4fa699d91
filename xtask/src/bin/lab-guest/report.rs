//! How a scenario reports to the init that runs it: plain lines on stdout.
//!
//! Log lines are anything; `LAB-METRIC name value` and `LAB-SKIP reason` are picked out by
//! the runner. Lines keep the child/parent contract trivial and survive a crash mid-run.

use std::fmt;

/// Marks a metric line from a scenario child.
pub const METRIC: &str = "LAB-METRIC";
/// Marks the skip reason from a scenario child.
pub const SKIP: &str = "LAB-SKIP";
/// The exit code of a skipped scenario (automake's convention).
pub const SKIP_EXIT: u8 = 77;

/// Prints a log line that ends up in the console and in the failure tail.
macro_rules! log {
    ($($arg:tt)*) => { println!($($arg)*) };
}
pub(crate) use log;

/// Records a figure for the result line, e.g. `metric("read_mib_s", 31.2)`.
pub fn metric(name: &str, value: f64) {
    println!("{METRIC} {name} {value}");
}

/// The error a scenario returns when this kernel or setup cannot run it: reported as
/// `skip` with the reason, never as a pass.
#[derive(Debug)]
pub struct Skip(pub String);

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "skipped: {}", self.0)
    }
}

impl std::error::Error for Skip {}

/// Shorthand for `Err(Skip(reason).into())`.
pub fn skip<T>(reason: impl Into<String>) -> anyhow::Result<T> {
    Err(Skip(reason.into()).into())
}
