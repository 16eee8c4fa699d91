//! `list`: what this server would share, or (`--all`) everything plugged in and whether it is
//! shared, without starting the server.

use server::config::{DeviceMatch, SharePolicy};

use super::{settings, source};
use crate::Cli;

/// Lists the shared devices (every device with `all`).
pub async fn run(cli: &Cli, all: bool) -> anyhow::Result<()> {
    let settings = settings(cli)?;
    let devices = if all {
        let everything = SharePolicy {
            share: vec![DeviceMatch {
                all: true,
                ..DeviceMatch::default()
            }],
            deny: vec![],
        };
        source(cli, everything).await?.shared().devices()
    } else {
        source(cli, settings.share.clone())
            .await?
            .shared()
            .devices()
    };
    let is_shared = |d: &protocol::wire::DeviceInfo| {
        !all || settings
            .share
            .offers(&server::config::DeviceFacts::from_wire(d))
    };
    if cli.json {
        for d in &devices {
            println!(
                "{}",
                serde_json::json!({
                    "bus_id": d.bus_id,
                    "vid_pid": d.vid_pid().to_string(),
                    "speed": format!("{:?}", d.speed),
                    "manufacturer": d.manufacturer, "product": d.product, "serial": d.serial,
                    "shared": is_shared(d),
                    "pin": settings.config.pin_for(d).is_some(),
                })
            );
        }
        return Ok(());
    }
    if devices.is_empty() {
        if all {
            println!("no USB devices (other than hubs) are plugged in");
        } else {
            println!(
                "nothing is shared: `p2p-usb-server list --all` shows what is plugged in, `p2p-usb-server share <vid:pid>` shares it"
            );
        }
    }
    for d in &devices {
        let mark = match (all, is_shared(d)) {
            (false, _) => "",
            (true, true) => "shared  ",
            (true, false) => "-       ",
        };
        let pin = if settings.config.pin_for(d).is_some() {
            " [PIN]"
        } else {
            ""
        };
        println!("{mark}{}{pin}", d.summary());
    }
    Ok(())
}
