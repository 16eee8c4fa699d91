//! `p2p-usb-client`: placeholder until the client issue lands.

use clap::Parser;

/// rust-p2p-usb client (not implemented yet).
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!(
        "p2p-usb-client is not implemented yet (protocol version {})",
        protocol::PROTOCOL_VERSION
    )
}
