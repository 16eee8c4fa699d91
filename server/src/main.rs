//! `p2p-usb-server`: placeholder until the server issue lands.

use clap::Parser;

/// rust-p2p-usb server (not implemented yet).
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!(
        "p2p-usb-server is not implemented yet (protocol version {})",
        protocol::PROTOCOL_VERSION
    )
}
