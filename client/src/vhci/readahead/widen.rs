//! Widened sequential reads: one device command, one round trip, for several of the kernel's.
//!
//! vhci hands usb-storage at most 32 scatter-gather segments per URB, so a sequential reader
//! whose pages are scattered gets READs of 128 KiB however large `max_sectors` is, and each
//! of them costs the link a round trip. When a READ continues the one before it, this sends
//! the device one READ of the same start for as many whole multiples of it as the client's
//! command limit allows (never past the disk's end, as READ CAPACITY gave it), hands the
//! kernel its own part and keeps the rest. The kernel's next READs that start exactly where
//! the kept data starts are answered here, CBW, data and CSW, without the device. A READ that
//! starts there but runs past the kept data takes what is kept as its first part, and the
//! device reads only the rest, widened again: how contiguous the reader's pages are changes
//! its READs' lengths from one to the next (128 KiB to 1 MiB), and dropping the kept data
//! there read whole stretches of the disk twice (up to a third of the bytes a sequential read
//! moved in the lab's bench).
//!
//! Correct by construction where it matters: the kept data is the device's answer to a READ
//! that passed (its CSW says so, with no residue), and it is dropped by any other command, by
//! a READ elsewhere, and by a reset, so a write can never leave stale data here (BOT runs one
//! command at a time: nothing reaches the device between the widened READ and the kernel's
//! next CBW). A widened READ that does not pass whole costs the kernel one transport error
//! instead of the device's answer (`-EPROTO` on its next URB of the command): usb-storage
//! resets the device and the SCSI layer retries the READ, which then goes as the kernel wrote
//! it, because widening stays off for the port after any failure. So the kernel never sees a
//! SCSI error about blocks it did not ask for.

use std::collections::HashMap;

use protocol::bot::{self, Csw, CswStatus};
use protocol::scsi::{Capacity, CapacityQuery, Read};
use protocol::usb::UrbStatus;
use protocol::wire::UrbComplete;

/// What to do with a CBW.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Send it as it is. `capacity` says the command is a READ CAPACITY on that LUN, whose
    /// answer is worth reading.
    AsIs {
        /// The LUN and the form of a READ CAPACITY.
        capacity: Option<(u8, CapacityQuery)>,
    },
    /// Send these bytes instead: a READ for `length` bytes, from the kernel's start or from
    /// where the data kept for it ends, that covers the rest of the kernel's READ; its data
    /// URB gets the kept part and then the first of these bytes, its own length in all.
    Widened {
        /// The widened CBW.
        cbw: [u8; bot::CBW_LEN],
        /// The widened data phase.
        length: u32,
    },
    /// Answered here: the kernel's data URB gets `data`, its CSW URB `csw`.
    Served {
        /// The blocks it asked for.
        data: Vec<u8>,
        /// A passed CSW with its tag.
        csw: [u8; bot::CSW_LEN],
    },
}

/// Counters for the log and the lab.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WidenStats {
    /// READs sent widened.
    pub widened: u64,
    /// Kernel READs answered from a widened READ's data.
    pub served: u64,
    /// Kernel READs answered partly from a widened READ's data, the rest read widened anew.
    pub joined: u64,
    /// Widened READs that did not pass whole (widening is off after the first).
    pub failed: u64,
}

/// A widened READ on the device.
#[derive(Debug)]
struct Running {
    /// The ids of its data and CSW reads, once queued: a late result of an older one is not
    /// this READ's.
    ids: Option<(u32, u32)>,
    tag: u32,
    lun: u8,
    /// Where the kernel's own READ ends: the kept data starts there.
    kept_lba: u64,
    block_size: u32,
    kernel_length: u32,
    length: u32,
    /// The first part of the kernel's data, from data kept before, with room for the rest.
    prefix: Vec<u8>,
    /// How long that part is: the kernel takes the rest from the start of this READ's data.
    prefix_len: usize,
    /// The whole data phase, once it has come back whole: the kernel's part is a copy, so
    /// the larger rest is not copied again.
    kept: Option<Vec<u8>>,
}

/// Data a passed widened READ brought beyond the kernel's part.
#[derive(Debug)]
struct Kept {
    lun: u8,
    /// The block `data[at]` holds.
    lba: u64,
    block_size: u32,
    data: Vec<u8>,
    at: usize,
}

/// Widening on one BOT interface (one IN endpoint).
#[derive(Debug, Default)]
pub struct Widen {
    /// A widened READ failed: widening stays off on this interface.
    off: bool,
    capacity: HashMap<u8, Capacity>,
    /// The LUN and block right after the kernel's last READ: a READ there is sequential.
    next: Option<(u8, u64)>,
    running: Option<Running>,
    kept: Option<Kept>,
    stats: WidenStats,
}

impl Widen {
    /// The counters so far.
    pub fn stats(&self) -> WidenStats {
        self.stats
    }

    /// The kernel sent `cbw`: send it as it is, widened to at most `limit` bytes (0: never),
    /// or not at all.
    pub fn plan(&mut self, cbw: &bot::Cbw, limit: u32) -> Plan {
        let kept = self.kept.take();
        self.running = None;
        let read = if cbw.data_in {
            Read::parse(cbw.command())
        } else {
            None
        };
        let Some(read) = read else {
            self.next = None;
            let capacity = cbw
                .data_in
                .then(|| CapacityQuery::parse(cbw.command()))
                .flatten()
                .map(|q| (cbw.lun, q));
            return Plan::AsIs { capacity };
        };
        let sequential = self.next == Some((cbw.lun, read.lba));
        self.next = read
            .lba
            .checked_add(u64::from(read.blocks))
            .map(|end| (cbw.lun, end));
        let Some(capacity) = self.capacity.get(&cbw.lun).copied() else {
            return Plan::AsIs { capacity: None };
        };
        let length = u64::from(read.blocks) * u64::from(capacity.block_size);
        if read.blocks == 0 || length != u64::from(cbw.data_len) {
            // Not the block size we know: leave the command alone.
            return Plan::AsIs { capacity: None };
        }
        let kept = kept.filter(|k| {
            k.lun == cbw.lun && k.lba == read.lba && k.block_size == capacity.block_size
        });
        let (whole, kept) = match kept {
            Some(k) if k.data.len() - k.at >= cbw.data_len as usize => (Some(k), None),
            part => (None, part),
        };
        if let Some(mut kept) = whole {
            let end = kept.at + cbw.data_len as usize;
            let data = kept.data[kept.at..end].to_vec();
            kept.at = end;
            kept.lba += u64::from(read.blocks);
            if kept.at < kept.data.len() {
                self.kept = Some(kept);
            }
            self.stats.served += 1;
            let csw = Csw {
                tag: cbw.tag,
                residue: 0,
                status: CswStatus::Passed,
            };
            return Plan::Served {
                data,
                csw: csw.to_bytes(),
            };
        }
        if !sequential || limit == 0 || self.off {
            return Plan::AsIs { capacity: None };
        }
        let block_size = u64::from(capacity.block_size);
        // Blocks one command may read from `start`: the limit, the disk's end, the READ's form.
        let most_from = |start: u64| {
            (u64::from(limit) / block_size)
                .min(capacity.blocks.saturating_sub(start))
                .min(u64::from(read.max_blocks()))
        };
        let (start, blocks, prefix) = match kept {
            // The kept blocks start the kernel's READ: the device reads from their end, as much
            // as one command may carry.
            Some(kept) => {
                let kept_blocks = (kept.data.len() - kept.at) as u64 / block_size;
                let start = read.lba + kept_blocks;
                let most = most_from(start);
                if most < u64::from(read.blocks) - kept_blocks {
                    return Plan::AsIs { capacity: None };
                }
                let mut prefix = Vec::with_capacity(cbw.data_len as usize);
                prefix.extend_from_slice(&kept.data[kept.at..]);
                (start, most, prefix)
            }
            // Whole multiples of the kernel's READ: a reader whose READs keep one length is
            // then always served whole.
            None => {
                let multiple = most_from(read.lba) / u64::from(read.blocks);
                if multiple < 2 {
                    return Plan::AsIs { capacity: None };
                }
                (read.lba, multiple * u64::from(read.blocks), Vec::new())
            }
        };
        let wide = Read {
            lba: start,
            blocks: blocks as u32,
            ..read
        };
        let length = blocks * block_size;
        let (Some(cdb), Ok(length)) = (wide.to_cdb(), u32::try_from(length)) else {
            return Plan::AsIs { capacity: None };
        };
        let Ok(widened) = bot::Cbw::new(cbw.tag, length, true, cbw.lun, &cdb) else {
            return Plan::AsIs { capacity: None };
        };
        self.running = Some(Running {
            ids: None,
            tag: cbw.tag,
            lun: cbw.lun,
            kept_lba: read.lba + u64::from(read.blocks),
            block_size: capacity.block_size,
            kernel_length: cbw.data_len,
            length,
            prefix_len: prefix.len(),
            prefix,
            kept: None,
        });
        Plan::Widened {
            cbw: widened.to_bytes(),
            length,
        }
    }

    /// The widened READ planned last goes with its data read `data` and CSW read `csw`: it is
    /// sent, and counted.
    pub fn bind(&mut self, data: u32, csw: u32) {
        if let Some(running) = &mut self.running {
            running.ids = Some((data, csw));
            self.stats.widened += 1;
            if running.prefix_len > 0 {
                self.stats.joined += 1;
            }
        }
    }

    /// The widened READ planned last could not be read ahead: it goes as the kernel sent it.
    pub fn abandon(&mut self) {
        self.running = None;
    }

    /// The device answered READ CAPACITY on `lun`.
    pub fn on_capacity(&mut self, lun: u8, query: CapacityQuery, c: &UrbComplete) {
        if c.status != UrbStatus::Ok {
            return;
        }
        match query.answer(&c.data) {
            Some(capacity) => {
                self.capacity.insert(lun, capacity);
            }
            None => {
                self.capacity.remove(&lun);
            }
        }
    }

    /// A widened READ's data phase came back: the kernel's part, or a transport error.
    pub fn on_data(&mut self, mut c: UrbComplete) -> UrbComplete {
        let Some(running) = self
            .running
            .as_mut()
            .filter(|r| r.ids.is_some_and(|(data, _)| data == c.id.0))
        else {
            return c;
        };
        if c.status == UrbStatus::Ok && c.data.len() == running.length as usize {
            let whole = std::mem::take(&mut c.data);
            let mut data = std::mem::take(&mut running.prefix);
            data.extend_from_slice(&whole[..running.kernel_length as usize - running.prefix_len]);
            c.data = data;
            c.actual_length = running.kernel_length;
            running.kept = Some(whole);
            return c;
        }
        self.failed(c)
    }

    /// A widened READ's CSW came back: passed whole, the rest of its data is kept.
    pub fn on_csw(&mut self, c: UrbComplete) -> UrbComplete {
        let ours = |r: &Running| r.ids.is_some_and(|(_, csw)| csw == c.id.0);
        let Some(mut running) = self.running.take_if(|r| ours(r)) else {
            return c;
        };
        let passed = Csw {
            tag: running.tag,
            residue: 0,
            status: CswStatus::Passed,
        };
        let whole = c.status == UrbStatus::Ok && Csw::parse(&c.data) == Ok(passed);
        match running.kept.take() {
            Some(data) if whole => {
                self.kept = Some(Kept {
                    lun: running.lun,
                    lba: running.kept_lba,
                    block_size: running.block_size,
                    data,
                    at: running.kernel_length as usize - running.prefix_len,
                });
                c
            }
            _ => self.failed(c),
        }
    }

    /// usb-storage's reset recovery (or another control request): nothing kept survives it.
    pub fn on_control(&mut self) {
        self.running = None;
        self.kept = None;
        self.next = None;
    }

    /// Turns widening off for good and tells the kernel's URB of transport trouble, unless
    /// the URB ended for a reason of its own (unlinked, or the device is gone).
    fn failed(&mut self, mut c: UrbComplete) -> UrbComplete {
        self.running = None;
        self.kept = None;
        self.stats.failed += 1;
        if !self.off {
            tracing::warn!(
                status = ?c.status,
                "a widened READ did not pass whole: the kernel retries it as it sent it, and \
                 reads are no longer widened on this port"
            );
            self.off = true;
        }
        if !matches!(
            c.status,
            UrbStatus::Unlinked | UrbStatus::Killed | UrbStatus::NoDevice
        ) {
            c.status = UrbStatus::Protocol;
            c.data.clear();
            c.actual_length = 0;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::done as done_as;
    use super::*;

    const BS: u32 = 512;
    const LIMIT: u32 = 64 * 1024;

    fn read_cbw(tag: u32, lba: u32, blocks: u16) -> bot::Cbw {
        let cdb = Read {
            lba: u64::from(lba),
            blocks: u32::from(blocks),
            long: false,
        }
        .to_cdb()
        .unwrap();
        bot::Cbw::new(tag, u32::from(blocks) * BS, true, 0, &cdb).unwrap()
    }

    const DATA_ID: u32 = 101;
    const CSW_ID: u32 = 102;

    fn done(status: UrbStatus, data: Vec<u8>) -> UrbComplete {
        done_as(DATA_ID, status, data)
    }

    /// The CSW read's result.
    fn csw_done(status: UrbStatus, data: Vec<u8>) -> UrbComplete {
        done_as(CSW_ID, status, data)
    }

    /// Widening that knows a disk of `blocks` blocks.
    fn knowing(blocks: u32) -> Widen {
        let limit = LIMIT;
        let mut w = Widen::default();
        let cbw = bot::Cbw::new(1, 8, true, 0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        let Plan::AsIs {
            capacity: Some((lun, query)),
        } = w.plan(&cbw, limit)
        else {
            panic!("READ CAPACITY not seen");
        };
        let mut answer = (blocks - 1).to_be_bytes().to_vec();
        answer.extend_from_slice(&BS.to_be_bytes());
        w.on_capacity(lun, query, &done(UrbStatus::Ok, answer));
        w
    }

    /// Plans `cbw`, binding a widened READ to the test's ids as read-ahead would.
    fn plan(w: &mut Widen, cbw: &bot::Cbw) -> Plan {
        let plan = w.plan(cbw, LIMIT);
        if matches!(plan, Plan::Widened { .. }) {
            w.bind(DATA_ID, CSW_ID);
        }
        plan
    }

    fn block_bytes(first: u32, blocks: u32) -> Vec<u8> {
        (first..first + blocks)
            .flat_map(|b| [b as u8; BS as usize])
            .collect()
    }

    fn csw(tag: u32, residue: u32, status: CswStatus) -> Vec<u8> {
        Csw {
            tag,
            residue,
            status,
        }
        .to_bytes()
        .to_vec()
    }

    /// Runs a widened READ of `blocks` from `lba` on a device that answers it whole.
    fn widened_passes(w: &mut Widen, tag: u32, lba: u32, kernel_blocks: u16) -> Vec<u8> {
        let Plan::Widened { cbw, length } = plan(w, &read_cbw(tag, lba, kernel_blocks)) else {
            panic!("not widened");
        };
        let sent = bot::Cbw::parse(&cbw).unwrap();
        let read = Read::parse(sent.command()).unwrap();
        assert_eq!(
            (read.lba, sent.data_len, sent.tag),
            (u64::from(lba), length, tag)
        );
        let data = w.on_data(done(UrbStatus::Ok, block_bytes(lba, read.blocks)));
        assert_eq!(data.status, UrbStatus::Ok);
        let got = w.on_csw(csw_done(UrbStatus::Ok, csw(tag, 0, CswStatus::Passed)));
        assert_eq!(got.data, csw(tag, 0, CswStatus::Passed));
        data.data
    }

    #[test]
    fn a_sequential_reader_is_served_from_one_widened_read() {
        let mut w = knowing(10_000);
        // The first READ goes as it is: nothing says the next will follow it.
        assert_eq!(
            plan(&mut w, &read_cbw(1, 0, 16)),
            Plan::AsIs { capacity: None }
        );
        // The second is sequential: widened to 64 KiB (8 of the kernel's 8 KiB READs).
        let first = widened_passes(&mut w, 2, 16, 16);
        assert_eq!(first, block_bytes(16, 16));
        for (i, tag) in (3..10).enumerate() {
            let lba = 32 + 16 * i as u32;
            let Plan::Served { data, csw: got } = plan(&mut w, &read_cbw(tag, lba, 16)) else {
                panic!("READ {tag} not served");
            };
            assert_eq!(data, block_bytes(lba, 16));
            assert_eq!(got.to_vec(), csw(tag, 0, CswStatus::Passed));
        }
        // All seven kept READs used up: the next is widened again.
        widened_passes(&mut w, 10, 144, 16);
        assert_eq!(
            w.stats(),
            WidenStats {
                widened: 2,
                served: 7,
                joined: 0,
                failed: 0
            }
        );
    }

    #[test]
    fn another_command_drops_what_was_kept() {
        let mut w = knowing(10_000);
        plan(&mut w, &read_cbw(1, 0, 16));
        widened_passes(&mut w, 2, 16, 16);
        // A write (or anything else) in between: the kept blocks may be stale.
        let write = bot::Cbw::new(3, BS, false, 0, &[0x2a, 0, 0, 0, 0, 40, 0, 0, 1, 0]).unwrap();
        assert_eq!(plan(&mut w, &write), Plan::AsIs { capacity: None });
        assert_eq!(
            plan(&mut w, &read_cbw(4, 32, 16)),
            Plan::AsIs { capacity: None }
        );
        // A reset too.
        let mut w = knowing(10_000);
        plan(&mut w, &read_cbw(1, 0, 16));
        widened_passes(&mut w, 2, 16, 16);
        w.on_control();
        assert_eq!(
            plan(&mut w, &read_cbw(3, 32, 16)),
            Plan::AsIs { capacity: None }
        );
    }

    #[test]
    fn a_read_elsewhere_goes_to_the_device_and_one_longer_than_kept_starts_with_it() {
        let mut w = knowing(10_000);
        plan(&mut w, &read_cbw(1, 0, 16));
        widened_passes(&mut w, 2, 16, 16);
        assert_eq!(
            plan(&mut w, &read_cbw(3, 33, 16)),
            Plan::AsIs { capacity: None }
        );
        let mut w = knowing(10_000);
        plan(&mut w, &read_cbw(1, 0, 64));
        // Widened to 128 blocks: 64 kept, which a READ of 40 fits and the next of 30 does not.
        let Plan::Widened { length, .. } = plan(&mut w, &read_cbw(2, 64, 64)) else {
            panic!()
        };
        assert_eq!(length, 128 * BS);
        w.on_data(done(UrbStatus::Ok, block_bytes(64, 128)));
        w.on_csw(csw_done(UrbStatus::Ok, csw(2, 0, CswStatus::Passed)));
        assert!(matches!(
            plan(&mut w, &read_cbw(3, 128, 40)),
            Plan::Served { .. }
        ));
        // 24 blocks left, 30 asked: the kernel gets those 24, and the device reads from their
        // end as much as one command carries, the kernel's last 6 blocks first.
        let Plan::Widened { cbw, length } = plan(&mut w, &read_cbw(4, 168, 30)) else {
            panic!()
        };
        let sent = bot::Cbw::parse(&cbw).unwrap();
        assert_eq!(
            (Read::parse(sent.command()).unwrap().lba, length, sent.tag),
            (192, 128 * BS, 4)
        );
        let data = w.on_data(done(UrbStatus::Ok, block_bytes(192, 128)));
        assert_eq!(
            (data.status, data.data),
            (UrbStatus::Ok, block_bytes(168, 30))
        );
        w.on_csw(csw_done(UrbStatus::Ok, csw(4, 0, CswStatus::Passed)));
        // The rest of that READ is kept in turn.
        let Plan::Served { data, .. } = plan(&mut w, &read_cbw(5, 198, 100)) else {
            panic!("not served")
        };
        assert_eq!(data, block_bytes(198, 100));
        assert_eq!((w.stats().joined, w.stats().served), (1, 2));
        // Not past the disk's end: a READ that the disk cannot hold goes as it is.
        let mut w = knowing(200);
        plan(&mut w, &read_cbw(1, 0, 64));
        widened_passes(&mut w, 2, 64, 64);
        assert_eq!(
            plan(&mut w, &read_cbw(3, 128, 80)),
            Plan::AsIs { capacity: None }
        );
    }

    #[test]
    fn never_past_the_disk_end_nor_without_its_size() {
        let mut w = Widen::default();
        plan(&mut w, &read_cbw(1, 0, 16));
        assert_eq!(
            plan(&mut w, &read_cbw(2, 16, 16)),
            Plan::AsIs { capacity: None }
        );
        // 64 blocks: from 32 on only two READs of 16 are left.
        let mut w = knowing(64);
        plan(&mut w, &read_cbw(1, 16, 16));
        let Plan::Widened { length, .. } = plan(&mut w, &read_cbw(2, 32, 16)) else {
            panic!()
        };
        assert_eq!(length, 32 * BS);
        let mut w = knowing(64);
        plan(&mut w, &read_cbw(1, 32, 16));
        assert_eq!(
            plan(&mut w, &read_cbw(2, 48, 16)),
            Plan::AsIs { capacity: None }
        );
    }

    #[test]
    fn a_widened_read_that_fails_is_a_transport_error_and_widening_stops() {
        for (data_status, csw_bytes) in [
            (UrbStatus::Stall, None),
            (UrbStatus::Ok, Some(csw(2, 0, CswStatus::Failed))),
            (UrbStatus::Ok, Some(csw(2, 512, CswStatus::Passed))),
            (UrbStatus::Ok, Some(csw(9, 0, CswStatus::Passed))),
        ] {
            let mut w = knowing(10_000);
            plan(&mut w, &read_cbw(1, 0, 16));
            assert!(matches!(
                plan(&mut w, &read_cbw(2, 16, 16)),
                Plan::Widened { .. }
            ));
            let data = w.on_data(done(data_status, block_bytes(16, 128)));
            match csw_bytes {
                None => assert_eq!((data.status, data.actual_length), (UrbStatus::Protocol, 0)),
                Some(bytes) => {
                    assert_eq!(data.status, UrbStatus::Ok);
                    assert_eq!(data.data.len(), 16 * BS as usize);
                    let got = w.on_csw(csw_done(UrbStatus::Ok, bytes));
                    assert_eq!(got.status, UrbStatus::Protocol);
                }
            }
            assert_eq!(w.stats().failed, 1);
            // The kernel's retry goes as it is, and so does everything after.
            assert_eq!(
                plan(&mut w, &read_cbw(3, 16, 16)),
                Plan::AsIs { capacity: None }
            );
            assert_eq!(
                plan(&mut w, &read_cbw(4, 32, 16)),
                Plan::AsIs { capacity: None }
            );
        }
    }

    #[test]
    fn read16_is_widened_in_its_own_form_and_luns_keep_apart() {
        let mut w = knowing(10_000);
        let read16 = |tag: u32, lba: u64, lun: u8| {
            let cdb = Read {
                lba,
                blocks: 16,
                long: true,
            }
            .to_cdb()
            .unwrap();
            bot::Cbw::new(tag, 16 * BS, true, lun, &cdb).unwrap()
        };
        plan(&mut w, &read16(1, 0, 0));
        let Plan::Widened { cbw, length } = plan(&mut w, &read16(2, 16, 0)) else {
            panic!("not widened")
        };
        let sent = bot::Cbw::parse(&cbw).unwrap();
        assert_eq!(sent.command().len(), 16);
        assert_eq!(
            Read::parse(sent.command()),
            Some(Read {
                lba: 16,
                blocks: 128,
                long: true
            })
        );
        w.on_data(done(UrbStatus::Ok, block_bytes(16, 128)));
        w.on_csw(csw_done(UrbStatus::Ok, csw(2, 0, CswStatus::Passed)));
        // The same blocks on another LUN are another disk's (whose size is not known here).
        assert_eq!(
            plan(&mut w, &read16(3, 32, 1)),
            Plan::AsIs { capacity: None }
        );
        assert_eq!(length, 128 * BS);
    }

    #[test]
    fn a_short_data_phase_is_not_kept() {
        let mut w = knowing(10_000);
        plan(&mut w, &read_cbw(1, 0, 16));
        plan(&mut w, &read_cbw(2, 16, 16));
        let data = w.on_data(done(UrbStatus::Ok, block_bytes(16, 100)));
        assert_eq!(data.status, UrbStatus::Protocol);
        // An unlink or a gone device keeps its own status.
        let mut w = knowing(10_000);
        plan(&mut w, &read_cbw(1, 0, 16));
        plan(&mut w, &read_cbw(2, 16, 16));
        let data = w.on_data(done(UrbStatus::NoDevice, Vec::new()));
        assert_eq!(data.status, UrbStatus::NoDevice);
    }

    #[test]
    fn reads_with_a_block_size_not_known_are_left_alone() {
        let mut w = knowing(10_000);
        plan(&mut w, &read_cbw(1, 0, 16));
        let odd = bot::Cbw::new(2, 16 * 4096, true, 0, read_cbw(2, 16, 16).command()).unwrap();
        assert_eq!(plan(&mut w, &odd), Plan::AsIs { capacity: None });
        // Nor with widening off.
        let mut w = knowing(10_000);
        w.plan(&read_cbw(1, 0, 16), 0);
        assert_eq!(
            w.plan(&read_cbw(2, 16, 16), 0),
            Plan::AsIs { capacity: None }
        );
    }

    /// What the model disk's device is asked, step by step.
    #[derive(Debug, Clone)]
    enum Step {
        /// A READ that continues the last one (or starts at `lba` if none), `blocks` long.
        Next(u16),
        /// A READ anywhere.
        Read(u32, u16),
        /// A WRITE, which changes what the blocks hold.
        Write(u32, u16),
        /// A WRITE this many blocks past the end of the last READ: where kept data would be.
        WriteAhead(u32, u16),
        /// A command without data (TEST UNIT READY).
        Other,
        /// usb-storage's reset recovery.
        Reset,
        /// The device fails the next READ it is sent.
        FailNext,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (1u16..96).prop_map(Step::Next),
            1 => (0u32..DISK, 1u16..96).prop_map(|(l, b)| Step::Read(l, b)),
            1 => (0u32..DISK, 1u16..16).prop_map(|(l, b)| Step::Write(l, b)),
            2 => (0u32..64, 1u16..16).prop_map(|(l, b)| Step::WriteAhead(l, b)),
            1 => Just(Step::Other),
            1 => Just(Step::Reset),
            1 => Just(Step::FailNext),
        ]
    }

    const DISK: u32 = 2048;

    /// A disk whose blocks change with every write: each holds its number and its version.
    struct Disk {
        versions: Vec<u8>,
    }

    impl Disk {
        fn read(&self, lba: u64, blocks: u32) -> Vec<u8> {
            (lba..lba + u64::from(blocks))
                .flat_map(|b| {
                    let mut block = [b as u8; BS as usize];
                    block[1] = self.versions[b as usize];
                    block
                })
                .collect()
        }
    }

    proptest::proptest! {
        /// Whatever the kernel sends, a READ answered here holds what the disk holds now,
        /// widened READs stay on the disk and start where the kernel's did, and after a failure
        /// nothing is widened or served again.
        #[test]
        fn a_read_answered_here_is_what_the_disk_holds(
            steps in proptest::collection::vec(step(), 1..120),
        ) {
            let mut w = knowing(DISK);
            let mut disk = Disk { versions: vec![0; DISK as usize] };
            let (mut tag, mut next, mut fail_next, mut failed) = (10u32, 0u32, false, false);
            for step in steps {
                tag += 1;
                let (lba, blocks) = match step {
                    Step::Next(blocks) => (next, blocks),
                    Step::Read(lba, blocks) => (lba, blocks),
                    Step::Write(..) | Step::WriteAhead(..) => {
                        let (lba, blocks) = match step {
                            Step::WriteAhead(ahead, blocks) => ((next + ahead).min(DISK - 1), blocks),
                            Step::Write(lba, blocks) => (lba, blocks),
                            _ => unreachable!(),
                        };
                        let blocks = u32::from(blocks).min(DISK - lba);
                        let cdb = [0x2a, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                        let cbw = bot::Cbw::new(tag, blocks * BS, false, 0, &cdb).unwrap();
                        proptest::prop_assert_eq!(w.plan(&cbw, LIMIT), Plan::AsIs { capacity: None });
                        for b in lba..lba + blocks {
                            disk.versions[b as usize] = disk.versions[b as usize].wrapping_add(1);
                        }
                        continue;
                    }
                    Step::Other => {
                        let cbw = bot::Cbw::new(tag, 0, false, 0, &[0; 6]).unwrap();
                        proptest::prop_assert_eq!(w.plan(&cbw, LIMIT), Plan::AsIs { capacity: None });
                        continue;
                    }
                    Step::Reset => {
                        w.on_control();
                        continue;
                    }
                    Step::FailNext => {
                        fail_next = true;
                        continue;
                    }
                };
                if lba >= DISK {
                    next = 0;
                    continue;
                }
                let blocks = u32::from(blocks).min(DISK - lba);
                next = lba + blocks;
                match plan(&mut w, &read_cbw(tag, lba, blocks as u16)) {
                    Plan::AsIs { capacity } => proptest::prop_assert_eq!(capacity, None),
                    Plan::Served { data, csw: got } => {
                        proptest::prop_assert!(!failed, "served after a failure");
                        proptest::prop_assert_eq!(data, disk.read(u64::from(lba), blocks));
                        proptest::prop_assert_eq!(got.to_vec(), csw(tag, 0, CswStatus::Passed));
                    }
                    Plan::Widened { cbw, length } => {
                        proptest::prop_assert!(!failed, "widened after a failure");
                        let sent = bot::Cbw::parse(&cbw).unwrap();
                        let read = Read::parse(sent.command()).unwrap();
                        // From the kernel's start, or from where the kept blocks it takes first
                        // end; to past the kernel's end, and never past the disk's.
                        let (first, end) = (u64::from(lba), u64::from(lba + blocks));
                        proptest::prop_assert!(read.lba >= first && read.lba < end);
                        proptest::prop_assert!(read.lba + u64::from(read.blocks) >= end);
                        proptest::prop_assert!(read.lba + u64::from(read.blocks) <= u64::from(DISK));
                        proptest::prop_assert!(length <= LIMIT && length == read.blocks * BS);
                        if read.lba == first {
                            proptest::prop_assert_eq!(read.blocks % blocks, 0);
                        }
                        let data = w.on_data(done(UrbStatus::Ok, disk.read(read.lba, read.blocks)));
                        proptest::prop_assert_eq!(data.data, disk.read(u64::from(lba), blocks));
                        let status = if fail_next { CswStatus::Failed } else { CswStatus::Passed };
                        let got = w.on_csw(csw_done(UrbStatus::Ok, csw(tag, 0, status)));
                        if fail_next {
                            proptest::prop_assert_eq!(got.status, UrbStatus::Protocol);
                            failed = true;
                        } else {
                            proptest::prop_assert_eq!(got.status, UrbStatus::Ok);
                        }
                        fail_next = false;
                    }
                }
            }
        }
    }
}
