//! Everything the kernel and user space must agree on: map names, keys, values, the config
//! record and counter indexes. All types are `#[repr(C)]` with explicit padding and a size
//! assertion, so a layout change is a compile error on both sides at once.

use crate::{prefix::AddrWords, rate::Gcra};

/// Names of the maps, as declared in the eBPF object.
pub mod map_names {
    /// `Array<Config>`, one entry: the global settings.
    pub const CONFIG: &str = "CONFIG";
    /// `Array<Limit>`: limit 0 is the default, then classes and service rules.
    pub const LIMITS: &str = "LIMITS";
    /// `LpmTrie<[u8; 4], PolicyEntry>`: deny, allow and class prefixes for IPv4.
    pub const POLICY_V4: &str = "POLICY_V4";
    /// `LpmTrie<[u8; 16], PolicyEntry>`: the same for IPv6.
    pub const POLICY_V6: &str = "POLICY_V6";
    /// `Array<u32>` indexed by [`crate::layout::service_index`]: the limit id of a port.
    pub const SERVICE_PORTS: &str = "SERVICE_PORTS";
    /// `LruHashMap<SourceKey, SourceState>`: per-source state.
    pub const SOURCES: &str = "SOURCES";
    /// `LruHashMap<SourceKey, Bucket>`: per wider prefix, against spoofed floods.
    pub const AGGREGATES: &str = "AGGREGATES";
    /// `PerCpuArray<Bucket>`, one entry: the per-CPU budget of new-source inserts.
    pub const NEW_SOURCE_BUDGET: &str = "NEW_SOURCE_BUDGET";
    /// `Array<Bucket>`, one entry: the shared bucket for sources past the insert cap.
    pub const SHARED_BUCKET: &str = "SHARED_BUCKET";
    /// `PerCpuArray<Counter>` indexed by [`crate::layout::Stat`].
    pub const STATS: &str = "STATS";
    /// `RingBuf` of [`crate::layout::SourceEvent`].
    pub const EVENTS: &str = "EVENTS";
    /// `PerCpuArray<Counter>` indexed by [`crate::layout::limit_stat_index`]: packets and
    /// bytes per limit (default, class, service) and outcome.
    pub const LIMIT_STATS: &str = "LIMIT_STATS";
}

/// Capacities the program is built with; user space may override them at load time.
pub mod capacity {
    /// Tracked sources, both families together.
    pub const SOURCES: u32 = 262_144;
    /// Tracked aggregate prefixes.
    pub const AGGREGATES: u32 = 65_536;
    /// Prefixes per family in the policy trie (deny + allow + class).
    pub const POLICY_PREFIXES: u32 = 262_144;
    /// Limits: the default, classes and service rules.
    pub const LIMITS: u32 = 256;
    /// Ring buffer bytes for source events.
    pub const EVENTS_BYTES: u32 = 256 * 1024;
}

/// Entries in `LIMIT_STATS`: passed and dropped for every limit.
pub const LIMIT_STATS_LEN: u32 = capacity::LIMITS * 2;

/// Index in `LIMIT_STATS` of a limit's passed (or dropped) count.
#[inline(always)]
pub const fn limit_stat_index(limit_id: u32, dropped: bool) -> u32 {
    limit_id * 2 + dropped as u32
}

/// Which transport a service rule applies to; the slot in [`service_index`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceProto {
    /// TCP destination ports.
    Tcp = 0,
    /// UDP destination ports.
    Udp = 1,
}

/// Entries in the service port table: one per port per transport.
pub const SERVICE_PORTS_LEN: u32 = 2 * 65_536;

/// Index of a port in the service port table.
#[inline(always)]
pub const fn service_index(proto: ServiceProto, port: u16) -> u32 {
    (proto as u32) * 65_536 + port as u32
}

/// Global settings, one record in the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Bit set of `Config::FLAG_*`.
    pub flags: u32,
    /// Prefix length sources are aggregated to (IPv4), for keys and events.
    pub source_prefix_v4: u8,
    /// Prefix length sources are aggregated to (IPv6).
    pub source_prefix_v6: u8,
    /// Prefix length of the aggregate limit (IPv4).
    pub aggregate_prefix_v4: u8,
    /// Prefix length of the aggregate limit (IPv6).
    pub aggregate_prefix_v6: u8,
    /// Interface index the program was attached to; user space reads it to tell a stale pin
    /// (the interface was deleted or recreated) from its own. The program ignores it.
    pub ifindex: u32,
    /// How the program was attached (`ATTACH_*`); informational, like `ifindex`.
    pub attach_mode: u32,
    /// [`crate::prefix::mask_words`] of `source_prefix_v4`.
    pub source_mask_v4: AddrWords,
    /// [`crate::prefix::mask_words`] of `source_prefix_v6`.
    pub source_mask_v6: AddrWords,
    /// [`crate::prefix::mask_words`] of `aggregate_prefix_v4`.
    pub aggregate_mask_v4: AddrWords,
    /// [`crate::prefix::mask_words`] of `aggregate_prefix_v6`.
    pub aggregate_mask_v6: AddrWords,
    /// How long a source that exceeded its limit stays in the penalty box; 0 = off.
    pub block_ns: u64,
    /// New-source inserts allowed per CPU.
    pub new_sources: Gcra,
    /// The bucket shared by all sources that arrive past the insert cap.
    pub shared: Gcra,
}

impl Config {
    /// Monitor mode: decide and count, but pass everything.
    pub const FLAG_MONITOR: u32 = 1 << 0;
    /// The IPv4 policy trie has entries (otherwise its lookup is skipped).
    pub const FLAG_POLICY_V4: u32 = 1 << 1;
    /// The IPv6 policy trie has entries.
    pub const FLAG_POLICY_V6: u32 = 1 << 2;
    /// The service port table has entries.
    pub const FLAG_SERVICES: u32 = 1 << 3;
    /// The aggregate limit is checked.
    pub const FLAG_AGGREGATES: u32 = 1 << 4;

    /// Attached in the driver (native XDP).
    pub const ATTACH_NATIVE: u32 = 1;
    /// Attached in generic (skb) mode.
    pub const ATTACH_GENERIC: u32 = 2;

    /// Whether `flag` is set.
    #[inline(always)]
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

const _: () = assert!(core::mem::size_of::<Config>() == 16 + 64 + 8 + 32 + 32);

/// One limit: a packet bucket, an optional byte bucket and the aggregate bucket of its wider
/// prefix. A bucket with `scale == 0` is off; a limit with all three off is unlimited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limit {
    /// Packets per second per source.
    pub packets: Gcra,
    /// Bytes per second per source.
    pub bytes: Gcra,
    /// Packets per second per aggregate prefix.
    pub aggregate: Gcra,
}

const _: () = assert!(core::mem::size_of::<Limit>() == 96);

/// What a policy prefix says about its sources.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyAction {
    /// Limited by the class in `limit_id`.
    Class = 1,
    /// Passed without limits.
    Allow = 2,
    /// Dropped.
    Deny = 3,
}

/// Value of the policy tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyEntry {
    /// A [`PolicyAction`] as its `u8`.
    pub action: u8,
    /// Explicit padding.
    pub _pad: u8,
    /// For [`PolicyAction::Class`], the index into `LIMITS`.
    pub limit_id: u16,
}

const _: () = assert!(core::mem::size_of::<PolicyEntry>() == 4);

impl PolicyEntry {
    /// An entry saying `action` (with `limit_id` for a class).
    pub const fn new(action: PolicyAction, limit_id: u16) -> Self {
        Self {
            action: action as u8,
            _pad: 0,
            limit_id,
        }
    }

    /// What the entry says; `None` for a value no version of the program writes.
    pub const fn action(&self) -> Option<PolicyAction> {
        match self.action {
            1 => Some(PolicyAction::Class),
            2 => Some(PolicyAction::Allow),
            3 => Some(PolicyAction::Deny),
            _ => None,
        }
    }
}

/// The key of per-source and per-aggregate state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// The source address, masked to `prefix_len`.
    pub addr: AddrWords,
    /// The limit this state counts against: one source has separate budgets per class or
    /// service.
    pub limit_id: u16,
    /// [`crate::prefix::FAMILY_IPV4`] or [`crate::prefix::FAMILY_IPV6`].
    pub family: u8,
    /// The prefix length `addr` was masked to.
    pub prefix_len: u8,
}

const _: () = assert!(core::mem::size_of::<SourceKey>() == 20);

impl SourceKey {
    /// The key of `addr` tracked at `prefix_len` (masked to it) under `limit_id`.
    pub const fn from_addr(addr: core::net::IpAddr, prefix_len: u8, limit_id: u16) -> Self {
        let (family, bytes) = match addr {
            core::net::IpAddr::V4(v4) => {
                let o = v4.octets();
                let mut b = [0u8; 16];
                b[0] = o[0];
                b[1] = o[1];
                b[2] = o[2];
                b[3] = o[3];
                (crate::prefix::FAMILY_IPV4, b)
            }
            core::net::IpAddr::V6(v6) => (crate::prefix::FAMILY_IPV6, v6.octets()),
        };
        let words = crate::prefix::words_from_bytes(bytes);
        Self {
            addr: crate::prefix::apply_mask(&words, &crate::prefix::mask_words(prefix_len)),
            limit_id,
            family,
            prefix_len,
        }
    }

    /// The (masked) source address.
    pub const fn ip(&self) -> core::net::IpAddr {
        let b = crate::prefix::bytes_from_words(&self.addr);
        if self.family == crate::prefix::FAMILY_IPV4 {
            core::net::IpAddr::V4(core::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        } else {
            core::net::IpAddr::V6(core::net::Ipv6Addr::from_octets(b))
        }
    }
}

/// One GCRA bucket's state: the TAT (see [`crate::rate`]) and when it last advanced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Theoretical arrival time, in the bucket's scaled units.
    pub tat: u64,
    /// Clock (ns) of the last update.
    pub updated_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Bucket>() == 16);

/// Per-source state. The kernel changes it in place (compare-and-swap on the TATs, plain
/// additions on the counts, which only rank sources); it never re-inserts a known source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceState {
    /// TAT of the packet bucket.
    pub packets_tat: u64,
    /// TAT of the byte bucket.
    pub bytes_tat: u64,
    /// Clock (ns) of the last conforming packet: buckets idle past their refill are full.
    pub updated_ns: u64,
    /// While the clock is below this, the source is in the penalty box.
    pub blocked_until_ns: u64,
    /// Clock (ns) the source was last over its limit; 0 = never.
    pub limited_ns: u64,
    /// Packets passed.
    pub passed: u64,
    /// Packets dropped (or, in monitor mode, that would have been).
    pub dropped: u64,
    /// Bytes of all its frames, passed or dropped.
    pub bytes: u64,
}

// The per-source state fits one cache line.
const _: () = assert!(core::mem::size_of::<SourceState>() == 64);

/// Per-CPU packet and byte counts of one [`Stat`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes (whole frames).
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<Counter>() == 16);

macro_rules! stats {
    ($($(#[$doc:meta])* $name:ident = $index:literal, $label:literal, $drop:literal;)*) => {
        /// Counter indexes. The first [`Stat::VERDICTS`] are verdicts: every frame lands in
        /// exactly one of them. The rest count events that accompany a verdict.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Stat {
            $($(#[$doc])* $name = $index,)*
        }

        impl Stat {
            /// All counters, in index order.
            pub const ALL: &'static [Stat] = &[$(Stat::$name,)*];

            /// The label used in metrics and logs.
            pub const fn label(self) -> &'static str {
                match self { $(Stat::$name => $label,)* }
            }

            /// Whether a verdict of this kind drops the frame (in enforce mode).
            pub const fn drops(self) -> bool {
                match self { $(Stat::$name => $drop,)* }
            }
        }
    };
}

stats! {
    /// Passed: within every limit that applies.
    WithinLimit = 0, "within_limit", false;
    /// Passed: the source is allowlisted.
    Allowlisted = 1, "allowlisted", false;
    /// Passed: not IPv4 or IPv6 (ARP, LLDP, ...).
    NotIp = 2, "not_ip", false;
    /// Passed in monitor mode: would have been dropped.
    MonitorWouldDrop = 3, "monitor_would_drop", false;
    /// Dropped: the source is denylisted.
    Denylisted = 4, "denylisted", true;
    /// Dropped: over the per-source packet rate.
    RatePackets = 5, "rate_packets", true;
    /// Dropped: over the per-source byte rate.
    RateBytes = 6, "rate_bytes", true;
    /// Dropped: over the aggregate rate of the source's wider prefix.
    RateAggregate = 7, "rate_aggregate", true;
    /// Dropped: over the shared bucket of sources past the new-source cap.
    RateShared = 8, "rate_shared", true;
    /// Dropped: the source is in the penalty box.
    PenaltyBox = 9, "penalty_box", true;
    /// Dropped: a malformed IP packet.
    Malformed = 10, "malformed", true;
    /// Event: a new source arrived past the insert cap and was charged to the shared bucket.
    NewSourceCapped = 11, "new_source_capped", false;
    /// Event: inserting a new source's state failed; it was charged to the shared bucket.
    StateInsertFailed = 12, "state_insert_failed", false;
    /// Event: a new source's state was inserted.
    SourceInserted = 13, "source_inserted", false;
    /// Event: a source entered the penalty box.
    PenaltyBoxEntered = 14, "penalty_box_entered", false;
    /// Event: a source event could not be written to the ring buffer.
    EventsDropped = 15, "events_dropped", false;
}

impl Stat {
    /// The number of verdict counters; they come first.
    pub const VERDICTS: u32 = 11;
    /// The number of counters: the length of `STATS`.
    pub const LEN: u32 = 16;

    /// Whether this counter is a verdict (exactly one per frame).
    pub const fn is_verdict(self) -> bool {
        (self as u32) < Self::VERDICTS
    }
}

const _: () = assert!(Stat::ALL.len() as u32 == Stat::LEN);

/// What a [`SourceEvent`] reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A source went over one of its limits (at most one event per source per second).
    Limited = 1,
    /// A source entered the penalty box.
    PenaltyBox = 2,
}

/// A record in the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceEvent {
    /// An [`EventKind`] as its `u32`.
    pub kind: u32,
    /// The [`Stat`] whose limit was exceeded.
    pub reason: u32,
    /// The source.
    pub key: SourceKey,
    /// Explicit padding.
    pub _pad: u32,
    /// Kernel clock (ns).
    pub at_ns: u64,
    /// The source's passed count so far.
    pub passed: u64,
    /// The source's dropped count so far.
    pub dropped: u64,
}

const _: () = assert!(core::mem::size_of::<SourceEvent>() == 8 + 20 + 4 + 24);

impl SourceEvent {
    /// What the event reports; `None` for a kind no version of the program writes.
    pub const fn kind(&self) -> Option<EventKind> {
        match self.kind {
            1 => Some(EventKind::Limited),
            2 => Some(EventKind::PenaltyBox),
            _ => None,
        }
    }

    /// The counter whose limit was exceeded.
    pub fn reason(&self) -> Option<Stat> {
        Stat::ALL.get(self.reason as usize).copied()
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type below is `#[repr(C)]`, made only of integers and arrays of integers,
    // with all padding explicit, so any bit pattern is a valid value.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Limit {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Bucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_indexes_are_dense_and_verdicts_come_first() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(*stat as usize, i);
            assert_eq!(stat.is_verdict(), i < Stat::VERDICTS as usize);
            if !stat.is_verdict() {
                assert!(!stat.drops(), "events never decide a verdict");
            }
        }
    }

    #[test]
    fn layout_sizes_and_alignment() {
        assert_eq!(core::mem::align_of::<SourceState>(), 8);
        assert_eq!(core::mem::align_of::<SourceKey>(), 4);
        assert_eq!(core::mem::offset_of!(SourceEvent, at_ns), 32);
        assert_eq!(core::mem::offset_of!(Config, block_ns), 80);
        assert_eq!(core::mem::offset_of!(SourceKey, limit_id), 16);
    }

    #[test]
    fn typed_accessors_round_trip() {
        use core::net::IpAddr;
        let v4: IpAddr = "192.0.2.77".parse().unwrap();
        let key = SourceKey::from_addr(v4, 24, 3);
        assert_eq!(key.ip(), "192.0.2.0".parse::<IpAddr>().unwrap(), "masked");
        assert_eq!((key.family, key.prefix_len, key.limit_id), (4, 24, 3));
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(SourceKey::from_addr(v6, 128, 0).ip(), v6);
        for action in [PolicyAction::Class, PolicyAction::Allow, PolicyAction::Deny] {
            assert_eq!(PolicyEntry::new(action, 7).action(), Some(action));
        }
        let entry = PolicyEntry {
            action: 9,
            _pad: 0,
            limit_id: 0,
        };
        assert_eq!(entry.action(), None);
        let event = SourceEvent {
            kind: 2,
            reason: Stat::RatePackets as u32,
            key,
            _pad: 0,
            at_ns: 0,
            passed: 0,
            dropped: 0,
        };
        assert_eq!(event.kind(), Some(EventKind::PenaltyBox));
        assert_eq!(event.reason(), Some(Stat::RatePackets));
    }

    #[test]
    fn service_index_is_within_the_table() {
        assert_eq!(service_index(ServiceProto::Tcp, 0), 0);
        assert_eq!(
            service_index(ServiceProto::Udp, u16::MAX),
            SERVICE_PORTS_LEN - 1
        );
    }
}
