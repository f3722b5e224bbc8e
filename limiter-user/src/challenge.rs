//! When the SYN-cookie challenge is engaged: `on` always, `off` never, `auto` in attack mode,
//! decided purely from the rate of SYNs from unproven sources, with hysteresis so a
//! flapping flood is one attack mode, not many.

use crate::policy::{ChallengeMode, ChallengeSpec};

/// What the controller remembers between observations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Controller {
    /// Whether the challenge is engaged.
    pub engaged: bool,
    /// Consecutive seconds the rate has been at or above the engage threshold.
    above: u64,
    /// Consecutive seconds below it while engaged.
    calm: u64,
}

/// A change the daemon carries out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Start challenging.
    Engage,
    /// Stop.
    Disengage,
}

impl Controller {
    /// One second's observation: `syns` SYNs from unproven sources arrived (passed, dropped
    /// or challenged). Returns the transition to carry out, if any.
    pub fn observe(&mut self, spec: &ChallengeSpec, syns: u64) -> Option<Transition> {
        let want = match spec.mode {
            ChallengeMode::Off => false,
            ChallengeMode::On => true,
            ChallengeMode::Auto => {
                if syns >= spec.engage_syns_per_second {
                    self.above = self.above.saturating_add(1);
                    self.calm = 0;
                } else {
                    self.above = 0;
                    self.calm = self.calm.saturating_add(1);
                }
                if self.engaged {
                    self.calm < spec.calm_seconds
                } else {
                    self.above >= spec.engage_seconds
                }
            }
        };
        self.settle(want)
    }

    /// Applies a change of settings at once (`on` engages, `off` disengages), without
    /// waiting for the next observation.
    pub fn reconfigure(&mut self, spec: &ChallengeSpec) -> Option<Transition> {
        match spec.mode {
            ChallengeMode::Off => self.settle(false),
            ChallengeMode::On => self.settle(true),
            ChallengeMode::Auto => None,
        }
    }

    fn settle(&mut self, want: bool) -> Option<Transition> {
        if want == self.engaged {
            return None;
        }
        self.engaged = want;
        self.above = 0;
        self.calm = 0;
        Some(if want {
            Transition::Engage
        } else {
            Transition::Disengage
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto() -> ChallengeSpec {
        ChallengeSpec {
            mode: ChallengeMode::Auto,
            ports: vec![443..=443],
            engage_syns_per_second: 1_000,
            engage_seconds: 3,
            calm_seconds: 5,
            ..ChallengeSpec::default()
        }
    }

    /// Feeds a second-by-second rate; returns the second of each transition.
    fn run(spec: &ChallengeSpec, rates: &[u64]) -> Vec<(usize, Transition)> {
        let mut c = Controller::default();
        rates
            .iter()
            .enumerate()
            .filter_map(|(second, rate)| c.observe(spec, *rate).map(|t| (second, t)))
            .collect()
    }

    #[test]
    fn auto_engages_after_sustained_syns_and_disengages_after_calm() {
        let spec = auto();
        let mut rates = vec![10, 5_000, 5_000, 5_000, 5_000];
        rates.extend([10; 6]);
        assert_eq!(
            run(&spec, &rates),
            [(3, Transition::Engage), (9, Transition::Disengage)]
        );
    }

    #[test]
    fn a_flapping_flood_is_one_attack_mode() {
        let spec = auto();
        // Engaged at second 2; the flood pauses for 4 s (under the 5 s calm) and returns.
        let rates = [5_000, 5_000, 5_000, 0, 0, 0, 0, 5_000, 0, 0, 0, 0, 0];
        assert_eq!(
            run(&spec, &rates),
            [(2, Transition::Engage), (12, Transition::Disengage)]
        );
    }

    #[test]
    fn a_short_burst_never_engages() {
        assert_eq!(run(&auto(), &[5_000, 5_000, 10, 5_000, 5_000, 10]), []);
    }

    #[test]
    fn on_and_off_ignore_the_rate_and_apply_at_once() {
        let mut spec = auto();
        spec.mode = ChallengeMode::On;
        let mut c = Controller::default();
        assert_eq!(c.reconfigure(&spec), Some(Transition::Engage));
        assert_eq!(c.observe(&spec, 0), None, "stays on without an attack");
        spec.mode = ChallengeMode::Off;
        assert_eq!(c.reconfigure(&spec), Some(Transition::Disengage));
        assert_eq!(c.observe(&spec, 1_000_000), None, "stays off in an attack");
        spec.mode = ChallengeMode::Auto;
        assert_eq!(c.reconfigure(&spec), None, "auto waits for the rate");
    }
}
