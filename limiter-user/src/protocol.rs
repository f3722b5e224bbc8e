//! The control socket's protocol: one JSON request per line, one JSON response per line.
//! Parsing is strict (unknown fields are errors) and requests are size-limited.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    policy::{LimitSpec, Mode, Rate},
    runtime::List,
};

/// The largest request accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What `limit set` applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LimitTarget {
    /// The default limit.
    Default,
    /// A class, by name.
    Class(String),
    /// A service rule, by name.
    Service(String),
}

/// How `top` orders sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TopBy {
    /// Packets dropped.
    #[default]
    Drops,
    /// Packets seen.
    Packets,
    /// Bytes seen.
    Bytes,
}

/// A request from the CLI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Interfaces, program, mode, generation, counters.
    Status {},
    /// Every limit in force.
    LimitShow {},
    /// Changes one limit.
    LimitSet {
        /// Which limit.
        target: LimitTarget,
        /// Packets per source; `None` = no packet limit.
        packets: Option<Rate>,
        /// Bytes per source; `None` = no byte limit.
        bytes: Option<Rate>,
        /// Packets per aggregate prefix; `None` keeps the limit's current aggregate.
        aggregate: Option<Rate>,
    },
    /// Adds a class.
    ClassAdd {
        /// Its name.
        name: String,
        /// Its prefixes.
        prefixes: Vec<IpNet>,
        /// Its limit.
        limit: LimitSpec,
    },
    /// Removes a class.
    ClassDel {
        /// Its name.
        name: String,
    },
    /// Lists classes.
    ClassList {},
    /// Adds a prefix to a list.
    ListAdd {
        /// Which list.
        list: List,
        /// The prefix.
        prefix: IpNet,
        /// Seconds until it expires; `None` = permanent.
        ttl_seconds: Option<u64>,
    },
    /// Removes a prefix from a list.
    ListDel {
        /// Which list.
        list: List,
        /// The prefix.
        prefix: IpNet,
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
        seconds: u64,
    },
    /// Takes a source out of the penalty box.
    BlockDel {
        /// The source.
        address: IpAddr,
    },
    /// The worst sources.
    Top {
        /// How many.
        n: usize,
        /// Ordered by.
        by: TopBy,
    },
    /// Switches enforce / monitor.
    Mode {
        /// The new mode.
        mode: Mode,
    },
    /// Re-reads the config file.
    Reload {},
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
}

impl Response {
    /// Success with a result.
    pub fn ok(result: impl Serialize) -> Self {
        Self {
            ok: true,
            error: None,
            result: Some(serde_json::to_value(result).expect("results serialize")),
        }
    }

    /// Failure.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            result: None,
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
    /// Packets passed.
    pub passed: u64,
    /// Packets dropped.
    pub dropped: u64,
    /// Packets passed in monitor mode that would have been dropped.
    pub would_drop: u64,
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
    /// Interfaces.
    pub interfaces: Vec<InterfaceStatus>,
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRow {
    /// The interface.
    pub interface: String,
    /// The tracked prefix.
    pub prefix: IpNet,
    /// The limit it counts against.
    pub limit: String,
    /// Packets passed.
    pub passed: u64,
    /// Packets dropped.
    pub dropped: u64,
    /// Bytes seen.
    pub bytes: u64,
    /// Seconds left in the penalty box.
    pub blocked_for_seconds: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_parse_strictly() {
        let r = Request::ListAdd {
            list: List::Deny,
            prefix: "192.0.2.0/24".parse().unwrap(),
            ttl_seconds: Some(600),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        for bad in [
            r#"{"command":"status","extra":1}"#,
            r#"{"command":"nope"}"#,
            r#"{"command":"list_add","list":"deny","prefix":"300.1.1.1/8","ttl_seconds":null}"#,
            r#"{"command":"top","n":-1,"by":"drops"}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        assert!(!Request::Status {}.is_change());
        assert!(Request::Reload {}.is_change());
    }
}
