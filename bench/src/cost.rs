//! Per-packet cost through `BPF_PROG_TEST_RUN`: the scenarios, the baselines, scaling with
//! state and list sizes, and several CPUs at once.
//!
//! Timed by the kernel: `BPF_PROG_TEST_RUN` reports the average duration of its repetitions,
//! measured around the program alone, so time the machine gives other tenants between calls
//! does not count. Every contender is measured once per round and the rounds interleave
//! (at least five), so drift over the run hits all of them alike; the median round is
//! reported with the spread. Wall-clock time per repetition, the method of earlier results
//! files, is kept as a second column so runs stay comparable.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use aya_obj::programs::XdpAttachType;
use ipnet::IpNet;
use limiter_common::layout::{SourceKey, SourceState, Stat};
use limiter_tests::{
    XDP_DROP, XDP_PASS,
    frame::{Frame, L4, ethertype, non_ip, tcp as tcp_flags},
    pin_to_cpu, run_frame,
};
use limiter_user::{
    BASELINES_OBJECT, Class, LimitSpec, Limiter, LoadOptions, Policy, Rate,
    sessions::{self, TcpSocket, plan_backfill},
};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use serde::Serialize;

/// How much work each measurement does.
#[derive(Clone, Copy, Debug)]
pub struct Effort {
    /// Repetitions per `BPF_PROG_TEST_RUN` call.
    pub repeat: u32,
    /// Calls per measurement (the median is reported).
    pub runs: usize,
    /// Calls with `repeat = 1` for paths that need a new key per packet.
    pub single_calls: usize,
    /// The largest tracked-source count in the scaling run.
    pub max_sources: u32,
    /// Seconds of the multi-CPU accuracy run.
    pub accuracy_seconds: u64,
}

/// One measured cost.
#[derive(Clone, Debug, Serialize)]
pub struct Cost {
    /// What was measured.
    pub name: String,
    /// Median nanoseconds per packet.
    pub ns: f64,
    /// Fastest run.
    pub min_ns: f64,
    /// Slowest run.
    pub max_ns: f64,
    /// Ratio to the bare-drop baseline measured the same way.
    pub ratio: f64,
    /// Wall-clock nanoseconds per repetition (median round), the method of results files
    /// before kernel timing; `None` for one-call-per-packet paths, always kernel-timed.
    pub wall_ns: Option<f64>,
    /// The wall-clock ratio to the bare drop's wall-clock time.
    pub wall_ratio: Option<f64>,
    /// The verdict checked before measuring.
    pub verdict: String,
    /// How it was measured.
    pub method: &'static str,
}

fn median(mut samples: Vec<f64>) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    let mid = samples[samples.len() / 2];
    (mid, samples[0], samples[samples.len() - 1])
}

/// Rounds of every interleaved measurement: at least five.
fn rounds(effort: Effort) -> usize {
    effort.runs.max(5)
}

/// One call of `repeat` runs of `frame`: the kernel's nanoseconds per repetition, and the
/// wall clock's.
fn time_call(program: &Xdp, frame: &[u8], repeat: u32) -> Result<(f64, f64)> {
    let mut out = vec![0u8; frame.len() + 256];
    let started = Instant::now();
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    let wall = started.elapsed().as_nanos() as f64 / f64::from(repeat);
    Ok((result.duration.as_nanos() as f64, wall))
}

/// Kernel nanoseconds per repetition of `frame`, median of the rounds (with min and max).
pub fn time_repeat(program: &Xdp, frame: &[u8], effort: Effort) -> Result<(f64, f64, f64)> {
    let mut samples = Vec::with_capacity(rounds(effort));
    for _ in 0..rounds(effort) {
        samples.push(time_call(program, frame, effort.repeat)?.0);
    }
    Ok(median(samples))
}

/// A program and the frame it is measured on, with the path the frame was checked to take.
struct Contender<'a> {
    name: String,
    program: &'a Xdp,
    frame: Vec<u8>,
    verdict: String,
}

/// Measures every contender once per round, rounds interleaved; ratios are to the first
/// contender (the bare drop), kernel to kernel and wall clock to wall clock.
fn interleaved(contenders: &[Contender<'_>], effort: Effort) -> Result<Vec<Cost>> {
    let mut kernel = vec![Vec::new(); contenders.len()];
    let mut wall = vec![Vec::new(); contenders.len()];
    for _ in 0..rounds(effort) {
        for (i, c) in contenders.iter().enumerate() {
            let (k, w) = time_call(c.program, &c.frame, effort.repeat)?;
            kernel[i].push(k);
            wall[i].push(w);
        }
    }
    let timed: Vec<((f64, f64, f64), f64)> = kernel
        .into_iter()
        .zip(wall)
        .map(|(k, w)| (median(k), median(w).0))
        .collect();
    let (drop_ns, drop_wall) = (timed[0].0.0, timed[0].1);
    Ok(contenders
        .iter()
        .zip(timed)
        .map(|(c, ((ns, min_ns, max_ns), wall_ns))| Cost {
            name: c.name.clone(),
            ns,
            min_ns,
            max_ns,
            ratio: ns / drop_ns,
            wall_ns: Some(wall_ns),
            wall_ratio: Some(wall_ns / drop_wall),
            verdict: c.verdict.clone(),
            method: "kernel, interleaved",
        })
        .collect())
}

/// A path that needs a new frame on every call (a new source, a new acknowledgement number),
/// so it is measured one `repeat = 1` call per packet.
struct SingleContender<'a> {
    name: String,
    program: &'a Xdp,
    frame: Box<dyn Fn(usize) -> Vec<u8> + 'a>,
    verdict: String,
}

/// Measures every contender for `single_calls / rounds` calls per round, rounds interleaved,
/// each call timed by the kernel; ratios are to the first contender (the bare drop).
fn interleaved_single(contenders: &[SingleContender<'_>], effort: Effort) -> Result<Vec<Cost>> {
    let per_round = (effort.single_calls / rounds(effort)).max(1);
    let mut out = vec![0u8; 512];
    let mut samples = vec![Vec::new(); contenders.len()];
    let mut next = vec![0usize; contenders.len()];
    for _ in 0..rounds(effort) {
        for (i, c) in contenders.iter().enumerate() {
            let mut total = Duration::ZERO;
            for _ in 0..per_round {
                let frame = (c.frame)(next[i]);
                next[i] += 1;
                total += c
                    .program
                    .test_run(TestRunOptions {
                        data_in: Some(&frame),
                        data_out: Some(&mut out),
                        repeat: 1,
                        ..Default::default()
                    })
                    .context("BPF_PROG_TEST_RUN")?
                    .duration;
            }
            samples[i].push(total.as_nanos() as f64 / per_round as f64);
        }
    }
    let timed: Vec<(f64, f64, f64)> = samples.into_iter().map(median).collect();
    let drop_ns = timed[0].0;
    Ok(contenders
        .iter()
        .zip(timed)
        .map(|(c, (ns, min_ns, max_ns))| Cost {
            name: c.name.clone(),
            ns,
            min_ns,
            max_ns,
            ratio: ns / drop_ns,
            wall_ns: None,
            wall_ratio: None,
            verdict: c.verdict.clone(),
            method: "kernel, one call per packet, interleaved",
        })
        .collect())
}

/// The baselines object, loaded.
pub struct Baselines {
    ebpf: Ebpf,
}

impl Baselines {
    /// Loads the four reference programs.
    pub fn load() -> Result<Self> {
        let mut ebpf = Ebpf::load(BASELINES_OBJECT).context("load the baselines object")?;
        for name in [
            "bare_drop",
            "bare_pass",
            "parse_only",
            "trafficgen",
            "trafficgen_spoof",
        ] {
            let program: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
            program.load().with_context(|| format!("load {name}"))?;
        }
        Ok(Self { ebpf })
    }

    /// One of the programs.
    pub fn program(&self, name: &str) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| name.to_owned())?
            .try_into()?)
    }

    /// Mutable access, for attaching.
    pub fn program_mut(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(name)
            .with_context(|| name.to_owned())?
            .try_into()?)
    }
}

fn load(policy: &Policy, max_sources: u32) -> Result<Limiter> {
    let mut limiter = Limiter::load(&LoadOptions {
        max_sources: Some(max_sources),
        max_aggregates: Some(65_536),
        pin_dir: None,
    })?;
    limiter.apply(&policy.compile()?)?;
    Ok(limiter)
}

/// Runs `frame` once and checks the verdict and the verdict counter it lands in.
fn check(limiter: &Limiter, frame: &[u8], verdict: u32, stat: Stat) -> Result<String> {
    let before = limiter.stats()?;
    let got = run_frame(limiter.program(), frame)?;
    let after = limiter.stats()?;
    let landed: Vec<Stat> = Stat::ALL
        .iter()
        .copied()
        .filter(|s| s.is_verdict() && after.packets(*s) != before.packets(*s))
        .collect();
    ensure!(
        got == verdict && landed == [stat],
        "the scenario takes the wrong path: verdict {got}, counters {landed:?}; expected {verdict}, {stat:?}"
    );
    Ok(format!(
        "{} {}",
        match verdict {
            XDP_DROP => "drop",
            limiter_tests::XDP_TX => "send back",
            _ => "pass",
        },
        stat.label()
    ))
}

fn huge() -> LimitSpec {
    // Far above anything a benchmark sends: the within-limit path, with state.
    LimitSpec {
        packets: Some(Rate::new(100_000_000_000, 100_000_000)),
        bytes: None,
        aggregate: Some(Rate::new(100_000_000_000, 100_000_000)),
        ..LimitSpec::unlimited()
    }
}

fn zero() -> LimitSpec {
    LimitSpec {
        packets: Some(Rate::new(0, 0)),
        ..LimitSpec::unlimited()
    }
}

fn net(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

fn udp(src: &str) -> Vec<u8> {
    Frame::udp(src, 443).build()
}

/// A scenario: a policy, a frame, and the path the frame must take.
struct Scenario {
    name: &'static str,
    policy: Policy,
    frame: Vec<u8>,
    verdict: u32,
    stat: Stat,
    /// What the limiter must hold before measuring.
    setup: Setup,
}

/// What a scenario needs in place before its first packet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// Nothing: the first packet makes the state the measured path uses.
    None,
    /// The source (192.0.2.10, its other budget) in the penalty box.
    Boxed,
    /// The sock_ops program attached, and 192.0.2.10:40000 → 192.0.2.1:443 established.
    Established,
}

fn tcp(src: &str, flags: u8, payload: usize) -> Vec<u8> {
    Frame::tcp(src, 443, flags).payload(payload).build()
}

/// Puts the limiter in the state a scenario needs.
fn prepare(limiter: &mut Limiter, setup: Setup) -> Result<()> {
    match setup {
        Setup::None => {}
        Setup::Boxed => {
            let key = SourceKey::from_addr("192.0.2.10".parse()?, 32, 0)
                .with_budget(limiter_common::layout::Budget::Other);
            limiter.set_source(
                &key,
                &SourceState {
                    updated_ns: 1,
                    blocked_until_ns: u64::MAX / 2,
                    ..SourceState::default()
                },
            )?;
        }
        Setup::Established => {
            let sockets = [
                TcpSocket {
                    listening: true,
                    local: ("0.0.0.0".parse()?, 443),
                    remote: ("0.0.0.0".parse()?, 0),
                },
                TcpSocket {
                    listening: false,
                    local: ("192.0.2.1".parse()?, 443),
                    remote: ("192.0.2.10".parse()?, limiter_tests::frame::SRC_PORT),
                },
            ];
            limiter.attach_sessions(
                &sessions::find_cgroup2()?,
                sessions::netns_cookie()?,
                &plan_backfill(&sockets, 32, 64),
            )?;
        }
    }
    Ok(())
}

fn scenarios() -> Vec<Scenario> {
    let base = Policy {
        default_limit: huge(),
        new_sources_per_cpu: None,
        ..Policy::default()
    };
    let mut malformed = udp("192.0.2.10");
    malformed[14] = 0x44;
    vec![
        Scenario {
            name: "non-IP frame",
            policy: base.clone(),
            frame: non_ip(ethertype::ARP),
            verdict: XDP_PASS,
            stat: Stat::NotIp,
            setup: Setup::None,
        },
        Scenario {
            name: "allowlisted source",
            policy: Policy {
                allow: vec![net("203.0.113.0/24")],
                ..base.clone()
            },
            frame: udp("203.0.113.5"),
            verdict: XDP_PASS,
            stat: Stat::Allowlisted,
            setup: Setup::None,
        },
        Scenario {
            name: "known source within its limit",
            policy: base.clone(),
            frame: udp("192.0.2.10"),
            verdict: XDP_PASS,
            stat: Stat::WithinLimit,
            setup: Setup::None,
        },
        Scenario {
            name: "known source within its limit, judged exactly (a byte limit: no lease)",
            policy: Policy {
                default_limit: LimitSpec {
                    bytes: Some(Rate::new(100_000_000_000, 100_000_000_000)),
                    ..huge()
                },
                ..base.clone()
            },
            frame: udp("192.0.2.10"),
            verdict: XDP_PASS,
            stat: Stat::WithinLimit,
            setup: Setup::None,
        },
        Scenario {
            name: "known source, TCP data, judged per packet (sessions off)",
            policy: base.clone(),
            frame: tcp("192.0.2.10", tcp_flags::ACK | tcp_flags::PSH, 64),
            verdict: XDP_PASS,
            stat: Stat::WithinLimit,
            setup: Setup::None,
        },
        Scenario {
            name: "known source, TCP data of an established flow",
            policy: base.clone(),
            frame: tcp("192.0.2.10", tcp_flags::ACK | tcp_flags::PSH, 64),
            verdict: XDP_PASS,
            stat: Stat::WithinLimit,
            setup: Setup::Established,
        },
        Scenario {
            name: "TCP of no flow, out-of-state bucket spent (ACK flood)",
            policy: Policy {
                out_of_state: Rate::new(0, 0),
                ..base.clone()
            },
            frame: tcp("203.0.113.7", tcp_flags::ACK, 0),
            verdict: XDP_DROP,
            stat: Stat::RateOutOfState,
            setup: Setup::Established,
        },
        Scenario {
            name: "unproven SYN, unproven bucket spent (SYN flood)",
            policy: Policy {
                unproven: Rate::new(0, 0),
                ..base.clone()
            },
            frame: tcp("203.0.113.7", tcp_flags::SYN, 0),
            verdict: XDP_DROP,
            stat: Stat::RateUnproven,
            setup: Setup::Established,
        },
        Scenario {
            name: "known source over its limit",
            policy: Policy {
                default_limit: zero(),
                ..base.clone()
            },
            frame: udp("192.0.2.10"),
            verdict: XDP_DROP,
            stat: Stat::RatePackets,
            setup: Setup::None,
        },
        Scenario {
            name: "denylisted prefix",
            policy: Policy {
                deny: vec![net("198.51.100.0/24")],
                ..base.clone()
            },
            frame: udp("198.51.100.9"),
            verdict: XDP_DROP,
            stat: Stat::Denylisted,
            setup: Setup::None,
        },
        Scenario {
            name: "source in the penalty box",
            policy: Policy {
                default_limit: zero(),
                block_seconds: 3_600,
                ..base.clone()
            },
            frame: udp("192.0.2.10"),
            verdict: XDP_DROP,
            stat: Stat::PenaltyBox,
            setup: Setup::Boxed,
        },
        Scenario {
            name: "IPv6 /64 source",
            policy: base.clone(),
            frame: udp("2001:db8:1:2::3"),
            verdict: XDP_PASS,
            stat: Stat::WithinLimit,
            setup: Setup::None,
        },
        Scenario {
            name: "QinQ-tagged frame",
            policy: base.clone(),
            frame: Frame::udp("192.0.2.10", 443)
                .vlan(ethertype::QINQ, 10)
                .vlan(ethertype::VLAN, 20)
                .build(),
            verdict: XDP_PASS,
            stat: Stat::WithinLimit,
            setup: Setup::None,
        },
        Scenario {
            name: "IPv4 with options",
            policy: base.clone(),
            frame: Frame::new(
                "192.0.2.10",
                L4::Tcp {
                    dst_port: 443,
                    flags: 0x10,
                },
            )
            .ipv4_options(40)
            .build(),
            verdict: XDP_PASS,
            stat: Stat::WithinLimit,
            setup: Setup::None,
        },
        Scenario {
            name: "malformed frame",
            policy: base,
            frame: malformed,
            verdict: XDP_DROP,
            stat: Stat::Malformed,
            setup: Setup::None,
        },
    ]
}

/// The baselines and every scenario, each checked on its path first, measured in
/// interleaved rounds: returns (baselines, scenarios), ratios to the bare drop.
pub fn costs(b: &Baselines, effort: Effort) -> Result<(Vec<Cost>, Vec<Cost>)> {
    let frame = udp("192.0.2.10");
    let mut contenders: Vec<Contender<'_>> = [
        ("bare XDP_DROP", "bare_drop", "drop"),
        ("bare XDP_PASS", "bare_pass", "pass"),
        ("parse only", "parse_only", "drop"),
    ]
    .into_iter()
    .map(|(name, program, verdict)| {
        Ok(Contender {
            name: name.into(),
            program: b.program(program)?,
            frame: frame.clone(),
            verdict: verdict.into(),
        })
    })
    .collect::<Result<_>>()?;
    let baselines = contenders.len();
    // Every scenario keeps its own loaded program and maps for the whole measurement.
    let scenarios = scenarios();
    let mut limiters = Vec::new();
    for s in &scenarios {
        let mut limiter = load(&s.policy, 4_096)?;
        prepare(&mut limiter, s.setup).with_context(|| s.name)?;
        limiters.push(limiter);
    }
    for (s, limiter) in scenarios.iter().zip(&limiters) {
        // A first packet creates the state the measured path relies on (known source,
        // penalty box); the check then runs on exactly the measured path.
        let _ = check(limiter, &s.frame, s.verdict, s.stat);
        let verdict = check(limiter, &s.frame, s.verdict, s.stat).with_context(|| s.name)?;
        contenders.push(Contender {
            name: s.name.into(),
            program: limiter.program(),
            frame: s.frame.clone(),
            verdict,
        });
    }
    let mut costs = interleaved(&contenders, effort)?;
    for (s, limiter) in scenarios.iter().zip(&limiters) {
        check(limiter, &s.frame, s.verdict, s.stat)
            .with_context(|| format!("{}: after measuring", s.name))?;
    }
    let scenario_costs = costs.split_off(baselines);
    Ok((costs, scenario_costs))
}

fn spoofed(n: usize) -> Vec<u8> {
    let a = 0x0a00_0000u32.wrapping_add(n as u32).wrapping_add(1);
    udp(&Ipv4Addr::from(a).to_string())
}

/// Tracked sources in the table while new sources arrive: a small table and a large one, each
/// full (the LRU evicts one entry per insert, so the size stays fixed for the whole run).
pub const TABLE_SIZES: [u32; 2] = [10_000, 400_000];

/// Paths that need a new frame per packet (new sources inserted or capped at two table
/// sizes, the challenge, a flow's pure ACKs), interleaved with the bare drop measured the
/// same way.
pub fn per_packet_costs(b: &Baselines, effort: Effort) -> Result<Vec<Cost>> {
    // One CPU throughout: the new-source cap is per CPU, so a check on one CPU and a
    // measurement on another would see different caps. The affinity is given back after,
    // for the runs on every CPU.
    let this_thread = nix::unistd::Pid::from_raw(0);
    let affinity = nix::sched::sched_getaffinity(this_thread)?;
    pin_to_cpu(0);
    let costs = per_packet_costs_on_one_cpu(b, effort);
    nix::sched::sched_setaffinity(this_thread, &affinity)?;
    costs
}

/// A one-call-per-packet case: its name, its limiter, the frame for the nth call, and the
/// path (verdict and counter) every frame must take.
type PerPacketCase = (String, Limiter, fn(usize) -> Vec<u8>, u32, Stat);

fn per_packet_costs_on_one_cpu(b: &Baselines, effort: Effort) -> Result<Vec<Cost>> {
    let mut rng = StdRng::seed_from_u64(11);
    let mut limiters: Vec<PerPacketCase> = Vec::new();
    for size in TABLE_SIZES {
        for (what, policy, verdict, stat) in [
            (
                "a new source on every packet (insert)",
                Policy {
                    default_limit: huge(),
                    new_sources_per_cpu: None,
                    ..Policy::default()
                },
                XDP_PASS,
                Stat::WithinLimit,
            ),
            (
                "new sources past the cap (spoofed flood)",
                Policy {
                    default_limit: huge(),
                    new_sources_per_cpu: Some(Rate::new(1, 1)),
                    shared: Rate::new(0, 0),
                    ..Policy::default()
                },
                XDP_DROP,
                Stat::RateShared,
            ),
        ] {
            let mut limiter = load(&policy, size)?;
            random_sources(&mut limiter, size, &mut rng)?;
            limiters.push((
                format!("{what}, {size} tracked sources"),
                limiter,
                spoofed,
                verdict,
                stat,
            ));
        }
    }
    // The challenge: each SYN from a new source in its own /24 (under the reply cap), each
    // answered in place with a cookie SYN-ACK.
    let mut challenge = load(
        &Policy {
            default_limit: huge(),
            challenge: limiter_user::policy::ChallengeSpec {
                replies_per_prefix: Rate::new(1_000_000, 1_000_000),
                ..Default::default()
            },
            ..Policy::default()
        },
        4_096,
    )?;
    prepare(&mut challenge, Setup::Established)?;
    challenge.set_challenge(&[443..=443], true)?;
    fn syn(n: usize) -> Vec<u8> {
        let a = 0x0b00_0000u32.wrapping_add((n as u32) << 8) + 1;
        Frame::tcp(&Ipv4Addr::from(a).to_string(), 443, tcp_flags::SYN)
            .seq(n as u32)
            .linux_syn_options()
            .build()
    }
    // The first SYN goes on to the kernel (it keeps the listener's cookie window open).
    let _ = run_frame(challenge.program(), &syn(usize::MAX / 8));
    limiters.push((
        "SYN answered with a cookie SYN-ACK (challenge)".into(),
        challenge,
        syn,
        limiter_tests::XDP_TX,
        Stat::Challenged,
    ));
    // A flow's pure ACKs each acknowledge something new (a repeated one is a duplicate,
    // which a storm of turns into the source's packet), so this path takes a frame per call.
    let mut acks = load(
        &Policy {
            default_limit: LimitSpec {
                acks: Some(Rate::new(100_000_000_000, 100_000_000)),
                ..huge()
            },
            ..Policy::default()
        },
        4_096,
    )?;
    prepare(&mut acks, Setup::Established)?;
    fn ack(n: usize) -> Vec<u8> {
        Frame::tcp("192.0.2.10", 443, tcp_flags::ACK)
            .ack(n as u32)
            .build()
    }
    limiters.push((
        "pure ACK of an established flow".into(),
        acks,
        ack,
        XDP_PASS,
        Stat::FlowAck,
    ));

    let mut contenders = vec![SingleContender {
        name: "bare XDP_DROP, one call per packet".into(),
        program: b.program("bare_drop")?,
        frame: Box::new(spoofed),
        verdict: "drop".into(),
    }];
    for (name, limiter, frame, verdict, stat) in &limiters {
        // Checked on frames the measurement does not use (it counts up from 0).
        let _ = check(limiter, &frame(usize::MAX / 4), *verdict, *stat);
        let checked = check(limiter, &frame(usize::MAX / 4 + 1), *verdict, *stat)
            .with_context(|| name.clone())?;
        let frame = *frame;
        contenders.push(SingleContender {
            name: name.clone(),
            program: limiter.program(),
            // Offset so no measured frame repeats a checked one.
            frame: Box::new(move |n| frame(n + 1_000)),
            verdict: checked,
        });
    }
    interleaved_single(&contenders, effort)
}

/// One point of a scaling curve.
#[derive(Clone, Debug, Serialize)]
pub struct ScalePoint {
    /// The curve.
    pub curve: String,
    /// Tracked sources or list size.
    pub size: u64,
    /// Nanoseconds per packet.
    pub ns: f64,
    /// Ratio to the smallest size of the same curve.
    pub ratio: f64,
}

fn random_sources(limiter: &mut Limiter, count: u32, rng: &mut StdRng) -> Result<()> {
    let state = SourceState {
        updated_ns: 1,
        ..SourceState::default()
    };
    for _ in 0..count {
        let addr: u32 = rng.random::<u32>() | 0x0100_0000;
        let key = SourceKey {
            addr: [addr.to_be(), 0, 0, 0],
            limit_id: 0,
            family: 4,
            prefix_len: 32,
            // The benchmark's frames are UDP.
            budget: limiter_common::layout::Budget::Other as u8,
            _pad: [0; 3],
        };
        limiter.set_source(&key, &state)?;
    }
    Ok(())
}

/// Cost of the drop and pass paths with many tracked sources, and of the pass path with
/// long lists.
pub fn scaling(effort: Effort) -> Result<Vec<ScalePoint>> {
    let mut points = Vec::new();
    let mut rng = StdRng::seed_from_u64(7);
    let sizes: Vec<u32> = [1_000, 100_000, 1_000_000]
        .into_iter()
        .filter(|&n| n <= effort.max_sources)
        .collect();
    for (curve, limit, verdict, stat) in [
        (
            "tracked sources, over limit (drop)",
            zero(),
            XDP_DROP,
            Stat::RatePackets,
        ),
        (
            "tracked sources, within limit (pass)",
            huge(),
            XDP_PASS,
            Stat::WithinLimit,
        ),
    ] {
        let mut first = 0.0;
        for &n in &sizes {
            let policy = Policy {
                default_limit: limit,
                new_sources_per_cpu: None,
                ..Policy::default()
            };
            let mut limiter = load(&policy, (n + 1024).next_power_of_two())?;
            random_sources(&mut limiter, n, &mut rng)?;
            let frame = udp("192.0.2.10");
            let _ = check(&limiter, &frame, verdict, stat);
            check(&limiter, &frame, verdict, stat)?;
            let (ns, ..) = time_repeat(limiter.program(), &frame, effort)?;
            if first == 0.0 {
                first = ns;
            }
            points.push(ScalePoint {
                curve: curve.into(),
                size: u64::from(n),
                ns,
                ratio: ns / first,
            });
        }
    }
    let mut first = 0.0;
    for n in [10u32, 10_000, 100_000] {
        // A third each of deny, allow and class prefixes, none covering the measured source.
        let prefix = |i: u32| {
            IpNet::new(IpAddr::V4(Ipv4Addr::from(0x2000_0000 + (i << 8))), 24).expect("prefix")
        };
        let third = n / 3;
        let policy = Policy {
            default_limit: huge(),
            new_sources_per_cpu: None,
            deny: (0..third).map(prefix).collect(),
            allow: (third..2 * third).map(prefix).collect(),
            classes: vec![Class {
                name: "c".into(),
                prefixes: (2 * third..n).map(prefix).collect(),
                limit: huge(),
            }],
            ..Policy::default()
        };
        let limiter = load(&policy, 4_096)?;
        let frame = udp("192.0.2.10");
        let _ = check(&limiter, &frame, XDP_PASS, Stat::WithinLimit);
        check(&limiter, &frame, XDP_PASS, Stat::WithinLimit)?;
        let (ns, ..) = time_repeat(limiter.program(), &frame, effort)?;
        if first == 0.0 {
            first = ns;
        }
        points.push(ScalePoint {
            curve: "list prefixes, within limit (pass)".into(),
            size: u64::from(n),
            ns,
            ratio: ns / first,
        });
    }
    Ok(points)
}

/// The multi-CPU results.
#[derive(Clone, Debug, Serialize)]
pub struct MultiCpu {
    /// CPUs used.
    pub cpus: usize,
    /// ns per packet per CPU, all CPUs on one shared source (within its limit).
    pub shared_source_ns: f64,
    /// ns per packet per CPU, each CPU on its own source.
    pub distinct_sources_ns: f64,
    /// The configured rate of the accuracy run (packets/s).
    pub rate: u64,
    /// Its burst.
    pub burst: u64,
    /// Seconds it ran.
    pub seconds: f64,
    /// Packets offered.
    pub offered: u64,
    /// Packets admitted.
    pub admitted: u64,
    /// Admitted versus `rate × seconds + burst`, as a fraction (1.0 = exact).
    pub accuracy: f64,
    /// Packets the source's leases may add over a short window: CPUs × its lease.
    pub lease_allowance: u64,
    /// Admitted versus `rate × seconds + burst + lease_allowance`: at most 1.0 (the target).
    pub accuracy_with_allowance: f64,
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn pinned_program(limiter: &mut Limiter, tag: &str) -> Result<PathBuf> {
    let path = PathBuf::from(format!(
        "/sys/fs/bpf/limiter-bench-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    limiter.pin_program(&path)?;
    Ok(path)
}

/// Every CPU at once: cost on a shared and on distinct sources, and the accuracy of the
/// admitted count on a shared, rate-limited source.
pub fn multi_cpu(effort: Effort) -> Result<MultiCpu> {
    let n = cpus();
    let run_all = |path: &PathBuf,
                   frames: Vec<Vec<u8>>,
                   until: Option<Instant>|
     -> Result<Vec<(f64, u64)>> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = frames
                .into_iter()
                .enumerate()
                .map(|(cpu, frame)| {
                    let path = path.clone();
                    scope.spawn(move || -> Result<(f64, u64)> {
                        pin_to_cpu(cpu);
                        let program = Xdp::from_pin(&path, XdpAttachType::Interface)?;
                        let mut out = vec![0u8; 512];
                        // The kernel's time in the program, not the wall clock's.
                        let mut spent_ns = 0f64;
                        let mut sent = 0u64;
                        loop {
                            let result = program.test_run(TestRunOptions {
                                data_in: Some(&frame),
                                data_out: Some(&mut out),
                                repeat: effort.repeat,
                                ..Default::default()
                            })?;
                            spent_ns +=
                                result.duration.as_nanos() as f64 * f64::from(effort.repeat);
                            sent += u64::from(effort.repeat);
                            match until {
                                Some(t) if Instant::now() < t => continue,
                                None if sent < u64::from(effort.repeat) * effort.runs as u64 => {
                                    continue;
                                }
                                _ => break,
                            }
                        }
                        Ok((spent_ns / sent as f64, sent))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("bench thread"))
                .collect()
        })
    };
    let policy = Policy {
        default_limit: huge(),
        new_sources_per_cpu: None,
        ..Policy::default()
    };
    let mut limiter = load(&policy, 4_096)?;
    let path = pinned_program(&mut limiter, "mc")?;
    let shared = run_all(&path, vec![udp("192.0.2.10"); n], None);
    let distinct = run_all(
        &path,
        (0..n)
            .map(|i| udp(&format!("192.0.2.{}", 20 + i)))
            .collect(),
        None,
    );
    let _ = std::fs::remove_file(&path);
    let shared = shared?;
    let distinct = distinct?;

    // A burst that gives the source the largest lease, so the run measures it at its widest.
    let (rate, burst) = (100_000u64, 10_000u64);
    let lease = limiter_common::lease::bucket_lease(
        &limiter_common::rate::Gcra::per_second(rate, burst)?,
        aya::util::nr_cpus().map_err(|(_, e)| e)? as u32,
    );
    let lease_allowance = n as u64 * u64::from(lease);
    let policy = Policy {
        default_limit: LimitSpec::packets(rate, burst),
        new_sources_per_cpu: None,
        ..Policy::default()
    };
    let mut limiter = load(&policy, 4_096)?;
    let path = pinned_program(&mut limiter, "acc")?;
    let frame = udp("192.0.2.10");
    let before = limiter.stats()?;
    let started = Instant::now();
    let result = run_all(
        &path,
        vec![frame; n],
        Some(started + Duration::from_secs(effort.accuracy_seconds)),
    );
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    let result = result?;
    let after = limiter.stats()?;
    let admitted = after.packets(Stat::WithinLimit) - before.packets(Stat::WithinLimit);
    let offered: u64 = result.iter().map(|(_, sent)| sent).sum();
    if offered < admitted * 2 {
        bail!(
            "the accuracy run did not offer enough load ({offered} offered, {admitted} admitted)"
        );
    }
    let mean = |v: &[(f64, u64)]| v.iter().map(|(ns, _)| ns).sum::<f64>() / v.len() as f64;
    Ok(MultiCpu {
        cpus: n,
        shared_source_ns: mean(&shared),
        distinct_sources_ns: mean(&distinct),
        rate,
        burst,
        seconds,
        offered,
        admitted,
        accuracy: admitted as f64 / (rate as f64 * seconds + burst as f64),
        lease_allowance,
        accuracy_with_allowance: admitted as f64
            / (rate as f64 * seconds + (burst + lease_allowance) as f64),
    })
}

/// Bytes the default map sizes take in the kernel, from the map specifications.
pub fn default_memory() -> Vec<(String, u64)> {
    use limiter_common::layout::{
        Bucket, Counter, FlowKey, FlowState, Limit, PolicyEntry, ProvenKey, capacity,
    };
    use std::mem::size_of;
    let cpus = cpus() as u64;
    // Hash maps: key + value + the kernel's ~48-byte element header, preallocated.
    let hash = |key: usize, value: usize, n: u32| (key as u64 + value as u64 + 48) * u64::from(n);
    vec![
        (
            "SOURCES (LRU hash, preallocated)".into(),
            hash(
                size_of::<SourceKey>(),
                size_of::<SourceState>(),
                capacity::SOURCES,
            ),
        ),
        (
            "AGGREGATES (LRU hash, preallocated)".into(),
            hash(
                size_of::<SourceKey>(),
                size_of::<Bucket>(),
                capacity::AGGREGATES,
            ),
        ),
        (
            "FLOWS (LRU hash, preallocated)".into(),
            hash(
                size_of::<FlowKey>(),
                size_of::<FlowState>(),
                capacity::FLOWS,
            ),
        ),
        (
            "PROVEN (LRU hash, preallocated)".into(),
            hash(size_of::<ProvenKey>(), 8, capacity::PROVEN),
        ),
        (
            "POLICY_V4 + POLICY_V6 (LPM tries, allocated per prefix; at capacity)".into(),
            2 * u64::from(capacity::POLICY_PREFIXES) * (size_of::<PolicyEntry>() as u64 + 16 + 64),
        ),
        (
            "SERVICE_PORTS (array)".into(),
            u64::from(limiter_common::layout::SERVICE_PORTS_LEN) * 8,
        ),
        (
            "LIMITS (array)".into(),
            u64::from(capacity::LIMITS) * size_of::<Limit>() as u64,
        ),
        (
            "STATS + LIMIT_STATS (per-CPU arrays)".into(),
            cpus * size_of::<Counter>() as u64
                * u64::from(Stat::STATS_LEN + limiter_common::layout::LIMIT_STATS_LEN),
        ),
        (
            "EVENTS (ring buffer)".into(),
            u64::from(capacity::EVENTS_BYTES),
        ),
        (
            "LEASES (per-CPU array: the lease cache)".into(),
            cpus * u64::from(limiter_common::lease::LEASE_SLOTS)
                * size_of::<limiter_common::layout::Lease>() as u64,
        ),
    ]
}
