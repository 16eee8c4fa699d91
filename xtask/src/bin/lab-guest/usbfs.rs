//! Bulk transfers from the guest's own userspace through usbfs (nusb), for a device no Debian
//! tool drives: gadget zero's SourceSink and Loopback. usbtest's own cases run only through its
//! `USBDEVFS_IOCTL`, which would take unsafe code here; these transfers take the same path a
//! class driver's do (vhci, USB/IP or our tunnel, the gadget), stalls and CLEAR_HALT included.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nusb::MaybeFuture;
use nusb::descriptors::TransferType;
use nusb::transfer::{Buffer, Bulk, Direction, In, Out, TransferError};

/// How long one transfer may take before the device counts as wedged.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The bulk IN and OUT endpoints of one claimed interface.
pub struct BulkPair {
    /// Kept so the claim lasts as long as the endpoints.
    _interface: nusb::Interface,
    input: nusb::Endpoint<Bulk, In>,
    output: nusb::Endpoint<Bulk, Out>,
}

impl BulkPair {
    /// Claims `interface` of the device whose sysfs directory is `dev` (detaching its kernel
    /// driver) and opens its first bulk IN and OUT endpoints.
    pub fn open(dev: &Path, interface: u8) -> Result<BulkPair> {
        let want = std::fs::canonicalize(dev)?;
        let info = nusb::list_devices()
            .wait()?
            .find(|d| std::fs::canonicalize(d.sysfs_path()).is_ok_and(|p| p == want))
            .with_context(|| format!("usbfs lists no device at {}", dev.display()))?;
        let device = info.open().wait().context("opening the usbfs node")?;
        let iface = device
            .detach_and_claim_interface(interface)
            .wait()
            .with_context(|| format!("claiming interface {interface}"))?;
        let (mut ep_in, mut ep_out) = (None, None);
        for ep in iface
            .descriptor()
            .context("the interface has no descriptor")?
            .endpoints()
        {
            if ep.transfer_type() != TransferType::Bulk {
                continue;
            }
            match ep.direction() {
                Direction::In => ep_in = ep_in.or(Some(ep.address())),
                Direction::Out => ep_out = ep_out.or(Some(ep.address())),
            }
        }
        let (Some(a_in), Some(a_out)) = (ep_in, ep_out) else {
            bail!("interface {interface} has no bulk IN and OUT pair");
        };
        Ok(BulkPair {
            input: iface.endpoint::<Bulk, In>(a_in)?,
            output: iface.endpoint::<Bulk, Out>(a_out)?,
            _interface: iface,
        })
    }

    /// wMaxPacketSize of the IN endpoint.
    pub fn packet_size(&self) -> usize {
        self.input.max_packet_size()
    }

    /// Reads up to `len` bytes (a multiple of the packet size).
    pub fn read(&mut self, len: usize) -> Result<Vec<u8>, TransferError> {
        let c = self.input.transfer_blocking(Buffer::new(len), TIMEOUT);
        c.status.map(|()| c.buffer.into_vec())
    }

    /// Writes `data`; the bytes the device took.
    pub fn write(&mut self, data: &[u8]) -> Result<usize, TransferError> {
        let c = self
            .output
            .transfer_blocking(Buffer::from(data.to_vec()), TIMEOUT);
        c.status.map(|()| c.actual_len)
    }

    /// CLEAR_FEATURE(ENDPOINT_HALT) on the OUT endpoint.
    pub fn clear_out_halt(&mut self) -> Result<()> {
        Ok(self.output.clear_halt().wait()?)
    }
}
