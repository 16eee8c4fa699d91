//! `probe`: check a remote mass-storage device end to end without the kernel.
//!
//! Speaks USB Bulk-Only Transport and SCSI to the device straight over our URB streams: reads
//! its descriptors on endpoint 0, then INQUIRY, READ CAPACITY and READ(10) with many bulk IN
//! URBs in flight. When a disk does not show up after `attach`, this tells whether the server,
//! the network or the device is at fault, and it is how the lab tests the server alone.

use std::time::{Duration, Instant};

use protocol::bot::{
    CBW_LEN, CLASS_MASS_STORAGE, CSW_LEN, Cbw, Csw, CswStatus, PROTOCOL_BULK_ONLY, SUBCLASS_SCSI,
};
use protocol::descriptors::{Configuration, DEVICE_DESCRIPTOR_LEN};
use protocol::scsi::{self, Capacity, CapacityQuery};
use protocol::usb::{Direction, EndpointNumber, SetupPacket, TransferType, UrbStatus};
use protocol::wire::{
    AttachHandle, DeviceInfo, UrbClientMessage, UrbComplete, UrbId, UrbServerMessage, UrbSubmit,
};
use transport::{ClientError, FramedRecv, FramedSend, ServerConnection, StreamError};

/// Bytes per bulk IN URB while reading.
const URB_LEN: u32 = 16 * 1024;
/// Bytes per READ(10) command: 16 URBs in flight per command.
const COMMAND_LEN: u32 = 256 * 1024;
// One command's URBs go out together: they must fit the URB window.
const _: () = assert!(COMMAND_LEN / URB_LEN <= protocol::wire::URB_WINDOW as u32);
/// How long one batch of URBs may take before the device counts as wedged.
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Talking to the server failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A URB stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The device has no bulk-only mass-storage interface.
    #[error("the device has no mass-storage (class 08, protocol 50) interface")]
    NotMassStorage,
    /// A URB ended badly.
    #[error("{what} failed with {status:?}")]
    Urb {
        /// Which step.
        what: &'static str,
        /// How it ended.
        status: UrbStatus,
    },
    /// The device answered something that is not Bulk-Only Transport.
    #[error("bad answer from the device: {0}")]
    Device(String),
    /// The stream ended before all completions came back.
    #[error(
        "the server ended the URB stream before answering: the attachment is over (detached, or its device removed)"
    )]
    StreamEnded,
    /// The device did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// What the probe found.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// INQUIRY vendor identification.
    pub vendor: String,
    /// INQUIRY product identification.
    pub product: String,
    /// Capacity in blocks.
    pub blocks: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Bytes read.
    pub read_bytes: u64,
    /// Time the reads took.
    pub read_secs: f64,
}

/// One endpoint's URB stream.
struct Stream {
    tx: FramedSend<UrbClientMessage>,
    rx: FramedRecv<UrbServerMessage>,
}

/// A bulk-only mass-storage device reached over a connection.
pub struct Probe {
    control: Stream,
    bulk_in: Stream,
    bulk_out: Stream,
    in_ep: EndpointNumber,
    out_ep: EndpointNumber,
    next_id: u32,
    next_tag: u32,
    device: DeviceInfo,
}

impl Probe {
    /// Opens the streams of an attached device's mass-storage interface.
    pub async fn open(
        conn: &ServerConnection,
        handle: AttachHandle,
        device: DeviceInfo,
    ) -> Result<Probe, ProbeError> {
        let config = device
            .active_configuration_bytes()
            .and_then(|c| Configuration::parse(c).ok())
            .ok_or(ProbeError::NotMassStorage)?;
        let interface = config
            .interfaces
            .iter()
            .find(|i| i.class == [CLASS_MASS_STORAGE, SUBCLASS_SCSI, PROTOCOL_BULK_ONLY])
            .ok_or(ProbeError::NotMassStorage)?;
        let find = |direction| {
            interface
                .endpoints
                .iter()
                .find(|e| e.direction == direction && e.transfer_type == TransferType::Bulk)
                .map(|e| e.number)
                .ok_or(ProbeError::NotMassStorage)
        };
        let (in_ep, out_ep) = (find(Direction::In)?, find(Direction::Out)?);
        let open = |ep, dir| conn.open_urb_stream(handle, ep, dir);
        let (tx, rx) = open(EndpointNumber::CONTROL, Direction::Out).await?;
        let control = Stream { tx, rx };
        let (tx, rx) = open(in_ep, Direction::In).await?;
        let bulk_in = Stream { tx, rx };
        let (tx, rx) = open(out_ep, Direction::Out).await?;
        let bulk_out = Stream { tx, rx };
        Ok(Probe {
            control,
            bulk_in,
            bulk_out,
            in_ep,
            out_ep,
            next_id: 1,
            next_tag: 1,
            device,
        })
    }

    fn urb(&mut self, endpoint: EndpointNumber, direction: Direction, length: u32) -> UrbSubmit {
        let id = UrbId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        UrbSubmit {
            id,
            endpoint,
            direction,
            transfer_type: TransferType::Bulk,
            flags: 0,
            setup: None,
            length,
            data: Vec::new(),
            interval: 0,
            iso: None,
        }
    }

    /// Reads the device descriptor on endpoint 0 and checks it against what the server said.
    pub async fn check_descriptor(&mut self) -> Result<(), ProbeError> {
        let mut urb = self.urb(EndpointNumber::CONTROL, Direction::In, 18);
        urb.transfer_type = TransferType::Control;
        urb.setup = Some(SetupPacket([0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 18, 0]));
        let done = run(&mut self.control, vec![urb]).await?;
        let d = expect_ok("GET_DESCRIPTOR(device)", &done[0])?;
        if d.data.len() != DEVICE_DESCRIPTOR_LEN || d.data != self.device.device_descriptor {
            return Err(ProbeError::Device(
                "the device descriptor differs from the server's device list".into(),
            ));
        }
        Ok(())
    }

    /// Times `count` control transfers (GET_DESCRIPTOR(device)) one after another: a full round
    /// trip through client, network, server and device each, with nothing else in flight.
    pub async fn control_round_trips(&mut self, count: u32) -> Result<Vec<Duration>, ProbeError> {
        let mut times = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let mut urb = self.urb(EndpointNumber::CONTROL, Direction::In, 18);
            urb.transfer_type = TransferType::Control;
            urb.setup = Some(SetupPacket([0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 18, 0]));
            let start = Instant::now();
            let done = run(&mut self.control, vec![urb]).await?;
            expect_ok("GET_DESCRIPTOR(device)", &done[0])?;
            times.push(start.elapsed());
        }
        Ok(times)
    }

    /// Runs one SCSI command: CBW out, `data_len` bytes in (split into URBs all in flight at
    /// once), CSW in. Returns the data.
    async fn command(&mut self, cdb: &[u8], data_len: u32) -> Result<Vec<u8>, ProbeError> {
        let mut data = Vec::new();
        self.command_into(cdb, data_len, &mut data).await?;
        Ok(data)
    }

    /// [`command`](Self::command) into `data` (cleared first). The read loop reuses one
    /// buffer: a fresh 256 KiB one per command is a fresh mapping, faulted in page by page,
    /// which on the host cost the probe more than a third of its speed.
    async fn command_into(
        &mut self,
        cdb: &[u8],
        data_len: u32,
        data: &mut Vec<u8>,
    ) -> Result<(), ProbeError> {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        let cbw =
            Cbw::new(tag, data_len, true, 0, cdb).map_err(|e| ProbeError::Device(e.to_string()))?;
        let mut out = self.urb(self.out_ep, Direction::Out, CBW_LEN as u32);
        out.data = cbw.to_bytes().to_vec();
        // The data and status URBs are queued together with the command: the device sees them
        // all waiting, as the kernel's own pipeline would have them.
        let mut ins = Vec::new();
        let mut left = data_len;
        while left > 0 {
            let n = left.min(URB_LEN);
            ins.push(self.urb(self.in_ep, Direction::In, n));
            left -= n;
        }
        let csw = self.urb(self.in_ep, Direction::In, CSW_LEN as u32);
        ins.push(csw);
        let (out_done, in_done) = tokio::join!(
            run(&mut self.bulk_out, vec![out]),
            run(&mut self.bulk_in, ins)
        );
        expect_ok("CBW", &out_done?[0])?;
        let mut in_done = in_done?;
        let csw = in_done.pop().ok_or(ProbeError::StreamEnded)?;
        data.clear();
        for c in &in_done {
            data.extend_from_slice(&expect_ok("data phase", c)?.data);
        }
        let csw = Csw::parse(&expect_ok("CSW", &csw)?.data)
            .map_err(|e| ProbeError::Device(e.to_string()))?;
        if csw.tag != tag {
            return Err(ProbeError::Device("CSW tag does not match the CBW".into()));
        }
        if csw.status != CswStatus::Passed {
            return Err(ProbeError::Device(format!(
                "SCSI command {:#04x} failed (CSW status {:?})",
                cdb[0], csw.status
            )));
        }
        Ok(())
    }

    /// INQUIRY, READ CAPACITY(10), then reads `read_bytes` from block 0, handing each chunk to
    /// `sink` in order.
    pub async fn run(
        &mut self,
        read_bytes: u64,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<ProbeReport, ProbeError> {
        self.check_descriptor().await?;
        let inquiry = self.command(&[0x12, 0, 0, 0, 36, 0], 36).await?;
        if inquiry.len() < 36 {
            return Err(ProbeError::Device("short INQUIRY data".into()));
        }
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
        let answer = self
            .command(&[scsi::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8)
            .await?;
        let Some(Capacity { blocks, block_size }) = CapacityQuery::Short.answer(&answer) else {
            return Err(ProbeError::Device(format!(
                "READ CAPACITY answered {answer:02x?}: not 8 bytes of a disk with 512 B to 64 KiB \
                 blocks (READ CAPACITY(16) disks are not probed)"
            )));
        };
        let read_bytes = read_bytes.min(blocks * u64::from(block_size));
        let start = Instant::now();
        let mut lba: u64 = 0;
        let mut done: u64 = 0;
        let mut data = Vec::with_capacity(COMMAND_LEN as usize);
        while done < read_bytes {
            let len = (read_bytes - done).min(u64::from(COMMAND_LEN)) as u32;
            let count = len.div_ceil(block_size);
            let read = scsi::Read {
                lba,
                blocks: count,
                long: false,
            };
            let cdb = read.to_cdb().ok_or_else(|| {
                ProbeError::Device(format!("block {lba} is past what READ(10) can address"))
            })?;
            self.command_into(&cdb, count * block_size, &mut data)
                .await?;
            let keep = (len as usize).min(data.len());
            sink(&data[..keep]).map_err(|e| ProbeError::Device(format!("writing output: {e}")))?;
            done += keep as u64;
            lba += u64::from(count);
        }
        Ok(ProbeReport {
            vendor: text(&inquiry[8..16]),
            product: text(&inquiry[16..32]),
            blocks,
            block_size,
            read_bytes: done,
            read_secs: start.elapsed().as_secs_f64(),
        })
    }
}

/// Submits `urbs` together and returns their completions in submission order.
async fn run(stream: &mut Stream, urbs: Vec<UrbSubmit>) -> Result<Vec<UrbComplete>, ProbeError> {
    let ids: Vec<UrbId> = urbs.iter().map(|u| u.id).collect();
    for urb in urbs {
        stream.tx.queue(&UrbClientMessage::Submit(urb))?;
    }
    // The server stops reading a stream whose attachment ended: this batch will never be
    // answered, which is how the stream says the attachment is over.
    stream.tx.flush().await.map_err(|e| {
        if e.is_stopped() {
            ProbeError::StreamEnded
        } else {
            e.into()
        }
    })?;
    let mut done = Vec::with_capacity(ids.len());
    while done.len() < ids.len() {
        let msg = tokio::time::timeout(BATCH_TIMEOUT, stream.rx.next())
            .await
            .map_err(|_| ProbeError::Timeout(BATCH_TIMEOUT))??;
        match msg {
            Some(UrbServerMessage::Complete(c)) => done.push(c),
            Some(UrbServerMessage::UnlinkDone { .. }) => {}
            None => return Err(ProbeError::StreamEnded),
        }
    }
    done.sort_by_key(|c| ids.iter().position(|id| *id == c.id));
    Ok(done)
}

fn expect_ok<'a>(what: &'static str, c: &'a UrbComplete) -> Result<&'a UrbComplete, ProbeError> {
    match c.status {
        UrbStatus::Ok => Ok(c),
        status => Err(ProbeError::Urb { what, status }),
    }
}
