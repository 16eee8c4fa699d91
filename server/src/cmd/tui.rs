//! `tui`: a live terminal view of the running server, drawn from its status file (`r`
//! reloads it, `q` quits).

use std::path::Path;
use std::time::Duration;

use server::status::Status;

/// Redraws every second until `q`.
pub fn run(path: &Path) -> anyhow::Result<()> {
    use crossterm::event::{self, Event, KeyCode, KeyEventKind};
    let mut app = server::tui::App::default();
    let mut terminal = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        loop {
            app.update(Status::read(path).map_err(|e| e.to_string()));
            terminal.draw(|f| server::tui::draw(f, &app))?;
            if event::poll(Duration::from_millis(1000))?
                && let Event::Key(key) = event::read()?
                && key.kind == KeyEventKind::Press
            {
                match key.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('r') => {
                        if let Ok(s) = Status::read(path) {
                            let _ = std::process::Command::new("kill")
                                .args(["-HUP", &s.pid.to_string()])
                                .status();
                        }
                    }
                    _ => {}
                }
            }
        }
    })();
    ratatui::restore();
    result
}
