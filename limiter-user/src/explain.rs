//! `limiter explain ADDR`: which policy entries contain an address, which one decides and
//! why, which limit applies, and what the address's next packet would get from the state the
//! program holds for it. The decision is read from the compiled tries exactly as the
//! program's longest-prefix match reads them; the prediction from the buckets as
//! [`Gcra::admit`](limiter_common::rate::Gcra::admit) reads them.

use std::net::IpAddr;

use ipnet::IpNet;
use limiter_common::layout::{Limit, PolicyAction, PolicyEntry, SourceState};
use serde::{Deserialize, Serialize};

use crate::policy::{CompiledPolicy, Policy};

/// A policy entry that contains the address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchedEntry {
    pub prefix: IpNet,
    /// `denylist`, `allowlist` or `class NAME`.
    pub from: String,
    /// Whether this entry decides (the longest of the winning kind: a deny overrides an
    /// allow or class inside it, an allow a class inside it), or is shadowed.
    pub decides: bool,
}

/// What the policy says about an address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum PolicyDecision {
    Deny,
    Allow,
    /// Limited by a class, or by the default limit or a service's by destination port.
    Limit {
        /// The class, when one contains the address.
        class: Option<String>,
        /// The limits its packets may be judged by: the class's, or the default and every
        /// service's (by destination port).
        limits: Vec<(u16, String)>,
    },
}

/// The policy's view of one address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyMatch {
    pub entries: Vec<MatchedEntry>,
    pub decision: PolicyDecision,
}

/// Every entry containing `addr`, and the decision the program's trie lookup reaches.
pub fn policy_match(policy: &Policy, compiled: &CompiledPolicy, addr: IpAddr) -> PolicyMatch {
    let mut entries: Vec<MatchedEntry> = Vec::new();
    let mut add = |nets: &[IpNet], from: &str| {
        for net in nets.iter().filter(|n| n.contains(&addr)) {
            entries.push(MatchedEntry {
                prefix: net.trunc(),
                from: from.to_owned(),
                decides: false,
            });
        }
    };
    add(&policy.deny, "denylist");
    add(&policy.allow, "allowlist");
    for class in &policy.classes {
        add(&class.prefixes, &format!("class {}", class.name));
    }
    entries.sort_by(|a, b| {
        b.prefix
            .prefix_len()
            .cmp(&a.prefix.prefix_len())
            .then(a.from.cmp(&b.from))
    });
    let entry = lookup(compiled, addr);
    let decided_from = match entry.map(|e| e.action) {
        Some(a) if a == PolicyAction::Deny as u8 => Some("denylist".to_owned()),
        Some(a) if a == PolicyAction::Allow as u8 => Some("allowlist".to_owned()),
        Some(a) if a == PolicyAction::Class as u8 => entry.map(|e| {
            format!(
                "class {}",
                compiled
                    .limit_names
                    .get(usize::from(e.limit_id))
                    .cloned()
                    .unwrap_or_default()
            )
        }),
        _ => None,
    };
    // The longest entry of the deciding kind decides; everything else containing the
    // address is shadowed by it.
    if let Some(from) = &decided_from
        && let Some(winner) = entries.iter_mut().find(|e| &e.from == from)
    {
        winner.decides = true;
    }
    let name = |id: u16| {
        compiled
            .limit_names
            .get(usize::from(id))
            .cloned()
            .unwrap_or_else(|| id.to_string())
    };
    let decision = match entry.map(|e| (e.action, e.limit_id)) {
        Some((a, _)) if a == PolicyAction::Deny as u8 => PolicyDecision::Deny,
        Some((a, _)) if a == PolicyAction::Allow as u8 => PolicyDecision::Allow,
        Some((a, id)) if a == PolicyAction::Class as u8 => PolicyDecision::Limit {
            class: Some(name(id)),
            limits: vec![(id, name(id))],
        },
        _ => {
            let mut limits = vec![(0, name(0))];
            for (_, id) in &compiled.service_ports {
                let id = *id as u16;
                if !limits.iter().any(|(known, _)| *known == id) {
                    limits.push((id, name(id)));
                }
            }
            PolicyDecision::Limit {
                class: None,
                limits,
            }
        }
    };
    PolicyMatch { entries, decision }
}

/// The longest compiled prefix containing `addr`, as the program's LPM trie finds it.
fn lookup(compiled: &CompiledPolicy, addr: IpAddr) -> Option<PolicyEntry> {
    match addr {
        IpAddr::V4(a) => compiled
            .v4
            .iter()
            .filter(|(net, len, _)| {
                ipnet::Ipv4Net::new((*net).into(), *len).is_ok_and(|n| n.contains(&a))
            })
            .max_by_key(|(_, len, _)| *len)
            .map(|(_, _, e)| *e),
        IpAddr::V6(a) => compiled
            .v6
            .iter()
            .filter(|(net, len, _)| {
                ipnet::Ipv6Net::new((*net).into(), *len).is_ok_and(|n| n.contains(&a))
            })
            .max_by_key(|(_, len, _)| *len)
            .map(|(_, _, e)| *e),
    }
}

/// A source's state under one limit and budget, as `explain` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetView {
    pub interface: String,
    pub limit: String,
    /// `tcp` or `other`.
    pub budget: String,
    pub passed: u64,
    pub dropped: u64,
    /// Packets its packet bucket would admit now; `None`: unlimited.
    pub packets_left: Option<u64>,
    /// Packets pre-paid from its bucket into leases on the CPUs receiving it, not yet used
    /// (not counted in `packets_left`).
    #[serde(default)]
    pub leased: u64,
    /// Seconds left in the penalty box.
    pub blocked_seconds: Option<u64>,
    /// What its next packet gets.
    pub next_packet: String,
}

/// What the next packet of a tracked source gets from its state under `limit`.
pub fn predict(
    limit: &Limit,
    state: &SourceState,
    leased: u64,
    now_ns: u64,
) -> (Option<u64>, Option<u64>, String) {
    let blocked = (state.blocked_until_ns > now_ns)
        .then(|| (state.blocked_until_ns - now_ns).div_ceil(1_000_000_000));
    let left = limit.packets.is_limited().then(|| {
        limit
            .packets
            .available(state.packets_tat, state.updated_ns, now_ns)
    });
    let next = if let Some(seconds) = blocked {
        format!("drop (penalty_box, {seconds} s left)")
    } else if left == Some(0) && leased > 0 {
        format!(
            "pass on a CPU holding its lease ({leased} pre-paid), else drop (rate_packets: no packet left in its bucket)"
        )
    } else if left == Some(0) {
        "drop (rate_packets: no packet left in its bucket)".to_owned()
    } else {
        "pass (within its limit, if its aggregate prefix is too)".to_owned()
    };
    (left, blocked, next)
}

/// The whole answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub address: IpAddr,
    /// The source and aggregate prefixes it is tracked under.
    pub source_prefix: IpNet,
    pub aggregate_prefix: IpNet,
    pub policy: PolicyMatch,
    /// Its state, per interface, limit and budget; empty when untracked.
    pub state: Vec<BudgetView>,
    /// Packets the aggregate prefix's bucket would admit now, per interface and limit.
    pub aggregate_packets_left: Vec<(String, String, u64)>,
    /// Whether it completed a TCP handshake with this host (when sessions are on).
    pub proven: Option<bool>,
    /// What its next packet gets, in words.
    pub verdict: String,
}

/// The verdict of the next packet, from the policy and the state views.
pub fn verdict(policy: &PolicyMatch, state: &[BudgetView], proven: Option<bool>) -> String {
    match &policy.decision {
        PolicyDecision::Deny => "drop (denylisted)".to_owned(),
        PolicyDecision::Allow => "pass (allowlisted: no limit applies)".to_owned(),
        PolicyDecision::Limit { .. } if !state.is_empty() => {
            if let Some(drop) = state.iter().find(|s| s.next_packet.starts_with("drop")) {
                format!(
                    "{} under limit {} ({} budget)",
                    drop.next_packet, drop.limit, drop.budget
                )
            } else {
                "pass (within its limits)".to_owned()
            }
        }
        PolicyDecision::Limit { .. } => match proven {
            Some(false) => "untracked: a TCP SYN shares the unproven bucket (no state until a \
                            handshake); UDP and other traffic gets state as a new source unless \
                            past the new-source cap"
                .to_owned(),
            Some(true) => "untracked but proven: a TCP SYN gets state and its own budget; UDP \
                           gets state as a new source unless past the new-source cap"
                .to_owned(),
            None => "untracked: its next packet gets state as a new source unless past the \
                     new-source cap"
                .to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Class, LimitSpec, Rate};

    fn policy() -> Policy {
        Policy {
            deny: vec!["10.0.0.0/8".parse().unwrap()],
            allow: vec![
                "10.1.0.0/16".parse().unwrap(),
                "192.0.2.7/32".parse().unwrap(),
            ],
            classes: vec![Class {
                name: "mm".to_owned(),
                prefixes: vec!["192.0.2.0/24".parse().unwrap()],
                limit: LimitSpec {
                    packets: Some(Rate::new(100, 100)),
                    ..LimitSpec::default()
                },
            }],
            ..Policy::default()
        }
    }

    fn matched(addr: &str) -> PolicyMatch {
        let p = policy();
        policy_match(&p, &p.compile().unwrap(), addr.parse().unwrap())
    }

    #[test]
    fn the_longest_entry_decides_and_shadows_the_rest() {
        // A deny overrides a narrower allow inside it, as the program resolves it.
        let m = matched("10.1.2.3");
        assert_eq!(m.decision, PolicyDecision::Deny);
        assert_eq!(m.entries.len(), 2);
        assert!(!m.entries[0].decides && m.entries[0].from == "allowlist");
        assert!(m.entries[1].decides && m.entries[1].from == "denylist");

        let m = matched("10.2.0.1");
        assert_eq!(m.decision, PolicyDecision::Deny);
        assert!(m.entries[0].decides);

        let m = matched("192.0.2.9");
        assert_eq!(
            m.decision,
            PolicyDecision::Limit {
                class: Some("mm".to_owned()),
                limits: vec![(1, "mm".to_owned())]
            }
        );
        let m = matched("192.0.2.7");
        assert_eq!(m.decision, PolicyDecision::Allow, "the /32 allow wins");
        assert_eq!(
            m.entries.iter().filter(|e| !e.decides).count(),
            1,
            "the class is shadowed"
        );

        let m = matched("203.0.113.1");
        assert!(m.entries.is_empty());
        assert!(matches!(
            m.decision,
            PolicyDecision::Limit { class: None, .. }
        ));
    }

    #[test]
    fn predictions_read_the_buckets() {
        let limit = Limit {
            packets: limiter_common::rate::Gcra::per_second(10, 5).unwrap(),
            ..Limit::default()
        };
        let now = 10_000_000_000;
        let fresh = SourceState {
            packets_tat: limit.packets.full_at(now),
            updated_ns: now,
            ..SourceState::default()
        };
        assert_eq!(predict(&limit, &fresh, 0, now).0, Some(5));
        assert!(predict(&limit, &fresh, 0, now).2.starts_with("pass"));
        let spent = SourceState {
            packets_tat: limit.packets.full_at(now) + limit.packets.tolerance,
            ..fresh
        };
        assert_eq!(predict(&limit, &spent, 0, now).0, Some(0));
        assert!(predict(&limit, &spent, 0, now).2.contains("rate_packets"));
        let on_lease = predict(&limit, &spent, 3, now).2;
        assert!(
            on_lease.starts_with("pass on a CPU holding its lease (3 pre-paid)"),
            "{on_lease}"
        );
        let boxed = SourceState {
            blocked_until_ns: now + 2_500_000_000,
            ..fresh
        };
        let (_, blocked, next) = predict(&limit, &boxed, 0, now);
        assert_eq!(blocked, Some(3));
        assert!(next.contains("penalty_box"));
    }
}
