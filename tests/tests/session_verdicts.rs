//! TCP judged by session, under `BPF_PROG_TEST_RUN`: each case loads a fresh program with
//! the sock_ops program attached (for this process's namespace) and the flows and proven
//! sources it would have recorded, then checks each crafted frame's verdict and the exact
//! counters it changes.

use std::net::IpAddr;

use limiter_common::layout::{Budget, DUPLICATE_ACK_LIMIT, SourceKey, Stat};
use limiter_tests::{
    Harness, XDP_ABORTED, XDP_DROP, XDP_PASS,
    frame::{DST_V4, DST_V6, Frame, SRC_PORT, tcp},
};
use limiter_user::{
    LimitSpec, Mode, Policy, Rate,
    sessions::{Backfill, TcpSocket, plan_backfill},
};

const PORT: u16 = 443;
const CLIENT: &str = "198.51.100.7";
const CLIENT_V6: &str = "2001:db8:7::7";
const STRANGER: &str = "203.0.113.9";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// What the kernel would report for clients connected to our listener on [`PORT`] from
/// [`SRC_PORT`]: their flows, and them as proven.
fn established(clients: &[&str]) -> Backfill {
    let mut sockets = vec![TcpSocket {
        listening: true,
        local: (ip("0.0.0.0"), PORT),
        remote: (ip("0.0.0.0"), 0),
    }];
    for client in clients {
        let client = ip(client);
        let local = match client {
            IpAddr::V4(_) => IpAddr::V4(DST_V4),
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => IpAddr::V6(DST_V4.to_ipv6_mapped()),
            IpAddr::V6(_) => IpAddr::V6(DST_V6),
        };
        sockets.push(TcpSocket {
            listening: false,
            local: (local, PORT),
            remote: (client, SRC_PORT),
        });
    }
    plan_backfill(&sockets, 32, 64)
}

fn policy(limit: LimitSpec) -> Policy {
    Policy {
        default_limit: limit,
        unproven: Rate::new(2, 2),
        out_of_state: Rate::new(3, 3),
        ..Policy::default()
    }
}

/// Runs the frames in order, checking each verdict and the counters it changed.
fn check(harness: &Harness, name: &str, steps: &[(&str, Vec<u8>, u32, &[Stat])]) {
    for (i, (what, frame, verdict, counters)) in steps.iter().enumerate() {
        let (got, changed) = harness.run(frame);
        assert_ne!(got, XDP_ABORTED, "{name} step {i} ({what}): XDP_ABORTED");
        let mut expected: Vec<(Stat, u64)> = counters.iter().map(|c| (*c, 1)).collect();
        expected.sort_by_key(|(c, _)| *c as u32);
        assert_eq!(
            (got, changed),
            (*verdict, expected),
            "{name} step {i} ({what}): verdict (1 drop, 2 pass) and counters"
        );
    }
}

fn ack(src: &str) -> Frame {
    Frame::tcp(src, PORT, tcp::ACK)
}

fn source_state(harness: &Harness, addr: &str) -> Option<limiter_common::layout::SourceState> {
    let len = if ip(addr).is_ipv4() { 32 } else { 64 };
    harness
        .limiter
        .source(&SourceKey::from_addr(ip(addr), len, 0).with_budget(Budget::Tcp))
        .unwrap()
}

#[test]
fn acks_of_an_established_flow_spend_its_ack_budget_not_the_source() {
    let harness = Harness::with_sessions(
        &policy(LimitSpec {
            acks: Some(Rate::new(3, 3)),
            ..LimitSpec::packets(1, 1)
        }),
        &established(&[CLIENT]),
    );
    let in_flow = |n: u32| ack(CLIENT).ack(n).build();
    check(
        &harness,
        "in-state ACKs",
        &[
            ("ACK 1", in_flow(1), XDP_PASS, &[Stat::FlowAck]),
            ("ACK 2", in_flow(2), XDP_PASS, &[Stat::FlowAck]),
            ("ACK 3", in_flow(3), XDP_PASS, &[Stat::FlowAck]),
            (
                "ACK 4: the flow's budget is spent, the source's packet budget takes it",
                in_flow(4),
                XDP_PASS,
                &[Stat::WithinLimit, Stat::AckFallback, Stat::SourceInserted],
            ),
            (
                "ACK 5: both spent: dropped as an ACK, not as the source's excess",
                in_flow(5),
                XDP_DROP,
                &[Stat::RateAcks, Stat::AckFallback],
            ),
        ],
    );
    let state = source_state(&harness, CLIENT).expect("state from the fallback");
    assert_eq!(state.excess_interval, 0, "ACK accounting is never excess");
    assert_eq!(state.blocked_until_ns, 0);
}

#[test]
fn a_duplicate_ack_storm_falls_back_to_the_source() {
    let harness = Harness::with_sessions(
        &policy(LimitSpec::packets(1_000, 1_000)),
        &established(&[CLIENT]),
    );
    let dup = || ack(CLIENT).ack(77).build();
    check(
        &harness,
        "first",
        &[("ACK 77", dup(), XDP_PASS, &[Stat::FlowAck])],
    );
    for i in 0..DUPLICATE_ACK_LIMIT {
        let (verdict, changed) = harness.run(&dup());
        assert_eq!(
            (verdict, changed),
            (XDP_PASS, vec![(Stat::FlowAck, 1)]),
            "duplicate {i} is loss recovery, within the flow's budget"
        );
    }
    check(
        &harness,
        "storm",
        &[
            (
                "one duplicate too many: the source pays",
                dup(),
                XDP_PASS,
                &[Stat::WithinLimit, Stat::AckFallback, Stat::SourceInserted],
            ),
            (
                "a new acknowledgement number ends the storm",
                ack(CLIENT).ack(78).build(),
                XDP_PASS,
                &[Stat::FlowAck],
            ),
        ],
    );
}

#[test]
fn tcp_of_no_flow_spends_the_out_of_state_bucket_and_no_state() {
    let harness = Harness::with_sessions(
        &policy(LimitSpec::packets(1_000, 1_000)),
        &established(&[CLIENT]),
    );
    check(
        &harness,
        "out of state",
        &[
            (
                "an ACK of no flow",
                ack(STRANGER).src_port(1111).build(),
                XDP_PASS,
                &[Stat::OutOfState],
            ),
            (
                "data carrying the proven client's address, another port",
                ack(CLIENT).src_port(2222).payload(100).build(),
                XDP_PASS,
                &[Stat::OutOfState],
            ),
            (
                "a RST of no flow",
                Frame::tcp(STRANGER, PORT, tcp::RST).build(),
                XDP_PASS,
                &[Stat::OutOfState],
            ),
            (
                "a FIN of no flow: the bucket (3) is spent",
                Frame::tcp(STRANGER, PORT, tcp::FIN | tcp::ACK).build(),
                XDP_DROP,
                &[Stat::RateOutOfState],
            ),
            (
                "an IPv6 ACK of no flow: its own family's bucket",
                ack(CLIENT_V6).build(),
                XDP_PASS,
                &[Stat::OutOfState],
            ),
            (
                "the client's real flow is unaffected",
                ack(CLIENT).build(),
                XDP_PASS,
                &[Stat::FlowAck],
            ),
        ],
    );
    assert!(source_state(&harness, STRANGER).is_none(), "no state");
    assert!(
        source_state(&harness, CLIENT).is_none(),
        "nothing charged to the client"
    );
}

#[test]
fn syns_from_unproven_sources_get_no_state_and_their_own_bucket() {
    let harness = Harness::with_sessions(
        &policy(LimitSpec::packets(1_000, 1_000)),
        &established(&[CLIENT]),
    );
    let syn = |src: &str| Frame::tcp(src, PORT, tcp::SYN).build();
    check(
        &harness,
        "unproven SYNs",
        &[
            (
                "stranger 1",
                syn("203.0.113.1"),
                XDP_PASS,
                &[Stat::Unproven],
            ),
            (
                "stranger 2",
                syn("203.0.113.2"),
                XDP_PASS,
                &[Stat::Unproven],
            ),
            (
                "stranger 3: the bucket (2) is spent",
                syn("203.0.113.3"),
                XDP_DROP,
                &[Stat::RateUnproven],
            ),
            (
                "an IPv6 stranger: its own family's bucket",
                syn("2001:db8:9::1"),
                XDP_PASS,
                &[Stat::Unproven],
            ),
            (
                "the proven client: its own state, whatever the flood",
                syn(CLIENT),
                XDP_PASS,
                &[Stat::WithinLimit, Stat::SourceInserted],
            ),
            (
                "data of the client's flow: its source budget",
                ack(CLIENT).payload(200).build(),
                XDP_PASS,
                &[Stat::WithinLimit],
            ),
        ],
    );
    for stranger in ["203.0.113.1", "203.0.113.2", "203.0.113.3"] {
        assert!(source_state(&harness, stranger).is_none(), "{stranger}");
    }
}

#[test]
fn ipv4_mapped_peers_of_a_dual_stack_listener_match_ipv4_packets() {
    let harness = Harness::with_sessions(
        &policy(LimitSpec::packets(1_000, 1_000)),
        &established(&["::ffff:198.51.100.7"]),
    );
    check(
        &harness,
        "mapped",
        &[
            (
                "the IPv4 packet of a flow the listener saw as ::ffff:198.51.100.7",
                ack(CLIENT).build(),
                XDP_PASS,
                &[Stat::FlowAck],
            ),
            (
                "and its SYN is a proven source's",
                Frame::tcp(CLIENT, PORT, tcp::SYN).build(),
                XDP_PASS,
                &[Stat::WithinLimit, Stat::SourceInserted],
            ),
        ],
    );
}

#[test]
fn connection_rate() {
    let harness = Harness::with_sessions(
        &policy(LimitSpec {
            connections: Some(Rate::new(1, 2)),
            ..LimitSpec::packets(1_000, 1_000)
        }),
        &established(&[CLIENT]),
    );
    let syn = || Frame::tcp(CLIENT, PORT, tcp::SYN).src_port(50_000).build();
    check(
        &harness,
        "connections",
        &[
            (
                "connection 1",
                syn(),
                XDP_PASS,
                &[Stat::WithinLimit, Stat::SourceInserted],
            ),
            ("connection 2", syn(), XDP_PASS, &[Stat::WithinLimit]),
            (
                "connection 3: over",
                syn(),
                XDP_DROP,
                &[Stat::RateConnections],
            ),
            (
                "data on the established flow is not a connection",
                ack(CLIENT).payload(10).build(),
                XDP_PASS,
                &[Stat::WithinLimit],
            ),
        ],
    );
}

#[test]
fn udp_in_a_clients_name_spends_its_other_budget_not_its_tcp_one() {
    let harness =
        Harness::with_sessions(&policy(LimitSpec::packets(2, 2)), &established(&[CLIENT]));
    let udp = || Frame::udp(CLIENT, 53).build();
    let data = || ack(CLIENT).payload(50).build();
    check(
        &harness,
        "budgets",
        &[
            (
                "UDP 1",
                udp(),
                XDP_PASS,
                &[Stat::WithinLimit, Stat::SourceInserted],
            ),
            ("UDP 2", udp(), XDP_PASS, &[Stat::WithinLimit]),
            ("UDP 3: over", udp(), XDP_DROP, &[Stat::RatePackets]),
            (
                "TCP data of the client's flow: its TCP budget is whole",
                data(),
                XDP_PASS,
                &[Stat::WithinLimit, Stat::SourceInserted],
            ),
            ("TCP data 2", data(), XDP_PASS, &[Stat::WithinLimit]),
        ],
    );
}

#[test]
fn a_source_that_held_state_keeps_it_without_proof() {
    // A source tracked before sessions were switched on (or proven since its state was
    // made) keeps its per-source limits for SYNs.
    let policy = policy(LimitSpec::packets(1_000, 1_000));
    let mut harness = Harness::with_sessions(&policy, &established(&[]));
    let key = SourceKey::from_addr(ip(STRANGER), 32, 0).with_budget(Budget::Tcp);
    harness
        .limiter
        .set_source(
            &key,
            &limiter_common::layout::SourceState {
                updated_ns: 1,
                ..Default::default()
            },
        )
        .unwrap();
    check(
        &harness,
        "held state",
        &[(
            "a SYN from a tracked source",
            Frame::tcp(STRANGER, PORT, tcp::SYN).build(),
            XDP_PASS,
            &[Stat::WithinLimit],
        )],
    );
}

#[test]
fn monitor_mode_counts_would_drops_per_reason() {
    let harness = Harness::with_sessions(
        &Policy {
            mode: Mode::Monitor,
            ..policy(LimitSpec::packets(1_000, 1_000))
        },
        &established(&[]),
    );
    let syn = |n: u8| Frame::tcp(&format!("203.0.113.{n}"), PORT, tcp::SYN).build();
    let before = harness.stats();
    for n in 1..=5 {
        let (verdict, _) = harness.run(&syn(n));
        assert_eq!(verdict, XDP_PASS, "monitor mode passes everything");
    }
    for n in 1..=5 {
        harness.run(&ack(&format!("203.0.113.{n}")).build());
    }
    let after = harness.stats();
    let delta = |s: Stat| after.packets(s) - before.packets(s);
    let would = |s: Stat| after.would_drop(s).packets - before.would_drop(s).packets;
    assert_eq!(delta(Stat::Unproven), 2);
    assert_eq!(delta(Stat::OutOfState), 3);
    assert_eq!(delta(Stat::MonitorWouldDrop), 3 + 2);
    assert_eq!(would(Stat::RateUnproven), 3, "per reason");
    assert_eq!(would(Stat::RateOutOfState), 2, "per reason");
    assert_eq!(would(Stat::RatePackets), 0);
}

#[test]
fn without_sessions_tcp_is_judged_packet_by_packet() {
    // The policy asks for sessions but nothing attached the sock_ops program: the flag
    // stays off, so no established connection is ever taken for out of state.
    let harness = Harness::new(&policy(LimitSpec::packets(1_000, 1_000)));
    assert!(!harness.limiter.sessions_attached());
    check(
        &harness,
        "no sessions",
        &[(
            "an ACK of an unknown flow is the source's packet",
            ack(STRANGER).build(),
            XDP_PASS,
            &[Stat::WithinLimit, Stat::SourceInserted],
        )],
    );
}
