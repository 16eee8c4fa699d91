//! `share`, `unshare`, `allow`, `revoke`: edits of the config file, each followed by a reload
//! of the running server (SIGHUP), so the operator never edits TOML by hand or restarts.

use anyhow::{Context, bail};
use iroh::EndpointId;
use server::config::{edit, rule_from_spec};
use server::status::{Status, StatusError};

use crate::Cli;

/// `share`: adds a share rule (with a PIN if given).
pub fn share(cli: &Cli, spec: &str, pin: Option<&str>) -> anyhow::Result<()> {
    let rule = rule_from_spec(spec).map_err(anyhow::Error::msg)?;
    let added = edit::share(&cli.config, &rule, pin)?;
    let what = if added {
        "now shares"
    } else {
        "already shared"
    };
    println!("{}: {what} {rule}", cli.config.display());
    reload_running(cli)
}

/// `unshare`: removes the share rules for exactly `spec`.
pub fn unshare(cli: &Cli, spec: &str) -> anyhow::Result<()> {
    let rule = rule_from_spec(spec).map_err(anyhow::Error::msg)?;
    match edit::unshare(&cli.config, &rule)? {
        0 => bail!(
            "{} has no share rule for exactly `{rule}` (see the file)",
            cli.config.display()
        ),
        n => println!("{}: removed {n} rule(s) for {rule}", cli.config.display()),
    }
    reload_running(cli)
}

/// `allow`: adds a client to the allowlist.
pub fn allow(cli: &Cli, id: &EndpointId) -> anyhow::Result<()> {
    let added = edit::allow(&cli.config, &id.to_string())?;
    let what = if added { "allows" } else { "already allows" };
    println!("{}: {what} {id}", cli.config.display());
    reload_running(cli)
}

/// `revoke`: removes a client from the allowlist; a running server disconnects it.
pub fn revoke(cli: &Cli, id: &EndpointId) -> anyhow::Result<()> {
    if !edit::revoke(&cli.config, &id.to_string())? {
        bail!("{} does not allow {id}", cli.config.display());
    }
    println!("{}: revoked {id}", cli.config.display());
    reload_running(cli)
}

/// After an edit: tell a running server to reload, or say it will apply on the next start.
fn reload_running(cli: &Cli) -> anyhow::Result<()> {
    match Status::read(&cli.status_file) {
        Ok(status) => {
            let sent = std::process::Command::new("kill")
                .args(["-HUP", &status.pid.to_string()])
                .status()
                .context("running kill")?;
            if !sent.success() {
                bail!(
                    "could not signal the running server (pid {}); run `systemctl reload p2p-usb-server` or restart it",
                    status.pid
                );
            }
            println!(
                "the running server (pid {}) reloaded its config",
                status.pid
            );
        }
        Err(StatusError::NotRunning { .. } | StatusError::Stale { .. }) => {
            println!("no server is running; the change applies when it starts");
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
