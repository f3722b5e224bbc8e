//! Reference programs for the benchmarks, built into their own object: what the limiter's
//! cost is compared against, and the traffic generator for live runs.
#![no_std]
#![no_main]

#[allow(
    dead_code,
    reason = "the baselines use the parser, not every item of it"
)]
mod parse;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// The floor: drop everything, look at nothing.
#[xdp]
pub fn bare_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Pass everything, look at nothing.
#[xdp]
pub fn bare_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The limiter's parser and nothing else, then drop.
#[xdp]
pub fn parse_only(ctx: XdpContext) -> u32 {
    match parse::parse(&ctx) {
        Ok(parse::Frame::Ip(packet)) => {
            // Keep the parse from being optimised away.
            if packet.src[0] == 0 && packet.dst_port == 1 {
                return xdp_action::XDP_PASS;
            }
            xdp_action::XDP_DROP
        }
        Ok(parse::Frame::NotIp) | Err(_) => xdp_action::XDP_DROP,
    }
}

/// Per-CPU counter that makes every generated frame's IPv4 source differ (spoofed floods).
#[aya_ebpf::macros::map]
static SEQUENCE: aya_ebpf::maps::PerCpuArray<u32> =
    aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);

/// Traffic generator for `BPF_PROG_TEST_RUN` in live-frames mode: transmits the frame it is
/// given out of the interface, as xdp-trafficgen does.
#[xdp]
pub fn trafficgen(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// The same, with the low 16 bits of the IPv4 source (bytes 28-29 of an untagged frame)
/// rewritten per frame, the header checksum (bytes 24-25) updated to match (RFC 1624):
/// a flood from a spoofed /16 that the kernel's IP layer still accepts.
#[xdp]
pub fn trafficgen_spoof(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 30 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    if let Some(seq) = SEQUENCE.get_ptr_mut(0) {
        // SAFETY: a per-CPU array value, used by this CPU only; the frame was bounds-checked
        // for bytes 24 to 29, the only ones touched.
        unsafe {
            *seq = (*seq).wrapping_add(1);
            let new = *seq as u16;
            let old =
                u16::from_be_bytes([*((start + 28) as *const u8), *((start + 29) as *const u8)]);
            let check =
                u16::from_be_bytes([*((start + 24) as *const u8), *((start + 25) as *const u8)]);
            let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
            sum = (sum & 0xffff) + (sum >> 16);
            sum = (sum & 0xffff) + (sum >> 16);
            let check = (!(sum as u16)).to_be_bytes();
            let bytes = new.to_be_bytes();
            *((start + 28) as *mut u8) = bytes[0];
            *((start + 29) as *mut u8) = bytes[1];
            *((start + 24) as *mut u8) = check[0];
            *((start + 25) as *mut u8) = check[1];
        }
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
