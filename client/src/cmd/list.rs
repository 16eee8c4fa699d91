//! `list`: what a server shares with us, as a table or JSON lines.

use super::{connect, device_json};
use crate::Cli;

/// Lists the devices `ticket`'s server shares with this client.
pub async fn run(cli: &Cli, ticket: &str) -> anyhow::Result<()> {
    let conn = connect(cli, ticket).await?;
    let devices = conn.list_devices().await?;
    if cli.json {
        for d in &devices {
            println!("{}", device_json(d));
        }
    } else if devices.is_empty() {
        println!("the server shares no devices with us");
    } else {
        for d in &devices {
            println!(
                "{:<10} {:04x}:{:04x} {:<9} {} {} {}",
                d.bus_id,
                d.vendor_id,
                d.product_id,
                format!("{:?}", d.speed),
                d.manufacturer.as_deref().unwrap_or("-"),
                d.product.as_deref().unwrap_or("-"),
                d.serial.as_deref().unwrap_or("-"),
            );
        }
    }
    conn.close().await;
    Ok(())
}
