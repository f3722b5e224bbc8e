//! The daemon: loads and attaches one program per interface (adopting pins left by an earlier
//! run), applies the policy, and serves the control socket. SIGTERM and SIGINT stop the
//! daemon and leave the programs attached; SIGHUP re-reads the config.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex as SyncMutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::programs::xdp::XdpMode;
use futures_util::StreamExt as _;
use ipnet::IpNet;
use limiter_common::layout::{Config, EventKind, SourceEvent, SourceKey, SourceState, Stat};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{Mutex, Notify},
};
use tracing::{error, info, warn};

use crate::{
    audit::{self, Actor, AuditEntry, History},
    config::{AttachMode, ControlSettings, FileConfig, load_file},
    control::{ACCEPT_ERROR_LOG_SECONDS, Admission, Connections, MAX_CONNECTIONS, accept_backoff},
    gate::{self, Observed, Step},
    limiter::{
        Attached, Limiter, LoadOptions, monotonic_ns, open_pinned_sources, pinned_ifindex,
        remove_pins,
    },
    ownership::{Ownership, OwnershipError},
    policy::{CompiledPolicy, Policy},
    protocol::{
        InterfaceStatus, LimitRow, ListRow, MAX_REQUEST_BYTES, Request, Response, SourceRow,
        Status, TopBy, limit_rows,
    },
    runtime::{ChangeError, List, RuntimeState},
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
    #[error(
        "no interface to attach to: set `interfaces` in the config file (or pass --iface); \
         nothing is filtered until one is set"
    )]
    NoInterface,
    /// The directories are another daemon's, or unusable.
    #[error(transparent)]
    Ownership(#[from] OwnershipError),
    /// The control groups cannot work as configured.
    #[error("control: {0}")]
    ControlGroups(String),
    /// A request was refused before anything changed.
    #[error("{0}")]
    Refused(String),
    /// Interface events cannot be followed.
    #[error(transparent)]
    Gate(#[from] gate::GateError),
    /// A socket or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Exit status for a start that restarting cannot fix (a config error, pins of another
/// layout, another daemon holding the directories, no bpffs, an unwritable state directory):
/// `EX_CONFIG` from sysexits.h. The systemd unit lists it in `RestartPreventExitStatus`.
pub const EXIT_CONFIG: u8 = 78;

impl DaemonError {
    /// The process exit status for this error: [`EXIT_CONFIG`] where a restart would fail
    /// the same way, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_)
            | Self::Policy(_)
            | Self::State(_)
            | Self::NoInterface
            | Self::Ownership(_)
            | Self::ControlGroups(_) => EXIT_CONFIG,
            Self::Limiter { source, .. }
                if matches!(**source, crate::limiter::Error::PinMismatch { .. }) =>
            {
                EXIT_CONFIG
            }
            _ => 1,
        }
    }
}

/// One configured interface and the program loaded for it.
pub struct Instance {
    /// Its program and maps.
    pub limiter: Limiter,
    /// How it is attached (`native` or `generic`), or `-` before the first attach.
    pub mode: &'static str,
    /// The interface index our program is attached to; `None` while nothing of ours filters
    /// the interface (it does not exist, or attaching failed).
    pub ifindex: Option<u32>,
    /// Why the program is not attached, while it is not.
    pub problem: Option<String>,
}

impl Instance {
    /// Whether our program filters `iface` right now: attached to the index the name has
    /// now, through a link that runs our program. Checked against the kernel on every call,
    /// so a deleted interface reads as unattached at once, before its event is handled.
    pub fn attached(&self, iface: &str) -> bool {
        self.ifindex.is_some()
            && self.ifindex == gate::current_ifindex(iface)
            && self.limiter.is_attached()
    }

    /// Why the program does not filter `iface`, or `None` when it does.
    pub fn problem(&self, iface: &str) -> Option<String> {
        if self.attached(iface) {
            return None;
        }
        Some(
            self.problem
                .clone()
                .unwrap_or_else(|| "the interface is gone or was recreated".into()),
        )
    }

    /// Attaches to interface `index` (dropping a dead link first) and records it in the
    /// pinned config. The maps, and so the policy and per-source state, stay as they are.
    fn attach(
        &mut self,
        iface: &str,
        index: u32,
        mode: AttachMode,
    ) -> Result<Attached, DaemonError> {
        let err = |source| DaemonError::Limiter {
            iface: iface.to_owned(),
            source: Box::new(source),
        };
        if self.ifindex.is_some_and(|i| i != index) || self.problem.is_some() {
            self.limiter.forget_link().map_err(err)?;
        }
        let attached = self
            .limiter
            .attach_pinned(iface, index, xdp_modes(mode))
            .map_err(err)?;
        self.limiter.record_interface().map_err(err)?;
        self.mode = if self.limiter.attach_mode() == Config::ATTACH_GENERIC {
            "generic"
        } else {
            "native"
        };
        self.ifindex = Some(index);
        self.problem = None;
        Ok(attached)
    }
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
    /// Configured interfaces.
    pub instances: BTreeMap<String, Instance>,
    /// Whether the last reload succeeded.
    pub last_reload_ok: bool,
    /// When the config was last (re)loaded, Unix seconds.
    pub last_reload_unix: u64,
    /// Recent source events.
    pub events: EventLog,
    /// Whether the runtime state in force differs from the state file (a save failed).
    pub unsaved: bool,
    /// Failed saves of the runtime state.
    pub save_failures: u64,
    /// When a failed save was last logged.
    last_save_log: Option<Instant>,
    /// Who changed what.
    history: History,
    /// The hold on the pin and state directories, for the daemon's lifetime.
    _ownership: Ownership,
}

/// What a change did, beyond taking effect: things the operator should know.
#[derive(Debug, Default)]
pub struct Applied {
    /// Said with the "ok".
    pub notes: Vec<String>,
}

/// Failed saves are logged at most once per this many seconds while they go on.
const SAVE_FAILURE_LOG_SECONDS: u64 = 60;

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn xdp_modes(mode: AttachMode) -> &'static [XdpMode] {
    match mode {
        AttachMode::Native => &[XdpMode::Driver],
        AttachMode::Generic => &[XdpMode::Skb],
        AttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
    }
}

/// Reads the config file (defaults without one) with the command line on top.
pub fn load_config(options: &DaemonOptions) -> Result<FileConfig, DaemonError> {
    let mut file = match &options.config {
        Some(path) => load_file(path)?,
        None => FileConfig::default(),
    };
    apply_overrides(&mut file, options);
    if file.interfaces.is_empty() {
        return Err(DaemonError::NoInterface);
    }
    Ok(file)
}

impl Daemon {
    /// Loads the runtime state and the program of every interface, and attaches to those
    /// that exist. `ownership` must already hold the file's directories.
    pub fn start(
        options: DaemonOptions,
        file: FileConfig,
        ownership: Ownership,
    ) -> Result<Self, DaemonError> {
        let mut runtime = RuntimeState::load(&file.state_dir)?;
        let assigned = runtime.limit_ids.clone();
        let (policy, compiled) = runtime.compile(&file.policy, now_unix())?;
        if runtime.limit_ids != assigned {
            // New names (a first start, or a config edited while stopped) keep their ids
            // from now on, even if no change is ever saved.
            runtime.save(&file.state_dir)?;
        }
        let file_state_dir = file.state_dir.clone();
        let mut instances = BTreeMap::new();
        for iface in &file.interfaces {
            let instance = load_interface(&file, iface, &compiled)?;
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
            unsaved: false,
            save_failures: 0,
            last_save_log: None,
            history: History::load(&file_state_dir),
            _ownership: ownership,
        })
    }

    /// Acts on what is known about `iface` now (see [`gate::decide`]).
    pub fn reconcile(&mut self, iface: &str, current: Option<u32>, kernel_program: Option<u32>) {
        let attach_mode = self.file.attach_mode;
        let Some(instance) = self.instances.get_mut(iface) else {
            return;
        };
        let observed = Observed {
            current_ifindex: current,
            attached_ifindex: instance.ifindex,
            kernel_program,
            our_program: instance.limiter.program_id(),
        };
        match gate::decide(observed) {
            Step::Keep | Step::StayAbsent => {}
            Step::Lost => {
                warn!(
                    interface = iface,
                    "the interface is gone: nothing filters it; the program is attached again \
                     as soon as an interface of this name appears"
                );
                instance.ifindex = None;
                instance.problem = Some("the interface was deleted".into());
            }
            Step::Attach { ifindex } => match instance.attach(iface, ifindex, attach_mode) {
                Ok(_) => warn!(
                    interface = iface,
                    ifindex,
                    mode = instance.mode,
                    "attached to the interface (new or recreated), with the pinned policy"
                ),
                Err(e) => {
                    let problem = format!("attaching failed: {e}");
                    if instance.problem.as_deref() != Some(&problem) {
                        error!(interface = iface, "{problem}; nothing filters it");
                    }
                    instance.ifindex = None;
                    instance.problem = Some(problem);
                }
            },
        }
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
    /// policy stays exactly as it was: a change that cannot be saved is refused, so every
    /// acknowledged change survives a restart.
    pub fn commit(&mut self, mut runtime: RuntimeState) -> Result<(), DaemonError> {
        runtime.generation = self.runtime.generation + 1;
        let (policy, compiled) = runtime.compile(&self.file.policy, now_unix())?;
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
        self.unsaved = false;
        Ok(())
    }

    /// Re-reads the config file; on error the running policy is kept.
    pub fn reload(&mut self, actor: &Actor) -> Result<(), DaemonError> {
        let before = self.runtime.clone();
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
            Ok(()) => {
                info!(
                    generation = self.runtime.generation,
                    "configuration reloaded"
                );
                self.audit(actor, serde_json::json!({"command": "reload"}), &before);
            }
            Err(e) => warn!(%actor, "reload refused, the running policy is unchanged: {e}"),
        }
        result
    }

    /// Logs a change that took effect and records it in the history.
    fn audit(&mut self, actor: &Actor, request: serde_json::Value, before: &RuntimeState) {
        let changes = audit::diff(before, &self.runtime);
        info!(
            %actor,
            generation = self.runtime.generation,
            request = %request,
            changes = %serde_json::to_string(&changes).unwrap_or_default(),
            "change applied"
        );
        let entry = AuditEntry {
            time_unix: now_unix(),
            generation: self.runtime.generation,
            actor: actor.clone(),
            request,
            changes,
        };
        if let Err(e) = self.history.record(&self.file.state_dir, entry) {
            warn!("the change is in force but not in the history file: {e}");
        }
    }

    /// Drops expired list entries from the maps, then saves. Unlike an operator's change,
    /// expiry does not wait for the disk: a temporary deny (or allow) ends on time even when
    /// the state file cannot be written. A failed save is counted, logged, and retried on
    /// the next tick; until it succeeds the state file still lists the expired entries,
    /// which a restart ignores because they have expired.
    pub fn expire(&mut self) -> Result<(), DaemonError> {
        let mut runtime = self.runtime.clone();
        if runtime.expire(now_unix()) {
            runtime.generation += 1;
            let (policy, compiled) = runtime.compile(&self.file.policy, now_unix())?;
            self.apply_all(&compiled)?;
            let before = std::mem::replace(&mut self.runtime, runtime);
            self.policy = policy;
            self.compiled = compiled;
            self.unsaved = true;
            self.audit(
                &Actor::Expiry,
                serde_json::json!({"command": "expire"}),
                &before,
            );
        }
        if self.unsaved {
            self.save_pending();
        }
        Ok(())
    }

    /// Saves a runtime state that is in force but not on disk.
    fn save_pending(&mut self) {
        match self.runtime.save(&self.file.state_dir) {
            Ok(()) => {
                if self.save_failures > 0 && self.last_save_log.is_some() {
                    info!("runtime state saved again");
                }
                self.unsaved = false;
                self.last_save_log = None;
            }
            Err(e) => {
                self.save_failures += 1;
                let due = self
                    .last_save_log
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(SAVE_FAILURE_LOG_SECONDS));
                if due {
                    error!(
                        failures = self.save_failures,
                        "saving the runtime state failed (retrying every second; the maps are \
                         up to date): {e}"
                    );
                    self.last_save_log = Some(Instant::now());
                }
            }
        }
    }

    /// Carries out one request. Reads that walk the source table come back as a
    /// [`SourceWalk`] for the caller to run without holding the daemon: a walk of a full
    /// table takes about a second, and changes must not wait behind it.
    pub fn handle(&mut self, request: Request, actor: &Actor) -> Reply {
        match request {
            Request::Status {} => Reply::Walk(self.walk(WalkKind::Status(self.status()))),
            Request::Top { n, by } => Reply::Walk(self.walk(WalkKind::Top { n, by })),
            Request::BlockList {} => Reply::Walk(self.walk(WalkKind::Blocked)),
            request => {
                let asked = serde_json::to_value(&request).unwrap_or_default();
                let changes = request.is_change();
                Reply::Done(match self.dispatch(request, actor, asked.clone()) {
                    Ok(response) => response,
                    Err(e) => {
                        if changes {
                            warn!(%actor, request = %asked, "change refused: {e}");
                        }
                        Response::error(e)
                    }
                })
            }
        }
    }

    /// Applies `edit` to a copy of the runtime state, commits it, records the change, and
    /// answers with the new generation and the edit's notes. `edit` sees the policy in force
    /// and the config file's.
    fn change(
        &mut self,
        actor: &Actor,
        asked: serde_json::Value,
        edit: impl FnOnce(&mut RuntimeState, &Policy, &Policy) -> Result<Vec<String>, ChangeError>,
    ) -> Result<Response, String> {
        let mut runtime = self.runtime.clone();
        let notes =
            edit(&mut runtime, &self.policy, &self.file.policy).map_err(|e| e.to_string())?;
        let before = self.runtime.clone();
        self.commit(runtime).map_err(|e| e.to_string())?;
        self.audit(actor, asked, &before);
        Ok(Response::ok(self.runtime.generation).with_notes(notes))
    }

    fn dispatch(
        &mut self,
        request: Request,
        actor: &Actor,
        asked: serde_json::Value,
    ) -> Result<Response, String> {
        let none = |()| Vec::new();
        match request {
            Request::Status {} | Request::Top { .. } | Request::BlockList {} => {
                Err("internal: reads of the source table are walked by the caller".into())
            }
            Request::LimitShow {} => Ok(Response::ok(self.limit_rows())),
            Request::ClassList {} => Ok(Response::ok(self.class_rows())),
            Request::LimitSet {
                target,
                packets,
                bytes,
                aggregate,
            } => self.change(actor, asked, |rt, policy, _| {
                rt.set_limit(policy, &target, [packets, bytes, aggregate])
                    .map(none)
            }),
            Request::ClassAdd {
                name,
                prefixes,
                limit,
            } => self.change(actor, asked, |rt, policy, _| {
                rt.add_class(policy, &name, &prefixes, limit).map(none)
            }),
            Request::ClassDel { name } => self.change(actor, asked, |rt, policy, file| {
                rt.remove_class(policy, file, &name).map(none)
            }),
            Request::ListAdd {
                list,
                prefix,
                ttl_seconds,
                force,
            } => {
                let expires_at = ttl_seconds.map(|t| now_unix() + t.get());
                self.change(actor, asked, |rt, policy, _| {
                    rt.add_entry(policy, list, prefix, expires_at, force)
                })
            }
            Request::ListDel { list, prefix } => self.change(actor, asked, |rt, _, file| {
                rt.remove_entry(file, list, prefix).map(none)
            }),
            Request::Mode { mode } => self.change(actor, asked, |rt, _, _| {
                rt.mode = Some(mode);
                Ok(Vec::new())
            }),
            Request::RuntimeReset {} => self.change(actor, asked, |rt, _, _| {
                rt.reset();
                Ok(Vec::new())
            }),
            Request::ListShow { list } => Ok(Response::ok(self.list_rows(list))),
            Request::BlockAdd { address, seconds } => {
                self.block(address, Some(seconds.get()))
                    .map_err(|e| e.to_string())?;
                let unchanged = self.runtime.clone();
                self.audit(actor, asked, &unchanged);
                Ok(Response::ok(()))
            }
            Request::BlockDel { address } => {
                self.block(address, None).map_err(|e| e.to_string())?;
                let unchanged = self.runtime.clone();
                self.audit(actor, asked, &unchanged);
                Ok(Response::ok(()))
            }

            Request::Reload {} => {
                self.reload(actor).map_err(|e| e.to_string())?;
                Ok(Response::ok(self.runtime.generation))
            }
            Request::History { n } => Ok(Response::ok(self.history.recent(n))),
            Request::RuntimeShow {} => Ok(Response::ok(&self.runtime)),

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
                let unchanged = self.runtime.clone();
                self.audit(actor, asked, &unchanged);
                Ok(Response::ok(names))
            }
        }
    }

    /// The status report, without the source counts (which [`SourceWalk`] fills in).
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
                let problem = instance.problem(name);
                InterfaceStatus {
                    name: name.clone(),
                    attached: problem.is_none(),
                    problem,
                    attach_mode: instance.mode.to_owned(),
                    program_id: instance.limiter.program_id(),
                    passed: sum(&|s| !s.drops() && *s != Stat::MonitorWouldDrop),
                    dropped: sum(&|s| s.drops()),
                    would_drop: stats.packets(Stat::MonitorWouldDrop),
                    tracked_sources: 0,
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
            state_saved: !self.unsaved,
            interfaces,
        }
    }

    /// What a walk of the source tables needs, taken while holding the daemon.
    fn walk(&self, kind: WalkKind) -> SourceWalk {
        SourceWalk {
            tables: self
                .instances
                .keys()
                .map(|iface| {
                    (
                        iface.clone(),
                        self.file.pin_dir.join(PIN_LAYOUT).join(iface),
                    )
                })
                .collect(),
            limit_names: self.compiled.limit_names.clone(),
            kind,
        }
    }

    fn limit_rows(&self) -> Vec<LimitRow> {
        let runtime = &self.runtime;
        limit_rows(&self.policy, |name| match name {
            "default" => runtime.default_limit.is_some(),
            name => runtime.classes.contains_key(name) || runtime.limits.contains_key(name),
        })
    }

    fn class_rows(&self) -> Vec<LimitRow> {
        self.limit_rows()
            .into_iter()
            .filter(|r| r.kind == "class")
            .collect()
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
        limit_name(&self.compiled.limit_names, limit_id)
    }

    /// Puts `address` into the penalty box for `seconds` (or takes it out, with `None`) on
    /// every interface, under the limit its class gives it. Looks up the address under each
    /// limit id rather than walking the table, so it never waits on the table's size.
    fn block(&mut self, address: IpAddr, seconds: Option<u64>) -> Result<(), DaemonError> {
        let address = address.to_canonical();
        let config = &self.compiled.config;
        let prefix_len = if address.is_ipv4() {
            config.source_prefix_v4
        } else {
            config.source_prefix_v6
        };
        let class_limit = self
            .policy
            .classes
            .iter()
            .find(|c| c.prefixes.iter().any(|p| p.contains(&address)))
            .and_then(|c| self.runtime.limit_ids.ids.get(&c.name).copied())
            .unwrap_or(0);
        let limits = self.compiled.limits.len() as u16;
        let until = seconds.map_or(0, |s| monotonic_ns() + s.saturating_mul(1_000_000_000));
        for (iface, instance) in &mut self.instances {
            let limiter = &mut instance.limiter;
            let err = |source| DaemonError::Limiter {
                iface: iface.clone(),
                source: Box::new(source),
            };
            let key = |limit_id| SourceKey::from_addr(address, prefix_len, limit_id);
            let mut found = false;
            for limit_id in 0..limits {
                if let Some(mut state) = limiter.source(&key(limit_id)).map_err(err)? {
                    state.blocked_until_ns = until;
                    limiter.set_source(&key(limit_id), &state).map_err(err)?;
                    found = true;
                }
            }
            if !found && seconds.is_some() {
                let state = SourceState {
                    blocked_until_ns: until,
                    ..SourceState::default()
                };
                limiter.set_source(&key(class_limit), &state).map_err(err)?;
            }
        }
        Ok(())
    }
}

/// The name of a limit id, for people.
fn limit_name(names: &[String], limit_id: u16) -> String {
    names
        .get(usize::from(limit_id))
        .cloned()
        .unwrap_or_else(|| limit_id.to_string())
}

/// What a daemon answers to a request: now, or after a walk of the source tables that the
/// caller runs without holding the daemon.
pub enum Reply {
    /// The answer.
    Done(Response),
    /// Run this, and answer with its result.
    Walk(SourceWalk),
}

/// Which read a [`SourceWalk`] serves.
pub enum WalkKind {
    /// `status`: fills in each interface's tracked sources.
    Status(Status),
    /// `top`.
    Top {
        /// How many.
        n: usize,
        /// Ordered by.
        by: TopBy,
    },
    /// `block list`: sources in the penalty box.
    Blocked,
}

/// A read of the pinned source tables, on handles of its own.
pub struct SourceWalk {
    tables: Vec<(String, PathBuf)>,
    limit_names: Vec<String>,
    kind: WalkKind,
}

impl SourceWalk {
    /// Walks the tables (blocking: run it on a blocking thread) and answers.
    pub fn run(self) -> Response {
        match self.kind {
            WalkKind::Status(mut status) => {
                for (iface, dir) in &self.tables {
                    let count = open_pinned_sources(dir).map_or(0, |m| m.keys().count());
                    if let Some(row) = status.interfaces.iter_mut().find(|i| &i.name == iface) {
                        row.tracked_sources = count as u64;
                    }
                }
                Response::ok(status)
            }
            WalkKind::Top { n, by } => Response::ok(self.sources(n, by, false)),
            WalkKind::Blocked => Response::ok(self.sources(usize::MAX, TopBy::Drops, true)),
        }
    }

    /// Tracked sources, worst first; `blocked_only` keeps those in the penalty box.
    fn sources(&self, n: usize, by: TopBy, blocked_only: bool) -> Vec<SourceRow> {
        let now = monotonic_ns();
        let mut rows: Vec<SourceRow> = Vec::new();
        for (iface, dir) in &self.tables {
            let Ok(map) = open_pinned_sources(dir) else {
                continue;
            };
            // Entries evicted while we walk just end the walk early for that key; skip them.
            for (key, state) in map.iter().filter_map(Result::ok) {
                if blocked_only && state.blocked_until_ns <= now {
                    continue;
                }
                rows.push(SourceRow {
                    interface: iface.clone(),
                    prefix: key_prefix(&key),
                    limit: limit_name(&self.limit_names, key.limit_id),
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
}

/// The prefix a source key stands for.
pub fn key_prefix(key: &SourceKey) -> IpNet {
    IpNet::new(key.ip(), key.prefix_len).unwrap_or_else(|_| IpNet::from(key.ip()))
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

/// Loads (or adopts) the program of one interface, applies the policy, and attaches it if
/// the interface exists. An interface that does not exist yet (a VLAN or bond that the
/// network configuration creates after the daemon starts, which it does at boot) is
/// attached as soon as it appears; until then the daemon reports it unattached and unhealthy.
fn load_interface(
    file: &FileConfig,
    iface: &str,
    compiled: &CompiledPolicy,
) -> Result<Instance, DaemonError> {
    let dir = file.pin_dir.join(PIN_LAYOUT).join(iface);
    let err = |source| DaemonError::Limiter {
        iface: iface.to_owned(),
        source: Box::new(source),
    };
    let current = gate::current_ifindex(iface);
    if dir.join("link").exists() {
        let pinned = pinned_ifindex(&dir);
        if current.is_some() && pinned == current {
            info!(
                interface = iface,
                "adopting the pinned program, maps and link"
            );
        } else {
            // The link died with the interface it was made for; the maps are still ours.
            warn!(
                interface = iface,
                pinned_ifindex = pinned,
                ifindex = current,
                "stale pins: the interface was deleted or recreated; attaching anew with the \
                 pinned maps"
            );
            crate::limiter::remove_link_pin(&dir).map_err(err)?;
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
    let mut instance = Instance {
        limiter,
        mode: "-",
        ifindex: None,
        problem: None,
    };
    let Some(index) = current else {
        warn!(
            interface = iface,
            "the interface does not exist: nothing filters it until it appears; the program \
             is attached as soon as it does"
        );
        instance.problem = Some("the interface does not exist".into());
        return Ok(instance);
    };
    match instance.attach(iface, index, file.attach_mode)? {
        Attached::New(_) => info!(interface = iface, mode = instance.mode, "attached"),
        Attached::Adopted => info!(
            interface = iface,
            mode = instance.mode,
            "replaced the program on the pinned link"
        ),
    }
    Ok(instance)
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
async fn serve_connection(
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
        let reply = daemon.handle(request, &actor);
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

fn bind_socket(file: &FileConfig) -> Result<UnixListener, DaemonError> {
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

/// Raises the soft limit on open files to the hard limit: every control connection and map
/// handle is a file descriptor, and the default soft limit (1024) is low for a daemon.
fn raise_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        warn!("could not raise the open-file limit from {soft} to {hard}: {e}");
    }
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
            let reason = event.reason().map_or("unknown", Stat::label);
            let penalty_box = event.kind() == Some(EventKind::PenaltyBox);
            if logged < EVENT_LOGS_PER_SECOND {
                logged += 1;
                let what = if penalty_box {
                    "source entered the penalty box"
                } else {
                    "source over its limit"
                };
                warn!(interface = %iface, source = %prefix, %limit, reason, passed = event.passed, dropped = event.dropped, "{what}");
            } else {
                suppressed += 1;
            }
            if penalty_box {
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
///
/// Order matters: nothing is attached or written until the config is valid, this process
/// holds the pin and state directories, both are usable, and the control socket is bound.
pub async fn run(options: DaemonOptions, file: FileConfig) -> Result<(), DaemonError> {
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %options.config.as_ref().map_or("(none: defaults)".into(), |p| p.display().to_string()),
        interfaces = %file.interfaces.join(","),
        attach = %file.attach_mode,
        mode = %file.policy.mode,
        policy = %policy_summary(&file.policy),
        "limiter starting"
    );
    let ownership = Ownership::acquire(&file.pin_dir, &file.state_dir)?;
    raise_file_limit();
    let (netlink, mut link_events) = gate::link_events()?;
    let listener = bind_socket(&file)?;
    let socket_path = file.control.socket.clone();
    let mut daemon = match Daemon::start(options, file, ownership) {
        Ok(daemon) => daemon,
        Err(e) => {
            let _ = std::fs::remove_file(&socket_path);
            return Err(e);
        }
    };
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
        interfaces = %daemon.instances.keys().cloned().collect::<Vec<_>>().join(","),
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
    {
        let daemon = daemon.clone();
        background.push(tokio::spawn(async move {
            // A missed event (the netlink buffer overflowing) is caught by the backstop.
            let mut backstop = tokio::time::interval(GATE_BACKSTOP);
            loop {
                tokio::select! {
                    event = link_events.next() => if event.is_none() {
                        error!("interface events stopped; interfaces are checked every {} s only", GATE_BACKSTOP.as_secs());
                        link_events = futures_util::stream::pending().boxed();
                    },
                    _ = backstop.tick() => {}
                }
                check_interfaces(&netlink, &daemon).await;
            }
        }));
    }
    let connections = Arc::new(SyncMutex::new(Connections::new(MAX_CONNECTIONS)));
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| DaemonError::Io { what, source }
    };
    let mut term = signal(SignalKind::terminate()).map_err(io("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("SIGINT handler"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io("SIGHUP handler"))?;
    let mut accept_failures: u32 = 0;
    let mut accept_errors_unlogged: u64 = 0;
    let mut accept_error_logged: Option<Instant> = None;
    let mut shed_logged = Instant::now();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    accept_failures = 0;
                    let admission = connections
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .admit();
                    if let Admission::Serve { id, closed } = admission {
                        tokio::spawn(serve_connection(
                            stream,
                            id,
                            closed,
                            connections.clone(),
                            daemon.clone(),
                            shutdown.clone(),
                        ));
                    }
                    if shed_logged.elapsed() >= Duration::from_secs(ACCEPT_ERROR_LOG_SECONDS) {
                        let shed = connections
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .take_shed();
                        if shed > 0 {
                            warn!(shed, max = MAX_CONNECTIONS, "control connections closed unanswered to make room (too many open without a request)");
                        }
                        shed_logged = Instant::now();
                    }
                }
                Err(e) => {
                    // Usually out of file descriptors: pause instead of spinning, and log
                    // the first failure, then at most one line per period with a count.
                    accept_errors_unlogged += 1;
                    let due = accept_error_logged.is_none_or(|t| {
                        t.elapsed() >= Duration::from_secs(ACCEPT_ERROR_LOG_SECONDS)
                    });
                    if due {
                        warn!(failures = accept_errors_unlogged, "control socket accept: {e}");
                        accept_errors_unlogged = 0;
                        accept_error_logged = Some(Instant::now());
                    }
                    tokio::time::sleep(accept_backoff(accept_failures)).await;
                    accept_failures = accept_failures.saturating_add(1);
                }
            },
            _ = hup.recv() => {
                let _ = daemon.lock().await.reload(&Actor::Signal);
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

/// One line about a policy, for the first log line.
fn policy_summary(policy: &Policy) -> String {
    let rate = |r: Option<crate::policy::Rate>| {
        r.map_or("unlimited".into(), |r| {
            format!("{}/s burst {}", r.per_second, r.burst)
        })
    };
    format!(
        "default {} packets, {} classes, {} services, {} allow, {} deny",
        rate(policy.default_limit.packets),
        policy.classes.len(),
        policy.services.len(),
        policy.allow.len(),
        policy.deny.len()
    )
}

/// How often interfaces are checked without an event, in case one was missed.
const GATE_BACKSTOP: Duration = Duration::from_secs(10);

/// Checks every configured interface against the kernel and acts on the difference.
async fn check_interfaces(netlink: &rtnetlink::Handle, daemon: &Mutex<Daemon>) {
    let names: Vec<String> = daemon.lock().await.instances.keys().cloned().collect();
    for iface in names {
        let current = gate::current_ifindex(&iface);
        let kernel_program = match current {
            Some(index) => gate::kernel_program(netlink, index).await,
            None => None,
        };
        daemon
            .lock()
            .await
            .reconcile(&iface, current, kernel_program);
    }
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
