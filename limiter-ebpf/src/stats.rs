//! Per-CPU counters. No atomics needed: an XDP program is never preempted by itself on a CPU.

use limiter_common::layout::{Stat, limit_stat_index};

use crate::maps::{LIMIT_STATS, STATS};

#[inline(always)]
pub fn count(stat: Stat, bytes: u64) {
    add(&STATS, stat as u32, bytes);
}

/// Counts, in monitor mode, the reason a frame that was passed would have been dropped.
#[inline(always)]
pub fn count_would_drop(reason: Stat, bytes: u64) {
    add(&STATS, reason.would_drop_index(), bytes);
}

/// Counts a rate-checked packet against its limit (default, class or service).
#[inline(always)]
pub fn count_limit(limit_id: u32, dropped: bool, bytes: u64) {
    add(&LIMIT_STATS, limit_stat_index(limit_id, dropped), bytes);
}

#[inline(always)]
fn add(map: &aya_ebpf::maps::PerCpuArray<limiter_common::layout::Counter>, index: u32, bytes: u64) {
    if let Some(counter) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU array value, valid for the program's run and used by this CPU only.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}
