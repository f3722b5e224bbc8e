//! Who changed what: every change to the policy in force (a CLI request, a reload, an
//! expiry) is logged and kept in a bounded history in the state directory, which
//! `limiter history` shows.

use std::{
    collections::VecDeque,
    fs::{self, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::runtime::RuntimeState;

/// Entries kept; older ones are dropped.
pub const HISTORY_LEN: usize = 1_000;

/// The history file in the state directory: one JSON entry per line.
pub fn history_path(state_dir: &Path) -> PathBuf {
    state_dir.join("history.jsonl")
}

/// Who or what made a change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Actor {
    /// A control-socket peer.
    Peer {
        /// Its user id.
        uid: u32,
        /// Its process id.
        pid: Option<i32>,
        /// Its command name (`/proc/PID/comm`).
        process: Option<String>,
    },
    /// The daemon's own timer (temporary entries expiring).
    Expiry,
    /// SIGHUP.
    Signal,
    /// The fleet store (etcd), at the revision applied.
    Fleet {
        /// The etcd revision.
        revision: i64,
    },
    /// An attack record of this host, published as a fleet deny.
    Attack {
        /// The attack's id.
        id: u64,
    },
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Peer { uid, pid, process } => {
                write!(f, "uid {uid}")?;
                if let Some(pid) = pid {
                    write!(f, " pid {pid}")?;
                }
                if let Some(process) = process {
                    write!(f, " ({process})")?;
                }
                Ok(())
            }
            Self::Expiry => f.write_str("expiry"),
            Self::Signal => f.write_str("SIGHUP"),
            Self::Fleet { revision } => write!(f, "fleet revision {revision}"),
            Self::Attack { id } => write!(f, "attack {id}"),
        }
    }
}

/// One field of the runtime state, before and after a change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldChange {
    /// The field (`deny`, `default_limit`, `classes`, ...).
    pub field: String,
    /// Its value before.
    pub before: serde_json::Value,
    /// Its value after.
    pub after: serde_json::Value,
}

/// One change, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// When, in Unix seconds.
    pub time_unix: u64,
    /// The config generation it made.
    pub generation: u64,
    /// Who.
    pub actor: Actor,
    /// What was asked (the request, as sent).
    pub request: serde_json::Value,
    /// What changed in the runtime state (empty for a reload that changed only the file).
    pub changes: Vec<FieldChange>,
}

/// The fields of the runtime state that differ between `before` and `after` (the generation
/// excepted: every change moves it).
pub fn diff(before: &RuntimeState, after: &RuntimeState) -> Vec<FieldChange> {
    let as_object = |state: &RuntimeState| match serde_json::to_value(state) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let (before, after) = (as_object(before), as_object(after));
    after
        .iter()
        .filter(|(field, _)| field.as_str() != "generation")
        .filter_map(|(field, value)| {
            let old = before.get(field).cloned().unwrap_or_default();
            (old != *value).then(|| FieldChange {
                field: field.clone(),
                before: old,
                after: value.clone(),
            })
        })
        .collect()
}

/// The bounded history: the latest entries in memory, appended to the file as they come.
#[derive(Debug, Default)]
pub struct History {
    entries: VecDeque<AuditEntry>,
    /// Lines in the file (it is rewritten to the kept entries when it doubles).
    lines: usize,
}

/// Why the history could not be written.
#[derive(Debug, thiserror::Error)]
#[error("history {path}: {source}")]
pub struct HistoryError {
    path: PathBuf,
    source: std::io::Error,
}

impl History {
    /// Reads the history; a missing file is an empty history, unreadable lines are skipped.
    pub fn load(state_dir: &Path) -> Self {
        let text = fs::read_to_string(history_path(state_dir)).unwrap_or_default();
        let mut history = Self::default();
        for line in text.lines() {
            history.lines += 1;
            if let Ok(entry) = serde_json::from_str(line) {
                history.push(entry);
            }
        }
        history
    }

    fn push(&mut self, entry: AuditEntry) {
        self.entries.push_back(entry);
        while self.entries.len() > HISTORY_LEN {
            self.entries.pop_front();
        }
    }

    /// Records a change: kept in memory whatever happens, appended to the file (mode 0600).
    pub fn record(&mut self, state_dir: &Path, entry: AuditEntry) -> Result<(), HistoryError> {
        let path = history_path(state_dir);
        let err = |source| HistoryError {
            path: path.clone(),
            source,
        };
        let line = serde_json::to_string(&entry).expect("audit entries serialize");
        self.push(entry);
        if self.lines >= 2 * HISTORY_LEN {
            // Keep the file bounded: rewrite it with the kept entries, atomically.
            let mut text = String::new();
            for e in &self.entries {
                text.push_str(&serde_json::to_string(e).expect("audit entries serialize"));
                text.push('\n');
            }
            crate::runtime::write_private(state_dir, "history.jsonl", text.as_bytes())
                .map_err(err)?;
            self.lines = self.entries.len();
            return Ok(());
        }
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        file.write_all(format!("{line}\n").as_bytes())
            .map_err(err)?;
        self.lines += 1;
        Ok(())
    }

    /// The latest `n` entries, oldest first.
    pub fn recent(&self, n: usize) -> Vec<AuditEntry> {
        let skip = self.entries.len().saturating_sub(n);
        self.entries.iter().skip(skip).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{policy::LimitSpec, runtime::List};

    fn entry(generation: u64) -> AuditEntry {
        AuditEntry {
            time_unix: 1,
            generation,
            actor: Actor::Expiry,
            request: serde_json::Value::Null,
            changes: Vec::new(),
        }
    }

    #[test]
    fn the_diff_names_the_changed_fields_with_both_values() {
        let before = RuntimeState::default();
        let mut after = before.clone();
        after.generation = 9;
        after.default_limit = Some(LimitSpec::packets(500, 1_000));
        after.add(List::Deny, "192.0.2.0/24".parse().unwrap(), None);
        let changes = diff(&before, &after);
        let fields: Vec<&str> = changes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["default_limit", "deny"]);
        assert_eq!(changes[0].before, serde_json::Value::Null);
        assert_eq!(changes[0].after["packets"]["per_second"], 500);
        assert!(diff(&after, &after).is_empty());
    }

    #[test]
    fn the_history_is_bounded_and_survives_a_reload() {
        let dir = std::env::temp_dir().join(format!("limiter-history-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut history = History::load(&dir);
        for generation in 0..(2 * HISTORY_LEN as u64 + 10) {
            history.record(&dir, entry(generation)).unwrap();
        }
        let recent = history.recent(3);
        assert_eq!(
            recent.iter().map(|e| e.generation).collect::<Vec<_>>(),
            [2_007, 2_008, 2_009]
        );
        let lines = fs::read_to_string(history_path(&dir))
            .unwrap()
            .lines()
            .count();
        assert!(
            lines <= 2 * HISTORY_LEN,
            "the file stays bounded: {lines} lines"
        );
        let reloaded = History::load(&dir);
        assert_eq!(reloaded.recent(HISTORY_LEN).len(), HISTORY_LEN);
        assert_eq!(reloaded.recent(1)[0].generation, 2_009);
        fs::remove_dir_all(&dir).unwrap();
    }
}
