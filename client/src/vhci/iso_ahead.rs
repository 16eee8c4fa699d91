//! Isochronous streams of one port: OUT URBs answered ahead of the server, and what each
//! endpoint's stream did (underruns, packet errors), with no I/O.
//!
//! An audio driver keeps a fixed handful of iso OUT URBs queued (snd-usb-audio up to twelve, a
//! few milliseconds of sound each) and refills one as each completes. Through a tunnel every
//! completion comes a round trip late, so when that handful holds less sound than the round
//! trip the device runs dry between URBs and the stream plays slow. So the port answers iso
//! OUT URBs to the kernel as soon as they are sent on, up to a *depth* of URBs the server has
//! not run yet; each server completion of such a URB frees room for the next. The depth covers
//! the measured round trip with a margin ([`depth`]) and is bounded ([`MAX_AHEAD`],
//! [`MAX_AHEAD_TIME`]), which bounds the latency it adds. Only OUT is answered ahead: an IN
//! URB's answer is the device's data.
//!
//! An early answer says every packet moved. What it hid is counted per endpoint
//! ([`IsoEndpointStats`]): errors the server reported afterwards, and **underruns**, where a
//! URB the driver queued while others were still running started later than the one before it
//! ended, so the device had nothing to play (or record) for those frames.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use protocol::usb::{Direction, EndpointNumber, IsoPacket, Speed, UrbStatus};
use protocol::wire::UrbComplete;
use serde::{Deserialize, Serialize};

/// The most iso OUT URBs one endpoint has answered ahead of the server.
pub const MAX_AHEAD: usize = 32;
/// The most sound answered ahead on one endpoint: the latency this can add.
pub const MAX_AHEAD_TIME: Duration = Duration::from_millis(250);
/// The round trip is covered with this much to spare (as a fraction), for its jitter.
const MARGIN: f64 = 0.5;

/// What one endpoint's isochronous stream did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsoEndpointStats {
    /// Endpoint number.
    pub endpoint: u8,
    /// `"in"` or `"out"`.
    pub direction: IsoDirection,
    /// URBs the server completed.
    pub urbs: u64,
    /// URBs answered to the kernel before the server ran them.
    pub answered_ahead: u64,
    /// The depth in use now (URBs answered ahead at most).
    pub depth: u64,
    /// Times the stream ran dry: a URB began after a gap behind the one before it.
    pub underruns: u64,
    /// (Micro)frames those gaps lasted.
    pub missed_frames: u64,
    /// Packets that ended with an error.
    pub packet_errors: u64,
    /// URBs answered ahead that the server then failed as a whole.
    pub hidden_errors: u64,
}

/// A stream's direction, as it reads in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IsoDirection {
    /// Device to host (capture).
    #[default]
    In,
    /// Host to device (playback).
    Out,
}

impl From<Direction> for IsoDirection {
    fn from(d: Direction) -> Self {
        match d {
            Direction::In => IsoDirection::In,
            Direction::Out => IsoDirection::Out,
        }
    }
}

/// How many URBs of `urb_time` each to answer ahead on a link of `rtt`: enough to cover the
/// round trip and half again, at least one on any link, within [`MAX_AHEAD`] and
/// [`MAX_AHEAD_TIME`]. No measured round trip yet means none.
pub fn depth(rtt: Option<Duration>, urb_time: Duration) -> usize {
    let Some(rtt) = rtt.filter(|r| !r.is_zero()) else {
        return 0;
    };
    if urb_time.is_zero() {
        return 1;
    }
    let cover = (rtt.as_secs_f64() * (1.0 + MARGIN) / urb_time.as_secs_f64()).ceil() as usize;
    let by_time = (MAX_AHEAD_TIME.as_secs_f64() / urb_time.as_secs_f64()) as usize;
    cover.clamp(1, MAX_AHEAD.min(by_time.max(1)))
}

/// One iso URB the server has not completed yet.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    endpoint: EndpointNumber,
    /// Packets times the endpoint's interval: the (micro)frames the URB covers.
    frames: u32,
    /// The driver queued it while others of the endpoint were running: a gap before it is
    /// an underrun, not a (re)start.
    continues: bool,
    /// Answered to the kernel already.
    ahead: bool,
}

#[derive(Debug, Default)]
struct Stream {
    stats: IsoEndpointStats,
    /// Tracked URBs of this endpoint.
    running: usize,
    /// Answered ahead and not yet completed by the server.
    ahead: usize,
    /// OUT URBs not answered yet, oldest first: the next to answer ahead.
    waiting: VecDeque<u32>,
    /// Where the last completed URB's (micro)frames ended.
    next_frame: Option<u32>,
    /// How long the last URB plays.
    urb_time: Duration,
}

/// Every iso stream of one port. See the module docs.
#[derive(Debug)]
pub struct IsoStreams {
    /// How long one (micro)frame lasts at the device's speed.
    frame: Duration,
    /// The (micro)frame counter wraps at this.
    modulus: u32,
    rtt: Option<Duration>,
    /// Off while telemetry times every URB's own trip.
    answer_ahead: bool,
    streams: HashMap<(EndpointNumber, Direction), Stream>,
    tracked: HashMap<u32, (Direction, Tracked)>,
}

impl IsoStreams {
    /// Streams of a device at `speed`: full and low speed count 1 ms frames (11 bits), faster
    /// ones 125 µs microframes (14 bits), as host controllers report `start_frame`.
    pub fn new(speed: Speed) -> Self {
        let (frame, modulus) = match speed {
            Speed::Low | Speed::Full | Speed::Unknown => (Duration::from_millis(1), 2048),
            _ => (Duration::from_micros(125), 16384),
        };
        IsoStreams {
            frame,
            modulus,
            rtt: None,
            answer_ahead: true,
            streams: HashMap::new(),
            tracked: HashMap::new(),
        }
    }

    /// Turns answering ahead on or off (counting goes on either way).
    pub fn set_answer_ahead(&mut self, on: bool) {
        self.answer_ahead = on;
    }

    /// The round trip to the server as last measured; sets the depth of what comes next.
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.rtt = Some(rtt);
    }

    /// An iso URB sent to the server as `id`: `packets` packets, one per `interval`
    /// (micro)frames.
    pub fn track(
        &mut self,
        endpoint: EndpointNumber,
        direction: Direction,
        id: u32,
        packets: usize,
        interval: i32,
    ) {
        let interval = u32::try_from(interval).unwrap_or(1).clamp(1, 1 << 15);
        let frames = u32::try_from(packets)
            .unwrap_or(u32::MAX)
            .saturating_mul(interval);
        let urb_time = self.frame.saturating_mul(frames);
        let stream = self.stream(endpoint, direction);
        stream.urb_time = urb_time;
        let continues = stream.running > 0;
        stream.running += 1;
        if direction == Direction::Out {
            stream.waiting.push_back(id);
        }
        let t = Tracked {
            endpoint,
            frames,
            continues,
            ahead: false,
        };
        self.tracked.insert(id, (direction, t));
    }

    /// The oldest OUT URB of `endpoint` to answer ahead now, if the depth allows one;
    /// `eligible` says whether the session can still answer it (in flight, not being
    /// unlinked). The caller answers it to the kernel.
    pub fn take_ahead(
        &mut self,
        endpoint: EndpointNumber,
        mut eligible: impl FnMut(u32) -> bool,
    ) -> Option<u32> {
        let rtt = self.rtt.filter(|_| self.answer_ahead);
        let stream = self.streams.get_mut(&(endpoint, Direction::Out))?;
        let depth = depth(rtt, stream.urb_time);
        stream.stats.depth = depth as u64;
        while stream.ahead < depth {
            let id = stream.waiting.pop_front()?;
            if !eligible(id) {
                continue;
            }
            if let Some((_, t)) = self.tracked.get_mut(&id) {
                t.ahead = true;
                stream.ahead += 1;
                stream.stats.answered_ahead += 1;
                return Some(id);
            }
        }
        None
    }

    /// Whether `id` was answered ahead and waits only for the server.
    pub fn is_ahead(&self, id: u32) -> bool {
        self.tracked.get(&id).is_some_and(|(_, t)| t.ahead)
    }

    /// The server's completion of a tracked URB: counts what the stream did. Returns the
    /// endpoint whose room it freed if the URB had been answered ahead (the caller drops the
    /// completion then, and may answer the next one ahead).
    pub fn on_completion(&mut self, c: &UrbComplete) -> Option<EndpointNumber> {
        let (direction, t) = self.tracked.remove(&c.id.0)?;
        let modulus = self.modulus;
        let stream = self.stream(t.endpoint, direction);
        stream.running = stream.running.saturating_sub(1);
        stream.waiting.retain(|&w| w != c.id.0);
        stream.stats.urbs += 1;
        if let Some(iso) = &c.iso {
            stream.stats.packet_errors += iso
                .packets
                .iter()
                .filter(|p| p.status != UrbStatus::Ok)
                .count() as u64;
            let start = (iso.start_frame as u32) % modulus;
            if t.continues
                && let Some(expected) = stream.next_frame
            {
                let gap = (start + modulus - expected) % modulus;
                if gap > 0 && gap < modulus / 2 {
                    stream.stats.underruns += 1;
                    stream.stats.missed_frames += u64::from(gap);
                }
            }
            stream.next_frame = Some((start + t.frames % modulus) % modulus);
        }
        if !t.ahead {
            return None;
        }
        stream.ahead = stream.ahead.saturating_sub(1);
        if c.status != UrbStatus::Ok {
            stream.stats.hidden_errors += 1;
        }
        Some(t.endpoint)
    }

    /// A tracked URB ended without the server (unlinked): it no longer runs.
    pub fn forget(&mut self, id: u32) {
        if let Some((direction, t)) = self.tracked.remove(&id) {
            let stream = self.stream(t.endpoint, direction);
            stream.running = stream.running.saturating_sub(1);
            stream.waiting.retain(|&w| w != id);
            if t.ahead {
                stream.ahead = stream.ahead.saturating_sub(1);
            }
        }
    }

    /// Each stream's counters, by endpoint.
    pub fn stats(&self) -> Vec<IsoEndpointStats> {
        let mut all: Vec<_> = self.streams.values().map(|s| s.stats).collect();
        all.sort_by_key(|s| (s.endpoint, s.direction == IsoDirection::Out));
        all
    }

    fn stream(&mut self, endpoint: EndpointNumber, direction: Direction) -> &mut Stream {
        self.streams
            .entry((endpoint, direction))
            .or_insert_with(|| Stream {
                stats: IsoEndpointStats {
                    endpoint: endpoint.get(),
                    direction: direction.into(),
                    ..IsoEndpointStats::default()
                },
                ..Stream::default()
            })
    }
}

/// The kernel's packets of an iso OUT URB as a success: every packet moved whole. What an
/// early answer tells vhci.
pub fn all_moved(packets: &[IsoPacket]) -> Vec<IsoPacket> {
    packets
        .iter()
        .map(|p| IsoPacket {
            actual_length: p.length,
            status: UrbStatus::Ok,
            ..*p
        })
        .collect()
}

#[cfg(test)]
mod tests;
