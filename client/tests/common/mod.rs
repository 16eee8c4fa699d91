//! The scripted kernel both port-session test files use: a device, USB/IP PDUs as vhci-hcd
//! sends them, and decoders for what the session answers.

#![allow(dead_code)] // each test file uses its own part

use client::vhci::{Action, PortSession};
use protocol::usb::{Direction, EndpointNumber, IsoPacket, SetupPacket, Speed, UrbStatus};
use protocol::usbip::{CmdSubmit, CmdUnlink, Pdu, PduDecoder, SubmitBuffer, Transferred};
use protocol::wire::{ClassTriple, DeviceId, DeviceInfo, UrbComplete, UrbId};

/// The first PDU vhci-hcd sent in the lab (../shared/LAB-NOTES.md): CMD_SUBMIT, seqnum 1,
/// devid 0x00010002, IN, ep 0, flags 0x200, 64 bytes, GET_DESCRIPTOR(device).
pub const KERNEL_FIRST_SUBMIT: &str = "00000001 00000001 00010002 00000001 00000000 00000200
    00000040 00000000 00000000 00000000 80060001 00004000";

pub const DEVID: u32 = 0x0001_0002;
pub const ECONNRESET: i32 = -104;

pub fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

pub fn ep(n: u8) -> EndpointNumber {
    EndpointNumber::new(n).unwrap()
}

pub fn config(value: u8, body: &[&[u8]]) -> Vec<u8> {
    let body: Vec<u8> = body.concat();
    let total = (9 + body.len()) as u16;
    let mut c = vec![9, 2, total as u8, (total >> 8) as u8, 1, value, 0, 0x80, 50];
    c.extend(body);
    c
}

/// Configuration 1: a mass-storage interface (bulk 0x81 IN, 0x02 OUT). Configuration 2:
/// interface 0 alternate 0 with interrupt 0x83 IN, alternate 1 with isochronous 0x84 IN.
pub fn device() -> DeviceInfo {
    let storage = config(
        1,
        &[
            &[9, 4, 0, 0, 2, 8, 6, 80, 0],
            &[7, 5, 0x81, 2, 0x00, 0x02, 0],
            &[7, 5, 0x02, 2, 0x00, 0x02, 0],
        ],
    );
    let other = config(
        2,
        &[
            &[9, 4, 0, 0, 1, 3, 0, 0, 0],
            &[7, 5, 0x83, 3, 8, 0, 10],
            &[9, 4, 0, 1, 1, 1, 2, 0, 0],
            &[7, 5, 0x84, 1, 0xc0, 0, 1],
        ],
    );
    DeviceInfo {
        id: DeviceId(7),
        bus_id: "1-1".into(),
        bus_number: 1,
        device_address: 2,
        vendor_id: 0x1d6b,
        product_id: 0x0104,
        bcd_device: 0x0100,
        class: ClassTriple {
            class: 0,
            subclass: 0,
            protocol: 0,
        },
        speed: Speed::High,
        manufacturer: None,
        product: None,
        serial: None,
        device_descriptor: vec![
            18, 1, 0x00, 0x02, 0, 0, 0, 64, 0x6b, 0x1d, 0x04, 0x01, 0x00, 0x01, 0, 0, 0, 2,
        ],
        configurations: vec![storage.into(), other.into()],
        active_configuration: 1,
    }
}

pub fn submit_pdu(
    seqnum: u32,
    endpoint: u8,
    buffer: SubmitBuffer,
    setup: [u8; 8],
    iso: Option<Vec<IsoPacket>>,
) -> Vec<u8> {
    let flags = match buffer {
        SubmitBuffer::In(_) => 0x200,
        SubmitBuffer::Out(_) => 0,
    };
    Pdu::CmdSubmit(CmdSubmit {
        seqnum,
        devid: DEVID,
        ep: ep(endpoint),
        transfer_flags: flags | 0x0004, // URB_NO_TRANSFER_DMA_MAP: must not be forwarded
        start_frame: 0,
        interval: 0,
        setup: SetupPacket(setup),
        buffer,
        iso,
    })
    .to_bytes()
}

pub fn unlink_pdu(seqnum: u32, target: u32) -> Vec<u8> {
    Pdu::CmdUnlink(CmdUnlink {
        seqnum,
        devid: DEVID,
        unlink_seqnum: target,
    })
    .to_bytes()
}

pub fn bulk_in(seqnum: u32, len: u32) -> Vec<u8> {
    submit_pdu(seqnum, 1, SubmitBuffer::In(len), [0; 8], None)
}

pub fn drain(session: &mut PortSession) -> Vec<Action> {
    std::iter::from_fn(|| session.poll_action()).collect()
}

pub fn kernel_bytes(actions: &[Action]) -> Vec<u8> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ToKernel(b) => Some(b.as_slice()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .concat()
}

pub fn completed_in(id: u32, data: Vec<u8>) -> UrbComplete {
    UrbComplete {
        id: UrbId(id),
        status: UrbStatus::Ok,
        actual_length: data.len() as u32,
        data,
        iso: None,
        timing: None,
    }
}

pub fn completed_with(id: u32, status: UrbStatus) -> UrbComplete {
    UrbComplete {
        id: UrbId(id),
        status,
        actual_length: 0,
        data: Vec::new(),
        iso: None,
        timing: None,
    }
}

/// Decodes what the session sent to the kernel, knowing what was submitted.
pub fn returns(bytes: &[u8], submitted: &[(u32, Direction, u32)]) -> Vec<Pdu> {
    let mut decoder = PduDecoder::returns();
    for &(seq, dir, len) in submitted {
        decoder.expect_return(seq, dir, len).unwrap();
    }
    decoder.push(bytes);
    let mut out = Vec::new();
    while let Some(pdu) = decoder.next_pdu().unwrap() {
        out.push(pdu);
    }
    decoder.finish().unwrap();
    out
}

pub fn ret_submit_of(pdu: &Pdu) -> (u32, UrbStatus, &Transferred) {
    match pdu {
        Pdu::RetSubmit(r) => (r.seqnum, r.status, &r.transferred),
        other => panic!("expected RET_SUBMIT, got {other:?}"),
    }
}

pub fn ret_unlink_of(pdu: &Pdu) -> (u32, i32) {
    match pdu {
        Pdu::RetUnlink(r) => (r.seqnum, r.status.to_errno()),
        other => panic!("expected RET_UNLINK, got {other:?}"),
    }
}

/// A CBW for `length` bytes in `direction`, as usb-storage sends it on the bulk OUT endpoint.
pub fn cbw_pdu(seqnum: u32, length: u32, direction: Direction) -> Vec<u8> {
    let read10 = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    let cbw = protocol::bot::Cbw::new(seqnum, length, direction == Direction::In, 0, &read10)
        .unwrap()
        .to_bytes()
        .to_vec();
    submit_pdu(seqnum, 2, SubmitBuffer::Out(cbw), [0; 8], None)
}

/// A bulk IN URB on 0x81 with the flags usb-storage gives it (`URB_SHORT_NOT_OK` on data).
pub fn storage_in(seqnum: u32, len: u32, short_not_ok: bool) -> Vec<u8> {
    Pdu::CmdSubmit(CmdSubmit {
        seqnum,
        devid: DEVID,
        ep: ep(1),
        transfer_flags: 0x200 | 0x0004 | u32::from(short_not_ok),
        start_frame: 0,
        interval: 0,
        setup: SetupPacket([0x55; 8]),
        buffer: SubmitBuffer::In(len),
        iso: None,
    })
    .to_bytes()
}
