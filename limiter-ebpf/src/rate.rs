//! The rate check: per-source buckets, the aggregate bucket of the source's wider prefix, the
//! cap on new sources and the per-family buckets behind it, and the penalty box.
//!
//! A known source costs one hash lookup and compare-and-swaps on its value in place, or,
//! while it holds a lease on this CPU (see `lease`), neither; only a new source (or a new
//! aggregate prefix) costs a map insert.

use aya_ebpf::{bindings::BPF_NOEXIST, maps::Array, programs::XdpContext};
use aya_log_ebpf::warn;
use limiter_common::{
    layout::{
        Bucket, Budget, Config, EventKind, Limit, SourceEvent, SourceKey, SourceState, Stat,
        excess_interval, family_index, record_excess, sustained_excess,
    },
    prefix::{FAMILY_IPV4, apply_mask},
    rate::Gcra,
};

use crate::{
    atomic, clock, lease,
    maps::{AGGREGATES, EVENTS, NEW_SOURCE_BUDGET, SHARED_BUCKET, SOURCES},
    parse::Packet,
    stats,
};

/// Compare-and-swap attempts before a contended bucket counts as exhausted. Contention that
/// lasts this long means several CPUs are receiving the same source at once: a flood.
const CAS_ATTEMPTS: usize = 16;

const EEXIST: i32 = 17;

/// What a packet is to its source's state, which decides the buckets it is charged to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// Connectionless traffic, or TCP when sessions are off: the packet and byte buckets and
    /// the aggregate.
    Packet,
    /// A TCP SYN: the connection rate as well, and the aggregate.
    Syn,
    /// A packet of an established flow: the source's own buckets only. The aggregate bounds
    /// what a prefix makes us spend on unverified work; a flow the kernel accepted is not.
    Flow,
    /// A pure ACK past its flow's ACK budget: the packet bucket, and never the penalty box.
    AckFallback,
}

impl Charge {
    #[inline(always)]
    pub const fn aggregate(self) -> bool {
        matches!(self, Self::Packet | Self::Syn)
    }
}

/// How a source without state may get it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Through the per-CPU insert cap, past which it is charged to the shared bucket.
    Capped,
    /// Directly: the kernel's TCP proved the source, so a spoofed flood cannot be it.
    Proven,
}

/// Charges `cost` to the bucket word at `tat`; true when it conforms.
///
/// # Safety
/// `tat` must point to an aligned `u64` inside a map value.
#[inline(always)]
pub unsafe fn charge(tat: *mut u64, updated_ns: u64, gcra: &Gcra, now: u64, cost: u64) -> bool {
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

/// Charges one packet to a family's entry of a per-family bucket array.
#[inline(always)]
pub fn family_bucket(map: &Array<Bucket>, gcra: &Gcra, family: u8, now: u64) -> bool {
    let Some(bucket) = map.get_ptr_mut(family_index(family)) else {
        return false;
    };
    // SAFETY: a live value of a bucket array; the TAT is changed by compare-and-swap only.
    unsafe {
        let updated = core::ptr::read_volatile(&(*bucket).updated_ns);
        if charge(&raw mut (*bucket).tat, updated, gcra, now, 1) {
            (*bucket).updated_ns = now;
            true
        } else {
            false
        }
    }
}

/// The key of `packet`'s source under `limit_id`, masked to the configured prefix.
#[inline(always)]
pub fn source_key(
    config: &Config,
    packet: &Packet,
    limit_id: u32,
    budget: Budget,
    aggregate: bool,
) -> SourceKey {
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
        budget: budget as u8,
        _pad: [0; 3],
    }
}

/// Judges a packet against its source's state under `limit`: its lease on this CPU if it
/// has one, else its state's own buckets if it has state, else the admission of a new
/// source. The state is looked up before the clock is read: the lookup's cache miss and the
/// clock read then overlap rather than queue.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "always inlined into the entry; a struct of the per-packet facts would only add copies on the 512-byte BPF stack"
)]
pub fn source(
    ctx: &XdpContext,
    config: &Config,
    limit: &Limit,
    packet: &Packet,
    key: &SourceKey,
    charge: Charge,
    admission: Admission,
    len: u64,
    epoch: u64,
) -> Stat {
    if let Some(verdict) = lease::spend(config, limit, packet, key, charge, len, epoch) {
        return verdict;
    }
    let state = SOURCES.get_ptr_mut(key);
    let now = clock::now();
    match state {
        Some(state) => known_source(config, limit, packet, key, state, charge, len, now, epoch),
        None => new_source(ctx, config, limit, packet, key, charge, admission, len, now),
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
    charge_as: Charge,
    len: u64,
    now: u64,
    epoch: u64,
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
        if charge_as == Charge::AckFallback {
            Stat::RateAcks
        } else {
            Stat::RatePackets
        }
    // SAFETY: as above.
    } else if !unsafe { charge(&raw mut (*state).bytes_tat, updated, &limit.bytes, now, len) } {
        Stat::RateBytes
    } else if charge_as == Charge::Syn
        // SAFETY: as above.
        && !unsafe {
            charge(
                &raw mut (*state).connections_tat,
                updated,
                &limit.connections,
                now,
                1,
            )
        }
    {
        Stat::RateConnections
    } else if charge_as.aggregate() && !aggregate_conforms(config, limit, packet, key, now) {
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
            (*state).passed = (*state).passed.wrapping_add(1);
        } else {
            (*state).dropped = (*state).dropped.wrapping_add(1);
            if is_own_excess(verdict) {
                own_excess(limit, key, state, verdict, now);
            }
        }
        match verdict {
            Stat::WithinLimit => {
                lease::after_pass(config, limit, packet, key, state, charge_as, now, epoch);
            }
            Stat::RatePackets | Stat::RateAcks | Stat::PenaltyBox => {
                lease::after_drop(limit, key, state, verdict, now, epoch);
            }
            _ => {}
        }
    }
    verdict
}

/// Whether a drop reason is the source's own excess: over its packet, byte or connection
/// rate. The aggregate is its prefix's excess (the sources inside it may each be well within
/// their own limits), an ACK over budget is accounting, and the box is already the box.
#[inline(always)]
const fn is_own_excess(verdict: Stat) -> bool {
    matches!(
        verdict,
        Stat::RatePackets | Stat::RateBytes | Stat::RateConnections
    )
}

/// Records that a source went over its own limit: the window of recent excess, a sampled
/// event (the first excess in each interval), and the penalty box once the excess is
/// sustained.
///
/// # Safety
/// `state` must be a live value of SOURCES.
#[inline(always)]
unsafe fn own_excess(
    limit: &Limit,
    key: &SourceKey,
    state: *mut SourceState,
    reason: Stat,
    now: u64,
) {
    let interval = excess_interval(now);
    // SAFETY: guaranteed by the caller; plain stores of whole words.
    unsafe {
        let last = (*state).excess_interval;
        let window = record_excess((*state).excess_window, last, interval);
        (*state).excess_window = window;
        (*state).excess_interval = interval;
        if last != interval {
            emit(EventKind::Limited, reason, key, state, now);
        }
        if limit.block_ns != 0 && sustained_excess(window) {
            (*state).blocked_until_ns = now.saturating_add(limit.block_ns);
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
        at_ns: now,
        passed: u64::from(passed),
        dropped: u64::from(dropped),
    };
    if EVENTS.output::<SourceEvent>(&event, 0).is_err() {
        stats::count(Stat::EventsDropped, 0);
    }
}

/// Whether traffic charged to the aggregate is checked against it under `limit`.
#[inline(always)]
pub fn aggregates_apply(config: &Config, limit: &Limit) -> bool {
    config.has(Config::FLAG_AGGREGATES) && limit.aggregate.is_limited()
}

/// The key of the aggregate bucket a source's traffic is charged to. One aggregate per
/// budget too: a UDP flood from a prefix must not spend what the prefix's TCP clients need.
#[inline(always)]
pub fn aggregate_key(config: &Config, packet: &Packet, source: &SourceKey) -> SourceKey {
    let budget = if source.budget == Budget::Tcp as u8 {
        Budget::Tcp
    } else {
        Budget::Other
    };
    source_key(config, packet, u32::from(source.limit_id), budget, true)
}

/// Charges `units` to an existing aggregate bucket (a lease's pre-payment); false when it
/// does not exist or has not the units.
#[inline(always)]
pub fn prepay_aggregate(limit: &Limit, key: &SourceKey, units: u32, now: u64) -> bool {
    let Some(bucket) = AGGREGATES.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: `bucket` is a live value of AGGREGATES; its TAT changes by compare-and-swap.
    unsafe {
        let updated = core::ptr::read_volatile(&(*bucket).updated_ns);
        let ok = charge(
            &raw mut (*bucket).tat,
            updated,
            &limit.aggregate,
            now,
            u64::from(units),
        );
        if ok {
            (*bucket).updated_ns = now;
        }
        ok
    }
}

#[inline(always)]
fn aggregate_conforms(
    config: &Config,
    limit: &Limit,
    packet: &Packet,
    source: &SourceKey,
    now: u64,
) -> bool {
    if !aggregates_apply(config, limit) {
        return true;
    }
    let key = aggregate_key(config, packet, source);
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
    charge_as: Charge,
    admission: Admission,
    len: u64,
    now: u64,
) -> Stat {
    // The cap comes first: past it, a spoofed flood costs one per-CPU check and the shared
    // bucket, nothing more.
    if admission == Admission::Capped && !insert_budget_allows(config, now) {
        stats::count(Stat::NewSourceCapped, 0);
        return shared_bucket(config, packet.family, now);
    }
    if charge_as.aggregate() && !aggregate_conforms(config, limit, packet, key, now) {
        // No state for a source whose whole prefix is over its limit: a spoofed flood from
        // one prefix must not fill the table.
        return Stat::RateAggregate;
    }
    let mut state = SourceState {
        packets_tat: limit.packets.full_at(now),
        bytes_tat: limit.bytes.full_at(now),
        connections_tat: limit.connections.full_at(now),
        updated_ns: now,
        bytes: len,
        ..SourceState::default()
    };
    let packets = limit.packets.admit(state.packets_tat, now, now, 1);
    let bytes = limit.bytes.admit(state.bytes_tat, now, now, len);
    let connections = if charge_as == Charge::Syn {
        limit.connections.admit(state.connections_tat, now, now, 1)
    } else {
        Some(state.connections_tat)
    };
    let verdict = if packets.is_none() && limit.packets.is_limited() {
        if charge_as == Charge::AckFallback {
            Stat::RateAcks
        } else {
            Stat::RatePackets
        }
    } else if bytes.is_none() && limit.bytes.is_limited() {
        Stat::RateBytes
    } else if connections.is_none() && limit.connections.is_limited() {
        Stat::RateConnections
    } else {
        state.packets_tat = packets.unwrap_or(state.packets_tat);
        state.bytes_tat = bytes.unwrap_or(state.bytes_tat);
        state.connections_tat = connections.unwrap_or(state.connections_tat);
        Stat::WithinLimit
    };
    if verdict == Stat::WithinLimit {
        state.passed = 1;
    } else {
        state.dropped = 1;
        if is_own_excess(verdict) {
            // One interval of excess: recorded, never enough for the box on its own.
            state.excess_interval = excess_interval(now);
            state.excess_window = 1;
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
            shared_bucket(config, packet.family, now)
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

/// The bucket of the family's sources that arrived past the insert cap.
#[inline(always)]
fn shared_bucket(config: &Config, family: u8, now: u64) -> Stat {
    if family_bucket(&SHARED_BUCKET, &config.shared, family, now) {
        Stat::WithinLimit
    } else {
        Stat::RateShared
    }
}

/// Whether a source already has state under this key (it held state before it needed proof,
/// or it was proven since).
#[inline(always)]
pub fn has_state(key: &SourceKey) -> bool {
    SOURCES.get_ptr(key).is_some()
}
