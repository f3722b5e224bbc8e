//! The daemon: loads and attaches one program per interface (adopting pins left by an earlier
//! run), applies the policy, and serves the control socket. SIGTERM and SIGINT stop the
//! daemon and leave the programs attached; SIGHUP re-reads the config.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::programs::xdp::XdpMode;
use ipnet::IpNet;
use limiter_common::{
    layout::{Config, SourceEvent, SourceKey, SourceState, Stat},
    prefix::{
        FAMILY_IPV4, FAMILY_IPV6, apply_mask, bytes_from_words, mask_words, words_from_bytes,
    },
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{Mutex, Notify},
};
use tracing::{error, info, warn};

use crate::{
    config::{AttachMode, FileConfig, load_file},
    limiter::{Attached, Limiter, LoadOptions, monotonic_ns, pinned_ifindex, remove_pins},
    policy::{CompiledPolicy, LimitSpec, Policy},
    protocol::{
        InterfaceStatus, LimitRow, LimitTarget, ListRow, MAX_REQUEST_BYTES, Request, Response,
        SourceRow, Status, TopBy,
    },
    runtime::{List, RuntimeClass, RuntimeState},
};

/// The pin layout version: a layout change gets a new directory instead of misreading pins.
pub const PIN_LAYOUT: &str = "v1";

/// Daemon settings given on the command line; each overrides the config file.
#[derive(Clone, Debug, Default)]
pub struct DaemonOptions {
    /// The config file; defaults apply without one.
    pub config: Option<PathBuf>,
    /// Interfaces to attach to.
    pub interfaces: Vec<String>,
    /// Attach mode.
    pub mode: Option<AttachMode>,
    /// Control socket.
    pub socket: Option<PathBuf>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Pin directory.
    pub pin_dir: Option<PathBuf>,
    /// Metrics listen address.
    pub metrics: Option<SocketAddr>,
}

/// Why the daemon could not start or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config file is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The runtime state could not be read or written.
    #[error(transparent)]
    State(#[from] crate::runtime::StateError),
    /// The policy (file plus runtime changes) does not compile.
    #[error("policy: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    /// The data plane failed.
    #[error("{iface}: {source}")]
    Limiter {
        /// The interface.
        iface: String,
        /// Why.
        source: Box<crate::limiter::Error>,
    },
    /// No interface to attach to.
    #[error("no interface to attach to: pass --iface or set `interfaces` in the config file")]
    NoInterface,
    /// An interface does not exist.
    #[error("interface {0} does not exist")]
    NoSuchInterface(String),
    /// A socket or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

/// One attached interface.
pub struct Instance {
    /// Its program and maps.
    pub limiter: Limiter,
    /// How it is attached.
    pub mode: &'static str,
}

/// Recent source events, for logs and `top`.
#[derive(Default)]
pub struct EventLog {
    /// The latest events, newest last.
    pub recent: VecDeque<(String, SourceEvent)>,
    /// "Over its limit" events read.
    pub limited: u64,
    /// "Entered the penalty box" events read.
    pub penalty_box: u64,
}

/// Everything the daemon holds.
pub struct Daemon {
    /// The config file as last loaded.
    pub file: FileConfig,
    /// Command-line settings.
    pub options: DaemonOptions,
    /// Runtime changes.
    pub runtime: RuntimeState,
    /// The policy in force.
    pub policy: Policy,
    /// Its compiled form.
    pub compiled: CompiledPolicy,
    /// Attached interfaces.
    pub instances: BTreeMap<String, Instance>,
    /// Whether the last reload succeeded.
    pub last_reload_ok: bool,
    /// When the config was last (re)loaded, Unix seconds.
    pub last_reload_unix: u64,
    /// Recent source events.
    pub events: EventLog,
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ifindex(iface: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(iface).ok()
}

fn xdp_modes(mode: AttachMode) -> &'static [XdpMode] {
    match mode {
        AttachMode::Native => &[XdpMode::Driver],
        AttachMode::Generic => &[XdpMode::Skb],
        AttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
    }
}

impl Daemon {
    /// Loads the config and runtime state, and attaches to every interface.
    pub fn start(options: DaemonOptions) -> Result<Self, DaemonError> {
        let mut file = match &options.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        apply_overrides(&mut file, &options);
        if file.interfaces.is_empty() {
            return Err(DaemonError::NoInterface);
        }
        let runtime = RuntimeState::load(&file.state_dir)?;
        let policy = runtime.effective(&file.policy, now_unix());
        let compiled = policy.compile()?;
        let mut instances = BTreeMap::new();
        for iface in &file.interfaces {
            let instance = attach_interface(&file, iface, &compiled)?;
            instances.insert(iface.to_string(), instance);
        }
        Ok(Self {
            file,
            options,
            runtime,
            policy,
            compiled,
            instances,
            last_reload_ok: true,
            last_reload_unix: now_unix(),
            events: EventLog::default(),
        })
    }

    fn apply_all(&mut self, compiled: &CompiledPolicy) -> Result<(), DaemonError> {
        for (iface, instance) in &mut self.instances {
            instance
                .limiter
                .apply(compiled)
                .map_err(|source| DaemonError::Limiter {
                    iface: iface.clone(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// Validates, persists and applies a new runtime state. On any failure the running
    /// policy stays exactly as it was.
    pub fn commit(&mut self, mut runtime: RuntimeState) -> Result<(), DaemonError> {
        runtime.generation = self.runtime.generation + 1;
        let policy = runtime.effective(&self.file.policy, now_unix());
        let compiled = policy.compile()?;
        runtime.save(&self.file.state_dir)?;
        if let Err(e) = self.apply_all(&compiled) {
            // Put the previous policy back in the maps and on disk.
            let previous = self.compiled.clone();
            if let Err(again) = self.apply_all(&previous) {
                error!("restoring the previous policy failed too: {again}");
            }
            if let Err(again) = self.runtime.save(&self.file.state_dir) {
                error!("restoring the previous runtime state failed: {again}");
            }
            return Err(e);
        }
        self.runtime = runtime;
        self.policy = policy;
        self.compiled = compiled;
        Ok(())
    }

    /// Re-reads the config file; on error the running policy is kept.
    pub fn reload(&mut self) -> Result<(), DaemonError> {
        let result = (|| {
            let Some(path) = self.options.config.clone() else {
                return Ok(());
            };
            let mut file = load_file(&path)?;
            apply_overrides(&mut file, &self.options);
            if file.interfaces != self.file.interfaces {
                warn!(
                    "interfaces changed in the config file; restart the daemon to attach or detach"
                );
                file.interfaces = self.file.interfaces.clone();
            }
            let previous = std::mem::replace(&mut self.file, file);
            let runtime = self.runtime.clone();
            if let Err(e) = self.commit(runtime) {
                self.file = previous;
                return Err(e);
            }
            Ok(())
        })();
        self.last_reload_ok = result.is_ok();
        self.last_reload_unix = now_unix();
        match &result {
            Ok(()) => info!(
                generation = self.runtime.generation,
                "configuration reloaded"
            ),
            Err(e) => error!("reload failed, the running policy is unchanged: {e}"),
        }
        result
    }

    /// Drops expired list entries; true when any did.
    fn expire(&mut self) -> Result<bool, DaemonError> {
        let mut runtime = self.runtime.clone();
        if !runtime.expire(now_unix()) {
            return Ok(false);
        }
        self.commit(runtime)?;
        Ok(true)
    }

    /// Carries out one request.
    pub fn handle(&mut self, request: Request) -> Response {
        match self.dispatch(request) {
            Ok(response) => response,
            Err(e) => Response::error(e),
        }
    }

    fn dispatch(&mut self, request: Request) -> Result<Response, String> {
        let text = |e: DaemonError| e.to_string();
        match request {
            Request::Status {} => Ok(Response::ok(self.status())),
            Request::LimitShow {} => Ok(Response::ok(self.limit_rows())),
            Request::LimitSet {
                target,
                packets,
                bytes,
                aggregate,
            } => {
                let current = match &target {
                    LimitTarget::Default => Some(self.policy.default_limit),
                    LimitTarget::Class(name) => self
                        .policy
                        .classes
                        .iter()
                        .find(|c| &c.name == name)
                        .map(|c| c.limit),
                    LimitTarget::Service(name) => self
                        .policy
                        .services
                        .iter()
                        .find(|s| &s.name == name)
                        .map(|s| s.limit),
                };
                let limit = LimitSpec {
                    packets,
                    bytes,
                    aggregate: aggregate.or(current.and_then(|c| c.aggregate)),
                };
                let mut runtime = self.runtime.clone();
                match target {
                    LimitTarget::Default => runtime.default_limit = Some(limit),
                    LimitTarget::Class(name) => {
                        if !self.policy.classes.iter().any(|c| c.name == name) {
                            return Err(format!("no class named {name:?}"));
                        }
                        if let Some(class) = runtime.classes.get_mut(&name) {
                            class.limit = limit;
                        } else {
                            runtime.limits.insert(name, limit);
                        }
                    }
                    LimitTarget::Service(name) => {
                        if !self.policy.services.iter().any(|s| s.name == name) {
                            return Err(format!("no service rule named {name:?}"));
                        }
                        runtime.limits.insert(name, limit);
                    }
                }
                self.commit(runtime).map_err(text)?;
                Ok(Response::ok(self.runtime.generation))
            }
            Request::ClassAdd {
                name,
                prefixes,
                limit,
            } => {
                if self.policy.classes.iter().any(|c| c.name == name) {
                    return Err(format!(
                        "class {name:?} exists; delete it first or use `limit set --class`"
                    ));
                }
                if prefixes.is_empty() {
                    return Err("a class needs at least one prefix".into());
                }
                let mut runtime = self.runtime.clone();
                runtime.classes_removed.remove(&name);
                runtime
                    .classes
                    .insert(name, RuntimeClass { prefixes, limit });
                self.commit(runtime).map_err(text)?;
                Ok(Response::ok(self.runtime.generation))
            }
            Request::ClassDel { name } => {
                if !self.policy.classes.iter().any(|c| c.name == name) {
                    return Err(format!("no class named {name:?}"));
                }
                let mut runtime = self.runtime.clone();
                runtime.classes.remove(&name);
                runtime.limits.remove(&name);
                if self.file.policy.classes.iter().any(|c| c.name == name) {
                    runtime.classes_removed.insert(name);
                }
                self.commit(runtime).map_err(text)?;
                Ok(Response::ok(self.runtime.generation))
            }
            Request::ClassList {} => Ok(Response::ok(
                self.limit_rows()
                    .into_iter()
                    .filter(|r| r.kind == "class")
                    .collect::<Vec<_>>(),
            )),
            Request::ListAdd {
                list,
                prefix,
                ttl_seconds,
            } => {
                let mut runtime = self.runtime.clone();
                runtime.add(list, prefix, ttl_seconds.map(|t| now_unix() + t));
                self.commit(runtime).map_err(text)?;
                Ok(Response::ok(self.runtime.generation))
            }
            Request::ListDel { list, prefix } => {
                let file_list = match list {
                    List::Allow => &self.file.policy.allow,
                    List::Deny => &self.file.policy.deny,
                };
                let in_file = file_list.iter().any(|p| p.trunc() == prefix.trunc());
                let mut runtime = self.runtime.clone();
                if !runtime.remove(list, prefix, in_file) {
                    return Err(format!("{prefix} is not in the {list:?} list").to_lowercase());
                }
                self.commit(runtime).map_err(text)?;
                Ok(Response::ok(self.runtime.generation))
            }
            Request::ListShow { list } => Ok(Response::ok(self.list_rows(list))),
            Request::BlockList {} => Ok(Response::ok(self.sources(usize::MAX, TopBy::Drops, true))),
            Request::BlockAdd { address, seconds } => {
                self.block(address, Some(seconds)).map_err(text)?;
                Ok(Response::ok(()))
            }
            Request::BlockDel { address } => {
                self.block(address, None).map_err(text)?;
                Ok(Response::ok(()))
            }
            Request::Top { n, by } => Ok(Response::ok(self.sources(n, by, false))),
            Request::Mode { mode } => {
                let mut runtime = self.runtime.clone();
                runtime.mode = Some(mode);
                self.commit(runtime).map_err(text)?;
                Ok(Response::ok(self.runtime.generation))
            }
            Request::Reload {} => {
                self.reload().map_err(text)?;
                Ok(Response::ok(self.runtime.generation))
            }
            Request::Detach { iface } => {
                let names: Vec<String> = match iface {
                    Some(name) if self.instances.contains_key(&name) => vec![name],
                    Some(name) => return Err(format!("not attached to {name}")),
                    None => self.instances.keys().cloned().collect(),
                };
                for name in &names {
                    if let Some(instance) = self.instances.remove(name) {
                        instance
                            .limiter
                            .detach_and_unpin()
                            .map_err(|e| format!("{name}: {e}"))?;
                        info!(interface = %name, "detached and unpinned");
                    }
                }
                Ok(Response::ok(names))
            }
        }
    }

    /// The status report.
    pub fn status(&self) -> Status {
        let interfaces = self
            .instances
            .iter()
            .map(|(name, instance)| {
                let stats = instance.limiter.stats().unwrap_or_default();
                let sum = |pred: &dyn Fn(&Stat) -> bool| {
                    Stat::ALL
                        .iter()
                        .filter(|s| s.is_verdict() && pred(s))
                        .map(|s| stats.packets(*s))
                        .sum()
                };
                InterfaceStatus {
                    name: name.clone(),
                    attach_mode: instance.mode.to_owned(),
                    program_id: instance.limiter.program_id(),
                    passed: sum(&|s| !s.drops() && *s != Stat::MonitorWouldDrop),
                    dropped: sum(&|s| s.drops()),
                    would_drop: stats.packets(Stat::MonitorWouldDrop),
                    tracked_sources: instance.limiter.sources().map_or(0, |s| s.len() as u64),
                }
            })
            .collect();
        Status {
            mode: self.policy.mode,
            generation: self.runtime.generation,
            config_file: self
                .options
                .config
                .as_ref()
                .map(|p| p.display().to_string()),
            last_reload_ok: self.last_reload_ok,
            interfaces,
        }
    }

    fn limit_rows(&self) -> Vec<LimitRow> {
        let mut rows = vec![LimitRow {
            kind: "default".into(),
            name: "default".into(),
            matches: "everything else".into(),
            limit: self.policy.default_limit,
        }];
        for class in &self.policy.classes {
            let matches = class
                .prefixes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            rows.push(LimitRow {
                kind: "class".into(),
                name: class.name.clone(),
                matches,
                limit: class.limit,
            });
        }
        for service in &self.policy.services {
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
            });
        }
        rows
    }

    fn list_rows(&self, list: List) -> Vec<ListRow> {
        let (file, added) = match list {
            List::Allow => (&self.file.policy.allow, &self.runtime.allow),
            List::Deny => (&self.file.policy.deny, &self.runtime.deny),
        };
        let effective = match list {
            List::Allow => &self.policy.allow,
            List::Deny => &self.policy.deny,
        };
        let now = now_unix();
        effective
            .iter()
            .map(|prefix| {
                let runtime = added.iter().find(|e| e.prefix == prefix.trunc());
                ListRow {
                    prefix: *prefix,
                    origin: if runtime.is_some() || !file.contains(prefix) {
                        "runtime"
                    } else {
                        "config"
                    }
                    .into(),
                    expires_in_seconds: runtime
                        .and_then(|e| e.expires_at)
                        .map(|t| t.saturating_sub(now)),
                }
            })
            .collect()
    }

    fn limit_name(&self, limit_id: u16) -> String {
        self.compiled
            .limit_names
            .get(usize::from(limit_id))
            .cloned()
            .unwrap_or_else(|| limit_id.to_string())
    }

    /// Tracked sources, worst first; `blocked_only` keeps those in the penalty box.
    pub fn sources(&self, n: usize, by: TopBy, blocked_only: bool) -> Vec<SourceRow> {
        let now = monotonic_ns();
        let mut rows: Vec<SourceRow> = Vec::new();
        for (iface, instance) in &self.instances {
            for (key, state) in instance.limiter.sources().unwrap_or_default() {
                if blocked_only && state.blocked_until_ns <= now {
                    continue;
                }
                rows.push(SourceRow {
                    interface: iface.clone(),
                    prefix: key_prefix(&key),
                    limit: self.limit_name(key.limit_id),
                    passed: state.passed,
                    dropped: state.dropped,
                    bytes: state.bytes,
                    blocked_for_seconds: state
                        .blocked_until_ns
                        .saturating_sub(now)
                        .div_ceil(1_000_000_000),
                });
            }
        }
        rows.sort_by_key(|r| {
            std::cmp::Reverse(match by {
                TopBy::Drops => (r.dropped, r.passed),
                TopBy::Packets => (r.passed + r.dropped, r.dropped),
                TopBy::Bytes => (r.bytes, r.dropped),
            })
        });
        rows.truncate(n);
        rows
    }

    /// Puts `address` into the penalty box for `seconds` (or takes it out, with `None`) on
    /// every interface, under the limit its class gives it.
    fn block(&mut self, address: IpAddr, seconds: Option<u64>) -> Result<(), DaemonError> {
        let config = &self.compiled.config;
        let (family, words, prefix_len) = match address {
            IpAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&a.octets());
                (FAMILY_IPV4, words_from_bytes(b), config.source_prefix_v4)
            }
            IpAddr::V6(a) => (
                FAMILY_IPV6,
                words_from_bytes(a.octets()),
                config.source_prefix_v6,
            ),
        };
        let addr = apply_mask(&words, &mask_words(prefix_len));
        let limit_id = self
            .policy
            .classes
            .iter()
            .position(|c| c.prefixes.iter().any(|p| p.contains(&address)))
            .map_or(0, |i| (i + 1) as u16);
        let until = seconds.map_or(0, |s| monotonic_ns() + s.saturating_mul(1_000_000_000));
        for (iface, instance) in &mut self.instances {
            let limiter = &mut instance.limiter;
            let err = |source| DaemonError::Limiter {
                iface: iface.clone(),
                source: Box::new(source),
            };
            let matching: Vec<(SourceKey, SourceState)> = limiter
                .sources()
                .map_err(err)?
                .into_iter()
                .filter(|(k, _)| k.family == family && k.addr == addr)
                .collect();
            if matching.is_empty() && seconds.is_some() {
                let key = SourceKey {
                    addr,
                    limit_id,
                    family,
                    prefix_len,
                };
                let state = SourceState {
                    blocked_until_ns: until,
                    ..SourceState::default()
                };
                limiter.set_source(&key, &state).map_err(err)?;
            }
            for (key, mut state) in matching {
                state.blocked_until_ns = until;
                limiter.set_source(&key, &state).map_err(err)?;
            }
        }
        Ok(())
    }
}

/// The prefix a source key stands for.
pub fn key_prefix(key: &SourceKey) -> IpNet {
    let bytes = bytes_from_words(&key.addr);
    let addr = if key.family == FAMILY_IPV4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(bytes)
    };
    IpNet::new(addr, key.prefix_len).unwrap_or_else(|_| IpNet::from(addr))
}

fn apply_overrides(file: &mut FileConfig, options: &DaemonOptions) {
    if !options.interfaces.is_empty() {
        file.interfaces = options.interfaces.clone();
    }
    if let Some(mode) = options.mode {
        file.attach_mode = mode;
    }
    if let Some(socket) = &options.socket {
        file.control.socket = socket.clone();
    }
    if let Some(dir) = &options.state_dir {
        file.state_dir = dir.clone();
    }
    if let Some(dir) = &options.pin_dir {
        file.pin_dir = dir.clone();
    }
    if let Some(addr) = options.metrics {
        file.metrics.listen = addr;
    }
}

/// Loads (or adopts) the program on one interface and applies the policy.
fn attach_interface(
    file: &FileConfig,
    iface: &str,
    compiled: &CompiledPolicy,
) -> Result<Instance, DaemonError> {
    let index = ifindex(iface).ok_or_else(|| DaemonError::NoSuchInterface(iface.to_owned()))?;
    let dir = file.pin_dir.join(PIN_LAYOUT).join(iface);
    let err = |source| DaemonError::Limiter {
        iface: iface.to_owned(),
        source: Box::new(source),
    };
    if dir.exists() {
        match pinned_ifindex(&dir) {
            Some(pinned) if pinned == index && dir.join("link").exists() => {
                info!(
                    interface = iface,
                    "adopting the pinned program, maps and link"
                );
            }
            pinned => {
                warn!(
                    interface = iface,
                    pinned_ifindex = pinned,
                    ifindex = index,
                    "stale pins (the interface was deleted or recreated); replacing them"
                );
                remove_pins(&dir).map_err(err)?;
            }
        }
    }
    let options = LoadOptions {
        max_sources: Some(file.capacity.sources),
        max_aggregates: Some(file.capacity.aggregates),
        pin_dir: Some(dir.clone()),
    };
    let mut limiter = Limiter::load(&options).map_err(err)?;
    // The policy goes in before the program meets traffic on a new link.
    limiter.apply(compiled).map_err(err)?;
    let attached = limiter
        .attach_pinned(iface, index, xdp_modes(file.attach_mode))
        .map_err(err)?;
    // Record the interface index and attach mode in the pinned config.
    limiter.apply(compiled).map_err(err)?;
    let mode = if limiter.attach_mode() == Config::ATTACH_GENERIC {
        "generic"
    } else {
        "native"
    };
    match attached {
        Attached::New(_) => info!(interface = iface, mode, "attached"),
        Attached::Adopted => info!(
            interface = iface,
            mode, "replaced the program on the pinned link"
        ),
    }
    Ok(Instance { limiter, mode })
}

/// Whether a peer may read, and whether it may change.
fn peer_rights(cred: &tokio::net::unix::UCred, file: &FileConfig) -> (bool, bool) {
    if cred.uid() == 0 {
        return (true, true);
    }
    let groups = peer_groups(cred);
    let member = |name: &Option<String>| {
        name.as_ref()
            .and_then(|n| nix::unistd::Group::from_name(n).ok().flatten())
            .is_some_and(|g| groups.contains(&g.gid.as_raw()))
    };
    let admin = member(&file.control.admin_group);
    (admin || member(&file.control.group), admin)
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

async fn serve_connection(stream: UnixStream, daemon: Arc<Mutex<Daemon>>, shutdown: Arc<Notify>) {
    let cred = stream.peer_cred();
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = Vec::new();
    let response = match tokio::time::timeout(
        Duration::from_secs(5),
        reader.read_until(b'\n', &mut line),
    )
    .await
    {
        Err(_) => Response::error("timed out waiting for the request"),
        Ok(Err(e)) => Response::error(format!("reading the request: {e}")),
        Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => {
            Response::error(format!("request larger than {MAX_REQUEST_BYTES} bytes"))
        }
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Err(e) => Response::error(format!("malformed request: {e}")),
            Ok(request) => {
                let mut daemon = daemon.lock().await;
                let (may_read, may_change) = match &cred {
                    Ok(c) => peer_rights(c, &daemon.file),
                    Err(_) => (false, false),
                };
                if !may_read || (request.is_change() && !may_change) {
                    warn!(peer = ?cred.as_ref().ok(), ?request, "request refused: not permitted");
                    Response::error(
                        "permission denied: changes need root (or the admin group), reads the limiter group",
                    )
                } else {
                    let detaching = matches!(request, Request::Detach { .. });
                    let response = daemon.handle(request);
                    if detaching && daemon.instances.is_empty() {
                        shutdown.notify_one();
                    }
                    response
                }
            }
        },
    };
    let mut bytes = serde_json::to_vec(&response).expect("responses serialize");
    bytes.push(b'\n');
    let _ = write.write_all(&bytes).await;
    let _ = write.shutdown().await;
}

fn bind_socket(file: &FileConfig) -> Result<UnixListener, DaemonError> {
    let path = &file.control.socket;
    let io = |what: String| move |source| DaemonError::Io { what, source };
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
    let group = file
        .control
        .group
        .as_ref()
        .and_then(|n| nix::unistd::Group::from_name(n).ok().flatten())
        .map(|g| g.gid);
    if let Some(group) = group {
        nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), Some(group)).map_err(
            |e| DaemonError::Io {
                what: format!("chown {}", path.display()),
                source: e.into(),
            },
        )?;
    } else if let Some(name) = &file.control.group {
        warn!(group = %name, "control socket group does not exist; the socket stays root-only");
    }
    Ok(listener)
}

/// Logs at most this many source events per second; the rest are counted.
const EVENT_LOGS_PER_SECOND: u32 = 5;

async fn read_events(
    iface: String,
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    daemon: Arc<Mutex<Daemon>>,
) {
    // SAFETY: the ring buffer owns its fd and keeps it open, unchanged, for its lifetime,
    // which the AsyncFd now owns.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            error!(interface = %iface, "cannot watch the event ring buffer: {e}");
            return;
        }
    };
    let mut window = tokio::time::Instant::now();
    let (mut logged, mut suppressed) = (0u32, 0u64);
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<SourceEvent>() {
                // SAFETY: the program writes whole `SourceEvent`s, and the length was checked.
                batch
                    .push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<SourceEvent>()) });
            }
        }
        guard.clear_ready();
        let now = tokio::time::Instant::now();
        if now.duration_since(window) >= Duration::from_secs(1) {
            if suppressed > 0 {
                info!(interface = %iface, suppressed, "source events not logged (rate limit)");
            }
            window = now;
            logged = 0;
            suppressed = 0;
        }
        let mut d = daemon.lock().await;
        for event in batch {
            let prefix = key_prefix(&event.key);
            let limit = d.limit_name(event.key.limit_id);
            let reason = Stat::ALL
                .get(event.reason as usize)
                .map_or("unknown", |s| s.label());
            if logged < EVENT_LOGS_PER_SECOND {
                logged += 1;
                let what = if event.kind == limiter_common::layout::EventKind::PenaltyBox as u32 {
                    "source entered the penalty box"
                } else {
                    "source over its limit"
                };
                warn!(interface = %iface, source = %prefix, %limit, reason, passed = event.passed, dropped = event.dropped, "{what}");
            } else {
                suppressed += 1;
            }
            if event.kind == limiter_common::layout::EventKind::PenaltyBox as u32 {
                d.events.penalty_box += 1;
            } else {
                d.events.limited += 1;
            }
            d.events.recent.push_back((iface.clone(), event));
            if d.events.recent.len() > 1024 {
                d.events.recent.pop_front();
            }
        }
    }
}

async fn flush_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its buffer's fd and keeps it open, unchanged, for its
    // lifetime, which the AsyncFd now owns.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Runs the daemon until SIGTERM or SIGINT (or a detach of every interface).
pub async fn run(options: DaemonOptions) -> Result<(), DaemonError> {
    let mut daemon = Daemon::start(options)?;
    let listener = bind_socket(&daemon.file)?;
    let socket_path = daemon.file.control.socket.clone();
    let mut background = Vec::new();
    let mut rings = Vec::new();
    for (iface, instance) in &mut daemon.instances {
        if let Some(logger) = instance.limiter.take_logger() {
            background.push(tokio::spawn(flush_logs(logger)));
        }
        if let Some(ring) = instance.limiter.take_events() {
            rings.push((iface.clone(), ring));
        }
    }
    info!(
        interfaces = ?daemon.instances.keys().collect::<Vec<_>>(),
        socket = %socket_path.display(),
        generation = daemon.runtime.generation,
        "limiter running"
    );
    let metrics_addr = daemon.file.metrics.listen;
    let bpf_stats = daemon.file.metrics.bpf_stats;
    let pin_dirs: Vec<(String, PathBuf)> = daemon
        .instances
        .keys()
        .map(|iface| {
            (
                iface.clone(),
                daemon.file.pin_dir.join(PIN_LAYOUT).join(iface),
            )
        })
        .collect();
    let daemon = Arc::new(Mutex::new(daemon));
    for (iface, ring) in rings {
        background.push(tokio::spawn(read_events(iface, ring, daemon.clone())));
    }
    let bpf_stats_fd = if bpf_stats {
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!("kernel BPF statistics unavailable: {e}");
                None
            }
        }
    } else {
        None
    };
    background.push(tokio::spawn({
        let daemon = daemon.clone();
        async move {
            if let Err(e) = crate::metrics::serve(metrics_addr, daemon, pin_dirs, bpf_stats).await {
                error!(listen = %metrics_addr, "metrics endpoint failed: {e}");
            }
        }
    }));
    let shutdown = Arc::new(Notify::new());
    {
        let daemon = daemon.clone();
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Err(e) = daemon.lock().await.expire() {
                    error!("expiring list entries: {e}");
                }
            }
        }));
    }
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| DaemonError::Io { what, source }
    };
    let mut term = signal(SignalKind::terminate()).map_err(io("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("SIGINT handler"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io("SIGHUP handler"))?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(stream, daemon.clone(), shutdown.clone()));
                }
                Err(e) => warn!("control socket accept: {e}"),
            },
            _ = hup.recv() => {
                let _ = daemon.lock().await.reload();
            }
            _ = term.recv() => {
                info!("SIGTERM: stopping; the programs stay attached and filtering");
                break;
            }
            _ = int.recv() => {
                info!("SIGINT: stopping; the programs stay attached and filtering");
                break;
            }
            _ = shutdown.notified() => {
                info!("every interface detached; stopping");
                break;
            }
        }
    }
    for task in background {
        task.abort();
    }
    drop(bpf_stats_fd);
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

/// Detaches without a daemon: removes the pins of `iface` (or all), which detaches the
/// programs once no process holds them.
pub fn detach_pins(
    pin_dir: &Path,
    iface: Option<&str>,
) -> Result<Vec<String>, crate::limiter::Error> {
    let base = pin_dir.join(PIN_LAYOUT);
    let names: Vec<String> = match iface {
        Some(name) => vec![name.to_owned()],
        None => std::fs::read_dir(&base)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default(),
    };
    let mut removed = Vec::new();
    for name in names {
        let dir = base.join(&name);
        if dir.exists() {
            remove_pins(&dir)?;
            removed.push(name);
        }
    }
    Ok(removed)
}
