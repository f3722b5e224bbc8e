//! `limiter`: the daemon (`limiter run`) and the operator's CLI.

use std::{
    io::{self, IsTerminal as _, Write},
    net::IpAddr,
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, CommandFactory as _, Parser, Subcommand};
use limiter_user::{
    attacks::AttackRecord,
    audit::AuditEntry,
    client,
    config::{AttachMode, DEFAULT_PIN_DIR, DEFAULT_SOCKET, LogFormat},
    daemon::{self, DaemonOptions},
    explain::{Explanation, PolicyDecision},
    input::{Name, Prefix, Seconds},
    policy::{DEFAULT_FLOW_ACKS, LimitSpec, Mode, Rate},
    protocol::{
        LimitRow, LimitTarget, ListRow, MAX_TOP_INTERVAL_MS, RateChange, Request, SourceRow,
        Status, TopBy, limit_rows,
    },
    runtime::{LimitChanges, List},
};

#[derive(Parser)]
#[command(
    name = "limiter",
    version,
    about = "Per-source rate limiting in XDP, for exchange edge hosts"
)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: load, attach, apply the policy, serve the CLI.
    #[command(
        after_help = "Example:\n  limiter run --config /etc/limiter/limiter.toml --iface eth1 --attach native"
    )]
    Run(RunArgs),
    /// Interfaces, program, mode, config generation and counters.
    #[command(after_help = "Example:\n  limiter status --json")]
    Status(JsonFlag),
    /// Show or change limits.
    #[command(
        subcommand,
        after_help = "Examples:\n  limiter limit list\n  limiter limit set --class market-makers --pps 20000 --burst 40000"
    )]
    Limit(LimitCommand),
    /// Classes: source prefixes with their own limit.
    #[command(
        subcommand,
        after_help = "Examples:\n  limiter class add colo --prefix 192.0.2.0/24 --pps 5000 --burst 10000\n  limiter class list"
    )]
    Class(ClassCommand),
    /// The allowlist: prefixes passed without limits.
    #[command(
        subcommand,
        after_help = "Examples:\n  limiter allow add 198.51.100.0/24\n  limiter allow list --json"
    )]
    Allow(ListCommand),
    /// The denylist: prefixes dropped.
    #[command(
        subcommand,
        after_help = "Examples:\n  limiter deny add 203.0.113.7 --timeout 10m\n  limiter deny delete 203.0.113.7"
    )]
    Deny(ListCommand),
    /// The penalty box.
    #[command(
        subcommand,
        after_help = "Examples:\n  limiter block add 203.0.113.9 --timeout 5m\n  limiter block list"
    )]
    Block(BlockCommand),
    /// The worst sources now: rates over the last interval (or lifetime totals).
    #[command(
        after_help = "Examples:\n  limiter top -n 20 --by drops\n  limiter top --watch --interval 2 --prefix 203.0.113.0/24\n  limiter top --by passes --limit allowlist\n  limiter top --totals --json"
    )]
    Top {
        /// How many sources.
        #[arg(short, default_value_t = 10)]
        n: usize,
        /// Order by (rates, or totals with --totals).
        #[arg(long, value_enum, default_value_t = TopBy::Drops)]
        by: TopBy,
        /// Seconds the rates are measured over.
        #[arg(long, value_name = "SECS", default_value_t = 1.0)]
        interval: f64,
        /// Lifetime totals instead of rates (answers at once).
        #[arg(long, conflicts_with_all = ["interval", "watch"])]
        totals: bool,
        /// Refresh in place, like top(1), until interrupted (or --count times).
        #[arg(long)]
        watch: bool,
        /// With --watch: stop after this many refreshes.
        #[arg(long, value_name = "N", requires = "watch")]
        count: Option<u64>,
        /// Only sources within this prefix.
        #[arg(long, value_name = "PREFIX")]
        prefix: Option<ipnet::IpNet>,
        /// Only sources counted against this limit (a class, a service, `default`, or
        /// `allowlist` for allowlisted sources, whose passes are estimated from samples).
        #[arg(long, value_name = "NAME")]
        limit: Option<String>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Why an address gets what it gets: the list entry or class that decides (and those it
    /// shadows), the limits, its state on each interface, and its next packet's verdict.
    #[command(
        after_help = "Examples:\n  limiter explain 203.0.113.9\n  limiter explain 2001:db8::1 --json"
    )]
    Explain {
        /// The address.
        address: std::net::IpAddr,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Attacks the daemon recorded: under way, then over, newest first.
    #[command(after_help = "Examples:\n  limiter attacks\n  limiter attacks show 3 --json")]
    Attacks {
        #[command(subcommand)]
        command: Option<AttacksCommand>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Switch between enforcing and monitoring.
    #[command(after_help = "Example:\n  limiter mode monitor")]
    Mode {
        /// enforce: drop; monitor: pass everything, count would-drops.
        #[arg(value_enum)]
        mode: Mode,
    },
    /// Re-read the config file (runtime changes are kept).
    #[command(after_help = "Example:\n  limiter reload")]
    Reload,
    /// Validate a config file and print the policy it would install (changes nothing).
    #[command(after_help = "Example:\n  limiter check --config /etc/limiter/limiter.toml")]
    Check {
        /// The file.
        #[arg(long, value_name = "FILE", default_value = "/etc/limiter/limiter.toml")]
        config: PathBuf,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// The fleet: the policy, denies and allows every edge host following the same etcd
    /// applies (docs/fleet.md).
    #[command(
        subcommand,
        after_help = "Examples:\n  limiter fleet deny add 203.0.113.0/24 --reason 'INC-4411 SYN flood' --timeout 1h\n  limiter fleet policy push fleet-policy.toml --reason 'CHG-1234'\n  limiter fleet deny list"
    )]
    Fleet(FleetCommand),
    /// Who changed what: the latest changes, oldest first.
    #[command(after_help = "Example:\n  limiter history -n 20")]
    History {
        /// How many.
        #[arg(short, default_value_t = 20)]
        n: usize,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// The changes made at runtime on top of the config file.
    #[command(
        subcommand,
        after_help = "Examples:\n  limiter runtime list\n  limiter runtime reset"
    )]
    Runtime(RuntimeCommand),
    /// Detach the program and remove its pins (the limiter stops filtering).
    #[command(after_help = "Example:\n  limiter detach --iface eth1")]
    Detach {
        /// One interface (default: all).
        #[arg(long)]
        iface: Option<String>,
        /// Where pins live, used when no daemon is running.
        #[arg(long, default_value = DEFAULT_PIN_DIR, conflicts_with = "config")]
        pin_dir: PathBuf,
        /// Take the pin directory (and the socket, unless --socket is given) from this
        /// config file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print the manual page (roff), or write one per subcommand into a directory.
    #[command(hide = true)]
    Manpage {
        /// Write `limiter.1` and a `limiter-<subcommand>.1` for every subcommand here.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print shell completions.
    #[command(after_help = "Example:\n  limiter completions bash > /etc/bash_completion.d/limiter")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum AttacksCommand {
    /// Every attack recorded (the default).
    List(JsonFlag),
    /// One attack: its type, prefix, times, peak, drops by reason and top prefixes.
    Show {
        /// Its id (from `limiter attacks`).
        id: u64,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Subcommand)]
enum RuntimeCommand {
    /// List the overrides (what `reload` keeps).
    #[command(alias = "show", after_help = "Example:\n  limiter runtime list --json")]
    List(JsonFlag),
    /// Drop every override: the config file alone applies (a change, recorded).
    #[command(after_help = "Example:\n  limiter runtime reset")]
    Reset,
}

#[derive(Args)]
struct RunArgs {
    /// Config file (TOML); defaults apply without one.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Interface to attach to (repeat for several).
    #[arg(long = "iface", value_name = "IF")]
    interfaces: Vec<String>,
    /// How to attach: native, generic, or auto (native, falling back to generic).
    #[arg(long = "attach", alias = "mode", value_enum)]
    attach: Option<AttachMode>,
    /// State directory (runtime changes).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// bpffs directory for pins.
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Metrics listen address.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Log as JSON lines (as `log_format = "json"` in the config file does).
    #[arg(long)]
    log_json: bool,
}

#[derive(Args)]
struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// A burst left out is this many seconds of the rate.
const DEFAULT_BURST_SECONDS: u64 = 2;

#[derive(Args)]
struct LimitArgs {
    /// Packets per second per source.
    #[arg(long)]
    pps: Option<u64>,
    /// Packets admitted at once from idle (default: 2 seconds' worth, 2 × --pps).
    #[arg(long, requires = "pps")]
    burst: Option<u64>,
    /// Bytes per second per source.
    #[arg(long = "bytes-per-second", alias = "bps", value_name = "BYTES")]
    bps: Option<u64>,
    /// Bytes admitted at once from idle (default: 2 × --bytes-per-second).
    #[arg(long, requires = "bps", value_name = "BYTES")]
    burst_bytes: Option<u64>,
    /// Packets per second per aggregate prefix.
    #[arg(long)]
    aggregate_pps: Option<u64>,
    /// Aggregate burst (default: 2 × --aggregate-pps).
    #[arg(long, requires = "aggregate_pps")]
    aggregate_burst: Option<u64>,
    /// New TCP connections per second per source.
    #[arg(long, value_name = "CONNECTIONS")]
    connections_per_second: Option<u64>,
    /// Connections admitted at once (default: 2 × --connections-per-second).
    #[arg(long, requires = "connections_per_second", value_name = "CONNECTIONS")]
    connection_burst: Option<u64>,
    /// Pure ACKs per second per established flow before they spend the packet budget.
    #[arg(long, value_name = "ACKS")]
    acks_per_second: Option<u64>,
    /// ACKs admitted at once (default: 2 × --acks-per-second).
    #[arg(long, requires = "acks_per_second", value_name = "ACKS")]
    ack_burst: Option<u64>,
    /// Penalty box for sustained excess (e.g. 30s, 5m; 0 = off; at most a day).
    #[arg(long, value_name = "DURATION")]
    block: Option<Seconds>,
    /// No packet or byte limit.
    #[arg(long, conflicts_with_all = ["pps", "bps"])]
    unlimited: bool,
}

impl LimitArgs {
    /// The rates given, each checked, a missing burst defaulted.
    fn rates(&self) -> Result<[Option<Rate>; 5]> {
        let pair = |what: &str, rate: Option<u64>, burst: Option<u64>| {
            rate.map(|r| {
                let burst = burst.unwrap_or(r.saturating_mul(DEFAULT_BURST_SECONDS));
                Rate::checked(r, burst).with_context(|| what.to_owned())
            })
            .transpose()
        };
        Ok([
            pair("--pps/--burst", self.pps, self.burst)?,
            pair(
                "--bytes-per-second/--burst-bytes",
                self.bps,
                self.burst_bytes,
            )?,
            pair(
                "--aggregate-pps/--aggregate-burst",
                self.aggregate_pps,
                self.aggregate_burst,
            )?,
            pair(
                "--connections-per-second/--connection-burst",
                self.connections_per_second,
                self.connection_burst,
            )?,
            pair(
                "--acks-per-second/--ack-burst",
                self.acks_per_second,
                self.ack_burst,
            )?,
        ])
    }

    /// The penalty box given, checked like the config file's.
    fn block_seconds(&self) -> Result<Option<u64>> {
        self.block
            .map(|b| limiter_user::input::check_block_seconds(b.get()).map_err(anyhow::Error::from))
            .transpose()
    }

    /// A whole limit (for a new class): what is not given is not limited.
    fn spec(&self) -> Result<LimitSpec> {
        let [packets, bytes, aggregate, connections, acks] = self.rates()?;
        if packets.is_none() && bytes.is_none() && !self.unlimited {
            bail!("give --pps (and optionally --bytes-per-second), or --unlimited");
        }
        Ok(LimitSpec {
            packets,
            bytes,
            aggregate,
            connections,
            // As in the config file, a limit that states no ACK budget gets the default one.
            acks: acks.or((!self.unlimited).then_some(DEFAULT_FLOW_ACKS)),
            block_seconds: self.block_seconds()?,
        })
    }

    /// Changes to a limit: what is given is set (`--unlimited` clears the packet and byte
    /// rates), what is not is kept.
    fn changes(&self) -> Result<LimitChanges> {
        let [packets, bytes, aggregate, connections, acks] = self.rates()?;
        let change = |rate: Option<Rate>| {
            rate.map(RateChange::Set)
                .or(self.unlimited.then_some(RateChange::Clear))
        };
        let changes = LimitChanges {
            packets: change(packets),
            bytes: change(bytes),
            aggregate: aggregate.map(RateChange::Set),
            connections: connections.map(RateChange::Set),
            acks: acks.map(RateChange::Set),
            block_seconds: self.block_seconds()?,
        };
        if changes.is_empty() {
            bail!(
                "nothing to change: give --pps, --bytes-per-second, --aggregate-pps, \
                 --connections-per-second, --acks-per-second, --block or --unlimited"
            );
        }
        Ok(changes)
    }
}

#[derive(Subcommand)]
enum LimitCommand {
    /// Every limit in force.
    #[command(alias = "show", after_help = "Example:\n  limiter limit list")]
    List(JsonFlag),
    /// Change the default limit, a class's or a service rule's: the rates given are set,
    /// the others keep their values.
    #[command(
        after_help = "Examples:\n  limiter limit set --pps 500\n  limiter limit set --class market-makers --pps 20000 --burst 40000\n  limiter limit set --service rest-api --pps 200 --bytes-per-second 1000000"
    )]
    Set {
        /// A class, by name.
        #[arg(long, conflicts_with = "service")]
        class: Option<Name>,
        /// A service rule, by name.
        #[arg(long)]
        service: Option<Name>,
        #[command(flatten)]
        limit: Box<LimitArgs>,
    },
}

#[derive(Subcommand)]
enum ClassCommand {
    /// Add a class.
    #[command(
        after_help = "Example:\n  limiter class add colo --prefix 192.0.2.0/24 --prefix 2001:db8:c0::/48 --pps 5000 --burst 10000"
    )]
    Add {
        /// Its name.
        name: Name,
        /// Its prefixes.
        #[arg(long = "prefix", required = true)]
        prefixes: Vec<Prefix>,
        #[command(flatten)]
        limit: Box<LimitArgs>,
    },
    /// Remove a class.
    #[command(alias = "del", after_help = "Example:\n  limiter class delete colo")]
    Delete {
        /// Its name.
        name: Name,
    },
    /// List classes.
    #[command(after_help = "Example:\n  limiter class list --json")]
    List(JsonFlag),
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Fleet-wide denies, written to etcd and applied by every host that follows it.
    #[command(subcommand)]
    Deny(FleetListCommand),
    /// Fleet-wide allows (passed without limits; a deny, a host's own or the fleet's, wins).
    #[command(subcommand)]
    Allow(FleetListCommand),
    /// The fleet policy: limits, classes, services and mode, one versioned document.
    #[command(subcommand)]
    Policy(FleetPolicyCommand),
}

#[derive(Subcommand)]
enum FleetListCommand {
    /// Add a prefix on every host (replaces an entry of the same prefix).
    #[command(
        after_help = "Examples:\n  limiter fleet deny add 203.0.113.0/24 --reason 'INC-4411 SYN flood' --timeout 1h\n  limiter fleet allow add 198.51.100.0/24 --reason 'market maker MM-7'"
    )]
    Add {
        /// The prefix (host bits clear).
        prefix: Prefix,
        /// Why: an incident or attack id, shown on every host and in its history.
        #[arg(long)]
        reason: String,
        /// Remove it again after this long (90s, 10m, 2h, 1d; at most 365d).
        #[arg(long = "timeout", alias = "ttl", value_name = "DURATION")]
        ttl: Option<Seconds>,
        /// Accept a prefix wider than an IPv4 /16 or an IPv6 /32 (hosts refuse it otherwise).
        #[arg(long)]
        meant: bool,
        #[command(flatten)]
        config: FleetConfigArg,
    },
    /// Remove a prefix.
    #[command(
        alias = "delete",
        after_help = "Example:\n  limiter fleet deny remove 203.0.113.0/24"
    )]
    Remove {
        /// The prefix.
        prefix: Prefix,
        #[command(flatten)]
        config: FleetConfigArg,
    },
    /// The list, as etcd holds it.
    #[command(after_help = "Example:\n  limiter fleet deny list --json")]
    List {
        #[command(flatten)]
        config: FleetConfigArg,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Subcommand)]
enum FleetPolicyCommand {
    /// Check a policy document as `limiter check` would and put it in force on every host,
    /// in one transaction; refused whole on any error.
    #[command(
        after_help = "The document holds the policy sections of a config file: mode, block_seconds,\ndefault_limit, [[class]] (prefixes inline) and [[service]]. Each host keeps its\nown interfaces, lists, aggregation, spoofing, sessions and challenge.\n\nExample:\n  limiter fleet policy push /etc/limiter/fleet-policy.toml --reason 'CHG-1234 raise FIX limits'"
    )]
    Push {
        /// The policy document (TOML).
        file: PathBuf,
        /// Why: a change or incident id, shown on every host and in its history.
        #[arg(long)]
        reason: String,
        /// Push only if the version in force is still this one (from `policy show`);
        /// without it, the version read just before the push.
        #[arg(long, value_name = "VERSION")]
        if_version: Option<i64>,
        #[command(flatten)]
        config: FleetConfigArg,
    },
    /// The fleet policy in force: version, author, reason and the document.
    #[command(after_help = "Example:\n  limiter fleet policy show")]
    Show {
        #[command(flatten)]
        config: FleetConfigArg,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Remove the fleet policy: every host returns to its own file's policy sections.
    #[command(after_help = "Example:\n  limiter fleet policy remove")]
    Remove {
        /// Remove only if the version in force is still this one.
        #[arg(long, value_name = "VERSION")]
        if_version: Option<i64>,
        #[command(flatten)]
        config: FleetConfigArg,
    },
}

/// Where the fleet store is: the `[fleet]` section of a config file.
#[derive(clap::Args)]
struct FleetConfigArg {
    /// The config file whose `[fleet]` section names the store.
    #[arg(long, value_name = "FILE", default_value = "/etc/limiter/limiter.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum ListCommand {
    /// Add a prefix (an address is a /32 or /128).
    #[command(
        after_help = "Examples:\n  limiter allow add 198.51.100.0/24\n  limiter deny add 203.0.113.7 --timeout 10m"
    )]
    Add {
        /// The prefix (host bits clear: 10.1.0.0/16, not 10.1.2.3/16).
        prefix: Prefix,
        /// Remove it again after this long (90s, 10m, 2h, 1d; at most 365d).
        #[arg(long = "timeout", alias = "ttl", value_name = "DURATION")]
        ttl: Option<Seconds>,
        /// Deny: accept a prefix wider than an IPv4 /8 or an IPv6 /32.
        #[arg(long)]
        force: bool,
    },
    /// Remove a prefix.
    #[command(
        alias = "del",
        after_help = "Examples:\n  limiter allow delete 198.51.100.0/24\n  limiter deny delete 203.0.113.7"
    )]
    Delete {
        /// The prefix.
        prefix: Prefix,
    },
    /// Show the list.
    #[command(
        alias = "show",
        after_help = "Examples:\n  limiter allow list\n  limiter deny list --json"
    )]
    List(JsonFlag),
}

#[derive(Subcommand)]
enum BlockCommand {
    /// Sources in the penalty box.
    #[command(after_help = "Example:\n  limiter block list")]
    List(JsonFlag),
    /// Put a source in the penalty box.
    #[command(after_help = "Example:\n  limiter block add 203.0.113.9 --timeout 5m")]
    Add {
        /// The source address.
        address: IpAddr,
        /// For how long (at most 365d).
        #[arg(
            long = "timeout",
            alias = "for",
            default_value = "5m",
            value_name = "DURATION"
        )]
        duration: Seconds,
    },
    /// Take a source out of the penalty box.
    #[command(
        alias = "del",
        after_help = "Example:\n  limiter block delete 203.0.113.9"
    )]
    Delete {
        /// The source address.
        address: IpAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Run(args) = cli.command {
        return run_daemon(args, cli.socket);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `limiter top | head`: the reader has all it wants; end quietly.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints an error and its causes on one line, each cause's text once (our errors already
/// include their causes' text).
fn report(e: &anyhow::Error) {
    let mut message = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
    }
    eprintln!("limiter: {message}");
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> Result<()> {
    let socket = cli.socket;
    let mut out = io::stdout().lock();
    let (request, json) = match cli.command {
        Command::Run(_) => unreachable!("handled in main"),
        Command::Manpage { dir: None } => {
            clap_mangen::Man::new(Cli::command()).render(&mut out)?;
            return Ok(());
        }
        Command::Manpage { dir: Some(dir) } => {
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing the manual pages into {}", dir.display()))?;
            return Ok(());
        }
        Command::Completions { shell } => {
            // Into a buffer first: the generator panics on a write error (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "limiter", &mut script);
            out.write_all(&script)?;
            return Ok(());
        }
        Command::Status(j) => (Request::Status {}, j.json),
        Command::Limit(LimitCommand::List(j)) => (Request::LimitShow {}, j.json),
        Command::Limit(LimitCommand::Set {
            class,
            service,
            limit,
        }) => {
            let changes = limit.changes()?;
            let target = match (class, service) {
                (Some(c), _) => LimitTarget::Class(c),
                (None, Some(s)) => LimitTarget::Service(s),
                (None, None) => LimitTarget::Default,
            };
            (
                Request::LimitSet {
                    target,
                    packets: changes.packets,
                    bytes: changes.bytes,
                    aggregate: changes.aggregate,
                    connections: changes.connections,
                    acks: changes.acks,
                    block_seconds: changes
                        .block_seconds
                        .map(Seconds::new)
                        .transpose()
                        .map_err(anyhow::Error::from)?,
                },
                false,
            )
        }
        Command::Class(ClassCommand::Add {
            name,
            prefixes,
            limit,
        }) => (
            Request::ClassAdd {
                name,
                prefixes,
                limit: limit.spec()?,
            },
            false,
        ),
        Command::Class(ClassCommand::Delete { name }) => (Request::ClassDel { name }, false),
        Command::Class(ClassCommand::List(j)) => (Request::ClassList {}, j.json),
        Command::Allow(c) => list_request(List::Allow, c)?,
        Command::Deny(c) => list_request(List::Deny, c)?,
        Command::Block(BlockCommand::List(j)) => (Request::BlockList {}, j.json),
        Command::Block(BlockCommand::Add { address, duration }) => (
            Request::BlockAdd {
                address,
                seconds: duration,
            },
            false,
        ),
        Command::Block(BlockCommand::Delete { address }) => (Request::BlockDel { address }, false),
        Command::Top {
            n,
            by,
            interval,
            totals,
            watch,
            count,
            prefix,
            limit,
            json,
        } => {
            let interval_ms = if totals {
                None
            } else if interval.is_finite()
                && (0.001..=MAX_TOP_INTERVAL_MS as f64 / 1000.0).contains(&interval)
            {
                Some((interval * 1000.0).round() as u64)
            } else {
                anyhow::bail!(
                    "--interval {interval}: must be 0.001 to {} seconds",
                    MAX_TOP_INTERVAL_MS / 1000
                );
            };
            let request = Request::Top {
                n,
                by,
                interval_ms,
                within: prefix,
                limit,
            };
            if !watch {
                (request, json.json)
            } else {
                return watch_top(&mut out, &socket, &request, json.json, count);
            }
        }
        Command::Explain { address, json } => (Request::Explain { address }, json.json),
        Command::Attacks { command, json } => match command {
            None => (Request::Attacks { id: None }, json.json),
            Some(AttacksCommand::List(j)) => (Request::Attacks { id: None }, json.json || j.json),
            Some(AttacksCommand::Show { id, json: j }) => {
                (Request::Attacks { id: Some(id) }, json.json || j.json)
            }
        },
        Command::Mode { mode } => (Request::Mode { mode }, false),
        Command::Reload => (Request::Reload {}, false),
        Command::Check { config, json } => return check(&mut out, &config, json.json),
        Command::Fleet(command) => return fleet(&mut out, command),
        Command::History { n, json } => (Request::History { n }, json.json),
        Command::Runtime(RuntimeCommand::List(j)) => (Request::RuntimeShow {}, j.json),
        Command::Runtime(RuntimeCommand::Reset) => (Request::RuntimeReset {}, false),
        Command::Detach {
            iface,
            pin_dir,
            config,
        } => return detach(&mut out, socket, iface, pin_dir, config),
    };
    let response = client::request(&socket, &request)?;
    show(&mut out, &request, response, json)
}

/// Detaches through the daemon, or without one by removing the pins. With `--config`, the
/// pin directory and socket are the file's (so the package's removal finds them).
fn detach(
    out: &mut impl Write,
    socket: PathBuf,
    iface: Option<String>,
    pin_dir: PathBuf,
    config: Option<PathBuf>,
) -> Result<()> {
    let (socket, pin_dir) = match &config {
        Some(path) => {
            let file = limiter_user::config::load_file(path)?;
            let socket = if socket.as_os_str() == DEFAULT_SOCKET {
                file.control.socket
            } else {
                socket
            };
            (socket, file.pin_dir)
        }
        None => (socket, pin_dir),
    };
    let request = Request::Detach {
        iface: iface.clone(),
    };
    match client::request(&socket, &request) {
        Err(client::ClientError::NotRunning(_)) => {
            let removed = daemon::detach_pins(&pin_dir, iface.as_deref())?;
            writeln!(
                out,
                "no daemon running; removed the pins of: {}",
                if removed.is_empty() {
                    "nothing (none were pinned)".to_owned()
                } else {
                    removed.join(", ")
                }
            )?;
            Ok(())
        }
        other => show(out, &request, other?, false),
    }
}

fn list_request(list: List, command: ListCommand) -> Result<(Request, bool)> {
    Ok(match command {
        ListCommand::Add { prefix, ttl, force } => {
            if force && list == List::Allow {
                bail!("--force applies to deny add only");
            }
            (
                Request::ListAdd {
                    list,
                    prefix,
                    ttl_seconds: ttl,
                    force,
                },
                false,
            )
        }
        ListCommand::Delete { prefix } => (Request::ListDel { list, prefix }, false),
        ListCommand::List(j) => (Request::ListShow { list }, j.json),
    })
}

fn run_daemon(args: RunArgs, socket: PathBuf) -> ExitCode {
    let options = DaemonOptions {
        config: args.config,
        interfaces: args.interfaces,
        mode: args.attach,
        socket: (socket.as_os_str() != DEFAULT_SOCKET).then_some(socket),
        state_dir: args.state_dir,
        pin_dir: args.pin_dir,
        metrics: args.metrics,
    };
    // The config says how to log, so it is read first; its errors are logged like any other.
    let file = daemon::load_config(&options);
    let json = args.log_json || file.as_ref().is_ok_and(|f| f.log_format == LogFormat::Json);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // journald and files get plain text; colour only on a terminal.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stdout().is_terminal());
    if json {
        builder.json().init()
    } else {
        builder.init()
    }
    tracing_log::LogTracer::init().ok();
    let failed = |e: daemon::DaemonError| {
        let reason = with_causes(&e);
        tracing::error!("not started: {reason}");
        eprintln!("limiter: {reason}");
        ExitCode::from(e.exit_code())
    };
    let file = match file {
        Ok(file) => file,
        Err(e) => return failed(e),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("limiter: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(options, file)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failed(e),
    }
}

fn show(
    out: &mut impl Write,
    request: &Request,
    response: limiter_user::protocol::Response,
    json: bool,
) -> Result<()> {
    if !response.ok {
        bail!(
            "{}",
            response
                .error
                .unwrap_or_else(|| "the daemon refused without a reason".into())
        );
    }
    let result = response.result.unwrap_or(serde_json::Value::Null);
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&versioned(result))?)?;
    } else {
        match request {
            Request::Status {} => print_status(out, &serde_json::from_value(result)?)?,
            Request::LimitShow {} | Request::ClassList {} => {
                print_limits(out, &serde_json::from_value::<Vec<LimitRow>>(result)?)?
            }
            Request::ListShow { .. } => {
                print_list(out, &serde_json::from_value::<Vec<ListRow>>(result)?)?
            }
            Request::Top { .. } | Request::BlockList {} => {
                print_sources(out, &serde_json::from_value::<Vec<SourceRow>>(result)?)?
            }
            Request::Detach { .. } => writeln!(out, "detached: {result}")?,
            Request::History { .. } => {
                print_history(out, &serde_json::from_value::<Vec<AuditEntry>>(result)?)?
            }
            Request::Explain { .. } => print_explanation(out, &serde_json::from_value(result)?)?,
            Request::Attacks { id } => {
                let records = serde_json::from_value::<Vec<AttackRecord>>(result)?;
                match (id, records.first()) {
                    (Some(_), Some(record)) => print_attack(out, record)?,
                    _ => print_attacks(out, &records)?,
                }
            }
            Request::RuntimeShow {} => writeln!(out, "{}", serde_json::to_string_pretty(&result)?)?,
            Request::ListAdd {
                list,
                prefix,
                ttl_seconds,
                ..
            } => {
                let list = match list {
                    List::Allow => "allowlist",
                    List::Deny => "denylist",
                };
                let ttl = ttl_seconds.map_or(String::new(), |t| format!(" for {}s", t.get()));
                writeln!(
                    out,
                    "ok (config generation {result}): {prefix} added to the {list}{ttl}"
                )?
            }
            _ => match result.as_u64() {
                Some(generation) => writeln!(out, "ok (config generation {generation})")?,
                None => writeln!(out, "ok")?,
            },
        }
    }
    // Notes go to standard error, so `--json` output stays parseable.
    for note in &response.notes {
        eprintln!("limiter: note: {note}");
    }
    Ok(())
}

/// The version of the `--json` outputs (docs/json.md): raised when a field is removed or
/// changes meaning; new fields do not raise it.
const JSON_VERSION: u64 = 1;

/// A `--json` output: an object carrying `"version"`; a list goes under `"items"`.
fn versioned(result: serde_json::Value) -> serde_json::Value {
    match result {
        serde_json::Value::Object(mut object) => {
            object.insert("version".into(), JSON_VERSION.into());
            serde_json::Value::Object(object)
        }
        serde_json::Value::Array(items) => {
            serde_json::json!({ "version": JSON_VERSION, "items": items })
        }
        other => serde_json::json!({ "version": JSON_VERSION, "result": other }),
    }
}

fn print_status(out: &mut impl Write, status: &Status) -> io::Result<()> {
    print_status_head(out, status)?;
    if let Some(fleet) = &status.fleet {
        writeln!(
            out,
            "fleet: {}, {}, revision {} applied{}, {} denies applied, {} refused",
            fleet.source,
            if fleet.connected {
                "connected"
            } else {
                "DISCONNECTED (the last fleet policy stays in force)"
            },
            fleet.revision,
            fleet.lag_ms.map_or_else(
                || " (not confirmed since the start)".to_owned(),
                |ms| { format!(" (confirmed {:.1} s ago)", ms as f64 / 1_000.0) }
            ),
            fleet.applied,
            fleet.refused.len(),
        )?;
        match &fleet.policy {
            Some(p) => writeln!(
                out,
                "  policy: version {} by {} ({})",
                p.version, p.author, p.reason
            )?,
            None => writeln!(out, "  policy: none in the fleet, the file's own")?,
        }
        if let Some(why) = &fleet.policy_refused {
            writeln!(out, "  POLICY REFUSED {why}")?;
        }
        if fleet.allowed > 0 {
            writeln!(out, "  {} fleet allows applied", fleet.allowed)?;
        }
        for (entry, why) in &fleet.refused {
            writeln!(out, "  refused {entry}: {why}")?;
        }
        if !fleet.publications.is_empty() {
            let counts: Vec<String> = fleet
                .publications
                .iter()
                .map(|(outcome, n)| format!("{n} {outcome}"))
                .collect();
            writeln!(out, "  attack records for the fleet: {}", counts.join(", "))?;
        }
    }
    print_status_interfaces(out, status)
}

fn print_status_head(out: &mut impl Write, status: &Status) -> io::Result<()> {
    writeln!(
        out,
        "mode {:?}, SYN-cookie challenge {}, config generation {}, last reload {}{}{}",
        status.mode,
        status.challenge,
        status.generation,
        if status.last_reload_ok {
            "ok"
        } else {
            "FAILED"
        },
        status
            .config_file
            .as_ref()
            .map(|f| format!(", config {f}"))
            .unwrap_or_default(),
        if status.state_saved {
            ""
        } else {
            ", runtime state NOT SAVED (see the log)"
        }
    )
}

fn print_status_interfaces(out: &mut impl Write, status: &Status) -> io::Result<()> {
    writeln!(
        out,
        "{:<16} {:<9} {:<8} {:<9} {:>8} {:>14} {:>14} {:>14} {:>10}",
        "INTERFACE",
        "ATTACHED",
        "MODE",
        "SESSIONS",
        "PROGRAM",
        "PASSED",
        "DROPPED",
        "WOULD-DROP",
        "SOURCES"
    )?;
    for i in &status.interfaces {
        writeln!(
            out,
            "{:<16} {:<9} {:<8} {:<9} {:>8} {:>14} {:>14} {:>14} {:>10}",
            i.name,
            if i.attached { "yes" } else { "NO" },
            i.attach_mode,
            if i.sessions { "on" } else { "off" },
            i.program_id.map_or("-".into(), |p| p.to_string()),
            i.passed,
            i.dropped,
            i.would_drop,
            i.tracked_sources
        )?;
    }
    for i in status.interfaces.iter().filter(|i| !i.attached) {
        writeln!(
            out,
            "WARNING: nothing filters {}: {}",
            i.name,
            i.problem.as_deref().unwrap_or("not attached")
        )?;
    }
    Ok(())
}

/// Validates a config file as the daemon would (policy compilation included) and prints
/// what it would install. Talks to no daemon.
fn check(out: &mut impl Write, path: &std::path::Path, json: bool) -> Result<()> {
    let file = limiter_user::config::load_file(path)?;
    let compiled = file.policy.compile()?;
    let p = &file.policy;
    if json {
        let summary = serde_json::json!({
            "config_file": path.display().to_string(),
            "interfaces": file.interfaces,
            "mode": p.mode,
            "default_limit": p.default_limit,
            "classes": p.classes.iter().map(|c| serde_json::json!({
                "name": c.name, "prefixes": c.prefixes, "limit": c.limit})).collect::<Vec<_>>(),
            "services": p.services.iter().map(|s| &s.name).collect::<Vec<_>>(),
            "allow": p.allow.len(),
            "deny": p.deny.len(),
            "trie_entries": compiled.v4.len() + compiled.v6.len(),
        });
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&versioned(summary))?
        )?;
        return Ok(());
    }
    writeln!(out, "{}: valid", path.display())?;
    writeln!(
        out,
        "interfaces: {}",
        if file.interfaces.is_empty() {
            "none (the daemon will not start until one is set)".to_owned()
        } else {
            file.interfaces.join(", ")
        }
    )?;
    writeln!(out, "mode: {:?}", p.mode)?;
    let rows = limit_rows(p, |_| false);
    print_limits(out, &rows)?;
    writeln!(
        out,
        "allowlist: {} prefixes, denylist: {} prefixes ({} trie entries)",
        p.allow.len(),
        p.deny.len(),
        compiled.v4.len() + compiled.v6.len()
    )?;
    Ok(())
}

fn unix_time(seconds: u64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds),
    )
    .to_string()
}

fn attack_target(record: &AttackRecord) -> String {
    record
        .prefix
        .map_or_else(|| "everywhere".to_owned(), |p| p.to_string())
}

fn print_explanation(out: &mut impl Write, e: &Explanation) -> io::Result<()> {
    writeln!(
        out,
        "{}: tracked as {} (aggregate {})",
        e.address, e.source_prefix, e.aggregate_prefix
    )?;
    if e.policy.entries.is_empty() {
        writeln!(out, "  no list entry or class contains it")?;
    }
    for entry in &e.policy.entries {
        writeln!(
            out,
            "  {:<8} {:<40} {}",
            if entry.decides { "DECIDES" } else { "shadowed" },
            entry.prefix.to_string(),
            entry.from
        )?;
    }
    match &e.policy.decision {
        PolicyDecision::Deny => writeln!(out, "  policy: deny")?,
        PolicyDecision::Allow => writeln!(out, "  policy: allow (no limit)")?,
        PolicyDecision::Limit {
            class: Some(class), ..
        } => writeln!(out, "  policy: limited by class {class}")?,
        PolicyDecision::Limit { limits, .. } => {
            let names: Vec<&str> = limits.iter().map(|(_, n)| n.as_str()).collect();
            writeln!(
                out,
                "  policy: limited by the default limit, or a service's by destination port ({})",
                names.join(", ")
            )?
        }
    }
    if let Some(proven) = e.proven {
        writeln!(
            out,
            "  proven: {}",
            if proven {
                "yes (completed a handshake)"
            } else {
                "no"
            }
        )?;
    }
    for s in &e.state {
        writeln!(
            out,
            "  {} {} ({}): passed {}, dropped {}, packets left {}{}{}; next: {}",
            s.interface,
            s.limit,
            s.budget,
            s.passed,
            s.dropped,
            s.packets_left
                .map_or("unlimited".to_owned(), |n| n.to_string()),
            if s.leased > 0 {
                format!(" (and {} pre-paid in CPU leases)", s.leased)
            } else {
                String::new()
            },
            s.blocked_seconds
                .map_or(String::new(), |b| format!(", penalty box {b} s")),
            s.next_packet
        )?;
    }
    for (iface, limit, left) in &e.aggregate_packets_left {
        writeln!(
            out,
            "  {iface} aggregate under {limit}: packets left {left}"
        )?;
    }
    writeln!(out, "  verdict of its next packet: {}", e.verdict)
}

fn print_attacks(out: &mut impl Write, records: &[AttackRecord]) -> io::Result<()> {
    if records.is_empty() {
        return writeln!(out, "no attacks recorded since the daemon started");
    }
    writeln!(
        out,
        "{:>5} {:<14} {:<28} {:<20} {:>9} {:>12} {:>14}",
        "ID", "TYPE", "PREFIX", "STARTED", "LASTED", "PEAK PPS", "DROPPED"
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for r in records {
        let lasted = match r.ended_unix {
            Some(end) => format!("{}s", end.saturating_sub(r.started_unix)),
            None => format!("{}s+", now.saturating_sub(r.started_unix)),
        };
        writeln!(
            out,
            "{:>5} {:<14} {:<28} {:<20} {:>9} {:>12} {:>14}",
            r.id,
            r.kind.label(),
            attack_target(r),
            unix_time(r.started_unix),
            lasted,
            r.peak_packets_per_second,
            r.dropped_packets
        )?;
    }
    Ok(())
}

fn print_attack(out: &mut impl Write, r: &AttackRecord) -> io::Result<()> {
    writeln!(
        out,
        "attack {}: {} from {}",
        r.id,
        r.kind.label(),
        attack_target(r)
    )?;
    writeln!(out, "  started  {}", unix_time(r.started_unix))?;
    match r.ended_unix {
        Some(end) => writeln!(out, "  ended    {}", unix_time(end))?,
        None => writeln!(out, "  under way, now {} pps", r.current_packets_per_second)?,
    }
    writeln!(out, "  peak     {} pps", r.peak_packets_per_second)?;
    writeln!(
        out,
        "  dropped  {} frames (or challenged)",
        r.dropped_packets
    )?;
    let interfaces: Vec<&str> = r.interfaces.iter().map(String::as_str).collect();
    writeln!(out, "  on       {}", interfaces.join(", "))?;
    for (verdict, count) in &r.verdicts {
        writeln!(out, "  {verdict:<24} {count}")?;
    }
    if !r.top_prefixes.is_empty() {
        writeln!(out, "  top prefixes at the peak:")?;
        for p in &r.top_prefixes {
            writeln!(
                out,
                "    {:<40} {} pps",
                p.prefix.to_string(),
                p.packets_per_second
            )?;
        }
    }
    Ok(())
}

fn print_history(out: &mut impl Write, entries: &[AuditEntry]) -> io::Result<()> {
    writeln!(
        out,
        "{:<20} {:>5} {:<28} REQUEST / CHANGES",
        "TIME", "GEN", "BY"
    )?;
    for e in entries {
        let time = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.time_unix),
        );
        writeln!(
            out,
            "{:<20} {:>5} {:<28} {}",
            time.to_string(),
            e.generation,
            e.actor.to_string(),
            e.request
        )?;
        for c in &e.changes {
            writeln!(out, "{:>56}{}: {} -> {}", "", c.field, c.before, c.after)?;
        }
    }
    Ok(())
}

fn rate(r: Option<Rate>) -> String {
    r.map_or("-".into(), |r| {
        format!("{}/s burst {}", r.per_second, r.burst)
    })
}

fn print_limits(out: &mut impl Write, rows: &[LimitRow]) -> io::Result<()> {
    writeln!(
        out,
        "{:<8} {:<20} {:<26} {:<24} {:<24} {:<24} {:<20} {:<24} {:<6} {:<8}",
        "KIND",
        "NAME",
        "MATCHES",
        "PACKETS",
        "BYTES",
        "AGGREGATE",
        "CONNECTIONS",
        "FLOW ACKS",
        "BOX",
        "ORIGIN"
    )?;
    for r in rows {
        let block = r
            .limit
            .block_seconds
            .map_or_else(|| "global".into(), |s| format!("{s}s"));
        writeln!(
            out,
            "{:<8} {:<20} {:<26} {:<24} {:<24} {:<24} {:<20} {:<24} {:<6} {:<8}",
            r.kind,
            r.name,
            r.matches,
            rate(r.limit.packets),
            rate(r.limit.bytes),
            rate(r.limit.aggregate),
            rate(r.limit.connections),
            rate(r.limit.acks),
            block,
            r.origin
        )?;
    }
    Ok(())
}

fn print_list(out: &mut impl Write, rows: &[ListRow]) -> io::Result<()> {
    writeln!(out, "{:<44} {:<8} {:>10}", "PREFIX", "ORIGIN", "EXPIRES")?;
    for r in rows {
        let expires = r.expires_in_seconds.map_or("-".into(), |s| format!("{s}s"));
        writeln!(
            out,
            "{:<44} {:<8} {:>10}",
            r.prefix.to_string(),
            r.origin,
            expires
        )?;
    }
    Ok(())
}

/// `top --watch`: one request per refresh (each takes the interval), drawn over the last.
fn watch_top(
    out: &mut impl Write,
    socket: &std::path::Path,
    request: &Request,
    json: bool,
    count: Option<u64>,
) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let redraw = !json && std::io::stdout().is_terminal();
    let mut shown = 0;
    while count.is_none_or(|c| shown < c) {
        let response = client::request(socket, request)?;
        if !response.ok {
            anyhow::bail!("{}", response.error.unwrap_or_else(|| "refused".to_owned()));
        }
        let result = response.result.unwrap_or(serde_json::Value::Null);
        if json {
            // One JSON document per line per refresh.
            writeln!(out, "{}", serde_json::to_string(&versioned(result))?)?;
        } else {
            if redraw {
                // Home and clear, as top(1) does.
                write!(out, "\x1b[H\x1b[2J")?;
            }
            writeln!(
                out,
                "limiter top: {}",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            )?;
            print_sources(out, &serde_json::from_value::<Vec<SourceRow>>(result)?)?;
        }
        out.flush()?;
        shown += 1;
    }
    Ok(())
}

fn print_sources(out: &mut impl Write, rows: &[SourceRow]) -> io::Result<()> {
    // Rates over the interval when `top` measured them, lifetime totals otherwise.
    let rated = rows.iter().any(|r| r.rates.is_some());
    let (passed, dropped, bytes) = if rated {
        ("PASS/S", "DROP/S", "BYTES/S")
    } else {
        ("PASSED", "DROPPED", "BYTES")
    };
    writeln!(
        out,
        "{:<12} {:<44} {:<16} {:<6} {:>12} {:>12} {:>14} {:>8}",
        "INTERFACE", "SOURCE", "LIMIT", "BUDGET", passed, dropped, bytes, "BLOCKED"
    )?;
    for r in rows {
        let (passed, dropped, bytes) = match (rated, r.rates) {
            (true, Some(x)) => (
                format!("{:.0}", x.passed_per_second),
                format!("{:.0}", x.dropped_per_second),
                format!("{:.0}", x.bytes_per_second),
            ),
            (true, None) => ("0".into(), "0".into(), "0".into()),
            (false, _) => (
                r.passed.to_string(),
                r.dropped.to_string(),
                r.bytes.to_string(),
            ),
        };
        let blocked = if r.blocked_for_seconds > 0 {
            format!("{}s", r.blocked_for_seconds)
        } else {
            "-".into()
        };
        // An allowlisted source has no state: its passes are estimated from samples (~),
        // it has no budget and its bytes are not known.
        let (passed, bytes, budget) = if r.allowlisted {
            (format!("~{passed}"), "-".to_owned(), "-")
        } else {
            (passed, bytes, r.budget.label())
        };
        writeln!(
            out,
            "{:<12} {:<44} {:<16} {:<6} {:>12} {:>12} {:>14} {:>8}",
            r.interface,
            r.prefix.to_string(),
            r.limit,
            budget,
            passed,
            dropped,
            bytes,
            blocked
        )?;
    }
    Ok(())
}

/// An error with every cause under it that its message does not already include: aya's
/// errors keep the errno (say, "Operation not permitted" when a capability is missing) only
/// in their source, and an operator needs it.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    message
}

/// `limiter fleet`: writes go straight to etcd (the hosts pick them up from there).
fn fleet(out: &mut impl Write, command: FleetCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match command {
        FleetCommand::Deny(command) => runtime.block_on(fleet_list(
            out,
            limiter_user::fleet::ListKind::Deny,
            command,
        )),
        FleetCommand::Allow(command) => runtime.block_on(fleet_list(
            out,
            limiter_user::fleet::ListKind::Allow,
            command,
        )),
        FleetCommand::Policy(command) => runtime.block_on(fleet_policy(out, command)),
    }
}

/// The `[fleet]` section of the config file `arg` names.
fn fleet_settings(arg: &FleetConfigArg) -> anyhow::Result<limiter_user::fleet::FleetSettings> {
    let file = limiter_user::config::load_file(&arg.config)?;
    file.fleet.with_context(|| {
        format!(
            "{}: no [fleet] section names the store",
            arg.config.display()
        )
    })
}

/// `limiter fleet deny|allow`.
async fn fleet_list(
    out: &mut impl Write,
    kind: limiter_user::fleet::ListKind,
    command: FleetListCommand,
) -> anyhow::Result<()> {
    use limiter_user::fleet;
    match command {
        FleetListCommand::Add {
            prefix,
            reason,
            ttl,
            meant,
            config,
        } => {
            let settings = fleet_settings(&config)?;
            if reason.trim().is_empty() {
                anyhow::bail!("--reason must say why (an incident or attack id)");
            }
            let now_ms = limiter_user::daemon::now_unix_ms();
            let entry = fleet::FleetEntry {
                prefix: prefix.net(),
                reason,
                author: author(),
                created_unix_ms: now_ms,
                expires_unix: ttl.map(|t| now_ms / 1_000 + t.get()),
                meant,
            };
            // The same width rule every host applies, so a write no host would take fails
            // here instead.
            if let Err(why) = fleet::check_entry(kind, &entry, &[], &[]) {
                anyhow::bail!("{}: {why}", entry.prefix);
            }
            let mut client = settings.connect().await?;
            let revision =
                fleet::add_entry(&settings, &mut client, kind, &entry, now_ms / 1_000).await?;
            writeln!(out, "ok (fleet revision {revision})")?;
        }
        FleetListCommand::Remove { prefix, config } => {
            let settings = fleet_settings(&config)?;
            let mut client = settings.connect().await?;
            if !fleet::remove_entry(&settings, &mut client, kind, prefix.net()).await? {
                anyhow::bail!("{} is not a fleet {kind}", prefix.net());
            }
            writeln!(out, "ok")?;
        }
        FleetListCommand::List { config, json } => {
            let settings = fleet_settings(&config)?;
            let mut client = settings.connect().await?;
            let view = fleet::list(&settings, &mut client).await?;
            if json.json {
                serde_json::to_writer_pretty(
                    &mut *out,
                    &serde_json::json!({
                        "version": JSON_VERSION,
                        "revision": view.revision,
                        kind.name(): view.list(kind),
                    }),
                )?;
                writeln!(out)?;
                return Ok(());
            }
            writeln!(out, "fleet revision {}", view.revision)?;
            writeln!(
                out,
                "{:<20} {:<24} {:<20} {:<22} REASON",
                "PREFIX", "AUTHOR", "CREATED", "EXPIRES"
            )?;
            for entry in view.list(kind).values() {
                writeln!(
                    out,
                    "{:<20} {:<24} {:<20} {:<22} {}",
                    entry.prefix,
                    entry.author,
                    unix_time(entry.created_unix_ms / 1_000),
                    entry.expires_unix.map_or("never".into(), unix_time),
                    entry.reason
                )?;
            }
        }
    }
    Ok(())
}

/// `limiter fleet policy`.
async fn fleet_policy(out: &mut impl Write, command: FleetPolicyCommand) -> anyhow::Result<()> {
    use limiter_user::fleet;
    match command {
        FleetPolicyCommand::Push {
            file,
            reason,
            if_version,
            config,
        } => {
            let settings = fleet_settings(&config)?;
            if reason.trim().is_empty() {
                anyhow::bail!("--reason must say why (a change or incident id)");
            }
            let document = std::fs::read_to_string(&file)
                .with_context(|| format!("{}: cannot read the policy", file.display()))?;
            // The checks `limiter check` applies to the same sections; nothing is written
            // unless all pass.
            limiter_user::config::parse_policy_document(&document, &file)
                .context("policy refused, nothing was pushed")?;
            let mut client = settings.connect().await?;
            let expected = match if_version {
                Some(version) => version,
                None => fleet::read_policy(&settings, &mut client)
                    .await?
                    .map_or(0, |p| p.version),
            };
            let policy = fleet::FleetPolicy {
                document,
                author: author(),
                reason,
                created_unix_ms: limiter_user::daemon::now_unix_ms(),
                version: 0,
            };
            let version =
                fleet::swap_policy(&settings, &mut client, Some(&policy), expected).await?;
            writeln!(out, "ok (fleet policy version {version})")?;
        }
        FleetPolicyCommand::Show { config, json } => {
            let settings = fleet_settings(&config)?;
            let mut client = settings.connect().await?;
            let policy = fleet::read_policy(&settings, &mut client).await?;
            if json.json {
                serde_json::to_writer_pretty(
                    &mut *out,
                    &serde_json::json!({ "version": JSON_VERSION, "policy": policy }),
                )?;
                writeln!(out)?;
                return Ok(());
            }
            match policy {
                None => writeln!(
                    out,
                    "no fleet policy: each host enforces its own file's policy sections"
                )?,
                Some(p) => {
                    writeln!(
                        out,
                        "fleet policy version {} by {} at {}: {}",
                        p.version,
                        p.author,
                        unix_time(p.created_unix_ms / 1_000),
                        p.reason
                    )?;
                    write!(out, "{}", p.document)?;
                    if !p.document.ends_with('\n') {
                        writeln!(out)?;
                    }
                }
            }
        }
        FleetPolicyCommand::Remove { if_version, config } => {
            let settings = fleet_settings(&config)?;
            let mut client = settings.connect().await?;
            let current = fleet::read_policy(&settings, &mut client).await?;
            let Some(current) = current else {
                anyhow::bail!("there is no fleet policy to remove");
            };
            let expected = if_version.unwrap_or(current.version);
            fleet::swap_policy(&settings, &mut client, None, expected).await?;
            writeln!(out, "ok (hosts return to their own policy sections)")?;
        }
    }
    Ok(())
}

/// `user@host` for the entries this CLI writes: the operator behind sudo when there is one.
fn author() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| format!("uid{}", nix::unistd::getuid()));
    let host = nix::sys::utsname::uname()
        .map(|u| u.nodename().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{host}")
}
