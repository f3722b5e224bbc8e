//! Source aggregation: addresses reduced to a prefix before they key any state.
//!
//! Addresses travel as four 32-bit words holding the bytes in network order, exactly as they
//! sit in the packet, so the kernel masks them without byte swaps. IPv4 uses the first word
//! only; the other three are zero.

/// Address family tags used in keys and events.
pub const FAMILY_IPV4: u8 = 4;
/// Address family tag for IPv6.
pub const FAMILY_IPV6: u8 = 6;

/// An address as four words of network-order bytes.
pub type AddrWords = [u32; 4];

/// The mask, in the same network-order word layout, that keeps the first `prefix_len` bits
/// of an address. Lengths past 128 keep everything.
pub const fn mask_words(prefix_len: u8) -> AddrWords {
    let mut words = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        let start = (i as u32) * 32;
        let len = prefix_len as u32;
        let remaining = len.saturating_sub(start);
        let bits = if remaining > 32 { 32 } else { remaining };
        let host_order = if bits == 0 {
            0
        } else {
            u32::MAX << (32 - bits)
        };
        // Stored as the bytes appear on the wire: big-endian bytes read as a native word.
        words[i] = u32::from_ne_bytes(host_order.to_be_bytes());
        i += 1;
    }
    words
}

/// Applies a mask to an address.
#[inline(always)]
pub const fn apply_mask(addr: &AddrWords, mask: &AddrWords) -> AddrWords {
    [
        addr[0] & mask[0],
        addr[1] & mask[1],
        addr[2] & mask[2],
        addr[3] & mask[3],
    ]
}

/// Converts 16 network-order bytes into address words.
pub const fn words_from_bytes(bytes: [u8; 16]) -> AddrWords {
    let mut words = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        words[i] = u32::from_ne_bytes([
            bytes[i * 4],
            bytes[i * 4 + 1],
            bytes[i * 4 + 2],
            bytes[i * 4 + 3],
        ]);
        i += 1;
    }
    words
}

/// Converts address words back into 16 network-order bytes.
pub const fn bytes_from_words(words: &AddrWords) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        bytes[i * 4] = b[0];
        bytes[i * 4 + 1] = b[1];
        bytes[i * 4 + 2] = b[2];
        bytes[i * 4 + 3] = b[3];
        i += 1;
    }
    bytes
}

/// The family and address a socket's peer really has: a dual-stack (IPv6) listener sees an
/// IPv4 client as `::ffff:a.b.c.d`, while XDP sees the IPv4 packet. Returns the IPv4 form of
/// a mapped address and anything else unchanged.
#[inline(always)]
pub const fn normalize_mapped(family: u8, words: AddrWords) -> (u8, AddrWords) {
    // The third word of `::ffff:0:0/96`, as its network-order bytes read natively.
    let mapped_marker = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    if family == FAMILY_IPV6 && words[0] == 0 && words[1] == 0 && words[2] == mapped_marker {
        (FAMILY_IPV4, [words[3], 0, 0, 0])
    } else {
        (family, words)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::net::{Ipv4Addr, Ipv6Addr};
    use proptest::prelude::*;

    fn v4_words(a: Ipv4Addr) -> AddrWords {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&a.octets());
        words_from_bytes(b)
    }

    fn v4_from_words(w: &AddrWords) -> Ipv4Addr {
        let b = bytes_from_words(w);
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    #[test]
    fn ipv4_prefixes() {
        let a = v4_words(Ipv4Addr::new(203, 0, 113, 77));
        assert_eq!(
            v4_from_words(&apply_mask(&a, &mask_words(32))),
            Ipv4Addr::new(203, 0, 113, 77)
        );
        assert_eq!(
            v4_from_words(&apply_mask(&a, &mask_words(24))),
            Ipv4Addr::new(203, 0, 113, 0)
        );
        assert_eq!(
            v4_from_words(&apply_mask(&a, &mask_words(20))),
            Ipv4Addr::new(203, 0, 112, 0)
        );
        assert_eq!(
            v4_from_words(&apply_mask(&a, &mask_words(0))),
            Ipv4Addr::UNSPECIFIED
        );
    }

    #[test]
    fn ipv6_prefixes() {
        let a: Ipv6Addr = "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff".parse().unwrap();
        let w = words_from_bytes(a.octets());
        let at = |len| Ipv6Addr::from(bytes_from_words(&apply_mask(&w, &mask_words(len))));
        assert_eq!(at(128), a);
        assert_eq!(at(64), "2001:db8:aaaa:bbbb::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(at(48), "2001:db8:aaaa::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(at(56), "2001:db8:aaaa:bb00::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(at(0), Ipv6Addr::UNSPECIFIED);
    }

    #[test]
    fn mapped_addresses_become_ipv4() {
        let mapped: Ipv6Addr = "::ffff:198.51.100.7".parse().unwrap();
        let (family, words) = normalize_mapped(FAMILY_IPV6, words_from_bytes(mapped.octets()));
        assert_eq!(family, FAMILY_IPV4);
        assert_eq!(words, v4_words(Ipv4Addr::new(198, 51, 100, 7)));
        for plain in ["2001:db8::1", "::1", "::198.51.100.7", "64:ff9b::c633:6407"] {
            let a: Ipv6Addr = plain.parse().unwrap();
            let w = words_from_bytes(a.octets());
            assert_eq!(
                normalize_mapped(FAMILY_IPV6, w),
                (FAMILY_IPV6, w),
                "{plain}"
            );
        }
        let v4 = v4_words(Ipv4Addr::new(0, 0, 255, 255));
        assert_eq!(normalize_mapped(FAMILY_IPV4, v4), (FAMILY_IPV4, v4));
    }

    proptest! {
        #[test]
        fn mask_matches_std_prefix_arithmetic(bits: u128, len in 0u8..=128) {
            let addr = Ipv6Addr::from(bits);
            let expected = if len == 0 { 0 } else { bits & (u128::MAX << (128 - u32::from(len))) };
            let got = apply_mask(&words_from_bytes(addr.octets()), &mask_words(len));
            prop_assert_eq!(u128::from_be_bytes(bytes_from_words(&got)), expected);
        }

        #[test]
        fn two_addresses_in_one_prefix_share_a_key(bits: u32, host_a: u32, host_b: u32, len in 0u8..=32) {
            let host_mask = if len == 32 { 0 } else { u32::MAX >> len };
            let a = Ipv4Addr::from((bits & !host_mask) | (host_a & host_mask));
            let b = Ipv4Addr::from((bits & !host_mask) | (host_b & host_mask));
            let m = mask_words(len);
            prop_assert_eq!(apply_mask(&v4_words(a), &m), apply_mask(&v4_words(b), &m));
        }
    }
}
