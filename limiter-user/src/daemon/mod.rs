//! The daemon: loads and attaches one program per interface (adopting pins left by an earlier
//! run), applies the policy, and carries out changes. SIGTERM and SIGINT stop the daemon and
//! leave the programs attached; SIGHUP re-reads the config.
//!
//! - this module: the daemon's state and every change to it (start, interface events, commit,
//!   reload, expiry, audit, the change requests);
//! - [`views`]: what reads show (status, limits, lists, source-table walks, the metrics
//!   snapshot);
//! - [`socket`]: the control socket (permissions, the connection table, request routing);
//! - [`tasks`]: `run` and the background tasks (events, program log, interface events,
//!   expiry).

mod socket;
mod tasks;
mod views;

pub use tasks::run;

use std::{
    collections::{BTreeMap, VecDeque},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::programs::xdp::XdpMode;
use limiter_common::layout::{Budget, Config, SourceEvent, SourceKey, SourceState, Stat};
use tracing::{error, info, warn};

use crate::{
    audit::{self, Actor, AuditEntry, History},
    config::{AttachMode, FileConfig, load_file},
    gate::{self, Observed, Step},
    limiter::{Attached, Limiter, LoadOptions, monotonic_ns, pinned_ifindex, remove_pins},
    ownership::{Ownership, OwnershipError},
    policy::{CompiledPolicy, Policy},
    protocol::{Request, Response},
    runtime::{ChangeError, LimitChanges, RuntimeState},
};

/// The pin layout version: a layout change gets a new directory instead of misreading pins.
pub const PIN_LAYOUT: &str = "v1";

/// Daemon settings given on the command line; each overrides the config file.
#[derive(Clone, Debug, Default)]
pub struct DaemonOptions {
    /// The config file; defaults apply without one.
    pub config: Option<PathBuf>,
    /// Interfaces to attach to.
    pub interfaces: Vec<String>,
    /// Attach mode.
    pub mode: Option<AttachMode>,
    /// Control socket.
    pub socket: Option<PathBuf>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Pin directory.
    pub pin_dir: Option<PathBuf>,
    /// Metrics listen address.
    pub metrics: Option<SocketAddr>,
}

/// Why the daemon could not start or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config file is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The runtime state could not be read or written.
    #[error(transparent)]
    State(#[from] crate::runtime::StateError),
    /// The policy (file plus runtime changes) does not compile.
    #[error("policy: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    /// The data plane failed.
    #[error("{iface}: {source}")]
    Limiter {
        /// The interface.
        iface: String,
        /// Why.
        source: Box<crate::limiter::Error>,
    },
    /// No interface to attach to.
    #[error(
        "no interface to attach to: set `interfaces` in the config file (or pass --iface); \
         nothing is filtered until one is set"
    )]
    NoInterface,
    /// The directories are another daemon's, or unusable.
    #[error(transparent)]
    Ownership(#[from] OwnershipError),
    /// The control groups cannot work as configured.
    #[error("control: {0}")]
    ControlGroups(String),
    /// A request was refused before anything changed.
    #[error("{0}")]
    Refused(String),
    /// Interface events cannot be followed.
    #[error(transparent)]
    Gate(#[from] gate::GateError),
    /// TCP cannot be judged by session as configured.
    #[error("sessions: {0}")]
    Sessions(#[from] crate::sessions::SessionError),
    /// A socket or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Exit status for a start that restarting cannot fix (a config error, pins of another
/// layout, another daemon holding the directories, no bpffs, an unwritable state directory):
/// `EX_CONFIG` from sysexits.h. The systemd unit lists it in `RestartPreventExitStatus`.
pub const EXIT_CONFIG: u8 = 78;

impl DaemonError {
    /// The process exit status for this error: [`EXIT_CONFIG`] where a restart would fail
    /// the same way, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_)
            | Self::Policy(_)
            | Self::State(_)
            | Self::NoInterface
            | Self::Ownership(_)
            | Self::ControlGroups(_) => EXIT_CONFIG,
            Self::Sessions(
                crate::sessions::SessionError::NoCgroup2
                | crate::sessions::SessionError::NotCgroup2(_),
            ) => EXIT_CONFIG,
            Self::Limiter { source, .. }
                if matches!(**source, crate::limiter::Error::PinMismatch { .. }) =>
            {
                EXIT_CONFIG
            }
            _ => 1,
        }
    }
}

/// One configured interface and the program loaded for it.
pub struct Instance {
    /// Its program and maps.
    limiter: Limiter,
    /// How it is attached (`native` or `generic`), or `-` before the first attach.
    mode: &'static str,
    /// The interface index our program is attached to; `None` while nothing of ours filters
    /// the interface (it does not exist, or attaching failed).
    ifindex: Option<u32>,
    /// Why the program is not attached, while it is not.
    problem: Option<String>,
    /// Sources proven by a handshake, as of the last sweep.
    proven: Option<u64>,
}

impl Instance {
    /// Whether our program filters `iface` right now: attached to the index the name has
    /// now, through a link that runs our program. Checked against the kernel on every call,
    /// so a deleted interface reads as unattached at once, before its event is handled.
    pub fn attached(&self, iface: &str) -> bool {
        self.ifindex.is_some()
            && self.ifindex == gate::current_ifindex(iface)
            && self.limiter.is_attached()
    }

    /// Why the program does not filter `iface`, or `None` when it does.
    pub fn problem(&self, iface: &str) -> Option<String> {
        if self.attached(iface) {
            return None;
        }
        Some(
            self.problem
                .clone()
                .unwrap_or_else(|| "the interface is gone or was recreated".into()),
        )
    }

    /// Attaches to interface `index` (dropping a dead link first) and records it in the
    /// pinned config. The maps, and so the policy and per-source state, stay as they are.
    fn attach(
        &mut self,
        iface: &str,
        index: u32,
        mode: AttachMode,
    ) -> Result<Attached, DaemonError> {
        let err = |source| DaemonError::Limiter {
            iface: iface.to_owned(),
            source: Box::new(source),
        };
        if self.ifindex.is_some_and(|i| i != index) || self.problem.is_some() {
            self.limiter.forget_link().map_err(err)?;
        }
        let attached = self
            .limiter
            .attach_pinned(iface, index, xdp_modes(mode))
            .map_err(err)?;
        self.limiter.record_interface().map_err(err)?;
        self.mode = if self.limiter.attach_mode() == Config::ATTACH_GENERIC {
            "generic"
        } else {
            "native"
        };
        self.ifindex = Some(index);
        self.problem = None;
        Ok(attached)
    }
}

/// The attack detector and what it reads each second.
#[derive(Default)]
pub struct AttackWatch {
    detector: crate::attacks::Detector,
    /// Sampled drop events read since the last tick.
    samples: Vec<crate::attacks::Sample>,
    /// Samples not kept because the tick's buffer was full (the exact counters still count
    /// every frame; only attribution loses them).
    samples_lost: u64,
    /// Verdict totals at the last tick, all interfaces.
    totals: BTreeMap<crate::attacks::StatKey, u64>,
    last_tick: Option<Instant>,
}

/// Samples kept per tick: far more than a flood sends at 1/256 (a 10 Mpps flood is 39,000).
const ATTACK_SAMPLES_PER_TICK: usize = 65_536;

impl AttackWatch {
    /// Keeps a sampled drop event for the next tick.
    pub fn note(&mut self, iface: &str, event: &SourceEvent) {
        let Some(verdict) = event.reason() else {
            return;
        };
        if self.samples.len() >= ATTACK_SAMPLES_PER_TICK {
            self.samples_lost += 1;
            return;
        }
        self.samples.push(crate::attacks::Sample {
            interface: iface.to_owned(),
            verdict,
            source: views::key_prefix(&event.key),
            weight: event.dropped,
        });
    }
}

fn show_prefix(prefix: Option<ipnet::IpNet>) -> String {
    prefix.map_or_else(|| "everywhere".to_owned(), |p| p.to_string())
}

fn show_top(top: &[crate::attacks::PrefixRate]) -> String {
    top.iter()
        .map(|p| format!("{} {} pps", p.prefix, p.packets_per_second))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Recent source events, for logs and `top`.
#[derive(Default)]
pub struct EventLog {
    /// The latest events, newest last.
    recent: VecDeque<(String, SourceEvent)>,
    /// "Over its limit" events read.
    limited: u64,
    /// "Entered the penalty box" events read.
    penalty_box: u64,
}

/// Everything the daemon holds.
pub struct Daemon {
    /// The config file as last loaded.
    file: FileConfig,
    /// Command-line settings.
    options: DaemonOptions,
    /// Runtime changes.
    runtime: RuntimeState,
    /// The policy in force.
    policy: Policy,
    /// Its compiled form.
    compiled: CompiledPolicy,
    /// Configured interfaces.
    instances: BTreeMap<String, Instance>,
    /// Whether the last reload succeeded.
    last_reload_ok: bool,
    /// When the config was last (re)loaded, Unix seconds.
    last_reload_unix: u64,
    /// Recent source events.
    events: EventLog,
    /// Attacks, detected from the counters and sampled drops.
    pub attacks: AttackWatch,
    /// Allowlisted sources' traffic, from samples; shared with `top`'s walks.
    pub allowlisted: std::sync::Arc<std::sync::Mutex<crate::allowlisted::AllowlistedTally>>,
    /// Whether the runtime state in force differs from the state file (a save failed).
    unsaved: bool,
    /// Failed saves of the runtime state.
    save_failures: u64,
    /// When a failed save was last logged.
    last_save_log: Option<Instant>,
    /// Who changed what.
    history: History,
    /// The SYN-cookie challenge: engaged or not, and the hysteresis.
    challenge: crate::challenge::Controller,
    /// Unproven SYNs counted so far on every interface, for the per-second rate.
    challenge_syns: u64,
    /// `net.ipv4.tcp_syncookies` as it was before the challenge set it to 2.
    syncookies_before: Option<String>,
    /// Times the challenge engaged and disengaged.
    challenge_transitions: (u64, u64),
    /// When proven sources were last swept for expired proofs.
    proven_swept: Instant,
    /// The fleet store's connection and what it delivered.
    pub fleet: FleetStatus,
    /// The hold on the pin and state directories, for the daemon's lifetime.
    _ownership: Ownership,
}

/// How this host follows the fleet store.
#[derive(Debug)]
pub struct FleetStatus {
    /// Whether the store answers now.
    pub connected: bool,
    /// Times the watch fell behind a compaction and the host listed again.
    pub resyncs: u64,
    /// When the store last confirmed the revision applied here (Unix ms).
    pub heard_unix_ms: Option<u64>,
    /// Seconds from an entry's creation to its application here.
    pub convergence: prometheus_client::metrics::histogram::Histogram,
    /// Entries refused here, so each is logged once.
    refused_logged: std::collections::BTreeSet<(crate::fleet::ListKind, ipnet::IpNet)>,
    /// The fleet policy version this host refused, and why; the last one it took stays in
    /// force.
    pub policy_refused: Option<(i64, String)>,
    /// The fleet denies this host published from its attack records: prefix and expiry
    /// (Unix seconds), for the cap.
    pub published: BTreeMap<ipnet::IpNet, u64>,
    /// Attack records judged for publication, by outcome (`published`, `would_publish`,
    /// `capped`, `refused`, `failed`).
    pub publications: BTreeMap<&'static str, u64>,
}

/// The buckets of the convergence histogram, seconds: the target is under one.
pub const FLEET_CONVERGENCE_BUCKETS: [f64; 10] =
    [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0];

/// The author of the fleet denies this host publishes from its attack records.
fn attack_author() -> String {
    let host = nix::sys::utsname::uname()
        .map(|u| u.nodename().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("limiter@{host}")
}

/// Unix time in milliseconds.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where this network namespace's SYN-cookie switch lives.
const SYNCOOKIES: &str = "/proc/sys/net/ipv4/tcp_syncookies";

/// Failed saves are logged at most once per this many seconds while they go on.
const SAVE_FAILURE_LOG_SECONDS: u64 = 60;

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn xdp_modes(mode: AttachMode) -> &'static [XdpMode] {
    match mode {
        AttachMode::Native => &[XdpMode::Driver],
        AttachMode::Generic => &[XdpMode::Skb],
        AttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
    }
}

/// Reads the config file (defaults without one) with the command line on top.
pub fn load_config(options: &DaemonOptions) -> Result<FileConfig, DaemonError> {
    let mut file = match &options.config {
        Some(path) => load_file(path)?,
        None => FileConfig::default(),
    };
    apply_overrides(&mut file, options);
    if file.interfaces.is_empty() {
        return Err(DaemonError::NoInterface);
    }
    Ok(file)
}

impl Daemon {
    /// Loads the runtime state and the program of every interface, and attaches to those
    /// that exist. `ownership` must already hold the file's directories.
    pub fn start(
        options: DaemonOptions,
        file: FileConfig,
        ownership: Ownership,
    ) -> Result<Self, DaemonError> {
        let mut runtime = RuntimeState::load(&file.state_dir)?;
        let assigned = runtime.limit_ids.clone();
        let (policy, compiled) = runtime.compile(&file.policy, now_unix())?;
        if runtime.limit_ids != assigned {
            // New names (a first start, or a config edited while stopped) keep their ids
            // from now on, even if no change is ever saved.
            runtime.save(&file.state_dir)?;
        }
        let file_state_dir = file.state_dir.clone();
        let mut instances = BTreeMap::new();
        for iface in &file.interfaces {
            let instance = load_interface(&file, iface, &compiled)?;
            instances.insert(iface.to_string(), instance);
        }
        Ok(Self {
            file,
            options,
            runtime,
            policy,
            compiled,
            instances,
            last_reload_ok: true,
            last_reload_unix: now_unix(),
            events: EventLog::default(),
            attacks: AttackWatch::default(),
            allowlisted: Default::default(),
            unsaved: false,
            save_failures: 0,
            last_save_log: None,
            fleet: FleetStatus {
                connected: false,
                resyncs: 0,
                heard_unix_ms: None,
                convergence: prometheus_client::metrics::histogram::Histogram::new(
                    FLEET_CONVERGENCE_BUCKETS,
                ),
                refused_logged: std::collections::BTreeSet::new(),
                policy_refused: None,
                published: BTreeMap::new(),
                publications: BTreeMap::new(),
            },
            history: History::load(&file_state_dir),
            challenge: crate::challenge::Controller::default(),
            challenge_syns: 0,
            syncookies_before: None,
            challenge_transitions: (0, 0),
            proven_swept: Instant::now(),
            _ownership: ownership,
        })
        .map(|mut daemon| {
            // A previous daemon may have left ports challenged (the map is pinned).
            daemon.clear_challenge_ports();
            daemon.challenge_syns = daemon.unproven_syns();
            daemon.rearm_challenge(None);
            daemon
        })
    }

    /// SYNs from unproven sources so far, on every interface: passed, dropped or challenged.
    fn unproven_syns(&self) -> u64 {
        self.instances
            .values()
            .filter_map(|i| i.limiter.stats().ok())
            .map(|s| {
                [
                    Stat::Unproven,
                    Stat::RateUnproven,
                    Stat::Challenged,
                    Stat::RateChallenge,
                ]
                .iter()
                .map(|stat| s.packets(*stat))
                .sum::<u64>()
                    // In monitor mode the bucket's would-drops pass under another counter;
                    // they are unproven SYNs all the same, so attack mode arms while the
                    // operator is still watching.
                    + s.would_drop(Stat::RateUnproven).packets
            })
            .sum()
    }

    /// Forgets expired proofs, every minute (or every quarter of the proof's lifetime if
    /// that is shorter), and keeps the count of proven sources per interface for `status`.
    pub fn sweep_proven(&mut self) {
        let ttl = self.policy.proven_seconds;
        let every = Duration::from_secs((ttl / 4).clamp(1, 60));
        if self.proven_swept.elapsed() < every {
            return;
        }
        self.proven_swept = Instant::now();
        let now = monotonic_ns();
        for (iface, instance) in &mut self.instances {
            match instance
                .limiter
                .expire_proven(now, ttl.saturating_mul(1_000_000_000))
            {
                Ok((remaining, forgotten)) => {
                    instance.proven = Some(remaining as u64);
                    if forgotten > 0 {
                        info!(interface = %iface, forgotten, remaining, "expired proofs of proven sources");
                    }
                }
                Err(e) => error!(interface = %iface, "sweeping proven sources: {e}"),
            }
        }
    }

    /// One second of the challenge's controller: engages or disengages attack mode.
    pub fn challenge_tick(&mut self) {
        let total = self.unproven_syns();
        let syns = total.saturating_sub(self.challenge_syns);
        self.challenge_syns = total;
        if let Some(transition) = self.challenge.observe(&self.policy.challenge, syns) {
            self.carry_out(transition, syns);
        }
    }

    /// `limiter explain`: the policy's decision for `address`, its state on every
    /// interface, and its next packet's verdict.
    pub fn explain(&self, address: IpAddr) -> Result<crate::explain::Explanation, String> {
        use crate::explain::{BudgetView, PolicyDecision, policy_match, predict, verdict};
        use limiter_common::layout::{Budget, ProvenKey, SourceKey};
        let policy = policy_match(&self.policy, &self.compiled, address);
        let (source_len, aggregate_len) = match address {
            IpAddr::V4(_) => (
                self.policy.source_prefix_v4,
                self.policy.aggregate_prefix_v4,
            ),
            IpAddr::V6(_) => (
                self.policy.source_prefix_v6,
                self.policy.aggregate_prefix_v6,
            ),
        };
        let masked = |len: u8| {
            ipnet::IpNet::new(address, len)
                .map(|n| n.trunc())
                .map_err(|e| format!("{address}/{len}: {e}"))
        };
        let (source_prefix, aggregate_prefix) = (masked(source_len)?, masked(aggregate_len)?);
        let key = |net: ipnet::IpNet, limit_id: u16, budget: Budget| SourceKey {
            budget: budget as u8,
            ..SourceKey::from_addr(net.network(), net.prefix_len(), limit_id)
        };
        let limits = match &policy.decision {
            PolicyDecision::Limit { limits, .. } => limits.clone(),
            _ => Vec::new(),
        };
        let now = crate::limiter::monotonic_ns();
        let mut state = Vec::new();
        let mut aggregate_packets_left = Vec::new();
        let mut proven = None;
        for (iface, instance) in &self.instances {
            let limiter = &instance.limiter;
            for (limit_id, name) in &limits {
                let limit = self
                    .compiled
                    .limits
                    .get(usize::from(*limit_id))
                    .copied()
                    .unwrap_or_default();
                for budget in [Budget::Tcp, Budget::Other] {
                    let Some((s, leased)) = limiter
                        .source_counted(&key(source_prefix, *limit_id, budget))
                        .map_err(|e| e.to_string())?
                    else {
                        continue;
                    };
                    let (packets_left, blocked_seconds, next_packet) =
                        predict(&limit, &s, leased, now);
                    state.push(BudgetView {
                        interface: iface.clone(),
                        limit: name.clone(),
                        budget: budget.label().to_owned(),
                        passed: u64::from(s.passed),
                        dropped: u64::from(s.dropped),
                        packets_left,
                        leased,
                        blocked_seconds,
                        next_packet,
                    });
                }
                if limit.aggregate.is_limited() {
                    for budget in [Budget::Tcp, Budget::Other] {
                        if let Some(bucket) = limiter
                            .aggregate(&key(aggregate_prefix, *limit_id, budget))
                            .map_err(|e| e.to_string())?
                        {
                            aggregate_packets_left.push((
                                iface.clone(),
                                format!("{name} ({})", budget.label()),
                                limit
                                    .aggregate
                                    .available(bucket.tat, bucket.updated_ns, now),
                            ));
                        }
                    }
                }
            }
            if self.policy.sessions {
                let (family, addr) = crate::sessions::addr_words(address);
                let proof = limiter
                    .proven_at(&ProvenKey::new(&self.compiled.config, family, &addr))
                    .map_err(|e| e.to_string())?;
                proven = Some(proven.unwrap_or(false) || proof.is_some());
            }
        }
        let verdict = verdict(&policy, &state, proven);
        Ok(crate::explain::Explanation {
            address,
            source_prefix,
            aggregate_prefix,
            policy,
            state,
            aggregate_packets_left,
            proven,
            verdict,
        })
    }

    /// The attack notification command and its timeout, if one is configured.
    pub fn notify_command(&self) -> Option<(Vec<String>, Duration)> {
        let a = &self.file.attacks;
        (!a.notify_command.is_empty()).then(|| {
            (
                a.notify_command.clone(),
                Duration::from_secs(a.notify_timeout_seconds),
            )
        })
    }

    /// Attacks known: one, or all (under way first, then over, newest first).
    pub fn attack_records(
        &self,
        id: Option<u64>,
    ) -> Result<Vec<crate::attacks::AttackRecord>, String> {
        match id {
            None => Ok(self.attacks.detector.all()),
            Some(id) => self
                .attacks
                .detector
                .get(id)
                .map(|r| vec![r])
                .ok_or_else(|| {
                    format!("no attack {id} (the daemon keeps the last 256 over, since its start)")
                }),
        }
    }

    /// Once a second: what is being dropped, and from where, into the attack detector;
    /// starts, summaries and ends logged. Returns the starts and ends, for notification.
    pub fn attacks_tick(&mut self) -> Vec<crate::attacks::Transition> {
        use crate::attacks::{AttackType, Observation, StatKey, Transition};
        let mut totals: BTreeMap<StatKey, u64> = BTreeMap::new();
        for instance in self.instances.values() {
            let Ok(stats) = instance.limiter.stats() else {
                continue;
            };
            for &stat in Stat::ALL.iter().filter(|s| s.is_verdict()) {
                if AttackType::of(stat).is_some() {
                    *totals.entry(stat.into()).or_default() +=
                        stats.packets(stat) + stats.would_drop(stat).packets;
                }
            }
        }
        let watch = &mut self.attacks;
        let now = Instant::now();
        let samples = std::mem::take(&mut watch.samples);
        let Some(last) = watch.last_tick.replace(now) else {
            // The first tick only sets the baseline: pinned counters from before the start
            // are no attack of now.
            watch.totals = totals;
            return Vec::new();
        };
        let verdicts = totals
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    v.saturating_sub(watch.totals.get(k).copied().unwrap_or(0)),
                )
            })
            .collect();
        watch.totals = totals;
        let mut settings = self.file.attacks.detector.clone();
        settings.aggregate_prefix = (
            self.policy.aggregate_prefix_v4,
            self.policy.aggregate_prefix_v6,
        );
        let transitions = watch.detector.observe(
            &settings,
            &Observation {
                at_unix: now_unix(),
                seconds: now.duration_since(last).as_secs_f64(),
                verdicts,
                samples,
            },
        );
        let monitor = self.policy.mode == crate::Mode::Monitor;
        for transition in &transitions {
            match transition {
                Transition::Started(r) => warn!(
                    attack = r.id,
                    r#type = %r.kind,
                    prefix = %show_prefix(r.prefix),
                    packets_per_second = r.current_packets_per_second,
                    top = %show_top(&r.top_prefixes),
                    monitor,
                    "attack started: {}{}",
                    r.describe(),
                    if monitor { " (monitor mode: would be dropped, passed)" } else { "" }
                ),
                Transition::Summary(r) => warn!(
                    attack = r.id,
                    r#type = %r.kind,
                    prefix = %show_prefix(r.prefix),
                    packets_per_second = r.current_packets_per_second,
                    top = %show_top(&r.top_prefixes),
                    "attack under way: {}",
                    r.describe()
                ),
                Transition::Ended(r) => info!(
                    attack = r.id,
                    r#type = %r.kind,
                    prefix = %show_prefix(r.prefix),
                    seconds = r.ended_unix.unwrap_or(r.started_unix).saturating_sub(r.started_unix),
                    "attack over: {}",
                    r.describe()
                ),
            }
        }
        if watch.samples_lost > 0 {
            warn!(
                lost = watch.samples_lost,
                "sampled drop events not kept this second (attribution only; counts are exact)"
            );
            watch.samples_lost = 0;
        }
        transitions
            .into_iter()
            .filter(|t| !matches!(t, Transition::Summary(_)))
            .collect()
    }

    /// Brings the kernel in line with the challenge's settings after a change of them
    /// (`previous`: the settings before, whose ports are released first).
    fn rearm_challenge(&mut self, previous: Option<&crate::policy::ChallengeSpec>) {
        if let Some(previous) = previous
            && self.challenge.engaged
        {
            self.set_challenge_ports(&previous.ports.clone(), false);
        }
        match self.challenge.reconfigure(&self.policy.challenge) {
            Some(transition) => self.carry_out(transition, 0),
            None if self.challenge.engaged => {
                self.set_challenge_ports(&self.policy.challenge.ports.clone(), true);
            }
            None => {}
        }
        // The proven ACK's treatment may have changed while engaged.
        self.sync_syncookies();
    }

    fn carry_out(&mut self, transition: crate::challenge::Transition, syns: u64) {
        let ports = self.policy.challenge.ports.clone();
        let shown = ports
            .iter()
            .map(|r| {
                if r.start() == r.end() {
                    r.start().to_string()
                } else {
                    format!("{}-{}", r.start(), r.end())
                }
            })
            .collect::<Vec<_>>()
            .join(",");
        match transition {
            crate::challenge::Transition::Engage => {
                self.challenge_transitions.0 += 1;
                self.set_challenge_ports(&ports, true);
                self.sync_syncookies();
                warn!(
                    ports = %shown,
                    syns_per_second = syns,
                    mode = ?self.policy.challenge.mode,
                    "attack mode: SYNs from unproven sources are answered with a SYN-cookie challenge"
                );
            }
            crate::challenge::Transition::Disengage => {
                self.challenge_transitions.1 += 1;
                self.set_challenge_ports(&ports, false);
                self.sync_syncookies();
                info!(ports = %shown, "attack mode over: the SYN-cookie challenge is off");
            }
        }
    }

    /// While the challenge is engaged and hands proven ACKs to the kernel, the listener must
    /// take cookies it did not issue itself (`tcp_syncookies = 2`); otherwise the namespace's
    /// own setting is put back.
    fn sync_syncookies(&mut self) {
        let wanted = self.challenge.engaged
            && self.policy.challenge.proven_ack == crate::policy::ProvenAck::Pass;
        match (wanted, self.syncookies_before.is_some()) {
            (true, false) => match std::fs::read_to_string(SYNCOOKIES) {
                Ok(before) if before.trim() == "2" => {}
                Ok(before) => {
                    self.syncookies_before = Some(before.trim().to_owned());
                    if let Err(e) = std::fs::write(SYNCOOKIES, "2") {
                        error!(
                            "cannot set {SYNCOOKIES} to 2 ({e}): the kernel will refuse the \
                             challenge's cookies and challenged clients will fail"
                        );
                    }
                }
                Err(e) => error!("cannot read {SYNCOOKIES}: {e}"),
            },
            (false, true) => {
                if let Some(before) = self.syncookies_before.take()
                    && let Err(e) = std::fs::write(SYNCOOKIES, &before)
                {
                    error!("cannot put {SYNCOOKIES} back to {before}: {e}");
                }
            }
            _ => {}
        }
    }

    fn set_challenge_ports(&mut self, ports: &[std::ops::RangeInclusive<u16>], on: bool) {
        for (iface, instance) in &mut self.instances {
            if let Err(e) = instance.limiter.set_challenge(ports, on) {
                error!(interface = %iface, "switching the SYN-cookie challenge: {e}");
            }
        }
    }

    fn clear_challenge_ports(&mut self) {
        self.set_challenge_ports(&[0..=u16::MAX], false);
    }

    /// Whether the challenge is engaged, and how often it engaged and disengaged.
    pub fn challenge_state(&self) -> (bool, u64, u64) {
        (
            self.challenge.engaged,
            self.challenge_transitions.0,
            self.challenge_transitions.1,
        )
    }

    /// Acts on what is known about `iface` now (see [`gate::decide`]).
    pub fn reconcile(&mut self, iface: &str, current: Option<u32>, kernel_program: Option<u32>) {
        let attach_mode = self.file.attach_mode;
        let Some(instance) = self.instances.get_mut(iface) else {
            return;
        };
        let observed = Observed {
            current_ifindex: current,
            attached_ifindex: instance.ifindex,
            kernel_program,
            our_program: instance.limiter.program_id(),
        };
        match gate::decide(observed) {
            Step::Keep | Step::StayAbsent => {}
            Step::Lost => {
                warn!(
                    interface = iface,
                    "the interface is gone: nothing filters it; the program is attached again \
                     as soon as an interface of this name appears"
                );
                instance.ifindex = None;
                instance.problem = Some("the interface was deleted".into());
            }
            Step::Attach { ifindex } => match instance.attach(iface, ifindex, attach_mode) {
                Ok(_) => warn!(
                    interface = iface,
                    ifindex,
                    mode = instance.mode,
                    "attached to the interface (new or recreated), with the pinned policy"
                ),
                Err(e) => {
                    let problem = format!("attaching failed: {e}");
                    if instance.problem.as_deref() != Some(&problem) {
                        error!(interface = iface, "{problem}; nothing filters it");
                    }
                    instance.ifindex = None;
                    instance.problem = Some(problem);
                }
            },
        }
    }

    fn apply_all(&mut self, compiled: &CompiledPolicy) -> Result<(), DaemonError> {
        for (iface, instance) in &mut self.instances {
            instance
                .limiter
                .apply(compiled)
                .map_err(|source| DaemonError::Limiter {
                    iface: iface.clone(),
                    source: Box::new(source),
                })?;
            // A reload that switches sessions on takes effect now, not at the next start.
            if compiled.config.has(Config::FLAG_SESSIONS) && !instance.limiter.sessions_attached() {
                attach_sessions(&self.file, iface, &mut instance.limiter)?;
            }
        }
        Ok(())
    }

    /// Validates, persists and applies a new runtime state. On any failure the running
    /// policy stays exactly as it was: a change that cannot be saved is refused, so every
    /// acknowledged change survives a restart.
    pub fn commit(&mut self, mut runtime: RuntimeState) -> Result<(), DaemonError> {
        runtime.generation = self.runtime.generation + 1;
        let (policy, compiled) = runtime.compile(&self.file.policy, now_unix())?;
        runtime.save(&self.file.state_dir)?;
        if let Err(e) = self.apply_all(&compiled) {
            // Put the previous policy back in the maps and on disk.
            let previous = self.compiled.clone();
            if let Err(again) = self.apply_all(&previous) {
                error!("restoring the previous policy failed too: {again}");
            }
            if let Err(again) = self.runtime.save(&self.file.state_dir) {
                error!("restoring the previous runtime state failed: {again}");
            }
            return Err(e);
        }
        self.runtime = runtime;
        let previous = std::mem::replace(&mut self.policy, policy);
        self.compiled = compiled;
        self.unsaved = false;
        if previous.challenge != self.policy.challenge {
            self.rearm_challenge(Some(&previous.challenge));
        }
        Ok(())
    }

    /// Re-reads the config file; on error the running policy is kept.
    pub fn reload(&mut self, actor: &Actor) -> Result<(), DaemonError> {
        let before = self.runtime.clone();
        let result = (|| {
            let Some(path) = self.options.config.clone() else {
                return Ok(());
            };
            let mut file = load_file(&path)?;
            apply_overrides(&mut file, &self.options);
            if file.interfaces != self.file.interfaces {
                warn!(
                    "interfaces changed in the config file; restart the daemon to attach or detach"
                );
                file.interfaces = self.file.interfaces.clone();
            }
            let previous = std::mem::replace(&mut self.file, file);
            let runtime = self.runtime.clone();
            if let Err(e) = self.commit(runtime) {
                self.file = previous;
                return Err(e);
            }
            Ok(())
        })();
        self.last_reload_ok = result.is_ok();
        self.last_reload_unix = now_unix();
        match &result {
            Ok(()) => {
                info!(
                    generation = self.runtime.generation,
                    "configuration reloaded"
                );
                self.audit(actor, serde_json::json!({"command": "reload"}), &before);
            }
            Err(e) => warn!(%actor, "reload refused, the running policy is unchanged: {e}"),
        }
        result
    }

    /// Takes what the fleet watcher reports. A new view is applied as one change (saved, so
    /// a restart without etcd enforces it); one that cannot be applied leaves the running
    /// policy as it was. A connection lost changes nothing in the maps.
    pub fn fleet_event(&mut self, event: crate::fleet::FleetEvent) {
        use crate::fleet::FleetEvent;
        match event {
            FleetEvent::Connected(connected) => self.fleet.connected = connected,
            FleetEvent::Resynced => self.fleet.resyncs += 1,
            FleetEvent::View(view) => self.fleet_view(view),
        }
    }

    fn fleet_view(&mut self, mut view: crate::fleet::FleetView) {
        let heard_before = self.fleet.heard_unix_ms.replace(now_unix_ms());
        // An entry past its expiry is gone here already, even while its minute's lease
        // still keeps it in the store.
        view.expire(now_unix());
        let stored_policy = view.policy.clone();
        if view.policy != self.runtime.fleet.policy {
            let refused_before = self
                .fleet
                .policy_refused
                .as_ref()
                .zip(view.policy.as_ref())
                .is_some_and(|((version, _), p)| *version == p.version);
            if refused_before {
                view.policy = self.runtime.fleet.policy.clone();
            } else if let Some(Err(e)) = view.policy.as_ref().map(crate::config::parse_fleet_policy)
            {
                self.refuse_fleet_policy(&view, e.to_string());
                view.policy = self.runtime.fleet.policy.clone();
            }
        }
        if view.same_content(&self.runtime.fleet) {
            // Progress only: the host is complete up to a later revision.
            if view.revision != self.runtime.fleet.revision {
                self.runtime.fleet.revision = view.revision;
                self.unsaved = true;
            }
            return;
        }
        let now_ms = now_unix_ms();
        // Only what was written since the store last answered: an entry listed at the
        // start, or after an outage, measures the outage, not the propagation.
        let fresh = |created: u64| heard_before.is_some_and(|heard| created >= heard);
        let mut arrived: Vec<u64> = [crate::fleet::ListKind::Deny, crate::fleet::ListKind::Allow]
            .into_iter()
            .flat_map(|kind| {
                let known = self.runtime.fleet.list(kind);
                view.list(kind)
                    .iter()
                    .filter(move |(prefix, entry)| known.get(prefix) != Some(entry))
                    .map(|(_, entry)| entry.created_unix_ms)
            })
            .filter(|created| fresh(*created))
            .collect();
        if let Some(policy) = &view.policy
            && view.policy != self.runtime.fleet.policy
            && fresh(policy.created_unix_ms)
        {
            arrived.push(policy.created_unix_ms);
        }
        let revision = view.revision;
        let before = self.runtime.clone();
        let mut runtime = self.runtime.clone();
        runtime.fleet = view.clone();
        let mut result = self.commit(runtime);
        if let Err(e) = &result
            && view.policy != before.fleet.policy
        {
            // The document is valid alone but not with this host's own sections (too many
            // prefixes with its lists, say): keep the policy in force, take the entries.
            self.refuse_fleet_policy(&view, e.to_string());
            view.policy = before.fleet.policy.clone();
            let mut runtime = self.runtime.clone();
            runtime.fleet = view.clone();
            result = self.commit(runtime);
        }
        if let Err(e) = result {
            error!(
                revision,
                "fleet revision not applied, the running policy is unchanged: {e}"
            );
            return;
        }
        if view.policy == stored_policy {
            self.fleet.policy_refused = None;
        }
        for created in arrived {
            self.fleet
                .convergence
                .observe(now_ms.saturating_sub(created) as f64 / 1_000.0);
        }
        self.audit(
            &crate::audit::Actor::Fleet { revision },
            serde_json::json!({
                "command": "fleet",
                "revision": revision,
                "policy_version": view.policy.as_ref().map(|p| p.version),
            }),
            &before,
        );
        self.log_fleet_refusals();
    }

    /// Records that this host does not take the fleet policy of `view`.
    fn refuse_fleet_policy(&mut self, view: &crate::fleet::FleetView, why: String) {
        let Some(policy) = &view.policy else { return };
        error!(
            version = policy.version,
            author = %policy.author,
            "fleet policy refused on this host, the policy in force stays: {why}"
        );
        self.fleet.policy_refused = Some((policy.version, why));
    }

    /// The fleet entries this host does not apply, with why.
    pub fn fleet_refused(
        &self,
    ) -> Vec<(
        crate::fleet::ListKind,
        crate::fleet::FleetEntry,
        crate::fleet::Refusal,
    )> {
        self.runtime
            .fleet
            .split(
                &self.local_allow(),
                &self.policy.fleet_never_deny,
                now_unix(),
            )
            .refused
            .into_iter()
            .map(|(kind, entry, why)| (kind, entry.clone(), why))
            .collect()
    }

    /// This host's own allowlist, which fleet denies are judged against (the fleet's
    /// allows are not part of it).
    fn local_allow(&self) -> Vec<ipnet::IpNet> {
        self.runtime.local(&self.file.policy, now_unix()).allow
    }

    /// `status`'s fleet part.
    pub fn fleet_report(&self) -> Option<crate::protocol::FleetReport> {
        let settings = self.file.fleet.as_ref()?;
        let split = self.runtime.fleet.split(
            &self.local_allow(),
            &self.policy.fleet_never_deny,
            now_unix(),
        );
        Some(crate::protocol::FleetReport {
            source: format!("etcd {} {}", settings.endpoints.join(","), settings.prefix),
            connected: self.fleet.connected,
            revision: self.runtime.fleet.revision,
            lag_ms: self
                .fleet
                .heard_unix_ms
                .map(|heard| now_unix_ms().saturating_sub(heard)),
            applied: split.deny.len(),
            allowed: split.allow.len(),
            refused: split
                .refused
                .iter()
                .map(|(kind, entry, why)| (format!("{kind} {}", entry.prefix), why.to_string()))
                .collect(),
            policy: self.runtime.fleet.policy.as_ref().map(|p| {
                crate::protocol::FleetPolicyReport {
                    version: p.version,
                    author: p.author.clone(),
                    reason: p.reason.clone(),
                    created_unix_ms: p.created_unix_ms,
                }
            }),
            policy_refused: self
                .fleet
                .policy_refused
                .as_ref()
                .map(|(version, why)| format!("version {version}: {why}")),
            publications: self
                .fleet
                .publications
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
        })
    }

    fn log_fleet_refusals(&mut self) {
        let refused = self.fleet_refused();
        for (kind, entry, why) in &refused {
            if self
                .fleet
                .refused_logged
                .insert((*kind, entry.prefix.trunc()))
            {
                warn!(
                    prefix = %entry.prefix,
                    author = %entry.author,
                    reason = %entry.reason,
                    "fleet {kind} refused on this host: {why}"
                );
            }
        }
        self.fleet.refused_logged.retain(|(kind, p)| {
            refused
                .iter()
                .any(|(k, e, _)| k == kind && e.prefix.trunc() == *p)
        });
    }

    /// Which attack records of this second become fleet denies (`[fleet] publish_attacks`):
    /// the entries to write. Monitor mode, here or in `publish_attacks`, writes nothing and
    /// logs what it would; every decision is counted, and each write is in the history.
    pub fn attack_publications(
        &mut self,
        transitions: &[crate::attacks::Transition],
    ) -> Vec<crate::fleet::FleetEntry> {
        use crate::fleet::{Publication, PublishAttacks};
        let Some(settings) = self.file.fleet.clone() else {
            return Vec::new();
        };
        let mut publish = settings.publish;
        if self.policy.mode == crate::Mode::Monitor && publish.mode == PublishAttacks::On {
            publish.mode = PublishAttacks::Monitor;
        }
        let now_ms = now_unix_ms();
        self.fleet
            .published
            .retain(|_, expires| *expires > now_ms / 1_000);
        let allow = self.local_allow();
        let mut writes = Vec::new();
        for transition in transitions {
            let crate::attacks::Transition::Started(record) = transition else {
                continue;
            };
            let Some(decision) = crate::fleet::publication(
                &publish,
                record,
                &attack_author(),
                now_ms,
                self.fleet.published.len() as u64,
                &allow,
                &self.policy.fleet_never_deny,
            ) else {
                continue;
            };
            let outcome = match &decision {
                Publication::Publish(entry) => {
                    self.fleet
                        .published
                        .insert(entry.prefix, entry.expires_unix.unwrap_or_default());
                    let before = self.runtime.clone();
                    self.audit(
                        &Actor::Attack { id: record.id },
                        serde_json::json!({
                            "command": "fleet deny add",
                            "prefix": entry.prefix,
                            "reason": entry.reason,
                            "expires_unix": entry.expires_unix,
                        }),
                        &before,
                    );
                    writes.push(entry.clone());
                    "published"
                }
                Publication::WouldPublish(entry) => {
                    warn!(attack = record.id, prefix = %entry.prefix, "monitor: would publish a fleet deny of {} for {} s", entry.prefix, publish.seconds);
                    "would_publish"
                }
                Publication::Capped(entry) => {
                    warn!(attack = record.id, prefix = %entry.prefix, max = publish.max, "fleet deny not published: this host has its maximum live");
                    "capped"
                }
                Publication::Refused(entry, why) => {
                    warn!(attack = record.id, prefix = %entry.prefix, "fleet deny not published: {why}");
                    "refused"
                }
            };
            *self.fleet.publications.entry(outcome).or_default() += 1;
        }
        writes
    }

    /// Counts a published deny that etcd did not take.
    pub fn attack_publication_failed(&mut self, entry: &crate::fleet::FleetEntry, why: &str) {
        warn!(prefix = %entry.prefix, "fleet deny not published: {why}");
        self.fleet.published.remove(&entry.prefix);
        *self.fleet.publications.entry("failed").or_default() += 1;
    }

    /// Logs a change that took effect and records it in the history.
    fn audit(&mut self, actor: &Actor, request: serde_json::Value, before: &RuntimeState) {
        let changes = audit::diff(before, &self.runtime);
        info!(
            %actor,
            generation = self.runtime.generation,
            request = %request,
            changes = %serde_json::to_string(&changes).unwrap_or_default(),
            "change applied"
        );
        let entry = AuditEntry {
            time_unix: now_unix(),
            generation: self.runtime.generation,
            actor: actor.clone(),
            request,
            changes,
        };
        if let Err(e) = self.history.record(&self.file.state_dir, entry) {
            warn!("the change is in force but not in the history file: {e}");
        }
    }

    /// Drops expired list entries from the maps, then saves. Unlike an operator's change,
    /// expiry does not wait for the disk: a temporary deny (or allow) ends on time even when
    /// the state file cannot be written. A failed save is counted, logged, and retried on
    /// the next tick; until it succeeds the state file still lists the expired entries,
    /// which a restart ignores because they have expired.
    pub fn expire(&mut self) -> Result<(), DaemonError> {
        let mut runtime = self.runtime.clone();
        if runtime.expire(now_unix()) {
            runtime.generation += 1;
            let (policy, compiled) = runtime.compile(&self.file.policy, now_unix())?;
            self.apply_all(&compiled)?;
            let before = std::mem::replace(&mut self.runtime, runtime);
            self.policy = policy;
            self.compiled = compiled;
            self.unsaved = true;
            self.audit(
                &Actor::Expiry,
                serde_json::json!({"command": "expire"}),
                &before,
            );
        }
        if self.unsaved {
            self.save_pending();
        }
        Ok(())
    }

    /// Saves a runtime state that is in force but not on disk.
    fn save_pending(&mut self) {
        match self.runtime.save(&self.file.state_dir) {
            Ok(()) => {
                if self.save_failures > 0 && self.last_save_log.is_some() {
                    info!("runtime state saved again");
                }
                self.unsaved = false;
                self.last_save_log = None;
            }
            Err(e) => {
                self.save_failures += 1;
                let due = self
                    .last_save_log
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(SAVE_FAILURE_LOG_SECONDS));
                if due {
                    error!(
                        failures = self.save_failures,
                        "saving the runtime state failed (retrying every second; the maps are \
                         up to date): {e}"
                    );
                    self.last_save_log = Some(Instant::now());
                }
            }
        }
    }

    /// Applies `edit` to a copy of the runtime state, commits it, records the change, and
    /// answers with the new generation and the edit's notes. `edit` sees the policy in force
    /// and the config file's.
    fn change(
        &mut self,
        actor: &Actor,
        asked: serde_json::Value,
        edit: impl FnOnce(&mut RuntimeState, &Policy, &Policy) -> Result<Vec<String>, ChangeError>,
    ) -> Result<Response, String> {
        let mut runtime = self.runtime.clone();
        let notes =
            edit(&mut runtime, &self.policy, &self.file.policy).map_err(|e| e.to_string())?;
        let before = self.runtime.clone();
        self.commit(runtime).map_err(|e| e.to_string())?;
        self.audit(actor, asked, &before);
        Ok(Response::ok(self.runtime.generation).with_notes(notes))
    }

    /// Carries out one change request; reads are answered by the socket's routing.
    fn dispatch(
        &mut self,
        request: Request,
        actor: &Actor,
        asked: serde_json::Value,
    ) -> Result<Response, String> {
        let none = |()| Vec::new();
        match request {
            Request::Status {}
            | Request::LimitShow {}
            | Request::ClassList {}
            | Request::ListShow { .. }
            | Request::BlockList {}
            | Request::Top { .. }
            | Request::Attacks { .. }
            | Request::Explain { .. }
            | Request::History { .. }
            | Request::RuntimeShow {} => {
                Err("internal: reads are answered by the socket's routing".into())
            }
            Request::LimitSet {
                target,
                packets,
                bytes,
                aggregate,
                connections,
                acks,
                block_seconds,
            } => {
                let changes = LimitChanges {
                    packets,
                    bytes,
                    aggregate,
                    connections,
                    acks,
                    block_seconds: block_seconds.map(crate::input::Seconds::get),
                };
                self.change(actor, asked, |rt, policy, _| {
                    rt.set_limit(policy, &target, changes).map(none)
                })
            }
            Request::ClassAdd {
                name,
                prefixes,
                limit,
            } => self.change(actor, asked, |rt, policy, _| {
                rt.add_class(policy, &name, &prefixes, limit).map(none)
            }),
            Request::ClassDel { name } => self.change(actor, asked, |rt, policy, file| {
                rt.remove_class(policy, file, &name).map(none)
            }),
            Request::ListAdd {
                list,
                prefix,
                ttl_seconds,
                force,
            } => {
                let expires_at = ttl_seconds.map(|t| now_unix() + t.get());
                self.change(actor, asked, |rt, policy, _| {
                    rt.add_entry(policy, list, prefix, expires_at, force)
                })
            }
            Request::ListDel { list, prefix } => self.change(actor, asked, |rt, _, file| {
                rt.remove_entry(file, list, prefix).map(none)
            }),
            Request::Mode { mode } => self.change(actor, asked, |rt, _, _| {
                rt.mode = Some(mode);
                Ok(Vec::new())
            }),
            Request::RuntimeReset {} => self.change(actor, asked, |rt, _, _| {
                rt.reset();
                Ok(Vec::new())
            }),
            Request::BlockAdd { address, seconds } => {
                self.block(address, Some(seconds.get()))
                    .map_err(|e| e.to_string())?;
                let unchanged = self.runtime.clone();
                self.audit(actor, asked, &unchanged);
                Ok(Response::ok(()))
            }
            Request::BlockDel { address } => {
                self.block(address, None).map_err(|e| e.to_string())?;
                let unchanged = self.runtime.clone();
                self.audit(actor, asked, &unchanged);
                Ok(Response::ok(()))
            }

            Request::Reload {} => {
                self.reload(actor).map_err(|e| e.to_string())?;
                Ok(Response::ok(self.runtime.generation))
            }

            Request::Detach { iface } => {
                let names: Vec<String> = match iface {
                    Some(name) if self.instances.contains_key(&name) => vec![name],
                    Some(name) => return Err(format!("not attached to {name}")),
                    None => self.instances.keys().cloned().collect(),
                };
                for name in &names {
                    if let Some(instance) = self.instances.remove(name) {
                        instance
                            .limiter
                            .detach_and_unpin()
                            .map_err(|e| format!("{name}: {e}"))?;
                        info!(interface = %name, "detached and unpinned");
                    }
                }
                let unchanged = self.runtime.clone();
                self.audit(actor, asked, &unchanged);
                Ok(Response::ok(names))
            }
        }
    }

    /// Puts `address` into the penalty box for `seconds` (or takes it out, with `None`) on
    /// every interface, under the limit its class gives it. Looks up the address under each
    /// limit id rather than walking the table, so it never waits on the table's size.
    fn block(&mut self, address: IpAddr, seconds: Option<u64>) -> Result<(), DaemonError> {
        let address = address.to_canonical();
        let config = &self.compiled.config;
        let prefix_len = if address.is_ipv4() {
            config.source_prefix_v4
        } else {
            config.source_prefix_v6
        };
        let class_limit = self
            .policy
            .classes
            .iter()
            .find(|c| c.prefixes.iter().any(|p| p.contains(&address)))
            .and_then(|c| self.runtime.limit_ids.ids.get(&c.name).copied())
            .unwrap_or(0);
        let limits = self.compiled.limits.len() as u16;
        let until = seconds.map_or(0, |s| monotonic_ns() + s.saturating_mul(1_000_000_000));
        for (iface, instance) in &mut self.instances {
            let limiter = &mut instance.limiter;
            let err = |source| DaemonError::Limiter {
                iface: iface.clone(),
                source: Box::new(source),
            };
            // The box is the whole source: its TCP and its other budget alike.
            for budget in [Budget::Tcp, Budget::Other] {
                let key = |limit_id| {
                    SourceKey::from_addr(address, prefix_len, limit_id).with_budget(budget)
                };
                let mut found = false;
                for limit_id in 0..limits {
                    if let Some(mut state) = limiter.source(&key(limit_id)).map_err(err)? {
                        state.blocked_until_ns = until;
                        limiter.set_source(&key(limit_id), &state).map_err(err)?;
                        found = true;
                    }
                }
                if !found && seconds.is_some() {
                    let state = SourceState {
                        blocked_until_ns: until,
                        ..SourceState::default()
                    };
                    limiter.set_source(&key(class_limit), &state).map_err(err)?;
                }
            }
        }
        Ok(())
    }
}

fn apply_overrides(file: &mut FileConfig, options: &DaemonOptions) {
    if !options.interfaces.is_empty() {
        file.interfaces = options.interfaces.clone();
    }
    if let Some(mode) = options.mode {
        file.attach_mode = mode;
    }
    if let Some(socket) = &options.socket {
        file.control.socket = socket.clone();
    }
    if let Some(dir) = &options.state_dir {
        file.state_dir = dir.clone();
    }
    if let Some(dir) = &options.pin_dir {
        file.pin_dir = dir.clone();
    }
    if let Some(addr) = options.metrics {
        file.metrics.listen = addr;
    }
}

/// Loads (or adopts) the program of one interface, applies the policy, and attaches it if
/// the interface exists. An interface that does not exist yet (a VLAN or bond that the
/// network configuration creates after the daemon starts, which it does at boot) is
/// attached as soon as it appears; until then the daemon reports it unattached and unhealthy.
fn load_interface(
    file: &FileConfig,
    iface: &str,
    compiled: &CompiledPolicy,
) -> Result<Instance, DaemonError> {
    let dir = file.pin_dir.join(PIN_LAYOUT).join(iface);
    let err = |source| DaemonError::Limiter {
        iface: iface.to_owned(),
        source: Box::new(source),
    };
    let current = gate::current_ifindex(iface);
    if dir.join("link").exists() {
        let pinned = pinned_ifindex(&dir);
        if current.is_some() && pinned == current {
            info!(
                interface = iface,
                "adopting the pinned program, maps and link"
            );
        } else {
            // The link died with the interface it was made for; the maps are still ours.
            warn!(
                interface = iface,
                pinned_ifindex = pinned,
                ifindex = current,
                "stale pins: the interface was deleted or recreated; attaching anew with the \
                 pinned maps"
            );
            crate::limiter::remove_link_pin(&dir).map_err(err)?;
        }
    }
    let options = LoadOptions {
        max_sources: Some(file.capacity.sources),
        max_aggregates: Some(file.capacity.aggregates),
        pin_dir: Some(dir.clone()),
    };
    let mut limiter = Limiter::load(&options).map_err(err)?;
    // The policy goes in before the program meets traffic on a new link.
    limiter.apply(compiled).map_err(err)?;
    if file.policy.sessions {
        attach_sessions(file, iface, &mut limiter)?;
    } else {
        // A previous daemon's sock_ops link would go on recording for nothing.
        crate::limiter::remove_sessions_pin(&dir).map_err(err)?;
    }
    let mut instance = Instance {
        limiter,
        mode: "-",
        ifindex: None,
        problem: None,
        proven: None,
    };
    let Some(index) = current else {
        warn!(
            interface = iface,
            "the interface does not exist: nothing filters it until it appears; the program \
             is attached as soon as it does"
        );
        instance.problem = Some("the interface does not exist".into());
        return Ok(instance);
    };
    match instance.attach(iface, index, file.attach_mode)? {
        Attached::New(_) => info!(interface = iface, mode = instance.mode, "attached"),
        Attached::Adopted => info!(
            interface = iface,
            mode = instance.mode,
            "replaced the program on the pinned link"
        ),
    }
    Ok(instance)
}

/// Attaches the sock_ops program for one interface's maps and backfills the connections
/// already established, before the XDP program sees a packet on a new link.
fn attach_sessions(
    file: &FileConfig,
    iface: &str,
    limiter: &mut Limiter,
) -> Result<(), DaemonError> {
    let cgroup = match &file.sessions_cgroup {
        Some(path) => path.clone(),
        None => crate::sessions::find_cgroup2()?,
    };
    if !crate::sessions::is_cgroup2(&cgroup) {
        return Err(crate::sessions::SessionError::NotCgroup2(cgroup).into());
    }
    let cookie = crate::sessions::netns_cookie()?;
    let sockets = crate::sessions::tcp_sockets()?;
    let compiled = &file.policy;
    let backfill = crate::sessions::plan_backfill(
        &sockets,
        compiled.source_prefix_v4,
        compiled.source_prefix_v6,
    );
    limiter
        .attach_sessions(&cgroup, cookie, &backfill)
        .map_err(|source| DaemonError::Limiter {
            iface: iface.to_owned(),
            source: Box::new(source),
        })?;
    info!(
        interface = iface,
        cgroup = %cgroup.display(),
        flows = backfill.flows.len(),
        proven = backfill.proven.len(),
        "TCP judged by session: sock_ops attached, established connections backfilled"
    );
    Ok(())
}

/// Detaches without a daemon: removes the pins of `iface` (or all), which detaches the
/// programs once no process holds them.
pub fn detach_pins(
    pin_dir: &Path,
    iface: Option<&str>,
) -> Result<Vec<String>, crate::limiter::Error> {
    let base = pin_dir.join(PIN_LAYOUT);
    let names: Vec<String> = match iface {
        Some(name) => vec![name.to_owned()],
        None => std::fs::read_dir(&base)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default(),
    };
    let mut removed = Vec::new();
    for name in names {
        let dir = base.join(&name);
        if dir.exists() {
            remove_pins(&dir)?;
            removed.push(name);
        }
    }
    Ok(removed)
}
