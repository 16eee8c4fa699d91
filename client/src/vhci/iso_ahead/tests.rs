use std::collections::HashSet;
use std::time::Duration;

use proptest::prelude::*;
use protocol::usb::{Direction, EndpointNumber, IsoPacket, Speed, UrbStatus};
use protocol::wire::{IsoComplete, UrbComplete, UrbId};

use super::{IsoStreams, MAX_AHEAD, all_moved, depth};

const MS: Duration = Duration::from_millis(1);

fn ep(n: u8) -> EndpointNumber {
    EndpointNumber::new(n).unwrap()
}

/// The server's completion of an 8-packet URB that started at `start_frame`.
fn done(id: u32, start_frame: i32, status: UrbStatus, bad_packets: usize) -> UrbComplete {
    let packets = (0..8)
        .map(|i| IsoPacket {
            offset: i * 192,
            length: 192,
            actual_length: 192,
            status: if (i as usize) < bad_packets {
                UrbStatus::Other(18)
            } else {
                UrbStatus::Ok
            },
        })
        .collect();
    UrbComplete {
        id: UrbId(id),
        status,
        actual_length: 8 * 192,
        data: Vec::new(),
        timing: None,
        iso: Some(IsoComplete {
            start_frame,
            error_count: bad_packets as u32,
            packets,
        }),
    }
}

#[test]
fn the_depth_covers_the_round_trip_and_a_half_within_its_bounds() {
    assert_eq!(depth(None, 8 * MS), 0, "nothing measured, nothing ahead");
    assert_eq!(depth(Some(Duration::ZERO), 8 * MS), 0);
    assert_eq!(depth(Some(Duration::from_micros(300)), 8 * MS), 1);
    assert_eq!(depth(Some(20 * MS), 8 * MS), 4, "30 ms of 8 ms URBs");
    assert_eq!(depth(Some(20 * MS), MS), 30);
    assert_eq!(depth(Some(1000 * MS), MS), MAX_AHEAD);
    assert_eq!(
        depth(Some(1000 * MS), 10 * MS),
        25,
        "at most 250 ms of sound"
    );
    assert_eq!(
        depth(Some(1000 * MS), 400 * MS),
        1,
        "one URB even if it is long"
    );
}

#[test]
fn out_urbs_are_answered_ahead_up_to_the_depth_and_each_server_completion_frees_one() {
    let mut s = IsoStreams::new(Speed::Full);
    s.set_rtt(20 * MS);
    for id in 1..=6 {
        s.track(ep(1), Direction::Out, id, 8, 1);
    }
    let mut ahead = Vec::new();
    while let Some(id) = s.take_ahead(ep(1), |_| true) {
        ahead.push(id);
    }
    assert_eq!(ahead, [1, 2, 3, 4], "30 ms of 8 ms URBs");
    assert!(s.is_ahead(1) && !s.is_ahead(5));
    assert_eq!(s.on_completion(&done(1, 0, UrbStatus::Ok, 0)), Some(ep(1)));
    assert_eq!(s.take_ahead(ep(1), |_| true), Some(5));
    assert_eq!(s.take_ahead(ep(1), |_| true), None);
    // One being unlinked is skipped, and completes the ordinary way.
    assert_eq!(s.on_completion(&done(2, 8, UrbStatus::Ok, 0)), Some(ep(1)));
    assert_eq!(s.take_ahead(ep(1), |id| id != 6), None);
    assert_eq!(s.on_completion(&done(6, 40, UrbStatus::Ok, 0)), None);
    let stats = s.stats();
    assert_eq!(stats.len(), 1);
    assert_eq!((stats[0].answered_ahead, stats[0].depth), (5, 4));
}

#[test]
fn in_urbs_are_never_answered_ahead() {
    let mut s = IsoStreams::new(Speed::High);
    s.set_rtt(20 * MS);
    s.track(ep(2), Direction::In, 1, 8, 1);
    assert_eq!(s.take_ahead(ep(2), |_| true), None);
    assert_eq!(s.on_completion(&done(1, 0, UrbStatus::Ok, 0)), None);
}

#[test]
fn a_gap_between_running_urbs_is_an_underrun_and_a_restart_is_not() {
    let mut s = IsoStreams::new(Speed::Full);
    for id in 1..=5 {
        s.track(ep(1), Direction::Out, id, 8, 1);
    }
    s.on_completion(&done(1, 100, UrbStatus::Ok, 0));
    s.on_completion(&done(2, 108, UrbStatus::Ok, 0)); // back to back
    s.on_completion(&done(3, 110, UrbStatus::Ok, 0)); // queued early: overlaps, no gap
    s.on_completion(&done(4, 130, UrbStatus::Ok, 0)); // 12 frames of nothing
    s.on_completion(&done(5, 600, UrbStatus::Ok, 2)); // 462 frames of nothing
    let st = s.stats()[0];
    assert_eq!((st.underruns, st.missed_frames), (2, 12 + 462));
    assert_eq!(st.packet_errors, 2);
    // The counter wraps at 2048 frames: 2044 + 8 ends at 4.
    let mut w = IsoStreams::new(Speed::Full);
    for id in 1..=2 {
        w.track(ep(1), Direction::Out, id, 8, 1);
    }
    w.on_completion(&done(1, 2044, UrbStatus::Ok, 0));
    w.on_completion(&done(2, 4, UrbStatus::Ok, 0));
    assert_eq!(w.stats()[0].underruns, 0, "contiguous across the wrap");
    s.track(ep(1), Direction::Out, 7, 8, 1);
    s.on_completion(&done(7, 608, UrbStatus::Ok, 0));
    // The stream stopped (nothing running); the next URB starts it again, late by design.
    s.track(ep(1), Direction::Out, 8, 8, 1);
    s.on_completion(&done(8, 900, UrbStatus::Ok, 0));
    assert_eq!(s.stats()[0].underruns, 2, "a restart is not an underrun");
}

#[test]
fn errors_hidden_by_an_early_answer_are_counted_and_forget_frees_room() {
    let mut s = IsoStreams::new(Speed::Full);
    s.set_rtt(MS);
    s.track(ep(1), Direction::Out, 1, 8, 1);
    s.track(ep(1), Direction::Out, 2, 8, 1);
    assert_eq!(s.take_ahead(ep(1), |_| true), Some(1));
    assert_eq!(s.take_ahead(ep(1), |_| true), None, "depth 1");
    let mut failed = done(1, 0, UrbStatus::NoDevice, 0);
    failed.iso = None;
    assert_eq!(s.on_completion(&failed), Some(ep(1)));
    assert_eq!(s.stats()[0].hidden_errors, 1);
    assert_eq!(s.take_ahead(ep(1), |_| true), Some(2));
    s.forget(2);
    s.track(ep(1), Direction::Out, 3, 8, 1);
    assert_eq!(
        s.take_ahead(ep(1), |_| true),
        Some(3),
        "the forgotten one's room"
    );
}

#[test]
fn an_early_answer_says_every_packet_moved_whole() {
    let sent = [
        IsoPacket {
            offset: 0,
            length: 192,
            actual_length: 0,
            status: UrbStatus::Ok,
        },
        IsoPacket {
            offset: 192,
            length: 96,
            actual_length: 0,
            status: UrbStatus::Ok,
        },
    ];
    let moved = all_moved(&sent);
    assert_eq!(
        moved
            .iter()
            .map(|p| (p.offset, p.actual_length))
            .collect::<Vec<_>>(),
        [(0, 192), (192, 96)]
    );
}

#[derive(Debug, Clone)]
enum Step {
    Submit,
    Complete,
    Forget,
    Rtt(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Submit),
        3 => Just(Step::Complete),
        1 => Just(Step::Forget),
        1 => (0u64..300).prop_map(Step::Rtt),
    ]
}

proptest! {
    #[test]
    fn never_more_ahead_than_the_depth_and_each_urb_answered_once(
        steps in proptest::collection::vec(step(), 1..200),
        packets in 1usize..32,
    ) {
        let mut s = IsoStreams::new(Speed::Full);
        let mut next = 0u32;
        let mut running: Vec<u32> = Vec::new();
        let mut answered = HashSet::new();
        let mut rtt = None;
        let mut most = 0;
        for step in steps {
            match step {
                Step::Submit => {
                    next += 1;
                    s.track(ep(1), Direction::Out, next, packets, 1);
                    running.push(next);
                }
                Step::Complete if !running.is_empty() => {
                    let id = running.remove(0);
                    let freed = s.on_completion(&done(id, 0, UrbStatus::Ok, 0));
                    prop_assert_eq!(freed.is_some(), answered.contains(&id));
                }
                Step::Forget if !running.is_empty() => {
                    let id = running.pop().unwrap();
                    s.forget(id);
                }
                Step::Rtt(ms) => {
                    rtt = Some(Duration::from_millis(ms));
                    s.set_rtt(Duration::from_millis(ms));
                }
                _ => {}
            }
            while let Some(id) = s.take_ahead(ep(1), |id| running.contains(&id)) {
                prop_assert!(answered.insert(id), "URB {} answered twice", id);
            }
            // A lowered depth leaves more ahead until completions drain it, never more than
            // the largest depth used.
            most = most.max(depth(rtt, MS * packets as u32));
            let ahead = running.iter().filter(|id| answered.contains(id)).count();
            prop_assert!(ahead <= most && ahead <= MAX_AHEAD);
        }
    }
}
