//! Real USB devices through Linux usbfs, on nusb.
//!
//! Each bulk or interrupt endpoint of an opened device gets a worker task ([`super::endpoint`])
//! that owns nusb's `Endpoint` and keeps every submitted URB in flight at once. Control
//! transfers run as tasks of their own. The standard requests that change what is claimed
//! (SET_CONFIGURATION, SET_INTERFACE, CLEAR_FEATURE(ENDPOINT_HALT)) are carried out here.
//!
//! Nothing here blocks a runtime thread: nusb's transfers are futures, and its blocking calls
//! (claims, configuration and alternate-setting switches, clearing a halt) run on the blocking
//! pool, either through `spawn_blocking` or awaited with nusb's `tokio` feature.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nusb::transfer::{
    Bulk, BulkOrInterrupt, ControlIn, ControlOut, ControlType, In, Interrupt, Out, Recipient,
};
use nusb::{Endpoint, MaybeFuture};
use protocol::descriptors::Configuration;
use protocol::usb::{Direction, EndpointNumber, Speed, StateChange, TransferType, UrbStatus};
use protocol::wire::{ClassTriple, DeviceId, DeviceInfo, UrbComplete, UrbId, UrbSubmit};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use super::endpoint::{EpCmd, run_endpoint, status_of, suggests_unplug};
use super::{CompletionSender, DeviceEvent, DeviceSource, OpenError, OpenedDevice};
use crate::config::{DeviceFacts, SharePolicy, VidPid};
use crate::tracker::completion;

/// A safety net for control transfers: class drivers on the client time out and unlink long
/// before this; it only stops a wedged device from holding a task forever.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Which devices a server offers: the config's share and deny rules, never hubs, never
/// devices imported from another machine.
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter(pub SharePolicy);

impl DeviceFilter {
    fn matches(&self, info: &nusb::DeviceInfo) -> bool {
        if info.class() == 0x09 {
            return false; // hubs carry other devices; exporting one makes no sense
        }
        if is_imported(info) {
            return false; // a remote device attached here: exporting it again would loop
        }
        self.0.offers(&facts(info))
    }
}

/// What share rules are checked against, from the listing alone: no need to open the device.
fn facts(info: &nusb::DeviceInfo) -> DeviceFacts {
    DeviceFacts {
        vid_pid: VidPid {
            vendor: info.vendor_id(),
            product: info.product_id(),
        },
        port: bus_id(info),
        serial: info.serial_number().map(str::to_owned),
        product: info.product_string().map(str::to_owned),
        classes: std::iter::once(info.class())
            .chain(info.interfaces().map(|i| i.class()))
            .collect(),
    }
}

struct Known {
    id: DeviceId,
    nusb_id: nusb::DeviceId,
    nusb_info: nusb::DeviceInfo,
    info: DeviceInfo,
}

/// How often the device list is re-read from sysfs. Hot-plug events come from udev, which a
/// minimal system (a container, the lab VM) may not run; the rescan catches what they miss.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

/// The devices plugged into this machine.
pub struct UsbSource {
    known: Mutex<Vec<Known>>,
    next_id: Mutex<u32>,
    events: broadcast::Sender<DeviceEvent>,
    /// Replaced on a config reload; devices it no longer offers go away at once.
    filter: Mutex<DeviceFilter>,
    /// Wakes the rescan at once, e.g. when a transfer reports the device disconnected.
    rescan: Arc<tokio::sync::Notify>,
}

/// Why the USB source could not start.
#[derive(Debug, thiserror::Error)]
pub enum UsbError {
    /// Listing devices failed (no usbfs, no permission on /dev/bus/usb).
    #[error("could not list USB devices: {0}")]
    List(#[source] nusb::Error),
    /// The thread listing devices panicked or the runtime is shutting down.
    #[error("listing USB devices did not finish: {0}")]
    Interrupted(String),
    /// The hot-plug watch could not start.
    #[error("could not watch for USB hot-plug: {0}")]
    Watch(#[source] nusb::Error),
}

impl UsbSource {
    /// Lists the devices now and follows hot-plug from then on.
    ///
    /// Nothing here reads sysfs on a runtime thread: nusb's listing and its hot-plug stream read
    /// each device's attributes synchronously, and the kernel holds a device's lock while a
    /// driver probes it, so a read can wait seconds for a slow probe. When that device is one a
    /// client of ours is enumerating (a vhci import on this machine, as in the lab), its probe
    /// waits on our answer to SET_CONFIGURATION: a runtime blocked on the read would stall every
    /// session until the kernel's 5 s control timeout.
    pub async fn start(filter: DeviceFilter) -> Result<Arc<Self>, UsbError> {
        let watch = nusb::watch_devices().map_err(UsbError::Watch)?;
        let listed = tokio::task::spawn_blocking(list_devices)
            .await
            .map_err(|e| UsbError::Interrupted(e.to_string()))?
            .map_err(UsbError::List)?;
        let (events, _) = broadcast::channel(64);
        let source = Arc::new(UsbSource {
            known: Mutex::new(Vec::new()),
            next_id: Mutex::new(1),
            events,
            filter: Mutex::new(filter),
            rescan: Arc::new(tokio::sync::Notify::new()),
        });
        let initial = source.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for info in listed {
                initial.add(info);
            }
        })
        .await;
        let mut hotplug = spawn_hotplug_thread(watch);
        let weak = Arc::downgrade(&source);
        let rescan = source.rescan.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = hotplug.recv() => match event {
                        Some(event) => Some(event),
                        None => break,
                    },
                    _ = tokio::time::sleep(RESCAN_INTERVAL) => None,
                    _ = rescan.notified() => None,
                };
                let Some(source) = weak.upgrade() else { break };
                let _ = tokio::task::spawn_blocking(move || {
                    match event {
                        Some(nusb::hotplug::HotplugEvent::Connected(info)) => source.add(info),
                        Some(nusb::hotplug::HotplugEvent::Disconnected(id)) => source.remove(id),
                        None => {}
                    }
                    match list_devices() {
                        Ok(listed) => source.reconcile(listed),
                        Err(e) => debug!("rescan failed: {e}"),
                    }
                })
                .await;
            }
        });
        Ok(source)
    }

    /// Offers what `filter` names from now on: devices it drops are removed (a client attached
    /// to one is detached), devices it adds arrive with the next rescan, which starts at once.
    pub fn set_filter(&self, filter: DeviceFilter) {
        let dropped: Vec<nusb::DeviceId> = lock(&self.known)
            .iter()
            .filter(|k| !filter.matches(&k.nusb_info))
            .map(|k| k.nusb_id)
            .collect();
        *lock(&self.filter) = filter;
        for id in dropped {
            self.remove(id);
        }
        self.rescan.notify_one();
    }

    /// Brings the known set in line with what sysfs lists now.
    fn reconcile(&self, listed: Vec<nusb::DeviceInfo>) {
        let gone: Vec<nusb::DeviceId> = lock(&self.known)
            .iter()
            .filter(|k| !listed.iter().any(|l| l.id() == k.nusb_id))
            .map(|k| k.nusb_id)
            .collect();
        for id in gone {
            self.remove(id);
        }
        for info in listed {
            self.add(info);
        }
    }

    fn add(&self, nusb_info: nusb::DeviceInfo) {
        if !lock(&self.filter).matches(&nusb_info)
            || lock(&self.known)
                .iter()
                .any(|k| k.nusb_id == nusb_info.id())
        {
            return;
        }
        let id = {
            let mut next = lock(&self.next_id);
            let id = DeviceId(*next);
            *next = next.wrapping_add(1);
            id
        };
        match describe(&nusb_info, id) {
            Ok(info) => {
                info!(target: "audit", device = ?id, bus_id = %info.bus_id,
                    vid_pid = %format!("{:04x}:{:04x}", info.vendor_id, info.product_id),
                    "device available");
                lock(&self.known).push(Known {
                    id,
                    nusb_id: nusb_info.id(),
                    nusb_info,
                    info: info.clone(),
                });
                let _ = self.events.send(DeviceEvent::Arrived(info));
            }
            Err(e) => warn!(bus_id = bus_id(&nusb_info), "skipping device: {e}"),
        }
    }

    fn remove(&self, nusb_id: nusb::DeviceId) {
        let mut known = lock(&self.known);
        if let Some(pos) = known.iter().position(|k| k.nusb_id == nusb_id) {
            let gone = known.remove(pos);
            info!(target: "audit", device = ?gone.id, bus_id = %gone.info.bus_id, "device removed");
            let _ = self.events.send(DeviceEvent::Removed(gone.id));
        }
    }
}

impl DeviceSource for UsbSource {
    fn devices(&self) -> Vec<DeviceInfo> {
        lock(&self.known).iter().map(|k| k.info.clone()).collect()
    }

    fn open(&self, id: DeviceId) -> Result<Box<dyn OpenedDevice>, OpenError> {
        let (nusb_info, info) = lock(&self.known)
            .iter()
            .find(|k| k.id == id)
            .map(|k| (k.nusb_info.clone(), k.info.clone()))
            .ok_or(OpenError::Gone(id))?;
        let device = nusb_info
            .open()
            .wait()
            .map_err(|e| open_error(id, "opening it", e))?;
        let claimed = claim_active(&device)?;
        Ok(Box::new(UsbDevice {
            device,
            info,
            claimed: Arc::new(Mutex::new(claimed)),
            workers: HashMap::new(),
            controls: Arc::new(Mutex::new(HashMap::new())),
            rescan: self.rescan.clone(),
        }))
    }

    fn subscribe(&self) -> broadcast::Receiver<DeviceEvent> {
        self.events.subscribe()
    }
}

/// nusb's listing, which reads sysfs as it goes: call it on a blocking thread.
fn list_devices() -> Result<Vec<nusb::DeviceInfo>, nusb::Error> {
    Ok(nusb::list_devices().wait()?.collect())
}

/// Follows nusb's hot-plug stream on a thread of its own, since polling it reads a new
/// device's sysfs attributes (see [`UsbSource::start`]). The thread ends at the first event
/// after the receiver is gone, or with the process.
fn spawn_hotplug_thread(
    mut watch: nusb::hotplug::HotplugWatch,
) -> mpsc::UnboundedReceiver<nusb::hotplug::HotplugEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("usb-hotplug".into())
        .spawn(move || {
            loop {
                let next = futures_lite::future::block_on(poll_fn(|cx| {
                    futures_core::Stream::poll_next(std::pin::Pin::new(&mut watch), cx)
                }));
                let Some(event) = next else { break };
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
    if let Err(e) = spawned {
        // Hot-plug is then noticed by the once-a-second rescan alone.
        warn!("could not start the hot-plug thread: {e}");
    }
    rx
}

/// Whether the device sits on a vhci-hcd controller: a remote device imported to this machine
/// (by our client or `usbip attach`), never one of ours to share.
fn is_imported(info: &nusb::DeviceInfo) -> bool {
    std::fs::canonicalize(info.sysfs_path())
        .map(|p| p.to_string_lossy().contains("/vhci_hcd."))
        .unwrap_or(false)
}

/// The device's name in sysfs, e.g. `1-1.2`: bus number and port path, the id `lsusb -t`,
/// `usbip` and udev use. (nusb's own `bus_id` names the bus, not the device.)
fn bus_id(info: &nusb::DeviceInfo) -> String {
    info.sysfs_path()
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let ports: Vec<String> = info.port_chain().iter().map(u8::to_string).collect();
            format!("{}-{}", info.busnum(), ports.join("."))
        })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads everything a client needs to present the device. Opening the usbfs node reads the
/// cached descriptors without touching the device or its drivers.
fn describe(nusb_info: &nusb::DeviceInfo, id: DeviceId) -> Result<DeviceInfo, String> {
    let device = nusb_info.open().wait().map_err(|e| e.to_string())?;
    let device_descriptor = device.device_descriptor().as_bytes().to_vec();
    let configurations = device
        .configurations()
        .map(|c| serde_bytes::ByteBuf::from(c.as_bytes().to_vec()))
        .collect();
    let active_configuration = device
        .active_configuration()
        .map(|c| c.configuration_value())
        .unwrap_or(0);
    let speed = match nusb_info.speed() {
        Some(nusb::Speed::Low) => Speed::Low,
        Some(nusb::Speed::Full) => Speed::Full,
        Some(nusb::Speed::High) => Speed::High,
        Some(nusb::Speed::Super) => Speed::Super,
        Some(nusb::Speed::SuperPlus) => Speed::SuperPlus,
        _ => Speed::Unknown,
    };
    let clip = |s: Option<&str>| s.map(|s| s.chars().take(126).collect::<String>());
    Ok(DeviceInfo {
        id,
        bus_id: bus_id(nusb_info).chars().take(31).collect(),
        bus_number: nusb_info.busnum(),
        device_address: nusb_info.device_address(),
        vendor_id: nusb_info.vendor_id(),
        product_id: nusb_info.product_id(),
        bcd_device: nusb_info.device_version(),
        class: ClassTriple {
            class: nusb_info.class(),
            subclass: nusb_info.subclass(),
            protocol: nusb_info.protocol(),
        },
        speed,
        manufacturer: clip(nusb_info.manufacturer_string()),
        product: clip(nusb_info.product_string()),
        serial: clip(nusb_info.serial_number()),
        device_descriptor,
        configurations,
        active_configuration,
    })
}

// ---- an opened device ----

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
}

struct UsbDevice {
    device: nusb::Device,
    info: DeviceInfo,
    claimed: Arc<Mutex<Claimed>>,
    workers: HashMap<u8, Worker>,
    controls: Controls,
    rescan: Arc<tokio::sync::Notify>,
}

/// Detaches the kernel drivers from, and claims, every interface of the active configuration.
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

/// Blocking: each claim is an ioctl that may wait on a driver's unbind.
fn claim_active(device: &nusb::Device) -> Result<Claimed, OpenError> {
    let config = device
        .active_configuration()
        .map_err(|e| OpenError::Claim(format!("the device is not configured: {e}")))?;
    let numbers: Vec<u8> = config.interfaces().map(|i| i.interface_number()).collect();
    let mut claimed = Claimed {
        interfaces: Vec::new(),
        config: Configuration::parse(config.as_bytes()).ok(),
    };
    for n in numbers {
        let iface = device
            .detach_and_claim_interface(n)
            .wait()
            .map_err(|e| open_error_at(&format!("claiming interface {n}"), e))?;
        claimed.interfaces.push(iface);
    }
    Ok(claimed)
}

impl UsbDevice {
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
        tokio::spawn(async move {
            for task in stopped {
                let _ = task.await;
            }
            let old = std::mem::take(&mut *lock(&claimed));
            let switched = tokio::task::spawn_blocking(move || {
                drop(old); // releases the old interfaces
                device
                    .set_configuration(value)
                    .wait()
                    .map_err(|e| e.to_string())?;
                claim_active(&device).map_err(|e| e.to_string())
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
            let status = match iface {
                Some(i) => match i.set_alt_setting(alt).await {
                    Ok(()) => UrbStatus::Ok,
                    Err(e) if e.kind() == nusb::ErrorKind::Disconnected => {
                        rescan.notify_one();
                        UrbStatus::NoDevice
                    }
                    Err(e) => {
                        warn!("SET_INTERFACE {interface}/{alt}: {e}");
                        UrbStatus::Stall
                    }
                },
                // Not an interface of the active configuration: what a device answers.
                None => UrbStatus::Stall,
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
        let (cancel_tx, cancel_rx) = oneshot::channel();
        lock(&self.controls).insert(urb.id, cancel_tx);
        let controls = self.controls.clone();
        let device = self.device.clone();
        let rescan = self.rescan.clone();
        let id = urb.id;
        tokio::spawn(async move {
            let transfer = async {
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

impl OpenedDevice for UsbDevice {
    fn submit(&mut self, urb: UrbSubmit, done: CompletionSender) {
        match self.transfer_type(&urb) {
            TransferType::Control => self.submit_control(urb, done),
            TransferType::Isochronous => {
                debug!(id = ?urb.id, "isochronous transfers are not supported by this backend");
                let _ = done.send(completion(urb.id, UrbStatus::Invalid));
            }
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
                let interfaces = std::mem::take(&mut lock(&self.claimed).interfaces);
                let numbers: Vec<u8> = interfaces.iter().map(|i| i.interface_number()).collect();
                drop(interfaces);
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
