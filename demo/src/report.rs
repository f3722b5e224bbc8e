//! The results: per-phase summaries, the expectations that decide the exit status, the
//! printed table, and `results.json`.

use std::{collections::BTreeMap, fs, path::Path};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    attacks::{AttackPlan, AttackTotals},
    clients::{self, CLIENTS, ClientSpec, NewcomerRecord, Outcome, RequestRecord},
    lab, metrics,
    phases::{self, LimiterState, OperatorCommand, PHASES, PhaseSpec, RunData},
};

/// In the enforce phase, at least this share of legitimate requests must succeed.
pub const MIN_LEGIT_SUCCESS_PCT: f64 = 99.0;
/// In the enforce phase, at least this share of the attacker's packets must be kept from the
/// kernel: dropped, or (a spoofed SYN) answered in XDP by the SYN-cookie challenge.
pub const MIN_ATTACK_DROPPED_PCT: f64 = 95.0;
/// After the operator's change, the client it concerns must be served this well.
pub const MIN_SERVED_AFTER_CHANGE_PCT: f64 = 99.0;
/// Without the limiter the floods must visibly take the clients' share of the API: at most
/// this share of legitimate requests succeeds (the harm the demo is about).
pub const MAX_LEGIT_SUCCESS_UNPROTECTED_PCT: f64 = 50.0;

/// The attacks the demo's floods are, as the daemon must record them: (type, prefix).
pub fn expected_attacks() -> [(&'static str, String); 4] {
    [
        ("source_flood", format!("{}/32", lab::ATTACKER_V4)),
        (
            "syn_flood",
            format!("{}/{}", lab::SPOOFED_V4_NET.0, lab::SPOOFED_V4_NET.1),
        ),
        (
            "prefix_flood",
            format!(
                "{}/{}",
                lab::PREFIX_FLOOD_V4_NET.0,
                lab::PREFIX_FLOOD_V4_NET.1
            ),
        ),
        (
            "source_flood",
            format!("{}/{}", lab::ROTATING_V6_NET.0, lab::ROTATING_V6_NET.1),
        ),
    ]
}

/// One attack the daemon recorded, on the demo's time axis.
#[derive(Clone, Debug, Serialize)]
pub struct AttackRow {
    pub id: u64,
    #[serde(rename = "type")]
    pub kind: String,
    /// `any` when forged sources came from everywhere.
    pub prefix: String,
    /// Seconds since the demo's start.
    pub start_s: f64,
    /// `None` while still under way at the end of the run.
    pub end_s: Option<f64>,
    pub peak_packets_per_second: u64,
    pub dropped_packets: u64,
}

/// Legitimate requests: how many, how many succeeded, and how fast the successful ones were.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct LegitSummary {
    pub requests: usize,
    pub ok: usize,
    /// None without requests.
    pub success_pct: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl LegitSummary {
    pub fn of<'a>(records: impl Iterator<Item = &'a RequestRecord>) -> Self {
        let mut requests = 0;
        let mut latencies = Vec::new();
        for record in records {
            requests += 1;
            if record.outcome == Outcome::Ok {
                latencies.push(record.latency_ms());
            }
        }
        latencies.sort_by(f64::total_cmp);
        let ok = latencies.len();
        Self {
            requests,
            ok,
            success_pct: (requests > 0).then(|| 100.0 * ok as f64 / requests as f64),
            p50_ms: percentile(&latencies, 50.0),
            p99_ms: percentile(&latencies, 99.0),
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], pct: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((pct / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// One client's requests in one phase.
#[derive(Clone, Debug, Serialize)]
pub struct ClientSummary {
    pub client: ClientSpec,
    #[serde(flatten)]
    pub legit: LegitSummary,
}

/// The attack as the attacker sent it and as the limiter treated it.
#[derive(Clone, Debug, Serialize)]
pub struct AttackSummary {
    /// Frames the attacker's interface transmitted: every flood, including the HTTP flood's
    /// handshakes and retransmissions.
    pub offered_packets: u64,
    pub offered_pps: f64,
    /// What each flood sent, counted at the generator.
    pub by_flood: AttackTotals,
    /// The HTTP flood's share of the offered frames (the rest of the interface's count).
    pub http_flood_packets: u64,
    /// Attack frames the limiter dropped during the phase: every drop, less those of the
    /// legitimate clients' addresses.
    pub dropped_packets: u64,
    /// Spoofed SYNs the limiter answered itself with a SYN-cookie challenge (`XDP_TX`): like
    /// a drop, they never reach the kernel's TCP stack. The brand-new clients' few SYNs are
    /// among them.
    pub challenged_packets: u64,
    /// `(dropped + challenged) / offered`: the share kept from the kernel; None while the
    /// limiter is not attached.
    pub dropped_pct: Option<f64>,
}

/// The brand-new clients of one phase: each one request from an address never seen before.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct NewcomerSummary {
    pub attempts: usize,
    /// Answered within [`clients::NEWCOMER_TIMEOUT`].
    pub connected: usize,
    pub slowest_ms: Option<f64>,
}

impl NewcomerSummary {
    pub fn of<'a>(records: impl Iterator<Item = &'a NewcomerRecord>) -> Self {
        records.fold(Self::default(), |mut summary, record| {
            summary.attempts += 1;
            if record.outcome == Outcome::Ok {
                summary.connected += 1;
                summary.slowest_ms =
                    Some(summary.slowest_ms.unwrap_or(0.0).max(record.latency_ms()));
            }
            summary
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PhaseSummary {
    #[serde(flatten)]
    pub spec: PhaseSpec,
    pub start_s: f64,
    pub end_s: f64,
    pub legit: LegitSummary,
    pub per_client: Vec<ClientSummary>,
    /// Brand-new clients connecting during the phase (attack phases only).
    pub newcomers: NewcomerSummary,
    pub attack: Option<AttackSummary>,
    /// Every frame the limiter dropped, attack or not.
    pub dropped_packets: u64,
    /// Of those, frames from the legitimate clients' addresses.
    pub legit_dropped_packets: u64,
    pub would_drop_packets: u64,
    /// The increase of each `limiter_packets_total{action,reason}` during the phase.
    pub limiter_counters: BTreeMap<String, u64>,
    pub operator_commands: Vec<OperatorCommand>,
}

/// One second, with the legitimate requests started in it.
#[derive(Clone, Debug, Serialize)]
pub struct SecondSummary {
    pub phase: &'static str,
    pub limiter: LimiterState,
    pub start_s: f64,
    pub end_s: f64,
    pub attack_offered_pps: f64,
    pub dropped_pps: f64,
    pub would_drop_pps: f64,
    pub challenged_pps: f64,
    pub challenge_engaged: bool,
    pub legit: LegitSummary,
}

#[derive(Clone, Debug, Serialize)]
pub struct Expectation {
    pub name: String,
    pub passed: bool,
    pub measured: String,
}

#[derive(Serialize)]
pub struct Settings {
    pub phase_seconds: u64,
    pub attack: AttackPlan,
    pub legit_requests_per_second_each: u32,
    pub request_timeout_ms: u128,
    pub clients: &'static [ClientSpec],
    pub limiter_config: String,
}

#[derive(Serialize)]
pub struct Report {
    pub settings: Settings,
    pub phases: Vec<PhaseSummary>,
    pub seconds: Vec<SecondSummary>,
    /// Every brand-new client's first request.
    pub newcomers: Vec<NewcomerRecord>,
    pub expectations: Vec<Expectation>,
    pub passed: bool,
    pub top_sources: String,
    pub nonzero_packet_counters: Vec<String>,
    /// What `limiter attacks` recorded.
    pub attacks: Vec<AttackRow>,
    /// ... and printed.
    pub attacks_table: String,
}

impl Report {
    pub fn build(data: &RunData, settings: Settings) -> Self {
        let phases: Vec<PhaseSummary> = data
            .phases
            .iter()
            .map(|record| {
                let spec = PHASES[record.index];
                let in_phase =
                    |r: &&RequestRecord| r.started >= record.start && r.started < record.end;
                let legit = LegitSummary::of(data.requests.iter().filter(in_phase));
                let per_client = CLIENTS
                    .iter()
                    .enumerate()
                    .map(|(i, client)| ClientSummary {
                        client: *client,
                        legit: LegitSummary::of(
                            data.requests
                                .iter()
                                .filter(in_phase)
                                .filter(|r| r.client == i),
                        ),
                    })
                    .collect();
                let dropped = record.limiter.dropped();
                let attack_dropped = dropped.saturating_sub(record.legit_dropped_packets);
                let challenged = record.limiter.challenged();
                let attack = record.attack.map(|by_flood| AttackSummary {
                    offered_packets: record.attack_offered_packets,
                    offered_pps: record.attack_offered_packets as f64
                        / (record.end - record.start).max(1e-3),
                    by_flood,
                    http_flood_packets: record
                        .attack_offered_packets
                        .saturating_sub(by_flood.packet_flood_packets()),
                    dropped_packets: attack_dropped,
                    challenged_packets: challenged,
                    dropped_pct: (spec.limiter != LimiterState::Off
                        && record.attack_offered_packets > 0)
                        .then(|| pct(attack_dropped + challenged, record.attack_offered_packets)),
                });
                PhaseSummary {
                    spec,
                    start_s: record.start,
                    end_s: record.end,
                    legit,
                    per_client,
                    newcomers: NewcomerSummary::of(
                        data.newcomers
                            .iter()
                            .filter(|r| r.started >= record.start && r.started < record.end),
                    ),
                    attack,
                    dropped_packets: dropped,
                    legit_dropped_packets: record.legit_dropped_packets,
                    would_drop_packets: record.limiter.would_drop(),
                    limiter_counters: record
                        .limiter
                        .by_verdict
                        .iter()
                        .filter(|(_, v)| **v > 0)
                        .map(|(k, v)| (k.clone(), *v))
                        .collect(),
                    operator_commands: record.operator_commands.clone(),
                }
            })
            .collect();
        let seconds = data
            .seconds
            .iter()
            .map(|second| SecondSummary {
                phase: PHASES[second.phase].id,
                limiter: PHASES[second.phase].limiter,
                start_s: second.start,
                end_s: second.end,
                attack_offered_pps: second.attack_offered_packets as f64 / second.duration(),
                dropped_pps: second.dropped_packets as f64 / second.duration(),
                would_drop_pps: second.would_drop_packets as f64 / second.duration(),
                challenged_pps: second.challenged_packets as f64 / second.duration(),
                challenge_engaged: second.challenge_engaged,
                legit: LegitSummary::of(
                    data.requests
                        .iter()
                        .filter(|r| r.started >= second.start && r.started < second.end),
                ),
            })
            .collect();
        let attacks: Vec<AttackRow> = data
            .attacks
            .iter()
            .map(|record| AttackRow {
                id: record.id,
                kind: record.kind.label().to_owned(),
                prefix: record
                    .prefix
                    .map_or_else(|| "any".to_owned(), |p| p.to_string()),
                start_s: record.started_unix as f64 - data.epoch_unix,
                end_s: record.ended_unix.map(|end| end as f64 - data.epoch_unix),
                peak_packets_per_second: record.peak_packets_per_second,
                dropped_packets: record.dropped_packets,
            })
            .collect();
        let expectations = expectations(&phases, &attacks);
        let passed = expectations.iter().all(|e| e.passed);
        Self {
            settings,
            phases,
            seconds,
            newcomers: data.newcomers.clone(),
            expectations,
            passed,
            top_sources: data.top.clone(),
            attacks,
            attacks_table: data.attacks_table.clone(),
            nonzero_packet_counters: metrics::nonzero_packet_lines(&data.metrics)
                .into_iter()
                .map(str::to_owned)
                .collect(),
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).context("encode the results")?;
        fs::write(path, text + "\n").with_context(|| format!("write {}", path.display()))
    }

    pub fn print(&self) {
        println!();
        println!(
            "== summary per phase ({} s each)",
            self.settings.phase_seconds
        );
        println!(
            "{:<3} {:<27} {:<8} {:>9} {:>9} {:>9} {:>14} {:>8} {:>12}",
            "",
            "PHASE",
            "LIMITER",
            "LEGIT OK",
            "P50",
            "P99",
            "ATTACK PKTS",
            "DROPPED",
            "WOULD-DROP"
        );
        for phase in &self.phases {
            let (offered, dropped) = match &phase.attack {
                Some(attack) => (
                    thousands(attack.offered_packets),
                    attack
                        .dropped_pct
                        .map_or_else(|| "-".to_owned(), |p| percent(Some(p))),
                ),
                None => ("-".to_owned(), "-".to_owned()),
            };
            let would_drop = if phase.spec.limiter == LimiterState::Off {
                "-".to_owned()
            } else {
                thousands(phase.would_drop_packets)
            };
            println!(
                "{:<3} {:<27} {:<8} {:>9} {:>9} {:>9} {:>14} {:>8} {:>12}",
                phase.spec.id,
                phase.spec.title,
                phase.spec.limiter.label(),
                percent(phase.legit.success_pct),
                millis(phase.legit.p50_ms),
                millis(phase.legit.p99_ms),
                offered,
                dropped,
                would_drop
            );
        }

        println!(
            "LEGIT OK: requests of all four clients answered 200 within {} ms; in 5a-5c it includes \
             the partner's and the market maker's surges (per client below). DROPPED: attack \
             packets dropped, or answered in XDP by the SYN-cookie challenge, / sent.",
            self.settings.request_timeout_ms
        );

        println!();
        println!(
            "== brand-new clients during the attack (one a second, each from an address never \
             seen, one request within {} ms)",
            clients::NEWCOMER_TIMEOUT.as_millis()
        );
        for phase in self.phases.iter().filter(|p| p.attack.is_some()) {
            let challenged = phase.attack.as_ref().map_or(0, |a| a.challenged_packets);
            println!(
                "{:<3} {:<27} {} of {} connected, slowest {}; SYNs answered by the challenge: {}",
                phase.spec.id,
                phase.spec.title,
                phase.newcomers.connected,
                phase.newcomers.attempts,
                millis(phase.newcomers.slowest_ms),
                thousands(challenged)
            );
        }

        println!();
        println!("== the attack, per flood (packets sent, counted at the attacker)");
        let mut fell_short = false;
        for phase in &self.phases {
            if let Some(attack) = &phase.attack {
                let f = &attack.by_flood;
                let planned =
                    4.0 * f64::from(self.settings.attack.flood_pps) * (phase.end_s - phase.start_s);
                let reached = 100.0 * f.packet_flood_packets() as f64 / planned.max(1.0);
                fell_short |= reached < 90.0;
                println!(
                    "{:<3} UDP {} | spoofed SYN {} | prefix {} | rotating IPv6 {} ({reached:.0}% of plan) | HTTP flood {} pkts, {} requests, {} answered | total {} pps",
                    phase.spec.id,
                    thousands(f.udp_flood_packets),
                    thousands(f.spoofed_syn_packets),
                    thousands(f.prefix_flood_packets),
                    thousands(f.rotating_ipv6_packets),
                    thousands(attack.http_flood_packets),
                    thousands(f.http_flood_requests),
                    thousands(f.http_flood_responses),
                    rate(attack.offered_pps),
                );
            }
        }
        if fell_short {
            println!(
                "(below plan: on veth the edge's kernel handles each packet it lets through on the \
                 sender's CPU, so without the limiter the lab's own attacker is slowed by the work it \
                 causes; XDP drops are cheap, so under enforce the floods run at full rate)"
            );
        }

        println!();
        println!("== clients in phase 5 (success, requests)");
        print!("{:<3} {:<27}", "", "");
        for client in CLIENTS {
            print!(" {:>22}", format!("{} {}", client.name, client.source));
        }
        println!();
        for phase in self.phases.iter().filter(|p| p.spec.id.starts_with('5')) {
            print!("{:<3} {:<27}", phase.spec.id, phase.spec.title);
            for client in &phase.per_client {
                print!(
                    " {:>22}",
                    format!(
                        "{} of {}",
                        percent(client.legit.success_pct),
                        client.legit.requests
                    )
                );
            }
            println!();
            for command in &phase.operator_commands {
                println!("      before it: {}", command.command);
            }
        }

        println!();
        println!("== limiter attacks (after the run; the daemon ran from phase 3 on)");
        print!("{}", self.attacks_table);
        println!();
        println!("== limiter top -n 5 (after the run)");
        print!("{}", self.top_sources);
        println!();
        println!("== limiter_packets_total, non-zero (edge metrics endpoint)");
        for line in &self.nonzero_packet_counters {
            println!("{line}");
        }
        println!();
        println!("== expectations");
        for expectation in &self.expectations {
            println!(
                "{} {}: {}",
                if expectation.passed { "PASS" } else { "FAIL" },
                expectation.name,
                expectation.measured
            );
        }
    }
}

fn expectations(phases: &[PhaseSummary], attacks: &[AttackRow]) -> Vec<Expectation> {
    let mut out = Vec::new();
    let phase = |index: usize| phases.get(index);

    if let Some(unprotected) = phase(phases::UNPROTECTED_PHASE) {
        out.push(Expectation {
            name: format!(
                "attack, limiter off: the floods take the clients' share (legitimate success \
                 <= {MAX_LEGIT_SUCCESS_UNPROTECTED_PCT}%)"
            ),
            passed: unprotected.legit.requests > 0
                && unprotected.legit.success_pct.unwrap_or(100.0)
                    <= MAX_LEGIT_SUCCESS_UNPROTECTED_PCT,
            measured: format!(
                "{} of {} ({})",
                unprotected.legit.ok,
                unprotected.legit.requests,
                percent(unprotected.legit.success_pct)
            ),
        });
    }
    if phase(phases::ENFORCE_PHASE).is_some() {
        let found: Vec<String> = expected_attacks()
            .iter()
            .map(|(kind, prefix)| {
                let ids: Vec<String> = attacks
                    .iter()
                    .filter(|a| a.kind == *kind && a.prefix == *prefix)
                    .map(|a| format!("#{}", a.id))
                    .collect();
                format!(
                    "{kind} {prefix}: {}",
                    if ids.is_empty() {
                        "none".to_owned()
                    } else {
                        ids.join(" ")
                    }
                )
            })
            .collect();
        out.push(Expectation {
            name: "each flood recorded as exactly one attack of its type and prefix".to_owned(),
            passed: expected_attacks().iter().all(|(kind, prefix)| {
                attacks
                    .iter()
                    .filter(|a| a.kind == *kind && a.prefix == *prefix)
                    .count()
                    == 1
            }),
            measured: found.join("; "),
        });
    }

    if let Some(enforce) = phase(phases::ENFORCE_PHASE) {
        let success = enforce.legit.success_pct.unwrap_or(0.0);
        out.push(Expectation {
            name: format!("enforce phase: legitimate requests succeed >= {MIN_LEGIT_SUCCESS_PCT}%"),
            passed: enforce.legit.requests > 0 && success >= MIN_LEGIT_SUCCESS_PCT,
            measured: format!(
                "{} of {} ({})",
                enforce.legit.ok,
                enforce.legit.requests,
                percent(enforce.legit.success_pct)
            ),
        });
        let (offered, dropped) = enforce
            .attack
            .as_ref()
            .map_or((0, 0), |a| (a.offered_packets, a.dropped_packets));
        let challenged = enforce.attack.as_ref().map_or(0, |a| a.challenged_packets);
        out.push(Expectation {
            name: format!(
                "enforce phase: attack packets dropped or answered by the challenge >= \
                 {MIN_ATTACK_DROPPED_PCT}%"
            ),
            passed: offered > 0 && pct(dropped + challenged, offered) >= MIN_ATTACK_DROPPED_PCT,
            measured: format!(
                "{} dropped and {} challenged of {} ({}); legitimate packets dropped: {}",
                thousands(dropped),
                thousands(challenged),
                thousands(offered),
                percent_of(dropped + challenged, offered),
                thousands(enforce.legit_dropped_packets)
            ),
        });
        let newcomers = enforce.newcomers;
        out.push(Expectation {
            name: format!(
                "enforce phase: every brand-new client connects during the spoofed SYN flood \
                 within {} ms",
                clients::NEWCOMER_TIMEOUT.as_millis()
            ),
            passed: newcomers.attempts > 0 && newcomers.connected == newcomers.attempts,
            measured: format!(
                "{} of {} connected, slowest {}",
                newcomers.connected,
                newcomers.attempts,
                millis(newcomers.slowest_ms)
            ),
        });
    }
    if let Some(monitor) = phase(phases::MONITOR_PHASE) {
        out.push(Expectation {
            name: "monitor phase: nothing dropped, would-drops counted".to_owned(),
            passed: monitor.dropped_packets == 0 && monitor.would_drop_packets > 0,
            measured: format!(
                "{} dropped, {} would-drop",
                thousands(monitor.dropped_packets),
                thousands(monitor.would_drop_packets)
            ),
        });
    }
    for (index, client, change) in [
        (phases::ALLOWED_PHASE, clients::PARTNER, "allow add"),
        (phases::RAISED_PHASE, clients::MARKET_MAKER, "limit set"),
    ] {
        if let Some(after) = phase(index) {
            let served = &after.per_client[client].legit;
            out.push(Expectation {
                name: format!(
                    "after `{change}`: {} served >= {MIN_SERVED_AFTER_CHANGE_PCT}%",
                    CLIENTS[client].name
                ),
                passed: served.requests > 0
                    && served.success_pct.unwrap_or(0.0) >= MIN_SERVED_AFTER_CHANGE_PCT,
                measured: format!(
                    "{} of {} ({})",
                    served.ok,
                    served.requests,
                    percent(served.success_pct)
                ),
            });
        }
    }
    out
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// `part / whole` as a percentage, or "-" when `whole` is zero.
pub fn percent_of(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".to_owned()
    } else {
        percent(Some(pct(part, whole)))
    }
}

pub fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}%"))
}

pub fn millis(value: Option<f64>) -> String {
    match value {
        None => "-".to_owned(),
        Some(ms) if ms < 10.0 => format!("{ms:.2}ms"),
        Some(ms) if ms < 100.0 => format!("{ms:.1}ms"),
        Some(ms) => format!("{ms:.0}ms"),
    }
}

/// A rate such as `45.2k` or `870`.
pub fn rate(per_second: f64) -> String {
    if per_second >= 1000.0 {
        format!("{:.1}k", per_second / 1000.0)
    } else {
        format!("{per_second:.0}")
    }
}

/// `1234567` as `1,234,567`.
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(client: usize, started: f64, latency_ms: f64, outcome: Outcome) -> RequestRecord {
        RequestRecord {
            client,
            started,
            ended: started + latency_ms / 1000.0,
            outcome,
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values[..1], 99.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn latency_counts_only_successes() {
        let records = [
            record(0, 1.0, 2.0, Outcome::Ok),
            record(0, 1.1, 4.0, Outcome::Ok),
            record(1, 1.2, 1000.0, Outcome::Timeout),
            record(1, 1.3, 3.0, Outcome::Error),
        ];
        let summary = LegitSummary::of(records.iter());
        assert_eq!(summary.requests, 4);
        assert_eq!(summary.ok, 2);
        assert_eq!(summary.success_pct, Some(50.0));
        assert!((summary.p50_ms.unwrap() - 2.0).abs() < 1e-9);
        assert!((summary.p99_ms.unwrap() - 4.0).abs() < 1e-9);
    }

    #[test]
    fn formatting() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(rate(45_210.0), "45.2k");
        assert_eq!(rate(870.4), "870");
        assert_eq!(percent_of(1, 0), "-");
        assert_eq!(percent_of(1, 4), "25.0%");
        assert_eq!(millis(Some(1.234)), "1.23ms");
    }
}
