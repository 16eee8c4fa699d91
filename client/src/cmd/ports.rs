//! `status` and `detach`: this machine's vhci ports, without a server. What is attached
//! here can be seen and undone even when the network or the server is gone.

use client::port_report;
use client::vhci::{RealSys, Vhci};

use crate::Cli;

/// `detach`: detaches the device on vhci port `port`.
pub fn detach(port: u32) -> anyhow::Result<()> {
    Vhci::new(RealSys::default()).detach(port)?;
    println!("detached vhci port {port}");
    Ok(())
}

/// `status`: the vhci ports in use.
pub fn status(cli: &Cli) -> anyhow::Result<()> {
    let ports = Vhci::new(RealSys::default()).ports()?;
    let used: Vec<_> = ports.iter().filter(|p| !p.is_free()).collect();
    // What the process holding each port says about it (round trip, URBs, iso streams).
    let dir = port_report::dir();
    if cli.json {
        for p in &used {
            let live = port_report::read(&dir, p.port);
            println!(
                "{}",
                serde_json::json!({"port": p.port, "speed": p.speed, "devid": p.devid, "local_busid": p.local_busid, "live": live})
            );
        }
    } else if used.is_empty() {
        println!("no vhci port in use ({} free)", ports.len());
    } else {
        for p in used {
            println!(
                "port {:<3} {:?} devid {:#010x} local bus id {}",
                p.port, p.hub, p.devid, p.local_busid
            );
            let Some(live) = port_report::read(&dir, p.port) else {
                continue;
            };
            let rtt = live
                .rtt_ms
                .map_or("-".to_owned(), |ms| format!("{ms:.1} ms"));
            println!(
                "         {} (pid {}): rtt {rtt}, {} URBs, {} completed, {} unlinked",
                live.device, live.pid, live.submitted, live.completed, live.unlinked
            );
            if let Some(path) = &live.path {
                println!("         path {path}, {} changes", live.path_changes);
            }
            for s in &live.iso {
                println!("         {}", port_report::iso_line(s));
            }
        }
    }
    Ok(())
}
