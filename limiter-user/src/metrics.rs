//! The Prometheus endpoint: `GET /metrics` (OpenMetrics when the scraper asks for it, the
//! Prometheus text format otherwise) and `GET /healthz`.
//!
//! Scrapes are cheap: per-CPU counters are summed when scraped, and everything that walks the
//! source table is computed by a background task every few seconds, on its own handle to the
//! pinned map, and served from a cache.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex as SyncMutex},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use limiter_common::{
    layout::{Counter, Stat},
    prefix::FAMILY_IPV4,
};
use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tracing::{info, warn};

use crate::{
    limiter::{MapFill, monotonic_ns, open_pinned_sources, pinned_map_fills},
    policy::Mode,
};

/// How often the source table is walked for the state gauges.
pub const STATE_REFRESH: Duration = Duration::from_secs(3);

/// The most attacks exported as series at once (the fastest; `limiter attacks` lists all),
/// so a flood spread over thousands of prefixes cannot blow up the scrape.
pub const MAX_ATTACK_SERIES: usize = 20;

/// A source counts as limited if it went over a limit within this window.
const LIMITED_WINDOW_NS: u64 = 10_000_000_000;

/// What a walk of one interface's source table found.
#[derive(Clone, Copy, Debug, Default)]
pub struct StateSummary {
    /// Tracked IPv4 sources.
    pub tracked_v4: u64,
    /// Tracked IPv6 sources.
    pub tracked_v6: u64,
    /// Sources in the penalty box.
    pub penalty_box: u64,
    /// Sources over a limit in the last [`LIMITED_WINDOW_NS`].
    pub limited: u64,
}

/// Walks a pinned source table.
pub fn summarize_sources(pin_dir: &std::path::Path) -> Option<StateSummary> {
    let map = open_pinned_sources(pin_dir).ok()?;
    let now = monotonic_ns();
    let mut summary = StateSummary::default();
    for (key, state) in map.iter().filter_map(Result::ok) {
        if key.family == FAMILY_IPV4 {
            summary.tracked_v4 += 1;
        } else {
            summary.tracked_v6 += 1;
        }
        if state.blocked_until_ns > now {
            summary.penalty_box += 1;
        }
        if state
            .last_excess_ns()
            .is_some_and(|at| now.saturating_sub(at) < LIMITED_WINDOW_NS)
        {
            summary.limited += 1;
        }
    }
    Some(summary)
}

/// What the background walk found on one interface's maps.
#[derive(Clone, Debug, Default)]
pub struct InterfaceWalk {
    /// The source table's summary.
    pub summary: StateSummary,
    /// How full each bounded map is.
    pub fills: Vec<MapFill>,
}

impl InterfaceWalk {
    /// Walks one interface's pinned maps; `None` if its source table cannot be opened.
    pub fn of(pin_dir: &std::path::Path) -> Option<Self> {
        let summary = summarize_sources(pin_dir)?;
        let fills = pinned_map_fills(pin_dir, Some(summary.tracked_v4 + summary.tracked_v6));
        Some(Self { summary, fills })
    }
}

/// The walks, by interface, refreshed in the background.
pub type StateCache = Arc<SyncMutex<BTreeMap<String, InterfaceWalk>>>;

/// One interface's part of a scrape.
#[derive(Debug, Default)]
pub struct InterfaceSnapshot {
    /// The interface.
    pub name: String,
    /// `native`, `generic`, or `-` before the first attach.
    pub mode: &'static str,
    /// Why the program does not filter it now, or `None` when it does.
    pub problem: Option<String>,
    /// Whether the counters could be read.
    pub maps_readable: bool,
    /// Verdict counters, by [`Stat`] index.
    pub stats: Vec<Counter>,
    /// Capacity of the source table.
    pub capacity: u64,
    /// Kernel BPF run time and count, when enabled.
    pub bpf: Option<(Duration, u64)>,
}

/// Everything one scrape reports: a plain value the daemon fills in while it holds its
/// state, encoded after it lets go.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The SYN-cookie challenge: engaged now, times it engaged, times it disengaged.
    pub challenge: (bool, u64, u64),
    /// Per attack type: attacks under way, attacks started since the daemon started.
    pub attacks: Vec<(crate::attacks::AttackType, u64, u64)>,
    /// The attacks under way: one labelled series each, so alerts can name them.
    pub active_attacks: Vec<crate::attacks::AttackRecord>,
    /// The configured interfaces.
    pub interfaces: Vec<InterfaceSnapshot>,
    /// Per limit: its counters.
    pub limits: Vec<LimitCounts>,
    /// The source tables' summary; the endpoint fills it in from its background walk.
    pub state: StateSummary,
    /// How full the bounded maps are, by interface; filled in from the same walk.
    pub map_fills: Vec<(String, MapFill)>,
    /// The config generation.
    pub generation: u64,
    /// Whether the last reload succeeded.
    pub reload_ok: bool,
    /// Whether the runtime state in force is saved.
    pub state_saved: bool,
    /// Failed saves of the runtime state.
    pub save_failures: u64,
    /// When the config was last loaded, Unix seconds.
    pub last_reload: u64,
    /// Enforce or monitor.
    pub mode: Mode,
    /// Allowlist entries.
    pub allow: u64,
    /// Denylist entries.
    pub deny: u64,
    /// The kernel release.
    pub kernel: String,
    /// "Over its limit" events read.
    pub events_limited: u64,
    /// "Entered the penalty box" events read.
    pub events_penalty_box: u64,
    /// The daemon process; the endpoint fills it in at scrape time.
    pub process: Option<ProcessStats>,
    /// The fleet store, when one is configured.
    pub fleet: Option<FleetMetrics>,
}

/// How this host follows the fleet store.
#[derive(Debug)]
pub struct FleetMetrics {
    /// Whether the store answers now.
    pub connected: bool,
    /// The etcd revision applied here.
    pub revision: i64,
    /// Times the watch fell behind a compaction and the host listed again.
    pub resyncs: u64,
    /// Fleet entries refused here.
    pub refused: u64,
    /// The version of the fleet policy in force here; 0: none.
    pub policy_version: i64,
    /// Whether this host refuses the fleet policy the store holds.
    pub policy_refused: bool,
    /// Attack records judged for publication as fleet denies, by outcome.
    pub publications: Vec<(&'static str, u64)>,
    /// Seconds from an entry's creation to its application here.
    pub convergence: prometheus_client::metrics::histogram::Histogram,
}

/// The daemon process as the kernel accounts it: what the standard `process_*` metrics of
/// every Prometheus client report, so a restart, a leak or an fd exhaustion is visible.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// Start time, Unix seconds.
    pub start_time_seconds: f64,
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident memory, bytes.
    pub resident_memory_bytes: u64,
    /// Virtual memory, bytes.
    pub virtual_memory_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on open file descriptors (`None`: unlimited).
    pub max_fds: Option<u64>,
}

impl ProcessStats {
    /// This process's figures, from /proc/self; `None` if /proc cannot be read.
    pub fn of_this_process() -> Option<Self> {
        let me = procfs::process::Process::myself().ok()?;
        let stat = me.stat().ok()?;
        let ticks = procfs::ticks_per_second() as f64;
        let max_fds = match me.limits().ok()?.max_open_files.soft_limit {
            procfs::process::LimitValue::Value(n) => Some(n),
            procfs::process::LimitValue::Unlimited => None,
        };
        Some(Self {
            start_time_seconds: procfs::boot_time_secs().ok()? as f64
                + stat.starttime as f64 / ticks,
            cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
            resident_memory_bytes: stat.rss * procfs::page_size(),
            virtual_memory_bytes: stat.vsize,
            open_fds: me.fd_count().ok()? as u64,
            max_fds,
        })
    }
}

/// What one limit (the default, a class or a service rule) passed and dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitCounts {
    /// The limit's name: `default`, a class's or a service rule's.
    pub name: String,
    /// A service rule (reported under a `service` label), not the default or a class
    /// (a `class` label).
    pub service: bool,
    /// Packets and bytes passed.
    pub passed: Counter,
    /// Packets and bytes dropped (in monitor mode, that would have been).
    pub dropped: Counter,
}

/// Where scrapes get their snapshot: the daemon provides it.
pub type SnapshotSource =
    Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, Snapshot> + Send + Sync>;

/// Sums two counters.
pub fn add(a: Counter, b: Counter) -> Counter {
    Counter {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels<'_>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels<'_>, i64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        let verdicts: Vec<Stat> = Stat::ALL
            .iter()
            .copied()
            .filter(|s| s.is_verdict())
            .collect();
        let action = |s: &Stat| if s.drops() { "drop" } else { "pass" };
        let mut packets = Vec::new();
        let mut bytes = Vec::new();
        for i in &self.interfaces {
            for s in &verdicts {
                let c = i.stats.get(*s as usize).copied().unwrap_or_default();
                let labels = vec![
                    ("interface", i.name.as_str()),
                    ("action", action(s)),
                    ("reason", s.label()),
                ];
                packets.push((labels.clone(), c.packets));
                bytes.push((labels, c.bytes));
            }
        }
        counter_family(
            e,
            "limiter_packets",
            "Frames seen by the XDP program, by verdict and reason.",
            &packets,
        )?;
        counter_family(
            e,
            "limiter_bytes",
            "Bytes of the frames seen by the XDP program, by verdict and reason.",
            &bytes,
        )?;
        let mut would_drop = Vec::new();
        for i in &self.interfaces {
            for s in verdicts.iter().filter(|s| s.drops()) {
                let c = i
                    .stats
                    .get(s.would_drop_index() as usize)
                    .copied()
                    .unwrap_or_default();
                would_drop.push((
                    vec![("interface", i.name.as_str()), ("reason", s.label())],
                    c.packets,
                ));
            }
        }
        counter_family(
            e,
            "limiter_monitor_would_drop_packets",
            "Frames passed in monitor mode that enforce mode would have dropped, by the reason it would have given.",
            &would_drop,
        )?;

        // Classes (and the default) and service rules are separate families, each with its
        // own label: a class is a set of clients, a service a port everyone reaches.
        for (family, label, service) in [
            ("limiter_class", "class", false),
            ("limiter_service", "service", true),
        ] {
            let mut packets = Vec::new();
            let mut bytes = Vec::new();
            for limit in self.limits.iter().filter(|l| l.service == service) {
                for (action, counter) in [("pass", limit.passed), ("drop", limit.dropped)] {
                    packets.push((
                        vec![(label, limit.name.as_str()), ("action", action)],
                        counter.packets,
                    ));
                    bytes.push((
                        vec![(label, limit.name.as_str()), ("action", action)],
                        counter.bytes,
                    ));
                }
            }
            let what = if service {
                "service rule (the limit of a destination port)"
            } else {
                "limit: the default or a class"
            };
            counter_family(
                e,
                &format!("{family}_packets"),
                &format!(
                    "Rate-checked packets per {what}; drop includes monitor-mode would-drops."
                ),
                &packets,
            )?;
            counter_family(
                e,
                &format!("{family}_bytes"),
                &format!("Rate-checked bytes per {what}."),
                &bytes,
            )?;
        }

        let event = |stat: Stat| {
            self.interfaces
                .iter()
                .map(|i| i.stats.get(stat as usize).map_or(0, |c| c.packets))
                .sum::<u64>()
        };
        counter_family(
            e,
            "limiter_new_sources_capped",
            "New sources charged to the shared bucket because the per-CPU insert cap was reached.",
            &[(vec![], event(Stat::NewSourceCapped))],
        )?;
        counter_family(
            e,
            "limiter_state_insert_failures",
            "New sources whose state could not be inserted.",
            &[(vec![], event(Stat::StateInsertFailed))],
        )?;
        counter_family(
            e,
            "limiter_sources_inserted",
            "New sources given state.",
            &[(vec![], event(Stat::SourceInserted))],
        )?;
        gauge_family(
            e,
            "limiter_challenge_engaged",
            "1 while SYNs from unproven sources to the protected ports are answered with a SYN-cookie challenge (attack mode).",
            &[(vec![], i64::from(self.challenge.0))],
        )?;
        counter_family(
            e,
            "limiter_challenge_transitions",
            "Times the SYN-cookie challenge engaged and disengaged (counted by the daemon process).",
            &[
                (vec![("to", "engaged")], self.challenge.1),
                (vec![("to", "disengaged")], self.challenge.2),
            ],
        )?;
        let attacks = |pick: fn(&(crate::attacks::AttackType, u64, u64)) -> u64| {
            self.attacks
                .iter()
                .map(|a| (vec![("type", a.0.label())], pick(a)))
                .collect::<Vec<_>>()
        };
        gauge_family(
            e,
            "limiter_attack_active",
            "Attacks under way, by type (`limiter attacks` lists them).",
            &attacks(|a| a.1)
                .into_iter()
                .map(|(l, v)| (l, v as i64))
                .collect::<Vec<_>>(),
        )?;
        counter_family(
            e,
            "limiter_attacks",
            "Attacks started, by type (counted by the daemon process).",
            &attacks(|a| a.2),
        )?;
        // One series per attack under way, so an alert carries the attack's id, type and
        // prefix as labels. The daemon passes at most MAX_ATTACK_SERIES, the fastest.
        let ids: Vec<String> = self
            .active_attacks
            .iter()
            .map(|a| a.id.to_string())
            .collect();
        let prefixes: Vec<String> = self
            .active_attacks
            .iter()
            .map(|a| a.prefix.map_or_else(|| "any".to_owned(), |p| p.to_string()))
            .collect();
        gauge_family(
            e,
            "limiter_attack_packets_per_second",
            "Frames dropped (or challenged) per second by each attack under way, labelled with its id, type and prefix (`any` when forged sources come from everywhere).",
            &self
                .active_attacks
                .iter()
                .zip(ids.iter().zip(&prefixes))
                .map(|(a, (id, prefix))| {
                    (
                        vec![
                            ("id", id.as_str()),
                            ("type", a.kind.label()),
                            ("prefix", prefix.as_str()),
                        ],
                        i64::try_from(a.current_packets_per_second).unwrap_or(i64::MAX),
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        counter_family(
            e,
            "limiter_challenge_failures",
            "ACKs to a challenged port of no established flow that carried no valid cookie.",
            &[(vec![], event(Stat::ChallengeFailed))],
        )?;
        counter_family(
            e,
            "limiter_ack_fallbacks",
            "Pure ACKs of an established flow charged to their source's packet budget (the flow's ACK budget spent, or a duplicate-ACK storm).",
            &[(vec![], event(Stat::AckFallback))],
        )?;
        counter_family(
            e,
            "limiter_penalty_box_entries",
            "Times a source entered the penalty box.",
            &[(vec![], event(Stat::PenaltyBoxEntered))],
        )?;
        counter_family(
            e,
            "limiter_source_events",
            "Source events the daemon read from the program (sampled: at most one per source per second), by kind.",
            &[
                (vec![("kind", "limited")], self.events_limited),
                (vec![("kind", "penalty_box")], self.events_penalty_box),
            ],
        )?;
        counter_family(
            e,
            "limiter_events_dropped",
            "Source events lost because the ring buffer was full.",
            &[(vec![], event(Stat::EventsDropped))],
        )?;

        gauge_family(
            e,
            "limiter_tracked_sources",
            "Sources with rate-limit state, by address family (refreshed every few seconds).",
            &[
                (vec![("family", "ipv4")], self.state.tracked_v4 as i64),
                (vec![("family", "ipv6")], self.state.tracked_v6 as i64),
            ],
        )?;
        gauge_family(
            e,
            "limiter_tracked_sources_capacity",
            "Capacity of the source tables.",
            &[(
                vec![],
                self.interfaces.iter().map(|i| i.capacity as i64).sum(),
            )],
        )?;
        fn fill_labels((iface, f): &(String, MapFill)) -> Labels<'_> {
            vec![("interface", iface.as_str()), ("map", f.map)]
        }
        gauge_family(
            e,
            "limiter_map_entries",
            "Entries in each bounded map (refreshed every few seconds).",
            &self
                .map_fills
                .iter()
                .map(|x| (fill_labels(x), x.1.entries as i64))
                .collect::<Vec<_>>(),
        )?;
        gauge_family(
            e,
            "limiter_map_capacity",
            "Capacity of each bounded map, as the kernel created it.",
            &self
                .map_fills
                .iter()
                .map(|x| (fill_labels(x), x.1.capacity as i64))
                .collect::<Vec<_>>(),
        )?;
        {
            let mut family = e.encode_descriptor(
                "limiter_map_fill_ratio",
                "Entries over capacity for each bounded map: LRU maps evict their oldest entries near 1, the policy tries refuse new prefixes at 1.",
                None,
                MetricType::Gauge,
            )?;
            for x in &self.map_fills {
                let ratio = x.1.entries as f64 / x.1.capacity.max(1) as f64;
                ConstGauge::new(ratio).encode(family.encode_family(&fill_labels(x))?)?;
            }
        }
        if let Some(fleet) = &self.fleet {
            gauge_family(
                e,
                "limiter_fleet_connected",
                "1 while the fleet store (etcd) answers; at 0 the last fleet policy stays in force.",
                &[(vec![], i64::from(fleet.connected))],
            )?;
            gauge_family(
                e,
                "limiter_fleet_applied_revision",
                "The etcd revision of the fleet denylist applied on this host.",
                &[(vec![], fleet.revision)],
            )?;
            counter_family(
                e,
                "limiter_fleet_resyncs",
                "Times the fleet watch fell behind a compaction and the host listed the store again.",
                &[(vec![], fleet.resyncs)],
            )?;
            gauge_family(
                e,
                "limiter_fleet_refused_entries",
                "Fleet entries this host refuses (wider than allowed, or a deny overlapping its allowlist or never_deny).",
                &[(vec![], fleet.refused as i64)],
            )?;
            gauge_family(
                e,
                "limiter_fleet_policy_version",
                "The version (etcd mod revision) of the fleet policy in force on this host; 0: none, the file's policy sections apply.",
                &[(vec![], fleet.policy_version)],
            )?;
            gauge_family(
                e,
                "limiter_fleet_policy_refused",
                "1 while this host refuses the fleet policy the store holds (the one it last took stays in force).",
                &[(vec![], i64::from(fleet.policy_refused))],
            )?;
            let outcomes: Vec<_> = crate::fleet::PUBLICATION_OUTCOMES
                .iter()
                .map(|outcome| {
                    let count = fleet
                        .publications
                        .iter()
                        .find(|(o, _)| o == outcome)
                        .map_or(0, |(_, n)| *n);
                    (vec![("outcome", *outcome)], count)
                })
                .collect();
            counter_family(
                e,
                "limiter_fleet_attack_publications",
                "Attack records judged for publication as temporary fleet denies ([fleet] publish_attacks), by outcome.",
                &outcomes,
            )?;
            let family = e.encode_descriptor(
                "limiter_fleet_convergence_seconds",
                "Time from a fleet entry's creation (the writer's clock) to its application on this host.",
                None,
                MetricType::Histogram,
            )?;
            fleet.convergence.encode(family)?;
        }
        gauge_family(
            e,
            "limiter_penalty_box_sources",
            "Sources in the penalty box.",
            &[(vec![], self.state.penalty_box as i64)],
        )?;
        gauge_family(
            e,
            "limiter_limited_sources",
            "Sources that went over a limit in the last 10 seconds.",
            &[(vec![], self.state.limited as i64)],
        )?;
        gauge_family(
            e,
            "limiter_list_prefixes",
            "Prefixes in the allowlist and the denylist.",
            &[
                (vec![("list", "allow")], self.allow as i64),
                (vec![("list", "deny")], self.deny as i64),
            ],
        )?;
        gauge_family(
            e,
            "limiter_program_attached",
            "1 while the program is attached to the interface and its maps are readable.",
            &self
                .interfaces
                .iter()
                .map(|i| {
                    (
                        vec![("interface", i.name.as_str()), ("mode", i.mode)],
                        i64::from(i.problem.is_none() && i.maps_readable),
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        gauge_family(
            e,
            "limiter_config_generation",
            "Generation of the policy in force.",
            &[(vec![], self.generation as i64)],
        )?;
        gauge_family(
            e,
            "limiter_config_reload_success",
            "1 if the last configuration reload succeeded.",
            &[(vec![], i64::from(self.reload_ok))],
        )?;
        gauge_family(
            e,
            "limiter_state_saved",
            "1 while the runtime state in force is saved in the state directory; 0 while saves fail (retried every second).",
            &[(vec![], i64::from(self.state_saved))],
        )?;
        counter_family(
            e,
            "limiter_state_save_failures",
            "Failed saves of the runtime state (the maps were updated regardless).",
            &[(vec![], self.save_failures)],
        )?;
        gauge_family(
            e,
            "limiter_config_last_reload_timestamp_seconds",
            "When the configuration was last loaded, in Unix seconds.",
            &[(vec![], self.last_reload as i64)],
        )?;
        gauge_family(
            e,
            "limiter_mode",
            "1 for the mode in force (enforce or monitor).",
            &[
                (
                    vec![("mode", "enforce")],
                    i64::from(self.mode == Mode::Enforce),
                ),
                (
                    vec![("mode", "monitor")],
                    i64::from(self.mode == Mode::Monitor),
                ),
            ],
        )?;
        gauge_family(
            e,
            "limiter_build_info",
            "Build and kernel versions (always 1).",
            &[(
                vec![
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("aya_version", AYA_VERSION),
                    ("kernel", self.kernel.as_str()),
                ],
                1,
            )],
        )?;
        if let Some(p) = self.process {
            encode_process(e, &p)?;
        }
        if self.interfaces.iter().any(|i| i.bpf.is_some()) {
            let mut family = e.encode_descriptor(
                "limiter_bpf_run_time_seconds",
                "Time the kernel spent running the program (needs kernel BPF statistics).",
                None,
                MetricType::Counter,
            )?;
            for i in &self.interfaces {
                if let Some((time, _)) = i.bpf {
                    ConstCounter::new(time.as_secs_f64())
                        .encode(family.encode_family(&vec![("interface", i.name.as_str())])?)?;
                }
            }
            let runs: Vec<_> = self
                .interfaces
                .iter()
                .filter_map(|i| {
                    i.bpf
                        .map(|(_, n)| (vec![("interface", i.name.as_str())], n))
                })
                .collect();
            counter_family(
                e,
                "limiter_bpf_run_count",
                "Runs of the program counted by the kernel.",
                &runs,
            )?;
        }
        Ok(())
    }
}

/// The standard process metrics (the names every Prometheus client library uses).
fn encode_process(e: &mut DescriptorEncoder, p: &ProcessStats) -> Result<(), std::fmt::Error> {
    let mut family = e.encode_descriptor(
        "process_cpu_seconds",
        "User and system CPU time spent, seconds.",
        None,
        MetricType::Counter,
    )?;
    ConstCounter::new(p.cpu_seconds).encode(family.encode_family(&Labels::new())?)?;
    let float_gauges = [(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch, seconds.",
        p.start_time_seconds,
    )];
    for (name, help, value) in float_gauges {
        let mut family = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(value).encode(family.encode_family(&Labels::new())?)?;
    }
    let mut gauges = vec![
        (
            "process_resident_memory_bytes",
            "Resident memory size, bytes.",
            p.resident_memory_bytes,
        ),
        (
            "process_virtual_memory_bytes",
            "Virtual memory size, bytes.",
            p.virtual_memory_bytes,
        ),
        ("process_open_fds", "Open file descriptors.", p.open_fds),
    ];
    if let Some(max) = p.max_fds {
        gauges.push((
            "process_max_fds",
            "The limit on open file descriptors.",
            max,
        ));
    }
    for (name, help, value) in gauges {
        gauge_family(e, name, help, &[(Labels::new(), value as i64)])?;
    }
    Ok(())
}

/// The aya version the program was built against.
pub const AYA_VERSION: &str = "0.14.0";

/// Encodes a scrape in OpenMetrics text.
fn encode_openmetrics(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

/// The Prometheus text format (0.0.4) from the OpenMetrics text the library writes: counter
/// families take their `_total` name, and the OpenMetrics-only lines (`# UNIT`, `# EOF`) go.
pub fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| {
            l.strip_prefix("# TYPE ")
                .and_then(|r| r.strip_suffix(" counter"))
        })
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[derive(Clone)]
struct AppState {
    source: SnapshotSource,
    cache: StateCache,
}

async fn metrics(State(app): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let mut snap = (app.source)().await;
    snap.process = ProcessStats::of_this_process();
    {
        let cache = app
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        snap.state = cache
            .values()
            .fold(StateSummary::default(), |acc, w| StateSummary {
                tracked_v4: acc.tracked_v4 + w.summary.tracked_v4,
                tracked_v6: acc.tracked_v6 + w.summary.tracked_v6,
                penalty_box: acc.penalty_box + w.summary.penalty_box,
                limited: acc.limited + w.summary.limited,
            });
        snap.map_fills = cache
            .iter()
            .flat_map(|(iface, w)| w.fills.iter().map(|f| (iface.clone(), *f)))
            .collect();
    }
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let text = encode_openmetrics(snap);
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            openmetrics_to_prometheus_text(&text),
        )
    }
}

async fn healthz(State(app): State<AppState>) -> impl IntoResponse {
    let snap = (app.source)().await;
    if snap.interfaces.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not attached to any interface\n".to_owned(),
        );
    }
    for i in &snap.interfaces {
        if let Some(problem) = &i.problem {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{}: the program is not attached: {problem}\n", i.name),
            );
        }
        if !i.maps_readable {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{}: maps unreadable\n", i.name),
            );
        }
    }
    let names: Vec<&str> = snap.interfaces.iter().map(|i| i.name.as_str()).collect();
    (
        StatusCode::OK,
        format!("ok: attached to {}\n", names.join(", ")),
    )
}

/// Serves the endpoint and refreshes the state cache until the task is dropped.
pub async fn serve(
    listen: SocketAddr,
    source: SnapshotSource,
    pin_dirs: Vec<(String, PathBuf)>,
) -> std::io::Result<()> {
    let cache: StateCache = Arc::default();
    {
        let cache = cache.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(STATE_REFRESH);
            loop {
                tick.tick().await;
                let dirs = pin_dirs.clone();
                let found = tokio::task::spawn_blocking(move || {
                    dirs.into_iter()
                        .filter_map(|(iface, dir)| InterfaceWalk::of(&dir).map(|w| (iface, w)))
                        .collect::<BTreeMap<_, _>>()
                })
                .await
                .unwrap_or_default();
                *cache
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = found;
            }
        });
    }
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(AppState { source, cache });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    info!(%listen, "metrics endpoint listening");
    if !listen.ip().is_loopback() {
        warn!(%listen, "the metrics endpoint is reachable from the network");
    }
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_renames_counters_and_drops_openmetrics_lines() {
        let om = "# HELP limiter_packets Frames.\n# TYPE limiter_packets counter\nlimiter_packets_total{a=\"b\"} 1\n# HELP limiter_mode Mode.\n# TYPE limiter_mode gauge\nlimiter_mode 1\n# EOF\n";
        let text = openmetrics_to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP limiter_packets_total Frames.\n# TYPE limiter_packets_total counter\nlimiter_packets_total{a=\"b\"} 1\n# HELP limiter_mode Mode.\n# TYPE limiter_mode gauge\nlimiter_mode 1\n"
        );
    }

    #[test]
    fn process_metrics_are_this_process() {
        let p = ProcessStats::of_this_process().expect("/proc/self");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            (now - 3_600.0..=now + 5.0).contains(&p.start_time_seconds),
            "started within the hour: {p:?}"
        );
        assert!(
            p.resident_memory_bytes > 1 << 20 && p.open_fds >= 3,
            "{p:?}"
        );
        let text = openmetrics_to_prometheus_text(&encode_openmetrics(Snapshot {
            process: Some(p),
            ..Snapshot::default()
        }));
        for name in [
            "process_cpu_seconds_total",
            "process_start_time_seconds",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(
                text.lines().any(|l| l
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with([' ', '{']))),
                "{name}: {text}"
            );
        }
    }

    #[test]
    fn services_are_labelled_service_and_classes_class() {
        let counts = |name: &str, service: bool, dropped: u64| LimitCounts {
            name: name.to_owned(),
            service,
            passed: Counter {
                packets: 10,
                bytes: 640,
            },
            dropped: Counter {
                packets: dropped,
                bytes: dropped * 64,
            },
        };
        let text = openmetrics_to_prometheus_text(&encode_openmetrics(Snapshot {
            limits: vec![
                counts("default", false, 1),
                counts("mm", false, 2),
                counts("fix", true, 3),
            ],
            ..Snapshot::default()
        }));
        for line in [
            r#"limiter_class_packets_total{class="default",action="drop"} 1"#,
            r#"limiter_class_packets_total{class="mm",action="drop"} 2"#,
            r#"limiter_service_packets_total{service="fix",action="drop"} 3"#,
            r#"limiter_service_bytes_total{service="fix",action="pass"} 640"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line}:\n{text}");
        }
        assert!(!text.contains(r#"class="fix""#), "{text}");
    }
}
