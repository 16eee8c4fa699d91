//! `p2p-usb-server tui`: what is shared, who holds it, how fast it moves, and the ticket as a
//! QR code, at a glance.
//!
//! It reads the running server's status file (see [`crate::status`]) rather than connecting to
//! the server, so it needs no credentials beyond reading that file and can run beside a
//! systemd-managed server. Drawing is a pure function of [`App`], so tests render it to
//! ratatui's `TestBackend` and read the screen.

use std::collections::HashMap;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};

use crate::status::{Status, qr};

/// What the screen shows: the latest status (or why there is none) and rates derived from the
/// previous one.
#[derive(Debug, Default)]
pub struct App {
    status: Option<Status>,
    error: Option<String>,
    /// Device id -> (MiB/s to the device, MiB/s from the device).
    rates: HashMap<u32, (f64, f64)>,
    qr: Vec<String>,
}

impl App {
    /// Takes a fresh read of the status file.
    pub fn update(&mut self, read: Result<Status, String>) {
        match read {
            Ok(status) => {
                if let Some(prev) = &self.status {
                    let secs =
                        status.updated_unix_ms.saturating_sub(prev.updated_unix_ms) as f64 / 1e3;
                    if secs > 0.0 {
                        self.rates = status
                            .snapshot
                            .devices
                            .iter()
                            .map(|d| {
                                let before = prev.snapshot.devices.iter().find(|p| p.id == d.id);
                                let rate = |now: u64, then: u64| {
                                    now.saturating_sub(then) as f64 / secs / (1024.0 * 1024.0)
                                };
                                let (to, from) = before.map_or((0.0, 0.0), |p| {
                                    (
                                        rate(d.bytes_to_device, p.bytes_to_device),
                                        rate(d.bytes_from_device, p.bytes_from_device),
                                    )
                                });
                                (d.id, (to, from))
                            })
                            .collect();
                    }
                }
                if self
                    .status
                    .as_ref()
                    .is_none_or(|s| s.ticket != status.ticket)
                {
                    self.qr = qr(&status.ticket);
                }
                self.status = Some(status);
                self.error = None;
            }
            Err(e) => {
                self.error = Some(e);
                self.status = None;
                self.rates.clear();
            }
        }
    }
}

/// The first characters of an endpoint id: enough to tell clients apart on screen.
fn short(id: &str) -> String {
    id.chars().take(10).collect()
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// Draws one frame.
pub fn draw(frame: &mut Frame, app: &App) {
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(5),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            " q ".reversed(),
            " quit  ".into(),
            " r ".reversed(),
            " reload the config (SIGHUP)".into(),
        ])),
        foot,
    );
    let Some(status) = &app.status else {
        let why = app
            .error
            .as_deref()
            .unwrap_or("waiting for the server's status");
        frame.render_widget(
            Paragraph::new(vec![
                Line::from(why.to_owned()),
                Line::from(""),
                Line::from(
                    "Start it with `p2p-usb-server run` (or `systemctl start p2p-usb-server`).",
                ),
            ])
            .block(Block::bordered().title(" p2p-usb-server ")),
            head.union(body),
        );
        return;
    };
    let who = if status.allow_any {
        "any client with the ticket".to_owned()
    } else {
        format!("{} allowed client id(s)", status.allowed)
    };
    frame.render_widget(
        Paragraph::new(vec![Line::from(vec![
            Span::styled("ticket ", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(status.ticket.clone()),
        ])])
        .block(Block::bordered().title(format!(
            " p2p-usb-server · pid {} · {} device(s) · {} client(s) · {who} ",
            status.pid,
            status.snapshot.devices.len(),
            status.snapshot.clients.len()
        ))),
        head,
    );
    let qr_width = app.qr.first().map_or(0, |l| l.chars().count() as u16);
    let show_qr = body.width >= qr_width + 60 && body.height >= app.qr.len() as u16 + 2;
    let (tables, qr_area) = if show_qr {
        let [t, q] =
            Layout::horizontal([Constraint::Min(60), Constraint::Length(qr_width + 2)]).areas(body);
        (t, Some(q))
    } else {
        (body, None)
    };
    let clients_height = status.snapshot.clients.len().clamp(1, 8) as u16 + 3;
    let [devices_area, clients_area] =
        Layout::vertical([Constraint::Min(4), Constraint::Length(clients_height)]).areas(tables);
    draw_devices(frame, app, status, devices_area);
    draw_clients(frame, status, clients_area);
    if let Some(area) = qr_area {
        frame.render_widget(
            Paragraph::new(
                app.qr
                    .iter()
                    .map(|l| Line::from(l.clone()))
                    .collect::<Vec<_>>(),
            )
            .block(Block::bordered().title(" scan to pair ")),
            area,
        );
    }
}

fn draw_devices(frame: &mut Frame, app: &App, status: &Status, area: Rect) {
    let header = Row::new([
        "bus id",
        "vid:pid",
        "product",
        "pin",
        "held by",
        "read MiB/s",
        "write MiB/s",
        "total MiB",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = status.snapshot.devices.iter().map(|d| {
        let (to, from) = app.rates.get(&d.id).copied().unwrap_or_default();
        let attached = match &d.attached_to {
            Some(id) => Cell::from(short(id)).style(Style::new().fg(Color::Green)),
            None => Cell::from("free").style(Style::new().fg(Color::DarkGray)),
        };
        Row::new(vec![
            Cell::from(d.bus_id.clone()),
            Cell::from(d.vid_pid.clone()),
            Cell::from(d.product.clone().unwrap_or_else(|| "-".into())),
            Cell::from(if d.pin { "yes" } else { "-" }),
            attached,
            // Read and write as the client sees them: read is data from the device.
            Cell::from(format!("{from:.1}")),
            Cell::from(format!("{to:.1}")),
            Cell::from(mib(d.bytes_from_device + d.bytes_to_device)),
        ])
    });
    let widths = [
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Min(12),
        Constraint::Length(4),
        Constraint::Length(11),
        Constraint::Length(11),
        Constraint::Length(12),
        Constraint::Length(10),
    ];
    let title = if status.snapshot.devices.is_empty() {
        " shared devices: none match the share rules (p2p-usb-server share ...) "
    } else {
        " shared devices "
    };
    frame.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::bordered().title(title)),
        area,
    );
}

fn draw_clients(frame: &mut Frame, status: &Status, area: Rect) {
    let header = Row::new(["client", "software", "connected", "holds", "path"])
        .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = status.snapshot.clients.iter().map(|c| {
        let holds: Vec<&str> = status
            .snapshot
            .devices
            .iter()
            .filter(|d| d.attached_to.as_deref() == Some(c.id.as_str()))
            .map(|d| d.bus_id.as_str())
            .collect();
        Row::new(vec![
            short(&c.id),
            c.agent.clone(),
            format!("{}s", c.connected_secs),
            if holds.is_empty() {
                "-".to_owned()
            } else {
                holds.join(" ")
            },
            c.path.as_ref().map_or("-".to_owned(), |p| {
                format!("{p}, {} changes", c.path_changes)
            }),
        ])
    });
    let widths = [
        Constraint::Length(12),
        Constraint::Length(24),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Min(20),
    ];
    frame.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::bordered().title(" connected clients ")),
        area,
    );
}

#[cfg(test)]
mod tests {
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::*;
    use crate::connection::{ClientStatus, DeviceStatus, Snapshot};

    fn screen(app: &App, w: u16, h: u16) -> String {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, app)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| buf[(x, y)].symbol().to_owned())
                    .collect::<String>()
                    + "\n"
            })
            .collect()
    }

    fn status(ms: u64, bytes_from: u64) -> Status {
        let client = "c1ient0000aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_owned();
        Status {
            pid: 42,
            id: "feed".into(),
            ticket: format!("p2pusb1:{}@10.0.0.2:7788", "b".repeat(64)),
            allowed: 1,
            updated_unix_ms: ms,
            snapshot: Snapshot {
                devices: vec![
                    DeviceStatus {
                        id: 1,
                        bus_id: "1-1.2".into(),
                        vid_pid: "0781:5581".into(),
                        product: Some("Ultra".into()),
                        attached_to: Some(client.clone()),
                        bytes_from_device: bytes_from,
                        ..DeviceStatus::default()
                    },
                    DeviceStatus {
                        id: 2,
                        bus_id: "1-1.3".into(),
                        vid_pid: "1209:0001".into(),
                        pin: true,
                        ..DeviceStatus::default()
                    },
                ],
                clients: vec![ClientStatus {
                    id: client,
                    agent: "p2p-usb-client/0.1.0".into(),
                    connected_secs: 12,
                    path: Some(transport::path::PathView {
                        relay: false,
                        remote: "10.0.0.2:4000".into(),
                        rtt_ms: 2.5,
                    }),
                    path_changes: 1,
                }],
            },
            ..Status::default()
        }
    }

    #[test]
    fn shows_devices_holders_throughput_and_the_qr_code() {
        let mut app = App::default();
        app.update(Ok(status(1_000, 0)));
        app.update(Ok(status(2_000, 10 * 1024 * 1024)));
        let s = screen(&app, 140, 40);
        assert!(s.contains("pid 42 · 2 device(s) · 1 client(s)"), "{s}");
        assert!(s.contains("1-1.2"), "{s}");
        assert!(s.contains("Ultra"), "{s}");
        assert!(s.contains("c1ient0000"), "{s}");
        assert!(s.contains("read MiB/s"), "{s}");
        assert!(s.contains("10.0"), "10 MiB in one second: {s}");
        assert!(s.contains("free"), "{s}");
        assert!(s.contains("yes"), "the PIN column: {s}");
        assert!(s.contains("p2p-usb-client/0.1.0"), "{s}");
        assert!(s.contains("direct 10.0.0.2:4000"), "{s}");
        assert!(s.contains("scan to pair"), "{s}");
        assert!(s.contains('▀') || s.contains('▄'), "{s}");
    }

    #[test]
    fn a_narrow_terminal_drops_the_qr_code_not_the_tables() {
        let mut app = App::default();
        app.update(Ok(status(1_000, 0)));
        let s = screen(&app, 90, 20);
        assert!(!s.contains("scan to pair"), "{s}");
        assert!(s.contains("1-1.3"), "{s}");
    }

    #[test]
    fn says_so_when_no_server_runs() {
        let mut app = App::default();
        app.update(Err("no running server found".into()));
        let s = screen(&app, 80, 12);
        assert!(s.contains("no running server found"), "{s}");
        assert!(s.contains("p2p-usb-server run"), "{s}");
    }
}
