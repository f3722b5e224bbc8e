//! Sampled drop events. The per-source events of `rate` exist only for sources with state;
//! a spoofed flood, a shared-bucket flood or one of unproven SYNs has none. So one of every
//! [`DROP_SAMPLE_EVERY`] frames a CPU drops or answers with the challenge, whatever the path,
//! is sent to the daemon with its source prefix and verdict: enough for the daemon to
//! attribute an attack's rate to prefixes, at one per-CPU increment per dropped frame and
//! no clock read.

use limiter_common::layout::{Budget, Config, DROP_SAMPLE_EVERY, EventKind, SourceEvent, Stat};

use crate::{
    maps::{DROP_SAMPLER, EVENTS},
    parse::Packet,
    rate,
};

/// Counts a dropped or challenged frame, and sends every [`DROP_SAMPLE_EVERY`]th.
#[inline(always)]
pub fn drop(config: &Config, packet: &Packet, limit_id: u32, verdict: Stat) {
    let Some(seen) = DROP_SAMPLER.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU array value, used by this CPU only for the program's run.
    let due = unsafe {
        *seen += 1;
        *seen % DROP_SAMPLE_EVERY == 0
    };
    if !due {
        return;
    }
    // Written straight into the ring: no copy of the event on the stack.
    let Some(mut entry) = EVENTS.reserve::<SourceEvent>(0) else {
        crate::stats::count(Stat::EventsDropped, 0);
        return;
    };
    entry.write(SourceEvent {
        kind: EventKind::Sampled as u32,
        reason: verdict as u32,
        key: rate::source_key(config, packet, limit_id, Budget::Other, false),
        at_ns: 0,
        passed: 0,
        dropped: DROP_SAMPLE_EVERY,
    });
    entry.submit(0);
}
