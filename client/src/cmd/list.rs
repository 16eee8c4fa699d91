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
            println!("{}", d.summary());
        }
    }
    conn.close().await;
    Ok(())
}
