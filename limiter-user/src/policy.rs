//! The policy an operator states (limits, classes, services, lists) and its compilation into
//! the records the XDP program reads. Compilation validates everything first, so a policy
//! that fails never reaches the maps.

use std::{collections::BTreeMap, net::IpAddr, ops::RangeInclusive};

use ipnet::IpNet;
use limiter_common::{
    layout::{Config, Limit, PolicyAction, PolicyEntry, ServiceProto, capacity, service_index},
    prefix::mask_words,
    rate::{Gcra, RateError},
};

/// Enforce (drop) or monitor (count what would be dropped, pass everything).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Drop what the policy says to drop.
    #[default]
    Enforce,
    /// Pass everything; count would-be drops.
    Monitor,
}

/// When SYNs from unproven sources to the protected ports are answered with a SYN-cookie
/// challenge.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ChallengeMode {
    /// Never.
    #[default]
    Off,
    /// While unproven SYNs stay above the engage rate (attack mode), with hysteresis.
    Auto,
    /// Always.
    On,
}

/// What the challenge does with an ACK that returns a valid cookie.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ProvenAck {
    /// Hand it to the kernel, which completes the connection from the cookie
    /// (`tcp_syncookies = 2` while engaged): the first connection succeeds, without window
    /// scaling or SACK unless the client sent timestamps.
    #[default]
    Pass,
    /// Answer it with a RST: the first connection fails, and the client's retry, from a
    /// proven source now, reaches the kernel with every TCP option.
    Reset,
}

/// The SYN-cookie challenge's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChallengeSpec {
    /// Off, auto or on.
    pub mode: ChallengeMode,
    /// What a proving ACK gets.
    pub proven_ack: ProvenAck,
    /// The TCP ports it protects.
    pub ports: Vec<std::ops::RangeInclusive<u16>>,
    /// Unproven SYNs per second (both families, all interfaces) that engage `auto`.
    pub engage_syns_per_second: u64,
    /// How long they must stay above it.
    pub engage_seconds: u64,
    /// How long below it before `auto` disengages.
    pub calm_seconds: u64,
    /// SYN-ACKs per second (and burst) to one aggregate prefix.
    pub replies_per_prefix: Rate,
}

impl Default for ChallengeSpec {
    fn default() -> Self {
        Self {
            mode: ChallengeMode::Off,
            proven_ack: ProvenAck::Pass,
            ports: Vec::new(),
            // Half the unproven bucket: well into an attack, before new clients lose often.
            engage_syns_per_second: DEFAULT_UNPROVEN.per_second / 2,
            engage_seconds: 3,
            calm_seconds: 30,
            replies_per_prefix: Rate::new(100, 200),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Monitor => "monitor",
        })
    }
}

/// A rate with its burst, in units per second. It deserializes only from an object with
/// exactly these two fields (`{"per_second": 10, "burst": 20}`), checked like every other way
/// a rate comes in ([`crate::input::check_rate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "std::collections::BTreeMap<String, u64>")]
pub struct Rate {
    /// Units per second.
    pub per_second: u64,
    /// Units admitted at once from idle.
    pub burst: u64,
}

impl Rate {
    /// `per_second` with a burst of `burst`, unchecked (for constants and tests).
    pub const fn new(per_second: u64, burst: u64) -> Self {
        Self { per_second, burst }
    }

    /// `per_second` with a burst of `burst`, refused unless it makes a bucket.
    pub fn checked(per_second: u64, burst: u64) -> Result<Self, crate::input::InputError> {
        crate::input::check_rate(per_second, burst).map_err(|e| {
            crate::input::InputError(format!("{per_second}/s with a burst of {burst}: {e}"))
        })?;
        Ok(Self { per_second, burst })
    }
}

impl TryFrom<BTreeMap<String, u64>> for Rate {
    type Error = crate::input::InputError;

    fn try_from(mut fields: BTreeMap<String, u64>) -> Result<Self, Self::Error> {
        let per_second = fields.remove("per_second");
        let burst = fields.remove("burst");
        if let Some(unknown) = fields.keys().next() {
            return Err(crate::input::InputError(format!(
                "unknown field {unknown:?} in a rate: expected per_second and burst"
            )));
        }
        match (per_second, burst) {
            (Some(per_second), Some(burst)) => Self::checked(per_second, burst),
            _ => Err(crate::input::InputError(
                "a rate needs both per_second and burst".into(),
            )),
        }
    }
}

/// What one limit allows. `None` everywhere is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// Packets per source.
    pub packets: Option<Rate>,
    /// Bytes per source.
    pub bytes: Option<Rate>,
    /// Packets per aggregate prefix (the wider prefix around the source).
    pub aggregate: Option<Rate>,
    /// New TCP connections per source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<Rate>,
    /// Pure ACKs per established flow before they spend the source's packet budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acks: Option<Rate>,
    /// Penalty box for sustained excess, in seconds (0 = off); `None`: the file's
    /// top-level `block_seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_seconds: Option<u64>,
}

/// The ACK budget of an established flow when a limit does not state one: above the
/// segments per second the busiest market-data feed sends one client (20,000 messages/s,
/// one segment each, each acknowledged at most once) with 2.5 times headroom, so a
/// subscriber's ACKs never reach its packet budget, while an ACK flood inside one real
/// connection still ends there.
pub const DEFAULT_FLOW_ACKS: Rate = Rate::new(50_000, 5_000);

/// The connection rate of the default limit: a browser opens six connections at once and a
/// trading client reconnects after a drop; twenty new connections a second, fifty at once,
/// is far above either and far below a connection flood.
pub const DEFAULT_CONNECTIONS: Rate = Rate::new(20, 50);

impl LimitSpec {
    /// A packet limit with no byte, aggregate or connection limit, and the default ACK
    /// budget.
    pub const fn packets(per_second: u64, burst: u64) -> Self {
        Self {
            packets: Some(Rate::new(per_second, burst)),
            bytes: None,
            aggregate: None,
            connections: None,
            acks: Some(DEFAULT_FLOW_ACKS),
            block_seconds: None,
        }
    }

    /// No limit at all.
    pub const fn unlimited() -> Self {
        Self {
            packets: None,
            bytes: None,
            aggregate: None,
            connections: None,
            acks: None,
            block_seconds: None,
        }
    }
}

/// Sources, by prefix, that get their own limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Class {
    /// The operator's name for the class (metrics label).
    pub name: String,
    /// Its prefixes; classes must not overlap.
    pub prefixes: Vec<IpNet>,
    /// Its limit.
    pub limit: LimitSpec,
}

/// Traffic, by transport and destination port, that gets its own limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// The operator's name for the rule (metrics label).
    pub name: String,
    /// TCP or UDP.
    pub proto: ServiceProto,
    /// Destination ports.
    pub ports: RangeInclusive<u16>,
    /// Its limit.
    pub limit: LimitSpec,
}

/// Everything the data plane enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Enforce or monitor.
    pub mode: Mode,
    /// The limit of every source not in a class or service rule.
    pub default_limit: LimitSpec,
    /// Classes by source prefix (checked before services).
    pub classes: Vec<Class>,
    /// Service rules by destination port.
    pub services: Vec<Service>,
    /// Prefixes passed without limits.
    pub allow: Vec<IpNet>,
    /// Prefixes dropped.
    pub deny: Vec<IpNet>,
    /// Prefix length IPv4 sources are tracked at.
    pub source_prefix_v4: u8,
    /// Prefix length IPv6 sources are tracked at.
    pub source_prefix_v6: u8,
    /// Prefix length of IPv4 aggregates.
    pub aggregate_prefix_v4: u8,
    /// Prefix length of IPv6 aggregates.
    pub aggregate_prefix_v6: u8,
    /// Penalty box duration of limits that do not state their own; 0 = off.
    pub block_seconds: u64,
    /// New sources admitted into state per second per CPU; `None` = uncapped.
    pub new_sources_per_cpu: Option<Rate>,
    /// The bucket (per family) shared by sources past the cap.
    pub shared: Rate,
    /// Whether TCP is judged by session (proven sources, established flows).
    pub sessions: bool,
    /// The bucket (per family) of SYNs from sources neither proven nor tracked.
    pub unproven: Rate,
    /// The bucket (per family) of TCP packets of no established flow.
    pub out_of_state: Rate,
    /// How long a source stays proven after its last completed handshake.
    pub proven_seconds: u64,
    /// The SYN-cookie challenge.
    pub challenge: ChallengeSpec,
    /// Prefixes no fleet deny may touch (`[fleet] never_deny`): the anti-lockout list, for
    /// the networks an exchange must always reach (its own offices, its monitoring).
    pub fleet_never_deny: Vec<IpNet>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: Mode::Enforce,
            default_limit: LimitSpec {
                packets: Some(Rate::new(1_000, 2_000)),
                bytes: None,
                aggregate: Some(Rate::new(20_000, 40_000)),
                connections: Some(DEFAULT_CONNECTIONS),
                acks: Some(DEFAULT_FLOW_ACKS),
                block_seconds: None,
            },
            classes: Vec::new(),
            services: Vec::new(),
            allow: Vec::new(),
            deny: Vec::new(),
            source_prefix_v4: 32,
            source_prefix_v6: 64,
            aggregate_prefix_v4: 24,
            aggregate_prefix_v6: 48,
            block_seconds: 0,
            new_sources_per_cpu: Some(Rate::new(5_000, 5_000)),
            shared: Rate::new(2_000, 2_000),
            sessions: true,
            unproven: DEFAULT_UNPROVEN,
            out_of_state: DEFAULT_OUT_OF_STATE,
            proven_seconds: DEFAULT_PROVEN_SECONDS,
            challenge: ChallengeSpec::default(),
            fleet_never_deny: Vec::new(),
        }
    }
}

/// How long a source stays proven after its last handshake: a week, so a client that trades
/// every weekday keeps its proof across a weekend; an address that has gone elsewhere (a
/// mobile client, a reassigned cloud address) loses it within days.
pub const DEFAULT_PROVEN_SECONDS: u64 = 7 * 86_400;

/// SYNs per second (per family) from sources that never completed a handshake: an
/// exchange's busiest minute, the open, brings a few hundred new clients a second; this is
/// ten times that, and a rate the kernel's SYN handling takes without effort.
pub const DEFAULT_UNPROVEN: Rate = Rate::new(5_000, 5_000);

/// TCP packets per second (per family) of no established flow: the handshake-completing
/// ACKs of new clients, retransmitted FINs and RSTs after a close. Twice the unproven rate,
/// since each new connection sends one or two of them.
pub const DEFAULT_OUT_OF_STATE: Rate = Rate::new(10_000, 10_000);

/// Why a policy cannot be compiled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// A rate that cannot be a bucket.
    #[error("{what}: {source}")]
    Rate {
        /// Which limit.
        what: String,
        /// Why.
        source: RateError,
    },
    /// A penalty box longer than allowed.
    #[error("{what}: {message}")]
    Block {
        /// Which limit.
        what: String,
        /// Why.
        message: String,
    },
    /// A prefix length out of range for its family.
    #[error("{what}: prefix length {len} is out of range (IPv4 1..=32, IPv6 1..=128)")]
    PrefixLength {
        /// Which setting.
        what: &'static str,
        /// The length given.
        len: u8,
    },
    /// The aggregate prefix is longer than the source prefix.
    #[error(
        "the {family} aggregate prefix /{aggregate} must not be longer than the source prefix /{tracked}"
    )]
    AggregateNarrowerThanSource {
        /// IPv4 or IPv6.
        family: &'static str,
        /// Aggregate length.
        aggregate: u8,
        /// Source length.
        tracked: u8,
    },
    /// Two classes cover the same addresses.
    #[error(
        "class {first:?} prefix {first_prefix} overlaps class {second:?} prefix {second_prefix}"
    )]
    OverlappingClasses {
        /// One class.
        first: String,
        /// Its prefix.
        first_prefix: IpNet,
        /// The other class.
        second: String,
        /// Its prefix.
        second_prefix: IpNet,
    },
    /// Two service rules cover the same port.
    #[error("service {first:?} and service {second:?} both cover {proto:?} port {port}")]
    OverlappingServices {
        /// One rule.
        first: String,
        /// The other.
        second: String,
        /// The transport.
        proto: ServiceProto,
        /// The first shared port.
        port: u16,
    },
    /// A service rule with an empty port range.
    #[error("service {0:?} has an empty port range")]
    EmptyPortRange(String),
    /// Two classes or rules share a name.
    #[error("the name {0:?} is used twice")]
    DuplicateName(String),
    /// The limit ids given do not cover every class and service once.
    #[error("internal: limit ids were not assigned to every class and service")]
    UnassignedLimitIds,
    /// More limits than the program's table holds.
    #[error("{count} classes and service rules: at most {max} fit", max = capacity::LIMITS - 1)]
    TooManyLimits {
        /// How many were given.
        count: usize,
    },
    /// More prefixes than a policy trie holds.
    #[error("{count} {family} prefixes in allow, deny and classes: at most {max} fit", max = capacity::POLICY_PREFIXES)]
    TooManyPrefixes {
        /// IPv4 or IPv6.
        family: &'static str,
        /// How many were given.
        count: usize,
    },
}

/// Which limit id (slot in `LIMITS`, and in the per-limit counters) each class and service
/// rule has. An id is kept for the name's whole life: adding or removing other classes never
/// moves it, so its sources' buckets and its counter series carry on. The daemon keeps the
/// assignment in the runtime state, so it survives reloads and restarts. Id 0 is the default.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitIds {
    /// The id of each name.
    pub ids: BTreeMap<String, u16>,
    /// Where the search for a free id starts: ids freed by a removed name are taken last, so
    /// a new class does not inherit the sources' state of one just removed.
    pub next: u16,
}

impl LimitIds {
    /// Gives every name of `policy` an id, keeping the ids of names it already knows and
    /// forgetting names the policy no longer has.
    pub fn assign(&mut self, policy: &Policy) -> Result<(), PolicyError> {
        let names: Vec<&String> = policy
            .classes
            .iter()
            .map(|c| &c.name)
            .chain(policy.services.iter().map(|s| &s.name))
            .collect();
        let count = names.len();
        if count >= capacity::LIMITS as usize {
            return Err(PolicyError::TooManyLimits { count });
        }
        self.ids.retain(|name, _| names.contains(&name));
        let max = (capacity::LIMITS - 1) as u16;
        for name in names {
            if self.ids.contains_key(name.as_str()) {
                continue;
            }
            let used: std::collections::BTreeSet<u16> = self.ids.values().copied().collect();
            let start = self.next.clamp(1, max);
            let id = (start..=max)
                .chain(1..start)
                .find(|id| !used.contains(id))
                .ok_or(PolicyError::TooManyLimits { count })?;
            self.ids.insert(name.clone(), id);
            self.next = if id == max { 1 } else { id + 1 };
        }
        Ok(())
    }

    fn id(&self, name: &str) -> u16 {
        self.ids.get(name).copied().unwrap_or(0)
    }
}

/// A policy turned into map contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// The `CONFIG` record.
    pub config: Config,
    /// `LIMITS`, by limit id, from 0 (the default); unused ids hold the zero record.
    pub limits: Vec<Limit>,
    /// Names of the limits, id for id ("default", then classes and services by their
    /// [`LimitIds`]); an unused id has an empty name.
    pub limit_names: Vec<String>,
    /// IPv4 trie entries: (network bytes, prefix length, entry).
    pub v4: Vec<([u8; 4], u8, PolicyEntry)>,
    /// IPv6 trie entries.
    pub v6: Vec<([u8; 16], u8, PolicyEntry)>,
    /// Service table entries: (index, limit id).
    pub service_ports: Vec<(u32, u32)>,
}

impl CompiledPolicy {
    /// `LIMITS` by id, without the all-zero (unlimited) records the map holds anyway.
    pub fn limit_slots(&self) -> BTreeMap<u32, Limit> {
        self.limits
            .iter()
            .enumerate()
            .filter(|(_, limit)| **limit != Limit::default())
            .map(|(id, limit)| (id as u32, *limit))
            .collect()
    }

    /// The name owning each limit id in use.
    pub fn limit_name_slots(&self) -> BTreeMap<u32, String> {
        self.limit_names
            .iter()
            .enumerate()
            .filter(|(_, name)| !name.is_empty())
            .map(|(id, name)| (id as u32, name.clone()))
            .collect()
    }
}

fn gcra(what: impl FnOnce() -> String, rate: Option<Rate>) -> Result<Gcra, PolicyError> {
    match rate {
        None => Ok(Gcra::UNLIMITED),
        Some(r) => Gcra::per_second(r.per_second, r.burst).map_err(|source| PolicyError::Rate {
            what: what(),
            source,
        }),
    }
}

fn compile_limit(name: &str, spec: &LimitSpec, block_seconds: u64) -> Result<Limit, PolicyError> {
    Ok(Limit {
        packets: gcra(|| format!("{name}: packet rate"), spec.packets)?,
        bytes: gcra(|| format!("{name}: byte rate"), spec.bytes)?,
        aggregate: gcra(|| format!("{name}: aggregate rate"), spec.aggregate)?,
        connections: gcra(|| format!("{name}: connection rate"), spec.connections)?,
        acks: gcra(|| format!("{name}: ACK rate"), spec.acks)?,
        block_ns: crate::input::check_block_seconds(spec.block_seconds.unwrap_or(block_seconds))
            .map_err(|e| PolicyError::Block {
                what: name.to_owned(),
                message: e.0,
            })?
            .saturating_mul(1_000_000_000),
        // Set for the host's CPUs when the policy is written (`plan::MapContents::new`).
        lease: 0,
        aggregate_lease: 0,
    })
}

fn check_prefix(what: &'static str, len: u8, max: u8) -> Result<u8, PolicyError> {
    if len == 0 || len > max {
        return Err(PolicyError::PrefixLength { what, len });
    }
    Ok(len)
}

/// One prefix from a list or class, before overlaps are resolved.
struct Listed {
    net: IpNet,
    action: PolicyAction,
    limit_id: u16,
    class: Option<usize>,
}

impl Policy {
    /// Validates the policy and computes the map contents, with limit ids by position
    /// (classes, then services): for validation, and where nothing was assigned before.
    pub fn compile(&self) -> Result<CompiledPolicy, PolicyError> {
        let mut ids = LimitIds::default();
        ids.assign(self)?;
        self.compile_with(&ids)
    }

    /// Validates the policy and computes the map contents, each class and service at the
    /// limit id `ids` gives it (see [`LimitIds::assign`]).
    pub fn compile_with(&self, ids: &LimitIds) -> Result<CompiledPolicy, PolicyError> {
        let v4 = check_prefix("source_prefix_v4", self.source_prefix_v4, 32)?;
        let v6 = check_prefix("source_prefix_v6", self.source_prefix_v6, 128)?;
        let agg4 = check_prefix("aggregate_prefix_v4", self.aggregate_prefix_v4, 32)?;
        let agg6 = check_prefix("aggregate_prefix_v6", self.aggregate_prefix_v6, 128)?;
        for (family, aggregate, tracked) in [("IPv4", agg4, v4), ("IPv6", agg6, v6)] {
            if aggregate > tracked {
                return Err(PolicyError::AggregateNarrowerThanSource {
                    family,
                    aggregate,
                    tracked,
                });
            }
        }

        let count = self.classes.len() + self.services.len();
        if count >= capacity::LIMITS as usize {
            return Err(PolicyError::TooManyLimits { count });
        }
        let mut names: Vec<&String> = Vec::new();
        for name in self
            .classes
            .iter()
            .map(|c| &c.name)
            .chain(self.services.iter().map(|s| &s.name))
        {
            if name == "default" || names.contains(&name) {
                return Err(PolicyError::DuplicateName(name.clone()));
            }
            names.push(name);
        }
        let slots = 1 + names
            .iter()
            .map(|n| usize::from(ids.id(n)))
            .max()
            .unwrap_or(0);
        let mut limits = vec![Limit::default(); slots];
        let mut limit_names = vec![String::new(); slots];
        limits[0] = compile_limit("default limit", &self.default_limit, self.block_seconds)?;
        limit_names[0] = "default".to_owned();
        for class in &self.classes {
            let id = usize::from(ids.id(&class.name));
            limits[id] = compile_limit(
                &format!("class {:?}", class.name),
                &class.limit,
                self.block_seconds,
            )?;
            limit_names[id] = class.name.clone();
        }
        for service in &self.services {
            let id = usize::from(ids.id(&service.name));
            limits[id] = compile_limit(
                &format!("service {:?}", service.name),
                &service.limit,
                self.block_seconds,
            )?;
            limit_names[id] = service.name.clone();
        }
        if limit_names.iter().filter(|n| !n.is_empty()).count() != 1 + names.len() {
            return Err(PolicyError::UnassignedLimitIds);
        }

        let service_ports = self.compile_services(ids)?;
        let (v4_entries, v6_entries) = self.compile_prefixes(ids)?;

        let mut flags = 0;
        if self.mode == Mode::Monitor {
            flags |= Config::FLAG_MONITOR;
        }
        if !v4_entries.is_empty() {
            flags |= Config::FLAG_POLICY_V4;
        }
        if !v6_entries.is_empty() {
            flags |= Config::FLAG_POLICY_V6;
        }
        if !service_ports.is_empty() {
            flags |= Config::FLAG_SERVICES;
        }
        if limits.iter().any(|l| l.aggregate.is_limited()) {
            flags |= Config::FLAG_AGGREGATES;
        }
        if self.sessions {
            flags |= Config::FLAG_SESSIONS;
        }
        if self.challenge.proven_ack == ProvenAck::Reset {
            flags |= Config::FLAG_CHALLENGE_RESET;
        }
        let config = Config {
            flags,
            source_prefix_v4: v4,
            source_prefix_v6: v6,
            ifindex: 0,
            attach_mode: 0,
            aggregate_prefix_v4: agg4,
            aggregate_prefix_v6: agg6,
            source_mask_v4: mask_words(v4),
            source_mask_v6: mask_words(v6),
            aggregate_mask_v4: mask_words(agg4),
            aggregate_mask_v6: mask_words(agg6),
            netns_cookie: 0,
            new_sources: gcra(
                || "new sources per CPU".to_owned(),
                self.new_sources_per_cpu,
            )?,
            shared: gcra(|| "shared bucket".to_owned(), Some(self.shared))?,
            unproven: gcra(|| "unproven bucket".to_owned(), Some(self.unproven))?,
            out_of_state: gcra(|| "out-of-state bucket".to_owned(), Some(self.out_of_state))?,
            challenge_replies: gcra(
                || "challenge replies per prefix".to_owned(),
                Some(self.challenge.replies_per_prefix),
            )?,
        };
        Ok(CompiledPolicy {
            config,
            limits,
            limit_names,
            v4: v4_entries,
            v6: v6_entries,
            service_ports,
        })
    }

    fn compile_services(&self, ids: &LimitIds) -> Result<Vec<(u32, u32)>, PolicyError> {
        let mut owner: BTreeMap<u32, usize> = BTreeMap::new();
        for (i, service) in self.services.iter().enumerate() {
            if service.ports.is_empty() {
                return Err(PolicyError::EmptyPortRange(service.name.clone()));
            }
            for port in service.ports.clone() {
                let index = service_index(service.proto, port);
                if let Some(&other) = owner.get(&index) {
                    return Err(PolicyError::OverlappingServices {
                        first: self.services[other].name.clone(),
                        second: service.name.clone(),
                        proto: service.proto,
                        port,
                    });
                }
                owner.insert(index, i);
            }
        }
        Ok(owner
            .into_iter()
            .map(|(index, i)| (index, u32::from(ids.id(&self.services[i].name))))
            .collect())
    }

    /// Builds the trie contents. One trie answers deny, allow or class with a single longest
    /// match, so each prefix carries the strongest action of every prefix that contains it
    /// (deny over allow over class): a /32 allow inside a denied /16 stays denied, as the
    /// order "denylist, then allowlist" requires.
    #[expect(
        clippy::type_complexity,
        reason = "two plain vectors of trie entries, named where they are returned"
    )]
    fn compile_prefixes(
        &self,
        ids: &LimitIds,
    ) -> Result<
        (
            Vec<([u8; 4], u8, PolicyEntry)>,
            Vec<([u8; 16], u8, PolicyEntry)>,
        ),
        PolicyError,
    > {
        let mut listed = Vec::new();
        for net in &self.deny {
            listed.push(Listed {
                net: net.trunc(),
                action: PolicyAction::Deny,
                limit_id: 0,
                class: None,
            });
        }
        for net in &self.allow {
            listed.push(Listed {
                net: net.trunc(),
                action: PolicyAction::Allow,
                limit_id: 0,
                class: None,
            });
        }
        for (i, class) in self.classes.iter().enumerate() {
            for net in &class.prefixes {
                listed.push(Listed {
                    net: net.trunc(),
                    action: PolicyAction::Class,
                    limit_id: ids.id(&class.name),
                    class: Some(i),
                });
            }
        }
        // Sorted by address, then shorter prefixes first, every prefix comes after all the
        // prefixes that contain it, so a stack of open ancestors resolves containment.
        listed.sort_by(|a, b| {
            (a.net.network(), a.net.prefix_len()).cmp(&(b.net.network(), b.net.prefix_len()))
        });
        let mut resolved: Vec<(IpNet, PolicyEntry)> = Vec::with_capacity(listed.len());
        let mut ancestors: Vec<(IpNet, PolicyEntry, Option<usize>)> = Vec::new();
        for item in listed {
            while ancestors
                .last()
                .is_some_and(|(net, ..)| !net.contains(&item.net))
            {
                ancestors.pop();
            }
            let mut entry = PolicyEntry::new(item.action, item.limit_id);
            if let Some(&(_, parent, _)) = ancestors.last() {
                if let (Some(mine), Some((their_net, theirs))) =
                    (item.class, nearest_class(&ancestors))
                    && mine != theirs
                {
                    return Err(PolicyError::OverlappingClasses {
                        first: self.classes[theirs].name.clone(),
                        first_prefix: their_net,
                        second: self.classes[mine].name.clone(),
                        second_prefix: item.net,
                    });
                }
                if parent.action > entry.action {
                    entry = parent;
                }
            }
            if let Some(last) = resolved.last_mut().filter(|(net, _)| *net == item.net) {
                // The same prefix listed twice: keep the strongest.
                if entry.action > last.1.action {
                    last.1 = entry;
                }
                if let Some(top) = ancestors.last_mut() {
                    top.1 = last.1;
                }
                continue;
            }
            resolved.push((item.net, entry));
            ancestors.push((item.net, entry, item.class));
        }

        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (net, entry) in resolved {
            match net.network() {
                IpAddr::V4(a) => v4.push((a.octets(), net.prefix_len(), entry)),
                IpAddr::V6(a) => v6.push((a.octets(), net.prefix_len(), entry)),
            }
        }
        for (family, count) in [("IPv4", v4.len()), ("IPv6", v6.len())] {
            if count > capacity::POLICY_PREFIXES as usize {
                return Err(PolicyError::TooManyPrefixes { family, count });
            }
        }
        Ok((v4, v6))
    }
}

/// The innermost ancestor that came from a class, with its class index.
fn nearest_class(ancestors: &[(IpNet, PolicyEntry, Option<usize>)]) -> Option<(IpNet, usize)> {
    ancestors
        .iter()
        .rev()
        .find_map(|(net, _, class)| class.map(|c| (*net, c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_classes(names: &[&str]) -> Policy {
        Policy {
            classes: names
                .iter()
                .enumerate()
                .map(|(i, n)| Class {
                    name: (*n).to_owned(),
                    prefixes: vec![format!("10.{i}.0.0/16").parse().unwrap()],
                    limit: LimitSpec::packets(10, 10),
                })
                .collect(),
            ..Policy::default()
        }
    }

    #[test]
    fn limit_ids_stay_with_their_names() {
        let mut ids = LimitIds::default();
        ids.assign(&with_classes(&["first", "busy"])).unwrap();
        assert_eq!(
            (ids.id("first"), ids.id("busy")),
            (1, 2),
            "positions on a first start"
        );
        // Removing the class before it, and adding others, never moves "busy".
        ids.assign(&with_classes(&["busy"])).unwrap();
        ids.assign(&with_classes(&["new", "busy", "other"]))
            .unwrap();
        assert_eq!(ids.id("busy"), 2);
        assert_eq!(
            ids.id("new"),
            3,
            "a freed id is not reused while fresh ones remain"
        );
        assert_eq!(ids.id("other"), 4);
        let compiled = with_classes(&["new", "busy", "other"])
            .compile_with(&ids)
            .unwrap();
        assert_eq!(compiled.limit_names[2], "busy");
        assert_eq!(compiled.limit_names[1], "", "id 1 is unused");
        assert!(compiled.v4.iter().any(|(_, _, e)| e.limit_id == 2));
        // Ids wrap around to freed ones when the fresh ones run out.
        let mut full = LimitIds {
            next: (capacity::LIMITS - 1) as u16,
            ..LimitIds::default()
        };
        full.assign(&with_classes(&["a", "b"])).unwrap();
        assert_eq!(
            (full.id("a"), full.id("b")),
            ((capacity::LIMITS - 1) as u16, 1)
        );
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn lookup(compiled: &CompiledPolicy, addr: &str) -> Option<PolicyEntry> {
        let addr: IpAddr = addr.parse().unwrap();
        let mut best: Option<(u8, PolicyEntry)> = None;
        let candidates: Vec<(IpNet, PolicyEntry)> = compiled
            .v4
            .iter()
            .map(|(a, l, e)| (IpNet::new(IpAddr::from(*a), *l).unwrap(), *e))
            .chain(
                compiled
                    .v6
                    .iter()
                    .map(|(a, l, e)| (IpNet::new(IpAddr::from(*a), *l).unwrap(), *e)),
            )
            .collect();
        for (n, e) in candidates {
            if n.contains(&addr) && best.is_none_or(|(l, _)| n.prefix_len() > l) {
                best = Some((n.prefix_len(), e));
            }
        }
        best.map(|(_, e)| e)
    }

    fn action(compiled: &CompiledPolicy, addr: &str) -> Option<PolicyAction> {
        lookup(compiled, addr).map(|e| match e.action {
            1 => PolicyAction::Class,
            2 => PolicyAction::Allow,
            3 => PolicyAction::Deny,
            other => panic!("unknown action {other}"),
        })
    }

    #[test]
    fn deny_wins_over_allow_inside_it_and_allow_over_class() {
        let policy = Policy {
            deny: vec![net("198.51.100.0/24")],
            allow: vec![net("198.51.100.7/32"), net("203.0.113.128/25")],
            classes: vec![Class {
                name: "mm".into(),
                prefixes: vec![net("203.0.113.0/24"), net("2001:db8::/32")],
                limit: LimitSpec::packets(10_000, 20_000),
            }],
            ..Policy::default()
        };
        let c = policy.compile().unwrap();
        assert_eq!(action(&c, "198.51.100.7"), Some(PolicyAction::Deny));
        assert_eq!(action(&c, "198.51.100.8"), Some(PolicyAction::Deny));
        assert_eq!(action(&c, "203.0.113.5"), Some(PolicyAction::Class));
        assert_eq!(lookup(&c, "203.0.113.5").unwrap().limit_id, 1);
        assert_eq!(action(&c, "203.0.113.200"), Some(PolicyAction::Allow));
        assert_eq!(action(&c, "2001:db8::1"), Some(PolicyAction::Class));
        assert_eq!(action(&c, "192.0.2.1"), None);
        assert!(c.config.has(Config::FLAG_POLICY_V4) && c.config.has(Config::FLAG_POLICY_V6));
    }

    #[test]
    fn deny_inside_class_and_class_inside_allow() {
        let policy = Policy {
            deny: vec![net("10.1.2.0/24")],
            allow: vec![net("10.2.0.0/16")],
            classes: vec![Class {
                name: "c".into(),
                prefixes: vec![net("10.1.0.0/16"), net("10.2.3.0/24")],
                limit: LimitSpec::packets(1, 1),
            }],
            ..Policy::default()
        };
        let c = policy.compile().unwrap();
        assert_eq!(action(&c, "10.1.2.3"), Some(PolicyAction::Deny));
        assert_eq!(action(&c, "10.1.9.9"), Some(PolicyAction::Class));
        assert_eq!(action(&c, "10.2.3.4"), Some(PolicyAction::Allow));
    }

    #[test]
    fn same_prefix_in_both_lists_is_denied() {
        let policy = Policy {
            deny: vec![net("192.0.2.0/24")],
            allow: vec![net("192.0.2.0/24")],
            ..Policy::default()
        };
        let c = policy.compile().unwrap();
        assert_eq!(c.v4.len(), 1);
        assert_eq!(action(&c, "192.0.2.1"), Some(PolicyAction::Deny));
    }

    #[test]
    fn overlapping_classes_are_rejected() {
        let policy = Policy {
            classes: vec![
                Class {
                    name: "a".into(),
                    prefixes: vec![net("10.0.0.0/8")],
                    limit: LimitSpec::unlimited(),
                },
                Class {
                    name: "b".into(),
                    prefixes: vec![net("10.9.0.0/16")],
                    limit: LimitSpec::unlimited(),
                },
            ],
            ..Policy::default()
        };
        assert!(matches!(
            policy.compile(),
            Err(PolicyError::OverlappingClasses { .. })
        ));
    }

    #[test]
    fn services_map_ports_and_reject_overlaps() {
        let mut policy = Policy {
            services: vec![
                Service {
                    name: "rest".into(),
                    proto: ServiceProto::Tcp,
                    ports: 8080..=8080,
                    limit: LimitSpec::packets(5, 5),
                },
                Service {
                    name: "ws".into(),
                    proto: ServiceProto::Tcp,
                    ports: 8081..=8090,
                    limit: LimitSpec::packets(50, 50),
                },
            ],
            ..Policy::default()
        };
        let c = policy.compile().unwrap();
        assert_eq!(c.service_ports.len(), 11);
        assert!(
            c.service_ports
                .contains(&(service_index(ServiceProto::Tcp, 8080), 1))
        );
        assert!(
            c.service_ports
                .contains(&(service_index(ServiceProto::Tcp, 8085), 2))
        );
        assert_eq!(c.limit_names, ["default", "rest", "ws"]);
        policy.services[1].ports = 8000..=8080;
        assert!(matches!(
            policy.compile(),
            Err(PolicyError::OverlappingServices { port: 8080, .. })
        ));
    }

    #[test]
    fn invalid_values_are_rejected() {
        let bad_rate = Policy {
            default_limit: LimitSpec::packets(0, 10),
            ..Policy::default()
        };
        assert!(matches!(
            bad_rate.compile(),
            Err(PolicyError::Rate {
                source: RateError::ZeroRateWithBurst,
                ..
            })
        ));
        let bad_prefix = Policy {
            source_prefix_v4: 33,
            ..Policy::default()
        };
        assert!(matches!(
            bad_prefix.compile(),
            Err(PolicyError::PrefixLength { .. })
        ));
        let narrow = Policy {
            aggregate_prefix_v6: 96,
            ..Policy::default()
        };
        assert!(matches!(
            narrow.compile(),
            Err(PolicyError::AggregateNarrowerThanSource { .. })
        ));
    }

    #[test]
    fn large_lists_compile_quickly_and_completely() {
        let deny: Vec<IpNet> = (0..100_000u32)
            .map(|i| {
                IpNet::new(
                    IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 | (i << 8))),
                    24,
                )
                .unwrap()
            })
            .collect();
        let policy = Policy {
            deny,
            ..Policy::default()
        };
        let c = policy.compile().unwrap();
        assert_eq!(c.v4.len(), 100_000);
    }
}
