//! The isochronous side of an opened device: the interfaces whose settings have iso
//! endpoints are claimed on a usbfs file of their own ([`usbfs`](super::usbfs)), their URBs are
//! submitted as soon as they arrive (usbfs queues them on the endpoint, so the device never
//! runs dry while the client keeps several queued) and a reaper thread hands each finished one
//! back through [`IsoPlan`], which owns the wire-to-usbfs rules.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protocol::descriptors::Configuration;
use protocol::usb::{TransferType, UrbStatus};
use protocol::wire::{UrbId, UrbSubmit};
use tracing::{debug, warn};

use super::usbfs::{RawDevice, RawFile, UrbKey};
use crate::device::CompletionSender;
use crate::device::iso::{ChunkResult, IsoPlan};
use crate::sync::lock;
use crate::tracker::completion;

/// How often the reaper looks at the stop flag when nothing completes.
const POLL: Duration = Duration::from_millis(50);
/// How long a stopping engine waits for discarded URBs to come back before it fails them.
const DRAIN: Duration = Duration::from_secs(2);
/// Chunks per wire URB fit in the low bits of a tag (1,024 packets / 128 per chunk = 8).
const CHUNK_BITS: u32 = 4;

/// The interfaces of `config` that have an isochronous endpoint in any alternate setting.
pub(super) fn iso_interfaces(config: &Configuration) -> BTreeSet<u8> {
    config
        .interfaces
        .iter()
        .filter(|i| {
            i.endpoints
                .iter()
                .any(|e| e.transfer_type == TransferType::Isochronous)
        })
        .map(|i| i.number)
        .collect()
}

/// One wire URB in flight.
struct Pending {
    plan: IsoPlan,
    keys: Vec<Option<UrbKey>>,
    done: CompletionSender,
}

struct State {
    raw: RawDevice,
    pending: HashMap<u64, Pending>,
    by_urb: HashMap<UrbId, u64>,
    next: u64,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    /// Told when the device is gone, so the source looks again.
    rescan: Arc<tokio::sync::Notify>,
}

/// The iso interfaces of one opened device and their URBs.
pub(super) struct IsoEngine {
    file: RawFile,
    interfaces: BTreeSet<u8>,
    shared: Arc<Shared>,
    reaper: Option<JoinHandle<()>>,
}

impl IsoEngine {
    /// Claims `interfaces` (detaching their kernel drivers) on a file of their own. Blocking.
    pub(super) fn claim(
        bus: u8,
        address: u8,
        interfaces: BTreeSet<u8>,
        rescan: Arc<tokio::sync::Notify>,
    ) -> io::Result<IsoEngine> {
        let file = RawFile::open(bus, address)?;
        for &n in &interfaces {
            file.claim(n)?;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                raw: RawDevice::new(file.clone()),
                pending: HashMap::new(),
                by_urb: HashMap::new(),
                next: 0,
            }),
            stop: AtomicBool::new(false),
            rescan,
        });
        let reaper = {
            let shared = shared.clone();
            let file = file.clone();
            std::thread::Builder::new()
                .name("iso-reaper".into())
                .spawn(move || reap(&shared, &file))?
        };
        Ok(IsoEngine {
            file,
            interfaces,
            shared,
            reaper: Some(reaper),
        })
    }

    /// Whether `interface` is claimed here rather than by nusb.
    pub(super) fn owns(&self, interface: u8) -> bool {
        self.interfaces.contains(&interface)
    }

    /// The interfaces claimed here.
    pub(super) fn interfaces(&self) -> impl Iterator<Item = u8> + '_ {
        self.interfaces.iter().copied()
    }

    /// The file, for SET_INTERFACE and control transfers to the interfaces it owns (usbfs
    /// allows those only on the file that claimed them).
    pub(super) fn file(&self) -> RawFile {
        self.file.clone()
    }

    /// Starts an iso URB; a shape usbfs cannot take is answered `Invalid` at once.
    pub(super) fn submit(&self, urb: UrbSubmit, done: CompletionSender) {
        let (mut plan, chunks) = match IsoPlan::new(&urb) {
            Ok(p) => p,
            Err(e) => {
                debug!(id = ?urb.id, "iso URB refused: {e}");
                let _ = done.send(completion(urb.id, UrbStatus::Invalid));
                return;
            }
        };
        let address = urb.endpoint.address(urb.direction);
        let mut st = lock(&self.shared.state);
        let seq = st.next;
        st.next += 1;
        let mut keys = Vec::with_capacity(chunks.len());
        let mut finished = None;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let count = chunk.lengths.len();
            let tag = (seq << CHUNK_BITS) | i as u64;
            match st
                .raw
                .submit_iso(address, &chunk.lengths, chunk.buffer, tag)
            {
                Ok(key) => keys.push(Some(key)),
                Err(e) => {
                    let status = match e.raw_os_error() {
                        Some(libc::ENODEV | libc::ESHUTDOWN) => UrbStatus::NoDevice,
                        Some(errno) => UrbStatus::from_errno(-errno),
                        None => UrbStatus::Invalid,
                    };
                    debug!(id = ?urb.id, chunk = i, "usbfs refused an iso URB: {e}");
                    keys.push(None);
                    finished = plan.chunk_done(i, ChunkResult::failed(count, status));
                }
            }
        }
        match finished {
            Some(c) => {
                let _ = done.send(c);
            }
            None => {
                st.by_urb.insert(urb.id, seq);
                st.pending.insert(seq, Pending { plan, keys, done });
            }
        }
    }

    /// Ends an iso URB early; it completes `Unlinked` when usbfs gives it back.
    pub(super) fn cancel(&self, id: UrbId) {
        let st = lock(&self.shared.state);
        if let Some(p) = st.by_urb.get(&id).and_then(|seq| st.pending.get(seq)) {
            for key in p.keys.iter().flatten() {
                st.raw.discard(*key);
            }
        }
    }

    /// Ends every URB in flight (each completes once, `Unlinked` or `NoDevice`) and waits for
    /// the reaper. Blocking.
    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        {
            let st = lock(&self.shared.state);
            for p in st.pending.values() {
                for key in p.keys.iter().flatten() {
                    st.raw.discard(*key);
                }
            }
        }
        if let Some(reaper) = self.reaper.take() {
            let _ = reaper.join();
        }
    }
}

impl Drop for IsoEngine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The reaper thread: hands back what usbfs finished until stopped (and drained) or the
/// device is gone.
fn reap(shared: &Shared, file: &RawFile) {
    let mut stopping_since: Option<Instant> = None;
    loop {
        file.wait(POLL);
        let mut st = lock(&shared.state);
        let gone = loop {
            match st.raw.reap() {
                Ok(Some((tag, result))) => finish(&mut st, tag, result),
                Ok(None) => break false,
                Err(e) => {
                    if e.raw_os_error() != Some(libc::ENODEV) {
                        warn!("reaping iso URBs: {e}");
                    }
                    break true;
                }
            }
        };
        if shared.stop.load(Ordering::Relaxed) {
            let since = *stopping_since.get_or_insert_with(Instant::now);
            if st.raw.in_flight() == 0 || since.elapsed() > DRAIN {
                fail_all(&mut st, UrbStatus::NoDevice);
                return;
            }
        }
        if gone {
            fail_all(&mut st, UrbStatus::NoDevice);
            drop(st);
            shared.rescan.notify_one();
            return;
        }
    }
}

/// One reaped usbfs URB into its wire URB's plan; the completion once the plan has them all.
fn finish(st: &mut State, tag: u64, result: ChunkResult) {
    let seq = tag >> CHUNK_BITS;
    let chunk = (tag & ((1 << CHUNK_BITS) - 1)) as usize;
    let Some(p) = st.pending.get_mut(&seq) else {
        return;
    };
    if let Some(c) = p.plan.chunk_done(chunk, result) {
        let _ = p.done.send(c);
        let id = p.plan.id();
        st.pending.remove(&seq);
        st.by_urb.remove(&id);
    }
}

/// Completes every wire URB still pending, its missing chunks with `status`.
fn fail_all(st: &mut State, status: UrbStatus) {
    st.raw.abandon();
    for (_, mut p) in st.pending.drain() {
        for i in 0..p.plan.chunks() {
            if p.plan.has_result(i) {
                continue;
            }
            let failed = ChunkResult::failed(p.plan.chunk_packets(i), status);
            if let Some(c) = p.plan.chunk_done(i, failed) {
                let _ = p.done.send(c);
            }
        }
    }
    st.by_urb.clear();
}
