//! The program's maps. Names, key and value layouts come from `limiter_common::layout`.

use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use limiter_common::{
    layout::{
        Bucket, CHALLENGE_PORTS_LEN, Config, Counter, FAMILIES, FlowKey, FlowState,
        LIMIT_STATS_LEN, Lease, Limit, PolicyEntry, ProvenKey, SAMPLERS_LEN, SERVICE_PORTS_LEN,
        SourceKey, SourceState, Stat, capacity,
    },
    lease::LEASE_SLOTS,
};

#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
pub static LIMITS: Array<Limit> = Array::with_max_entries(capacity::LIMITS, 0);

/// `BPF_F_NO_PREALLOC`: the kernel requires it for LPM tries.
const NO_PREALLOC: u32 = 1;

#[map]
pub static POLICY_V4: LpmTrie<[u8; 4], PolicyEntry> =
    LpmTrie::with_max_entries(capacity::POLICY_PREFIXES, NO_PREALLOC);

#[map]
pub static POLICY_V6: LpmTrie<[u8; 16], PolicyEntry> =
    LpmTrie::with_max_entries(capacity::POLICY_PREFIXES, NO_PREALLOC);

#[map]
pub static SERVICE_PORTS: Array<u32> = Array::with_max_entries(SERVICE_PORTS_LEN, 0);

#[map]
pub static SOURCES: LruHashMap<SourceKey, SourceState> =
    LruHashMap::with_max_entries(capacity::SOURCES, 0);

#[map]
pub static AGGREGATES: LruHashMap<SourceKey, Bucket> =
    LruHashMap::with_max_entries(capacity::AGGREGATES, 0);

#[map]
pub static NEW_SOURCE_BUDGET: PerCpuArray<Bucket> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static SHARED_BUCKET: Array<Bucket> = Array::with_max_entries(FAMILIES, 0);

#[map]
pub static UNPROVEN_BUCKET: Array<Bucket> = Array::with_max_entries(FAMILIES, 0);

#[map]
pub static OUT_OF_STATE_BUCKET: Array<Bucket> = Array::with_max_entries(FAMILIES, 0);

#[map]
pub static PROVEN: LruHashMap<ProvenKey, u64> = LruHashMap::with_max_entries(capacity::PROVEN, 0);

#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(capacity::FLOWS, 0);

#[map]
pub static CHALLENGE_PORTS: Array<u64> = Array::with_max_entries(CHALLENGE_PORTS_LEN, 0);

#[map]
pub static CHALLENGE_BUDGET: LruHashMap<ProvenKey, Bucket> =
    LruHashMap::with_max_entries(capacity::CHALLENGE_BUDGET, 0);

#[map]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Stat::STATS_LEN, 0);

/// Frames dropped or challenged, and frames passed as allowlisted, on this CPU (see `sample`).
#[map]
pub static SAMPLERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SAMPLERS_LEN, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

#[map]
pub static LIMIT_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(LIMIT_STATS_LEN, 0);

/// The per-CPU lease cache in front of SOURCES and AGGREGATES (see `lease`).
#[map]
pub static LEASES: PerCpuArray<Lease> = PerCpuArray::with_max_entries(LEASE_SLOTS, 0);

/// The lease epoch: a lease taken in another one is void; 0 turns leasing off.
#[map]
pub static LEASE_EPOCH: Array<u64> = Array::with_max_entries(1, 0);
