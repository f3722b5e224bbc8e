//! The rate arithmetic: GCRA (the generic cell rate algorithm) in exact integer form.
//!
//! A bucket is one 64-bit word, the theoretical arrival time (TAT). Time is kept in *scaled*
//! units: nanoseconds multiplied by `scale`, where `scale / increment == rate / 1e9` after both
//! are divided by `gcd(rate, 1e9)`. One unit of cost (a packet, or a byte) moves the TAT forward
//! by `increment`, so a rate of 3 packets/s is exactly 3 packets/s, with no rounding of the
//! emission interval. All arithmetic is on `u64` with wrap-around; only differences between
//! two scaled times are ever interpreted, and the caller guarantees they stay far below 2^63
//! (see [`Gcra::admit`]).
//!
//! Because the state is one word, concurrent updates from several CPUs are made correct with a
//! compare-and-swap loop in the kernel: read the word, compute the new one with [`Gcra::admit`],
//! and retry if another CPU changed it in between.

/// Nanoseconds per second: the time base of every rate.
pub const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// The largest tolerance (burst × increment) accepted, so that `tolerance + cost × increment`
/// and every difference of scaled times stays below 2^63.
pub const MAX_TOLERANCE: u64 = 1 << 61;

/// The largest rate accepted, per second: far above any link, small enough that
/// `now × scale` differences over a full refill stay representable.
pub const MAX_RATE: u64 = 1 << 40;

/// Costs from this value up never conform (no frame is that large).
pub const MAX_COST: u64 = 1 << 33;

/// Parameters of one GCRA bucket, computed once on the user side and read by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gcra {
    /// Scaled time units per nanosecond. Zero disables the bucket (everything is admitted).
    pub scale: u64,
    /// Scaled time units consumed by one unit of cost.
    pub increment: u64,
    /// How far the TAT may run ahead of now: `burst × increment`.
    pub tolerance: u64,
    /// Nanoseconds after which an idle bucket is certainly full again (`tolerance / scale`,
    /// rounded up). Beyond it the stored TAT is ignored, which keeps wrap-around harmless.
    pub refill_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Gcra>() == 32);

/// Why a rate and burst pair cannot be turned into a bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateError {
    /// A zero rate with a non-zero burst would admit one burst and then nothing, ever.
    ZeroRateWithBurst,
    /// A positive rate with a zero burst never admits anything.
    ZeroBurst,
    /// The rate is above [`MAX_RATE`].
    RateTooHigh,
    /// `burst × increment` is above [`MAX_TOLERANCE`].
    BurstTooLarge,
}

impl core::fmt::Display for RateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let text = match self {
            Self::ZeroRateWithBurst => "a rate of zero with a non-zero burst",
            Self::ZeroBurst => "a non-zero rate with a burst of zero admits nothing",
            Self::RateTooHigh => "the rate is above the supported maximum (2^40 per second)",
            Self::BurstTooLarge => "the burst is too large for this rate",
        };
        f.write_str(text)
    }
}

impl core::error::Error for RateError {}

const fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a
}

impl Gcra {
    /// A bucket that admits everything (and never touches its state).
    pub const UNLIMITED: Self = Self {
        scale: 0,
        increment: 0,
        tolerance: 0,
        refill_ns: 0,
    };

    /// A bucket that admits nothing: rate zero, burst zero.
    pub const DENY_ALL: Self = Self {
        scale: 1,
        increment: 1,
        tolerance: 0,
        refill_ns: 0,
    };

    /// `rate` units per second with `burst` units admitted at once from idle.
    /// `rate = 0, burst = 0` is [`Gcra::DENY_ALL`].
    pub const fn per_second(rate: u64, burst: u64) -> Result<Self, RateError> {
        if rate == 0 {
            return if burst == 0 {
                Ok(Self::DENY_ALL)
            } else {
                Err(RateError::ZeroRateWithBurst)
            };
        }
        if burst == 0 {
            return Err(RateError::ZeroBurst);
        }
        if rate > MAX_RATE {
            return Err(RateError::RateTooHigh);
        }
        let divisor = gcd(rate, NANOS_PER_SECOND);
        let scale = rate / divisor;
        let increment = NANOS_PER_SECOND / divisor;
        let tolerance = match burst.checked_mul(increment) {
            Some(t) if t <= MAX_TOLERANCE => t,
            _ => return Err(RateError::BurstTooLarge),
        };
        Ok(Self {
            scale,
            increment,
            tolerance,
            refill_ns: tolerance.div_ceil(scale),
        })
    }

    /// Whether this bucket limits anything at all.
    #[inline(always)]
    pub const fn is_limited(&self) -> bool {
        self.scale != 0
    }

    /// The state of a bucket that is full at `now_ns`.
    #[inline(always)]
    pub const fn full_at(&self, now_ns: u64) -> u64 {
        now_ns.wrapping_mul(self.scale)
    }

    /// Whole units the bucket would admit at `now_ns` (what `limiter explain` shows as
    /// tokens left), read the way [`Gcra::admit`] reads the state.
    pub const fn available(&self, tat: u64, last_update_ns: u64, now_ns: u64) -> u64 {
        if !self.is_limited() || self.increment == 0 {
            return u64::MAX;
        }
        self.tolerance
            .saturating_sub(self.ahead(tat, last_update_ns, now_ns))
            / self.increment
    }

    /// How far (scaled) the TAT runs ahead of `now_ns`: 0 for a full bucket. See
    /// [`Gcra::admit`] for why an idle bucket far ahead is full; it reads the state the same
    /// way (the host test `available_counts_what_admit_would_take` holds them together).
    const fn ahead(&self, tat: u64, last_update_ns: u64, now_ns: u64) -> u64 {
        let ahead = tat.wrapping_sub(now_ns.wrapping_mul(self.scale));
        let idle = now_ns.wrapping_sub(last_update_ns) as i64 > self.refill_ns as i64;
        if (ahead as i64) < 0 || (ahead > self.tolerance && idle) {
            0
        } else {
            ahead
        }
    }

    /// Nanoseconds from `now_ns` until `cost` units would conform, if nothing else is
    /// charged meanwhile: 0 when they conform now, `u64::MAX` when they never can (more than
    /// the burst, or a bucket that admits nothing). Rounded up, so at `now_ns` plus the
    /// result [`Gcra::admit`] takes them: a drop cached until then is never one the exact
    /// check would pass (other CPUs' charges only move that time later).
    pub const fn retry_after_ns(
        &self,
        tat: u64,
        last_update_ns: u64,
        now_ns: u64,
        cost: u64,
    ) -> u64 {
        if !self.is_limited() {
            return 0;
        }
        if cost >= MAX_COST || cost * self.increment > self.tolerance {
            return u64::MAX;
        }
        let needed = self.ahead(tat, last_update_ns, now_ns) + cost * self.increment;
        if needed <= self.tolerance {
            0
        } else {
            (needed - self.tolerance).div_ceil(self.scale)
        }
    }

    /// Decides whether `cost` units arriving at `now_ns` conform.
    ///
    /// `tat` is the stored state and `last_update_ns` the time it was last advanced. Returns the
    /// new state when the units conform, `None` when they do not (the state then stays as it
    /// was: non-conforming traffic does not consume the budget).
    ///
    /// How far the TAT runs ahead of now decides. Behind now means the bucket is full. Ahead
    /// by more than the tolerance happens two ways, told apart by `last_update_ns`: another
    /// CPU's clock read slightly behind ours (recently updated: the decision gets stricter,
    /// never looser), or a bucket idle for longer than a full refill whose scaled TAT wrapped
    /// around (idle: the bucket is full). So arbitrarily long idle periods are never misread.
    #[inline(always)]
    pub const fn admit(
        &self,
        tat: u64,
        last_update_ns: u64,
        now_ns: u64,
        cost: u64,
    ) -> Option<u64> {
        let now = now_ns.wrapping_mul(self.scale);
        // The same reading as `ahead`, written out: calling it here changes the XDP
        // program's code enough that the verifier passes its 1M-instruction limit
        // (measured: 1,000,001 processed).
        let ahead = tat.wrapping_sub(now);
        let idle = now_ns.wrapping_sub(last_update_ns) as i64 > self.refill_ns as i64;
        let ahead = if (ahead as i64) < 0 || (ahead > self.tolerance && idle) {
            0
        } else {
            ahead
        };
        // `increment` is at most 1e9 < 2^30, so any cost below 2^33 multiplies without overflow
        // (a checked multiply would need 128-bit arithmetic, which the BPF target lacks).
        let charge = if cost < MAX_COST {
            cost * self.increment
        } else {
            u64::MAX
        };
        let new_ahead = ahead.saturating_add(charge);
        if new_ahead > self.tolerance {
            None
        } else {
            Some(now.wrapping_add(new_ahead))
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn available_counts_what_admit_would_take() {
        let g = Gcra::per_second(10, 5).unwrap();
        let now = 5_000_000_000;
        let mut tat = g.full_at(now);
        assert_eq!(g.available(tat, now, now), 5);
        for left in (0..5).rev() {
            tat = g.admit(tat, now, now, 1).unwrap();
            assert_eq!(g.available(tat, now, now), left);
        }
        assert!(g.admit(tat, now, now, 1).is_none());
        // A tenth of a second later, one more.
        assert_eq!(g.available(tat, now, now + 100_000_000), 1);
        assert_eq!(Gcra::default().available(0, 0, now), u64::MAX);
    }

    #[test]
    fn retry_after_is_the_first_time_admit_takes_it() {
        let g = Gcra::per_second(3, 2).unwrap();
        let start = 7_000_000_000;
        let mut tat = g.full_at(start);
        assert_eq!(g.retry_after_ns(tat, start, start, 1), 0);
        tat = g.admit(tat, start, start, 1).unwrap();
        tat = g.admit(tat, start, start, 1).unwrap();
        let wait = g.retry_after_ns(tat, start, start, 1);
        // A third of a second, rounded up to the nanosecond.
        assert_eq!(wait, 333_333_334);
        assert!(g.admit(tat, start, start + wait - 1, 1).is_none());
        assert!(g.admit(tat, start, start + wait, 1).is_some());
        assert_eq!(
            g.retry_after_ns(tat, start, start, 3),
            u64::MAX,
            "over the burst"
        );
        assert_eq!(Gcra::DENY_ALL.retry_after_ns(0, 0, start, 1), u64::MAX);
        assert_eq!(Gcra::UNLIMITED.retry_after_ns(0, 0, start, 1), 0);
    }
    use proptest::prelude::*;
    use std::vec::Vec;

    /// A plain token bucket over exact 128-bit arithmetic: the reference the GCRA must match.
    /// Tokens are counted in units of `1 / (rate × 1e9)`, so refill is exact too.
    struct ReferenceBucket {
        rate: u128,
        capacity: u128,
        tokens: u128,
        last_ns: u128,
    }

    impl ReferenceBucket {
        fn new(rate: u64, burst: u64, start_ns: u64) -> Self {
            let capacity = u128::from(burst) * u128::from(NANOS_PER_SECOND);
            Self {
                rate: rate.into(),
                capacity,
                tokens: capacity,
                last_ns: start_ns.into(),
            }
        }

        fn admit(&mut self, now_ns: u64, cost: u64) -> bool {
            let now = u128::from(now_ns).max(self.last_ns);
            let refill = (now - self.last_ns) * self.rate;
            self.tokens = (self.tokens + refill).min(self.capacity);
            self.last_ns = now;
            let need = u128::from(cost) * u128::from(NANOS_PER_SECOND);
            if self.tokens >= need {
                self.tokens -= need;
                true
            } else {
                false
            }
        }
    }

    struct Bucket {
        gcra: Gcra,
        tat: u64,
        last_ns: u64,
    }

    impl Bucket {
        fn new(rate: u64, burst: u64, start_ns: u64) -> Self {
            let gcra = Gcra::per_second(rate, burst).unwrap();
            Self {
                gcra,
                tat: gcra.full_at(start_ns),
                last_ns: start_ns,
            }
        }

        fn admit(&mut self, now_ns: u64, cost: u64) -> bool {
            match self.gcra.admit(self.tat, self.last_ns, now_ns, cost) {
                Some(tat) => {
                    self.tat = tat;
                    self.last_ns = now_ns;
                    true
                }
                None => false,
            }
        }
    }

    #[test]
    fn burst_then_exact_rate() {
        let start = 5 * NANOS_PER_SECOND;
        let mut b = Bucket::new(10, 5, start);
        let admitted = (0..20).filter(|_| b.admit(start, 1)).count();
        assert_eq!(admitted, 5, "a burst of 5 from idle");
        // 100 ms later exactly one more unit has accrued at 10/s.
        assert!(!b.admit(start + 99_999_999, 1));
        assert!(b.admit(start + 100_000_000, 1));
        assert!(!b.admit(start + 100_000_000, 1));
    }

    #[test]
    fn fractional_interval_is_exact() {
        // 3/s: the interval is 333_333_333.33 ns; over 1000 s exactly 3000 + the burst of 2
        // conform, with no drift from rounding the interval.
        let mut b = Bucket::new(3, 2, 0);
        let step = 1_000_000; // 1 ms
        let admitted = (0..=1_000_000u64).filter(|i| b.admit(i * step, 1)).count();
        assert_eq!(admitted, 3002);
    }

    #[test]
    fn idle_refill_is_capped_at_burst() {
        let mut b = Bucket::new(1000, 10, 0);
        assert_eq!((0..50).filter(|_| b.admit(1, 1)).count(), 10);
        // After an hour idle, still only a burst.
        let later = 3600 * NANOS_PER_SECOND;
        assert_eq!((0..50).filter(|_| b.admit(later, 1)).count(), 10);
    }

    #[test]
    fn very_long_idle_with_wrapping_scaled_clock() {
        // A scale near 2^40 makes `now × scale` wrap every ~4.6 hours of clock; a source idle
        // for days must still come back to a full bucket.
        let rate = MAX_RATE - 1;
        let mut b = Bucket::new(rate, 1_000, 0);
        assert!(b.gcra.scale > 1 << 30);
        let now = 7 * 24 * 3600 * NANOS_PER_SECOND + 12345;
        assert_eq!((0..2000).filter(|_| b.admit(now, 1)).count(), 1000);
    }

    #[test]
    fn clock_going_backwards_is_stricter_not_looser() {
        let mut b = Bucket::new(100, 2, 10 * NANOS_PER_SECOND);
        let t = 10 * NANOS_PER_SECOND;
        assert!(b.admit(t, 1));
        assert!(b.admit(t, 1));
        assert!(!b.admit(t, 1));
        // Another CPU's timestamp 1 µs earlier must not reopen the bucket.
        assert!(!b.admit(t - 1_000, 1));
        assert!(!b.admit(t - 5_000_000, 1));
    }

    #[test]
    fn deny_all_and_unlimited() {
        assert_eq!(Gcra::DENY_ALL.admit(0, 0, 123, 1), None);
        assert_eq!(Gcra::DENY_ALL.admit(0, 0, u64::MAX, 1), None);
        assert!(!Gcra::UNLIMITED.is_limited());
        assert_eq!(Gcra::per_second(0, 0), Ok(Gcra::DENY_ALL));
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        assert_eq!(Gcra::per_second(0, 5), Err(RateError::ZeroRateWithBurst));
        assert_eq!(Gcra::per_second(5, 0), Err(RateError::ZeroBurst));
        assert_eq!(
            Gcra::per_second(MAX_RATE + 1, 1),
            Err(RateError::RateTooHigh)
        );
        assert_eq!(Gcra::per_second(1, u64::MAX), Err(RateError::BurstTooLarge));
    }

    #[test]
    fn extreme_rates_do_not_overflow() {
        for rate in [1, 7, 999_999_937, 1_000_000_000, MAX_RATE] {
            let gcra = Gcra::per_second(rate, 1).unwrap();
            for now in [0, 1, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
                let tat = gcra.full_at(now);
                assert!(
                    gcra.admit(tat, now, now, 1).is_some(),
                    "rate {rate} at {now}"
                );
                assert!(gcra.admit(tat, now, now, u64::MAX).is_none());
            }
        }
    }

    #[test]
    fn byte_costs() {
        // 1500 B/s with a 3000 B burst: two full-size packets, then one per second.
        let mut b = Bucket::new(1500, 3000, 0);
        assert!(b.admit(0, 1500));
        assert!(b.admit(0, 1500));
        assert!(!b.admit(0, 64));
        assert!(b.admit(NANOS_PER_SECOND, 1500));
        assert!(!b.admit(NANOS_PER_SECOND, 1));
    }

    fn arrivals() -> impl Strategy<Value = Vec<(u64, u64)>> {
        // (gap in ns, cost), gaps from tiny (fractional refill) to seconds.
        proptest::collection::vec(
            (
                prop_oneof![0u64..1_000, 0u64..10_000_000, 0u64..3_000_000_000],
                1u64..3,
            ),
            1..400,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn matches_reference_token_bucket(
            rate in prop_oneof![1u64..20, 1u64..1_000_000, 1u64..MAX_RATE],
            burst in 1u64..200,
            start in 0u64..u64::MAX / 4,
            arrivals in arrivals(),
        ) {
            let mut gcra = Bucket::new(rate, burst, start);
            let mut reference = ReferenceBucket::new(rate, burst, start);
            let mut now = start;
            for (gap, cost) in arrivals {
                now += gap;
                prop_assert_eq!(gcra.admit(now, cost), reference.admit(now, cost), "at {}", now);
            }
        }

        #[test]
        fn retry_after_is_the_exact_wait(
            rate in prop_oneof![1u64..20, 1u64..1_000_000, 1u64..MAX_RATE],
            burst in 1u64..200,
            start in 0u64..u64::MAX / 4,
            taken in 0u64..250,
            gap in prop_oneof![0u64..1_000, 0u64..3_000_000_000],
        ) {
            let g = Gcra::per_second(rate, burst).unwrap();
            let mut tat = g.full_at(start);
            for _ in 0..taken {
                if let Some(next) = g.admit(tat, start, start, 1) {
                    tat = next;
                }
            }
            let now = start + gap;
            let wait = g.retry_after_ns(tat, start, now, 1);
            prop_assert!(wait != u64::MAX);
            prop_assert!(g.admit(tat, start, now + wait, 1).is_some(), "admitted after {}", wait);
            if wait > 0 {
                prop_assert!(g.admit(tat, start, now + wait - 1, 1).is_none(), "not before {}", wait);
            }
        }

        #[test]
        fn never_admits_more_than_rate_times_time_plus_burst(
            rate in 1u64..100_000,
            burst in 1u64..100,
            arrivals in arrivals(),
            jitter in proptest::collection::vec(0u64..2_000, 400),
        ) {
            // Timestamps from several CPUs: each is up to 2 µs behind the true time.
            let start = 1_000 * NANOS_PER_SECOND;
            let mut gcra = Bucket::new(rate, burst, start);
            let mut now = start;
            let mut admitted: u128 = 0;
            for (i, (gap, cost)) in arrivals.iter().enumerate() {
                now += gap;
                let seen = now - jitter[i % jitter.len()];
                if gcra.admit(seen, *cost) {
                    admitted += u128::from(*cost);
                }
            }
            let elapsed = u128::from(now - start);
            let bound = elapsed * u128::from(rate) / u128::from(NANOS_PER_SECOND) + u128::from(burst);
            prop_assert!(admitted <= bound, "admitted {} > bound {}", admitted, bound);
        }
    }
}
