//! Hand-built packets for the floods that forge their source address: an IPv4 TCP SYN and an
//! IPv6 UDP datagram, each with correct checksums. The checksums matter: the edge's kernel
//! sees every packet the limiter passes and would silently discard a bad one, hiding what an
//! unprotected host really suffers.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Length of [`write_ipv4_syn`]'s packet: IPv4 header, TCP header with an MSS option.
pub const IPV4_SYN_LEN: usize = IPV4_HEADER_LEN + TCP_SYN_LEN;
const IPV4_HEADER_LEN: usize = 20;
/// TCP header of 20 bytes plus the 4-byte MSS option every real SYN carries.
const TCP_SYN_LEN: usize = 24;
const IPV6_HEADER_LEN: usize = 40;
const UDP_HEADER_LEN: usize = 8;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_FLAG_SYN: u8 = 0x02;
const TTL: u8 = 64;

/// The internet checksum (RFC 1071) of the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    // A part of odd length leaves its last byte waiting for the first byte of the next part.
    let mut pending: Option<u8> = None;
    for part in parts {
        for &byte in *part {
            match pending.take() {
                Some(high) => sum += u32::from(u16::from_be_bytes([high, byte])),
                None => pending = Some(byte),
            }
        }
    }
    if let Some(high) = pending {
        sum += u32::from(u16::from_be_bytes([high, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The fields of a TCP SYN that vary from packet to packet.
#[derive(Clone, Copy, Debug)]
pub struct Syn {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub sequence: u32,
    pub ip_id: u16,
}

/// Writes an IPv4 packet carrying a TCP SYN (with an MSS option of 1460) into `buf`.
pub fn write_ipv4_syn(buf: &mut [u8; IPV4_SYN_LEN], syn: &Syn) {
    let (ip, tcp) = buf.split_at_mut(IPV4_HEADER_LEN);

    ip[0] = 0x45; // version 4, header of 5 words
    ip[1] = 0;
    ip[2..4].copy_from_slice(&(IPV4_SYN_LEN as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&syn.ip_id.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    ip[8] = TTL;
    ip[9] = PROTO_TCP;
    ip[10..12].fill(0);
    ip[12..16].copy_from_slice(&syn.src.octets());
    ip[16..20].copy_from_slice(&syn.dst.octets());
    let ip_sum = checksum(&[ip]);
    ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());

    tcp[0..2].copy_from_slice(&syn.src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&syn.dst_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&syn.sequence.to_be_bytes());
    tcp[8..12].fill(0); // no acknowledgement yet
    tcp[12] = ((TCP_SYN_LEN / 4) as u8) << 4;
    tcp[13] = TCP_FLAG_SYN;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes()); // window
    tcp[16..18].fill(0); // checksum, below
    tcp[18..20].fill(0); // urgent pointer
    tcp[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
    let pseudo = ipv4_pseudo_header(syn.src, syn.dst, PROTO_TCP, TCP_SYN_LEN as u16);
    let tcp_sum = checksum(&[&pseudo, tcp]);
    tcp[16..18].copy_from_slice(&tcp_sum.to_be_bytes());
}

fn ipv4_pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: u16) -> [u8; 12] {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = proto;
    pseudo[10..12].copy_from_slice(&len.to_be_bytes());
    pseudo
}

/// The fields of an IPv6 UDP datagram.
#[derive(Clone, Copy, Debug)]
pub struct Udp6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Length of [`write_ipv6_udp`]'s packet for a payload of `payload_len` bytes.
pub const fn ipv6_udp_len(payload_len: usize) -> usize {
    IPV6_HEADER_LEN + UDP_HEADER_LEN + payload_len
}

/// Writes an IPv6 packet carrying a UDP datagram with `payload` into `buf`, which must be
/// exactly [`ipv6_udp_len`] bytes long.
pub fn write_ipv6_udp(buf: &mut [u8], datagram: &Udp6, payload: &[u8]) {
    assert_eq!(
        buf.len(),
        ipv6_udp_len(payload.len()),
        "buffer sized for the payload"
    );
    let udp_len = (UDP_HEADER_LEN + payload.len()) as u16;
    let (ip, rest) = buf.split_at_mut(IPV6_HEADER_LEN);

    ip[0..4].copy_from_slice(&(6u32 << 28).to_be_bytes()); // version 6, no class, no flow
    ip[4..6].copy_from_slice(&udp_len.to_be_bytes());
    ip[6] = PROTO_UDP;
    ip[7] = TTL;
    ip[8..24].copy_from_slice(&datagram.src.octets());
    ip[24..40].copy_from_slice(&datagram.dst.octets());

    let (udp, data) = rest.split_at_mut(UDP_HEADER_LEN);
    data.copy_from_slice(payload);
    udp[0..2].copy_from_slice(&datagram.src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&datagram.dst_port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].fill(0);
    let mut pseudo = [0u8; 40];
    pseudo[0..16].copy_from_slice(&datagram.src.octets());
    pseudo[16..32].copy_from_slice(&datagram.dst.octets());
    pseudo[32..36].copy_from_slice(&u32::from(udp_len).to_be_bytes());
    pseudo[39] = PROTO_UDP;
    let sum = match checksum(&[&pseudo, udp, data]) {
        // Over UDP a computed zero is sent as all ones: zero means "no checksum", which IPv6
        // forbids.
        0 => 0xffff,
        sum => sum,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_the_rfc_1071_example() {
        // RFC 1071, section 3: the one's complement sum of these bytes is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
        // Splitting the data at an odd offset must not change the result.
        assert_eq!(checksum(&[&data[..3], &data[3..]]), !0xddf2);
    }

    #[test]
    fn ipv4_syn_has_valid_checksums_and_fields() {
        let syn = Syn {
            src: Ipv4Addr::new(10, 78, 3, 4),
            dst: Ipv4Addr::new(10, 77, 0, 1),
            src_port: 40_000,
            dst_port: 8080,
            sequence: 0xdead_beef,
            ip_id: 7,
        };
        let mut buf = [0u8; IPV4_SYN_LEN];
        write_ipv4_syn(&mut buf, &syn);
        // A header whose checksum is right sums to zero, checksum included.
        assert_eq!(checksum(&[&buf[..20]]), 0);
        let pseudo = ipv4_pseudo_header(syn.src, syn.dst, PROTO_TCP, TCP_SYN_LEN as u16);
        assert_eq!(checksum(&[&pseudo, &buf[20..]]), 0);
        assert_eq!(&buf[12..16], &[10, 78, 3, 4]);
        assert_eq!(u16::from_be_bytes([buf[22], buf[23]]), 8080);
        assert_eq!(buf[33], TCP_FLAG_SYN);
        assert_eq!(buf[32] >> 4, 6, "data offset covers the MSS option");
    }

    #[test]
    fn ipv6_udp_has_a_valid_checksum() {
        let datagram = Udp6 {
            src: "fd77:0:0:2:1234:5678:9abc:def0".parse().unwrap(),
            dst: "fd77::1".parse().unwrap(),
            src_port: 5555,
            dst_port: 8080,
        };
        let payload = b"not a market order";
        let mut buf = vec![0u8; ipv6_udp_len(payload.len())];
        write_ipv6_udp(&mut buf, &datagram, payload);
        let udp_len = (UDP_HEADER_LEN + payload.len()) as u32;
        let mut pseudo = [0u8; 40];
        pseudo[0..16].copy_from_slice(&buf[8..24]);
        pseudo[16..32].copy_from_slice(&buf[24..40]);
        pseudo[32..36].copy_from_slice(&udp_len.to_be_bytes());
        pseudo[39] = PROTO_UDP;
        assert_eq!(checksum(&[&pseudo, &buf[40..]]), 0);
        assert_eq!(buf[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([buf[4], buf[5]]) as u32, udp_len);
        assert_eq!(&buf[48..], payload);
    }
}
