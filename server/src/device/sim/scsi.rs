//! The SCSI block device behind the Bulk-Only Transport: the commands Linux's usb-storage and
//! sd drivers send to a disk, answered from a [`Storage`].
//!
//! [`Scsi::execute`] decides what a command does and returns a [`Plan`]. Commands with small
//! answers carry their bytes in the plan; READ and WRITE only name a byte range, which the
//! transport then streams through [`Scsi::read`] and [`Scsi::write`] one URB at a time. That is
//! what keeps memory bounded by the URB: a CDB can name gigabytes, a URB cannot.
//!
//! Sense data follows the SCSI rule for transports without autosense: every command clears it,
//! a failing command sets it, and REQUEST SENSE reports it.

use std::io;

/// The logical block size: 512 bytes, what every USB stick reports and sd assumes first.
pub const BLOCK_SIZE: u32 = 512;

/// The backing store of a disk: byte-addressed, fixed length.
pub trait Storage {
    /// Number of [`BLOCK_SIZE`] blocks. Fixed for the device's life.
    fn block_count(&self) -> u64;
    /// Fills `buf` from byte `offset`; a short read is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `data` at byte `offset`.
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes written data durable.
    fn flush(&mut self) -> io::Result<()>;
}

/// A sense key with its additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Sense {
    /// No error.
    pub const NONE: Sense = Sense::new(0x00, 0x00, 0x00);
    /// An opcode we do not implement.
    pub const INVALID_OPCODE: Sense = Sense::new(0x05, 0x20, 0x00);
    /// A block address past the end of the disk.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(0x05, 0x21, 0x00);
    /// A CDB field we do not support (an unknown VPD page, a too-short CDB).
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(0x05, 0x24, 0x00);
    /// A LUN other than 0.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x25, 0x00);
    /// MODE SENSE for saved values, which a file-backed disk has none of.
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x39, 0x00);
    /// The backing file failed a read.
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(0x03, 0x11, 0x00);
    /// The backing file failed a write or a flush.
    pub const WRITE_ERROR: Sense = Sense::new(0x03, 0x0c, 0x00);

    const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense { key, asc, ascq }
    }

    /// Fixed-format sense data (response code 0x70), 18 bytes.
    pub fn fixed(self) -> [u8; 18] {
        let mut d = [0u8; 18];
        d[0] = 0x70;
        d[2] = self.key;
        d[7] = 10; // additional sense length: bytes 8..18
        d[12] = self.asc;
        d[13] = self.ascq;
        d
    }
}

/// How a command ended, for the CSW.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandStatus {
    /// GOOD.
    Passed,
    /// CHECK CONDITION: sense data says why.
    Failed,
}

/// What a command does once decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No data phase; the command already ended with this status.
    NoData(CommandStatus),
    /// The command passed and returns these bytes (already cut to its allocation length).
    DataIn(Vec<u8>),
    /// The command returns `len` bytes of the disk from byte `offset`, via [`Scsi::read`].
    Read {
        /// Byte offset of the first block.
        offset: u64,
        /// Bytes to read.
        len: u64,
    },
    /// The command takes `len` bytes for the disk at byte `offset`, via [`Scsi::write`].
    Write {
        /// Byte offset of the first block.
        offset: u64,
        /// Bytes to write.
        len: u64,
    },
}

/// The storage failed a streamed READ or WRITE; the sense data is already set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the backing storage failed")]
pub struct MediumError;

/// What INQUIRY names the disk: 8-byte vendor, 16-byte product, 4-byte revision (SPC pads them
/// with spaces).
const INQUIRY_VENDOR: &[u8; 8] = b"rustp2p ";
const INQUIRY_PRODUCT: &[u8; 16] = b"Simulated Disk  ";
const INQUIRY_REVISION: &[u8; 4] = b"0100";

/// Operation codes, named as in SPC/SBC (the ones the client reads too live in
/// `protocol::scsi`).
mod op {
    pub use protocol::scsi::{
        READ_10, READ_16, READ_CAPACITY_10, SA_READ_CAPACITY_16, SERVICE_ACTION_IN_16,
    };
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const WRITE_10: u8 = 0x2a;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const WRITE_16: u8 = 0x8a;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const REPORT_LUNS: u8 = 0xa0;
}

/// The caching mode page (0x08), 20 bytes: write cache enabled, because writes land in the
/// backing file's page cache and only SYNCHRONIZE CACHE makes them durable. Saying so makes
/// the kernel send SYNCHRONIZE CACHE at the moments that matter (unmount, fsync).
const CACHING_PAGE: [u8; 20] = {
    let mut p = [0u8; 20];
    p[0] = 0x08;
    p[1] = 18;
    p[2] = 0x04; // WCE
    p
};

/// The SCSI logical unit 0 of a disk.
#[derive(Debug)]
pub struct Scsi<S> {
    storage: S,
    serial: String,
    sense: Sense,
}

impl<S: Storage> Scsi<S> {
    /// A disk on `storage`; `serial` is what VPD page 0x80 reports (ASCII).
    pub fn new(storage: S, serial: impl Into<String>) -> Self {
        Scsi {
            storage,
            serial: serial.into(),
            sense: Sense::NONE,
        }
    }

    /// The backing store.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    #[cfg(test)]
    pub(crate) fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    /// The sense data the next REQUEST SENSE would report.
    pub fn sense(&self) -> Sense {
        self.sense
    }

    /// Decodes and runs (or plans) one command for `lun`.
    pub fn execute(&mut self, lun: u8, cdb: &[u8]) -> Plan {
        let Some(&opcode) = cdb.first() else {
            return self.fail(Sense::INVALID_OPCODE);
        };
        if opcode == op::REQUEST_SENSE {
            let sense = std::mem::replace(&mut self.sense, Sense::NONE);
            let sense = if lun == 0 {
                sense
            } else {
                Sense::LUN_NOT_SUPPORTED
            };
            let alloc = cdb.get(4).copied().unwrap_or(0);
            return data_in(sense.fixed().to_vec(), alloc.into());
        }
        self.sense = Sense::NONE;
        if lun != 0 {
            return self.fail(Sense::LUN_NOT_SUPPORTED);
        }
        let result = match opcode {
            op::TEST_UNIT_READY | op::PREVENT_ALLOW_MEDIUM_REMOVAL | op::START_STOP_UNIT => {
                Ok(Plan::NoData(CommandStatus::Passed))
            }
            op::INQUIRY => self.inquiry(cdb),
            op::READ_CAPACITY_10 => Ok(self.read_capacity_10()),
            op::SERVICE_ACTION_IN_16 => self.service_action_in(cdb),
            op::MODE_SENSE_6 => mode_sense_6(cdb),
            op::MODE_SENSE_10 => mode_sense_10(cdb),
            op::READ_6 => self.rw6(cdb, false),
            op::WRITE_6 => self.rw6(cdb, true),
            op::READ_10 => self.rw(be32(cdb, 2).map(u64::from), be16(cdb, 7), false),
            op::WRITE_10 => self.rw(be32(cdb, 2).map(u64::from), be16(cdb, 7), true),
            op::READ_16 => self.rw(be64(cdb, 2), be32(cdb, 10), false),
            op::WRITE_16 => self.rw(be64(cdb, 2), be32(cdb, 10), true),
            op::VERIFY_10 => self.verify_10(cdb),
            op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => self.synchronize_cache(),
            op::REPORT_LUNS => report_luns(cdb),
            _ => Err(Sense::INVALID_OPCODE),
        };
        result.unwrap_or_else(|sense| self.fail(sense))
    }

    /// Streams the bytes of a planned READ: fills `buf` from byte `offset` of the disk.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MediumError> {
        self.storage.read_at(buf, offset).map_err(|_| {
            self.sense = Sense::UNRECOVERED_READ_ERROR;
            MediumError
        })
    }

    /// Streams the bytes of a planned WRITE: stores `data` at byte `offset` of the disk.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), MediumError> {
        self.storage.write_at(data, offset).map_err(|_| {
            self.sense = Sense::WRITE_ERROR;
            MediumError
        })
    }

    fn fail(&mut self, sense: Sense) -> Plan {
        self.sense = sense;
        Plan::NoData(CommandStatus::Failed)
    }

    /// Standard INQUIRY data, or one of the VPD pages 0x00, 0x80, 0x83.
    fn inquiry(&self, cdb: &[u8]) -> Result<Plan, Sense> {
        let (flags, page, alloc) = match cdb {
            [_, flags, page, _, _, ..] => (*flags, *page, be16(cdb, 3).unwrap_or(0)),
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        };
        let evpd = flags & 0x01 != 0;
        let data = match (evpd, page) {
            (false, 0) => {
                let mut d = vec![0u8; 36];
                d[0] = 0x00; // connected direct-access block device
                d[1] = 0x00; // not removable: a disk, so sd never polls for media
                d[2] = 0x06; // SPC-4
                d[3] = 0x02; // response data format 2
                d[4] = 36 - 5;
                d[8..16].copy_from_slice(INQUIRY_VENDOR);
                d[16..32].copy_from_slice(INQUIRY_PRODUCT);
                d[32..36].copy_from_slice(INQUIRY_REVISION);
                d
            }
            (true, 0x00) => vec![0x00, 0x00, 0x00, 3, 0x00, 0x80, 0x83],
            (true, 0x80) => {
                let serial = self.serial_bytes();
                let mut d = vec![0x00, 0x80, 0x00, serial.len() as u8];
                d.extend_from_slice(serial);
                d
            }
            (true, 0x83) => {
                // One T10 vendor-id designator: vendor then serial, ASCII, naming the LU.
                let serial = self.serial_bytes();
                let designator_len = INQUIRY_VENDOR.len() + serial.len();
                let mut d = vec![0x00, 0x83, 0x00, (4 + designator_len) as u8];
                d.extend_from_slice(&[0x02, 0x01, 0x00, designator_len as u8]);
                d.extend_from_slice(INQUIRY_VENDOR);
                d.extend_from_slice(serial);
                d
            }
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        };
        Ok(data_in(data, alloc.into()))
    }

    /// The serial as VPD carries it: ASCII, short enough for one-byte lengths.
    fn serial_bytes(&self) -> &[u8] {
        let bytes = self.serial.as_bytes();
        &bytes[..bytes.len().min(200)]
    }

    fn read_capacity_10(&self) -> Plan {
        // A disk past 2 TiB answers 0xFFFFFFFF, which sends the host to READ CAPACITY(16).
        let last = self.storage.block_count().saturating_sub(1);
        let last = u32::try_from(last).unwrap_or(u32::MAX);
        let mut d = Vec::with_capacity(8);
        d.extend_from_slice(&last.to_be_bytes());
        d.extend_from_slice(&BLOCK_SIZE.to_be_bytes());
        Plan::DataIn(d)
    }

    /// SERVICE ACTION IN(16): only READ CAPACITY(16).
    fn service_action_in(&self, cdb: &[u8]) -> Result<Plan, Sense> {
        let action = cdb.get(1).ok_or(Sense::INVALID_FIELD_IN_CDB)? & 0x1f;
        if action != op::SA_READ_CAPACITY_16 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let alloc = be32(cdb, 10).ok_or(Sense::INVALID_FIELD_IN_CDB)?;
        let mut d = vec![0u8; 32];
        let last = self.storage.block_count().saturating_sub(1);
        d[0..8].copy_from_slice(&last.to_be_bytes());
        d[8..12].copy_from_slice(&BLOCK_SIZE.to_be_bytes());
        Ok(data_in(d, alloc.into()))
    }

    /// READ(6) / WRITE(6): a 21-bit LBA, and 0 blocks meaning 256.
    fn rw6(&mut self, cdb: &[u8], write: bool) -> Result<Plan, Sense> {
        let [_, a, b, c, count, ..] = *cdb else {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        };
        let lba = u64::from(u32::from_be_bytes([0, a & 0x1f, b, c]));
        let blocks = if count == 0 { 256 } else { u32::from(count) };
        self.rw(Some(lba), Some(blocks), write)
    }

    /// READ or WRITE of `blocks` blocks from `lba`, both checked against the disk's end.
    fn rw(
        &mut self,
        lba: Option<u64>,
        blocks: Option<impl Into<u64>>,
        write: bool,
    ) -> Result<Plan, Sense> {
        let (Some(lba), Some(blocks)) = (lba, blocks) else {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        };
        let blocks: u64 = blocks.into();
        self.check_range(lba, blocks)?;
        if blocks == 0 {
            return Ok(Plan::NoData(CommandStatus::Passed));
        }
        let offset = lba * u64::from(BLOCK_SIZE);
        let len = blocks * u64::from(BLOCK_SIZE);
        Ok(if write {
            Plan::Write { offset, len }
        } else {
            Plan::Read { offset, len }
        })
    }

    /// VERIFY(10) without BYTCHK: the medium is a file, so every in-range block verifies.
    fn verify_10(&mut self, cdb: &[u8]) -> Result<Plan, Sense> {
        let flags = *cdb.get(1).ok_or(Sense::INVALID_FIELD_IN_CDB)?;
        if flags & 0x06 != 0 {
            // BYTCHK would need a data-out phase to compare against; not offered.
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let lba = be32(cdb, 2).ok_or(Sense::INVALID_FIELD_IN_CDB)?;
        let blocks = be16(cdb, 7).ok_or(Sense::INVALID_FIELD_IN_CDB)?;
        self.check_range(lba.into(), blocks.into())?;
        Ok(Plan::NoData(CommandStatus::Passed))
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        // Even a zero-block transfer must start inside the disk (SBC).
        let count = self.storage.block_count();
        match lba.checked_add(blocks) {
            Some(end) if lba < count && end <= count => Ok(()),
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }

    fn synchronize_cache(&mut self) -> Result<Plan, Sense> {
        self.storage
            .flush()
            .map(|()| Plan::NoData(CommandStatus::Passed))
            .map_err(|_| Sense::WRITE_ERROR)
    }
}

/// Mode pages for page code `page`, subpage `subpage`, page control `pc`: only the caching
/// page, alone or as "all pages".
fn mode_pages(page: u8, subpage: u8, pc: u8) -> Result<Vec<u8>, Sense> {
    if pc == 3 {
        return Err(Sense::SAVING_NOT_SUPPORTED);
    }
    if !matches!((page, subpage), (0x08, 0x00) | (0x3f, 0x00) | (0x3f, 0xff)) {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let mut caching = CACHING_PAGE;
    if pc == 1 {
        // Changeable values: nothing is.
        caching[2..].fill(0);
    }
    Ok(caching.to_vec())
}

/// MODE SENSE(6): a 4-byte header (write protect clear, no block descriptor), then pages.
fn mode_sense_6(cdb: &[u8]) -> Result<Plan, Sense> {
    let [_, _, page_byte, subpage, alloc, ..] = *cdb else {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    };
    let pages = mode_pages(page_byte & 0x3f, subpage, page_byte >> 6)?;
    let mut d = vec![(3 + pages.len()) as u8, 0x00, 0x00, 0x00];
    d.extend_from_slice(&pages);
    Ok(data_in(d, alloc.into()))
}

/// MODE SENSE(10): an 8-byte header, then pages.
fn mode_sense_10(cdb: &[u8]) -> Result<Plan, Sense> {
    let [_, _, page_byte, subpage, ..] = *cdb else {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    };
    let alloc = be16(cdb, 7).ok_or(Sense::INVALID_FIELD_IN_CDB)?;
    let pages = mode_pages(page_byte & 0x3f, subpage, page_byte >> 6)?;
    let mut d = vec![0u8; 8];
    d[0..2].copy_from_slice(&((6 + pages.len()) as u16).to_be_bytes());
    d.extend_from_slice(&pages);
    Ok(data_in(d, alloc.into()))
}

/// REPORT LUNS: the one LUN, 0.
fn report_luns(cdb: &[u8]) -> Result<Plan, Sense> {
    let alloc = be32(cdb, 6).ok_or(Sense::INVALID_FIELD_IN_CDB)?;
    let mut d = vec![0u8; 16];
    d[0..4].copy_from_slice(&8u32.to_be_bytes());
    Ok(data_in(d, alloc.into()))
}

/// A data-in plan cut to the CDB's allocation length, or no data at all if that is 0.
fn data_in(mut data: Vec<u8>, alloc: u64) -> Plan {
    data.truncate(usize::try_from(alloc).unwrap_or(usize::MAX));
    if data.is_empty() {
        Plan::NoData(CommandStatus::Passed)
    } else {
        Plan::DataIn(data)
    }
}

fn be16(cdb: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(cdb.get(at..at + 2)?.try_into().ok()?))
}

fn be32(cdb: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(cdb.get(at..at + 4)?.try_into().ok()?))
}

fn be64(cdb: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(cdb.get(at..at + 8)?.try_into().ok()?))
}

/// An in-memory [`Storage`] whose reads, writes and flushes can be made to fail.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct MemStorage {
    pub(crate) bytes: Vec<u8>,
    pub(crate) fail: bool,
    pub(crate) flushes: usize,
}

#[cfg(test)]
impl MemStorage {
    pub(crate) fn with_blocks(blocks: usize) -> Self {
        MemStorage {
            bytes: (0..blocks * BLOCK_SIZE as usize)
                .map(|i| (i / 7) as u8)
                .collect(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
impl Storage for MemStorage {
    fn block_count(&self) -> u64 {
        self.bytes.len() as u64 / u64::from(BLOCK_SIZE)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        match self.bytes.get(start..start + buf.len()) {
            Some(src) if !self.fail => {
                buf.copy_from_slice(src);
                Ok(())
            }
            _ => Err(io::Error::other("injected read failure")),
        }
    }
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        match self.bytes.get_mut(start..start + data.len()) {
            Some(dst) if !self.fail => {
                dst.copy_from_slice(data);
                Ok(())
            }
            _ => Err(io::Error::other("injected write failure")),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.fail {
            return Err(io::Error::other("injected flush failure"));
        }
        self.flushes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> Scsi<MemStorage> {
        Scsi::new(MemStorage::with_blocks(64), "53494D000001")
    }

    fn bytes(plan: Plan) -> Vec<u8> {
        match plan {
            Plan::DataIn(d) => d,
            other => panic!("expected data in, got {other:?}"),
        }
    }

    fn assert_fails(s: &mut Scsi<MemStorage>, cdb: &[u8], sense: Sense) {
        assert_eq!(
            s.execute(0, cdb),
            Plan::NoData(CommandStatus::Failed),
            "{cdb:02x?}"
        );
        assert_eq!(s.sense(), sense, "{cdb:02x?}");
    }

    #[test]
    fn test_unit_ready_and_friends_pass() {
        let mut s = disk();
        for cdb in [
            &[0x00, 0, 0, 0, 0, 0][..],
            &[0x1e, 0, 0, 0, 1, 0],
            &[0x1b, 0, 0, 0, 1, 0],
        ] {
            assert_eq!(s.execute(0, cdb), Plan::NoData(CommandStatus::Passed));
        }
    }

    #[test]
    fn standard_inquiry() {
        let d = bytes(disk().execute(0, &[0x12, 0, 0, 0, 36, 0]));
        assert_eq!(d.len(), 36);
        assert_eq!(&d[..5], &[0x00, 0x00, 0x06, 0x02, 31]);
        assert_eq!(&d[8..16], b"rustp2p ");
        assert_eq!(&d[16..32], b"Simulated Disk  ");
        assert_eq!(&d[32..36], b"0100");
        // Cut to the allocation length, as sd's first 36-byte probe and older 5-byte ones need.
        assert_eq!(bytes(disk().execute(0, &[0x12, 0, 0, 0, 5, 0])).len(), 5);
    }

    #[test]
    fn vpd_pages() {
        let mut s = disk();
        let supported = bytes(s.execute(0, &[0x12, 1, 0x00, 0, 255, 0]));
        assert_eq!(supported, [0, 0, 0, 3, 0x00, 0x80, 0x83]);
        let serial = bytes(s.execute(0, &[0x12, 1, 0x80, 0, 255, 0]));
        assert_eq!(&serial[..4], &[0, 0x80, 0, 12]);
        assert_eq!(&serial[4..], b"53494D000001");
        let id = bytes(s.execute(0, &[0x12, 1, 0x83, 0, 255, 0]));
        assert_eq!(&id[..8], &[0, 0x83, 0, 24, 0x02, 0x01, 0, 20]);
        assert_eq!(&id[8..], b"rustp2p 53494D000001");
        assert_fails(
            &mut s,
            &[0x12, 1, 0xb0, 0, 255, 0],
            Sense::INVALID_FIELD_IN_CDB,
        );
        assert_fails(
            &mut s,
            &[0x12, 0, 0x80, 0, 255, 0],
            Sense::INVALID_FIELD_IN_CDB,
        );
    }

    #[test]
    fn read_capacity_10_and_16() {
        let mut s = disk();
        let d = bytes(s.execute(0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
        assert_eq!(d, [0, 0, 0, 63, 0, 0, 2, 0]);
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10;
        cdb[13] = 32;
        let d = bytes(s.execute(0, &cdb));
        assert_eq!(d.len(), 32);
        assert_eq!(&d[..12], &[0, 0, 0, 0, 0, 0, 0, 63, 0, 0, 2, 0]);
        assert!(d[12..].iter().all(|&b| b == 0));
        cdb[1] = 0x12; // GET LBA STATUS: not offered
        assert_fails(&mut s, &cdb, Sense::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn mode_sense_6_reports_caching_and_write_enabled() {
        let mut s = disk();
        let all = bytes(s.execute(0, &[0x1a, 0, 0x3f, 0, 192, 0]));
        assert_eq!(all.len(), 24);
        assert_eq!(&all[..4], &[23, 0, 0x00, 0]); // device-specific byte: WP clear
        assert_eq!(&all[4..7], &[0x08, 18, 0x04]);
        let caching = bytes(s.execute(0, &[0x1a, 0, 0x08, 0, 192, 0]));
        assert_eq!(caching, all);
        // sd's write-protect probe asks for 4 bytes: just the header.
        assert_eq!(
            bytes(s.execute(0, &[0x1a, 0, 0x3f, 0, 4, 0])),
            [23, 0, 0, 0]
        );
        let changeable = bytes(s.execute(0, &[0x1a, 0, 0x48, 0, 192, 0]));
        assert_eq!(&changeable[4..6], &[0x08, 18]);
        assert!(changeable[6..].iter().all(|&b| b == 0));
        assert_fails(
            &mut s,
            &[0x1a, 0, 0xc8, 0, 192, 0],
            Sense::SAVING_NOT_SUPPORTED,
        );
        assert_fails(
            &mut s,
            &[0x1a, 0, 0x1c, 0, 192, 0],
            Sense::INVALID_FIELD_IN_CDB,
        );
    }

    #[test]
    fn mode_sense_10() {
        let mut s = disk();
        let d = bytes(s.execute(0, &[0x5a, 0, 0x3f, 0, 0, 0, 0, 0, 255, 0]));
        assert_eq!(d.len(), 28);
        assert_eq!(&d[..8], &[0, 26, 0, 0x00, 0, 0, 0, 0]);
        assert_eq!(&d[8..11], &[0x08, 18, 0x04]);
        assert_fails(
            &mut s,
            &[0x5a, 0, 0x08, 0xff, 0, 0, 0, 0, 255, 0],
            Sense::INVALID_FIELD_IN_CDB,
        );
    }

    #[test]
    fn read_and_write_plans() {
        let mut s = disk();
        assert_eq!(
            s.execute(0, &[0x28, 0, 0, 0, 0, 2, 0, 0, 3, 0]),
            Plan::Read {
                offset: 1024,
                len: 1536
            }
        );
        assert_eq!(
            s.execute(0, &[0x2a, 0, 0, 0, 0, 63, 0, 0, 1, 0]),
            Plan::Write {
                offset: 63 * 512,
                len: 512
            }
        );
        let mut r16 = [0u8; 16];
        r16[0] = 0x88;
        r16[9] = 10;
        r16[13] = 4;
        assert_eq!(
            s.execute(0, &r16),
            Plan::Read {
                offset: 5120,
                len: 2048
            }
        );
        r16[0] = 0x8a;
        assert_eq!(
            s.execute(0, &r16),
            Plan::Write {
                offset: 5120,
                len: 2048
            }
        );
        // READ(6) with 0 blocks means 256: past this 64-block disk's end.
        assert_fails(&mut s, &[0x08, 0, 0, 0, 0, 0], Sense::LBA_OUT_OF_RANGE);
        assert_eq!(
            s.execute(0, &[0x0a, 0, 0, 1, 2, 0]),
            Plan::Write {
                offset: 512,
                len: 1024
            }
        );
        // Zero blocks at a valid LBA: nothing to move.
        assert_eq!(
            s.execute(0, &[0x28, 0, 0, 0, 0, 2, 0, 0, 0, 0]),
            Plan::NoData(CommandStatus::Passed)
        );
    }

    #[test]
    fn out_of_range_lbas_fail() {
        let mut s = disk();
        assert_fails(
            &mut s,
            &[0x28, 0, 0, 0, 0, 63, 0, 0, 2, 0],
            Sense::LBA_OUT_OF_RANGE,
        );
        assert_fails(
            &mut s,
            &[0x2a, 0, 0, 0, 0, 64, 0, 0, 0, 0],
            Sense::LBA_OUT_OF_RANGE,
        );
        let mut r16 = [0xffu8; 16];
        r16[0] = 0x88;
        assert_fails(&mut s, &r16, Sense::LBA_OUT_OF_RANGE);
        assert_fails(
            &mut s,
            &[0x2f, 0, 0, 0, 0, 64, 0, 0, 1, 0],
            Sense::LBA_OUT_OF_RANGE,
        );
    }

    #[test]
    fn streamed_reads_and_writes_hit_storage() {
        let mut s = disk();
        s.write(512, &[0xab; 512]).unwrap();
        let mut buf = [0u8; 513];
        s.read(511, &mut buf).unwrap();
        assert_eq!(buf[0], (511 / 7) as u8);
        assert!(buf[1..].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn a_failing_backing_store_is_a_medium_error() {
        let mut s = disk();
        s.storage.fail = true;
        assert_eq!(s.read(0, &mut [0; 512]), Err(MediumError));
        assert_eq!(s.sense(), Sense::UNRECOVERED_READ_ERROR);
        assert_eq!(s.write(0, &[0; 512]), Err(MediumError));
        assert_eq!(s.sense(), Sense::WRITE_ERROR);
        assert_fails(
            &mut s,
            &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Sense::WRITE_ERROR,
        );
        s.storage.fail = false;
        assert_eq!(
            s.execute(0, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Plan::NoData(CommandStatus::Passed)
        );
        assert_eq!(s.storage.flushes, 1);
    }

    #[test]
    fn request_sense_reports_then_clears_the_last_failure() {
        let mut s = disk();
        assert_fails(&mut s, &[0xc5, 0, 0, 0, 0, 0], Sense::INVALID_OPCODE);
        let d = bytes(s.execute(0, &[0x03, 0, 0, 0, 18, 0]));
        assert_eq!(
            d,
            [
                0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0
            ]
        );
        let d = bytes(s.execute(0, &[0x03, 0, 0, 0, 18, 0]));
        assert_eq!(d[2], 0);
        assert_eq!(d[12], 0);
    }

    #[test]
    fn a_passing_command_clears_old_sense() {
        let mut s = disk();
        assert_fails(&mut s, &[0xc5], Sense::INVALID_OPCODE);
        s.execute(0, &[0x00, 0, 0, 0, 0, 0]);
        assert_eq!(s.sense(), Sense::NONE);
    }

    #[test]
    fn other_luns_are_refused() {
        let mut s = disk();
        assert_eq!(
            s.execute(1, &[0x00, 0, 0, 0, 0, 0]),
            Plan::NoData(CommandStatus::Failed)
        );
        assert_eq!(s.sense(), Sense::LUN_NOT_SUPPORTED);
        let d = bytes(s.execute(1, &[0x03, 0, 0, 0, 18, 0]));
        assert_eq!((d[2], d[12]), (0x05, 0x25));
    }

    #[test]
    fn report_luns_names_lun_0() {
        let d = bytes(disk().execute(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]));
        assert_eq!(d, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn verify_checks_the_range_only() {
        let mut s = disk();
        assert_eq!(
            s.execute(0, &[0x2f, 0, 0, 0, 0, 0, 0, 0, 64, 0]),
            Plan::NoData(CommandStatus::Passed)
        );
        assert_fails(
            &mut s,
            &[0x2f, 0x02, 0, 0, 0, 0, 0, 0, 1, 0],
            Sense::INVALID_FIELD_IN_CDB,
        );
    }

    #[test]
    fn unknown_and_truncated_commands_fail_cleanly() {
        let mut s = disk();
        assert_fails(&mut s, &[0x85, 0, 0, 0], Sense::INVALID_OPCODE); // ATA PASS-THROUGH
        assert_fails(&mut s, &[], Sense::INVALID_OPCODE);
        assert_fails(&mut s, &[0x28, 0, 0], Sense::INVALID_FIELD_IN_CDB);
        assert_fails(
            &mut s,
            &[0x88, 0, 0, 0, 0, 0, 0],
            Sense::INVALID_FIELD_IN_CDB,
        );
        assert_fails(&mut s, &[0x12, 0], Sense::INVALID_FIELD_IN_CDB);
        assert_fails(&mut s, &[0x9e], Sense::INVALID_FIELD_IN_CDB);
    }
}
