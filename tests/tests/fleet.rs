//! The fleet: a real three-member etcd cluster, three real daemons in three lab namespaces,
//! real packets. The cluster lives in a namespace of its own, bridged to each lab's
//! receiving namespace by a veth that carries no program, so the daemons reach etcd over a
//! network they can lose.

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use limiter_tests::{
    daemon::{Daemon, binary},
    frame::Frame,
    netns::{Lab, Netns, RawSender},
    require_root,
};

/// The cluster's network: 10.77.0.0/24 in its own namespace; member `i` at 10.77.0.(1+i).
struct Etcd {
    ns: Netns,
    dir: PathBuf,
    members: Vec<Option<Child>>,
    tag: u32,
}

impl Etcd {
    const MEMBERS: usize = 3;

    fn address(member: usize) -> String {
        format!("10.77.0.{}", 1 + member)
    }

    fn endpoints() -> Vec<String> {
        (0..Self::MEMBERS)
            .map(|m| format!("http://{}:2379", Self::address(m)))
            .collect()
    }

    fn new() -> Self {
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
    fn connect(&self, lab: &Lab, host: usize) {
        let inside = format!("fa{host}x{}", self.tag);
        let outside = format!("fb{host}x{}", self.tag);
        limiter_tests::netns::ip(&[
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

    fn start(&mut self, m: usize) {
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

    fn stop(&mut self, m: usize) {
        if let Some(mut child) = self.members[m].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn etcdctl(&self, args: &[&str]) -> Output {
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

    fn wait_healthy(&self) {
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
    fn leader(&self) -> usize {
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

    fn revision(&self) -> i64 {
        let out = self.etcdctl(&["endpoint", "status", "--write-out=json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        status[0]["Status"]["header"]["revision"].as_i64().unwrap()
    }

    /// A config file's `[fleet]` section for this cluster.
    fn fleet_section(extra: &str) -> String {
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
    fn limiter(&self, args: &[&str]) -> Output {
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
struct Host {
    lab: Lab,
    daemon: Daemon,
    sender: RawSender,
}

impl Host {
    fn new(etcd: &Etcd, index: usize, extra: &str) -> Self {
        let tag = format!("f{index}");
        let lab = Lab::new(&tag, &["192.0.2.1/24"], &["192.0.2.10/24"]);
        etcd.connect(&lab, index);
        let config = format!(
            "interfaces = [\"{}\"]\n\n[default_limit]\npackets_per_second = 100000\nburst_packets = 100000\n\n{}\n{}",
            lab.rx_if,
            extra,
            Etcd::fleet_section("never_deny = [\"192.0.2.200/32\"]\n")
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
    fn denied(&self) -> u64 {
        self.daemon.status()["interfaces"][0]["reasons"]["denylisted"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Sends one frame from `source` and says whether the denylist dropped it.
    fn probe(&self, source: &str) -> bool {
        let before = self.denied();
        self.sender.send(&Frame::udp(source, 9_000).build());
        // The counter is read after the frame has gone through the program.
        thread::sleep(Duration::from_millis(2));
        self.denied() > before
    }

    fn fleet_status(&self) -> serde_json::Value {
        self.daemon.status()["fleet"].clone()
    }
}

/// Probes every host until `source` is denied (or not) on all; the time it took.
fn until_all(hosts: &[Host], source: &str, denied: bool, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut done = vec![false; hosts.len()];
    while done.iter().any(|d| !d) {
        for (host, done) in hosts.iter().zip(&mut done) {
            if !*done && host.probe(source) == denied {
                *done = true;
            }
        }
        assert!(
            start.elapsed() < limit,
            "{source} not {} on every host within {limit:?}: {done:?}; statuses {:?}",
            if denied { "denied" } else { "passed" },
            hosts.iter().map(Host::fleet_status).collect::<Vec<_>>()
        );
    }
    start.elapsed()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn fleet_denies_reach_every_host_survive_a_lost_leader_and_a_lost_cluster() {
    require_root();
    let mut etcd = Etcd::new();
    let hosts: Vec<Host> = (0..3)
        .map(|i| {
            // Host 2 allows a prefix locally: the fleet never overrides that.
            let extra = if i == 2 {
                "[allowlist]\nprefixes = [\"198.51.100.0/24\"]\n"
            } else {
                ""
            };
            Host::new(&etcd, i, extra)
        })
        .collect();
    for host in &hosts {
        let deadline = Instant::now() + Duration::from_secs(15);
        while host.fleet_status()["connected"] != true {
            assert!(Instant::now() < deadline, "{}", host.daemon.logs());
            thread::sleep(Duration::from_millis(100));
        }
    }

    // A temporary deny, on its minute's shared lease.
    ok(&etcd.limiter(&[
        "deny",
        "add",
        "203.0.113.0/24",
        "--reason",
        "attack 7",
        "--timeout",
        "5s",
    ]));
    let took = until_all(&hosts, "203.0.113.7", true, Duration::from_secs(1));
    println!("a fleet deny dropped on all three hosts after {took:?}");
    let listed = ok(&etcd.limiter(&["deny", "list", "--json"]));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let entry = &listed["deny"]["203.0.113.0/24"];
    assert_eq!(entry["reason"], "attack 7", "{listed}");
    assert!(entry["author"].as_str().unwrap().contains('@'), "{listed}");
    let leases = etcd.etcdctl(&["lease", "list"]);
    assert!(
        String::from_utf8_lossy(&leases.stdout).contains("found 1 leases"),
        "one shared lease: {}",
        String::from_utf8_lossy(&leases.stdout)
    );
    // Every host ends it at its expiry, whatever the lease's minute.
    until_all(&hosts, "203.0.113.7", false, Duration::from_secs(10));

    // Guards: a wide prefix is refused by the writer; one overlapping a host's local allow
    // is refused on that host only, and reported there.
    let wide = etcd.limiter(&["deny", "add", "198.0.0.0/15", "--reason", "too wide"]);
    assert!(!wide.status.success());
    assert!(
        String::from_utf8_lossy(&wide.stderr).contains("--meant"),
        "{wide:?}"
    );
    ok(&etcd.limiter(&["deny", "add", "198.51.100.0/25", "--reason", "INC-1"]));
    until_all(&hosts[..2], "198.51.100.9", true, Duration::from_secs(2));
    assert!(
        !hosts[2].probe("198.51.100.9"),
        "host 2's local allow holds"
    );
    let refused = &hosts[2].fleet_status()["refused"];
    assert!(
        refused.to_string().contains("198.51.100.0/25")
            && refused.to_string().contains("local allow"),
        "{refused}"
    );
    assert!(
        hosts[2]
            .daemon
            .logs()
            .contains("fleet deny refused on this host")
    );
    // The anti-lockout list holds on every host.
    ok(&etcd.limiter(&["deny", "add", "192.0.2.200/32", "--reason", "lockout"]));
    thread::sleep(Duration::from_millis(500));
    for host in &hosts {
        assert!(!host.probe("192.0.2.200"), "never_deny holds");
    }

    // The leader stops: changes still reach every host after the election.
    let leader = etcd.leader();
    etcd.stop(leader);
    let start = Instant::now();
    loop {
        if etcd
            .limiter(&[
                "deny",
                "add",
                "203.0.113.0/24",
                "--reason",
                "after election",
            ])
            .status
            .success()
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no write after the election"
        );
        thread::sleep(Duration::from_millis(200));
    }
    until_all(&hosts, "203.0.113.7", true, Duration::from_secs(10));
    etcd.start(leader);
    etcd.wait_healthy();

    // The whole cluster stops: every host keeps enforcing and says it is disconnected.
    for m in 0..Etcd::MEMBERS {
        etcd.stop(m);
    }
    for host in &hosts {
        let deadline = Instant::now() + Duration::from_secs(20);
        while host.fleet_status()["connected"] != false {
            assert!(
                Instant::now() < deadline,
                "still connected: {}",
                host.fleet_status()
            );
            thread::sleep(Duration::from_millis(200));
        }
        assert!(host.probe("203.0.113.7"), "enforcing while etcd is down");
    }
    let metrics =
        limiter_tests::netns::http_get(&hosts[0].lab.rx, "http://127.0.0.1:9810/metrics", None).2;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("limiter_fleet_connected") && l.ends_with(" 0")),
        "{metrics}"
    );
    // A daemon restarted while etcd is down enforces the last fleet policy it applied.
    let mut hosts = hosts;
    hosts[1].daemon.kill9();
    hosts[1].daemon.start();
    assert!(
        hosts[1].probe("203.0.113.7"),
        "restarted without etcd, still enforcing"
    );
    assert_eq!(hosts[1].fleet_status()["connected"], false);

    // The cluster returns; a change and a compaction past every host's revision: each host
    // lists again and converges.
    for m in 0..Etcd::MEMBERS {
        etcd.start(m);
    }
    etcd.wait_healthy();
    ok(&etcd.limiter(&["deny", "remove", "203.0.113.0/24"]));
    ok(&etcd.limiter(&["deny", "add", "203.0.114.0/24", "--reason", "while away"]));
    let revision = etcd.revision();
    ok(&etcd.etcdctl(&["compact", &revision.to_string()]));
    until_all(&hosts, "203.0.113.7", false, Duration::from_secs(20));
    until_all(&hosts, "203.0.114.7", true, Duration::from_secs(20));
    for host in &hosts {
        let fleet = host.fleet_status();
        assert_eq!(fleet["connected"], true, "{fleet}");
        assert!(fleet["revision"].as_i64().unwrap() >= revision, "{fleet}");
    }
    // The removed temporary entry's lease is gone from etcd too (within its minute).
    let deadline = Instant::now() + Duration::from_secs(75);
    loop {
        let leases = String::from_utf8_lossy(&etcd.etcdctl(&["lease", "list"]).stdout).into_owned();
        if leases.contains("found 0 leases") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the shared lease never expired: {leases}"
        );
        thread::sleep(Duration::from_secs(1));
    }
    let _ = hosts;
}
