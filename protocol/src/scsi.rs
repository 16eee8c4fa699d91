//! The few SCSI block commands the client reads inside BOT's wrappers: plain READs, which it
//! may widen to fetch what a sequential reader asks for next, and READ CAPACITY answers, which
//! say where a disk ends so a widened READ never passes it.
//!
//! Only what can be rewritten without changing the command's meaning is recognised: a READ
//! with no flags set (no FUA, DPO or protection information, group 0, control 0). Anything
//! else is `None`, and the caller leaves the command alone.

/// READ CAPACITY(10).
pub const READ_CAPACITY_10: u8 = 0x25;
/// READ(10).
pub const READ_10: u8 = 0x28;
/// READ(16).
pub const READ_16: u8 = 0x88;
/// SERVICE ACTION IN(16), whose action 0x10 is READ CAPACITY(16).
pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
/// The SERVICE ACTION IN(16) action that is READ CAPACITY(16).
pub const SA_READ_CAPACITY_16: u8 = 0x10;

/// A plain READ(10) or READ(16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    /// First logical block.
    pub lba: u64,
    /// Blocks to read.
    pub blocks: u32,
    /// READ(16) rather than READ(10).
    pub long: bool,
}

impl Read {
    /// Reads a command block as a plain READ, if it is one.
    pub fn parse(cdb: &[u8]) -> Option<Read> {
        match cdb {
            [READ_10, 0, a, b, c, d, 0, e, f, 0] => Some(Read {
                lba: u64::from(u32::from_be_bytes([*a, *b, *c, *d])),
                blocks: u32::from(u16::from_be_bytes([*e, *f])),
                long: false,
            }),
            [READ_16, 0, lba @ .., g, h, i, j, 0, 0] if lba.len() == 8 => Some(Read {
                lba: u64::from_be_bytes(lba.try_into().ok()?),
                blocks: u32::from_be_bytes([*g, *h, *i, *j]),
                long: true,
            }),
            _ => None,
        }
    }

    /// The largest block count this command's form can carry.
    pub fn max_blocks(&self) -> u32 {
        if self.long {
            u32::MAX
        } else {
            u32::from(u16::MAX)
        }
    }

    /// The command block for this READ, in its own form; `None` if the count or the address
    /// does not fit that form.
    pub fn to_cdb(&self) -> Option<Vec<u8>> {
        if self.long {
            let mut cdb = vec![READ_16, 0];
            cdb.extend_from_slice(&self.lba.to_be_bytes());
            cdb.extend_from_slice(&self.blocks.to_be_bytes());
            cdb.extend_from_slice(&[0, 0]);
            Some(cdb)
        } else {
            let lba = u32::try_from(self.lba).ok()?;
            let blocks = u16::try_from(self.blocks).ok()?;
            let mut cdb = vec![READ_10, 0];
            cdb.extend_from_slice(&lba.to_be_bytes());
            cdb.push(0);
            cdb.extend_from_slice(&blocks.to_be_bytes());
            cdb.push(0);
            Some(cdb)
        }
    }
}

/// Which READ CAPACITY a command block is, if it is one: its answer's layout differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapacityQuery {
    /// READ CAPACITY(10): 8 bytes.
    Short,
    /// READ CAPACITY(16): at least 12 bytes.
    Long,
}

impl CapacityQuery {
    /// Reads a command block as READ CAPACITY, if it is one.
    pub fn parse(cdb: &[u8]) -> Option<CapacityQuery> {
        match cdb {
            [READ_CAPACITY_10, ..] => Some(CapacityQuery::Short),
            [SERVICE_ACTION_IN_16, action, ..] if action & 0x1f == SA_READ_CAPACITY_16 => {
                Some(CapacityQuery::Long)
            }
            _ => None,
        }
    }

    /// The disk's size from the device's answer, if the answer is whole and sane.
    pub fn answer(self, data: &[u8]) -> Option<Capacity> {
        let (last_lba, size) = match (self, data) {
            (CapacityQuery::Short, [a, b, c, d, e, f, g, h]) => (
                u64::from(u32::from_be_bytes([*a, *b, *c, *d])),
                u32::from_be_bytes([*e, *f, *g, *h]),
            ),
            (CapacityQuery::Long, [lba @ .., e, f, g, h]) if lba.len() == 8 => (
                u64::from_be_bytes(lba.try_into().ok()?),
                u32::from_be_bytes([*e, *f, *g, *h]),
            ),
            (CapacityQuery::Long, d) if d.len() > 12 => return self.answer(&d[..12]),
            _ => return None,
        };
        // 0xffff_ffff from READ CAPACITY(10) means "ask READ CAPACITY(16)": not a size.
        let known = !(self == CapacityQuery::Short && last_lba == u64::from(u32::MAX));
        let sane = (512..=64 * 1024).contains(&size) && size.is_power_of_two();
        (known && sane).then(|| Capacity {
            blocks: last_lba.saturating_add(1),
            block_size: size,
        })
    }
}

/// A disk's size, as READ CAPACITY gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Logical blocks on the medium.
    pub blocks: u64,
    /// Bytes per logical block.
    pub block_size: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_with_flags_are_not_plain() {
        assert_eq!(
            Read::parse(&[0x28, 0, 0, 0, 0, 8, 0, 0, 2, 0]),
            Some(Read {
                lba: 8,
                blocks: 2,
                long: false
            })
        );
        // FUA, a group number, a control byte, a short block: left alone.
        assert_eq!(Read::parse(&[0x28, 0x08, 0, 0, 0, 8, 0, 0, 2, 0]), None);
        assert_eq!(Read::parse(&[0x28, 0, 0, 0, 0, 8, 1, 0, 2, 0]), None);
        assert_eq!(Read::parse(&[0x28, 0, 0, 0, 0, 8, 0, 0, 2, 4]), None);
        assert_eq!(Read::parse(&[0x28, 0, 0, 0, 0, 8, 0, 0, 2]), None);
        assert_eq!(Read::parse(&[0x2a, 0, 0, 0, 0, 8, 0, 0, 2, 0]), None);
    }

    #[test]
    fn read10_cannot_carry_what_does_not_fit() {
        let r = Read {
            lba: 1 << 32,
            blocks: 1,
            long: false,
        };
        assert_eq!(r.to_cdb(), None);
        let r = Read {
            lba: 0,
            blocks: 70_000,
            long: false,
        };
        assert_eq!(r.to_cdb(), None);
    }

    #[test]
    fn capacity_answers() {
        let ten = CapacityQuery::parse(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(
            ten.answer(&[0, 0, 0x0f, 0xff, 0, 0, 2, 0]),
            Some(Capacity {
                blocks: 4096,
                block_size: 512
            })
        );
        assert_eq!(ten.answer(&[0xff, 0xff, 0xff, 0xff, 0, 0, 2, 0]), None);
        assert_eq!(ten.answer(&[0, 0, 0x0f, 0xff, 0, 0, 0, 0]), None);
        assert_eq!(ten.answer(&[0, 0, 0x0f, 0xff, 0, 0, 2]), None);
        let mut cdb16 = [0u8; 16];
        cdb16[0] = 0x9e;
        cdb16[1] = 0x10;
        let sixteen = CapacityQuery::parse(&cdb16).unwrap();
        let mut answer = [0u8; 32];
        answer[..8].copy_from_slice(&(1u64 << 33).to_be_bytes());
        answer[8..12].copy_from_slice(&4096u32.to_be_bytes());
        assert_eq!(
            sixteen.answer(&answer),
            Some(Capacity {
                blocks: (1 << 33) + 1,
                block_size: 4096
            })
        );
        assert_eq!(sixteen.answer(&answer[..11]), None);
        cdb16[1] = 0x11;
        assert_eq!(CapacityQuery::parse(&cdb16), None);
    }

    proptest! {
        #[test]
        fn reads_round_trip(lba in any::<u64>(), blocks in any::<u32>(), long in any::<bool>()) {
            let r = Read { lba, blocks, long };
            match r.to_cdb() {
                Some(cdb) => prop_assert_eq!(Read::parse(&cdb), Some(r)),
                None => prop_assert!(!long),
            }
        }

        #[test]
        fn any_bytes_parse_or_not(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = Read::parse(&b);
            if let Some(q) = CapacityQuery::parse(&b) {
                let _ = q.answer(&b);
            }
        }
    }
}
