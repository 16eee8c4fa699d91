//! One vhci port's USB/IP conversation, as a state machine with no I/O.
//!
//! Kernel bytes, server completions and unlink answers go in; [`Action`]s come out through
//! [`PortSession::poll_action`]: URBs and unlinks for the server, RET_* bytes for the kernel,
//! or a reason to close the port. Keeping it free of sockets and runtimes is what lets every
//! unlink race be tested with scripted byte streams.
//!
//! The invariant everything here protects: vhci kills the port (`VDEV_EVENT_ERROR_TCP`) when a
//! RET_SUBMIT names a seqnum it no longer holds. So a URB answered by an unlinking RET_UNLINK
//! (status `-ECONNRESET`) leaves the in-flight table at that moment, and a completion for an id
//! that is not in the table is dropped, never turned into a RET_SUBMIT. The reverse also
//! matters: a RET_UNLINK with status 0 for a URB vhci still holds gives it back as a success with
//! no data, so RET_UNLINK(0) is only sent once the URB's RET_SUBMIT has been queued.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use protocol::bot::{CLASS_MASS_STORAGE, PROTOCOL_BULK_ONLY};
use protocol::descriptors::Configuration;
use protocol::usb::{
    Direction, EndpointNumber, IsoPacket, SetupPacket, StateChange, TransferType, UrbStatus,
    transfer_flags,
};
use protocol::usbip::{
    CmdSubmit, CmdUnlink, Pdu, PduDecoder, RetSubmit, RetUnlink, SubmitBuffer, Transferred,
    UrbError,
};
use protocol::wire::{DeviceInfo, IsoComplete, IsoSubmit, UrbComplete, UrbId, UrbSubmit};

use super::iso_ahead::{self, IsoEndpointStats, IsoStreams};
use super::readahead::{self, BulkOut, Cbw, Claim, ReadAhead, ReadAheadStats, Settled};

/// The most URBs one port forwards at once. vhci itself has no cap, but the drivers behind it
/// keep a handful each (usb-storage 1-2, audio ~8, network adapters up to ~60); the bound keeps
/// a runaway usbfs program from growing the table without limit. Past it, URBs fail locally
/// with `-ENOMEM`, which drivers already handle as a transient failure.
pub const MAX_IN_FLIGHT: usize = 1024;

/// The most CMD_UNLINKs kept for one URB. usbcore unlinks a URB once (a second
/// `usb_unlink_urb` gets `-EBUSY` before reaching vhci); a few spare slots cost nothing.
pub const MAX_UNLINKS_PER_URB: usize = 4;

/// The most CBWs answered to the kernel that the server has not completed yet. One per
/// mass-storage LUN in practice (usb-storage runs one command at a time); past it a CBW waits
/// for the device as usual.
const MAX_CBWS_AHEAD: usize = 8;

/// IN data at least this long reaches the kernel as its own buffer rather than copied behind its
/// header: the pump gathers both into one send, so a copy is only worth it for small results.
const SPLIT_MIN: usize = 16 * 1024;
const ENOMEM: i32 = 12;

/// What the session asks its driver to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run this URB on the server, on the URB stream of `endpoint`/`direction`. For control
    /// endpoints `direction` is always [`Direction::Out`]: one stream carries both directions.
    Submit {
        /// Stream endpoint.
        endpoint: EndpointNumber,
        /// Stream direction (routing only; the URB carries its own data direction).
        direction: Direction,
        /// The URB, with the kernel's seqnum as its id.
        urb: UrbSubmit,
        /// The URB (on any stream of the port) the server must see complete before running
        /// this one: read-ahead's ([`UrbClientMessage::SubmitAfter`]).
        after: Option<UrbId>,
    },
    /// Ask the server to cancel a URB sent earlier on that stream.
    Unlink {
        /// Stream endpoint.
        endpoint: EndpointNumber,
        /// Stream direction, as in [`Action::Submit`].
        direction: Direction,
        /// The URB to cancel.
        id: UrbId,
    },
    /// Write these bytes (whole RET_SUBMIT/RET_UNLINK PDUs, possibly several) to the kernel.
    ToKernel(Vec<u8>),
    /// The port cannot continue: detach it. Always the last action.
    Close(CloseReason),
}

/// Why a port session gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// The kernel's byte stream stopped being valid USB/IP; its framing is lost.
    #[error("the kernel sent invalid USB/IP")]
    Kernel(#[from] UrbError),
    /// The kernel reused a seqnum that is still in flight.
    #[error("the kernel reused seqnum {0} while it was still in flight")]
    DuplicateSeqnum(u32),
    /// The kernel unlinked one URB more often than usbcore ever does.
    #[error("the kernel unlinked seqnum {0} more than {MAX_UNLINKS_PER_URB} times")]
    TooManyUnlinks(u32),
    /// A server completion that does not fit its URB; passing it on would corrupt the kernel's
    /// buffers or kill the port, so the port is closed instead.
    #[error("the server's completion of URB {id} is out of bounds")]
    BadCompletion {
        /// The URB.
        id: u32,
        /// What was wrong with it.
        #[source]
        problem: BadCompletion,
    },
}

/// How a server completion broke the bounds of its URB.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadCompletion {
    /// More bytes than the URB's buffer holds.
    #[error("{actual} bytes for a {buffer}-byte buffer")]
    TooLong {
        /// What the server says moved.
        actual: u64,
        /// The kernel's buffer length.
        buffer: u32,
    },
    /// An IN completion whose data length differs from its actual length.
    #[error("{data} bytes of IN data but an actual length of {actual}")]
    LengthMismatch {
        /// Bytes carried.
        data: usize,
        /// Bytes claimed.
        actual: u32,
    },
    /// Data on an OUT completion.
    #[error("an OUT completion carries {0} bytes of data")]
    OutWithData(usize),
    /// Iso results for a URB that is not isochronous.
    #[error("iso results for a non-isochronous URB")]
    UnexpectedIso,
    /// An iso URB that moved data but came back with no per-packet results.
    #[error("an isochronous URB moved data but has no packet results")]
    MissingIso,
    /// vhci requires exactly the submitted number of packets back.
    #[error("{got} iso packets back for {sent} submitted")]
    IsoPacketCount {
        /// Packets submitted.
        sent: usize,
        /// Packets returned.
        got: usize,
    },
    /// An iso packet that moved more than it asked for.
    #[error("iso packet {index} moved {actual} of {length} bytes")]
    IsoPacketOverrun {
        /// Packet index.
        index: usize,
        /// Bytes claimed.
        actual: u32,
        /// Packet length.
        length: u32,
    },
    /// Packed iso IN data whose size is not the sum of the packets' actual lengths.
    #[error("iso packets sum to {sum} bytes but {data} bytes came back")]
    IsoSumMismatch {
        /// Sum of packet actual lengths.
        sum: u64,
        /// Bytes of data.
        data: usize,
    },
    /// More packet errors than packets.
    #[error("{errors} iso errors for {packets} packets")]
    IsoErrorCount {
        /// Claimed error count.
        errors: u32,
        /// Packets.
        packets: usize,
    },
}

/// Counters for the UI; cheap to copy out after every batch of actions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Kernel URBs forwarded to the server, or answered by read-ahead: each gets one
    /// RET_SUBMIT ([`Self::completed`]) unless an unlink ends it first.
    pub submitted: u64,
    /// RET_SUBMITs sent to the kernel for those URBs.
    pub completed: u64,
    /// URBs answered here without the server (unknown endpoint, table full, bad iso shape).
    pub answered_locally: u64,
    /// URBs cancelled by an unlink (answered with RET_UNLINK `-ECONNRESET`).
    pub unlinked: u64,
    /// Completions dropped because their URB was no longer in flight.
    pub stray_completions: u64,
    /// OUT data bytes forwarded to the device.
    pub bytes_out: u64,
    /// IN data bytes handed to the kernel.
    pub bytes_in: u64,
    /// Mass-storage read-ahead (see [`super::readahead`]).
    pub read_ahead: ReadAheadStats,
    /// Write CBWs answered to the kernel before the device took them.
    pub write_cbws_ahead: u64,
    /// Read (and no-data) CBWs answered so, their phases read ahead behind them.
    pub read_cbws_ahead: u64,
    /// Of both, CBWs the device then refused (usb-storage sees the command fail and
    /// recovers; see [`super::readahead`]).
    pub cbws_failed_late: u64,
}

/// A CBW answered to the kernel ahead of the device (see [`super::readahead`]).
#[derive(Debug, Clone, Copy)]
struct CbwAhead {
    seqnum: u32,
    /// The BOT IN endpoint its data and CSW come from.
    endpoint_in: EndpointNumber,
}

/// What the session remembers about a URB the server is running.
#[derive(Debug)]
struct InFlight {
    /// The id the server knows it by: the seqnum, or the read-ahead URB the kernel's took over.
    wire_id: u32,
    devid: u32,
    endpoint: EndpointNumber,
    route: Direction,
    direction: Direction,
    buffer_len: u32,
    setup: Option<SetupPacket>,
    iso: Option<Vec<IsoPacket>>,
    /// Seqnums of CMD_UNLINKs naming this URB, answered when its fate is known.
    unlinks: Vec<u32>,
}

/// The endpoints of the device's current configuration and alternate settings.
///
/// Transfer types come from here and never from a CMD_SUBMIT's setup bytes, which usb-storage
/// leaves stale on bulk URBs. SET_CONFIGURATION and SET_INTERFACE that complete successfully
/// move the table along with the device.
#[derive(Debug)]
struct EndpointTable {
    configurations: Vec<Configuration>,
    /// Index into `configurations`; `None` while unconfigured (only endpoint 0 exists).
    active: Option<usize>,
    /// Current alternate setting per interface number; absent means 0.
    alternates: HashMap<u8, u8>,
}

impl EndpointTable {
    fn new(device: &DeviceInfo) -> Self {
        let configurations: Vec<Configuration> = device
            .configurations
            .iter()
            .filter_map(|bytes| match Configuration::parse(bytes) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping an unparsable configuration descriptor");
                    None
                }
            })
            .collect();
        let mut table = EndpointTable {
            configurations,
            active: None,
            alternates: HashMap::new(),
        };
        table.set_configuration(device.active_configuration);
        table
    }

    fn set_configuration(&mut self, value: u8) {
        self.active = match value {
            0 => None,
            v => self.configurations.iter().position(|c| c.value == v),
        };
        self.alternates.clear();
    }

    fn set_interface(&mut self, interface: u8, alternate: u8) {
        self.alternates.insert(interface, alternate);
    }

    /// The transfer type of `number` in `direction`, or `None` if the device has no such
    /// endpoint now.
    fn transfer_type(&self, number: EndpointNumber, direction: Direction) -> Option<TransferType> {
        if number == EndpointNumber::CONTROL {
            return Some(TransferType::Control);
        }
        let config = &self.configurations[self.active?];
        // A control endpoint other than 0 is bidirectional under one address.
        let matches = |e: &&protocol::descriptors::Endpoint| {
            e.number == number
                && (e.direction == direction || e.transfer_type == TransferType::Control)
        };
        let current = config
            .interfaces
            .iter()
            .filter(|i| i.alternate == self.alternates.get(&i.number).copied().unwrap_or(0))
            .flat_map(|i| &i.endpoints)
            .find(matches);
        if let Some(e) = current {
            return Some(e.transfer_type);
        }
        // The kernel only submits to endpoints it has enabled, so an endpoint of another
        // alternate setting means we missed a SET_INTERFACE (for example one made on the server
        // before the attach); its descriptor still says what type it is.
        let other = config
            .interfaces
            .iter()
            .flat_map(|i| &i.endpoints)
            .find(matches)?;
        tracing::debug!(
            endpoint = number.get(),
            ?direction,
            "endpoint found only in an inactive alternate setting"
        );
        Some(other.transfer_type)
    }

    /// The bulk IN endpoint that answers CBWs sent to `out`, if `out` is the bulk OUT endpoint
    /// of a Bulk-Only mass-storage interface in the current setting.
    fn bot_in_for(&self, out: EndpointNumber) -> Option<EndpointNumber> {
        let config = &self.configurations[self.active?];
        let interface = config.interfaces.iter().find(|i| {
            i.class[0] == CLASS_MASS_STORAGE
                && i.class[2] == PROTOCOL_BULK_ONLY
                && i.alternate == self.alternates.get(&i.number).copied().unwrap_or(0)
                && i.endpoints.iter().any(|e| {
                    e.number == out
                        && e.direction == Direction::Out
                        && e.transfer_type == TransferType::Bulk
                })
        })?;
        interface
            .endpoints
            .iter()
            .find(|e| e.direction == Direction::In && e.transfer_type == TransferType::Bulk)
            .map(|e| e.number)
    }

    /// Follows a control request that the device accepted.
    fn follow(&mut self, setup: &SetupPacket) {
        match setup.state_change() {
            Some(StateChange::SetConfiguration(value)) => self.set_configuration(value),
            Some(StateChange::SetInterface { interface, alt }) => {
                self.set_interface(interface, alt);
            }
            // A cleared halt changes no endpoint's type or number.
            Some(StateChange::ClearHalt { .. }) | None => {}
        }
    }
}

/// The USB/IP session of one attached vhci port. See the module docs for the contract.
#[derive(Debug)]
pub struct PortSession {
    decoder: PduDecoder,
    endpoints: EndpointTable,
    in_flight: HashMap<u32, InFlight>,
    read_ahead: ReadAhead,
    /// CBWs answered ahead whose server completion is still to come (it is dropped when it
    /// does: the kernel has had its answer), with their BOT IN endpoints: a kernel IN URB sent
    /// there on its own meanwhile waits on the CBW.
    cbws_ahead: Vec<CbwAhead>,
    /// BOT IN endpoints whose CBW answered ahead the device then refused: the kernel's next
    /// URB there fails here with `-EPROTO`, so usb-storage resets the device at once.
    refused_ahead: Vec<EndpointNumber>,
    iso: IsoStreams,
    to_kernel: Vec<u8>,
    /// Kernel bytes queued before `to_kernel`'s: a large IN result's data goes here as its own
    /// buffer instead of being copied after its header.
    kernel_out: VecDeque<Vec<u8>>,
    actions: VecDeque<Action>,
    /// Set once the session has failed; the reason is handed out once, after everything else.
    failed: bool,
    close: Option<CloseReason>,
    stats: SessionStats,
}

impl PortSession {
    /// A session for `device`, starting from its active configuration as the server reported
    /// it, with mass-storage read-ahead on.
    pub fn new(device: &DeviceInfo) -> Self {
        PortSession {
            decoder: PduDecoder::commands(),
            endpoints: EndpointTable::new(device),
            in_flight: HashMap::new(),
            read_ahead: ReadAhead::new(true),
            cbws_ahead: Vec::new(),
            refused_ahead: Vec::new(),
            iso: IsoStreams::new(device.speed),
            to_kernel: Vec::new(),
            kernel_out: VecDeque::new(),
            actions: VecDeque::new(),
            failed: false,
            close: None,
            stats: SessionStats::default(),
        }
    }

    /// Turns mass-storage read-ahead on or off (the client turns it on for `--read-ahead`).
    pub fn with_read_ahead(mut self, on: bool) -> Self {
        let streaming = self.read_ahead.streams_interrupts();
        let widen = self.read_ahead.widen_limit();
        self.read_ahead = ReadAhead::new(on);
        self.read_ahead.set_streaming(streaming);
        self.read_ahead.widen_reads(widen);
        self
    }

    /// Widens sequential READs up to `limit` bytes while read-ahead is on (0: never; see
    /// [`readahead::widen`]). The client gives it the disk's raised command size: the device
    /// already takes commands that long from the kernel itself.
    pub fn with_widened_reads(mut self, limit: u32) -> Self {
        self.set_widened_reads(limit);
        self
    }

    /// The longest READ widened, in bytes.
    pub fn widened_reads(&self) -> u32 {
        self.read_ahead.widen_limit()
    }

    /// As [`with_widened_reads`](Self::with_widened_reads), on a running session: the disk's
    /// command size is known only once the kernel has made a disk of the device.
    pub fn set_widened_reads(&mut self, limit: u32) {
        self.read_ahead.widen_reads(limit);
    }

    /// Turns interrupt-IN streaming on or off (`--interrupt-streaming`): the device's
    /// interrupt IN endpoints are polled [`readahead::STREAM_DEPTH`] URBs ahead of the kernel.
    pub fn with_interrupt_streaming(mut self, on: bool) -> Self {
        self.read_ahead.set_streaming(on);
        self
    }

    /// The round trip to the server as last measured: how far ahead iso OUT URBs are answered
    /// ([`iso_ahead`]).
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.iso.set_rtt(rtt);
    }

    /// Each isochronous endpoint's counters (underruns, URBs answered ahead).
    pub fn iso_stats(&self) -> Vec<IsoEndpointStats> {
        self.iso.stats()
    }

    /// Turns answering iso OUT ahead of the server on or off ([`iso_ahead`]); on by default.
    pub fn with_iso_ahead(mut self, on: bool) -> Self {
        self.iso.set_answer_ahead(on);
        self
    }

    /// Feeds bytes read from the kernel's end of the socketpair, split anywhere.
    pub fn on_kernel_bytes(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        self.decoder.push(bytes);
        loop {
            match self.decoder.next_pdu() {
                Ok(Some(Pdu::CmdSubmit(submit))) => self.on_submit(submit),
                Ok(Some(Pdu::CmdUnlink(unlink))) => self.on_unlink(unlink),
                // The commands decoder refuses RET_* itself; nothing else can come out.
                Ok(Some(Pdu::RetSubmit(_) | Pdu::RetUnlink(_))) | Ok(None) => break,
                Err(e) => {
                    self.fail(CloseReason::Kernel(e));
                    break;
                }
            }
            if self.failed {
                break;
            }
        }
    }

    /// Feeds a URB's completion from the server.
    pub fn on_completion(&mut self, completion: UrbComplete) {
        if self.failed {
            return;
        }
        let settled = self.read_ahead.on_completion(completion);
        self.push_cancels();
        let (id, completion) = match settled {
            Settled::NotOurs(c) => (c.id.0, c),
            Settled::Kernel(seqnum, c) => (seqnum, c),
            Settled::Refused(cmd, c) => {
                let unlinked = self
                    .in_flight
                    .get(&cmd.seqnum)
                    .is_some_and(|u| !u.unlinks.is_empty());
                if unlinked {
                    (cmd.seqnum, c)
                } else {
                    // Taken back: answered here or sent as its own, each counting it again.
                    self.in_flight.remove(&cmd.seqnum);
                    self.stats.submitted -= 1;
                    return self.forward_in(cmd);
                }
            }
            Settled::Answer(cmd, c) => return self.answer_with(cmd, c),
            Settled::Forward(cmd) => return self.forward_in(cmd),
            Settled::Absorbed => return,
        };
        if let Some(i) = self.cbws_ahead.iter().position(|c| c.seqnum == id) {
            let cbw = self.cbws_ahead.swap_remove(i);
            self.cbw_settled(cbw, &completion);
            return;
        }
        if self.iso.is_ahead(id) {
            // The kernel has had its answer; this only frees room for the next one.
            if let Some(endpoint) = self.iso.on_completion(&completion) {
                self.answer_ahead(endpoint);
            }
            return;
        }
        let Some(urb) = self.in_flight.remove(&id) else {
            // Already answered (an unlink cancelled it, or the server repeated itself): a
            // RET_SUBMIT now would name a seqnum vhci no longer holds and kill the port.
            self.stats.stray_completions += 1;
            tracing::debug!(id, "dropping a completion for a URB no longer in flight");
            return;
        };
        if !urb.unlinks.is_empty()
            && matches!(completion.status, UrbStatus::Unlinked | UrbStatus::Killed)
        {
            self.cancelled(&urb);
            return;
        }
        if urb.iso.is_some() {
            self.iso.on_completion(&completion);
        }
        self.complete(id, &urb, completion);
    }

    /// Answers the iso OUT URBs of `endpoint` that the depth allows before the server runs
    /// them, as if every packet had moved.
    fn answer_ahead(&mut self, endpoint: EndpointNumber) {
        loop {
            let in_flight = &self.in_flight;
            let next = self.iso.take_ahead(endpoint, |s| {
                in_flight.get(&s).is_some_and(|u| u.unlinks.is_empty())
            });
            let Some(seqnum) = next else {
                break;
            };
            let Some(urb) = self.in_flight.remove(&seqnum) else {
                continue;
            };
            let packets = iso_ahead::all_moved(urb.iso.as_deref().unwrap_or_default());
            let moved = packets.iter().map(|p| p.actual_length).sum();
            let completion = UrbComplete {
                id: UrbId(seqnum),
                status: UrbStatus::Ok,
                actual_length: moved,
                data: Vec::new(),
                timing: None,
                iso: Some(IsoComplete {
                    start_frame: 0,
                    error_count: 0,
                    packets,
                }),
            };
            self.complete(seqnum, &urb, completion);
        }
    }

    /// Answers a CBW to the kernel before the server has run it (see [`super::readahead`]):
    /// as if all its bytes had gone out.
    fn answer_cbw_ahead(&mut self, seqnum: u32, endpoint_in: EndpointNumber) {
        let Some(urb) = self.in_flight.remove(&seqnum) else {
            return;
        };
        self.cbws_ahead.push(CbwAhead {
            seqnum,
            endpoint_in,
        });
        let completion = UrbComplete {
            id: UrbId(seqnum),
            status: UrbStatus::Ok,
            actual_length: urb.buffer_len,
            data: Vec::new(),
            timing: None,
            iso: None,
        };
        self.complete(seqnum, &urb, completion);
    }

    /// The server's completion of a CBW answered ahead: only worth a word if the device
    /// refused it (a gone device says so on every URB after it anyway).
    fn cbw_settled(&mut self, cbw: CbwAhead, completion: &UrbComplete) {
        match completion.status {
            UrbStatus::Ok => {}
            UrbStatus::NoDevice => self.stats.cbws_failed_late += 1,
            status => {
                self.stats.cbws_failed_late += 1;
                if !self.refused_ahead.contains(&cbw.endpoint_in) {
                    self.refused_ahead.push(cbw.endpoint_in);
                }
                tracing::warn!(
                    seqnum = cbw.seqnum,
                    ?status,
                    "the device refused a CBW answered ahead: usb-storage sees the command \
                     fail and resets the device"
                );
            }
        }
    }

    /// Whether the last CBW answered ahead for `endpoint` failed with nothing told yet; true
    /// once (the caller tells).
    fn take_refused_ahead(&mut self, endpoint: EndpointNumber) -> bool {
        let Some(i) = self.refused_ahead.iter().position(|&e| e == endpoint) else {
            return false;
        };
        self.refused_ahead.swap_remove(i);
        true
    }

    /// Answers the kernel's URB `id` with the server's completion.
    fn complete(&mut self, id: u32, urb: &InFlight, completion: UrbComplete) {
        let ret = match ret_submit(id, urb, completion) {
            Ok(ret) => ret,
            Err(problem) => {
                self.fail(CloseReason::BadCompletion { id, problem });
                return;
            }
        };
        if ret.status == UrbStatus::Ok
            && let Some(setup) = &urb.setup
        {
            self.endpoints.follow(setup);
        }
        self.stats.completed += 1;
        if let Transferred::In(data) = &ret.transferred {
            self.stats.bytes_in += data.len() as u64;
        }
        if let Some(data) = ret.encode_split(&mut self.to_kernel) {
            if data.len() < SPLIT_MIN {
                self.to_kernel.extend_from_slice(&data);
            } else {
                self.kernel_out
                    .push_back(std::mem::take(&mut self.to_kernel));
                self.kernel_out.push_back(data);
            }
        }
        for &unlink in &urb.unlinks {
            self.ret_unlink(unlink, urb.devid, UrbStatus::Ok);
        }
    }

    /// Feeds the server's answer to an [`Action::Unlink`].
    ///
    /// The server sends it after the URB's own completion, which has already settled
    /// everything. If a server ever sends it first with `cancelled`, the URB is answered as
    /// cancelled here and its late completion is dropped as stray.
    pub fn on_unlink_done(&mut self, id: UrbId, cancelled: bool) {
        if self.failed || !cancelled {
            return;
        }
        let seqnum = match self.read_ahead.bound_seqnum(id.0) {
            Some(seqnum) => seqnum,
            // Our own cancel of a read-ahead URB: its completion settles it.
            None if self.read_ahead.owns(id.0) => return,
            None => id.0,
        };
        let unlinking = self
            .in_flight
            .get(&seqnum)
            .is_some_and(|urb| !urb.unlinks.is_empty());
        if unlinking && let Some(urb) = self.in_flight.remove(&seqnum) {
            self.cancelled(&urb);
        }
    }

    /// The next thing to do, `None` when there is nothing until more input arrives. Kernel
    /// bytes come first (the kernel is waiting on them), then server actions, then `Close`.
    pub fn poll_action(&mut self) -> Option<Action> {
        if let Some(bytes) = self.kernel_out.pop_front() {
            return Some(Action::ToKernel(bytes));
        }
        if !self.to_kernel.is_empty() {
            return Some(Action::ToKernel(std::mem::take(&mut self.to_kernel)));
        }
        if let Some(action) = self.actions.pop_front() {
            return Some(action);
        }
        self.close.take().map(Action::Close)
    }

    /// The counters so far.
    pub fn stats(&self) -> SessionStats {
        SessionStats {
            read_ahead: self.read_ahead.stats(),
            ..self.stats
        }
    }

    /// URBs the server is running for this port.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether the session has failed (its `Close` may still be waiting in `poll_action`).
    pub fn is_closed(&self) -> bool {
        self.failed
    }

    fn on_submit(&mut self, cmd: CmdSubmit) {
        if self.in_flight.contains_key(&cmd.seqnum) {
            self.fail(CloseReason::DuplicateSeqnum(cmd.seqnum));
            return;
        }
        self.read_ahead.note_kernel_seqnum(cmd.seqnum);
        let direction = cmd.buffer.direction();
        let Some(transfer_type) = self.endpoints.transfer_type(cmd.ep, direction) else {
            tracing::debug!(
                seqnum = cmd.seqnum,
                endpoint = cmd.ep.get(),
                ?direction,
                "no such endpoint: stalling"
            );
            self.answer_locally(&cmd, UrbStatus::Stall);
            return;
        };
        if (transfer_type == TransferType::Isochronous) != cmd.iso.is_some() {
            self.answer_locally(&cmd, UrbStatus::Invalid);
            return;
        }
        // The in-flight bound, and (after four billion URBs) a seqnum that meets a read-ahead
        // id still running: both fail the URB as a transient shortage.
        if self.in_flight.len() >= MAX_IN_FLIGHT || self.read_ahead.owns(cmd.seqnum) {
            tracing::warn!(seqnum = cmd.seqnum, "too many URBs in flight: failing one");
            self.answer_locally(&cmd, UrbStatus::Other(ENOMEM));
            return;
        }
        match (transfer_type, direction) {
            (TransferType::Bulk, Direction::In) => self.claim_in(cmd, transfer_type),
            (TransferType::Interrupt, Direction::In) if self.read_ahead.streams_interrupts() => {
                let (endpoint, length) = (cmd.ep, cmd.buffer.len());
                let (flags, interval) = (cmd.transfer_flags, cmd.interval);
                self.claim_in(cmd, transfer_type);
                let specs = self
                    .read_ahead
                    .on_interrupt_in(endpoint, length, flags, interval);
                self.speculate(specs);
            }
            (TransferType::Bulk, Direction::Out) => {
                let mut cmd = cmd;
                let endpoint_in = self.endpoints.bot_in_for(cmd.ep);
                let out = match (&cmd.buffer, endpoint_in) {
                    (SubmitBuffer::Out(data), Some(endpoint_in)) => {
                        self.read_ahead.on_bulk_out(endpoint_in, cmd.seqnum, data)
                    }
                    _ => BulkOut::default(),
                };
                self.push_cancels();
                if out.served {
                    // Its data and CSW wait in read-ahead's queue: the device never sees it.
                    return self.answer_out_here(&cmd);
                }
                if let (Some(bytes), SubmitBuffer::Out(data)) = (out.rewrite, &mut cmd.buffer) {
                    *data = bytes.to_vec();
                }
                let seqnum = cmd.seqnum;
                self.forward(cmd, transfer_type, direction);
                if let Some(endpoint_in) = endpoint_in
                    && out.answer_now
                    && self.cbws_ahead.len() < MAX_CBWS_AHEAD
                {
                    self.answer_cbw_ahead(seqnum, endpoint_in);
                    if matches!(out.cbw, Some(Cbw::DataOut(_))) {
                        self.stats.write_cbws_ahead += 1;
                    } else {
                        self.stats.read_cbws_ahead += 1;
                    }
                }
                self.speculate(out.speculate);
            }
            (TransferType::Control, _) => {
                // usb-storage's reset recovery: a refused CBW has been told.
                self.refused_ahead.clear();
                self.read_ahead.on_control();
                self.forward(cmd, transfer_type, direction);
            }
            _ => self.forward(cmd, transfer_type, direction),
        }
    }

    /// Routes a kernel IN URB through read-ahead: to a speculation's result, onto a running
    /// speculation, into a wait for one, or to the server.
    fn claim_in(&mut self, cmd: CmdSubmit, transfer_type: TransferType) {
        if self.take_refused_ahead(cmd.ep) {
            // Its command's CBW, answered ahead, failed on the device.
            return self.answer_locally(&cmd, UrbStatus::Protocol);
        }
        let claim = self.read_ahead.claim(cmd.ep, cmd);
        self.push_cancels();
        match claim {
            Claim::Forward(cmd) => self.forward(cmd, transfer_type, Direction::In),
            Claim::Answer(cmd, c) => self.answer_with(cmd, c),
            Claim::Bound(cmd, wire_id) => {
                self.stats.submitted += 1;
                let urb = in_flight_of(&cmd, wire_id, Direction::In, None);
                self.in_flight.insert(cmd.seqnum, urb);
            }
            Claim::Parked => {}
        }
    }

    /// Sends read-ahead's speculative URBs to the server.
    fn speculate(&mut self, specs: Vec<readahead::Speculate>) {
        for spec in specs {
            self.actions.push_back(Action::Submit {
                endpoint: spec.endpoint,
                direction: Direction::In,
                urb: UrbSubmit {
                    id: UrbId(spec.id),
                    endpoint: spec.endpoint,
                    direction: Direction::In,
                    transfer_type: spec.transfer_type,
                    flags: spec.flags,
                    setup: None,
                    length: spec.length,
                    data: Vec::new(),
                    interval: spec.interval,
                    iso: None,
                },
                after: spec.after.map(UrbId),
            });
        }
    }

    /// The kernel unlinked a URB on `endpoint`: if it is a streamed interrupt IN endpoint, its
    /// driver stopped polling, and so does the stream.
    fn quiet_stream(&mut self, endpoint: EndpointNumber) {
        if self.read_ahead.streams_interrupts()
            && self.endpoints.transfer_type(endpoint, Direction::In)
                == Some(TransferType::Interrupt)
        {
            self.read_ahead.on_kernel_unlink(endpoint);
            self.push_cancels();
        }
    }

    /// Sends a kernel IN URB that read-ahead held back (bound to a speculation the server
    /// refused, or parked behind one cancelled) to the server after all, unless its command's
    /// CBW, answered ahead, was refused: then the device has no command for it to wait on, and
    /// it is the command's first URB to tell (`-EPROTO`, so usb-storage resets at once).
    fn forward_in(&mut self, cmd: CmdSubmit) {
        if self.take_refused_ahead(cmd.ep) {
            return self.answer_locally(&cmd, UrbStatus::Protocol);
        }
        let transfer_type = self
            .endpoints
            .transfer_type(cmd.ep, Direction::In)
            .unwrap_or(TransferType::Bulk);
        self.forward(cmd, transfer_type, Direction::In);
    }

    /// Sends the kernel's URB to the server as it is.
    fn forward(&mut self, cmd: CmdSubmit, transfer_type: TransferType, direction: Direction) {
        let route = match transfer_type {
            TransferType::Control => Direction::Out,
            _ => direction,
        };
        let setup = (transfer_type == TransferType::Control).then_some(cmd.setup);
        let length = cmd.buffer.len();
        if let Some(packets) = &cmd.iso {
            let (endpoint, interval) = (cmd.ep, cmd.interval);
            self.iso
                .track(endpoint, direction, cmd.seqnum, packets.len(), interval);
        }
        let ahead = (cmd.iso.is_some() && direction == Direction::Out).then_some(cmd.ep);
        // An IN phase of a command whose CBW was answered ahead must not pass it to the device.
        let after = match (transfer_type, direction) {
            (TransferType::Bulk, Direction::In) => self
                .cbws_ahead
                .iter()
                .rev()
                .find(|c| c.endpoint_in == cmd.ep)
                .map(|c| UrbId(c.seqnum)),
            _ => None,
        };
        self.in_flight
            .insert(cmd.seqnum, in_flight_of(&cmd, cmd.seqnum, route, setup));
        let data = match cmd.buffer {
            SubmitBuffer::Out(data) => data,
            SubmitBuffer::In(_) => Vec::new(),
        };
        self.stats.submitted += 1;
        self.stats.bytes_out += data.len() as u64;
        self.actions.push_back(Action::Submit {
            endpoint: cmd.ep,
            direction: route,
            urb: UrbSubmit {
                id: UrbId(cmd.seqnum),
                endpoint: cmd.ep,
                direction,
                transfer_type,
                flags: cmd.transfer_flags & transfer_flags::FORWARDED,
                setup,
                length,
                data,
                interval: cmd.interval,
                iso: cmd.iso.map(|packets| IsoSubmit {
                    start_frame: cmd.start_frame,
                    packets,
                }),
            },
            after,
        });
        if let Some(endpoint) = ahead {
            self.answer_ahead(endpoint);
        }
    }

    /// Answers a kernel URB with a read-ahead completion, as if the server had run it.
    fn answer_with(&mut self, cmd: CmdSubmit, completion: UrbComplete) {
        self.stats.submitted += 1;
        let urb = in_flight_of(&cmd, cmd.seqnum, Direction::In, None);
        self.complete(cmd.seqnum, &urb, completion);
    }

    fn push_cancels(&mut self) {
        for cancel in self.read_ahead.take_cancels() {
            self.actions.push_back(Action::Unlink {
                endpoint: cancel.endpoint,
                direction: Direction::In,
                id: UrbId(cancel.id),
            });
        }
    }

    fn on_unlink(&mut self, cmd: CmdUnlink) {
        let Some(urb) = self.in_flight.get_mut(&cmd.unlink_seqnum) else {
            if let Some(parked) = self.read_ahead.unpark(cmd.unlink_seqnum) {
                // It was waiting here and never reached the server.
                self.stats.unlinked += 1;
                self.ret_unlink(cmd.seqnum, cmd.devid, UrbStatus::Unlinked);
                self.quiet_stream(parked.ep);
                return;
            }
            // Its RET_SUBMIT is already queued or sent: vhci gives the URB back from that and
            // ignores this answer.
            self.ret_unlink(cmd.seqnum, cmd.devid, UrbStatus::Ok);
            return;
        };
        if urb.unlinks.len() >= MAX_UNLINKS_PER_URB {
            self.fail(CloseReason::TooManyUnlinks(cmd.unlink_seqnum));
            return;
        }
        urb.unlinks.push(cmd.seqnum);
        if urb.unlinks.len() == 1 {
            let endpoint = urb.endpoint;
            self.actions.push_back(Action::Unlink {
                endpoint,
                direction: urb.route,
                id: UrbId(urb.wire_id),
            });
            if urb.direction == Direction::In {
                self.quiet_stream(endpoint);
            }
        }
    }

    fn cancelled(&mut self, urb: &InFlight) {
        self.stats.unlinked += 1;
        if urb.iso.is_some() {
            self.iso.forget(urb.wire_id);
        }
        for &unlink in &urb.unlinks {
            self.ret_unlink(unlink, urb.devid, UrbStatus::Unlinked);
        }
    }

    /// Answers an OUT URB here as if all its bytes had gone out.
    fn answer_out_here(&mut self, cmd: &CmdSubmit) {
        self.stats.answered_locally += 1;
        Pdu::RetSubmit(RetSubmit {
            seqnum: cmd.seqnum,
            devid: cmd.devid,
            ep: cmd.ep,
            status: UrbStatus::Ok,
            transferred: Transferred::Out(cmd.buffer.len()),
            start_frame: 0,
            error_count: 0,
            iso: None,
        })
        .encode(&mut self.to_kernel);
    }

    fn answer_locally(&mut self, cmd: &CmdSubmit, status: UrbStatus) {
        self.stats.answered_locally += 1;
        let iso = cmd.iso.as_ref().map(|packets| {
            packets
                .iter()
                .map(|p| IsoPacket {
                    actual_length: 0,
                    status,
                    ..*p
                })
                .collect::<Vec<_>>()
        });
        let ret = RetSubmit {
            seqnum: cmd.seqnum,
            devid: cmd.devid,
            ep: cmd.ep,
            status,
            transferred: match cmd.buffer.direction() {
                Direction::Out => Transferred::Out(0),
                Direction::In => Transferred::In(Vec::new()),
            },
            start_frame: cmd.start_frame,
            error_count: iso.as_ref().map_or(0, |p| p.len() as u32),
            iso,
        };
        Pdu::RetSubmit(ret).encode(&mut self.to_kernel);
    }

    fn ret_unlink(&mut self, seqnum: u32, devid: u32, status: UrbStatus) {
        Pdu::RetUnlink(RetUnlink {
            seqnum,
            devid,
            status,
        })
        .encode(&mut self.to_kernel);
    }

    fn fail(&mut self, reason: CloseReason) {
        if !self.failed {
            tracing::warn!(error = %reason, "closing the vhci port session");
            self.failed = true;
            self.close = Some(reason);
        }
    }
}

/// What the session keeps about `cmd` while the server runs it as `wire_id`.
fn in_flight_of(
    cmd: &CmdSubmit,
    wire_id: u32,
    route: Direction,
    setup: Option<SetupPacket>,
) -> InFlight {
    InFlight {
        wire_id,
        devid: cmd.devid,
        endpoint: cmd.ep,
        route,
        direction: cmd.buffer.direction(),
        buffer_len: cmd.buffer.len(),
        setup,
        iso: cmd.iso.clone(),
        unlinks: Vec::new(),
    }
}

/// Builds the RET_SUBMIT for `urb` from the server's completion, refusing anything vhci would
/// choke on: vhci trusts lengths and iso counts, and a mismatch corrupts memory or kills the
/// port.
fn ret_submit(id: u32, urb: &InFlight, c: UrbComplete) -> Result<RetSubmit, BadCompletion> {
    let too_long = |actual: u64| BadCompletion::TooLong {
        actual,
        buffer: urb.buffer_len,
    };
    let transferred = match urb.direction {
        Direction::In => {
            if c.data.len() > urb.buffer_len as usize {
                return Err(too_long(c.data.len() as u64));
            }
            if c.data.len() != c.actual_length as usize {
                return Err(BadCompletion::LengthMismatch {
                    data: c.data.len(),
                    actual: c.actual_length,
                });
            }
            Transferred::In(c.data)
        }
        Direction::Out => {
            if !c.data.is_empty() {
                return Err(BadCompletion::OutWithData(c.data.len()));
            }
            if c.actual_length > urb.buffer_len {
                return Err(too_long(c.actual_length.into()));
            }
            Transferred::Out(c.actual_length)
        }
    };
    let (start_frame, error_count, iso) = match (&urb.iso, c.iso) {
        (None, None) => (0, 0, None),
        (None, Some(_)) => return Err(BadCompletion::UnexpectedIso),
        (Some(sent), None) => {
            // A URB that failed as a whole (device gone, cancelled) may come back without
            // packet results; vhci still needs one descriptor per submitted packet.
            if transferred.actual_length() != 0 {
                return Err(BadCompletion::MissingIso);
            }
            let failed = c.status != UrbStatus::Ok;
            let packets = sent
                .iter()
                .map(|p| IsoPacket {
                    actual_length: 0,
                    status: c.status,
                    ..*p
                })
                .collect::<Vec<_>>();
            let errors = if failed { packets.len() as u32 } else { 0 };
            (0, errors, Some(packets))
        }
        (Some(sent), Some(back)) => {
            if back.packets.len() != sent.len() {
                return Err(BadCompletion::IsoPacketCount {
                    sent: sent.len(),
                    got: back.packets.len(),
                });
            }
            if back.error_count as usize > sent.len() {
                return Err(BadCompletion::IsoErrorCount {
                    errors: back.error_count,
                    packets: sent.len(),
                });
            }
            // vhci takes each packet's offset and length from the RET_SUBMIT and spreads packed
            // IN data by them, so ours (the kernel's own) go back, never the server's.
            let mut packets = Vec::with_capacity(sent.len());
            for (index, (mine, theirs)) in sent.iter().zip(&back.packets).enumerate() {
                if theirs.actual_length > mine.length {
                    return Err(BadCompletion::IsoPacketOverrun {
                        index,
                        actual: theirs.actual_length,
                        length: mine.length,
                    });
                }
                packets.push(IsoPacket {
                    actual_length: theirs.actual_length,
                    status: theirs.status,
                    ..*mine
                });
            }
            if let Transferred::In(data) = &transferred {
                let sum: u64 = packets.iter().map(|p| u64::from(p.actual_length)).sum();
                if sum != data.len() as u64 {
                    return Err(BadCompletion::IsoSumMismatch {
                        sum,
                        data: data.len(),
                    });
                }
            }
            (back.start_frame, back.error_count, Some(packets))
        }
    };
    Ok(RetSubmit {
        seqnum: id,
        devid: urb.devid,
        ep: urb.endpoint,
        status: c.status,
        transferred,
        start_frame,
        error_count,
        iso,
    })
}
