//! Frame builders. Checksums are left zero: the XDP program never reads them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// EtherTypes used by the tests.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// IPv6.
    pub const IPV6: u16 = 0x86dd;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// LLDP.
    pub const LLDP: u16 = 0x88cc;
    /// 802.1Q VLAN tag.
    pub const VLAN: u16 = 0x8100;
    /// 802.1ad service tag (QinQ outer tag).
    pub const QINQ: u16 = 0x88a8;
}

/// IP protocol numbers used by the tests.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// GRE: a protocol the program does not parse.
    pub const GRE: u8 = 47;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// IPv6 hop-by-hop options.
    pub const HOPOPTS: u8 = 0;
    /// IPv6 routing header.
    pub const ROUTING: u8 = 43;
    /// IPv6 fragment header.
    pub const FRAGMENT: u8 = 44;
    /// IPv6 authentication header.
    pub const AH: u8 = 51;
    /// IPv6 destination options.
    pub const DSTOPTS: u8 = 60;
    /// IPv6 no next header.
    pub const NONE: u8 = 59;
}

/// The transport part of a packet.
#[derive(Clone, Debug)]
pub enum L4 {
    /// TCP to a port, with flags (0x02 = SYN).
    Tcp { dst_port: u16, flags: u8 },
    /// UDP to a port.
    Udp { dst_port: u16 },
    /// ICMP or ICMPv6 echo request.
    Icmp,
    /// Raw bytes under a given protocol number.
    Raw { proto: u8, bytes: Vec<u8> },
}

impl L4 {
    fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => proto::TCP,
            L4::Udp { .. } => proto::UDP,
            L4::Icmp if v6 => proto::ICMPV6,
            L4::Icmp => proto::ICMP,
            L4::Raw { proto, .. } => *proto,
        }
    }

    fn bytes(&self, payload: usize, src_port: u16, seq: u32, ack: u32, options: &[u8]) -> Vec<u8> {
        let mut b = match self {
            L4::Tcp { dst_port, flags } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&src_port.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h[4..8].copy_from_slice(&seq.to_be_bytes());
                h[8..12].copy_from_slice(&ack.to_be_bytes());
                h[12] = ((20 + options.len()) as u8 / 4) << 4;
                h[13] = *flags;
                h[14..16].copy_from_slice(&65535u16.to_be_bytes());
                h.extend_from_slice(options);
                h
            }
            L4::Udp { dst_port } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&src_port.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
                h
            }
            L4::Icmp => vec![8, 0, 0, 0, 0, 1, 0, 1],
            L4::Raw { bytes, .. } => bytes.clone(),
        };
        b.extend(std::iter::repeat_n(0xab, payload));
        b
    }
}

/// An IPv6 extension header to put before the transport header.
#[derive(Clone, Debug)]
pub enum Ext {
    /// Hop-by-hop options, 8 bytes.
    HopByHop,
    /// Routing header, 24 bytes.
    Routing,
    /// Destination options, 16 bytes.
    DstOpts,
    /// Authentication header, 16 bytes (its length counts 4-byte units).
    Ah,
    /// Fragment header with a fragment offset (in 8-byte units) and the more-fragments bit.
    Fragment { offset: u16, more: bool },
}

/// A frame under construction.
#[derive(Clone, Debug)]
pub struct Frame {
    vlans: Vec<(u16, u16)>,
    src: IpAddr,
    dst: IpAddr,
    l4: L4,
    payload: usize,
    ipv4_options: usize,
    ipv4_fragment_offset: u16,
    ipv4_more_fragments: bool,
    ipv6_exts: Vec<Ext>,
    src_port: u16,
    ack: u32,
    seq: u32,
    tcp_options: Vec<u8>,
}

/// TCP flags.
pub mod tcp {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// The destination every frame is sent to, by family.
pub const DST_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// See [`DST_V4`].
pub const DST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The source port of every frame unless [`Frame::src_port`] says otherwise.
pub const SRC_PORT: u16 = 40000;

impl Frame {
    /// A TCP segment from `src`: `flags`, to `dst_port`, without payload (set one with
    /// [`Frame::payload`]).
    pub fn tcp(src: &str, dst_port: u16, flags: u8) -> Self {
        Self::new(src, L4::Tcp { dst_port, flags }).payload(0)
    }

    /// Sets the source port (TCP and UDP).
    pub fn src_port(mut self, port: u16) -> Self {
        self.src_port = port;
        self
    }

    /// Sets the TCP acknowledgement number.
    pub fn ack(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }

    /// Sets the TCP sequence number.
    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    /// TCP options (padded to a multiple of 4 bytes with end-of-list), as a real client's SYN
    /// carries them.
    pub fn tcp_options(mut self, options: &[u8]) -> Self {
        self.tcp_options = options.to_vec();
        while !self.tcp_options.len().is_multiple_of(4) {
            self.tcp_options.push(0);
        }
        self
    }

    /// The options of a Linux client's SYN: MSS 1460, SACK permitted, timestamps, window
    /// scale 7 (20 bytes).
    pub fn linux_syn_options(self) -> Self {
        self.tcp_options(&[
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ])
    }

    /// Replaces the destination address (of the same family).
    pub fn dst(mut self, dst: &str) -> Self {
        self.dst = dst.parse().expect("address");
        self
    }

    /// A packet from `src` (v4 or v6) to a fixed destination of the same family.
    pub fn new(src: &str, l4: L4) -> Self {
        let src: IpAddr = src.parse().expect("address");
        let dst = match src {
            IpAddr::V4(_) => IpAddr::V4(DST_V4),
            IpAddr::V6(_) => IpAddr::V6(DST_V6),
        };
        Self {
            vlans: Vec::new(),
            src,
            dst,
            l4,
            payload: 18,
            ipv4_options: 0,
            ipv4_fragment_offset: 0,
            ipv4_more_fragments: false,
            ipv6_exts: Vec::new(),
            src_port: SRC_PORT,
            ack: 0,
            seq: 0,
            tcp_options: Vec::new(),
        }
    }

    /// UDP to `port` from `src`.
    pub fn udp(src: &str, port: u16) -> Self {
        Self::new(src, L4::Udp { dst_port: port })
    }

    /// Adds a VLAN tag (outermost first) with the given TPID.
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Self {
        self.vlans.push((tpid, vid));
        self
    }

    /// Sets the payload length after the transport header.
    pub fn payload(mut self, len: usize) -> Self {
        self.payload = len;
        self
    }

    /// Adds IPv4 options (a multiple of 4 bytes, at most 40).
    pub fn ipv4_options(mut self, len: usize) -> Self {
        self.ipv4_options = len;
        self
    }

    /// Makes an IPv4 fragment.
    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        self.ipv4_fragment_offset = offset;
        self.ipv4_more_fragments = more;
        self
    }

    /// Adds an IPv6 extension header (in order).
    pub fn ext(mut self, ext: Ext) -> Self {
        self.ipv6_exts.push(ext);
        self
    }

    /// The bytes of the frame.
    pub fn build(&self) -> Vec<u8> {
        let v6 = self.src.is_ipv6();
        let mut eth = Vec::with_capacity(128);
        eth.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        eth.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        // Each tag is its TPID and TCI; the EtherType after the last TCI is the IP version's.
        for (tpid, vid) in &self.vlans {
            eth.extend_from_slice(&tpid.to_be_bytes());
            eth.extend_from_slice(&vid.to_be_bytes());
        }
        let inner = if v6 { ethertype::IPV6 } else { ethertype::IPV4 };
        eth.extend_from_slice(&inner.to_be_bytes());
        let l4 = self.l4.bytes(
            self.payload,
            self.src_port,
            self.seq,
            self.ack,
            &self.tcp_options,
        );
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let ihl = 5 + self.ipv4_options / 4;
                let total = ihl * 4 + l4.len();
                let mut ip = vec![0u8; ihl * 4];
                ip[0] = 0x40 | ihl as u8;
                ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                let frag = self.ipv4_fragment_offset & 0x1fff
                    | if self.ipv4_more_fragments { 0x2000 } else { 0 };
                ip[6..8].copy_from_slice(&frag.to_be_bytes());
                ip[8] = 64;
                ip[9] = self.l4.proto(false);
                ip[12..16].copy_from_slice(&src.octets());
                ip[16..20].copy_from_slice(&dst.octets());
                // Options: NOPs, then end of list.
                for b in ip.iter_mut().skip(20) {
                    *b = 1;
                }
                if self.ipv4_options > 0 {
                    let last = ip.len() - 1;
                    ip[last] = 0;
                }
                eth.extend_from_slice(&ip);
                eth.extend_from_slice(&l4);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut exts = Vec::new();
                let protos: Vec<u8> = self
                    .ipv6_exts
                    .iter()
                    .map(|e| match e {
                        Ext::HopByHop => proto::HOPOPTS,
                        Ext::Routing => proto::ROUTING,
                        Ext::DstOpts => proto::DSTOPTS,
                        Ext::Ah => proto::AH,
                        Ext::Fragment { .. } => proto::FRAGMENT,
                    })
                    .collect();
                for (i, e) in self.ipv6_exts.iter().enumerate() {
                    let next = protos.get(i + 1).copied().unwrap_or(self.l4.proto(true));
                    let mut h = match e {
                        Ext::HopByHop => vec![0u8; 8],
                        Ext::Routing => vec![0u8; 24],
                        Ext::DstOpts => vec![0u8; 16],
                        Ext::Ah => vec![0u8; 16],
                        Ext::Fragment { offset, more } => {
                            let mut h = vec![0u8; 8];
                            let v = (offset << 3) | u16::from(*more);
                            h[2..4].copy_from_slice(&v.to_be_bytes());
                            h
                        }
                    };
                    h[0] = next;
                    h[1] = match e {
                        Ext::HopByHop | Ext::Fragment { .. } => 0,
                        Ext::Routing => 2,
                        Ext::DstOpts => 1,
                        Ext::Ah => 2,
                    };
                    exts.extend_from_slice(&h);
                }
                let first = protos.first().copied().unwrap_or(self.l4.proto(true));
                let mut ip = vec![0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&((exts.len() + l4.len()) as u16).to_be_bytes());
                ip[6] = first;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&src.octets());
                ip[24..40].copy_from_slice(&dst.octets());
                eth.extend_from_slice(&ip);
                eth.extend_from_slice(&exts);
                eth.extend_from_slice(&l4);
            }
            _ => unreachable!("source and destination share a family"),
        }
        eth
    }
}

/// A non-IP frame with the given EtherType and a minimum-size body.
pub fn non_ip(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend(std::iter::repeat_n(0u8, 46));
    f
}

/// Offset of the first byte after the Ethernet header and its VLAN tags.
pub fn l3_offset(frame: &[u8]) -> usize {
    let mut offset = 12;
    while matches!(
        u16::from_be_bytes([frame[offset], frame[offset + 1]]),
        ethertype::VLAN | ethertype::QINQ
    ) {
        offset += 4;
    }
    offset + 2
}
