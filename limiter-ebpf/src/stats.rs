//! Per-CPU counters. No atomics needed: an XDP program is never preempted by itself on a CPU.

use limiter_common::layout::Stat;

use crate::maps::STATS;

#[inline(always)]
pub fn count(stat: Stat, bytes: u64) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: a per-CPU array value, valid for the program's run and used by this CPU only.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}
