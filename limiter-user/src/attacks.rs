//! Attack records: the daemon's view of what is attacking it, decided purely from what the
//! program already reports each second (exact drop counters by reason, and sampled drop
//! events carrying each dropped frame's source prefix).
//!
//! Every drop reason belongs to one [`AttackType`]. The exact counters say how much of each
//! type is being dropped; the samples say from where. Floods charged to known sources are
//! attributed per aggregate prefix: one source carrying most of its prefix's drops is a
//! [`AttackType::SourceFlood`] of that source, many sharing them a
//! [`AttackType::PrefixFlood`] of the prefix. Floods of frames no source is charged for
//! (spoofed sources past the new-source cap, unproven SYNs, TCP of no connection) have
//! forged addresses, so each type is one attack, named by the prefix covering its sources.
//!
//! Hysteresis: an attack starts after `start_seconds` at or above the rate and ends after
//! `end_seconds` below half of it, so a flood that pauses or flaps stays one attack.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use ipnet::IpNet;
use limiter_common::layout::Stat;
use serde::{Deserialize, Serialize};

/// What kind of attack.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum AttackType {
    /// One source (an IPv4 address, an IPv6 /64) over its own limits.
    SourceFlood,
    /// Many sources of one aggregate prefix (/24, /48) over their limits together.
    PrefixFlood,
    /// Connectionless traffic from sources past the new-source cap: a spoofed flood.
    SpoofedFlood,
    /// SYNs from sources that never completed a handshake (dropped or challenged).
    SynFlood,
    /// TCP of no connection the kernel knows, or pure ACKs past their budgets.
    AckFlood,
}

impl AttackType {
    /// Every type, in a fixed order (metrics).
    pub const ALL: [AttackType; 5] = [
        AttackType::SourceFlood,
        AttackType::PrefixFlood,
        AttackType::SpoofedFlood,
        AttackType::SynFlood,
        AttackType::AckFlood,
    ];

    /// Its name in logs, metrics and the CLI.
    pub fn label(self) -> &'static str {
        match self {
            AttackType::SourceFlood => "source_flood",
            AttackType::PrefixFlood => "prefix_flood",
            AttackType::SpoofedFlood => "spoofed_flood",
            AttackType::SynFlood => "syn_flood",
            AttackType::AckFlood => "ack_flood",
        }
    }

    /// The group a verdict's frames count towards; `None` for verdicts that are no attack
    /// (passes, the denylist doing its job, malformed frames).
    pub fn of(verdict: Stat) -> Option<Group> {
        Some(match verdict {
            Stat::RatePackets
            | Stat::RateBytes
            | Stat::PenaltyBox
            | Stat::RateConnections
            | Stat::RateAggregate => Group::Sources,
            Stat::RateShared => Group::Forged(AttackType::SpoofedFlood),
            Stat::RateUnproven | Stat::Challenged | Stat::RateChallenge => {
                Group::Forged(AttackType::SynFlood)
            }
            Stat::RateOutOfState | Stat::RateAcks => Group::Forged(AttackType::AckFlood),
            _ => return None,
        })
    }
}

impl std::fmt::Display for AttackType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// How a verdict's frames are attributed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Group {
    /// Charged to known sources: attributed per source and aggregate prefix.
    Sources,
    /// Charged to no source (their addresses may be forged): one attack per type.
    Forged(AttackType),
}

/// The detector's settings (`[attacks]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttackSettings {
    /// Frames dropped (or challenged) per second that make an attack.
    pub min_packets_per_second: u64,
    /// Seconds at or above it before an attack starts.
    pub start_seconds: u32,
    /// Seconds below half of it before an attack ends.
    pub end_seconds: u32,
    /// Seconds between the summaries logged while an attack lasts.
    pub summary_seconds: u32,
    /// The aggregate prefix lengths (IPv4, IPv6) of the policy.
    pub aggregate_prefix: (u8, u8),
}

impl Default for AttackSettings {
    fn default() -> Self {
        Self {
            min_packets_per_second: 1_000,
            start_seconds: 2,
            end_seconds: 10,
            summary_seconds: 60,
            aggregate_prefix: (24, 48),
        }
    }
}

/// A sampled dropped frame: its source prefix, verdict and the frames it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub interface: String,
    pub verdict: Stat,
    pub source: IpNet,
    pub weight: u64,
}

/// One second's worth of what the program reported.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    /// Unix seconds now.
    pub at_unix: u64,
    /// Seconds since the previous observation.
    pub seconds: f64,
    /// Frames dropped, would-be dropped or challenged since then, by verdict (exact, all
    /// interfaces).
    pub verdicts: BTreeMap<StatKey, u64>,
    /// The samples read since then.
    pub samples: Vec<Sample>,
}

/// A [`Stat`] as an ordered map key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StatKey(pub u32);

impl From<Stat> for StatKey {
    fn from(stat: Stat) -> Self {
        Self(stat as u32)
    }
}

/// A prefix and its rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrefixRate {
    pub prefix: IpNet,
    pub packets_per_second: u64,
}

/// One attack, under way or over.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttackRecord {
    pub id: u64,
    #[serde(rename = "type")]
    pub kind: AttackType,
    /// The attacking source or prefix; for forged floods the prefix covering the sources
    /// seen (none when they come from everywhere).
    pub prefix: Option<IpNet>,
    pub started_unix: u64,
    /// `None` while it lasts.
    pub ended_unix: Option<u64>,
    /// The highest rate of a second, frames dropped (or challenged) per second.
    pub peak_packets_per_second: u64,
    /// The rate of the latest second.
    pub current_packets_per_second: u64,
    /// Frames dropped (or challenged) so far.
    pub dropped_packets: u64,
    /// The prefixes sending most of it at the peak (aggregate prefixes, or for a prefix
    /// flood its sources).
    pub top_prefixes: Vec<PrefixRate>,
    /// Interfaces it was seen on.
    pub interfaces: BTreeSet<String>,
    /// Drops by verdict.
    pub verdicts: BTreeMap<String, u64>,
}

impl AttackRecord {
    /// A one-line description for logs and notifications.
    pub fn describe(&self) -> String {
        let target = self
            .prefix
            .map_or_else(|| "sources everywhere".to_owned(), |p| p.to_string());
        format!(
            "attack {} ({}, {target}): peak {} pps, {} frames dropped",
            self.id, self.kind, self.peak_packets_per_second, self.dropped_packets
        )
    }
}

/// What the detector decided this second.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    Started(AttackRecord),
    /// Still under way; a summary is due.
    Summary(AttackRecord),
    Ended(AttackRecord),
}

/// What an attack is keyed by: its type and, for floods of known sources, its source or
/// prefix.
type TrackKey = (AttackType, Option<IpNet>);

#[derive(Debug, Default)]
struct Track {
    /// Seconds in a row at or above the rate (before the start), or below half of it
    /// (after).
    streak: u32,
    record: Option<AttackRecord>,
    /// Seconds since the last summary.
    since_summary: u32,
    /// Drops and peak counted during the streak before the start.
    pending_dropped: u64,
    pending_peak: u64,
    pending_verdicts: BTreeMap<String, u64>,
    /// The covering prefix of the forged sources seen (per family), and whether both
    /// families were seen.
    covering: Option<IpNet>,
    mixed: bool,
}

/// This second's estimate for one track.
#[derive(Debug, Default)]
struct Estimate {
    /// Frames dropped (or challenged) in the observation.
    frames: u64,
    top: Vec<PrefixRate>,
    interfaces: BTreeSet<String>,
    verdicts: BTreeMap<String, u64>,
    sources: Vec<IpNet>,
}

/// Ended records kept for `limiter attacks`.
const KEPT_ENDED: usize = 256;
/// Forged floods are named by the prefix covering their sources only when it is at least
/// this narrow (IPv4, IPv6); wider means "from everywhere".
const NARROWEST_COVERING: (u8, u8) = (8, 32);

/// The attack detector.
#[derive(Debug, Default)]
pub struct Detector {
    tracks: HashMap<TrackKey, Track>,
    ended: VecDeque<AttackRecord>,
    next_id: u64,
    /// Attacks started, by type, since the daemon started.
    started: BTreeMap<AttackType, u64>,
}

impl Detector {
    /// Takes one observation; returns the starts, summaries and ends it caused.
    pub fn observe(&mut self, settings: &AttackSettings, obs: &Observation) -> Vec<Transition> {
        let estimates = estimate(settings, obs);
        let seconds = obs.seconds.max(1e-3);
        let threshold = settings.min_packets_per_second;
        let mut transitions = Vec::new();
        let mut keys: BTreeSet<TrackKey> = self.tracks.keys().copied().collect();
        keys.extend(estimates.keys().copied());
        for key in keys {
            let estimate = estimates.get(&key);
            let rate = estimate.map_or(0, |e| (e.frames as f64 / seconds) as u64);
            let track = self.tracks.entry(key).or_default();
            if let Some(e) = estimate {
                track.note_sources(&e.sources);
            }
            let named = track.named_prefix();
            match &mut track.record {
                None if rate >= threshold => {
                    track.streak += 1;
                    track.pending_dropped += estimate.map_or(0, |e| e.frames);
                    track.pending_peak = track.pending_peak.max(rate);
                    if let Some(e) = estimate {
                        for (verdict, count) in &e.verdicts {
                            *track.pending_verdicts.entry(verdict.clone()).or_default() += count;
                        }
                    }
                    if track.streak >= settings.start_seconds {
                        self.next_id += 1;
                        *self.started.entry(key.0).or_default() += 1;
                        // The streak's drops, peak and verdicts (this second included).
                        let record = AttackRecord {
                            id: self.next_id,
                            kind: key.0,
                            prefix: key.1.or(named),
                            // An observation covers the second before `at_unix`: the attack
                            // began with the first second of the streak.
                            started_unix: obs
                                .at_unix
                                .saturating_sub(u64::from(settings.start_seconds)),
                            ended_unix: None,
                            peak_packets_per_second: track.pending_peak,
                            current_packets_per_second: rate,
                            dropped_packets: std::mem::take(&mut track.pending_dropped),
                            top_prefixes: estimate.map(|e| e.top.clone()).unwrap_or_default(),
                            interfaces: estimate.map(|e| e.interfaces.clone()).unwrap_or_default(),
                            verdicts: std::mem::take(&mut track.pending_verdicts),
                        };
                        track.streak = 0;
                        track.since_summary = 0;
                        track.record = Some(record.clone());
                        transitions.push(Transition::Started(record));
                    }
                }
                None => {
                    track.streak = 0;
                    track.pending_dropped = 0;
                    track.pending_peak = 0;
                    track.pending_verdicts.clear();
                }
                Some(record) => {
                    if let Some(e) = estimate {
                        absorb(record, e, rate, e.frames);
                    } else {
                        record.current_packets_per_second = 0;
                    }
                    if key.1.is_none() {
                        record.prefix = named;
                    }
                    track.streak = if rate * 2 < threshold {
                        track.streak + 1
                    } else {
                        0
                    };
                    track.since_summary += 1;
                    if track.streak >= settings.end_seconds {
                        let mut record = track.record.take().expect("matched Some");
                        // It ended when it fell below, at the start of the calm streak.
                        record.ended_unix = Some(
                            obs.at_unix
                                .saturating_sub(u64::from(settings.end_seconds))
                                .max(record.started_unix),
                        );
                        record.current_packets_per_second = 0;
                        transitions.push(Transition::Ended(record.clone()));
                        self.ended.push_back(record);
                        if self.ended.len() > KEPT_ENDED {
                            self.ended.pop_front();
                        }
                        track.streak = 0;
                    } else if track.since_summary >= settings.summary_seconds {
                        track.since_summary = 0;
                        transitions.push(Transition::Summary(record.clone()));
                    }
                }
            }
        }
        // Forget idle tracks, so that a long-running daemon's map stays small.
        self.tracks
            .retain(|_, t| t.record.is_some() || t.streak > 0 || t.pending_dropped > 0);
        transitions
    }

    /// Attacks under way, oldest first.
    pub fn active(&self) -> Vec<AttackRecord> {
        let mut active: Vec<_> = self
            .tracks
            .values()
            .filter_map(|t| t.record.clone())
            .collect();
        active.sort_by_key(|r| r.id);
        active
    }

    /// Every attack known: those under way, then those over, newest first.
    pub fn all(&self) -> Vec<AttackRecord> {
        let mut all = self.active();
        all.extend(self.ended.iter().rev().cloned());
        all
    }

    /// One attack by id.
    pub fn get(&self, id: u64) -> Option<AttackRecord> {
        self.all().into_iter().find(|r| r.id == id)
    }

    /// Per type: attacks under way, and attacks started since the daemon started.
    pub fn counts(&self) -> Vec<(AttackType, u64, u64)> {
        let active = self.active();
        AttackType::ALL
            .iter()
            .map(|&kind| {
                (
                    kind,
                    active.iter().filter(|r| r.kind == kind).count() as u64,
                    self.started.get(&kind).copied().unwrap_or(0),
                )
            })
            .collect()
    }
}

impl Track {
    fn note_sources(&mut self, sources: &[IpNet]) {
        for source in sources {
            self.covering = match self.covering {
                None => Some(*source),
                Some(c) => match covering(&c, source) {
                    Some(wider) => Some(wider),
                    None => {
                        self.mixed = true;
                        Some(c)
                    }
                },
            };
        }
    }

    /// The prefix covering the forged sources seen, if it is narrow enough to name them.
    fn named_prefix(&self) -> Option<IpNet> {
        let c = self.covering?;
        let narrow_enough = match c {
            IpNet::V4(n) => n.prefix_len() >= NARROWEST_COVERING.0,
            IpNet::V6(n) => n.prefix_len() >= NARROWEST_COVERING.1,
        };
        (!self.mixed && narrow_enough).then_some(c)
    }
}

/// Adds a second's estimate to a record.
fn absorb(record: &mut AttackRecord, e: &Estimate, rate: u64, dropped: u64) {
    record.dropped_packets += dropped;
    record.current_packets_per_second = rate;
    if rate >= record.peak_packets_per_second || record.top_prefixes.is_empty() {
        record.peak_packets_per_second = record.peak_packets_per_second.max(rate);
        if !e.top.is_empty() {
            record.top_prefixes = e.top.clone();
        }
    }
    record.interfaces.extend(e.interfaces.iter().cloned());
    for (verdict, count) in &e.verdicts {
        *record.verdicts.entry(verdict.clone()).or_default() += count;
    }
}

/// The smallest prefix covering both, if they are of one family.
fn covering(a: &IpNet, b: &IpNet) -> Option<IpNet> {
    let (bits_a, bits_b, width) = match (a, b) {
        (IpNet::V4(a), IpNet::V4(b)) => (
            u128::from(u32::from(a.network())) << 96,
            u128::from(u32::from(b.network())) << 96,
            32u8,
        ),
        (IpNet::V6(a), IpNet::V6(b)) => (u128::from(a.network()), u128::from(b.network()), 128u8),
        _ => return None,
    };
    let common = (bits_a ^ bits_b).leading_zeros().min(u32::from(width)) as u8;
    let len = common.min(a.prefix_len()).min(b.prefix_len());
    IpNet::new(a.network(), len).ok().map(|n| n.trunc())
}

/// Truncates `source` to the aggregate prefix.
fn aggregate_of(settings: &AttackSettings, source: &IpNet) -> IpNet {
    let len = match source {
        IpNet::V4(_) => settings.aggregate_prefix.0,
        IpNet::V6(_) => settings.aggregate_prefix.1,
    };
    IpNet::new(source.network(), len.min(source.prefix_len()))
        .map(|n| n.trunc())
        .unwrap_or(*source)
}

/// The top `n` of a weight map as rates.
fn top(weights: &HashMap<IpNet, u64>, total: u64, exact: u64, n: usize) -> Vec<PrefixRate> {
    let mut ranked: Vec<_> = weights.iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    ranked
        .into_iter()
        .take(n)
        .map(|(prefix, weight)| PrefixRate {
            prefix: *prefix,
            packets_per_second: share(exact, *weight, total),
        })
        .collect()
}

/// `exact × part / whole`, without overflow.
fn share(exact: u64, part: u64, whole: u64) -> u64 {
    if whole == 0 {
        0
    } else {
        (u128::from(exact) * u128::from(part) / u128::from(whole)) as u64
    }
}

/// Splits a second's exact drop counts among attacks, by the samples. Rates here are
/// frames in the observation (the caller divides by its length).
fn estimate(settings: &AttackSettings, obs: &Observation) -> HashMap<TrackKey, Estimate> {
    // Exact frames per group.
    let mut exact: HashMap<Group, u64> = HashMap::new();
    let mut verdicts_by_group: HashMap<Group, BTreeMap<String, u64>> = HashMap::new();
    for (stat, count) in &obs.verdicts {
        let Some(stat) = Stat::ALL.get(stat.0 as usize).copied() else {
            continue;
        };
        if let Some(group) = AttackType::of(stat) {
            *exact.entry(group).or_default() += count;
            *verdicts_by_group
                .entry(group)
                .or_default()
                .entry(stat.label().to_owned())
                .or_default() += count;
        }
    }
    let mut out: HashMap<TrackKey, Estimate> = HashMap::new();

    // Forged floods: one attack per type; the samples give its sources.
    for (group, &frames) in &exact {
        let Group::Forged(kind) = *group else {
            continue;
        };
        let samples: Vec<&Sample> = obs
            .samples
            .iter()
            .filter(|s| AttackType::of(s.verdict) == Some(*group))
            .collect();
        let total: u64 = samples.iter().map(|s| s.weight).sum();
        let mut by_aggregate: HashMap<IpNet, u64> = HashMap::new();
        for s in &samples {
            *by_aggregate
                .entry(aggregate_of(settings, &s.source))
                .or_default() += s.weight;
        }
        out.insert(
            (kind, None),
            Estimate {
                frames,
                top: top(&by_aggregate, total, frames, 5),
                interfaces: samples.iter().map(|s| s.interface.clone()).collect(),
                verdicts: verdicts_by_group.remove(group).unwrap_or_default(),
                sources: samples.iter().map(|s| s.source).collect(),
            },
        );
    }

    // Floods of known sources: per aggregate prefix, a source or the prefix.
    let frames = exact.get(&Group::Sources).copied().unwrap_or(0);
    let samples: Vec<&Sample> = obs
        .samples
        .iter()
        .filter(|s| AttackType::of(s.verdict) == Some(Group::Sources))
        .collect();
    let total: u64 = samples.iter().map(|s| s.weight).sum();
    if frames == 0 || total == 0 {
        return out;
    }
    let mut prefixes: HashMap<IpNet, HashMap<IpNet, u64>> = HashMap::new();
    let mut interfaces: HashMap<IpNet, BTreeSet<String>> = HashMap::new();
    let mut verdicts: HashMap<IpNet, BTreeMap<String, u64>> = HashMap::new();
    for s in &samples {
        let aggregate = aggregate_of(settings, &s.source);
        *prefixes
            .entry(aggregate)
            .or_default()
            .entry(s.source)
            .or_default() += s.weight;
        interfaces
            .entry(aggregate)
            .or_default()
            .insert(s.interface.clone());
        *verdicts
            .entry(aggregate)
            .or_default()
            .entry(s.verdict.label().to_owned())
            .or_default() += s.weight;
    }
    for (aggregate, sources) in prefixes {
        let weight: u64 = sources.values().sum();
        let (top_source, top_weight) = sources
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(s, w)| (*s, *w))
            .expect("a prefix has a sample");
        let estimate = |part: u64, top: Vec<PrefixRate>| Estimate {
            frames: share(frames, part, total),
            top,
            interfaces: interfaces.get(&aggregate).cloned().unwrap_or_default(),
            verdicts: verdicts
                .get(&aggregate)
                .map(|v| {
                    v.iter()
                        .map(|(k, w)| (k.clone(), share(frames, *w, total)))
                        .collect()
                })
                .unwrap_or_default(),
            sources: Vec::new(),
        };
        // One source carrying most of its prefix's drops is that source's flood.
        if top_weight * 2 >= weight {
            out.insert(
                (AttackType::SourceFlood, Some(top_source)),
                estimate(
                    top_weight,
                    vec![PrefixRate {
                        prefix: top_source,
                        packets_per_second: share(frames, top_weight, total),
                    }],
                ),
            );
        } else {
            out.insert(
                (AttackType::PrefixFlood, Some(aggregate)),
                estimate(weight, top(&sources, total, frames, 5)),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn sample(verdict: Stat, source: &str) -> Sample {
        Sample {
            interface: "eth1".to_owned(),
            verdict,
            source: net(source),
            weight: 256,
        }
    }

    /// One second: `frames` of `verdict` dropped, attributed by `samples`.
    fn second(at: u64, verdict: Stat, frames: u64, samples: Vec<Sample>) -> Observation {
        Observation {
            at_unix: at,
            seconds: 1.0,
            verdicts: [(StatKey::from(verdict), frames)].into_iter().collect(),
            samples,
        }
    }

    fn run(
        detector: &mut Detector,
        from: u64,
        seconds: u64,
        make: impl Fn(u64) -> Observation,
    ) -> Vec<Transition> {
        (from..from + seconds)
            .flat_map(|t| detector.observe(&AttackSettings::default(), &make(t)))
            .collect()
    }

    #[test]
    fn a_single_source_flood_is_one_attack_of_that_source() {
        let mut d = Detector::default();
        let flood = |t| {
            second(
                t,
                Stat::RatePackets,
                30_000,
                vec![sample(Stat::RatePackets, "10.1.2.3/32"); 117],
            )
        };
        let started = run(&mut d, 100, 1, flood);
        assert!(started.is_empty(), "one second is not yet an attack");
        let started = run(&mut d, 101, 5, flood);
        assert_eq!(started.len(), 1, "{started:?}");
        let Transition::Started(record) = &started[0] else {
            panic!("{started:?}")
        };
        assert_eq!(record.kind, AttackType::SourceFlood);
        assert_eq!(record.prefix, Some(net("10.1.2.3/32")));
        assert_eq!(
            record.started_unix, 99,
            "the second before the first observation"
        );
        assert_eq!(record.peak_packets_per_second, 30_000);
        // It stops: ended after 10 quiet seconds, dated when it stopped.
        let quiet = |t| second(t, Stat::RatePackets, 0, Vec::new());
        let ended = run(&mut d, 106, 9, quiet);
        assert!(ended.is_empty(), "{ended:?}");
        let ended = run(&mut d, 115, 1, quiet);
        let Some(Transition::Ended(record)) = ended.first() else {
            panic!("{ended:?}")
        };
        assert_eq!(record.ended_unix, Some(105), "the last second of the flood");
        assert_eq!(record.dropped_packets, 6 * 30_000);
        assert!(d.active().is_empty());
        assert_eq!(d.all().len(), 1);
        assert_eq!(
            d.counts()
                .iter()
                .find(|c| c.0 == AttackType::SourceFlood)
                .unwrap()
                .2,
            1
        );
    }

    #[test]
    fn many_sources_of_one_prefix_are_a_prefix_flood() {
        let mut d = Detector::default();
        let flood = |t| {
            let samples = (1..=50)
                .map(|h| sample(Stat::RateAggregate, &format!("10.9.9.{h}/32")))
                .collect();
            second(t, Stat::RateAggregate, 12_800, samples)
        };
        let t = run(&mut d, 0, 3, flood);
        let [Transition::Started(record)] = t.as_slice() else {
            panic!("{t:?}")
        };
        assert_eq!(record.kind, AttackType::PrefixFlood);
        assert_eq!(record.prefix, Some(net("10.9.9.0/24")));
        assert_eq!(record.top_prefixes.len(), 5);
    }

    #[test]
    fn a_spoofed_syn_flood_is_named_by_the_prefix_covering_its_sources() {
        let mut d = Detector::default();
        let flood = |t: u64| {
            let samples = (0..40u64)
                .map(|i| {
                    let x = (t * 40 + i) * 2_654_435_761 % 65_536;
                    sample(
                        Stat::Challenged,
                        &format!("10.78.{}.{}/32", x / 256, x % 256),
                    )
                })
                .collect();
            second(t, Stat::Challenged, 10_240, samples)
        };
        let t = run(&mut d, 0, 2, flood);
        let [Transition::Started(record)] = t.as_slice() else {
            panic!("{t:?}")
        };
        assert_eq!(record.kind, AttackType::SynFlood);
        assert_eq!(record.prefix, Some(net("10.78.0.0/16")));
        assert_eq!(record.verdicts["challenged"], 2 * 10_240);
    }

    #[test]
    fn sources_from_everywhere_name_no_prefix() {
        let mut d = Detector::default();
        let flood = |t| {
            second(
                t,
                Stat::RateShared,
                5_000,
                vec![
                    sample(Stat::RateShared, "1.2.3.4/32"),
                    sample(Stat::RateShared, "200.2.3.4/32"),
                ],
            )
        };
        let t = run(&mut d, 0, 2, flood);
        let [Transition::Started(record)] = t.as_slice() else {
            panic!("{t:?}")
        };
        assert_eq!(record.kind, AttackType::SpoofedFlood);
        assert_eq!(record.prefix, None);
    }

    #[test]
    fn a_flapping_flood_is_one_attack_and_a_short_burst_none() {
        let mut d = Detector::default();
        let burst = run(&mut d, 0, 1, |t| {
            second(t, Stat::RateOutOfState, 50_000, Vec::new())
        });
        assert!(burst.is_empty());
        let quiet = run(&mut d, 1, 3, |t| {
            second(t, Stat::RateOutOfState, 0, Vec::new())
        });
        assert!(quiet.is_empty());
        // On 3 s, off 5 s, three times: one attack.
        let mut transitions = Vec::new();
        for round in 0..3 {
            let from = 10 + round * 8;
            transitions.extend(run(&mut d, from, 3, |t| {
                second(t, Stat::RateOutOfState, 5_000, Vec::new())
            }));
            transitions.extend(run(&mut d, from + 3, 5, |t| {
                second(t, Stat::RateOutOfState, 0, Vec::new())
            }));
        }
        let started = transitions
            .iter()
            .filter(|t| matches!(t, Transition::Started(_)))
            .count();
        assert_eq!(started, 1, "{transitions:?}");
        assert_eq!(d.active().len(), 1);
        assert_eq!(d.active()[0].kind, AttackType::AckFlood);
    }

    #[test]
    fn below_the_rate_is_no_attack_and_passes_are_never_one() {
        let mut d = Detector::default();
        let t = run(&mut d, 0, 30, |t| {
            second(t, Stat::RatePackets, 900, Vec::new())
        });
        assert!(t.is_empty());
        let t = run(&mut d, 30, 30, |t| {
            second(t, Stat::WithinLimit, 1_000_000, Vec::new())
        });
        assert!(t.is_empty());
        let t = run(&mut d, 60, 30, |t| {
            second(t, Stat::Denylisted, 1_000_000, Vec::new())
        });
        assert!(t.is_empty(), "the denylist doing its job is not an attack");
    }

    #[test]
    fn summaries_while_it_lasts() {
        let settings = AttackSettings {
            summary_seconds: 5,
            ..AttackSettings::default()
        };
        let mut d = Detector::default();
        let summaries = (0..20)
            .flat_map(|t| d.observe(&settings, &second(t, Stat::RateUnproven, 3_000, Vec::new())))
            .filter(|t| matches!(t, Transition::Summary(_)))
            .count();
        assert_eq!(summaries, 3);
    }

    #[test]
    fn covering_prefixes() {
        assert_eq!(
            covering(&net("10.78.1.1/32"), &net("10.78.200.3/32")),
            Some(net("10.78.0.0/16"))
        );
        assert_eq!(
            covering(&net("fd77:0:0:2::/64"), &net("fd77:0:0:2::/64")),
            Some(net("fd77:0:0:2::/64"))
        );
        assert_eq!(covering(&net("10.0.0.1/32"), &net("::1/128")), None);
    }
}
