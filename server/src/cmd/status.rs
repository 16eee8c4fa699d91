//! `status` and `ticket`: what the running server publishes in its status file, read back
//! without talking to it.

use server::status::{self, Status};

use crate::Cli;

/// `ticket`: the running server's ticket, and with `qr` as a QR code.
pub fn ticket(cli: &Cli, qr: bool) -> anyhow::Result<()> {
    let status = Status::read(&cli.status_file)?;
    println!("{}", status.ticket);
    if qr {
        for line in status::qr(&status.ticket) {
            println!("{line}");
        }
    }
    Ok(())
}

/// `status`: the running server's devices, who holds them, and its clients.
pub fn show(cli: &Cli) -> anyhow::Result<()> {
    let status = Status::read(&cli.status_file)?;
    if cli.json {
        println!("{}", serde_json::to_string(&status)?);
        return Ok(());
    }
    println!("server {} (pid {})", status.id, status.pid);
    println!("ticket {}", status.ticket);
    if let Some(c) = &status.config {
        println!("config {}", c.display());
    }
    if status.allow_any {
        println!("allow  any client with the ticket");
    } else {
        println!("allow  {} client id(s)", status.allowed);
    }
    println!("devices:");
    if status.snapshot.devices.is_empty() {
        println!("  none shared");
    }
    for d in &status.snapshot.devices {
        println!(
            "  {:<8} {} {:<20} {:<10} {:>8.1} MiB in, {:>8.1} MiB out{}",
            d.bus_id,
            d.vid_pid,
            d.product.as_deref().unwrap_or("-"),
            d.attached_to
                .as_deref()
                .map_or("free".to_owned(), |id| id.chars().take(10).collect()),
            d.bytes_from_device as f64 / 1048576.0,
            d.bytes_to_device as f64 / 1048576.0,
            if d.pin { " [PIN]" } else { "" },
        );
    }
    println!("clients:");
    if status.snapshot.clients.is_empty() {
        println!("  none connected");
    }
    for c in &status.snapshot.clients {
        let path = c
            .path
            .as_ref()
            .map_or("no path yet".to_owned(), ToString::to_string);
        println!(
            "  {} {} for {}s, {path}, {} path changes",
            c.id, c.agent, c.connected_secs, c.path_changes
        );
    }
    Ok(())
}
