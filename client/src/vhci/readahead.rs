//! Bulk read-ahead for USB mass storage, so a long round trip costs one RTT per SCSI command
//! instead of three.
//!
//! Bulk-Only Transport runs every command in three phases, each waiting for the last: the
//! kernel sends a CBW (bulk OUT), then reads the data (bulk IN), then reads the CSW (bulk IN).
//! Forwarded one by one that is three round trips. But the CBW says what comes next: a READ's
//! CBW names the data length, and a CSW is always 13 bytes. So the moment the kernel hands us
//! a CBW, we also queue those IN transfers on the server, on the IN endpoint's own stream
//! (where USB's order keeps them behind anything already there), and when the kernel's own
//! IN URBs arrive they take the results, often already here, in the same order.
//!
//! A write (data OUT) has its CSW read ahead too, once the kernel has sent the whole data
//! phase. And a CBW is answered to the kernel as soon as it is sent on
//! ([`BulkOut::answer_now`]), so the kernel's next URB is on its way while the CBW crosses the
//! network: a write's data follows a round trip sooner (one round trip per write instead of
//! two), and a read's data and CSW URBs are waiting when their results arrive (one kernel turn
//! less per read). Only CBWs whose later phases cannot reach the device before them are
//! answered: a write's (its data rides the same stream and endpoint queue) and a read's that
//! has its phases read ahead (the server holds those until the CBW has run; a kernel IN URB
//! that goes to the server on its own meanwhile is sent to wait on the CBW as well). That
//! answer is the only one here the device has not given yet, and it is safe because BOT
//! decides a command's fate in its CSW, never in the CBW's transfer status. A CBW the device
//! refused leaves it without the command: what was held behind it is refused with it, and the
//! port fails the kernel's next URB of that command with `-EPROTO` (a transport error), so
//! usb-storage runs its reset recovery at once, as it would have on the CBW's own failure.
//!
//! Every speculation goes to the server with `SubmitAfter` naming the URB before it (the CBW
//! or a write's last data URB, then the data phase for the CSW): the server holds it
//! until that URB has completed on the device, as the kernel would have. A device may stall an
//! IN that arrives before its command, or take a CSW read queued behind the data phase for
//! more data (QEMU's usb-storage does both), and the OUT and IN streams race to the server.
//!
//! Correctness is kept by construction: the speculative URBs are ordinary URBs the device
//! runs in the order the kernel would have run them, so the data and statuses the kernel sees
//! are the device's own. A kernel URB that does not match the next speculation (another
//! length or flags) waits for it to settle: a speculation the device answered is the next
//! thing the device sent, and is handed over as such (with `-EOVERFLOW` if it does not fit,
//! as a host controller would report babble); one our unlink cancelled never reached the
//! device, and the kernel's URB then goes to the server as usual. After a mismatch the port
//! stops speculating. A failed phase cancels the speculations queued behind it.
//!
//! Interrupt-IN streaming ([`interrupt`]) polls keyboards, mice and the like ahead of the
//! kernel with the same queues, so the same matching rules hold.
//!
//! Speculative URBs take ids from the top of the `u32` range, counting down; the kernel's
//! seqnums count up from 1 and would need four billion URBs to meet them. Before that
//! happens ([`ReadAhead::note_kernel_seqnum`]) read-ahead turns itself off.

use std::collections::{HashMap, VecDeque};

use protocol::bot;
use protocol::usb::{EndpointNumber, TransferType, UrbStatus, transfer_flags};
use protocol::usbip::CmdSubmit;
use protocol::wire::UrbComplete;

pub mod interrupt;
pub mod widen;

pub use interrupt::STREAM_DEPTH;
use protocol::scsi::CapacityQuery;
use widen::{Plan, Widen};

/// The length of a Command Status Wrapper, as an URB length.
pub const CSW_LEN: u32 = bot::CSW_LEN as u32;
/// The largest data phase read ahead: what usb-storage asks for at most on a SuperSpeed disk
/// (2,048 sectors). Longer phases are left to the kernel's own URBs.
pub const MAX_DATA_LEN: u32 = 1024 * 1024;
/// Speculations kept per endpoint: one command's data and CSW, with room for one more
/// command. Past it a CBW is forwarded without read-ahead.
const MAX_QUEUED: usize = 4;
const FIRST_ID: u32 = u32::MAX;
/// Kernel seqnums at or past this turn read-ahead off for the port.
pub const LOWEST_ID: u32 = 0xf000_0000;

/// The flags usb-storage gives its IN URBs, as vhci forwards them: `usb_sg_init` sets
/// `URB_SHORT_NOT_OK` on data phases; the CSW read has none. Both carry `URB_DIR_IN`.
const DATA_FLAGS: u32 = transfer_flags::SHORT_NOT_OK | transfer_flags::DIR_IN;
const CSW_FLAGS: u32 = transfer_flags::DIR_IN;

/// What a CBW tells read-ahead: the command's data phase, which is one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cbw {
    /// No data phase: the CSW comes next.
    NoData,
    /// The device will send this many bytes.
    DataIn(u32),
    /// The kernel will send this many bytes.
    DataOut(u32),
}

/// Reads `data` as a CBW, if it is a valid one (anything else is forwarded as it is).
pub fn parse_cbw(data: &[u8]) -> Option<Cbw> {
    bot::Cbw::parse(data).ok().map(|cbw| Cbw::of(&cbw))
}

impl Cbw {
    fn of(cbw: &bot::Cbw) -> Cbw {
        match (cbw.data_len, cbw.data_in) {
            (0, _) => Cbw::NoData,
            (length, true) => Cbw::DataIn(length),
            (length, false) => Cbw::DataOut(length),
        }
    }
}

/// A speculative IN URB for the port to send to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Speculate {
    /// Its wire id.
    pub id: u32,
    /// The IN endpoint.
    pub endpoint: EndpointNumber,
    /// Bytes to read.
    pub length: u32,
    /// `URB_*` flags, as the kernel's own URB for this phase will carry them.
    pub flags: u32,
    /// Bulk for a BOT phase, interrupt when streamed.
    pub transfer_type: TransferType,
    /// The polling interval the kernel's URB asked for (0 for bulk).
    pub interval: i32,
    /// The URB the server must see complete before it runs this one: the CBW or a write's
    /// last data URB (kernel seqnums), or for a CSW the data read before it. None for
    /// interrupt streaming.
    pub after: Option<u32>,
}

/// A speculative URB to cancel on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancel {
    /// Its wire id.
    pub id: u32,
    /// The IN endpoint.
    pub endpoint: EndpointNumber,
}

/// Where a kernel IN URB goes.
#[derive(Debug)]
pub enum Claim {
    /// No speculation for it: forward it as usual.
    Forward(CmdSubmit),
    /// Answer it now with this completion.
    Answer(CmdSubmit, UrbComplete),
    /// It takes over the speculative URB `id`, still running on the server.
    Bound(CmdSubmit, u32),
    /// It waits for a speculation to settle; [`ReadAhead::on_completion`] returns it.
    Parked,
}

/// What a server completion means.
#[derive(Debug)]
pub enum Settled {
    /// Not a speculation's: the port handles it.
    NotOurs(UrbComplete),
    /// The speculation the kernel's URB `seqnum` took over completed; answer that URB.
    Kernel(u32, UrbComplete),
    /// A parked kernel URB gets this completion.
    Answer(CmdSubmit, UrbComplete),
    /// A parked kernel URB must go to the server after all.
    Forward(CmdSubmit),
    /// The speculation the kernel's URB `cmd` took over never reached the device (the URB
    /// before it failed, or it was cancelled): the port sends `cmd` to the server itself,
    /// unless the kernel unlinked it meanwhile, and then answers it with this completion.
    Refused(CmdSubmit, UrbComplete),
    /// Kept for a kernel URB still to come, or dropped.
    Absorbed,
}

#[derive(Debug)]
enum State {
    Running,
    Done(UrbComplete),
    /// A kernel URB took it over; kept to send it to the server itself should the server
    /// refuse the speculation (the URB before it failed).
    Bound(CmdSubmit),
    Parked(CmdSubmit),
}

/// What a speculation's result means beyond being the device's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Plain,
    /// A widened READ's data phase: the kernel takes its own part ([`widen`]).
    WideData,
    /// A widened READ's CSW.
    WideCsw,
    /// READ CAPACITY's data on this LUN: where widening must stop.
    Capacity(u8, CapacityQuery),
}

/// A phase to read ahead: its length on the device, the length of the kernel URB that
/// takes it, its flags and its role.
#[derive(Debug, Clone, Copy)]
struct Phase {
    length: u32,
    claims: u32,
    flags: u32,
    role: Role,
}

impl Phase {
    fn plain(length: u32, flags: u32) -> Phase {
        Phase {
            length,
            claims: length,
            flags,
            role: Role::Plain,
        }
    }
}

#[derive(Debug)]
struct Speculation {
    id: u32,
    /// The length of the kernel URB that takes it (the device's phase may be longer).
    claims: u32,
    flags: u32,
    role: Role,
    /// We asked the server to cancel it.
    cancelling: bool,
    state: State,
}

impl Speculation {
    fn unclaimed(&self) -> bool {
        matches!(self.state, State::Running | State::Done(_))
    }
}

/// What read-ahead makes of a bulk OUT URB on a BOT endpoint.
#[derive(Debug, Default)]
pub struct BulkOut {
    /// IN URBs to queue behind it.
    pub speculate: Vec<Speculate>,
    /// It is a CBW whose later phases cannot reach the device before it: the port may
    /// answer it to the kernel now (see the module docs).
    pub answer_now: bool,
    /// What it said, if it was a CBW.
    pub cbw: Option<Cbw>,
    /// Send these bytes in its place: the same READ, widened ([`widen`]).
    pub rewrite: Option<[u8; bot::CBW_LEN]>,
    /// A READ answered here from a widened READ's data: send nothing, answer it now; its
    /// data and CSW URBs find their answers queued.
    pub served: bool,
}

/// Counters for the UI and the lab.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadAheadStats {
    /// Speculative URBs sent.
    pub speculated: u64,
    /// Kernel URBs answered by a speculation (at once or when it completed).
    pub hits: u64,
    /// Kernel URBs that did not match the speculation in front of them.
    pub mismatches: u64,
    /// Speculations whose result no kernel URB took (flushed by a new command).
    pub discarded: u64,
    /// READs sent widened ([`widen`]).
    pub widened: u64,
    /// READs answered here from a widened READ's data.
    pub served: u64,
    /// READs answered partly from a widened READ's data, the rest read widened anew.
    pub joined: u64,
    /// Widened READs that did not pass whole.
    pub widen_failed: u64,
}

/// The read-ahead state of one port.
#[derive(Debug)]
pub struct ReadAhead {
    enabled: bool,
    /// Interrupt-IN streaming; turned off with read-ahead by a mismatch.
    streaming: bool,
    queues: HashMap<EndpointNumber, VecDeque<Speculation>>,
    /// Per IN endpoint, the bytes of a write's data phase the kernel has still to send: its
    /// CSW is read ahead behind the last of them.
    writes: HashMap<EndpointNumber, u32>,
    next_id: u32,
    cancels: Vec<Cancel>,
    stats: ReadAheadStats,
    /// The longest READ widened, in bytes (0: none).
    widen_limit: u32,
    /// Widening per BOT IN endpoint.
    widen: HashMap<EndpointNumber, Widen>,
}

impl ReadAhead {
    /// Read-ahead that speculates if `enabled`.
    pub fn new(enabled: bool) -> Self {
        ReadAhead {
            enabled,
            streaming: false,
            queues: HashMap::new(),
            writes: HashMap::new(),
            next_id: FIRST_ID,
            cancels: Vec::new(),
            stats: ReadAheadStats::default(),
            widen_limit: 0,
            widen: HashMap::new(),
        }
    }

    /// Widens sequential READs up to `limit` bytes (at most [`MAX_DATA_LEN`]; 0: never).
    pub fn widen_reads(&mut self, limit: u32) {
        self.widen_limit = limit;
    }

    /// The longest READ widened, in bytes, as set (read-ahead caps it at [`MAX_DATA_LEN`]).
    pub fn widen_limit(&self) -> u32 {
        self.widen_limit
    }

    /// The counters so far.
    pub fn stats(&self) -> ReadAheadStats {
        let mut stats = self.stats;
        for w in self.widen.values() {
            let w = w.stats();
            stats.widened += w.widened;
            stats.served += w.served;
            stats.joined += w.joined;
            stats.widen_failed += w.failed;
        }
        stats
    }

    /// Whether `id` is a speculation still known here.
    pub fn owns(&self, id: u32) -> bool {
        self.find(id).is_some()
    }

    /// Turns read-ahead off for good once the kernel's seqnums near the speculative ids.
    pub fn note_kernel_seqnum(&mut self, seqnum: u32) {
        if seqnum >= LOWEST_ID && self.enabled {
            tracing::info!(
                seqnum,
                "kernel seqnums near the read-ahead ids: read-ahead off"
            );
            self.enabled = false;
            self.streaming = false;
        }
    }

    /// The kernel sent the bulk OUT URB `seqnum` carrying `data` on a BOT OUT endpoint whose
    /// IN endpoint is `endpoint_in`: a CBW, or part of a write's data phase.
    pub fn on_bulk_out(
        &mut self,
        endpoint_in: EndpointNumber,
        seqnum: u32,
        data: &[u8],
    ) -> BulkOut {
        if let Some(remaining) = self.writes.remove(&endpoint_in) {
            let sent = u32::try_from(data.len()).unwrap_or(u32::MAX);
            let speculate = match sent.cmp(&remaining) {
                std::cmp::Ordering::Less => {
                    self.writes.insert(endpoint_in, remaining - sent);
                    Vec::new()
                }
                std::cmp::Ordering::Equal => {
                    self.queue_phases(endpoint_in, &[Phase::plain(CSW_LEN, CSW_FLAGS)], seqnum)
                }
                // More than the CBW announced: not a command we understand.
                std::cmp::Ordering::Greater => Vec::new(),
            };
            return BulkOut {
                speculate,
                ..BulkOut::default()
            };
        }
        let Ok(parsed) = bot::Cbw::parse(data) else {
            return BulkOut::default();
        };
        let cbw = Cbw::of(&parsed);
        let (speculate, rewrite, served) = match self.plan(endpoint_in, &parsed) {
            Plan::AsIs { capacity } => {
                let speculate = self.on_cbw(endpoint_in, cbw, seqnum);
                if let (Some((lun, query)), Some(data)) = (capacity, speculate.first())
                    && matches!(cbw, Cbw::DataIn(_))
                {
                    self.set_role(endpoint_in, data.id, Role::Capacity(lun, query));
                }
                (speculate, None, false)
            }
            Plan::Widened { cbw: wide, length } => {
                self.flush(endpoint_in);
                let data = Phase {
                    length,
                    claims: parsed.data_len,
                    flags: DATA_FLAGS,
                    role: Role::WideData,
                };
                let csw = Phase {
                    role: Role::WideCsw,
                    ..Phase::plain(CSW_LEN, CSW_FLAGS)
                };
                let speculate = self.queue_phases(endpoint_in, &[data, csw], seqnum);
                let w = self.widen.get_mut(&endpoint_in).expect("planned above");
                match &speculate[..] {
                    [data, csw] => {
                        w.bind(data.id, csw.id);
                        (speculate, Some(wide), false)
                    }
                    _ => {
                        w.abandon();
                        (speculate, None, false)
                    }
                }
            }
            Plan::Served { data, csw } => {
                self.flush(endpoint_in);
                let queue = self.queues.entry(endpoint_in).or_default();
                for (bytes, flags) in [(data, DATA_FLAGS), (csw.to_vec(), CSW_FLAGS)] {
                    let length = bytes.len() as u32;
                    push_with_next_id(&mut self.next_id, queue, length, flags, Role::Plain, |id| {
                        State::Done(UrbComplete {
                            id: protocol::wire::UrbId(id),
                            status: UrbStatus::Ok,
                            actual_length: length,
                            data: bytes,
                            iso: None,
                            timing: None,
                        })
                    });
                }
                (Vec::new(), None, true)
            }
        };
        // A write's data follows its CBW on the same stream; a read's phases (or a CSW alone)
        // follow it only when read ahead, which the server holds until the CBW has run.
        let answer_now = self.enabled
            && match cbw {
                Cbw::DataOut(_) => true,
                Cbw::DataIn(_) | Cbw::NoData => !speculate.is_empty(),
            };
        BulkOut {
            speculate,
            answer_now,
            cbw: Some(cbw),
            rewrite,
            served,
        }
    }

    /// What widening makes of a CBW; nothing while read-ahead is off (then nothing is kept
    /// either: a mismatch turned it off, and what was kept is never looked at again).
    fn plan(&mut self, endpoint_in: EndpointNumber, cbw: &bot::Cbw) -> Plan {
        // Serving takes two ids; near the end of them read-ahead turns itself off anyway.
        let ids_left = self.next_id.saturating_sub(LOWEST_ID);
        if !self.enabled || ids_left < 4 {
            return Plan::AsIs { capacity: None };
        }
        let limit = self.widen_limit.min(MAX_DATA_LEN);
        self.widen.entry(endpoint_in).or_default().plan(cbw, limit)
    }

    fn set_role(&mut self, endpoint: EndpointNumber, id: u32, role: Role) {
        if let Some(spec) = self
            .queues
            .get_mut(&endpoint)
            .and_then(|q| q.iter_mut().find(|s| s.id == id))
        {
            spec.role = role;
        }
    }

    /// The kernel sent `cbw` (URB `seqnum`) on a BOT OUT endpoint whose IN endpoint is
    /// `endpoint_in`: the IN URBs to queue behind it. A write's CSW waits for its data.
    pub fn on_cbw(&mut self, endpoint_in: EndpointNumber, cbw: Cbw, seqnum: u32) -> Vec<Speculate> {
        if !self.enabled {
            return Vec::new();
        }
        self.flush(endpoint_in);
        match cbw {
            Cbw::DataOut(length) => {
                self.writes.insert(endpoint_in, length);
                Vec::new()
            }
            Cbw::NoData => {
                self.queue_phases(endpoint_in, &[Phase::plain(CSW_LEN, CSW_FLAGS)], seqnum)
            }
            Cbw::DataIn(length) if length <= MAX_DATA_LEN => self.queue_phases(
                endpoint_in,
                &[
                    Phase::plain(length, DATA_FLAGS),
                    Phase::plain(CSW_LEN, CSW_FLAGS),
                ],
                seqnum,
            ),
            Cbw::DataIn(_) => Vec::new(),
        }
    }

    /// Queues bulk IN speculations of these lengths and flags, the first to run after
    /// `after`, each next one after the one before it: a device may take an IN queued behind
    /// the data phase for more data (QEMU's usb-storage holds it there for good), so the CSW
    /// read reaches it only once the data phase has ended.
    fn queue_phases(
        &mut self,
        endpoint_in: EndpointNumber,
        phases: &[Phase],
        mut after: u32,
    ) -> Vec<Speculate> {
        let room = MAX_QUEUED.saturating_sub(phases.len());
        let ids_left = self.next_id.saturating_sub(LOWEST_ID) as usize;
        let queue = self.queues.entry(endpoint_in).or_default();
        if !self.enabled || ids_left < phases.len() || queue.len() > room {
            return Vec::new();
        }
        let out: Vec<Speculate> = phases
            .iter()
            .map(|phase| {
                let id = push_with_next_id(
                    &mut self.next_id,
                    queue,
                    phase.claims,
                    phase.flags,
                    phase.role,
                    |_| State::Running,
                );
                let spec = Speculate {
                    id,
                    endpoint: endpoint_in,
                    length: phase.length,
                    flags: phase.flags,
                    transfer_type: TransferType::Bulk,
                    interval: 0,
                    after: Some(after),
                };
                after = id;
                spec
            })
            .collect();
        self.stats.speculated += out.len() as u64;
        out
    }

    /// A control URB goes out: usb-storage's reset recovery (Bulk-Only Mass Storage Reset,
    /// CLEAR_FEATURE) after a failed phase, so a write still owed its data is over.
    pub fn on_control(&mut self) {
        self.writes.clear();
        for w in self.widen.values_mut() {
            w.on_control();
        }
    }

    /// Routes a kernel bulk IN URB (or, while streaming, interrupt IN URB) on `endpoint`.
    pub fn claim(&mut self, endpoint: EndpointNumber, cmd: CmdSubmit) -> Claim {
        // The kernel reads: whatever write it was sending is over (finished, or abandoned).
        self.writes.remove(&endpoint);
        let Some(queue) = self.queues.get_mut(&endpoint) else {
            return Claim::Forward(cmd);
        };
        let flags = cmd.transfer_flags & transfer_flags::FORWARDED;
        loop {
            let Some(index) = queue.iter().position(Speculation::unclaimed) else {
                return Claim::Forward(cmd);
            };
            let spec = &mut queue[index];
            let matches = spec.claims == cmd.buffer.len() && spec.flags == flags;
            if !matches && !spec.cancelling {
                self.stats.mismatches += 1;
                tracing::info!(
                    seqnum = cmd.seqnum,
                    want = cmd.buffer.len(),
                    have = spec.claims,
                    "a kernel URB does not match the read-ahead: read-ahead off for this port"
                );
                self.enabled = false;
                self.streaming = false;
                cancel_from(queue, index, endpoint, &mut self.cancels);
                continue;
            }
            let spec = &mut queue[index];
            match std::mem::replace(&mut spec.state, State::Running) {
                State::Running if matches && !spec.cancelling => {
                    spec.state = State::Bound(cmd.clone());
                    self.stats.hits += 1;
                    return Claim::Bound(cmd, spec.id);
                }
                State::Running => {
                    spec.state = State::Parked(cmd);
                    return Claim::Parked;
                }
                State::Done(c) => {
                    queue.remove(index);
                    self.stats.hits += 1;
                    let length = cmd.buffer.len();
                    return Claim::Answer(cmd, fit(c, length));
                }
                State::Bound(_) | State::Parked(_) => unreachable!("only unclaimed are chosen"),
            }
        }
    }

    /// Takes back a parked kernel URB that the kernel unlinked; `None` if `seqnum` is not
    /// parked here.
    pub fn unpark(&mut self, seqnum: u32) -> Option<CmdSubmit> {
        for queue in self.queues.values_mut() {
            for spec in queue.iter_mut() {
                if matches!(&spec.state, State::Parked(c) if c.seqnum == seqnum) {
                    let State::Parked(cmd) = std::mem::replace(&mut spec.state, State::Running)
                    else {
                        unreachable!()
                    };
                    return Some(cmd);
                }
            }
        }
        None
    }

    /// The kernel seqnum that took over speculation `id`, if one did.
    pub fn bound_seqnum(&self, id: u32) -> Option<u32> {
        let (endpoint, index) = self.find(id)?;
        match self.queues[&endpoint][index].state {
            State::Bound(ref cmd) => Some(cmd.seqnum),
            _ => None,
        }
    }

    /// Routes a completion from the server.
    pub fn on_completion(&mut self, c: UrbComplete) -> Settled {
        let Some((endpoint, index)) = self.find(c.id.0) else {
            return Settled::NotOurs(c);
        };
        let role = self.queues[&endpoint][index].role;
        let c = match (role, self.widen.get_mut(&endpoint)) {
            (Role::WideData, Some(w)) => w.on_data(c),
            (Role::WideCsw, Some(w)) => w.on_csw(c),
            (Role::Capacity(lun, query), Some(w)) => {
                w.on_capacity(lun, query, &c);
                c
            }
            _ => c,
        };
        let queue = self.queues.get_mut(&endpoint).expect("found above");
        let failed = c.status != UrbStatus::Ok;
        if failed {
            // The device's next transfers would not be the ones we guessed.
            cancel_from(queue, index + 1, endpoint, &mut self.cancels);
        }
        // Unlinked with nothing moved: it never reached the device, whether we cancelled it or
        // the server refused it because the URB before it failed.
        let cancelled =
            c.status == UrbStatus::Unlinked && (queue[index].cancelling || c.actual_length == 0);
        let spec = &mut queue[index];
        match std::mem::replace(&mut spec.state, State::Running) {
            State::Running if cancelled => {
                queue.remove(index);
                Settled::Absorbed
            }
            State::Running => {
                spec.state = State::Done(c);
                Settled::Absorbed
            }
            State::Bound(cmd) if cancelled => {
                queue.remove(index);
                Settled::Refused(cmd, c)
            }
            State::Bound(cmd) => {
                queue.remove(index);
                Settled::Kernel(cmd.seqnum, c)
            }
            State::Parked(cmd) => {
                queue.remove(index);
                if cancelled {
                    Settled::Forward(cmd)
                } else {
                    self.stats.hits += 1;
                    let length = cmd.buffer.len();
                    Settled::Answer(cmd, fit(c, length))
                }
            }
            State::Done(_) => {
                // A second completion for one id: keep the first, as the port does.
                tracing::debug!(id = c.id.0, "dropping a repeated read-ahead completion");
                Settled::Absorbed
            }
        }
    }

    /// Speculations to cancel on the server, gathered since the last call.
    pub fn take_cancels(&mut self) -> Vec<Cancel> {
        std::mem::take(&mut self.cancels)
    }

    /// A new command starts on `endpoint`: what the last one left unclaimed is stale.
    fn flush(&mut self, endpoint: EndpointNumber) {
        let Some(queue) = self.queues.get_mut(&endpoint) else {
            return;
        };
        let before = queue.len();
        queue.retain(|s| !matches!(s.state, State::Done(_)));
        self.stats.discarded += (before - queue.len()) as u64;
        cancel_from(queue, 0, endpoint, &mut self.cancels);
    }

    fn find(&self, id: u32) -> Option<(EndpointNumber, usize)> {
        if id < LOWEST_ID {
            return None;
        }
        self.queues
            .iter()
            .find_map(|(&e, q)| q.iter().position(|s| s.id == id).map(|i| (e, i)))
    }
}

/// Queues `spec` as the next speculation, with the next id (counting down), and returns it
/// with that id for the port to send.
fn push_speculation(
    next_id: &mut u32,
    queue: &mut VecDeque<Speculation>,
    mut spec: Speculate,
) -> Speculate {
    spec.id = push_with_next_id(next_id, queue, spec.length, spec.flags, Role::Plain, |_| {
        State::Running
    });
    spec
}

/// Queues a speculation that a kernel URB of `claims` bytes takes, under the next id (counting
/// down) and in `state(id)`, and returns the id.
fn push_with_next_id(
    next_id: &mut u32,
    queue: &mut VecDeque<Speculation>,
    claims: u32,
    flags: u32,
    role: Role,
    state: impl FnOnce(u32) -> State,
) -> u32 {
    let id = *next_id;
    *next_id -= 1;
    queue.push_back(Speculation {
        id,
        claims,
        flags,
        role,
        cancelling: false,
        state: state(id),
    });
    id
}

/// Marks every speculation from `start` on that no kernel URB took over as cancelling, and
/// asks the server to cancel those still running.
fn cancel_from(
    queue: &mut VecDeque<Speculation>,
    start: usize,
    endpoint: EndpointNumber,
    cancels: &mut Vec<Cancel>,
) {
    for spec in queue.iter_mut().skip(start) {
        if spec.cancelling || matches!(spec.state, State::Bound(_)) {
            continue;
        }
        spec.cancelling = true;
        if matches!(spec.state, State::Running | State::Parked(_)) {
            cancels.push(Cancel {
                id: spec.id,
                endpoint,
            });
        }
    }
}

/// A completion as the kernel URB of `buffer` bytes gets it: the device's data, or, if the
/// device sent more than that URB holds, what fits with `-EOVERFLOW` (babble).
fn fit(mut c: UrbComplete, buffer: u32) -> UrbComplete {
    if c.data.len() > buffer as usize {
        c.data.truncate(buffer as usize);
        c.actual_length = buffer;
        c.status = UrbStatus::Overflow;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::usb::SetupPacket;
    use protocol::usbip::SubmitBuffer;
    use protocol::wire::UrbId;

    /// A CBW that reads `len` bytes.
    pub(super) fn reading(len: u32) -> Cbw {
        Cbw::DataIn(len)
    }

    pub(super) fn ep(n: u8) -> EndpointNumber {
        EndpointNumber::new(n).unwrap()
    }

    fn cbw(length: u32, dir_in: bool) -> Vec<u8> {
        let read10 = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        protocol::bot::Cbw::new(1, length, dir_in, 0, &read10)
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    pub(super) fn kernel_in(seqnum: u32, len: u32, flags: u32) -> CmdSubmit {
        CmdSubmit {
            seqnum,
            devid: 1,
            ep: ep(1),
            transfer_flags: flags | 0x0004,
            start_frame: 0,
            interval: 0,
            setup: SetupPacket([0; 8]),
            buffer: SubmitBuffer::In(len),
            iso: None,
        }
    }

    pub(super) fn done(id: u32, status: UrbStatus, data: Vec<u8>) -> UrbComplete {
        UrbComplete {
            id: UrbId(id),
            status,
            actual_length: data.len() as u32,
            data,
            iso: None,
            timing: None,
        }
    }

    #[test]
    fn parses_only_real_cbws() {
        assert_eq!(parse_cbw(&cbw(4096, true)), Some(reading(4096)));
        assert_eq!(parse_cbw(&cbw(4096, false)), Some(Cbw::DataOut(4096)));
        assert_eq!(parse_cbw(&cbw(0, true)), Some(Cbw::NoData));
        assert_eq!(parse_cbw(&cbw(4096, true)[..30]), None);
        let mut bad = cbw(4096, true);
        bad[0] = b'X';
        assert_eq!(parse_cbw(&bad), None);
    }

    #[test]
    fn a_read_queues_data_then_csw_and_the_kernel_takes_both_in_order() {
        let mut ra = ReadAhead::new(true);
        let specs = ra.on_cbw(ep(1), parse_cbw(&cbw(8192, true)).unwrap(), 100);
        assert_eq!(specs.len(), 2);
        assert_eq!((specs[0].length, specs[0].flags), (8192, DATA_FLAGS));
        assert_eq!((specs[1].length, specs[1].flags), (CSW_LEN, CSW_FLAGS));
        assert!(specs[0].id > specs[1].id && specs[1].id >= LOWEST_ID);
        // Both complete before the kernel asks.
        assert!(matches!(
            ra.on_completion(done(specs[0].id, UrbStatus::Ok, vec![7; 8192])),
            Settled::Absorbed
        ));
        assert!(matches!(
            ra.on_completion(done(specs[1].id, UrbStatus::Ok, vec![1; 13])),
            Settled::Absorbed
        ));
        match ra.claim(ep(1), kernel_in(5, 8192, DATA_FLAGS)) {
            Claim::Answer(cmd, c) => {
                assert_eq!(cmd.seqnum, 5);
                assert_eq!(c.data, vec![7; 8192]);
            }
            other => panic!("{other:?}"),
        }
        match ra.claim(ep(1), kernel_in(6, 13, CSW_FLAGS)) {
            Claim::Answer(_, c) => assert_eq!(c.data, vec![1; 13]),
            other => panic!("{other:?}"),
        }
        assert_eq!(ra.stats().hits, 2);
        assert!(matches!(
            ra.claim(ep(1), kernel_in(7, 13, CSW_FLAGS)),
            Claim::Forward(_)
        ));
        assert!(ra.take_cancels().is_empty());
    }

    #[test]
    fn a_kernel_urb_that_comes_first_takes_over_the_running_speculation() {
        let mut ra = ReadAhead::new(true);
        let specs = ra.on_cbw(ep(1), Cbw::NoData, 100);
        assert_eq!(specs.len(), 1, "a write's CBW queues only the CSW");
        let Claim::Bound(cmd, id) = ra.claim(ep(1), kernel_in(9, 13, CSW_FLAGS)) else {
            panic!()
        };
        assert_eq!((cmd.seqnum, id), (9, specs[0].id));
        assert_eq!(ra.bound_seqnum(id), Some(9));
        match ra.on_completion(done(id, UrbStatus::Ok, vec![0; 13])) {
            Settled::Kernel(9, c) => assert_eq!(c.actual_length, 13),
            other => panic!("{other:?}"),
        }
        assert!(!ra.owns(id));
    }

    #[test]
    fn a_failed_data_phase_cancels_the_csw_behind_it() {
        let mut ra = ReadAhead::new(true);
        let specs = ra.on_cbw(ep(1), reading(512), 100);
        ra.on_completion(done(specs[0].id, UrbStatus::Stall, vec![]));
        assert_eq!(
            ra.take_cancels(),
            vec![Cancel {
                id: specs[1].id,
                endpoint: ep(1)
            }]
        );
        // The kernel takes the stall; its CSW read waits for the cancel to settle.
        assert!(matches!(
            ra.claim(ep(1), kernel_in(1, 512, DATA_FLAGS)),
            Claim::Answer(_, c) if c.status == UrbStatus::Stall
        ));
        assert!(matches!(
            ra.claim(ep(1), kernel_in(2, 13, CSW_FLAGS)),
            Claim::Parked
        ));
        // The cancel took effect: the device never saw it, so the kernel's URB goes out.
        match ra.on_completion(done(specs[1].id, UrbStatus::Unlinked, vec![])) {
            Settled::Forward(cmd) => assert_eq!(cmd.seqnum, 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_cancel_that_lost_the_race_still_delivers_the_devices_data() {
        let mut ra = ReadAhead::new(true);
        let specs = ra.on_cbw(ep(1), reading(512), 100);
        ra.on_completion(done(specs[0].id, UrbStatus::Stall, vec![]));
        ra.take_cancels();
        ra.claim(ep(1), kernel_in(1, 512, DATA_FLAGS));
        assert!(matches!(
            ra.claim(ep(1), kernel_in(2, 13, CSW_FLAGS)),
            Claim::Parked
        ));
        match ra.on_completion(done(specs[1].id, UrbStatus::Ok, vec![3; 13])) {
            Settled::Answer(cmd, c) => {
                assert_eq!(cmd.seqnum, 2);
                assert_eq!(c.data, vec![3; 13]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_mismatch_turns_read_ahead_off_and_overflows_what_does_not_fit() {
        let mut ra = ReadAhead::new(true);
        let specs = ra.on_cbw(ep(1), reading(1024), 100);
        ra.on_completion(done(specs[0].id, UrbStatus::Ok, vec![5; 1024]));
        match ra.claim(ep(1), kernel_in(1, 512, DATA_FLAGS)) {
            Claim::Answer(_, c) => {
                assert_eq!(c.status, UrbStatus::Overflow);
                assert_eq!(c.data.len(), 512);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ra.stats().mismatches, 1);
        assert_eq!(ra.take_cancels().len(), 1, "the CSW read was still running");
        assert!(ra.on_cbw(ep(1), Cbw::NoData, 100).is_empty());
    }

    #[test]
    fn a_parked_urb_can_be_unlinked_and_its_speculation_stays_known() {
        let mut ra = ReadAhead::new(true);
        let specs = ra.on_cbw(ep(1), reading(512), 100);
        // Flags the speculation did not guess: it waits for the cancelled read to settle.
        assert!(matches!(
            ra.claim(ep(1), kernel_in(1, 512, 0)),
            Claim::Parked
        ));
        assert_eq!(ra.unpark(1).map(|c| c.seqnum), Some(1));
        assert!(ra.unpark(1).is_none());
        assert!(ra.owns(specs[0].id));
        assert!(matches!(
            ra.on_completion(done(specs[0].id, UrbStatus::Unlinked, vec![])),
            Settled::Absorbed
        ));
        assert!(!ra.owns(specs[0].id));
    }

    #[test]
    fn a_new_command_discards_what_the_last_left() {
        let mut ra = ReadAhead::new(true);
        let first = ra.on_cbw(ep(1), reading(512), 100);
        ra.on_completion(done(first[0].id, UrbStatus::Ok, vec![0; 512]));
        let second = ra.on_cbw(ep(1), Cbw::NoData, 100);
        assert_eq!(second.len(), 1);
        assert_eq!(ra.stats().discarded, 1);
        assert_eq!(
            ra.take_cancels().len(),
            1,
            "the running CSW read is cancelled"
        );
    }

    #[test]
    fn a_write_reads_its_csw_ahead_only_once_all_its_data_is_sent() {
        let mut ra = ReadAhead::new(true);
        let cbw_out = ra.on_bulk_out(ep(1), 10, &cbw(1024, false));
        assert!(cbw_out.speculate.is_empty());
        assert!(cbw_out.answer_now, "a write's CBW is answered at once");
        let first = ra.on_bulk_out(ep(1), 11, &[0; 512]);
        assert!(first.speculate.is_empty() && !first.answer_now);
        let last = ra.on_bulk_out(ep(1), 12, &[0; 512]);
        assert!(!last.answer_now, "data is never answered ahead");
        let specs = last.speculate;
        assert_eq!(specs.len(), 1);
        assert_eq!((specs[0].length, specs[0].after), (CSW_LEN, Some(12)));
        // A write the kernel gave up on (it reads instead) leaves nothing behind: the next
        // CBW is read as one.
        assert!(
            ra.on_bulk_out(ep(1), 20, &cbw(1024, false))
                .speculate
                .is_empty()
        );
        let _ = ra.claim(ep(1), kernel_in(21, 13, CSW_FLAGS));
        let read = ra.on_bulk_out(ep(1), 22, &cbw(512, true));
        assert!(read.answer_now, "a read ahead's CBW is answered at once");
        let specs = read.speculate;
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].after, Some(22), "the data phase follows the CBW");
        assert_eq!(
            specs[1].after,
            Some(specs[0].id),
            "the CSW follows the data"
        );
    }

    #[test]
    fn a_data_phase_that_looks_like_a_cbw_is_not_answered_ahead() {
        let mut ra = ReadAhead::new(true);
        assert!(ra.on_bulk_out(ep(1), 10, &cbw(31, false)).answer_now);
        // The 31 bytes the kernel writes happen to be a write's CBW: still data.
        assert!(!ra.on_bulk_out(ep(1), 11, &cbw(4096, false)).answer_now);
    }

    #[test]
    fn a_read_cbw_is_answered_ahead_only_with_its_phases_held_behind_it() {
        let mut ra = ReadAhead::new(true);
        assert!(
            ra.on_bulk_out(ep(1), 10, &cbw(0, true)).answer_now,
            "no data"
        );
        let long = ra.on_bulk_out(ep(1), 11, &cbw(MAX_DATA_LEN + 512, true));
        assert!(
            long.speculate.is_empty() && !long.answer_now,
            "a data phase too long to read ahead: the kernel's own IN URB must not pass the CBW"
        );
        // The queue full (a command's phases unclaimed, then another's): nothing read ahead,
        // nothing answered.
        let mut full = ReadAhead::new(true);
        full.queues
            .entry(ep(1))
            .or_default()
            .extend((0..MAX_QUEUED as u32).map(|i| Speculation {
                id: i + 1,
                claims: 13,
                role: Role::Plain,
                flags: CSW_FLAGS,
                cancelling: false,
                state: State::Running,
            }));
        let read = full.on_bulk_out(ep(1), 12, &cbw(512, true));
        assert!(read.speculate.is_empty() && !read.answer_now);
    }

    #[test]
    fn without_read_ahead_no_cbw_is_answered_ahead() {
        let mut ra = ReadAhead::new(false);
        assert!(!ra.on_bulk_out(ep(1), 10, &cbw(1024, false)).answer_now);
        assert!(!ra.on_bulk_out(ep(1), 11, &cbw(1024, true)).answer_now);
    }

    #[test]
    fn kernel_seqnums_near_the_speculative_ids_turn_it_off() {
        let mut ra = ReadAhead::new(true);
        ra.note_kernel_seqnum(LOWEST_ID);
        assert!(ra.on_cbw(ep(1), reading(512), 100).is_empty());
        assert!(matches!(
            ra.on_completion(done(5, UrbStatus::Ok, vec![])),
            Settled::NotOurs(_)
        ));
    }
}
