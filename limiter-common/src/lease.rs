//! The per-CPU lease cache: how a known source's packets skip the shared hash maps.
//!
//! A known source's packet otherwise costs a `SOURCES` lookup (a hash walk over a 24-byte
//! key, often a cache miss on a large table), a clock read, and a compare-and-swap on a
//! cache line every CPU receiving that source contends for; traffic charged to the
//! aggregate adds an `AGGREGATES` lookup and a second compare-and-swap. With leases:
//!
//! - When a packet passes on the exact path, the CPU also pre-pays a few more units from
//!   the source's packet bucket (and from the aggregate's, when the packet is charged to
//!   it) into slots of its own cache, `LEASES`, a per-CPU array indexed by a hash of the
//!   bucket's key. The units are charged to the shared bucket at that moment, exactly as
//!   packets would be.
//! - The next packets of that source on that CPU each spend one unit: one per-CPU array
//!   slot, a key compare and plain stores. No hash lookup, no atomic, no clock read.
//! - When the exact path drops a packet for the source's own packet rate (or the penalty
//!   box), the slot caches when the bucket next admits a packet, so the next packets are
//!   dropped on the coarse clock (the fine one only close to that time) without a lookup.
//!   A cached drop never admits anything, so every limit caches drops, leased or not.
//!
//! What it gives up, precisely:
//! - **Burst.** Units are pre-paid, so over any long window a source is admitted no more
//!   than `rate × time + burst`. Over a short window it can be admitted up to
//!   `CPUs × lease` more: units pre-paid before the window and spent in it. [`lease_sizes`]
//!   keeps `CPUs × lease` at or below 1/[`LEASE_SHARE`] of the bucket's burst (3.1%), and
//!   leases nothing when that would be under [`MIN_LEASE`] packets (small bursts stay exact).
//!   The aggregate's lease is a slot of its own, sized the same way from the aggregate's
//!   burst, so the aggregate's allowance does not grow with the number of its sources.
//! - **Units stranded.** A lease lost before it is spent (its slot taken by another source
//!   with the same hash, the epoch advanced, the program replaced) is units the bucket
//!   charged and no packet used: the source gets up to `CPUs × lease` fewer, once.
//! - **Counts for `top`.** Passes and cached drops are added to the source's counters when
//!   the source next takes the exact path (at least every `lease` packets, and every
//!   excess interval for cached drops); a slot taken by another source loses its counts.
//!   The per-CPU verdict counters, which the metrics report, stay exact.
//! - **Byte limits** are never leased: a limit with a byte rate judges every packet exactly.
//!   Nor are SYNs (the connection rate), nor aggregate drops.
//!
//! A lease is void unless its epoch is the current `LEASE_EPOCH`. User space advances the
//! epoch after every change that could make a lease or a cached drop wrong: a limit's rate,
//! the config (aggregates or sessions turned on or off), a source put in or taken out of the
//! penalty box by hand. The program reads the epoch before it reads the limit, so a lease is
//! never stamped with a new epoch under an old limit.

use crate::{layout::Limit, layout::SourceKey, rate::Gcra};

/// Slots per CPU in `LEASES` (a power of two): 256 KiB of cache lines per CPU.
pub const LEASE_SLOTS: u32 = 1 << LEASE_SLOT_BITS;

/// log2 of [`LEASE_SLOTS`].
pub const LEASE_SLOT_BITS: u32 = 12;

/// `CPUs × lease` is at most this fraction (1/n) of a bucket's burst.
pub const LEASE_SHARE: u64 = 32;

/// A smaller lease than this is not worth its refills: the limit is judged exactly.
pub const MIN_LEASE: u64 = 4;

/// The largest lease: enough to make refills rare (one in 64 packets), small enough to
/// strand little.
pub const MAX_LEASE: u64 = 64;

/// Below this clock distance (ns) from a cached drop's end, the fine clock decides; beyond
/// it the coarse clock does. The coarse clock lags the fine one by at most a tick (10 ms at
/// the lowest `HZ`, 100), so a drop decided on it is never one the fine clock would pass.
pub const COARSE_CLOCK_SLACK_NS: u64 = 10_000_000;

/// The slot of `key`'s lease for `bucket` (a [`crate::layout::LeaseBucket`] as its `u8`):
/// a multiplicative hash of the key, top bits. Two keys with one slot evict each other's
/// leases (both then take the exact path); that costs time, never accuracy.
#[inline(always)]
pub const fn lease_slot(key: &SourceKey, bucket: u8) -> u32 {
    let mixed = key.addr[0]
        ^ key.addr[1].rotate_left(8)
        ^ key.addr[2].rotate_left(16)
        ^ key.addr[3].rotate_left(24)
        ^ ((key.limit_id as u32) << 8)
        ^ ((key.budget as u32) << 4)
        ^ bucket as u32;
    mixed.wrapping_mul(0x9E37_79B1) >> (32 - LEASE_SLOT_BITS)
}

/// The lease of one bucket on a host with `cpus` CPUs: what keeps `cpus × lease` within
/// 1/[`LEASE_SHARE`] of its burst, at most [`MAX_LEASE`], or 0 (no leases) when that is
/// below [`MIN_LEASE`] or the bucket admits nothing. An unlimited bucket pre-pays nothing,
/// so its lease is the largest.
pub const fn bucket_lease(gcra: &Gcra, cpus: u32) -> u32 {
    if !gcra.is_limited() {
        return MAX_LEASE as u32;
    }
    if gcra.increment == 0 || cpus == 0 {
        return 0;
    }
    let burst = gcra.tolerance / gcra.increment;
    let lease = burst / (LEASE_SHARE * cpus as u64);
    if lease < MIN_LEASE {
        0
    } else if lease > MAX_LEASE {
        MAX_LEASE as u32
    } else {
        lease as u32
    }
}

/// `(lease, aggregate_lease)` for `limit` on a host with `cpus` CPUs. A limit with a byte
/// rate, or whose packet bucket is too small to lease, gets none at all.
pub const fn lease_sizes(limit: &Limit, cpus: u32) -> (u32, u32) {
    if limit.bytes.is_limited() {
        return (0, 0);
    }
    let lease = bucket_lease(&limit.packets, cpus);
    if lease == 0 {
        return (0, 0);
    }
    let aggregate = if limit.aggregate.is_limited() {
        bucket_lease(&limit.aggregate, cpus)
    } else {
        0
    };
    (lease, aggregate)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::layout::{Budget, LeaseBucket};
    use std::collections::HashSet;

    fn limit(packets: Gcra, bytes: Gcra, aggregate: Gcra) -> Limit {
        Limit {
            packets,
            bytes,
            aggregate,
            ..Limit::default()
        }
    }

    #[test]
    fn the_allowance_is_a_thirty_second_of_the_burst_or_nothing() {
        let per_second = |rate, burst| Gcra::per_second(rate, burst).unwrap();
        for cpus in [1, 2, 8, 64] {
            for burst in [1, 10, 100, 1_000, 10_000, 1_000_000] {
                let lease = bucket_lease(&per_second(1_000, burst), cpus);
                let allowance = u64::from(lease) * u64::from(cpus);
                assert!(
                    allowance * LEASE_SHARE <= burst,
                    "{cpus} CPUs, burst {burst}: lease {lease}"
                );
                assert!(lease == 0 || u64::from(lease) >= MIN_LEASE);
                assert!(u64::from(lease) <= MAX_LEASE);
            }
        }
        // 2 CPUs: a burst of 255 is too small (3.98 each), 256 gets 4, 4096 and up the most.
        assert_eq!(bucket_lease(&per_second(100, 255), 2), 0);
        assert_eq!(bucket_lease(&per_second(100, 256), 2), 4);
        assert_eq!(bucket_lease(&per_second(100, 4_096), 2), 64);
        assert_eq!(bucket_lease(&Gcra::DENY_ALL, 2), 0);
        assert_eq!(bucket_lease(&Gcra::UNLIMITED, 2), MAX_LEASE as u32);
    }

    #[test]
    fn byte_limits_and_small_bursts_stay_exact() {
        let big = Gcra::per_second(1_000_000, 100_000).unwrap();
        let small = Gcra::per_second(1_000_000, 10).unwrap();
        assert_eq!(lease_sizes(&limit(big, Gcra::UNLIMITED, big), 2), (64, 64));
        assert_eq!(lease_sizes(&limit(big, big, big), 2), (0, 0), "byte rate");
        assert_eq!(lease_sizes(&limit(small, Gcra::UNLIMITED, big), 2), (0, 0));
        assert_eq!(
            lease_sizes(&limit(big, Gcra::UNLIMITED, small), 2),
            (64, 0),
            "an aggregate too small to lease: only flow traffic is leased"
        );
        assert_eq!(
            lease_sizes(&limit(big, Gcra::UNLIMITED, Gcra::UNLIMITED), 2),
            (64, 0)
        );
    }

    #[test]
    fn slots_spread_neighbouring_sources_and_split_buckets() {
        let key = |a: u32| SourceKey {
            addr: [u32::from_be(0xc000_0200 + a), 0, 0, 0],
            limit_id: 0,
            family: crate::prefix::FAMILY_IPV4,
            prefix_len: 32,
            budget: Budget::Other as u8,
            _pad: [0; 3],
        };
        let slots: HashSet<u32> = (0..1_024)
            .map(|a| lease_slot(&key(a), LeaseBucket::Source as u8))
            .collect();
        assert!(slots.iter().all(|s| *s < LEASE_SLOTS));
        // 1,024 neighbours over 4,096 slots: a good hash leaves few collisions.
        assert!(slots.len() > 850, "{} distinct slots", slots.len());
        let k = key(7);
        assert_ne!(
            lease_slot(&k, LeaseBucket::Source as u8),
            lease_slot(&k, LeaseBucket::Aggregate as u8)
        );
        assert_ne!(
            lease_slot(&k, LeaseBucket::Source as u8),
            lease_slot(&k.with_budget(Budget::Tcp), LeaseBucket::Source as u8)
        );
    }
}
