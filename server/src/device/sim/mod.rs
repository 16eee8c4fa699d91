//! Simulated devices for machines with no USB hardware to share: a USB mass-storage disk
//! backed by a file (`--simulate`).
//!
//! The disk speaks Bulk-Only Transport and SCSI well enough for Linux's usb-storage and sd
//! drivers to enumerate, partition, format and mount it on the client, and it runs through the
//! same [`DeviceSource`] / [`OpenedDevice`] paths as a real device, so every layer above is
//! exercised end to end without hardware. The protocol lives in sans-IO state machines:
//! [`control`] (endpoint 0), [`bot`] (the bulk endpoints), [`scsi`] (the commands); this module
//! is the glue that turns URBs into calls on them and back into completions.
//!
//! Reads and writes hit the backing file synchronously inside `submit`: local positioned I/O of
//! at most one URB's worth (`MAX_TRANSFER_LEN`), which the page cache answers quickly; only
//! SYNCHRONIZE CACHE waits for the disk.

pub mod bot;
pub mod control;
pub mod descriptors;
pub mod scsi;

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use protocol::usb::{Direction, EndpointNumber, Speed, TransferType, UrbStatus, transfer_flags};
use protocol::wire::{ClassTriple, DeviceId, DeviceInfo, UrbComplete, UrbId, UrbSubmit};
use tokio::sync::broadcast;

use self::bot::{Bot, Halted};
use self::control::{Control, Effect, Reply};
use self::descriptors::Strings;
use self::scsi::{BLOCK_SIZE, Scsi, Storage};
use super::{CompletionSender, DeviceEvent, DeviceSource, OpenError, OpenedDevice};
use crate::tracker::completion;

/// The bus number simulated disks report. Linux numbers at most 64 buses (`USB_MAXBUS`), so a
/// simulated disk can never be mistaken for a real device on the same server.
pub const SIM_BUS_NUMBER: u8 = 0xfe;

/// Why a simulated disk could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The backing file could not be opened for reading and writing.
    #[error("cannot open backing file {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The backing file holds less than one block.
    #[error("backing file {} holds {len} bytes, less than one {BLOCK_SIZE}-byte block", path.display())]
    TooSmall {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// A missing backing file could not be created at the size asked for.
    #[error("cannot create backing file {} of {size} bytes", path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// The size asked for.
        size: u64,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// More disks than device addresses on one bus.
    #[error("{0} backing files given; at most 127 simulated disks")]
    TooMany(usize),
}

/// A [`Storage`] on a file, with positioned I/O so no seek position is shared.
#[derive(Debug, Clone)]
pub struct FileStorage {
    file: Arc<File>,
    blocks: u64,
}

impl Storage for FileStorage {
    fn block_count(&self) -> u64 {
        self.blocks
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// One simulated disk the source offers.
#[derive(Debug)]
struct Disk {
    info: DeviceInfo,
    storage: FileStorage,
    /// Set while a [`SimDevice`] has the disk open: one claim at a time, like usbfs.
    claimed: Arc<AtomicBool>,
}

/// A [`DeviceSource`] of simulated disks, one per backing file. The set is fixed: no hot-plug.
#[derive(Debug)]
pub struct SimSource {
    disks: Vec<Disk>,
    /// Kept so subscribers wait forever instead of seeing a closed channel.
    events: broadcast::Sender<DeviceEvent>,
}

impl SimSource {
    /// A disk per file, in order, with ids 1, 2, ... . A file's length is rounded down to whole
    /// 512-byte blocks.
    pub fn open<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> Result<Self, SimError> {
        let paths: Vec<PathBuf> = paths.into_iter().map(|p| p.as_ref().to_owned()).collect();
        if paths.len() > 127 {
            return Err(SimError::TooMany(paths.len()));
        }
        let disks = paths
            .into_iter()
            .zip(1u8..)
            .map(|(path, n)| Disk::open(path, n))
            .collect::<Result<_, _>>()?;
        let (events, _) = broadcast::channel(1);
        Ok(SimSource { disks, events })
    }
}

impl SimSource {
    /// What `--simulate` does: creates each file that does not exist yet as a sparse file of
    /// `create_size` bytes, then opens them all as with [`SimSource::open`]. Existing files keep
    /// their contents and size, so a disk survives server restarts.
    pub fn with_files(paths: &[PathBuf], create_size: u64) -> Result<Arc<Self>, SimError> {
        for path in paths {
            let created = File::options().write(true).create_new(true).open(path);
            match created.and_then(|f| f.set_len(create_size)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(SimError::Create {
                        path: path.clone(),
                        size: create_size,
                        source,
                    });
                }
            }
        }
        Self::open(paths).map(Arc::new)
    }
}

impl Disk {
    fn open(path: PathBuf, n: u8) -> Result<Self, SimError> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .and_then(|f| Ok((f.metadata()?.len(), f)));
        let (len, file) = match file {
            Ok(ok) => ok,
            Err(source) => return Err(SimError::Open { path, source }),
        };
        let blocks = len / u64::from(BLOCK_SIZE);
        if blocks == 0 {
            return Err(SimError::TooSmall { path, len });
        }
        // Hex digits only, at least 12 of them: what the BOT spec asks of a serial number.
        let serial = format!("53494D{n:06X}");
        let info = DeviceInfo {
            id: DeviceId(n.into()),
            bus_id: format!("sim-{n}"),
            bus_number: SIM_BUS_NUMBER,
            device_address: n,
            vendor_id: descriptors::VENDOR_ID,
            product_id: descriptors::PRODUCT_ID,
            bcd_device: descriptors::BCD_DEVICE,
            class: ClassTriple {
                class: 0,
                subclass: 0,
                protocol: 0,
            },
            speed: Speed::High,
            manufacturer: Some(descriptors::MANUFACTURER.to_owned()),
            product: Some(descriptors::PRODUCT.to_owned()),
            serial: Some(serial),
            device_descriptor: descriptors::device().to_vec(),
            configurations: vec![serde_bytes::ByteBuf::from(
                descriptors::configuration().to_vec(),
            )],
            // A real device is configured by its kernel before it is exported; so is this one.
            active_configuration: descriptors::CONFIGURATION_VALUE,
        };
        Ok(Disk {
            info,
            storage: FileStorage {
                file: Arc::new(file),
                blocks,
            },
            claimed: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl DeviceSource for SimSource {
    fn devices(&self) -> Vec<DeviceInfo> {
        self.disks.iter().map(|d| d.info.clone()).collect()
    }

    fn open(&self, id: DeviceId) -> Result<Box<dyn OpenedDevice>, OpenError> {
        let disk = self
            .disks
            .iter()
            .find(|d| d.info.id == id)
            .ok_or(OpenError::Gone(id))?;
        if disk.claimed.swap(true, Ordering::AcqRel) {
            return Err(OpenError::Busy(format!(
                "simulated disk {} is already open",
                disk.info.bus_id
            )));
        }
        let serial = disk.info.serial.clone().unwrap_or_default();
        Ok(Box::new(SimDevice {
            control: Control::new(Strings::new(serial.clone())),
            bot: Bot::new(Scsi::new(disk.storage.clone(), serial)),
            pending_in: VecDeque::new(),
            claimed: Arc::clone(&disk.claimed),
        }))
    }

    fn subscribe(&self) -> broadcast::Receiver<DeviceEvent> {
        self.events.subscribe()
    }
}

/// A bulk IN URB waiting for the transport to have something to send.
#[derive(Debug)]
struct PendingIn {
    id: UrbId,
    length: u32,
    short_not_ok: bool,
    done: CompletionSender,
}

/// An open simulated disk: URBs in, completions out.
///
/// Control and bulk OUT URBs complete inside `submit`. Bulk IN URBs queue in arrival order and
/// complete as soon as the transport has data or a CSW for them, so a host may queue them
/// before the CBW that produces their data.
#[derive(Debug)]
pub struct SimDevice {
    control: Control,
    bot: Bot<FileStorage>,
    pending_in: VecDeque<PendingIn>,
    claimed: Arc<AtomicBool>,
}

impl SimDevice {
    fn submit_control(&mut self, urb: UrbSubmit, done: &CompletionSender) {
        let Some(setup) = urb
            .setup
            .filter(|_| urb.transfer_type == TransferType::Control)
        else {
            send(done, completion(urb.id, UrbStatus::Invalid));
            return;
        };
        let outcome = self.control.handle(&setup, |dir| self.bot.halted(dir));
        let result = match (outcome.reply, urb.direction) {
            (Reply::Data(mut data), Direction::In) => {
                data.truncate(urb.length as usize);
                in_completion(urb.id, data, urb.length, short_not_ok(&urb))
            }
            (Reply::Ack, Direction::Out) => out_completion(urb.id, urb.data.len() as u32),
            (Reply::Ack, Direction::In) => in_completion(urb.id, Vec::new(), 0, false),
            // A data stage in the other direction than the request's: the host is confused.
            (Reply::Data(_), Direction::Out) => completion(urb.id, UrbStatus::Stall),
            (Reply::Stall, _) => completion(urb.id, UrbStatus::Stall),
        };
        let acked = result.status == UrbStatus::Ok;
        send(done, result);
        if !acked {
            return;
        }
        match outcome.effect {
            Some(Effect::ClearHalt(dir)) => self.bot.clear_halt(dir),
            Some(Effect::SetHalt(dir)) => self.bot.set_halt(dir),
            Some(Effect::MassStorageReset) => self.bot.reset(),
            Some(Effect::Reconfigure) => self.bot.reconfigure(),
            None => {}
        }
    }

    /// Hands the transport's output to waiting IN URBs, oldest first, until it has none.
    fn drain_in(&mut self) {
        while let Some(next) = self.pending_in.front() {
            let Some(result) = self.bot.bulk_in(next.length) else {
                break;
            };
            let Some(p) = self.pending_in.pop_front() else {
                break;
            };
            let c = match result {
                Ok(data) => in_completion(p.id, data, p.length, p.short_not_ok),
                Err(Halted) => completion(p.id, UrbStatus::Stall),
            };
            send(&p.done, c);
        }
    }
}

impl OpenedDevice for SimDevice {
    fn submit(&mut self, urb: UrbSubmit, done: CompletionSender) {
        let bulk = urb.transfer_type == TransferType::Bulk;
        match (urb.endpoint.get(), urb.direction) {
            (0, _) => self.submit_control(urb, &done),
            (n, Direction::In) if bulk && n == descriptors::BULK_IN & 0x0f => {
                self.pending_in.push_back(PendingIn {
                    id: urb.id,
                    length: urb.length,
                    short_not_ok: short_not_ok(&urb),
                    done,
                });
            }
            (n, Direction::Out) if bulk && n == descriptors::BULK_OUT => {
                let c = match self.bot.bulk_out(&urb.data) {
                    Ok(accepted) => out_completion(urb.id, accepted),
                    Err(Halted) => completion(urb.id, UrbStatus::Stall),
                };
                send(&done, c);
            }
            // No such endpoint: what a host controller reports.
            _ => send(&done, completion(urb.id, UrbStatus::Stall)),
        }
        self.drain_in();
    }

    fn cancel(&mut self, endpoint: EndpointNumber, direction: Direction, id: UrbId) {
        // Everything but a waiting bulk IN URB has completed inside `submit` already.
        if endpoint.address(direction) != descriptors::BULK_IN {
            return;
        }
        let at = self.pending_in.iter().position(|p| p.id == id);
        if let Some(p) = at.and_then(|at| self.pending_in.remove(at)) {
            send(&p.done, completion(p.id, UrbStatus::Unlinked));
        }
    }

    fn release(self: Box<Self>) {
        // Drop does the work, so a device dropped without `release` keeps the same promise.
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        for p in self.pending_in.drain(..) {
            send(&p.done, completion(p.id, UrbStatus::NoDevice));
        }
        self.claimed.store(false, Ordering::Release);
    }
}

fn short_not_ok(urb: &UrbSubmit) -> bool {
    urb.flags & transfer_flags::SHORT_NOT_OK != 0
}

/// An IN completion; short with `SHORT_NOT_OK` is `-EREMOTEIO`, data included, as an HCD
/// reports it.
fn in_completion(id: UrbId, data: Vec<u8>, length: u32, short_not_ok: bool) -> UrbComplete {
    let actual_length = data.len() as u32;
    let status = if short_not_ok && actual_length < length {
        UrbStatus::ShortPacket
    } else {
        UrbStatus::Ok
    };
    UrbComplete {
        actual_length,
        data,
        ..completion(id, status)
    }
}

fn out_completion(id: UrbId, accepted: u32) -> UrbComplete {
    UrbComplete {
        actual_length: accepted,
        ..completion(id, UrbStatus::Ok)
    }
}

/// Sends a completion. A closed channel means the session is gone and nobody is waiting for
/// it, so there is nothing left to do.
fn send(done: &CompletionSender, c: UrbComplete) {
    let _ = done.send(c);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    const IN: Direction = Direction::In;
    const OUT: Direction = Direction::Out;

    fn ep(n: u8) -> EndpointNumber {
        EndpointNumber::new(n).unwrap()
    }

    fn disk_file(blocks: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(blocks * 512).unwrap();
        f
    }

    fn bulk(id: u32, direction: Direction, data: Vec<u8>, length: u32) -> UrbSubmit {
        UrbSubmit {
            id: UrbId(id),
            endpoint: ep(if direction == IN { 1 } else { 2 }),
            direction,
            transfer_type: TransferType::Bulk,
            flags: 0,
            setup: None,
            length,
            data,
            interval: 0,
            iso: None,
        }
    }

    fn bulk_in(id: u32, length: u32) -> UrbSubmit {
        bulk(id, IN, Vec::new(), length)
    }

    fn bulk_out(id: u32, data: Vec<u8>) -> UrbSubmit {
        let len = data.len() as u32;
        bulk(id, OUT, data, len)
    }

    fn control(id: u32, setup: [u8; 8]) -> UrbSubmit {
        let direction = if setup[0] & 0x80 != 0 { IN } else { OUT };
        UrbSubmit {
            id: UrbId(id),
            endpoint: EndpointNumber::CONTROL,
            direction,
            transfer_type: TransferType::Control,
            flags: 0,
            setup: Some(protocol::usb::SetupPacket(setup)),
            length: if direction == IN {
                u16::from_le_bytes([setup[6], setup[7]]).into()
            } else {
                0
            },
            data: Vec::new(),
            interval: 0,
            iso: None,
        }
    }

    fn cbw(tag: u32, len: u32, data_in: bool, cdb: &[u8]) -> Vec<u8> {
        protocol::bot::Cbw::new(tag, len, data_in, 0, cdb)
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    struct Rig {
        _file: tempfile::NamedTempFile,
        source: SimSource,
        dev: Box<dyn OpenedDevice>,
        tx: CompletionSender,
        rx: mpsc::UnboundedReceiver<UrbComplete>,
    }

    impl Rig {
        fn new() -> Rig {
            let file = disk_file(64);
            let source = SimSource::open([file.path()]).unwrap();
            let dev = source.open(DeviceId(1)).unwrap();
            let (tx, rx) = mpsc::unbounded_channel();
            Rig {
                _file: file,
                source,
                dev,
                tx,
                rx,
            }
        }

        fn submit(&mut self, urb: UrbSubmit) {
            self.dev.submit(urb, self.tx.clone());
        }

        fn done(&mut self) -> Vec<UrbComplete> {
            std::iter::from_fn(|| self.rx.try_recv().ok()).collect()
        }

        fn one(&mut self) -> UrbComplete {
            let mut d = self.done();
            assert_eq!(d.len(), 1, "{d:?}");
            d.remove(0)
        }
    }

    #[test]
    fn devices_describe_each_disk() {
        let (a, b) = (disk_file(8), disk_file(16));
        let source = SimSource::open([a.path(), b.path()]).unwrap();
        let devices = source.devices();
        assert_eq!(devices.len(), 2);
        let d = &devices[1];
        assert_eq!(d.id, DeviceId(2));
        assert_eq!(d.bus_id, "sim-2");
        assert_eq!(d.speed, Speed::High);
        assert_eq!(d.product.as_deref(), Some("Simulated Disk"));
        assert_eq!(d.manufacturer.as_deref(), Some("rust-p2p-usb"));
        assert_eq!(d.serial.as_deref(), Some("53494D000002"));
        assert_eq!(d.active_configuration_bytes().unwrap().len(), 32);
        use protocol::wire::Validate;
        d.validate().unwrap();
    }

    #[test]
    fn bad_backing_files_are_typed_errors() {
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            SimSource::open([empty.path()]),
            Err(SimError::TooSmall { len: 0, .. })
        ));
        assert!(matches!(
            SimSource::open(["/nonexistent/disk.img"]),
            Err(SimError::Open { .. })
        ));
    }

    #[test]
    fn with_files_creates_missing_disks_and_keeps_existing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new.img");
        let old = dir.path().join("old.img");
        std::fs::write(&old, vec![1u8; 4096]).unwrap();
        let source = SimSource::with_files(&[new.clone(), old.clone()], 1 << 20).unwrap();
        assert_eq!(source.devices().len(), 2);
        assert_eq!(std::fs::metadata(&new).unwrap().len(), 1 << 20);
        assert_eq!(std::fs::read(&old).unwrap(), vec![1u8; 4096]);
        let missing_dir = dir.path().join("no/such/dir.img");
        assert!(matches!(
            SimSource::with_files(&[missing_dir], 1 << 20),
            Err(SimError::Create { .. })
        ));
    }

    #[test]
    fn one_claim_at_a_time() {
        let rig = Rig::new();
        assert!(matches!(
            rig.source.open(DeviceId(1)),
            Err(OpenError::Busy(_))
        ));
        assert!(matches!(
            rig.source.open(DeviceId(9)),
            Err(OpenError::Gone(_))
        ));
        let Rig { source, dev, .. } = rig;
        dev.release();
        assert!(source.open(DeviceId(1)).is_ok());
    }

    #[test]
    fn control_in_completes_with_data() {
        let mut rig = Rig::new();
        rig.submit(control(1, [0x80, 6, 0, 1, 0, 0, 64, 0]));
        let c = rig.one();
        assert_eq!(c.status, UrbStatus::Ok);
        assert_eq!(c.data, descriptors::device());
        assert_eq!(c.actual_length, 18);
        assert!(c.iso.is_none() && c.timing.is_none());
        rig.submit(control(2, [0x80, 6, 0, 0x0f, 0, 0, 5, 0]));
        assert_eq!(rig.one().status, UrbStatus::Stall);
    }

    #[test]
    fn bulk_out_reports_bytes_accepted() {
        let mut rig = Rig::new();
        rig.submit(bulk_out(
            1,
            cbw(1, 512, false, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
        ));
        let c = rig.one();
        assert_eq!((c.status, c.actual_length), (UrbStatus::Ok, 31));
        assert!(c.data.is_empty());
        rig.submit(bulk_out(2, vec![7; 512]));
        assert_eq!(rig.one().actual_length, 512);
    }

    #[test]
    fn in_urbs_wait_for_data_then_complete_in_order() {
        let mut rig = Rig::new();
        rig.submit(bulk_in(1, 36));
        rig.submit(bulk_in(2, 13));
        assert!(rig.done().is_empty());
        rig.submit(bulk_out(3, cbw(9, 36, true, &[0x12, 0, 0, 0, 36, 0])));
        let done = rig.done();
        let ids: Vec<u32> = done.iter().map(|c| c.id.0).collect();
        assert_eq!(ids, [3, 1, 2]);
        assert_eq!(done[1].data.len(), 36);
        assert_eq!(&done[2].data[..4], b"USBS");
        assert_eq!(done[2].data[12], 0);
    }

    #[test]
    fn short_not_ok_makes_a_short_read_remote_io() {
        let mut rig = Rig::new();
        rig.submit(bulk_out(1, cbw(1, 64, true, &[0x12, 0, 0, 0, 36, 0])));
        let mut urb = bulk_in(2, 64);
        urb.flags = transfer_flags::SHORT_NOT_OK;
        rig.submit(urb);
        let done = rig.done();
        assert_eq!(done[1].status, UrbStatus::ShortPacket);
        assert_eq!(done[1].data.len(), 36);
        assert_eq!(done[1].actual_length, 36);
    }

    #[test]
    fn halted_in_stalls_until_clear_feature() {
        let mut rig = Rig::new();
        rig.submit(bulk_out(1, b"garbage".to_vec()));
        rig.submit(bulk_in(2, 13));
        assert_eq!(rig.done()[1].status, UrbStatus::Stall);
        // Reset recovery, as usb-storage does it.
        rig.submit(control(3, [0x21, 0xff, 0, 0, 0, 0, 0, 0]));
        rig.submit(control(4, [0x02, 1, 0, 0, 0x81, 0, 0, 0]));
        rig.submit(control(5, [0x02, 1, 0, 0, 0x02, 0, 0, 0]));
        assert!(rig.done().iter().all(|c| c.status == UrbStatus::Ok));
        rig.submit(bulk_out(6, cbw(1, 0, false, &[0, 0, 0, 0, 0, 0])));
        rig.submit(bulk_in(7, 13));
        let done = rig.done();
        assert_eq!(done[1].status, UrbStatus::Ok);
        assert_eq!(done[1].data[12], 0);
    }

    #[test]
    fn cancel_unlinks_only_a_pending_urb() {
        let mut rig = Rig::new();
        rig.submit(bulk_in(1, 512));
        rig.submit(bulk_in(2, 13));
        rig.dev.cancel(ep(1), IN, UrbId(1));
        let c = rig.one();
        assert_eq!((c.id, c.status), (UrbId(1), UrbStatus::Unlinked));
        rig.dev.cancel(ep(1), IN, UrbId(1));
        rig.dev.cancel(ep(2), OUT, UrbId(2));
        assert!(rig.done().is_empty());
        // The survivor still gets its CSW.
        rig.submit(bulk_out(3, cbw(1, 0, false, &[0, 0, 0, 0, 0, 0])));
        let done = rig.done();
        assert_eq!(done[1].id, UrbId(2));
        assert_eq!(done[1].data.len(), 13);
    }

    #[test]
    fn release_ends_pending_urbs_with_no_device() {
        let mut rig = Rig::new();
        rig.submit(bulk_in(1, 512));
        rig.submit(bulk_in(2, 13));
        let Rig { dev, mut rx, .. } = rig;
        dev.release();
        let done: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|c| c.status == UrbStatus::NoDevice));
    }

    #[test]
    fn unknown_endpoints_and_malformed_control_fail() {
        let mut rig = Rig::new();
        let mut urb = bulk_in(1, 64);
        urb.endpoint = ep(3);
        rig.submit(urb);
        assert_eq!(rig.one().status, UrbStatus::Stall);
        let mut urb = control(2, [0x80, 6, 0, 1, 0, 0, 18, 0]);
        urb.setup = None;
        rig.submit(urb);
        assert_eq!(rig.one().status, UrbStatus::Invalid);
        let mut urb = bulk_in(3, 64);
        urb.transfer_type = TransferType::Interrupt;
        rig.submit(urb);
        assert_eq!(rig.one().status, UrbStatus::Stall);
    }

    #[test]
    fn a_failing_backing_file_is_a_failed_command_not_a_panic() {
        // A read-only handle on the backing file: every write fails.
        let file = disk_file(8);
        let storage = FileStorage {
            file: Arc::new(File::open(file.path()).unwrap()),
            blocks: 8,
        };
        let mut dev = SimDevice {
            control: Control::new(Strings::new("x")),
            bot: Bot::new(Scsi::new(storage, "x")),
            pending_in: VecDeque::new(),
            claimed: Arc::new(AtomicBool::new(true)),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        dev.submit(
            bulk_out(1, cbw(1, 512, false, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0])),
            tx.clone(),
        );
        dev.submit(bulk_out(2, vec![1; 512]), tx.clone());
        dev.submit(bulk_in(3, 13), tx.clone());
        let done: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(done.len(), 3);
        assert_eq!(done[2].data[12], 1, "CSW status: failed");
        dev.submit(
            bulk_out(4, cbw(2, 18, true, &[0x03, 0, 0, 0, 18, 0])),
            tx.clone(),
        );
        dev.submit(bulk_in(5, 18), tx);
        let done: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!((done[1].data[2], done[1].data[12]), (0x03, 0x0c));
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            In(u32),
            Out(Vec<u8>),
            Cbw(u32, bool, Vec<u8>),
            Control([u8; 8]),
            Cancel(u32),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0..2048u32).prop_map(Op::In),
                proptest::collection::vec(any::<u8>(), 0..1100).prop_map(Op::Out),
                (
                    0..4096u32,
                    any::<bool>(),
                    proptest::collection::vec(any::<u8>(), 1..=16)
                )
                    .prop_map(|(l, d, c)| Op::Cbw(l, d, c)),
                prop_oneof![
                    any::<[u8; 8]>(),
                    Just([0x21, 0xff, 0, 0, 0, 0, 0, 0]),
                    Just([0x02, 1, 0, 0, 0x81, 0, 0, 0]),
                    Just([0x02, 1, 0, 0, 0x02, 0, 0, 0]),
                ]
                .prop_map(Op::Control),
                (0..40u32).prop_map(Op::Cancel),
            ]
        }

        proptest! {
            #[test]
            fn every_urb_completes_exactly_once(ops in proptest::collection::vec(op(), 0..40)) {
                let mut rig = Rig::new();
                let mut submitted = Vec::new();
                for (i, op) in ops.into_iter().enumerate() {
                    let id = i as u32;
                    match op {
                        Op::In(len) => rig.submit(bulk_in(id, len)),
                        Op::Out(d) => rig.submit(bulk_out(id, d)),
                        Op::Cbw(l, d, c) => rig.submit(bulk_out(id, cbw(id, l, d, &c))),
                        Op::Control(s) => rig.submit(control(id, s)),
                        Op::Cancel(which) => {
                            rig.dev.cancel(ep(1), IN, UrbId(which));
                            continue;
                        }
                    }
                    submitted.push(id);
                }
                let Rig { dev, mut rx, .. } = rig;
                dev.release();
                let mut done: Vec<u32> =
                    std::iter::from_fn(|| rx.try_recv().ok()).map(|c| {
                        assert!(c.data.is_empty() || c.data.len() == c.actual_length as usize);
                        c.id.0
                    }).collect();
                done.sort();
                prop_assert_eq!(done, submitted);
            }
        }
    }
}
