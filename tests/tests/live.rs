//! The program attached in native mode to a veth inside a namespace, with real packets sent
//! from a second namespace: a flood from one source is cut to its limit while a second,
//! well-behaved source is served in full.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use aya::programs::xdp::XdpMode;
use limiter_common::layout::Stat;
use limiter_tests::{daemon::bind_receiver, netns::Lab, require_root};
use limiter_user::{LimitSpec, Limiter, LoadOptions, Policy};

const RATE: u64 = 100;
const BURST: u64 = 20;

/// Sends `count` datagrams from `socket` to `to`, evenly over `duration`.
fn send_paced(socket: &UdpSocket, to: SocketAddr, count: u32, duration: Duration) {
    let start = Instant::now();
    for i in 0..count {
        let due = start + duration.mul_f64(f64::from(i) / f64::from(count));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        socket
            .send_to(&i.to_be_bytes(), to)
            .expect("send in the lab");
    }
}

#[test]
fn flood_is_limited_while_a_second_source_passes() {
    require_root();
    let lab = Lab::new("lv", &["192.0.2.1/24"], &["192.0.2.10/24", "192.0.2.20/24"]);
    let server: SocketAddr = "192.0.2.1:9000".parse().unwrap();

    let receiver = bind_receiver(&lab, server);

    let rx_if = lab.rx_if.clone();
    let limiter = lab.rx.run(move || {
        let mut limiter = Limiter::load(&LoadOptions {
            max_sources: Some(4096),
            max_aggregates: Some(1024),
            pin_dir: None,
        })
        .expect("load the XDP program");
        let policy = Policy {
            default_limit: LimitSpec::packets(RATE, BURST),
            ..Policy::default()
        };
        limiter.apply(&policy.compile().unwrap()).unwrap();
        limiter
            .attach(&rx_if, XdpMode::Driver)
            .expect("attach in native mode to the lab veth");
        limiter
    });

    let (flooder, polite) = lab.tx.run(|| {
        (
            UdpSocket::bind("192.0.2.10:0").unwrap(),
            UdpSocket::bind("192.0.2.20:0").unwrap(),
        )
    });
    // Resolve the neighbour first (ARP passes the program as not-IP) so no datagram waits.
    polite.send_to(b"hello", server).unwrap();
    let mut buf = [0u8; 64];
    let _ = receiver.recv_from(&mut buf);

    let flood_duration = Duration::from_secs(2);
    let (flood_sent, polite_sent) = (6_000u32, 40u32);
    let counter = thread::spawn(move || {
        let mut by_source: HashMap<IpAddr, u32> = HashMap::new();
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = receiver.recv_from(&mut buf) {
            *by_source.entry(from.ip()).or_default() += 1;
        }
        by_source
    });
    let started = Instant::now();
    let flood = thread::spawn(move || send_paced(&flooder, server, flood_sent, flood_duration));
    send_paced(&polite, server, polite_sent, flood_duration);
    flood.join().unwrap();
    let elapsed = started.elapsed();
    let received = counter.join().unwrap();

    let from_flooder = received
        .get(&"192.0.2.10".parse::<IpAddr>().unwrap())
        .copied()
        .unwrap_or(0);
    let from_polite = received
        .get(&"192.0.2.20".parse::<IpAddr>().unwrap())
        .copied()
        .unwrap_or(0);
    let allowed = (RATE as f64 * elapsed.as_secs_f64()) as u32 + BURST as u32;
    let stats = limiter.stats().unwrap();
    eprintln!(
        "flooder: sent {flood_sent}, received {from_flooder} (limit allows {allowed}); polite: sent {polite_sent}, received {from_polite}; \
         dropped over rate: {}",
        stats.packets(Stat::RatePackets)
    );
    assert_eq!(
        from_polite, polite_sent,
        "every packet of the well-behaved source is served"
    );
    assert!(
        from_flooder <= allowed,
        "the flood is held to its limit: {from_flooder} > {allowed}"
    );
    assert!(
        from_flooder >= allowed * 8 / 10,
        "the flooder still gets its allowance: {from_flooder} < 80% of {allowed}"
    );
    assert!(
        stats.packets(Stat::RatePackets) >= u64::from(flood_sent - allowed),
        "the program counted the drops"
    );
    drop(limiter);
}
