//! Which devices this machine offers: nusb's listing and hot-plug stream (followed off the
//! runtime's threads), a once-a-second rescan for systems without udev, the share filter, and
//! the description a client builds its view of a device from.

use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nusb::MaybeFuture;
use protocol::usb::Speed;
use protocol::wire::{ClassTriple, DeviceId, DeviceInfo};
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, info, warn};

use super::opened::UsbDevice;
use crate::config::{DeviceFacts, SharePolicy, VidPid};
use crate::device::{DeviceEvent, DeviceSource, OpenError, OpenedDevice};
use crate::sync::lock;

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
                    vid_pid = %info.vid_pid(),
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
        let device = UsbDevice::open(id, &nusb_info, info, self.rescan.clone())?;
        Ok(Box::new(device))
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
