//! `lab-guest`: PID 1 (`/init`) of the lab VM, and the scenarios it runs.
//!
//! One binary plays three roles, chosen by how it is started:
//! - as PID 1 it sets up the system, runs the scenarios named on the kernel command line,
//!   each in a child process so a hang can be killed, reports, and powers off;
//! - with `--scenario NAME` (only under that PID 1) it is such a child;
//! - with `--list` / `--list-json` it prints the scenario registry, which is how the host
//!   learns the names without a second copy of the list.
//!
//! Guest helpers for scenarios (gadgets, modules, netem, device lookup, throughput) live in
//! their own modules; add a scenario in `scenarios/` and register it in `scenarios/mod.rs`.

mod bench;
mod gadget;
mod host;
mod init;
mod modules;
mod nat;
mod netem;
mod report;
mod runner;
mod scenarios;
mod sys;
mod usbdev;
mod usbfs;
mod wgnet;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--list"] => {
            for s in scenarios::ALL {
                println!("{:16} {}", s.name, s.about);
            }
            ExitCode::SUCCESS
        }
        ["--list-json"] => {
            let list: Vec<_> = scenarios::ALL
                .iter()
                .map(
                    |s| serde_json::json!({"name": s.name, "about": s.about, "default": s.default}),
                )
                .collect();
            println!("{}", serde_json::Value::Array(list));
            ExitCode::SUCCESS
        }
        ["--scenario", name] if runner::inside_lab() => runner::child_main(name),
        _ if std::process::id() == 1 => init::main(),
        _ => {
            eprintln!(
                "lab-guest is the init of the lab VM (`cargo xtask lab run`); on a normal system \
                 it only supports --list and --list-json"
            );
            ExitCode::from(2)
        }
    }
}
