//! Live traffic on a veth pair: a generator in one namespace (XDP live frames, as
//! xdp-trafficgen does) floods the other, where the limiter, a bare XDP_DROP program,
//! nftables or iptables `hashlimit` enforce the same per-source policy. A well-behaved
//! source sends alongside the flood; we count how much of it gets through.

use std::{
    net::UdpSocket,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, xdp::XdpMode};
use aya_obj::programs::XdpAttachType;
use limiter_common::layout::Stat;
use limiter_tests::{
    frame::Frame,
    netns::{Lab, run_in},
    pin_to_cpu,
};
use limiter_user::{LimitSpec, Limiter, LoadOptions, Policy};
use serde::Serialize;

use crate::cost::Baselines;

/// The per-source policy every contender enforces.
pub const RATE: u64 = 1_000;
/// Its burst.
pub const BURST: u64 = 100;
const POLITE_PPS: u32 = 200;

/// One contender's run.
#[derive(Clone, Debug, Serialize)]
pub struct LiveRun {
    /// The contender.
    pub name: String,
    /// Whether the flood's source varied per packet.
    pub spoofed: bool,
    /// Frames the generator offered per second.
    pub offered_pps: f64,
    /// Frames the receiving side processed per second.
    pub processed_pps: f64,
    /// Frames it dropped per second.
    pub dropped_pps: f64,
    /// Datagrams the well-behaved source sent.
    pub polite_sent: u32,
    /// How many of them arrived.
    pub polite_received: u32,
    /// Average run time of the receiving XDP program per packet, from the kernel's BPF
    /// statistics (XDP contenders only), taken in a separate second of flood after the
    /// measurement: the statistics cost two clock reads a packet, so they stay off while
    /// packets per second are measured.
    pub program_ns: Option<f64>,
    /// CPU time of the receiver's NAPI thread (where the XDP program, the netdev ingress
    /// hook and the stack all run) per frame processed, from its scheduler accounting.
    pub receiver_cpu_ns_per_frame: Option<f64>,
    /// The share of the run the receiver's NAPI thread was on its CPU.
    pub receiver_busy: f64,
}

/// Seconds of flood with BPF statistics on, for `program_ns`.
const STATS_PASS: Duration = Duration::from_secs(1);

/// Nanoseconds the threads have spent on a CPU (`/proc/PID/schedstat`, first field).
fn cpu_ns(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn sh(ns: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .with_context(|| args.join(" "))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mac(ns: &str, iface: &str) -> Result<[u8; 6]> {
    let json: serde_json::Value =
        serde_json::from_str(&sh(ns, &["ip", "-j", "link", "show", "dev", iface])?)?;
    let text = json[0]["address"].as_str().context("no MAC address")?;
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

fn ifindex(ns: &str, iface: &str) -> Result<u32> {
    let json: serde_json::Value =
        serde_json::from_str(&sh(ns, &["ip", "-j", "link", "show", "dev", iface])?)?;
    Ok(json[0]["ifindex"].as_u64().context("no ifindex")? as u32)
}

/// `ethtool -S` counters of a veth, summed over its queues.
fn xdp_counters(ns: &str, iface: &str) -> Result<(u64, u64)> {
    let text = sh(ns, &["ethtool", "-S", iface])?;
    let (mut packets, mut drops) = (0, 0);
    for line in text.lines() {
        let Some((name, value)) = line.trim().split_once(':') else {
            continue;
        };
        let value: u64 = value.trim().parse().unwrap_or(0);
        if name.starts_with("rx_queue_") && name.ends_with("_xdp_packets") {
            packets += value;
        } else if name.starts_with("rx_queue_") && name.ends_with("_xdp_drops") {
            drops += value;
        }
    }
    Ok((packets, drops))
}

/// A UDP frame with a valid IPv4 header checksum (the kernel's IP layer checks it).
fn flood_frame(dst_mac: [u8; 6], src_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Frame::udp("192.0.2.50", 9999).payload(18).build();
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    let header = &f[14..34];
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let check = !(sum as u16);
    f[24..26].copy_from_slice(&check.to_be_bytes());
    f
}

/// Floods from the tx namespace with a pinned generator program for `duration`; returns
/// the frames offered.
fn generate(lab: &Lab, program_pin: PathBuf, frame: Vec<u8>, duration: Duration) -> Result<u64> {
    let ns = lab.tx.name.clone();
    let tx_if = lab.tx_if.clone();
    let index = ifindex(&ns, &tx_if)?;
    run_in(&ns, move || -> Result<u64> {
        pin_to_cpu(0);
        let program = Xdp::from_pin(&program_pin, XdpAttachType::Interface)?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        // The kernel wants data_end to be the frame's length.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&index.to_ne_bytes());
        let deadline = Instant::now() + duration;
        let mut sent = 0u64;
        let repeat = 50_000;
        while Instant::now() < deadline {
            program
                .test_run(TestRunOptions {
                    data_in: Some(&frame),
                    ctx_in: Some(&ctx),
                    repeat,
                    attrs: TestRunAttrs::new().xdp_live_frames(64),
                    ..Default::default()
                })
                .context("live-frames test run")?;
            sent += u64::from(repeat);
        }
        Ok(sent)
    })
}

/// Sends the well-behaved source's datagrams for `duration`; returns how many were sent.
fn polite(lab: &Lab, duration: Duration) -> thread::JoinHandle<u32> {
    let ns = lab.tx.name.clone();
    thread::spawn(move || {
        run_in(&ns, move || {
            pin_to_cpu(1 % std::thread::available_parallelism().map_or(1, usize::from));
            let socket = UdpSocket::bind("192.0.2.20:0").expect("bind the polite source");
            let count = (POLITE_PPS as f64 * duration.as_secs_f64()) as u32;
            let start = Instant::now();
            for i in 0..count {
                let due = start + duration.mul_f64(f64::from(i) / f64::from(count));
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
                let _ = socket.send_to(&i.to_be_bytes(), "192.0.2.1:9000");
            }
            count
        })
    })
}

fn policy() -> Policy {
    Policy {
        default_limit: LimitSpec::packets(RATE, BURST),
        aggregate_prefix_v4: 24,
        new_sources_per_cpu: Some(limiter_user::Rate::new(5_000, 5_000)),
        ..Policy::default()
    }
}

enum Contender {
    Limiter,
    BareDrop,
    ParseOnly,
    Nftables,
    Iptables,
}

/// Runs every contender, plain and spoofed, for `duration` each.
pub fn live(baselines: &mut Baselines, duration: Duration) -> Result<Vec<LiveRun>> {
    let lab = Lab::new("bn", &["192.0.2.1/24"], &["192.0.2.20/24"]);
    let rx_mac = mac(&lab.rx.name, &lab.rx_if)?;
    let tx_mac = mac(&lab.tx.name, &lab.tx_if)?;
    let frame = flood_frame(rx_mac, tx_mac);
    // The generator transmits with XDP_TX, which a veth only accepts from its peer when the
    // peer runs NAPI: an XDP program on the tx side does that.
    let id = std::process::id();
    let pins: Vec<(PathBuf, &str)> = [
        "trafficgen",
        "trafficgen_spoof",
        "bare_pass",
        "bare_drop",
        "parse_only",
    ]
    .iter()
    .map(|name| {
        (
            PathBuf::from(format!("/sys/fs/bpf/limiter-bench-{name}-{id}")),
            *name,
        )
    })
    .collect();
    for (path, name) in &pins {
        let _ = std::fs::remove_file(path);
        baselines
            .program_mut(name)?
            .pin(path)
            .with_context(|| format!("pin {name}"))?;
    }
    let result = (|| -> Result<Vec<LiveRun>> {
        let tx_if = lab.tx_if.clone();
        let pass_pin = pins[2].0.clone();
        let tx_keeper = run_in(&lab.tx.name, move || -> Result<Xdp> {
            let mut program = Xdp::from_pin(&pass_pin, XdpAttachType::Interface)?;
            program.attach(&tx_if, XdpMode::Driver)?;
            Ok(program)
        })?;
        let napi = napi_on_second_cpu(&lab.rx.name, &lab.rx_if)?;
        let receiver = {
            let r = lab.rx.run(|| UdpSocket::bind("192.0.2.1:9000"))?;
            r.set_read_timeout(Some(Duration::from_millis(300)))?;
            r
        };
        let mut runs = Vec::new();
        for spoofed in [false, true] {
            let generator = if spoofed {
                pins[1].0.clone()
            } else {
                pins[0].0.clone()
            };
            for contender in [
                Contender::Limiter,
                Contender::BareDrop,
                Contender::ParseOnly,
                Contender::Nftables,
                Contender::Iptables,
            ] {
                if spoofed && matches!(contender, Contender::BareDrop | Contender::ParseOnly) {
                    continue;
                }
                runs.push(run_contender(
                    &lab, &contender, spoofed, &generator, &pins, &frame, &receiver, duration,
                    &napi,
                )?);
            }
        }
        drop(tx_keeper);
        Ok(runs)
    })();
    for (path, _) in &pins {
        let _ = std::fs::remove_file(path);
    }
    result
}

#[allow(clippy::too_many_arguments, reason = "one run's inputs, used once")]
fn run_contender(
    lab: &Lab,
    contender: &Contender,
    spoofed: bool,
    generator: &std::path::Path,
    pins: &[(PathBuf, &str)],
    frame: &[u8],
    receiver: &UdpSocket,
    duration: Duration,
    napi: &[u32],
) -> Result<LiveRun> {
    let rx = lab.rx.name.clone();
    let rx_if = lab.rx_if.clone();
    // Receiving side: the contender.
    let mut limiter = None;
    let mut xdp_keeper = None;
    let name = match contender {
        Contender::Limiter => {
            let rx_if = rx_if.clone();
            limiter = Some(lab.rx.run(move || -> Result<Limiter> {
                let mut l = Limiter::load(&LoadOptions {
                    max_sources: Some(262_144),
                    max_aggregates: Some(65_536),
                    pin_dir: None,
                })?;
                l.apply(&policy().compile()?)?;
                l.attach(&rx_if, XdpMode::Driver)?;
                Ok(l)
            })?);
            "limiter (XDP, native)"
        }
        Contender::BareDrop | Contender::ParseOnly | Contender::Nftables | Contender::Iptables => {
            let pin = match contender {
                Contender::BareDrop => &pins[3].0,
                Contender::ParseOnly => &pins[4].0,
                _ => &pins[2].0,
            };
            let (pin, attach_if) = (pin.clone(), rx_if.clone());
            xdp_keeper = Some(lab.rx.run(move || -> Result<Xdp> {
                let mut program = Xdp::from_pin(&pin, XdpAttachType::Interface)?;
                program.attach(&attach_if, XdpMode::Driver)?;
                Ok(program)
            })?);
            match contender {
                Contender::BareDrop => "bare XDP_DROP (ceiling)",
                Contender::ParseOnly => "parse only, then XDP_DROP (reads the frame)",
                Contender::Nftables => {
                    let rules = format!(
                        "table netdev limiter_bench {{\n  set flood {{ type ipv4_addr; size 262144; flags dynamic; timeout 60s; }}\n  chain ingress {{\n    type filter hook ingress device \"{rx_if}\" priority 0; policy accept;\n    counter\n    ip protocol udp add @flood {{ ip saddr limit rate over {RATE}/second burst {BURST} packets }} counter drop\n  }}\n}}\n"
                    );
                    let path = std::env::temp_dir()
                        .join(format!("limiter-bench-{}.nft", std::process::id()));
                    std::fs::write(&path, rules)?;
                    sh(&rx, &["nft", "-f", path.to_str().context("path")?])?;
                    let _ = std::fs::remove_file(&path);
                    "nftables (netdev ingress, dynamic set + limit)"
                }
                Contender::Iptables => {
                    sh(
                        &rx,
                        &["iptables", "-t", "raw", "-A", "PREROUTING", "-i", &rx_if],
                    )?;
                    sh(
                        &rx,
                        &[
                            "iptables",
                            "-t",
                            "raw",
                            "-A",
                            "PREROUTING",
                            "-i",
                            &rx_if,
                            "-p",
                            "udp",
                            "-m",
                            "hashlimit",
                            "--hashlimit-above",
                            &format!("{RATE}/sec"),
                            "--hashlimit-burst",
                            &BURST.to_string(),
                            "--hashlimit-mode",
                            "srcip",
                            "--hashlimit-name",
                            "limiter_bench",
                            "--hashlimit-htable-size",
                            "262144",
                            "--hashlimit-htable-max",
                            "262144",
                            "-j",
                            "DROP",
                        ],
                    )?;
                    "iptables hashlimit (raw PREROUTING, iptables-nft)"
                }
                Contender::Limiter => unreachable!(),
            }
        }
    };
    thread::sleep(Duration::from_millis(200));
    let _ = receiver_drain(receiver);
    let before_xdp = xdp_counters(&rx, &rx_if)?;
    let before_stats = limiter.as_ref().map(|l| l.stats()).transpose()?;
    // Count the well-behaved datagrams as they arrive, so the socket buffer never overflows.
    let counting = receiver.try_clone()?;
    let counter = thread::spawn(move || {
        let deadline = Instant::now() + duration + Duration::from_millis(500);
        let mut buf = [0u8; 64];
        let mut n = 0u32;
        while Instant::now() < deadline {
            if counting.recv_from(&mut buf).is_ok() {
                n += 1;
            }
        }
        n
    });
    let program_info = || -> Option<(Duration, u64)> {
        let info = match contender {
            Contender::Limiter => limiter.as_ref()?.program().info().ok()?,
            Contender::BareDrop | Contender::ParseOnly => xdp_keeper.as_ref()?.info().ok()?,
            Contender::Nftables | Contender::Iptables => return None,
        };
        Some((info.run_time(), info.run_count()))
    };
    let polite_thread = polite(lab, duration);
    let cpu_before = cpu_ns(napi);
    let offered = generate(lab, generator.to_path_buf(), frame.to_vec(), duration)?;
    let receiver_cpu = cpu_ns(napi).saturating_sub(cpu_before);
    let polite_sent = polite_thread
        .join()
        .map_err(|_| anyhow::anyhow!("polite sender panicked"))?;
    let polite_received = counter
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    let secs = duration.as_secs_f64();
    let (processed, dropped) = match contender {
        Contender::Limiter => {
            let (before, after) = (
                before_stats.unwrap_or_default(),
                limiter.as_ref().context("limiter")?.stats()?,
            );
            let drops: u64 = Stat::ALL
                .iter()
                .filter(|s| s.drops())
                .map(|s| after.packets(*s) - before.packets(*s))
                .sum();
            (after.frames() - before.frames(), drops)
        }
        Contender::BareDrop | Contender::ParseOnly => {
            let after = xdp_counters(&rx, &rx_if)?;
            (after.0 - before_xdp.0, after.1 - before_xdp.1)
        }
        Contender::Nftables => {
            let json: serde_json::Value = serde_json::from_str(&sh(
                &rx,
                &["nft", "-j", "list", "table", "netdev", "limiter_bench"],
            )?)?;
            let counters: Vec<u64> = json["nftables"]
                .as_array()
                .context("nft json")?
                .iter()
                .filter_map(|item| item.get("rule"))
                .flat_map(|rule| rule["expr"].as_array().cloned().unwrap_or_default())
                .filter_map(|expr| expr.get("counter").and_then(|c| c["packets"].as_u64()))
                .collect();
            sh(&rx, &["nft", "delete", "table", "netdev", "limiter_bench"])?;
            (
                counters.first().copied().unwrap_or(0),
                counters.get(1).copied().unwrap_or(0),
            )
        }
        Contender::Iptables => {
            let text = sh(
                &rx,
                &[
                    "iptables",
                    "-t",
                    "raw",
                    "-L",
                    "PREROUTING",
                    "-v",
                    "-x",
                    "-n",
                ],
            )?;
            let counts: Vec<u64> = text
                .lines()
                .skip(2)
                .filter_map(|l| l.split_whitespace().next()?.parse().ok())
                .collect();
            sh(&rx, &["iptables", "-t", "raw", "-F", "PREROUTING"])?;
            (
                counts.first().copied().unwrap_or(0),
                counts.get(1).copied().unwrap_or(0),
            )
        }
    };
    // Then, for an XDP contender, a second of flood with the kernel's BPF statistics on:
    // the program's own run time per packet, whatever surrounds it.
    let program_ns = if program_info().is_some() {
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enable kernel BPF statistics")?;
        let before = program_info();
        generate(lab, generator.to_path_buf(), frame.to_vec(), STATS_PASS)?;
        let after = program_info();
        drop(stats);
        before.zip(after).and_then(|((t0, n0), (t1, n1))| {
            (n1 > n0).then(|| (t1 - t0).as_nanos() as f64 / (n1 - n0) as f64)
        })
    } else {
        None
    };
    drop(limiter);
    drop(xdp_keeper);
    Ok(LiveRun {
        name: name.into(),
        spoofed,
        offered_pps: offered as f64 / secs,
        processed_pps: processed as f64 / secs,
        dropped_pps: dropped as f64 / secs,
        polite_sent,
        polite_received,
        program_ns,
        receiver_cpu_ns_per_frame: (processed > 0).then(|| receiver_cpu as f64 / processed as f64),
        receiver_busy: receiver_cpu as f64 / duration.as_nanos() as f64,
    })
}

/// Moves the receiving veth's packet processing to its own kernel thread on the last CPU,
/// away from the generator on CPU 0, so what is measured is the receiver's capacity.
fn napi_on_second_cpu(ns: &str, iface: &str) -> Result<Vec<u32>> {
    // A veth has NAPI only with GRO on (or an XDP program); threaded NAPI needs it.
    sh(ns, &["ethtool", "-K", iface, "gro", "on"])?;
    sh(
        ns,
        &[
            "sh",
            "-c",
            &format!("echo 1 > /sys/class/net/{iface}/threaded"),
        ],
    )?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let last = (cpus - 1).to_string();
    let out = Command::new("pgrep")
        .args(["-f", &format!("napi/{iface}-")])
        .output()?;
    let pids = String::from_utf8_lossy(&out.stdout).into_owned();
    if pids.trim().is_empty() {
        bail!("no NAPI thread for {iface}");
    }
    for pid in pids.split_whitespace() {
        let status = Command::new("taskset").args(["-pc", &last, pid]).output()?;
        if !status.status.success() {
            bail!("taskset {pid}: {}", String::from_utf8_lossy(&status.stderr));
        }
    }
    Ok(pids
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect())
}

fn receiver_drain(receiver: &UdpSocket) -> u32 {
    let mut buf = [0u8; 64];
    let mut n = 0;
    while receiver.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    n
}
