//! The [`Limiter`]: one loaded XDP program and its maps.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, MapInfo, MapType, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, ProgramError, SockOps, Xdp,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId, XdpMode},
    },
};
use limiter_common::{
    layout::{
        Bucket, CHALLENGE_PORTS_LEN, Config, Counter, FAMILIES, FlowKey, FlowState,
        LIMIT_STATS_LEN, Lease, LeaseBucket, Limit, PolicyEntry, ProvenKey, SERVICE_PORTS_LEN,
        SourceKey, SourceState, Stat, capacity, limit_stat_index, map_names,
    },
    lease::lease_slot,
};

use crate::{
    EBPF_OBJECT, PROGRAM_NAME, SESSIONS_PROGRAM_NAME,
    plan::{MapContents, MapWrite, plan},
    policy::CompiledPolicy,
};

/// Why an operation on the loaded program failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object could not be loaded (verifier, map creation, ...).
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program operation failed.
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    /// A map operation failed.
    #[error("map {map}: {source}")]
    Map {
        /// The map.
        map: &'static str,
        /// Why.
        source: MapError,
    },
    /// The object lacks a map or program this build expects.
    #[error("the XDP object has no {0}")]
    Missing(&'static str),
    /// This binary was built without the XDP program (no nightly or bpf-linker).
    #[error(
        "this binary was built without the XDP program (an empty stub, as `cargo check` builds \
         on a machine without the nightly toolchain or bpf-linker); build it with `cargo xtask build`"
    )]
    Stub,
    /// A pinned map is not the map this build expects; adopting it would corrupt state.
    #[error(
        "pinned map {path} has {what} {found}, expected {expected} (was [capacity] changed?). \
         Nothing was changed: the program already attached keeps filtering with its pinned \
         policy and state. To use the new layout, run `limiter detach` (nothing filters until \
         the next start, and per-source state starts empty) and start again, or restore the \
         previous setting"
    )]
    PinMismatch {
        /// The pin.
        path: PathBuf,
        /// Which property.
        what: &'static str,
        /// This build's value.
        expected: String,
        /// The pin's value.
        found: String,
    },
    /// A filesystem operation on the pin directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The link could not be pinned or reopened.
    #[error("XDP link {path}: {message}")]
    Link {
        /// The pin.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { map, source }
}

/// Load-time settings.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Capacity of the source table; the build default when `None`.
    pub max_sources: Option<u32>,
    /// Capacity of the aggregate table.
    pub max_aggregates: Option<u32>,
    /// Where maps (and the link) are pinned; `None` keeps everything private to the process.
    pub pin_dir: Option<PathBuf>,
}

/// What a pinned map must look like to be adopted.
struct MapSpec {
    name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

fn expected_maps(options: &LoadOptions) -> Vec<MapSpec> {
    use std::mem::size_of;
    let spec = |name, map_type, key_size: usize, value_size: usize, max_entries| MapSpec {
        name,
        map_type,
        key_size: key_size as u32,
        value_size: value_size as u32,
        max_entries,
    };
    vec![
        spec(map_names::CONFIG, MapType::Array, 4, size_of::<Config>(), 1),
        spec(
            map_names::LIMITS,
            MapType::Array,
            4,
            size_of::<Limit>(),
            capacity::LIMITS,
        ),
        spec(
            map_names::POLICY_V4,
            MapType::LpmTrie,
            8,
            size_of::<PolicyEntry>(),
            capacity::POLICY_PREFIXES,
        ),
        spec(
            map_names::POLICY_V6,
            MapType::LpmTrie,
            20,
            size_of::<PolicyEntry>(),
            capacity::POLICY_PREFIXES,
        ),
        spec(
            map_names::SERVICE_PORTS,
            MapType::Array,
            4,
            4,
            SERVICE_PORTS_LEN,
        ),
        spec(
            map_names::SOURCES,
            MapType::LruHash,
            size_of::<SourceKey>(),
            size_of::<SourceState>(),
            options.max_sources.unwrap_or(capacity::SOURCES),
        ),
        spec(
            map_names::AGGREGATES,
            MapType::LruHash,
            size_of::<SourceKey>(),
            size_of::<Bucket>(),
            options.max_aggregates.unwrap_or(capacity::AGGREGATES),
        ),
        spec(
            map_names::NEW_SOURCE_BUDGET,
            MapType::PerCpuArray,
            4,
            size_of::<Bucket>(),
            1,
        ),
        spec(
            map_names::SHARED_BUCKET,
            MapType::Array,
            4,
            size_of::<Bucket>(),
            FAMILIES,
        ),
        spec(
            map_names::UNPROVEN_BUCKET,
            MapType::Array,
            4,
            size_of::<Bucket>(),
            FAMILIES,
        ),
        spec(
            map_names::OUT_OF_STATE_BUCKET,
            MapType::Array,
            4,
            size_of::<Bucket>(),
            FAMILIES,
        ),
        spec(
            map_names::PROVEN,
            MapType::LruHash,
            size_of::<ProvenKey>(),
            8,
            capacity::PROVEN,
        ),
        spec(
            map_names::FLOWS,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<FlowState>(),
            capacity::FLOWS,
        ),
        spec(
            map_names::CHALLENGE_PORTS,
            MapType::Array,
            4,
            8,
            CHALLENGE_PORTS_LEN,
        ),
        spec(
            map_names::CHALLENGE_BUDGET,
            MapType::LruHash,
            size_of::<ProvenKey>(),
            size_of::<Bucket>(),
            capacity::CHALLENGE_BUDGET,
        ),
        spec(
            map_names::STATS,
            MapType::PerCpuArray,
            4,
            size_of::<Counter>(),
            Stat::STATS_LEN,
        ),
        spec(
            map_names::EVENTS,
            MapType::RingBuf,
            0,
            0,
            capacity::EVENTS_BYTES,
        ),
        spec(
            map_names::LIMIT_STATS,
            MapType::PerCpuArray,
            4,
            size_of::<Counter>(),
            LIMIT_STATS_LEN,
        ),
    ]
}

/// Refuses a pinned map whose type, key size, value size or capacity differ from `spec`.
fn check_pin(path: &Path, spec: &MapSpec) -> Result<(), Error> {
    let info = MapInfo::from_pin(path).map_err(|source| Error::Map {
        map: spec.name,
        source,
    })?;
    let mismatch = |what, expected: String, found: String| Error::PinMismatch {
        path: path.to_owned(),
        what,
        expected,
        found,
    };
    let map_type = info.map_type().map_err(|source| Error::Map {
        map: spec.name,
        source,
    })?;
    if map_type != spec.map_type {
        return Err(mismatch(
            "type",
            format!("{:?}", spec.map_type),
            format!("{map_type:?}"),
        ));
    }
    for (what, expected, found) in [
        ("key size", spec.key_size, info.key_size()),
        ("value size", spec.value_size, info.value_size()),
        ("capacity", spec.max_entries, info.max_entries()),
    ] {
        if expected != found {
            return Err(mismatch(what, expected.to_string(), found.to_string()));
        }
    }
    Ok(())
}

/// The program's own log lines (aya-log), passed on to the process's logger at most
/// [`PROGRAM_LOG_LINES_PER_SECOND`] a second, so a flood cannot flood the log.
pub struct RateLimitedLog {
    window: std::sync::Mutex<(std::time::Instant, u32, u64)>,
}

/// How many program log lines a second reach the log; the rest are counted.
pub const PROGRAM_LOG_LINES_PER_SECOND: u32 = 10;

static PROGRAM_LOG: std::sync::LazyLock<RateLimitedLog> =
    std::sync::LazyLock::new(|| RateLimitedLog {
        window: std::sync::Mutex::new((std::time::Instant::now(), 0, 0)),
    });

impl log::Log for RateLimitedLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        log::logger().enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        let mut window = self
            .window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        if now.duration_since(window.0) >= std::time::Duration::from_secs(1) {
            if window.2 > 0 {
                log::warn!(target: "limiter::program", "{} program log lines suppressed in the last second", window.2);
            }
            *window = (now, 0, 0);
        }
        if window.1 < PROGRAM_LOG_LINES_PER_SECOND {
            window.1 += 1;
            log::logger().log(record);
        } else {
            window.2 += 1;
        }
    }

    fn flush(&self) {
        log::logger().flush();
    }
}

/// The CPUs a per-CPU map has a value for (and that could run the program).
fn possible_cpus() -> Result<u32, Error> {
    aya::util::nr_cpus()
        .map(|n| n as u32)
        .map_err(|(_, source)| Error::Io {
            path: "/sys/devices/system/cpu/possible".into(),
            source,
        })
}

/// The kernel clock the program reads (`bpf_ktime_get_ns`): CLOCK_MONOTONIC, in ns.
pub fn monotonic_ns() -> u64 {
    let now =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// Reads the interface index recorded in a pinned `CONFIG` map, if there is one.
pub fn pinned_ifindex(pin_dir: &Path) -> Option<u32> {
    let map = MapData::from_pin(pin_dir.join(map_names::CONFIG)).ok()?;
    let config: Array<MapData, Config> = Array::try_from(aya::maps::Map::Array(map)).ok()?;
    config.get(&0, 0).ok().map(|c| c.ifindex)
}

/// Counter totals over all CPUs, indexed like `STATS`: by [`Stat`], then the monitor-mode
/// would-drops by reason ([`Stat::would_drop_index`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats(pub Vec<Counter>);

impl Stats {
    /// The totals of one counter.
    pub fn get(&self, stat: Stat) -> Counter {
        self.0.get(stat as usize).copied().unwrap_or_default()
    }

    /// Frames passed in monitor mode that this drop reason would have dropped.
    pub fn would_drop(&self, reason: Stat) -> Counter {
        self.0
            .get(reason.would_drop_index() as usize)
            .copied()
            .unwrap_or_default()
    }

    /// Packets of one counter.
    pub fn packets(&self, stat: Stat) -> u64 {
        self.get(stat).packets
    }

    /// Packets over all verdict counters: every frame the program has seen.
    pub fn frames(&self) -> u64 {
        Stat::ALL
            .iter()
            .filter(|s| s.is_verdict())
            .map(|s| self.packets(*s))
            .sum()
    }
}

/// The loaded program and its maps.
pub struct Limiter {
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    applied: Option<CompiledPolicy>,
    /// What the policy maps hold, as far as this process knows (`None`: read them first).
    installed: Option<MapContents>,
    pin_dir: Option<PathBuf>,
    /// The link, when it is pinned: dropping it closes our fd, the pin keeps it attached.
    pinned_link: Option<FdLink>,
    ifindex: u32,
    attach_mode: u32,
    /// The sock_ops program's link, once attached (pinned too when there is a pin directory).
    sessions_link: Option<FdLink>,
    /// The namespace whose connections the sock_ops program records; 0 until attached.
    netns_cookie: u64,
}

/// How [`Limiter::attach_pinned`] got the program onto the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new link, in this mode.
    New(XdpMode),
    /// An existing pinned link now runs this program (atomic replacement).
    Adopted,
}

impl Limiter {
    /// Loads the program into the kernel (not attached anywhere yet).
    pub fn load(options: &LoadOptions) -> Result<Self, Error> {
        if EBPF_OBJECT.is_empty() {
            return Err(Error::Stub);
        }
        let mut loader = EbpfLoader::new();
        let specs = expected_maps(options);
        if let Some(dir) = &options.pin_dir {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
            // Pins expose per-source state: root only.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
            for spec in &specs {
                let path = dir.join(spec.name);
                if path.exists() {
                    check_pin(&path, spec)?;
                }
                loader.map_pin_path(spec.name, path);
            }
        }
        if let Some(n) = options.max_sources {
            loader.map_max_entries(map_names::SOURCES, n);
        }
        if let Some(n) = options.max_aggregates {
            loader.map_max_entries(map_names::AGGREGATES, n);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        // The logger owns the fd of the program's log buffer: it must live as long as the
        // program, or the program load below fails.
        let program_log: &'static dyn log::Log = &*PROGRAM_LOG;
        let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, program_log).ok();
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(Error::Missing("program \"limiter\""))?
            .try_into()?;
        program.load()?;
        let sessions: &mut SockOps = ebpf
            .program_mut(SESSIONS_PROGRAM_NAME)
            .ok_or(Error::Missing("program \"limiter_sessions\""))?
            .try_into()?;
        sessions.load()?;
        Ok(Self {
            ebpf,
            logger,
            applied: None,
            installed: None,
            pin_dir: options.pin_dir.clone(),
            pinned_link: None,
            ifindex: 0,
            attach_mode: 0,
            sessions_link: None,
            netns_cookie: 0,
        })
    }

    /// Attaches the sock_ops program to the cgroup v2 hierarchy at `cgroup`, recording the
    /// connections of the namespace `netns_cookie`, then writes `backfill` (the connections
    /// established before it) and only then lets the XDP program judge TCP by session: a
    /// flow that exists is never out of state. A link pinned by a previous daemon is replaced
    /// after the new one is in place, so no connection goes unrecorded in between.
    pub fn attach_sessions(
        &mut self,
        cgroup: &Path,
        netns_cookie: u64,
        backfill: &crate::sessions::Backfill,
    ) -> Result<(), Error> {
        let link_err = |path: &Path, message: String| Error::Link {
            path: path.to_owned(),
            message,
        };
        let cgroup_dir = fs::File::open(cgroup).map_err(io_err(cgroup))?;
        self.netns_cookie = netns_cookie;
        // The cookie first: the program records nothing until it knows its namespace.
        self.refresh_config()?;
        let program: &mut SockOps = self
            .ebpf
            .program_mut(SESSIONS_PROGRAM_NAME)
            .ok_or(Error::Missing("program \"limiter_sessions\""))?
            .try_into()?;
        // A bpf_link on a cgroup takes no flags (the kernel refuses BPF_F_ALLOW_MULTI with
        // EINVAL) and coexists with other links anyway: `Single` is the mode without flags.
        let id = program.attach(&cgroup_dir, CgroupAttachMode::Single)?;
        let link = FdLink::try_from(program.take_link(id)?)
            .map_err(|e| link_err(cgroup, e.to_string()))?;
        let link = match &self.pin_dir {
            Some(dir) => {
                let path = dir.join(SESSIONS_LINK_PIN);
                // bpffs refuses names with a dot.
                let staging = dir.join(format!("{SESSIONS_LINK_PIN}_new"));
                let _ = fs::remove_file(&staging);
                let pinned = link
                    .pin(&staging)
                    .map_err(|e| link_err(&staging, e.to_string()))?;
                let previous = PinnedLink::from_pin(&path).ok();
                // Replacing the pin drops the previous daemon's link once we let go of it.
                fs::rename(&staging, &path).map_err(io_err(&path))?;
                drop(previous);
                FdLink::from(pinned)
            }
            None => link,
        };
        self.sessions_link = Some(link);
        self.record_sessions(backfill)?;
        self.refresh_config()
    }

    /// Whether the sock_ops program is attached: TCP is judged by session.
    pub fn sessions_attached(&self) -> bool {
        self.sessions_link.is_some() && self.netns_cookie != 0
    }

    /// Records flows and proven sources, as the sock_ops program does (the backfill, and
    /// tests).
    pub fn record_sessions(&mut self, backfill: &crate::sessions::Backfill) -> Result<(), Error> {
        let mut flows: HashMap<&mut MapData, FlowKey, FlowState> =
            HashMap::try_from(self.map_mut(map_names::FLOWS)?)
                .map_err(map_err(map_names::FLOWS))?;
        for flow in &backfill.flows {
            // BPF_NOEXIST: a flow the program already recorded keeps its ACK budget.
            match flows.insert(flow, FlowState::default(), BPF_NOEXIST) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(Error::Map {
                        map: map_names::FLOWS,
                        source,
                    });
                }
            }
        }
        let now = monotonic_ns();
        let mut proven: HashMap<&mut MapData, ProvenKey, u64> =
            HashMap::try_from(self.map_mut(map_names::PROVEN)?)
                .map_err(map_err(map_names::PROVEN))?;
        for key in &backfill.proven {
            proven
                .insert(key, now, 0)
                .map_err(map_err(map_names::PROVEN))?;
        }
        Ok(())
    }

    /// Rewrites `CONFIG` from the applied policy and this process's own facts.
    fn refresh_config(&mut self) -> Result<(), Error> {
        match &self.applied {
            Some(policy) => self.write_config(policy.config),
            None => Ok(()),
        }
    }

    /// The program, for attaching or test runs.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(PROGRAM_NAME)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("loaded in Limiter::load")
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("loaded in Limiter::load")
    }

    /// Attaches the program to `iface`.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<XdpLinkId, Error> {
        Ok(self.program_mut().attach(iface, mode)?)
    }

    /// Attaches to `iface` through a link pinned in the pin directory, so the program stays
    /// attached when this process exits. If the link is already pinned (a previous daemon),
    /// the new program replaces the old one on it atomically: there is no moment without a
    /// program. `modes` are tried in order for a new link.
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        ifindex: u32,
        modes: &[XdpMode],
    ) -> Result<Attached, Error> {
        let dir = self
            .pin_dir
            .clone()
            .ok_or(Error::Missing("pin directory"))?;
        let link_path = dir.join("link");
        let link_err = |message: String| Error::Link {
            path: link_path.clone(),
            message,
        };
        self.ifindex = ifindex;
        if link_path.exists() {
            let pinned = PinnedLink::from_pin(&link_path).map_err(|e| link_err(e.to_string()))?;
            let fd_link = FdLink::from(pinned);
            let xdp_link = XdpLink::try_from(fd_link).map_err(|e| link_err(e.to_string()))?;
            let program = self.program_mut();
            let id = program.attach_to_link(xdp_link)?;
            let link = program.take_link(id)?;
            self.pinned_link = Some(FdLink::try_from(link).map_err(|e| link_err(e.to_string()))?);
            self.attach_mode = pinned_attach_mode(&dir).unwrap_or(0);
            return Ok(Attached::Adopted);
        }
        let mut last_error = None;
        for &mode in modes {
            match self.program_mut().attach(iface, mode) {
                Ok(id) => {
                    let link = self.program_mut().take_link(id)?;
                    let fd_link = FdLink::try_from(link).map_err(|e| link_err(e.to_string()))?;
                    let pinned = fd_link
                        .pin(&link_path)
                        .map_err(|e| link_err(e.to_string()))?;
                    self.pinned_link = Some(FdLink::from(pinned));
                    self.attach_mode = if mode == XdpMode::Skb {
                        Config::ATTACH_GENERIC
                    } else {
                        Config::ATTACH_NATIVE
                    };
                    return Ok(Attached::New(mode));
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.map_or(Error::Missing("attach mode"), Error::Program))
    }

    /// Lets go of the link (dead once its interface was deleted) and removes its pin, so
    /// the next [`Self::attach_pinned`] makes a new one. The maps stay.
    pub fn forget_link(&mut self) -> Result<(), Error> {
        self.pinned_link = None;
        self.ifindex = 0;
        match &self.pin_dir {
            Some(dir) => remove_link_pin(dir),
            None => Ok(()),
        }
    }

    /// Writes the interface index and attach mode of the current link into the pinned
    /// `CONFIG` record (how a later daemon tells its own pins from stale ones), keeping the
    /// applied policy's settings. One map write.
    pub fn record_interface(&mut self) -> Result<(), Error> {
        self.refresh_config()
    }

    /// Writes the `CONFIG` record: the policy's settings with this link's interface index
    /// and attach mode, and the session namespace. The policy may ask for sessions; they are
    /// switched on only once the sock_ops program is attached and the backfill written,
    /// because without it every established connection would look out of state.
    fn write_config(&mut self, settings: Config) -> Result<(), Error> {
        let sessions = settings.has(Config::FLAG_SESSIONS) && self.sessions_attached();
        let record = Config {
            ifindex: self.ifindex,
            attach_mode: self.attach_mode,
            netns_cookie: self.netns_cookie,
            flags: if sessions {
                settings.flags
            } else {
                settings.flags & !Config::FLAG_SESSIONS
            },
            ..settings
        };
        let mut config: Array<&mut MapData, Config> =
            Array::try_from(self.map_mut(map_names::CONFIG)?)
                .map_err(map_err(map_names::CONFIG))?;
        config.set(0, record, 0).map_err(map_err(map_names::CONFIG))
    }

    /// Pins the program itself (for a second handle to it, e.g. concurrent test runs).
    pub fn pin_program(&mut self, path: &Path) -> Result<(), Error> {
        self.program_mut().pin(path).map_err(|e| Error::Link {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Whether the pinned link exists and runs this program.
    pub fn is_attached(&self) -> bool {
        let pinned = self
            .pin_dir
            .as_ref()
            .is_some_and(|d| d.join("link").exists());
        let link_program = self
            .pinned_link
            .as_ref()
            .and_then(|l| l.info().ok())
            .map(|i| i.program_id());
        pinned && link_program.is_some() && link_program == self.program_id()
    }

    /// The attach mode recorded for this program (`Config::ATTACH_*`).
    pub fn attach_mode(&self) -> u32 {
        self.attach_mode
    }

    /// The kernel's id of the loaded program.
    pub fn program_id(&self) -> Option<u32> {
        self.program().info().ok().map(|i| i.id())
    }

    /// Detaches the pinned link and removes every pin: the program stops filtering.
    pub fn detach_and_unpin(mut self) -> Result<(), Error> {
        let dir = self
            .pin_dir
            .clone()
            .ok_or(Error::Missing("pin directory"))?;
        drop(self.pinned_link.take());
        drop(self.sessions_link.take());
        remove_pins(&dir)
    }

    /// Takes the program's log reader, for a task that flushes it; keep it alive.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, Error> {
        self.ebpf.map_mut(name).ok_or(Error::Missing(name))
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, Error> {
        self.ebpf.map(name).ok_or(Error::Missing(name))
    }

    /// Writes a compiled policy into the maps: the writes [`plan`] computes from what the
    /// maps hold, so a change to one limit is one map write. Returns how many writes it took.
    ///
    /// The first apply after loading reads what the maps hold (an adopted program's maps
    /// hold the previous daemon's policy). After a failed write the maps are read again on
    /// the next apply, so a retry or a restore starts from the truth.
    pub fn apply(&mut self, policy: &CompiledPolicy) -> Result<usize, Error> {
        let new = MapContents::from(policy).leased(possible_cpus()?);
        let old = match self.installed.take() {
            Some(contents) => contents,
            None => self.read_contents(&new)?,
        };
        let writes = plan(&old, &new);
        self.perform(&writes)?;
        self.installed = Some(new);
        self.applied = Some(policy.clone());
        Ok(writes.len())
    }

    /// Carries out map writes in order, then voids every lease taken before them.
    pub fn perform(&mut self, writes: &[MapWrite]) -> Result<(), Error> {
        let performed = self.perform_writes(writes);
        // Even after a failed write: what did go through may have changed a limit.
        self.advance_lease_epoch()?;
        performed
    }

    /// Advances the lease epoch: every lease and cached drop taken before is void, so a
    /// change to a limit, the config or a source's state applies to the next packet (see
    /// `limiter_common::lease`). The program reads the epoch before the limit, so this comes
    /// after the writes it covers.
    fn advance_lease_epoch(&mut self) -> Result<(), Error> {
        let mut epoch: Array<&mut MapData, u64> =
            Array::try_from(self.map_mut(map_names::LEASE_EPOCH)?)
                .map_err(map_err(map_names::LEASE_EPOCH))?;
        let current = epoch.get(&0, 0).map_err(map_err(map_names::LEASE_EPOCH))?;
        epoch
            .set(0, current.wrapping_add(1).max(1), 0)
            .map_err(map_err(map_names::LEASE_EPOCH))
    }

    fn perform_writes(&mut self, writes: &[MapWrite]) -> Result<(), Error> {
        for write in writes {
            match write {
                MapWrite::ResetLimitStats(id) => self.reset_limit_stats(*id)?,
                MapWrite::Limit(id, limit) => {
                    let mut limits: Array<&mut MapData, Limit> =
                        Array::try_from(self.map_mut(map_names::LIMITS)?)
                            .map_err(map_err(map_names::LIMITS))?;
                    limits
                        .set(*id, limit, 0)
                        .map_err(map_err(map_names::LIMITS))?;
                }
                MapWrite::ServicePort(index, id) => {
                    let mut ports: Array<&mut MapData, u32> =
                        Array::try_from(self.map_mut(map_names::SERVICE_PORTS)?)
                            .map_err(map_err(map_names::SERVICE_PORTS))?;
                    ports
                        .set(*index, id, 0)
                        .map_err(map_err(map_names::SERVICE_PORTS))?;
                }
                MapWrite::InsertV4(addr, len, entry) => {
                    trie_insert(
                        self.map_mut(map_names::POLICY_V4)?,
                        map_names::POLICY_V4,
                        *addr,
                        *len,
                        entry,
                    )?;
                }
                MapWrite::InsertV6(addr, len, entry) => {
                    trie_insert(
                        self.map_mut(map_names::POLICY_V6)?,
                        map_names::POLICY_V6,
                        *addr,
                        *len,
                        entry,
                    )?;
                }
                MapWrite::Config(config) => self.write_config(*config)?,
                MapWrite::RemoveV4(addr, len) => {
                    trie_remove(
                        self.map_mut(map_names::POLICY_V4)?,
                        map_names::POLICY_V4,
                        *addr,
                        *len,
                    )?;
                }
                MapWrite::RemoveV6(addr, len) => {
                    trie_remove(
                        self.map_mut(map_names::POLICY_V6)?,
                        map_names::POLICY_V6,
                        *addr,
                        *len,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// What the policy maps hold now. Per-limit counters are taken to belong to the names
    /// of `wanted` (a previous daemon's names are not recorded in the maps).
    fn read_contents(&self, wanted: &MapContents) -> Result<MapContents, Error> {
        let config: Array<&MapData, Config> =
            Array::try_from(self.map(map_names::CONFIG)?).map_err(map_err(map_names::CONFIG))?;
        let config = config.get(&0, 0).map_err(map_err(map_names::CONFIG))?;
        let limits: Array<&MapData, Limit> =
            Array::try_from(self.map(map_names::LIMITS)?).map_err(map_err(map_names::LIMITS))?;
        let ports: Array<&MapData, u32> = Array::try_from(self.map(map_names::SERVICE_PORTS)?)
            .map_err(map_err(map_names::SERVICE_PORTS))?;
        let v4: LpmTrie<&MapData, [u8; 4], PolicyEntry> =
            LpmTrie::try_from(self.map(map_names::POLICY_V4)?)
                .map_err(map_err(map_names::POLICY_V4))?;
        let v6: LpmTrie<&MapData, [u8; 16], PolicyEntry> =
            LpmTrie::try_from(self.map(map_names::POLICY_V6)?)
                .map_err(map_err(map_names::POLICY_V6))?;
        Ok(MapContents {
            config: Config {
                ifindex: 0,
                attach_mode: 0,
                ..config
            },
            limits: limits
                .iter()
                .enumerate()
                .filter_map(|(id, limit)| Some((id as u32, limit.ok()?)))
                .filter(|(_, limit)| *limit != Limit::default())
                .collect(),
            limit_names: wanted.limit_names.clone(),
            service_ports: ports
                .iter()
                .enumerate()
                .filter_map(|(index, id)| Some((index as u32, id.ok()?)))
                .filter(|(_, id)| *id != 0)
                .collect(),
            v4: v4
                .iter()
                .filter_map(Result::ok)
                .map(|(k, e)| ((k.data(), k.prefix_len() as u8), e))
                .collect(),
            v6: v6
                .iter()
                .filter_map(Result::ok)
                .map(|(k, e)| ((k.data(), k.prefix_len() as u8), e))
                .collect(),
        })
    }

    /// Zeroes a limit id's pass and drop counters on every CPU.
    fn reset_limit_stats(&mut self, id: u32) -> Result<(), Error> {
        let cpus = possible_cpus()? as usize;
        let mut stats: PerCpuArray<&mut MapData, Counter> =
            PerCpuArray::try_from(self.map_mut(map_names::LIMIT_STATS)?)
                .map_err(map_err(map_names::LIMIT_STATS))?;
        for dropped in [false, true] {
            let zeros = aya::maps::PerCpuValues::try_from(vec![Counter::default(); cpus]).map_err(
                |source| Error::Io {
                    path: "LIMIT_STATS".into(),
                    source,
                },
            )?;
            stats
                .set(limit_stat_index(id, dropped), zeros, 0)
                .map_err(map_err(map_names::LIMIT_STATS))?;
        }
        Ok(())
    }

    /// Counter totals over all CPUs.
    pub fn stats(&self) -> Result<Stats, Error> {
        let stats: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.map(map_names::STATS)?)
                .map_err(map_err(map_names::STATS))?;
        let mut totals = Vec::with_capacity(Stat::STATS_LEN as usize);
        for i in 0..Stat::STATS_LEN {
            let per_cpu = stats.get(&i, 0).map_err(map_err(map_names::STATS))?;
            let mut total = Counter::default();
            for c in per_cpu.iter() {
                total.packets += c.packets;
                total.bytes += c.bytes;
            }
            totals.push(total);
        }
        Ok(Stats(totals))
    }

    /// Passed and dropped totals (packets, bytes) of each limit id below `count`.
    pub fn limit_stats(&self, count: usize) -> Result<Vec<(Counter, Counter)>, Error> {
        let stats: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.map(map_names::LIMIT_STATS)?)
                .map_err(map_err(map_names::LIMIT_STATS))?;
        let total = |index: u32| -> Result<Counter, Error> {
            let per_cpu = stats
                .get(&index, 0)
                .map_err(map_err(map_names::LIMIT_STATS))?;
            Ok(per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            }))
        };
        (0..count.min(capacity::LIMITS as usize) as u32)
            .map(|id| {
                Ok((
                    total(limit_stat_index(id, false))?,
                    total(limit_stat_index(id, true))?,
                ))
            })
            .collect()
    }

    /// One value of a hash map, if present.
    fn lookup<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
        key: &K,
    ) -> Result<Option<V>, Error> {
        let map: HashMap<&MapData, K, V> =
            HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        match map.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(Error::Map {
                map: name,
                source: e,
            }),
        }
    }

    /// The state of one source, if tracked.
    pub fn source(&self, key: &SourceKey) -> Result<Option<SourceState>, Error> {
        self.lookup(map_names::SOURCES, key)
    }

    /// The bucket of one aggregate prefix, if tracked.
    pub fn aggregate(&self, key: &SourceKey) -> Result<Option<Bucket>, Error> {
        self.lookup(map_names::AGGREGATES, key)
    }

    /// When a source last proved itself (kernel clock, ns), if it is proven.
    pub fn proven_at(&self, key: &ProvenKey) -> Result<Option<u64>, Error> {
        self.lookup(map_names::PROVEN, key)
    }

    /// Switches the SYN-cookie challenge on or off for these TCP ports: one map write per
    /// port.
    pub fn set_challenge(
        &mut self,
        ports: &[std::ops::RangeInclusive<u16>],
        on: bool,
    ) -> Result<(), Error> {
        let mut map: Array<&mut MapData, u64> =
            Array::try_from(self.map_mut(map_names::CHALLENGE_PORTS)?)
                .map_err(map_err(map_names::CHALLENGE_PORTS))?;
        // 1: engaged, and no SYN let through to the kernel yet (so the first one is).
        let value = u64::from(on);
        for range in ports {
            for port in range.clone() {
                map.set(u32::from(port), value, 0)
                    .map_err(map_err(map_names::CHALLENGE_PORTS))?;
            }
        }
        Ok(())
    }

    /// Whether the challenge is on for a port.
    pub fn challenge_on(&self, port: u16) -> Result<bool, Error> {
        let map: Array<&MapData, u64> = Array::try_from(self.map(map_names::CHALLENGE_PORTS)?)
            .map_err(map_err(map_names::CHALLENGE_PORTS))?;
        Ok(map
            .get(&u32::from(port), 0)
            .map_err(map_err(map_names::CHALLENGE_PORTS))?
            != 0)
    }

    /// Forgets the sources proven longer than `ttl_ns` ago (by their last handshake); returns
    /// how many remain proven and how many were forgotten.
    pub fn expire_proven(&mut self, now_ns: u64, ttl_ns: u64) -> Result<(usize, usize), Error> {
        let mut proven: HashMap<&mut MapData, ProvenKey, u64> =
            HashMap::try_from(self.map_mut(map_names::PROVEN)?)
                .map_err(map_err(map_names::PROVEN))?;
        let entries: Vec<(ProvenKey, u64)> = proven.iter().filter_map(Result::ok).collect();
        let mut forgotten = 0;
        for (key, at) in &entries {
            if crate::sessions::proof_expired(*at, now_ns, ttl_ns) {
                match proven.remove(key) {
                    Ok(()) | Err(MapError::KeyNotFound) => forgotten += 1,
                    Err(source) => {
                        return Err(Error::Map {
                            map: map_names::PROVEN,
                            source,
                        });
                    }
                }
            }
        }
        Ok((entries.len() - forgotten, forgotten))
    }

    /// Every established flow the sessions table holds.
    pub fn flows(&self) -> Result<Vec<FlowKey>, Error> {
        let flows: HashMap<&MapData, FlowKey, FlowState> =
            HashMap::try_from(self.map(map_names::FLOWS)?).map_err(map_err(map_names::FLOWS))?;
        Ok(flows.keys().filter_map(Result::ok).collect())
    }

    /// Every tracked source with its state.
    pub fn sources(&self) -> Result<Vec<(SourceKey, SourceState)>, Error> {
        let sources: HashMap<&MapData, SourceKey, SourceState> =
            HashMap::try_from(self.map(map_names::SOURCES)?)
                .map_err(map_err(map_names::SOURCES))?;
        // Entries evicted while we walk just end the walk early for that key; skip them.
        Ok(sources.iter().filter_map(Result::ok).collect())
    }

    /// Writes one source's state (the penalty box from the CLI).
    pub fn set_source(&mut self, key: &SourceKey, state: &SourceState) -> Result<(), Error> {
        let mut sources: HashMap<&mut MapData, SourceKey, SourceState> =
            HashMap::try_from(self.map_mut(map_names::SOURCES)?)
                .map_err(map_err(map_names::SOURCES))?;
        sources
            .insert(key, state, 0)
            .map_err(map_err(map_names::SOURCES))?;
        // A lease or cached drop of this source must not outlive the change (a source put
        // in the box, or taken out, by hand).
        self.advance_lease_epoch()
    }

    /// The lease slot of `key`'s source on each CPU, by CPU, where it holds that source (in
    /// any epoch), with whether it is of the current epoch: pre-paid units or a cached drop
    /// count only then, counts of frames always (the program adds them to the source's
    /// state on its next exact check, whatever the epoch). See `limiter_common::lease`.
    pub fn leases(&self, key: &SourceKey) -> Result<Vec<Option<(Lease, bool)>>, Error> {
        let epoch: Array<&MapData, u64> = Array::try_from(self.map(map_names::LEASE_EPOCH)?)
            .map_err(map_err(map_names::LEASE_EPOCH))?;
        let epoch = epoch.get(&0, 0).map_err(map_err(map_names::LEASE_EPOCH))?;
        let leases: PerCpuArray<&MapData, Lease> =
            PerCpuArray::try_from(self.map(map_names::LEASES)?)
                .map_err(map_err(map_names::LEASES))?;
        let slot = lease_slot(key, LeaseBucket::Source as u8);
        let values = leases.get(&slot, 0).map_err(map_err(map_names::LEASES))?;
        Ok(values
            .iter()
            .map(|lease| {
                (lease.bucket == LeaseBucket::Source as u8 && lease.key == *key)
                    .then_some((*lease, epoch != 0 && lease.epoch == epoch))
            })
            .collect())
    }

    /// Packets pre-paid to `key`'s source on each CPU, by CPU.
    pub fn leased_units(&self, key: &SourceKey) -> Result<Vec<u32>, Error> {
        Ok(self
            .leases(key)?
            .iter()
            .map(|lease| match lease {
                Some((lease, true)) => lease.units,
                _ => 0,
            })
            .collect())
    }

    /// `key`'s state as the program has counted it: its `SOURCES` entry with the frames its
    /// lease slots passed or dropped and have not yet added, and the packets pre-paid to it
    /// on all CPUs (spent from its bucket, not yet used).
    pub fn source_counted(&self, key: &SourceKey) -> Result<Option<(SourceState, u64)>, Error> {
        let Some(mut state) = self.source(key)? else {
            return Ok(None);
        };
        let mut leased = 0;
        for (lease, current) in self.leases(key)?.into_iter().flatten() {
            state.passed = state.passed.wrapping_add(lease.passed);
            state.dropped = state.dropped.wrapping_add(lease.dropped);
            state.bytes += lease.bytes;
            if current {
                leased += u64::from(lease.units);
            }
        }
        Ok(Some((state, leased)))
    }

    /// Takes the ring buffer of source events, for a reader task.
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        self.ebpf
            .take_map(map_names::EVENTS)
            .and_then(|m| aya::maps::RingBuf::try_from(m).ok())
    }

    /// Capacity of the source table.
    pub fn sources_capacity(&self) -> u32 {
        self.ebpf
            .map(map_names::SOURCES)
            .and_then(|m| match m {
                aya::maps::Map::LruHashMap(data) => data.info().ok().map(|i| i.max_entries()),
                _ => None,
            })
            .unwrap_or(0)
    }
}

fn pinned_attach_mode(dir: &Path) -> Option<u32> {
    let map = MapData::from_pin(dir.join(map_names::CONFIG)).ok()?;
    let config: Array<MapData, Config> = Array::try_from(aya::maps::Map::Array(map)).ok()?;
    config.get(&0, 0).ok().map(|c| c.attach_mode)
}

/// `BPF_NOEXIST`: insert only if absent.
const BPF_NOEXIST: u64 = 1;

/// The pin of the sock_ops program's link, in the pin directory.
pub const SESSIONS_LINK_PIN: &str = "sessions_link";

/// Removes the link pin of a pin directory (detaching the program once no process holds
/// the link), keeping the maps.
pub fn remove_link_pin(dir: &Path) -> Result<(), Error> {
    remove_pin(&dir.join("link"))
}

/// Removes one pin; one that is already gone is fine.
fn remove_pin(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes the sock_ops link's pin of a pin directory (detaching it once no process holds
/// it).
pub fn remove_sessions_pin(dir: &Path) -> Result<(), Error> {
    remove_pin(&dir.join(SESSIONS_LINK_PIN))
}

/// A handle of its own on a pinned source table, for walks that must not hold the daemon.
pub fn open_pinned_sources(
    pin_dir: &Path,
) -> Result<HashMap<MapData, SourceKey, SourceState>, Error> {
    let data =
        MapData::from_pin(pin_dir.join(map_names::SOURCES)).map_err(map_err(map_names::SOURCES))?;
    HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_err(map_names::SOURCES))
}

/// Removes a pin directory: the link (which detaches the program once no process holds it)
/// and the maps.
pub fn remove_pins(dir: &Path) -> Result<(), Error> {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Io {
                path: dir.to_owned(),
                source,
            });
        }
    }
    // The layout directory and the pin root go too once nothing else is pinned in them;
    // `remove_dir` refuses a directory that is not empty, which is what we want.
    for parent in dir.ancestors().skip(1).take(2) {
        if fs::remove_dir(parent).is_err() {
            break;
        }
    }
    Ok(())
}

/// Inserts (or overwrites) one trie entry.
fn trie_insert<K: aya::Pod>(
    map: &mut aya::maps::Map,
    name: &'static str,
    addr: K,
    len: u8,
    entry: &PolicyEntry,
) -> Result<(), Error> {
    let mut trie: LpmTrie<&mut MapData, K, PolicyEntry> =
        LpmTrie::try_from(map).map_err(map_err(name))?;
    trie.insert(&Key::new(u32::from(len), addr), entry, 0)
        .map_err(map_err(name))
}

/// Removes one trie entry; one that is already gone is fine.
fn trie_remove<K: aya::Pod>(
    map: &mut aya::maps::Map,
    name: &'static str,
    addr: K,
    len: u8,
) -> Result<(), Error> {
    let mut trie: LpmTrie<&mut MapData, K, PolicyEntry> =
        LpmTrie::try_from(map).map_err(map_err(name))?;
    match trie.remove(&Key::new(u32::from(len), addr)) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(Error::Map { map: name, source }),
    }
}

/// How full one bounded map is: what an operator watches to raise a capacity before the
/// LRU starts evicting (sources, flows) or inserts start failing (policy tries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFill {
    /// The map's name, as pinned.
    pub map: &'static str,
    /// Entries in it now.
    pub entries: u64,
    /// Its capacity, as the kernel created it (so a configured `[capacity]` is reflected).
    pub capacity: u64,
}

/// The bounded maps whose fill [`pinned_map_fills`] reports.
const FILLED_MAPS: [&str; 7] = [
    map_names::SOURCES,
    map_names::AGGREGATES,
    map_names::PROVEN,
    map_names::FLOWS,
    map_names::CHALLENGE_BUDGET,
    map_names::POLICY_V4,
    map_names::POLICY_V6,
];

/// Counts the entries of every bounded map pinned in `pin_dir` (a key walk: one syscall per
/// entry, so it belongs on a background thread). `sources` is the source table's count when
/// the caller has just walked it, so it is not walked twice. A map that cannot be opened is
/// left out rather than reported as empty.
pub fn pinned_map_fills(pin_dir: &Path, sources: Option<u64>) -> Vec<MapFill> {
    let mut fills = Vec::with_capacity(FILLED_MAPS.len());
    for name in FILLED_MAPS {
        let path = pin_dir.join(name);
        let Ok(capacity) = MapInfo::from_pin(&path).map(|i| u64::from(i.max_entries())) else {
            continue;
        };
        let Ok(data) = MapData::from_pin(&path) else {
            continue;
        };
        let entries = match name {
            map_names::SOURCES => {
                sources.or_else(|| count_hash_keys::<SourceKey, SourceState>(data))
            }
            map_names::AGGREGATES => count_hash_keys::<SourceKey, Bucket>(data),
            map_names::PROVEN => count_hash_keys::<ProvenKey, u64>(data),
            map_names::FLOWS => count_hash_keys::<FlowKey, FlowState>(data),
            map_names::CHALLENGE_BUDGET => count_hash_keys::<ProvenKey, Bucket>(data),
            map_names::POLICY_V4 => count_trie_keys::<[u8; 4]>(data),
            _ => count_trie_keys::<[u8; 16]>(data),
        };
        if let Some(entries) = entries {
            fills.push(MapFill {
                map: name,
                entries,
                capacity,
            });
        }
    }
    fills
}

fn count_hash_keys<K: aya::Pod, V: aya::Pod>(data: MapData) -> Option<u64> {
    let map = HashMap::<_, K, V>::try_from(aya::maps::Map::LruHashMap(data)).ok()?;
    Some(map.keys().filter(Result::is_ok).count() as u64)
}

fn count_trie_keys<K: aya::Pod>(data: MapData) -> Option<u64> {
    let map = LpmTrie::<_, K, PolicyEntry>::try_from(aya::maps::Map::LpmTrie(data)).ok()?;
    Some(map.keys().filter(Result::is_ok).count() as u64)
}
