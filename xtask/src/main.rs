//! Project tasks: `cargo xtask setup | build | test | demo`.
//!
//! Every task but `setup` runs `setup` first, so a fresh machine needs nothing else.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demo tasks for the limiter")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install every missing prerequisite (LLVM 22, bpf-linker, nightly rust-src, bpffs).
    Setup,
    /// Build the XDP program and the `limiter` binary (release).
    Build,
    /// Run every tier in order (lints, host, program, live, sessions, daemon, metrics,
    /// fleet, packaging, demo), or the tiers named, optionally only the tests whose names contain a filter.
    Test {
        /// Only these tiers (default: all, in order).
        #[arg(value_enum)]
        tiers: Vec<Tier>,
        /// Only tests whose names contain this: `cargo xtask test daemon -- recreated`.
        #[arg(last = true)]
        filter: Option<String>,
    },
    /// The lab demo: an exchange API host flooded and defended live.
    Demo {
        /// Seconds per phase.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// Leave the lab up afterwards, with commands to try.
        #[arg(long)]
        keep: bool,
        /// Use the binaries already built.
        #[arg(long)]
        no_build: bool,
        /// Remove a leftover lab and exit.
        #[arg(long)]
        cleanup: bool,
        /// The fleet instead: three edge hosts on one etcd cluster, an attack on one, and
        /// the block reaching the others.
        #[arg(long, conflicts_with_all = ["keep", "cleanup"])]
        fleet: bool,
    },
    /// Build the Debian package (target/debian/limiter_*.deb) with its man page.
    Package,
    /// Benchmarks: cost per packet, scaling, several CPUs, live veth against nftables.
    Bench {
        /// A short run (under two minutes).
        #[arg(long)]
        quick: bool,
    },
}

/// The test tiers, in the order `cargo xtask test` runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Tier {
    /// rustfmt and clippy.
    Lints,
    /// Host tests, no privileges used.
    Host,
    /// Crafted frames through BPF_PROG_TEST_RUN.
    Program,
    /// Real packets through veths in namespaces.
    Live,
    /// Real TCP sessions (and spoofed floods) through both programs in namespaces.
    Sessions,
    /// The real daemon and CLI against live traffic, fail-safe cases included.
    Daemon,
    /// promtool, the dashboard, a real Prometheus.
    Metrics,
    /// A real three-member etcd cluster and three daemons: the fleet.
    Fleet,
    /// The Debian package, installed and removed.
    Packaging,
    /// The demo, short form.
    Demo,
}

const LLVM_PACKAGE: &str = "llvm-22-dev";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13";

/// Debian packages every task uses, with what for.
const CORE_TOOLS: &[(&str, &str)] = &[
    ("iproute2", "network namespaces and veths"),
    (
        "protobuf-compiler",
        "protoc: the etcd-client crate generates its gRPC code when it is built",
    ),
    (
        "libprotobuf-dev",
        "the protobuf includes etcd-client's protocol files import",
    ),
    ("util-linux", "nsenter and setpriv"),
    ("fonts-dejavu-core", "text in the benchmark and demo charts"),
    (
        "ethtool",
        "GRO on veths (the demo's challenge replies), veth counters in the benchmarks",
    ),
];

/// Debian packages only the tests and benchmarks use.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("prometheus", "promtool and a server for the metrics tests"),
    ("nftables", "the nftables contender in the benchmarks"),
    (
        "iptables",
        "the iptables hashlimit contender in the benchmarks",
    ),
    (
        "lintian",
        "the packaging tests' check of the Debian package",
    ),
    (
        "systemd",
        "systemd-analyze: the packaging tests' security score of the unit",
    ),
    (
        "etcd-server",
        "the fleet tests' etcd cluster (Debian's 3.4, the v3 API)",
    ),
    (
        "etcd-client",
        "etcdctl: the fleet tests find the leader, compact, and list leases",
    ),
    (
        "openssl",
        "the fleet tests' CA and certificates for etcd with TLS client authentication",
    ),
    (
        "curl",
        "the packaging tests read /healthz and /metrics as docs/operations.md does",
    ),
    (
        "systemd-container",
        "systemd-nspawn: the packaging tests boot systemd in a container to run the unit",
    ),
    (
        "man-db",
        "the packaging tests format every man page with `man --warnings`",
    ),
    (
        "file",
        "the packaging tests check that the packaged binary is stripped",
    ),
];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("cd {}", root.display()))?;
    // The demo needs only the core; tests and benchmarks also drive Prometheus, nftables
    // and iptables, which `setup` itself installs too.
    // The fleet demo runs the fleet tests' etcd cluster.
    let test_tools = !matches!(
        cli.task,
        Task::Demo { fleet: false, .. } | Task::Build | Task::Package
    );
    // Lints and host tests need no privileges and nothing installed beyond Rust: a new
    // contributor runs them as themselves.
    let unprivileged = matches!(&cli.task, Task::Test { tiers, .. }
        if !tiers.is_empty() && tiers.iter().all(|t| matches!(t, Tier::Lints | Tier::Host)));
    if !unprivileged {
        setup(&root, test_tools)?;
    }
    match cli.task {
        Task::Setup => Ok(()),
        Task::Build => run(cargo().args(["build", "--release"])),
        Task::Test { tiers, filter } => test(&tiers, filter.as_deref()),
        Task::Demo {
            duration,
            keep,
            no_build,
            cleanup,
            fleet,
        } => demo(&root, duration, keep, no_build, cleanup, fleet),
        Task::Package => package(&root),
        Task::Bench { quick } => {
            // The fleet benchmark runs real daemons: the `limiter` binary beside the bench's.
            run(cargo().args([
                "build",
                "--release",
                "-p",
                "limiter-bench",
                "-p",
                "limiter-user",
                "--bins",
            ]))?;
            let mut bench = Command::new(root.join("target/release/limiter-bench"));
            bench.args(["--out", "bench/results"]);
            if quick {
                bench.arg("--quick");
            }
            run(&mut bench)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Cargo of the nightly toolchain, without the stable toolchain's variables that `cargo
/// xtask` inherits (they would send the build back to stable).
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"]);
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup(root: &Path, test_tools: bool) -> Result<()> {
    let uid = output(Command::new("id").arg("-u")).unwrap_or_default();
    if uid.trim() != "0" {
        bail!(
            "the limiter's build and tests need root (BPF, bpffs, network namespaces); run as root"
        );
    }

    if !installed(LLVM_PACKAGE) || !Path::new(LLVM_PREFIX).join("lib").exists() {
        println!("setup: installing {LLVM_PACKAGE} (bpf-linker links against it)");
        run(Command::new("apt-get").args(["update", "-q"]))
            .context("apt-get update failed: the Debian package mirror must be reachable")?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", LLVM_PACKAGE])
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("could not install {LLVM_PACKAGE}"))?;
    }

    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(&format!("bpf-linker {BPF_LINKER_VERSION}")) {
        println!("setup: installing bpf-linker {BPF_LINKER_VERSION} built against LLVM 22");
        run(cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                &format!("~{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX))
        .context("could not build bpf-linker from crates.io")?;
    }

    if !succeeds(cargo().args(["deb", "--version"])) {
        println!("setup: installing cargo-deb (the Debian package)");
        run(cargo().args(["install", "cargo-deb", "--locked"]))
            .context("could not build cargo-deb from crates.io")?;
    }

    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        println!("setup: installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context("the nightly toolchain is missing and could not be installed")?;
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("rustc +nightly --print sysroot failed")?;
    let core_src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if !core_src.exists() {
        println!("setup: installing rust-src for the nightly toolchain");
        if !succeeds(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ])) {
            let fallback = root.join("../shared/toolchain/install-rust-src.sh");
            if !fallback.exists() {
                bail!(
                    "rustup could not download rust-src for nightly, and {} does not exist",
                    fallback.display()
                );
            }
            println!(
                "setup: rustup could not download rust-src; unpacking it with {}",
                fallback.display()
            );
            run(Command::new("bash").arg(&fallback).arg("nightly"))
                .context("the rust-src fallback failed")?;
        }
        if !core_src.exists() {
            bail!("rust-src is still missing at {}", core_src.display());
        }
    }

    install_debian(CORE_TOOLS)?;
    if test_tools {
        install_debian(TEST_TOOLS)?;
    }

    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        println!("setup: mounting bpffs at /sys/fs/bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
            .context("could not mount bpffs")?;
    }
    Ok(())
}

/// Whether Debian's package database has `package` installed (not merely known).
fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.contains("install ok installed"))
}

/// Installs the Debian packages of `tools` that are missing, saying what each is for.
fn install_debian(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(package, _)| !installed(package))
        .map(|(package, why)| {
            println!("setup: installing {package} ({why})");
            *package
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    install()
        .or_else(|_| {
            run(Command::new("apt-get").args(["update", "-q"]))?;
            install()
        })
        .with_context(|| format!("could not install {}", missing.join(", ")))
}

/// Runs `cargo test` with the given arguments, echoing its output and adding its counts.
fn cargo_test(args: &[&str], totals: &mut (u64, u64)) -> Result<()> {
    let mut child = cargo()
        .arg("test")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("run cargo test")?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split([';', '.']) {
                let mut words = part.split_whitespace();
                match (
                    words.next().and_then(|n| n.parse::<u64>().ok()),
                    words.next(),
                ) {
                    (Some(n), Some("passed")) => totals.0 += n,
                    (Some(n), Some("failed")) => totals.1 += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!("summary: {} passed, {} failed", totals.0, totals.1.max(1));
        bail!("cargo test {} failed", args.join(" "));
    }
    Ok(())
}

fn test(only: &[Tier], filter: Option<&str>) -> Result<()> {
    let runs = |tier: Tier| only.is_empty() || only.contains(&tier);
    let mut totals = (0, 0);
    // One tier's tests: `cargo test` with `packages_and_targets`, then the filter, then
    // `runner_args` after `--`.
    let mut tier = |name: Tier, heading: &str, selection: &[&str], runner: &[&str]| {
        if !runs(name) {
            return Ok(());
        }
        println!("== {heading}");
        let mut args: Vec<&str> = selection.to_vec();
        args.push("--");
        if let Some(filter) = filter {
            args.push(filter);
        }
        args.extend_from_slice(runner);
        cargo_test(&args, &mut totals)
    };
    if runs(Tier::Lints) && filter.is_none() {
        println!("== lints: rustfmt and clippy");
        run(cargo().args(["fmt", "--all", "--check"]))
            .context("cargo fmt --check found unformatted code")?;
        run(cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "limiter-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        // The eBPF crate only builds for its own target, with nightly.
        run(nightly_cargo().args([
            "clippy",
            "-p",
            "limiter-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    let serial = ["--test-threads=1"];
    // The workspace's default members: what plain `cargo test` runs.
    tier(Tier::Host, "host tests (no privileges used)", &[], &[])?;
    tier(
        Tier::Program,
        "program tests: crafted frames through BPF_PROG_TEST_RUN",
        &[
            "-p",
            "limiter-tests",
            "--test",
            "program",
            "--test",
            "leases",
            "--test",
            "session_verdicts",
            "--test",
            "challenge_verdicts",
        ],
        &serial,
    )?;
    let needs_binaries = [
        Tier::Live,
        Tier::Daemon,
        Tier::Metrics,
        Tier::Fleet,
        Tier::Demo,
    ];
    if needs_binaries.iter().any(|t| runs(*t)) {
        println!("== building the limiter and demo binaries for the daemon and demo tests");
        build_binaries()?;
    }
    tier(
        Tier::Live,
        "live tests: real packets through veths in network namespaces",
        &["-p", "limiter-tests", "--test", "live"],
        &serial,
    )?;
    tier(
        Tier::Sessions,
        "session tests: real TCP clients and spoofed floods through both programs",
        &["-p", "limiter-tests", "--test", "sessions"],
        &serial,
    )?;
    tier(
        Tier::Daemon,
        "daemon tests: the real daemon and CLI against live traffic, and its failure modes",
        &[
            "-p",
            "limiter-tests",
            "--test",
            "daemon",
            "--test",
            "fail_safe",
        ],
        &serial,
    )?;
    tier(
        Tier::Metrics,
        "metrics tests: promtool, the dashboard, and a real Prometheus",
        &["-p", "limiter-tests", "--test", "metrics"],
        &serial,
    )?;
    tier(
        Tier::Fleet,
        "fleet tests: a three-member etcd cluster, three daemons, real packets",
        &["-p", "limiter-tests", "--test", "fleet"],
        &["--test-threads=1", "--nocapture"],
    )?;
    if runs(Tier::Packaging) {
        package(&std::env::current_dir()?)?;
    }
    tier(
        Tier::Packaging,
        "packaging: the Debian package, its contents, installed and removed",
        &["-p", "limiter-tests", "--test", "packaging"],
        &serial,
    )?;
    tier(
        Tier::Demo,
        "the demo, short form: the lab defended live (--duration 2)",
        &["-p", "limiter-tests", "--test", "demo"],
        &["--test-threads=1", "--nocapture"],
    )?;
    println!("summary: {} passed, {} failed", totals.0, totals.1);
    let tests_asked = only.is_empty() || only.iter().any(|t| *t != Tier::Lints);
    if tests_asked && totals.0 == 0 {
        bail!("no test matched");
    }
    Ok(())
}

/// Builds the release binary, renders its man page, and packs both with the unit, the
/// example config and the docs into a .deb.
fn package(root: &Path) -> Result<()> {
    // Only packaging needs cargo-deb, so only packaging pays for building it.
    if !succeeds(cargo().args(["deb", "--version"])) {
        println!("setup: installing cargo-deb (builds the Debian package)");
        run(cargo().args(["install", "cargo-deb", "--locked"]))
            .context("could not build cargo-deb from crates.io")?;
    }
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "limiter-user",
        "--bin",
        "limiter",
    ]))?;
    // A page per subcommand, from the CLI definition itself.
    let man_dir = root.join("target/man");
    let _ = std::fs::remove_dir_all(&man_dir);
    std::fs::create_dir_all(&man_dir)?;
    run(Command::new(root.join("target/release/limiter"))
        .arg("manpage")
        .arg("--dir")
        .arg(&man_dir))?;
    for page in std::fs::read_dir(&man_dir)? {
        run(Command::new("gzip")
            .args(["-9", "-n", "-f"])
            .arg(page?.path()))?;
    }
    let completions = root.join("target/completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in [
        ("bash", "limiter"),
        ("zsh", "_limiter"),
        ("fish", "limiter.fish"),
    ] {
        let script = Command::new(root.join("target/release/limiter"))
            .args(["completions", shell])
            .output()?;
        if !script.status.success() || script.stdout.is_empty() {
            bail!("limiter completions {shell} failed");
        }
        std::fs::write(completions.join(file), &script.stdout)?;
    }
    // Stripped, with the symbols in a -dbgsym package beside it.
    run(cargo().args(["deb", "-p", "limiter-user", "--no-build", "--dbgsym"]))
}

/// The `limiter` and `limiter-demo` binaries (debug), which the daemon and demo tests and
/// the demo run.
fn build_binaries() -> Result<()> {
    run(cargo().args([
        "build",
        "-p",
        "limiter-user",
        "-p",
        "limiter-demo",
        "--bins",
    ]))
}

fn demo(
    root: &Path,
    duration: u64,
    keep: bool,
    no_build: bool,
    cleanup: bool,
    fleet: bool,
) -> Result<()> {
    if !no_build {
        build_binaries()?;
    }
    let mut demo = Command::new(root.join("target/debug/limiter-demo"));
    if cleanup {
        demo.arg("--cleanup");
    } else {
        demo.arg("--limiter").arg(root.join("target/debug/limiter"));
        demo.args(["--duration", &duration.to_string()]);
        if keep {
            demo.arg("--keep");
        }
        if fleet {
            demo.arg("--fleet");
        }
    }
    run(&mut demo)
}
