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
    /// `LruHashMap<ProvenKey, u64>`: sources that completed a real TCP handshake with this
    /// host, written by the sock_ops program; the value is when (kernel clock, ns).
    pub const PROVEN: &str = "PROVEN";
    /// `LruHashMap<FlowKey, FlowState>`: established TCP connections, written by the sock_ops
    /// program, with each flow's ACK budget.
    pub const FLOWS: &str = "FLOWS";
    /// `Array<Bucket>` indexed by [`crate::layout::family_index`]: TCP SYNs from sources that
    /// are neither proven nor tracked.
    pub const UNPROVEN_BUCKET: &str = "UNPROVEN_BUCKET";
    /// `Array<Bucket>` indexed by [`crate::layout::family_index`]: TCP packets of no
    /// established flow (random-tuple ACKs, stray data, FIN and RST).
    pub const OUT_OF_STATE_BUCKET: &str = "OUT_OF_STATE_BUCKET";
    /// `Array<u64>` indexed by TCP destination port: non-zero while SYNs from unproven
    /// sources to that port are answered with a SYN-cookie challenge; the value is when
    /// (kernel clock, ns) a SYN to it last went on to the kernel.
    pub const CHALLENGE_PORTS: &str = "CHALLENGE_PORTS";
    /// `LruHashMap<ProvenKey, Bucket>`: SYN-ACKs sent per prefix of the address they go to
    /// (the aggregate prefix), so the challenge never becomes a reflector.
    pub const CHALLENGE_BUDGET: &str = "CHALLENGE_BUDGET";
    /// `PerCpuArray<u64>`, indexed by [`crate::layout::Sampler`]: frames this CPU dropped or
    /// challenged, and frames it passed as allowlisted; every
    /// [`crate::layout::SAMPLE_EVERY`]th of each is sent to `EVENTS` as a sample. Not
    /// pinned: a new program starts its counts afresh.
    pub const SAMPLERS: &str = "SAMPLERS";
    /// `PerCpuArray<Lease>` of [`crate::lease::LEASE_SLOTS`] entries, indexed by
    /// [`crate::lease::lease_slot`]: the per-CPU lease cache in front of `SOURCES` and
    /// `AGGREGATES` (see [`crate::lease`]). Not pinned: a new program starts it empty.
    pub const LEASES: &str = "LEASES";
    /// `Array<u64>`, one entry: the lease epoch. A lease is good only while its epoch is
    /// this one; user space advances it after every change to the maps that could make a
    /// lease wrong (a limit, the config, a source's state). 0 turns leasing off. Not pinned,
    /// like `LEASES`.
    pub const LEASE_EPOCH: &str = "LEASE_EPOCH";
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
    /// Sources proven by a completed TCP handshake.
    pub const PROVEN: u32 = 262_144;
    /// Established TCP flows.
    pub const FLOWS: u32 = 524_288;
    /// Prefixes with a SYN-ACK budget.
    pub const CHALLENGE_BUDGET: u32 = 65_536;
}

/// Entries in `CHALLENGE_PORTS`: one per TCP port.
pub const CHALLENGE_PORTS_LEN: u32 = 65_536;

/// While a port is challenged, one unproven SYN to it goes on to the kernel at most this
/// often (ns). The kernel takes a cookie ACK only on a listener that has itself sent a
/// cookie in the last two minutes (with `tcp_syncookies = 2` it answers every SYN it sees
/// with one), so these keep every listener on the port ready for the program's cookies.
pub const CHALLENGE_KERNEL_SYN_INTERVAL_NS: u64 = 1_000_000_000;

/// Index of a family's entry in the per-family buckets (`SHARED_BUCKET`, `UNPROVEN_BUCKET`,
/// `OUT_OF_STATE_BUCKET`): a flood of one family never spends the other's budget.
#[inline(always)]
pub const fn family_index(family: u8) -> u32 {
    (family == crate::prefix::FAMILY_IPV6) as u32
}

/// Entries in each per-family bucket array.
pub const FAMILIES: u32 = 2;

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
    /// The network namespace (`SO_NETNS_COOKIE`) whose connections the sock_ops program
    /// records: it sees every namespace, and must record only the daemon's own.
    pub netns_cookie: u64,
    /// New-source inserts allowed per CPU.
    pub new_sources: Gcra,
    /// The bucket (one per family) shared by all sources that arrive past the insert cap.
    pub shared: Gcra,
    /// The bucket (one per family) of TCP SYNs from sources neither proven nor tracked.
    pub unproven: Gcra,
    /// The bucket (one per family) of TCP packets that belong to no established flow.
    pub out_of_state: Gcra,
    /// SYN-ACKs the challenge may send per aggregate prefix of their destination.
    pub challenge_replies: Gcra,
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
    /// TCP is judged by session: the sock_ops program records proven sources and
    /// established flows, and XDP classifies each TCP packet against them.
    pub const FLAG_SESSIONS: u32 = 1 << 5;
    /// The challenge answers an ACK that returns a valid cookie with a RST (the client's
    /// retry then reaches the kernel from a proven source) instead of handing it to the
    /// kernel.
    pub const FLAG_CHALLENGE_RESET: u32 = 1 << 6;

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

const _: () = assert!(core::mem::size_of::<Config>() == 16 + 64 + 8 + 5 * 32);

/// One limit: a packet bucket, an optional byte bucket, the aggregate bucket of its wider
/// prefix, the connection rate, each established flow's ACK budget and the penalty box. A
/// bucket with `scale == 0` is off; a limit with the first four off is unlimited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limit {
    /// Packets per second per source (and per budget: TCP, and everything else).
    pub packets: Gcra,
    /// Bytes per second per source.
    pub bytes: Gcra,
    /// Packets per second per aggregate prefix: new connections and connectionless traffic.
    pub aggregate: Gcra,
    /// New TCP connections (SYNs) per second per source.
    pub connections: Gcra,
    /// Pure ACKs per second per established flow; past it they spend the source's budget.
    pub acks: Gcra,
    /// How long a source with sustained excess stays in the penalty box; 0 = off.
    pub block_ns: u64,
    /// Packets of the source's packet bucket a CPU may pre-pay into one lease; 0 = no
    /// leases under this limit (see [`crate::lease::lease_sizes`]).
    pub lease: u32,
    /// Units of the aggregate bucket a CPU may pre-pay into one lease; 0 = none, and then
    /// traffic charged to the aggregate is never leased.
    pub aggregate_lease: u32,
}

const _: () = assert!(core::mem::size_of::<Limit>() == 5 * 32 + 16);

impl Limit {
    /// Whether a source under this limit needs any per-source state at all.
    #[inline(always)]
    pub const fn limits_sources(&self) -> bool {
        self.packets.is_limited()
            || self.bytes.is_limited()
            || self.aggregate.is_limited()
            || self.connections.is_limited()
    }
}

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

/// Which of a source's budgets a packet spends: its TCP sessions, or everything else
/// (UDP, ICMP, other protocols), so a flood of one kind in a client's name cannot spend the
/// other.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum Budget {
    /// TCP.
    #[default]
    Tcp = 0,
    /// UDP, ICMP and every other protocol.
    Other = 1,
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
    /// A [`Budget`] as its `u8`.
    pub budget: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<SourceKey>() == 24);

impl Budget {
    /// Its name in tables and metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Other => "other",
        }
    }
}

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
            budget: Budget::Tcp as u8,
            _pad: [0; 3],
        }
    }

    /// The same source's key for another budget.
    pub const fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = budget as u8;
        self
    }

    /// Which budget this key counts; `None` for a value no version of the program writes.
    pub const fn budget(&self) -> Option<Budget> {
        match self.budget {
            0 => Some(Budget::Tcp),
            1 => Some(Budget::Other),
            _ => None,
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
/// stores and additions on the rest, which only rank and report sources); it never
/// re-inserts a known source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceState {
    /// TAT of the packet bucket.
    pub packets_tat: u64,
    /// TAT of the byte bucket.
    pub bytes_tat: u64,
    /// TAT of the connection-rate bucket.
    pub connections_tat: u64,
    /// Clock (ns) of the last conforming packet: buckets idle past their refill are full.
    pub updated_ns: u64,
    /// While the clock is below this, the source is in the penalty box.
    pub blocked_until_ns: u64,
    /// The [`excess_interval`] in which the source was last over its own limit; 0 = never.
    pub excess_interval: u32,
    /// One bit per interval up to `excess_interval` (bit 0), set when the source was over
    /// its own limit in it: the record [`sustained_excess`] reads.
    pub excess_window: u32,
    /// Packets passed (wraps; it ranks sources and gives rates, by difference).
    pub passed: u32,
    /// Packets dropped, or in monitor mode that would have been (wraps, like `passed`).
    pub dropped: u32,
    /// Bytes of all its frames, passed or dropped.
    pub bytes: u64,
}

// The per-source state fits one cache line.
const _: () = assert!(core::mem::size_of::<SourceState>() == 64);

/// The interval excess is recorded in: the clock in units of 2^30 ns (1.07 s), a shift
/// instead of a division on the per-packet path. Never 0 for a real clock reading past the
/// first second of uptime.
#[inline(always)]
pub const fn excess_interval(now_ns: u64) -> u32 {
    (now_ns >> 30) as u32
}

/// Intervals (of [`excess_interval`]) looked back on, and how many of them must show excess:
/// a source is boxed only when it was over its own limit in 3 of the last 4 intervals (about
/// 3 of the last 4 seconds). A burst that one interval absorbs is delayed, never boxed.
pub const EXCESS_LOOKBACK: u32 = 4;
/// See [`EXCESS_LOOKBACK`].
pub const EXCESS_REQUIRED: u32 = 3;

/// Records excess at `interval` into a window last moved at `last`; returns the new window.
#[inline(always)]
pub const fn record_excess(window: u32, last: u32, interval: u32) -> u32 {
    let gap = interval.wrapping_sub(last);
    let moved = if gap >= 32 { 0 } else { window << gap };
    moved | 1
}

/// Whether a window (bit 0 = the current interval) shows sustained excess.
#[inline(always)]
pub const fn sustained_excess(window: u32) -> bool {
    let w = window & ((1 << EXCESS_LOOKBACK) - 1);
    // Four bits counted by hand: the BPF target has no population-count instruction.
    (w & 1) + ((w >> 1) & 1) + ((w >> 2) & 1) + ((w >> 3) & 1) >= EXCESS_REQUIRED
}

impl SourceState {
    /// Clock (ns) at the start of the interval the source was last over its own limit, or
    /// `None` if it never was.
    pub const fn last_excess_ns(&self) -> Option<u64> {
        if self.excess_interval == 0 {
            None
        } else {
            Some((self.excess_interval as u64) << 30)
        }
    }
}

/// The key of `PROVEN`: a source address, masked to the configured source prefix (so a v6
/// client proves its /64, the unit it is limited in).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProvenKey {
    /// The masked address.
    pub addr: AddrWords,
    /// [`crate::prefix::FAMILY_IPV4`] or [`crate::prefix::FAMILY_IPV6`].
    pub family: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<ProvenKey>() == 20);

impl ProvenKey {
    /// The key of `addr` (of `family`), masked to the source prefix `config` tracks it at,
    /// as the sock_ops program writes it and the XDP program looks it up.
    #[inline(always)]
    pub const fn new(config: &Config, family: u8, addr: &AddrWords) -> Self {
        let mask = if family == crate::prefix::FAMILY_IPV4 {
            &config.source_mask_v4
        } else {
            &config.source_mask_v6
        };
        Self {
            addr: crate::prefix::apply_mask(addr, mask),
            family,
            _pad: [0; 3],
        }
    }
}

/// The key of `FLOWS`: one TCP connection as XDP sees it arrive (remote = the packet's
/// source, local = its destination). Ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The client's address.
    pub remote: AddrWords,
    /// This host's address.
    pub local: AddrWords,
    /// The client's port.
    pub remote_port: u16,
    /// This host's port.
    pub local_port: u16,
    /// [`crate::prefix::FAMILY_IPV4`] or [`crate::prefix::FAMILY_IPV6`].
    pub family: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// One established flow: its ACK budget and what tells a duplicate-ACK storm.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// TAT of the flow's ACK bucket.
    pub acks_tat: u64,
    /// Clock (ns) of the last conforming ACK.
    pub updated_ns: u64,
    /// The acknowledgement number of the last pure ACK.
    pub last_ack: u32,
    /// Pure ACKs in a row that repeated `last_ack`.
    pub duplicate_acks: u32,
}

const _: () = assert!(core::mem::size_of::<FlowState>() == 24);

/// Duplicate ACKs in a row past which a flow's pure ACKs spend its source's budget. Loss
/// recovery on a fast stream repeats one ACK for every segment in flight after the loss, a
/// few dozen on a LAN; a storm repeats it forever.
pub const DUPLICATE_ACK_LIMIT: u32 = 64;

/// Which bucket a [`Lease`] pre-pays.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseBucket {
    /// A source's packet bucket (its `SOURCES` entry).
    Source = 1,
    /// An aggregate prefix's bucket (its `AGGREGATES` entry).
    Aggregate = 2,
}

/// One slot of the per-CPU lease cache: units pre-paid from one bucket, or a cached drop.
/// Only the CPU that owns the slot reads or writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lease {
    /// The bucket's key in `SOURCES` or `AGGREGATES`.
    pub key: SourceKey,
    /// The lease epoch it was taken in; the slot is void under any other (0 = empty).
    pub epoch: u64,
    /// A cached drop: no packet conforms before this clock (ns); 0 = none.
    pub retry_at_ns: u64,
    /// Bytes of frames passed or dropped through this slot, not yet added to the source.
    pub bytes: u64,
    /// Pre-paid units left.
    pub units: u32,
    /// Frames passed through this slot, not yet added to the source's count.
    pub passed: u32,
    /// Frames dropped through this slot (cached drops), not yet added.
    pub dropped: u32,
    /// A [`LeaseBucket`] as its `u8`.
    pub bucket: u8,
    /// The [`Stat`] of the cached drop, as its `u8`.
    pub verdict: u8,
    /// Explicit padding.
    pub _pad: [u8; 2],
}

// A slot is one cache line.
const _: () = assert!(core::mem::size_of::<Lease>() == 64);

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
    /// Passed: a pure ACK of an established flow, within the flow's ACK budget.
    FlowAck = 11, "flow_ack", false;
    /// Passed: a TCP packet of no established flow, within the out-of-state bucket.
    OutOfState = 12, "out_of_state", false;
    /// Passed: a SYN from a source neither proven nor tracked, within the unproven bucket.
    Unproven = 13, "unproven", false;
    /// Dropped: a TCP packet of no established flow, over the out-of-state bucket.
    RateOutOfState = 14, "rate_out_of_state", true;
    /// Dropped: a SYN from a source neither proven nor tracked, over the unproven bucket.
    RateUnproven = 15, "rate_unproven", true;
    /// Dropped: a SYN over the source's connection rate.
    RateConnections = 16, "rate_connections", true;
    /// Dropped: a pure ACK past its flow's ACK budget (or in a duplicate-ACK storm) and
    /// over its source's packet budget too.
    RateAcks = 17, "rate_acks", true;
    /// Sent back: a SYN from an unproven source to a challenged port, answered by the
    /// program with a SYN-cookie SYN-ACK (`XDP_TX`).
    Challenged = 18, "challenged", false;
    /// Passed: an ACK carrying a valid cookie; its source is proven.
    ChallengePassed = 19, "challenge_passed", false;
    /// Dropped: a SYN the challenge would answer, but the SYN-ACK budget of the prefix it
    /// would go to is spent.
    RateChallenge = 20, "rate_challenge", true;
    /// Sent back: an ACK carrying a valid cookie, answered with a RST (`[challenge]
    /// proven_ack = "reset"`); its source is proven, so the client's retry reaches the kernel.
    ChallengeReset = 21, "challenge_reset", false;
    /// Event: a new source arrived past the insert cap and was charged to the shared bucket.
    NewSourceCapped = 22, "new_source_capped", false;
    /// Event: inserting a new source's state failed; it was charged to the shared bucket.
    StateInsertFailed = 23, "state_insert_failed", false;
    /// Event: a new source's state was inserted.
    SourceInserted = 24, "source_inserted", false;
    /// Event: a source entered the penalty box.
    PenaltyBoxEntered = 25, "penalty_box_entered", false;
    /// Event: a source event could not be written to the ring buffer.
    EventsDropped = 26, "events_dropped", false;
    /// Event: a pure ACK of an established flow spent its source's budget (the flow's ACK
    /// budget was spent, or a duplicate-ACK storm).
    AckFallback = 27, "ack_fallback", false;
    /// Event: an ACK to a challenged port that belongs to no flow and carries no valid
    /// cookie (charged to the out-of-state bucket).
    ChallengeFailed = 28, "challenge_failed", false;
}

impl Stat {
    /// The number of verdict counters; they come first.
    pub const VERDICTS: u32 = 22;
    /// The number of counters. `STATS` holds twice as many: from [`Stat::LEN`] on, the
    /// would-be drops of monitor mode by reason ([`Stat::would_drop_index`]).
    pub const LEN: u32 = 29;
    /// The length of `STATS`.
    pub const STATS_LEN: u32 = 2 * Self::LEN;

    /// Index in `STATS` of the monitor-mode would-drop count of this drop reason.
    #[inline(always)]
    pub const fn would_drop_index(self) -> u32 {
        Self::LEN + self as u32
    }

    /// Whether a verdict of this kind sends the frame back out (in enforce mode): the
    /// challenge's SYN-ACK, written over the SYN, or its RST, written over the proving ACK.
    pub const fn transmits(self) -> bool {
        matches!(self, Stat::Challenged | Stat::ChallengeReset)
    }

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
    /// A sample of the frames dropped (or answered by the challenge) on one CPU, on any
    /// path, known source or not, or of those passed as allowlisted (which have no state):
    /// `reason` is the verdict, `key` the source masked to the source prefix, `dropped` (or
    /// for the allowlisted `passed`) the number of frames it stands for ([`SAMPLE_EVERY`]).
    Sampled = 3,
}

/// One of every this many frames a CPU drops (or challenges), and of those it passes as
/// allowlisted, is sent to the daemon as an [`EventKind::Sampled`] event: a 1 Mpps flood is
/// 3,900 events a second, a flood the daemon calls an attack (1,000 pps by default) about
/// four.
pub const SAMPLE_EVERY: u64 = 256;

/// The counters of the `SAMPLERS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    /// Frames dropped or answered by the challenge (the attack records).
    Dropped = 0,
    /// Frames passed as allowlisted (`top`'s allowlisted heavy hitters).
    Allowlisted = 1,
}

/// Entries of the `SAMPLERS` array.
pub const SAMPLERS_LEN: u32 = 2;

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
    /// Kernel clock (ns).
    pub at_ns: u64,
    /// The source's passed count so far.
    pub passed: u64,
    /// The source's dropped count so far.
    pub dropped: u64,
}

const _: () = assert!(core::mem::size_of::<SourceEvent>() == 8 + 24 + 24);

impl SourceEvent {
    /// What the event reports; `None` for a kind no version of the program writes.
    pub const fn kind(&self) -> Option<EventKind> {
        match self.kind {
            1 => Some(EventKind::Limited),
            2 => Some(EventKind::PenaltyBox),
            3 => Some(EventKind::Sampled),
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
    // SAFETY: as above.
    unsafe impl aya::Pod for ProvenKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lease {}
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
        assert_eq!(core::mem::offset_of!(Config, netns_cookie), 80);
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
            at_ns: 0,
            passed: 0,
            dropped: 0,
        };
        assert_eq!(event.kind(), Some(EventKind::PenaltyBox));
        assert_eq!(event.reason(), Some(Stat::RatePackets));
    }

    #[test]
    fn excess_is_sustained_only_in_most_of_the_last_intervals() {
        // One interval of excess (a burst): not sustained, however often it repeats within it.
        let w = record_excess(0, 0, 100);
        assert!(!sustained_excess(w));
        assert!(!sustained_excess(record_excess(w, 100, 100)));
        // Two of the last four: still not.
        let w = record_excess(w, 100, 102);
        assert!(!sustained_excess(w));
        // Three of the last four: sustained.
        let w3 = record_excess(w, 102, 103);
        assert!(sustained_excess(w3));
        // The old ones age out: 100 and 102 are gone four intervals later.
        assert!(!sustained_excess(record_excess(w3, 103, 106)));
        // A long gap (and wrap-around of the interval counter) clears the window.
        assert_eq!(record_excess(u32::MAX, 5, 5 + 40), 1);
        assert_eq!(record_excess(0b111, u32::MAX, 0), 0b1111);
        let state = SourceState {
            excess_interval: 3,
            ..SourceState::default()
        };
        assert_eq!(state.last_excess_ns(), Some(3 << 30));
        assert_eq!(SourceState::default().last_excess_ns(), None);
    }

    #[test]
    fn budgets_and_families_index_their_own_entries() {
        use core::net::IpAddr;
        let key = SourceKey::from_addr("192.0.2.1".parse::<IpAddr>().unwrap(), 32, 0);
        assert_eq!(key.budget(), Some(Budget::Tcp));
        assert_eq!(key.with_budget(Budget::Other).budget(), Some(Budget::Other));
        assert_ne!(key, key.with_budget(Budget::Other));
        assert_eq!(family_index(crate::prefix::FAMILY_IPV4), 0);
        assert_eq!(family_index(crate::prefix::FAMILY_IPV6), 1);
        assert!(family_index(crate::prefix::FAMILY_IPV6) < FAMILIES);
        for stat in Stat::ALL {
            assert!(stat.would_drop_index() < Stat::STATS_LEN);
        }
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
