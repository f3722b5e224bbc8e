//! The fleet: how long a deny written once takes to drop the attacker's packets on every
//! host. A real three-member etcd cluster and three real daemons (the fleet tests' lab);
//! each change is a `limiter fleet deny add`, timed from the entry's creation (the writer's
//! clock, stored in the entry) to the first frame of the denied source dropped on the last
//! of the three hosts (this machine's clock: the same clock).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use limiter_tests::fleet::{Etcd, Host, ok, until_connected};
use serde::Serialize;

/// Hosts following the cluster.
const HOSTS: usize = 3;

/// Convergence over many changes.
#[derive(Clone, Debug, Serialize)]
pub struct FleetConvergence {
    /// Changes measured.
    pub changes: usize,
    /// Hosts that had to drop each change's source.
    pub hosts: usize,
    /// Median milliseconds from an entry's creation to its source dropped on every host.
    pub p50_ms: f64,
    /// 99th percentile of the same.
    pub p99_ms: f64,
    /// The slowest change.
    pub max_ms: f64,
    /// Which change it was (0-based) and the host that took it last.
    pub slowest: (usize, usize),
    /// Milliseconds between two probes of one host: the measurement's resolution.
    pub probe_cycle_ms: f64,
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1_000.0)
}

/// The value at quantile `q` of sorted `samples` (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Writes `changes` denies, one at a time, and measures each one's convergence.
pub fn convergence(changes: usize) -> Result<FleetConvergence> {
    let etcd = Etcd::cluster();
    let hosts: Vec<Host> = (0..HOSTS).map(|i| Host::new(&etcd, i, "")).collect();
    until_connected(&hosts);
    let mut seen_ms = Vec::with_capacity(changes);
    let mut probes = 0u64;
    let started = now_ms();
    for change in 0..changes {
        // 198.18.0.0/15 is the benchmarking range: one /24 per change.
        let (prefix, source) = (
            format!("198.18.{change}.0/24"),
            format!("198.18.{change}.7"),
        );
        ok(&etcd.limiter(&["deny", "add", &prefix, "--reason", "bench"]));
        let mut done = [false; HOSTS];
        let mut last = 0;
        let deadline = now_ms() + 10_000.0;
        while done.iter().any(|d| !d) {
            for (host, done) in hosts.iter().zip(&mut done) {
                if !*done {
                    probes += 1;
                    *done = host.probe(&source);
                    if *done {
                        last = hosts
                            .iter()
                            .position(|h| std::ptr::eq(h, host))
                            .unwrap_or(0);
                    }
                }
            }
            ensure!(
                now_ms() < deadline,
                "{prefix} not denied on every host within 10 s"
            );
        }
        seen_ms.push((prefix, now_ms(), last));
    }
    let probe_cycle_ms = (now_ms() - started) / probes.max(1) as f64;
    // Each entry's creation time, as the writer stored it.
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&etcd.limiter(&["deny", "list", "--json"])))
            .context("fleet deny list --json")?;
    let mut samples = Vec::with_capacity(changes);
    for (change, (prefix, seen, last)) in seen_ms.iter().enumerate() {
        let created = listed["deny"][prefix]["created_unix_ms"]
            .as_f64()
            .with_context(|| format!("{prefix} is not listed"))?;
        samples.push((seen - created, change, *last));
    }
    samples.sort_by(|a, b| a.0.total_cmp(&b.0));
    let slowest = samples.last().map_or((0, 0), |s| (s.1, s.2));
    let samples: Vec<f64> = samples.into_iter().map(|s| s.0).collect();
    drop(hosts);
    drop(etcd);
    std::thread::sleep(Duration::from_millis(100));
    Ok(FleetConvergence {
        changes,
        hosts: HOSTS,
        p50_ms: quantile(&samples, 0.50),
        p99_ms: quantile(&samples, 0.99),
        max_ms: samples.last().copied().unwrap_or_default(),
        slowest,
        probe_cycle_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn nearest_rank_quantiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&samples, 0.50), 50.0);
        assert_eq!(quantile(&samples, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
    }
}
