//! `p2p-usb-client tui`: every paired server with its round-trip time and latency
//! percentiles, what each shares, and which vhci ports hold remote devices here.
//!
//! The binary's tasks fill an [`App`] (pings, device lists, vhci status); drawing is a pure
//! function of it, so tests render to ratatui's `TestBackend` and read the screen.

use std::collections::VecDeque;
use std::time::Duration;

use protocol::wire::DeviceInfo;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};

/// How many round trips the percentiles cover (a minute at one ping a second).
pub const WINDOW: usize = 60;

/// Where a server connection stands.
#[derive(Debug, Clone, Default)]
pub enum Link {
    /// Dialling.
    #[default]
    Connecting,
    /// Up.
    Connected,
    /// Down, and why; retried.
    Down(String),
}

/// One server as the screen shows it.
#[derive(Debug, Clone, Default)]
pub struct ServerView {
    /// Its name in the config, or the start of its id.
    pub name: String,
    /// Its endpoint id.
    pub id: String,
    /// Connection state.
    pub link: Link,
    /// The latest round trips, oldest first.
    pub rtts: VecDeque<Duration>,
    /// What it shares with us.
    pub devices: Vec<DeviceInfo>,
    /// The path to it now, and how often that changed.
    pub path: Option<(transport::path::PathView, u64)>,
}

impl ServerView {
    /// Records a round trip, keeping the last [`WINDOW`].
    pub fn push_rtt(&mut self, rtt: Duration) {
        if self.rtts.len() == WINDOW {
            self.rtts.pop_front();
        }
        self.rtts.push_back(rtt);
    }

    /// The `q` quantile of the window, in milliseconds.
    pub fn percentile_ms(&self, q: f64) -> Option<f64> {
        let mut sorted: Vec<Duration> = self.rtts.iter().copied().collect();
        sorted.sort();
        let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted.get(i).map(|d| d.as_secs_f64() * 1e3)
    }
}

/// A vhci port in use here.
#[derive(Debug, Clone)]
pub struct PortView {
    /// vhci port number.
    pub port: u32,
    /// USB/IP device id the kernel was given (`busnum << 16 | devnum` on the server).
    pub devid: u32,
    /// The device's bus id on this machine.
    pub local_busid: String,
    /// What the process holding the port reports, if it does.
    pub live: Option<crate::port_report::PortReport>,
}

/// Everything on screen.
#[derive(Debug)]
pub struct App {
    /// Servers, in config order.
    pub servers: Vec<ServerView>,
    /// Ports in use, or why they cannot be read (no vhci-hcd).
    pub ports: Result<Vec<PortView>, String>,
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

/// Draws one frame.
pub fn draw(frame: &mut Frame, app: &App) {
    let devices: usize = app.servers.iter().map(|s| s.devices.len()).sum();
    let ports = app.ports.as_ref().map_or(1, Vec::len);
    let [servers_area, devices_area, ports_area, foot] = Layout::vertical([
        Constraint::Length(app.servers.len().max(1) as u16 + 3),
        Constraint::Length(devices.max(1) as u16 + 3),
        Constraint::Length(ports.max(1) as u16 + 3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(
        Paragraph::new(Line::from(vec![" q ".reversed(), " quit".into()])),
        foot,
    );

    let bold = Style::new().add_modifier(Modifier::BOLD);
    let rows = app.servers.iter().map(|s| {
        let link = match &s.link {
            Link::Connecting => Cell::from("connecting").style(Style::new().fg(Color::Yellow)),
            Link::Connected => Cell::from("connected").style(Style::new().fg(Color::Green)),
            Link::Down(why) => {
                Cell::from(format!("down: {why}")).style(Style::new().fg(Color::Red))
            }
        };
        Row::new(vec![
            Cell::from(s.name.clone()),
            Cell::from(s.id.chars().take(10).collect::<String>()),
            link,
            Cell::from(ms(s.rtts.back().map(|d| d.as_secs_f64() * 1e3))),
            Cell::from(ms(s.percentile_ms(0.5))),
            Cell::from(ms(s.percentile_ms(0.9))),
            Cell::from(ms(s.percentile_ms(0.99))),
            Cell::from(s.rtts.len().to_string()),
            Cell::from(s.path.as_ref().map_or("-".to_owned(), |(p, changes)| {
                let kind = if p.relay { "relay" } else { "direct" };
                format!("{kind} {}, {changes} changes", p.remote)
            })),
        ])
    });
    frame.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(12),
                Constraint::Length(11),
                Constraint::Min(12),
                Constraint::Length(9),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(7),
                Constraint::Min(20),
            ],
        )
        .header(
            Row::new([
                "server", "id", "link", "rtt ms", "p50 ms", "p90 ms", "p99 ms", "pings", "path",
            ])
            .style(bold),
        )
        .block(Block::bordered().title(format!(
            " p2p-usb-client · {} server(s) · latency over the last {WINDOW} round trips ",
            app.servers.len()
        ))),
        servers_area,
    );

    let local = app.ports.as_ref().ok();
    let rows = app.servers.iter().flat_map(|s| {
        s.devices.iter().map(move |d| {
            let port = local
                .and_then(|ports| ports.iter().find(|p| p.devid == d.usbip_devid()))
                .map_or(Cell::from("-"), |p| {
                    Cell::from(format!("vhci port {}", p.port)).style(Style::new().fg(Color::Green))
                });
            Row::new(vec![
                Cell::from(s.name.clone()),
                Cell::from(d.bus_id.clone()),
                Cell::from(d.vid_pid().to_string()),
                Cell::from(format!("{:?}", d.speed)),
                Cell::from(d.product.clone().unwrap_or_else(|| "-".into())),
                port,
            ])
        })
    });
    frame.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(12),
                Constraint::Length(10),
                Constraint::Length(10),
                Constraint::Length(6),
                Constraint::Min(14),
                Constraint::Length(14),
            ],
        )
        .header(
            Row::new([
                "server", "bus id", "vid:pid", "speed", "product", "attached",
            ])
            .style(bold),
        )
        .block(Block::bordered().title(" remote devices ")),
        devices_area,
    );

    let (rows, title): (Vec<Row>, String) = match &app.ports {
        Ok(ports) => (
            ports
                .iter()
                .map(|p| {
                    let live = p.live.as_ref();
                    let streams = live.map_or(String::new(), |l| {
                        l.iso
                            .iter()
                            .map(crate::port_report::iso_cell)
                            .collect::<Vec<_>>()
                            .join("; ")
                    });
                    Row::new(vec![
                        p.port.to_string(),
                        format!("{:#010x}", p.devid),
                        p.local_busid.clone(),
                        ms(live.and_then(|l| l.rtt_ms)),
                        live.map_or(String::new(), |l| l.submitted.to_string()),
                        streams,
                    ])
                })
                .collect(),
            format!(" vhci ports in use here: {} ", ports.len()),
        ),
        Err(why) => (vec![], format!(" vhci ports: {why} ")),
    };
    frame.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(6),
                Constraint::Length(12),
                Constraint::Length(13),
                Constraint::Length(9),
                Constraint::Length(10),
                Constraint::Min(20),
            ],
        )
        .header(
            Row::new([
                "port",
                "devid",
                "local bus id",
                "rtt ms",
                "URBs",
                "iso streams",
            ])
            .style(bold),
        )
        .block(Block::bordered().title(title)),
        ports_area,
    );
}

#[cfg(test)]
mod tests {
    use protocol::usb::Speed;
    use protocol::wire::{ClassTriple, DeviceId};
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::*;

    fn screen(app: &App) -> String {
        let (w, h) = (110, 24);
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, app)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..h)
            .map(|y| (0..w).map(|x| buf[(x, y)].symbol()).collect::<String>() + "\n")
            .collect()
    }

    fn disk() -> DeviceInfo {
        DeviceInfo {
            id: DeviceId(1),
            bus_id: "1-1.2".into(),
            bus_number: 1,
            device_address: 3,
            vendor_id: 0x0781,
            product_id: 0x5581,
            bcd_device: 0,
            class: ClassTriple {
                class: 0,
                subclass: 0,
                protocol: 0,
            },
            speed: Speed::High,
            manufacturer: None,
            product: Some("Ultra".into()),
            serial: None,
            device_descriptor: vec![],
            configurations: vec![],
            active_configuration: 1,
        }
    }

    #[test]
    fn shows_rtt_percentiles_devices_and_the_port_they_sit_on() {
        let mut pi = ServerView {
            name: "pi".into(),
            id: "ae58ff8833241ac8".into(),
            link: Link::Connected,
            devices: vec![disk()],
            path: Some((
                transport::path::PathView {
                    relay: false,
                    remote: "10.0.0.2:4000".into(),
                    rtt_ms: 2.0,
                },
                1,
            )),
            ..ServerView::default()
        };
        for ms in 1..=100 {
            pi.push_rtt(Duration::from_millis(ms));
        }
        assert_eq!(pi.rtts.len(), WINDOW);
        let desk = ServerView {
            name: "desk".into(),
            link: Link::Down("timed out".into()),
            ..ServerView::default()
        };
        let app = App {
            servers: vec![pi, desk],
            ports: Ok(vec![PortView {
                port: 3,
                devid: disk().usbip_devid(),
                local_busid: "3-1".into(),
                live: Some(crate::port_report::PortReport {
                    port: 3,
                    rtt_ms: Some(20.0),
                    submitted: 812,
                    iso: vec![crate::vhci::IsoEndpointStats {
                        endpoint: 1,
                        direction: crate::vhci::iso_ahead::IsoDirection::Out,
                        underruns: 7,
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            }]),
        };
        let s = screen(&app);
        assert!(s.contains("connected"), "{s}");
        assert!(s.contains("down: timed out"), "{s}");
        // The window holds 41..=100 ms: p50 71, p90 94, p99 99 (nearest rank).
        assert!(s.contains("71.00"), "{s}");
        assert!(s.contains("94.00"), "{s}");
        assert!(s.contains("99.00"), "{s}");
        assert!(s.contains("Ultra"), "{s}");
        assert!(s.contains("vhci port 3"), "{s}");
        assert!(s.contains("3-1"), "{s}");
        assert!(s.contains("ep1 out: 7 underruns"), "{s}");
        assert!(s.contains("direct 10.0.0.2"), "{s}");
        assert!(s.contains("20.00"), "{s}");
    }

    #[test]
    fn says_why_there_are_no_ports() {
        let app = App {
            servers: vec![],
            ports: Err("vhci-hcd is not loaded".into()),
        };
        let s = screen(&app);
        assert!(s.contains("vhci-hcd is not loaded"), "{s}");
    }
}
