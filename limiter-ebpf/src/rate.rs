//! The rate check: per-source buckets, the aggregate bucket of the source's wider prefix, the
//! cap on new sources and the shared bucket behind it, and the penalty box.
//!
//! A known source costs one hash lookup and compare-and-swaps on its value in place; only a
//! new source (or a new aggregate prefix) costs a map insert.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_ktime_get_ns, programs::XdpContext};
use aya_log_ebpf::warn;
use limiter_common::{
    layout::{Bucket, Config, EventKind, Limit, SourceEvent, SourceKey, SourceState, Stat},
    prefix::{FAMILY_IPV4, apply_mask},
    rate::{Gcra, NANOS_PER_SECOND},
};

use crate::{
    atomic,
    maps::{AGGREGATES, EVENTS, LIMITS, NEW_SOURCE_BUDGET, SHARED_BUCKET, SOURCES},
    parse::Packet,
    stats,
};

/// Compare-and-swap attempts before a contended bucket counts as exhausted. Contention that
/// lasts this long means several CPUs are receiving the same source at once: a flood.
const CAS_ATTEMPTS: usize = 16;

/// At most one "limited" event per source per this many nanoseconds.
const EVENT_INTERVAL_NS: u64 = NANOS_PER_SECOND;

const EEXIST: i32 = 17;

/// Charges `cost` to the bucket word at `tat`; true when it conforms.
///
/// # Safety
/// `tat` must point to an aligned `u64` inside a map value.
#[inline(always)]
unsafe fn charge(tat: *mut u64, updated_ns: u64, gcra: &Gcra, now: u64, cost: u64) -> bool {
    if !gcra.is_limited() {
        return true;
    }
    // SAFETY: the caller guarantees `tat` is a valid map value word.
    let mut current = unsafe { core::ptr::read_volatile(tat) };
    let mut last_update = updated_ns;
    for _ in 0..CAS_ATTEMPTS {
        let Some(next) = gcra.admit(current, last_update, now, cost) else {
            return false;
        };
        // SAFETY: as above.
        let previous = unsafe { atomic::compare_exchange(tat, current, next) };
        if previous == current {
            return true;
        }
        // Another CPU just advanced the bucket, so its word is fresh whatever `updated_ns`
        // said when we read it.
        current = previous;
        last_update = now;
    }
    false
}

/// The key of `packet`'s source under `limit_id`, masked to the configured prefix.
#[inline(always)]
fn source_key(config: &Config, packet: &Packet, limit_id: u32, aggregate: bool) -> SourceKey {
    let (mask, prefix_len) = match (packet.family == FAMILY_IPV4, aggregate) {
        (true, false) => (&config.source_mask_v4, config.source_prefix_v4),
        (false, false) => (&config.source_mask_v6, config.source_prefix_v6),
        (true, true) => (&config.aggregate_mask_v4, config.aggregate_prefix_v4),
        (false, true) => (&config.aggregate_mask_v6, config.aggregate_prefix_v6),
    };
    SourceKey {
        addr: apply_mask(&packet.src, mask),
        limit_id: limit_id as u16,
        family: packet.family,
        prefix_len,
    }
}

/// Decides the verdict for a packet under the limit `limit_id`.
#[inline(always)]
pub fn check(ctx: &XdpContext, config: &Config, packet: &Packet, limit_id: u32, len: u64) -> Stat {
    let Some(limit) = LIMITS.get(limit_id) else {
        // Only a table written by a newer user space can name a missing limit.
        return Stat::WithinLimit;
    };
    if !limit.packets.is_limited() && !limit.bytes.is_limited() && !limit.aggregate.is_limited() {
        // An unlimited class needs no state at all.
        return Stat::WithinLimit;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = source_key(config, packet, limit_id, false);
    match SOURCES.get_ptr_mut(key) {
        Some(state) => known_source(config, limit, packet, &key, state, limit_id, len, now),
        None => new_source(ctx, config, limit, packet, &key, limit_id, len, now),
    }
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "always inlined into the entry; a struct of the per-packet facts would only add copies on the 512-byte BPF stack"
)]
fn known_source(
    config: &Config,
    limit: &Limit,
    packet: &Packet,
    key: &SourceKey,
    state: *mut SourceState,
    limit_id: u32,
    len: u64,
    now: u64,
) -> Stat {
    // SAFETY: `state` is a live value of SOURCES; the fields read here are plain words that
    // other CPUs only ever replace whole.
    let (blocked_until, updated) = unsafe {
        (
            (*state).blocked_until_ns,
            core::ptr::read_volatile(&(*state).updated_ns),
        )
    };
    let verdict = if blocked_until > now {
        Stat::PenaltyBox
    // SAFETY: the TAT words are aligned fields of a live map value.
    } else if !unsafe {
        charge(
            &raw mut (*state).packets_tat,
            updated,
            &limit.packets,
            now,
            1,
        )
    } {
        Stat::RatePackets
    // SAFETY: as above.
    } else if !unsafe { charge(&raw mut (*state).bytes_tat, updated, &limit.bytes, now, len) } {
        Stat::RateBytes
    } else if !aggregate_conforms(config, limit, packet, limit_id, now) {
        Stat::RateAggregate
    } else {
        Stat::WithinLimit
    };
    // SAFETY: aligned fields of a live map value. The per-source counts only rank sources
    // for `limiter top`, so they are plain additions: a locked add costs as much as the rest
    // of the drop path, and two CPUs racing on one source lose at most an increment each.
    // The verdict counters, which the metrics report, are per-CPU and exact.
    unsafe {
        (*state).bytes += len;
        if verdict == Stat::WithinLimit {
            (*state).updated_ns = now;
            (*state).passed += 1;
        } else {
            (*state).dropped += 1;
            if verdict != Stat::PenaltyBox {
                over_limit(config, key, state, verdict, now);
            }
        }
    }
    verdict
}

/// Records that a source went over a limit: a sampled event, and the penalty box. Going over
/// the aggregate of its prefix does not box a source: that is the prefix's excess, and the
/// sources inside it may each be well within their own limits.
///
/// # Safety
/// `state` must be a live value of SOURCES.
#[inline(always)]
unsafe fn over_limit(
    config: &Config,
    key: &SourceKey,
    state: *mut SourceState,
    reason: Stat,
    now: u64,
) {
    // SAFETY: guaranteed by the caller; plain stores of whole words.
    unsafe {
        if now.wrapping_sub((*state).limited_ns) >= EVENT_INTERVAL_NS || (*state).limited_ns == 0 {
            (*state).limited_ns = now;
            emit(EventKind::Limited, reason, key, state, now);
        }
        if config.block_ns != 0 && reason != Stat::RateAggregate {
            (*state).blocked_until_ns = now.saturating_add(config.block_ns);
            stats::count(Stat::PenaltyBoxEntered, 0);
            emit(EventKind::PenaltyBox, reason, key, state, now);
        }
    }
}

/// # Safety
/// `state` must be a live value of SOURCES.
#[inline(always)]
unsafe fn emit(
    kind: EventKind,
    reason: Stat,
    key: &SourceKey,
    state: *const SourceState,
    now: u64,
) {
    // SAFETY: guaranteed by the caller.
    let (passed, dropped) = unsafe { ((*state).passed, (*state).dropped) };
    let event = SourceEvent {
        kind: kind as u32,
        reason: reason as u32,
        key: *key,
        _pad: 0,
        at_ns: now,
        passed,
        dropped,
    };
    if EVENTS.output::<SourceEvent>(&event, 0).is_err() {
        stats::count(Stat::EventsDropped, 0);
    }
}

#[inline(always)]
fn aggregate_conforms(
    config: &Config,
    limit: &Limit,
    packet: &Packet,
    limit_id: u32,
    now: u64,
) -> bool {
    if !config.has(Config::FLAG_AGGREGATES) || !limit.aggregate.is_limited() {
        return true;
    }
    let key = source_key(config, packet, limit_id, true);
    match AGGREGATES.get_ptr_mut(key) {
        Some(bucket) => {
            // SAFETY: `bucket` is a live value of AGGREGATES.
            let updated = unsafe { core::ptr::read_volatile(&(*bucket).updated_ns) };
            // SAFETY: as above.
            let ok = unsafe { charge(&raw mut (*bucket).tat, updated, &limit.aggregate, now, 1) };
            if ok {
                // SAFETY: as above.
                unsafe { (*bucket).updated_ns = now };
            }
            ok
        }
        None => {
            let gcra = &limit.aggregate;
            let Some(tat) = gcra.admit(gcra.full_at(now), now, now, 1) else {
                return false;
            };
            // A failed insert (another CPU won the race, or memory pressure) admits this one
            // packet; the next one finds the bucket or tries again.
            let _ = AGGREGATES.insert(
                key,
                Bucket {
                    tat,
                    updated_ns: now,
                },
                u64::from(BPF_NOEXIST),
            );
            true
        }
    }
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "always inlined into the entry; a struct of the per-packet facts would only add copies on the 512-byte BPF stack"
)]
fn new_source(
    ctx: &XdpContext,
    config: &Config,
    limit: &Limit,
    packet: &Packet,
    key: &SourceKey,
    limit_id: u32,
    len: u64,
    now: u64,
) -> Stat {
    // The cap comes first: past it, a spoofed flood costs one per-CPU check and the shared
    // bucket, nothing more.
    if !insert_budget_allows(config, now) {
        stats::count(Stat::NewSourceCapped, 0);
        return shared_bucket(config, now);
    }
    if !aggregate_conforms(config, limit, packet, limit_id, now) {
        // No state for a source whose whole prefix is over its limit: a spoofed flood from
        // one prefix must not fill the table.
        return Stat::RateAggregate;
    }
    let mut state = SourceState {
        packets_tat: limit.packets.full_at(now),
        bytes_tat: limit.bytes.full_at(now),
        updated_ns: now,
        bytes: len,
        ..SourceState::default()
    };
    let verdict = match limit.packets.admit(state.packets_tat, now, now, 1) {
        None if limit.packets.is_limited() => Stat::RatePackets,
        packets_tat => match limit.bytes.admit(state.bytes_tat, now, now, len) {
            None if limit.bytes.is_limited() => Stat::RateBytes,
            bytes_tat => {
                state.packets_tat = packets_tat.unwrap_or(state.packets_tat);
                state.bytes_tat = bytes_tat.unwrap_or(state.bytes_tat);
                Stat::WithinLimit
            }
        },
    };
    if verdict == Stat::WithinLimit {
        state.passed = 1;
    } else {
        state.dropped = 1;
        state.limited_ns = now;
        if config.block_ns != 0 {
            state.blocked_until_ns = now.saturating_add(config.block_ns);
            stats::count(Stat::PenaltyBoxEntered, 0);
        }
    }
    match SOURCES.insert(key, state, u64::from(BPF_NOEXIST)) {
        Ok(()) => {
            stats::count(Stat::SourceInserted, 0);
            verdict
        }
        // Another CPU inserted the same source a moment ago; this packet is judged as if it
        // had been first, which can admit one extra packet per CPU and no more.
        Err(e) if e == -EEXIST => verdict,
        Err(e) => {
            stats::count(Stat::StateInsertFailed, 0);
            warn!(ctx, "source state insert failed: {}", e);
            shared_bucket(config, now)
        }
    }
}

/// The per-CPU cap on new-source inserts.
#[inline(always)]
fn insert_budget_allows(config: &Config, now: u64) -> bool {
    let gcra = &config.new_sources;
    if !gcra.is_limited() {
        return true;
    }
    let Some(budget) = NEW_SOURCE_BUDGET.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a per-CPU array value, used by this CPU only for the program's run.
    unsafe {
        match gcra.admit((*budget).tat, (*budget).updated_ns, now, 1) {
            Some(tat) => {
                (*budget).tat = tat;
                (*budget).updated_ns = now;
                true
            }
            None => false,
        }
    }
}

/// The one bucket shared by every source that arrived past the insert cap.
#[inline(always)]
fn shared_bucket(config: &Config, now: u64) -> Stat {
    let Some(bucket) = SHARED_BUCKET.get_ptr_mut(0) else {
        return Stat::RateShared;
    };
    // SAFETY: a live value of SHARED_BUCKET; the TAT is changed by compare-and-swap only.
    unsafe {
        let updated = core::ptr::read_volatile(&(*bucket).updated_ns);
        if charge(&raw mut (*bucket).tat, updated, &config.shared, now, 1) {
            (*bucket).updated_ns = now;
            Stat::WithinLimit
        } else {
            Stat::RateShared
        }
    }
}
