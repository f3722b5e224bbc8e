//! Header parsing. Every read of the frame goes through [`header`], the one bounds check.

use aya_ebpf::programs::XdpContext;
use limiter_common::prefix::{AddrWords, FAMILY_IPV4, FAMILY_IPV6};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// VLAN tags we look through: one 802.1Q, or 802.1ad + 802.1Q (QinQ).
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up. Real traffic carries two or three.
pub const MAX_IPV6_EXTENSIONS: usize = 6;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_NONE: u8 = 59;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// Why a frame is malformed. Every variant is dropped and counted as malformed.
#[derive(Clone, Copy)]
pub enum ParseError {
    /// A header runs past the end of the frame.
    Truncated,
    /// More VLAN tags than we look through.
    TooManyVlanTags,
    /// IPv4: wrong version, IHL outside 5..=15, or a total length that does not fit.
    BadIpv4Header,
    /// IPv6: wrong version or a payload length past the frame.
    BadIpv6Header,
    /// An IPv6 extension chain longer than [`MAX_IPV6_EXTENSIONS`].
    ExtensionChainTooLong,
    /// TCP data offset below 5, or an L4 header shorter than its minimum.
    BadTransportHeader,
}

/// The fields of an IP packet that policy and limits look at.
pub struct Packet {
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Source address, network-order words.
    pub src: AddrWords,
    /// Destination address, network-order words.
    pub dst: AddrWords,
    /// The transport protocol (after IPv6 extension headers).
    pub proto: u8,
    /// Source port for TCP and UDP first fragments; 0 otherwise.
    pub src_port: u16,
    /// Destination port for TCP and UDP first fragments; 0 otherwise.
    pub dst_port: u16,
    /// What the TCP header says; all zero for other protocols and later fragments.
    pub tcp: TcpFacts,
    /// Where the IP header starts in the frame (after Ethernet and VLAN tags).
    pub l3_offset: u16,
    /// Where the transport header starts; 0 when there is none.
    pub l4_offset: u16,
    /// The IP header is the plain one: IPv4 without options, or IPv6 without extension
    /// headers. Only such a SYN is answered in place by the challenge.
    pub plain_ip: bool,
}

/// The TCP fields the session rules read.
#[derive(Clone, Copy, Default)]
pub struct TcpFacts {
    /// The flags byte (CWR ECE URG ACK PSH RST SYN FIN).
    pub flags: u8,
    /// Whether the segment carries payload bytes.
    pub has_payload: bool,
    /// The acknowledgement number.
    pub ack: u32,
    /// The header's length in bytes, options included (20 to 60).
    pub header_len: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The outcome of parsing a frame that is not malformed.
pub enum Frame {
    /// Not IPv4 or IPv6: ARP, LLDP and the like.
    NotIp,
    /// An IP packet.
    Ip(Packet),
}

/// The single bounds check: a pointer to a `T` at `offset`, or `Truncated`.
#[inline(always)]
fn header<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, ParseError> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(ParseError::Truncated);
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Frame, ParseError> {
    // SAFETY: `header` checked that an Ethernet header lies within the frame.
    let mut ether_type = u16::from_be(unsafe { (*header::<EthHdr>(ctx, 0)?).ether_type });
    let mut offset = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        // SAFETY: `header` checked that the VLAN tag lies within the frame.
        ether_type = u16::from_be(unsafe { (*header::<VlanHdr>(ctx, offset)?).ether_type });
        offset += VlanHdr::LEN;
    }
    match ether_type {
        ETH_P_IPV4 => parse_ipv4(ctx, offset).map(Frame::Ip),
        ETH_P_IPV6 => parse_ipv6(ctx, offset).map(Frame::Ip),
        ETH_P_8021Q | ETH_P_8021AD => Err(ParseError::TooManyVlanTags),
        _ => Ok(Frame::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Result<Packet, ParseError> {
    // SAFETY: `header` checked that the fixed IPv4 header lies within the frame.
    let ip = unsafe { &*header::<Ipv4Hdr>(ctx, offset)? };
    let ihl = usize::from(ip.vihl & 0x0f);
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return Err(ParseError::BadIpv4Header);
    }
    let header_len = ihl * 4;
    let total_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if total_len < header_len || offset + total_len > ctx.data_end() - ctx.data() {
        return Err(ParseError::BadIpv4Header);
    }
    let src = [u32::from_ne_bytes(ip.src_addr), 0, 0, 0];
    let dst = [u32::from_ne_bytes(ip.dst_addr), 0, 0, 0];
    let proto = ip.proto;
    let frags = u16::from_be_bytes(ip.frags);
    let mut packet = Packet {
        family: FAMILY_IPV4,
        src,
        dst,
        proto,
        src_port: 0,
        dst_port: 0,
        tcp: TcpFacts::default(),
        l3_offset: offset as u16,
        l4_offset: 0,
        plain_ip: ihl == 5,
    };
    // A non-first fragment has no transport header; it is charged to its source all the same.
    if frags & 0x1fff != 0 {
        return Ok(packet);
    }
    parse_transport(ctx, offset + header_len, offset + total_len, &mut packet)?;
    Ok(packet)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Result<Packet, ParseError> {
    // SAFETY: `header` checked that the IPv6 header lies within the frame.
    let ip = unsafe { &*header::<Ipv6Hdr>(ctx, offset)? };
    if ip.vcf[0] >> 4 != 6 {
        return Err(ParseError::BadIpv6Header);
    }
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    if offset + Ipv6Hdr::LEN + payload_len > ctx.data_end() - ctx.data() {
        return Err(ParseError::BadIpv6Header);
    }
    let mut packet = Packet {
        family: FAMILY_IPV6,
        src: limiter_common::prefix::words_from_bytes(ip.src_addr),
        dst: limiter_common::prefix::words_from_bytes(ip.dst_addr),
        proto: ip.next_hdr,
        src_port: 0,
        dst_port: 0,
        tcp: TcpFacts::default(),
        l3_offset: offset as u16,
        l4_offset: 0,
        plain_ip: false,
    };
    let end = offset + Ipv6Hdr::LEN + payload_len;
    let mut offset = offset + Ipv6Hdr::LEN;
    let mut next = ip.next_hdr;
    let mut first_fragment = true;
    let mut walked = 0;
    while walked <= MAX_IPV6_EXTENSIONS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => {
                if walked == MAX_IPV6_EXTENSIONS {
                    return Err(ParseError::ExtensionChainTooLong);
                }
                // SAFETY: `header` checked the two bytes every extension header starts with.
                let ext = unsafe { *header::<[u8; 2]>(ctx, offset)? };
                let len = match next {
                    IPPROTO_FRAGMENT => {
                        // SAFETY: `header` checked the whole 8-byte fragment header.
                        let frag = unsafe { *header::<[u8; 8]>(ctx, offset)? };
                        if u16::from_be_bytes([frag[2], frag[3]]) & 0xfff8 != 0 {
                            first_fragment = false;
                        }
                        8
                    }
                    IPPROTO_AH => (usize::from(ext[1]) + 2) * 4,
                    _ => (usize::from(ext[1]) + 1) * 8,
                };
                next = ext[0];
                offset += len;
                walked += 1;
            }
            _ => break,
        }
    }
    packet.proto = next;
    packet.plain_ip = walked == 0;
    if !first_fragment || next == IPPROTO_NONE {
        return Ok(packet);
    }
    parse_transport(ctx, offset, end, &mut packet)?;
    Ok(packet)
}

/// Reads the transport header at `offset` of an IP packet that ends at `end` (both from the
/// start of the frame; `end` was checked against the frame).
#[inline(always)]
fn parse_transport(
    ctx: &XdpContext,
    offset: usize,
    end: usize,
    packet: &mut Packet,
) -> Result<(), ParseError> {
    match packet.proto {
        IPPROTO_TCP => {
            let tcp = header::<TcpHdr>(ctx, offset).map_err(|_| ParseError::BadTransportHeader)?;
            // SAFETY: `header` checked that the fixed TCP header lies within the frame.
            let tcp = unsafe { &*tcp };
            let header_len = usize::from(tcp.doff()) * 4;
            if tcp.doff() < 5 || offset + header_len > end {
                return Err(ParseError::BadTransportHeader);
            }
            packet.src_port = u16::from_be_bytes(tcp.source);
            packet.dst_port = u16::from_be_bytes(tcp.dest);
            packet.tcp = TcpFacts {
                // SAFETY: byte 13 (the flags) lies inside the 20-byte header checked above.
                flags: unsafe { *(tcp as *const TcpHdr as *const u8).add(13) },
                has_payload: offset + header_len < end,
                ack: u32::from_be_bytes(tcp.ack_seq),
                header_len: header_len as u8,
            };
            packet.l4_offset = offset as u16;
        }
        IPPROTO_UDP => {
            let udp = header::<UdpHdr>(ctx, offset).map_err(|_| ParseError::BadTransportHeader)?;
            // SAFETY: `header` checked that the UDP header lies within the frame.
            let udp = unsafe { &*udp };
            packet.src_port = u16::from_be_bytes(udp.src);
            packet.dst_port = u16::from_be_bytes(udp.dst);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // Type, code and checksum: an ICMP message shorter than that is not one.
            header::<[u8; 4]>(ctx, offset).map_err(|_| ParseError::BadTransportHeader)?;
        }
        _ => {}
    }
    Ok(())
}
