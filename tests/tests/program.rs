//! The XDP program under `BPF_PROG_TEST_RUN`: crafted frames in, verdict and counter changes
//! out. Each case loads a fresh program with its own policy; each step names the exact set
//! of counters the frame must change.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use aya_obj::programs::XdpAttachType;

use ipnet::IpNet;
use limiter_common::layout::{Budget, ServiceProto, SourceKey, Stat};
use limiter_tests::{
    Harness, XDP_ABORTED, XDP_DROP, XDP_PASS,
    frame::{Ext, Frame, L4, ethertype, l3_offset, non_ip, proto},
};
use limiter_user::{Class, LimitSpec, Mode, Policy, Rate, Service};
use rand::{Rng, SeedableRng, rngs::StdRng};

struct Step {
    what: String,
    frame: Vec<u8>,
    verdict: u32,
    counters: Vec<Stat>,
}

fn step(what: impl Into<String>, frame: Vec<u8>, verdict: u32, counters: &[Stat]) -> Step {
    Step {
        what: what.into(),
        frame,
        verdict,
        counters: counters.to_vec(),
    }
}

/// First packet of a source: passed, and its state inserted.
const NEW: &[Stat] = &[Stat::WithinLimit, Stat::SourceInserted];
const PASS: &[Stat] = &[Stat::WithinLimit];
const MALFORMED: &[Stat] = &[Stat::Malformed];

fn run_case(name: &str, policy: &Policy, steps: Vec<Step>) -> Harness {
    let harness = Harness::new(policy);
    for (i, s) in steps.iter().enumerate() {
        let (verdict, changed) = harness.run(&s.frame);
        assert_ne!(
            verdict, XDP_ABORTED,
            "{name} step {i} ({}): XDP_ABORTED",
            s.what
        );
        let mut expected: Vec<(Stat, u64)> = s.counters.iter().map(|c| (*c, 1)).collect();
        expected.sort_by_key(|(c, _)| *c as u32);
        assert_eq!(
            (verdict, &changed),
            (s.verdict, &expected),
            "{name} step {i} ({}): verdict (1 drop, 2 pass) and counters",
            s.what
        );
    }
    harness
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn open_policy() -> Policy {
    Policy {
        default_limit: LimitSpec::packets(1_000, 1_000),
        ..Policy::default()
    }
}

fn deny_all() -> LimitSpec {
    LimitSpec::packets(0, 0)
}

#[test]
fn non_ip_frames_pass() {
    let mut tagged_arp = vec![0xff; 6];
    tagged_arp.extend_from_slice(&[2, 0, 0, 0, 0, 2]);
    tagged_arp.extend_from_slice(&ethertype::VLAN.to_be_bytes());
    tagged_arp.extend_from_slice(&[0, 10]);
    tagged_arp.extend_from_slice(&ethertype::ARP.to_be_bytes());
    tagged_arp.extend(std::iter::repeat_n(0u8, 46));
    run_case(
        "non-IP",
        &Policy {
            default_limit: deny_all(),
            ..Policy::default()
        },
        vec![
            step("ARP", non_ip(ethertype::ARP), XDP_PASS, &[Stat::NotIp]),
            step("LLDP", non_ip(ethertype::LLDP), XDP_PASS, &[Stat::NotIp]),
            step("ARP in a VLAN", tagged_arp, XDP_PASS, &[Stat::NotIp]),
            step(
                "ethernet header only",
                non_ip(0x9000)[..14].to_vec(),
                XDP_PASS,
                &[Stat::NotIp],
            ),
        ],
    );
}

#[test]
fn ipv4_transports() {
    run_case(
        "IPv4 transports",
        &open_policy(),
        vec![
            step("UDP", Frame::udp("192.0.2.10", 53).build(), XDP_PASS, NEW),
            step(
                "TCP",
                Frame::new(
                    "192.0.2.10",
                    L4::Tcp {
                        dst_port: 443,
                        flags: 0x02,
                    },
                )
                .build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "ICMP",
                Frame::new("192.0.2.10", L4::Icmp).build(),
                XDP_PASS,
                PASS,
            ),
            step(
                "GRE (unparsed transport)",
                Frame::new(
                    "192.0.2.10",
                    L4::Raw {
                        proto: proto::GRE,
                        bytes: vec![0; 4],
                    },
                )
                .build(),
                XDP_PASS,
                PASS,
            ),
        ],
    );
}

#[test]
fn ipv4_options_are_skipped_to_reach_the_port() {
    let policy = Policy {
        services: vec![Service {
            name: "blocked".into(),
            proto: ServiceProto::Tcp,
            ports: 443..=443,
            limit: deny_all(),
        }],
        ..open_policy()
    };
    let tcp = |port| L4::Tcp {
        dst_port: port,
        flags: 0x10,
    };
    run_case(
        "IPv4 options",
        &policy,
        vec![
            step(
                "40 bytes of options, port 443",
                Frame::new("192.0.2.10", tcp(443)).ipv4_options(40).build(),
                XDP_DROP,
                &[Stat::RatePackets, Stat::SourceInserted],
            ),
            step(
                "4 bytes of options, port 80",
                Frame::new("192.0.2.10", tcp(80)).ipv4_options(4).build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "no options, port 443",
                Frame::new("192.0.2.11", tcp(443)).build(),
                XDP_DROP,
                &[Stat::RatePackets, Stat::SourceInserted],
            ),
        ],
    );
}

#[test]
fn ipv4_header_checks() {
    let good = Frame::udp("192.0.2.10", 53).build();
    let l3 = l3_offset(&good);
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    run_case(
        "IPv4 header",
        &open_policy(),
        vec![
            step("IHL 4", with(&|b| b[l3] = 0x44), XDP_DROP, MALFORMED),
            step("IHL 0", with(&|b| b[l3] = 0x40), XDP_DROP, MALFORMED),
            step("version 5", with(&|b| b[l3] = 0x55), XDP_DROP, MALFORMED),
            step(
                "total length past the frame",
                with(&|b| b[l3 + 2..l3 + 4].copy_from_slice(&1000u16.to_be_bytes())),
                XDP_DROP,
                MALFORMED,
            ),
            step(
                "total length below the header",
                with(&|b| b[l3 + 2..l3 + 4].copy_from_slice(&19u16.to_be_bytes())),
                XDP_DROP,
                MALFORMED,
            ),
            step(
                "IHL 15 with its options present",
                Frame::udp("192.0.2.10", 53).ipv4_options(40).build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "trailing padding after the packet",
                with(&|b| b.extend_from_slice(&[0; 20])),
                XDP_PASS,
                PASS,
            ),
        ],
    );
}

#[test]
fn truncated_at_every_length() {
    let frames = [
        (
            "QinQ IPv4 TCP",
            Frame::new(
                "192.0.2.10",
                L4::Tcp {
                    dst_port: 443,
                    flags: 2,
                },
            )
            .vlan(ethertype::QINQ, 100)
            .vlan(ethertype::VLAN, 200)
            .ipv4_options(8)
            .payload(0)
            .build(),
        ),
        (
            "IPv6 extension chain UDP",
            Frame::udp("2001:db8::10", 53)
                .ext(Ext::HopByHop)
                .ext(Ext::Routing)
                .ext(Ext::Fragment {
                    offset: 0,
                    more: true,
                })
                .ext(Ext::DstOpts)
                .payload(0)
                .build(),
        ),
        (
            "IPv4 ICMP",
            Frame::new("192.0.2.10", L4::Icmp).payload(0).build(),
        ),
    ];
    for (name, full) in frames {
        let steps = (14..full.len())
            .map(|len| {
                step(
                    format!("{name} cut to {len} bytes"),
                    full[..len].to_vec(),
                    XDP_DROP,
                    MALFORMED,
                )
            })
            .chain([step(format!("{name} whole"), full.clone(), XDP_PASS, NEW)])
            .collect();
        run_case(name, &open_policy(), steps);
    }
}

#[test]
fn vlan_tags() {
    run_case(
        "VLAN",
        &open_policy(),
        vec![
            step(
                "802.1Q IPv4",
                Frame::udp("192.0.2.10", 53)
                    .vlan(ethertype::VLAN, 7)
                    .build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "QinQ IPv6",
                Frame::udp("2001:db8::10", 53)
                    .vlan(ethertype::QINQ, 7)
                    .vlan(ethertype::VLAN, 8)
                    .build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "three tags",
                Frame::udp("192.0.2.10", 53)
                    .vlan(ethertype::QINQ, 1)
                    .vlan(ethertype::VLAN, 2)
                    .vlan(ethertype::VLAN, 3)
                    .build(),
                XDP_DROP,
                MALFORMED,
            ),
        ],
    );
}

#[test]
fn ipv6_transports_and_header_checks() {
    let good = Frame::udp("2001:db8::10", 53).build();
    let l3 = l3_offset(&good);
    let mut long_payload = good.clone();
    long_payload[l3 + 4..l3 + 6].copy_from_slice(&2000u16.to_be_bytes());
    let mut wrong_version = good.clone();
    wrong_version[l3] = 0x40;
    run_case(
        "IPv6",
        &open_policy(),
        vec![
            step("UDP", good.clone(), XDP_PASS, NEW),
            step(
                "TCP",
                Frame::new(
                    "2001:db8::10",
                    L4::Tcp {
                        dst_port: 443,
                        flags: 2,
                    },
                )
                .build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "ICMPv6",
                Frame::new("2001:db8::10", L4::Icmp).build(),
                XDP_PASS,
                PASS,
            ),
            step(
                "payload length past the frame",
                long_payload,
                XDP_DROP,
                MALFORMED,
            ),
            step(
                "version 4 under the IPv6 EtherType",
                wrong_version,
                XDP_DROP,
                MALFORMED,
            ),
            step(
                "no next header",
                Frame::new(
                    "2001:db8::10",
                    L4::Raw {
                        proto: proto::NONE,
                        bytes: vec![],
                    },
                )
                .build(),
                XDP_PASS,
                PASS,
            ),
        ],
    );
}

fn udp53_blocked() -> Policy {
    Policy {
        services: vec![Service {
            name: "dns".into(),
            proto: ServiceProto::Udp,
            ports: 53..=53,
            limit: deny_all(),
        }],
        ..open_policy()
    }
}

#[test]
fn ipv6_extension_chains() {
    let chain = |exts: &[Ext]| {
        exts.iter()
            .fold(Frame::udp("2001:db8::10", 53), |f, e| f.ext(e.clone()))
            .build()
    };
    let six = [
        Ext::HopByHop,
        Ext::DstOpts,
        Ext::Routing,
        Ext::Ah,
        Ext::Fragment {
            offset: 0,
            more: false,
        },
        Ext::DstOpts,
    ];
    let mut seven = six.to_vec();
    seven.push(Ext::DstOpts);
    run_case(
        "IPv6 extension chains",
        &udp53_blocked(),
        vec![
            step(
                "hop-by-hop, routing, destination options, AH, then UDP 53",
                chain(&[Ext::HopByHop, Ext::Routing, Ext::DstOpts, Ext::Ah]),
                XDP_DROP,
                &[Stat::RatePackets, Stat::SourceInserted],
            ),
            step(
                "six extension headers (the bound)",
                chain(&six),
                XDP_DROP,
                &[Stat::RatePackets],
            ),
            step(
                "seven extension headers (past the bound)",
                chain(&seven),
                XDP_DROP,
                MALFORMED,
            ),
            step(
                "extension header cut short",
                chain(&[Ext::Routing])[..14 + 40 + 4].to_vec(),
                XDP_DROP,
                MALFORMED,
            ),
        ],
    );
}

#[test]
fn fragments_are_charged_to_their_source() {
    // Three bytes under UDP: a later fragment's payload, or a first fragment too short.
    let garbage = L4::Raw {
        proto: proto::UDP,
        bytes: vec![0xee; 3],
    };
    run_case(
        "fragments",
        &udp53_blocked(),
        vec![
            step(
                "IPv4 first fragment to UDP 53",
                Frame::udp("192.0.2.10", 53).ipv4_fragment(0, true).build(),
                XDP_DROP,
                &[Stat::RatePackets, Stat::SourceInserted],
            ),
            step(
                "IPv4 later fragment: no port, default limit",
                Frame::new("192.0.2.10", garbage.clone())
                    .ipv4_fragment(185, false)
                    .build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "IPv4 first fragment too short for UDP",
                Frame::new("192.0.2.10", garbage.clone())
                    .ipv4_fragment(0, true)
                    .payload(0)
                    .build(),
                XDP_DROP,
                MALFORMED,
            ),
            step(
                "IPv6 first fragment to UDP 53",
                Frame::udp("2001:db8::10", 53)
                    .ext(Ext::Fragment {
                        offset: 0,
                        more: true,
                    })
                    .build(),
                XDP_DROP,
                &[Stat::RatePackets, Stat::SourceInserted],
            ),
            step(
                "IPv6 later fragment: no port, default limit",
                Frame::new("2001:db8::10", garbage)
                    .ext(Ext::Fragment {
                        offset: 100,
                        more: false,
                    })
                    .build(),
                XDP_PASS,
                NEW,
            ),
        ],
    );
}

#[test]
fn transport_header_checks() {
    let mut short_tcp = vec![0u8; 20];
    short_tcp[12] = 4 << 4;
    run_case(
        "transport headers",
        &open_policy(),
        vec![
            step(
                "TCP data offset 4",
                Frame::new(
                    "192.0.2.10",
                    L4::Raw {
                        proto: proto::TCP,
                        bytes: short_tcp,
                    },
                )
                .payload(0)
                .build(),
                XDP_DROP,
                MALFORMED,
            ),
            step(
                "TCP of 12 bytes",
                Frame::new(
                    "192.0.2.10",
                    L4::Raw {
                        proto: proto::TCP,
                        bytes: vec![0; 12],
                    },
                )
                .payload(0)
                .build(),
                XDP_DROP,
                MALFORMED,
            ),
            step(
                "UDP of 4 bytes",
                Frame::new(
                    "192.0.2.10",
                    L4::Raw {
                        proto: proto::UDP,
                        bytes: vec![0; 4],
                    },
                )
                .payload(0)
                .build(),
                XDP_DROP,
                MALFORMED,
            ),
            step(
                "ICMP of 2 bytes",
                Frame::new(
                    "192.0.2.10",
                    L4::Raw {
                        proto: proto::ICMP,
                        bytes: vec![8, 0],
                    },
                )
                .payload(0)
                .build(),
                XDP_DROP,
                MALFORMED,
            ),
            step(
                "ICMPv6 of 2 bytes",
                Frame::new(
                    "2001:db8::1",
                    L4::Raw {
                        proto: proto::ICMPV6,
                        bytes: vec![128, 0],
                    },
                )
                .payload(0)
                .build(),
                XDP_DROP,
                MALFORMED,
            ),
        ],
    );
}

#[test]
fn denylist_and_allowlist() {
    let policy = Policy {
        deny: vec![net("198.51.100.0/24"), net("2001:db8:bad::/48")],
        allow: vec![
            net("203.0.113.0/24"),
            net("198.51.100.7/32"),
            net("2001:db8:600d::/48"),
        ],
        default_limit: deny_all(),
        ..Policy::default()
    };
    run_case(
        "lists",
        &policy,
        vec![
            step(
                "denied IPv4",
                Frame::udp("198.51.100.9", 53).build(),
                XDP_DROP,
                &[Stat::Denylisted],
            ),
            step(
                "allowed /32 inside a denied /24",
                Frame::udp("198.51.100.7", 53).build(),
                XDP_DROP,
                &[Stat::Denylisted],
            ),
            step(
                "denied IPv6",
                Frame::udp("2001:db8:bad:1::1", 53).build(),
                XDP_DROP,
                &[Stat::Denylisted],
            ),
            step(
                "allowed IPv4",
                Frame::udp("203.0.113.5", 53).build(),
                XDP_PASS,
                &[Stat::Allowlisted],
            ),
            step(
                "allowed IPv4, again: never limited",
                Frame::udp("203.0.113.5", 53).build(),
                XDP_PASS,
                &[Stat::Allowlisted],
            ),
            step(
                "allowed IPv6",
                Frame::udp("2001:db8:600d::5", 53).build(),
                XDP_PASS,
                &[Stat::Allowlisted],
            ),
            step(
                "unlisted under a zero limit",
                Frame::udp("192.0.2.77", 53).build(),
                XDP_DROP,
                &[Stat::RatePackets, Stat::SourceInserted],
            ),
            step(
                "unlisted again",
                Frame::udp("192.0.2.77", 53).build(),
                XDP_DROP,
                &[Stat::RatePackets],
            ),
        ],
    );
}

#[test]
fn classes_and_services_choose_the_limit() {
    let policy = Policy {
        default_limit: LimitSpec::packets(1, 1),
        classes: vec![Class {
            name: "market-makers".into(),
            prefixes: vec![net("203.0.113.0/24")],
            limit: LimitSpec::packets(1_000, 3),
        }],
        services: vec![Service {
            name: "rest".into(),
            proto: ServiceProto::Tcp,
            ports: 8080..=8081,
            limit: LimitSpec::packets(1_000, 2),
        }],
        ..Policy::default()
    };
    let tcp = |src: &str, port| {
        Frame::new(
            src,
            L4::Tcp {
                dst_port: port,
                flags: 0x18,
            },
        )
        .build()
    };
    run_case(
        "classes and services",
        &policy,
        vec![
            step(
                "default: burst of 1",
                Frame::udp("192.0.2.10", 53).build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "default: over",
                Frame::udp("192.0.2.10", 53).build(),
                XDP_DROP,
                &[Stat::RatePackets],
            ),
            step(
                "class: 1",
                Frame::udp("203.0.113.10", 53).build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "class: 2",
                Frame::udp("203.0.113.10", 53).build(),
                XDP_PASS,
                PASS,
            ),
            step(
                "class: 3",
                Frame::udp("203.0.113.10", 53).build(),
                XDP_PASS,
                PASS,
            ),
            step(
                "class: over its burst of 3",
                Frame::udp("203.0.113.10", 53).build(),
                XDP_DROP,
                &[Stat::RatePackets],
            ),
            step(
                "service 8080: 1 (own budget, though the default is spent)",
                tcp("192.0.2.10", 8080),
                XDP_PASS,
                NEW,
            ),
            step(
                "service 8081: 2 (same rule)",
                tcp("192.0.2.10", 8081),
                XDP_PASS,
                PASS,
            ),
            step(
                "service: over its burst of 2",
                tcp("192.0.2.10", 8080),
                XDP_DROP,
                &[Stat::RatePackets],
            ),
            step(
                "class wins over service (TCP: the class's TCP budget)",
                tcp("203.0.113.10", 8080),
                XDP_PASS,
                NEW,
            ),
        ],
    );
}

#[test]
fn byte_rate() {
    let policy = Policy {
        default_limit: LimitSpec {
            packets: Some(Rate::new(1_000, 1_000)),
            bytes: Some(Rate::new(1_000, 1_500)),
            aggregate: None,
            ..LimitSpec::unlimited()
        },
        ..Policy::default()
    };
    // 700 bytes of payload: 742-byte frames; two fit a 1500-byte burst, a third does not.
    let big = || Frame::udp("192.0.2.10", 53).payload(700).build();
    run_case(
        "byte rate",
        &policy,
        vec![
            step("742 bytes", big(), XDP_PASS, NEW),
            step("1484 bytes", big(), XDP_PASS, PASS),
            step("2226 bytes: over", big(), XDP_DROP, &[Stat::RateBytes]),
            step(
                "42 bytes: over, 16 bytes remain",
                Frame::udp("192.0.2.10", 53).payload(0).build(),
                XDP_DROP,
                &[Stat::RateBytes],
            ),
        ],
    );
}

#[test]
fn penalty_box_only_for_sustained_excess() {
    let policy = Policy {
        default_limit: LimitSpec::packets(1, 1),
        block_seconds: 60,
        ..Policy::default()
    };
    let f = || Frame::udp("192.0.2.10", 53).build();
    let harness = run_case(
        "one interval of excess",
        &policy,
        vec![
            step("first", f(), XDP_PASS, NEW),
            step("over", f(), XDP_DROP, &[Stat::RatePackets]),
            step(
                "over again in the same interval: delayed, not boxed",
                f(),
                XDP_DROP,
                &[Stat::RatePackets],
            ),
        ],
    );
    // Over its limit again about a second later, and again: 3 of the last 4 intervals. The
    // bucket refills one packet a second, so each time the first packet passes.
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(harness.run(&f()), (XDP_PASS, vec![(Stat::WithinLimit, 1)]));
    let (verdict, changed) = harness.run(&f());
    assert_eq!(
        (verdict, changed),
        (XDP_DROP, vec![(Stat::RatePackets, 1)]),
        "a second interval of excess: not yet sustained"
    );
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(harness.run(&f()), (XDP_PASS, vec![(Stat::WithinLimit, 1)]));
    let (verdict, changed) = harness.run(&f());
    assert_eq!(
        (verdict, changed),
        (
            XDP_DROP,
            vec![(Stat::RatePackets, 1), (Stat::PenaltyBoxEntered, 1)]
        ),
        "the third interval of excess: boxed"
    );
    let (verdict, changed) = harness.run(&f());
    assert_eq!((verdict, changed), (XDP_DROP, vec![(Stat::PenaltyBox, 1)]));
    assert_eq!(
        harness.run(&Frame::udp("192.0.2.11", 53).build()),
        (
            XDP_PASS,
            vec![(Stat::WithinLimit, 1), (Stat::SourceInserted, 1)]
        ),
        "another source is unaffected"
    );
    let key = SourceKey::from_addr("192.0.2.10".parse().unwrap(), 32, 0).with_budget(Budget::Other);
    let (state, _) = harness
        .limiter
        .source_counted(&key)
        .unwrap()
        .expect("source is tracked");
    assert_eq!((state.passed, state.dropped), (3, 5), "per-source counts");
    let excess = state.last_excess_ns().expect("excess recorded");
    assert!(state.blocked_until_ns > excess);
}

#[test]
fn aggregate_excess_never_boxes_the_sources_inside() {
    // Each source is far within its own limit; together they exceed their /24's aggregate.
    let policy = Policy {
        default_limit: LimitSpec {
            packets: Some(Rate::new(1_000, 1_000)),
            bytes: None,
            aggregate: Some(Rate::new(2, 2)),
            ..LimitSpec::unlimited()
        },
        block_seconds: 60,
        ..Policy::default()
    };
    let from = |host: &str| Frame::udp(host, 53).build();
    let harness = run_case(
        "aggregate excess and the penalty box",
        &policy,
        vec![
            step("192.0.2.1", from("192.0.2.1"), XDP_PASS, NEW),
            step("192.0.2.2", from("192.0.2.2"), XDP_PASS, NEW),
            step(
                "192.0.2.1 again: the /24 is over, the source is not boxed",
                from("192.0.2.1"),
                XDP_DROP,
                &[Stat::RateAggregate],
            ),
            step(
                "and again: still the aggregate, not the penalty box",
                from("192.0.2.1"),
                XDP_DROP,
                &[Stat::RateAggregate],
            ),
        ],
    );
    let key = SourceKey::from_addr("192.0.2.1".parse().unwrap(), 32, 0).with_budget(Budget::Other);
    let state = harness.limiter.source(&key).unwrap().expect("tracked");
    assert_eq!(
        state.blocked_until_ns, 0,
        "never boxed for its prefix's excess"
    );
}

#[test]
fn aggregate_limit_per_prefix() {
    let policy = Policy {
        default_limit: LimitSpec {
            packets: Some(Rate::new(1_000, 1_000)),
            bytes: None,
            aggregate: Some(Rate::new(3, 3)),
            ..LimitSpec::unlimited()
        },
        ..Policy::default()
    };
    run_case(
        "aggregate",
        &policy,
        vec![
            step(
                "192.0.2.1",
                Frame::udp("192.0.2.1", 53).build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "192.0.2.2",
                Frame::udp("192.0.2.2", 53).build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "192.0.2.3",
                Frame::udp("192.0.2.3", 53).build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "192.0.2.4: the /24 is over, no state",
                Frame::udp("192.0.2.4", 53).build(),
                XDP_DROP,
                &[Stat::RateAggregate],
            ),
            step(
                "192.0.2.1 again: the /24 is over",
                Frame::udp("192.0.2.1", 53).build(),
                XDP_DROP,
                &[Stat::RateAggregate],
            ),
            step(
                "another /24",
                Frame::udp("198.51.100.1", 53).build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "IPv6 /48 aggregate",
                Frame::udp("2001:db8:1:1::1", 53).build(),
                XDP_PASS,
                NEW,
            ),
        ],
    );
}

#[test]
fn new_source_cap_and_shared_bucket() {
    let policy = Policy {
        new_sources_per_cpu: Some(Rate::new(1, 2)),
        shared: Rate::new(1, 1),
        ..open_policy()
    };
    run_case(
        "new-source cap",
        &policy,
        vec![
            step("new 1", Frame::udp("192.0.2.1", 53).build(), XDP_PASS, NEW),
            step(
                "new 2",
                Frame::udp("198.51.100.2", 53).build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "new 3: capped, shared bucket admits",
                Frame::udp("203.0.113.3", 53).build(),
                XDP_PASS,
                &[Stat::WithinLimit, Stat::NewSourceCapped],
            ),
            step(
                "new 4: capped, shared bucket spent",
                Frame::udp("203.0.113.4", 53).build(),
                XDP_DROP,
                &[Stat::RateShared, Stat::NewSourceCapped],
            ),
            step(
                "new 5, IPv6: capped, but the IPv6 shared bucket is its own",
                Frame::udp("2001:db8::5", 53).build(),
                XDP_PASS,
                &[Stat::WithinLimit, Stat::NewSourceCapped],
            ),
            step(
                "known sources are unaffected",
                Frame::udp("192.0.2.1", 53).build(),
                XDP_PASS,
                PASS,
            ),
        ],
    );
}

#[test]
fn ipv6_sources_aggregate_to_their_64() {
    let policy = Policy {
        default_limit: LimitSpec::packets(1, 2),
        ..Policy::default()
    };
    run_case(
        "IPv6 /64",
        &policy,
        vec![
            step(
                "2001:db8:1:2::1",
                Frame::udp("2001:db8:1:2::1", 53).build(),
                XDP_PASS,
                NEW,
            ),
            step(
                "2001:db8:1:2::ffff: same /64",
                Frame::udp("2001:db8:1:2::ffff", 53).build(),
                XDP_PASS,
                PASS,
            ),
            step(
                "2001:db8:1:2:aaaa::5: same /64, over",
                Frame::udp("2001:db8:1:2:aaaa::5", 53).build(),
                XDP_DROP,
                &[Stat::RatePackets],
            ),
            step(
                "2001:db8:1:3::1: another /64",
                Frame::udp("2001:db8:1:3::1", 53).build(),
                XDP_PASS,
                NEW,
            ),
        ],
    );
}

#[test]
fn monitor_mode_passes_everything() {
    let policy = Policy {
        mode: Mode::Monitor,
        deny: vec![net("198.51.100.0/24")],
        default_limit: LimitSpec::packets(1, 1),
        ..Policy::default()
    };
    let mut bad = Frame::udp("192.0.2.10", 53).build();
    bad[14] = 0x43;
    run_case(
        "monitor",
        &policy,
        vec![
            step(
                "denied",
                Frame::udp("198.51.100.1", 53).build(),
                XDP_PASS,
                &[Stat::MonitorWouldDrop],
            ),
            step("first", Frame::udp("192.0.2.10", 53).build(), XDP_PASS, NEW),
            step(
                "over the limit",
                Frame::udp("192.0.2.10", 53).build(),
                XDP_PASS,
                &[Stat::MonitorWouldDrop],
            ),
            step("malformed", bad, XDP_PASS, &[Stat::MonitorWouldDrop]),
            step("not IP", non_ip(ethertype::ARP), XDP_PASS, &[Stat::NotIp]),
        ],
    );
}

#[test]
fn unlimited_class_keeps_no_state() {
    let policy = Policy {
        default_limit: deny_all(),
        classes: vec![Class {
            name: "partners".into(),
            prefixes: vec![net("10.9.0.0/16")],
            limit: LimitSpec::unlimited(),
        }],
        ..Policy::default()
    };
    let steps = (0..5)
        .map(|i| {
            step(
                format!("packet {i}"),
                Frame::udp("10.9.1.1", 53).build(),
                XDP_PASS,
                PASS,
            )
        })
        .collect();
    let harness = run_case("unlimited class", &policy, steps);
    assert!(harness.limiter.sources().unwrap().is_empty());
}

#[test]
fn policy_changes_apply_to_a_running_program() {
    let mut harness = Harness::new(&open_policy());
    let frame = Frame::udp("198.51.100.9", 53).build();
    assert_eq!(harness.verdict(&frame), XDP_PASS);
    let denied = Policy {
        deny: vec![net("198.51.100.0/24")],
        ..open_policy()
    };
    harness.limiter.apply(&denied.compile().unwrap()).unwrap();
    assert_eq!(harness.run(&frame), (XDP_DROP, vec![(Stat::Denylisted, 1)]));
    harness
        .limiter
        .apply(&open_policy().compile().unwrap())
        .unwrap();
    assert_eq!(
        harness.run(&frame),
        (XDP_PASS, vec![(Stat::WithinLimit, 1)]),
        "a removed prefix stops applying"
    );
}

#[test]
fn per_limit_counters_follow_their_names() {
    let class = |name: &str| Policy {
        classes: vec![Class {
            name: name.into(),
            prefixes: vec![net("203.0.113.0/24")],
            limit: LimitSpec::packets(1_000, 1_000),
        }],
        ..open_policy()
    };
    let mut harness = Harness::new(&class("a"));
    assert_eq!(
        harness.verdict(&Frame::udp("203.0.113.1", 53).build()),
        XDP_PASS
    );
    assert_eq!(
        harness.verdict(&Frame::udp("192.0.2.1", 53).build()),
        XDP_PASS
    );
    let counts = harness.limiter.limit_stats(2).unwrap();
    assert_eq!(
        (counts[0].0.packets, counts[1].0.packets),
        (1, 1),
        "default and class a each counted one"
    );
    harness
        .limiter
        .apply(&class("b").compile().unwrap())
        .unwrap();
    let counts = harness.limiter.limit_stats(2).unwrap();
    assert_eq!(
        (counts[0].0.packets, counts[1].0.packets),
        (1, 0),
        "class b does not inherit class a's counts"
    );
}

/// 100,000-prefix lists load within seconds, and swapping one list for another never opens
/// a window where an address denied by both passes.
#[test]
fn large_lists_swap_without_a_window() {
    let target = "198.51.100.77";
    let list = |second_octet: u32| -> Vec<IpNet> {
        (0..100_000u32)
            .map(|i| {
                IpNet::new(
                    IpAddr::from(Ipv4Addr::from((10 << 24) | (second_octet << 16) | i)),
                    32,
                )
                .unwrap()
            })
            .collect()
    };
    let mut old_deny = list(0);
    old_deny.push(net("198.51.100.77/32"));
    let mut new_deny = list(128);
    new_deny.push(net("198.51.100.0/24"));
    let old = Policy {
        deny: old_deny,
        default_limit: LimitSpec::unlimited(),
        ..Policy::default()
    };
    let new = Policy {
        deny: new_deny,
        default_limit: LimitSpec::unlimited(),
        ..Policy::default()
    };

    let started = Instant::now();
    let mut harness = Harness::new(&old);
    let first_load = started.elapsed();
    assert!(
        first_load < Duration::from_secs(10),
        "a 100k list took {first_load:?}"
    );

    let pin = PathBuf::from(format!(
        "/sys/fs/bpf/limiter-test-swap-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&pin);
    harness.limiter.pin_program(&pin).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (pin, stop) = (pin.clone(), stop.clone());
        std::thread::spawn(move || {
            let program = Xdp::from_pin(&pin, XdpAttachType::Interface).unwrap();
            let frame = Frame::udp(target, 53).build();
            let mut out = vec![0u8; 256];
            let (mut runs, mut passed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let verdict = program
                    .test_run(TestRunOptions {
                        data_in: Some(&frame),
                        data_out: Some(&mut out),
                        ..Default::default()
                    })
                    .unwrap()
                    .return_value;
                runs += 1;
                passed += u64::from(verdict != XDP_DROP);
            }
            (runs, passed)
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let swap_started = Instant::now();
    harness.limiter.apply(&new.compile().unwrap()).unwrap();
    let swap = swap_started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (runs, passed) = prober.join().unwrap();
    let _ = std::fs::remove_file(&pin);
    assert!(
        swap < Duration::from_secs(10),
        "swapping 100k lists took {swap:?}"
    );
    assert!(runs > 100, "the prober ran during the swap ({runs} runs)");
    assert_eq!(
        passed, 0,
        "an address denied before and after passed {passed} of {runs} times during the swap"
    );
    assert_eq!(
        harness.verdict(&Frame::udp("10.0.0.5", 53).build()),
        XDP_PASS,
        "the old list is gone"
    );
    assert_eq!(
        harness.verdict(&Frame::udp("10.128.0.5", 53).build()),
        XDP_DROP,
        "the new list applies"
    );
}

/// Random frames and mutations of valid ones: never XDP_ABORTED, and every frame lands in
/// exactly one verdict counter with its length in bytes.
#[test]
fn random_and_mutated_frames_each_land_in_exactly_one_counter() {
    let policy = Policy {
        deny: vec![net("198.51.100.0/24")],
        allow: vec![net("203.0.113.0/24")],
        default_limit: LimitSpec {
            packets: Some(Rate::new(10, 5)),
            bytes: Some(Rate::new(10_000, 5_000)),
            aggregate: Some(Rate::new(100, 50)),
            ..LimitSpec::unlimited()
        },
        block_seconds: 1,
        ..Policy::default()
    };
    let harness = Harness::new(&policy);
    let mut rng = StdRng::seed_from_u64(0x11_417e5);
    let seeds: Vec<Vec<u8>> = vec![
        Frame::udp("192.0.2.10", 53).build(),
        Frame::new(
            "198.51.100.3",
            L4::Tcp {
                dst_port: 80,
                flags: 2,
            },
        )
        .ipv4_options(12)
        .build(),
        Frame::udp("2001:db8::1", 443)
            .ext(Ext::HopByHop)
            .ext(Ext::Fragment {
                offset: 0,
                more: true,
            })
            .build(),
        Frame::new("203.0.113.1", L4::Icmp)
            .vlan(ethertype::QINQ, 1)
            .vlan(ethertype::VLAN, 2)
            .build(),
        Frame::new("2001:db8::2", L4::Icmp)
            .ext(Ext::Ah)
            .ext(Ext::DstOpts)
            .build(),
        non_ip(ethertype::ARP),
    ];
    let mut total_bytes = 0u64;
    let before = harness.stats();
    const FRAMES: usize = 20_000;
    const CHECKED_ONE_BY_ONE: usize = 3_000;
    for i in 0..FRAMES {
        let frame = match rng.random_range(0..4) {
            0 => {
                let len = rng.random_range(14..200);
                (0..len).map(|_| rng.random()).collect::<Vec<u8>>()
            }
            _ => {
                let mut f = seeds[rng.random_range(0..seeds.len())].clone();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..f.len());
                    f[at] = rng.random();
                }
                if rng.random_bool(0.3) {
                    f.truncate(rng.random_range(14..=f.len()));
                }
                f
            }
        };
        total_bytes += frame.len() as u64;
        if i < CHECKED_ONE_BY_ONE {
            let (verdict, changed) = harness.run(&frame);
            assert!(
                verdict == XDP_PASS || verdict == XDP_DROP,
                "frame {i}: verdict {verdict} for {frame:02x?}"
            );
            let verdicts: Vec<_> = changed.iter().filter(|(s, _)| s.is_verdict()).collect();
            assert_eq!(
                verdicts.len(),
                1,
                "frame {i}: verdict counters changed: {changed:?}"
            );
            assert_eq!(verdicts[0].1, 1);
            assert_eq!(
                verdict == XDP_DROP,
                verdicts[0].0.drops(),
                "frame {i}: verdict agrees with its counter"
            );
        } else {
            let verdict = harness.verdict(&frame);
            assert!(
                verdict == XDP_PASS || verdict == XDP_DROP,
                "frame {i}: verdict {verdict} for {frame:02x?}"
            );
        }
    }
    let after = harness.stats();
    assert_eq!(
        after.frames() - before.frames(),
        FRAMES as u64,
        "one verdict per frame"
    );
    let bytes: u64 = Stat::ALL
        .iter()
        .filter(|s| s.is_verdict())
        .map(|s| after.get(*s).bytes - before.get(*s).bytes)
        .sum();
    assert_eq!(
        bytes, total_bytes,
        "verdict byte counters add up to the frames' lengths"
    );
    assert!(
        after.packets(Stat::Malformed) > 1_000,
        "the mutations reach the malformed paths"
    );
    assert!(after.packets(Stat::WithinLimit) > 100 && after.packets(Stat::Denylisted) > 100);
}
