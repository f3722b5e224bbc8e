//! `limiter-demo`: an exchange API host keeps serving its clients while it is flooded.
//!
//! It builds a lab of network namespaces (edge host, clients, attacker, and a bridge joining
//! them), runs a real HTTP API on the edge, and plays five phases: a baseline, a multi-vector
//! flood without the limiter, the same with the limiter in monitor mode and then enforcing,
//! and operator actions through the real `limiter` CLI. It prints a live line a second, a
//! summary, and writes `timeline.png` and `results.json`. The exit status says whether the
//! limiter did its job. Everything it creates is removed at the end, on error, and on Ctrl-C.

mod api;
mod attacks;
mod chart;
mod clients;
mod control;
mod fleet;
mod http;
mod lab;
mod metrics;
mod netns;
mod packets;
mod phases;
mod report;
mod shutdown;

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

use crate::{
    attacks::AttackPlan,
    control::{LabFiles, LimiterCli},
    lab::Lab,
    report::{Report, Settings},
    shutdown::Interrupted,
};

#[derive(Parser)]
#[command(
    name = "limiter-demo",
    about = "Shows an exchange API host served through a flood, with and without the limiter",
    long_about = "Builds a lab of network namespaces (lim-demo-edge, lim-demo-client, \
        lim-demo-attacker, joined by a bridge in lim-demo-net), runs an HTTP API and the \
        limiter on the edge, floods it, and shows per phase what the clients get. \
        Needs root. Writes timeline.png and results.json to --out.",
    after_help = "Examples:\n  limiter-demo --limiter target/debug/limiter\n  \
        limiter-demo --limiter target/debug/limiter --duration 2 --out /tmp/demo\n  \
        limiter-demo --limiter target/debug/limiter --keep   # then explore, and:\n  \
        limiter-demo --cleanup",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    demo: DemoArgs,
    #[command(subcommand)]
    command: Option<Internal>,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// The `limiter` binary (daemon and CLI), e.g. target/debug/limiter.
    #[arg(long, value_name = "PATH", required_unless_present = "cleanup")]
    limiter: Option<PathBuf>,
    /// Seconds of each phase.
    #[arg(long, value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=60))]
    duration: u64,
    /// Leave the lab up at the end and print commands to try (remove it with --cleanup).
    #[arg(long)]
    keep: bool,
    /// Where to write timeline.png, results.json and the lab's files.
    #[arg(long, value_name = "DIR", default_value = "demo-out")]
    out: PathBuf,
    /// Instead of the API lab: three edge hosts following one etcd cluster, an attack on one,
    /// and its block reaching the others (docs/fleet.md).
    #[arg(long, conflicts_with_all = ["keep", "cleanup"])]
    fleet: bool,
    /// Remove a lab left by --keep or by an interrupted run, then exit.
    #[arg(long, conflicts_with_all = ["keep", "limiter"])]
    cleanup: bool,
    /// Packets per second of each packet flood (UDP, spoofed SYN, rotating IPv6).
    ///
    /// At least 10,000: below that, what the limits rightly admit (200 pps per source) is a visible
    /// share of the flood and the 95% expectation stops meaning much.
    #[arg(long, value_name = "PPS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u32).range(10_000..=50_000))]
    attack_pps: u32,
}

#[derive(Subcommand)]
enum Internal {
    /// Serve the lab's HTTP API (started by the demo inside the edge namespace).
    #[command(hide = true)]
    ServeApi {
        /// Address to listen on (repeat for several).
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
    },
}

/// Requests per second of the HTTP flood.
const HTTP_FLOOD_REQUESTS_PER_SECOND: u32 = 20_000;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Internal::ServeApi { listen }) => api::serve(&listen).map(|()| true),
        None if cli.demo.cleanup => cleanup().map(|()| true),
        None => run_demo(&cli.demo),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        // After Ctrl-C a command of ours may fail first (a terminal's Ctrl-C reaches the
        // short-lived `ip` and `limiter` commands too): that is still an interruption.
        Err(e) if e.is::<Interrupted>() || shutdown::requested() => {
            eprintln!("limiter-demo: interrupted; the lab has been removed");
            ExitCode::from(shutdown::INTERRUPTED_EXIT_CODE)
        }
        Err(e) => {
            eprintln!("limiter-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cleanup() -> Result<()> {
    require_root()?;
    let found = lab::leftovers();
    if found.is_empty() {
        println!("no lab to remove");
        return Ok(());
    }
    println!("removing: {}", found.join(", "));
    lab::teardown()?;
    println!("done");
    Ok(())
}

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("run as root: the lab needs network namespaces, raw sockets and BPF");
    }
    Ok(())
}

/// Checks what the demo needs before creating anything.
fn preflight(limiter: &Path) -> Result<PathBuf> {
    require_root()?;
    let limiter = limiter
        .canonicalize()
        .with_context(|| format!("the limiter binary {}", limiter.display()))?;
    if !limiter.is_file() {
        bail!("{} is not a file", limiter.display());
    }
    let bpffs = nix::sys::statfs::statfs("/sys/fs/bpf").context("stat /sys/fs/bpf")?;
    if bpffs.filesystem_type() != nix::sys::statfs::BPF_FS_MAGIC {
        bail!(
            "/sys/fs/bpf is not a bpffs mount; run `cargo xtask setup` or `mount -t bpf bpf /sys/fs/bpf`"
        );
    }
    // Before anything is touched: a kept lab's files under --out are still in use.
    lab::ensure_absent()?;
    for tool in ["ip", "nsenter"] {
        let found = std::process::Command::new(tool)
            .arg("-V")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok();
        if !found {
            bail!("`{tool}` is missing (Debian: apt-get install iproute2 util-linux)");
        }
    }
    Ok(limiter)
}

fn run_demo(args: &DemoArgs) -> Result<bool> {
    let Some(limiter) = &args.limiter else {
        bail!("--limiter PATH is required");
    };
    let limiter = preflight(limiter)?;
    if args.fleet {
        // SAFETY: set before any thread of the demo starts; the fleet lab's daemons read it.
        unsafe { std::env::set_var("LIMITER_BINARY", &limiter) };
        return fleet::run(args.duration, &args.out);
    }
    shutdown::install()?;
    let files = LabFiles::prepare(&args.out)?;
    let config = control::config_text();
    fs::write(&files.config, &config)
        .with_context(|| format!("write {}", files.config.display()))?;
    let cli = LimiterCli::new(&limiter, &files.socket);
    let plan = AttackPlan {
        flood_pps: args.attack_pps,
        http_requests_per_second: HTTP_FLOOD_REQUESTS_PER_SECOND,
    };

    println!(
        "== building the lab: namespaces {}",
        lab::NAMESPACES.join(", ")
    );
    let mut lab = Lab::create()?;
    let started = Instant::now();
    let outcome = play(args, &files, &cli, &mut lab, plan, &config);
    let failed = match outcome {
        Ok(failed) => failed,
        Err(e) => {
            if e.is::<Interrupted>() || shutdown::requested() {
                eprintln!("\nlimiter-demo: interrupted; removing the lab ...");
            } else {
                eprintln!("\nlimiter-demo: failed; removing the lab ...");
            }
            drop(lab);
            return Err(e);
        }
    };
    if args.keep {
        lab.keep();
        print_keep_help(&cli, &files);
        // --keep is for exploring: the verdict above stands, the status is 0.
        return Ok(true);
    }
    println!("\n== removing the lab");
    drop(lab);
    let left = lab::leftovers();
    if !left.is_empty() {
        bail!("the lab was not fully removed: {}", left.join(", "));
    }
    println!(
        "lab removed; the whole run took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    for expectation in &failed {
        eprintln!("limiter-demo: expectation failed: {expectation}");
    }
    Ok(failed.is_empty())
}

/// Starts the service and the clients, runs the phases, and reports. Returns the expectations
/// that failed, each with what was measured.
fn play(
    args: &DemoArgs,
    files: &LabFiles,
    cli: &LimiterCli,
    lab: &mut Lab,
    plan: AttackPlan,
    config: &str,
) -> Result<Vec<String>> {
    let self_exe = std::env::current_exe().context("find this program's path")?;
    let listen = [
        SocketAddr::new(lab::EDGE_V4.into(), lab::API_PORT),
        SocketAddr::new(lab::EDGE_V6.into(), lab::API_PORT),
    ];
    let mut api_args = vec!["serve-api".to_owned()];
    for addr in listen {
        api_args.push("--listen".to_owned());
        api_args.push(addr.to_string());
    }
    lab.spawn_in_edge("the API service", &self_exe, &api_args, &files.api_log)?;
    clients::wait_for_api(Duration::from_secs(10))?;
    println!(
        "== API up on http://{}:{port}{path} and http://[{}]:{port}{path}",
        lab::EDGE_V4,
        lab::EDGE_V6,
        port = lab::API_PORT,
        path = api::TICKER_PATH,
    );
    println!(
        "   clients: {} each at {} req/s, a new connection per request, {} ms timeout",
        clients::CLIENTS
            .iter()
            .map(|c| format!("{} {}", c.name, c.source))
            .collect::<Vec<_>>()
            .join(", "),
        clients::NORMAL_RATE,
        clients::REQUEST_TIMEOUT.as_millis()
    );
    println!(
        "   API capacity: {} workers, {} ms a request: at most {} req/s; past that, 503 at once",
        api::API_WORKERS,
        api::REQUEST_COST.as_millis(),
        api::capacity_per_second()
    );
    println!(
        "   attack (phases 2-4, all at once): UDP flood from {}, spoofed SYN flood from {}/{}, \
         prefix flood from every address of {}/{}, rotating-source IPv6 flood in {}/{}, each {} \
         pps; HTTP flood from {} ({} req/s cap)",
        lab::ATTACKER_V4,
        lab::SPOOFED_V4_NET.0,
        lab::SPOOFED_V4_NET.1,
        lab::PREFIX_FLOOD_V4_NET.0,
        lab::PREFIX_FLOOD_V4_NET.1,
        lab::ROTATING_V6_NET.0,
        lab::ROTATING_V6_NET.1,
        plan.flood_pps,
        lab::ATTACKER_V4,
        plan.http_requests_per_second
    );
    println!(
        "   limiter (attached before phase 3): {} pps per source (burst {}), class {} ({}) {} pps; \
         config {}",
        control::DEFAULT_PPS,
        control::DEFAULT_BURST,
        control::MARKET_MAKER_CLASS,
        lab::MARKET_MAKER_V4,
        control::MARKET_MAKER_PPS,
        files.config.display()
    );
    println!();

    let epoch = Instant::now();
    let legit = clients::LegitClients::start(epoch)?;
    let data = phases::run(
        epoch,
        Duration::from_secs(args.duration),
        plan,
        lab,
        files,
        cli,
        legit,
    )?;

    let report = Report::build(
        &data,
        Settings {
            phase_seconds: args.duration,
            attack: plan,
            legit_requests_per_second_each: clients::NORMAL_RATE,
            request_timeout_ms: clients::REQUEST_TIMEOUT.as_millis(),
            clients: &clients::CLIENTS,
            limiter_config: config.to_owned(),
        },
    );
    report.print();
    let out = files
        .dir
        .parent()
        .context("the output directory")?
        .to_owned();
    let json_path = out.join("results.json");
    report.write_json(&json_path)?;
    let chart_path = out.join("timeline.png");
    chart::draw(&chart_path, &report)?;
    println!();
    println!("wrote {} and {}", chart_path.display(), json_path.display());
    Ok(report
        .expectations
        .iter()
        .filter(|e| !e.passed)
        .map(|e| format!("{} (measured: {})", e.name, e.measured))
        .collect())
}

fn print_keep_help(cli: &LimiterCli, files: &LabFiles) {
    let edge = netns::path(lab::EDGE_NS);
    let client = netns::path(lab::CLIENT_NS);
    println!("\n== the lab is still up (--keep). Try:");
    for args in [
        &["status"][..],
        &["top", "-n", "10"],
        &["limit", "list"],
        &["allow", "list"],
        &["deny", "add", "10.77.1.10", "--timeout", "1m"],
        &["mode", "monitor"],
    ] {
        println!("  {}", cli.display(args));
    }
    println!(
        "  nsenter --net={} curl -s http://{}:{}{}",
        client.display(),
        lab::EDGE_V4,
        lab::API_PORT,
        api::TICKER_PATH
    );
    println!(
        "  nsenter --net={} curl -s http://{}/metrics | grep limiter_packets_total",
        edge.display(),
        lab::METRICS_ADDR
    );
    println!("  daemon log: {}", files.daemon_log.display());
    println!("and remove it with:\n  {} --cleanup", lab::program_name());
}
