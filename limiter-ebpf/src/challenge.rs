//! The SYN-cookie challenge: during an attack on a port, a SYN from an unproven source is
//! answered by the program itself with a SYN-ACK carrying a SYN cookie made with the kernel's
//! own secret, written over the SYN and sent back out (`XDP_TX`). Only a source that really
//! receives at its address can return the cookie in its ACK; that ACK proves it and then
//! either goes on to the kernel, which completes the connection from the cookie (the daemon
//! sets `net.ipv4.tcp_syncookies = 2` while a challenge is on, so the listener takes cookies it
//! did not issue itself), or is answered with a RST written over it, so that the client's
//! retry, from a proven source now, reaches the kernel with all its TCP options
//! (`proven_ack = "reset"`). A spoofed flood gets SYN-ACKs to its forged addresses, capped
//! per prefix, never larger than the SYNs, and no state anywhere.

use aya_ebpf::{
    bindings::{iphdr, ipv6hdr, tcphdr},
    helpers::generated::{
        bpf_tcp_raw_check_syncookie_ipv4, bpf_tcp_raw_check_syncookie_ipv6,
        bpf_tcp_raw_gen_syncookie_ipv4, bpf_tcp_raw_gen_syncookie_ipv6, bpf_xdp_adjust_tail,
    },
    programs::XdpContext,
};
use limiter_common::{
    layout::{Bucket, CHALLENGE_KERNEL_SYN_INTERVAL_NS, Config, ProvenKey, Stat},
    prefix::{FAMILY_IPV4, apply_mask},
};

use crate::{
    maps::{CHALLENGE_BUDGET, CHALLENGE_PORTS, PROVEN},
    parse::{Packet, TCP_ACK, TCP_RST, TCP_SYN},
    rate,
};

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const TCP_LEN: usize = 20;
/// A SYN-ACK with one option, the MSS (kind 2, length 4).
const TCP_WITH_MSS_LEN: usize = 24;
const IPPROTO_TCP: u8 = 6;
const TTL: u8 = 64;

/// Whether packets to this port are under the challenge now.
#[inline(always)]
pub fn engaged(packet: &Packet) -> bool {
    CHALLENGE_PORTS
        .get(u32::from(packet.dst_port))
        .is_some_and(|on| *on != 0)
}

/// Whether this SYN, to a challenged port, should be challenged rather than go on to the
/// kernel: all but one a second (see `CHALLENGE_KERNEL_SYN_INTERVAL_NS`) when proven ACKs
/// are handed to the kernel, every one when they are reset (the kernel then never sees a
/// cookie, so it need not issue any).
#[inline(always)]
pub fn should_challenge(config: &Config, packet: &Packet, now: u64) -> bool {
    let Some(last) = CHALLENGE_PORTS.get_ptr_mut(u32::from(packet.dst_port)) else {
        return false;
    };
    // SAFETY: a live array value; a plain store, at most once a second per port, and two
    // CPUs racing here let at most one extra SYN through.
    unsafe {
        if *last == 0 {
            return false;
        }
        if config.has(Config::FLAG_CHALLENGE_RESET) {
            return true;
        }
        if now.wrapping_sub(*last) >= CHALLENGE_KERNEL_SYN_INTERVAL_NS {
            *last = now;
            return false;
        }
    }
    true
}

/// A bounds-checked pointer to `N` bytes at `offset` of the frame.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<*mut [u8; N]> {
    let start = ctx.data();
    if start + offset + N > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut [u8; N])
}

/// The offsets of the IP and TCP headers of a frame the program may answer: no IP options
/// or IPv6 extension headers, at most two VLAN tags.
#[inline(always)]
fn plain_offsets(packet: &Packet) -> Option<(usize, usize)> {
    if !packet.plain_ip {
        return None;
    }
    let l3 = usize::from(packet.l3_offset);
    let l4 = usize::from(packet.l4_offset);
    let ip_len = if packet.family == FAMILY_IPV4 {
        IPV4_LEN
    } else {
        IPV6_LEN
    };
    // The verifier keeps offsets small only through these checks.
    (l3 <= ETH_LEN + 8 && l4 == l3 + ip_len).then_some((l3, l4))
}

/// Trims the frame to `new_len` bytes; never grows it (an answer is never larger than what
/// it answers).
#[inline(always)]
fn trim_to(ctx: &XdpContext, new_len: usize) -> Option<()> {
    let old_len = ctx.data_end() - ctx.data();
    if new_len > old_len {
        return None;
    }
    if new_len < old_len {
        // SAFETY: the program's own context; a negative delta only trims the frame.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, new_len as i32 - old_len as i32) } != 0 {
            return None;
        }
    }
    Some(())
}

/// Answers a SYN with a cookie SYN-ACK in place. `None` when this SYN cannot be answered
/// (IP options or IPv6 extension headers, a helper that refuses it): the caller judges it as
/// any unproven SYN.
#[inline(always)]
pub fn answer(ctx: &XdpContext, config: &Config, packet: &Packet, now: u64) -> Option<Stat> {
    let (l3, l4) = plain_offsets(packet)?;
    let raw = cookie(ctx, packet, l3, l4)?;
    if !reply_allowed(config, packet, now) {
        return Some(Stat::RateChallenge);
    }
    let reply = Reply::SynAck {
        cookie: raw as u32,
        mss: (raw >> 32) as u16,
    };
    // Never more bytes back than came in: the MSS option only when the SYN had options.
    let tcp_len = if usize::from(packet.tcp.header_len) >= TCP_WITH_MSS_LEN {
        TCP_WITH_MSS_LEN
    } else {
        TCP_LEN
    };
    trim_to(ctx, l4 + tcp_len)?;
    // Every pointer is derived afresh: the tail adjustment invalidated the old ones.
    let written = if tcp_len == TCP_WITH_MSS_LEN {
        rewrite::<TCP_WITH_MSS_LEN>(ctx, packet.family, l3, l4, reply)
    } else {
        rewrite::<TCP_LEN>(ctx, packet.family, l3, l4, reply)
    };
    // A frame already trimmed but not rewritten must not go anywhere.
    Some(if written.is_some() {
        Stat::Challenged
    } else {
        Stat::Malformed
    })
}

/// Answers an ACK that proved its source with a RST in place (`proven_ack = "reset"`): the
/// client's connection ends, and its retry is a SYN from a proven source, which the kernel
/// handles with every TCP option. `None` when the frame cannot be answered: the caller hands
/// the ACK to the kernel instead.
#[inline(always)]
pub fn reset(ctx: &XdpContext, packet: &Packet) -> Option<Stat> {
    let (l3, l4) = plain_offsets(packet)?;
    trim_to(ctx, l4 + TCP_LEN)?;
    Some(
        if rewrite::<TCP_LEN>(ctx, packet.family, l3, l4, Reply::Reset).is_some() {
            Stat::ChallengeReset
        } else {
            Stat::Malformed
        },
    )
}

/// The cookie for this SYN (low 32 bits) and the MSS it encodes (high 32 bits), from the
/// kernel's helper. The helper takes the TCP header's length as a constant size, so each
/// possible length has its own call.
#[inline(always)]
fn cookie(ctx: &XdpContext, packet: &Packet, l3: usize, l4: usize) -> Option<u64> {
    macro_rules! by_length {
        ($($len:literal)*) => {
            match usize::from(packet.tcp.header_len) {
                $($len => generate::<$len>(ctx, packet.family, l3, l4),)*
                _ => None,
            }
        };
    }
    by_length!(20 24 28 32 36 40 44 48 52 56 60)
}

#[inline(always)]
fn generate<const N: usize>(ctx: &XdpContext, family: u8, l3: usize, l4: usize) -> Option<u64> {
    let th = bytes::<N>(ctx, l4)?;
    let raw = if family == FAMILY_IPV4 {
        let ip = bytes::<IPV4_LEN>(ctx, l3)?;
        // SAFETY: both pointers are packet pointers checked to cover the sizes the helper
        // reads (the IPv4 header, and `N` bytes of TCP header).
        unsafe { bpf_tcp_raw_gen_syncookie_ipv4(ip.cast::<iphdr>(), th.cast::<tcphdr>(), N as u32) }
    } else {
        let ip = bytes::<IPV6_LEN>(ctx, l3)?;
        // SAFETY: as above, with the IPv6 header.
        unsafe {
            bpf_tcp_raw_gen_syncookie_ipv6(ip.cast::<ipv6hdr>(), th.cast::<tcphdr>(), N as u32)
        }
    };
    (raw >= 0).then_some(raw as u64)
}

/// The SYN-ACK budget of the prefix the reply would go to.
#[inline(always)]
fn reply_allowed(config: &Config, packet: &Packet, now: u64) -> bool {
    let gcra = &config.challenge_replies;
    if !gcra.is_limited() {
        return true;
    }
    let mask = if packet.family == FAMILY_IPV4 {
        &config.aggregate_mask_v4
    } else {
        &config.aggregate_mask_v6
    };
    let key = ProvenKey {
        addr: apply_mask(&packet.src, mask),
        family: packet.family,
        _pad: [0; 3],
    };
    match CHALLENGE_BUDGET.get_ptr_mut(key) {
        // SAFETY: a live value of CHALLENGE_BUDGET.
        Some(bucket) => unsafe {
            let updated = core::ptr::read_volatile(&(*bucket).updated_ns);
            if rate::charge(&raw mut (*bucket).tat, updated, gcra, now, 1) {
                (*bucket).updated_ns = now;
                true
            } else {
                false
            }
        },
        None => {
            let Some(tat) = gcra.admit(gcra.full_at(now), now, now, 1) else {
                return false;
            };
            let _ = CHALLENGE_BUDGET.insert(
                key,
                Bucket {
                    tat,
                    updated_ns: now,
                },
                0,
            );
            true
        }
    }
}

/// What the program writes over a frame it answers.
#[derive(Clone, Copy)]
enum Reply {
    /// The SYN-ACK to a SYN: the cookie as its sequence number, and the MSS it encodes.
    SynAck { cookie: u32, mss: u16 },
    /// The RST to an ACK: its sequence number is the ACK's acknowledgement number, the one
    /// value the client accepts without a challenge ACK (RFC 5961).
    Reset,
}

/// Turns the (trimmed) frame into its answer: Ethernet addresses, IP addresses and TCP ports
/// swapped, VLAN tags left as they were, sequence numbers and flags of the [`Reply`], the MSS
/// option when there is room for it in a SYN-ACK, both checksums computed.
#[inline(always)]
fn rewrite<const TCP: usize>(
    ctx: &XdpContext,
    family: u8,
    l3: usize,
    l4: usize,
    reply: Reply,
) -> Option<()> {
    let eth = bytes::<12>(ctx, 0)?;
    let th = bytes::<TCP>(ctx, l4)?;
    // SAFETY: `eth` and `th` are checked packet pointers to exactly these sizes; the frame is
    // ours to change.
    unsafe {
        let mut addresses = *eth;
        addresses.rotate_left(6);
        *eth = addresses;

        let t = &mut *th;
        let (sport, dport) = ([t[0], t[1]], [t[2], t[3]]);
        let their_seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
        let their_ack = [t[8], t[9], t[10], t[11]];
        t[0..2].copy_from_slice(&dport);
        t[2..4].copy_from_slice(&sport);
        t[12] = ((TCP / 4) as u8) << 4;
        t[16..20].copy_from_slice(&[0; 4]);
        match reply {
            Reply::SynAck { cookie, mss } => {
                t[4..8].copy_from_slice(&cookie.to_be_bytes());
                t[8..12].copy_from_slice(&their_seq.wrapping_add(1).to_be_bytes());
                t[13] = TCP_SYN | TCP_ACK;
                t[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
                if TCP == TCP_WITH_MSS_LEN {
                    let m = mss.to_be_bytes();
                    t[20..24].copy_from_slice(&[2, 4, m[0], m[1]]);
                }
            }
            Reply::Reset => {
                t[4..8].copy_from_slice(&their_ack);
                t[8..12].copy_from_slice(&[0; 4]);
                t[13] = TCP_RST;
                t[14..16].copy_from_slice(&[0; 2]);
            }
        }
    }
    let pseudo = if family == FAMILY_IPV4 {
        let ip = bytes::<IPV4_LEN>(ctx, l3)?;
        // SAFETY: a checked packet pointer to the IPv4 header.
        unsafe {
            let h = &mut *ip;
            let (src, dst) = ([h[12], h[13], h[14], h[15]], [h[16], h[17], h[18], h[19]]);
            h[12..16].copy_from_slice(&dst);
            h[16..20].copy_from_slice(&src);
            h[2..4].copy_from_slice(&((IPV4_LEN + TCP) as u16).to_be_bytes());
            h[4..8].copy_from_slice(&[0, 0, 0x40, 0]);
            h[8] = TTL;
            h[10..12].copy_from_slice(&[0, 0]);
            let check = fold(sum_words(&*h, 0));
            h[10..12].copy_from_slice(&check.to_be_bytes());
            sum_words(&h[12..20], u64::from(IPPROTO_TCP) + TCP as u64)
        }
    } else {
        let ip = bytes::<IPV6_LEN>(ctx, l3)?;
        // SAFETY: a checked packet pointer to the IPv6 header.
        unsafe {
            let h = &mut *ip;
            let mut src = [0u8; 16];
            src.copy_from_slice(&h[8..24]);
            h.copy_within(24..40, 8);
            h[24..40].copy_from_slice(&src);
            h[4..6].copy_from_slice(&(TCP as u16).to_be_bytes());
            h[7] = TTL;
            sum_words(&h[8..40], u64::from(IPPROTO_TCP) + TCP as u64)
        }
    };
    // SAFETY: the checked TCP header pointer from above; still valid (no resize since).
    unsafe {
        let t = &mut *th;
        let check = fold(sum_words(&*t, pseudo));
        t[16..18].copy_from_slice(&check.to_be_bytes());
    }
    Some(())
}

/// Adds the big-endian 16-bit words of `bytes` (an even length) to `seed`.
#[inline(always)]
fn sum_words(bytes: &[u8], seed: u64) -> u64 {
    let mut sum = seed;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u64::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// The one's-complement checksum of a word sum.
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    for _ in 0..4 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether an ACK to a challenged port returns a valid cookie; if so its source is proven.
#[inline(always)]
pub fn proves(ctx: &XdpContext, config: &Config, packet: &Packet, now: u64) -> bool {
    if !packet.plain_ip || packet.tcp.flags & (TCP_SYN | TCP_ACK) != TCP_ACK {
        return false;
    }
    let l3 = usize::from(packet.l3_offset);
    let l4 = usize::from(packet.l4_offset);
    let Some(th) = bytes::<TCP_LEN>(ctx, l4) else {
        return false;
    };
    let valid = if packet.family == FAMILY_IPV4 {
        let Some(ip) = bytes::<IPV4_LEN>(ctx, l3) else {
            return false;
        };
        // SAFETY: checked packet pointers to the fixed headers the helper reads.
        unsafe { bpf_tcp_raw_check_syncookie_ipv4(ip.cast::<iphdr>(), th.cast::<tcphdr>()) == 0 }
    } else {
        let Some(ip) = bytes::<IPV6_LEN>(ctx, l3) else {
            return false;
        };
        // SAFETY: as above.
        unsafe { bpf_tcp_raw_check_syncookie_ipv6(ip.cast::<ipv6hdr>(), th.cast::<tcphdr>()) == 0 }
    };
    if valid {
        let _ = PROVEN.insert(ProvenKey::new(config, packet.family, &packet.src), now, 0);
    }
    valid
}
