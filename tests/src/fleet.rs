//! The fleet's lab: a real three-member etcd cluster in a namespace of its own, bridged to
//! each lab's receiving namespace by a veth that carries no program, and edge hosts (a lab,
//! a daemon following the cluster, a sender of frames). The fleet tests, the benchmark and
//! the demo share it.

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    daemon::{Daemon, binary},
    frame::Frame,
    netns::{Lab, Netns, RawSender},
};

/// The cluster's network: 10.77.0.0/24 in its own namespace; member `i` at 10.77.0.(1+i).
pub struct Etcd {
    /// The cluster's namespace.
    pub ns: Netns,
    /// Data directories, logs and the files a test writes.
    pub dir: PathBuf,
    members: Vec<Option<Child>>,
    tag: u32,
}

impl Etcd {
    /// Members of the cluster.
    pub const MEMBERS: usize = 3;

    pub fn address(member: usize) -> String {
        format!("10.77.0.{}", 1 + member)
    }

    pub fn endpoints() -> Vec<String> {
        (0..Self::MEMBERS)
            .map(|m| format!("http://{}:2379", Self::address(m)))
            .collect()
    }

    /// Starts the cluster and waits until it is healthy.
    pub fn cluster() -> Self {
        let tag = std::process::id() % 100_000;
        let ns = Netns::new(&format!("lim-etcd-{tag}"));
        ns.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        ns.exec(&["ip", "link", "set", "br0", "up"]);
        for m in 0..Self::MEMBERS {
            ns.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", Self::address(m)),
                "dev",
                "br0",
            ]);
        }
        let dir = std::env::temp_dir().join(format!("limiter-etcd-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut etcd = Self {
            ns,
            dir,
            members: (0..Self::MEMBERS).map(|_| None).collect(),
            tag,
        };
        for m in 0..Self::MEMBERS {
            etcd.start(m);
        }
        etcd.wait_healthy();
        etcd
    }

    /// Bridges a lab's receiving namespace to the cluster: its address is 10.77.0.(10+host).
    pub fn connect(&self, lab: &Lab, host: usize) {
        let inside = format!("fa{host}x{}", self.tag);
        let outside = format!("fb{host}x{}", self.tag);
        crate::netns::ip(&[
            "link",
            "add",
            &inside,
            "netns",
            &lab.rx.name,
            "type",
            "veth",
            "peer",
            "name",
            &outside,
            "netns",
            &self.ns.name,
        ]);
        self.ns
            .exec(&["ip", "link", "set", &outside, "master", "br0", "up"]);
        lab.rx.exec(&[
            "ip",
            "addr",
            "add",
            &format!("10.77.0.{}/24", 10 + host),
            "dev",
            &inside,
        ]);
        lab.rx.exec(&["ip", "link", "set", &inside, "up"]);
    }

    pub fn start(&mut self, m: usize) {
        let name = format!("m{m}");
        let peer = |m: usize| format!("http://{}:2380", Self::address(m));
        let cluster = (0..Self::MEMBERS)
            .map(|m| format!("m{m}={}", peer(m)))
            .collect::<Vec<_>>()
            .join(",");
        let client = format!("http://{}:2379", Self::address(m));
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns.name))
            .args(["etcd", "--name", &name])
            .arg("--data-dir")
            .arg(self.dir.join(&name))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer(m),
                "--initial-advertise-peer-urls",
                &peer(m),
            ])
            .args([
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                "new",
            ])
            .args(["--initial-cluster-token", &format!("limiter-{}", self.tag)])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (cargo xtask setup installs etcd-server)");
        self.members[m] = Some(child);
    }

    pub fn stop(&mut self, m: usize) {
        if let Some(mut child) = self.members[m].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let endpoints = (0..Self::MEMBERS)
            .filter(|m| self.members[*m].is_some())
            .map(|m| format!("http://{}:2379", Self::address(m)))
            .collect::<Vec<_>>()
            .join(",");
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns.name))
            .args(["etcdctl", "--endpoints", &endpoints, "--command-timeout=5s"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .unwrap()
    }

    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.etcdctl(&["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// The member that leads now.
    pub fn leader(&self) -> usize {
        let out = self.etcdctl(&["endpoint", "status", "--write-out=json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let statuses = status.as_array().unwrap();
        let leader = statuses[0]["Status"]["leader"].as_u64().unwrap();
        let index = statuses
            .iter()
            .find(|s| s["Status"]["header"]["member_id"].as_u64() == Some(leader))
            .and_then(|s| s["Endpoint"].as_str())
            .expect("a leader");
        (0..Self::MEMBERS)
            .find(|m| index.contains(&Self::address(*m)))
            .unwrap()
    }

    pub fn revision(&self) -> i64 {
        let out = self.etcdctl(&["endpoint", "status", "--write-out=json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        status[0]["Status"]["header"]["revision"].as_i64().unwrap()
    }

    /// A config file's `[fleet]` section for this cluster.
    pub fn fleet_section(extra: &str) -> String {
        format!(
            "[fleet]\nendpoints = [{}]\nprefix = \"/limiter-test\"\n{extra}",
            Self::endpoints()
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// `limiter fleet ...`, run inside the cluster's namespace with a config naming it.
    pub fn limiter(&self, args: &[&str]) -> Output {
        let config = self.dir.join("cli.toml");
        std::fs::write(&config, Self::fleet_section("")).unwrap();
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns.name))
            .arg(binary())
            .arg("fleet")
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in 0..Self::MEMBERS {
            self.stop(m);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One edge host: a lab, a daemon following the fleet, and a sender of attack frames.
pub struct Host {
    /// Its namespaces.
    pub lab: Lab,
    /// Its daemon.
    pub daemon: Daemon,
    /// Sends frames into it.
    pub sender: RawSender,
}

impl Host {
    /// A host following `etcd`, with `extra` config text (before the `[fleet]` section).
    pub fn new(etcd: &Etcd, index: usize, extra: &str) -> Self {
        Self::with_fleet(etcd, index, extra, "")
    }

    /// A host following `etcd`, with `extra` config text, and `fleet` text in `[fleet]`.
    pub fn with_fleet(etcd: &Etcd, index: usize, extra: &str, fleet: &str) -> Self {
        let tag = format!("f{index}");
        let lab = Lab::new(&tag, &["192.0.2.1/24"], &["192.0.2.10/24"]);
        etcd.connect(&lab, index);
        let config = format!(
            "interfaces = [\"{}\"]\n\n[default_limit]\npackets_per_second = 100000\nburst_packets = 100000\n\n{}\n{}",
            lab.rx_if,
            extra,
            Etcd::fleet_section(&format!("never_deny = [\"192.0.2.200/32\"]\n{fleet}"))
        );
        let mut daemon = Daemon::new(&tag, &lab.rx.name, &lab.rx_if, &config);
        daemon.start();
        let sender = RawSender::new(&lab.tx, &lab.tx_if);
        Self {
            lab,
            daemon,
            sender,
        }
    }

    /// Frames from `source` dropped by the denylist so far.
    pub fn denied(&self) -> u64 {
        self.daemon.status()["interfaces"][0]["reasons"]["denylisted"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Sends one frame from `source` and says whether the denylist dropped it.
    pub fn probe(&self, source: &str) -> bool {
        self.counted(source, "denylisted")
    }

    /// Sends one frame from `source` and says whether it was counted under `reason`.
    pub fn counted(&self, source: &str, reason: &str) -> bool {
        let count = || {
            self.daemon.status()["interfaces"][0]["reasons"][reason]
                .as_u64()
                .unwrap_or(0)
        };
        let before = count();
        self.sender.send(&Frame::udp(source, 9_000).build());
        // The counter is read after the frame has gone through the program.
        thread::sleep(Duration::from_millis(2));
        count() > before
    }

    pub fn fleet_status(&self) -> serde_json::Value {
        self.daemon.status()["fleet"].clone()
    }
}

/// Probes every host until `source` is denied (or not) on all; the time it took.
pub fn until_all(hosts: &[Host], source: &str, denied: bool, limit: Duration) -> Duration {
    until_all_counted(hosts, source, "denylisted", denied, limit)
}

/// Probes every host until `source`'s frames are counted under `reason` (or not) on all.
pub fn until_all_counted(
    hosts: &[Host],
    source: &str,
    reason: &str,
    counted: bool,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    let mut done = vec![false; hosts.len()];
    while done.iter().any(|d| !d) {
        for (host, done) in hosts.iter().zip(&mut done) {
            if !*done && host.counted(source, reason) == counted {
                *done = true;
            }
        }
        assert!(
            start.elapsed() < limit,
            "{source} {}counted as {reason} on every host within {limit:?}: {done:?}; statuses {:?}",
            if counted { "" } else { "still " },
            hosts.iter().map(Host::fleet_status).collect::<Vec<_>>()
        );
    }
    start.elapsed()
}

/// Waits until every host follows the store.
pub fn until_connected(hosts: &[Host]) {
    for host in hosts {
        let deadline = Instant::now() + Duration::from_secs(15);
        while host.fleet_status()["connected"] != true {
            assert!(Instant::now() < deadline, "{}", host.daemon.logs());
            thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
