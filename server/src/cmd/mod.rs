//! The subcommands of `p2p-usb-server`, one module each, and what `list` and `run` share:
//! the settings in force (the config file with the flags on top) and the device source they
//! name. `main.rs` keeps only the command line and the dispatch.

pub mod edit;
pub mod list;
pub mod run;
pub mod status;
pub mod tui;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use server::config::{Config, SharePolicy, rule_from_spec};
use server::connection::Allowlist;
use server::device::DeviceSource;
use server::device::usb::{DeviceFilter, UsbSource};
use transport::daemon::{self, Role};

use crate::Cli;

/// The server's key file: `--key-file`, else the config's `key_file`, else the default.
pub fn key_path(cli: &Cli) -> anyhow::Result<PathBuf> {
    let config = Config::load_or_default(&cli.config)?;
    Ok(cli
        .run
        .key_file
        .clone()
        .or(config.key_file)
        .unwrap_or_else(|| daemon::default_key_path(Role::Server)))
}

/// The settings in force: the config file with the command line's flags on top.
pub struct Settings {
    pub config: Config,
    pub share: SharePolicy,
    pub allow: Allowlist,
}

/// The settings `cli` asks for.
pub fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    let config = Config::load_or_default(&cli.config)?;
    let share = if cli.run.share.is_empty() {
        config.share.iter().map(|r| r.matcher.clone()).collect()
    } else {
        cli.run
            .share
            .iter()
            .map(|s| rule_from_spec(s))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?
    };
    let share = SharePolicy {
        share,
        deny: config.deny.clone(),
    };
    let allow = if cli.run.allow_any || config.allow_any {
        Allowlist::Anyone
    } else {
        let ids = config
            .allow
            .iter()
            .map(|c| c.0)
            .chain(cli.run.allow.iter().copied());
        Allowlist::Only(ids.collect::<HashSet<_>>())
    };
    Ok(Settings {
        config,
        share,
        allow,
    })
}

/// Where the devices come from: simulated disks, or this machine's USB devices.
pub enum Source {
    /// `--simulate`: disks backed by files.
    Sim(Arc<dyn DeviceSource>),
    /// This machine's USB devices; a reload changes what it offers.
    Usb(Arc<UsbSource>),
}

impl Source {
    /// The source, as the server uses it.
    pub fn shared(&self) -> Arc<dyn DeviceSource> {
        match self {
            Source::Sim(s) => s.clone(),
            Source::Usb(u) => u.clone(),
        }
    }
}

/// Starts the source the flags name, offering what `share` allows.
pub async fn source(cli: &Cli, share: SharePolicy) -> anyhow::Result<Source> {
    let args = &cli.run;
    if !args.simulate.is_empty() {
        let source = server::device::sim::SimSource::with_files(
            &args.simulate,
            args.simulate_size * 1024 * 1024,
        )
        .context("could not set up the simulated disks")?;
        return Ok(Source::Sim(source));
    }
    let source = UsbSource::start(DeviceFilter(share))
        .await
        .context("could not read this machine's USB devices (is usbfs mounted? may this user open /dev/bus/usb? see kernel-notes/DEPLOYMENT.md)")?;
    Ok(Source::Usb(source))
}
