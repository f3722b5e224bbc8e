//! Allowlisted heavy hitters. An allowlisted source gets no state in the program (that is
//! what keeps its path cheap), so its traffic is known only from samples: one of every
//! [`SAMPLE_EVERY`] frames a CPU passes as allowlisted reaches the daemon with its source
//! prefix. The tally adds them up per interface and source, for `top` to read twice an
//! interval apart, as it reads the source tables.
//!
//! The counts are estimates: each CPU's sampling is a fixed stride, so a source's count is
//! off by at most [`SAMPLE_EVERY`] frames per CPU over any interval, which for a heavy
//! hitter (thousands of frames a second) is a few percent.

use std::collections::HashMap;

use ipnet::IpNet;
pub use limiter_common::layout::SAMPLE_EVERY;

/// Sources tallied at most; past it the lightest half is forgotten.
const MAX_SOURCES: usize = 16_384;

/// Estimated frames passed per (interface, source prefix), since the daemon started.
#[derive(Clone, Debug, Default)]
pub struct AllowlistedTally {
    frames: HashMap<(String, IpNet), u64>,
}

impl AllowlistedTally {
    /// Adds a sample standing for `frames` frames.
    pub fn add(&mut self, interface: &str, source: IpNet, frames: u64) {
        if let Some(count) = self.frames.get_mut(&(interface.to_owned(), source)) {
            *count += frames;
            return;
        }
        if self.frames.len() >= MAX_SOURCES {
            self.forget_lightest_half();
        }
        self.frames.insert((interface.to_owned(), source), frames);
    }

    /// The estimated frames of every source tallied.
    pub fn snapshot(&self) -> HashMap<(String, IpNet), u64> {
        self.frames.clone()
    }

    /// A heavy hitter outlives a crowd of light sources: the lighter half is dropped, so the
    /// tally stays bounded whatever a flood of allowlisted addresses does.
    fn forget_lightest_half(&mut self) {
        let mut counts: Vec<u64> = self.frames.values().copied().collect();
        let middle = counts.len() / 2;
        let (_, &mut threshold, _) = counts.select_nth_unstable(middle);
        self.frames.retain(|_, &mut count| count > threshold);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn samples_add_up_per_interface_and_source() {
        let mut tally = AllowlistedTally::default();
        for _ in 0..3 {
            tally.add("eth1", net("192.0.2.10/32"), SAMPLE_EVERY);
        }
        tally.add("eth2", net("192.0.2.10/32"), SAMPLE_EVERY);
        let seen = tally.snapshot();
        assert_eq!(
            seen[&("eth1".to_owned(), net("192.0.2.10/32"))],
            3 * SAMPLE_EVERY
        );
        assert_eq!(
            seen[&("eth2".to_owned(), net("192.0.2.10/32"))],
            SAMPLE_EVERY
        );
    }

    #[test]
    fn stays_bounded_and_keeps_the_heavy_hitter() {
        let mut tally = AllowlistedTally::default();
        for _ in 0..100 {
            tally.add("eth1", net("198.51.100.1/32"), SAMPLE_EVERY);
        }
        for i in 0..(3 * MAX_SOURCES as u32) {
            let address = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            tally.add("eth1", IpNet::from(std::net::IpAddr::from(address)), 1);
        }
        let seen = tally.snapshot();
        assert!(seen.len() <= MAX_SOURCES, "{}", seen.len());
        assert_eq!(
            seen[&("eth1".to_owned(), net("198.51.100.1/32"))],
            100 * SAMPLE_EVERY
        );
    }
}
