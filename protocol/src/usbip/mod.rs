//! The USB/IP wire protocol as the kernel speaks it (`drivers/usb/usbip/usbip_common.h`,
//! `vhci_tx.c`, `vhci_rx.c`, `stub_rx.c`, `stub_tx.c`; userspace `usbip_network.h`).
//!
//! Two phases share one byte stream. A standard `usbip` client first sends OP_* requests
//! ([`op`]); after a successful import, or from the first byte on vhci's socketpair, the stream
//! carries 48-byte URB headers with their payloads ([`urb`]). Both decoders are incremental:
//! push any split of the stream, pull whole messages, and get a typed error (never a panic, never
//! an allocation past the bounds in [`crate::usb`]) for bytes no kernel would send.

pub mod op;
pub mod urb;

pub use op::{OpDecoder, OpError, OpMessage};
pub use urb::{
    CmdSubmit, CmdUnlink, Pdu, PduDecoder, RetSubmit, RetUnlink, SubmitBuffer, Transferred,
    UrbError,
};

/// Big-endian field access on a fully buffered fixed-size record.
///
/// Callers only index fixed offsets inside arrays whose size the type system knows, so the
/// slices below never go out of range.
pub(crate) mod be {
    pub fn u16_at<const N: usize>(b: &[u8; N], at: usize) -> u16 {
        u16::from_be_bytes([b[at], b[at + 1]])
    }
    pub fn u32_at<const N: usize>(b: &[u8; N], at: usize) -> u32 {
        u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }
    pub fn i32_at<const N: usize>(b: &[u8; N], at: usize) -> i32 {
        u32_at(b, at) as i32
    }
}
