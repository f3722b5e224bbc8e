//! The control plane: what one `limit set` costs in map writes with a large list installed.
//!
//! The daemon turns a policy change into the writes [`plan`] computes (see
//! `limiter-user/src/plan.rs`); this measures those writes for a change of the default
//! limit with 100,000 deny entries in force, next to rewriting every entry (what each change
//! cost before the plan), on a loaded program's real maps.

use std::time::Instant;

use anyhow::{Result, ensure};
use ipnet::IpNet;
use limiter_user::{
    LimitSpec, Limiter, LoadOptions, Policy,
    plan::{MapContents, plan},
};
use serde::Serialize;

/// List entries installed while a limit changes.
pub const LIST_ENTRIES: u32 = 100_000;

/// What one limit change cost.
#[derive(Clone, Debug, Serialize)]
pub struct ControlPlane {
    /// Deny entries in force.
    pub list_entries: u32,
    /// Map writes the change took.
    pub writes: usize,
    /// Median microseconds of those writes.
    pub writes_us: f64,
    /// Median microseconds of the whole apply (diffing the policies included).
    pub apply_us: f64,
    /// Writes of rewriting every entry.
    pub rewrite_all_writes: usize,
    /// Median microseconds of rewriting every entry, for comparison.
    pub rewrite_all_us: f64,
    /// Changes measured.
    pub rounds: usize,
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Measures `rounds` changes of the default limit, alternating between two rates.
pub fn control_plane(rounds: usize) -> Result<ControlPlane> {
    let deny: Vec<IpNet> = (0..LIST_ENTRIES)
        .map(|i| IpNet::new(std::net::Ipv4Addr::from(0x0b00_0000 + i).into(), 32))
        .collect::<Result<_, _>>()?;
    let policy = |pps| Policy {
        deny: deny.clone(),
        default_limit: LimitSpec::packets(pps, 2 * pps),
        ..Policy::default()
    };
    let (a, b) = (policy(1_000).compile()?, policy(500).compile()?);
    let mut limiter = Limiter::load(&LoadOptions {
        max_sources: Some(4_096),
        max_aggregates: Some(1_024),
        pin_dir: None,
    })?;
    limiter.apply(&a)?;

    let (contents_a, contents_b) = (MapContents::from(&a), MapContents::from(&b));
    let mut writes_us = Vec::new();
    let mut apply_us = Vec::new();
    let mut writes = 0;
    for round in 0..rounds {
        let (from, to) = if round.is_multiple_of(2) {
            (&contents_a, &contents_b)
        } else {
            (&contents_b, &contents_a)
        };
        let planned = plan(from, to);
        writes = planned.len();
        let start = Instant::now();
        limiter.perform(&planned)?;
        writes_us.push(start.elapsed().as_secs_f64() * 1e6);
    }
    // The limiter now holds `a` or `b`; apply() the other and back, timing the whole call.
    let mut current = if rounds.is_multiple_of(2) { &a } else { &b };
    limiter.apply(current)?;
    for _ in 0..rounds {
        current = if std::ptr::eq(current, &a) { &b } else { &a };
        let start = Instant::now();
        let done = limiter.apply(current)?;
        apply_us.push(start.elapsed().as_secs_f64() * 1e6);
        ensure!(
            done == writes,
            "apply took {done} writes, the plan {writes}"
        );
    }
    ensure!(
        writes == 1,
        "a limit change should be one write, the plan has {writes}"
    );

    // Rewriting everything: every entry of the policy, as each change did before.
    let everything = plan(&MapContents::default(), &contents_a);
    let mut rewrite_all_us = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        limiter.perform(&everything)?;
        rewrite_all_us.push(start.elapsed().as_secs_f64() * 1e6);
    }
    Ok(ControlPlane {
        list_entries: LIST_ENTRIES,
        writes,
        writes_us: median(writes_us),
        apply_us: median(apply_us),
        rewrite_all_writes: everything.len(),
        rewrite_all_us: median(rewrite_all_us),
        rounds,
    })
}
