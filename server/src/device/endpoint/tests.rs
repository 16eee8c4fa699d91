//! The endpoint worker against a scripted endpoint: what a device can do to it (short, long and
//! stalled transfers, unplugs) and what a driver does (unlinks, clearing a halt, many URBs queued).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Duration;

use nusb::transfer::{Buffer, Completion, TransferError};
use protocol::usb::{Direction, EndpointNumber, TransferType, UrbStatus, transfer_flags};
use protocol::wire::{UrbComplete, UrbId, UrbSubmit};
use tokio::sync::mpsc;

use super::{EndpointIo, EpCmd, HaltError, run_endpoint};

/// One transfer the worker handed to the "device".
struct Slot {
    buffer: Buffer,
    result: Option<(Result<(), TransferError>, Vec<u8>)>,
}

#[derive(Default)]
struct DeviceState {
    slots: VecDeque<Slot>,
    /// Every submission, in order: requested IN length or OUT bytes.
    log: Vec<(usize, Vec<u8>)>,
    cancels: usize,
    halts_cleared: usize,
    halt_answer: Option<fn() -> HaltError>,
    waker: Option<Waker>,
}

/// The test's handle on the scripted device.
#[derive(Clone)]
struct Device(Arc<Mutex<DeviceState>>);

impl Device {
    fn state(&self) -> std::sync::MutexGuard<'_, DeviceState> {
        self.0.lock().unwrap()
    }

    /// The device ends the `n`th transfer still running (0 = oldest).
    fn finish(&self, n: usize, status: Result<(), TransferError>, data: &[u8]) {
        let mut st = self.state();
        let slot = st
            .slots
            .iter_mut()
            .filter(|s| s.result.is_none())
            .nth(n)
            .expect("no such running transfer");
        slot.result = Some((status, data.to_vec()));
        if let Some(w) = st.waker.take() {
            w.wake();
        }
    }

    fn running(&self) -> usize {
        self.state()
            .slots
            .iter()
            .filter(|s| s.result.is_none())
            .count()
    }
}

struct Scripted {
    address: u8,
    device: Device,
}

impl EndpointIo for Scripted {
    fn address(&self) -> u8 {
        self.address
    }
    fn max_packet_size(&self) -> usize {
        512
    }
    fn pending(&self) -> usize {
        self.device.state().slots.len()
    }
    fn submit(&mut self, buffer: Buffer) {
        let mut st = self.device.state();
        let out = if self.address & 0x80 == 0 {
            buffer.to_vec()
        } else {
            Vec::new()
        };
        st.log.push((buffer.requested_len(), out));
        st.slots.push_back(Slot {
            buffer,
            result: None,
        });
    }
    fn cancel_all(&mut self) {
        let mut st = self.device.state();
        st.cancels += 1;
        for s in st.slots.iter_mut().filter(|s| s.result.is_none()) {
            s.result = Some((Err(TransferError::Cancelled), Vec::new()));
        }
        if let Some(w) = st.waker.take() {
            w.wake();
        }
    }
    fn poll_next_complete(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Completion> {
        let mut st = self.device.state();
        if st.slots.front().is_some_and(|s| s.result.is_some()) {
            let slot = st.slots.pop_front().unwrap();
            let (status, data) = slot.result.unwrap();
            let mut buffer = slot.buffer;
            let actual_len = if self.address & 0x80 != 0 {
                buffer.clear();
                buffer.extend_from_slice(&data);
                data.len()
            } else if status.is_ok() {
                buffer.len()
            } else {
                0
            };
            return std::task::Poll::Ready(Completion {
                buffer,
                actual_len,
                status,
            });
        }
        st.waker = Some(cx.waker().clone());
        std::task::Poll::Pending
    }
    fn clear_halt(
        &mut self,
    ) -> impl std::future::Future<Output = Result<(), HaltError>> + Send + 'static {
        let device = self.device.clone();
        async move {
            // Like usbfs's ioctl: a blocking call, on the blocking pool.
            let answer = tokio::task::spawn_blocking(move || {
                let mut st = device.state();
                assert_eq!(
                    st.slots.len(),
                    0,
                    "a halt is cleared with the endpoint idle"
                );
                st.halts_cleared += 1;
                st.halt_answer
            })
            .await
            .unwrap();
            match answer {
                Some(error) => Err(error()),
                None => Ok(()),
            }
        }
    }
}

struct Harness {
    device: Device,
    tx: mpsc::UnboundedSender<EpCmd>,
    done_tx: mpsc::UnboundedSender<UrbComplete>,
    done: mpsc::UnboundedReceiver<UrbComplete>,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn new(address: u8) -> Harness {
        let device = Device(Arc::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done) = mpsc::unbounded_channel();
        let ep = Scripted {
            address,
            device: device.clone(),
        };
        let task = tokio::spawn(run_endpoint(ep, rx, Arc::default()));
        Harness {
            device,
            tx,
            done_tx,
            done,
            task,
        }
    }

    fn submit(&self, id: u32, length: u32, data: Vec<u8>, flags: u32) {
        let direction = if data.is_empty() && length > 0 {
            Direction::In
        } else {
            Direction::Out
        };
        let urb = UrbSubmit {
            id: UrbId(id),
            endpoint: EndpointNumber::new(1).unwrap(),
            direction,
            transfer_type: TransferType::Bulk,
            flags,
            setup: None,
            length,
            data,
            interval: 0,
            iso: None,
        };
        self.tx
            .send(EpCmd::Submit(urb, self.done_tx.clone()))
            .ok()
            .unwrap();
    }

    fn command(&self, cmd: EpCmd) {
        self.tx.send(cmd).ok().unwrap();
    }

    /// Lets the worker run until it waits again.
    async fn settle(&self) {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    async fn next(&mut self) -> UrbComplete {
        tokio::time::timeout(Duration::from_secs(5), self.done.recv())
            .await
            .expect("no completion within 5 s")
            .expect("worker gone")
    }

    async fn nothing_more(&mut self) {
        self.settle().await;
        assert!(self.done.try_recv().is_err(), "an extra completion");
    }
}

#[tokio::test]
async fn a_network_adapters_sixty_receive_urbs_all_wait_and_short_frames_complete() {
    let mut h = Harness::new(0x81);
    for id in 0..60 {
        h.submit(id, 1514, Vec::new(), 0);
    }
    h.settle().await;
    assert_eq!(h.device.running(), 60, "no depth limit in the worker");
    assert!(
        h.device.state().log.iter().all(|(len, _)| *len == 1536),
        "IN requests are whole 512-byte packets"
    );
    let frame: Vec<u8> = (0..98).collect();
    h.device.finish(0, Ok(()), &frame);
    let c = h.next().await;
    assert_eq!((c.id, c.status, c.data), (UrbId(0), UrbStatus::Ok, frame));
    assert_eq!(c.actual_length, 98);
    h.nothing_more().await;
}

#[tokio::test]
async fn more_data_than_asked_is_an_overflow_and_short_not_ok_is_honoured() {
    let mut h = Harness::new(0x81);
    h.submit(1, 1514, Vec::new(), 0);
    h.submit(2, 1024, Vec::new(), transfer_flags::SHORT_NOT_OK);
    h.settle().await;
    h.device.finish(0, Ok(()), &[7; 1536]);
    let c = h.next().await;
    assert_eq!((c.status, c.data.len()), (UrbStatus::Overflow, 1514));
    h.device.finish(0, Ok(()), &[1; 100]);
    let c = h.next().await;
    assert_eq!((c.status, c.data.len()), (UrbStatus::ShortPacket, 100));
}

#[tokio::test]
async fn unlinking_one_urb_requeues_the_others_in_order_and_holds_new_ones_behind_them() {
    let mut h = Harness::new(0x81);
    for id in 0..3 {
        h.submit(id, 512, Vec::new(), 0);
    }
    h.settle().await;
    h.command(EpCmd::Cancel(UrbId(1)));
    h.submit(3, 512, Vec::new(), 0);
    let c = h.next().await;
    assert_eq!((c.id, c.status), (UrbId(1), UrbStatus::Unlinked));
    h.settle().await;
    assert_eq!(h.device.state().cancels, 1);
    assert_eq!(h.device.running(), 3, "0 and 2 requeued, then 3");
    for (n, want) in [(0, 0), (0, 2), (0, 3)] {
        h.device.finish(n, Ok(()), &[want as u8; 4]);
        let c = h.next().await;
        assert_eq!(
            (c.id, c.status, c.data),
            (UrbId(want), UrbStatus::Ok, vec![want as u8; 4])
        );
    }
    h.nothing_more().await;
    // An unlink of a URB that already finished changes nothing.
    h.command(EpCmd::Cancel(UrbId(0)));
    h.settle().await;
    assert_eq!(h.device.state().cancels, 1);
}

#[tokio::test]
async fn a_stall_then_clear_halt_ends_what_is_queued_and_clears_off_the_runtime() {
    let mut h = Harness::new(0x02);
    h.submit(1, 4, vec![1, 2, 3, 4], 0);
    h.submit(2, 4, vec![5, 6, 7, 8], 0);
    h.settle().await;
    h.device.finish(0, Err(TransferError::Stall), &[]);
    let c = h.next().await;
    assert_eq!((c.id, c.status), (UrbId(1), UrbStatus::Stall));
    let (ctl_tx, mut ctl) = mpsc::unbounded_channel();
    h.command(EpCmd::ClearHalt(UrbId(9), ctl_tx));
    let c = h.next().await;
    assert_eq!((c.id, c.status), (UrbId(2), UrbStatus::Unlinked));
    let answer = tokio::time::timeout(Duration::from_secs(5), ctl.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((answer.id, answer.status), (UrbId(9), UrbStatus::Ok));
    assert_eq!(h.device.state().halts_cleared, 1);
    // The endpoint works again.
    h.submit(3, 2, vec![9, 9], 0);
    h.settle().await;
    h.device.finish(0, Ok(()), &[]);
    let c = h.next().await;
    assert_eq!(
        (c.id, c.status, c.actual_length),
        (UrbId(3), UrbStatus::Ok, 2)
    );
}

#[tokio::test]
async fn a_failed_clear_halt_is_a_stall_or_no_device() {
    let h = Harness::new(0x81);
    for (answer, want) in [
        (
            (|| HaltError::Refused(std::io::Error::from_raw_os_error(32))) as fn() -> HaltError,
            UrbStatus::Stall,
        ),
        (|| HaltError::Disconnected, UrbStatus::NoDevice),
    ] {
        h.device.state().halt_answer = Some(answer);
        let (ctl_tx, mut ctl) = mpsc::unbounded_channel();
        h.command(EpCmd::ClearHalt(UrbId(1), ctl_tx));
        let c = tokio::time::timeout(Duration::from_secs(5), ctl.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.status, want);
    }
}

#[tokio::test]
async fn a_vanished_device_ends_every_urb_exactly_once() {
    let mut h = Harness::new(0x81);
    for id in 0..4 {
        h.submit(id, 512, Vec::new(), 0);
    }
    h.settle().await;
    h.device.finish(0, Err(TransferError::Disconnected), &[]);
    let c = h.next().await;
    assert_eq!((c.id, c.status), (UrbId(0), UrbStatus::NoDevice));
    // The device is released with the rest still queued: each ends once, with NoDevice.
    let Harness {
        tx,
        mut done,
        task,
        done_tx,
        ..
    } = h;
    drop((tx, done_tx));
    task.await.unwrap();
    let mut ids = Vec::new();
    while let Some(c) = done.recv().await {
        assert_eq!(c.status, UrbStatus::NoDevice);
        ids.push(c.id.0);
    }
    assert_eq!(ids, vec![1, 2, 3]);
}

#[tokio::test]
async fn a_full_packet_out_transfer_with_zero_packet_ends_in_a_zero_length_packet() {
    let mut h = Harness::new(0x02);
    h.submit(1, 512, vec![0xaa; 512], transfer_flags::ZERO_PACKET);
    h.settle().await;
    let sizes: Vec<usize> = h.device.state().log.iter().map(|(_, d)| d.len()).collect();
    assert_eq!(sizes, vec![512, 0]);
    h.device.finish(0, Ok(()), &[]);
    h.device.finish(0, Ok(()), &[]);
    let c = h.next().await;
    assert_eq!((c.status, c.actual_length), (UrbStatus::Ok, 512));
    h.nothing_more().await;
}

#[tokio::test]
async fn a_driver_unlinking_all_sixty_urbs_costs_two_cancel_rounds_not_sixty() {
    let mut h = Harness::new(0x81);
    for id in 0..60 {
        h.submit(id, 1514, Vec::new(), 0);
    }
    h.settle().await;
    // usbnet stopping: an unlink for each, as fast as they come, the last first.
    h.command(EpCmd::Cancel(UrbId(59)));
    h.settle().await;
    for id in 0..59 {
        h.command(EpCmd::Cancel(UrbId(id)));
    }
    let mut ended = Vec::new();
    for _ in 0..60 {
        let c = h.next().await;
        assert_eq!(c.status, UrbStatus::Unlinked);
        ended.push(c.id.0);
    }
    ended.sort();
    assert_eq!(ended, (0..60).collect::<Vec<_>>());
    assert!(
        h.device.state().cancels <= 2,
        "{} rounds",
        h.device.state().cancels
    );
    assert_eq!(h.device.running(), 0);
    h.nothing_more().await;
}
