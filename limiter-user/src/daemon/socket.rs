//! The control socket: who may connect and do what, the connection table that keeps it
//! answerable, and the routing of each request to a read view or a change.

use std::{
    os::unix::fs::PermissionsExt as _,
    sync::{Arc, Mutex as SyncMutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Mutex, Notify},
};
use tracing::warn;

use super::{
    Daemon, DaemonError,
    views::{SourceWalk, WalkKind},
};
use crate::{
    audit::Actor,
    config::{ControlSettings, FileConfig},
    control::Connections,
    protocol::{MAX_REQUEST_BYTES, Request, Response},
};

/// What a daemon answers to a request: now, or after a walk of the source tables that the
/// caller runs without holding the daemon.
pub enum Reply {
    /// The answer.
    Done(Response),
    /// Run this, and answer with its result.
    Walk(SourceWalk),
}

/// Carries out one request. Reads that walk the source table come back as a
/// [`SourceWalk`] for the caller to run without holding the daemon: a walk of a full
/// table takes about a second, and changes must not wait behind it.
pub(super) fn route(daemon: &mut Daemon, request: Request, actor: &Actor) -> Reply {
    match request {
        Request::Status {} => Reply::Walk(daemon.walk(WalkKind::Status(daemon.status()))),
        Request::Top {
            n,
            by,
            interval_ms,
            within,
            limit,
        } => match interval_ms {
            Some(ms) if ms == 0 || ms > crate::protocol::MAX_TOP_INTERVAL_MS => {
                Reply::Done(Response::error(format!(
                    "top: the interval must be 1 to {} ms, not {ms}",
                    crate::protocol::MAX_TOP_INTERVAL_MS
                )))
            }
            _ => Reply::Walk(daemon.walk(WalkKind::Top {
                n,
                by,
                interval: interval_ms.map(std::time::Duration::from_millis),
                within,
                limit,
            })),
        },
        Request::BlockList {} => Reply::Walk(daemon.walk(WalkKind::Blocked)),
        Request::LimitShow {} => Reply::Done(Response::ok(daemon.limit_rows())),
        Request::ClassList {} => Reply::Done(Response::ok(daemon.class_rows())),
        Request::ListShow { list } => Reply::Done(Response::ok(daemon.list_rows(list))),
        Request::History { n } => Reply::Done(Response::ok(daemon.history.recent(n))),
        Request::Explain { address } => Reply::Done(match daemon.explain(address) {
            Ok(explanation) => Response::ok(explanation),
            Err(e) => Response::error(e),
        }),
        Request::Attacks { id } => Reply::Done(match daemon.attack_records(id) {
            Ok(records) => Response::ok(records),
            Err(e) => Response::error(e),
        }),
        Request::RuntimeShow {} => Reply::Done(Response::ok(&daemon.runtime)),
        change => {
            let asked = serde_json::to_value(&change).unwrap_or_default();
            Reply::Done(match daemon.dispatch(change, actor, asked.clone()) {
                Ok(response) => response,
                Err(e) => {
                    warn!(%actor, request = %asked, "change refused: {e}");
                    Response::error(e)
                }
            })
        }
    }
}

/// Whether a peer may read, and whether it may change.
fn peer_rights(cred: &tokio::net::unix::UCred, control: &ControlSettings) -> (bool, bool) {
    if cred.uid() == 0 {
        return (true, true);
    }
    let groups = peer_groups(cred);
    let member = |name: &Option<String>| {
        name.as_ref()
            .and_then(|n| nix::unistd::Group::from_name(n).ok().flatten())
            .is_some_and(|g| groups.contains(&g.gid.as_raw()))
    };
    let admin = member(&control.admin_group);
    (admin || member(&control.group), admin)
}

/// The peer's primary and supplementary groups.
fn peer_groups(cred: &tokio::net::unix::UCred) -> Vec<u32> {
    let mut groups = vec![cred.gid()];
    if let Some(pid) = cred.pid()
        && let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
        && let Some(line) = status.lines().find(|l| l.starts_with("Groups:"))
    {
        groups.extend(
            line["Groups:".len()..]
                .split_whitespace()
                .filter_map(|g| g.parse::<u32>().ok()),
        );
    }
    groups
}

/// The group the control socket belongs to: `group` (readers) if set, else `admin_group`.
/// A socket file has one group, so when both are set every admin must also be a reader, or
/// the admins outside `group` could not connect at all: that configuration is refused.
fn socket_group(control: &ControlSettings) -> Result<Option<nix::unistd::Group>, DaemonError> {
    let lookup = |name: &str| nix::unistd::Group::from_name(name).ok().flatten();
    let readers = control.group.as_deref().and_then(lookup);
    let admins = control.admin_group.as_deref().and_then(lookup);
    match (readers, admins) {
        (Some(readers), Some(admins)) if readers.gid != admins.gid => {
            let outside = admins_outside_readers(&admins, &readers, &primary_groups());
            if outside.is_empty() {
                Ok(Some(readers))
            } else {
                Err(DaemonError::ControlGroups(format!(
                    "members of admin_group {:?} who are not in group {:?} could not connect \
                     to the socket (it belongs to {:?}): {}. Add them to {:?}, or set group \
                     to {:?}",
                    admins.name,
                    readers.name,
                    readers.name,
                    outside.join(", "),
                    readers.name,
                    admins.name
                )))
            }
        }
        (Some(readers), _) => Ok(Some(readers)),
        (None, admins) => Ok(admins),
    }
}

/// Users in `admins` (listed, or by primary group in `primary`) who are not in `readers`.
fn admins_outside_readers(
    admins: &nix::unistd::Group,
    readers: &nix::unistd::Group,
    primary: &[(String, u32)],
) -> Vec<String> {
    let in_readers = |user: &str| {
        readers.mem.iter().any(|m| m == user)
            || primary
                .iter()
                .any(|(name, gid)| name == user && *gid == readers.gid.as_raw())
    };
    let mut names: Vec<String> = admins.mem.clone();
    names.extend(
        primary
            .iter()
            .filter(|(_, gid)| *gid == admins.gid.as_raw())
            .map(|(name, _)| name.clone()),
    );
    names.sort();
    names.dedup();
    names.retain(|n| !in_readers(n));
    names
}

/// Every user with its primary group id, from the user database (`/etc/passwd`).
fn primary_groups() -> Vec<(String, u32)> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            Some((fields.first()?.to_string(), fields.get(3)?.parse().ok()?))
        })
        .collect()
}

/// One control connection: its request, read within a deadline, carried out, answered.
pub(super) async fn serve_connection(
    stream: UnixStream,
    id: u64,
    mut shed: tokio::sync::oneshot::Receiver<()>,
    connections: Arc<SyncMutex<Connections>>,
    daemon: Arc<Mutex<Daemon>>,
    shutdown: Arc<Notify>,
) {
    let cred = stream.peer_cred();
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = Vec::new();
    let read = tokio::select! {
        read = tokio::time::timeout(Duration::from_secs(5), reader.read_until(b'\n', &mut line)) => read,
        _ = &mut shed => {
            // Shed for a newer connection: close without an answer.
            finish(&connections, id, false);
            return;
        }
    };
    let started = connections
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .start_request(id);
    if !started {
        finish(&connections, id, false);
        return;
    }
    let response = match read {
        Err(_) => Response::error("timed out waiting for the request"),
        Ok(Err(e)) => Response::error(format!("reading the request: {e}")),
        Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => {
            Response::error(format!("request larger than {MAX_REQUEST_BYTES} bytes"))
        }
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Err(e) => Response::error(format!("malformed request: {e}")),
            Ok(request) => carry_out(request, cred.ok(), &daemon, &shutdown).await,
        },
    };
    let mut bytes = serde_json::to_vec(&response).expect("responses serialize");
    bytes.push(b'\n');
    let _ = write.write_all(&bytes).await;
    let _ = write.shutdown().await;
    finish(&connections, id, true);
}

fn finish(connections: &SyncMutex<Connections>, id: u64, had_request: bool) {
    connections
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .finish(id, had_request);
}

/// Checks the peer's rights and carries out the request; walks run without the daemon lock.
async fn carry_out(
    request: Request,
    cred: Option<tokio::net::unix::UCred>,
    daemon: &Mutex<Daemon>,
    shutdown: &Notify,
) -> Response {
    let Some(cred) = cred else {
        return Response::error("permission denied: the peer's credentials are unknown");
    };
    let actor = Actor::Peer {
        uid: cred.uid(),
        pid: cred.pid(),
        process: cred.pid().and_then(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|s| s.trim().to_owned())
        }),
    };
    let reply = {
        let mut daemon = daemon.lock().await;
        let (may_read, may_change) = peer_rights(&cred, &daemon.file.control);
        if !may_read || (request.is_change() && !may_change) {
            let asked = serde_json::to_string(&request).unwrap_or_default();
            warn!(%actor, request = %asked, "request refused: not permitted");
            return Response::error(
                "permission denied: changes need root (or the admin group), reads the limiter group",
            );
        }
        let detaching = matches!(request, Request::Detach { .. });
        let reply = route(&mut daemon, request, &actor);
        if detaching && daemon.instances.is_empty() {
            shutdown.notify_one();
        }
        reply
    };
    match reply {
        Reply::Done(response) => response,
        Reply::Walk(walk) => tokio::task::spawn_blocking(move || walk.run())
            .await
            .unwrap_or_else(|e| Response::error(format!("reading the source table: {e}"))),
    }
}

pub(super) fn bind_socket(file: &FileConfig) -> Result<UnixListener, DaemonError> {
    let path = &file.control.socket;
    let io = |what: String| move |source| DaemonError::Io { what, source };
    let group = socket_group(&file.control)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    }
    if let Ok(stream) = std::os::unix::net::UnixStream::connect(path) {
        drop(stream);
        return Err(DaemonError::Io {
            what: format!("control socket {}", path.display()),
            source: std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another daemon is serving it",
            ),
        });
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(io(format!("bind {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io(format!("chmod {}", path.display())))?;
    if let Some(group) = group {
        nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), Some(group.gid)).map_err(
            |e| DaemonError::Io {
                what: format!("chown {}", path.display()),
                source: e.into(),
            },
        )?;
    } else if let Some(name) = file
        .control
        .group
        .as_ref()
        .or(file.control.admin_group.as_ref())
    {
        warn!(group = %name, "control socket group does not exist; the socket stays root-only");
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, gid: u32, members: &[&str]) -> nix::unistd::Group {
        nix::unistd::Group {
            name: name.into(),
            passwd: std::ffi::CString::default(),
            gid: nix::unistd::Gid::from_raw(gid),
            mem: members.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    #[test]
    fn admins_outside_the_read_group_are_named() {
        let readers = group("limiter", 100, &["alice", "bob"]);
        let admins = group("limiter-admin", 101, &["alice", "carol"]);
        // dave's primary group is the admin group; erin's is the read group.
        let primary = [("dave".to_owned(), 101), ("erin".to_owned(), 100)];
        assert_eq!(
            admins_outside_readers(&admins, &readers, &primary),
            ["carol", "dave"]
        );
        let all_in = group("limiter-admin", 101, &["alice", "erin"]);
        let erin = [("erin".to_owned(), 100)];
        assert!(admins_outside_readers(&all_in, &readers, &erin).is_empty());
    }
}
