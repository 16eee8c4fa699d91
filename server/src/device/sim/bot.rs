//! The USB Mass Storage Bulk-Only Transport (BOT, "usbmassbulk_10"): the state machine between
//! the bulk endpoints' packets and the SCSI device.
//!
//! Each command is three phases: a 31-byte CBW on bulk OUT, an optional data phase in the
//! direction the CBW names, and a 13-byte CSW on bulk IN. The host and the device each have
//! their own idea of the data phase (the CBW's length and direction, the command's own), and
//! the thirteen cases of the spec's section 6.7 say what to do when they differ: send less and
//! report a residue, or stall and report a phase error. [`Bot::bulk_out`] and [`Bot::bulk_in`]
//! are one URB each; `bulk_in` answers `None` while the device has nothing to send yet, which
//! is how an IN URB submitted before its CBW waits.
//!
//! No I/O happens here except through the [`Storage`] the SCSI device owns.

pub use protocol::bot::{CBW_LEN, CSW_LEN, Cbw, Csw, CswStatus};
use protocol::usb::{Direction, MAX_TRANSFER_LEN};

use super::scsi::{CommandStatus, Plan, Scsi, Storage};

impl From<CommandStatus> for CswStatus {
    fn from(s: CommandStatus) -> Self {
        match s {
            CommandStatus::Passed => CswStatus::Passed,
            CommandStatus::Failed => CswStatus::Failed,
        }
    }
}

/// The endpoint is halted: the URB ends with a STALL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the bulk endpoint is halted")]
pub struct Halted;

/// Where a data-in phase's bytes come from.
#[derive(Debug)]
enum Source {
    /// A small response already built.
    Bytes(Vec<u8>),
    /// The disk, from this byte offset.
    Disk { offset: u64 },
}

/// A device-to-host data phase in progress.
#[derive(Debug)]
struct DataIn {
    tag: u32,
    /// What the CBW asked for.
    host_len: u32,
    /// What the device will send: never more than `host_len`.
    device_len: u32,
    sent: u32,
    source: Source,
    status: CswStatus,
}

/// A host-to-device data phase in progress.
#[derive(Debug)]
struct DataOut {
    tag: u32,
    host_len: u32,
    /// How many of the host's bytes the command takes; the rest are discarded.
    device_len: u32,
    received: u32,
    /// Bytes the command actually stored (the CSW residue is counted from it).
    processed: u32,
    /// The disk offset to write at, or `None` to discard.
    sink: Option<u64>,
    status: CswStatus,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for a CBW.
    Idle,
    In(DataIn),
    Out(DataOut),
    /// The CSW waits for a bulk IN URB.
    Status(Csw),
}

/// The Bulk-Only Transport of one device, over its SCSI logical unit.
#[derive(Debug)]
pub struct Bot<S> {
    scsi: Scsi<S>,
    phase: Phase,
    in_halted: bool,
    out_halted: bool,
    /// After an invalid CBW both endpoints stay halted, even through CLEAR_FEATURE, until a
    /// Bulk-Only Mass Storage Reset (spec 6.6.1).
    awaiting_reset: bool,
}

impl<S: Storage> Bot<S> {
    /// A transport waiting for its first CBW.
    pub fn new(scsi: Scsi<S>) -> Self {
        Bot {
            scsi,
            phase: Phase::Idle,
            in_halted: false,
            out_halted: false,
            awaiting_reset: false,
        }
    }

    /// The SCSI device behind the transport.
    pub fn scsi(&self) -> &Scsi<S> {
        &self.scsi
    }

    /// One bulk OUT URB: a CBW or data-out bytes. Returns the bytes accepted, which is less
    /// than `data.len()` only when the host sends past the length its CBW announced.
    pub fn bulk_out(&mut self, data: &[u8]) -> Result<u32, Halted> {
        if self.out_halted {
            return Err(Halted);
        }
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Idle => {
                match Cbw::parse(data) {
                    Ok(cbw) => self.phase = self.start(cbw),
                    Err(_) => self.halt_until_reset(),
                }
                Ok(len)
            }
            Phase::Out(out) => Ok(self.data_out(out, data)),
            // Bytes on OUT while the device has data or a CSW to send cannot be a valid CBW.
            Phase::In(_) | Phase::Status(_) => {
                self.halt_until_reset();
                Ok(len)
            }
        }
    }

    /// One bulk IN URB of at most `max_len` bytes: data-in bytes or the CSW. `None` while the
    /// device has nothing to send (no CBW yet, or data-out still arriving).
    pub fn bulk_in(&mut self, max_len: u32) -> Option<Result<Vec<u8>, Halted>> {
        if self.in_halted {
            return Some(Err(Halted));
        }
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            phase @ (Phase::Idle | Phase::Out(_)) => {
                self.phase = phase;
                None
            }
            Phase::In(data_in) => Some(Ok(self.data_in(data_in, max_len))),
            Phase::Status(csw) if max_len == 0 => {
                self.phase = Phase::Status(csw);
                Some(Ok(Vec::new()))
            }
            Phase::Status(csw) => {
                let bytes = csw.to_bytes();
                let n = bytes.len().min(max_len as usize);
                Some(Ok(bytes[..n].to_vec()))
            }
        }
    }

    /// Bulk-Only Mass Storage Reset: drop the command in progress and wait for a CBW. Halts
    /// stay; the host clears them next, as reset recovery prescribes.
    pub fn reset(&mut self) {
        self.phase = Phase::Idle;
        self.awaiting_reset = false;
    }

    /// SET_CONFIGURATION or SET_INTERFACE: the endpoints start over, halts and all.
    pub fn reconfigure(&mut self) {
        self.reset();
        self.in_halted = false;
        self.out_halted = false;
    }

    /// CLEAR_FEATURE(ENDPOINT_HALT) on the bulk endpoint of `direction`. Ignored while an
    /// invalid CBW awaits reset recovery.
    pub fn clear_halt(&mut self, direction: Direction) {
        if !self.awaiting_reset {
            *self.halt_flag(direction) = false;
        }
    }

    /// SET_FEATURE(ENDPOINT_HALT) on the bulk endpoint of `direction`.
    pub fn set_halt(&mut self, direction: Direction) {
        *self.halt_flag(direction) = true;
    }

    /// Whether the bulk endpoint of `direction` is halted (GET_STATUS).
    pub fn halted(&self, direction: Direction) -> bool {
        match direction {
            Direction::In => self.in_halted,
            Direction::Out => self.out_halted,
        }
    }

    fn halt_flag(&mut self, direction: Direction) -> &mut bool {
        match direction {
            Direction::In => &mut self.in_halted,
            Direction::Out => &mut self.out_halted,
        }
    }

    fn halt_until_reset(&mut self) {
        self.phase = Phase::Idle;
        self.in_halted = true;
        self.out_halted = true;
        self.awaiting_reset = true;
    }

    /// Runs a CBW's command and picks the data phase from the spec's thirteen cases.
    fn start(&mut self, cbw: Cbw) -> Phase {
        let tag = cbw.tag;
        let host_len = cbw.data_len;
        let csw = |residue, status| {
            Phase::Status(Csw {
                tag,
                residue,
                status,
            })
        };
        let plan = self.scsi.execute(cbw.lun, cbw.command());
        if host_len == 0 {
            return match plan {
                // Case 1.
                Plan::NoData(status) => csw(0, status.into()),
                // Cases 2 and 3: the command wants data the host will not move.
                _ => csw(0, CswStatus::PhaseError),
            };
        }
        let capped = |len: u64| u32::try_from(len).map_or(host_len, |l| l.min(host_len));
        let too_long = |len: u64| len > u64::from(host_len);
        if cbw.data_in {
            let (source, len, status) = match plan {
                // Case 4: a zero-length packet ends the data phase.
                Plan::NoData(status) => (Source::Bytes(Vec::new()), 0, status.into()),
                // Cases 5, 6, 7.
                Plan::DataIn(bytes) => {
                    let len = bytes.len() as u64;
                    (Source::Bytes(bytes), len, CswStatus::Passed)
                }
                Plan::Read { offset, len } => (Source::Disk { offset }, len, CswStatus::Passed),
                // Case 8: the host reads, the device would write.
                Plan::Write { .. } => {
                    self.in_halted = true;
                    return csw(host_len, CswStatus::PhaseError);
                }
            };
            Phase::In(DataIn {
                tag,
                host_len,
                device_len: capped(len),
                sent: 0,
                source,
                status: if too_long(len) {
                    CswStatus::PhaseError
                } else {
                    status
                },
            })
        } else {
            let (sink, len, status) = match plan {
                // Case 9: take the host's bytes and drop them.
                Plan::NoData(status) => (None, 0, status.into()),
                // Cases 11, 12, 13.
                Plan::Write { offset, len } => (Some(offset), len, CswStatus::Passed),
                // Case 10: the host writes, the device would read.
                Plan::DataIn(_) | Plan::Read { .. } => {
                    self.out_halted = true;
                    return csw(host_len, CswStatus::PhaseError);
                }
            };
            Phase::Out(DataOut {
                tag,
                host_len,
                device_len: capped(len),
                received: 0,
                processed: 0,
                sink,
                status: if too_long(len) {
                    CswStatus::PhaseError
                } else {
                    status
                },
            })
        }
    }

    /// Sends the next piece of a data-in phase. A piece shorter than the URB is a short packet
    /// and ends the phase; so does reaching the host's length.
    fn data_in(&mut self, mut p: DataIn, max_len: u32) -> Vec<u8> {
        let max_len = max_len.min(MAX_TRANSFER_LEN);
        let n = max_len.min(p.device_len - p.sent);
        let bytes = match &p.source {
            Source::Bytes(b) => b[p.sent as usize..(p.sent + n) as usize].to_vec(),
            Source::Disk { .. } if n == 0 => Vec::new(),
            Source::Disk { offset } => {
                let mut buf = vec![0u8; n as usize];
                match self.scsi.read(offset + u64::from(p.sent), &mut buf) {
                    Ok(()) => buf,
                    Err(_) => {
                        // Stop the phase here with a short packet; the CSW says the rest.
                        p.status = CswStatus::Failed;
                        Vec::new()
                    }
                }
            }
        };
        p.sent += bytes.len() as u32;
        let short = (bytes.len() as u32) < max_len;
        self.phase = if short || p.sent == p.host_len {
            Phase::Status(Csw {
                tag: p.tag,
                residue: p.host_len - p.sent,
                status: p.status,
            })
        } else {
            Phase::In(p)
        };
        bytes
    }

    /// Takes the next piece of a data-out phase: the command's part goes to the disk, the rest
    /// is dropped. Returns the bytes accepted.
    fn data_out(&mut self, mut p: DataOut, data: &[u8]) -> u32 {
        let take = (p.host_len - p.received).min(u32::try_from(data.len()).unwrap_or(u32::MAX));
        let for_device = take.min(p.device_len.saturating_sub(p.received));
        if let (Some(offset), true) = (p.sink, for_device > 0 && p.status != CswStatus::Failed) {
            let at = offset + u64::from(p.received);
            match self.scsi.write(at, &data[..for_device as usize]) {
                Ok(()) => p.processed += for_device,
                Err(_) => p.status = CswStatus::Failed,
            }
        }
        p.received += take;
        self.phase = if p.received == p.host_len {
            Phase::Status(Csw {
                tag: p.tag,
                residue: p.host_len - p.processed,
                status: p.status,
            })
        } else {
            Phase::Out(p)
        };
        take
    }
}

#[cfg(test)]
mod tests {
    use super::super::scsi::{MemStorage, Sense};
    use super::*;
    use protocol::bot::WrapperError;

    const TUR: &[u8] = &[0x00, 0, 0, 0, 0, 0];
    const INQUIRY_36: &[u8] = &[0x12, 0, 0, 0, 36, 0];

    fn bot() -> Bot<MemStorage> {
        Bot::new(Scsi::new(MemStorage::with_blocks(64), "53494D000001"))
    }

    fn cbw(tag: u32, len: u32, data_in: bool, cdb: &[u8]) -> Vec<u8> {
        Cbw::new(tag, len, data_in, 0, cdb)
            .unwrap()
            .to_bytes()
            .to_vec()
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

    fn send(bot: &mut Bot<MemStorage>, bytes: &[u8]) {
        assert_eq!(bot.bulk_out(bytes), Ok(bytes.len() as u32));
    }

    fn take(bot: &mut Bot<MemStorage>, max_len: u32) -> Vec<u8> {
        bot.bulk_in(max_len)
            .expect("data ready")
            .expect("not halted")
    }

    fn csw(bot: &mut Bot<MemStorage>) -> Csw {
        let b = take(bot, CSW_LEN as u32);
        Csw::parse(&b).expect("a valid CSW")
    }

    fn expect_csw(bot: &mut Bot<MemStorage>, tag: u32, residue: u32, status: CswStatus) {
        assert_eq!(
            csw(bot),
            Csw {
                tag,
                residue,
                status
            }
        );
    }

    #[test]
    fn cbw_parses() {
        let c = Cbw::parse(&cbw(0xdead_beef, 36, true, INQUIRY_36)).unwrap();
        assert_eq!(c.tag, 0xdead_beef);
        assert_eq!(c.data_len, 36);
        assert!(c.data_in);
        assert_eq!(c.lun, 0);
        assert_eq!(c.command(), INQUIRY_36);
    }

    #[test]
    fn invalid_cbws_are_refused() {
        let good = cbw(1, 0, false, TUR);
        let length = |got| {
            Err(WrapperError::Length {
                what: "CBW",
                want: 31,
                got,
            })
        };
        assert_eq!(Cbw::parse(&good[..30]), length(30));
        assert_eq!(Cbw::parse(&[good.clone(), vec![0]].concat()), length(32));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            Cbw::parse(&bad),
            Err(WrapperError::Signature { .. })
        ));
        bad = good.clone();
        bad[14] = 0;
        assert_eq!(Cbw::parse(&bad), Err(WrapperError::CommandLength(0)));
        bad[14] = 17;
        assert_eq!(Cbw::parse(&bad), Err(WrapperError::CommandLength(17)));
    }

    #[test]
    fn csw_golden_bytes() {
        let b = Csw {
            tag: 0x0403_0201,
            residue: 0x200,
            status: CswStatus::Failed,
        }
        .to_bytes();
        assert_eq!(b, [0x55, 0x53, 0x42, 0x53, 1, 2, 3, 4, 0x00, 0x02, 0, 0, 1]);
    }

    #[test]
    fn nothing_to_send_before_a_cbw() {
        let mut b = bot();
        assert!(b.bulk_in(512).is_none());
        send(&mut b, &cbw(1, 512, false, &write10(0, 1)));
        assert!(
            b.bulk_in(13).is_none(),
            "the CSW waits for the data-out phase"
        );
    }

    #[test]
    fn case_1_no_data() {
        let mut b = bot();
        send(&mut b, &cbw(7, 0, false, TUR));
        expect_csw(&mut b, 7, 0, CswStatus::Passed);
        assert!(b.bulk_in(13).is_none());
    }

    #[test]
    fn cases_2_and_3_host_expects_nothing() {
        let mut b = bot();
        send(&mut b, &cbw(2, 0, true, INQUIRY_36));
        expect_csw(&mut b, 2, 0, CswStatus::PhaseError);
        let before = b.scsi().storage().bytes.clone();
        send(&mut b, &cbw(3, 0, false, &write10(0, 1)));
        expect_csw(&mut b, 3, 0, CswStatus::PhaseError);
        assert_eq!(b.scsi().storage().bytes, before);
    }

    #[test]
    fn case_4_host_reads_device_has_nothing() {
        let mut b = bot();
        send(&mut b, &cbw(4, 512, true, TUR));
        assert_eq!(take(&mut b, 512), Vec::<u8>::new());
        expect_csw(&mut b, 4, 512, CswStatus::Passed);
        // A failing READ is the common case 4: no data, a failed CSW, then sense.
        send(&mut b, &cbw(5, 1024, true, &read10(63, 2)));
        assert_eq!(take(&mut b, 1024), Vec::<u8>::new());
        expect_csw(&mut b, 5, 1024, CswStatus::Failed);
        assert_eq!(b.scsi().sense(), Sense::LBA_OUT_OF_RANGE);
    }

    #[test]
    fn case_5_device_sends_less() {
        let mut b = bot();
        send(&mut b, &cbw(5, 64, true, INQUIRY_36));
        assert_eq!(take(&mut b, 64).len(), 36);
        expect_csw(&mut b, 5, 28, CswStatus::Passed);
    }

    #[test]
    fn case_5_on_a_packet_boundary_ends_with_a_zero_length_packet() {
        let mut b = bot();
        send(&mut b, &cbw(5, 2048, true, &read10(0, 1)));
        assert_eq!(take(&mut b, 512).len(), 512);
        assert_eq!(take(&mut b, 512), Vec::<u8>::new());
        expect_csw(&mut b, 5, 1536, CswStatus::Passed);
    }

    #[test]
    fn case_6_read_in_one_or_many_urbs() {
        let mut b = bot();
        let disk = b.scsi().storage().bytes.clone();
        send(&mut b, &cbw(6, 1024, true, &read10(1, 2)));
        assert_eq!(take(&mut b, 1024), &disk[512..1536]);
        expect_csw(&mut b, 6, 0, CswStatus::Passed);
        send(&mut b, &cbw(7, 1024, true, &read10(1, 2)));
        let mut got = take(&mut b, 512);
        got.extend(take(&mut b, 512));
        assert_eq!(got, &disk[512..1536]);
        expect_csw(&mut b, 7, 0, CswStatus::Passed);
    }

    #[test]
    fn case_7_device_has_more_than_the_host_reads() {
        let mut b = bot();
        send(&mut b, &cbw(7, 512, true, &read10(0, 2)));
        assert_eq!(take(&mut b, 512).len(), 512);
        expect_csw(&mut b, 7, 0, CswStatus::PhaseError);
    }

    #[test]
    fn case_8_host_reads_device_would_write() {
        let mut b = bot();
        let before = b.scsi().storage().bytes.clone();
        send(&mut b, &cbw(8, 512, true, &write10(0, 1)));
        assert_eq!(b.bulk_in(512), Some(Err(Halted)));
        assert!(b.halted(Direction::In));
        b.clear_halt(Direction::In);
        expect_csw(&mut b, 8, 512, CswStatus::PhaseError);
        assert_eq!(b.scsi().storage().bytes, before);
    }

    #[test]
    fn case_9_host_writes_device_wants_nothing() {
        let mut b = bot();
        send(&mut b, &cbw(9, 512, false, TUR));
        send(&mut b, &[0xee; 512]);
        expect_csw(&mut b, 9, 512, CswStatus::Passed);
    }

    #[test]
    fn case_10_host_writes_device_would_read() {
        let mut b = bot();
        send(&mut b, &cbw(10, 36, false, INQUIRY_36));
        assert_eq!(b.bulk_out(&[0; 36]), Err(Halted));
        b.clear_halt(Direction::Out);
        expect_csw(&mut b, 10, 36, CswStatus::PhaseError);
        send(&mut b, &cbw(11, 0, false, TUR));
        expect_csw(&mut b, 11, 0, CswStatus::Passed);
    }

    #[test]
    fn case_11_host_writes_more() {
        let mut b = bot();
        send(&mut b, &cbw(11, 1024, false, &write10(3, 1)));
        send(&mut b, &[0x5a; 1024]);
        expect_csw(&mut b, 11, 512, CswStatus::Passed);
        let disk = &b.scsi().storage().bytes;
        assert!(disk[3 * 512..4 * 512].iter().all(|&x| x == 0x5a));
        assert_ne!(disk[4 * 512], 0x5a);
    }

    #[test]
    fn case_12_write_in_pieces() {
        let mut b = bot();
        send(&mut b, &cbw(12, 1024, false, &write10(2, 2)));
        assert!(b.bulk_in(13).is_none());
        send(&mut b, &[1; 512]);
        send(&mut b, &[2; 512]);
        expect_csw(&mut b, 12, 0, CswStatus::Passed);
        let disk = &b.scsi().storage().bytes;
        assert!(disk[1024..1536].iter().all(|&x| x == 1));
        assert!(disk[1536..2048].iter().all(|&x| x == 2));
    }

    #[test]
    fn case_13_host_writes_less() {
        let mut b = bot();
        send(&mut b, &cbw(13, 512, false, &write10(0, 2)));
        send(&mut b, &[9; 512]);
        expect_csw(&mut b, 13, 0, CswStatus::PhaseError);
    }

    #[test]
    fn bytes_past_the_announced_length_are_not_accepted() {
        let mut b = bot();
        send(&mut b, &cbw(1, 512, false, &write10(0, 1)));
        assert_eq!(b.bulk_out(&[0; 1024]), Ok(512));
        expect_csw(&mut b, 1, 0, CswStatus::Passed);
    }

    #[test]
    fn invalid_cbw_stalls_both_until_reset_recovery() {
        let mut b = bot();
        send(&mut b, b"not a CBW");
        assert_eq!(b.bulk_in(13), Some(Err(Halted)));
        assert_eq!(b.bulk_out(&cbw(1, 0, false, TUR)), Err(Halted));
        // Clearing the halts is not enough...
        b.clear_halt(Direction::In);
        b.clear_halt(Direction::Out);
        assert_eq!(b.bulk_in(13), Some(Err(Halted)));
        // ...reset recovery is: class reset, then both clears.
        b.reset();
        assert_eq!(b.bulk_in(13), Some(Err(Halted)));
        b.clear_halt(Direction::In);
        b.clear_halt(Direction::Out);
        send(&mut b, &cbw(2, 0, false, TUR));
        expect_csw(&mut b, 2, 0, CswStatus::Passed);
    }

    #[test]
    fn out_bytes_while_the_device_sends_are_an_invalid_cbw() {
        let mut b = bot();
        send(&mut b, &cbw(1, 36, true, INQUIRY_36));
        send(&mut b, &cbw(2, 0, false, TUR));
        assert_eq!(b.bulk_in(36), Some(Err(Halted)));
        b.reconfigure();
        send(&mut b, &cbw(3, 0, false, TUR));
        expect_csw(&mut b, 3, 0, CswStatus::Passed);
    }

    #[test]
    fn reset_drops_the_command_in_progress() {
        let mut b = bot();
        send(&mut b, &cbw(1, 1024, true, &read10(0, 2)));
        take(&mut b, 512);
        b.reset();
        assert!(b.bulk_in(512).is_none());
        send(&mut b, &cbw(2, 0, false, TUR));
        expect_csw(&mut b, 2, 0, CswStatus::Passed);
    }

    #[test]
    fn a_read_failure_ends_the_data_phase_with_medium_error() {
        let mut b = bot();
        send(&mut b, &cbw(1, 2048, true, &read10(0, 4)));
        assert_eq!(take(&mut b, 512).len(), 512);
        b.scsi.storage_mut().fail = true;
        assert_eq!(take(&mut b, 1536), Vec::<u8>::new());
        expect_csw(&mut b, 1, 1536, CswStatus::Failed);
        b.scsi.storage_mut().fail = false;
        send(&mut b, &cbw(2, 18, true, &[0x03, 0, 0, 0, 18, 0]));
        let sense = take(&mut b, 18);
        assert_eq!((sense[2], sense[12]), (0x03, 0x11));
        expect_csw(&mut b, 2, 0, CswStatus::Passed);
    }

    #[test]
    fn a_write_failure_takes_the_data_and_fails_the_command() {
        let mut b = bot();
        send(&mut b, &cbw(1, 1024, false, &write10(0, 2)));
        send(&mut b, &[1; 512]);
        b.scsi.storage_mut().fail = true;
        send(&mut b, &[2; 512]);
        expect_csw(&mut b, 1, 512, CswStatus::Failed);
        assert_eq!(b.scsi().sense(), Sense::WRITE_ERROR);
    }

    #[test]
    fn a_huge_cbw_length_moves_only_what_the_command_has() {
        let mut b = bot();
        send(&mut b, &cbw(1, u32::MAX, true, &read10(0, 1)));
        assert_eq!(take(&mut b, u32::MAX).len(), 512);
        expect_csw(&mut b, 1, u32::MAX - 512, CswStatus::Passed);
    }

    #[test]
    fn in_urbs_are_capped_at_the_transfer_limit() {
        let mut b = Bot::new(Scsi::new(MemStorage::with_blocks(16 * 1024), "x"));
        let mut cdb = read10(0, 16 * 1024);
        cdb[7..9].copy_from_slice(&(16u16 * 1024).to_be_bytes());
        send(&mut b, &cbw(1, 8 << 20, true, &cdb));
        let first = take(&mut b, u32::MAX);
        assert_eq!(first.len(), MAX_TRANSFER_LEN as usize);
        assert_eq!(
            take(&mut b, MAX_TRANSFER_LEN).len(),
            MAX_TRANSFER_LEN as usize
        );
        expect_csw(&mut b, 1, 0, CswStatus::Passed);
    }

    #[test]
    fn a_zero_length_in_urb_makes_no_progress() {
        let mut b = bot();
        send(&mut b, &cbw(1, 512, true, &read10(0, 1)));
        assert_eq!(take(&mut b, 0), Vec::<u8>::new());
        assert_eq!(take(&mut b, 512).len(), 512);
        assert_eq!(take(&mut b, 0), Vec::<u8>::new());
        expect_csw(&mut b, 1, 0, CswStatus::Passed);
    }

    #[test]
    fn host_set_halt_stalls_until_cleared() {
        let mut b = bot();
        b.set_halt(Direction::Out);
        assert_eq!(b.bulk_out(&cbw(1, 0, false, TUR)), Err(Halted));
        b.clear_halt(Direction::Out);
        send(&mut b, &cbw(1, 0, false, TUR));
        expect_csw(&mut b, 1, 0, CswStatus::Passed);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Out(Vec<u8>),
            Cbw(u32, bool, Vec<u8>),
            In(u32),
            Reset,
            ClearIn,
            ClearOut,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..1100).prop_map(Op::Out),
                (
                    prop_oneof![Just(0u32), 0..4096u32, any::<u32>()],
                    any::<bool>(),
                    proptest::collection::vec(any::<u8>(), 1..=16)
                )
                    .prop_map(|(l, d, c)| Op::Cbw(l, d, c)),
                prop_oneof![Just(13u32), 0..4096u32].prop_map(Op::In),
                Just(Op::Reset),
                Just(Op::ClearIn),
                Just(Op::ClearOut),
            ]
        }

        proptest! {
            #[test]
            fn no_sequence_panics_or_oversends(ops in proptest::collection::vec(op(), 0..40)) {
                let mut b = Bot::new(Scsi::new(MemStorage::with_blocks(8), "p"));
                for op in ops {
                    match op {
                        Op::Out(d) => {
                            if let Ok(n) = b.bulk_out(&d) {
                                prop_assert!(n as usize <= d.len());
                            }
                        }
                        Op::Cbw(len, dir, cdb) => { let _ = b.bulk_out(&cbw(1, len, dir, &cdb)); }
                        Op::In(max) => {
                            if let Some(Ok(d)) = b.bulk_in(max) {
                                prop_assert!(d.len() <= max as usize);
                            }
                        }
                        Op::Reset => b.reset(),
                        Op::ClearIn => b.clear_halt(Direction::In),
                        Op::ClearOut => b.clear_halt(Direction::Out),
                    }
                }
            }

            #[test]
            fn arbitrary_cbw_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                let _ = Cbw::parse(&bytes);
                let mut b = bot();
                let _ = b.bulk_out(&bytes);
                let _ = b.bulk_in(4096);
            }
        }
    }
}
