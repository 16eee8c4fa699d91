//! `p2p-usb-client run`: keep the devices the config names attached, whatever happens to the
//! network or the server.
//!
//! One supervisor per server. It connects, attaches every shared device an auto-attach rule
//! names, attaches more as the server announces them (`DeviceArrived`), and when the connection
//! drops it reconnects with exponential back-off and attaches them again. Each attachment is
//! the ordinary [`crate::attach`] contract; this module only decides when to start one.
//! A device the user detached here (`p2p-usb-client detach`) stays detached until the server
//! announces it anew, so the supervisor never fights the person at the keyboard.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use protocol::select::{DeviceFacts, DeviceMatch};
use protocol::wire::{DeviceId, DeviceInfo, Event};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};
use transport::{ClientError, ServerConnection};

use crate::attach::AttachEnd;
use crate::vhci::{RealSys, Vhci};

/// Exponential back-off: each failure doubles the wait, up to a cap; a success starts over.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `initial`, never waits longer than `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The wait before the next attempt; the one after is twice as long.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// A device to keep attached.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Which devices.
    pub device: DeviceMatch,
    /// Its PIN, if it has one.
    pub pin: Option<String>,
    /// How its port hides the round trip.
    pub tuning: crate::attach::Tuning,
}

/// Why a connection's supervision ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// Asked to stop.
    Shutdown,
    /// The connection broke; reconnect.
    Lost(String),
}

/// Supervises one server until `stop` turns true. `connect` dials it afresh each time.
pub async fn supervise<C, F>(
    server: String,
    connect: C,
    rules: Vec<Rule>,
    vhci: Arc<Vhci<RealSys>>,
    mut backoff: Backoff,
    mut stop: watch::Receiver<bool>,
) where
    C: Fn() -> F,
    F: Future<Output = Result<Arc<ServerConnection>, ClientError>>,
{
    loop {
        if *stop.borrow() {
            return;
        }
        let why = match connect().await {
            Ok(conn) => {
                info!(%server, "connected");
                backoff.reset();
                let ended = run_connection(&server, &conn, &rules, &vhci, stop.clone()).await;
                // The endpoint stays: the next attempt dials from it.
                conn.close_connection();
                match ended {
                    Ended::Shutdown => return,
                    Ended::Lost(why) => why,
                }
            }
            Err(e) => e.to_string(),
        };
        let wait = backoff.next_delay();
        warn!(%server, "{why}; reconnecting in {:.1}s", wait.as_secs_f64());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Attaches what the rules name on one connection, until it breaks or we are stopped.
async fn run_connection(
    server: &str,
    conn: &Arc<ServerConnection>,
    rules: &[Rule],
    vhci: &Arc<Vhci<RealSys>>,
    mut stop: watch::Receiver<bool>,
) -> Ended {
    let (events_tx, mut events) = broadcast::channel::<Event>(64);
    if let Some(mut rx) = conn.take_events() {
        let tx = events_tx.clone();
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                let _ = tx.send(e);
            }
        });
    }
    let listed = match conn.list_devices().await {
        Ok(l) => l,
        Err(e) => return Ended::Lost(format!("listing devices: {e}")),
    };
    // Attachments end on their own when we stop: each watches `stop`.
    let mut running: JoinSet<(DeviceId, u32, AttachEnd)> = JoinSet::new();
    let mut attached: HashSet<DeviceId> = HashSet::new();
    for d in listed {
        start(
            server,
            conn,
            rules,
            vhci,
            &events_tx,
            &stop,
            &mut running,
            &mut attached,
            d,
        )
        .await;
    }
    loop {
        tokio::select! {
            _ = stop.changed() => {
                while running.join_next().await.is_some() {}
                return Ended::Shutdown;
            }
            e = conn.connection().closed() => {
                while running.join_next().await.is_some() {}
                return Ended::Lost(format!("connection lost: {e}"));
            }
            event = events.recv() => match event {
                Ok(Event::DeviceArrived(d)) => {
                    start(server, conn, rules, vhci, &events_tx, &stop, &mut running, &mut attached, d).await;
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    while running.join_next().await.is_some() {}
                    return Ended::Lost("the server's event stream ended".into());
                }
            },
            Some(Ok((device, port, end))) = running.join_next() => {
                attached.remove(&device);
                info!(%server, port, ?end, "attachment ended");
                // A device detached here or removed there is attached again only when the
                // server announces it anew.
                if let AttachEnd::ConnectionLost(why) = end {
                    while running.join_next().await.is_some() {}
                    return Ended::Lost(why);
                }
            }
        }
    }
}

/// Claims `d` on the server and attaches it here, if a rule names it and it is not attached.
#[allow(clippy::too_many_arguments)]
async fn start(
    server: &str,
    conn: &Arc<ServerConnection>,
    rules: &[Rule],
    vhci: &Arc<Vhci<RealSys>>,
    events: &broadcast::Sender<Event>,
    stop: &watch::Receiver<bool>,
    running: &mut JoinSet<(DeviceId, u32, AttachEnd)>,
    attached: &mut HashSet<DeviceId>,
    d: DeviceInfo,
) {
    let facts = DeviceFacts::from_wire(&d);
    let Some(rule) = rules.iter().find(|r| r.device.matches(&facts)) else {
        return;
    };
    if attached.contains(&d.id) {
        return;
    }
    let (handle, info) = match conn.attach(d.id, rule.pin.clone()).await {
        Ok(a) => a,
        Err(e) => return warn!(%server, bus_id = %d.bus_id, "could not attach: {e}"),
    };
    match crate::attach::attach(
        conn.clone(),
        handle,
        info,
        vhci.clone(),
        events.subscribe(),
        stop.clone(),
        None,
        rule.tuning,
    )
    .await
    {
        Ok(a) => {
            info!(%server, bus_id = %a.device.bus_id, port = a.port, "attached");
            attached.insert(d.id);
            let (id, port) = (d.id, a.port);
            running.spawn(async move {
                let end = a
                    .task
                    .await
                    .unwrap_or_else(|e| AttachEnd::Violation(e.to_string()));
                (id, port, end)
            });
        }
        Err(e) => {
            warn!(%server, bus_id = %d.bus_id, "could not attach to the local kernel: {e}");
            let _ = conn.detach(handle).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use protocol::usb::Speed;
    use protocol::wire::ClassTriple;

    use super::*;

    #[test]
    fn back_off_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let waits: Vec<u64> = (0..10).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(
            waits,
            [
                500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000
            ]
        );
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(500));
    }

    #[test]
    fn a_rule_names_a_device_by_bus_id_vid_pid_serial_or_product() {
        let d = DeviceInfo {
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
            serial: Some("4C53".into()),
            device_descriptor: vec![],
            configurations: vec![],
            active_configuration: 1,
        };
        for spec in [
            "1-1.2",
            "0781:5581",
            "0781:5581".to_uppercase().as_str(),
            "4C53",
            "Ultra",
        ] {
            assert!(names(&d, spec), "{spec}");
        }
        for spec in ["1-1", "0781:5582", "ultra", ""] {
            assert!(!names(&d, spec), "{spec}");
        }
    }

    /// What a rule's spec names, through the shared grammar; a spec that does not parse
    /// names nothing.
    fn names(d: &DeviceInfo, spec: &str) -> bool {
        DeviceMatch::parse(spec).is_ok_and(|p| p.matcher.matches(&DeviceFacts::from_wire(d)))
    }
}
