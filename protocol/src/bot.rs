//! The USB Mass Storage Bulk-Only Transport's two wrappers ("usbmassbulk_10" §5): the 31-byte
//! Command Block Wrapper a host sends on bulk OUT and the 13-byte Command Status Wrapper the
//! device answers on bulk IN. The client's read-ahead reads CBWs to know what the kernel will
//! ask next, its probe writes them, and the server's simulated disk answers them; all three
//! use these, so the byte layout is written once.

/// Length of a Command Block Wrapper.
pub const CBW_LEN: usize = 31;
/// Length of a Command Status Wrapper.
pub const CSW_LEN: usize = 13;
/// `dCBWSignature`, "USBC" little-endian.
const CBW_SIGNATURE: u32 = 0x4342_5355;
/// `dCSWSignature`, "USBS" little-endian.
const CSW_SIGNATURE: u32 = 0x5342_5355;
/// The mass-storage interface class (`bInterfaceClass`).
pub const CLASS_MASS_STORAGE: u8 = 0x08;
/// The SCSI transparent command set (`bInterfaceSubClass`), what nearly every USB disk speaks.
pub const SUBCLASS_SCSI: u8 = 0x06;
/// The Bulk-Only transport's interface protocol (`bInterfaceProtocol`), as opposed to UAS's.
pub const PROTOCOL_BULK_ONLY: u8 = 0x50;
/// Bulk-Only Mass Storage Reset (class request to the interface, §3.1).
pub const MASS_STORAGE_RESET: u8 = 0xff;
/// Get Max LUN (class request to the interface, §3.2).
pub const GET_MAX_LUN: u8 = 0xfe;
/// `bmCBWFlags` bit 7: the data phase is device to host.
const FLAG_IN: u8 = 0x80;

/// Why bytes are not a valid CBW (§6.2.1) or CSW (§6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WrapperError {
    /// Not exactly 31 (CBW) or 13 (CSW) bytes.
    #[error("a {what} is {want} bytes, got {got}")]
    Length {
        /// `CBW` or `CSW`.
        what: &'static str,
        /// Its length.
        want: usize,
        /// What arrived.
        got: usize,
    },
    /// Wrong signature.
    #[error("bad {what} signature {found:#010x}")]
    Signature {
        /// `CBW` or `CSW`.
        what: &'static str,
        /// What was there.
        found: u32,
    },
    /// `bCBWCBLength` outside 1..=16.
    #[error("CBW command block length {0} is outside 1..=16")]
    CommandLength(u8),
    /// `bCSWStatus` other than 0, 1, 2.
    #[error("CSW status {0} is not passed, failed or phase error")]
    Status(u8),
}

/// A Command Block Wrapper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cbw {
    /// `dCBWTag`, echoed in the CSW.
    pub tag: u32,
    /// `dCBWDataTransferLength`: the bytes the host expects to move.
    pub data_len: u32,
    /// `bmCBWFlags` bit 7: the data phase is device to host.
    pub data_in: bool,
    /// `bCBWLUN`.
    pub lun: u8,
    cb_len: u8,
    cb: [u8; 16],
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Cbw {
    /// A CBW carrying `command` (1 to 16 bytes).
    pub fn new(
        tag: u32,
        data_len: u32,
        data_in: bool,
        lun: u8,
        command: &[u8],
    ) -> Result<Cbw, WrapperError> {
        let cb_len = u8::try_from(command.len()).unwrap_or(u8::MAX);
        if !(1..=16).contains(&cb_len) {
            return Err(WrapperError::CommandLength(cb_len));
        }
        let mut cb = [0u8; 16];
        cb[..command.len()].copy_from_slice(command);
        Ok(Cbw {
            tag,
            data_len,
            data_in,
            lun: lun & 0x0f,
            cb_len,
            cb,
        })
    }

    /// Parses and validates a CBW.
    pub fn parse(bytes: &[u8]) -> Result<Cbw, WrapperError> {
        let b: &[u8; CBW_LEN] = bytes.try_into().map_err(|_| WrapperError::Length {
            what: "CBW",
            want: CBW_LEN,
            got: bytes.len(),
        })?;
        let signature = le32(b, 0);
        if signature != CBW_SIGNATURE {
            return Err(WrapperError::Signature {
                what: "CBW",
                found: signature,
            });
        }
        let cb_len = b[14] & 0x1f;
        if !(1..=16).contains(&cb_len) {
            return Err(WrapperError::CommandLength(cb_len));
        }
        let mut cb = [0u8; 16];
        cb.copy_from_slice(&b[15..31]);
        Ok(Cbw {
            tag: le32(b, 4),
            data_len: le32(b, 8),
            data_in: b[12] & FLAG_IN != 0,
            lun: b[13] & 0x0f,
            cb_len,
            cb,
        })
    }

    /// The SCSI command block, `bCBWCBLength` bytes.
    pub fn command(&self) -> &[u8] {
        &self.cb[..usize::from(self.cb_len)]
    }

    /// The bytes of an IN data phase, if the CBW asks for one.
    pub fn data_in_len(&self) -> Option<u32> {
        (self.data_in && self.data_len > 0).then_some(self.data_len)
    }

    /// The 31 bytes on the wire.
    pub fn to_bytes(&self) -> [u8; CBW_LEN] {
        let mut b = [0u8; CBW_LEN];
        b[0..4].copy_from_slice(&CBW_SIGNATURE.to_le_bytes());
        b[4..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..12].copy_from_slice(&self.data_len.to_le_bytes());
        b[12] = if self.data_in { FLAG_IN } else { 0 };
        b[13] = self.lun;
        b[14] = self.cb_len;
        b[15..31].copy_from_slice(&self.cb);
        b
    }
}

/// `bCSWStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CswStatus {
    /// Command passed.
    Passed = 0,
    /// Command failed; the host asks REQUEST SENSE next.
    Failed = 1,
    /// Host and device disagreed about the data phase; the host does reset recovery.
    PhaseError = 2,
}

/// A Command Status Wrapper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Csw {
    /// The CBW's tag.
    pub tag: u32,
    /// `dCSWDataResidue`: expected minus processed bytes.
    pub residue: u32,
    /// `bCSWStatus`.
    pub status: CswStatus,
}

impl Csw {
    /// Parses and validates a CSW.
    pub fn parse(bytes: &[u8]) -> Result<Csw, WrapperError> {
        let b: &[u8; CSW_LEN] = bytes.try_into().map_err(|_| WrapperError::Length {
            what: "CSW",
            want: CSW_LEN,
            got: bytes.len(),
        })?;
        let signature = le32(b, 0);
        if signature != CSW_SIGNATURE {
            return Err(WrapperError::Signature {
                what: "CSW",
                found: signature,
            });
        }
        let status = match b[12] {
            0 => CswStatus::Passed,
            1 => CswStatus::Failed,
            2 => CswStatus::PhaseError,
            other => return Err(WrapperError::Status(other)),
        };
        Ok(Csw {
            tag: le32(b, 4),
            residue: le32(b, 8),
            status,
        })
    }

    /// The 13 bytes on the wire.
    pub fn to_bytes(self) -> [u8; CSW_LEN] {
        let mut b = [0u8; CSW_LEN];
        b[0..4].copy_from_slice(&CSW_SIGNATURE.to_le_bytes());
        b[4..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..12].copy_from_slice(&self.residue.to_le_bytes());
        b[12] = self.status as u8;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_read10_cbw_has_the_spec_layout() {
        let read10 = [0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0];
        let b = Cbw::new(7, 512, true, 0, &read10).unwrap().to_bytes();
        assert_eq!(&b[..4], b"USBC");
        assert_eq!(b[4..8], 7u32.to_le_bytes());
        assert_eq!(b[8..12], 512u32.to_le_bytes());
        assert_eq!((b[12], b[13], b[14]), (0x80, 0, 10));
        assert_eq!(&b[15..25], &read10);
        let c = Cbw::parse(&b).unwrap();
        assert_eq!(c.command(), &read10);
        assert_eq!(c.data_in_len(), Some(512));
        assert_eq!(
            Cbw::new(1, 512, false, 0, &read10).unwrap().data_in_len(),
            None
        );
        assert_eq!(
            Cbw::new(1, 0, true, 0, &read10).unwrap().data_in_len(),
            None
        );
    }

    #[test]
    fn bad_wrappers_are_typed_errors() {
        let good = Cbw::new(1, 0, false, 0, &[0]).unwrap().to_bytes();
        assert_eq!(
            Cbw::parse(&good[..30]),
            Err(WrapperError::Length {
                what: "CBW",
                want: 31,
                got: 30
            })
        );
        let mut bad = good;
        bad[0] = b'X';
        assert!(matches!(
            Cbw::parse(&bad),
            Err(WrapperError::Signature { what: "CBW", .. })
        ));
        let mut bad = good;
        bad[14] = 0;
        assert_eq!(Cbw::parse(&bad), Err(WrapperError::CommandLength(0)));
        assert_eq!(
            Cbw::new(1, 0, false, 0, &[0; 17]),
            Err(WrapperError::CommandLength(17))
        );
        assert_eq!(
            Cbw::new(1, 0, false, 0, &[]),
            Err(WrapperError::CommandLength(0))
        );
        let csw = Csw {
            tag: 9,
            residue: 3,
            status: CswStatus::Failed,
        };
        let mut bad = csw.to_bytes();
        assert_eq!(&bad[..4], b"USBS");
        bad[12] = 3;
        assert_eq!(Csw::parse(&bad), Err(WrapperError::Status(3)));
        assert!(Csw::parse(&bad[..12]).is_err());
    }

    proptest! {
        #[test]
        fn cbws_round_trip(
            tag in any::<u32>(), len in any::<u32>(), data_in in any::<bool>(),
            lun in 0u8..16, cb in proptest::collection::vec(any::<u8>(), 1..=16),
        ) {
            let c = Cbw::new(tag, len, data_in, lun, &cb).unwrap();
            prop_assert_eq!(Cbw::parse(&c.to_bytes()), Ok(c));
        }

        #[test]
        fn csws_round_trip(tag in any::<u32>(), residue in any::<u32>(), s in 0u8..3) {
            let status = [CswStatus::Passed, CswStatus::Failed, CswStatus::PhaseError][usize::from(s)];
            let c = Csw { tag, residue, status };
            prop_assert_eq!(Csw::parse(&c.to_bytes()), Ok(c));
        }

        #[test]
        fn any_bytes_parse_or_err(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = Cbw::parse(&b);
            let _ = Csw::parse(&b);
        }
    }
}
