//! Prefix policy and the choice of limit: one longest-prefix-match lookup per packet decides
//! deny, allow or class; the service table picks a limit by destination port otherwise.

use aya_ebpf::maps::lpm_trie::Key;
use limiter_common::{
    layout::{Config, PolicyAction, ServiceProto, service_index},
    prefix::FAMILY_IPV4,
};

use crate::{
    maps::{POLICY_V4, POLICY_V6, SERVICE_PORTS},
    parse::{IPPROTO_TCP, IPPROTO_UDP, Packet},
};

/// The limit every source falls under unless a class or service rule says otherwise.
pub const DEFAULT_LIMIT: u32 = 0;

pub enum Decision {
    Deny,
    Allow,
    Limit(u32),
}

#[inline(always)]
pub fn resolve(config: &Config, packet: &Packet) -> Decision {
    let entry = if packet.family == FAMILY_IPV4 {
        if config.has(Config::FLAG_POLICY_V4) {
            POLICY_V4.get(Key::new(32, packet.src[0].to_ne_bytes()))
        } else {
            None
        }
    } else if config.has(Config::FLAG_POLICY_V6) {
        POLICY_V6.get(Key::new(
            128,
            limiter_common::prefix::bytes_from_words(&packet.src),
        ))
    } else {
        None
    };
    if let Some(entry) = entry {
        match entry.action {
            a if a == PolicyAction::Deny as u8 => return Decision::Deny,
            a if a == PolicyAction::Allow as u8 => return Decision::Allow,
            a if a == PolicyAction::Class as u8 => {
                return Decision::Limit(u32::from(entry.limit_id));
            }
            // An unknown action can only come from a newer user space: ignore the entry.
            _ => {}
        }
    }
    if config.has(Config::FLAG_SERVICES) {
        let slot = match packet.proto {
            IPPROTO_TCP => Some(ServiceProto::Tcp),
            IPPROTO_UDP => Some(ServiceProto::Udp),
            _ => None,
        };
        if let Some(slot) = slot
            && let Some(limit_id) = SERVICE_PORTS.get(service_index(slot, packet.dst_port))
        {
            return Decision::Limit(*limit_id);
        }
    }
    Decision::Limit(DEFAULT_LIMIT)
}
