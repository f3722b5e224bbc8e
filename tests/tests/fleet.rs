//! The fleet: a real three-member etcd cluster, three real daemons in three lab namespaces,
//! real packets. The cluster lives in a namespace of its own, bridged to each lab's
//! receiving namespace by a veth that carries no program, so the daemons reach etcd over a
//! network they can lose.

use std::{
    thread,
    time::{Duration, Instant},
};

use limiter_tests::{
    fleet::{Etcd, Host, ok, until_all, until_all_counted, until_connected},
    require_root,
};

#[test]
fn fleet_denies_reach_every_host_survive_a_lost_leader_and_a_lost_cluster() {
    require_root();
    let mut etcd = Etcd::cluster();
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
    until_connected(&hosts);

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

/// A policy document that drops 203.0.113.0/24 by a zero-rate class.
const POLICY_DROPS_TEST_NET_3: &str = "mode = \"enforce\"\n\n[default_limit]\npackets_per_second = 100000\nburst_packets = 100000\n\n[[class]]\nname = \"fleet-blocked\"\nprefixes = [\"203.0.113.0/24\"]\n[class.limit]\npackets_per_second = 0\nburst_packets = 0\n";

#[test]
fn a_fleet_policy_and_allows_reach_every_host_and_a_bad_push_changes_none() {
    require_root();
    let etcd = Etcd::cluster();
    let hosts: Vec<Host> = (0..2).map(|i| Host::new(&etcd, i, "")).collect();
    until_connected(&hosts);
    let write = |name: &str, text: &str| {
        let path = etcd.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };

    // A policy pushed once is in force on every host: its class drops the test net.
    assert!(!hosts[0].counted("203.0.113.7", "rate_packets"));
    let good = write("good.toml", POLICY_DROPS_TEST_NET_3);
    let pushed = ok(&etcd.limiter(&["policy", "push", &good, "--reason", "CHG-1"]));
    assert!(pushed.contains("fleet policy version"), "{pushed}");
    let took = until_all_counted(
        &hosts,
        "203.0.113.7",
        "rate_packets",
        true,
        Duration::from_secs(2),
    );
    println!("a fleet policy in force on both hosts after {took:?}");
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&etcd.limiter(&["policy", "show", "--json"]))).unwrap();
    let version = shown["policy"]["version"].as_i64().unwrap();
    for host in &hosts {
        let fleet = host.fleet_status();
        assert_eq!(fleet["policy"]["version"], version, "{fleet}");
        assert_eq!(fleet["policy"]["reason"], "CHG-1", "{fleet}");
        assert!(fleet["policy_refused"].is_null(), "{fleet}");
        let limits = host.daemon.ok(&["limit", "show", "--json"]);
        assert!(limits.contains("fleet-blocked"), "{limits}");
        // The change is in the host's history, with the fleet revision that made it.
        let history = host.daemon.ok(&["history", "--json"]);
        assert!(
            history.contains("fleet revision") || history.contains("\"fleet\""),
            "{history}"
        );
        assert!(history.contains("CHG-1"), "{history}");
    }

    // A push with an error is refused whole by the writer: etcd and every host unchanged.
    let bad = write(
        "bad.toml",
        &format!(
            "{POLICY_DROPS_TEST_NET_3}\n[[class]]\nname = \"overlaps\"\nprefixes = [\"203.0.113.128/25\"]\n[class.limit]\nunlimited = true\n"
        ),
    );
    let refused = etcd.limiter(&["policy", "push", &bad, "--reason", "CHG-2"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("nothing was pushed")
            && stderr.contains("bad.toml:")
            && stderr.contains("overlaps"),
        "{stderr}"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&etcd.limiter(&["policy", "show", "--json"]))).unwrap();
    assert_eq!(shown["policy"]["version"], version, "etcd unchanged");

    // A document put in etcd by another writer, bypassing the checks, is refused by every
    // host; the policy in force stays.
    let sneaked = serde_json::json!({
        "document": "interfaces = [\"eth0\"]\n",
        "author": "script@elsewhere",
        "reason": "unchecked",
        "created_unix_ms": 1,
    });
    ok(&etcd.etcdctl(&["put", "/limiter-test/policy", &sneaked.to_string()]));
    for host in &hosts {
        let deadline = Instant::now() + Duration::from_secs(5);
        while host.fleet_status()["policy_refused"].is_null() {
            assert!(Instant::now() < deadline, "{}", host.fleet_status());
            thread::sleep(Duration::from_millis(50));
        }
        let fleet = host.fleet_status();
        assert!(
            fleet["policy_refused"]
                .as_str()
                .unwrap()
                .contains("interfaces"),
            "{fleet}"
        );
        assert_eq!(fleet["policy"]["version"], version, "{fleet}");
        assert!(
            host.counted("203.0.113.7", "rate_packets"),
            "the old policy stays in force"
        );
        assert!(
            host.daemon
                .logs()
                .contains("fleet policy refused on this host")
        );
    }
    let metrics =
        limiter_tests::netns::http_get(&hosts[0].lab.rx, "http://127.0.0.1:9810/metrics", None).2;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("limiter_fleet_policy_refused") && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("limiter_fleet_policy_version")
                && l.ends_with(&format!(" {version}"))),
        "{metrics}"
    );

    // A push against a stale version is refused (someone pushed meanwhile).
    let stale = etcd.limiter(&[
        "policy",
        "push",
        &good,
        "--reason",
        "CHG-3",
        "--if-version",
        &version.to_string(),
    ]);
    assert!(!stale.status.success());
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("pushed meanwhile"),
        "{stale:?}"
    );
    // A good push replaces the bad one; hosts take it and clear the refusal.
    ok(&etcd.limiter(&["policy", "push", &good, "--reason", "CHG-4"]));
    for host in &hosts {
        let deadline = Instant::now() + Duration::from_secs(5);
        while host.fleet_status()["policy"]["reason"] != "CHG-4" {
            assert!(Instant::now() < deadline, "{}", host.fleet_status());
            thread::sleep(Duration::from_millis(50));
        }
        assert!(host.fleet_status()["policy_refused"].is_null());
    }

    // A fleet allow: passed without limits on every host, even inside the policy's class.
    ok(&etcd.limiter(&["allow", "add", "203.0.113.64/26", "--reason", "partner P-9"]));
    until_all_counted(
        &hosts,
        "203.0.113.70",
        "allowlisted",
        true,
        Duration::from_secs(2),
    );
    assert!(
        hosts[0].counted("203.0.113.7", "rate_packets"),
        "the rest of the class still drops"
    );
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&etcd.limiter(&["allow", "list", "--json"]))).unwrap();
    assert_eq!(
        listed["allow"]["203.0.113.64/26"]["reason"], "partner P-9",
        "{listed}"
    );
    // A fleet deny inside a fleet allow wins, as a local deny would.
    ok(&etcd.limiter(&["deny", "add", "203.0.113.70/32", "--reason", "INC-9"]));
    until_all(&hosts, "203.0.113.70", true, Duration::from_secs(2));
    ok(&etcd.limiter(&["allow", "remove", "203.0.113.64/26"]));
    until_all_counted(
        &hosts,
        "203.0.113.71",
        "rate_packets",
        true,
        Duration::from_secs(2),
    );

    // Without a fleet policy every host returns to its own file's sections.
    ok(&etcd.limiter(&["policy", "remove"]));
    until_all_counted(
        &hosts,
        "203.0.113.7",
        "rate_packets",
        false,
        Duration::from_secs(2),
    );
    for host in &hosts {
        assert!(
            host.fleet_status()["policy"].is_null(),
            "{}",
            host.fleet_status()
        );
    }
}

/// Makes a CA and a certificate it signs (`usage`: the extended key usage), with openssl.
fn certificate(dir: &std::path::Path, name: &str, ca: &str, usage: &str) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    if !dir.join(format!("{ca}.pem")).exists() {
        run(&[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN={ca}"),
            ],
        ]
        .concat());
    }
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    ]
    .concat());
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &format!("{name}.csr"),
        "-CA",
        &format!("{ca}.pem"),
        "-CAkey",
        &format!("{ca}.key"),
        "-CAcreateserial",
        "-out",
        &format!("{name}.pem"),
        "-days",
        "2",
        "-extfile",
        ext.to_str().unwrap(),
    ]);
}

#[test]
fn fleet_clients_authenticate_to_etcd_with_tls_client_certificates() {
    require_root();
    let tag = std::process::id() % 100_000;
    let ns = limiter_tests::netns::Netns::new(&format!("lim-etcdtls-{tag}"));
    let dir = std::env::temp_dir().join(format!("limiter-etcd-tls-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    certificate(&dir, "server", "ca", "serverAuth,clientAuth");
    certificate(&dir, "client", "ca", "clientAuth");
    // A client whose certificate another CA signed: etcd must refuse it.
    certificate(&dir, "stranger", "other-ca", "clientAuth");
    let url = "https://127.0.0.1:23790";
    let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _etcd = Kill(
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .args(["etcd", "--name", "tls", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", url, "--advertise-client-urls", url])
            .args(["--listen-peer-urls", "http://127.0.0.1:23800"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:23800"])
            .args(["--initial-cluster", "tls=http://127.0.0.1:23800"])
            .args(["--client-cert-auth", "--trusted-ca-file"])
            .arg(dir.join("ca.pem"))
            .arg("--cert-file")
            .arg(dir.join("server.pem"))
            .arg("--key-file")
            .arg(dir.join("server.key"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd"),
    );
    let config = |client: &str| {
        let path = dir.join(format!("{client}.toml"));
        std::fs::write(
            &path,
            format!(
                "[fleet]\nendpoints = [\"{url}\"]\nca_file = \"ca.pem\"\ncert_file = \"{client}.pem\"\nkey_file = \"{client}.key\"\n"
            ),
        )
        .unwrap();
        path
    };
    let limiter = |config: &std::path::Path, args: &[&str]| {
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .arg(limiter_tests::daemon::binary())
            .arg("fleet")
            .args(args)
            .arg("--config")
            .arg(config)
            .output()
            .unwrap()
    };
    let trusted = config("client");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = limiter(
            &trusted,
            &["deny", "add", "203.0.113.0/24", "--reason", "tls"],
        );
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a trusted client certificate was not accepted: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(200));
    }
    let listed = ok(&limiter(&trusted, &["deny", "list", "--json"]));
    assert!(listed.contains("203.0.113.0/24"), "{listed}");
    let refused = limiter(&config("stranger"), &["deny", "list"]);
    assert!(
        !refused.status.success(),
        "a stranger's certificate was accepted"
    );
    // Refused by etcd at the connection, not by the config check.
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("etcd:"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
