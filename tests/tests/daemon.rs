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
    let shown = daemon.ok(&["limit", "list"]);
    assert!(shown.contains("20/s burst 10"), "limit show: {shown}");

    daemon.ok(&["allow", "add", "192.0.2.10"]);
    assert_eq!(
        burst_of_200(&traffic, a),
        200,
        "an allowlisted source floods through"
    );
    assert!(daemon.ok(&["allow", "list"]).contains("192.0.2.10/32"));
    daemon.ok(&["allow", "delete", "192.0.2.10"]);

    daemon.ok(&["deny", "add", "192.0.2.20", "--timeout", "2s"]);
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

    daemon.ok(&["block", "add", "192.0.2.20", "--timeout", "1m"]);
    assert!(daemon.ok(&["block", "list"]).contains("192.0.2.20/32"));
    assert_eq!(
        traffic.send(b, 5, Duration::from_millis(100)),
        0,
        "a source in the penalty box is dropped"
    );
    daemon.ok(&["block", "delete", "192.0.2.20"]);
    thread::sleep(Duration::from_millis(600));
    assert_eq!(
        traffic.send(b, 3, Duration::from_millis(300)),
        3,
        "out of the box again"
    );

    let top = daemon.ok(&["top", "-n", "1", "--by", "drops", "--totals"]);
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
    daemon.ok(&["class", "delete", "partners"]);
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
    assert!(daemon.ok(&["limit", "list"]).contains("50/s burst 20"));
    let top = daemon.ok(&["top", "--totals", "--json"]);
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

/// A limit counter from the metrics endpoint, read inside the lab.
fn class_counter(lab: &Lab, class: &str, action: &str) -> f64 {
    let (_, _, body) =
        limiter_tests::netns::http_get(&lab.rx, "http://127.0.0.1:9810/metrics", None);
    let needle = format!("limiter_class_packets_total{{class=\"{class}\",action=\"{action}\"}}");
    body.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{needle} not exported:\n{body}"))
}

#[test]
fn a_class_keeps_its_buckets_and_counters_when_others_come_and_go() {
    require_root();
    let config = format!(
        "{CONFIG}\n\
         [[class]]\nname = \"first\"\nprefixes = [\"198.51.100.0/24\"]\n\
         limit = {{ packets_per_second = 1000, burst_packets = 1000 }}\n\
         [[class]]\nname = \"busy\"\nprefixes = [\"192.0.2.10/32\"]\n\
         limit = {{ packets_per_second = 1, burst_packets = 10 }}\n"
    );
    let lab = Lab::new("ds", &["192.0.2.1/24"], &["192.0.2.10/24"]);
    let mut daemon = Daemon::new("stable", &lab.rx.name, &lab.rx_if, &config);
    daemon.start();
    let a = ip("192.0.2.10");
    let traffic = Traffic::new(&lab, "192.0.2.1:9000".parse().unwrap(), &[a]);
    // Drain the busy class's bucket: 10 of 50 pass.
    let passed = traffic.send(a, 50, Duration::from_millis(250));
    assert!(
        passed <= 12,
        "the burst of 10 passes, the rest drops: {passed}"
    );
    let dropped = class_counter(&lab, "busy", "drop");
    assert!(dropped >= 38.0, "{dropped}");

    // Remove the class before it, add another: today's position-based ids would move it.
    daemon.ok(&["class", "delete", "first"]);
    daemon.ok(&[
        "class",
        "add",
        "extra",
        "--prefix",
        "203.0.113.0/24",
        "--unlimited",
    ]);
    let passed = traffic.send(a, 10, Duration::from_millis(100));
    assert!(
        passed <= 4,
        "the drained bucket carried on (a fresh one passes 10): {passed} passed"
    );
    let after = class_counter(&lab, "busy", "drop");
    assert!(
        after >= dropped + 6.0,
        "the counter series continued: {dropped} then {after}"
    );

    // And across a restart: the assignment is kept in the state directory.
    daemon.kill9();
    daemon.start();
    let passed = traffic.send(a, 10, Duration::from_millis(100));
    assert!(
        passed <= 4,
        "still the same bucket after a restart: {passed} passed"
    );
    assert!(class_counter(&lab, "busy", "drop") >= after + 6.0);
    let top = daemon.ok(&["top", "--totals", "--json"]);
    assert!(
        top.contains("\"busy\""),
        "the source counts under busy: {top}"
    );
}

#[test]
fn limit_set_changes_only_what_it_names() {
    require_root();
    let (_lab, daemon, traffic) = lab_with_daemon("dl", "patch");
    let a = ip("192.0.2.10");
    traffic.send(a, 1, Duration::ZERO);
    daemon.ok(&[
        "limit",
        "set",
        "--bytes-per-second",
        "1000000",
        "--burst-bytes",
        "2000000",
    ]);
    daemon.ok(&["limit", "set", "--pps", "20"]);
    let shown: serde_json::Value =
        serde_json::from_str(&daemon.ok(&["limit", "list", "--json"])).unwrap();
    assert_eq!(shown["version"], 1, "{shown}");
    let default = &shown["items"][0]["limit"];
    assert_eq!(
        default["bytes"]["per_second"], 1_000_000,
        "the byte limit was kept: {shown}"
    );
    assert_eq!(default["packets"]["per_second"], 20);
    assert_eq!(
        default["packets"]["burst"], 40,
        "the burst defaults to 2 s of the rate"
    );
    assert!(burst_of_200(&traffic, a) <= 40 + 20 + 5, "and it limits");
    daemon.ok(&["limit", "set", "--unlimited"]);
    let shown: serde_json::Value =
        serde_json::from_str(&daemon.ok(&["limit", "list", "--json"])).unwrap();
    let default = &shown["items"][0]["limit"];
    assert!(default["packets"].is_null() && default["bytes"].is_null());
    assert_eq!(burst_of_200(&traffic, a), 200);
    let refused = daemon.cli(&["limit", "set"]);
    assert!(
        !refused.status.success(),
        "a change that names nothing is refused"
    );
}

#[test]
fn changes_are_recorded_and_runtime_overrides_shown_and_reset() {
    require_root();
    let (_lab, mut daemon, traffic) = lab_with_daemon("dh", "history");
    let a = ip("192.0.2.10");
    traffic.send(a, 1, Duration::ZERO);
    daemon.ok(&["limit", "set", "--pps", "20", "--burst", "10"]);
    daemon.ok(&["deny", "add", "192.0.2.99", "--timeout", "1s"]);
    let refused = daemon.cli(&["deny", "add", "10.9.9.9/8"]);
    assert!(!refused.status.success());
    thread::sleep(Duration::from_millis(2_200));

    let history: serde_json::Value =
        serde_json::from_str(&daemon.ok(&["history", "--json"])).unwrap();
    let entries = history["items"].as_array().unwrap();
    assert_eq!(entries.len(), 3, "two changes and one expiry: {history}");
    let set = &entries[0];
    assert_eq!(set["actor"]["peer"]["uid"], 0);
    assert!(set["actor"]["peer"]["pid"].as_u64().is_some());
    assert_eq!(set["request"]["command"], "limit_set");
    assert_eq!(set["changes"][0]["field"], "default_limit");
    assert!(set["changes"][0]["before"].is_null());
    assert_eq!(set["changes"][0]["after"]["packets"]["per_second"], 20);
    assert_eq!(entries[2]["actor"], "expiry");
    assert_eq!(entries[2]["changes"][0]["field"], "deny");
    let generations: Vec<u64> = entries
        .iter()
        .map(|e| e["generation"].as_u64().unwrap())
        .collect();
    assert!(
        generations.windows(2).all(|w| w[0] < w[1]),
        "{generations:?}"
    );
    assert!(
        daemon.logs().contains("change applied"),
        "changes are logged too"
    );
    let table = daemon.ok(&["history"]);
    assert!(
        table.contains("limit_set") && table.contains("uid 0"),
        "{table}"
    );

    // The overrides are shown; reset drops them (and is recorded); reload keeps nothing else.
    let shown: serde_json::Value =
        serde_json::from_str(&daemon.ok(&["runtime", "list", "--json"])).unwrap();
    assert_eq!(
        shown["default_limit"]["packets"]["per_second"], 20,
        "{shown}"
    );
    assert!(burst_of_200(&traffic, a) <= 40);
    daemon.ok(&["runtime", "reset"]);
    assert_eq!(
        burst_of_200(&traffic, a),
        200,
        "the file's limit applies again"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&daemon.ok(&["runtime", "list", "--json"])).unwrap();
    assert!(shown["default_limit"].is_null(), "{shown}");
    let history: serde_json::Value =
        serde_json::from_str(&daemon.ok(&["history", "-n", "1", "--json"])).unwrap();
    assert_eq!(history["items"][0]["request"]["command"], "runtime_reset");

    // The history survives a restart.
    daemon.kill9();
    daemon.start();
    let history: serde_json::Value =
        serde_json::from_str(&daemon.ok(&["history", "--json"])).unwrap();
    assert_eq!(history["items"].as_array().unwrap().len(), 4);
}

#[test]
fn check_validates_a_file_without_touching_the_daemon() {
    require_root();
    let (_lab, daemon, _traffic) = lab_with_daemon("dc2", "check");
    let generation = daemon.status()["generation"].clone();
    let good = daemon.dir.join("good.toml");
    std::fs::write(
        &good,
        "interfaces = [\"eth9\"]\n[[class]]\nname = \"mm\"\nprefixes = [\"203.0.113.0/24\"]\n\
         limit = { packets_per_second = 50, burst_packets = 100 }\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("valid") && text.contains("mm") && text.contains("50/s burst 100"),
        "{text}"
    );
    let bad = daemon.dir.join("bad.toml");
    std::fs::write(&bad, "[denylist]\nprefixes = [\"10.9.9.9/8\"]\n").unwrap();
    let out = Command::new(binary())
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml:2:") && stderr.contains("did you mean 10.0.0.0/8"),
        "{stderr}"
    );
    assert_eq!(
        daemon.status()["generation"],
        generation,
        "the daemon was not touched"
    );
}

#[test]
fn the_old_spellings_still_work_but_are_not_shown() {
    require_root();
    let (_lab, daemon, _traffic) = lab_with_daemon("dw", "words");
    for args in [
        &["deny", "add", "192.0.2.77", "--ttl", "1m"][..],
        &["deny", "del", "192.0.2.77"][..],
        &["limit", "show"][..],
        &["limit", "set", "--pps", "900", "--bps", "1000000"][..],
        &["block", "add", "192.0.2.77", "--for", "1m"][..],
        &["block", "del", "192.0.2.77"][..],
        &["runtime", "show"][..],
    ] {
        daemon.ok(args);
    }
    assert!(daemon.ok(&["limit", "list"]).contains("1000000/s"));
    for (args, old) in [
        (&["deny", "--help"][..], " del "),
        (&["deny", "add", "--help"][..], "--ttl"),
        (&["block", "add", "--help"][..], "--for"),
        (&["limit", "set", "--help"][..], "--bps"),
        (&["run", "--help"][..], "--mode"),
    ] {
        let help = daemon.ok(args);
        assert!(!help.contains(old), "{old} is hidden from {args:?}: {help}");
    }
}

#[test]
fn logs_fit_for_journald() {
    require_root();
    let lab = Lab::new("dj", &["192.0.2.1/24"], &["192.0.2.10/24"]);
    let mut plain = Daemon::new("plainlog", &lab.rx.name, &lab.rx_if, CONFIG);
    plain.start();
    let _ = plain.cli(&["limit", "set", "--class", "nope", "--pps", "1"]);
    plain.ok(&["mode", "monitor"]);
    let logs = plain.logs();
    assert!(
        !logs.contains('\u{1b}'),
        "no colour codes off a terminal: {logs}"
    );
    let first = logs.lines().next().unwrap_or_default();
    assert!(
        first.contains("limiter starting")
            && first.contains(env!("CARGO_PKG_VERSION"))
            && first.contains("attach=native")
            && first.contains("mode=enforce")
            && first.contains("default 1000/s burst 1000"),
        "the first line says what starts: {first}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains(" WARN ") && l.contains("change refused")),
        "refusals at warning: {logs}"
    );
    plain.kill9();
    drop(plain);

    let mut json = Daemon::new(
        "jsonlog",
        &lab.rx.name,
        &lab.rx_if,
        &format!("log_format = \"json\"\n{CONFIG}"),
    );
    json.start();
    json.ok(&["mode", "monitor"]);
    let logs = json.logs();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines[0]["fields"]["message"], "limiter starting");
    assert_eq!(
        lines[0]["fields"]["mode"], "enforce",
        "values, not debug strings"
    );
    let change = lines
        .iter()
        .find(|l| l["fields"]["message"] == "change applied")
        .expect("the change is logged");
    assert!(
        change["fields"]["actor"]
            .as_str()
            .unwrap()
            .starts_with("uid 0")
    );
}

/// Streams `messages` 16-byte messages, one write each, from the server side of `feed` and
/// reads them all on the client side; returns how long it took.
fn stream_through(
    server: &mut std::net::TcpStream,
    client: &mut std::net::TcpStream,
    messages: u32,
) -> Duration {
    use std::io::{Read as _, Write as _};
    let started = Instant::now();
    let mut writer = server.try_clone().unwrap();
    let writing = thread::spawn(move || {
        for i in 0..messages {
            let mut m = [0u8; 16];
            m[..4].copy_from_slice(&i.to_be_bytes());
            writer.write_all(&m).unwrap();
            if i % 3 == 2 {
                thread::sleep(Duration::from_millis(1));
            }
        }
    });
    let mut buf = vec![0u8; messages as usize * 16];
    client.read_exact(&mut buf).expect("every message arrives");
    writing.join().unwrap();
    started.elapsed()
}

fn reason(status: &serde_json::Value, name: &str) -> u64 {
    status["interfaces"][0]["reasons"][name]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn sessions_backfill_existing_connections_and_survive_a_restart() {
    require_root();
    let lab = Lab::new("ds", &["192.0.2.1/24"], &["192.0.2.10/24"]);
    lab.rx
        .exec(&["sysctl", "-q", "-w", "net.ipv4.tcp_autocorking=0"]);
    let listener = lab
        .rx
        .run(|| std::net::TcpListener::bind("192.0.2.1:7000").unwrap());
    let connect = |lab: &Lab| {
        let mut client = lab.tx.run(|| {
            std::net::TcpStream::connect_timeout(
                &"192.0.2.1:7000".parse().unwrap(),
                Duration::from_secs(5),
            )
            .unwrap()
        });
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nodelay(true).unwrap();
        let _ = &mut client;
        (server, client)
    };
    // Established before the daemon starts: only the backfill can know it.
    let (mut server, mut client) = connect(&lab);
    let config = "[default_limit]\npackets_per_second = 100\nburst_packets = 100\n\n[control]\ngroup = \"nogroup\"\n";
    let mut daemon = Daemon::new("sessions", &lab.rx.name, &lab.rx_if, config);
    daemon.start();
    let status = daemon.status();
    assert_eq!(status["interfaces"][0]["sessions"], true, "{status}");
    assert!(
        daemon.ok(&["status"]).contains(" on "),
        "status shows sessions on"
    );

    let took = stream_through(&mut server, &mut client, 1_500);
    let status = daemon.status();
    eprintln!("1,500 messages on a backfilled connection in {took:?}: {status}");
    assert!(
        reason(&status, "flow_ack") >= 100,
        "the backfilled connection's ACKs went to its flow: {status}"
    );
    assert_eq!(
        reason(&status, "out_of_state"),
        0,
        "nothing of an existing connection was out of state: {status}"
    );
    assert!(took < Duration::from_secs(5), "{took:?} at a 100 pps limit");

    // Down: the pinned sock_ops link keeps recording; up again, the new program adopts it.
    daemon.kill9();
    let (mut server2, mut client2) = connect(&lab);
    daemon.start();
    let before = reason(&daemon.status(), "out_of_state");
    let took = stream_through(&mut server2, &mut client2, 1_500);
    let status = daemon.status();
    eprintln!("1,500 messages on a connection made while the daemon was down, in {took:?}");
    assert_eq!(
        reason(&status, "out_of_state"),
        before,
        "the connection made while the daemon was down is known: {status}"
    );
    stream_through(&mut server, &mut client, 300);
    assert_eq!(status["interfaces"][0]["sessions"], true);
}

#[test]
fn attack_mode_engages_and_disengages_on_its_thresholds() {
    use limiter_tests::{
        frame::{Frame, tcp},
        netns::RawSender,
    };
    require_root();
    let lab = Lab::new("da", &["192.0.2.1/24"], &["192.0.2.10/24"]);
    let syncookies = |lab: &Lab| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.rx.name,
                "sysctl",
                "-n",
                "net.ipv4.tcp_syncookies",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let before = syncookies(&lab);
    let config = "[challenge]\nmode = \"auto\"\nports = [\"443\"]\nengage_syns_per_second = 300\nengage_seconds = 2\ncalm_seconds = 3\n\n[control]\ngroup = \"nogroup\"\n";
    let mut daemon = Daemon::new("attack", &lab.rx.name, &lab.rx_if, config);
    daemon.start();
    assert_eq!(daemon.status()["challenge"], "armed");
    let sender = RawSender::new(&lab.tx, &lab.tx_if);
    let syn = |i: u32| {
        let b = i.to_be_bytes();
        Frame::tcp(&format!("10.9.{}.{}", b[2], b[3]), 443, tcp::SYN)
            .seq(i)
            .build()
    };
    // A short burst above the rate: one second is not an attack.
    sender.flood(400, Duration::from_secs(1), syn);
    thread::sleep(Duration::from_millis(1_500));
    assert_eq!(daemon.status()["challenge"], "armed", "a 1 s burst");
    // Sustained: engaged within the 2 s threshold (plus the daemon's 1 s tick).
    let started = Instant::now();
    let flood = {
        let sender = RawSender::new(&lab.tx, &lab.tx_if);
        thread::spawn(move || sender.flood(6_000, Duration::from_secs(6), syn))
    };
    let mut engaged_after = None;
    while started.elapsed() < Duration::from_secs(6) {
        if daemon.status()["challenge"] == "engaged" {
            engaged_after = Some(started.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let engaged_after = engaged_after.expect("attack mode engaged during a sustained flood");
    // Two whole seconds above the rate; the daemon counts in one-second ticks whose phase
    // is not the flood's, so the first may be a partial second.
    assert!(engaged_after >= Duration::from_secs(1), "{engaged_after:?}");
    assert_eq!(
        syncookies(&lab),
        "2",
        "the listener takes the program's cookies"
    );
    flood.join().unwrap();
    // Calm: disengaged after 3 s below the rate, the sysctl put back.
    let calm_started = Instant::now();
    while daemon.status()["challenge"] == "engaged"
        && calm_started.elapsed() < Duration::from_secs(8)
    {
        thread::sleep(Duration::from_millis(100));
    }
    let calm_after = calm_started.elapsed();
    assert_eq!(
        daemon.status()["challenge"],
        "armed",
        "disengaged after the calm period"
    );
    assert!(calm_after >= Duration::from_secs(2), "{calm_after:?}");
    assert_eq!(syncookies(&lab), before);
    let status = daemon.status();
    assert!(
        reason(&status, "challenged") > 0,
        "SYNs were challenged while engaged: {status}"
    );
    let logs = daemon.logs();
    assert!(
        logs.contains("attack mode: SYNs from unproven sources are answered"),
        "{logs}"
    );
    assert!(logs.contains("attack mode over"), "{logs}");
    eprintln!("engaged after {engaged_after:?}, disengaged {calm_after:?} after the flood");
}

#[test]
fn proofs_expire_and_a_new_handshake_renews_them() {
    require_root();
    let lab = Lab::new("dp", &["192.0.2.1/24"], &["192.0.2.10/24"]);
    let listener = lab
        .rx
        .run(|| std::net::TcpListener::bind("192.0.2.1:7000").unwrap());
    let config = "[sessions]\nproven_seconds = 2\n\n[control]\ngroup = \"nogroup\"\n";
    let mut daemon = Daemon::new("proofs", &lab.rx.name, &lab.rx_if, config);
    daemon.start();
    let proven = |daemon: &Daemon| daemon.status()["interfaces"][0]["proven_sources"].as_u64();
    let connect = || {
        let client = lab.tx.run(|| {
            std::net::TcpStream::connect_timeout(
                &"192.0.2.1:7000".parse().unwrap(),
                Duration::from_secs(5),
            )
            .unwrap()
        });
        let (server, _) = listener.accept().unwrap();
        (client, server)
    };
    let _first = connect();
    let until = |want: u64, within: Duration| {
        let started = Instant::now();
        while started.elapsed() < within {
            if proven(&daemon) == Some(want) {
                return started.elapsed();
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("proven_sources never became {want}: {}", daemon.status());
    };
    until(1, Duration::from_secs(3));
    let forgotten_after = until(0, Duration::from_secs(6));
    eprintln!("the proof was forgotten {forgotten_after:?} after it was seen");
    let _second = connect();
    until(1, Duration::from_secs(3));
    assert!(daemon.logs().contains("expired proofs of proven sources"));
}

/// Four floods at once, as the demo's attacker runs them: each is one attack record of the
/// right type and prefix, started within 5 s and over within 15 s of the flood's end, each
/// with a start and an end log line, and a notification command run for both.
#[test]
fn each_flood_is_one_attack_record() {
    use limiter_tests::{frame::Frame, netns::RawSender};
    require_root();
    let lab = Lab::new("dk", &["192.0.2.1/24"], &["192.0.2.10/24"]);
    let notified = std::env::temp_dir().join(format!("limiter-notify-{}", std::process::id()));
    let script = notified.with_extension("sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$LIMITER_ATTACK_EVENT $LIMITER_ATTACK_ID $LIMITER_ATTACK_TYPE $LIMITER_ATTACK_PREFIX $(wc -c)\" >> {}\n",
            notified.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = format!(
        "[default_limit]\npackets_per_second = 500\nburst_packets = 500\n\
         aggregate_packets_per_second = 1000\naggregate_burst_packets = 1000\n\n\
         [sessions]\nunproven_packets_per_second = 200\nunproven_burst_packets = 200\n\n\
         [attacks]\nnotify_command = [\"{}\"]\n\n[control]\ngroup = \"nogroup\"\n",
        script.display()
    );
    let mut daemon = Daemon::new("attacks", &lab.rx.name, &lab.rx_if, &config);
    daemon.start();
    type FrameOf = fn(u32) -> Vec<u8>;
    let floods: Vec<FrameOf> = vec![
        // One source, far over its limit.
        |_| Frame::udp("10.1.1.1", 9000).build(),
        // Spoofed SYNs from all over 10.78.0.0/16.
        |i| {
            let b = (i.wrapping_mul(2_654_435_761)).to_be_bytes();
            Frame::tcp(
                &format!("10.78.{}.{}", b[2], b[3]),
                443,
                limiter_tests::frame::tcp::SYN,
            )
            .seq(i)
            .build()
        },
        // Every address of one /24, each within its own limit, together over the prefix's.
        |i| Frame::udp(&format!("10.79.0.{}", 1 + i % 254), 9000).build(),
        // One IPv6 /64, a new address each packet.
        |i| Frame::udp(&format!("fd00:66::{:x}:{:x}", i >> 16, i & 0xffff), 9000).build(),
    ];
    let started = Instant::now();
    let senders: Vec<_> = floods
        .into_iter()
        .map(|frame| {
            let sender = RawSender::new(&lab.tx, &lab.tx_if);
            thread::spawn(move || sender.flood(24_000, Duration::from_secs(6), frame))
        })
        .collect();
    let expected = [
        ("source_flood", "10.1.1.1/32"),
        ("syn_flood", "10.78.0.0/16"),
        ("prefix_flood", "10.79.0.0/24"),
        ("source_flood", "fd00:66::/64"),
    ];
    let records = |daemon: &Daemon| -> Vec<serde_json::Value> {
        let out = daemon.ok(&["attacks", "--json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["items"]
            .as_array()
            .unwrap()
            .clone()
    };
    let find =
        |records: &[serde_json::Value], kind: &str, prefix: &str| -> Vec<serde_json::Value> {
            records
                .iter()
                .filter(|r| r["type"] == kind && r["prefix"] == prefix)
                .cloned()
                .collect()
        };
    // All four start within 5 s.
    let mut seen_all = None;
    while started.elapsed() < Duration::from_secs(6) {
        let now = records(&daemon);
        if expected.iter().all(|(k, p)| !find(&now, k, p).is_empty()) {
            seen_all = Some(started.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let during = records(&daemon);
    let seen_all = seen_all.unwrap_or_else(|| panic!("not every attack recorded: {during:#?}"));
    assert!(
        seen_all <= Duration::from_secs(5),
        "recorded after {seen_all:?}"
    );
    for sender in senders {
        sender.join().unwrap();
    }
    let stopped = Instant::now();
    // All over within 15 s of the floods' end.
    let mut over = None;
    while stopped.elapsed() < Duration::from_secs(16) {
        if records(&daemon).iter().all(|r| !r["ended_unix"].is_null()) {
            over = Some(stopped.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    let after = records(&daemon);
    let over = over.unwrap_or_else(|| panic!("attacks still under way: {after:#?}"));
    assert!(over <= Duration::from_secs(15), "over after {over:?}");
    for (kind, prefix) in expected {
        let found = find(&after, kind, prefix);
        assert_eq!(found.len(), 1, "one {kind} of {prefix}: {after:#?}");
        assert!(found[0]["peak_packets_per_second"].as_u64().unwrap() >= 1_000);
        assert!(found[0]["dropped_packets"].as_u64().unwrap() > 0);
    }
    assert_eq!(after.len(), expected.len(), "no other attack: {after:#?}");
    // One start and one end line each, and the notification run for both.
    let logs = daemon.logs();
    assert_eq!(logs.matches("attack started").count(), 4, "{logs}");
    assert_eq!(logs.matches("attack over").count(), 4, "{logs}");
    let shown = daemon.ok(&["attacks", "show", &after[0]["id"].to_string()]);
    assert!(shown.contains("top prefixes at the peak"), "{shown}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut lines = String::new();
    while Instant::now() < deadline {
        lines = std::fs::read_to_string(&notified).unwrap_or_default();
        if lines.lines().count() >= 8 {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(lines.matches("start ").count(), 4, "{lines}");
    assert_eq!(lines.matches("end ").count(), 4, "{lines}");
    assert!(lines.contains("syn_flood 10.78.0.0/16"), "{lines}");
    let unknown = daemon.cli(&["attacks", "show", "999"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no attack 999"));
    eprintln!("all recorded after {seen_all:?}, all over {over:?} after the floods");
    let _ = std::fs::remove_file(&notified);
    let _ = std::fs::remove_file(&script);
}

/// `explain` for a denied, an allowed, a classed, a boxed and an unknown address, each
/// checked against what real packets from it get.
#[test]
fn explain_matches_what_real_packets_get() {
    require_root();
    let sources = [
        "192.0.2.10",
        "192.0.2.20",
        "192.0.2.30",
        "192.0.2.40",
        "192.0.2.50",
    ];
    let tx: Vec<String> = sources.iter().map(|s| format!("{s}/24")).collect();
    let tx: Vec<&str> = tx.iter().map(String::as_str).collect();
    let lab = Lab::new("dx", &["192.0.2.1/24"], &tx);
    let config = "[default_limit]\npackets_per_second = 1000\nburst_packets = 1000\n\n\
                  [[class]]\nname = \"mm\"\nprefixes = [\"192.0.2.30/32\"]\n\
                  [class.limit]\npackets_per_second = 5000\nburst_packets = 5000\n\n\
                  [control]\ngroup = \"nogroup\"\n";
    let mut daemon = Daemon::new("explain", &lab.rx.name, &lab.rx_if, config);
    daemon.start();
    daemon.ok(&["deny", "add", "192.0.2.10/32"]);
    daemon.ok(&["allow", "add", "192.0.2.20/32"]);
    let traffic = Traffic::new(&lab, "192.0.2.1:9000".parse().unwrap(), &sources.map(ip));
    let explain = |addr: &str| -> serde_json::Value {
        serde_json::from_str(&daemon.ok(&["explain", addr, "--json"])).unwrap()
    };
    // The boxed source gets state first, then the box.
    traffic.send(ip("192.0.2.40"), 10, Duration::from_millis(50));
    daemon.ok(&["block", "add", "192.0.2.40", "--timeout", "60s"]);

    let denied = explain("192.0.2.10");
    assert_eq!(denied["policy"]["decision"]["action"], "deny", "{denied:#}");
    assert!(
        denied["verdict"]
            .as_str()
            .unwrap()
            .starts_with("drop (denylisted)")
    );
    let deciding: Vec<_> = denied["policy"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["decides"] == true)
        .collect();
    assert_eq!(deciding.len(), 1);
    assert_eq!(deciding[0]["prefix"], "192.0.2.10/32");

    let allowed = explain("192.0.2.20");
    assert_eq!(
        allowed["policy"]["decision"]["action"], "allow",
        "{allowed:#}"
    );
    assert!(allowed["verdict"].as_str().unwrap().starts_with("pass"));

    let classed = explain("192.0.2.30");
    assert_eq!(classed["policy"]["decision"]["class"], "mm", "{classed:#}");

    let boxed = explain("192.0.2.40");
    assert!(
        boxed["verdict"].as_str().unwrap().contains("penalty_box"),
        "{boxed:#}"
    );
    let unknown = explain("192.0.2.50");
    assert!(
        unknown["verdict"]
            .as_str()
            .unwrap()
            .starts_with("untracked"),
        "{unknown:#}"
    );
    assert!(unknown["state"].as_array().unwrap().is_empty());

    // What real packets get agrees.
    let got = |addr: &str| traffic.send(ip(addr), 100, Duration::from_millis(200));
    assert_eq!(got("192.0.2.10"), 0, "denied");
    assert_eq!(got("192.0.2.20"), 100, "allowed");
    assert_eq!(got("192.0.2.30"), 100, "classed, within its class's limit");
    assert_eq!(got("192.0.2.40"), 0, "boxed");
    assert_eq!(got("192.0.2.50"), 100, "unknown, now a new source");
    // And the state explain reads is the program's: the classed source's passed packets.
    let classed = explain("192.0.2.30");
    let state = &classed["state"][0];
    assert_eq!(state["limit"], "mm", "{classed:#}");
    assert_eq!(state["passed"], 100, "{classed:#}");
    assert!(state["packets_left"].as_u64().unwrap() > 0);
    assert!(classed["verdict"].as_str().unwrap().starts_with("pass"));
    let known = explain("192.0.2.50");
    assert_eq!(known["state"][0]["passed"], 100, "{known:#}");
    let human = daemon.ok(&["explain", "192.0.2.10"]);
    assert!(human.contains("DECIDES"), "{human}");
    let bad = daemon.cli(&["explain", "not-an-address"]);
    assert!(!bad.status.success());
}

/// A thread sending datagrams from `source` at `per_second`, paced every half millisecond,
/// until the flag is cleared; it returns how many it sent and over how long.
fn paced_sender(
    traffic: &Traffic,
    source: IpAddr,
    per_second: f64,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread::JoinHandle<(u64, Duration)>,
) {
    let (socket, server) = traffic.sender(source);
    let sending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let running = sending.clone();
    let sender = thread::spawn(move || {
        let start = Instant::now();
        let mut sent = 0u64;
        while running.load(std::sync::atomic::Ordering::Relaxed) {
            let due = (start.elapsed().as_secs_f64() * per_second) as u64;
            while sent < due {
                let _ = socket.send_to(&[0u8; 32], server);
                sent += 1;
            }
            thread::sleep(Duration::from_micros(500));
        }
        (sent, start.elapsed())
    });
    (sending, sender)
}

/// `top` measures rates over its interval: a source sending 1,000 datagrams a second over a
/// 500 pps limit shows about 500 passed and 500 dropped a second; `--watch` refreshes,
/// `--prefix` and `--limit` filter.
#[test]
fn top_shows_rates_over_the_interval() {
    require_root();
    let (_lab, daemon, traffic) = lab_with_daemon("dt", "top");
    daemon.ok(&["limit", "set", "--pps", "500", "--burst", "500"]);
    let (sending, sender) = paced_sender(&traffic, ip("192.0.2.10"), 1_000.0);
    thread::sleep(Duration::from_secs(2));
    let top: serde_json::Value =
        serde_json::from_str(&daemon.ok(&["top", "--interval", "2", "--json"])).unwrap();
    let watch = daemon.ok(&[
        "top",
        "--watch",
        "--count",
        "2",
        "--interval",
        "0.5",
        "--json",
    ]);
    let within = daemon.ok(&["top", "--prefix", "192.0.2.20/32", "--interval", "0.2"]);
    let by_limit = daemon.ok(&[
        "top",
        "--limit",
        "no-such-limit",
        "--interval",
        "0.2",
        "--json",
    ]);
    sending.store(false, std::sync::atomic::Ordering::Relaxed);
    let (sent, took) = sender.join().unwrap();
    let offered = sent as f64 / took.as_secs_f64();
    let row = &top["items"][0];
    assert_eq!(row["prefix"], "192.0.2.10/32", "{top:#}");
    let rate = |k: &str| row["rates"][k].as_f64().unwrap();
    let seen = rate("passed_per_second") + rate("dropped_per_second");
    eprintln!(
        "offered {offered:.0}/s; top: passed {:.0}/s, dropped {:.0}/s",
        rate("passed_per_second"),
        rate("dropped_per_second")
    );
    assert!(
        (seen - offered).abs() <= offered * 0.10,
        "{seen} vs {offered}"
    );
    assert!(
        (rate("passed_per_second") - 500.0).abs() <= 50.0,
        "the limit's 500/s passed: {row:#}"
    );
    assert!(rate("bytes_per_second") > 0.0);
    assert_eq!(watch.lines().count(), 2, "{watch}");
    assert!(!within.contains("192.0.2.10"), "{within}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&by_limit).unwrap()["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let bad = daemon.cli(&["top", "--interval", "0"]);
    assert!(!bad.status.success());
    // Once the source is quiet its rates fall to zero, though its totals stay.
    let quiet: serde_json::Value =
        serde_json::from_str(&daemon.ok(&["top", "--interval", "0.5", "--json"])).unwrap();
    let flooder = quiet["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["prefix"] == "192.0.2.10/32")
        .unwrap_or_else(|| panic!("{quiet:#}"));
    assert_eq!(flooder["rates"]["dropped_per_second"], 0.0, "{quiet:#}");
    assert!(flooder["dropped"].as_u64().unwrap() > 0, "{quiet:#}");
}

/// Source events are logged at most 5 a second; the rest are counted, and the count is
/// logged when the second is over even if no event follows to carry it.
#[test]
fn suppressed_event_logs_are_counted_and_reported_on_a_timer() {
    use limiter_tests::{frame::Frame, netns::RawSender};
    require_root();
    let lab = Lab::new("dq", &["192.0.2.1/24"], &["192.0.2.10/24"]);
    let config = "[default_limit]\npackets_per_second = 10\nburst_packets = 10\n\n\
                  [metrics]\nlisten = \"127.0.0.1:9810\"\n\n\
                  [control]\ngroup = \"nogroup\"\n";
    let mut daemon = Daemon::new("quiet", &lab.rx.name, &lab.rx_if, config);
    daemon.start();
    // 40 sources, each sending 50 frames within 0.4 s: each goes over its limit, and the
    // program reports each once or twice (at most one event per source per second-long
    // window, and 0.4 s may straddle two); the daemon counts every event it reads.
    let sources = 40u32;
    let sender = RawSender::new(&lab.tx, &lab.tx_if);
    let sent = sender.flood(sources * 50, Duration::from_millis(400), |i| {
        Frame::udp(&format!("10.50.0.{}", 1 + i % sources), 9000).build()
    });
    assert_eq!(sent, sources * 50);
    // Then silence: no event comes to carry the count; the timer must report it.
    let read = || -> u64 {
        let (_, _, text) =
            limiter_tests::netns::http_get(&lab.rx, "http://127.0.0.1:9810/metrics", None);
        text.lines()
            .find(|l| l.starts_with("limiter_source_events_total{kind=\"limited\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (logged, suppressed) = loop {
        let logs = daemon.logs();
        let logged = logs.matches("source over its limit").count() as u64;
        let suppressed: u64 = logs
            .lines()
            .filter(|l| l.contains("source events not logged in the last second"))
            .filter_map(|l| {
                let at = l.find("suppressed=")? + "suppressed=".len();
                l[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        let events = read();
        if (events >= u64::from(sources) && logged + suppressed >= events)
            || Instant::now() > deadline
        {
            break (logged, suppressed);
        }
        thread::sleep(Duration::from_millis(200));
    };
    let events = read();
    println!("{events} events read: {logged} logged, {suppressed} counted as not logged");
    assert!(
        (u64::from(sources)..=2 * u64::from(sources)).contains(&events),
        "{events} events"
    );
    assert_eq!(
        logged + suppressed,
        events,
        "every event is logged or counted:\n{}",
        daemon.logs()
    );
    assert!(
        suppressed > 0,
        "40 or more events in 0.4 s exceed the budget"
    );
    // The logged ones stayed within the budget: the 0.4 s of events span at most two
    // seconds of the daemon's clock.
    assert!(logged <= 10, "{logged} lines logged");
    daemon.stop();
}

/// Allowlisted sources have no state, yet a heavy one shows in `top`: its passes are
/// estimated from sampled frames, close to what it sent.
#[test]
fn top_shows_allowlisted_heavy_hitters() {
    require_root();
    let (_lab, daemon, traffic) = lab_with_daemon("da", "allowtop");
    daemon.ok(&["allow", "add", "192.0.2.20/32"]);
    let (sending, sender) = paced_sender(&traffic, ip("192.0.2.20"), 5_000.0);
    let (_, server) = traffic.sender(ip("192.0.2.20"));
    // A known source beside it, far lighter (sent on its own socket: `Traffic::send` would
    // wait for a quiet moment that the flood never leaves).
    let (light, _) = traffic.sender(ip("192.0.2.10"));
    for i in 0..100u32 {
        light.send_to(&i.to_be_bytes(), server).unwrap();
        thread::sleep(Duration::from_millis(5));
    }
    let top: serde_json::Value =
        serde_json::from_str(&daemon.ok(&["top", "--by", "passes", "--interval", "2", "--json"]))
            .unwrap();
    let table = daemon.ok(&["top", "--limit", "allowlist", "--interval", "0.5"]);
    sending.store(false, std::sync::atomic::Ordering::Relaxed);
    let (sent, took) = sender.join().unwrap();
    let offered = sent as f64 / took.as_secs_f64();
    let row = &top["items"][0];
    assert_eq!(row["prefix"], "192.0.2.20/32", "{top:#}");
    assert_eq!(row["allowlisted"], true, "{row:#}");
    assert_eq!(row["limit"], "allowlist", "{row:#}");
    let passed = row["rates"]["passed_per_second"].as_f64().unwrap();
    eprintln!("offered {offered:.0}/s; top estimates {passed:.0}/s");
    assert!(
        (passed - offered).abs() <= offered * 0.10,
        "{passed} vs {offered}"
    );
    assert_eq!(row["rates"]["dropped_per_second"], 0.0);
    // The table marks the estimate, and `--limit allowlist` selects only allowlisted rows.
    assert!(table.contains("~"), "{table}");
    assert!(
        table.contains("192.0.2.20/32") && !table.contains("192.0.2.10/32"),
        "{table}"
    );
    // Lifetime totals: the estimate is within 256 frames per CPU of the exact count of
    // frames the program passed as allowlisted (only this source is).
    thread::sleep(Duration::from_millis(200));
    let totals: serde_json::Value = serde_json::from_str(&daemon.ok(&[
        "top",
        "--by",
        "passes",
        "--totals",
        "--limit",
        "allowlist",
        "--json",
    ]))
    .unwrap();
    let estimated = totals["items"][0]["passed"].as_u64().unwrap();
    let exact = daemon.status()["interfaces"][0]["reasons"]["allowlisted"]
        .as_u64()
        .unwrap();
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    eprintln!("allowlisted frames: {exact} passed, {estimated} estimated");
    assert!(
        estimated.abs_diff(exact) <= 256 * cpus,
        "estimated {estimated}, passed {exact}"
    );
}
