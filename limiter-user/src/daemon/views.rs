//! What the daemon's reads show: status, limits, lists, walks of the source tables (on map
//! handles of their own, so they never hold the daemon), and the metrics snapshot.

use std::path::PathBuf;

use ipnet::IpNet;
use limiter_common::layout::{SourceKey, Stat};

use super::{Daemon, PIN_LAYOUT, now_unix};
use crate::{
    limiter::{monotonic_ns, open_pinned_sources},
    metrics::{self, InterfaceSnapshot, LimitCounts, Snapshot, StateSummary},
    protocol::{
        InterfaceStatus, LimitRow, ListRow, Response, SourceRates, SourceRow, Status, TopBy,
        limit_rows,
    },
    runtime::List,
};

impl Daemon {
    /// What a metrics scrape reports (the endpoint adds the source-table summary).
    pub(super) fn metrics_snapshot(&self, bpf_stats: bool) -> Snapshot {
        // By limit id; ids without a name (unused slots) are dropped after summing.
        let mut limits: Vec<LimitCounts> = self
            .compiled
            .limit_names
            .iter()
            .map(|name| LimitCounts {
                name: name.clone(),
                service: self.policy.services.iter().any(|s| &s.name == name),
                ..LimitCounts::default()
            })
            .collect();
        let mut interfaces = Vec::new();
        for (name, instance) in &self.instances {
            let limiter = &instance.limiter;
            if let Ok(per_limit) = limiter.limit_stats(limits.len()) {
                for (limit, (p, d)) in limits.iter_mut().zip(per_limit) {
                    limit.passed = metrics::add(limit.passed, p);
                    limit.dropped = metrics::add(limit.dropped, d);
                }
            }
            let stats = limiter.stats().ok();
            interfaces.push(InterfaceSnapshot {
                name: name.clone(),
                mode: instance.mode,
                problem: instance.problem(name),
                maps_readable: stats.is_some(),
                stats: stats.map(|s| s.0).unwrap_or_default(),
                capacity: u64::from(limiter.sources_capacity()),
                bpf: bpf_stats
                    .then(|| {
                        limiter
                            .program()
                            .info()
                            .ok()
                            .map(|i| (i.run_time(), i.run_count()))
                    })
                    .flatten(),
            });
        }
        limits.retain(|limit| !limit.name.is_empty());
        Snapshot {
            challenge: self.challenge_state(),
            attacks: self.attacks.detector.counts(),
            active_attacks: {
                let mut active = self.attacks.detector.active();
                active.sort_by_key(|a| std::cmp::Reverse(a.current_packets_per_second));
                active.truncate(metrics::MAX_ATTACK_SERIES);
                active
            },
            interfaces,
            limits,
            state: StateSummary::default(),
            map_fills: Vec::new(),
            generation: self.runtime.generation,
            reload_ok: self.last_reload_ok,
            state_saved: !self.unsaved,
            save_failures: self.save_failures,
            last_reload: self.last_reload_unix,
            mode: self.policy.mode,
            events_limited: self.events.limited,
            events_penalty_box: self.events.penalty_box,
            // The endpoint reads it at scrape time, outside the daemon's lock.
            process: None,
            fleet: self.file.fleet.as_ref().map(|_| metrics::FleetMetrics {
                connected: self.fleet.connected,
                revision: self.runtime.fleet.revision,
                resyncs: self.fleet.resyncs,
                refused: self.fleet_refused().len() as u64,
                policy_version: self.runtime.fleet.policy.as_ref().map_or(0, |p| p.version),
                policy_refused: self.fleet.policy_refused.is_some(),
                publications: self
                    .fleet
                    .publications
                    .iter()
                    .map(|(k, v)| (*k, *v))
                    .collect(),
                convergence: self.fleet.convergence.clone(),
            }),
            allow: self.policy.allow.len() as u64,
            deny: self.policy.deny.len() as u64,
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// The status report, without the source counts (which [`SourceWalk`] fills in).
    pub fn status(&self) -> Status {
        let interfaces = self
            .instances
            .iter()
            .map(|(name, instance)| {
                let stats = instance.limiter.stats().unwrap_or_default();
                let sum = |pred: &dyn Fn(&Stat) -> bool| {
                    Stat::ALL
                        .iter()
                        .filter(|s| s.is_verdict() && pred(s))
                        .map(|s| stats.packets(*s))
                        .sum()
                };
                let problem = instance.problem(name);
                InterfaceStatus {
                    name: name.clone(),
                    attached: problem.is_none(),
                    problem,
                    attach_mode: instance.mode.to_owned(),
                    program_id: instance.limiter.program_id(),
                    passed: sum(&|s| !s.drops() && *s != Stat::MonitorWouldDrop),
                    dropped: sum(&|s| s.drops()),
                    would_drop: stats.packets(Stat::MonitorWouldDrop),
                    sessions: self.policy.sessions && instance.limiter.sessions_attached(),
                    proven_sources: instance.proven,
                    reasons: Stat::ALL
                        .iter()
                        .filter(|s| s.is_verdict() && stats.packets(**s) > 0)
                        .map(|s| (s.label().to_owned(), stats.packets(*s)))
                        .collect(),
                    tracked_sources: 0,
                }
            })
            .collect();
        Status {
            mode: self.policy.mode,
            generation: self.runtime.generation,
            config_file: self
                .options
                .config
                .as_ref()
                .map(|p| p.display().to_string()),
            last_reload_ok: self.last_reload_ok,
            state_saved: !self.unsaved,
            challenge: match (self.challenge.engaged, self.policy.challenge.mode) {
                (true, _) => "engaged",
                (false, crate::policy::ChallengeMode::Off) => "off",
                (false, _) => "armed",
            }
            .to_owned(),
            interfaces,
            fleet: self.fleet_report().map(Box::new),
        }
    }

    /// What a walk of the source tables needs, taken while holding the daemon.
    pub(super) fn walk(&self, kind: WalkKind) -> SourceWalk {
        SourceWalk {
            tables: self
                .instances
                .keys()
                .map(|iface| {
                    (
                        iface.clone(),
                        self.file.pin_dir.join(PIN_LAYOUT).join(iface),
                    )
                })
                .collect(),
            limit_names: self.compiled.limit_names.clone(),
            allowlisted: self.allowlisted.clone(),
            kind,
        }
    }

    pub(super) fn limit_rows(&self) -> Vec<LimitRow> {
        let runtime = &self.runtime;
        limit_rows(&self.policy, |name| match name {
            "default" => runtime.default_limit.is_some(),
            name => runtime.classes.contains_key(name) || runtime.limits.contains_key(name),
        })
    }

    pub(super) fn class_rows(&self) -> Vec<LimitRow> {
        self.limit_rows()
            .into_iter()
            .filter(|r| r.kind == "class")
            .collect()
    }

    pub(super) fn list_rows(&self, list: List) -> Vec<ListRow> {
        let (file, added) = match list {
            List::Allow => (&self.file.policy.allow, &self.runtime.allow),
            List::Deny => (&self.file.policy.deny, &self.runtime.deny),
        };
        let effective = match list {
            List::Allow => &self.policy.allow,
            List::Deny => &self.policy.deny,
        };
        let now = now_unix();
        effective
            .iter()
            .map(|prefix| {
                let runtime = added.iter().find(|e| e.prefix == prefix.trunc());
                ListRow {
                    prefix: *prefix,
                    origin: if runtime.is_some() || !file.contains(prefix) {
                        "runtime"
                    } else {
                        "config"
                    }
                    .into(),
                    expires_in_seconds: runtime
                        .and_then(|e| e.expires_at)
                        .map(|t| t.saturating_sub(now)),
                }
            })
            .collect()
    }

    pub(super) fn limit_name(&self, limit_id: u16) -> String {
        limit_name(&self.compiled.limit_names, limit_id)
    }
}

/// The name of a limit id, for people.
fn limit_name(names: &[String], limit_id: u16) -> String {
    names
        .get(usize::from(limit_id))
        .cloned()
        .unwrap_or_else(|| limit_id.to_string())
}

/// The `limit` of an allowlisted source's row in `top` (and what `--limit` selects them by).
pub const ALLOWLIST_ROW_LIMIT: &str = "allowlist";

/// Which read a [`SourceWalk`] serves.
pub enum WalkKind {
    /// `status`: fills in each interface's tracked sources.
    Status(Status),
    /// `top`.
    Top {
        /// How many.
        n: usize,
        /// Ordered by.
        by: TopBy,
        /// Rates over this interval: the tables are walked at its start and its end.
        interval: Option<std::time::Duration>,
        /// Only sources within this prefix.
        within: Option<IpNet>,
        /// Only sources of this limit.
        limit: Option<String>,
    },
    /// `block list`: sources in the penalty box.
    Blocked,
}

/// A read of the pinned source tables, on handles of its own.
pub struct SourceWalk {
    tables: Vec<(String, PathBuf)>,
    limit_names: Vec<String>,
    allowlisted: std::sync::Arc<std::sync::Mutex<crate::allowlisted::AllowlistedTally>>,
    kind: WalkKind,
}

impl SourceWalk {
    /// Walks the tables (blocking: run it on a blocking thread) and answers.
    pub fn run(self) -> Response {
        match self.kind {
            WalkKind::Status(mut status) => {
                for (iface, dir) in &self.tables {
                    let count = open_pinned_sources(dir).map_or(0, |m| m.keys().count());
                    if let Some(row) = status.interfaces.iter_mut().find(|i| &i.name == iface) {
                        row.tracked_sources = count as u64;
                    }
                }
                Response::ok(status)
            }
            WalkKind::Top {
                n,
                by,
                interval,
                ref within,
                ref limit,
            } => {
                let keep = |row: &SourceRow| {
                    within.is_none_or(|w| w.contains(&row.prefix))
                        && limit.as_ref().is_none_or(|l| &row.limit == l)
                };
                let mut rows: Vec<SourceRow> = self.rows(false).into_iter().filter(keep).collect();
                rows.extend(self.allowlisted_rows().into_iter().filter(keep));
                if let Some(interval) = interval {
                    let started = std::time::Instant::now();
                    std::thread::sleep(interval);
                    let before: std::collections::HashMap<(String, IpNet, String, u8), SourceRow> =
                        rows.drain(..).map(|r| (row_key(&r), r)).collect();
                    let seconds = started.elapsed().as_secs_f64();
                    rows = self.rows(false).into_iter().filter(keep).collect();
                    rows.extend(self.allowlisted_rows().into_iter().filter(keep));
                    for row in &mut rows {
                        // A source new in the interval counts from zero; counters wrap at 2^32.
                        let (passed, dropped, bytes) = before
                            .get(&row_key(row))
                            .map_or((0, 0, 0), |b| (b.passed, b.dropped, b.bytes));
                        let delta =
                            |now: u64, then: u64| (now.wrapping_sub(then) & 0xffff_ffff) as f64;
                        row.rates = Some(SourceRates {
                            passed_per_second: delta(row.passed, passed) / seconds,
                            dropped_per_second: delta(row.dropped, dropped) / seconds,
                            bytes_per_second: row.bytes.saturating_sub(bytes) as f64 / seconds,
                        });
                    }
                }
                Response::ok(rank(rows, n, by))
            }
            WalkKind::Blocked => Response::ok(rank(self.rows(true), usize::MAX, TopBy::Drops)),
        }
    }

    /// Allowlisted sources, as estimated from samples so far.
    fn allowlisted_rows(&self) -> Vec<SourceRow> {
        let tally = match self.allowlisted.lock() {
            Ok(tally) => tally.snapshot(),
            Err(_) => return Vec::new(),
        };
        tally
            .into_iter()
            .map(|((interface, prefix), frames)| SourceRow {
                interface,
                prefix,
                limit: ALLOWLIST_ROW_LIMIT.to_owned(),
                budget: limiter_common::layout::Budget::Other,
                passed: frames,
                dropped: 0,
                bytes: 0,
                blocked_for_seconds: 0,
                rates: None,
                allowlisted: true,
            })
            .collect()
    }

    /// Every tracked source; `blocked_only` keeps those in the penalty box.
    fn rows(&self, blocked_only: bool) -> Vec<SourceRow> {
        let now = monotonic_ns();
        let mut rows: Vec<SourceRow> = Vec::new();
        for (iface, dir) in &self.tables {
            let Ok(map) = open_pinned_sources(dir) else {
                continue;
            };
            // Entries evicted while we walk just end the walk early for that key; skip them.
            for (key, state) in map.iter().filter_map(Result::ok) {
                if blocked_only && state.blocked_until_ns <= now {
                    continue;
                }
                rows.push(SourceRow {
                    interface: iface.clone(),
                    prefix: key_prefix(&key),
                    limit: limit_name(&self.limit_names, key.limit_id),
                    budget: key.budget().unwrap_or_default(),
                    passed: u64::from(state.passed),
                    dropped: u64::from(state.dropped),
                    bytes: state.bytes,
                    blocked_for_seconds: state
                        .blocked_until_ns
                        .saturating_sub(now)
                        .div_ceil(1_000_000_000),
                    rates: None,
                    allowlisted: false,
                });
            }
        }
        rows
    }
}

/// Identifies a row across two walks.
fn row_key(row: &SourceRow) -> (String, IpNet, String, u8) {
    (
        row.interface.clone(),
        row.prefix,
        row.limit.clone(),
        row.budget as u8,
    )
}

/// The worst `n`: by rate when rates were measured, by totals otherwise.
fn rank(mut rows: Vec<SourceRow>, n: usize, by: TopBy) -> Vec<SourceRow> {
    let score = |r: &SourceRow| -> (f64, f64) {
        match r.rates {
            Some(x) => match by {
                TopBy::Drops => (x.dropped_per_second, x.passed_per_second),
                TopBy::Passes => (x.passed_per_second, x.dropped_per_second),
                TopBy::Packets => (
                    x.passed_per_second + x.dropped_per_second,
                    x.dropped_per_second,
                ),
                TopBy::Bytes => (x.bytes_per_second, x.dropped_per_second),
            },
            None => {
                let (p, d, b) = (r.passed as f64, r.dropped as f64, r.bytes as f64);
                match by {
                    TopBy::Drops => (d, p),
                    TopBy::Passes => (p, d),
                    TopBy::Packets => (p + d, d),
                    TopBy::Bytes => (b, d),
                }
            }
        }
    };
    rows.sort_by(|a, b| {
        let (a, b) = (score(a), score(b));
        b.0.total_cmp(&a.0).then(b.1.total_cmp(&a.1))
    });
    rows.truncate(n);
    rows
}

/// The prefix a source key stands for.
pub fn key_prefix(key: &SourceKey) -> IpNet {
    IpNet::new(key.ip(), key.prefix_len).unwrap_or_else(|_| IpNet::from(key.ip()))
}
