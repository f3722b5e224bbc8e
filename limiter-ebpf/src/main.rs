//! The limiter's programs. XDP: parse, policy, classify, rate check, count. sock_ops: record
//! the sources and flows the kernel's TCP accepted, which the XDP program classifies against.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod atomic;
mod challenge;
mod clock;
mod lease;
mod maps;
mod parse;
mod policy;
mod rate;
mod sample;
mod session;
mod sockops;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use limiter_common::layout::{Config, Stat};

use crate::{
    maps::CONFIG,
    parse::{Frame, ParseError},
    policy::Decision,
};

#[xdp]
pub fn limiter(ctx: XdpContext) -> u32 {
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    let Some(config) = CONFIG.get(0) else {
        // Index 0 of a one-entry array always exists; if it somehow did not, pass: a limiter
        // that cannot read its policy must not take the exchange offline.
        return xdp_action::XDP_PASS;
    };
    let stat = match decide(&ctx, config, frame_len) {
        Ok(stat) => stat,
        Err(
            ParseError::Truncated
            | ParseError::TooManyVlanTags
            | ParseError::BadIpv4Header
            | ParseError::BadIpv6Header
            | ParseError::ExtensionChainTooLong
            | ParseError::BadTransportHeader,
        ) => Stat::Malformed,
    };
    let (stat, action) = match (stat.drops(), config.has(Config::FLAG_MONITOR)) {
        // The challenge never answers in monitor mode, so a SYN-ACK or RST is always meant
        // to go.
        (false, _) if stat.transmits() => (stat, xdp_action::XDP_TX),
        (false, _) => (stat, xdp_action::XDP_PASS),
        (true, false) => (stat, xdp_action::XDP_DROP),
        (true, true) => {
            stats::count_would_drop(stat, frame_len);
            (Stat::MonitorWouldDrop, xdp_action::XDP_PASS)
        }
    };
    stats::count(stat, frame_len);
    action
}

#[inline(always)]
fn decide(ctx: &XdpContext, config: &Config, frame_len: u64) -> Result<Stat, ParseError> {
    let packet = match parse::parse(ctx)? {
        Frame::NotIp => return Ok(Stat::NotIp),
        Frame::Ip(packet) => packet,
    };
    Ok(match policy::resolve(config, &packet) {
        Decision::Deny => Stat::Denylisted,
        Decision::Allow => {
            sample::allowlisted(config, &packet);
            Stat::Allowlisted
        }
        Decision::Limit(limit_id) => {
            let stat = session::check(ctx, config, &packet, limit_id, frame_len);
            stats::count_limit(limit_id, stat.drops(), frame_len);
            // Would-drops too: monitor mode must see the same attacks.
            if stat.drops() || stat == Stat::Challenged {
                sample::drop(config, &packet, limit_id, stat);
            }
            stat
        }
    })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
