//! The fleet: every edge host enforces the same denylist, kept in etcd.
//!
//! Layout under the configured root (`[fleet] prefix`, `/limiter` by default; docs/fleet.md):
//!
//! - `ROOT/deny/ADDRESS_LENGTH` (`/limiter/deny/198.51.100.0_24`): one key per fleet deny,
//!   its value a JSON [`FleetEntry`] (prefix, reason, author, creation and expiry time).
//! - `ROOT/leases/MINUTE`: the id of the shared lease that ends at that minute (Unix seconds,
//!   a multiple of 60). A temporary entry is attached to the lease of the first minute
//!   boundary at or after its expiry, so a thousand temporary denies cost a few leases, not a
//!   thousand, and etcd deletes them with no sweeper. The lease key is on its own lease.
//!
//! Edge hosts only read: they list `ROOT/deny/` at revision R, then watch from R + 1 with
//! progress notifications. A watch the server cancels because R + 1 was compacted is never
//! resumed: the host lists again (a watcher must never miss a delete). Each list or batch of
//! events yields a whole [`FleetView`], which the daemon applies as one change.

use std::{collections::BTreeMap, time::Duration};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
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

/// Where the fleet's store is and how to log in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetSettings {
    /// etcd client URLs (`http://10.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// The key root, without a trailing `/`.
    pub prefix: String,
    /// User name and password, when etcd has authentication on.
    pub credentials: Option<(String, String)>,
}

impl FleetSettings {
    /// The prefix every deny key starts with.
    pub fn deny_root(&self) -> String {
        format!("{}/deny/", self.prefix)
    }

    /// The key of the deny of `prefix`.
    pub fn deny_key(&self, prefix: IpNet) -> String {
        let prefix = prefix.trunc();
        format!(
            "{}{}_{}",
            self.deny_root(),
            prefix.addr(),
            prefix.prefix_len()
        )
    }

    /// The key holding the id of the lease that ends at `bucket`.
    pub fn lease_key(&self, bucket: u64) -> String {
        format!("{}/leases/{bucket}", self.prefix)
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
        Client::connect(&self.endpoints, Some(options))
            .await
            .map_err(FleetError::Etcd)
    }
}

/// One fleet deny, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetEntry {
    /// The denied prefix.
    pub prefix: IpNet,
    /// Why (an incident, an attack id).
    pub reason: String,
    /// Who wrote it (`user@host`).
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

/// Why a host does not apply a fleet entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Refusal {
    /// Wider than the fleet may deny without saying it is meant.
    #[error(
        "wider than /{WIDEST_V4} (IPv4) or /{WIDEST_V6} (IPv6): write it with --meant if it is"
    )]
    TooWide,
    /// It overlaps this host's allowlist, which a fleet entry never overrides.
    #[error("overlaps the local allow of {0}")]
    LocalAllow(IpNet),
    /// It overlaps this host's anti-lockout list (`[fleet] never_deny`).
    #[error("overlaps the anti-lockout prefix {0} ([fleet] never_deny)")]
    NeverDeny(IpNet),
}

/// Whether this host may apply `entry`, given its own allowlist and anti-lockout list.
pub fn check_entry(
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
    let overlaps = |other: &IpNet| other.contains(&entry.prefix) || entry.prefix.contains(other);
    if let Some(protected) = never_deny.iter().find(|p| overlaps(p)) {
        return Err(Refusal::NeverDeny(*protected));
    }
    if let Some(allowed) = allow.iter().find(|p| overlaps(p)) {
        return Err(Refusal::LocalAllow(*allowed));
    }
    Ok(())
}

/// The fleet's denylist as one host last read it: what the daemon applies and keeps on
/// disk, so a restart without etcd enforces it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetView {
    /// The etcd revision it is complete up to.
    pub revision: i64,
    /// The entries, by prefix.
    pub deny: BTreeMap<IpNet, FleetEntry>,
}

impl FleetView {
    /// The entries this host applies at `now_unix`, and those it refuses, with why.
    pub fn split(
        &self,
        allow: &[IpNet],
        never_deny: &[IpNet],
        now_unix: u64,
    ) -> (Vec<&FleetEntry>, Vec<(&FleetEntry, Refusal)>) {
        let mut applied = Vec::new();
        let mut refused = Vec::new();
        for entry in self.deny.values().filter(|e| e.live(now_unix)) {
            match check_entry(entry, allow, never_deny) {
                Ok(()) => applied.push(entry),
                Err(why) => refused.push((entry, why)),
            }
        }
        (applied, refused)
    }

    /// Drops expired entries; whether any went.
    pub fn expire(&mut self, now_unix: u64) -> bool {
        let before = self.deny.len();
        self.deny.retain(|_, e| e.live(now_unix));
        self.deny.len() != before
    }
}

/// What the watcher tells the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetEvent {
    /// The whole denylist at a revision (after a list, or a batch of watch events).
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
}

/// Reads one stored entry, checking that its key names its prefix.
fn parse_entry(
    settings: &FleetSettings,
    key: &[u8],
    value: &[u8],
) -> Result<FleetEntry, FleetError> {
    let key = String::from_utf8_lossy(key).into_owned();
    let entry: FleetEntry = serde_json::from_slice(value).map_err(|e| FleetError::Malformed {
        key: key.clone(),
        problem: e.to_string(),
    })?;
    if settings.deny_key(entry.prefix) != key {
        return Err(FleetError::Malformed {
            problem: format!("holds {}, not the prefix its key names", entry.prefix),
            key,
        });
    }
    Ok(entry)
}

/// Lists the denylist at the store's current revision.
pub async fn list(settings: &FleetSettings, client: &mut Client) -> Result<FleetView, FleetError> {
    let response = client
        .get(settings.deny_root(), Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = response.header().map_or(0, |h| h.revision());
    let mut view = FleetView {
        revision,
        deny: BTreeMap::new(),
    };
    for kv in response.kvs() {
        match parse_entry(settings, kv.key(), kv.value()) {
            Ok(entry) => {
                view.deny.insert(entry.prefix.trunc(), entry);
            }
            Err(e) => warn!("fleet entry ignored: {e}"),
        }
    }
    Ok(view)
}

/// Follows the store for as long as the receiver lives: list, then watch from the next
/// revision; list again after a compaction; connect again after a loss. Never returns
/// while the daemon listens.
pub async fn follow(settings: FleetSettings, events: mpsc::Sender<FleetEvent>) {
    let mut connected = false;
    loop {
        let result = follow_once(&settings, &events, &mut connected).await;
        if events.is_closed() {
            return;
        }
        if let Err(e) = result
            && connected
        {
            warn!("fleet store lost, the last fleet policy stays in force: {e}");
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
                settings.deny_root(),
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
                    EventType::Put => match parse_entry(settings, kv.key(), kv.value()) {
                        Ok(entry) => {
                            view.deny.insert(entry.prefix.trunc(), entry);
                        }
                        Err(e) => warn!("fleet entry ignored: {e}"),
                    },
                    EventType::Delete => {
                        let key = String::from_utf8_lossy(kv.key());
                        view.deny.retain(|p, _| settings.deny_key(*p) != key);
                    }
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

/// Writes (or replaces) a fleet deny. A temporary one goes on its minute's shared lease.
pub async fn add_deny(
    settings: &FleetSettings,
    client: &mut Client,
    entry: &FleetEntry,
    now_unix: u64,
) -> Result<i64, FleetError> {
    let value = serde_json::to_string(entry).map_err(|e| FleetError::Invalid(e.to_string()))?;
    let key = settings.deny_key(entry.prefix);
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

/// Removes a fleet deny; whether it existed.
pub async fn remove_deny(
    settings: &FleetSettings,
    client: &mut Client,
    prefix: IpNet,
) -> Result<bool, FleetError> {
    let response = client.delete(settings.deny_key(prefix), None).await?;
    Ok(response.deleted() > 0)
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
                check_entry(&entry(prefix, meant), &allow, &never),
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
        };
        assert_eq!(
            settings.deny_key("198.51.100.7/24".parse().unwrap()),
            "/limiter/deny/198.51.100.0_24"
        );
        assert_eq!(
            settings.deny_key("2001:db8::1/48".parse().unwrap()),
            "/limiter/deny/2001:db8::_48"
        );
        let stored = entry("198.51.100.0/24", false);
        let value = serde_json::to_vec(&stored).unwrap();
        let key = settings.deny_key(stored.prefix);
        assert_eq!(
            parse_entry(&settings, key.as_bytes(), &value).unwrap(),
            stored
        );
        // A value that names another prefix than its key is refused, not applied.
        assert!(parse_entry(&settings, b"/limiter/deny/203.0.113.0_24", &value).is_err());
        assert!(parse_entry(&settings, key.as_bytes(), b"{}").is_err());
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
        let (applied, refused) = view.split(&allow, &[], 10);
        assert_eq!(applied.len(), 1);
        assert_eq!(applied[0].prefix.to_string(), "192.0.2.0/24");
        assert_eq!(refused.len(), 1);
        let (applied, _) = view.split(&allow, &[], 50);
        assert!(applied.is_empty(), "expired at 50");
        assert!(view.expire(50));
        assert_eq!(view.deny.len(), 1);
        assert!(!view.expire(50));
    }
}
