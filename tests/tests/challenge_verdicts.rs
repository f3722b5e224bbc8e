//! The SYN-cookie challenge under `BPF_PROG_TEST_RUN`: the SYN-ACK the program writes over
//! a SYN, checked with a parser crate (etherparse), not with the code under test; the ACK
//! that returns the cookie, accepted, while one off by one is not; and with `proven_ack =
//! "reset"`, the RST written over that ACK.

use etherparse::{NetSlice, SlicedPacket, TcpOptionElement, TransportSlice};
use limiter_common::layout::Stat;
use limiter_tests::{
    Harness, XDP_PASS, XDP_TX,
    frame::{Frame, ethertype, tcp},
    run_frame_out,
};
use limiter_user::{Policy, Rate, sessions::Backfill};

const PORT: u16 = 443;

/// A harness with sessions on and the challenge on for [`PORT`]; the first SYN, which the
/// program lets through to the kernel (it keeps the listener's cookie window open), is
/// already spent.
fn challenged(policy: &Policy) -> Harness {
    let mut harness = Harness::with_sessions(policy, &Backfill::default());
    harness
        .limiter
        .set_challenge(&[PORT..=PORT], true)
        .expect("switch the challenge on");
    let (verdict, changed) = harness.run(&syn("203.0.113.250", 1).build());
    assert_eq!(
        (verdict, changed),
        (XDP_PASS, vec![(Stat::Unproven, 1)]),
        "one SYN a second goes on to the kernel"
    );
    harness
}

fn syn(src: &str, seq: u32) -> Frame {
    Frame::tcp(src, PORT, tcp::SYN)
        .seq(seq)
        .src_port(51_000)
        .linux_syn_options()
}

/// What a SYN-ACK says, read by etherparse with its checksums verified.
#[derive(Debug)]
struct SynAck {
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    mss: Option<u16>,
    vlan: bool,
    len: usize,
}

fn read_synack(frame: &[u8]) -> SynAck {
    let (answer, flags) = read_answer(frame);
    assert_eq!(flags, (true, true, false, false), "SYN-ACK flags");
    answer
}

/// A frame the program wrote, read by etherparse with its checksums verified, and its (SYN,
/// ACK, RST, FIN) flags.
fn read_answer(frame: &[u8]) -> (SynAck, (bool, bool, bool, bool)) {
    let packet = SlicedPacket::from_ethernet(frame).expect("a parsable frame");
    let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
        panic!("not TCP: {packet:?}");
    };
    let flags = (tcp.syn(), tcp.ack(), tcp.rst(), tcp.fin());
    let (src, dst, checksum) = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => {
            let header = ip.header().to_header();
            assert_eq!(
                header.calc_header_checksum(),
                header.header_checksum,
                "IPv4 header checksum"
            );
            (
                std::net::IpAddr::V4(header.source.into()),
                std::net::IpAddr::V4(header.destination.into()),
                tcp.calc_checksum_ipv4(header.source, header.destination)
                    .unwrap(),
            )
        }
        Some(NetSlice::Ipv6(ip)) => {
            let header = ip.header().to_header();
            (
                std::net::IpAddr::V6(header.source.into()),
                std::net::IpAddr::V6(header.destination.into()),
                tcp.calc_checksum_ipv6(header.source, header.destination)
                    .unwrap(),
            )
        }
        other => panic!("not IP: {other:?}"),
    };
    assert_eq!(checksum, tcp.checksum(), "TCP checksum");
    let mss = tcp.options_iterator().find_map(|o| match o {
        Ok(TcpOptionElement::MaximumSegmentSize(mss)) => Some(mss),
        _ => None,
    });
    let answer = SynAck {
        src,
        dst,
        src_port: tcp.source_port(),
        dst_port: tcp.destination_port(),
        seq: tcp.sequence_number(),
        ack: tcp.acknowledgment_number(),
        mss,
        vlan: packet.vlan().is_some(),
        len: frame.len(),
    };
    (answer, flags)
}

/// The kernel's cookie keeps the MSS's index in its table in its low bits, so a cookie off
/// by one is caught only when that index is the table's last (IPv4: MSS 1460; IPv6: 8940,
/// a jumbo-frame client); below it, off by one is another valid MSS. These SYNs ask for the
/// last entry so that the off-by-one ACK must fail. (Guessing a cookie still means guessing
/// its 24-bit keyed hash.)
fn top_mss_syn(client: &str, server: &str) -> Frame {
    let mss: u16 = if client.contains(':') { 9_000 } else { 1_460 };
    let [hi, lo] = mss.to_be_bytes();
    syn(client, 1_000).dst(server).tcp_options(&[
        2, 4, hi, lo, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ])
}

fn check_challenge(client: &str, server: &str, vlan: bool) {
    let harness = challenged(&Policy::default());
    let with_vlan = |f: Frame| if vlan { f.vlan(ethertype::VLAN, 42) } else { f };
    let syn = with_vlan(top_mss_syn(client, server)).build();
    let before = harness.stats();
    let (verdict, reply) = run_frame_out(harness.limiter.program(), &syn).unwrap();
    let after = harness.stats();
    assert_eq!(verdict, XDP_TX, "{client}: answered in place");
    assert_eq!(
        after.packets(Stat::Challenged) - before.packets(Stat::Challenged),
        1
    );
    let synack = read_synack(&reply);
    eprintln!("{client}: {synack:?}");
    assert_eq!(synack.src, server.parse::<std::net::IpAddr>().unwrap());
    assert_eq!(synack.dst, client.parse::<std::net::IpAddr>().unwrap());
    assert_eq!((synack.src_port, synack.dst_port), (PORT, 51_000));
    assert_eq!(synack.ack, 1_001, "acknowledges the SYN");
    assert!(synack.mss.is_some_and(|m| m >= 536), "an MSS option");
    assert_eq!(synack.vlan, vlan, "the VLAN tag is kept");
    assert!(
        synack.len <= syn.len(),
        "never more bytes back than came in"
    );
    assert_eq!(&reply[0..6], &syn[6..12], "back to the sender's MAC");

    // The client's ACK returns the cookie: it proves the source and goes on to the kernel.
    let ack = |n: u32| {
        with_vlan(
            Frame::tcp(client, PORT, tcp::ACK)
                .dst(server)
                .src_port(51_000)
                .seq(1_001)
                .ack(n),
        )
        .build()
    };
    assert_eq!(
        harness.run(&ack(synack.seq.wrapping_add(2))),
        (
            XDP_PASS,
            vec![(Stat::OutOfState, 1), (Stat::ChallengeFailed, 1)]
        ),
        "{client}: an ACK off by one proves nothing"
    );
    assert_eq!(
        harness.run(&ack(synack.seq.wrapping_add(1))),
        (XDP_PASS, vec![(Stat::ChallengePassed, 1)]),
        "{client}: the cookie is accepted"
    );
    // Proven now: its next SYN gets its own state and goes to the kernel.
    assert_eq!(
        harness.run(&with_vlan(syn_again(client, server)).build()),
        (
            XDP_PASS,
            vec![(Stat::WithinLimit, 1), (Stat::SourceInserted, 1)]
        ),
        "{client}: a proven source's SYN"
    );
}

fn syn_again(client: &str, server: &str) -> Frame {
    syn(client, 5_000).dst(server).src_port(51_001)
}

#[test]
fn ipv4_syn_ack_and_cookie() {
    check_challenge("198.51.100.7", "192.0.2.1", false);
}

#[test]
fn ipv4_with_a_vlan_tag() {
    check_challenge("198.51.100.8", "192.0.2.1", true);
}

#[test]
fn ipv6_syn_ack_and_cookie() {
    check_challenge("2001:db8:7::7", "2001:db8::1", false);
}

#[test]
fn ipv6_with_a_vlan_tag() {
    check_challenge("2001:db8:7::8", "2001:db8::1", true);
}

#[test]
fn a_bare_syn_gets_no_option_and_never_a_larger_reply() {
    let harness = challenged(&Policy::default());
    let bare = Frame::tcp("198.51.100.9", PORT, tcp::SYN).seq(7).build();
    let (verdict, reply) = run_frame_out(harness.limiter.program(), &bare).unwrap();
    assert_eq!(verdict, XDP_TX);
    let synack = read_synack(&reply);
    assert_eq!(
        synack.mss, None,
        "no room for the MSS option in a 20-byte header"
    );
    assert!(synack.len <= bare.len());
}

#[test]
fn replies_to_one_prefix_are_capped() {
    let harness = challenged(&Policy {
        challenge: limiter_user::policy::ChallengeSpec {
            replies_per_prefix: Rate::new(1, 3),
            ..Default::default()
        },
        ..Policy::default()
    });
    // A spoofed flood naming a victim's /24: three SYN-ACKs, then nothing.
    for host in 1..=3 {
        let (verdict, _) = run_frame_out(
            harness.limiter.program(),
            &syn(&format!("203.0.113.{host}"), 1).build(),
        )
        .unwrap();
        assert_eq!(verdict, XDP_TX, "host {host}");
    }
    assert_eq!(
        harness.run(&syn("203.0.113.4", 1).build()),
        (limiter_tests::XDP_DROP, vec![(Stat::RateChallenge, 1)]),
        "the /24's budget is spent"
    );
    let (verdict, _) =
        run_frame_out(harness.limiter.program(), &syn("198.51.100.1", 1).build()).unwrap();
    assert_eq!(verdict, XDP_TX, "another /24 has its own");
}

#[test]
fn ports_without_the_challenge_are_unchanged() {
    let harness = challenged(&Policy::default());
    assert_eq!(
        harness.run(&Frame::tcp("198.51.100.7", 22, tcp::SYN).build()),
        (XDP_PASS, vec![(Stat::Unproven, 1)])
    );
}

/// `proven_ack = "reset"`: every SYN is challenged (the kernel need not issue cookies), and
/// the ACK that returns the cookie, carrying the client's request, is answered with a RST
/// whose sequence number is that ACK's acknowledgement number; the source is proven.
fn check_reset(client: &str, server: &str, vlan: bool) {
    let policy = Policy {
        challenge: limiter_user::policy::ChallengeSpec {
            proven_ack: limiter_user::policy::ProvenAck::Reset,
            ..Default::default()
        },
        ..Policy::default()
    };
    let mut harness = Harness::with_sessions(&policy, &Backfill::default());
    harness
        .limiter
        .set_challenge(&[PORT..=PORT], true)
        .expect("switch the challenge on");
    let with_vlan = |f: Frame| if vlan { f.vlan(ethertype::VLAN, 42) } else { f };
    let (verdict, reply) = run_frame_out(
        harness.limiter.program(),
        &with_vlan(top_mss_syn(client, server)).build(),
    )
    .unwrap();
    assert_eq!(
        verdict, XDP_TX,
        "{client}: even the first SYN is challenged"
    );
    let synack = read_synack(&reply);

    let ack = with_vlan(
        Frame::tcp(client, PORT, tcp::ACK | tcp::PSH)
            .dst(server)
            .src_port(51_000)
            .seq(1_001)
            .ack(synack.seq.wrapping_add(1))
            .payload(200),
    )
    .build();
    let before = harness.stats();
    let (verdict, reply) = run_frame_out(harness.limiter.program(), &ack).unwrap();
    let after = harness.stats();
    assert_eq!(
        verdict, XDP_TX,
        "{client}: the proving ACK is answered in place"
    );
    assert_eq!(
        after.packets(Stat::ChallengeReset) - before.packets(Stat::ChallengeReset),
        1
    );
    let (rst, flags) = read_answer(&reply);
    eprintln!("{client}: {rst:?}");
    assert_eq!(flags, (false, false, true, false), "RST alone");
    assert_eq!(
        rst.seq,
        synack.seq.wrapping_add(1),
        "at the client's rcv_nxt"
    );
    assert_eq!(rst.src, server.parse::<std::net::IpAddr>().unwrap());
    assert_eq!(rst.dst, client.parse::<std::net::IpAddr>().unwrap());
    assert_eq!((rst.src_port, rst.dst_port), (PORT, 51_000));
    assert_eq!(rst.vlan, vlan, "the VLAN tag is kept");
    assert!(rst.len < ack.len(), "the request is not echoed back");
    assert_eq!(&reply[0..6], &ack[6..12], "back to the sender's MAC");
    // Proven: the retry's SYN gets its own state and goes to the kernel.
    assert_eq!(
        harness.run(&with_vlan(syn_again(client, server)).build()),
        (
            XDP_PASS,
            vec![(Stat::WithinLimit, 1), (Stat::SourceInserted, 1)]
        ),
        "{client}: the retry of a proven source"
    );
}

#[test]
fn reset_variant_ipv4() {
    check_reset("198.51.100.17", "192.0.2.1", false);
}

#[test]
fn reset_variant_ipv6_with_a_vlan_tag() {
    check_reset("2001:db8:7::17", "2001:db8::1", true);
}
