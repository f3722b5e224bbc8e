//! The fleet: every edge host enforces the same policy, denylist and allowlist, kept in etcd.
//!
//! Layout under the configured root (`[fleet] prefix`, `/limiter` by default; docs/fleet.md):
//!
//! - `ROOT/policy`: the fleet policy, one versioned key ([`FleetPolicy`]: a policy document
//!   in the config file's schema, with author and reason). It is swapped whole, with a
//!   transaction on its version (the key's mod revision).
//! - `ROOT/deny/ADDRESS_LENGTH` and `ROOT/allow/ADDRESS_LENGTH` (`/limiter/deny/198.51.100.0_24`):
//!   one key per fleet entry, its value a JSON [`FleetEntry`] (prefix, reason, author, creation
//!   and expiry time).
//! - `ROOT/leases/MINUTE`: the id of the shared lease that ends at that minute (Unix seconds,
//!   a multiple of 60). A temporary entry is attached to the lease of the first minute
//!   boundary at or after its expiry, so a thousand temporary entries cost a few leases, not
//!   a thousand, and etcd deletes them with no sweeper. The lease key is on its own lease.
//!
//! Edge hosts only read: they list `ROOT/` at revision R, then watch from R + 1 with
//! progress notifications. A watch the server cancels because R + 1 was compacted is never
//! resumed: the host lists again (a watcher must never miss a delete). Each list or batch of
//! events yields a whole [`FleetView`], which the daemon applies as one change.

use std::{collections::BTreeMap, time::Duration};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Temporary entries share one lease per this many seconds of expiry.
pub const LEASE_BUCKET_SECONDS: u64 = 60;

/// Fleet entries wider than this (IPv4) are refused unless marked as meant.
pub const WIDEST_V4: u8 = 16;
/// Fleet entries wider than this (IPv6) are refused unless marked as meant.
pub const WIDEST_V6: u8 = 32;

/// How often a host asks the store to confirm its watch's revision.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// How long a host waits before connecting again after losing etcd.
const RECONNECT: Duration = Duration::from_secs(1);

/// Client certificates for etcd's `--client-cert-auth`: PEM files, read at each connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signed the servers' certificates.
    pub ca_file: std::path::PathBuf,
    /// This client's certificate.
    pub cert_file: std::path::PathBuf,
    /// Its private key.
    pub key_file: std::path::PathBuf,
}

/// Where the fleet's store is and how to log in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetSettings {
    /// etcd client URLs (`http://10.0.0.1:2379`, or `https://` with `tls`).
    pub endpoints: Vec<String>,
    /// The key root, without a trailing `/`.
    pub prefix: String,
    /// User name and password, when etcd has authentication on.
    pub credentials: Option<(String, String)>,
    /// Client certificates, when etcd asks for them.
    pub tls: Option<TlsFiles>,
    /// Whether this host publishes its attack records as temporary fleet denies.
    pub publish: PublishSettings,
}

/// Whether attack records become fleet denies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishAttacks {
    /// Never (the default).
    #[default]
    Off,
    /// Log and count what would be published, write nothing: try it first.
    Monitor,
    /// Write them.
    On,
}

/// `[fleet] publish_attacks*`: attack records published as temporary fleet denies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishSettings {
    /// Off, monitor or on.
    pub mode: PublishAttacks,
    /// At most this many of this host's published denies live at once.
    pub max: u64,
    /// Each one's lifetime.
    pub seconds: u64,
}

impl Default for PublishSettings {
    fn default() -> Self {
        Self {
            mode: PublishAttacks::Off,
            max: 16,
            seconds: 600,
        }
    }
}

/// Which fleet list an entry is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    /// Dropped on every host (unless a host's own allowlist or anti-lockout list covers it).
    Deny,
    /// Passed without limits on every host (a host's own or a fleet deny still wins).
    Allow,
}

impl ListKind {
    /// The key directory and the CLI's word.
    pub fn name(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Allow => "allow",
        }
    }
}

impl std::fmt::Display for ListKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a key under the root holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyKind {
    Entry(ListKind),
    Policy,
    /// Lease bookkeeping, or a key this layout does not know: not part of the view.
    Other,
}

impl FleetSettings {
    /// The prefix of every key of the fleet.
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// The prefix every key of `kind`'s list starts with.
    pub fn list_root(&self, kind: ListKind) -> String {
        format!("{}/{}/", self.prefix, kind.name())
    }

    /// The key of `kind`'s entry for `prefix`.
    pub fn entry_key(&self, kind: ListKind, prefix: IpNet) -> String {
        let prefix = prefix.trunc();
        format!(
            "{}{}_{}",
            self.list_root(kind),
            prefix.addr(),
            prefix.prefix_len()
        )
    }

    /// The key of the fleet policy.
    pub fn policy_key(&self) -> String {
        format!("{}/policy", self.prefix)
    }

    /// The key holding the id of the lease that ends at `bucket`.
    pub fn lease_key(&self, bucket: u64) -> String {
        format!("{}/leases/{bucket}", self.prefix)
    }

    fn classify(&self, key: &str) -> KeyKind {
        if key == self.policy_key() {
            return KeyKind::Policy;
        }
        for kind in [ListKind::Deny, ListKind::Allow] {
            if key.starts_with(&self.list_root(kind)) {
                return KeyKind::Entry(kind);
            }
        }
        KeyKind::Other
    }

    /// Connects (each request then fails over between the endpoints).
    pub async fn connect(&self) -> Result<Client, FleetError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some((user, password)) = &self.credentials {
            options = options.with_user(user, password);
        }
        if let Some(tls) = &self.tls {
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|e| FleetError::Tls(format!("{}: {e}", path.display())))
            };
            options = options.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(read(&tls.ca_file)?))
                    .identity(Identity::from_pem(
                        read(&tls.cert_file)?,
                        read(&tls.key_file)?,
                    )),
            );
        }
        Client::connect(&self.endpoints, Some(options))
            .await
            .map_err(FleetError::Etcd)
    }
}

/// One fleet deny or allow, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetEntry {
    /// The prefix.
    pub prefix: IpNet,
    /// Why (an incident, an attack id).
    pub reason: String,
    /// Who wrote it (`user@host`, or `limiter@HOST` for an attack record's deny).
    pub author: String,
    /// When it was written, Unix milliseconds (the convergence histogram measures from it).
    pub created_unix_ms: u64,
    /// When it stops applying, Unix seconds; `None` = until removed.
    pub expires_unix: Option<u64>,
    /// Wider than /16 (IPv4) or /32 (IPv6) on purpose.
    #[serde(default)]
    pub meant: bool,
}

impl FleetEntry {
    /// Whether it applies at `now_unix`.
    pub fn live(&self, now_unix: u64) -> bool {
        self.expires_unix.is_none_or(|t| t > now_unix)
    }
}

/// The fleet policy, as stored at `ROOT/policy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetPolicy {
    /// The policy document: the policy sections of a config file, as TOML text
    /// (`config::parse_policy_document` checks it).
    pub document: String,
    /// Who pushed it (`user@host`).
    pub author: String,
    /// Why.
    pub reason: String,
    /// When it was pushed, Unix milliseconds.
    pub created_unix_ms: u64,
    /// Its version: the mod revision of the key it was read from (0 as written).
    #[serde(default)]
    pub version: i64,
}

/// Why a host does not apply a fleet entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Refusal {
    /// Wider than the fleet may deny or allow without saying it is meant.
    #[error(
        "wider than /{WIDEST_V4} (IPv4) or /{WIDEST_V6} (IPv6): write it with --meant if it is"
    )]
    TooWide,
    /// It overlaps this host's allowlist, which a fleet deny never overrides.
    #[error("overlaps the local allow of {0}")]
    LocalAllow(IpNet),
    /// It overlaps this host's anti-lockout list (`[fleet] never_deny`).
    #[error("overlaps the anti-lockout prefix {0} ([fleet] never_deny)")]
    NeverDeny(IpNet),
}

/// Whether this host may apply `entry` on `kind`'s list, given its own allowlist and
/// anti-lockout list. A fleet allow needs only to be narrow enough: a deny, the host's own
/// or the fleet's, always wins over an allow in the policy trie.
pub fn check_entry(
    kind: ListKind,
    entry: &FleetEntry,
    allow: &[IpNet],
    never_deny: &[IpNet],
) -> Result<(), Refusal> {
    let widest = match entry.prefix {
        IpNet::V4(_) => WIDEST_V4,
        IpNet::V6(_) => WIDEST_V6,
    };
    if entry.prefix.prefix_len() < widest && !entry.meant {
        return Err(Refusal::TooWide);
    }
    if kind == ListKind::Allow {
        return Ok(());
    }
    let overlaps = |other: &IpNet| other.contains(&entry.prefix) || entry.prefix.contains(other);
    if let Some(protected) = never_deny.iter().find(|p| overlaps(p)) {
        return Err(Refusal::NeverDeny(*protected));
    }
    if let Some(allowed) = allow.iter().find(|p| overlaps(p)) {
        return Err(Refusal::LocalAllow(*allowed));
    }
    Ok(())
}

/// The fleet's state as one host last read it: what the daemon applies and keeps on disk,
/// so a restart without etcd enforces it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetView {
    /// The etcd revision it is complete up to.
    pub revision: i64,
    /// The fleet policy, when one was pushed.
    pub policy: Option<FleetPolicy>,
    /// The denies, by prefix.
    pub deny: BTreeMap<IpNet, FleetEntry>,
    /// The allows, by prefix.
    pub allow: BTreeMap<IpNet, FleetEntry>,
}

/// A view's entries as one host takes them.
#[derive(Debug, Default)]
pub struct Split<'a> {
    /// Denies applied.
    pub deny: Vec<&'a FleetEntry>,
    /// Allows applied.
    pub allow: Vec<&'a FleetEntry>,
    /// Entries refused here, with why.
    pub refused: Vec<(ListKind, &'a FleetEntry, Refusal)>,
}

impl FleetView {
    /// The list of `kind`.
    pub fn list(&self, kind: ListKind) -> &BTreeMap<IpNet, FleetEntry> {
        match kind {
            ListKind::Deny => &self.deny,
            ListKind::Allow => &self.allow,
        }
    }

    fn list_mut(&mut self, kind: ListKind) -> &mut BTreeMap<IpNet, FleetEntry> {
        match kind {
            ListKind::Deny => &mut self.deny,
            ListKind::Allow => &mut self.allow,
        }
    }

    /// Whether the entries and policy are the same (the revision aside).
    pub fn same_content(&self, other: &Self) -> bool {
        self.deny == other.deny && self.allow == other.allow && self.policy == other.policy
    }

    /// The entries this host applies at `now_unix`, and those it refuses, with why.
    pub fn split(&self, allow: &[IpNet], never_deny: &[IpNet], now_unix: u64) -> Split<'_> {
        let mut split = Split::default();
        for kind in [ListKind::Deny, ListKind::Allow] {
            for entry in self.list(kind).values().filter(|e| e.live(now_unix)) {
                match check_entry(kind, entry, allow, never_deny) {
                    Ok(()) if kind == ListKind::Deny => split.deny.push(entry),
                    Ok(()) => split.allow.push(entry),
                    Err(why) => split.refused.push((kind, entry, why)),
                }
            }
        }
        split
    }

    /// Drops expired entries; whether any went.
    pub fn expire(&mut self, now_unix: u64) -> bool {
        let before = self.deny.len() + self.allow.len();
        self.deny.retain(|_, e| e.live(now_unix));
        self.allow.retain(|_, e| e.live(now_unix));
        self.deny.len() + self.allow.len() != before
    }

    /// Takes one stored key and value into the view (a key this layout does not hold is
    /// skipped; a malformed value is logged and skipped, never applied).
    fn put(&mut self, settings: &FleetSettings, key: &[u8], value: &[u8], mod_revision: i64) {
        let text = String::from_utf8_lossy(key);
        let taken = match settings.classify(&text) {
            KeyKind::Entry(kind) => parse_entry(settings, kind, key, value).map(|entry| {
                self.list_mut(kind).insert(entry.prefix.trunc(), entry);
            }),
            KeyKind::Policy => parse_policy(&text, value).map(|mut policy| {
                policy.version = mod_revision;
                self.policy = Some(policy);
            }),
            KeyKind::Other => Ok(()),
        };
        if let Err(e) = taken {
            warn!("fleet key ignored: {e}");
        }
    }

    /// Takes one key's deletion into the view.
    fn delete(&mut self, settings: &FleetSettings, key: &[u8]) {
        let key = String::from_utf8_lossy(key);
        match settings.classify(&key) {
            KeyKind::Entry(kind) => self
                .list_mut(kind)
                .retain(|p, _| settings.entry_key(kind, *p) != key),
            KeyKind::Policy => self.policy = None,
            KeyKind::Other => {}
        }
    }
}

/// The outcomes of [`publication`] as counted (`limiter_fleet_attack_publications_total`);
/// `failed` is a write etcd did not take.
pub const PUBLICATION_OUTCOMES: [&str; 5] =
    ["published", "would_publish", "capped", "refused", "failed"];

/// What a host does with an attack record under `[fleet] publish_attacks`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Publication {
    /// Write this temporary fleet deny.
    Publish(FleetEntry),
    /// Monitor: log and count it, write nothing.
    WouldPublish(FleetEntry),
    /// This host already has its maximum of published denies live.
    Capped(FleetEntry),
    /// This host's own guards refuse it (no host would apply it either).
    Refused(FleetEntry, Refusal),
}

/// Whether and how the attack record's prefix becomes a fleet deny. Only floods of
/// sources that hold state (one source, or many of one prefix) qualify: spoofed, SYN and ACK
/// floods come from forged or unproven addresses, and denying those fleet-wide would let an
/// attacker block anyone by forging their address. `live` is how many of this host's
/// published denies are live now.
pub fn publication(
    settings: &PublishSettings,
    record: &crate::attacks::AttackRecord,
    author: &str,
    now_ms: u64,
    live: u64,
    allow: &[IpNet],
    never_deny: &[IpNet],
) -> Option<Publication> {
    use crate::attacks::AttackType;
    if settings.mode == PublishAttacks::Off
        || !matches!(
            record.kind,
            AttackType::SourceFlood | AttackType::PrefixFlood
        )
    {
        return None;
    }
    let entry = FleetEntry {
        prefix: record.prefix?.trunc(),
        reason: format!("attack {} ({})", record.id, record.kind.label()),
        author: author.to_owned(),
        created_unix_ms: now_ms,
        expires_unix: Some(now_ms / 1_000 + settings.seconds),
        meant: false,
    };
    Some(
        if let Err(why) = check_entry(ListKind::Deny, &entry, allow, never_deny) {
            Publication::Refused(entry, why)
        } else if live >= settings.max {
            Publication::Capped(entry)
        } else if settings.mode == PublishAttacks::Monitor {
            Publication::WouldPublish(entry)
        } else {
            Publication::Publish(entry)
        },
    )
}

/// What the watcher tells the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetEvent {
    /// The whole fleet state at a revision (after a list, or a batch of watch events).
    View(FleetView),
    /// The store answers (true) or was lost (false); the last view stays in force.
    Connected(bool),
    /// The watch fell behind a compaction and the host listed again.
    Resynced,
}

/// Fleet failures.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// etcd refused or could not be reached.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// A client certificate or key could not be read.
    #[error("TLS: {0}")]
    Tls(String),
    /// A key or value is not what this layout stores.
    #[error("{key}: {problem}")]
    Malformed {
        /// The key.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The watch was cancelled by the server for another reason than a compaction.
    #[error("the watch was cancelled: {0}")]
    Cancelled(String),
    /// The request is not one the fleet takes.
    #[error("{0}")]
    Invalid(String),
    /// The policy changed since the writer read it.
    #[error(
        "the fleet policy is at version {current}, not {expected}: someone pushed meanwhile; \
         read it (limiter fleet policy show) and push again"
    )]
    Conflict {
        /// The version the writer expected.
        expected: i64,
        /// The version etcd holds.
        current: i64,
    },
}

/// Reads one stored entry, checking that its key names its prefix.
fn parse_entry(
    settings: &FleetSettings,
    kind: ListKind,
    key: &[u8],
    value: &[u8],
) -> Result<FleetEntry, FleetError> {
    let key = String::from_utf8_lossy(key).into_owned();
    let entry: FleetEntry = serde_json::from_slice(value).map_err(|e| FleetError::Malformed {
        key: key.clone(),
        problem: e.to_string(),
    })?;
    if settings.entry_key(kind, entry.prefix) != key {
        return Err(FleetError::Malformed {
            problem: format!("holds {}, not the prefix its key names", entry.prefix),
            key,
        });
    }
    Ok(entry)
}

/// Reads the stored policy (its document is checked by the daemon, which knows the schema).
fn parse_policy(key: &str, value: &[u8]) -> Result<FleetPolicy, FleetError> {
    serde_json::from_slice(value).map_err(|e| FleetError::Malformed {
        key: key.to_owned(),
        problem: e.to_string(),
    })
}

/// Lists the whole fleet state at the store's current revision.
pub async fn list(settings: &FleetSettings, client: &mut Client) -> Result<FleetView, FleetError> {
    let response = client
        .get(settings.root(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut view = FleetView {
        revision: response.header().map_or(0, |h| h.revision()),
        ..FleetView::default()
    };
    for kv in response.kvs() {
        view.put(settings, kv.key(), kv.value(), kv.mod_revision());
    }
    Ok(view)
}

/// Follows the store for as long as the receiver lives: list, then watch from the next
/// revision; list again after a compaction; connect again after a loss. Never returns
/// while the daemon listens.
pub async fn follow(settings: FleetSettings, events: mpsc::Sender<FleetEvent>) {
    let mut connected = false;
    // While the store cannot be reached, each different reason is logged once (a retry
    // every second would flood the journal with the same line).
    let mut last_failure = None;
    loop {
        let result = follow_once(&settings, &events, &mut connected).await;
        if events.is_closed() {
            return;
        }
        match result {
            Err(e) if connected => {
                warn!("fleet store lost, the last fleet policy stays in force: {e}");
                last_failure = Some(e.to_string());
            }
            Err(e) => {
                let why = e.to_string();
                if last_failure.as_ref() != Some(&why) {
                    warn!("fleet store not reachable, retrying every second: {why}");
                    last_failure = Some(why);
                }
            }
            Ok(()) => {}
        }
        if connected {
            connected = false;
            let _ = events.send(FleetEvent::Connected(false)).await;
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// One connection's life: returns when it is lost.
async fn follow_once(
    settings: &FleetSettings,
    events: &mpsc::Sender<FleetEvent>,
    connected: &mut bool,
) -> Result<(), FleetError> {
    let mut client = settings.connect().await?;
    let mut resync = false;
    loop {
        let mut view = list(settings, &mut client).await?;
        if !*connected {
            *connected = true;
            info!(revision = view.revision, "fleet store connected");
            let _ = events.send(FleetEvent::Connected(true)).await;
        }
        if resync {
            let _ = events.send(FleetEvent::Resynced).await;
        }
        let _ = events.send(FleetEvent::View(view.clone())).await;
        let mut stream = client
            .watch(
                settings.root(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(view.revision + 1)
                        .with_progress_notify(),
                ),
            )
            .await?;
        // Asking for progress every few seconds gives liveness on a quiet prefix, and a
        // lost store shows as a failed request rather than a silent stream.
        let mut ask = tokio::time::interval(PROGRESS_EVERY);
        loop {
            let response = tokio::select! {
                response = stream.message() => response?,
                _ = ask.tick() => {
                    stream.request_progress().await?;
                    continue;
                }
            };
            let Some(response) = response else {
                return Err(FleetError::Cancelled("the stream ended".into()));
            };
            if response.compact_revision() > 0 {
                warn!(
                    from = view.revision + 1,
                    compacted = response.compact_revision(),
                    "fleet watch fell behind a compaction; listing again"
                );
                resync = true;
                break;
            }
            if response.canceled() {
                return Err(FleetError::Cancelled(response.cancel_reason().to_owned()));
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => view.put(settings, kv.key(), kv.value(), kv.mod_revision()),
                    EventType::Delete => view.delete(settings, kv.key()),
                }
            }
            // Events and progress notifications both carry the revision the host is
            // complete up to.
            if let Some(header) = response.header() {
                view.revision = view.revision.max(header.revision());
            }
            // Sent even when nothing changed: it tells the daemon the store is alive and
            // how far this host is complete.
            let _ = events.send(FleetEvent::View(view.clone())).await;
        }
    }
}

/// The first lease bucket (a minute boundary) at or after `expires_unix`.
pub fn lease_bucket(expires_unix: u64) -> u64 {
    expires_unix.div_ceil(LEASE_BUCKET_SECONDS) * LEASE_BUCKET_SECONDS
}

/// The shared lease that ends at `bucket`, granted by the first writer that needs it.
async fn bucket_lease(
    settings: &FleetSettings,
    client: &mut Client,
    bucket: u64,
    now_unix: u64,
) -> Result<i64, FleetError> {
    let key = settings.lease_key(bucket);
    let ttl = i64::try_from(bucket.saturating_sub(now_unix).max(1)).unwrap_or(i64::MAX);
    let granted = client.lease_grant(ttl, None).await?.id();
    let response = client
        .txn(
            Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    granted.to_string(),
                    Some(PutOptions::new().with_lease(granted)),
                )])
                .or_else([TxnOp::get(key.clone(), None)]),
        )
        .await?;
    if response.succeeded() {
        return Ok(granted);
    }
    // Another writer made the bucket's lease first: use theirs.
    let _ = client.lease_revoke(granted).await;
    for op in response.op_responses() {
        if let TxnOpResponse::Get(get) = op
            && let Some(kv) = get.kvs().first()
        {
            let text = String::from_utf8_lossy(kv.value());
            return text.parse().map_err(|_| FleetError::Malformed {
                key,
                problem: format!("{text:?} is not a lease id"),
            });
        }
    }
    Err(FleetError::Malformed {
        key,
        problem: "the lease key vanished while it was read".into(),
    })
}

/// Writes (or replaces) a fleet entry. A temporary one goes on its minute's shared lease.
pub async fn add_entry(
    settings: &FleetSettings,
    client: &mut Client,
    kind: ListKind,
    entry: &FleetEntry,
    now_unix: u64,
) -> Result<i64, FleetError> {
    let value = serde_json::to_string(entry).map_err(|e| FleetError::Invalid(e.to_string()))?;
    let key = settings.entry_key(kind, entry.prefix);
    let options = match entry.expires_unix {
        Some(expires) if expires <= now_unix => {
            return Err(FleetError::Invalid("the entry has already expired".into()));
        }
        Some(expires) => {
            let lease = bucket_lease(settings, client, lease_bucket(expires), now_unix).await?;
            Some(PutOptions::new().with_lease(lease))
        }
        None => None,
    };
    let response = client.put(key, value, options).await?;
    Ok(response.header().map_or(0, |h| h.revision()))
}

/// Removes a fleet entry; whether it existed.
pub async fn remove_entry(
    settings: &FleetSettings,
    client: &mut Client,
    kind: ListKind,
    prefix: IpNet,
) -> Result<bool, FleetError> {
    let response = client
        .delete(settings.entry_key(kind, prefix), None)
        .await?;
    Ok(response.deleted() > 0)
}

/// The fleet policy as stored now, with its version; `None`: none was pushed (or it was
/// removed).
pub async fn read_policy(
    settings: &FleetSettings,
    client: &mut Client,
) -> Result<Option<FleetPolicy>, FleetError> {
    let key = settings.policy_key();
    let response = client.get(key.clone(), None).await?;
    let Some(kv) = response.kvs().first() else {
        return Ok(None);
    };
    let mut policy = parse_policy(&key, kv.value())?;
    policy.version = kv.mod_revision();
    Ok(Some(policy))
}

/// Swaps the fleet policy for `policy` (already checked by the writer) if its version is
/// still `expected` (0: none is stored), in one transaction; the new version. `None` as
/// `policy` removes it, so hosts return to their files' policy sections.
pub async fn swap_policy(
    settings: &FleetSettings,
    client: &mut Client,
    policy: Option<&FleetPolicy>,
    expected: i64,
) -> Result<i64, FleetError> {
    let key = settings.policy_key();
    let write = match policy {
        Some(policy) => {
            let value =
                serde_json::to_string(policy).map_err(|e| FleetError::Invalid(e.to_string()))?;
            TxnOp::put(key.clone(), value, None)
        }
        None => TxnOp::delete(key.clone(), None),
    };
    let response = client
        .txn(
            Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    expected,
                )])
                .and_then([write])
                .or_else([TxnOp::get(key.clone(), None)]),
        )
        .await?;
    if response.succeeded() {
        return Ok(response.header().map_or(0, |h| h.revision()));
    }
    let current = response
        .op_responses()
        .into_iter()
        .find_map(|op| match op {
            TxnOpResponse::Get(get) => Some(get.kvs().first().map_or(0, |kv| kv.mod_revision())),
            _ => None,
        })
        .unwrap_or(0);
    Err(FleetError::Conflict { expected, current })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(prefix: &str, meant: bool) -> FleetEntry {
        FleetEntry {
            prefix: prefix.parse().unwrap(),
            reason: "test".into(),
            author: "ops@edge1".into(),
            created_unix_ms: 1_000_000,
            expires_unix: None,
            meant,
        }
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|p| p.parse().unwrap()).collect()
    }

    #[test]
    fn guards_refuse_wide_entries_local_allows_and_anti_lockout() {
        let allow = nets(&["198.51.100.64/26", "2001:db8:1::/48"]);
        let never = nets(&["10.0.0.0/8"]);
        let cases = [
            ("203.0.113.0/24", false, Ok(())),
            ("203.0.0.0/16", false, Ok(())),
            ("203.0.0.0/15", false, Err(Refusal::TooWide)),
            ("203.0.0.0/15", true, Ok(())),
            ("2001:db9::/32", false, Ok(())),
            ("2001:db8::/31", false, Err(Refusal::TooWide)),
            ("2001:db8::/32", false, Err(Refusal::LocalAllow(allow[1]))),
            // Wider and narrower than a local allow both overlap it.
            ("198.51.100.0/24", false, Err(Refusal::LocalAllow(allow[0]))),
            (
                "198.51.100.70/32",
                false,
                Err(Refusal::LocalAllow(allow[0])),
            ),
            ("198.51.100.0/26", false, Ok(())),
            (
                "2001:db8:1:5::/64",
                false,
                Err(Refusal::LocalAllow(allow[1])),
            ),
            ("10.1.2.3/32", false, Err(Refusal::NeverDeny(never[0]))),
            ("0.0.0.0/0", true, Err(Refusal::NeverDeny(never[0]))),
        ];
        for (prefix, meant, expected) in cases {
            assert_eq!(
                check_entry(ListKind::Deny, &entry(prefix, meant), &allow, &never),
                expected,
                "{prefix} meant={meant}"
            );
        }
    }

    #[test]
    fn keys_name_the_truncated_prefix_and_round_trip() {
        let settings = FleetSettings {
            endpoints: vec![],
            prefix: "/limiter".into(),
            credentials: None,
            tls: None,
            publish: PublishSettings::default(),
        };
        assert_eq!(
            settings.entry_key(ListKind::Deny, "198.51.100.7/24".parse().unwrap()),
            "/limiter/deny/198.51.100.0_24"
        );
        assert_eq!(
            settings.entry_key(ListKind::Deny, "2001:db8::1/48".parse().unwrap()),
            "/limiter/deny/2001:db8::_48"
        );
        let stored = entry("198.51.100.0/24", false);
        let value = serde_json::to_vec(&stored).unwrap();
        let key = settings.entry_key(ListKind::Deny, stored.prefix);
        assert_eq!(
            parse_entry(&settings, ListKind::Deny, key.as_bytes(), &value).unwrap(),
            stored
        );
        // A value that names another prefix than its key is refused, not applied.
        assert!(
            parse_entry(
                &settings,
                ListKind::Deny,
                b"/limiter/deny/203.0.113.0_24",
                &value
            )
            .is_err()
        );
        assert!(parse_entry(&settings, ListKind::Deny, key.as_bytes(), b"{}").is_err());
    }

    #[test]
    fn lease_buckets_round_up_to_the_minute() {
        assert_eq!(lease_bucket(60), 60);
        assert_eq!(lease_bucket(61), 120);
        assert_eq!(lease_bucket(119), 120);
        assert_eq!(lease_bucket(1), 60);
    }

    #[test]
    fn a_view_splits_into_applied_and_refused_and_expires() {
        let mut view = FleetView::default();
        for (prefix, expires) in [("203.0.113.0/24", None), ("192.0.2.0/24", Some(50))] {
            let mut e = entry(prefix, false);
            e.expires_unix = expires;
            view.deny.insert(e.prefix, e);
        }
        let allow = nets(&["203.0.113.9/32"]);
        let split = view.split(&allow, &[], 10);
        assert_eq!(split.deny.len(), 1);
        assert_eq!(split.deny[0].prefix.to_string(), "192.0.2.0/24");
        assert_eq!(split.refused.len(), 1);
        assert!(view.split(&allow, &[], 50).deny.is_empty(), "expired at 50");
        assert!(view.expire(50));
        assert_eq!(view.deny.len(), 1);
        assert!(!view.expire(50));
    }

    fn settings() -> FleetSettings {
        FleetSettings {
            endpoints: vec![],
            prefix: "/limiter".into(),
            credentials: None,
            tls: None,
            publish: PublishSettings::default(),
        }
    }

    #[test]
    fn allows_need_only_be_narrow_enough() {
        let allow = nets(&["198.51.100.0/24"]);
        let never = nets(&["198.51.100.0/24"]);
        assert_eq!(
            check_entry(
                ListKind::Allow,
                &entry("198.51.100.0/24", false),
                &allow,
                &never
            ),
            Ok(())
        );
        assert_eq!(
            check_entry(ListKind::Allow, &entry("198.0.0.0/15", false), &[], &[]),
            Err(Refusal::TooWide)
        );
        let mut view = FleetView::default();
        let e = entry("198.51.100.0/24", false);
        view.allow.insert(e.prefix, e.clone());
        view.deny.insert(e.prefix, e);
        let split = view.split(&allow, &[], 0);
        assert_eq!((split.allow.len(), split.deny.len()), (1, 0));
        assert_eq!(split.refused[0].0, ListKind::Deny);
    }

    #[test]
    fn keys_are_classified_and_put_and_deleted_into_the_view() {
        let settings = settings();
        let mut view = FleetView::default();
        let deny = entry("203.0.113.0/24", false);
        let allow = entry("198.51.100.0/24", false);
        let policy = FleetPolicy {
            document: "mode = \"monitor\"\n".into(),
            author: "ops@edge1".into(),
            reason: "CHG-1".into(),
            created_unix_ms: 5,
            version: 0,
        };
        for (key, value) in [
            (
                settings.entry_key(ListKind::Deny, deny.prefix),
                serde_json::to_vec(&deny).unwrap(),
            ),
            (
                settings.entry_key(ListKind::Allow, allow.prefix),
                serde_json::to_vec(&allow).unwrap(),
            ),
            (settings.policy_key(), serde_json::to_vec(&policy).unwrap()),
            (settings.lease_key(60), b"12345".to_vec()),
            // A deny stored under the allow directory names another key: skipped.
            (
                settings.entry_key(ListKind::Allow, "192.0.2.0/24".parse().unwrap()),
                serde_json::to_vec(&deny).unwrap(),
            ),
        ] {
            view.put(&settings, key.as_bytes(), &value, 42);
        }
        assert_eq!(view.deny.values().collect::<Vec<_>>(), [&deny]);
        assert_eq!(view.allow.values().collect::<Vec<_>>(), [&allow]);
        assert_eq!(
            view.policy,
            Some(FleetPolicy {
                version: 42,
                ..policy
            })
        );
        view.delete(&settings, settings.policy_key().as_bytes());
        view.delete(
            &settings,
            settings.entry_key(ListKind::Deny, deny.prefix).as_bytes(),
        );
        assert_eq!(view.policy, None);
        assert!(view.deny.is_empty());
        assert_eq!(view.allow.len(), 1, "only the deny went");
        // The root's own prefix does not take another root's keys.
        assert_eq!(
            settings.classify("/limiter2/deny/1.2.3.0_24"),
            KeyKind::Other
        );
    }

    #[test]
    fn attack_records_publish_by_mode_cap_guards_and_type() {
        use crate::attacks::{AttackRecord, AttackType};
        let record = |kind, prefix: Option<&str>| AttackRecord {
            id: 7,
            kind,
            prefix: prefix.map(|p| p.parse().unwrap()),
            started_unix: 0,
            ended_unix: None,
            peak_packets_per_second: 1,
            current_packets_per_second: 1,
            dropped_packets: 1,
            top_prefixes: Vec::new(),
            interfaces: Default::default(),
            verdicts: Default::default(),
        };
        let on = PublishSettings {
            mode: PublishAttacks::On,
            max: 2,
            seconds: 600,
        };
        let flood = record(AttackType::SourceFlood, Some("203.0.113.7/32"));
        let publish = |settings: &PublishSettings, r: &AttackRecord, live: u64, never: &[IpNet]| {
            publication(settings, r, "limiter@edge1", 1_000_000, live, &[], never)
        };
        match publish(&on, &flood, 0, &[]) {
            Some(Publication::Publish(entry)) => {
                assert_eq!(entry.prefix.to_string(), "203.0.113.7/32");
                assert_eq!(entry.reason, "attack 7 (source_flood)");
                assert_eq!(entry.author, "limiter@edge1");
                assert_eq!(entry.expires_unix, Some(1_000 + 600));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            publish(&on, &flood, 2, &[]),
            Some(Publication::Capped(_))
        ));
        assert!(matches!(
            publish(&on, &flood, 0, &nets(&["203.0.113.0/24"])),
            Some(Publication::Refused(_, Refusal::NeverDeny(_)))
        ));
        let monitor = PublishSettings {
            mode: PublishAttacks::Monitor,
            ..on
        };
        assert!(matches!(
            publish(&monitor, &flood, 0, &[]),
            Some(Publication::WouldPublish(_))
        ));
        assert_eq!(publish(&PublishSettings::default(), &flood, 0, &[]), None);
        let prefix_flood = record(AttackType::PrefixFlood, Some("203.0.113.0/24"));
        assert!(matches!(
            publish(&on, &prefix_flood, 0, &[]),
            Some(Publication::Publish(_))
        ));
        // Forged or unproven sources are never denied fleet-wide.
        for kind in [
            AttackType::SpoofedFlood,
            AttackType::SynFlood,
            AttackType::AckFlood,
        ] {
            assert_eq!(
                publish(&on, &record(kind, Some("203.0.113.0/24")), 0, &[]),
                None,
                "{kind:?}"
            );
        }
        assert_eq!(
            publish(&on, &record(AttackType::SourceFlood, None), 0, &[]),
            None
        );
    }
}
