//! The daemon's configuration file: TOML, parsed strictly (an unknown key is an error) and
//! validated completely, policy compilation included, before anything is applied.
//!
//! Every key is documented in `docs/config.md`; `config/limiter.example.toml` shows them all.
//! Errors name the file and, where one is known, the line and column of the offending value:
//! `/etc/limiter/limiter.toml:12:14: ...`.

use std::{
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use limiter_common::layout::{ServiceProto, capacity};
use serde::Deserialize;
use toml::Spanned;

use crate::{
    input::{Name, Prefix, check_deny_width, check_rate},
    policy::{
        ChallengeMode, Class, DEFAULT_FLOW_ACKS, LimitSpec, Mode, Policy, PolicyError, ProvenAck,
        Rate, Service,
    },
};

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/limiter/limiter.sock";
/// Default address of the metrics endpoint.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 9810);
/// Default directory of the daemon's persistent state (runtime changes).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/limiter";
/// Default bpffs directory the program and maps are pinned under.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/limiter";

/// How the XDP program is attached.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// In the driver; fails if the driver has no XDP support.
    Native,
    /// In the generic (skb) path: works everywhere, much slower.
    Generic,
    /// Native, falling back to generic.
    #[default]
    Auto,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Auto => "auto",
        })
    }
}

/// The daemon's log output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// The control socket the CLI talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlSettings {
    /// Path of the Unix socket.
    pub socket: PathBuf,
    /// Group allowed read-only commands (status, stats); `None` = root only.
    pub group: Option<String>,
    /// Group allowed commands that change state; `None` = root only.
    pub admin_group: Option<String>,
}

impl Default for ControlSettings {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            group: None,
            admin_group: None,
        }
    }
}

/// The Prometheus endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsSettings {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Whether to enable and export the kernel's BPF run-time statistics.
    pub bpf_stats: bool,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            listen: DEFAULT_METRICS_LISTEN,
            bpf_stats: false,
        }
    }
}

/// Sizes of the state tables, fixed when the program is loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Entries of the source table.
    pub sources: u32,
    /// Entries of the aggregate table.
    pub aggregates: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            sources: capacity::SOURCES,
            aggregates: capacity::AGGREGATES,
        }
    }
}

/// Everything the configuration file states. A value returned by [`load_file`] or
/// [`parse_str`] has been fully validated: its policy compiles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileConfig {
    /// Interfaces to attach to.
    pub interfaces: Vec<String>,
    /// How to attach.
    pub attach_mode: AttachMode,
    /// The policy, list files already read in.
    pub policy: Policy,
    /// Table sizes.
    pub capacity: Capacity,
    /// The control socket.
    pub control: ControlSettings,
    /// The metrics endpoint.
    pub metrics: MetricsSettings,
    /// Where runtime changes are persisted.
    pub state_dir: PathBuf,
    /// Where the program and maps are pinned.
    pub pin_dir: PathBuf,
    /// Log output format.
    pub log_format: LogFormat,
    /// The cgroup v2 directory the sock_ops program attaches to; `None`: the root of the
    /// host's cgroup2 mount, found at start.
    pub sessions_cgroup: Option<PathBuf>,
    /// Attack records and their notifications.
    pub attacks: AttacksSettings,
    /// The fleet store; `None`: this host takes no fleet entries.
    pub fleet: Option<crate::fleet::FleetSettings>,
}

/// `[attacks]`: when the daemon records an attack, and whom it tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttacksSettings {
    /// The detector's thresholds (the aggregate prefix comes from the policy).
    pub detector: crate::attacks::AttackSettings,
    /// A command run at each attack's start and end (program and arguments), with the
    /// record as JSON on its standard input.
    pub notify_command: Vec<String>,
    /// How long the command may run before it is killed.
    pub notify_timeout_seconds: u64,
}

impl Default for AttacksSettings {
    fn default() -> Self {
        Self {
            detector: crate::attacks::AttackSettings::default(),
            notify_command: Vec::new(),
            notify_timeout_seconds: 10,
        }
    }
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            attach_mode: AttachMode::default(),
            policy: Policy::default(),
            capacity: Capacity::default(),
            control: ControlSettings::default(),
            metrics: MetricsSettings::default(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            log_format: LogFormat::default(),
            sessions_cgroup: None,
            attacks: AttacksSettings::default(),
            fleet: None,
        }
    }
}

/// A place in a file: `FILE`, `FILE:LINE` or `FILE:LINE:COLUMN` (both 1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The file.
    pub file: PathBuf,
    /// The line, when known.
    pub line: Option<u32>,
    /// The column in characters, when known (only with a line).
    pub column: Option<u32>,
}

impl Location {
    fn file(file: &Path) -> Self {
        Self {
            file: file.to_path_buf(),
            line: None,
            column: None,
        }
    }

    fn line(file: &Path, line: usize) -> Self {
        Self {
            file: file.to_path_buf(),
            line: Some(saturate(line)),
            column: None,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        Ok(())
    }
}

/// Why a configuration (or list) file was rejected. The message starts with the place:
/// `FILE:LINE:COLUMN: problem` when a position is known, `FILE: problem` otherwise.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read (the configuration file, or a list file read on its own).
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A list file named in the configuration could not be read.
    #[error("{at}: cannot read list file {}: {source}", path.display())]
    ListFile {
        /// Where the configuration names it.
        at: Location,
        /// The list file, resolved against the configuration file's directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A syntax error, an unknown key, a value of the wrong type or an invalid value, in the
    /// configuration or in a list file.
    #[error("{at}: {message}")]
    Invalid {
        /// Where.
        at: Location,
        /// What is wrong.
        message: String,
    },
    /// The policy the file states does not compile (overlapping classes or services, too
    /// many entries).
    #[error("{at}: {source}{}", Also(.also))]
    Policy {
        /// Where, as precisely as known.
        at: Location,
        /// The compiler's error.
        source: Box<PolicyError>,
        /// The other party of a conflict, when known.
        also: Option<Box<Location>>,
    },
}

impl ConfigError {
    /// Where the problem is, when it is in a file's text.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Self::Read { .. } => None,
            Self::ListFile { at, .. } | Self::Invalid { at, .. } | Self::Policy { at, .. } => {
                Some(at)
            }
        }
    }
}

struct Also<'a>(&'a Option<Box<Location>>);

impl fmt::Display for Also<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(other) => write!(f, " (the other is at {other})"),
            None => Ok(()),
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Reads and validates the configuration file at `path`.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_str(&text, path)
}

/// Parses and validates configuration text. `origin` names the file in errors, and relative
/// list-file paths are resolved against its directory.
pub fn parse_str(text: &str, origin: &Path) -> Result<FileConfig, ConfigError> {
    let src = Source { origin, text };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let at = match e.span() {
            Some(span) => src.at(span),
            None => Location::file(origin),
        };
        ConfigError::Invalid {
            at,
            message: e.message().trim_end().to_owned(),
        }
    })?;
    Builder {
        src,
        class_origins: Vec::new(),
        service_ports: Vec::new(),
        list_files: Vec::new(),
    }
    .build(raw)
}

/// A fleet policy document: the policy sections of a config file (`mode`, `block_seconds`,
/// `default_limit`, `[[class]]`, `[[service]]`), validated by the same checks. A host that
/// follows the fleet puts it in place of its own file's sections; the file keeps what is
/// the host's own (interfaces, lists, aggregation, spoofing, sessions, challenge).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyDocument {
    /// Enforce or monitor.
    pub mode: Mode,
    /// Penalty box duration of limits that do not state their own.
    pub block_seconds: u64,
    /// The limit of every source not in a class or service rule.
    pub default_limit: LimitSpec,
    /// Classes by source prefix.
    pub classes: Vec<Class>,
    /// Service rules by destination port.
    pub services: Vec<Service>,
}

impl PolicyDocument {
    /// `file` with its policy sections replaced by this document's.
    pub fn overlay(&self, file: &Policy) -> Policy {
        Policy {
            mode: self.mode,
            block_seconds: self.block_seconds,
            default_limit: self.default_limit,
            classes: self.classes.clone(),
            services: self.services.clone(),
            ..file.clone()
        }
    }
}

/// Parses and validates a fleet policy document with the checks `limiter check` applies to
/// the same sections of a config file, compilation included. Anything else (interfaces,
/// lists, list files) is refused: those belong to each host.
pub fn parse_policy_document(text: &str, origin: &Path) -> Result<PolicyDocument, ConfigError> {
    let src = Source { origin, text };
    let raw: RawPolicyDocument = toml::from_str(text).map_err(|e| ConfigError::Invalid {
        at: e
            .span()
            .map_or_else(|| Location::file(origin), |span| src.at(span)),
        message: format!(
            "{} (a fleet policy holds only mode, block_seconds, default_limit, [[class]] and \
             [[service]])",
            e.message().trim_end()
        ),
    })?;
    for class in &raw.classes {
        if let Some(file) = class.get_ref().prefix_files.first() {
            return Err(src.invalid(
                file.span(),
                "prefix_files name files on one host: a fleet policy lists its prefixes inline",
            ));
        }
    }
    let mut builder = Builder {
        src,
        class_origins: Vec::new(),
        service_ports: Vec::new(),
        list_files: Vec::new(),
    };
    let policy = builder.policy_sections(
        raw.mode,
        raw.block_seconds,
        raw.default_limit.as_ref(),
        &raw.classes,
        &raw.services,
    )?;
    if let Err(e) = policy.compile() {
        return Err(builder.policy_error(e, &policy));
    }
    Ok(PolicyDocument {
        mode: policy.mode,
        block_seconds: policy.block_seconds,
        default_limit: policy.default_limit,
        classes: policy.classes,
        services: policy.services,
    })
}

/// Parses and validates the document of a fleet policy as read from the store; errors
/// name it by its version.
pub fn parse_fleet_policy(
    policy: &crate::fleet::FleetPolicy,
) -> Result<PolicyDocument, ConfigError> {
    parse_policy_document(
        &policy.document,
        Path::new(&format!("fleet policy version {}", policy.version)),
    )
}

/// Reads a prefix list: one CIDR prefix (or a bare address, meaning /32 or /128) per line;
/// `#` starts a comment, whole-line or trailing; blank lines are ignored. Errors name the file
/// and line.
pub fn read_prefix_list(path: &Path) -> Result<Vec<IpNet>, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_list(&text, path)?
        .into_iter()
        .map(|(net, _)| net)
        .collect())
}

// ---------------------------------------------------------------------------------------------
// The file as written.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    mode: Option<Mode>,
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    attach_mode: Option<AttachMode>,
    state_dir: Option<Spanned<String>>,
    pin_dir: Option<Spanned<String>>,
    log_format: Option<LogFormat>,
    block_seconds: Option<u64>,
    default_limit: Option<Spanned<RawLimit>>,
    #[serde(default, rename = "class")]
    classes: Vec<Spanned<RawClass>>,
    #[serde(default, rename = "service")]
    services: Vec<Spanned<RawService>>,
    #[serde(default)]
    allowlist: RawList,
    #[serde(default)]
    denylist: RawDenyList,
    #[serde(default)]
    aggregation: RawAggregation,
    #[serde(default)]
    spoofing: RawSpoofing,
    #[serde(default)]
    sessions: RawSessions,
    #[serde(default)]
    challenge: RawChallenge,
    #[serde(default)]
    capacity: RawCapacity,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    attacks: RawAttacks,
    fleet: Option<Spanned<RawFleet>>,
}

/// A fleet policy document as written: the policy sections of [`RawFile`], nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicyDocument {
    mode: Option<Mode>,
    block_seconds: Option<u64>,
    default_limit: Option<Spanned<RawLimit>>,
    #[serde(default, rename = "class")]
    classes: Vec<Spanned<RawClass>>,
    #[serde(default, rename = "service")]
    services: Vec<Spanned<RawService>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    #[serde(default)]
    endpoints: Vec<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    #[serde(default)]
    never_deny: Vec<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    publish_attacks: Option<crate::fleet::PublishAttacks>,
    publish_attacks_max: Option<Spanned<u64>>,
    publish_attacks_seconds: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAttacks {
    min_packets_per_second: Option<Spanned<u64>>,
    start_seconds: Option<Spanned<u64>>,
    end_seconds: Option<Spanned<u64>>,
    summary_seconds: Option<Spanned<u64>>,
    notify_command: Option<Spanned<Vec<String>>>,
    notify_timeout_seconds: Option<Spanned<u64>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawProto {
    Tcp,
    Udp,
}

type Num = Option<Spanned<u64>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    unlimited: Option<Spanned<bool>>,
    packets_per_second: Num,
    burst_packets: Num,
    bytes_per_second: Num,
    burst_bytes: Num,
    aggregate_packets_per_second: Num,
    aggregate_burst_packets: Num,
    connections_per_second: Num,
    burst_connections: Num,
    acks_per_second: Num,
    burst_acks: Num,
    block_seconds: Num,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    name: Spanned<String>,
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
    #[serde(default)]
    prefix_files: Vec<Spanned<String>>,
    limit: Option<Spanned<RawLimit>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    protocol: RawProto,
    ports: Spanned<toml::Value>,
    limit: Option<Spanned<RawLimit>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawList {
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
    #[serde(default)]
    files: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDenyList {
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
    #[serde(default)]
    files: Vec<Spanned<String>>,
    force: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAggregation {
    source_prefix_v4: Option<Spanned<i64>>,
    source_prefix_v6: Option<Spanned<i64>>,
    aggregate_prefix_v4: Option<Spanned<i64>>,
    aggregate_prefix_v6: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSpoofing {
    new_sources_per_second_per_cpu: Num,
    new_sources_burst: Num,
    shared_packets_per_second: Num,
    shared_burst_packets: Num,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSessions {
    enabled: Option<bool>,
    cgroup: Option<Spanned<String>>,
    unproven_packets_per_second: Num,
    unproven_burst_packets: Num,
    out_of_state_packets_per_second: Num,
    out_of_state_burst_packets: Num,
    proven_seconds: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawChallenge {
    mode: Option<ChallengeMode>,
    proven_ack: Option<ProvenAck>,
    #[serde(default)]
    ports: Vec<Spanned<toml::Value>>,
    engage_syns_per_second: Option<Spanned<u64>>,
    engage_seconds: Option<Spanned<u64>>,
    calm_seconds: Option<Spanned<u64>>,
    replies_per_prefix_per_second: Num,
    replies_burst: Num,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCapacity {
    sources: Option<Spanned<u32>>,
    aggregates: Option<Spanned<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    admin_group: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
    bpf_stats: Option<bool>,
}

// ---------------------------------------------------------------------------------------------
// Positions.

struct Source<'a> {
    origin: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn at(&self, span: Range<usize>) -> Location {
        let (line, column) = line_column(self.text, span.start);
        Location {
            file: self.origin.to_path_buf(),
            line: Some(saturate(line)),
            column: Some(saturate(column)),
        }
    }

    fn invalid(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            at: self.at(span),
            message: message.into(),
        }
    }

    /// A list file named in the configuration, resolved against its directory.
    fn resolve(&self, written: &str) -> PathBuf {
        let path = Path::new(written);
        match self.origin.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = text
        .get(line_start..offset)
        .map_or(offset - line_start, |s| s.chars().count());
    (line, column + 1)
}

/// Where one class prefix was written, to place overlap errors.
enum Origin {
    Config(Range<usize>),
    List { file: usize, line: usize },
}

// ---------------------------------------------------------------------------------------------
// Validation.

struct Builder<'a> {
    src: Source<'a>,
    /// Per class: each prefix and where it came from.
    class_origins: Vec<Vec<(IpNet, Origin)>>,
    /// Per service: the span of its `ports`.
    service_ports: Vec<Range<usize>>,
    /// List files read, indexed by `Origin::List::file`.
    list_files: Vec<PathBuf>,
}

impl Builder<'_> {
    fn build(mut self, raw: RawFile) -> Result<FileConfig, ConfigError> {
        let defaults = FileConfig::default();
        let mut policy = self.policy_sections(
            raw.mode,
            raw.block_seconds,
            raw.default_limit.as_ref(),
            &raw.classes,
            &raw.services,
        )?;

        let mut allow = Vec::new();
        self.prefixes(&raw.allowlist.prefixes, &raw.allowlist.files, &mut allow)?;
        policy.allow = allow.into_iter().map(|(net, _)| net).collect();
        let mut deny = Vec::new();
        self.prefixes(&raw.denylist.prefixes, &raw.denylist.files, &mut deny)?;
        let force = raw.denylist.force.unwrap_or(false);
        for (net, origin) in &deny {
            let prefix = Prefix::new(*net).map_err(|e| self.invalid_at(origin, e.0))?;
            check_deny_width(prefix, force, "set force = true in [denylist]")
                .map_err(|e| self.invalid_at(origin, e.0))?;
        }
        policy.deny = deny.into_iter().map(|(net, _)| net).collect();

        self.aggregation(&raw.aggregation, &mut policy)?;
        self.spoofing(&raw.spoofing, &mut policy)?;
        let sessions_cgroup = self.sessions(&raw.sessions, &mut policy)?;
        self.challenge(&raw.challenge, &mut policy)?;

        let config = FileConfig {
            interfaces: self.interfaces(&raw.interfaces)?,
            attach_mode: raw.attach_mode.unwrap_or_default(),
            capacity: Capacity {
                sources: self.capacity(
                    "sources",
                    &raw.capacity.sources,
                    defaults.capacity.sources,
                )?,
                aggregates: self.capacity(
                    "aggregates",
                    &raw.capacity.aggregates,
                    defaults.capacity.aggregates,
                )?,
            },
            control: ControlSettings {
                socket: self.absolute("socket", &raw.control.socket, DEFAULT_SOCKET)?,
                group: self.group("group", &raw.control.group)?,
                admin_group: self.group("admin_group", &raw.control.admin_group)?,
            },
            metrics: MetricsSettings {
                listen: self.listen(&raw.metrics.listen)?,
                bpf_stats: raw.metrics.bpf_stats.unwrap_or(defaults.metrics.bpf_stats),
            },
            state_dir: self.absolute("state_dir", &raw.state_dir, DEFAULT_STATE_DIR)?,
            pin_dir: self.absolute("pin_dir", &raw.pin_dir, DEFAULT_PIN_DIR)?,
            log_format: raw.log_format.unwrap_or_default(),
            sessions_cgroup,
            attacks: self.attacks(&raw.attacks, &policy)?,
            fleet: self.fleet(raw.fleet.as_ref(), &mut policy)?,
            policy,
        };
        if let Err(e) = config.policy.compile() {
            return Err(self.policy_error(e, &config.policy));
        }
        Ok(config)
    }

    /// The policy sections, shared by config files and fleet policy documents: mode,
    /// block_seconds, default_limit, classes and services.
    fn policy_sections(
        &mut self,
        mode: Option<Mode>,
        block_seconds: Option<u64>,
        default_limit: Option<&Spanned<RawLimit>>,
        classes: &[Spanned<RawClass>],
        services: &[Spanned<RawService>],
    ) -> Result<Policy, ConfigError> {
        let mut policy = Policy {
            mode: mode.unwrap_or_default(),
            block_seconds: block_seconds.unwrap_or(Policy::default().block_seconds),
            ..Policy::default()
        };
        if let Some(limit) = default_limit {
            policy.default_limit = self.limit("default_limit", limit)?;
        }

        let mut names: Vec<(String, Range<usize>)> = Vec::new();
        for class in classes {
            let c = class.get_ref();
            let name = self.name("class", &c.name, &mut names)?;
            let what = format!("class {name:?}");
            let limit = self.required_limit(&what, "[class.limit]", class, &c.limit)?;
            if c.prefixes.is_empty() && c.prefix_files.is_empty() {
                return Err(self.src.invalid(
                    class.span(),
                    format!("{what} has no prefixes: give prefixes, prefix_files or both"),
                ));
            }
            let mut origins = Vec::new();
            self.prefixes(&c.prefixes, &c.prefix_files, &mut origins)?;
            policy.classes.push(Class {
                name,
                prefixes: origins.iter().map(|(net, _)| *net).collect(),
                limit,
            });
            self.class_origins.push(origins);
        }

        for service in services {
            let s = service.get_ref();
            let name = self.name("service", &s.name, &mut names)?;
            let what = format!("service {name:?}");
            let limit = self.required_limit(&what, "[service.limit]", service, &s.limit)?;
            let (first, last) = self.ports(&what, &s.ports)?;
            policy.services.push(Service {
                name,
                proto: match s.protocol {
                    RawProto::Tcp => ServiceProto::Tcp,
                    RawProto::Udp => ServiceProto::Udp,
                },
                ports: first..=last,
                limit,
            });
            self.service_ports.push(s.ports.span());
        }
        Ok(policy)
    }

    /// A class or service name ([`Name`]), not used before.
    fn name(
        &self,
        kind: &str,
        name: &Spanned<String>,
        seen: &mut Vec<(String, Range<usize>)>,
    ) -> Result<String, ConfigError> {
        let text = name.get_ref();
        Name::parse(kind, text).map_err(|e| self.src.invalid(name.span(), e.0))?;
        if let Some((_, first)) = seen.iter().find(|(n, _)| n == text) {
            let (line, _) = line_column(self.src.text, first.start);
            return Err(self.src.invalid(
                name.span(),
                format!(
                    "{kind} name {text:?} is already used on line {line} \
                     (class and service names must be unique)"
                ),
            ));
        }
        seen.push((text.clone(), name.span()));
        Ok(text.clone())
    }

    fn required_limit<T>(
        &self,
        what: &str,
        table: &str,
        owner: &Spanned<T>,
        limit: &Option<Spanned<RawLimit>>,
    ) -> Result<LimitSpec, ConfigError> {
        match limit {
            Some(limit) => self.limit(&format!("{what} limit"), limit),
            None => Err(self.src.invalid(
                owner.span(),
                format!("{what} has no limit: add a {table} table (or `limit = {{ ... }}`)"),
            )),
        }
    }

    fn limit(&self, what: &str, raw: &Spanned<RawLimit>) -> Result<LimitSpec, ConfigError> {
        let l = raw.get_ref();
        let rates = [
            ("packets_per_second", &l.packets_per_second),
            ("burst_packets", &l.burst_packets),
            ("bytes_per_second", &l.bytes_per_second),
            ("burst_bytes", &l.burst_bytes),
            (
                "aggregate_packets_per_second",
                &l.aggregate_packets_per_second,
            ),
            ("aggregate_burst_packets", &l.aggregate_burst_packets),
            ("connections_per_second", &l.connections_per_second),
            ("burst_connections", &l.burst_connections),
            ("acks_per_second", &l.acks_per_second),
            ("burst_acks", &l.burst_acks),
            ("block_seconds", &l.block_seconds),
        ];
        let given: Vec<&str> = rates
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| *k)
            .collect();
        if let Some(unlimited) = &l.unlimited
            && *unlimited.get_ref()
        {
            if !given.is_empty() {
                return Err(self.src.invalid(
                    unlimited.span(),
                    format!(
                        "{what}: unlimited = true cannot be combined with rate keys (found {})",
                        given.join(", ")
                    ),
                ));
            }
            return Ok(LimitSpec::unlimited());
        }
        if given.is_empty() {
            return Err(self.src.invalid(
                raw.span(),
                format!(
                    "{what} states no limit: give packets_per_second and burst_packets \
                     (and/or the byte or aggregate pair), or unlimited = true"
                ),
            ));
        }
        Ok(LimitSpec {
            packets: self.pair(
                what,
                ("packets_per_second", &l.packets_per_second),
                ("burst_packets", &l.burst_packets),
            )?,
            bytes: self.pair(
                what,
                ("bytes_per_second", &l.bytes_per_second),
                ("burst_bytes", &l.burst_bytes),
            )?,
            aggregate: self.pair(
                what,
                (
                    "aggregate_packets_per_second",
                    &l.aggregate_packets_per_second,
                ),
                ("aggregate_burst_packets", &l.aggregate_burst_packets),
            )?,
            connections: self.pair(
                what,
                ("connections_per_second", &l.connections_per_second),
                ("burst_connections", &l.burst_connections),
            )?,
            // The one pair with a default when left out: no ACK budget would mean either
            // unlimited ACKs or ACKs spending the packet budget, and a table that does not
            // mention ACKs means neither.
            acks: self
                .pair(
                    what,
                    ("acks_per_second", &l.acks_per_second),
                    ("burst_acks", &l.burst_acks),
                )?
                .or(Some(DEFAULT_FLOW_ACKS)),
            block_seconds: match &l.block_seconds {
                Some(b) => Some(self.block_seconds(what, b)?),
                None => None,
            },
        })
    }

    fn challenge(&self, raw: &RawChallenge, policy: &mut Policy) -> Result<(), ConfigError> {
        let c = &mut policy.challenge;
        c.mode = raw.mode.unwrap_or_default();
        c.proven_ack = raw.proven_ack.unwrap_or_default();
        for ports in &raw.ports {
            let (first, last) = self.ports("challenge", ports)?;
            c.ports.push(first..=last);
        }
        if c.mode != ChallengeMode::Off && c.ports.is_empty() {
            return Err(self.src.invalid(
                0..0,
                format!(
                    "[challenge] mode = \"{}\" protects no port: list the TCP ports in \
                     `ports` (e.g. [\"443\", \"8080-8090\"])",
                    if c.mode == ChallengeMode::On {
                        "on"
                    } else {
                        "auto"
                    }
                ),
            ));
        }
        let seconds = |value: &Option<Spanned<u64>>, key: &str, default: u64| match value {
            None => Ok(default),
            Some(v) if (1..=3_600).contains(v.get_ref()) => Ok(*v.get_ref()),
            Some(v) => Err(self.src.invalid(
                v.span(),
                format!("challenge: {key} = {} must be 1 to 3600", v.get_ref()),
            )),
        };
        c.engage_seconds = seconds(&raw.engage_seconds, "engage_seconds", c.engage_seconds)?;
        c.calm_seconds = seconds(&raw.calm_seconds, "calm_seconds", c.calm_seconds)?;
        if let Some(v) = &raw.engage_syns_per_second {
            if *v.get_ref() == 0 {
                return Err(self.src.invalid(
                    v.span(),
                    "challenge: engage_syns_per_second = 0 would never disengage; use mode = \"on\"",
                ));
            }
            c.engage_syns_per_second = *v.get_ref();
        }
        if let Some(rate) = self.pair(
            "challenge",
            (
                "replies_per_prefix_per_second",
                &raw.replies_per_prefix_per_second,
            ),
            ("replies_burst", &raw.replies_burst),
        )? {
            c.replies_per_prefix = rate;
        }
        Ok(())
    }

    fn attacks(&self, raw: &RawAttacks, policy: &Policy) -> Result<AttacksSettings, ConfigError> {
        let defaults = AttacksSettings::default();
        let bounded = |value: &Option<Spanned<u64>>,
                       key: &str,
                       range: std::ops::RangeInclusive<u64>,
                       default: u64| match value {
            None => Ok(default),
            Some(v) if range.contains(v.get_ref()) => Ok(*v.get_ref()),
            Some(v) => Err(self.src.invalid(
                v.span(),
                format!(
                    "attacks: {key} = {} must be {} to {}",
                    v.get_ref(),
                    range.start(),
                    range.end()
                ),
            )),
        };
        let d = &defaults.detector;
        let seconds = |v: &Option<Spanned<u64>>, key: &str, default: u32| {
            bounded(v, key, 1..=3_600, u64::from(default)).map(|s| s as u32)
        };
        let notify_command = match &raw.notify_command {
            None => Vec::new(),
            Some(c) if c.get_ref().is_empty() => Vec::new(),
            Some(c) if !Path::new(&c.get_ref()[0]).is_absolute() => {
                return Err(self.src.invalid(
                    c.span(),
                    format!(
                        "attacks: notify_command must start with an absolute path, not {:?}",
                        c.get_ref()[0]
                    ),
                ));
            }
            Some(c) => c.get_ref().clone(),
        };
        Ok(AttacksSettings {
            detector: crate::attacks::AttackSettings {
                min_packets_per_second: bounded(
                    &raw.min_packets_per_second,
                    "min_packets_per_second",
                    1..=u64::from(u32::MAX),
                    d.min_packets_per_second,
                )?,
                start_seconds: seconds(&raw.start_seconds, "start_seconds", d.start_seconds)?,
                end_seconds: seconds(&raw.end_seconds, "end_seconds", d.end_seconds)?,
                summary_seconds: seconds(
                    &raw.summary_seconds,
                    "summary_seconds",
                    d.summary_seconds,
                )?,
                aggregate_prefix: (policy.aggregate_prefix_v4, policy.aggregate_prefix_v6),
            },
            notify_command,
            notify_timeout_seconds: bounded(
                &raw.notify_timeout_seconds,
                "notify_timeout_seconds",
                1..=300,
                defaults.notify_timeout_seconds,
            )?,
        })
    }

    fn block_seconds(&self, what: &str, value: &Spanned<u64>) -> Result<u64, ConfigError> {
        crate::input::check_block_seconds(*value.get_ref())
            .map_err(|e| self.src.invalid(value.span(), format!("{what}: {}", e.0)))
    }

    fn sessions(
        &self,
        raw: &RawSessions,
        policy: &mut Policy,
    ) -> Result<Option<PathBuf>, ConfigError> {
        policy.sessions = raw.enabled.unwrap_or(true);
        if let Some(seconds) = &raw.proven_seconds {
            if !(1..=365 * 86_400).contains(seconds.get_ref()) {
                return Err(self.src.invalid(
                    seconds.span(),
                    format!(
                        "sessions: proven_seconds = {} must be 1 to 31536000 (a year)",
                        seconds.get_ref()
                    ),
                ));
            }
            policy.proven_seconds = *seconds.get_ref();
        }
        if let Some(rate) = self.pair(
            "sessions",
            (
                "unproven_packets_per_second",
                &raw.unproven_packets_per_second,
            ),
            ("unproven_burst_packets", &raw.unproven_burst_packets),
        )? {
            policy.unproven = rate;
        }
        if let Some(rate) = self.pair(
            "sessions",
            (
                "out_of_state_packets_per_second",
                &raw.out_of_state_packets_per_second,
            ),
            (
                "out_of_state_burst_packets",
                &raw.out_of_state_burst_packets,
            ),
        )? {
            policy.out_of_state = rate;
        }
        match &raw.cgroup {
            None => Ok(None),
            some => self.absolute("sessions.cgroup", some, "/").map(Some),
        }
    }

    /// A rate and its burst: both or neither.
    fn pair(
        &self,
        what: &str,
        (rate_key, rate): (&str, &Num),
        (burst_key, burst): (&str, &Num),
    ) -> Result<Option<Rate>, ConfigError> {
        match (rate, burst) {
            (None, None) => Ok(None),
            (Some(r), None) => Err(self.src.invalid(
                r.span(),
                format!("{what}: {rate_key} is set without {burst_key}; give both or neither"),
            )),
            (None, Some(b)) => Err(self.src.invalid(
                b.span(),
                format!("{what}: {burst_key} is set without {rate_key}; give both or neither"),
            )),
            (Some(r), Some(b)) => {
                let rate = Rate::new(*r.get_ref(), *b.get_ref());
                check_rate(rate.per_second, rate.burst).map_err(|e| {
                    self.src.invalid(
                        r.span(),
                        format!(
                            "{what}: {rate_key} = {}, {burst_key} = {}: {e}",
                            rate.per_second, rate.burst
                        ),
                    )
                })?;
                Ok(Some(rate))
            }
        }
    }

    /// `"443"`, `"8080-8090"` or `443`.
    fn ports(&self, what: &str, ports: &Spanned<toml::Value>) -> Result<(u16, u16), ConfigError> {
        let bad = |detail: String| {
            self.src.invalid(
                ports.span(),
                format!("{what}: ports {}: {detail}", display_value(ports.get_ref())),
            )
        };
        let port = |text: &str| -> Result<u16, ConfigError> {
            let text = text.trim();
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(
                    "expected a port (\"443\"), a range (\"8080-8090\") or an integer".to_owned(),
                ));
            }
            text.parse::<u16>()
                .map_err(|_| bad(format!("{text} is not a port (0-65535)")))
        };
        match ports.get_ref() {
            toml::Value::Integer(n) => u16::try_from(*n)
                .map(|p| (p, p))
                .map_err(|_| bad(format!("{n} is not a port (0-65535)"))),
            toml::Value::String(s) => {
                let (first, last) = match s.split_once('-') {
                    Some((a, b)) => (port(a)?, port(b)?),
                    None => {
                        let p = port(s)?;
                        (p, p)
                    }
                };
                if first > last {
                    return Err(bad(format!("the range is empty ({first} is above {last})")));
                }
                Ok((first, last))
            }
            _ => Err(bad(
                "expected a port (\"443\"), a range (\"8080-8090\") or an integer".to_owned(),
            )),
        }
    }

    /// Prefixes written inline and read from list files, with where each came from.
    fn prefixes(
        &mut self,
        inline: &[Spanned<String>],
        files: &[Spanned<String>],
        out: &mut Vec<(IpNet, Origin)>,
    ) -> Result<(), ConfigError> {
        for p in inline {
            let net = parse_prefix(p.get_ref()).map_err(|m| self.src.invalid(p.span(), m))?;
            out.push((net, Origin::Config(p.span())));
        }
        for f in files {
            let path = self.src.resolve(f.get_ref());
            let text = fs::read_to_string(&path).map_err(|source| ConfigError::ListFile {
                at: self.src.at(f.span()),
                path: path.clone(),
                source,
            })?;
            let listed = parse_list(&text, &path).map_err(|e| match e {
                ConfigError::Invalid { at, message } => ConfigError::Invalid {
                    at,
                    message: format!("{message} (list file named at {})", self.src.at(f.span())),
                },
                other => other,
            })?;
            let file = self.list_files.len();
            self.list_files.push(path);
            out.extend(
                listed
                    .into_iter()
                    .map(|(net, line)| (net, Origin::List { file, line })),
            );
        }
        Ok(())
    }

    fn aggregation(&self, raw: &RawAggregation, policy: &mut Policy) -> Result<(), ConfigError> {
        let families = [
            (
                "IPv4",
                32,
                ("source_prefix_v4", &raw.source_prefix_v4),
                ("aggregate_prefix_v4", &raw.aggregate_prefix_v4),
                (
                    &mut policy.source_prefix_v4,
                    &mut policy.aggregate_prefix_v4,
                ),
            ),
            (
                "IPv6",
                128,
                ("source_prefix_v6", &raw.source_prefix_v6),
                ("aggregate_prefix_v6", &raw.aggregate_prefix_v6),
                (
                    &mut policy.source_prefix_v6,
                    &mut policy.aggregate_prefix_v6,
                ),
            ),
        ];
        for (family, max, (source_key, source), (aggregate_key, aggregate), (s, a)) in families {
            for (key, value, slot) in [
                (source_key, source, &mut *s),
                (aggregate_key, aggregate, &mut *a),
            ] {
                if let Some(v) = value {
                    *slot = u8::try_from(*v.get_ref())
                        .ok()
                        .filter(|n| (1..=max).contains(n))
                        .ok_or_else(|| {
                            self.src.invalid(
                                v.span(),
                                format!(
                                    "{key} = {} is out of range: {family} prefix lengths are 1-{max}",
                                    v.get_ref()
                                ),
                            )
                        })?;
                }
            }
            if *a > *s {
                let (span, note) = match (aggregate, source) {
                    (Some(v), _) => (v.span(), ""),
                    (None, Some(v)) => (v.span(), " (the default)"),
                    (None, None) => unreachable!("the defaults are consistent"),
                };
                return Err(self.src.invalid(
                    span,
                    format!(
                        "{aggregate_key} = {a}{note} is longer than {source_key} = {s}: \
                         the aggregate prefix must contain the source prefix"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn spoofing(&self, raw: &RawSpoofing, policy: &mut Policy) -> Result<(), ConfigError> {
        let rate_key = "new_sources_per_second_per_cpu";
        let burst_key = "new_sources_burst";
        match (&raw.new_sources_per_second_per_cpu, &raw.new_sources_burst) {
            (None, None) => {}
            (Some(r), burst) if *r.get_ref() == 0 => {
                if let Some(b) = burst.as_ref().filter(|b| *b.get_ref() != 0) {
                    return Err(self.src.invalid(
                        b.span(),
                        format!(
                            "spoofing: {rate_key} = 0 means uncapped and takes no burst; \
                             remove {burst_key} or set it to 0"
                        ),
                    ));
                }
                policy.new_sources_per_cpu = None;
            }
            (rate, burst) => {
                policy.new_sources_per_cpu =
                    self.pair("spoofing", (rate_key, rate), (burst_key, burst))?;
            }
        }
        if let Some(shared) = self.pair(
            "spoofing",
            ("shared_packets_per_second", &raw.shared_packets_per_second),
            ("shared_burst_packets", &raw.shared_burst_packets),
        )? {
            policy.shared = shared;
        }
        Ok(())
    }

    fn interfaces(&self, raw: &[Spanned<String>]) -> Result<Vec<String>, ConfigError> {
        let mut out: Vec<String> = Vec::with_capacity(raw.len());
        for name in raw {
            let text = name.get_ref();
            // The kernel's own rule (dev_valid_name): 1-15 bytes, not "." or "..", no '/',
            // ':' or white space.
            let valid = !text.is_empty()
                && text.len() < 16
                && text != "."
                && text != ".."
                && !text
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
            if !valid {
                return Err(self.src.invalid(
                    name.span(),
                    format!(
                        "interfaces: {text:?} is not an interface name \
                         (1-15 bytes, no '/', ':' or white space)"
                    ),
                ));
            }
            if out.contains(text) {
                return Err(self
                    .src
                    .invalid(name.span(), format!("interfaces: {text:?} is listed twice")));
            }
            out.push(text.clone());
        }
        Ok(out)
    }

    fn capacity(
        &self,
        key: &str,
        value: &Option<Spanned<u32>>,
        default: u32,
    ) -> Result<u32, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if *v.get_ref() == 0 => Err(self
                .src
                .invalid(v.span(), format!("capacity: {key} must be at least 1"))),
            Some(v) => Ok(*v.get_ref()),
        }
    }

    /// `[fleet]`: where the store is, how to log in, and what no fleet entry may deny.
    fn fleet(
        &mut self,
        raw: Option<&Spanned<RawFleet>>,
        policy: &mut Policy,
    ) -> Result<Option<crate::fleet::FleetSettings>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        let table = raw.span();
        let raw = raw.get_ref();
        if raw.endpoints.is_empty() {
            return Err(self.src.invalid(
                table,
                "[fleet] needs endpoints, the etcd client URLs (\"http://10.0.0.1:2379\")",
            ));
        }
        let mut endpoints = Vec::new();
        for e in &raw.endpoints {
            let text = e.get_ref();
            let ok = ["http://", "https://"].iter().any(|scheme| {
                text.strip_prefix(scheme)
                    .is_some_and(|rest| !rest.is_empty())
            });
            if !ok {
                return Err(self.src.invalid(
                    e.span(),
                    format!("fleet endpoint {text:?} is not an http:// or https:// URL"),
                ));
            }
            endpoints.push(text.clone());
        }
        let prefix = match &raw.prefix {
            None => "/limiter".to_owned(),
            Some(p) => {
                let text = p.get_ref();
                if !text.starts_with('/') || text.ends_with('/') || text.len() < 2 {
                    return Err(self.src.invalid(
                        p.span(),
                        format!("fleet prefix {text:?} must start with / and not end with one"),
                    ));
                }
                text.clone()
            }
        };
        let credentials = match (&raw.user, &raw.password_file) {
            (None, None) => None,
            (Some(user), Some(file)) => {
                let path = self.src.resolve(file.get_ref());
                let password =
                    fs::read_to_string(&path).map_err(|source| ConfigError::ListFile {
                        at: self.src.at(file.span()),
                        path: path.clone(),
                        source,
                    })?;
                Some((
                    user.get_ref().clone(),
                    password.trim_end_matches('\n').to_owned(),
                ))
            }
            _ => {
                return Err(self
                    .src
                    .invalid(table, "[fleet] user and password_file go together"));
            }
        };
        let tls = match (&raw.ca_file, &raw.cert_file, &raw.key_file) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => {
                let file = |written: &Spanned<String>| {
                    let path = self.src.resolve(written.get_ref());
                    // Read now, so `limiter check` finds a missing or unreadable file.
                    fs::metadata(&path)
                        .and_then(|_| fs::File::open(&path))
                        .map_err(|source| ConfigError::ListFile {
                            at: self.src.at(written.span()),
                            path: path.clone(),
                            source,
                        })?;
                    Ok::<_, ConfigError>(path)
                };
                Some(crate::fleet::TlsFiles {
                    ca_file: file(ca)?,
                    cert_file: file(cert)?,
                    key_file: file(key)?,
                })
            }
            _ => {
                return Err(self.src.invalid(
                    table,
                    "[fleet] ca_file, cert_file and key_file go together (client certificates)",
                ));
            }
        };
        for (e, text) in raw.endpoints.iter().zip(&endpoints) {
            if text.starts_with("https://") != tls.is_some() {
                return Err(self.src.invalid(
                    e.span(),
                    if tls.is_some() {
                        format!("fleet endpoint {text:?}: with client certificates the endpoints are https://")
                    } else {
                        format!("fleet endpoint {text:?}: https:// needs ca_file, cert_file and key_file")
                    },
                ));
            }
        }
        let mut never_deny = Vec::new();
        self.prefixes(&raw.never_deny, &[], &mut never_deny)?;
        policy.fleet_never_deny = never_deny.into_iter().map(|(net, _)| net).collect();
        let defaults = crate::fleet::PublishSettings::default();
        let bounded = |value: &Option<Spanned<u64>>,
                       name: &str,
                       range: std::ops::RangeInclusive<u64>,
                       default: u64| match value {
            None => Ok(default),
            Some(v) if range.contains(v.get_ref()) => Ok(*v.get_ref()),
            Some(v) => Err(self.src.invalid(
                v.span(),
                format!("{name} must be {} to {}", range.start(), range.end()),
            )),
        };
        let publish = crate::fleet::PublishSettings {
            mode: raw.publish_attacks.unwrap_or(defaults.mode),
            max: bounded(
                &raw.publish_attacks_max,
                "publish_attacks_max",
                1..=1_000,
                defaults.max,
            )?,
            seconds: bounded(
                &raw.publish_attacks_seconds,
                "publish_attacks_seconds",
                60..=86_400,
                defaults.seconds,
            )?,
        };
        Ok(Some(crate::fleet::FleetSettings {
            endpoints,
            prefix,
            credentials,
            tls,
            publish,
        }))
    }

    fn absolute(
        &self,
        key: &str,
        value: &Option<Spanned<String>>,
        default: &str,
    ) -> Result<PathBuf, ConfigError> {
        match value {
            None => Ok(PathBuf::from(default)),
            Some(v) if Path::new(v.get_ref()).is_absolute() => Ok(PathBuf::from(v.get_ref())),
            Some(v) => Err(self.src.invalid(
                v.span(),
                format!("{key} {:?} must be an absolute path", v.get_ref()),
            )),
        }
    }

    fn group(
        &self,
        key: &str,
        value: &Option<Spanned<String>>,
    ) -> Result<Option<String>, ConfigError> {
        match value {
            None => Ok(None),
            Some(v) if v.get_ref().is_empty() || v.get_ref().chars().any(char::is_whitespace) => {
                Err(self.src.invalid(
                    v.span(),
                    format!(
                        "control: {key} {:?} is not a group name (omit the key for root only)",
                        v.get_ref()
                    ),
                ))
            }
            Some(v) => Ok(Some(v.get_ref().clone())),
        }
    }

    fn listen(&self, value: &Option<Spanned<String>>) -> Result<SocketAddr, ConfigError> {
        match value {
            None => Ok(DEFAULT_METRICS_LISTEN),
            Some(v) => v.get_ref().parse().map_err(|_| {
                self.src.invalid(
                    v.span(),
                    format!(
                        "metrics: listen {:?} is not an address and port such as \
                         127.0.0.1:9810 or [::1]:9810 (host names are not resolved)",
                        v.get_ref()
                    ),
                )
            }),
        }
    }

    fn origin_location(&self, origin: &Origin) -> Location {
        match origin {
            Origin::Config(span) => self.src.at(span.clone()),
            Origin::List { file, line } => Location::line(&self.list_files[*file], *line),
        }
    }

    fn invalid_at(&self, origin: &Origin, message: String) -> ConfigError {
        ConfigError::Invalid {
            at: self.origin_location(origin),
            message,
        }
    }

    fn class_prefix_location(&self, policy: &Policy, name: &str, net: IpNet) -> Option<Location> {
        let index = policy.classes.iter().position(|c| c.name == name)?;
        self.class_origins[index]
            .iter()
            .find(|(n, _)| n.trunc() == net)
            .map(|(_, origin)| self.origin_location(origin))
    }

    /// Places a compilation error as precisely as possible.
    fn policy_error(&self, error: PolicyError, policy: &Policy) -> ConfigError {
        let file = || Location::file(self.src.origin);
        let (at, also) = match &error {
            PolicyError::OverlappingClasses {
                first,
                first_prefix,
                second,
                second_prefix,
            } => (
                self.class_prefix_location(policy, second, *second_prefix)
                    .unwrap_or_else(file),
                self.class_prefix_location(policy, first, *first_prefix),
            ),
            PolicyError::OverlappingServices { first, second, .. } => {
                let place = |name: &str| {
                    policy
                        .services
                        .iter()
                        .position(|s| s.name == name)
                        .map(|i| self.src.at(self.service_ports[i].clone()))
                };
                (place(second).unwrap_or_else(file), place(first))
            }
            _ => (file(), None),
        };
        ConfigError::Policy {
            at,
            source: Box::new(error),
            also: also.map(Box::new),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prefixes and list files.

/// One prefix, by the one rule for prefixes ([`Prefix`]).
fn parse_prefix(text: &str) -> Result<IpNet, String> {
    text.parse::<Prefix>().map(IpNet::from).map_err(|e| e.0)
}

/// The prefixes of a list file's text, each with its line number.
fn parse_list(text: &str, path: &Path) -> Result<Vec<(IpNet, usize)>, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let content = line
            .split_once('#')
            .map_or(line, |(before, _)| before)
            .trim();
        if content.is_empty() {
            continue;
        }
        let bad = |message: String| ConfigError::Invalid {
            at: Location::line(path, index + 1),
            message,
        };
        if content.contains(char::is_whitespace) {
            return Err(bad(format!(
                "expected one prefix per line, found {content:?}"
            )));
        }
        out.push((parse_prefix(content).map_err(bad)?, index + 1));
    }
    Ok(out)
}

/// A TOML value as written, for error messages.
fn display_value(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fmt::Write as _,
        sync::atomic::{AtomicUsize, Ordering},
        time::Instant,
    };

    use super::*;

    const ORIGIN: &str = "/etc/limiter/limiter.toml";

    fn parse(text: &str) -> FileConfig {
        parse_str(text, Path::new(ORIGIN)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn error(text: &str) -> String {
        match parse_str(text, Path::new(ORIGIN)) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    /// Asserts that `message` starts with `prefix` and contains every one of `parts`.
    fn check(message: &str, prefix: &str, parts: &[&str]) {
        assert!(
            message.starts_with(prefix),
            "{message:?} does not start with {prefix:?}"
        );
        for part in parts {
            assert!(
                message.contains(part),
                "{message:?} does not contain {part:?}"
            );
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "limiter-config-test-{tag}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const LIMIT: &str = "packets_per_second = 10\nburst_packets = 20\n";

    #[test]
    fn an_empty_file_is_all_defaults() {
        assert_eq!(parse(""), FileConfig::default());
        assert_eq!(parse("# only a comment\n\n"), FileConfig::default());
        let d = FileConfig::default();
        assert_eq!(d.policy, Policy::default());
        assert_eq!(d.control.socket, Path::new("/run/limiter/limiter.sock"));
        assert_eq!(d.metrics.listen, "127.0.0.1:9810".parse().unwrap());
        assert!(!d.metrics.bpf_stats);
        assert_eq!(
            d.capacity,
            Capacity {
                sources: 262_144,
                aggregates: 65_536
            }
        );
        assert_eq!(d.state_dir, Path::new("/var/lib/limiter"));
        assert_eq!(d.pin_dir, Path::new("/sys/fs/bpf/limiter"));
        assert_eq!(d.attach_mode, AttachMode::Auto);
        assert_eq!(d.log_format, LogFormat::Human);
    }

    #[test]
    fn the_example_file_loads() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/limiter.example.toml"
        ));
        let c = load_file(path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.interfaces, ["eth1"]);
        assert_eq!(c.policy.mode, Mode::Enforce);
        assert_eq!(c.policy.default_limit, Policy::default().default_limit);
        assert!(!c.policy.classes.is_empty());
        assert!(!c.policy.services.is_empty());
        c.policy.compile().unwrap();
    }

    /// Every key of the schema, for the documentation check below.
    const KEYS: &[&str] = &[
        "mode",
        "interfaces",
        "attach_mode",
        "state_dir",
        "pin_dir",
        "log_format",
        "block_seconds",
        "default_limit",
        "packets_per_second",
        "burst_packets",
        "bytes_per_second",
        "burst_bytes",
        "aggregate_packets_per_second",
        "aggregate_burst_packets",
        "unlimited",
        "class",
        "name",
        "prefixes",
        "prefix_files",
        "limit",
        "service",
        "protocol",
        "ports",
        "allowlist",
        "denylist",
        "files",
        "force",
        "aggregation",
        "source_prefix_v4",
        "source_prefix_v6",
        "aggregate_prefix_v4",
        "aggregate_prefix_v6",
        "spoofing",
        "new_sources_per_second_per_cpu",
        "new_sources_burst",
        "shared_packets_per_second",
        "shared_burst_packets",
        "connections_per_second",
        "burst_connections",
        "acks_per_second",
        "burst_acks",
        "sessions",
        "enabled",
        "cgroup",
        "unproven_packets_per_second",
        "unproven_burst_packets",
        "out_of_state_packets_per_second",
        "out_of_state_burst_packets",
        "proven_seconds",
        "challenge",
        "mode",
        "engage_syns_per_second",
        "engage_seconds",
        "calm_seconds",
        "replies_per_prefix_per_second",
        "replies_burst",
        "capacity",
        "sources",
        "aggregates",
        "control",
        "socket",
        "group",
        "admin_group",
        "metrics",
        "listen",
        "bpf_stats",
    ];

    #[test]
    fn every_key_is_documented_and_in_the_example() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let docs = fs::read_to_string(format!("{root}/docs/config.md")).unwrap();
        let example = fs::read_to_string(format!("{root}/config/limiter.example.toml")).unwrap();
        for key in KEYS {
            assert!(
                docs.contains(&format!("`{key}`"))
                    || docs.contains(&format!("[{key}]"))
                    || docs.contains(&format!("[[{key}]]")),
                "{key} is not documented"
            );
            assert!(
                example.contains(&format!("{key} ="))
                    || example.contains(&format!("[{key}"))
                    || example.contains(&format!(".{key}]")),
                "{key} is not in the example"
            );
        }
    }

    #[test]
    fn the_challenge_is_checked() {
        let c = parse(
            "[challenge]\nmode = \"auto\"\nproven_ack = \"reset\"\nports = [\"443\", 8080, \"9000-9010\"]\nengage_syns_per_second = 700\nengage_seconds = 2\ncalm_seconds = 9\nreplies_per_prefix_per_second = 5\nreplies_burst = 6\n",
        );
        let ch = &c.policy.challenge;
        assert_eq!(ch.mode, ChallengeMode::Auto);
        assert_eq!(ch.proven_ack, ProvenAck::Reset);
        assert_eq!(
            c.policy.compile().unwrap().config.flags
                & limiter_common::layout::Config::FLAG_CHALLENGE_RESET,
            limiter_common::layout::Config::FLAG_CHALLENGE_RESET
        );
        assert_eq!(
            parse("[challenge]\nports = [443]\n")
                .policy
                .challenge
                .proven_ack,
            ProvenAck::Pass
        );
        assert!(error("[challenge]\nproven_ack = \"drop\"\n").contains("drop"));
        assert_eq!(ch.ports, [443..=443, 8080..=8080, 9000..=9010]);
        assert_eq!(
            (
                ch.engage_syns_per_second,
                ch.engage_seconds,
                ch.calm_seconds
            ),
            (700, 2, 9)
        );
        assert_eq!(ch.replies_per_prefix, Rate::new(5, 6));
        assert!(error("[challenge]\nmode = \"on\"\n").contains("protects no port"));
        assert!(
            error("[challenge]\nmode = \"auto\"\nports = [443]\nengage_syns_per_second = 0\n")
                .contains("never disengage")
        );
        assert!(error("[challenge]\nports = [443]\ncalm_seconds = 0\n").contains("1 to 3600"));
        assert!(error("[challenge]\nports = [\"70000\"]\n").contains("not a port"));
        assert!(error("[challenge]\nmode = \"sometimes\"\n").contains("sometimes"));
        assert!(
            error("[challenge]\nreplies_per_prefix_per_second = 5\n").contains("replies_burst")
        );
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            r#"
mode = "monitor"
interfaces = ["eth1", "eth2"]
attach_mode = "native"
state_dir = "/srv/limiter"
pin_dir = "/sys/fs/bpf/lim2"
log_format = "json"
block_seconds = 30

[default_limit]
packets_per_second = 500
burst_packets = 1000
bytes_per_second = 1000000
burst_bytes = 2000000
aggregate_packets_per_second = 5000
aggregate_burst_packets = 10000
connections_per_second = 30
burst_connections = 60
acks_per_second = 9000
burst_acks = 900
block_seconds = 10

[[class]]
name = "mm"
prefixes = ["203.0.113.0/24", "2001:db8:100::/48", "198.51.100.7"]
[class.limit]
unlimited = true

[[class]]
name = "retail"
prefixes = ["192.0.2.0/25"]
limit = { packets_per_second = 50, burst_packets = 100 }

[[service]]
name = "rest-api"
protocol = "tcp"
ports = "443"
[service.limit]
packets_per_second = 100
burst_packets = 200

[[service]]
name = "ws"
protocol = "tcp"
ports = "8080-8090"
limit = { packets_per_second = 0, burst_packets = 0 }

[[service]]
name = "fix"
protocol = "udp"
ports = 9878
limit = { aggregate_packets_per_second = 10, aggregate_burst_packets = 10 }

[allowlist]
prefixes = ["10.0.0.0/8"]
[denylist]
prefixes = ["100.64.0.0/10", "2001:db8:dead::/48"]

[aggregation]
source_prefix_v4 = 31
source_prefix_v6 = 56
aggregate_prefix_v4 = 20
aggregate_prefix_v6 = 40

[spoofing]
new_sources_per_second_per_cpu = 100
new_sources_burst = 200
shared_packets_per_second = 300
shared_burst_packets = 400

[sessions]
enabled = false
cgroup = "/sys/fs/cgroup/limiter"
unproven_packets_per_second = 700
unproven_burst_packets = 800
out_of_state_packets_per_second = 900
out_of_state_burst_packets = 1000
proven_seconds = 3600

[capacity]
sources = 1000
aggregates = 100

[control]
socket = "/run/l.sock"
group = "limiter"
admin_group = "netops"

[metrics]
listen = "[::1]:9100"
bpf_stats = true
"#,
        );
        assert_eq!(c.interfaces, ["eth1", "eth2"]);
        assert_eq!(c.attach_mode, AttachMode::Native);
        assert_eq!(c.state_dir, Path::new("/srv/limiter"));
        assert_eq!(c.pin_dir, Path::new("/sys/fs/bpf/lim2"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            c.capacity,
            Capacity {
                sources: 1000,
                aggregates: 100
            }
        );
        assert_eq!(
            c.control,
            ControlSettings {
                socket: "/run/l.sock".into(),
                group: Some("limiter".into()),
                admin_group: Some("netops".into()),
            }
        );
        assert_eq!(
            c.metrics,
            MetricsSettings {
                listen: "[::1]:9100".parse().unwrap(),
                bpf_stats: true
            }
        );
        let p = &c.policy;
        assert_eq!(p.mode, Mode::Monitor);
        assert_eq!(p.block_seconds, 30);
        assert_eq!(
            p.default_limit,
            LimitSpec {
                packets: Some(Rate::new(500, 1000)),
                bytes: Some(Rate::new(1_000_000, 2_000_000)),
                aggregate: Some(Rate::new(5000, 10_000)),
                connections: Some(Rate::new(30, 60)),
                acks: Some(Rate::new(9000, 900)),
                block_seconds: Some(10),
            }
        );
        assert_eq!(
            p.classes,
            [
                Class {
                    name: "mm".into(),
                    prefixes: vec![
                        net("203.0.113.0/24"),
                        net("2001:db8:100::/48"),
                        net("198.51.100.7/32")
                    ],
                    limit: LimitSpec::unlimited(),
                },
                Class {
                    name: "retail".into(),
                    prefixes: vec![net("192.0.2.0/25")],
                    limit: LimitSpec::packets(50, 100),
                },
            ]
        );
        assert_eq!(
            p.services,
            [
                Service {
                    name: "rest-api".into(),
                    proto: ServiceProto::Tcp,
                    ports: 443..=443,
                    limit: LimitSpec::packets(100, 200),
                },
                Service {
                    name: "ws".into(),
                    proto: ServiceProto::Tcp,
                    ports: 8080..=8090,
                    limit: LimitSpec::packets(0, 0),
                },
                Service {
                    name: "fix".into(),
                    proto: ServiceProto::Udp,
                    ports: 9878..=9878,
                    limit: LimitSpec {
                        aggregate: Some(Rate::new(10, 10)),
                        acks: Some(DEFAULT_FLOW_ACKS),
                        ..LimitSpec::unlimited()
                    },
                },
            ]
        );
        assert_eq!(p.allow, [net("10.0.0.0/8")]);
        assert_eq!(p.deny, [net("100.64.0.0/10"), net("2001:db8:dead::/48")]);
        assert_eq!(
            (
                p.source_prefix_v4,
                p.source_prefix_v6,
                p.aggregate_prefix_v4,
                p.aggregate_prefix_v6
            ),
            (31, 56, 20, 40)
        );
        assert_eq!(p.new_sources_per_cpu, Some(Rate::new(100, 200)));
        assert_eq!(p.shared, Rate::new(300, 400));
        assert!(!p.sessions);
        assert_eq!(p.unproven, Rate::new(700, 800));
        assert_eq!(p.out_of_state, Rate::new(900, 1000));
        assert_eq!(p.proven_seconds, 3600);
        assert_eq!(
            c.sessions_cgroup,
            Some(PathBuf::from("/sys/fs/cgroup/limiter"))
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        check(
            &error("mode = \"enforce\"\nmodes = \"x\"\n"),
            "/etc/limiter/limiter.toml:2:1: ",
            &["unknown field `modes`"],
        );
        check(
            &error(&format!(
                "[[class]]\nname = \"a\"\nprefixes = [\"10.0.0.0/8\"]\n[class.limit]\n{LIMIT}pakets_per_second = 3\n"
            )),
            "/etc/limiter/limiter.toml:7:1: ",
            &["unknown field `pakets_per_second`"],
        );
        check(
            &error("[metrics]\nlisten = \"127.0.0.1:1\"\nbpf = true\n"),
            "/etc/limiter/limiter.toml:3:1: ",
            &["unknown field `bpf`"],
        );
        check(
            &error("[aggregaton]\nsource_prefix_v4 = 24\n"),
            "/etc/limiter/limiter.toml:1:2: ",
            &["unknown field `aggregaton`"],
        );
    }

    #[test]
    fn syntax_and_type_errors_have_positions() {
        check(
            &error("interfaces = [\"eth1\"\n"),
            "/etc/limiter/limiter.toml:1:",
            &[],
        );
        check(
            &error("block_seconds = \"10\"\n"),
            "/etc/limiter/limiter.toml:1:17: ",
            &["invalid type"],
        );
        check(
            &error("[default_limit]\npackets_per_second = -5\nburst_packets = 1\n"),
            "/etc/limiter/limiter.toml:2:22: ",
            &["-5"],
        );
        check(
            &error("[[service]]\nname = \"x\"\nports = 1\n"),
            "/etc/limiter/limiter.toml:",
            &["missing field `protocol`"],
        );
    }

    #[test]
    fn bad_prefixes_name_the_value_and_line() {
        check(
            &error("[denylist]\nprefixes = [\"10.0.0.0/8\",\n  \"10.0.0.300/24\"]\n"),
            "/etc/limiter/limiter.toml:3:3: ",
            &["\"10.0.0.300/24\""],
        );
        check(
            &error("[allowlist]\nprefixes = [\"192.0.2.0/33\"]\n"),
            "/etc/limiter/limiter.toml:2:13: ",
            &["\"192.0.2.0/33\""],
        );
        check(
            &error(&format!(
                "[[class]]\nname = \"a\"\nprefixes = [\"nonsense\"]\n[class.limit]\n{LIMIT}"
            )),
            "/etc/limiter/limiter.toml:3:13: ",
            &["\"nonsense\""],
        );
        check(
            &error("[denylist]\nprefixes = [\"10.1.2.3/16\"]\n"),
            "/etc/limiter/limiter.toml:2:13: ",
            &["host bits", "10.1.0.0/16"],
        );
    }

    #[test]
    fn zero_rate_with_burst_names_the_limit_and_line() {
        check(
            &error("[default_limit]\npackets_per_second = 0\nburst_packets = 10\n"),
            "/etc/limiter/limiter.toml:2:22: ",
            &[
                "default_limit",
                "packets_per_second = 0",
                "burst_packets = 10",
                "rate of zero",
            ],
        );
        check(
            &error(
                "[[class]]\nname = \"mm\"\nprefixes = [\"10.0.0.0/8\"]\n[class.limit]\npackets_per_second = 5\nburst_packets = 5\naggregate_packets_per_second = 0\naggregate_burst_packets = 3\n",
            ),
            "/etc/limiter/limiter.toml:7:32: ",
            &[
                "class \"mm\" limit",
                "aggregate_packets_per_second = 0",
                "rate of zero",
            ],
        );
        check(
            &error("[default_limit]\npackets_per_second = 5\nburst_packets = 0\n"),
            "/etc/limiter/limiter.toml:2:22: ",
            &["default_limit", "burst of zero"],
        );
    }

    #[test]
    fn rates_come_in_pairs() {
        check(
            &error(&format!(
                "[default_limit]\n{LIMIT}bytes_per_second = 1000\n"
            )),
            "/etc/limiter/limiter.toml:4:20: ",
            &[
                "default_limit",
                "bytes_per_second is set without burst_bytes",
            ],
        );
        check(
            &error(&format!("[default_limit]\n{LIMIT}burst_bytes = 1000\n")),
            "/etc/limiter/limiter.toml:4:15: ",
            &[
                "default_limit",
                "burst_bytes is set without bytes_per_second",
            ],
        );
        check(
            &error("[spoofing]\nshared_packets_per_second = 10\n"),
            "/etc/limiter/limiter.toml:2:29: ",
            &["spoofing", "without shared_burst_packets"],
        );
    }

    #[test]
    fn unlimited_excludes_rates_and_a_limit_must_say_something() {
        check(
            &error(
                "[default_limit]\nunlimited = true\npackets_per_second = 1\nburst_packets = 1\n",
            ),
            "/etc/limiter/limiter.toml:2:13: ",
            &[
                "default_limit",
                "unlimited = true cannot be combined",
                "packets_per_second",
            ],
        );
        check(
            &error("x = 1\n"),
            "/etc/limiter/limiter.toml:1:1: ",
            &["unknown field `x`"],
        );
        check(
            &error("[default_limit]\n"),
            "/etc/limiter/limiter.toml:1:1: ",
            &["default_limit states no limit"],
        );
        check(
            &error("[default_limit]\nunlimited = false\n"),
            "/etc/limiter/limiter.toml:1:1: ",
            &["states no limit"],
        );
        assert_eq!(
            parse("[default_limit]\nunlimited = true\n")
                .policy
                .default_limit,
            LimitSpec::unlimited()
        );
        check(
            &error("[[class]]\nname = \"a\"\nprefixes = [\"10.0.0.0/8\"]\n"),
            "/etc/limiter/limiter.toml:1:1: ",
            &["class \"a\" has no limit"],
        );
        check(
            &error(&format!("[[class]]\nname = \"a\"\n[class.limit]\n{LIMIT}")),
            "/etc/limiter/limiter.toml:1:1: ",
            &["class \"a\" has no prefixes"],
        );
    }

    #[test]
    fn overlapping_classes_name_both_with_positions() {
        let message = error(&format!(
            "[[class]]\nname = \"a\"\nprefixes = [\"10.0.0.0/8\"]\n[class.limit]\n{LIMIT}\
             [[class]]\nname = \"b\"\nprefixes = [\"192.0.2.0/24\", \"10.9.0.0/16\"]\n[class.limit]\n{LIMIT}"
        ));
        check(
            &message,
            "/etc/limiter/limiter.toml:9:29: ",
            &[
                "class \"a\" prefix 10.0.0.0/8",
                "class \"b\" prefix 10.9.0.0/16",
                "the other is at /etc/limiter/limiter.toml:3:13",
            ],
        );
    }

    #[test]
    fn overlapping_services_point_at_the_ports() {
        check(
            &error(&format!(
                "[[service]]\nname = \"a\"\nprotocol = \"tcp\"\nports = \"8000-8100\"\nlimit = {{ {} }}\n\
                 [[service]]\nname = \"b\"\nprotocol = \"tcp\"\nports = 8080\nlimit = {{ {} }}\n",
                "packets_per_second = 1, burst_packets = 1",
                "packets_per_second = 1, burst_packets = 1"
            )),
            "/etc/limiter/limiter.toml:9:9: ",
            &[
                "service \"a\" and service \"b\"",
                "8080",
                "the other is at /etc/limiter/limiter.toml:4:9",
            ],
        );
        // The same port on the other transport is fine.
        parse(
            "[[service]]\nname = \"a\"\nprotocol = \"tcp\"\nports = 53\nlimit = { unlimited = true }\n\
             [[service]]\nname = \"b\"\nprotocol = \"udp\"\nports = 53\nlimit = { unlimited = true }\n",
        );
    }

    #[test]
    fn list_files_are_read_relative_to_the_config() {
        let dir = TempDir::new("lists");
        dir.write(
            "mm.txt",
            "# market makers\n203.0.113.0/24\n\n  2001:db8:100::/48   # trailing comment\n198.51.100.7\n2001:db8::1\n",
        );
        fs::create_dir_all(dir.0.join("sub")).unwrap();
        dir.write("sub/deny.txt", "100.64.0.0/10\r\n");
        let config = dir.write(
            "limiter.toml",
            &format!(
                "[[class]]\nname = \"mm\"\nprefixes = [\"192.0.2.0/24\"]\nprefix_files = [\"mm.txt\"]\n\
                 [class.limit]\n{LIMIT}[denylist]\nfiles = [\"sub/deny.txt\"]\n"
            ),
        );
        let c = load_file(&config).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.policy.classes[0].prefixes,
            [
                net("192.0.2.0/24"),
                net("203.0.113.0/24"),
                net("2001:db8:100::/48"),
                net("198.51.100.7/32"),
                net("2001:db8::1/128"),
            ]
        );
        assert_eq!(c.policy.deny, [net("100.64.0.0/10")]);
        assert_eq!(
            read_prefix_list(&dir.0.join("sub/deny.txt")).unwrap(),
            [net("100.64.0.0/10")]
        );
        // An empty list file is a valid (empty) list.
        dir.write("empty.txt", "# nothing yet\n");
        let c = parse(&format!(
            "[allowlist]\nfiles = [\"{}\"]\n",
            dir.0.join("empty.txt").display()
        ));
        assert!(c.policy.allow.is_empty());
    }

    #[test]
    fn a_missing_list_file_names_it_and_the_referencing_line() {
        let message =
            error("[allowlist]\nprefixes = []\nfiles = [\"/nonexistent/limiter/allow.txt\"]\n");
        check(
            &message,
            "/etc/limiter/limiter.toml:3:10: ",
            &["cannot read list file /nonexistent/limiter/allow.txt"],
        );
        // Relative names are resolved against the configuration's directory.
        check(
            &error("[denylist]\nfiles = [\"deny.txt\"]\n"),
            "/etc/limiter/limiter.toml:2:10: ",
            &["/etc/limiter/deny.txt"],
        );
        check(
            &read_prefix_list(Path::new("/nonexistent/limiter/x.txt"))
                .unwrap_err()
                .to_string(),
            "/nonexistent/limiter/x.txt: cannot read: ",
            &[],
        );
    }

    #[test]
    fn a_bad_line_in_a_list_file_names_the_file_and_line() {
        let dir = TempDir::new("badline");
        let list = dir.write("deny.txt", "# header\n10.0.0.0/8\n\n10.0.0.999 # oops\n");
        let expected = format!("{}:4: ", list.display());
        check(
            &read_prefix_list(&list).unwrap_err().to_string(),
            &expected,
            &["\"10.0.0.999\""],
        );
        let config = dir.write("limiter.toml", "\n[denylist]\nfiles = [\"deny.txt\"]\n");
        check(
            &load_file(&config).unwrap_err().to_string(),
            &expected,
            &[
                "\"10.0.0.999\"",
                &format!("list file named at {}:3:10", config.display()),
            ],
        );
        let two = dir.write("two.txt", "10.0.0.0/8 10.1.0.0/16\n");
        check(
            &read_prefix_list(&two).unwrap_err().to_string(),
            &format!("{}:1: ", two.display()),
            &["one prefix per line"],
        );
    }

    #[test]
    fn overlaps_between_list_files_point_into_them() {
        let dir = TempDir::new("overlap");
        dir.write("a.txt", "10.0.0.0/8\n");
        dir.write("b.txt", "# b\n192.0.2.0/24\n10.20.0.0/16\n");
        let config = dir.write(
            "limiter.toml",
            &format!(
                "[[class]]\nname = \"a\"\nprefix_files = [\"a.txt\"]\n[class.limit]\n{LIMIT}\
                 [[class]]\nname = \"b\"\nprefix_files = [\"b.txt\"]\n[class.limit]\n{LIMIT}"
            ),
        );
        check(
            &load_file(&config).unwrap_err().to_string(),
            &format!("{}:3: ", dir.0.join("b.txt").display()),
            &[
                "class \"a\" prefix 10.0.0.0/8 overlaps class \"b\" prefix 10.20.0.0/16",
                &format!("the other is at {}:1", dir.0.join("a.txt").display()),
            ],
        );
    }

    #[test]
    fn ports_protocols_and_enums_are_checked() {
        let service = |protocol: &str, ports: &str| {
            format!(
                "[[service]]\nname = \"s\"\nprotocol = {protocol}\nports = {ports}\n\
                 limit = {{ unlimited = true }}\n"
            )
        };
        for (ports, part) in [
            ("\"70000\"", "70000 is not a port"),
            ("70000", "70000 is not a port"),
            ("-1", "-1 is not a port"),
            ("\"90-80\"", "the range is empty"),
            ("\"abc\"", "expected a port"),
            ("\"80-\"", "expected a port"),
            ("\"+80\"", "expected a port"),
            ("[80]", "expected a port"),
        ] {
            check(
                &error(&service("\"tcp\"", ports)),
                "/etc/limiter/limiter.toml:4:9: ",
                &["service \"s\": ports", part],
            );
        }
        assert_eq!(
            parse(&service("\"udp\"", "\"1000 - 2000\""))
                .policy
                .services[0]
                .ports,
            1000..=2000
        );
        assert_eq!(
            parse(&service("\"tcp\"", "\"65535\"")).policy.services[0].ports,
            65535..=65535
        );
        check(
            &error(&service("\"sctp\"", "80")),
            "/etc/limiter/limiter.toml:3:12: ",
            &["unknown variant `sctp`"],
        );
        check(
            &error("mode = \"drop\"\n"),
            "/etc/limiter/limiter.toml:1:8: ",
            &["unknown variant `drop`", "enforce", "monitor"],
        );
        check(
            &error("attach_mode = \"offload\"\n"),
            "/etc/limiter/limiter.toml:1:15: ",
            &["unknown variant `offload`", "native", "generic", "auto"],
        );
        check(
            &error("log_format = \"xml\"\n"),
            "/etc/limiter/limiter.toml:1:14: ",
            &["unknown variant `xml`"],
        );
        check(
            &error("[metrics]\nlisten = \"localhost:9810\"\n"),
            "/etc/limiter/limiter.toml:2:10: ",
            &["\"localhost:9810\"", "not an address"],
        );
        check(
            &error("[metrics]\nlisten = \"127.0.0.1\"\n"),
            "/etc/limiter/limiter.toml:2:10: ",
            &["\"127.0.0.1\""],
        );
    }

    #[test]
    fn prefix_lengths_are_checked() {
        check(
            &error("[aggregation]\nsource_prefix_v4 = 33\n"),
            "/etc/limiter/limiter.toml:2:20: ",
            &["source_prefix_v4 = 33 is out of range", "1-32"],
        );
        check(
            &error("[aggregation]\naggregate_prefix_v6 = 0\n"),
            "/etc/limiter/limiter.toml:2:23: ",
            &["aggregate_prefix_v6 = 0 is out of range", "1-128"],
        );
        check(
            &error("[aggregation]\nsource_prefix_v6 = 300\n"),
            "/etc/limiter/limiter.toml:2:20: ",
            &["source_prefix_v6 = 300 is out of range"],
        );
        check(
            &error("[aggregation]\nsource_prefix_v4 = 24\naggregate_prefix_v4 = 28\n"),
            "/etc/limiter/limiter.toml:3:23: ",
            &["aggregate_prefix_v4 = 28 is longer than source_prefix_v4 = 24"],
        );
        check(
            &error("[aggregation]\nsource_prefix_v6 = 40\n"),
            "/etc/limiter/limiter.toml:2:20: ",
            &["aggregate_prefix_v6 = 48 (the default) is longer than source_prefix_v6 = 40"],
        );
    }

    #[test]
    fn names_must_be_unique() {
        let class = |name: &str, prefix: &str| {
            format!(
                "[[class]]\nname = \"{name}\"\nprefixes = [\"{prefix}\"]\n[class.limit]\n{LIMIT}"
            )
        };
        let service = |name: &str, port: u16| {
            format!(
                "[[service]]\nname = \"{name}\"\nprotocol = \"tcp\"\nports = {port}\n[service.limit]\n{LIMIT}"
            )
        };
        check(
            &error(&format!(
                "{}{}",
                class("a", "10.0.0.0/8"),
                class("a", "11.0.0.0/8")
            )),
            "/etc/limiter/limiter.toml:8:8: ",
            &["class name \"a\" is already used on line 2"],
        );
        check(
            &error(&format!(
                "{}{}",
                class("a", "10.0.0.0/8"),
                service("a", 443)
            )),
            "/etc/limiter/limiter.toml:8:8: ",
            &["service name \"a\" is already used on line 2"],
        );
        check(
            &error(&format!("{}{}", service("x", 80), service("x", 443))),
            "/etc/limiter/limiter.toml:9:8: ",
            &["service name \"x\" is already used on line 2"],
        );
        check(
            &error(&class("default", "10.0.0.0/8")),
            "/etc/limiter/limiter.toml:2:8: ",
            &["reserved"],
        );
        check(
            &error(&class("", "10.0.0.0/8")),
            "/etc/limiter/limiter.toml:2:8: ",
            &["must not be empty"],
        );
    }

    #[test]
    fn spoofing_zero_means_uncapped() {
        let c = parse("[spoofing]\nnew_sources_per_second_per_cpu = 0\n");
        assert_eq!(c.policy.new_sources_per_cpu, None);
        let c = parse("[spoofing]\nnew_sources_per_second_per_cpu = 0\nnew_sources_burst = 0\n");
        assert_eq!(c.policy.new_sources_per_cpu, None);
        assert_eq!(c.policy.shared, Policy::default().shared);
        check(
            &error("[spoofing]\nnew_sources_per_second_per_cpu = 0\nnew_sources_burst = 5\n"),
            "/etc/limiter/limiter.toml:3:21: ",
            &["uncapped"],
        );
        check(
            &error("[spoofing]\nnew_sources_burst = 5\n"),
            "/etc/limiter/limiter.toml:2:21: ",
            &["new_sources_burst is set without new_sources_per_second_per_cpu"],
        );
    }

    #[test]
    fn other_settings_are_checked() {
        check(
            &error("interfaces = [\"eth1\", \"eth1\"]\n"),
            "/etc/limiter/limiter.toml:1:23: ",
            &["\"eth1\" is listed twice"],
        );
        check(
            &error("interfaces = [\"a-very-long-interface\"]\n"),
            "/etc/limiter/limiter.toml:1:15: ",
            &["not an interface name"],
        );
        check(
            &error("state_dir = \"var/lib/limiter\"\n"),
            "/etc/limiter/limiter.toml:1:13: ",
            &["state_dir \"var/lib/limiter\" must be an absolute path"],
        );
        check(
            &error("[control]\nsocket = \"limiter.sock\"\n"),
            "/etc/limiter/limiter.toml:2:10: ",
            &["absolute"],
        );
        check(
            &error("[control]\ngroup = \"\"\n"),
            "/etc/limiter/limiter.toml:2:9: ",
            &["not a group name"],
        );
        check(
            &error("[capacity]\nsources = 0\n"),
            "/etc/limiter/limiter.toml:2:11: ",
            &["sources must be at least 1"],
        );
        check(
            &error("[capacity]\naggregates = 5000000000\n"),
            "/etc/limiter/limiter.toml:2:14: ",
            &[],
        );
    }

    #[test]
    fn an_unreadable_config_names_the_file() {
        let e = load_file(Path::new("/nonexistent/limiter.toml")).unwrap_err();
        check(
            &e.to_string(),
            "/nonexistent/limiter.toml: cannot read: ",
            &[],
        );
        assert!(e.location().is_none());
    }

    #[test]
    fn a_list_of_100k_prefixes_is_fast() {
        let dir = TempDir::new("big");
        let mut text = String::from("# generated\n");
        for i in 0..100_000u32 {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 | (i << 8));
            if i % 2 == 0 {
                writeln!(text, "{a}/24").unwrap();
            } else {
                writeln!(text, "{a}/24 # comment {i}").unwrap();
            }
        }
        let list = dir.write("big.txt", &text);
        let start = Instant::now();
        let nets = read_prefix_list(&list).unwrap();
        let elapsed = start.elapsed();
        assert_eq!(nets.len(), 100_000);
        assert!(elapsed.as_millis() < 500, "took {elapsed:?}");

        let config = dir.write("limiter.toml", "[denylist]\nfiles = [\"big.txt\"]\n");
        let start = Instant::now();
        let c = load_file(&config).unwrap();
        assert_eq!(c.policy.deny.len(), 100_000);
        assert!(start.elapsed().as_secs() < 2, "took {:?}", start.elapsed());
    }

    #[test]
    fn wide_denies_need_force_and_mapped_prefixes_are_ipv4() {
        let e = error("[denylist]\nprefixes = [\"0.0.0.0/0\"]\n");
        check(
            &e,
            "/etc/limiter/limiter.toml:2:",
            &["0.0.0.0/0", "force = true"],
        );
        let c = parse("[denylist]\nprefixes = [\"0.0.0.0/0\"]\nforce = true\n");
        assert_eq!(c.policy.deny, [net("0.0.0.0/0")]);
        let c = parse("[denylist]\nprefixes = [\"::ffff:192.0.2.0/120\"]\n");
        assert_eq!(c.policy.deny, [net("192.0.2.0/24")]);
        let e = error(
            "[[class]]\nname = \" padded\"\nprefixes = [\"192.0.2.0/24\"]\nlimit = { unlimited = true }\n",
        );
        check(&e, "/etc/limiter/limiter.toml:2:", &["white space"]);
    }

    #[test]
    fn location_display() {
        let mut at = Location::file(Path::new("/x.toml"));
        assert_eq!(at.to_string(), "/x.toml");
        at.line = Some(3);
        assert_eq!(at.to_string(), "/x.toml:3");
        at.column = Some(7);
        assert_eq!(at.to_string(), "/x.toml:3:7");
        assert_eq!(line_column("ab\ncdé f", 8), (2, 5));
    }

    #[test]
    fn a_fleet_policy_document_is_checked_like_the_file_and_replaces_its_sections() {
        let text = "mode = \"enforce\"\nblock_seconds = 30\n\n[default_limit]\npackets_per_second = 50\nburst_packets = 100\n\n[[class]]\nname = \"mm\"\nprefixes = [\"198.51.100.0/24\"]\n[class.limit]\nunlimited = true\n\n[[service]]\nname = \"fix\"\nprotocol = \"tcp\"\nports = 9878\n[service.limit]\npackets_per_second = 10\nburst_packets = 20\n";
        let document = parse_policy_document(text, Path::new("push.toml")).unwrap();
        let file = parse(
            "mode = \"monitor\"\n[allowlist]\nprefixes = [\"192.0.2.0/24\"]\n[[class]]\nname = \"old\"\nprefixes = [\"10.0.0.0/8\"]\n[class.limit]\nunlimited = true\n",
        );
        let policy = document.overlay(&file.policy);
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(policy.block_seconds, 30);
        assert_eq!(
            policy
                .classes
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["mm"],
            "the document's classes replace the file's"
        );
        assert_eq!(policy.services[0].ports, 9878..=9878);
        assert_eq!(
            policy.allow, file.policy.allow,
            "the host keeps its own lists"
        );

        let refuse = |text: &str| match parse_policy_document(text, Path::new("push.toml")) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        };
        check(
            &refuse("interfaces = [\"eth1\"]\n"),
            "push.toml:1:1: unknown field `interfaces`",
            &["a fleet policy holds only"],
        );
        check(
            &refuse(
                "[[class]]\nname = \"a\"\nprefix_files = [\"mm.txt\"]\n[class.limit]\nunlimited = true\n",
            ),
            "push.toml:3:17: prefix_files name files on one host",
            &[],
        );
        check(
            &refuse(
                "[[class]]\nname = \"a\"\nprefixes = [\"10.0.0.0/8\"]\n[class.limit]\nunlimited = true\n[[class]]\nname = \"b\"\nprefixes = [\"10.1.0.0/16\"]\n[class.limit]\nunlimited = true\n",
            ),
            "push.toml:8:13: class \"a\" prefix 10.0.0.0/8 overlaps class \"b\"",
            &[],
        );
        check(
            &refuse("[default_limit]\npackets_per_second = 0\nburst_packets = 5\n"),
            "push.toml:",
            &["default_limit"],
        );
    }

    #[test]
    fn fleet_tls_files_go_together_and_need_https() {
        let dir = TempDir::new("fleet-tls");
        let ca = dir.write("ca.pem", "x");
        let with =
            |endpoint: &str, files: &str| format!("[fleet]\nendpoints = [\"{endpoint}\"]\n{files}");
        let all = format!(
            "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            ca.display(),
            ca.display(),
            ca.display()
        );
        let config = parse(&with("https://10.0.0.1:2379", &all));
        assert_eq!(config.fleet.unwrap().tls.unwrap().ca_file, ca);
        check(
            &error(&with("http://10.0.0.1:2379", &all)),
            "/etc/limiter/limiter.toml:2:",
            &["with client certificates the endpoints are https://"],
        );
        check(
            &error(&with("https://10.0.0.1:2379", "")),
            "/etc/limiter/limiter.toml:2:",
            &["https:// needs ca_file, cert_file and key_file"],
        );
        check(
            &error(&with(
                "https://10.0.0.1:2379",
                &format!("ca_file = \"{}\"\n", ca.display()),
            )),
            "/etc/limiter/limiter.toml:1:1:",
            &["go together"],
        );
        check(
            &error(&with(
                "https://10.0.0.1:2379",
                &all.replace("cert_file = \"", "cert_file = \"/nonexistent"),
            )),
            "/etc/limiter/limiter.toml:",
            &["/nonexistent"],
        );
        check(
            &error(&with(
                "http://10.0.0.1:2379",
                "publish_attacks = \"on\"\npublish_attacks_max = 0\n",
            )),
            "/etc/limiter/limiter.toml:4:",
            &["publish_attacks_max must be 1 to 1000"],
        );
    }
}
