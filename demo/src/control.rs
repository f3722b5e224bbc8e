//! The real `limiter`: its configuration for the lab, the daemon started inside the edge
//! namespace, and the operator's CLI run from the root namespace (the control socket is a
//! file, so it is reachable from any namespace).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    lab::{self, Lab},
    metrics, shutdown,
};

/// The limit of every source outside a class. A legitimate client here sends a few requests
/// a second, each about six packets on a new connection (SYN, ACK, request, ACKs, FIN), so
/// 200 packets per second leaves it a wide margin.
pub const DEFAULT_PPS: u64 = 200;
pub const DEFAULT_BURST: u64 = 400;
/// The market makers' class limit at the start: higher than the default, but below what the
/// market maker sends when its traffic surges in phase 5.
pub const MARKET_MAKER_PPS: u64 = 500;
pub const MARKET_MAKER_BURST: u64 = 500;
/// What the operator raises the market makers' limit to in phase 5.
pub const MARKET_MAKER_RAISED_PPS: u64 = 2000;
pub const MARKET_MAKER_RAISED_BURST: u64 = 4000;
pub const MARKET_MAKER_CLASS: &str = "market-makers";

/// The lab's files, under `<out>/lab`.
pub struct LabFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub daemon_log: PathBuf,
    pub api_log: PathBuf,
}

/// A file that marks `<out>/lab` as ours, so a later run may delete it.
const MARKER: &str = ".limiter-demo-lab";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

impl LabFiles {
    /// Prepares an empty `<out>/lab`, removing the one a previous run left (never a directory
    /// this program did not make).
    pub fn prepare(out: &Path) -> Result<Self> {
        fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
        let out = out
            .canonicalize()
            .with_context(|| format!("resolve {}", out.display()))?;
        let dir = out.join("lab");
        if dir.exists() {
            if !dir.join(MARKER).exists() {
                bail!(
                    "{} exists and was not made by limiter-demo; choose another --out",
                    dir.display()
                );
            }
            // A previous run's runtime.json would carry its allowlist into this run.
            fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        fs::write(
            dir.join(MARKER),
            "made by limiter-demo; removed by its next run\n",
        )
        .with_context(|| format!("write {}", dir.join(MARKER).display()))?;
        let files = Self {
            config: dir.join("limiter.toml"),
            socket: dir.join("limiter.sock"),
            state_dir: dir.join("state"),
            daemon_log: dir.join("limiter.log"),
            api_log: dir.join("api.log"),
            dir,
        };
        if files.socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "the control socket path {} is longer than a Unix socket allows; use a shorter --out",
                files.socket.display()
            );
        }
        Ok(files)
    }
}

/// The lab's limiter configuration (docs/config.md). Mode starts as monitor; the demo
/// switches to enforce with the CLI, as an operator would after checking the would-drops.
pub fn config_text() -> String {
    format!(
        r#"# The lab limiter's configuration, written by limiter-demo. Reference: docs/config.md.
mode = "monitor"
block_seconds = 0

# Every source outside a class: ~6 packets per HTTP request on a new connection, so a
# client sending 5 requests a second uses ~30 of these.
[default_limit]
packets_per_second = {DEFAULT_PPS}
burst_packets = {DEFAULT_BURST}
# Per /24 (and /48): SYNs and connectionless traffic of all its sources together (packets of
# established connections do not count). The clients' /24 opens a few hundred connections a
# second at most; the prefix flood's /24 sends 30,000 datagrams a second.
aggregate_packets_per_second = 2000
aggregate_burst_packets = 4000

[[class]]
name = "{MARKET_MAKER_CLASS}"
prefixes = ["{mm}/32"]
[class.limit]
packets_per_second = {MARKET_MAKER_PPS}
burst_packets = {MARKET_MAKER_BURST}

# Spoofed floods: few new sources per second may get state; past that, unknown sources
# share one small bucket, so the flood can neither pass nor evict the known clients.
[spoofing]
new_sources_per_second_per_cpu = 100
new_sources_burst = 100
shared_packets_per_second = 200
shared_burst_packets = 200

# TCP judged by session: SYNs from sources that never completed a handshake share one
# small bucket per family (the spoofed SYN flood lands here and creates no state); TCP of
# no established connection shares another. The lab's four clients open a few connections
# a second; a production host sizes these for its busiest minute (docs/config.md).
[sessions]
unproven_packets_per_second = 200
unproven_burst_packets = 200
out_of_state_packets_per_second = 400
out_of_state_burst_packets = 400

# Attack mode: once unproven SYNs to the API stay above 2,000/s for a second, the XDP
# program answers them itself with a SYN cookie, so a brand-new client is proven by its ACK
# instead of losing the unproven bucket's lottery to the spoofed flood. Few SYN-ACKs per /24
# of the spoofed sources, so the lab's attacker namespace is not swamped with them.
[challenge]
mode = "auto"
ports = [{port}]
engage_syns_per_second = 2000
engage_seconds = 1
calm_seconds = 10
replies_per_prefix_per_second = 20
replies_burst = 20
"#,
        mm = lab::MARKET_MAKER_V4,
        port = lab::API_PORT,
    )
}

/// The `limiter` binary and the lab daemon's control socket.
#[derive(Clone)]
pub struct LimiterCli {
    binary: PathBuf,
    socket: PathBuf,
}

impl LimiterCli {
    pub fn new(binary: &Path, socket: &Path) -> Self {
        Self {
            binary: binary.to_owned(),
            socket: socket.to_owned(),
        }
    }

    /// Runs `limiter --socket S args...` and returns what it printed; fails with its error.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.binary)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {}", self.binary.display()))?;
        if !out.status.success() {
            bail!(
                "{}: {}",
                self.display(args),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The command line, for the user to read or repeat.
    pub fn display(&self, args: &[&str]) -> String {
        format!(
            "{} --socket {} {}",
            self.binary.display(),
            self.socket.display(),
            args.join(" ")
        )
    }

    /// Packets the limiter has dropped from any of `sources`, from the per-source table
    /// (`limiter top --json`). Sources are ordered by packets seen, and the top 100 reach far
    /// beyond the lab's few busy sources (spoofed sources send a packet or two each).
    pub fn dropped_from(&self, sources: &[std::net::IpAddr]) -> Result<u64> {
        #[derive(Deserialize)]
        struct Row {
            prefix: IpNet,
            dropped: u64,
        }
        #[derive(Deserialize)]
        struct Top {
            items: Vec<Row>,
        }
        let text = self.run(&["top", "-n", "100", "--by", "packets", "--totals", "--json"])?;
        let rows = serde_json::from_str::<Top>(&text)
            .context("parse the output of limiter top --json")?
            .items;
        Ok(rows
            .iter()
            .filter(|row| sources.iter().any(|source| row.prefix.contains(source)))
            .map(|row| row.dropped)
            .sum())
    }

    /// Starts the daemon attached to the edge's interface in native mode and waits until it
    /// answers on its socket and reports the program attached.
    pub fn start_daemon(&self, lab: &mut Lab, files: &LabFiles) -> Result<()> {
        let args: Vec<String> = [
            "--socket",
            &files.socket.to_string_lossy(),
            "run",
            "--config",
            &files.config.to_string_lossy(),
            "--iface",
            lab::EDGE_IF,
            "--attach",
            "native",
            "--state-dir",
            &files.state_dir.to_string_lossy(),
            "--pin-dir",
            lab::PIN_DIR,
            "--metrics",
            &lab::METRICS_ADDR.to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        lab.spawn_in_edge("the limiter daemon", &self.binary, &args, &files.daemon_log)?;

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            shutdown::check()?;
            lab.check_processes().with_context(|| {
                format!("the daemon failed; see {}", files.daemon_log.display())
            })?;
            let ready = self.run(&["status"]).is_ok() && metrics::scrape().is_ok();
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the daemon did not come up within 20 s; see {}",
                    files.daemon_log.display()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}
