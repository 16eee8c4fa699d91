//! Running host commands with errors that say which command failed and what it printed.
//!
//! Every failure the lab hits on a fresh machine is some external tool failing, so the
//! error must carry the command line and its stderr tail, not just an exit code.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// A printable form of a command line, for errors and progress.
pub fn display(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd`, returning its stdout; fails with the command line and stderr tail.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("`{shown}` failed ({}):\n{}", out.status, tail.join("\n"));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with its output going to the terminal; fails with the command line.
pub fn status(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    let st = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !st.success() {
        bail!("`{shown}` failed ({st})");
    }
    Ok(())
}

/// Whether `program` is on `PATH` (or is an existing path).
pub fn exists(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = OsStr::new("/usr/sbin:/sbin");
    std::env::split_paths(&path)
        .chain(std::env::split_paths(extra))
        .any(|dir| dir.join(program).is_file())
}
