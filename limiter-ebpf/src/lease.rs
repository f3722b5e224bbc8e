//! The per-CPU lease cache in front of SOURCES and AGGREGATES: a known source's next packets
//! on this CPU spend units pre-paid from its buckets, or meet a cached drop, without a hash
//! lookup, an atomic or (when passed) a clock read. `limiter_common::lease` has the design
//! and exactly what it gives up; the exact path in `rate` stays the judge of everything a
//! lease does not cover.

use limiter_common::{
    layout::{Config, Lease, LeaseBucket, Limit, SourceKey, SourceState, Stat, excess_interval},
    lease::{COARSE_CLOCK_SLACK_NS, lease_slot},
};

use crate::{
    clock,
    maps::{LEASE_EPOCH, LEASES},
    parse::Packet,
    rate::{self, Charge},
};

/// The current lease epoch, read before the limit (so a lease is never stamped with a new
/// epoch under an old limit); 0, leasing off, if it cannot be read.
#[inline(always)]
pub fn epoch() -> u64 {
    match LEASE_EPOCH.get_ptr(0) {
        // SAFETY: a live value of a one-entry array; user space replaces it whole.
        Some(epoch) => unsafe { core::ptr::read_volatile(epoch) },
        None => 0,
    }
}

#[inline(always)]
fn slot(key: &SourceKey, bucket: LeaseBucket) -> Option<*mut Lease> {
    LEASES.get_ptr_mut(lease_slot(key, bucket as u8))
}

/// Whether the slot holds `key`'s `bucket` (in any epoch).
///
/// # Safety
/// `lease` must be a live value of LEASES.
#[inline(always)]
unsafe fn is_of(lease: *const Lease, key: &SourceKey, bucket: LeaseBucket) -> bool {
    // SAFETY: guaranteed by the caller. Field by field: `==` on the struct compiles to a
    // call of `bcmp`.
    unsafe {
        let held = &(*lease).key;
        (*lease).bucket == bucket as u8
            && held.addr[0] == key.addr[0]
            && held.addr[1] == key.addr[1]
            && held.addr[2] == key.addr[2]
            && held.addr[3] == key.addr[3]
            && held.limit_id == key.limit_id
            && held.budget == key.budget
            && held.prefix_len == key.prefix_len
            && held.family == key.family
    }
}

/// Whether the slot holds a live lease of `key`'s `bucket`.
///
/// # Safety
/// As [`is_of`].
#[inline(always)]
unsafe fn holds(lease: *const Lease, key: &SourceKey, bucket: LeaseBucket, epoch: u64) -> bool {
    // SAFETY: guaranteed by the caller.
    unsafe { (*lease).epoch == epoch && is_of(lease, key, bucket) }
}

/// Whether a packet charged as `charge` under `limit` spends the aggregate's bucket too.
#[inline(always)]
fn spends_aggregate(config: &Config, limit: &Limit, charge: Charge) -> bool {
    charge.aggregate() && rate::aggregates_apply(config, limit)
}

/// Judges a packet from its source's slot on this CPU: a pre-paid unit passes it, a cached
/// drop drops it. `None` when the slot holds neither: the exact path decides.
#[inline(always)]
pub fn spend(
    config: &Config,
    limit: &Limit,
    packet: &Packet,
    key: &SourceKey,
    charge: Charge,
    len: u64,
    epoch: u64,
) -> Option<Stat> {
    // Any limit may cache a drop; only one that leases holds units.
    if epoch == 0 || charge == Charge::Syn {
        return None;
    }
    let own = slot(key, LeaseBucket::Source)?;
    // SAFETY: per-CPU array values, used by this CPU only for the program's run.
    unsafe {
        if !holds(own, key, LeaseBucket::Source, epoch) {
            return None;
        }
        if (*own).units > 0 {
            if spends_aggregate(config, limit, charge) {
                let key = rate::aggregate_key(config, packet, key);
                let aggregate = slot(&key, LeaseBucket::Aggregate)?;
                if !holds(aggregate, &key, LeaseBucket::Aggregate, epoch) || (*aggregate).units == 0
                {
                    return None;
                }
                (*aggregate).units -= 1;
            }
            (*own).units -= 1;
            (*own).passed = (*own).passed.wrapping_add(1);
            (*own).bytes += len;
            return Some(Stat::WithinLimit);
        }
        let retry_at = (*own).retry_at_ns;
        if retry_at == 0 || !denied_until(retry_at) {
            return None;
        }
        (*own).dropped = (*own).dropped.wrapping_add(1);
        (*own).bytes += len;
        Some(if (*own).verdict == Stat::PenaltyBox as u8 {
            Stat::PenaltyBox
        } else if charge == Charge::AckFallback {
            Stat::RateAcks
        } else {
            Stat::RatePackets
        })
    }
}

/// Whether the clock is still before `retry_at`: the coarse clock decides when it is far
/// enough before (it lags by less than the slack), the fine one otherwise.
#[inline(always)]
fn denied_until(retry_at: u64) -> bool {
    clock::coarse().saturating_add(COARSE_CLOCK_SLACK_NS) < retry_at || clock::now() < retry_at
}

/// Adds what the source's slot counted since its last visit to the source's own counters,
/// and empties the slot's counts. A slot of another source is left alone.
///
/// # Safety
/// `own` must be a live value of LEASES and `state` of SOURCES.
#[inline(always)]
unsafe fn settle(own: *mut Lease, key: &SourceKey, state: *mut SourceState) {
    // SAFETY: guaranteed by the caller; plain additions, like the exact path's (see `rate`).
    unsafe {
        if !is_of(own, key, LeaseBucket::Source) {
            return;
        }
        (*state).passed = (*state).passed.wrapping_add((*own).passed);
        (*state).dropped = (*state).dropped.wrapping_add((*own).dropped);
        (*state).bytes += (*own).bytes;
        (*own).passed = 0;
        (*own).dropped = 0;
        (*own).bytes = 0;
    }
}

/// Writes a slot field by field: a `Lease` built first would take 64 bytes of the 512-byte
/// BPF stack. Counts start at zero (the slot was settled, or held another bucket).
///
/// # Safety
/// `lease` must be a live value of LEASES.
#[inline(always)]
unsafe fn fill(
    lease: *mut Lease,
    key: &SourceKey,
    bucket: LeaseBucket,
    epoch: u64,
    units: u32,
    retry_at_ns: u64,
    verdict: u8,
) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        (*lease).key = *key;
        (*lease).epoch = epoch;
        (*lease).units = units;
        (*lease).retry_at_ns = retry_at_ns;
        (*lease).verdict = verdict;
        (*lease).bucket = bucket as u8;
        (*lease).passed = 0;
        (*lease).dropped = 0;
        (*lease).bytes = 0;
    }
}

/// After the exact path passed a known source's packet: settles the source's slot, then
/// pre-pays its next packets on this CPU (and the aggregate's, if they spend it) when the
/// limit leases and the buckets have the units. A bucket without them leases nothing: the
/// packets that follow take the exact path, as without leases.
///
/// # Safety
/// `state` must be a live value of SOURCES, just charged at `now`.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "always inlined into the entry; a struct of the per-packet facts would only add copies on the 512-byte BPF stack"
)]
pub unsafe fn after_pass(
    config: &Config,
    limit: &Limit,
    packet: &Packet,
    key: &SourceKey,
    state: *mut SourceState,
    charge: Charge,
    now: u64,
    epoch: u64,
) {
    let Some(own) = slot(key, LeaseBucket::Source) else {
        return;
    };
    // SAFETY: `own` a per-CPU array value used by this CPU only; `state` guaranteed by the
    // caller, its TAT changed by compare-and-swap only.
    unsafe {
        settle(own, key, state);
        if is_of(own, key, LeaseBucket::Source) {
            // It passed: a drop cached earlier is over, and left in place it would cost each
            // later packet of a limit that does not lease two clock reads before its exact
            // check.
            (*own).retry_at_ns = 0;
        }
        if epoch == 0 || limit.lease == 0 || charge == Charge::Syn {
            return;
        }
        let mut units = if holds(own, key, LeaseBucket::Source, epoch) {
            (*own).units
        } else {
            0
        };
        if spends_aggregate(config, limit, charge) {
            if limit.aggregate_lease == 0 {
                return;
            }
            let aggregate_key = rate::aggregate_key(config, packet, key);
            let Some(aggregate) = slot(&aggregate_key, LeaseBucket::Aggregate) else {
                return;
            };
            if !holds(aggregate, &aggregate_key, LeaseBucket::Aggregate, epoch)
                || (*aggregate).units == 0
            {
                if !rate::prepay_aggregate(limit, &aggregate_key, limit.aggregate_lease, now) {
                    return;
                }
                fill(
                    aggregate,
                    &aggregate_key,
                    LeaseBucket::Aggregate,
                    epoch,
                    limit.aggregate_lease,
                    0,
                    0,
                );
            }
        }
        if units == 0 {
            if !rate::charge(
                &raw mut (*state).packets_tat,
                now,
                &limit.packets,
                now,
                u64::from(limit.lease),
            ) {
                return;
            }
            units = limit.lease;
        }
        fill(own, key, LeaseBucket::Source, epoch, units, 0, 0);
    }
}

/// After the exact path dropped a known source's packet for its own packet rate or the
/// penalty box: settles the slot and caches the drop until the bucket admits again (or the
/// box ends), and no later than the end of the excess interval, so the exact path still
/// records the source's excess (and the box, and its events) every interval.
///
/// # Safety
/// `state` must be a live value of SOURCES.
#[inline(always)]
pub unsafe fn after_drop(
    limit: &Limit,
    key: &SourceKey,
    state: *mut SourceState,
    verdict: Stat,
    now: u64,
    epoch: u64,
) {
    let Some(own) = slot(key, LeaseBucket::Source) else {
        return;
    };
    // SAFETY: as in `after_pass`.
    unsafe {
        settle(own, key, state);
        // A cached drop never admits, so every limit may have one, leased or not.
        if epoch == 0 {
            return;
        }
        // This very drop may have put the source in the box: the box is what is cached.
        let blocked_until = (*state).blocked_until_ns;
        let verdict = if blocked_until > now {
            Stat::PenaltyBox
        } else {
            verdict
        };
        let until = if verdict == Stat::PenaltyBox {
            blocked_until
        } else {
            let tat = core::ptr::read_volatile(&(*state).packets_tat);
            let updated = core::ptr::read_volatile(&(*state).updated_ns);
            now.saturating_add(limit.packets.retry_after_ns(tat, updated, now, 1))
        };
        let interval_end = (u64::from(excess_interval(now)) + 1) << 30;
        let retry_at = if until < interval_end {
            until
        } else {
            interval_end
        };
        fill(
            own,
            key,
            LeaseBucket::Source,
            epoch,
            0,
            retry_at,
            verdict as u8,
        );
    }
}
