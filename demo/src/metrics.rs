//! The limiter's Prometheus endpoint, read the way a scraper on the edge host would: from
//! inside the edge namespace, on its loopback.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::{lab, netns};

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
const PACKETS_METRIC: &str = "limiter_packets_total";

/// Fetches `/metrics` from the daemon and returns the body.
pub fn scrape() -> Result<String> {
    netns::run_in(lab::EDGE_NS, || {
        let addr = lab::METRICS_ADDR;
        let mut stream = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT)
            .with_context(|| format!("connect to the metrics endpoint {addr}"))?;
        stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
        stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .context("send the scrape request")?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .context("read the metrics")?;
        let Some((head, body)) = response.split_once("\r\n\r\n") else {
            bail!("the metrics endpoint sent no complete response");
        };
        if !head.starts_with("HTTP/1.1 200") {
            bail!(
                "the metrics endpoint answered {:?}",
                head.lines().next().unwrap_or("")
            );
        }
        Ok(body.to_owned())
    })
}

/// `limiter_packets_total`, summed over interfaces: packets by (action, reason).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PacketCounters {
    /// Keyed by `"action/reason"`, e.g. `"drop/rate_packets"`.
    pub by_verdict: BTreeMap<String, u64>,
}

impl PacketCounters {
    /// Reads the counters out of a scrape.
    pub fn parse(text: &str) -> Self {
        let mut counters = Self::default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(PACKETS_METRIC) else {
                continue;
            };
            let Some((labels, value)) =
                rest.strip_prefix('{').and_then(|rest| rest.split_once('}'))
            else {
                continue;
            };
            // Counters are integers; OpenMetrics may print them as floats.
            let Some(value) = value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
            else {
                continue;
            };
            let (Some(action), Some(reason)) = (label(labels, "action"), label(labels, "reason"))
            else {
                continue;
            };
            *counters
                .by_verdict
                .entry(format!("{action}/{reason}"))
                .or_default() += value as u64;
        }
        counters
    }

    /// Every packet the program dropped.
    pub fn dropped(&self) -> u64 {
        self.sum(|key| key.starts_with("drop/"))
    }

    /// SYNs of unproven sources the program answered itself with a SYN-cookie challenge
    /// (`XDP_TX`): kept from the kernel like a drop.
    pub fn challenged(&self) -> u64 {
        self.sum(|key| key == "pass/challenged")
    }

    /// Packets monitor mode passed that enforce mode would have dropped.
    pub fn would_drop(&self) -> u64 {
        self.sum(|key| key == "pass/monitor_would_drop")
    }

    fn sum(&self, wanted: impl Fn(&str) -> bool) -> u64 {
        self.by_verdict
            .iter()
            .filter(|(key, _)| wanted(key))
            .map(|(_, value)| value)
            .sum()
    }

    /// The increase since `earlier` (counters only grow while the pins exist).
    pub fn since(&self, earlier: &Self) -> Self {
        let by_verdict = self
            .by_verdict
            .iter()
            .map(|(key, &now)| {
                let before = earlier.by_verdict.get(key).copied().unwrap_or(0);
                (key.clone(), now.saturating_sub(before))
            })
            .collect();
        Self { by_verdict }
    }
}

/// Whether the SYN-cookie challenge is engaged (`limiter_challenge_engaged`).
pub fn challenge_engaged(text: &str) -> bool {
    text.lines().any(|line| {
        // With or without an empty label set: `name 1` or `name{} 1`.
        line.strip_prefix("limiter_challenge_engaged")
            .map(|rest| rest.trim_start_matches("{}"))
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|v| v >= 1.0)
    })
}

/// The value of `name` in a Prometheus label set such as `a="x",b="y"`.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key.trim() == name).then(|| value.trim().trim_matches('"'))
    })
}

/// The `limiter_packets_total` lines of a scrape whose value is not zero.
pub fn nonzero_packet_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|line| {
            line.strip_prefix(PACKETS_METRIC)
                .is_some_and(|rest| rest.starts_with('{'))
        })
        .filter(|line| {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v != 0.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# HELP limiter_packets_total Frames seen by the XDP program.
# TYPE limiter_packets_total counter
limiter_packets_total{interface="edge0",action="pass",reason="within_limit"} 120
limiter_packets_total{interface="edge0",action="pass",reason="monitor_would_drop"} 7
limiter_packets_total{interface="edge0",action="drop",reason="rate_packets"} 900
limiter_packets_total{interface="edge1",action="drop",reason="rate_packets"} 100
limiter_packets_total{interface="edge0",action="drop",reason="rate_shared"} 0
limiter_packets_total_created{interface="edge0"} 1.7e9
limiter_bytes_total{interface="edge0",action="drop",reason="rate_packets"} 99999
limiter_packets_total{interface="edge0",action="pass",reason="challenged"} 40
# TYPE limiter_challenge_engaged gauge
limiter_challenge_engaged{} 1
"#;

    #[test]
    fn parses_and_sums_over_interfaces() {
        let counters = PacketCounters::parse(SCRAPE);
        assert_eq!(counters.by_verdict["drop/rate_packets"], 1000);
        assert_eq!(counters.dropped(), 1000);
        assert_eq!(counters.would_drop(), 7);
        assert_eq!(counters.challenged(), 40);
        assert_eq!(counters.by_verdict["pass/within_limit"], 120);
        assert!(!counters.by_verdict.keys().any(|k| k.contains("bytes")));
    }

    #[test]
    fn challenge_state() {
        assert!(challenge_engaged(SCRAPE));
        assert!(!challenge_engaged(
            &SCRAPE.replace("engaged{} 1", "engaged{} 0")
        ));
        assert!(!challenge_engaged(""));
        assert!(challenge_engaged("limiter_challenge_engaged 1\n"));
        assert!(!challenge_engaged("limiter_challenge_engaged_other 1\n"));
    }

    #[test]
    fn differences() {
        let before = PacketCounters::parse(SCRAPE);
        let after = PacketCounters::parse(&SCRAPE.replace("} 900", "} 1900"));
        let delta = after.since(&before);
        assert_eq!(delta.dropped(), 1000);
        assert_eq!(delta.would_drop(), 0);
    }

    #[test]
    fn nonzero_lines_only() {
        let lines = nonzero_packet_lines(SCRAPE);
        assert_eq!(lines.len(), 5);
        assert!(lines.iter().all(|l| !l.ends_with(" 0")));
    }
}
