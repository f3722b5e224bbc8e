//! The story, phase by phase, each `--duration` seconds and shown live, one line a second:
//!
//! 1. baseline: limiter not attached, no attack;
//! 2. the attack with the limiter not attached: what the host really suffers;
//! 3. the daemon attaches in monitor mode: would-drops counted, nothing dropped;
//! 4. the operator switches to enforce: the attack is dropped, the clients are served;
//! 5. operator actions through the real CLI, while the partner and the market maker surge
//!    past their limits: (a) both limited, (b) after `allow add` for the partner,
//!    (c) after `limit set` for the market makers.
//!
//! The attack phases (2-4) run all five floods at once for the whole phase.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::{
    attacks::{Attack, AttackPlan, AttackTotals},
    clients::{self, Completed, LegitClients, NewcomerRecord, Outcome, RequestRecord},
    control::{self, LabFiles, LimiterCli},
    lab::{self, Lab},
    metrics::{self, PacketCounters},
    report, shutdown,
};

/// Whether and how the limiter is at work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LimiterState {
    /// Not attached.
    Off,
    Monitor,
    Enforce,
}

impl LimiterState {
    pub fn label(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Monitor => "monitor",
            Self::Enforce => "enforce",
        }
    }
}

/// One phase of the story.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PhaseSpec {
    pub id: &'static str,
    pub title: &'static str,
    /// A few words for the chart.
    pub short: &'static str,
    pub limiter: LimiterState,
    pub attack: bool,
}

pub const PHASES: [PhaseSpec; 7] = [
    PhaseSpec {
        id: "1",
        title: "baseline",
        short: "baseline",
        limiter: LimiterState::Off,
        attack: false,
    },
    PhaseSpec {
        id: "2",
        title: "attack, limiter off",
        short: "attack, off",
        limiter: LimiterState::Off,
        attack: true,
    },
    PhaseSpec {
        id: "3",
        title: "attack, monitor mode",
        short: "monitor",
        limiter: LimiterState::Monitor,
        attack: true,
    },
    PhaseSpec {
        id: "4",
        title: "attack, enforce mode",
        short: "enforce",
        limiter: LimiterState::Enforce,
        attack: true,
    },
    PhaseSpec {
        id: "5a",
        title: "partner + MM surge",
        short: "surge",
        limiter: LimiterState::Enforce,
        attack: false,
    },
    PhaseSpec {
        id: "5b",
        title: "after allow add (partner)",
        short: "allow add",
        limiter: LimiterState::Enforce,
        attack: false,
    },
    PhaseSpec {
        id: "5c",
        title: "after limit set (MM class)",
        short: "limit set",
        limiter: LimiterState::Enforce,
        attack: false,
    },
];

/// Index in [`PHASES`] of the attack without the limiter.
pub const UNPROTECTED_PHASE: usize = 1;
/// Index in [`PHASES`] of the monitor phase.
pub const MONITOR_PHASE: usize = 2;
/// Index in [`PHASES`] of the enforce phase, which decides the exit status.
pub const ENFORCE_PHASE: usize = 3;
pub const SURGE_PHASE: usize = 4;
pub const ALLOWED_PHASE: usize = 5;
pub const RAISED_PHASE: usize = 6;

/// Requests per second of the partner and of the market maker during their surge: several
/// times what their limits admit (each request is about six packets).
pub const PARTNER_SURGE_RATE: u32 = 100;
pub const MARKET_MAKER_SURGE_RATE: u32 = 200;

/// Time between attaching the limiter and the monitor phase: the legitimate clients become
/// known sources, as they would be on a host that had the limiter before the attack began.
const SETTLE: Duration = Duration::from_secs(1);

/// One second of one phase, measured at the attacker and at the limiter.
#[derive(Clone, Debug, Serialize)]
pub struct Second {
    pub phase: usize,
    /// Seconds since the demo's start.
    pub start: f64,
    pub end: f64,
    /// Frames the attacker's interface transmitted.
    pub attack_offered_packets: u64,
    /// Frames the limiter dropped (every reason).
    pub dropped_packets: u64,
    /// Frames monitor mode passed but would have dropped.
    pub would_drop_packets: u64,
    /// SYNs the limiter answered with a SYN-cookie challenge.
    pub challenged_packets: u64,
    /// Whether attack mode's challenge was engaged at the end of the second.
    pub challenge_engaged: bool,
}

/// A CLI command the operator ran.
#[derive(Clone, Debug, Serialize)]
pub struct OperatorCommand {
    /// Seconds since the demo's start.
    pub at: f64,
    pub command: String,
    pub output: String,
}

/// What one phase measured.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseRecord {
    pub index: usize,
    pub start: f64,
    pub end: f64,
    /// Frames the attacker's interface transmitted during the phase.
    pub attack_offered_packets: u64,
    /// The limiter's packet counters' increase during the phase.
    pub limiter: PacketCounters,
    /// Of the dropped packets, those of legitimate clients (from the per-source table).
    pub legit_dropped_packets: u64,
    /// What each flood sent, counted at the generator.
    pub attack: Option<AttackTotals>,
    /// Commands run just before the phase.
    pub operator_commands: Vec<OperatorCommand>,
}

/// Everything the run measured.
pub struct RunData {
    pub phases: Vec<PhaseRecord>,
    pub seconds: Vec<Second>,
    pub requests: Vec<RequestRecord>,
    pub newcomers: Vec<NewcomerRecord>,
    pub top: String,
    pub metrics: String,
    /// `limiter attacks` at the end of the run, as printed and as records.
    pub attacks_table: String,
    pub attacks: Vec<limiter_user::attacks::AttackRecord>,
    /// The demo's start in Unix seconds, to place the records on its time axis.
    pub epoch_unix: f64,
}

/// Counter readings at one moment.
#[derive(Clone, Default)]
struct Snapshot {
    attacker_tx: u64,
    limiter: PacketCounters,
    challenge_engaged: bool,
}

struct Runner<'a> {
    epoch: Instant,
    phase_length: Duration,
    plan: AttackPlan,
    lab: &'a mut Lab,
    files: &'a LabFiles,
    cli: &'a LimiterCli,
    clients: &'a mut LegitClients,
    daemon_running: bool,
    seconds: Vec<Second>,
    phases: Vec<PhaseRecord>,
    pending_commands: Vec<OperatorCommand>,
}

/// Runs every phase. The clients must be running and the API answering.
pub fn run(
    epoch: Instant,
    phase_length: Duration,
    plan: AttackPlan,
    lab: &mut Lab,
    files: &LabFiles,
    cli: &LimiterCli,
    mut clients: LegitClients,
) -> Result<RunData> {
    let mut runner = Runner {
        epoch,
        phase_length,
        plan,
        lab,
        files,
        cli,
        clients: &mut clients,
        daemon_running: false,
        seconds: Vec::new(),
        phases: Vec::new(),
        pending_commands: Vec::new(),
    };
    runner.run_all()?;
    let Runner {
        seconds, phases, ..
    } = runner;
    let completed = clients.finish()?;
    let top = cli
        .run(&["top", "-n", "5", "--totals"])
        .context("read the top sources")?;
    let metrics = metrics::scrape().context("read the final metrics")?;
    let attacks_table = cli.run(&["attacks"]).context("list the attacks")?;
    let attacks = attack_records(cli)?;
    let epoch_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
        - epoch.elapsed().as_secs_f64();
    Ok(RunData {
        phases,
        seconds,
        requests: completed.requests,
        newcomers: completed.newcomers,
        top,
        metrics,
        attacks_table,
        attacks,
        epoch_unix,
    })
}

/// The attacks the daemon recorded, from `limiter attacks --json`.
fn attack_records(cli: &LimiterCli) -> Result<Vec<limiter_user::attacks::AttackRecord>> {
    #[derive(serde::Deserialize)]
    struct Listing {
        items: Vec<limiter_user::attacks::AttackRecord>,
    }
    let text = cli
        .run(&["attacks", "--json"])
        .context("list the attacks")?;
    let listing: Listing = serde_json::from_str(&text).context("read `limiter attacks --json`")?;
    Ok(listing.items)
}

impl Runner<'_> {
    fn run_all(&mut self) -> Result<()> {
        self.run_phase(0)?;
        self.run_phase(1)?;

        say(&format!(
            "attaching the limiter to {} in native mode (monitor) ...",
            lab::EDGE_IF
        ));
        let attach_started = Instant::now();
        self.cli.start_daemon(self.lab, self.files)?;
        self.daemon_running = true;
        say(&format!(
            "limiter attached in {} ms; letting the clients become known sources",
            attach_started.elapsed().as_millis()
        ));
        shutdown::sleep_until(Instant::now() + SETTLE)
            .then_some(())
            .ok_or(shutdown::Interrupted)?;
        self.run_phase(MONITOR_PHASE)?;

        self.operator(&["mode", "enforce"])?;
        self.run_phase(ENFORCE_PHASE)?;

        say(&format!(
            "the partner surges to {PARTNER_SURGE_RATE} req/s and the market maker to {MARKET_MAKER_SURGE_RATE} req/s"
        ));
        self.clients.set_rate(clients::PARTNER, PARTNER_SURGE_RATE);
        self.clients
            .set_rate(clients::MARKET_MAKER, MARKET_MAKER_SURGE_RATE);
        self.run_phase(SURGE_PHASE)?;

        let partner = format!("{}/32", lab::PARTNER_V4);
        self.operator(&["allow", "add", &partner])?;
        self.run_phase(ALLOWED_PHASE)?;

        let (pps, burst) = (
            control::MARKET_MAKER_RAISED_PPS.to_string(),
            control::MARKET_MAKER_RAISED_BURST.to_string(),
        );
        self.operator(&[
            "limit",
            "set",
            "--class",
            control::MARKET_MAKER_CLASS,
            "--pps",
            &pps,
            "--burst",
            &burst,
        ])?;
        self.run_phase(RAISED_PHASE)?;
        Ok(())
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Runs a CLI command as the operator would, shows it, and keeps it for the report.
    fn operator(&mut self, args: &[&str]) -> Result<()> {
        shutdown::check()?;
        let output = self.cli.run(args)?;
        say(&format!("$ limiter {}", args.join(" ")));
        for line in output.lines() {
            say(&format!("  {line}"));
        }
        self.pending_commands.push(OperatorCommand {
            at: self.now(),
            command: self.cli.display(args),
            output: output.trim_end().to_owned(),
        });
        Ok(())
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let attacker_tx = lab::link_counters(lab::ATTACKER_NS, lab::ATTACKER_IF)?.tx_packets;
        let scrape = if self.daemon_running {
            metrics::scrape()?
        } else {
            String::new()
        };
        Ok(Snapshot {
            attacker_tx,
            limiter: PacketCounters::parse(&scrape),
            challenge_engaged: metrics::challenge_engaged(&scrape),
        })
    }

    /// Packets dropped so far from the legitimate clients' addresses.
    fn legit_dropped(&self) -> Result<u64> {
        if !self.daemon_running {
            return Ok(0);
        }
        let sources: Vec<_> = clients::CLIENTS.iter().map(|c| c.source).collect();
        self.cli.dropped_from(&sources)
    }

    fn run_phase(&mut self, index: usize) -> Result<()> {
        shutdown::check()?;
        let spec = &PHASES[index];
        let whole_seconds = self.phase_length.as_secs();
        let bar = phase_progress(spec, whole_seconds);
        let progress = &bar.0;

        // Live lines show the requests that end during each second of this phase only.
        self.clients.take_new()?;
        // A brand-new client connects each second of the attack: does it get through?
        self.clients.set_newcomers(spec.attack);
        let legit_dropped_before = self.legit_dropped()?;
        let first = self.snapshot()?;
        let started = Instant::now();
        let start = self.now();
        let until = started + self.phase_length;
        let attack = if spec.attack {
            Some(Attack::launch(self.plan, until)?)
        } else {
            None
        };

        let mut previous = first.clone();
        let mut second_start = start;
        for second in 1..=whole_seconds {
            let tick = started + Duration::from_secs(second);
            if !shutdown::sleep_until(tick) {
                return Err(shutdown::Interrupted.into());
            }
            self.lab.check_processes()?;
            let current = self.snapshot()?;
            let end = self.now();
            let increase = current.limiter.since(&previous.limiter);
            let measured = Second {
                phase: index,
                start: second_start,
                end,
                attack_offered_packets: current.attacker_tx.saturating_sub(previous.attacker_tx),
                dropped_packets: increase.dropped(),
                would_drop_packets: increase.would_drop(),
                challenged_packets: increase.challenged(),
                challenge_engaged: current.challenge_engaged,
            };
            let completed = self.clients.take_new()?;
            let line = live_line(spec, (second, whole_seconds), &measured, &completed);
            progress.set_position(second);
            if progress.is_hidden() {
                println!("{line}");
            } else {
                progress.println(line);
            }
            self.seconds.push(measured);
            previous = current;
            second_start = end;
        }
        self.clients.set_newcomers(false);
        let totals = attack.map(Attack::finish).transpose()?;
        let legit_dropped = self.legit_dropped()?.saturating_sub(legit_dropped_before);

        self.phases.push(PhaseRecord {
            index,
            start,
            end: second_start,
            attack_offered_packets: previous.attacker_tx.saturating_sub(first.attacker_tx),
            limiter: previous.limiter.since(&first.limiter),
            legit_dropped_packets: legit_dropped,
            attack: totals,
            operator_commands: std::mem::take(&mut self.pending_commands),
        });
        Ok(())
    }
}

/// The phase's progress bar, removed from the screen however the phase ends.
struct PhaseProgress(ProgressBar);

impl Drop for PhaseProgress {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn phase_progress(spec: &PhaseSpec, seconds: u64) -> PhaseProgress {
    let progress = ProgressBar::new(seconds);
    let style = ProgressStyle::with_template("{spinner} phase {prefix} [{bar:10}] {pos}/{len}s")
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    progress.set_style(style);
    progress.set_prefix(format!("{} {}", spec.id, spec.title));
    progress.enable_steady_tick(Duration::from_millis(100));
    PhaseProgress(progress)
}

fn say(text: &str) {
    println!("{text}");
}

/// The line shown for one second of a phase: `at` of `of` seconds.
fn live_line(
    spec: &PhaseSpec,
    (at, of): (u64, u64),
    second: &Second,
    completed: &Completed,
) -> String {
    let per_second = |packets: u64| report::rate(packets as f64 / second.duration());
    let dropped = per_second(second.dropped_packets);
    let attack = match (spec.attack, spec.limiter) {
        (false, LimiterState::Off) => "no attack".to_owned(),
        (false, _) => format!("no attack, dropped {dropped} pps"),
        (true, limiter) => {
            let offered = per_second(second.attack_offered_packets);
            match limiter {
                LimiterState::Off => format!("attack {offered} pps, dropped 0 (limiter off)"),
                LimiterState::Monitor => format!(
                    "attack {offered} pps, dropped 0, would-drop {}",
                    per_second(second.would_drop_packets)
                ),
                LimiterState::Enforce if second.challenged_packets > 0 => format!(
                    "attack {offered} pps, dropped {dropped} + challenged {} ({})",
                    per_second(second.challenged_packets),
                    report::percent_of(
                        second.dropped_packets + second.challenged_packets,
                        second.attack_offered_packets
                    )
                ),
                LimiterState::Enforce => format!(
                    "attack {offered} pps, dropped {dropped} ({})",
                    report::percent_of(second.dropped_packets, second.attack_offered_packets)
                ),
            }
        }
    };
    let legit = report::LegitSummary::of(completed.requests.iter());
    let mut line = format!(
        "{:>2} {:<7} {at:>2}/{of}s | {attack:<46} | legit {:>3} req/s {:>6} ok p50 {} p99 {}",
        spec.id,
        spec.limiter.label(),
        legit.requests,
        report::percent(legit.success_pct),
        report::millis(legit.p50_ms),
        report::millis(legit.p99_ms),
    );
    if spec.id.starts_with('5') {
        for (client, label) in [(clients::PARTNER, "partner"), (clients::MARKET_MAKER, "MM")] {
            let own =
                report::LegitSummary::of(completed.requests.iter().filter(|r| r.client == client));
            line.push_str(&format!(" | {label} {}/{} ok", own.ok, own.requests));
        }
    }
    for newcomer in &completed.newcomers {
        line.push_str(&format!(" | {}", newcomer_text(newcomer)));
    }
    match (second.challenge_engaged, spec.limiter) {
        (false, _) => {}
        (true, LimiterState::Monitor) => {
            line.push_str(" | attack mode armed (monitor mode: no challenge sent)");
        }
        (true, _) => line.push_str(" | attack mode: SYN-cookie challenge engaged"),
    }
    line
}

/// How a brand-new client fared, in a few words.
pub fn newcomer_text(newcomer: &NewcomerRecord) -> String {
    match newcomer.outcome {
        Outcome::Ok => format!(
            "new client {} connected, answered in {}",
            newcomer.source,
            report::millis(Some(newcomer.latency_ms()))
        ),
        Outcome::Timeout => format!(
            "new client {} got no answer within {} ms",
            newcomer.source,
            clients::NEWCOMER_TIMEOUT.as_millis()
        ),
        Outcome::Error => format!("new client {} failed (refused or reset)", newcomer.source),
    }
}

impl Second {
    pub fn duration(&self) -> f64 {
        (self.end - self.start).max(1e-3)
    }
}
