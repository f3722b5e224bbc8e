//! The clocks. The fine clock is the dearest single step of the fast path (a serialized
//! TSC read, more so in a guest), so each path reads it only once it knows it needs it,
//! after its map lookups; a leased pass reads no clock at all. The coarse clock is the same
//! monotonic clock as of the last tick: cheap, behind by up to a tick, so it only ever
//! decides a drop that is far from its end (see `lease`), never a pass.

use aya_ebpf::helpers::generated::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};

/// The monotonic clock, in ns.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The monotonic clock as of the last tick, in ns: never ahead of [`now`].
#[inline(always)]
pub fn coarse() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}
