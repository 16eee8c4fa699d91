//! `--usbip-listen`: serve the standard USB/IP protocol on a local TCP address, so unmodified
//! USB/IP clients (Linux's `usbip attach`, Windows' usbip-win2) reach a remote device through
//! our encrypted peer-to-peer tunnel.
//!
//! A connection starts in USB/IP's OP phase: `OP_REQ_DEVLIST` is answered from the server's
//! device list; `OP_REQ_IMPORT` claims the device on the server and, once claimed, the same TCP
//! connection carries URB traffic, run by the same port session as a vhci attachment.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use protocol::descriptors::Configuration;
use protocol::usbip::op::{
    DeviceRecord, InterfaceRecord, ListedDevice, OpDecoder, OpMessage, OpStatus,
};
use protocol::wire::{AttachRefusal, DeviceInfo, Event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};
use transport::{ClientError, ServerConnection};

use crate::attach::{AttachEnd, run_port};
use crate::vhci::KernelLink;

/// How long a USB/IP client may take to send its OP request.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the bridge stopped.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The listening address could not be bound.
    #[error("could not listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Serves USB/IP on `addr` for the devices `conn` shares, until `stop` turns true; each
/// imported port reads ahead if `read_ahead`.
pub async fn serve(
    conn: Arc<ServerConnection>,
    addr: SocketAddr,
    events: broadcast::Sender<Event>,
    mut stop: watch::Receiver<bool>,
    read_ahead: bool,
) -> Result<(), BridgeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BridgeError::Listen { addr, source })?;
    info!(%addr, "serving USB/IP (usbip list -r / usbip attach -r)");
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let conn = conn.clone();
                    let events = events.subscribe();
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        match handle(conn, tcp, events, stop, read_ahead).await {
                            Ok(Some(end)) => info!(%peer, ?end, "USB/IP client done"),
                            Ok(None) => {}
                            Err(e) => warn!(%peer, "USB/IP client: {e}"),
                        }
                    });
                }
                Err(e) => warn!("accepting a USB/IP client: {e}"),
            },
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// What can end one USB/IP client connection early.
#[derive(Debug, thiserror::Error)]
enum ClientConnError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad USB/IP request: {0}")]
    Op(#[from] protocol::usbip::OpError),
    #[error("no request within {OP_TIMEOUT:?}")]
    Timeout,
    #[error("server: {0}")]
    Server(#[from] ClientError),
}

async fn handle(
    conn: Arc<ServerConnection>,
    mut tcp: TcpStream,
    events: broadcast::Receiver<Event>,
    stop: watch::Receiver<bool>,
    read_ahead: bool,
) -> Result<Option<AttachEnd>, ClientConnError> {
    let _ = tcp.set_nodelay(true);
    let mut decoder = OpDecoder::requests();
    let mut buf = [0u8; 512];
    let request = loop {
        if let Some(msg) = decoder.next_message()? {
            break msg;
        }
        let n = tokio::time::timeout(OP_TIMEOUT, tcp.read(&mut buf))
            .await
            .map_err(|_| ClientConnError::Timeout)??;
        if n == 0 {
            decoder.finish()?;
            return Ok(None);
        }
        // Bounded: the decoder refuses a bad header at byte 8 and a request ends by byte 40.
        decoder.push(&buf[..n]);
    };
    match request {
        OpMessage::ReqDevlist => {
            let devices = conn.list_devices().await?;
            let reply = OpMessage::RepDevlist {
                status: OpStatus::Ok,
                devices: devices.iter().map(listed).collect(),
            };
            tcp.write_all(&reply.to_bytes()).await?;
            Ok(None)
        }
        OpMessage::ReqImport { busid } => {
            let devices = conn.list_devices().await?;
            let Some(device) = devices.into_iter().find(|d| d.bus_id == busid) else {
                let reply = OpMessage::RepImport {
                    status: OpStatus::NoDevice,
                    device: None,
                };
                tcp.write_all(&reply.to_bytes()).await?;
                return Ok(None);
            };
            let (handle, device) = match conn.attach(device.id, None).await {
                Ok(claimed) => claimed,
                Err(ClientError::Refused(refusal)) => {
                    let status = match refusal {
                        AttachRefusal::Busy => OpStatus::DeviceBusy,
                        AttachRefusal::Gone => OpStatus::NoDevice,
                        _ => OpStatus::NotAvailable,
                    };
                    let reply = OpMessage::RepImport {
                        status,
                        device: None,
                    };
                    tcp.write_all(&reply.to_bytes()).await?;
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            };
            let reply = OpMessage::RepImport {
                status: OpStatus::Ok,
                device: Some(record(&device)),
            };
            tcp.write_all(&reply.to_bytes()).await?;
            info!(busid, "USB/IP client imported the device");
            // The TCP connection now carries URBs: hand it to the same pump as a vhci port.
            let std_tcp = tcp.into_std()?;
            std_tcp.set_nonblocking(false)?;
            let initial = decoder.into_remaining();
            let (link, link_handle) = KernelLink::start(OwnedFd::from(std_tcp))?;
            let end = run_port(
                conn.clone(),
                handle,
                &device,
                link,
                initial,
                events,
                stop,
                read_ahead,
            )
            .await;
            link_handle.shutdown();
            let _ = link_handle.finished().await;
            if end.server_still_attached() {
                let _ = conn.detach(handle).await;
            }
            Ok(Some(end))
        }
        // A reply sent to us: the decoder refuses those before they get here.
        OpMessage::RepDevlist { .. } | OpMessage::RepImport { .. } => Ok(None),
    }
}

/// USB/IP's record of a device, from the server's description.
fn record(d: &DeviceInfo) -> DeviceRecord {
    let config = d
        .active_configuration_bytes()
        .and_then(|c| Configuration::parse(c).ok());
    DeviceRecord {
        path: format!("/sys/devices/p2p-usb/{}", d.bus_id),
        busid: d.bus_id.clone(),
        busnum: d.bus_number.into(),
        devnum: d.device_address.into(),
        speed: d.speed,
        vendor_id: d.vendor_id,
        product_id: d.product_id,
        bcd_device: d.bcd_device,
        device_class: d.class.class,
        device_subclass: d.class.subclass,
        device_protocol: d.class.protocol,
        configuration_value: d.active_configuration,
        num_configurations: d.configurations.len().min(usize::from(u8::MAX)) as u8,
        num_interfaces: config.as_ref().map_or(0, |c| c.num_interfaces),
    }
}

fn listed(d: &DeviceInfo) -> ListedDevice {
    let interfaces: Vec<InterfaceRecord> = d
        .interface_classes()
        .into_iter()
        .map(|[class, subclass, protocol]| InterfaceRecord {
            class,
            subclass,
            protocol,
        })
        .collect();
    let mut device = record(d);
    device.num_interfaces = interfaces.len() as u8;
    ListedDevice { device, interfaces }
}
