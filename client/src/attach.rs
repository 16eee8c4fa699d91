//! One attached device: the glue between a vhci port and a server's URB streams.
//!
//! Bytes from the kernel go into the port's [`PortSession`]; its actions go out as URB stream
//! frames (one stream per endpoint, each with its own writer task so a flow-controlled bulk
//! stream never stalls another endpoint) or back to the kernel. Completions from every stream
//! come back through one channel. All protocol decisions are the session's; this file only
//! moves bytes and ends the attachment cleanly, whichever side ends it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::usb::{Direction, EndpointNumber};
use protocol::wire::{
    AttachHandle, Capabilities, DeviceInfo, EndReason, Event, UrbClientMessage, UrbServerMessage,
    UrbWindow,
};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, warn};
use transport::{FramedRecv, FramedSend, ServerConnection};

use crate::port_report::{self, PortReport};
use crate::telemetry::{PortRecorder, Recording};
use crate::vhci::disk::{self, Tuned};
use crate::vhci::sysfs::VDEV_ST_USED;
use crate::vhci::{Action, KernelLink, PortSession, RealSys, Vhci};

/// What this client asks a server for: each URB's server timing, and URBs held for the one
/// they follow, without which read-ahead stays off ([`crate::vhci::readahead`]).
pub const CAPABILITIES: Capabilities = Capabilities::TIMING.union(Capabilities::ORDERED_SUBMIT);

/// How a port hides the round trip to the server; each part is off unless asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tuning {
    /// Mass-storage read-ahead ([`PortSession::with_read_ahead`]).
    pub read_ahead: bool,
    /// Raise a usb-storage disk's `max_sectors` to this many sectors ([`disk`]).
    pub scsi_max_sectors: Option<u16>,
    /// Interrupt-IN streaming ([`PortSession::with_interrupt_streaming`]).
    pub interrupt_streaming: bool,
}

/// Where the kernel lists USB devices by bus id.
const USB_DEVICES: &str = "/sys/bus/usb/devices";
/// How long after attaching a disk may take to appear (enumeration, usb-storage's probe and
/// its SCSI scan after `delay_use`, 1 s by default): seconds on a slow machine.
const DISK_WAIT: Duration = Duration::from_secs(60);
const DISK_POLL: Duration = Duration::from_millis(200);
/// How often a port takes the link's round-trip estimate.
const RTT_EVERY: Duration = Duration::from_secs(1);

/// Why an attachment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachEnd {
    /// The port was detached on this machine (`p2p-usb-client detach`, or the kernel dropped
    /// it).
    KernelDetached,
    /// The server ended the attachment, and said why (unplugged, revoked, shutting down, a
    /// device error): the supervisor waits for the device to be announced again.
    ServerEnded(EndReason),
    /// The server closed the attachment's URB stream without an event saying why.
    StreamEnded(String),
    /// The connection to the server is gone.
    ConnectionLost(String),
    /// We were asked to stop (Ctrl-C, SIGTERM).
    Shutdown,
    /// The kernel or the server broke the protocol; the port was closed.
    Violation(String),
}

impl AttachEnd {
    /// Whether the server may still hold the attachment, so ending it here owes it a detach:
    /// not when the server ended it, closed its stream, or the connection is gone.
    pub fn server_still_attached(&self) -> bool {
        !matches!(
            self,
            AttachEnd::ServerEnded(_) | AttachEnd::StreamEnded(_) | AttachEnd::ConnectionLost(_)
        )
    }
}

/// Why a device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// vhci refused or is missing.
    #[error(transparent)]
    Vhci(#[from] crate::vhci::VhciError),
    /// The socketpair or the byte pump could not start.
    #[error("could not set up the vhci socket: {0}")]
    Io(#[from] std::io::Error),
}

/// A device attached to a local vhci port.
pub struct Attached {
    /// The vhci port it sits on.
    pub port: u32,
    /// The device.
    pub device: DeviceInfo,
    /// Ends when the attachment ends.
    pub task: tokio::task::JoinHandle<AttachEnd>,
}

/// Stream keys: the session routes ep0 of both directions to `(0, Out)`.
type StreamKey = (EndpointNumber, Direction);

/// What the per-stream readers report.
enum FromServer {
    Message(StreamKey, UrbServerMessage),
    /// A stream ended: the server finished it (attachment over) or the connection broke.
    StreamEnded(String),
}

/// Attaches `device` (already claimed as `handle` on `conn`) to a free vhci port and runs it
/// until it ends. `events` carries the connection's server events; `stop` asks for shutdown;
/// `recording`, if any, gets every URB's timestamps; `tuning` says how to hide the round trip
/// (read-ahead is off while recording, which times each URB's own trip to the server).
#[allow(clippy::too_many_arguments)]
pub async fn attach(
    conn: Arc<ServerConnection>,
    handle: AttachHandle,
    device: DeviceInfo,
    vhci: Arc<Vhci<RealSys>>,
    events: broadcast::Receiver<Event>,
    stop: watch::Receiver<bool>,
    recording: Option<&Recording>,
    tuning: Tuning,
) -> Result<Attached, AttachError> {
    let (ours, kernels) = UnixStream::pair()?;
    let port = vhci.attach_any(kernels.as_fd(), device.usbip_devid(), device.speed)?;
    // The kernel holds its own reference to its end now.
    drop(kernels);
    let (link, link_handle) = match KernelLink::start(OwnedFd::from(ours)) {
        Ok(ok) => ok,
        Err(e) => {
            let _ = vhci.detach(port);
            return Err(e.into());
        }
    };
    info!(
        port,
        backend = ?link_handle.backend(),
        bus_id = %device.bus_id,
        vid_pid = %device.vid_pid(),
        "device attached to vhci"
    );
    let info = device.clone();
    let recorder = recording.map(|r| r.port(port, device.usbip_devid(), &device.bus_id));
    // Only a device with a mass-storage interface can become a usb-storage disk; nothing else
    // is watched for one.
    let is_storage = device
        .interface_classes()
        .iter()
        .any(|c| c[0] == protocol::bot::CLASS_MASS_STORAGE);
    // The disk's command size once set: how far read-ahead may widen a READ.
    let (disk_tx, disk_rx) = watch::channel(0u32);
    let tuner = tuning
        .scsi_max_sectors
        .filter(|_| is_storage)
        .map(|sectors| tokio::spawn(raise_max_sectors(vhci.clone(), port, sectors, disk_tx)));
    let task = tokio::spawn(async move {
        let end = run_port_recorded(
            conn.clone(),
            handle,
            &device,
            link,
            Vec::new(),
            events,
            stop,
            recorder,
            tuning,
            Some(port),
            Some(disk_rx),
        )
        .await;
        info!(port, ?end, "attachment ending");
        // The port may take another device next: nothing of this one is tuned after it.
        if let Some(tuner) = tuner {
            tuner.abort();
        }
        // Every way out leaves no ghost port and no claim behind.
        if end != AttachEnd::KernelDetached
            && let Err(e) = vhci.detach(port)
        {
            debug!(port, "vhci detach: {e}");
        }
        link_handle.shutdown();
        let _ = link_handle.finished().await;
        if end.server_still_attached() {
            let _ = conn.detach(handle).await;
        }
        end
    });
    Ok(Attached {
        port,
        device: info,
        task,
    })
}

/// Waits for the disk the kernel makes of the device on `port` and raises its SCSI command
/// size to `sectors` ([`disk`]). Logs what it did, and sends the size the disk ends with (the
/// smallest over its LUNs, in bytes) to `size`; a device that never becomes a usb-storage
/// disk (another class, UAS) is left alone after [`DISK_WAIT`].
async fn raise_max_sectors(
    vhci: Arc<Vhci<RealSys>>,
    port: u32,
    sectors: u16,
    size: watch::Sender<u32>,
) {
    let deadline = Instant::now() + DISK_WAIT;
    loop {
        let vhci = vhci.clone();
        // sysfs reads can wait on a device lock held through a driver's probe: not on a
        // runtime thread.
        let found = tokio::task::spawn_blocking(move || -> io::Result<Vec<Tuned>> {
            let ports = vhci.ports().map_err(io::Error::other)?;
            let Some(busid) = ports
                .into_iter()
                .find(|p| p.port == port && p.status == VDEV_ST_USED)
                .map(|p| p.local_busid)
            else {
                return Ok(Vec::new());
            };
            disk::max_sectors_attrs(Path::new(USB_DEVICES), &busid)?
                .iter()
                .map(|attr| disk::raise(attr, sectors))
                .collect()
        })
        .await;
        match found {
            Ok(Ok(tuned)) if !tuned.is_empty() => {
                let smallest = tuned
                    .iter()
                    .map(|t| match t {
                        Tuned::Raised { .. } => sectors,
                        Tuned::Kept { value, .. } => *value,
                    })
                    .min()
                    .unwrap_or(0);
                size.send_replace(u32::from(smallest) * 512);
                for t in tuned {
                    match t {
                        Tuned::Raised { attr, from } => info!(
                            port,
                            attr = %attr.display(),
                            "SCSI commands raised from {from} to {sectors} sectors"
                        ),
                        Tuned::Kept { attr, value } => info!(
                            port,
                            attr = %attr.display(),
                            "SCSI command size left at {value} sectors (not usb-storage's default)"
                        ),
                    }
                }
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return warn!(port, "could not raise the disk's max_sectors: {e}"),
            Err(_) => return,
        }
        if Instant::now() >= deadline {
            return info!(
                port,
                "no usb-storage disk appeared within {DISK_WAIT:?}; max_sectors left alone"
            );
        }
        tokio::time::sleep(DISK_POLL).await;
    }
}

/// Runs one claimed device over a USB/IP byte link (vhci's socketpair, or a TCP connection
/// from a `usbip attach` client) until either side ends it. `initial` holds URB-phase bytes
/// that were read before the link started (the tail of an OP_REQ_IMPORT).
#[allow(clippy::too_many_arguments)]
pub async fn run_port(
    conn: Arc<ServerConnection>,
    handle: AttachHandle,
    device: &DeviceInfo,
    link: KernelLink,
    initial: Vec<u8>,
    events: broadcast::Receiver<Event>,
    stop: watch::Receiver<bool>,
    read_ahead: bool,
) -> AttachEnd {
    let tuning = Tuning {
        read_ahead,
        ..Tuning::default()
    };
    run_port_recorded(
        conn, handle, device, link, initial, events, stop, None, tuning, None, None,
    )
    .await
}

/// [`run_port`] with a telemetry recorder for the port.
#[allow(clippy::too_many_arguments)]
async fn run_port_recorded(
    conn: Arc<ServerConnection>,
    handle: AttachHandle,
    device: &DeviceInfo,
    link: KernelLink,
    initial: Vec<u8>,
    events: broadcast::Receiver<Event>,
    stop: watch::Receiver<bool>,
    recorder: Option<PortRecorder>,
    tuning: Tuning,
    vhci_port: Option<u32>,
    disk_size: Option<watch::Receiver<u32>>,
) -> AttachEnd {
    let timed = recorder.is_some();
    if timed && (tuning.read_ahead || tuning.interrupt_streaming) {
        info!(
            "telemetry times every URB's own trip to the server: read-ahead, interrupt streaming and iso answers ahead are off"
        );
    }
    let ordered = conn
        .welcome()
        .capabilities
        .contains(Capabilities::ORDERED_SUBMIT);
    if tuning.read_ahead && !ordered {
        info!(
            "the server cannot hold a URB for the one it follows (an older version): read-ahead is off"
        );
    }
    let mut port_run = PortRun {
        conn,
        handle,
        session: PortSession::new(device)
            .with_read_ahead(tuning.read_ahead && ordered && !timed)
            .with_interrupt_streaming(tuning.interrupt_streaming && !timed)
            .with_iso_ahead(!timed),
        link,
        streams: HashMap::new(),
        windows: HashMap::new(),
        released: Vec::new(),
        from_server: mpsc::unbounded_channel(),
        recorder,
        disk_size,
        report: vhci_port.map(|port| PortReport {
            port,
            pid: std::process::id(),
            device: device.vid_pid().to_string(),
            ..PortReport::default()
        }),
    };
    let end = if initial.is_empty() {
        None
    } else {
        port_run.session.on_kernel_bytes(&initial);
        port_run.drive().await
    };
    let end = match end {
        Some(end) => end,
        None => port_run.run(events, stop).await,
    };
    let stats = port_run.session.stats();
    let ahead = stats.read_ahead;
    if ahead.speculated > 0 || stats.write_cbws_ahead + stats.read_cbws_ahead > 0 {
        info!(
            speculated = ahead.speculated,
            hits = ahead.hits,
            mismatches = ahead.mismatches,
            discarded = ahead.discarded,
            write_cbws_ahead = stats.write_cbws_ahead,
            read_cbws_ahead = stats.read_cbws_ahead,
            cbws_failed_late = stats.cbws_failed_late,
            widened = ahead.widened,
            served = ahead.served,
            joined = ahead.joined,
            widen_failed = ahead.widen_failed,
            "read-ahead"
        );
    }
    let iso = port_run.session.iso_stats();
    for s in &iso {
        info!(
            endpoint = s.endpoint,
            direction = ?s.direction,
            urbs = s.urbs,
            answered_ahead = s.answered_ahead,
            underruns = s.underruns,
            missed_frames = s.missed_frames,
            packet_errors = s.packet_errors,
            "isochronous stream"
        );
    }
    if let Some(r) = &mut port_run.recorder {
        r.ended(stats, port_run.session.in_flight(), iso);
    }
    if let Some(report) = &port_run.report {
        port_report::remove(&port_report::dir(), report.port);
    }
    end
}

struct PortRun {
    conn: Arc<ServerConnection>,
    handle: AttachHandle,
    session: PortSession,
    link: KernelLink,
    streams: HashMap<StreamKey, mpsc::UnboundedSender<UrbClientMessage>>,
    /// Each stream's URB window: what may be outstanding, what waits here.
    windows: HashMap<StreamKey, UrbWindow>,
    /// Windows a completion opened since the last `drive`, with frames to send.
    released: Vec<StreamKey>,
    from_server: (
        mpsc::UnboundedSender<FromServer>,
        mpsc::UnboundedReceiver<FromServer>,
    ),
    /// Per-URB timestamps, when `--telemetry` asked for them.
    recorder: Option<PortRecorder>,
    /// What `status` and the TUI are told about the vhci port, refreshed each second.
    report: Option<PortReport>,
    /// The disk's SCSI command size in bytes, once known: read-ahead widens READs up to it.
    disk_size: Option<watch::Receiver<u32>>,
}

impl PortRun {
    async fn run(
        &mut self,
        mut events: broadcast::Receiver<Event>,
        mut stop: watch::Receiver<bool>,
    ) -> AttachEnd {
        // How far ahead iso OUT is answered follows the link's round trip.
        let mut rtt_tick = tokio::time::interval(RTT_EVERY);
        loop {
            tokio::select! {
                _ = rtt_tick.tick() => self.every_second(),
                bytes = self.link.rx.recv() => match bytes {
                    Some(bytes) => {
                        if let Some(r) = &mut self.recorder {
                            r.kernel_bytes();
                        }
                        self.session.on_kernel_bytes(&bytes);
                    }
                    None => return AttachEnd::KernelDetached,
                },
                Some(msg) = self.from_server.1.recv() => {
                    if let Some(end) = self.on_server(msg) {
                        return end;
                    }
                    // Take every completion that is already here before answering the kernel,
                    // so its RET_SUBMITs go out in one write.
                    while let Ok(msg) = self.from_server.1.try_recv() {
                        if let Some(end) = self.on_server(msg) {
                            return end;
                        }
                    }
                }
                event = events.recv() => match event {
                    Ok(Event::AttachmentEnded { handle, reason }) if handle == self.handle => {
                        return AttachEnd::ServerEnded(reason);
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        return AttachEnd::ConnectionLost("the server's event stream ended".into());
                    }
                },
                _ = stop.changed() => return AttachEnd::Shutdown,
                e = self.conn.connection().closed() => return AttachEnd::ConnectionLost(e.to_string()),
            }
            if let Some(end) = self.drive().await {
                return end;
            }
        }
    }

    /// Takes the link's round trip for the session and tells `status` how the port does.
    fn every_second(&mut self) {
        // Read whatever the tuner last sent: it drops its sender once done, which a watch
        // reports as closed rather than as changed.
        if let Some(size) = &self.disk_size {
            let bytes = *size.borrow();
            if bytes != self.session.widened_reads() {
                info!(
                    bytes,
                    "sequential READs widened up to the disk's command size"
                );
                self.session.set_widened_reads(bytes);
            }
        }
        let rtt = self.conn.rtt();
        if let Some(rtt) = rtt {
            self.session.set_rtt(rtt);
        }
        let Some(report) = &mut self.report else {
            return;
        };
        let stats = self.session.stats();
        report.rtt_ms = rtt.map(|r| r.as_secs_f64() * 1e3);
        report.path = self.conn.path();
        report.path_changes = self.conn.path_changes();
        report.submitted = stats.submitted;
        report.completed = stats.completed;
        report.unlinked = stats.unlinked;
        report.bytes_out = stats.bytes_out;
        report.bytes_in = stats.bytes_in;
        report.iso = self.session.iso_stats();
        if let Err(e) = port_report::write(&port_report::dir(), report) {
            debug!(port = report.port, "could not write the port's report: {e}");
        }
    }

    fn on_server(&mut self, msg: FromServer) -> Option<AttachEnd> {
        if let FromServer::Message(key, msg) = &msg
            && let Some(window) = self.windows.get_mut(key)
            && window.on_server(msg)
            && !self.released.contains(key)
        {
            self.released.push(*key);
        }
        self.deliver(msg)
    }

    /// Hands a stream message (the server's, or one its window answered itself) to the
    /// session.
    fn deliver(&mut self, msg: FromServer) -> Option<AttachEnd> {
        match msg {
            FromServer::Message(_, UrbServerMessage::Complete(c)) => {
                if let Some(r) = &mut self.recorder {
                    r.completion(&c);
                }
                self.session.on_completion(c);
            }
            FromServer::Message(_, UrbServerMessage::UnlinkDone { id, cancelled }) => {
                self.session.on_unlink_done(id, cancelled)
            }
            FromServer::StreamEnded(why) => return Some(AttachEnd::StreamEnded(why)),
        }
        None
    }

    /// Carries out everything the session asked for.
    async fn drive(&mut self) -> Option<AttachEnd> {
        // Completions that opened a window: send what it held.
        for key in std::mem::take(&mut self.released) {
            if let Err(end) = self.flush_window(key).await {
                return Some(end);
            }
        }
        while let Some(action) = self.session.poll_action() {
            match action {
                Action::Submit {
                    endpoint,
                    direction,
                    urb,
                    after,
                } => {
                    let id = urb.id;
                    if let Some(r) = &mut self.recorder {
                        r.forwarded(&urb);
                    }
                    let key = (endpoint, direction);
                    let window = self.windows.entry(key).or_default();
                    match after {
                        Some(after) => window.submit_after(urb, after),
                        None => window.submit(urb),
                    }
                    if let Err(end) = self.flush_window(key).await {
                        warn!(?id, "could not send URB: {end:?}");
                        return Some(end);
                    }
                }
                Action::Unlink {
                    endpoint,
                    direction,
                    id,
                } => {
                    let key = (endpoint, direction);
                    self.windows.entry(key).or_default().unlink(id);
                    if let Err(end) = self.flush_window(key).await {
                        return Some(end);
                    }
                }
                Action::ToKernel(bytes) => {
                    if self.link.tx.send(bytes).await.is_err() {
                        return Some(AttachEnd::KernelDetached);
                    }
                    if let Some(r) = &mut self.recorder {
                        r.to_kernel();
                    }
                }
                Action::Close(reason) => {
                    warn!("closing the port: {reason}");
                    return Some(AttachEnd::Violation(reason.to_string()));
                }
            }
        }
        None
    }

    /// Sends what `key`'s window lets out, and hands the answers it made itself (an unlink of a
    /// URB it still held) to the session.
    async fn flush_window(&mut self, key: StreamKey) -> Result<(), AttachEnd> {
        loop {
            let Some(window) = self.windows.get_mut(&key) else {
                return Ok(());
            };
            if let Some(answer) = window.poll_answer() {
                if let Some(end) = self.deliver(FromServer::Message(key, answer)) {
                    return Err(end);
                }
                continue;
            }
            let Some(msg) = window.poll_send() else {
                return Ok(());
            };
            self.send(key, msg).await?;
        }
    }

    /// Sends on the stream of `key`, opening it on first use.
    async fn send(&mut self, key: StreamKey, msg: UrbClientMessage) -> Result<(), AttachEnd> {
        if !self.streams.contains_key(&key) {
            let (tx, rx) = self
                .conn
                .open_urb_stream(self.handle, key.0, key.1)
                .await
                .map_err(|e| AttachEnd::ConnectionLost(e.to_string()))?;
            let (out_tx, out_rx) = mpsc::unbounded_channel();
            tokio::spawn(write_stream(tx, out_rx));
            tokio::spawn(read_stream(key, rx, self.from_server.0.clone()));
            self.streams.insert(key, out_tx);
        }
        let Some(stream) = self.streams.get(&key) else {
            return Err(AttachEnd::ConnectionLost("stream vanished".into()));
        };
        stream
            .send(msg)
            .map_err(|_| AttachEnd::ConnectionLost("URB stream writer stopped".into()))
    }
}

/// Writes a stream's messages, batching whatever is queued into one write.
async fn write_stream(
    mut tx: FramedSend<UrbClientMessage>,
    mut rx: mpsc::UnboundedReceiver<UrbClientMessage>,
) {
    while let Some(msg) = rx.recv().await {
        if tx.queue_owned(msg).is_err() {
            break;
        }
        while let Ok(msg) = rx.try_recv() {
            if tx.queue_owned(msg).is_err() {
                return;
            }
        }
        if let Err(e) = tx.flush().await {
            debug!("URB stream write failed: {e}");
            break;
        }
    }
    tx.finish();
}

/// Forwards a stream's messages until it ends.
async fn read_stream(
    key: StreamKey,
    mut rx: FramedRecv<UrbServerMessage>,
    to: mpsc::UnboundedSender<FromServer>,
) {
    let why = loop {
        match rx.next().await {
            Ok(Some(msg)) => {
                if to.send(FromServer::Message(key, msg)).is_err() {
                    return;
                }
            }
            Ok(None) => break "the server finished the URB stream".to_owned(),
            Err(e) => break e.to_string(),
        }
    };
    let _ = to.send(FromServer::StreamEnded(why));
}
