//! An opened device: its claimed interfaces, the standard requests that change what is claimed
//! (SET_CONFIGURATION, SET_INTERFACE, CLEAR_FEATURE(ENDPOINT_HALT)), carried out here rather
//! than passed through, and the routing of every other URB to a control task or the worker of
//! its endpoint. Each bulk or interrupt endpoint gets a worker task
//! ([`crate::device::endpoint`]) that owns nusb's `Endpoint` and keeps every submitted URB in
//! flight at once; control transfers run as tasks of their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nusb::transfer::{
    Bulk, BulkOrInterrupt, ControlIn, ControlOut, ControlType, In, Interrupt, Out, Recipient,
};
use nusb::{Endpoint, MaybeFuture};
use protocol::descriptors::Configuration;
use protocol::usb::{Direction, EndpointNumber, StateChange, TransferType, UrbStatus};
use protocol::wire::{DeviceId, DeviceInfo, UrbComplete, UrbId, UrbSubmit};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::iso::{IsoEngine, iso_interfaces};
use crate::device::endpoint::{EpCmd, run_endpoint, status_of, suggests_unplug};
use crate::device::{CompletionSender, OpenError, OpenedDevice};
use crate::sync::lock;
use crate::tracker::completion;

/// A safety net for control transfers: class drivers on the client time out and unlink long
/// before this; it only stops a wedged device from holding a task forever.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

struct Worker {
    tx: mpsc::UnboundedSender<EpCmd>,
    interface: u8,
    task: tokio::task::JoinHandle<()>,
}

/// Control transfers in flight, by id, with the signal that cancels each.
type Controls = Arc<Mutex<HashMap<UrbId, oneshot::Sender<()>>>>;

/// The claimed interfaces of the active configuration. Shared with the task that switches
/// configuration, which replaces them off the runtime's threads.
#[derive(Default)]
struct Claimed {
    interfaces: Vec<nusb::Interface>,
    config: Option<Configuration>,
    /// The interfaces with isochronous endpoints, claimed apart from nusb.
    iso: Option<IsoEngine>,
}

impl Claimed {
    /// Whether a control request with this recipient and `wIndex` concerns an interface the
    /// iso engine claimed (usbfs then takes it only on the engine's file).
    fn iso_owns_recipient(&self, recipient: u8, index: u16) -> bool {
        let Some(iso) = &self.iso else { return false };
        match recipient {
            1 => iso.owns(index as u8),
            2 => {
                let (number, direction) = EndpointNumber::from_address(index as u8);
                self.config
                    .as_ref()
                    .and_then(|c| c.interface_of(number, direction))
                    .is_some_and(|i| iso.owns(i))
            }
            _ => false,
        }
    }
}

/// A claimed device, as [`OpenedDevice`] hands out.
pub(super) struct UsbDevice {
    device: nusb::Device,
    info: DeviceInfo,
    claimed: Arc<Mutex<Claimed>>,
    workers: HashMap<u8, Worker>,
    controls: Controls,
    rescan: Arc<tokio::sync::Notify>,
}

/// An OS error while opening device `id`, by what the operator can do about it.
fn open_error(id: DeviceId, doing: &str, e: nusb::Error) -> OpenError {
    match e.kind() {
        nusb::ErrorKind::Disconnected | nusb::ErrorKind::NotFound => OpenError::Gone(id),
        _ => open_error_at(doing, e),
    }
}

fn open_error_at(doing: &str, e: nusb::Error) -> OpenError {
    let why = format!("{doing}: {e}");
    match e.kind() {
        nusb::ErrorKind::PermissionDenied => OpenError::Permission(why),
        nusb::ErrorKind::Busy => OpenError::Busy(why),
        _ => OpenError::Claim(why),
    }
}

/// Detaches the kernel drivers from, and claims, every interface of the active configuration:
/// those with isochronous endpoints on a usbfs file of their own, the rest with nusb.
/// Blocking: each claim is an ioctl that may wait on a driver's unbind.
fn claim_active(
    device: &nusb::Device,
    at: (u8, u8),
    rescan: &Arc<tokio::sync::Notify>,
) -> Result<Claimed, OpenError> {
    let config = device
        .active_configuration()
        .map_err(|e| OpenError::Claim(format!("the device is not configured: {e}")))?;
    let numbers: Vec<u8> = config.interfaces().map(|i| i.interface_number()).collect();
    let parsed = Configuration::parse(config.as_bytes()).ok();
    let iso_numbers = parsed.as_ref().map(iso_interfaces).unwrap_or_default();
    let mut claimed = Claimed {
        interfaces: Vec::new(),
        config: parsed,
        iso: None,
    };
    for n in numbers {
        if iso_numbers.contains(&n) {
            continue;
        }
        let iface = device
            .detach_and_claim_interface(n)
            .wait()
            .map_err(|e| open_error_at(&format!("claiming interface {n}"), e))?;
        claimed.interfaces.push(iface);
    }
    if !iso_numbers.is_empty() {
        let engine = IsoEngine::claim(at.0, at.1, iso_numbers, rescan.clone()).map_err(|e| {
            let why = format!("claiming the isochronous interfaces: {e}");
            match e.kind() {
                std::io::ErrorKind::PermissionDenied => OpenError::Permission(why),
                std::io::ErrorKind::ResourceBusy => OpenError::Busy(why),
                _ => OpenError::Claim(why),
            }
        })?;
        claimed.iso = Some(engine);
    }
    Ok(claimed)
}

impl UsbDevice {
    /// Opens `nusb_info`'s usbfs node and claims every interface of its active configuration,
    /// for [`DeviceSource::open`](crate::device::DeviceSource::open).
    pub(super) fn open(
        id: DeviceId,
        nusb_info: &nusb::DeviceInfo,
        info: DeviceInfo,
        rescan: Arc<tokio::sync::Notify>,
    ) -> Result<Self, OpenError> {
        let device = nusb_info
            .open()
            .wait()
            .map_err(|e| open_error(id, "opening it", e))?;
        let at = (info.bus_number, info.device_address);
        let claimed = claim_active(&device, at, &rescan)?;
        Ok(UsbDevice {
            device,
            info,
            claimed: Arc::new(Mutex::new(claimed)),
            workers: HashMap::new(),
            controls: Arc::new(Mutex::new(HashMap::new())),
            rescan,
        })
    }

    fn transfer_type(&self, urb: &UrbSubmit) -> TransferType {
        lock(&self.claimed)
            .config
            .as_ref()
            .and_then(|c| c.transfer_type(urb.endpoint, urb.direction))
            .unwrap_or(urb.transfer_type)
    }

    /// The worker for an endpoint address, started on first use.
    fn worker(&mut self, address: u8, kind: TransferType) -> Option<&mpsc::UnboundedSender<EpCmd>> {
        if !self.workers.contains_key(&address) {
            let worker = self.start_worker(address, kind)?;
            self.workers.insert(address, worker);
        }
        self.workers.get(&address).map(|w| &w.tx)
    }

    fn start_worker(&self, address: u8, kind: TransferType) -> Option<Worker> {
        let claimed = lock(&self.claimed);
        claimed.interfaces.iter().find_map(|iface| {
            let (tx, rx) = mpsc::unbounded_channel();
            let (_, direction) = EndpointNumber::from_address(address);
            let rescan = self.rescan.clone();
            let task = match (kind, direction) {
                (TransferType::Bulk, Direction::In) => {
                    spawn_worker(iface.endpoint::<Bulk, In>(address), rx, rescan)?
                }
                (TransferType::Bulk, Direction::Out) => {
                    spawn_worker(iface.endpoint::<Bulk, Out>(address), rx, rescan)?
                }
                (TransferType::Interrupt, Direction::In) => {
                    spawn_worker(iface.endpoint::<Interrupt, In>(address), rx, rescan)?
                }
                (TransferType::Interrupt, Direction::Out) => {
                    spawn_worker(iface.endpoint::<Interrupt, Out>(address), rx, rescan)?
                }
                _ => return None,
            };
            Some(Worker {
                tx,
                interface: iface.interface_number(),
                task,
            })
        })
    }

    /// Closes the workers of `interface` (all when `None`): each ends its URBs in flight with
    /// `NoDevice` (or `Unlinked` if asked), exactly once, and its task then finishes.
    fn stop_workers(&mut self, interface: Option<u8>) -> Vec<tokio::task::JoinHandle<()>> {
        let stopping: Vec<u8> = self
            .workers
            .iter()
            .filter(|(_, w)| interface.is_none_or(|i| w.interface == i))
            .map(|(a, _)| *a)
            .collect();
        stopping
            .into_iter()
            .filter_map(|a| self.workers.remove(&a))
            .map(|w| w.task) // dropping the sender ends the worker after it drains
            .collect()
    }

    fn submit_control(&mut self, urb: UrbSubmit, done: CompletionSender) {
        let Some(setup) = urb.setup else {
            let _ = done.send(completion(urb.id, UrbStatus::Invalid));
            return;
        };
        let intercepted = setup.state_change();
        if let Some(request) = intercepted {
            debug!(id = ?urb.id, ?request, "standard request carried out by the server");
        }
        match intercepted {
            Some(StateChange::SetConfiguration(value)) => {
                self.set_configuration(urb.id, value, done)
            }
            Some(StateChange::SetInterface { interface, alt }) => {
                self.set_interface(urb.id, interface, alt, done)
            }
            Some(StateChange::ClearHalt { endpoint }) => self.clear_halt(urb.id, endpoint, done),
            None => self.pass_through_control(urb, setup, done),
        }
    }

    /// SET_CONFIGURATION: the client's kernel always configures a new device, and ours already
    /// is, so the same value is answered at once. Another one releases the interfaces, sets it
    /// and claims the new ones, on the blocking pool: a runtime thread never waits on usbfs.
    fn set_configuration(&mut self, id: UrbId, value: u8, done: CompletionSender) {
        if Some(value) == lock(&self.claimed).config.as_ref().map(|c| c.value) {
            let _ = done.send(completion(id, UrbStatus::Ok));
            return;
        }
        let stopped = self.stop_workers(None);
        let device = self.device.clone();
        let claimed = self.claimed.clone();
        let at = (self.info.bus_number, self.info.device_address);
        let rescan = self.rescan.clone();
        tokio::spawn(async move {
            for task in stopped {
                let _ = task.await;
            }
            let old = std::mem::take(&mut *lock(&claimed));
            let switched = tokio::task::spawn_blocking(move || {
                drop(old); // ends the iso URBs, releases the old interfaces
                device
                    .set_configuration(value)
                    .wait()
                    .map_err(|e| e.to_string())?;
                claim_active(&device, at, &rescan).map_err(|e| e.to_string())
            })
            .await;
            let status = match switched {
                Ok(Ok(now)) => {
                    *lock(&claimed) = now;
                    UrbStatus::Ok
                }
                Ok(Err(e)) => {
                    warn!("SET_CONFIGURATION {value}: {e}");
                    UrbStatus::Stall
                }
                Err(_) => UrbStatus::Shutdown,
            };
            let _ = done.send(completion(id, status));
        });
    }

    /// SET_INTERFACE: the interface's workers end their URBs first (its endpoints change),
    /// then usbfs switches the alternate setting on the blocking pool.
    fn set_interface(&mut self, id: UrbId, interface: u8, alt: u8, done: CompletionSender) {
        // An iso interface has no workers: usbfs ends the old setting's iso URBs itself, and
        // each comes back through the reaper.
        let iso_file = lock(&self.claimed)
            .iso
            .as_ref()
            .filter(|iso| iso.owns(interface))
            .map(IsoEngine::file);
        let stopped = self.stop_workers(Some(interface));
        let iface = lock(&self.claimed)
            .interfaces
            .iter()
            .find(|i| i.interface_number() == interface)
            .cloned();
        let rescan = self.rescan.clone();
        tokio::spawn(async move {
            for task in stopped {
                let _ = task.await;
            }
            debug!(
                interface,
                alt, "SET_INTERFACE: the interface's endpoints are idle"
            );
            let status = match (iso_file, iface) {
                (Some(file), _) => {
                    match tokio::task::spawn_blocking(move || file.set_interface(interface, alt))
                        .await
                    {
                        Ok(Ok(())) => UrbStatus::Ok,
                        Ok(Err(e)) if e.raw_os_error() == Some(libc::ENODEV) => gone(&rescan),
                        Ok(Err(e)) => refused(interface, alt, &e),
                        Err(_) => UrbStatus::Shutdown,
                    }
                }
                (None, Some(i)) => match i.set_alt_setting(alt).await {
                    Ok(()) => UrbStatus::Ok,
                    Err(e) if e.kind() == nusb::ErrorKind::Disconnected => gone(&rescan),
                    Err(e) => refused(interface, alt, &e),
                },
                // Not an interface of the active configuration: what a device answers.
                (None, None) => UrbStatus::Stall,
            };
            debug!(interface, alt, ?status, "SET_INTERFACE done");
            let _ = done.send(completion(id, status));
        });
    }

    /// CLEAR_FEATURE(ENDPOINT_HALT) goes to the endpoint's worker, which owns the endpoint and
    /// ends what is queued on it first.
    fn clear_halt(&mut self, id: UrbId, address: u8, done: CompletionSender) {
        let (number, direction) = EndpointNumber::from_address(address);
        let kind = lock(&self.claimed)
            .config
            .as_ref()
            .and_then(|c| c.transfer_type(number, direction))
            .unwrap_or(TransferType::Bulk);
        match self.worker(address, kind) {
            Some(tx) => {
                if let Err(mpsc::error::SendError(cmd)) = tx.send(EpCmd::ClearHalt(id, done)) {
                    cmd.refuse(UrbStatus::NoDevice);
                }
            }
            None => {
                let _ = done.send(completion(id, UrbStatus::Stall));
            }
        }
    }

    fn pass_through_control(
        &mut self,
        urb: UrbSubmit,
        setup: protocol::usb::SetupPacket,
        done: CompletionSender,
    ) {
        let control_type = match (setup.request_type() >> 5) & 0b11 {
            0 => ControlType::Standard,
            1 => ControlType::Class,
            2 => ControlType::Vendor,
            _ => {
                let _ = done.send(completion(urb.id, UrbStatus::Stall));
                return;
            }
        };
        let recipient = match setup.request_type() & 0x1f {
            0 => Recipient::Device,
            1 => Recipient::Interface,
            2 => Recipient::Endpoint,
            3 => Recipient::Other,
            _ => {
                let _ = done.send(completion(urb.id, UrbStatus::Stall));
                return;
            }
        };
        // usbfs takes a request for an interface (or an endpoint of one) only on the file
        // that claimed it: the iso engine's for its interfaces.
        let iso_file = {
            let claimed = lock(&self.claimed);
            claimed
                .iso_owns_recipient(setup.request_type() & 0x1f, setup.index())
                .then(|| claimed.iso.as_ref().map(IsoEngine::file))
                .flatten()
        };
        let (cancel_tx, cancel_rx) = oneshot::channel();
        lock(&self.controls).insert(urb.id, cancel_tx);
        let controls = self.controls.clone();
        let device = self.device.clone();
        let rescan = self.rescan.clone();
        let id = urb.id;
        tokio::spawn(async move {
            let transfer = async {
                match iso_file {
                    Some(file) => raw_control(file, urb, setup).await,
                    None => nusb_control(&device, control_type, recipient, urb, setup).await,
                }
            };
            let result = tokio::select! {
                c = transfer => c,
                _ = cancel_rx => completion(id, UrbStatus::Unlinked),
            };
            lock(&controls).remove(&id);
            if suggests_unplug(result.status) {
                rescan.notify_one();
            }
            let _ = done.send(result);
        });
    }
}

/// A SET_INTERFACE that found the device gone: the source looks again.
fn gone(rescan: &tokio::sync::Notify) -> UrbStatus {
    rescan.notify_one();
    UrbStatus::NoDevice
}

/// A SET_INTERFACE the device or usbfs refused: what a device answers.
fn refused(interface: u8, alt: u8, why: &dyn std::fmt::Display) -> UrbStatus {
    warn!("SET_INTERFACE {interface}/{alt}: {why}");
    UrbStatus::Stall
}

/// A control transfer through nusb.
async fn nusb_control(
    device: &nusb::Device,
    control_type: ControlType,
    recipient: Recipient,
    urb: UrbSubmit,
    setup: protocol::usb::SetupPacket,
) -> UrbComplete {
    let id = urb.id;
    if urb.direction == Direction::In {
        let request = ControlIn {
            control_type,
            recipient,
            request: setup.request(),
            value: setup.value(),
            index: setup.index(),
            length: urb.length.min(u32::from(u16::MAX)) as u16,
        };
        match device.control_in(request, CONTROL_TIMEOUT).await {
            Ok(data) => UrbComplete {
                actual_length: data.len() as u32,
                data,
                ..completion(id, UrbStatus::Ok)
            },
            Err(e) => completion(id, status_of(e)),
        }
    } else {
        let request = ControlOut {
            control_type,
            recipient,
            request: setup.request(),
            value: setup.value(),
            index: setup.index(),
            data: &urb.data,
        };
        match device.control_out(request, CONTROL_TIMEOUT).await {
            Ok(()) => UrbComplete {
                actual_length: urb.data.len() as u32,
                ..completion(id, UrbStatus::Ok)
            },
            Err(e) => completion(id, status_of(e)),
        }
    }
}

/// A control transfer through the iso engine's usbfs file: a blocking call, on the blocking
/// pool (an unlink answers at once; the call itself ends by its timeout).
async fn raw_control(
    file: super::usbfs::RawFile,
    urb: UrbSubmit,
    setup: protocol::usb::SetupPacket,
) -> UrbComplete {
    let id = urb.id;
    let direction = urb.direction;
    let mut buffer = match direction {
        Direction::In => vec![0; usize::from(setup.length())],
        Direction::Out => urb.data,
    };
    let run = tokio::task::spawn_blocking(move || {
        let moved = file.control(setup.0, &mut buffer, CONTROL_TIMEOUT);
        (moved, buffer)
    });
    match run.await {
        Ok((Ok(n), mut buffer)) => {
            if direction == Direction::In {
                buffer.truncate(n);
            } else {
                buffer.clear();
            }
            UrbComplete {
                actual_length: n as u32,
                data: buffer,
                ..completion(id, UrbStatus::Ok)
            }
        }
        Ok((Err(e), _)) => {
            let status = e
                .raw_os_error()
                .map_or(UrbStatus::Stall, |errno| UrbStatus::from_errno(-errno));
            completion(id, status)
        }
        Err(_) => completion(id, UrbStatus::Shutdown),
    }
}

impl OpenedDevice for UsbDevice {
    fn submit(&mut self, urb: UrbSubmit, done: CompletionSender) {
        match self.transfer_type(&urb) {
            TransferType::Control => self.submit_control(urb, done),
            TransferType::Isochronous => match &lock(&self.claimed).iso {
                Some(iso) => iso.submit(urb, done),
                None => {
                    debug!(id = ?urb.id, "an iso URB for a device without iso interfaces");
                    let _ = done.send(completion(urb.id, UrbStatus::Stall));
                }
            },
            kind => {
                let address = urb.endpoint.address(urb.direction);
                match self.worker(address, kind) {
                    Some(tx) => {
                        if let Err(mpsc::error::SendError(cmd)) = tx.send(EpCmd::Submit(urb, done))
                        {
                            cmd.refuse(UrbStatus::NoDevice);
                        }
                    }
                    // No such endpoint in the active setting: what a host controller reports.
                    None => EpCmd::Submit(urb, done).refuse(UrbStatus::Stall),
                }
            }
        }
    }

    fn cancel(&mut self, endpoint: EndpointNumber, direction: Direction, id: UrbId) {
        if endpoint == EndpointNumber::CONTROL {
            if let Some(cancel) = lock(&self.controls).remove(&id) {
                let _ = cancel.send(());
            }
            return;
        }
        if let Some(w) = self.workers.get(&endpoint.address(direction)) {
            let _ = w.tx.send(EpCmd::Cancel(id));
            return;
        }
        if let Some(iso) = &lock(&self.claimed).iso {
            iso.cancel(id);
        }
    }

    fn release(mut self: Box<Self>) {
        let workers = self.stop_workers(None);
        for (_, cancel) in lock(&self.controls).drain() {
            let _ = cancel.send(());
        }
        tokio::spawn(async move {
            for task in workers {
                let _ = task.await;
            }
            // Releasing an interface and binding its driver run the driver's probe inside the
            // ioctl: a blocking thread's work, not a runtime thread's.
            let _ = tokio::task::spawn_blocking(move || {
                let (interfaces, iso) = {
                    let mut claimed = lock(&self.claimed);
                    (std::mem::take(&mut claimed.interfaces), claimed.iso.take())
                };
                let mut numbers: Vec<u8> =
                    interfaces.iter().map(|i| i.interface_number()).collect();
                drop(interfaces);
                if let Some(iso) = iso {
                    numbers.extend(iso.interfaces());
                    drop(iso); // ends its URBs and closes its file, releasing its claims
                }
                for n in numbers {
                    if let Err(e) = self.device.attach_kernel_driver(n) {
                        debug!(interface = n, "kernel driver not re-attached: {e}");
                    }
                }
                let id = self.info.id;
                drop(self); // closes the usbfs node before we say it is released
                info!(target: "audit", device = ?id, "device released to its kernel driver");
            })
            .await;
        });
    }
}

/// Starts a worker for an endpoint if the interface has it in its current alternate setting.
fn spawn_worker<T, D>(
    ep: Result<Endpoint<T, D>, nusb::Error>,
    rx: mpsc::UnboundedReceiver<EpCmd>,
    rescan: Arc<tokio::sync::Notify>,
) -> Option<tokio::task::JoinHandle<()>>
where
    T: BulkOrInterrupt + Send + 'static,
    D: nusb::transfer::EndpointDirection + Send + 'static,
{
    Some(tokio::spawn(run_endpoint(ep.ok()?, rx, rescan)))
}

#[cfg(test)]
mod tests {
    /// nusb's blocking calls (SET_INTERFACE, CLEAR_HALT, opening) are `MaybeFuture`s that
    /// panicked when awaited unless nusb's `tokio` feature is on: every SET_INTERFACE of a
    /// network adapter killed a runtime worker. Opening /dev/null is such a call that fails
    /// without any USB device.
    #[tokio::test]
    async fn awaiting_a_blocking_nusb_call_does_not_panic() {
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(nusb::Device::from_fd(null.into()).await.is_err());
    }
}
