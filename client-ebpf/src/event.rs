//! The events the probes send, decoded from the ring buffer's bytes.
//!
//! The layout is `struct urb_event` in `bpf/urb.bpf.c`: native-endian, 32 bytes. Decoding by
//! hand (rather than casting) keeps this crate free of `unsafe` and tolerates a short record.

/// Where on the kernel's path of a URB an event was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// usbcore handed the URB to vhci (`vhci_urb_enqueue`).
    Enqueue,
    /// vhci's tx thread built its CMD_SUBMIT, just before writing it to our socket.
    Tx,
    /// vhci's rx thread read our RET_SUBMIT header and unpacks it into the URB.
    Rx,
    /// The URB went back to the class driver (`usb_hcd_giveback_urb`).
    Giveback,
}

impl EventKind {
    /// The probe's code for this kind (`EV_*` in the C source).
    pub fn code(self) -> u32 {
        match self {
            EventKind::Enqueue => 1,
            EventKind::Tx => 2,
            EventKind::Rx => 3,
            EventKind::Giveback => 4,
        }
    }

    /// The kind with probe code `code`.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => EventKind::Enqueue,
            2 => EventKind::Tx,
            3 => EventKind::Rx,
            4 => EventKind::Giveback,
            _ => return None,
        })
    }

    /// A short lowercase name, as the client's records spell it.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Enqueue => "enqueue",
            EventKind::Tx => "tx",
            EventKind::Rx => "rx",
            EventKind::Giveback => "giveback",
        }
    }

    /// The kind called `name` (see [`EventKind::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        [
            EventKind::Enqueue,
            EventKind::Tx,
            EventKind::Rx,
            EventKind::Giveback,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }
}

/// One probe firing for one URB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrbEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC, comparable with [`crate::monotonic_ns`].
    pub ts_ns: u64,
    /// Which probe.
    pub kind: EventKind,
    /// The USB/IP seqnum vhci gave the URB.
    pub seqnum: u32,
    /// The USB/IP devid of the vhci port's device.
    pub devid: u32,
    /// `urb->pipe`: endpoint, direction and transfer type (see [`Pipe`]).
    pub pipe: u32,
    /// Requested length (enqueue, tx) or actual length (rx, giveback).
    pub length: u32,
    /// The URB's status (rx, giveback); 0 before.
    pub status: i32,
}

/// Size of `struct urb_event`.
pub const EVENT_SIZE: usize = 32;

impl UrbEvent {
    /// Decodes one ring buffer record; `None` for a short record or an unknown kind.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; EVENT_SIZE] = bytes.get(..EVENT_SIZE)?.try_into().ok()?;
        let u32_at =
            |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&bytes[..8]);
        Some(UrbEvent {
            ts_ns: u64::from_ne_bytes(ts),
            kind: EventKind::from_code(u32_at(8))?,
            seqnum: u32_at(12),
            devid: u32_at(16),
            pipe: u32_at(20),
            length: u32_at(24),
            status: u32_at(28) as i32,
        })
    }

    /// The bytes the probe would have written for this event (for tests and replay).
    pub fn encode(&self) -> [u8; EVENT_SIZE] {
        let mut out = [0u8; EVENT_SIZE];
        out[..8].copy_from_slice(&self.ts_ns.to_ne_bytes());
        for (i, v) in [
            self.kind.code(),
            self.seqnum,
            self.devid,
            self.pipe,
            self.length,
            self.status as u32,
        ]
        .into_iter()
        .enumerate()
        {
            out[8 + 4 * i..12 + 4 * i].copy_from_slice(&v.to_ne_bytes());
        }
        out
    }
}

/// The parts of a kernel `urb->pipe` (include/linux/usb.h: `usb_pipe*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pipe(pub u32);

impl Pipe {
    /// Endpoint number, 0-15.
    pub fn endpoint(self) -> u8 {
        ((self.0 >> 15) & 0xf) as u8
    }

    /// Whether data flows to the host.
    pub fn is_in(self) -> bool {
        self.0 & 0x80 != 0
    }

    /// `"iso"`, `"interrupt"`, `"control"` or `"bulk"` (PIPE_* are 0..3 in bits 30-31).
    pub fn transfer_type(self) -> &'static str {
        match self.0 >> 30 {
            0 => "iso",
            1 => "interrupt",
            2 => "control",
            _ => "bulk",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_round_trips_through_the_c_layout() {
        let e = UrbEvent {
            ts_ns: 0x0102_0304_0506_0708,
            kind: EventKind::Rx,
            seqnum: 77,
            devid: 0x0001_0002,
            pipe: 0xc000_8280,
            length: 65536,
            status: -71,
        };
        assert_eq!(UrbEvent::decode(&e.encode()), Some(e));
        assert_eq!(UrbEvent::decode(&e.encode()[..31]), None);
        let mut bad = e.encode();
        bad[8] = 9;
        assert_eq!(UrbEvent::decode(&bad), None);
    }

    #[test]
    fn pipe_fields_match_the_kernel_macros() {
        // usb_rcvbulkpipe(dev 2, ep 1) = (PIPE_BULK << 30) | (2 << 8) | (1 << 15) | USB_DIR_IN
        let p = Pipe((3 << 30) | (2 << 8) | (1 << 15) | 0x80);
        assert_eq!(
            (p.endpoint(), p.is_in(), p.transfer_type()),
            (1, true, "bulk")
        );
        let c = Pipe(2 << 30);
        assert_eq!(
            (c.endpoint(), c.is_in(), c.transfer_type()),
            (0, false, "control")
        );
    }

    #[test]
    fn kinds_have_stable_codes_and_names() {
        for k in [
            EventKind::Enqueue,
            EventKind::Tx,
            EventKind::Rx,
            EventKind::Giveback,
        ] {
            assert_eq!(EventKind::from_code(k.code()), Some(k));
            assert_eq!(EventKind::from_name(k.name()), Some(k));
        }
    }
}
