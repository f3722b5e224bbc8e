//! Sampled events. The per-source events of `rate` exist only for sources with state; a
//! spoofed flood, a shared-bucket flood or one of unproven SYNs has none, and neither has an
//! allowlisted source. So one of every [`SAMPLE_EVERY`] frames a CPU drops or answers with
//! the challenge, whatever the path, is sent to the daemon with its source prefix and
//! verdict (enough for the daemon to attribute an attack's rate to prefixes), and one of
//! every [`SAMPLE_EVERY`] frames it passes as allowlisted (so `top` can show allowlisted
//! heavy hitters). Each costs one per-CPU increment per frame and no clock read.

use limiter_common::layout::{Budget, Config, EventKind, SAMPLE_EVERY, Sampler, SourceEvent, Stat};

use crate::{
    maps::{EVENTS, SAMPLERS},
    parse::Packet,
    rate,
};

/// Counts a dropped or challenged frame, and sends every [`SAMPLE_EVERY`]th.
#[inline(always)]
pub fn drop(config: &Config, packet: &Packet, limit_id: u32, verdict: Stat) {
    sample(config, packet, limit_id, verdict, Sampler::Dropped);
}

/// Counts a frame passed as allowlisted, and sends every [`SAMPLE_EVERY`]th.
#[inline(always)]
pub fn allowlisted(config: &Config, packet: &Packet) {
    sample(
        config,
        packet,
        crate::policy::DEFAULT_LIMIT,
        Stat::Allowlisted,
        Sampler::Allowlisted,
    );
}

#[inline(always)]
fn sample(config: &Config, packet: &Packet, limit_id: u32, verdict: Stat, sampler: Sampler) {
    let Some(seen) = SAMPLERS.get_ptr_mut(sampler as u32) else {
        return;
    };
    // SAFETY: a per-CPU array value, used by this CPU only for the program's run.
    let due = unsafe {
        *seen += 1;
        *seen % SAMPLE_EVERY == 0
    };
    if !due {
        return;
    }
    // Written straight into the ring: no copy of the event on the stack.
    let Some(mut entry) = EVENTS.reserve::<SourceEvent>(0) else {
        crate::stats::count(Stat::EventsDropped, 0);
        return;
    };
    let (passed, dropped) = match sampler {
        Sampler::Dropped => (0, SAMPLE_EVERY),
        Sampler::Allowlisted => (SAMPLE_EVERY, 0),
    };
    entry.write(SourceEvent {
        kind: EventKind::Sampled as u32,
        reason: verdict as u32,
        key: rate::source_key(config, packet, limit_id, Budget::Other, false),
        at_ns: 0,
        passed,
        dropped,
    });
    entry.submit(0);
}
