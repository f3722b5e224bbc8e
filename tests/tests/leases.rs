//! The per-CPU lease cache under `BPF_PROG_TEST_RUN`: a known source's packets spend units
//! pre-paid on this CPU without touching its state, every change voids leases and cached
//! drops at once, byte limits stay exact, and one source hammered from every CPU is admitted
//! `rate × time + burst` within the documented lease allowance.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunOptions};
use limiter_common::{
    layout::{Budget, Lease, SourceKey, SourceState, Stat},
    lease::{LEASE_SHARE, MIN_LEASE, bucket_lease},
    rate::Gcra,
};
use limiter_tests::{Harness, XDP_DROP, XDP_PASS, frame::Frame, pin_to_cpu, pin_to_cpu0};
use limiter_user::{LimitSpec, Policy, Rate, limiter::monotonic_ns};

const SOURCE: &str = "192.0.2.10";

fn cpus() -> u32 {
    aya::util::nr_cpus().expect("possible CPUs") as u32
}

fn policy(limit: LimitSpec) -> Policy {
    Policy {
        default_limit: limit,
        new_sources_per_cpu: None,
        ..Policy::default()
    }
}

fn key(source: &str) -> SourceKey {
    SourceKey::from_addr(source.parse::<IpAddr>().unwrap(), 32, 0).with_budget(Budget::Other)
}

fn state(harness: &Harness, source: &str) -> SourceState {
    harness
        .limiter
        .source(&key(source))
        .unwrap()
        .expect("the source has state")
}

fn leased_on_cpu0(harness: &Harness, source: &str) -> u32 {
    harness.limiter.leased_units(&key(source)).unwrap()[0]
}

fn udp(source: &str) -> Vec<u8> {
    Frame::udp(source, 443).build()
}

/// The lease a limit of `rate`/s with `burst` gets on this host.
fn lease_of(rate: u64, burst: u64) -> u32 {
    bucket_lease(&Gcra::per_second(rate, burst).unwrap(), cpus())
}

#[test]
fn a_known_source_passes_on_its_lease_without_touching_its_state() {
    let (rate, burst) = (1_000_000, 100_000);
    let lease = lease_of(rate, burst);
    assert!(lease >= 4, "this limit leases ({lease} packets)");
    let harness = Harness::new(&policy(LimitSpec::packets(rate, burst)));
    let frame = udp(SOURCE);
    let pass = vec![(Stat::WithinLimit, 1)];

    assert_eq!(
        harness.run(&frame),
        (
            XDP_PASS,
            vec![(Stat::WithinLimit, 1), (Stat::SourceInserted, 1)]
        ),
        "a new source: inserted, no lease yet"
    );
    assert_eq!(leased_on_cpu0(&harness, SOURCE), 0);
    assert_eq!(harness.run(&frame), (XDP_PASS, pass.clone()));
    assert_eq!(
        (
            state(&harness, SOURCE).passed,
            leased_on_cpu0(&harness, SOURCE)
        ),
        (2, lease),
        "the exact path passed it and pre-paid a lease"
    );
    for i in 0..lease {
        assert_eq!(harness.run(&frame), (XDP_PASS, pass.clone()), "leased {i}");
    }
    assert_eq!(
        (
            state(&harness, SOURCE).passed,
            leased_on_cpu0(&harness, SOURCE)
        ),
        (2, 0),
        "leased passes leave the state alone: no lookup, no write"
    );
    assert_eq!(harness.run(&frame), (XDP_PASS, pass));
    let state = state(&harness, SOURCE);
    assert_eq!(
        (state.passed, leased_on_cpu0(&harness, SOURCE)),
        (2 + lease + 1, lease),
        "the next exact pass adds the leased passes and pre-pays again"
    );
    assert_eq!(state.bytes, u64::from(2 + lease + 1) * frame.len() as u64);
}

#[test]
fn a_limit_change_voids_a_lease_at_once() {
    // A lowered burst that still leases (the smallest that does on this host), below what
    // the source has already spent: its next packet must meet the new limit, not its lease.
    let lowered = MIN_LEASE * LEASE_SHARE * u64::from(cpus());
    assert!(lease_of(1, lowered) > 0);
    let mut harness = Harness::new(&policy(LimitSpec::packets(1, 100 * lowered)));
    let frame = udp(SOURCE);
    for _ in 0..lowered + 100 {
        assert_eq!(harness.verdict(&frame), XDP_PASS);
    }
    if leased_on_cpu0(&harness, SOURCE) == 0 {
        assert_eq!(harness.verdict(&frame), XDP_PASS);
    }
    assert!(leased_on_cpu0(&harness, SOURCE) > 0, "a lease is held");
    harness
        .limiter
        .apply(&policy(LimitSpec::packets(1, lowered)).compile().unwrap())
        .unwrap();
    assert_eq!(
        harness.run(&frame),
        (XDP_DROP, vec![(Stat::RatePackets, 1)]),
        "the units pre-paid under the old limit are void"
    );
}

#[test]
fn a_cached_drop_holds_until_a_change_voids_it() {
    // One packet a second after a burst of 1,000: the burst leases, and once it is spent
    // the next packet is a second away, so drops are cached.
    let (rate, burst) = (1, 1_000);
    assert!(lease_of(rate, burst) > 0);
    let mut harness = Harness::new(&policy(LimitSpec::packets(rate, burst)));
    let frame = udp(SOURCE);
    let mut admitted = 0;
    while harness.verdict(&frame) == XDP_PASS {
        admitted += 1;
        assert!(
            admitted <= burst + 2,
            "the burst (and a second's refill) only"
        );
    }
    assert!(admitted >= burst, "the whole burst: {admitted}");
    let dropped = state(&harness, SOURCE).dropped;
    for _ in 0..5 {
        assert_eq!(
            harness.run(&frame),
            (XDP_DROP, vec![(Stat::RatePackets, 1)])
        );
    }
    let slot = cached(&harness, SOURCE);
    assert!(
        slot.retry_at_ns > monotonic_ns(),
        "the drop is cached until the bucket admits again"
    );
    assert_eq!(
        (state(&harness, SOURCE).dropped, slot.dropped),
        (dropped, 5),
        "cached drops are counted in the slot, not the state"
    );
    // A hundred times the burst at the same rate: the bucket the source spent now has room
    // (a changed rate would read its state in other units).
    harness
        .limiter
        .apply(
            &policy(LimitSpec::packets(rate, burst * 100))
                .compile()
                .unwrap(),
        )
        .unwrap();
    assert_eq!(
        harness.run(&frame),
        (XDP_PASS, vec![(Stat::WithinLimit, 1)]),
        "a raised limit applies to the next packet, not when the cached drop ends"
    );
    assert_eq!(
        state(&harness, SOURCE).dropped,
        dropped + 5,
        "the slot's drops reach the source's count"
    );
}

/// The source's slot on CPU 0, whatever it holds.
fn cached(harness: &Harness, source: &str) -> Lease {
    let leases = harness.limiter.leases(&key(source)).unwrap();
    let (lease, current) = leases[0].expect("CPU 0's slot holds the source");
    assert!(current, "of the current epoch");
    lease
}

#[test]
fn a_source_boxed_by_hand_is_dropped_at_once_despite_its_lease() {
    let mut harness = Harness::new(&policy(LimitSpec::packets(1_000_000, 100_000)));
    let frame = udp(SOURCE);
    harness.verdict(&frame);
    harness.verdict(&frame);
    assert!(leased_on_cpu0(&harness, SOURCE) > 0);
    let mut boxed = state(&harness, SOURCE);
    boxed.blocked_until_ns = monotonic_ns() + 60_000_000_000;
    harness.limiter.set_source(&key(SOURCE), &boxed).unwrap();
    assert_eq!(harness.run(&frame), (XDP_DROP, vec![(Stat::PenaltyBox, 1)]));
    boxed.blocked_until_ns = 0;
    harness.limiter.set_source(&key(SOURCE), &boxed).unwrap();
    assert_eq!(
        harness.run(&frame),
        (XDP_PASS, vec![(Stat::WithinLimit, 1)]),
        "taken out by hand: the cached box is void too"
    );
}

#[test]
fn byte_limits_are_never_leased() {
    let harness = Harness::new(&policy(LimitSpec {
        bytes: Some(Rate::new(1_000_000_000, 100_000_000)),
        ..LimitSpec::packets(1_000_000, 100_000)
    }));
    let frame = udp(SOURCE);
    for _ in 0..20 {
        assert_eq!(harness.verdict(&frame), XDP_PASS);
    }
    assert_eq!(
        (
            state(&harness, SOURCE).passed,
            leased_on_cpu0(&harness, SOURCE)
        ),
        (20, 0),
        "every packet judged exactly"
    );
}

#[test]
fn sources_of_one_prefix_share_the_aggregate_exactly() {
    // Each source's own limit is far away; the /24's aggregate (4,096, one a second after)
    // is what binds. Its units are leased too, into a slot of the aggregate's own.
    let burst = 4_096;
    assert!(lease_of(1, burst) > 0);
    let harness = Harness::new(&policy(LimitSpec {
        aggregate: Some(Rate::new(1, burst)),
        ..LimitSpec::packets(1_000_000, 100_000)
    }));
    pin_to_cpu0();
    let sources = ["192.0.2.10", "192.0.2.11", "192.0.2.12"];
    let started = Instant::now();
    let mut admitted = 0;
    let mut aggregate_drops = 0;
    for i in 0..(burst as usize * 2) {
        let (verdict, changed) = harness.run(&udp(sources[i % sources.len()]));
        if verdict == XDP_PASS {
            admitted += 1;
        } else {
            assert_eq!(changed, vec![(Stat::RateAggregate, 1)]);
            aggregate_drops += 1;
        }
    }
    let refill = started.elapsed().as_secs() + 1;
    assert!(
        (burst..=burst + refill).contains(&admitted),
        "admitted {admitted}: the aggregate's burst, and {refill} at most of refill"
    );
    assert_eq!(admitted + aggregate_drops, burst * 2);
    assert!(
        sources
            .iter()
            .all(|s| state(&harness, s).passed > 0 && leased_on_cpu0(&harness, s) <= 64),
        "every source was passed"
    );
}

#[test]
fn one_source_from_every_cpu_is_admitted_rate_times_time_within_the_lease_allowance() {
    let (rate, burst) = (200_000u64, 20_000u64);
    let lease = lease_of(rate, burst);
    assert!(lease > 0, "the limit under test leases");
    let n = cpus();
    let harness = Harness::new(&policy(LimitSpec::packets(rate, burst)));
    let frame = udp(SOURCE);
    let program = harness.limiter.program();
    let before = harness.stats().packets(Stat::WithinLimit);
    let started = Instant::now();
    let until = started + Duration::from_secs(3);
    let offered: u64 = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..n as usize)
            .map(|cpu| {
                let frame = &frame;
                scope.spawn(move || {
                    pin_to_cpu(cpu);
                    let mut out = vec![0u8; 512];
                    let mut sent = 0u64;
                    while Instant::now() < until {
                        program
                            .test_run(TestRunOptions {
                                data_in: Some(frame),
                                data_out: Some(&mut out),
                                repeat: 20_000,
                                ..Default::default()
                            })
                            .expect("BPF_PROG_TEST_RUN");
                        sent += 20_000;
                    }
                    sent
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    });
    let seconds = started.elapsed().as_secs_f64();
    let admitted = harness.stats().packets(Stat::WithinLimit) - before;
    let allowance = u64::from(n) * u64::from(lease);
    let most = rate as f64 * seconds + (burst + allowance) as f64;
    let least = 0.98 * rate as f64 * seconds;
    assert!(
        offered > 4 * admitted,
        "the flood must be far over the limit: {offered} offered, {admitted} admitted"
    );
    assert!(
        (least..=most).contains(&(admitted as f64)),
        "{admitted} admitted in {seconds:.2} s: at least {least:.0} (98% of rate × time), \
         at most {most:.0} (rate × time + burst + {n} CPUs × {lease}-packet leases)"
    );
}

#[test]
fn a_pass_ends_a_cached_drop_for_a_limit_that_does_not_lease() {
    // A burst too small to lease still caches drops; once the source passes again its slot
    // must not keep sending its packets through the expired drop's clock reads.
    assert_eq!(lease_of(10, 2), 0);
    let harness = Harness::new(&policy(LimitSpec::packets(10, 2)));
    let frame = udp(SOURCE);
    while harness.verdict(&frame) == XDP_PASS {}
    assert!(
        cached(&harness, SOURCE).retry_at_ns > 0,
        "the drop is cached"
    );
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(
        harness.run(&frame),
        (XDP_PASS, vec![(Stat::WithinLimit, 1)])
    );
    assert_eq!(
        cached(&harness, SOURCE).retry_at_ns,
        0,
        "the pass cleared the cached drop"
    );
}
