//! The two routes a kind's device takes from the gadget to the client side's vhci-hcd: the
//! kernel's own USB/IP (the control) and ours (`p2p-usb-server` to `p2p-usb-client attach`
//! over iroh). Both end with the same device under vhci_hcd, where the same checks run.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use super::super::project::{self, Daemon};
use super::super::usbip::Attached;
use crate::gadget::Gadget;
use crate::report::log;
use crate::sys;
use crate::usbdev::{self, Via};

/// The client key our route attaches with.
pub const FRIEND: &str = "friend";

/// Which USB/IP carries the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `usbip attach -r 127.0.0.1`: usbip-host on the gadget, vhci on the client side.
    Kernel,
    /// `p2p-usb-server` and `p2p-usb-client attach` over iroh on loopback.
    Ours,
}

impl Route {
    /// The name used in `LAB-KIND` lines and metric names.
    pub fn name(self) -> &'static str {
        match self {
            Route::Kernel => "kernel",
            Route::Ours => "ours",
        }
    }
}

/// An imported device; [`Imported::release`] gives it back.
pub struct Imported {
    route: Route,
    usbip: Option<Attached>,
    ours: Option<(Daemon, Daemon)>,
    /// The device's sysfs directory under vhci_hcd, e.g. `/sys/bus/usb/devices/3-1`.
    pub dev: PathBuf,
}

/// Imports the plugged gadget `g` over `route` and waits until the client side has it
/// configured under vhci_hcd.
pub fn import(route: Route, g: &Gadget) -> Result<Imported> {
    let mut imported = Imported {
        route,
        usbip: None,
        ours: None,
        dev: PathBuf::new(),
    };
    match route {
        Route::Kernel => imported.usbip = Some(Attached::import(&g.busid()?)?),
        Route::Ours => {
            let vid_pid = g.vid_pid();
            let friend = project::client_id(FRIEND)?;
            let (server, ticket) =
                project::start_server(&["--share", &vid_pid, "--allow", &friend])?;
            let client = project::spawn_client(FRIEND, &["attach", &ticket, "--device", &vid_pid])?;
            imported.ours = Some((server, client));
        }
    }
    // Configured means its interfaces exist. Not `bConfigurationValue`: reading it takes the
    // device lock, which a driver probe stuck on a transfer that never completes holds.
    imported.dev = sys::wait_for(
        &format!("{} configured under vhci_hcd", g.vid_pid()),
        Duration::from_secs(30),
        || {
            let dev = usbdev::find_usb_device(g.vid, g.pid, Via::Vhci)?;
            let name = dev.file_name()?.to_string_lossy().into_owned();
            dev.join(format!("{name}:1.0")).exists().then_some(dev)
        },
    )
    .inspect_err(|_| {
        if route == Route::Ours {
            project::show_client_log(FRIEND);
            project::show_server_log();
        }
    })?;
    log!(
        "kinds: {} imported through {} as {}",
        g.vid_pid(),
        route.name(),
        imported.dev.display()
    );
    Ok(imported)
}

impl Imported {
    /// Detaches: `usbip detach` + `unbind`, or `p2p-usb-client detach` and the daemons
    /// stopped; then waits until no vhci port is in use, so the next import starts clean.
    pub fn release(mut self) -> Result<()> {
        let detached = match self.ours.take() {
            Some((server, mut client)) => {
                let r = project::detach_and_wait(FRIEND, &mut client);
                drop(client);
                drop(server);
                r
            }
            None => Ok(()),
        };
        drop(self.usbip.take());
        sys::wait_for(
            "every vhci port to be free",
            Duration::from_secs(10),
            || {
                project::vhci_ports_in_use()
                    .ok()
                    .filter(|(used, _)| *used == 0)
                    .map(|_| ())
            },
        )
        .context("after detaching")?;
        detached.with_context(|| format!("detaching through {}", self.route.name()))
    }
}

impl Drop for Imported {
    fn drop(&mut self) {
        if let Some((_server, mut client)) = self.ours.take() {
            if let Ok(port) = project::vhci_port_in_use() {
                let _ = project::client(FRIEND, &["detach", &port]);
            }
            let _ = client.wait_exit(Duration::from_secs(3));
        }
    }
}
