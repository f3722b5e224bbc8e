//! `limiter-bench`: cost per packet, scaling, several CPUs, and live traffic against
//! nftables and iptables. Writes `bench/results/<date>-<commit>.{md,json,png}`.
//!
//! Benchmarks report figures; they never fail on speed. They do fail when a scenario takes
//! the wrong path, because a benchmark that measures the wrong path is worse than none.

mod chart;
mod control;
mod cost;
mod fleet;
mod live;

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use serde::Serialize;

use crate::cost::{Cost, Effort, MultiCpu, ScalePoint};

#[derive(Parser)]
#[command(about = "Benchmarks of the limiter's XDP program")]
struct Args {
    /// A short run (fewer repetitions, smaller tables, shorter live runs).
    #[arg(long)]
    quick: bool,
    /// Where results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Skip the live veth runs.
    #[arg(long)]
    no_live: bool,
    /// Only the per-packet costs (for quick iterations on the program; writes nothing).
    #[arg(long)]
    costs_only: bool,
    /// Only the fleet's convergence (prints it; writes nothing).
    #[arg(long)]
    fleet_only: bool,
}

#[derive(Serialize)]
struct Machine {
    kernel: String,
    cpu: String,
    cores: usize,
    rustc: String,
    nft: String,
    iptables: String,
    commit: String,
    date: String,
}

#[derive(Serialize)]
struct Report {
    machine: Machine,
    quick: bool,
    /// Interleaved rounds of every kernel-timed measurement.
    rounds: usize,
    baselines: Vec<Cost>,
    scenarios: Vec<Cost>,
    scaling: Vec<ScalePoint>,
    multi_cpu: MultiCpu,
    live: Vec<live::LiveRun>,
    control_plane: control::ControlPlane,
    fleet: fleet::FleetConvergence,
    memory: Vec<(String, u64)>,
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    Machine {
        kernel: command_line("uname", &["-r"]),
        cpu,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        rustc: command_line("rustc", &["--version"]),
        nft: command_line("nft", &["--version"]),
        iptables: command_line("iptables", &["--version"]),
        commit: command_line("git", &["rev-parse", "--short", "HEAD"]),
        date: command_line("date", &["-u", "+%Y-%m-%d"]),
    }
}

/// Fleet denies written, one at a time, to measure convergence.
const FLEET_CHANGES: usize = 100;

fn fleet_markdown(f: &fleet::FleetConvergence) -> String {
    format!(
        "\n## Fleet convergence\n\n{} fleet denies written one at a time with `limiter fleet deny add` to a \
         three-member etcd cluster, each timed from the entry's creation (the writer's clock) to \
         the first frame of its source dropped on the last of {} hosts. A host is probed every \
         {:.1} ms, which bounds the resolution.\n\n| p50 | p99 | max | target |\n|---:|---:|---:|---:|\n\
         | {:.1} ms | {:.1} ms | {:.1} ms | 1000 ms |\n\nThe slowest was change {} (0-based), last applied by host {}.\n",
        f.changes,
        f.hosts,
        f.probe_cycle_ms * f.hosts as f64,
        f.p50_ms,
        f.p99_ms,
        f.max_ms,
        f.slowest.0,
        f.slowest.1
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    let effort = if args.quick {
        Effort {
            repeat: 200_000,
            runs: 5,
            single_calls: 20_000,
            max_sources: 100_000,
            accuracy_seconds: 2,
        }
    } else {
        Effort {
            repeat: 2_000_000,
            runs: 7,
            single_calls: 200_000,
            max_sources: 1_000_000,
            accuracy_seconds: 10,
        }
    };
    let live_duration = Duration::from_secs(if args.quick { 2 } else { 5 });
    let machine = machine();
    eprintln!(
        "bench: {} on {} ({} cores), {}",
        machine.kernel,
        machine.cpu,
        machine.cores,
        if args.quick { "quick" } else { "full" }
    );

    if args.fleet_only {
        let fleet = fleet::convergence(FLEET_CHANGES)?;
        println!("{}", fleet_markdown(&fleet));
        return Ok(());
    }
    let mut baselines = cost::Baselines::load()?;
    eprintln!("bench: baselines and scenarios, interleaved, kernel-timed");
    let (base, mut scenarios) = cost::costs(&baselines, effort)?;
    eprintln!("bench: one call per packet (new sources at fixed table sizes, challenge, ACKs)");
    scenarios.extend(cost::per_packet_costs(&baselines, effort)?);
    if args.costs_only {
        for c in base.iter().chain(&scenarios) {
            println!(
                "{:<45} {:>8.1} ns  {:>5.2}x  {}",
                c.name, c.ns, c.ratio, c.verdict
            );
        }
        return Ok(());
    }
    eprintln!("bench: control plane");
    let control_plane = control::control_plane(if args.quick { 5 } else { 21 })?;
    eprintln!("bench: scaling");
    let scaling = cost::scaling(effort)?;
    eprintln!("bench: multi-CPU");
    let multi_cpu = cost::multi_cpu(effort)?;
    eprintln!("bench: fleet convergence");
    let fleet = fleet::convergence(FLEET_CHANGES)?;
    let live = if args.no_live {
        Vec::new()
    } else {
        eprintln!("bench: live veth runs");
        live::live(&mut baselines, live_duration)?
    };
    let report = Report {
        machine,
        quick: args.quick,
        rounds: effort.runs.max(5),
        baselines: base,
        scenarios,
        scaling,
        multi_cpu,
        live,
        control_plane,
        fleet,
        memory: cost::default_memory(),
    };

    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    let stem = format!(
        "{}-{}{}",
        report.machine.date,
        report.machine.commit,
        if args.quick { "-quick" } else { "" }
    );
    let json_path = args.out.join(format!("{stem}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let png_path = args.out.join(format!("{stem}.png"));
    chart::draw(
        &png_path,
        &report.baselines,
        &report.scenarios,
        &report.scaling,
    )?;
    let md = markdown(&report, &png_path);
    let md_path = args.out.join(format!("{stem}.md"));
    std::fs::write(&md_path, &md)?;
    println!("{md}");
    eprintln!(
        "bench: wrote {}, {} and {}",
        md_path.display(),
        json_path.display(),
        png_path.display()
    );
    Ok(())
}

fn markdown(r: &Report, png: &std::path::Path) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(
        s,
        "# limiter benchmark, {} ({}){}\n",
        m.date,
        m.commit,
        if r.quick { ", quick run" } else { "" }
    );
    let _ = writeln!(
        s,
        "Machine: {} ({} cores), Linux {}; {}; {}; {}.\n",
        m.cpu, m.cores, m.kernel, m.rustc, m.nft, m.iptables
    );
    let _ = writeln!(
        s,
        "Method: `BPF_PROG_TEST_RUN`, timed by the kernel (the average duration of the repetitions it reports, measured \
         around the program alone). Every contender is measured once per round, {} rounds interleaved, so drift over the run \
         hits all alike; the median round is reported with the spread (min–max in brackets). Each scenario is first \
         checked with `repeat = 1` to take the intended path (verdict and counter), and checked again after. Paths that \
         need a new frame per packet (new sources, the challenge, a flow's ACKs) use one call per packet, interleaved the \
         same way with the bare drop; new sources arrive at a full table of a fixed size ({}), which the LRU keeps full. \
         Ratios are to the bare `XDP_DROP` measured the same way in the same run.\n\n\
         Earlier definitions, kept so runs stay comparable: until this method, results files timed repetitions by the \
         wall clock (which counts time other tenants take and compresses every ratio); that figure is the `wall` \
         column here (and `wall_ns`, `wall_ratio` in the JSON). One-call-per-packet paths were always kernel-timed, \
         but on a table that grew during the run. Until the lease cache (results files before a795367), a repeated \
         packet of a known source took the exact path every time; now it takes it once in every lease (65 packets at \
         most), as a steady source on one CPU does, and drops for a source's own rate are cached: the exact path per \
         packet is the row \"judged exactly\" (a byte limit, which is never leased).\n",
        r.rounds,
        cost::TABLE_SIZES
            .iter()
            .map(|n| format!("{n} sources"))
            .collect::<Vec<_>>()
            .join(" and ")
    );
    let _ = writeln!(
        s,
        "![cost per scenario and scaling]({})\n",
        png.file_name()
            .map_or(String::new(), |f| f.to_string_lossy().into_owned())
    );
    let _ = writeln!(
        s,
        "## Cost per packet\n\n| scenario | path | ns/packet (kernel) | ratio to bare drop | wall ns | wall ratio |\n|---|---|---:|---:|---:|---:|"
    );
    for c in r.baselines.iter().chain(&r.scenarios) {
        let wall = |v: Option<f64>, digits: usize| {
            v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} [{:.1}–{:.1}] | {:.2} | {} | {} |",
            c.name,
            c.verdict,
            c.ns,
            c.min_ns,
            c.max_ns,
            c.ratio,
            wall(c.wall_ns, 1),
            wall(c.wall_ratio, 2)
        );
    }
    let _ = writeln!(
        s,
        "\n## Scaling\n\n| curve | size | ns/packet | ratio to smallest |\n|---|---:|---:|---:|"
    );
    for p in &r.scaling {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.2} |",
            p.curve, p.size, p.ns, p.ratio
        );
    }
    let mc = &r.multi_cpu;
    let _ = writeln!(
        s,
        "\n## Several CPUs\n\n{} CPUs at once, kernel-timed: {:.1} ns/packet per CPU on one shared source, {:.1} on distinct sources.\n\
         Accuracy: one source limited to {}/s (burst {}) hammered from every CPU for {:.1} s: {} offered, {} admitted, \
         {:.4} of `rate × time + burst`, {:.4} of `rate × time + burst + lease allowance` ({} CPUs × lease = {} packets; target: at most 1 and at least 0.98 of `rate × time`).\n",
        mc.cpus,
        mc.shared_source_ns,
        mc.distinct_sources_ns,
        mc.rate,
        mc.burst,
        mc.seconds,
        mc.offered,
        mc.admitted,
        mc.accuracy,
        mc.accuracy_with_allowance,
        mc.cpus,
        mc.lease_allowance,
    );
    if !r.live.is_empty() {
        let _ = writeln!(
            s,
            "## Live veth\n\nPolicy everywhere: {}/s per source, burst {}. The generator floods with XDP live frames \
             from one CPU; a well-behaved source sends {} datagrams/s alongside. The receiver's packet processing runs in \
             its own NAPI thread on another CPU; its CPU time (scheduler accounting) per processed frame is what each \
             contender costs the host. BPF statistics are off while packets per second are measured (they cost two clock \
             reads a packet); the program's own ns/packet comes from a separate second of flood with them on. (Until \
             this method, results files measured with statistics on throughout.)\n\n\
             | contender | flood | offered pps | processed pps | dropped pps | well-behaved through | receiver CPU ns/frame | receiver busy | program ns/packet (kernel stats) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|",
            live::RATE,
            live::BURST,
            200
        );
        for l in &r.live {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {}/{} | {} | {:.0}% | {} |",
                l.name,
                if l.spoofed {
                    "spoofed /16"
                } else {
                    "one source"
                },
                l.offered_pps,
                l.processed_pps,
                l.dropped_pps,
                l.polite_received,
                l.polite_sent,
                l.receiver_cpu_ns_per_frame
                    .map_or("-".into(), |ns| format!("{ns:.0}")),
                100.0 * l.receiver_busy,
                l.program_ns.map_or("-".into(), |ns| format!("{ns:.0}"))
            );
        }
        let find = |prefix: &str, spoofed: bool| {
            r.live
                .iter()
                .find(|l| l.name.starts_with(prefix) && l.spoofed == spoofed)
        };
        if let (Some(lim), Some(nft), Some(bare)) = (
            find("limiter", false),
            find("nftables", false),
            find("bare", false),
        ) {
            let cpu = |l: &live::LiveRun| l.receiver_cpu_ns_per_frame.unwrap_or(f64::NAN);
            let _ = writeln!(
                s,
                "\nRatios (one source): receiver CPU per frame, nftables/limiter {:.2} and limiter/bare drop {:.2}; \
                 limiter/nftables dropped pps {:.2}, limiter/bare-drop processed pps {:.2}.",
                cpu(nft) / cpu(lim),
                cpu(lim) / cpu(bare),
                lim.dropped_pps / nft.dropped_pps.max(1.0),
                lim.processed_pps / bare.processed_pps.max(1.0)
            );
        }
    }
    let cp = &r.control_plane;
    let _ = writeln!(
        s,
        "\n## Control plane\n\nOne `limit set` (the default limit) with {} deny entries installed, median of {} \
         changes on a loaded program's maps.\n\n| what | writes | µs |\n|---|---:|---:|\n\
         | the planned map writes | {} | {:.1} |\n\
         | the whole apply (diffing the policies included) | {} | {:.0} |\n\
         | rewriting every entry (each change before the plan) | {} | {:.0} |",
        cp.list_entries,
        cp.rounds,
        cp.writes,
        cp.writes_us,
        cp.writes,
        cp.apply_us,
        cp.rewrite_all_writes,
        cp.rewrite_all_us
    );
    s.push_str(&fleet_markdown(&r.fleet));
    let _ = writeln!(
        s,
        "\n## Memory of the default map sizes\n\n| map | bytes |\n|---|---:|"
    );
    let mut total = 0;
    for (name, bytes) in &r.memory {
        total += bytes;
        let _ = writeln!(s, "| {name} | {bytes} |");
    }
    let _ = writeln!(s, "| total | {total} (~{} MiB) |", total / (1 << 20));
    s
}
