//! `attach --usbip-listen`: the bridge. Standard USB/IP clients (`usbip attach -r`,
//! usbip-win2) import the server's devices through our tunnel instead of our own vhci ports.

use std::io::Write;

use transport::daemon;

use super::{connect, forward_events};
use crate::Cli;

/// Serves USB/IP on `addr` for `ticket`'s server until Ctrl-C/SIGTERM.
pub async fn run(cli: &Cli, ticket: &str, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let conn = connect(cli, ticket).await?;
    let events_tx = forward_events(&conn);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = daemon::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    println!(
        "serving USB/IP on {addr}: `usbip list -r {}` then `usbip attach -r {} -b <bus id>`",
        addr.ip(),
        addr.ip()
    );
    std::io::stdout().flush()?;
    client::bridge::serve(conn.clone(), addr, events_tx, stop_rx, !cli.no_read_ahead).await?;
    conn.close().await;
    Ok(())
}
