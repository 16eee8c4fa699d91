//! Sequences of operations on one URB stream, as a hostile client and a misbehaving device
//! could order them: the server's tracker must never panic, never run more than its depth on the
//! device nor hold more than the URB window, and answer every URB it accepted exactly once. The
//! same sequences through a client's `UrbWindow` must never break the window.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use protocol::usb::{Direction, EndpointNumber, TransferType, UrbStatus};
use protocol::wire::{
    AttachHandle, URB_WINDOW, UrbClientMessage, UrbComplete, UrbId, UrbServerMessage,
    UrbStreamOpen, UrbSubmit, UrbWindow,
};
use server::tracker::{DeviceAction, StreamTracker};

const DEPTH: usize = 8;

fn submit(id: u32, length: u32) -> UrbSubmit {
    UrbSubmit {
        id: UrbId(id),
        endpoint: EndpointNumber::new(1).unwrap(),
        direction: Direction::In,
        transfer_type: TransferType::Bulk,
        flags: 0,
        setup: None,
        length,
        data: Vec::new(),
        interval: 0,
        iso: None,
    }
}

fn done(id: UrbId, status: UrbStatus) -> UrbComplete {
    UrbComplete { id, status, actual_length: 0, data: Vec::new(), iso: None, timing: None }
}

fuzz_target!(|ops: Vec<(u8, u8, u16)>| {
    let open = UrbStreamOpen {
        handle: AttachHandle(1),
        endpoint: EndpointNumber::new(1).unwrap(),
        direction: Direction::In,
    };
    // A hostile client straight into the tracker.
    let mut tracker = StreamTracker::new(&open, DEPTH, true);
    let mut on_device: Vec<UrbId> = Vec::new();
    let mut accepted: HashSet<UrbId> = HashSet::new();
    let mut completed: HashSet<UrbId> = HashSet::new();
    // A compliant client through its window, on its own tracker.
    let mut window = UrbWindow::new();
    let mut clean = StreamTracker::new(&open, DEPTH, false);
    let mut clean_device: Vec<UrbId> = Vec::new();
    for (now, (op, id, len)) in ops.into_iter().enumerate() {
        let now = now as u64;
        let id32 = u32::from(id);
        let length = u32::from(len) * 1024;
        match op % 4 {
            0 => {
                if tracker.on_client(UrbClientMessage::Submit(submit(id32, length)), now).is_ok() {
                    accepted.insert(UrbId(id32));
                    completed.remove(&UrbId(id32));
                }
                window.submit(submit(id32 + 0x1_0000 * (now as u32 + 1), length));
            }
            1 => {
                let _ = tracker.on_client(UrbClientMessage::Unlink(UrbId(id32)), now);
            }
            2 if !on_device.is_empty() => {
                let i = on_device.remove(usize::from(id) % on_device.len());
                let status = if len % 2 == 0 { UrbStatus::Ok } else { UrbStatus::Stall };
                assert!(tracker.on_complete(done(i, status), now));
            }
            3 => {
                // A device completion out of order, or for something it never had (dropped).
                let running = on_device.contains(&UrbId(id32));
                on_device.retain(|i| *i != UrbId(id32));
                assert_eq!(tracker.on_complete(done(UrbId(id32), UrbStatus::Ok), now), running);
                if !clean_device.is_empty() {
                    let i = clean_device.remove(0);
                    clean.on_complete(done(i, UrbStatus::Ok), now);
                }
            }
            _ => {}
        }
        while let Some(action) = tracker.poll_action() {
            match action {
                DeviceAction::Submit(u) => on_device.push(u.id),
                DeviceAction::Cancel(c) => {
                    on_device.retain(|i| *i != c);
                    assert!(tracker.on_complete(done(c, UrbStatus::Unlinked), now));
                }
            }
        }
        assert!(on_device.len() <= DEPTH, "more than the depth on the device");
        assert!(tracker.in_flight() <= URB_WINDOW);
        while let Some(msg) = tracker.poll_message() {
            if let UrbServerMessage::Complete(c) = msg {
                assert!(completed.insert(c.id), "URB {:?} completed twice", c.id);
                assert!(accepted.contains(&c.id), "URB {:?} never accepted", c.id);
            }
        }
        // The window's frames never make its tracker find a violation.
        while let Some(msg) = window.poll_send() {
            clean.on_client(msg, now).expect("a window-keeping client is never a violation");
        }
        while let Some(action) = clean.poll_action() {
            if let DeviceAction::Submit(u) = action {
                clean_device.push(u.id);
            }
        }
        while let Some(msg) = clean.poll_message() {
            window.on_server(&msg);
        }
        while window.poll_answer().is_some() {}
    }
});
