//! Timeboxed checks: each runs in its own thread and is given up on after its timeout, so a
//! read that never returns (a tty, a rawmidi node, a socket across a dead link) fails the
//! check with a reason instead of hanging the scenario. After the first failure the rest of
//! a kind's checks are recorded as not run: they build on the one that failed.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};

use crate::report::log;

/// What a passing check reports: a line for the log and table, and figures for the bench.
pub struct Done {
    text: String,
    figures: Vec<(&'static str, f64)>,
}

impl Done {
    /// A pass described by `text`.
    pub fn new(text: impl Into<String>) -> Done {
        Done {
            text: text.into(),
            figures: Vec::new(),
        }
    }

    /// Its description.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Adds a figure (ping RTT, MiB/s) to the kind's results.
    pub fn figure(mut self, name: &'static str, value: f64) -> Done {
        self.figures.push((name, (value * 1000.0).round() / 1000.0));
        self
    }
}

/// The checks of one kind through one route, in the order they ran.
#[derive(Default)]
pub struct Checks {
    list: Vec<Value>,
    failed: Option<String>,
    figures: Vec<(&'static str, f64)>,
}

impl Checks {
    /// Runs `f` for at most `timeout`; records its outcome under `name`. Does nothing but
    /// record "not run" once an earlier check failed.
    pub fn check<F>(&mut self, name: &str, timeout: Duration, f: F)
    where
        F: FnOnce() -> Result<Done> + Send + 'static,
    {
        if self.failed.is_some() {
            self.list
                .push(json!({"name": name, "ok": null, "detail": "not run"}));
            return;
        }
        let started = Instant::now();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(f());
        });
        let outcome = match rx.recv_timeout(timeout) {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err(format!("timed out after {}s", timeout.as_secs())),
        };
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(done) => {
                log!("kind check {name}: ok in {secs:.1}s: {}", done.text);
                self.figures.extend(done.figures);
                self.list
                    .push(json!({"name": name, "ok": true, "detail": done.text}));
            }
            Err(why) => {
                log!("kind check {name}: FAILED in {secs:.1}s: {why}");
                self.failed = Some(format!("{name}: {why}"));
                self.list
                    .push(json!({"name": name, "ok": false, "detail": why}));
            }
        }
    }

    /// Records a failure found outside a check (the device never arrived).
    pub fn fail(&mut self, name: &str, why: String) {
        self.failed.get_or_insert_with(|| format!("{name}: {why}"));
        self.list
            .push(json!({"name": name, "ok": false, "detail": why}));
    }

    /// Whether every check so far passed.
    pub fn passed(&self) -> bool {
        self.failed.is_none()
    }

    /// The first failure, `check: why`.
    pub fn reason(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The checks as JSON, for the `LAB-KIND` line.
    pub fn list(&self) -> &[Value] {
        &self.list
    }

    /// Figures the checks reported.
    pub fn figures(&self) -> &[(&'static str, f64)] {
        &self.figures
    }
}
