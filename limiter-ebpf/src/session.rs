//! The choice of budget: what a packet is (a TCP SYN, a pure ACK of an established flow,
//! other TCP of a flow, TCP of no flow, or connectionless traffic) decides which buckets it
//! is charged to. The kernel's own TCP, through the sock_ops program, says which sources
//! completed a handshake (`PROVEN`) and which flows are established (`FLOWS`).

use aya_ebpf::programs::XdpContext;
use limiter_common::layout::{
    Budget, Config, DUPLICATE_ACK_LIMIT, FlowKey, FlowState, Limit, ProvenKey, Stat,
};

use crate::{
    challenge, clock, lease,
    maps::{FLOWS, LIMITS, OUT_OF_STATE_BUCKET, PROVEN, UNPROVEN_BUCKET},
    parse::{IPPROTO_TCP, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    rate::{self, Admission, Charge},
};

/// What a TCP packet is to the session rules.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TcpKind {
    /// SYN without ACK: a new connection.
    Syn,
    /// ACK without SYN, FIN or RST, and no payload.
    PureAck,
    /// Anything else: data, FIN, RST, SYN-ACK.
    Other,
}

#[inline(always)]
fn tcp_kind(packet: &Packet) -> TcpKind {
    let flags = packet.tcp.flags;
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        TcpKind::Syn
    } else if flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_ACK) == TCP_ACK && !packet.tcp.has_payload
    {
        TcpKind::PureAck
    } else {
        TcpKind::Other
    }
}

/// Decides the verdict for a packet under the limit `limit_id`.
#[inline(always)]
pub fn check(ctx: &XdpContext, config: &Config, packet: &Packet, limit_id: u32, len: u64) -> Stat {
    let epoch = lease::epoch();
    let Some(limit) = LIMITS.get(limit_id) else {
        // Only a table written by a newer user space can name a missing limit.
        return Stat::WithinLimit;
    };
    if !limit.limits_sources() {
        // An unlimited class needs no state at all.
        return Stat::WithinLimit;
    }
    if packet.proto != IPPROTO_TCP {
        let key = rate::source_key(config, packet, limit_id, Budget::Other, false);
        return rate::source(
            ctx,
            config,
            limit,
            packet,
            &key,
            Charge::Packet,
            Admission::Capped,
            len,
            epoch,
        );
    }
    // Two calls of the same path rather than one with the budget chosen first: with the key
    // computed before the branch, the verifier counts 528 bytes of stack (limit 512).
    let key = rate::source_key(config, packet, limit_id, Budget::Tcp, false);
    if !config.has(Config::FLAG_SESSIONS) {
        return rate::source(
            ctx,
            config,
            limit,
            packet,
            &key,
            Charge::Packet,
            Admission::Capped,
            len,
            epoch,
        );
    }
    match tcp_kind(packet) {
        TcpKind::Syn => {
            if rate::has_state(&key) || is_proven(config, packet) {
                rate::source(
                    ctx,
                    config,
                    limit,
                    packet,
                    &key,
                    Charge::Syn,
                    Admission::Proven,
                    len,
                    epoch,
                )
            } else {
                let now = clock::now();
                if let Some(stat) = (!config.has(Config::FLAG_MONITOR)
                    && challenge::should_challenge(config, packet, now))
                .then(|| challenge::answer(ctx, config, packet, now))
                .flatten()
                {
                    stat
                } else if rate::family_bucket(
                    &UNPROVEN_BUCKET,
                    &config.unproven,
                    packet.family,
                    now,
                ) {
                    Stat::Unproven
                } else {
                    Stat::RateUnproven
                }
            }
        }
        kind => {
            let Some(flow) = FLOWS.get_ptr_mut(flow_key(packet)) else {
                let now = clock::now();
                if challenge::engaged(packet) {
                    if challenge::proves(ctx, config, packet, now) {
                        // Reset (never in monitor mode, which sends nothing), or hand it to
                        // the kernel, which completes the connection from the cookie.
                        return if config.has(Config::FLAG_CHALLENGE_RESET)
                            && !config.has(Config::FLAG_MONITOR)
                        {
                            challenge::reset(ctx, packet).unwrap_or(Stat::ChallengePassed)
                        } else {
                            Stat::ChallengePassed
                        };
                    }
                    crate::stats::count(Stat::ChallengeFailed, 0);
                }
                // Neither a SYN nor part of a connection the kernel knows: whatever source
                // address it carries, it spends no source's budget and creates no state.
                return if rate::family_bucket(
                    &OUT_OF_STATE_BUCKET,
                    &config.out_of_state,
                    packet.family,
                    now,
                ) {
                    Stat::OutOfState
                } else {
                    Stat::RateOutOfState
                };
            };
            let charge = if kind == TcpKind::PureAck {
                if flow_ack_conforms(limit, flow, packet, clock::now()) {
                    return Stat::FlowAck;
                }
                crate::stats::count(Stat::AckFallback, 0);
                Charge::AckFallback
            } else {
                Charge::Flow
            };
            rate::source(
                ctx,
                config,
                limit,
                packet,
                &key,
                charge,
                Admission::Proven,
                len,
                epoch,
            )
        }
    }
}

/// The flow a packet arriving from a client belongs to.
#[inline(always)]
fn flow_key(packet: &Packet) -> FlowKey {
    FlowKey {
        remote: packet.src,
        local: packet.dst,
        remote_port: packet.src_port,
        local_port: packet.dst_port,
        family: packet.family,
        _pad: [0; 3],
    }
}

/// Whether the packet's source (at the configured source prefix) completed a handshake.
#[inline(always)]
fn is_proven(config: &Config, packet: &Packet) -> bool {
    PROVEN
        .get_ptr(ProvenKey::new(config, packet.family, &packet.src))
        .is_some()
}

/// Charges a pure ACK to its flow's ACK budget. False when the budget is spent or the flow
/// is in a duplicate-ACK storm: the ACK then falls back to its source's budget.
#[inline(always)]
fn flow_ack_conforms(limit: &Limit, flow: *mut FlowState, packet: &Packet, now: u64) -> bool {
    // SAFETY: `flow` is a live value of FLOWS. `last_ack` and `duplicate_acks` are plain
    // stores: two CPUs racing on one flow's ACKs can miscount a duplicate, which only moves
    // the storm threshold by one.
    unsafe {
        if (*flow).last_ack == packet.tcp.ack {
            (*flow).duplicate_acks = (*flow).duplicate_acks.saturating_add(1);
            if (*flow).duplicate_acks > DUPLICATE_ACK_LIMIT {
                return false;
            }
        } else {
            (*flow).last_ack = packet.tcp.ack;
            (*flow).duplicate_acks = 0;
        }
        let updated = core::ptr::read_volatile(&(*flow).updated_ns);
        if rate::charge(&raw mut (*flow).acks_tat, updated, &limit.acks, now, 1) {
            (*flow).updated_ns = now;
            true
        } else {
            false
        }
    }
}
