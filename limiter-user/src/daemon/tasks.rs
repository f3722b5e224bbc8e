//! `run`: the order of a start, the accept loop, and the background tasks (source events,
//! the program's log, interface events, expiry).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex as SyncMutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use limiter_common::layout::{EventKind, SourceEvent, Stat};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Mutex, Notify},
};
use tracing::{error, info, warn};

use super::{
    Daemon, DaemonError, DaemonOptions, PIN_LAYOUT,
    socket::{bind_socket, serve_connection},
    views::key_prefix,
};
use crate::{
    audit::Actor,
    config::FileConfig,
    control::{ACCEPT_ERROR_LOG_SECONDS, Admission, Connections, MAX_CONNECTIONS, accept_backoff},
    gate,
    ownership::Ownership,
    policy::Policy,
};

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

/// A per-second budget of log lines: lines past it are counted, and the count is handed out
/// when the second rolls over.
#[derive(Debug)]
struct LogBudget {
    per_second: u32,
    logged: u32,
    suppressed: u64,
}

impl LogBudget {
    fn new(per_second: u32) -> Self {
        Self {
            per_second,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether one more line may be logged this second (if not, it is counted).
    fn admit(&mut self) -> bool {
        if self.logged < self.per_second {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Starts a new second; returns how many lines the last one suppressed, if any.
    fn roll(&mut self) -> Option<u64> {
        self.logged = 0;
        Some(std::mem::take(&mut self.suppressed)).filter(|&n| n > 0)
    }
}

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
    let mut budget = LogBudget::new(EVENT_LOGS_PER_SECOND);
    // The budget rolls over each second on its own, so the count of events not logged is
    // reported even when no further event comes to carry it.
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut guard = tokio::select! {
            _ = ticker.tick() => {
                if let Some(suppressed) = budget.roll() {
                    info!(interface = %iface, suppressed, "source events not logged in the last second (rate limit)");
                }
                continue;
            }
            ready = fd.readable_mut() => match ready {
                Ok(guard) => guard,
                Err(_) => return,
            },
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
        let mut d = daemon.lock().await;
        for event in batch {
            if event.kind() == Some(EventKind::Sampled) {
                if event.reason() == Some(Stat::Allowlisted) {
                    if let Ok(mut tally) = d.allowlisted.lock() {
                        tally.add(&iface, key_prefix(&event.key), event.passed);
                    }
                } else {
                    d.attacks.note(&iface, &event);
                }
                continue;
            }
            let prefix = key_prefix(&event.key);
            let limit = d.limit_name(event.key.limit_id);
            let reason = event.reason().map_or("unknown", Stat::label);
            let penalty_box = event.kind() == Some(EventKind::PenaltyBox);
            if budget.admit() {
                let what = if penalty_box {
                    "source entered the penalty box"
                } else {
                    "source over its limit"
                };
                warn!(interface = %iface, source = %prefix, %limit, reason, passed = event.passed, dropped = event.dropped, "{what}");
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

/// Writes the fleet denies this host publishes from its attack records; a write etcd does
/// not take is logged and counted, and frees its place under the cap.
async fn publish_attacks(
    daemon: Arc<Mutex<Daemon>>,
    settings: crate::fleet::FleetSettings,
    entries: Vec<crate::fleet::FleetEntry>,
) {
    let result = async {
        let mut client = settings.connect().await?;
        let mut failed = Vec::new();
        for entry in &entries {
            let now = crate::daemon::now_unix_ms() / 1_000;
            if let Err(e) = crate::fleet::add_entry(
                &settings,
                &mut client,
                crate::fleet::ListKind::Deny,
                entry,
                now,
            )
            .await
            {
                failed.push((entry.clone(), e.to_string()));
            } else {
                info!(prefix = %entry.prefix, reason = %entry.reason, "fleet deny published");
            }
        }
        Ok::<_, crate::fleet::FleetError>(failed)
    }
    .await;
    let failed = match result {
        Ok(failed) => failed,
        Err(e) => entries
            .into_iter()
            .map(|entry| (entry, e.to_string()))
            .collect(),
    };
    let mut daemon = daemon.lock().await;
    for (entry, why) in failed {
        daemon.attack_publication_failed(&entry, &why);
    }
}

/// Runs the `[attacks] notify_command` for an attack's start or end: the record as JSON on
/// its standard input, `LIMITER_ATTACK_EVENT=start|end`, `LIMITER_ATTACK_ID`, `_TYPE` and
/// `_PREFIX` in its environment. Killed after the timeout; never awaited by the daemon.
async fn notify(command: Vec<String>, timeout: Duration, notice: crate::attacks::Transition) {
    use tokio::io::AsyncWriteExt as _;
    let (event, record) = match notice {
        crate::attacks::Transition::Started(r) => ("start", r),
        crate::attacks::Transition::Ended(r) => ("end", r),
        crate::attacks::Transition::Summary(_) => return,
    };
    let Some((program, args)) = command.split_first() else {
        return;
    };
    let spawned = tokio::process::Command::new(program)
        .args(args)
        .env("LIMITER_ATTACK_EVENT", event)
        .env("LIMITER_ATTACK_ID", record.id.to_string())
        .env("LIMITER_ATTACK_TYPE", record.kind.label())
        .env(
            "LIMITER_ATTACK_PREFIX",
            record.prefix.map(|p| p.to_string()).unwrap_or_default(),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            error!(attack = record.id, command = %program, "cannot run the attack notification: {e}");
            return;
        }
    };
    let json = serde_json::to_vec(&record).unwrap_or_default();
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A command that does not read its input still runs.
            let _ = stdin.write_all(&json).await;
        }
        child.wait_with_output().await
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(out)) if out.status.success() => {
            info!(attack = record.id, event, command = %program, "attack notification sent");
        }
        Ok(Ok(out)) => error!(
            attack = record.id,
            event,
            command = %program,
            status = %out.status,
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "attack notification failed"
        ),
        Ok(Err(e)) => {
            error!(attack = record.id, event, command = %program, "attack notification failed: {e}")
        }
        // Dropping the future drops the child, which kill_on_drop kills.
        Err(_) => error!(
            attack = record.id,
            event,
            command = %program,
            timeout_seconds = timeout.as_secs(),
            "attack notification killed: it ran past its timeout"
        ),
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
    let fleet = daemon.file.fleet.clone();
    let daemon = Arc::new(Mutex::new(daemon));
    if let Some(settings) = fleet {
        // Edge hosts only watch; what the watcher reads is applied as one change at a time.
        let (sender, mut receiver) = tokio::sync::mpsc::channel(16);
        info!(endpoints = %settings.endpoints.join(","), prefix = %settings.prefix, "following the fleet store");
        background.push(tokio::spawn(crate::fleet::follow(settings, sender)));
        let daemon = daemon.clone();
        background.push(tokio::spawn(async move {
            while let Some(event) = receiver.recv().await {
                daemon.lock().await.fleet_event(event);
            }
        }));
    }
    for (iface, ring) in rings {
        background.push(tokio::spawn(read_events(iface, ring, daemon.clone())));
    }
    let bpf_stats_fd = if bpf_stats {
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!(
                    "kernel BPF statistics unavailable ({e}; enabling them needs CAP_SYS_ADMIN): \
                     limiter_bpf_run_* are not exported"
                );
                None
            }
        }
    } else {
        None
    };
    // Only while the kernel keeps them: figures that cannot advance are not exported, so a
    // dashboard never shows a flat zero as the program's cost (the warning above says why).
    let bpf_stats = bpf_stats_fd.is_some();
    let snapshots: crate::metrics::SnapshotSource = {
        let daemon = daemon.clone();
        Arc::new(move || {
            let daemon = daemon.clone();
            Box::pin(async move { daemon.lock().await.metrics_snapshot(bpf_stats) })
        })
    };
    background.push(tokio::spawn(async move {
        if let Err(e) = crate::metrics::serve(metrics_addr, snapshots, pin_dirs).await {
            error!(listen = %metrics_addr, "metrics endpoint failed: {e}");
        }
    }));
    let shutdown = Arc::new(Notify::new());
    {
        let daemon_for_publish = daemon.clone();
        let daemon = daemon.clone();
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let mut daemon = daemon.lock().await;
                if let Err(e) = daemon.expire() {
                    error!("expiring list entries: {e}");
                }
                daemon.challenge_tick();
                daemon.sweep_proven();
                let notices = daemon.attacks_tick();
                let command = daemon.notify_command();
                let publish = daemon.attack_publications(&notices);
                if !publish.is_empty()
                    && let Some(settings) = daemon.file.fleet.clone()
                {
                    tokio::spawn(publish_attacks(
                        daemon_for_publish.clone(),
                        settings,
                        publish,
                    ));
                }
                drop(daemon);
                if let Some((command, timeout)) = command {
                    for notice in notices {
                        tokio::spawn(notify(command.clone(), timeout, notice));
                    }
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

#[cfg(test)]
mod tests {
    use super::LogBudget;

    #[test]
    fn log_budget_counts_what_it_suppresses_and_reports_it_once() {
        let mut budget = LogBudget::new(2);
        assert_eq!(budget.roll(), None, "nothing suppressed, nothing to report");
        let admitted: Vec<bool> = (0..5).map(|_| budget.admit()).collect();
        assert_eq!(admitted, [true, true, false, false, false]);
        assert_eq!(budget.roll(), Some(3));
        // A quiet second after it: the count was reported once, and the budget is whole.
        assert_eq!(budget.roll(), None);
        assert!(budget.admit() && budget.admit() && !budget.admit());
        assert_eq!(budget.roll(), Some(1));
    }
}
