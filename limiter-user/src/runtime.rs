//! Changes made at runtime through the CLI, layered on top of the config file and persisted
//! atomically in the state directory, so they survive restarts, reboots and `kill -9`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    input::{FORCE_HINT_CLI, InputError, Name, Prefix, check_deny_width},
    policy::{Class, CompiledPolicy, LimitIds, LimitSpec, Mode, Policy, PolicyError, Rate},
};

/// What `limit set` applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LimitTarget {
    /// The default limit.
    Default,
    /// A class, by name.
    Class(Name),
    /// A service rule, by name.
    Service(Name),
}

/// A change to one rate of a limit; a rate left out of `limit_set` keeps its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RateChange {
    /// Limit to this rate.
    Set(Rate),
    /// No limit of this kind.
    Clear,
}

impl RateChange {
    /// `current` with this change applied (`None` keeps it).
    pub fn patch(change: Option<Self>, current: Option<Rate>) -> Option<Rate> {
        match change {
            None => current,
            Some(Self::Set(rate)) => Some(rate),
            Some(Self::Clear) => None,
        }
    }
}

/// What `limit set` changes; each field left `None` is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitChanges {
    /// Packets per source.
    #[serde(default)]
    pub packets: Option<RateChange>,
    /// Bytes per source.
    #[serde(default)]
    pub bytes: Option<RateChange>,
    /// Packets per aggregate prefix.
    #[serde(default)]
    pub aggregate: Option<RateChange>,
    /// New TCP connections per source.
    #[serde(default)]
    pub connections: Option<RateChange>,
    /// Pure ACKs per established flow.
    #[serde(default)]
    pub acks: Option<RateChange>,
    /// The penalty box, seconds (0 = off).
    #[serde(default)]
    pub block_seconds: Option<u64>,
}

impl LimitChanges {
    /// Whether the change changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Why a runtime change was refused. Nothing changed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// No class has that name.
    #[error("no class named {0:?}")]
    NoClass(String),
    /// No service rule has that name.
    #[error("no service rule named {0:?}")]
    NoService(String),
    /// The class exists.
    #[error("class {0:?} exists; delete it first or use `limit set --class`")]
    ClassExists(String),
    /// A class without prefixes.
    #[error("a class needs at least one prefix")]
    NoPrefixes,
    /// The prefix is in neither the file's list nor the runtime's.
    #[error("{prefix} is not in the {list} list")]
    NotListed {
        /// The prefix.
        prefix: IpNet,
        /// "allow" or "deny".
        list: &'static str,
    },
    /// The input breaks a rule (a wide deny without force).
    #[error(transparent)]
    Input(#[from] InputError),
}

/// A list entry added at runtime, with an optional expiry (Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListEntry {
    /// The prefix.
    pub prefix: IpNet,
    /// When it stops applying; `None` = until removed.
    pub expires_at: Option<u64>,
}

/// A class added at runtime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeClass {
    /// Its prefixes.
    pub prefixes: Vec<IpNet>,
    /// Its limit.
    pub limit: LimitSpec,
}

/// Everything changed at runtime. Applied on top of the file's policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeState {
    /// Bumped by every accepted change (and reload).
    pub generation: u64,
    /// Overrides the file's mode.
    pub mode: Option<Mode>,
    /// Overrides the default limit.
    pub default_limit: Option<LimitSpec>,
    /// Overrides the limit of a class or service rule, by name.
    pub limits: BTreeMap<String, LimitSpec>,
    /// Classes added.
    pub classes: BTreeMap<String, RuntimeClass>,
    /// Classes of the file removed.
    pub classes_removed: BTreeSet<String>,
    /// Allowlist entries added.
    pub allow: Vec<ListEntry>,
    /// Allowlist entries of the file removed.
    pub allow_removed: BTreeSet<IpNet>,
    /// Denylist entries added.
    pub deny: Vec<ListEntry>,
    /// Denylist entries of the file removed.
    pub deny_removed: BTreeSet<IpNet>,
    /// The limit id of every class and service rule, kept for its whole life.
    pub limit_ids: LimitIds,
    /// The fleet's denylist as last read from etcd: kept here so it is saved with every
    /// change and a restart without etcd still enforces it (fail-static).
    pub fleet: crate::fleet::FleetView,
}

/// Why the runtime state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid state.
    #[error("{path}: {source}")]
    Parse {
        /// The path.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

/// Which list a change is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum List {
    /// The allowlist.
    Allow,
    /// The denylist.
    Deny,
}

impl RuntimeState {
    /// The file the state lives in.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("runtime.json")
    }

    /// Reads the state; a missing file is an empty state.
    pub fn load(state_dir: &Path) -> Result<Self, StateError> {
        let path = Self::path(state_dir);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| StateError::Parse { path, source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Writes the state atomically: a temporary file, fsync, rename over the old one, fsync
    /// of the directory. A crash at any point leaves the old or the new state, whole. The
    /// file is mode 0600, in a directory made 0700 if this creates it: the state names
    /// clients and partners.
    pub fn save(&self, state_dir: &Path) -> Result<(), StateError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io(state_dir))?;
        let bytes = serde_json::to_vec_pretty(self).expect("runtime state serializes");
        write_private(state_dir, "runtime.json", &bytes).map_err(io(&Self::path(state_dir)))?;
        Ok(())
    }

    fn list_mut(&mut self, list: List) -> (&mut Vec<ListEntry>, &mut BTreeSet<IpNet>) {
        match list {
            List::Allow => (&mut self.allow, &mut self.allow_removed),
            List::Deny => (&mut self.deny, &mut self.deny_removed),
        }
    }

    /// Adds a prefix to a list (replacing an earlier runtime entry for the same prefix).
    pub fn add(&mut self, list: List, prefix: IpNet, expires_at: Option<u64>) {
        let prefix = prefix.trunc();
        let (added, removed) = self.list_mut(list);
        removed.remove(&prefix);
        added.retain(|e| e.prefix != prefix);
        added.push(ListEntry { prefix, expires_at });
    }

    /// Removes a prefix from a list, whether it came from the file or from the CLI.
    /// Returns false when it was in neither.
    pub fn remove(&mut self, list: List, prefix: IpNet, in_file: bool) -> bool {
        let prefix = prefix.trunc();
        let (added, removed) = self.list_mut(list);
        let before = added.len();
        added.retain(|e| e.prefix != prefix);
        let was_added = added.len() != before;
        if in_file {
            removed.insert(prefix);
        }
        was_added || in_file
    }

    /// Drops entries whose time is up; true when anything changed.
    pub fn expire(&mut self, now_unix: u64) -> bool {
        let before = self.allow.len() + self.deny.len();
        let live = |e: &ListEntry| e.expires_at.is_none_or(|t| t > now_unix);
        self.allow.retain(live);
        self.deny.retain(live);
        let fleet_expired = self.fleet.expire(now_unix);
        before != self.allow.len() + self.deny.len() || fleet_expired
    }

    /// Changes the rates `changes` names of one limit of `policy` (the policy in force);
    /// the others keep their values.
    pub fn set_limit(
        &mut self,
        policy: &Policy,
        target: &LimitTarget,
        changes: LimitChanges,
    ) -> Result<(), ChangeError> {
        let current = match target {
            LimitTarget::Default => policy.default_limit,
            LimitTarget::Class(name) => policy
                .classes
                .iter()
                .find(|c| c.name == name.as_str())
                .map(|c| c.limit)
                .ok_or_else(|| ChangeError::NoClass(name.to_string()))?,
            LimitTarget::Service(name) => policy
                .services
                .iter()
                .find(|s| s.name == name.as_str())
                .map(|s| s.limit)
                .ok_or_else(|| ChangeError::NoService(name.to_string()))?,
        };
        let limit = LimitSpec {
            packets: RateChange::patch(changes.packets, current.packets),
            bytes: RateChange::patch(changes.bytes, current.bytes),
            aggregate: RateChange::patch(changes.aggregate, current.aggregate),
            connections: RateChange::patch(changes.connections, current.connections),
            acks: RateChange::patch(changes.acks, current.acks),
            block_seconds: changes.block_seconds.or(current.block_seconds),
        };
        match target {
            LimitTarget::Default => self.default_limit = Some(limit),
            LimitTarget::Class(name) => match self.classes.get_mut(name.as_str()) {
                Some(class) => class.limit = limit,
                None => {
                    self.limits.insert(name.to_string(), limit);
                }
            },
            LimitTarget::Service(name) => {
                self.limits.insert(name.to_string(), limit);
            }
        }
        Ok(())
    }

    /// Adds a class to `policy` (the policy in force).
    pub fn add_class(
        &mut self,
        policy: &Policy,
        name: &Name,
        prefixes: &[Prefix],
        limit: LimitSpec,
    ) -> Result<(), ChangeError> {
        let name = name.to_string();
        if policy.classes.iter().any(|c| c.name == name) {
            return Err(ChangeError::ClassExists(name));
        }
        if prefixes.is_empty() {
            return Err(ChangeError::NoPrefixes);
        }
        self.classes_removed.remove(&name);
        self.classes.insert(
            name,
            RuntimeClass {
                prefixes: prefixes.iter().map(|p| p.net()).collect(),
                limit,
            },
        );
        Ok(())
    }

    /// Removes a class of `policy` (the policy in force), whether the file or the CLI added it.
    pub fn remove_class(
        &mut self,
        policy: &Policy,
        file: &Policy,
        name: &Name,
    ) -> Result<(), ChangeError> {
        let name = name.to_string();
        if !policy.classes.iter().any(|c| c.name == name) {
            return Err(ChangeError::NoClass(name));
        }
        self.classes.remove(&name);
        self.limits.remove(&name);
        if file.classes.iter().any(|c| c.name == name) {
            self.classes_removed.insert(name);
        }
        Ok(())
    }

    /// Adds a prefix to a list (a deny wider than /8 or /32 only with `force`); returns
    /// notes for the operator: an allow entry that a deny of `policy` overrides.
    pub fn add_entry(
        &mut self,
        policy: &Policy,
        list: List,
        prefix: Prefix,
        expires_at: Option<u64>,
        force: bool,
    ) -> Result<Vec<String>, ChangeError> {
        if list == List::Deny {
            check_deny_width(prefix, force, FORCE_HINT_CLI)?;
        }
        self.add(list, prefix.net(), expires_at);
        Ok(match list {
            List::Allow => shadowing_denies(prefix.net(), &policy.deny),
            List::Deny => Vec::new(),
        })
    }

    /// Removes a prefix from a list, whether `file` (the config file's policy) or the CLI
    /// added it.
    pub fn remove_entry(
        &mut self,
        file: &Policy,
        list: List,
        prefix: Prefix,
    ) -> Result<(), ChangeError> {
        let prefix = prefix.net();
        let (file_list, name) = match list {
            List::Allow => (&file.allow, "allow"),
            List::Deny => (&file.deny, "deny"),
        };
        let in_file = file_list.iter().any(|p| p.trunc() == prefix);
        if self.remove(list, prefix, in_file) {
            Ok(())
        } else {
            Err(ChangeError::NotListed { prefix, list: name })
        }
    }

    /// Drops every override; the limit ids stay with their names.
    pub fn reset(&mut self) {
        *self = Self {
            generation: self.generation,
            limit_ids: std::mem::take(&mut self.limit_ids),
            // The fleet's entries are not an operator's change to reset: they stay until
            // the fleet removes them.
            fleet: std::mem::take(&mut self.fleet),
            ..Self::default()
        };
    }

    /// The policy in force and its compiled form, each class and service at the limit id it
    /// had before (a new name gets a new id, recorded here for the next save).
    pub fn compile(
        &mut self,
        file: &Policy,
        now_unix: u64,
    ) -> Result<(Policy, CompiledPolicy), PolicyError> {
        let policy = self.effective(file, now_unix);
        self.limit_ids.assign(&policy)?;
        let compiled = policy.compile_with(&self.limit_ids)?;
        Ok((policy, compiled))
    }

    /// The policy in force: the file's, with the fleet policy in place of its policy
    /// sections, these changes on top, then the fleet's entries.
    pub fn effective(&self, file: &Policy, now_unix: u64) -> Policy {
        let mut policy = self.local(file, now_unix);
        // Fleet entries after every local list: a deny that overlaps a local allow or the
        // anti-lockout list is not applied (`FleetView::split` says why). Allows go in
        // after the denies are judged, so only the host's own allowlist guards them; a deny
        // still wins over an allow in the trie.
        let split = self
            .fleet
            .split(&policy.allow, &policy.fleet_never_deny, now_unix);
        for (entries, list) in [
            (split.deny, &mut policy.deny),
            (split.allow, &mut policy.allow),
        ] {
            for entry in entries {
                let prefix = entry.prefix.trunc();
                if !list.iter().any(|d| d.trunc() == prefix) {
                    list.push(prefix);
                }
            }
        }
        policy
    }

    /// The policy before the fleet's entries: the host's own lists, which the fleet's
    /// entries are judged against.
    pub fn local(&self, file: &Policy, now_unix: u64) -> Policy {
        let mut policy = match self.fleet_policy() {
            Some(Ok(document)) => document.overlay(file),
            // The daemon takes only documents that parse; one saved by another version
            // that this one cannot read leaves the file's sections in force.
            Some(Err(_)) | None => file.clone(),
        };
        if let Some(mode) = self.mode {
            policy.mode = mode;
        }
        if let Some(limit) = self.default_limit {
            policy.default_limit = limit;
        }
        policy.classes.retain(|c| {
            !self.classes_removed.contains(&c.name) && !self.classes.contains_key(&c.name)
        });
        for (name, class) in &self.classes {
            policy.classes.push(Class {
                name: name.clone(),
                prefixes: class.prefixes.clone(),
                limit: class.limit,
            });
        }
        for class in &mut policy.classes {
            if let Some(limit) = self.limits.get(&class.name) {
                class.limit = *limit;
            }
        }
        for service in &mut policy.services {
            if let Some(limit) = self.limits.get(&service.name) {
                service.limit = *limit;
            }
        }
        let live = |e: &&ListEntry| e.expires_at.is_none_or(|t| t > now_unix);
        policy
            .allow
            .retain(|p| !self.allow_removed.contains(&p.trunc()));
        policy
            .allow
            .extend(self.allow.iter().filter(live).map(|e| e.prefix));
        policy
            .deny
            .retain(|p| !self.deny_removed.contains(&p.trunc()));
        policy
            .deny
            .extend(self.deny.iter().filter(live).map(|e| e.prefix));
        policy
    }

    /// The fleet policy document, parsed, when the fleet has one.
    pub fn fleet_policy(
        &self,
    ) -> Option<Result<crate::config::PolicyDocument, crate::config::ConfigError>> {
        self.fleet
            .policy
            .as_ref()
            .map(crate::config::parse_fleet_policy)
    }
}

/// Replaces `dir/name` with `bytes` atomically and privately: a mode-0600 temporary file,
/// fsync, rename over the old file, fsync of the directory. A crash at any point leaves the
/// old or the new file, whole.
pub(crate) fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // An older file made with a wider mode is narrowed too.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir).and_then(|d| d.sync_all())
}

/// Notes for an allow entry that denies override: naming each deny that wins, wholly or in
/// part (deny wins over allow wherever they overlap).
pub fn shadowing_denies(allow: IpNet, denies: &[IpNet]) -> Vec<String> {
    let mut notes = Vec::new();
    for deny in denies {
        if deny.contains(&allow) {
            notes.push(format!(
                "{allow} stays dropped: the deny of {deny} wins over allow; remove it \
                 (`limiter deny delete {deny}`) for this allow to take effect"
            ));
        } else if allow.contains(deny) {
            notes.push(format!(
                "{deny} inside {allow} stays dropped: its deny wins over allow"
            ));
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn layering_adds_removes_and_expires() {
        let file = Policy {
            allow: vec![net("192.0.2.0/24")],
            deny: vec![net("198.51.100.0/24")],
            ..Policy::default()
        };
        let mut rt = RuntimeState::default();
        rt.add(List::Allow, net("203.0.113.0/24"), None);
        rt.add(List::Deny, net("10.0.0.1/32"), Some(100));
        assert!(rt.remove(List::Allow, net("192.0.2.0/24"), true));
        rt.mode = Some(Mode::Monitor);
        let p = rt.effective(&file, 50);
        assert_eq!(p.allow, vec![net("203.0.113.0/24")]);
        assert_eq!(p.deny, vec![net("198.51.100.0/24"), net("10.0.0.1/32")]);
        assert_eq!(p.mode, Mode::Monitor);
        assert_eq!(
            rt.effective(&file, 100).deny,
            vec![net("198.51.100.0/24")],
            "expired entries stop applying"
        );
        assert!(rt.expire(100));
        assert!(rt.deny.is_empty());
        assert!(!rt.remove(List::Deny, net("10.9.9.9/32"), false));
    }

    #[test]
    fn fleet_entries_are_judged_against_the_hosts_own_lists_only() {
        use crate::fleet::FleetEntry;
        let entry = |prefix: &str| FleetEntry {
            prefix: net(prefix),
            reason: "test".into(),
            author: "ops@edge1".into(),
            created_unix_ms: 0,
            expires_unix: None,
            meant: false,
        };
        let file = Policy {
            allow: vec![net("198.51.100.0/24")],
            ..Policy::default()
        };
        let mut rt = RuntimeState::default();
        // The fleet allows the same prefix the host allows, and denies inside it: the
        // host's own allow still refuses the deny, in force and in what is reported.
        rt.fleet
            .allow
            .insert(net("198.51.100.0/24"), entry("198.51.100.0/24"));
        for prefix in ["198.51.100.0/25", "203.0.113.0/24"] {
            rt.fleet.deny.insert(net(prefix), entry(prefix));
        }
        let local = rt.local(&file, 0);
        assert_eq!(local.allow, file.allow);
        let split = rt.fleet.split(&local.allow, &local.fleet_never_deny, 0);
        assert_eq!(split.refused.len(), 1);
        assert_eq!(split.refused[0].1.prefix, net("198.51.100.0/25"));
        let p = rt.effective(&file, 0);
        assert_eq!(p.deny, vec![net("203.0.113.0/24")]);
        assert_eq!(p.allow, vec![net("198.51.100.0/24")]);
    }

    fn policy_with_class() -> Policy {
        Policy {
            classes: vec![Class {
                name: "mm".into(),
                prefixes: vec![net("203.0.113.0/24")],
                limit: LimitSpec::packets(50, 100),
            }],
            deny: vec![net("192.0.2.0/24")],
            ..Policy::default()
        }
    }

    #[test]
    fn changes_are_methods_with_typed_refusals() {
        let file = policy_with_class();
        let mut rt = RuntimeState::default();
        let name = |s: &str| Name::parse("class", s).unwrap();
        let prefix = |s: &str| s.parse::<Prefix>().unwrap();

        // set_limit patches: bytes set, then packets changed, bytes kept.
        let bytes = LimitChanges {
            bytes: Some(RateChange::Set(Rate::new(1_000, 2_000))),
            ..LimitChanges::default()
        };
        rt.set_limit(&file, &LimitTarget::Class(name("mm")), bytes)
            .unwrap();
        let p = rt.effective(&file, 0);
        let packets = LimitChanges {
            packets: Some(RateChange::Set(Rate::new(7, 14))),
            block_seconds: Some(45),
            ..LimitChanges::default()
        };
        rt.set_limit(&p, &LimitTarget::Class(name("mm")), packets)
            .unwrap();
        let limit = rt.effective(&file, 0).classes[0].limit;
        assert_eq!(limit.packets, Some(Rate::new(7, 14)));
        assert_eq!(limit.bytes, Some(Rate::new(1_000, 2_000)), "kept");
        assert_eq!(limit.block_seconds, Some(45));
        assert_eq!(
            rt.set_limit(&file, &LimitTarget::Class(name("nope")), packets),
            Err(ChangeError::NoClass("nope".into()))
        );
        assert_eq!(
            rt.set_limit(&file, &LimitTarget::Service(name("api")), packets),
            Err(ChangeError::NoService("api".into()))
        );

        // classes
        assert_eq!(
            rt.add_class(
                &file,
                &name("mm"),
                &[prefix("198.51.100.0/24")],
                LimitSpec::unlimited()
            ),
            Err(ChangeError::ClassExists("mm".into()))
        );
        assert_eq!(
            rt.add_class(&file, &name("new"), &[], LimitSpec::unlimited()),
            Err(ChangeError::NoPrefixes)
        );
        rt.remove_class(&file, &file, &name("mm")).unwrap();
        assert!(rt.effective(&file, 0).classes.is_empty());
        assert!(rt.classes_removed.contains("mm"));

        // lists: a shadowed allow is noted, a wide deny needs force, a missing entry is named
        let notes = rt
            .add_entry(&file, List::Allow, prefix("192.0.2.7"), None, false)
            .unwrap();
        assert!(notes[0].contains("192.0.2.0/24"), "{notes:?}");
        assert!(matches!(
            rt.add_entry(&file, List::Deny, prefix("0.0.0.0/0"), None, false),
            Err(ChangeError::Input(_))
        ));
        rt.add_entry(&file, List::Deny, prefix("0.0.0.0/0"), None, true)
            .unwrap();
        assert_eq!(
            rt.remove_entry(&file, List::Allow, prefix("10.0.0.0/8")),
            Err(ChangeError::NotListed {
                prefix: net("10.0.0.0/8"),
                list: "allow"
            })
        );
        rt.remove_entry(&file, List::Deny, prefix("192.0.2.0/24"))
            .unwrap();
        assert!(rt.deny_removed.contains(&net("192.0.2.0/24")));

        // reset keeps the generation and the ids
        rt.generation = 5;
        rt.limit_ids.assign(&file).unwrap();
        let ids = rt.limit_ids.clone();
        rt.reset();
        assert_eq!((rt.generation, &rt.limit_ids), (5, &ids));
        assert_eq!(rt.effective(&file, 0), file);
    }

    #[test]
    fn save_is_atomic_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("limiter-state-test-{}", std::process::id()));
        let mut rt = RuntimeState {
            generation: 7,
            ..RuntimeState::default()
        };
        rt.limits.insert("rest".into(), LimitSpec::packets(5, 10));
        rt.save(&dir).unwrap();
        assert_eq!(RuntimeState::load(&dir).unwrap(), rt);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&RuntimeState::path(&dir)), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert!(!dir.join(".runtime.json.tmp").exists());
        fs::write(
            RuntimeState::path(&dir),
            b"{\"generation\": 1, \"bogus\": 2}",
        )
        .unwrap();
        assert!(
            RuntimeState::load(&dir)
                .unwrap_err()
                .to_string()
                .contains("bogus")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
