//! Map writes as a plan: from what the maps hold to what a new policy needs, the shortest
//! list of writes, in an order that keeps every packet meeting either the old or the new
//! policy, never a mix that is neither.
//!
//! The order:
//! 1. limits (and the counters of a slot that changes owner), then service ports and trie
//!    entries that are new or changed, the tries' longest prefixes first;
//! 2. the config record (which enables the tries and services);
//! 3. trie entries that are gone, shortest prefixes first, then service ports and limits
//!    that are gone.
//!
//! Why longest first: adding `10.0.0.0/8 deny` before `10.1.0.0/16 allow` would drop
//! 10.1.2.3 for a moment, which neither policy does. Why shortest first when removing: the
//! mirror case. [`tests`] checks both with random policies against a model of the maps.
//!
//! A change to one limit is one write, whatever the size of the lists.

use std::collections::BTreeMap;

use limiter_common::layout::{Config, Limit, PolicyEntry};

use crate::policy::CompiledPolicy;

/// What the policy maps hold (the per-source state is not part of a policy).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    /// The `CONFIG` record's policy settings (interface and attach mode are the link's).
    pub config: Config,
    /// `LIMITS`, by id; a missing id holds the default (zero) record.
    pub limits: BTreeMap<u32, Limit>,
    /// Which limit owns each id, for the per-limit counters.
    pub limit_names: BTreeMap<u32, String>,
    /// `SERVICE_PORTS`, by index; a missing index holds 0 (no rule).
    pub service_ports: BTreeMap<u32, u32>,
    /// `POLICY_V4`, by (address, prefix length).
    pub v4: BTreeMap<([u8; 4], u8), PolicyEntry>,
    /// `POLICY_V6`.
    pub v6: BTreeMap<([u8; 16], u8), PolicyEntry>,
}

impl From<&CompiledPolicy> for MapContents {
    fn from(policy: &CompiledPolicy) -> Self {
        Self {
            config: Config {
                ifindex: 0,
                attach_mode: 0,
                ..policy.config
            },
            limits: policy.limit_slots(),
            limit_names: policy.limit_name_slots(),
            service_ports: policy
                .service_ports
                .iter()
                .copied()
                .filter(|&(_, id)| id != 0)
                .collect(),
            v4: policy.v4.iter().map(|(a, l, e)| ((*a, *l), *e)).collect(),
            v6: policy.v6.iter().map(|(a, l, e)| ((*a, *l), *e)).collect(),
        }
    }
}

impl MapContents {
    /// The same contents with every limit's leases sized for a host with `cpus` CPUs (see
    /// [`limiter_common::lease`]): how many units a CPU may pre-pay depends on how many
    /// CPUs could hold one at once.
    pub fn leased(mut self, cpus: u32) -> Self {
        for limit in self.limits.values_mut() {
            (limit.lease, limit.aggregate_lease) = limiter_common::lease::lease_sizes(limit, cpus);
        }
        self
    }
}

/// One write to one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapWrite {
    /// Zero a limit id's pass and drop counters: the id now belongs to another name.
    ResetLimitStats(u32),
    /// `LIMITS[id] = limit` (the zero record clears it).
    Limit(u32, Limit),
    /// `SERVICE_PORTS[index] = limit id` (0 clears it).
    ServicePort(u32, u32),
    /// Insert or overwrite an IPv4 trie entry.
    InsertV4([u8; 4], u8, PolicyEntry),
    /// Insert or overwrite an IPv6 trie entry.
    InsertV6([u8; 16], u8, PolicyEntry),
    /// The config record.
    Config(Config),
    /// Remove an IPv4 trie entry.
    RemoveV4([u8; 4], u8),
    /// Remove an IPv6 trie entry.
    RemoveV6([u8; 16], u8),
}

/// The writes that turn maps holding `old` into maps holding `new`. Pure.
pub fn plan(old: &MapContents, new: &MapContents) -> Vec<MapWrite> {
    let mut writes = Vec::new();
    // 1. Additions and changes.
    for (id, name) in &new.limit_names {
        if old.limit_names.get(id).is_some_and(|n| n != name) {
            writes.push(MapWrite::ResetLimitStats(*id));
        }
    }
    for (id, limit) in &new.limits {
        if old.limits.get(id) != Some(limit) {
            writes.push(MapWrite::Limit(*id, *limit));
        }
    }
    for (index, id) in &new.service_ports {
        if old.service_ports.get(index) != Some(id) {
            writes.push(MapWrite::ServicePort(*index, *id));
        }
    }
    let v4_added = changed(&old.v4, &new.v4);
    writes.extend(
        longest_first(v4_added)
            .into_iter()
            .map(|((a, l), e)| MapWrite::InsertV4(a, l, e)),
    );
    let v6_added = changed(&old.v6, &new.v6);
    writes.extend(
        longest_first(v6_added)
            .into_iter()
            .map(|((a, l), e)| MapWrite::InsertV6(a, l, e)),
    );
    // 2. The switch.
    if old.config != new.config {
        writes.push(MapWrite::Config(new.config));
    }
    // 3. Removals.
    let mut v4_gone = gone(&old.v4, &new.v4);
    v4_gone.sort_by_key(|(_, len)| *len);
    writes.extend(v4_gone.into_iter().map(|(a, l)| MapWrite::RemoveV4(a, l)));
    let mut v6_gone = gone(&old.v6, &new.v6);
    v6_gone.sort_by_key(|(_, len)| *len);
    writes.extend(v6_gone.into_iter().map(|(a, l)| MapWrite::RemoveV6(a, l)));
    for index in gone(&old.service_ports, &new.service_ports) {
        writes.push(MapWrite::ServicePort(index, 0));
    }
    for id in gone(&old.limits, &new.limits) {
        writes.push(MapWrite::Limit(id, Limit::default()));
    }
    writes
}

/// Entries of `new` that `old` lacks or holds with another value.
fn changed<K: Ord + Copy, V: PartialEq + Copy>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> Vec<(K, V)> {
    new.iter()
        .filter(|(k, v)| old.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect()
}

/// Keys of `old` that `new` lacks.
fn gone<K: Ord + Copy, V>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Vec<K> {
    old.keys()
        .filter(|k| !new.contains_key(k))
        .copied()
        .collect()
}

fn longest_first<A, V>(mut entries: Vec<((A, u8), V)>) -> Vec<((A, u8), V)> {
    entries.sort_by_key(|((_, len), _)| std::cmp::Reverse(*len));
    entries
}

impl MapContents {
    /// Carries out writes on this model (as the kernel's maps would).
    pub fn apply(&mut self, writes: &[MapWrite]) {
        for write in writes {
            self.apply_one(write);
        }
    }

    /// Carries out one write on this model.
    pub fn apply_one(&mut self, write: &MapWrite) {
        match write {
            MapWrite::ResetLimitStats(_) => {}
            MapWrite::Limit(id, limit) if *limit == Limit::default() => {
                self.limits.remove(id);
            }
            MapWrite::Limit(id, limit) => {
                self.limits.insert(*id, *limit);
            }
            MapWrite::ServicePort(index, 0) => {
                self.service_ports.remove(index);
            }
            MapWrite::ServicePort(index, id) => {
                self.service_ports.insert(*index, *id);
            }
            MapWrite::InsertV4(a, l, e) => {
                self.v4.insert((*a, *l), *e);
            }
            MapWrite::InsertV6(a, l, e) => {
                self.v6.insert((*a, *l), *e);
            }
            MapWrite::Config(c) => self.config = *c,
            MapWrite::RemoveV4(a, l) => {
                self.v4.remove(&(*a, *l));
            }
            MapWrite::RemoveV6(a, l) => {
                self.v6.remove(&(*a, *l));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ipnet::IpNet;
    use proptest::prelude::*;

    use super::*;
    use crate::policy::{Class, LimitSpec, Policy};

    /// The longest-prefix match of `addr` in an IPv4 trie model, as the kernel answers it.
    fn lookup(trie: &BTreeMap<([u8; 4], u8), PolicyEntry>, addr: u32) -> Option<PolicyEntry> {
        trie.iter()
            .filter(|((net, len), _)| {
                let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
                (u32::from_be_bytes(*net) & mask) == (addr & mask)
            })
            .max_by_key(|((_, len), _)| *len)
            .map(|(_, e)| *e)
    }

    /// A policy over a small corner of the address space, so prefixes overlap often.
    fn policy() -> impl Strategy<Value = Policy> {
        let prefix = (0u32..16, 4u8..=8).prop_map(|(bits, len)| {
            let addr = 0x0a00_0000 | (bits << 20);
            IpNet::new(std::net::Ipv4Addr::from(addr).into(), 8 + len)
                .unwrap()
                .trunc()
        });
        (
            prop::collection::vec(prefix.clone(), 0..6),
            prop::collection::vec(prefix.clone(), 0..6),
            prop::collection::vec(prefix, 0..3),
            1u64..5,
        )
            .prop_map(|(deny, allow, class, rate)| Policy {
                deny,
                allow,
                classes: class
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| Class {
                        name: format!("c{i}"),
                        prefixes: vec![p],
                        limit: LimitSpec::packets(rate * 100, 100),
                    })
                    .collect(),
                default_limit: LimitSpec::packets(rate * 10, 10),
                ..Policy::default()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn every_packet_meets_the_old_or_the_new_policy(
            a in policy(),
            b in policy(),
            probes in prop::collection::vec(0u32..(1 << 24), 64),
        ) {
            // Overlapping classes are refused by the compiler; such cases prove nothing here.
            let (Ok(a), Ok(b)) = (a.compile(), b.compile()) else {
                return Ok(());
            };
            let (old, new) = (MapContents::from(&a), MapContents::from(&b));
            let writes = plan(&old, &new);
            let mut maps = old.clone();
            let probes: Vec<u32> = probes.iter().map(|p| 0x0a00_0000 | p).collect();
            for write in &writes {
                maps.apply_one(write);
                for &addr in &probes {
                    let now = lookup(&maps.v4, addr);
                    prop_assert!(
                        now == lookup(&old.v4, addr) || now == lookup(&new.v4, addr),
                        "after {write:?}, {addr:#x} meets {now:?}: neither policy's answer"
                    );
                    // A class entry never points at a limit that is not there.
                    if let Some(entry) = now
                        && entry.limit_id != 0
                    {
                        prop_assert!(maps.limits.contains_key(&u32::from(entry.limit_id)));
                    }
                }
            }
            // Names are not in the kernel's maps; everything else must match exactly.
            maps.limit_names = new.limit_names.clone();
            prop_assert_eq!(&maps, &new, "the plan ends in exactly the new maps");
            prop_assert!(plan(&new, &new).is_empty(), "no change, no writes");
        }
    }

    #[test]
    fn one_limit_changed_is_one_write_whatever_the_lists() {
        let deny: Vec<IpNet> = (0..100_000u32)
            .map(|i| IpNet::new(std::net::Ipv4Addr::from(0x0b00_0000 + i).into(), 32).unwrap())
            .collect();
        let a = Policy {
            deny,
            ..Policy::default()
        };
        let b = Policy {
            default_limit: LimitSpec {
                packets: Some(crate::policy::Rate::new(500, 1_000)),
                ..a.default_limit
            },
            ..a.clone()
        };
        let old = MapContents::from(&a.compile().unwrap());
        let new = MapContents::from(&b.compile().unwrap());
        let writes = plan(&old, &new);
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert!(matches!(writes[0], MapWrite::Limit(0, _)));
    }

    #[test]
    fn leases_are_sized_for_the_host_and_a_new_host_rewrites_only_limits() {
        let policy = Policy {
            default_limit: LimitSpec::packets(1_000_000, 100_000),
            ..Policy::default()
        }
        .compile()
        .unwrap();
        let two = MapContents::from(&policy).leased(2);
        assert_eq!(
            (two.limits[&0].lease, two.limits[&0].aggregate_lease),
            (64, 0)
        );
        let many = MapContents::from(&policy).leased(4_096);
        assert_eq!(
            many.limits[&0].lease, 0,
            "100,000 / (32 × 4,096) is under 4"
        );
        let writes = plan(&two, &many);
        assert!(
            writes.iter().all(|w| matches!(w, MapWrite::Limit(..))),
            "{writes:?}"
        );
        assert!(plan(&two, &MapContents::from(&policy).leased(2)).is_empty());
    }
}
