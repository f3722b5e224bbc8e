//! The control socket's protocol: one JSON request per line, one JSON response per line.
//! Parsing is strict (unknown fields are errors) and requests are size-limited.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::runtime::{LimitTarget, RateChange};
use crate::{
    input::{Name, Prefix, Seconds},
    policy::{LimitSpec, Mode},
    runtime::List,
};

/// The largest request accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How `top` orders sources: by their rate over the interval when it measures one, by
/// their totals otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TopBy {
    /// Packets dropped.
    #[default]
    Drops,
    /// Packets passed.
    Passes,
    /// Packets seen.
    Packets,
    /// Bytes seen.
    Bytes,
}

/// The longest interval `top` measures rates over.
pub const MAX_TOP_INTERVAL_MS: u64 = 10_000;

/// A request from the CLI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Interfaces, program, mode, generation, counters.
    Status {},
    /// Every limit in force.
    LimitShow {},
    /// Changes one limit: each rate given is set or cleared, each left out is kept.
    LimitSet {
        /// Which limit.
        target: LimitTarget,
        /// Packets per source.
        #[serde(default)]
        packets: Option<RateChange>,
        /// Bytes per source.
        #[serde(default)]
        bytes: Option<RateChange>,
        /// Packets per aggregate prefix.
        #[serde(default)]
        aggregate: Option<RateChange>,
        /// New TCP connections per source.
        #[serde(default)]
        connections: Option<RateChange>,
        /// Pure ACKs per established flow.
        #[serde(default)]
        acks: Option<RateChange>,
        /// The penalty box for sustained excess, seconds (0 = off).
        #[serde(default)]
        block_seconds: Option<Seconds>,
    },
    /// Adds a class.
    ClassAdd {
        /// Its name.
        name: Name,
        /// Its prefixes.
        prefixes: Vec<Prefix>,
        /// Its limit.
        limit: LimitSpec,
    },
    /// Removes a class.
    ClassDel {
        /// Its name.
        name: Name,
    },
    /// Lists classes.
    ClassList {},
    /// Adds a prefix to a list.
    ListAdd {
        /// Which list.
        list: List,
        /// The prefix.
        prefix: Prefix,
        /// Seconds until it expires; `None` = permanent.
        ttl_seconds: Option<Seconds>,
        /// Accept a deny wider than an IPv4 /8 or an IPv6 /32.
        #[serde(default)]
        force: bool,
    },
    /// Removes a prefix from a list.
    ListDel {
        /// Which list.
        list: List,
        /// The prefix.
        prefix: Prefix,
    },
    /// Shows a list.
    ListShow {
        /// Which list.
        list: List,
    },
    /// Sources in the penalty box.
    BlockList {},
    /// Puts a source in the penalty box.
    BlockAdd {
        /// The source.
        address: IpAddr,
        /// For how long.
        seconds: Seconds,
    },
    /// Takes a source out of the penalty box.
    BlockDel {
        /// The source.
        address: IpAddr,
    },
    /// Which entries, limits and state apply to an address, and its next packet's verdict.
    Explain {
        /// The address.
        address: IpAddr,
    },
    /// Attack records: one by id, or all.
    Attacks {
        /// One attack.
        #[serde(default)]
        id: Option<u64>,
    },
    /// The worst sources.
    Top {
        /// How many.
        n: usize,
        /// Ordered by.
        by: TopBy,
        /// Measure rates over this many milliseconds (the answer comes after it); `None`:
        /// totals only.
        #[serde(default)]
        interval_ms: Option<u64>,
        /// Only sources within this prefix.
        #[serde(default)]
        within: Option<IpNet>,
        /// Only sources counted against this limit (class, service or `default`).
        #[serde(default)]
        limit: Option<String>,
    },
    /// Switches enforce / monitor.
    Mode {
        /// The new mode.
        mode: Mode,
    },
    /// Re-reads the config file.
    Reload {},
    /// The latest changes, oldest first.
    History {
        /// How many.
        n: usize,
    },
    /// The runtime overrides on top of the config file.
    RuntimeShow {},
    /// Drops every runtime override (the config file alone applies).
    RuntimeReset {},
    /// Detaches the program and removes its pins.
    Detach {
        /// One interface, or all.
        iface: Option<String>,
    },
}

impl Request {
    /// Whether the request changes anything (and so needs the admin privilege).
    pub fn is_change(&self) -> bool {
        !matches!(
            self,
            Request::Status {}
                | Request::LimitShow {}
                | Request::ClassList {}
                | Request::ListShow { .. }
                | Request::BlockList {}
                | Request::Top { .. }
                | Request::Attacks { .. }
                | Request::Explain { .. }
                | Request::History { .. }
                | Request::RuntimeShow {}
        )
    }
}

/// The answer to a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not, when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The result, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// What the operator should know about a change that took effect (an allow entry that
    /// a deny overrides, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Response {
    /// Success with a result.
    pub fn ok(result: impl Serialize) -> Self {
        Self {
            ok: true,
            error: None,
            result: Some(serde_json::to_value(result).expect("results serialize")),
            notes: Vec::new(),
        }
    }

    /// The same response, with notes for the operator.
    pub fn with_notes(mut self, notes: Vec<String>) -> Self {
        self.notes = notes;
        self
    }

    /// Failure.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            result: None,
            notes: Vec::new(),
        }
    }
}

/// `status`: one interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    /// Its name.
    pub name: String,
    /// `native` or `generic`.
    pub attach_mode: String,
    /// The kernel's program id.
    pub program_id: Option<u32>,
    /// Whether the program filters the interface now.
    pub attached: bool,
    /// Why it does not, when it does not.
    pub problem: Option<String>,
    /// Packets passed.
    pub passed: u64,
    /// Packets dropped.
    pub dropped: u64,
    /// Packets passed in monitor mode that would have been dropped.
    pub would_drop: u64,
    /// Whether TCP is judged by session here now (the sock_ops program attached for this
    /// interface's maps, and the policy asking for it).
    pub sessions: bool,
    /// Packets by verdict reason (those seen at least once), as the metrics label them.
    pub reasons: std::collections::BTreeMap<String, u64>,
    /// Sources proven by a completed handshake, as of the last sweep (at most a minute
    /// old); `None` before the first.
    pub proven_sources: Option<u64>,
    /// Sources tracked.
    pub tracked_sources: u64,
}

/// `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `enforce` or `monitor`.
    pub mode: Mode,
    /// The config generation.
    pub generation: u64,
    /// The config file, if any.
    pub config_file: Option<String>,
    /// Whether the last reload succeeded.
    pub last_reload_ok: bool,
    /// Whether the runtime state in force is saved (false while saves fail).
    pub state_saved: bool,
    /// The SYN-cookie challenge: `off` (mode off), `armed` (auto, no attack), `engaged`.
    pub challenge: String,
    /// Interfaces.
    pub interfaces: Vec<InterfaceStatus>,
    /// The fleet store this host follows, when one is configured.
    #[serde(default)]
    pub fleet: Option<Box<FleetReport>>,
}

/// `status`: how this host follows the fleet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetReport {
    /// The etcd endpoints and key root.
    pub source: String,
    /// Whether the store answers now.
    pub connected: bool,
    /// The etcd revision applied here.
    pub revision: i64,
    /// Milliseconds since the store last confirmed that revision (`None`: never, since the
    /// daemon started; the policy in force is the one saved on disk).
    pub lag_ms: Option<u64>,
    /// Fleet denies applied here.
    pub applied: usize,
    /// Fleet allows applied here.
    pub allowed: usize,
    /// Fleet entries refused here: list and prefix (`deny 198.51.100.0/25`), and why.
    pub refused: Vec<(String, String)>,
    /// The fleet policy in force here, when the fleet has one.
    pub policy: Option<FleetPolicyReport>,
    /// The fleet policy version this host refused, and why (the one above stays in force).
    pub policy_refused: Option<String>,
    /// Attack records judged for publication as fleet denies, by outcome.
    pub publications: std::collections::BTreeMap<String, u64>,
}

/// `status`: the fleet policy in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetPolicyReport {
    /// Its version (the etcd mod revision of its key).
    pub version: i64,
    /// Who pushed it.
    pub author: String,
    /// Why.
    pub reason: String,
    /// When, Unix milliseconds.
    pub created_unix_ms: u64,
}

/// `limit show`: one limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitRow {
    /// `default`, `class` or `service`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// What it matches (prefixes or ports).
    pub matches: String,
    /// The limit.
    pub limit: LimitSpec,
    /// `config` (the file's) or `runtime` (set or added with the CLI; `reload` keeps it).
    pub origin: String,
}

/// Every limit of `policy` as `limit list` shows it; `from_runtime` says whether the limit of
/// a name ("default" for the default) comes from a runtime change.
pub fn limit_rows(
    policy: &crate::policy::Policy,
    from_runtime: impl Fn(&str) -> bool,
) -> Vec<LimitRow> {
    let origin = |name: &str| {
        if from_runtime(name) {
            "runtime"
        } else {
            "config"
        }
        .to_owned()
    };
    let mut rows = vec![LimitRow {
        kind: "default".into(),
        name: "default".into(),
        matches: "everything else".into(),
        limit: policy.default_limit,
        origin: origin("default"),
    }];
    for class in &policy.classes {
        rows.push(LimitRow {
            kind: "class".into(),
            name: class.name.clone(),
            matches: class
                .prefixes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            limit: class.limit,
            origin: origin(&class.name),
        });
    }
    for service in &policy.services {
        let proto = match service.proto {
            limiter_common::layout::ServiceProto::Tcp => "tcp",
            limiter_common::layout::ServiceProto::Udp => "udp",
        };
        let ports = if service.ports.start() == service.ports.end() {
            service.ports.start().to_string()
        } else {
            format!("{}-{}", service.ports.start(), service.ports.end())
        };
        rows.push(LimitRow {
            kind: "service".into(),
            name: service.name.clone(),
            matches: format!("{proto}/{ports}"),
            limit: service.limit,
            origin: origin(&service.name),
        });
    }
    rows
}

/// A list entry as shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRow {
    /// The prefix.
    pub prefix: IpNet,
    /// `config` or `runtime`.
    pub origin: String,
    /// Seconds left, for temporary entries.
    pub expires_in_seconds: Option<u64>,
}

/// A source as shown by `top` and `block list`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceRow {
    /// The interface.
    pub interface: String,
    /// The tracked prefix.
    pub prefix: IpNet,
    /// The limit it counts against.
    pub limit: String,
    /// Which of its budgets: TCP, or everything else.
    pub budget: limiter_common::layout::Budget,
    /// Packets passed.
    pub passed: u64,
    /// Packets dropped.
    pub dropped: u64,
    /// Bytes seen.
    pub bytes: u64,
    /// Seconds left in the penalty box.
    pub blocked_for_seconds: u64,
    /// Rates over the interval, when one was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rates: Option<SourceRates>,
    /// An allowlisted source: it has no state, so `passed` (and its rate) is estimated from
    /// sampled frames (one in 256 per CPU), `limit` is "allowlist", and bytes are not known.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allowlisted: bool,
}

/// A source's rates over `top`'s interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceRates {
    pub passed_per_second: f64,
    pub dropped_per_second: f64,
    pub bytes_per_second: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Rate;

    #[test]
    fn requests_round_trip_and_parse_strictly() {
        let r = Request::ListAdd {
            list: List::Deny,
            prefix: "192.0.2.0/24".parse().unwrap(),
            ttl_seconds: Some(Seconds::new(600).unwrap()),
            force: false,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        for bad in [
            r#"{"command":"status","extra":1}"#,
            r#"{"command":"nope"}"#,
            r#"{"command":"list_add","list":"deny","prefix":"300.1.1.1/8","ttl_seconds":null}"#,
            r#"{"command":"top","n":-1,"by":"drops"}"#,
            "not json",
            // The validator's rules hold on the socket too.
            r#"{"command":"list_add","list":"deny","prefix":"10.9.9.9/8","ttl_seconds":null}"#,
            r#"{"command":"list_add","list":"deny","prefix":"10.0.0.0/8","ttl_seconds":18446744073709551615}"#,
            r#"{"command":"class_add","name":"","prefixes":["192.0.2.0/24"],"limit":{"packets":null,"bytes":null,"aggregate":null}}"#,
            r#"{"command":"class_add","name":"a\nb","prefixes":["192.0.2.0/24"],"limit":{"packets":null,"bytes":null,"aggregate":null}}"#,
            r#"{"command":"limit_set","target":"default","packets":{"set":[10,10]}}"#,
            r#"{"command":"limit_set","target":"default","packets":{"set":{"per_second":0,"burst":10}}}"#,
            r#"{"command":"limit_set","target":"default","packets":"remove"}"#,
            r#"{"command":"block_add","address":"192.0.2.1","seconds":18446744073709551615}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        let long_name = format!(
            r#"{{"command":"class_del","name":"{}"}}"#,
            "x".repeat(60_000)
        );
        assert!(serde_json::from_str::<Request>(&long_name).is_err());
        let ok = r#"{"command":"limit_set","target":"default","packets":{"set":{"per_second":10,"burst":10}},"bytes":"clear"}"#;
        assert_eq!(
            serde_json::from_str::<Request>(ok).unwrap(),
            Request::LimitSet {
                target: LimitTarget::Default,
                packets: Some(RateChange::Set(Rate::new(10, 10))),
                bytes: Some(RateChange::Clear),
                aggregate: None,
                connections: None,
                acks: None,
                block_seconds: None,
            }
        );
        let kept = Some(Rate::new(5, 5));
        assert_eq!(RateChange::patch(None, kept), kept, "left out: kept");
        assert_eq!(RateChange::patch(Some(RateChange::Clear), kept), None);
        assert!(!Request::Status {}.is_change());
        assert!(Request::Reload {}.is_change());
    }
}
