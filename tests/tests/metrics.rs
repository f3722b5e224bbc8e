//! The metrics endpoint: its exposition checked by promtool, the dashboard and alert rules
//! checked against it, and a real Prometheus server scraping a daemon under traffic.

use std::{
    collections::HashSet,
    net::{IpAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use limiter_tests::{
    daemon::{Daemon, Traffic},
    netns::{Lab, Netns, run_in},
    pin_to_cpu, require_root,
};

const METRICS: &str = "127.0.0.1:9810";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn get(ns: &Netns, url: &str, accept: Option<&'static str>) -> (u16, String, String) {
    limiter_tests::netns::http_get(ns, url, accept)
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; cargo xtask setup installs it)");
    if let Some(text) = stdin {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn config(extra: &str) -> String {
    format!(
        "[default_limit]\npackets_per_second = 100\nburst_packets = 20\n\n[denylist]\nprefixes = [\"192.0.2.30/32\"]\n\n[metrics]\nlisten = \"{METRICS}\"\n{extra}"
    )
}

#[test]
fn exposition_dashboard_and_rules_are_valid() {
    require_root();
    let lab = Lab::new("me", &["192.0.2.1/24"], &["192.0.2.10/24"]);
    let mut daemon = Daemon::new(
        "expo",
        &lab.rx.name,
        &lab.rx_if,
        // A fleet store that never answers: the fleet families are exported (connected 0).
        &config("bpf_stats = true\n\n[fleet]\nendpoints = [\"http://127.0.0.1:1\"]\n"),
    );
    daemon.start();
    let traffic = Traffic::new(&lab, "192.0.2.1:9000".parse().unwrap(), &[ip("192.0.2.10")]);
    traffic.send(ip("192.0.2.10"), 50, Duration::from_millis(100));

    let (status, content_type, text) = get(&lab.rx, &format!("http://{METRICS}/metrics"), None);
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let (ok, report) = promtool(&["check", "metrics"], Some(&text));
    assert!(ok, "promtool check metrics: {report}\n{text}");
    for name in [
        "limiter_packets_total",
        "limiter_bytes_total",
        "limiter_class_packets_total",
        "limiter_tracked_sources",
        "limiter_tracked_sources_capacity",
        "limiter_map_entries",
        "limiter_map_capacity",
        "limiter_map_fill_ratio",
        "limiter_fleet_connected",
        "limiter_fleet_applied_revision",
        "limiter_fleet_resyncs_total",
        "limiter_fleet_convergence_seconds_count",
        "limiter_new_sources_capped_total",
        "limiter_state_insert_failures_total",
        "limiter_penalty_box_sources",
        "limiter_limited_sources",
        "limiter_list_prefixes",
        "limiter_program_attached",
        "limiter_config_generation",
        "limiter_config_reload_success",
        "limiter_config_last_reload_timestamp_seconds",
        "limiter_mode",
        "limiter_build_info",
        "limiter_events_dropped_total",
        "limiter_bpf_run_time_seconds_total",
        "limiter_bpf_run_count_total",
        "process_start_time_seconds",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' '])),
            "{name} missing:\n{text}"
        );
    }
    assert!(
        text.contains(&format!(
            "limiter_program_attached{{interface=\"{}\",mode=\"native\"}} 1",
            lab.rx_if
        )),
        "{text}"
    );

    let (_, content_type, om) = get(
        &lab.rx,
        &format!("http://{METRICS}/metrics"),
        Some("application/openmetrics-text; version=1.0.0"),
    );
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(om.trim_end().ends_with("# EOF") && om.contains("# TYPE limiter_packets counter"));

    let (status, _, body) = get(&lab.rx, &format!("http://{METRICS}/healthz"), None);
    assert_eq!(status, 200, "{body}");

    // Fill gauges for every bounded map, from the background walk: the source sent (and
    // any IPv6 link-local neighbour the veth's far end announces itself from), one denied
    // prefix, nothing else yet; capacities as the kernel created the maps.
    let fill = |text: &str, family: &str, map: &str| -> Option<f64> {
        let prefix = format!("{family}{{interface=\"{}\",map=\"{map}\"}} ", lab.rx_if);
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map(|v| v.parse().unwrap())
    };
    let tracked = |text: &str| -> f64 {
        ["ipv4", "ipv6"]
            .iter()
            .filter_map(|family| {
                let prefix = format!("limiter_tracked_sources{{family=\"{family}\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(prefix.as_str()))
                    .map(|v| v.parse::<f64>().unwrap())
            })
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let text = loop {
        let (_, _, text) = get(&lab.rx, &format!("http://{METRICS}/metrics"), None);
        if fill(&text, "limiter_map_entries", "SOURCES").is_some_and(|n| n >= 1.0) {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no fill gauges:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let sources = tracked(&text);
    assert!(sources >= 1.0, "{text}");
    // The sock_ops program sees this test's own scrapes (loopback TCP in the lab's
    // namespace) complete their handshakes, so 127.0.0.1 may be proven by now: one entry at
    // most, and the capacity as created.
    let proven = fill(&text, "limiter_map_entries", "PROVEN").expect("PROVEN is counted");
    assert!(proven <= 1.0, "PROVEN: {proven}\n{text}");
    assert_eq!(
        fill(&text, "limiter_map_capacity", "PROVEN"),
        Some(262_144.0)
    );
    for (map, entries, capacity) in [
        ("SOURCES", sources, 262_144.0),
        ("AGGREGATES", 0.0, 65_536.0),
        ("FLOWS", 0.0, 524_288.0),
        ("CHALLENGE_BUDGET", 0.0, 65_536.0),
        ("POLICY_V4", 1.0, 262_144.0),
        ("POLICY_V6", 0.0, 262_144.0),
    ] {
        assert_eq!(
            fill(&text, "limiter_map_entries", map),
            Some(entries),
            "{map}:\n{text}"
        );
        assert_eq!(
            fill(&text, "limiter_map_capacity", map),
            Some(capacity),
            "{map}"
        );
        assert_eq!(
            fill(&text, "limiter_map_fill_ratio", map),
            Some(entries / capacity),
            "{map}"
        );
    }

    // The rules are valid, and every metric the dashboard and the rules use is exported.
    let (ok, report) = promtool(
        &[
            "check",
            "rules",
            repo()
                .join("deploy/prometheus/alerts.yml")
                .to_str()
                .unwrap(),
        ],
        None,
    );
    assert!(ok, "promtool check rules: {report}");
    // Exported: every family with samples, and every family described (the attack series
    // exist only while an attack is under way).
    let exported: HashSet<&str> = text
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(described) => described.split(' ').next(),
            None if l.starts_with('#') => None,
            None => l.split(['{', ' ']).next(),
        })
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/limiter.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "the dashboard has its panels: {exprs:?}");
    // A fleet dashboard: every query is narrowed by the job and instance variables, and
    // every rate is over Grafana's `$__rate_interval` (or the whole range).
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for variable in ["job", "instance", "interface"] {
        assert!(
            variables.contains(&variable),
            "no ${variable}: {variables:?}"
        );
    }
    for expr in exprs.iter().filter(|e| e.contains("limiter_")) {
        if !expr.starts_with("label_values(limiter_build_info") {
            assert!(
                expr.contains(r#"job=~"$job""#) && expr.contains(r#"instance=~"$instance""#),
                "not narrowed by job and instance: {expr}"
            );
        }
        if expr.contains("rate(") || expr.contains("increase(") {
            assert!(
                expr.contains("[$__rate_interval]") || expr.contains("[$__range]"),
                "a fixed rate window: {expr}"
            );
        }
    }
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("limiter_attack_packets_per_second")),
        "no attacks panel"
    );
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    for source in exprs.iter().map(String::as_str).chain([rules.as_str()]) {
        for name in metric_names(source) {
            assert!(
                exported.contains(name.as_str()),
                "{name} is queried but not exported"
            );
        }
    }

    // The pinned link gone (someone removed it): /healthz says the program is not attached.
    std::fs::remove_file(daemon.pin_dir.join("v1").join(&lab.rx_if).join("link")).unwrap();
    let (status, _, body) = get(&lab.rx, &format!("http://{METRICS}/healthz"), None);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not attached"), "{body}");
    let (_, _, text) = get(&lab.rx, &format!("http://{METRICS}/metrics"), None);
    assert!(
        text.contains(&format!(
            "limiter_program_attached{{interface=\"{}\",mode=\"native\"}} 0",
            lab.rx_if
        )),
        "{text}"
    );
    daemon.kill9();
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if (k == "expr" || k == "query") && v.is_string() {
                    out.push(v.as_str().unwrap().to_owned());
                } else {
                    collect_exprs(v, out);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("limiter_") {
        let start = i + found;
        let preceded_by_word =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        if !preceded_by_word {
            names.push(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// A Prometheus server inside the lab namespace, scraping with the example config.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    ns: String,
}

impl Prometheus {
    fn start(ns: &Netns) -> Self {
        let dir = std::env::temp_dir().join(format!("limiter-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let example =
            std::fs::read_to_string(repo().join("deploy/prometheus/prometheus.example.yml"))
                .unwrap();
        assert!(
            example.contains("scrape_interval: 5s"),
            "the example scrape config changed shape"
        );
        // The one change: scrape every second so the test does not wait.
        std::fs::write(
            dir.join("prometheus.yml"),
            example.replace("scrape_interval: 5s", "scrape_interval: 1s"),
        )
        .unwrap();
        std::fs::copy(
            repo().join("deploy/prometheus/alerts.yml"),
            dir.join("alerts.yml"),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .arg("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:9090")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus (Debian's prometheus package)");
        // Ready once it listens (its first scrape follows within a second).
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ns.run(|| std::net::TcpStream::connect("127.0.0.1:9090").is_ok()) {
            assert!(Instant::now() < deadline, "Prometheus never listened");
            thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            dir,
            ns: ns.name.clone(),
        }
    }

    /// The value of an instant query, once it has one.
    fn query(&self, ns: &Netns, expr: &str) -> Option<f64> {
        let url = format!(
            "http://127.0.0.1:9090/api/v1/query?query={}",
            urlencode(expr)
        );
        let (status, _, body) = get(ns, &url, None);
        if status != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// The label sets of an instant query's result.
    fn series(&self, ns: &Netns, expr: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
        let url = format!(
            "http://127.0.0.1:9090/api/v1/query?query={}",
            urlencode(expr)
        );
        let (status, _, body) = get(ns, &url, None);
        if status != 200 {
            return Vec::new();
        }
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        json["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|s| s["metric"].as_object().cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `expr` equals `expected` (Prometheus scrapes every second).
    fn wait_for(&self, ns: &Netns, expr: &str, expected: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(ns, expr);
            if last == Some(expected) {
                return;
            }
            thread::sleep(Duration::from_millis(500));
        }
        let log = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        panic!(
            "Prometheus: {expr} = {last:?}, expected {expected} (in {}):\n{log}",
            self.ns
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Sends `count` datagrams from `source`, split over two threads pinned to two CPUs, so
/// two CPUs' counters are at work.
fn send_from_two_cpus(lab: &Lab, source: &'static str, count: u32) {
    let handles: Vec<_> = (0..2)
        .map(|cpu| {
            let tx = lab.tx.name.clone();
            thread::spawn(move || {
                run_in(&tx, move || {
                    pin_to_cpu(cpu);
                    let socket = UdpSocket::bind((source, 0)).unwrap();
                    for i in 0..count / 2 {
                        socket.send_to(&i.to_be_bytes(), "192.0.2.1:9000").unwrap();
                        thread::sleep(Duration::from_micros(200));
                    }
                })
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn prometheus_scrapes_exact_counters_across_cpus_and_restarts() {
    require_root();
    let lab = Lab::new("mp", &["192.0.2.1/24"], &["192.0.2.10/24", "192.0.2.30/24"]);
    let mut daemon = Daemon::new("prom", &lab.rx.name, &lab.rx_if, &config(""));
    daemon.start();
    let prometheus = Prometheus::start(&lab.rx);
    let traffic = Traffic::new(
        &lab,
        "192.0.2.1:9000".parse().unwrap(),
        &[ip("192.0.2.10"), ip("192.0.2.30")],
    );
    traffic.send(ip("192.0.2.10"), 1, Duration::ZERO);

    // A denied source, from two CPUs: every frame is counted, exactly.
    send_from_two_cpus(&lab, "192.0.2.30", 400);
    let denied = r#"sum(limiter_packets_total{reason="denylisted"})"#;
    prometheus.wait_for(&lab.rx, denied, 400.0);

    // A flood over its limit: what did not arrive was counted as dropped, exactly.
    let sent = 1_000;
    let received = traffic.send(ip("192.0.2.10"), sent, Duration::from_secs(2));
    assert!(
        received < 400,
        "the flood was limited ({received} of {sent} arrived)"
    );
    prometheus.wait_for(
        &lab.rx,
        r#"sum(limiter_packets_total{reason="rate_packets"})"#,
        f64::from(sent - received),
    );
    prometheus.wait_for(
        &lab.rx,
        r#"sum(limiter_class_packets_total{class="default",action="drop"})"#,
        f64::from(sent - received),
    );

    // kill -9 and restart: the counters carry on from the pinned maps.
    daemon.kill9();
    daemon.start();
    send_from_two_cpus(&lab, "192.0.2.30", 100);
    prometheus.wait_for(&lab.rx, denied, 500.0);
    prometheus.wait_for(&lab.rx, r#"sum(resets(limiter_packets_total[5m]))"#, 0.0);
    prometheus.wait_for(&lab.rx, r#"max(limiter_program_attached)"#, 1.0);
    drop(prometheus);
}

/// The shipped rules pass their own unit tests (`deploy/prometheus/alerts_test.yml`): an
/// attack fires at once with its type and prefix, it pages only when monitor mode lets it
/// through, a class losing 15% of its frames fires, and the `absent()` guard fires.
#[test]
fn alert_rules_pass_their_unit_tests() {
    let (ok, report) = promtool(
        &[
            "test",
            "rules",
            repo()
                .join("deploy/prometheus/alerts_test.yml")
                .to_str()
                .unwrap(),
        ],
        None,
    );
    assert!(ok, "promtool test rules: {report}");
    assert!(report.contains("SUCCESS"), "{report}");

    // Every alert has a test case and a runbook section.
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(repo().join("deploy/prometheus/alerts_test.yml")).unwrap();
    let runbook = std::fs::read_to_string(repo().join("docs/runbook.md")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 14, "{alerts:?}");
    for alert in alerts {
        assert!(
            runbook.contains(&format!("\n## {alert}\n")),
            "docs/runbook.md has no section for {alert}"
        );
        assert!(
            rules.contains(&format!("docs/runbook.md#{}", alert.to_lowercase())),
            "{alert} does not link its runbook section"
        );
        let tested = [
            "LimiterAttack",
            "LimiterAttackNotBlocked",
            "LimiterClassDropping",
            "LimiterMetricsAbsent",
            "LimiterDown",
        ];
        if tested.contains(&alert) {
            assert!(
                tests.contains(&format!("alertname: {alert}\n")),
                "no unit test for {alert}"
            );
        }
    }
}

/// A real flood, a real daemon, a real Prometheus with the shipped rules: the attack alert
/// fires within a minute of the flood's start, labelled with the attack's type and prefix,
/// and resolves once the flood is over.
#[test]
fn attack_alert_fires_within_a_minute_naming_type_and_prefix() {
    use limiter_tests::{frame::Frame, netns::RawSender};
    require_root();
    let lab = Lab::new("ma", &["192.0.2.1/24"], &["192.0.2.10/24"]);
    let mut daemon = Daemon::new("alert", &lab.rx.name, &lab.rx_if, &config(""));
    daemon.start();
    let prometheus = Prometheus::start(&lab.rx);
    prometheus.wait_for(&lab.rx, r#"max(limiter_program_attached)"#, 1.0);

    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sender = RawSender::new(&lab.tx, &lab.tx_if);
    let flood = {
        let flooding = flooding.clone();
        thread::spawn(move || {
            // 4,000 frames/s from one source with a limit of 100/s, in one-second steps,
            // until told to stop (at most 90 s).
            for _ in 0..90 {
                if !flooding.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                sender.flood(4_000, Duration::from_secs(1), |_| {
                    Frame::udp("198.51.100.7", 9000).build()
                });
            }
        })
    };
    let started = Instant::now();
    let firing = r#"ALERTS{alertname="LimiterAttack",alertstate="firing"}"#;
    let fired = loop {
        let series = prometheus.series(&lab.rx, firing);
        if !series.is_empty() || started.elapsed() > Duration::from_secs(75) {
            break series;
        }
        thread::sleep(Duration::from_millis(500));
    };
    let fired_after = started.elapsed();
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    assert_eq!(
        fired.len(),
        1,
        "one attack alert: {fired:?}\n{}",
        daemon.logs()
    );
    let labels = &fired[0];
    assert_eq!(labels["type"], "source_flood", "{labels:?}");
    assert_eq!(labels["prefix"], "198.51.100.7/32", "{labels:?}");
    assert_eq!(
        labels["severity"], "info",
        "an absorbed flood is not a page"
    );
    assert!(
        fired_after < Duration::from_secs(60),
        "fired after {fired_after:?}"
    );
    println!("LimiterAttack fired {fired_after:?} after the flood started: {labels:?}");
    // Every dashboard query is valid PromQL that the real server evaluates, and the attacks
    // panel shows this attack.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/limiter.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    for expr in exprs.iter().filter(|e| !e.starts_with("label_values(")) {
        let concrete = expr
            .replace("$__rate_interval", "15s")
            .replace("$__range", "5m")
            .replace("$job", ".*")
            .replace("$instance", ".*")
            .replace("$interface", ".*");
        let url = format!(
            "http://127.0.0.1:9090/api/v1/query?query={}",
            urlencode(&concrete)
        );
        let (status, _, body) = get(&lab.rx, &url, None);
        assert_eq!(status, 200, "{concrete}: {body}");
        if expr.starts_with("limiter_attack_packets_per_second") {
            let shown = prometheus.series(&lab.rx, &concrete);
            assert!(
                shown.iter().any(|s| s["prefix"] == "198.51.100.7/32"),
                "attacks panel: {shown:?}"
            );
        }
    }
    // The id in the alert is the record `limiter attacks` shows.
    let id = labels["id"].as_str().unwrap();
    let shown = daemon.ok(&["attacks", "show", id]);
    assert!(shown.contains("198.51.100.7/32"), "{shown}");
    // Nothing paged: enforce mode absorbed it.
    assert!(
        prometheus
            .series(&lab.rx, r#"ALERTS{alertname="LimiterAttackNotBlocked"}"#)
            .is_empty()
    );

    // Over: the daemon ends the attack after 10 s below half the rate; the alert resolves.
    let stopped = Instant::now();
    while !prometheus.series(&lab.rx, firing).is_empty() {
        assert!(
            stopped.elapsed() < Duration::from_secs(45),
            "the alert still fires {:?} after the flood stopped",
            stopped.elapsed()
        );
        thread::sleep(Duration::from_millis(500));
    }
    println!("resolved {:?} after the flood stopped", stopped.elapsed());
    drop(prometheus);
    daemon.stop();
}

/// The packaged unit's capabilities, and nothing else: the daemon still loads, attaches, pins
/// and filters; the kernel refuses it BPF statistics (they need CAP_SYS_ADMIN), and their
/// counters are then not exported rather than exported as zeros.
#[test]
fn with_only_the_units_three_capabilities_it_filters_and_exports_no_bpf_zeros() {
    require_root();
    let lab = Lab::new("mc", &["192.0.2.1/24"], &["192.0.2.10/24", "192.0.2.30/24"]);
    let mut daemon = Daemon::new(
        "caps",
        &lab.rx.name,
        &lab.rx_if,
        &config("bpf_stats = true\n"),
    );
    daemon.capabilities = Some(vec!["bpf", "net_admin", "perfmon"]);
    daemon.start();
    let pid = daemon.pid().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    // CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39).
    let three = format!("{:016x}", (1u64 << 12) | (1 << 38) | (1 << 39));
    for field in ["CapEff:", "CapBnd:"] {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        assert_eq!(
            line.split_whitespace().nth(1),
            Some(three.as_str()),
            "{line}"
        );
    }
    assert!(
        daemon.pin_dir.join("v1").join(&lab.rx_if).exists(),
        "pinned with the three capabilities"
    );
    let traffic = Traffic::new(
        &lab,
        "192.0.2.1:9000".parse().unwrap(),
        &[ip("192.0.2.10"), ip("192.0.2.30")],
    );
    assert_eq!(
        traffic.send(ip("192.0.2.30"), 20, Duration::from_millis(100)),
        0,
        "the denied source is dropped"
    );
    assert_eq!(
        traffic.send(ip("192.0.2.10"), 10, Duration::from_millis(100)),
        10,
        "a source within its limit passes"
    );
    let (code, _, text) = get(&lab.rx, &format!("http://{METRICS}/metrics"), None);
    assert_eq!(code, 200);
    assert!(text.contains("limiter_program_attached{"), "{text}");
    assert!(
        !text.contains("limiter_bpf_run"),
        "no BPF statistics the kernel does not keep:\n{text}"
    );
    // The process metrics are the daemon's: started a moment ago, its fds open.
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| {
                let rest = l.strip_prefix(name)?;
                rest.strip_prefix("{}")
                    .unwrap_or(rest)
                    .strip_prefix(' ')?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = value("process_start_time_seconds");
    assert!(
        (now - 120.0..=now + 5.0).contains(&started),
        "{started} vs {now}"
    );
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as f64;
    assert!((value("process_open_fds") - fds).abs() <= 3.0, "{fds} fds");
    assert!(
        daemon.logs().contains("kernel BPF statistics unavailable"),
        "the log says why: {}",
        daemon.logs()
    );
    daemon.stop();
    daemon.cleanup();
}
