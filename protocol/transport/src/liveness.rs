//! Ending a connection whose peer has gone silent, whatever QUIC's idle timer thinks.
//!
//! QUIC restarts its idle timer on the first ack-eliciting packet sent on a path it has not
//! sent on since it last heard from the peer, and noq starts every new path in that state. iroh
//! opens new paths on its own after a link change and while hole punching (every 5 s while it
//! has new address candidates), so with the peer gone those openings keep a dead connection
//! alive: in the lab a 10 s cut outlived the 1.5 s idle timeout after interfaces came and went.
//! A silent peer still holds its claims and its vhci port there, so both daemons also watch the
//! one thing that proves the peer alive, datagrams from it, and close the connection
//! themselves once none has come for [`crate::NetConfig::dead_peer_bound`]. A live peer
//! sends at least its keep-alive every sixth of the idle timeout, or acks what we send.

use std::time::{Duration, Instant};

use iroh::endpoint::{Connection, VarInt};
use tracing::warn;

/// What the watch concluded from one look at the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Heard from within the bound.
    Alive,
    /// Nothing received for this long, at or past the bound.
    Silent(Duration),
}

/// The sans-IO core: fed the connection's received-datagram count and the time, says whether
/// the peer is still heard from.
#[derive(Debug, Clone)]
pub struct Silence {
    bound: Duration,
    last_count: u64,
    last_heard: Instant,
    last_look: Instant,
}

impl Silence {
    /// Starts counting from `count` received datagrams at `now`.
    pub fn new(bound: Duration, count: u64, now: Instant) -> Self {
        Silence {
            bound,
            last_count: count,
            last_heard: now,
            last_look: now,
        }
    }

    /// How often to look: a tenth of the bound, so silence is reported at most 10 % late.
    pub fn look_every(&self) -> Duration {
        (self.bound / 10).max(Duration::from_millis(10))
    }

    /// Looks at the count again. Any change counts as hearing from the peer: the connection's
    /// totals are summed over its live paths, so they can also drop when a path is discarded,
    /// and a drop is no evidence of silence. A look that comes long after the last one starts the
    /// count again: this process was not scheduled (a loaded Pi, the lab's emulated CPU), and
    /// the datagrams that arrived meanwhile may not have been read yet.
    pub fn observe(&mut self, count: u64, now: Instant) -> Verdict {
        let stalled = now.saturating_duration_since(self.last_look) > 2 * self.look_every();
        self.last_look = now;
        if count != self.last_count || stalled {
            self.last_count = count;
            self.last_heard = now;
            return Verdict::Alive;
        }
        let quiet = now.saturating_duration_since(self.last_heard);
        if quiet >= self.bound {
            Verdict::Silent(quiet)
        } else {
            Verdict::Alive
        }
    }
}

/// Watches `conn` until it closes, and closes it with `code` if the peer (named `peer` in the
/// log) is silent for `bound`. Spawn it beside whatever serves the connection: that code sees
/// the close as it sees an idle timeout.
pub async fn watch(conn: Connection, bound: Duration, code: u32, peer: String) {
    let received = |c: &Connection| c.stats().udp_rx.datagrams;
    let mut silence = Silence::new(bound, received(&conn), Instant::now());
    let mut tick = tokio::time::interval(silence.look_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            _ = tick.tick() => {}
        }
        if let Verdict::Silent(quiet) = silence.observe(received(&conn), Instant::now()) {
            warn!(%peer, "nothing heard from the peer for {quiet:.1?}: closing the connection");
            conn.close(VarInt::from_u32(code), b"peer silent");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_millis(1750);
    const LOOK: Duration = Duration::from_millis(175);

    /// Looks every [`LOOK`] from `from` until `until` with the count left at `count`; the
    /// first verdict that is not `Alive`, with when.
    fn look_until(
        s: &mut Silence,
        count: u64,
        from: Instant,
        until: Instant,
    ) -> Option<(Duration, Duration)> {
        let mut now = from;
        while now <= until {
            if let Verdict::Silent(quiet) = s.observe(count, now) {
                return Some((now - from, quiet));
            }
            now += LOOK;
        }
        None
    }

    #[test]
    fn a_peer_heard_from_stays_alive_however_long_the_connection_lasts() {
        let t0 = Instant::now();
        let mut s = Silence::new(BOUND, 0, t0);
        for i in 1..100u64 {
            let now = t0 + LOOK * i as u32;
            assert_eq!(s.observe(i, now), Verdict::Alive);
        }
    }

    #[test]
    fn silence_is_reported_at_the_bound_and_not_before() {
        let t0 = Instant::now();
        let mut s = Silence::new(BOUND, 7, t0);
        assert_eq!(s.observe(8, t0 + LOOK), Verdict::Alive);
        let (after, quiet) = look_until(&mut s, 8, t0 + 2 * LOOK, t0 + 10 * BOUND).unwrap();
        assert_eq!(
            quiet, BOUND,
            "reported at the first look at or past the bound"
        );
        assert_eq!(after + LOOK, BOUND);
    }

    #[test]
    fn a_count_that_drops_is_not_silence() {
        let t0 = Instant::now();
        let mut s = Silence::new(BOUND, 500, t0);
        let (_, quiet) = look_until(&mut s, 120, t0 + LOOK, t0 + 10 * BOUND).unwrap();
        assert_eq!(quiet, BOUND, "silence counts from the drop");
    }

    #[test]
    fn a_look_after_our_own_stall_restarts_the_count() {
        let t0 = Instant::now();
        let mut s = Silence::new(BOUND, 3, t0);
        let woke = t0 + 3 * BOUND;
        assert_eq!(s.observe(3, woke), Verdict::Alive, "not scheduled for 5 s");
        let (after, _) = look_until(&mut s, 3, woke + LOOK, woke + 10 * BOUND).unwrap();
        assert_eq!(after + LOOK, BOUND, "a whole bound from the wake-up");
    }

    #[test]
    fn the_watch_looks_often_enough_to_be_at_most_a_tenth_late() {
        let t0 = Instant::now();
        assert_eq!(Silence::new(BOUND, 0, t0).look_every(), LOOK);
        assert_eq!(
            Silence::new(Duration::from_millis(50), 0, t0).look_every(),
            Duration::from_millis(10)
        );
    }
}
