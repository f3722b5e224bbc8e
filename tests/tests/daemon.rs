//! The daemon and the CLI against live traffic in lab namespaces: every command checked by
//! its effect on packets, restarts and `kill -9` that lose nothing, and the socket's
//! permissions.

use std::{
    net::IpAddr,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use limiter_tests::{
    daemon::{Daemon, TEST_CONFIG as CONFIG, Traffic, binary, ip},
    netns::Lab,
    require_root,
};

/// A lab, a running daemon on its rx side, and UDP traffic from two sources (192.0.2.10 and
/// 192.0.2.20) to 192.0.2.1:9000.
fn lab_with_daemon(lab_tag: &str, daemon_tag: &str) -> (Lab, Daemon, Traffic) {
    let lab = Lab::new(
        lab_tag,
        &["192.0.2.1/24"],
        &["192.0.2.10/24", "192.0.2.20/24"],
    );
    let mut daemon = Daemon::new(daemon_tag, &lab.rx.name, &lab.rx_if, CONFIG);
    daemon.start();
    let traffic = Traffic::new(
        &lab,
        "192.0.2.1:9000".parse().unwrap(),
        &[ip("192.0.2.10"), ip("192.0.2.20")],
    );
    (lab, daemon, traffic)
}

/// 200 datagrams at 400/s from `source`.
fn burst_of_200(traffic: &Traffic, source: IpAddr) -> u32 {
    traffic.send(source, 200, Duration::from_millis(500))
}

#[test]
fn cli_commands_change_live_traffic() {
    require_root();
    let (_lab, mut daemon, traffic) = lab_with_daemon("dc", "cli");
    let a = ip("192.0.2.10");
    let b = ip("192.0.2.20");
    // Neighbour resolution first.
    traffic.send(b, 1, Duration::ZERO);

    assert_eq!(
        burst_of_200(&traffic, a),
        200,
        "within the default limit, everything passes"
    );

    daemon.ok(&["limit", "set", "--pps", "20", "--burst", "10"]);
    let limited = burst_of_200(&traffic, a);
    assert!(
        limited <= 10 + 20 + 5,
        "a lowered limit drops a source that passed before: {limited} of 200 passed"
    );
    let shown = daemon.ok(&["limit", "show"]);
    assert!(shown.contains("20/s burst 10"), "limit show: {shown}");

    daemon.ok(&["allow", "add", "192.0.2.10"]);
    assert_eq!(
        burst_of_200(&traffic, a),
        200,
        "an allowlisted source floods through"
    );
    assert!(daemon.ok(&["allow", "list"]).contains("192.0.2.10/32"));
    daemon.ok(&["allow", "del", "192.0.2.10"]);

    daemon.ok(&["deny", "add", "192.0.2.20", "--ttl", "2s"]);
    assert_eq!(
        traffic.send(b, 5, Duration::from_millis(100)),
        0,
        "a denied source is dropped"
    );
    let denied = daemon.ok(&["deny", "list", "--json"]);
    assert!(
        denied.contains("192.0.2.20/32") && denied.contains("expires_in_seconds"),
        "{denied}"
    );
    thread::sleep(Duration::from_millis(3_200));
    assert!(
        !daemon.ok(&["deny", "list"]).contains("192.0.2.20"),
        "the temporary ban expired"
    );
    assert_eq!(
        traffic.send(b, 5, Duration::from_millis(500)),
        5,
        "after its TTL the ban no longer applies"
    );

    daemon.ok(&["mode", "monitor"]);
    assert_eq!(
        burst_of_200(&traffic, a),
        200,
        "monitor mode passes everything"
    );
    let status = daemon.status();
    assert_eq!(status["mode"], "monitor");
    assert!(
        status["interfaces"][0]["would_drop"].as_u64().unwrap() > 100,
        "would-drops are counted: {status}"
    );
    daemon.ok(&["mode", "enforce"]);

    daemon.ok(&["block", "add", "192.0.2.20", "--for", "1m"]);
    assert!(daemon.ok(&["block", "list"]).contains("192.0.2.20/32"));
    assert_eq!(
        traffic.send(b, 5, Duration::from_millis(100)),
        0,
        "a source in the penalty box is dropped"
    );
    daemon.ok(&["block", "del", "192.0.2.20"]);
    thread::sleep(Duration::from_millis(600));
    assert_eq!(
        traffic.send(b, 3, Duration::from_millis(300)),
        3,
        "out of the box again"
    );

    let top = daemon.ok(&["top", "-n", "1", "--by", "drops"]);
    assert!(
        top.contains("192.0.2.10/32"),
        "the flooding source tops the list: {top}"
    );

    daemon.ok(&[
        "class",
        "add",
        "partners",
        "--prefix",
        "192.0.2.10/32",
        "--pps",
        "1000",
        "--burst",
        "1000",
    ]);
    assert_eq!(
        burst_of_200(&traffic, a),
        200,
        "a class with a higher limit lets the source through"
    );
    assert!(daemon.ok(&["class", "list"]).contains("partners"));
    daemon.ok(&["class", "del", "partners"]);
    assert!(
        burst_of_200(&traffic, a) <= 40,
        "without the class the default limit applies again"
    );

    // A broken config is refused on reload; the running policy keeps working.
    std::fs::write(
        daemon.config(),
        "[default_limit]\npackets_per_second = 0\nburst_packets = 5\n",
    )
    .unwrap();
    let reload = daemon.cli(&["reload"]);
    assert!(!reload.status.success(), "a bad config must be refused");
    let message = String::from_utf8_lossy(&reload.stderr);
    assert!(
        message.contains("limiter.toml"),
        "the error names the file: {message}"
    );
    assert!(
        burst_of_200(&traffic, a) <= 40,
        "the old policy still limits after a failed reload"
    );
    assert_eq!(daemon.status()["last_reload_ok"], false);

    // A valid config reloads; runtime changes (the lowered default) stay on top of it.
    std::fs::write(daemon.config(), CONFIG.replace("1000", "900")).unwrap();
    daemon.ok(&["reload"]);
    assert_eq!(daemon.status()["last_reload_ok"], true);
    assert!(
        burst_of_200(&traffic, a) <= 40,
        "the runtime limit survives a reload"
    );

    // Errors are clear, and the CLI never hangs.
    let bad = daemon.cli(&[
        "limit", "set", "--class", "nope", "--pps", "1", "--burst", "1",
    ]);
    assert!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("no class named")
    );
    let bad = daemon.cli(&["deny", "add", "not-an-address"]);
    assert!(!bad.status.success());

    // The socket: a member of the read group can read but not change.
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(binary())
            .arg("--socket")
            .arg(daemon.socket())
            .args(args)
            .output()
            .expect("setpriv (util-linux)")
    };
    let read = as_nobody(&["status"]);
    assert!(
        read.status.success(),
        "the read group may read: {}",
        String::from_utf8_lossy(&read.stderr)
    );
    let change = as_nobody(&["mode", "monitor"]);
    assert!(!change.status.success());
    assert!(String::from_utf8_lossy(&change.stderr).contains("permission denied"));
    assert_eq!(
        daemon.status()["mode"],
        "enforce",
        "the refused change did not happen"
    );

    daemon.stop();
    let down = daemon.cli(&["status"]);
    assert!(!down.status.success());
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("not running"),
        "one clear line when the daemon is down"
    );
    assert!(
        burst_of_200(&traffic, a) <= 40,
        "a stopped daemon leaves the program attached and filtering"
    );
}

#[test]
fn kill_9_loses_nothing() {
    require_root();
    let (lab, mut daemon, traffic) = lab_with_daemon("dk", "kill");
    let a = ip("192.0.2.10");
    traffic.send(a, 1, Duration::ZERO);
    daemon.ok(&["limit", "set", "--pps", "50", "--burst", "20"]);
    daemon.ok(&["deny", "add", "192.0.2.20"]);
    let first_program = daemon.status()["interfaces"][0]["program_id"]
        .as_u64()
        .unwrap();

    // A flood of 3 s at 1000/s; the daemon is killed half a second in.
    let (socket, server) = traffic.sender(a);
    let flood = thread::spawn(move || {
        let start = Instant::now();
        for i in 0..3000u32 {
            let due = start + Duration::from_millis(u64::from(i));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            let _ = socket.send_to(&i.to_be_bytes(), server);
        }
        start.elapsed()
    });
    thread::sleep(Duration::from_millis(500));
    daemon.kill9();
    let elapsed = flood.join().unwrap();
    let received = traffic.drain().get(&a).copied().unwrap_or(0);
    let allowed = (50.0 * elapsed.as_secs_f64()) as u32 + 20 + 50;
    assert!(
        received <= allowed,
        "the flood stays limited while the daemon is down: {received} > {allowed}"
    );
    assert_eq!(
        traffic.send(ip("192.0.2.20"), 5, Duration::from_millis(100)),
        0,
        "the denylist still applies"
    );

    daemon.start();
    let status = daemon.status();
    let iface = &status["interfaces"][0];
    assert!(
        iface["dropped"].as_u64().unwrap() >= 2_500,
        "counters carried over from the pinned maps: {status}"
    );
    assert_ne!(
        iface["program_id"].as_u64().unwrap(),
        first_program,
        "the new program replaced the old on the link"
    );
    assert!(
        daemon.ok(&["deny", "list"]).contains("192.0.2.20/32"),
        "CLI changes survived"
    );
    assert!(daemon.ok(&["limit", "show"]).contains("50/s burst 20"));
    let top = daemon.ok(&["top", "--json"]);
    assert!(
        top.contains("192.0.2.10/32"),
        "per-source state survived: {top}"
    );
    assert!(
        daemon.logs().contains("adopting the pinned program"),
        "{}",
        daemon.logs()
    );

    // Detach on purpose: the program and the pins go.
    daemon.ok(&["detach"]);
    assert_eq!(
        burst_of_200(&traffic, a),
        200,
        "detached: nothing is limited any more"
    );
    assert!(
        !daemon.pin_dir.join("v1").join(&lab.rx_if).exists(),
        "pins removed"
    );
}

#[test]
fn mismatched_pins_are_refused_and_stale_pins_replaced() {
    require_root();
    let lab = Lab::new("dp", &["192.0.2.1/24"], &["192.0.2.10/24"]);
    let mut daemon = Daemon::new("pins", &lab.rx.name, &lab.rx_if, CONFIG);
    daemon.start();
    daemon.kill9();
    // Same pins, different capacity: refused, naming the map and the mismatch.
    std::fs::write(
        daemon.config(),
        format!("{CONFIG}\n[capacity]\nsources = 8192\n"),
    )
    .unwrap();
    let out = daemon.run_command().output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("SOURCES") && stderr.contains("capacity"),
        "{stderr}"
    );

    // The interface is recreated (new index): its pins are stale and get replaced.
    std::fs::write(daemon.config(), CONFIG).unwrap();
    lab.rx.exec(&["ip", "link", "del", &lab.rx_if]);
    limiter_tests::netns::ip(&[
        "link",
        "add",
        &lab.rx_if,
        "netns",
        &lab.rx.name,
        "type",
        "veth",
        "peer",
        "name",
        &lab.tx_if,
        "netns",
        &lab.tx.name,
    ]);
    lab.rx.exec(&["ip", "link", "set", &lab.rx_if, "up"]);
    lab.tx.exec(&["ip", "link", "set", &lab.tx_if, "up"]);
    daemon.start();
    assert!(daemon.logs().contains("stale pins"), "{}", daemon.logs());
    assert_eq!(daemon.status()["interfaces"][0]["attach_mode"], "native");
}
