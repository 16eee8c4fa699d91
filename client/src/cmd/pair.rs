//! `id` and `pair`: the two halves of introducing a client and a server. Our id goes to the
//! server's operator for `allow`; their ticket is kept here under a name.

use transport::{Ticket, load_or_create_secret_key};

use super::key_path;
use crate::Cli;

/// `id`: prints this client's endpoint id, creating its key on first use.
pub async fn id(cli: &Cli) -> anyhow::Result<()> {
    let key = load_or_create_secret_key(&key_path(cli)?).await?;
    println!("{}", key.public());
    Ok(())
}

/// `pair`: remembers `ticket` under `name` (default: the start of its id).
pub async fn pair(cli: &Cli, ticket: &Ticket, name: Option<&str>) -> anyhow::Result<()> {
    let name = name
        .map(str::to_owned)
        .unwrap_or_else(|| ticket.id.to_string().chars().take(8).collect());
    client::config::pair(&cli.config, &name, ticket)?;
    let key = load_or_create_secret_key(&key_path(cli)?).await?;
    println!("{}: paired `{name}`", cli.config.display());
    println!(
        "ask the server's operator to run: p2p-usb-server allow {}",
        key.public()
    );
    println!("then: p2p-usb-client list {name}");
    Ok(())
}
