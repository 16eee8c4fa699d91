//! The simulated disk driven as Linux drives a USB stick, through the `OpenedDevice` trait
//! alone: enumeration on endpoint 0, usb-storage's class requests, then SCSI over Bulk-Only
//! Transport with IN URBs queued before the commands that fill them.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;

use protocol::descriptors::{Configuration, DeviceDescriptor};
use protocol::usb::{Direction, EndpointNumber, SetupPacket, TransferType, UrbStatus};
use protocol::wire::{UrbComplete, UrbId, UrbSubmit};
use server::device::sim::SimSource;
use server::device::{CompletionSender, DeviceSource, OpenedDevice};
use tokio::sync::mpsc;

const BLOCKS: u64 = 2048; // 1 MiB

/// A stand-in for the kernel side: numbers URBs, submits them, collects completions by id.
struct Host {
    dev: Box<dyn OpenedDevice>,
    tx: CompletionSender,
    rx: mpsc::UnboundedReceiver<UrbComplete>,
    next_id: u32,
    done: HashMap<UrbId, UrbComplete>,
    outstanding: usize,
    tag: u32,
}

impl Host {
    fn new(dev: Box<dyn OpenedDevice>) -> Host {
        let (tx, rx) = mpsc::unbounded_channel();
        Host {
            dev,
            tx,
            rx,
            next_id: 1,
            done: HashMap::new(),
            outstanding: 0,
            tag: 0,
        }
    }

    fn submit(&mut self, mut urb: UrbSubmit) -> UrbId {
        urb.id = UrbId(self.next_id);
        self.next_id += 1;
        self.outstanding += 1;
        let id = urb.id;
        self.dev.submit(urb, self.tx.clone());
        id
    }

    fn poll(&mut self) {
        while let Ok(c) = self.rx.try_recv() {
            assert!(
                self.done.insert(c.id, c.clone()).is_none(),
                "{:?} completed twice",
                c.id
            );
            assert!(c.iso.is_none() && c.timing.is_none());
            self.outstanding -= 1;
        }
    }

    fn pending(&mut self, id: UrbId) -> bool {
        self.poll();
        !self.done.contains_key(&id)
    }

    fn wait(&mut self, id: UrbId) -> UrbComplete {
        self.poll();
        self.done
            .remove(&id)
            .unwrap_or_else(|| panic!("{id:?} has not completed"))
    }

    fn ok(&mut self, id: UrbId) -> UrbComplete {
        let c = self.wait(id);
        assert_eq!(c.status, UrbStatus::Ok, "{c:?}");
        if !c.data.is_empty() {
            assert_eq!(c.data.len(), c.actual_length as usize);
        }
        c
    }

    fn control_in(&mut self, setup: [u8; 8]) -> Vec<u8> {
        let length = u16::from_le_bytes([setup[6], setup[7]]).into();
        let id = self.submit(UrbSubmit {
            id: UrbId(0),
            endpoint: EndpointNumber::CONTROL,
            direction: Direction::In,
            transfer_type: TransferType::Control,
            flags: 0x200,
            setup: Some(SetupPacket(setup)),
            length,
            data: Vec::new(),
            interval: 0,
            iso: None,
        });
        self.ok(id).data
    }

    fn control_out(&mut self, setup: [u8; 8]) {
        let id = self.submit(UrbSubmit {
            id: UrbId(0),
            endpoint: EndpointNumber::CONTROL,
            direction: Direction::Out,
            transfer_type: TransferType::Control,
            flags: 0,
            setup: Some(SetupPacket(setup)),
            length: 0,
            data: Vec::new(),
            interval: 0,
            iso: None,
        });
        self.ok(id);
    }

    fn bulk_in(&mut self, length: u32) -> UrbId {
        self.submit(UrbSubmit {
            id: UrbId(0),
            endpoint: EndpointNumber::new(1).unwrap(),
            direction: Direction::In,
            transfer_type: TransferType::Bulk,
            flags: 0x200,
            // usb-storage reuses URBs, so stale setup bytes are normal on bulk; the server
            // must go by the endpoint. Here there are none.
            setup: None,
            length,
            data: Vec::new(),
            interval: 0,
            iso: None,
        })
    }

    fn bulk_out(&mut self, data: Vec<u8>) -> UrbId {
        self.submit(UrbSubmit {
            id: UrbId(0),
            endpoint: EndpointNumber::new(2).unwrap(),
            direction: Direction::Out,
            transfer_type: TransferType::Bulk,
            flags: 0,
            setup: None,
            length: data.len() as u32,
            data,
            interval: 0,
            iso: None,
        })
    }

    /// Sends a CBW and checks the device took all 31 bytes.
    fn cbw(&mut self, data_len: u32, data_in: bool, cdb: &[u8]) -> u32 {
        self.tag += 1;
        let b = protocol::bot::Cbw::new(self.tag, data_len, data_in, 0, cdb)
            .unwrap()
            .to_bytes()
            .to_vec();
        let id = self.bulk_out(b);
        assert_eq!(self.ok(id).actual_length, 31);
        self.tag
    }

    /// Checks a completed CSW: signature, tag, residue, status.
    fn csw(&mut self, id: UrbId, tag: u32, residue: u32, status: u8) {
        let c = self.ok(id);
        assert_eq!(c.data.len(), 13);
        assert_eq!(&c.data[0..4], b"USBS");
        assert_eq!(u32::from_le_bytes(c.data[4..8].try_into().unwrap()), tag);
        assert_eq!(
            u32::from_le_bytes(c.data[8..12].try_into().unwrap()),
            residue
        );
        assert_eq!(c.data[12], status);
    }

    /// A data-in command the usual way: CBW, then the data URB, then the CSW URB.
    fn command_in(&mut self, cdb: &[u8], len: u32) -> Vec<u8> {
        let tag = self.cbw(len, true, cdb);
        let data = self.bulk_in(len);
        let data = self.ok(data).data;
        let csw = self.bulk_in(13);
        self.csw(csw, tag, len - data.len() as u32, 0);
        data
    }
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

#[test]
fn a_kernel_enumerates_the_disk_and_reads_back_what_it_wrote() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(BLOCKS * 512).unwrap();
    let source = SimSource::open([file.path()]).unwrap();
    let info = source.devices().remove(0);
    let mut host = Host::new(source.open(info.id).unwrap());

    // Enumeration, in the order the hub driver asks.
    let device = host.control_in([0x80, 6, 0, 1, 0, 0, 64, 0]);
    assert_eq!(device.len(), 18);
    assert_eq!(device, info.device_descriptor);
    let d = DeviceDescriptor::parse(&device).unwrap();
    assert_eq!((d.vendor_id, d.product_id), (0x1209, 0x0001));
    let head = host.control_in([0x80, 6, 0, 2, 0, 0, 9, 0]);
    let total = u16::from_le_bytes([head[2], head[3]]);
    let config = host.control_in([0x80, 6, 0, 2, 0, 0, total as u8, (total >> 8) as u8]);
    assert_eq!(config.len(), usize::from(total));
    assert_eq!(Some(&config[..]), info.active_configuration_bytes());
    let c = Configuration::parse(&config).unwrap();
    assert_eq!(c.interface_classes(), vec![[8, 6, 0x50]]);
    let ep1 = EndpointNumber::new(1).unwrap();
    let ep2 = EndpointNumber::new(2).unwrap();
    assert_eq!(
        c.transfer_type(ep1, Direction::In),
        Some(TransferType::Bulk)
    );
    assert_eq!(
        c.transfer_type(ep2, Direction::Out),
        Some(TransferType::Bulk)
    );
    assert_eq!(
        host.control_in([0x80, 6, 0, 3, 0, 0, 255, 0]),
        [4, 3, 0x09, 0x04]
    );
    let product = host.control_in([0x80, 6, 2, 3, 0x09, 0x04, 255, 0]);
    let product: Vec<u16> = product[2..]
        .chunks(2)
        .map(|u| u16::from_le_bytes([u[0], u[1]]))
        .collect();
    assert_eq!(String::from_utf16(&product).unwrap(), "Simulated Disk");
    host.control_out([0x00, 9, 1, 0, 0, 0, 0, 0]); // SET_CONFIGURATION 1

    // usb-storage's probe: GET MAX LUN.
    assert_eq!(host.control_in([0xa1, 0xfe, 0, 0, 0, 0, 1, 0]), [0]);

    // INQUIRY with its data and CSW URBs queued before the CBW exists.
    let data = host.bulk_in(36);
    let csw = host.bulk_in(13);
    assert!(host.pending(data) && host.pending(csw));
    let tag = host.cbw(36, true, &[0x12, 0, 0, 0, 36, 0]);
    let inquiry = host.ok(data).data;
    assert_eq!(inquiry[0] & 0x1f, 0x00, "direct-access device");
    assert_eq!(&inquiry[16..32], b"Simulated Disk  ");
    host.csw(csw, tag, 0, 0);

    // TEST UNIT READY: no data phase.
    let csw = host.bulk_in(13);
    let tag = host.cbw(0, false, &[0, 0, 0, 0, 0, 0]);
    host.csw(csw, tag, 0, 0);

    // READ CAPACITY(10).
    let cap = host.command_in(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(
        u32::from_be_bytes(cap[0..4].try_into().unwrap()),
        (BLOCKS - 1) as u32
    );
    assert_eq!(u32::from_be_bytes(cap[4..8].try_into().unwrap()), 512);

    // WRITE(10) of 64 blocks of a pattern at LBA 100, in two data URBs, its CSW URB queued
    // before the CBW.
    let pattern: Vec<u8> = (0..64 * 512u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let csw = host.bulk_in(13);
    let tag = host.cbw(pattern.len() as u32, false, &write10(100, 64));
    let (first, second) = pattern.split_at(20 * 512);
    let a = host.bulk_out(first.to_vec());
    assert_eq!(host.ok(a).actual_length, first.len() as u32);
    assert!(host.pending(csw), "the CSW waits for all the data");
    let b = host.bulk_out(second.to_vec());
    assert_eq!(host.ok(b).actual_length, second.len() as u32);
    host.csw(csw, tag, 0, 0);

    // SYNCHRONIZE CACHE(10), then the bytes are in the file.
    let csw = host.bulk_in(13);
    let tag = host.cbw(0, false, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    host.csw(csw, tag, 0, 0);
    let mut on_disk = vec![0u8; pattern.len()];
    file.as_file()
        .read_exact_at(&mut on_disk, 100 * 512)
        .unwrap();
    assert_eq!(on_disk, pattern);

    // READ(10) back with four data URBs and the CSW URB all queued before the CBW.
    let pieces: Vec<UrbId> = (0..4).map(|_| host.bulk_in(16 * 512)).collect();
    let csw = host.bulk_in(13);
    assert!(pieces.iter().all(|&id| host.pending(id)));
    let tag = host.cbw(pattern.len() as u32, true, &read10(100, 64));
    let read: Vec<u8> = pieces.iter().flat_map(|&id| host.ok(id).data).collect();
    assert_eq!(read, pattern);
    host.csw(csw, tag, 0, 0);

    // A read past the end fails, and REQUEST SENSE says why.
    let data = host.bulk_in(1024);
    let csw = host.bulk_in(13);
    let tag = host.cbw(1024, true, &read10(BLOCKS as u32 - 1, 2));
    assert_eq!(host.ok(data).data, Vec::<u8>::new());
    host.csw(csw, tag, 1024, 1);
    let sense = host.command_in(&[0x03, 0, 0, 0, 18, 0], 18);
    assert_eq!((sense[2], sense[12], sense[13]), (0x05, 0x21, 0x00));

    // An IN URB left waiting ends with NoDevice when the device is released.
    let waiting = host.bulk_in(13);
    host.poll();
    assert_eq!(host.outstanding, 1);
    let Host { dev, mut rx, .. } = host;
    dev.release();
    let last = rx.try_recv().unwrap();
    assert_eq!((last.id, last.status), (waiting, UrbStatus::NoDevice));
    assert!(rx.try_recv().is_err());
}
