//! `tui`: a live view of paired servers (round-trip percentiles, their devices) and this
//! machine's vhci ports.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use client::vhci::{RealSys, Vhci};
use transport::{ServerConnection, Ticket};

use super::{client_endpoint, config, silent_after};
use crate::Cli;

/// `tui`: one task per server pings it every second and refreshes its device list; the screen
/// redraws four times a second.
pub async fn run(cli: &Cli, servers: &[String]) -> anyhow::Result<()> {
    use client::tui::{App, Link, PortView, ServerView};
    use crossterm::event::{self, Event as Key, KeyCode, KeyEventKind};
    let config = config(cli)?;
    let named: Vec<(String, Ticket)> = if servers.is_empty() {
        config
            .servers
            .iter()
            .map(|(n, s)| (n.clone(), s.ticket.clone()))
            .collect()
    } else {
        servers
            .iter()
            .map(|s| {
                let t = config.resolve(s).map_err(anyhow::Error::msg)?;
                let name = if config.servers.contains_key(s) {
                    s.clone()
                } else {
                    t.id.to_string().chars().take(8).collect()
                };
                Ok((name, t))
            })
            .collect::<anyhow::Result<_>>()?
    };
    if named.is_empty() {
        bail!(
            "no servers to show: pair one (`p2p-usb-client pair <ticket> --name NAME`) or name a ticket"
        );
    }
    let endpoint = client_endpoint(cli, named.iter().map(|(_, t)| t)).await?;
    let silent_after = silent_after(cli, &config);
    let app = Arc::new(std::sync::Mutex::new(App {
        servers: named
            .iter()
            .map(|(name, t)| ServerView {
                name: name.clone(),
                id: t.id.to_string(),
                ..ServerView::default()
            })
            .collect(),
        ports: Ok(vec![]),
    }));
    let mut watchers = tokio::task::JoinSet::new();
    for (i, (_, ticket)) in named.into_iter().enumerate() {
        let (endpoint, app) = (endpoint.clone(), app.clone());
        watchers.spawn(async move {
            let agent = format!("p2p-usb-client/{} tui", env!("CARGO_PKG_VERSION"));
            loop {
                let set = |link: Link| lock(&app).servers[i].link = link;
                let conn = match ServerConnection::connect(
                    &endpoint,
                    ticket.endpoint_addr(),
                    client::attach::CAPABILITIES,
                    &agent,
                    silent_after,
                )
                .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        set(Link::Down(e.to_string()));
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        continue;
                    }
                };
                set(Link::Connected);
                let mut tick = 0u32;
                let why = loop {
                    if tick.is_multiple_of(5) {
                        match conn.list_devices().await {
                            Ok(d) => lock(&app).servers[i].devices = d,
                            Err(e) => break e.to_string(),
                        }
                    }
                    match conn.ping().await {
                        Ok(rtt) => {
                            let mut app = lock(&app);
                            let view = &mut app.servers[i];
                            view.push_rtt(rtt);
                            view.path = conn.path().map(|p| (p, conn.path_changes()));
                        }
                        Err(e) => break e.to_string(),
                    }
                    tick += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                };
                set(Link::Down(why));
                conn.close_connection();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let vhci = Vhci::new(RealSys::default());
    let reports = client::port_report::dir();
    let mut terminal = ratatui::init();
    let result = async {
        loop {
            lock(&app).ports = vhci
                .ports()
                .map(|ports| {
                    ports
                        .iter()
                        .filter(|p| !p.is_free())
                        .map(|p| PortView {
                            port: p.port,
                            devid: p.devid,
                            local_busid: p.local_busid.clone(),
                            live: client::port_report::read(&reports, p.port),
                        })
                        .collect()
                })
                .map_err(|e| e.to_string());
            terminal.draw(|f| client::tui::draw(f, &lock(&app)))?;
            // Never block the one runtime thread on the terminal: the pings run on it.
            while event::poll(Duration::ZERO)? {
                if let Key::Key(key) = event::read()?
                    && key.kind == KeyEventKind::Press
                    && matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
                {
                    return anyhow::Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    .await;
    ratatui::restore();
    watchers.abort_all();
    endpoint.close().await;
    result
}

fn lock(app: &std::sync::Mutex<client::tui::App>) -> std::sync::MutexGuard<'_, client::tui::App> {
    app.lock().unwrap_or_else(|p| p.into_inner())
}
