//! The usbfs calls nusb does not make: isochronous URBs, and the claims, alternate settings
//! and control transfers of the interfaces that carry them. Every `unsafe` block of the server
//! is in this file.
//!
//! This is a second open file of the device node, apart from nusb's: usbfs gives each open
//! file its own claims and its own completion queue, so nusb never reaps a URB submitted here
//! and this never reaps one of nusb's. Memory handed to the kernel is only read or written
//! inside the submit and reap calls (usbfs copies OUT data in at submit and results out at
//! reap), so a URB's buffers live in [`InFlight`] until it is reaped or the file is closed.
//! Closing the file releases its claims.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use libc::{c_int, c_uint, c_ulong, c_void};

use crate::device::iso::ChunkResult;

/// `USBDEVFS_URB_TYPE_ISO`.
const URB_TYPE_ISO: u8 = 0;
/// `USBDEVFS_URB_ISO_ASAP`: start at the next free frame.
const URB_ISO_ASAP: c_uint = 0x02;

/// `struct usbdevfs_urb` (without its trailing packet descriptors).
#[repr(C)]
#[derive(Default)]
struct UrbHeader {
    kind: u8,
    endpoint: u8,
    status: c_int,
    flags: c_uint,
    buffer: usize,
    buffer_length: c_int,
    actual_length: c_int,
    start_frame: c_int,
    number_of_packets: c_int,
    error_count: c_int,
    signr: c_uint,
    usercontext: usize,
}

/// `struct usbdevfs_iso_packet_desc`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PacketDesc {
    length: c_uint,
    actual_length: c_uint,
    status: c_uint,
}

/// `struct usbdevfs_urb` with its packet descriptors, laid out as the kernel reads it.
#[repr(C)]
struct IsoUrb<const N: usize> {
    header: UrbHeader,
    packets: [PacketDesc; N],
}

/// The largest iso URB usbfs takes.
const MAX_PACKETS: usize = 128;

/// `struct usbdevfs_ctrltransfer`.
#[repr(C)]
struct CtrlTransfer {
    request_type: u8,
    request: u8,
    value: u16,
    index: u16,
    length: u16,
    timeout_ms: u32,
    data: *mut c_void,
}

/// `struct usbdevfs_setinterface`.
#[repr(C)]
struct SetInterface {
    interface: c_uint,
    alt: c_uint,
}

/// `struct usbdevfs_disconnect_claim`.
#[repr(C)]
struct DisconnectClaim {
    interface: c_uint,
    flags: c_uint,
    driver: [u8; 256],
}

/// Linux's `_IOC` encoding on the architectures we build for (x86, arm, aarch64, riscv).
const fn ioc(dir: c_ulong, nr: c_ulong, size: usize) -> c_ulong {
    (dir << 30) | ((size as c_ulong) << 16) | ((b'U' as c_ulong) << 8) | nr
}
const WRITE: c_ulong = 1;
const READ: c_ulong = 2;
const CONTROL: c_ulong = ioc(READ | WRITE, 0, size_of::<CtrlTransfer>());
const SETINTERFACE: c_ulong = ioc(READ, 4, size_of::<SetInterface>());
const SUBMITURB: c_ulong = ioc(READ, 10, size_of::<UrbHeader>());
const DISCARDURB: c_ulong = ioc(0, 11, 0);
const REAPURBNDELAY: c_ulong = ioc(WRITE, 13, size_of::<usize>());
const DISCONNECT_CLAIM: c_ulong = ioc(READ, 27, size_of::<DisconnectClaim>());

/// An iso URB the kernel holds: its descriptor block and buffer, kept until reaped.
struct InFlight {
    urb: Box<IsoUrb<MAX_PACKETS>>,
    buffer: Vec<u8>,
    packets: usize,
    tag: u64,
}

/// A URB's key for [`RawDevice::discard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UrbKey(usize);

/// A second open file of a device node: claims, alternate settings and control transfers,
/// which any thread may run (they block).
#[derive(Clone)]
pub struct RawFile(Arc<File>);

/// The iso URBs of a [`RawFile`]: submitted, discarded and reaped by one owner at a time.
pub struct RawDevice {
    file: RawFile,
    in_flight: HashMap<usize, InFlight>,
}

/// `ioctl` returning the OS error.
fn check(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl RawFile {
    /// Opens `/dev/bus/usb/BBB/DDD`.
    pub fn open(bus: u8, address: u8) -> io::Result<RawFile> {
        let path = format!("/dev/bus/usb/{bus:03}/{address:03}");
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(RawFile(Arc::new(file)))
    }

    fn fd(&self) -> c_int {
        self.0.as_raw_fd()
    }

    /// Detaches any kernel driver from `interface` and claims it for this file.
    pub fn claim(&self, interface: u8) -> io::Result<()> {
        let mut arg = DisconnectClaim {
            interface: interface.into(),
            flags: 0,
            driver: [0; 256],
        };
        // SAFETY: `arg` is a valid `usbdevfs_disconnect_claim` that outlives the call.
        check(unsafe { libc::ioctl(self.fd(), DISCONNECT_CLAIM, &mut arg) }).map(drop)
    }

    /// SET_INTERFACE through usbfs, which also ends the URBs of the old setting's endpoints.
    /// Blocking.
    pub fn set_interface(&self, interface: u8, alt: u8) -> io::Result<()> {
        let mut arg = SetInterface {
            interface: interface.into(),
            alt: alt.into(),
        };
        // SAFETY: `arg` is a valid `usbdevfs_setinterface` that outlives the call.
        check(unsafe { libc::ioctl(self.fd(), SETINTERFACE, &mut arg) }).map(drop)
    }

    /// A control transfer on endpoint 0; `data` is the OUT data or the IN buffer. The bytes
    /// moved. Blocking, up to `timeout`.
    pub fn control(&self, setup: [u8; 8], data: &mut [u8], timeout: Duration) -> io::Result<usize> {
        let length = u16::from_le_bytes([setup[6], setup[7]]).min(data.len() as u16);
        let mut arg = CtrlTransfer {
            request_type: setup[0],
            request: setup[1],
            value: u16::from_le_bytes([setup[2], setup[3]]),
            index: u16::from_le_bytes([setup[4], setup[5]]),
            length,
            timeout_ms: timeout.as_millis().min(u32::MAX.into()) as u32,
            data: data.as_mut_ptr().cast(),
        };
        // SAFETY: `arg.data` points at `data`, at least `arg.length` bytes, borrowed mutably
        // for the whole call; `arg` outlives it.
        check(unsafe { libc::ioctl(self.fd(), CONTROL, &mut arg) }).map(|n| n as usize)
    }

    /// Waits up to `timeout` for a completion to reap, or the device to go.
    pub fn wait(&self, timeout: Duration) {
        let mut fds = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as c_int;
        // SAFETY: one valid `pollfd` for the duration of the call.
        let _ = unsafe { libc::poll(&mut fds, 1, ms) };
    }
}

impl RawDevice {
    /// The iso side of `file`.
    pub fn new(file: RawFile) -> RawDevice {
        RawDevice {
            file,
            in_flight: HashMap::new(),
        }
    }

    fn fd(&self) -> c_int {
        self.file.fd()
    }

    /// Submits an iso URB on endpoint `address` with packets of `lengths` (at most 128) and
    /// `buffer` (OUT data packed, or room for IN data), to start as soon as possible.
    pub fn submit_iso(
        &mut self,
        address: u8,
        lengths: &[u32],
        mut buffer: Vec<u8>,
        tag: u64,
    ) -> io::Result<UrbKey> {
        if lengths.is_empty() || lengths.len() > MAX_PACKETS || buffer.len() > i32::MAX as usize {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut urb = Box::new(IsoUrb {
            header: UrbHeader::default(),
            packets: [PacketDesc::default(); MAX_PACKETS],
        });
        for (desc, &length) in urb.packets.iter_mut().zip(lengths) {
            desc.length = length;
        }
        urb.header = UrbHeader {
            kind: URB_TYPE_ISO,
            endpoint: address,
            flags: URB_ISO_ASAP,
            buffer: buffer.as_mut_ptr() as usize,
            buffer_length: buffer.len() as c_int,
            number_of_packets: lengths.len() as c_int,
            usercontext: tag as usize,
            ..UrbHeader::default()
        };
        let key = &mut *urb as *mut IsoUrb<MAX_PACKETS> as usize;
        // SAFETY: `urb` is a `usbdevfs_urb` followed by `number_of_packets` descriptors, and
        // `header.buffer` points at `buffer`, `buffer_length` bytes; usbfs reads both only
        // during this call. Both stay alive in `in_flight` (a Box and a Vec do not move their
        // heap memory) until the reap that writes the results back.
        check(unsafe { libc::ioctl(self.fd(), SUBMITURB, key as *mut c_void) })?;
        self.in_flight.insert(
            key,
            InFlight {
                urb,
                buffer,
                packets: lengths.len(),
                tag,
            },
        );
        Ok(UrbKey(key))
    }

    /// Asks usbfs to end a URB early; it is reaped later with `-ECONNRESET`. A URB that
    /// already finished is not affected.
    pub fn discard(&self, key: UrbKey) {
        if self.in_flight.contains_key(&key.0) {
            // SAFETY: DISCARDURB only compares the pointer with those of this file's URBs;
            // it reads no memory through it.
            let _ = unsafe { libc::ioctl(self.fd(), DISCARDURB, key.0 as *mut c_void) };
        }
    }

    /// URBs submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// One finished URB, if any, with the tag it was submitted with: `Ok(None)` when none is
    /// ready, `Err` (`ENODEV`) when the device is gone and everything it completed has been
    /// reaped.
    pub fn reap(&mut self) -> io::Result<Option<(u64, ChunkResult)>> {
        let mut out: usize = 0;
        // SAFETY: usbfs writes one pointer into `out`, and copies the results (header
        // fields, packet descriptors and IN data) into the memory of the URB it names, which
        // is one of ours, still alive in `in_flight`.
        let ret = unsafe { libc::ioctl(self.fd(), REAPURBNDELAY, &mut out as *mut usize) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(None),
                _ => Err(e),
            };
        }
        let Some(done) = self.in_flight.remove(&out) else {
            // Not ours: cannot happen with a file of our own; nothing to hand back.
            return Ok(None);
        };
        let h = &done.urb.header;
        let result = ChunkResult {
            status: h.status,
            start_frame: h.start_frame,
            packets: done.urb.packets[..done.packets]
                .iter()
                .map(|p| (p.actual_length, p.status as i32))
                .collect(),
            buffer: done.buffer,
        };
        Ok(Some((done.tag, result)))
    }

    /// Forgets the URBs still held (the device is gone or will not give them back); the
    /// kernel no longer touches their memory once no reap is asked for.
    pub fn abandon(&mut self) {
        self.in_flight.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request numbers are the kernel's for 64-bit builds (`linux/usbdevice_fs.h`).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn ioctl_numbers_match_the_kernels() {
        assert_eq!(SUBMITURB, 0x8038_550a);
        assert_eq!(REAPURBNDELAY, 0x4008_550d);
        assert_eq!(DISCARDURB, 0x550b);
        assert_eq!(CONTROL, 0xc018_5500);
        assert_eq!(SETINTERFACE, 0x8008_5504);
        assert_eq!(DISCONNECT_CLAIM, 0x8108_551b);
        assert_eq!(size_of::<UrbHeader>(), 56);
        assert_eq!(size_of::<PacketDesc>(), 12);
    }

    #[test]
    fn a_missing_node_is_an_error() {
        assert!(RawFile::open(255, 255).is_err());
    }
}
