//! Fail safe: each way an operator (or an accident) could open the gate or get an "ok" that
//! does nothing, reproduced against the real daemon with real packets.

use std::{
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use limiter_tests::{
    daemon::{Daemon, TEST_CONFIG as CONFIG, Tmpfs, Traffic, binary, ip, output_within},
    netns::{Lab, http_get},
    require_root,
};

const HEALTHZ: &str = "http://127.0.0.1:9810/healthz";
const METRICS: &str = "http://127.0.0.1:9810/metrics";

/// A lab, a running daemon on its rx side, and UDP traffic from 192.0.2.10 and 192.0.2.20.
fn lab_with_daemon(
    tag: &str,
    config: &str,
    setup: impl FnOnce(&mut Daemon),
) -> (Lab, Daemon, Traffic) {
    let lab = Lab::new(tag, &["192.0.2.1/24"], &["192.0.2.10/24", "192.0.2.20/24"]);
    let mut daemon = Daemon::new(tag, &lab.rx.name, &lab.rx_if, config);
    setup(&mut daemon);
    daemon.start();
    let traffic = Traffic::new(
        &lab,
        "192.0.2.1:9000".parse().unwrap(),
        &[ip("192.0.2.10"), ip("192.0.2.20")],
    );
    // Neighbour resolution first.
    traffic.send(ip("192.0.2.10"), 1, Duration::ZERO);
    traffic.send(ip("192.0.2.20"), 1, Duration::ZERO);
    (lab, daemon, traffic)
}

/// 200 datagrams at 400/s; how many arrived.
fn burst_of_200(traffic: &Traffic, source: IpAddr) -> u32 {
    traffic.send(source, 200, Duration::from_millis(500))
}

/// The most a 20/s, burst-10 limit lets through of [`burst_of_200`].
const LIMITED: u32 = 10 + 20 + 5;

fn failed_with(out: &std::process::Output, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected a refusal containing {needle:?}, got success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    stderr
}

/// Polls `f` every 20 ms until it is true or `limit` passes; returns the time it took.
fn within(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

fn attached(daemon: &Daemon) -> bool {
    daemon.status()["interfaces"][0]["attached"]
        .as_bool()
        .expect("status reports attached")
}

fn metric(lab: &Lab, name: &str) -> Option<f64> {
    let (_, _, body) = http_get(&lab.rx, METRICS, None);
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

// 1. The gate: an interface deleted and recreated.
#[test]
fn a_recreated_interface_is_filtered_again_and_the_gap_is_reported() {
    require_root();
    let (lab, daemon, traffic) = lab_with_daemon("g1", CONFIG, |_| {});
    let a = ip("192.0.2.10");
    daemon.ok(&["limit", "set", "--pps", "20", "--burst", "10"]);
    assert!(burst_of_200(&traffic, a) <= LIMITED, "limited before");
    assert_eq!(http_get(&lab.rx, HEALTHZ, None).0, 200);
    let program = lab
        .rx_xdp_program()
        .expect("the kernel reports our program");

    lab.delete_link();
    // The truth at once: nothing filters the name now.
    assert!(
        !attached(&daemon),
        "status says unattached right after the delete"
    );
    let status = daemon.ok(&["status"]);
    assert!(
        status.contains("NO") && status.contains("WARNING: nothing filters"),
        "{status}"
    );
    let (code, _, body) = http_get(&lab.rx, HEALTHZ, None);
    assert_ne!(code, 200, "healthz fails while unattached: {body}");
    assert_eq!(metric(&lab, "limiter_program_attached"), Some(0.0));

    let recreated = Instant::now();
    lab.create_link();
    let took = within(Duration::from_secs(2), "re-attached", || attached(&daemon));
    assert_eq!(
        lab.rx_xdp_program(),
        Some(program),
        "the kernel reports the same program on the new interface"
    );
    assert_eq!(http_get(&lab.rx, HEALTHZ, None).0, 200);
    assert_eq!(metric(&lab, "limiter_program_attached"), Some(1.0));
    // The pinned policy came along: the lowered limit holds on the new interface.
    traffic.send(a, 1, Duration::ZERO);
    assert!(
        recreated.elapsed() < Duration::from_secs(2),
        "limited again within 2 s (took {took:?} to attach)"
    );
    let passed = burst_of_200(&traffic, a);
    assert!(
        passed <= LIMITED,
        "limited again on the recreated interface: {passed}"
    );
    let logs = daemon.logs();
    assert!(
        logs.contains("WARN") && logs.contains("the interface is gone"),
        "the gap is logged as a warning: {logs}"
    );
    assert!(
        logs.contains("attached to the interface (new or recreated)"),
        "{logs}"
    );
}

// 2. A second daemon on the same pins and state.
#[test]
fn a_second_daemon_is_refused_and_touches_nothing() {
    require_root();
    let (lab, daemon, traffic) = lab_with_daemon("g2", CONFIG, |_| {});
    let a = ip("192.0.2.10");
    daemon.ok(&["limit", "set", "--pps", "20", "--burst", "10"]);
    let program = daemon.status()["interfaces"][0]["program_id"]
        .as_u64()
        .unwrap();
    let limits = daemon.ok(&["limit", "list"]);

    // Its own socket and a different policy, on the first one's pin and state directories.
    let other_config = daemon.dir.join("other.toml");
    std::fs::write(&other_config, CONFIG.replace("1000", "50000")).unwrap();
    let out = output_within(
        &mut daemon.run_command_with(
            &daemon.dir.join("other.sock"),
            &other_config,
            &daemon.state_dir(),
            &daemon.pin_dir,
        ),
        Duration::from_secs(20),
    );
    let stderr = failed_with(&out, "held by another limiter daemon");
    assert_eq!(
        out.status.code(),
        Some(78),
        "a config-class exit status: {stderr}"
    );
    assert!(
        stderr.contains(&format!("PID {}", daemon.pid().unwrap())),
        "names the holder: {stderr}"
    );
    let status = daemon.status();
    assert_eq!(
        status["interfaces"][0]["program_id"].as_u64(),
        Some(program),
        "same program"
    );
    assert_eq!(lab.rx_xdp_program().map(u64::from), Some(program));
    assert_eq!(daemon.ok(&["limit", "list"]), limits, "same policy");
    assert!(burst_of_200(&traffic, a) <= LIMITED, "same verdicts");
}

// 3. Startup checks before attaching, and exit statuses systemd will not loop on.
#[test]
fn bad_directories_are_refused_before_anything_is_attached() {
    require_root();
    let lab = Lab::new("g3", &["192.0.2.1/24"], &["192.0.2.10/24"]);
    let daemon = Daemon::new("g3", &lab.rx.name, &lab.rx_if, CONFIG);
    let run = |state: &Path, pins: &Path| {
        output_within(
            &mut daemon.run_command_with(&daemon.socket(), &daemon.config(), state, pins),
            Duration::from_secs(20),
        )
    };

    // A pin directory that is not on bpffs.
    let not_bpffs = daemon.dir.join("pins-on-tmp");
    let out = run(&daemon.state_dir(), &not_bpffs);
    let stderr = failed_with(&out, "not on a BPF filesystem");
    assert!(
        stderr.contains(&not_bpffs.display().to_string()) && stderr.contains("mount -t bpf"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(lab.rx_xdp_program(), None, "nothing attached");

    // A state directory that cannot be written (a read-only mount: root writes anywhere else).
    let read_only = Tmpfs::mount(&daemon.dir.join("ro-state"), "ro,size=64k");
    let out = run(&read_only.0, &daemon.pin_dir);
    let stderr = failed_with(&out, "runtime changes could not be saved");
    assert!(
        stderr.contains(&read_only.0.display().to_string()),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(lab.rx_xdp_program(), None, "nothing attached");
    assert!(!daemon.pin_dir.join("v1").exists(), "nothing pinned");
}

#[test]
fn a_refused_map_layout_exits_with_a_status_systemd_does_not_restart() {
    require_root();
    let (_lab, mut daemon, traffic) = lab_with_daemon("g3b", CONFIG, |_| {});
    daemon.ok(&["limit", "set", "--pps", "20", "--burst", "10"]);
    daemon.kill9();
    std::fs::write(
        daemon.config(),
        format!("{CONFIG}\n[capacity]\nsources = 8192\n"),
    )
    .unwrap();
    let out = output_within(&mut daemon.run_command(), Duration::from_secs(20));
    let stderr = failed_with(&out, "capacity");
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("keeps filtering"),
        "says the old program still filters: {stderr}"
    );
    assert!(
        burst_of_200(&traffic, ip("192.0.2.10")) <= LIMITED,
        "and it does"
    );
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/limiter.service"),
    )
    .unwrap();
    assert!(
        unit.lines()
            .any(|l| l.starts_with("RestartPreventExitStatus=") && l.contains("78")),
        "the unit does not restart on it"
    );
}

// 5. Resource exhaustion of the control socket.
#[test]
fn idle_connections_cannot_starve_the_control_socket() {
    require_root();
    // The limit a default systemd unit would give; the daemon cannot raise it.
    let (_lab, daemon, _traffic) = lab_with_daemon("g5", CONFIG, |d| d.nofile = Some(1024));
    raise_own_file_limit(8192);
    let log_lines = |d: &Daemon| d.logs().lines().count();
    let before = log_lines(&daemon);
    let idle = idle_connections(&daemon.socket(), 2_000, Duration::from_secs(10));
    assert_eq!(idle.len(), 2_000, "the daemon kept accepting");
    thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let status = daemon.cli(&["status"]);
    let took = start.elapsed();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        took < Duration::from_secs(1),
        "status took {took:?} behind 2,000 idle connections"
    );
    thread::sleep(Duration::from_millis(500));
    let grown = log_lines(&daemon) - before;
    assert!(grown < 100, "the log grew by {grown} lines");
    drop(idle);
    daemon.ok(&["status"]);
}

/// Opens up to `count` connections that never send anything, within `budget`. Connects are
/// non-blocking, so a daemon that stops accepting (a full backlog) cannot hang the test.
fn idle_connections(path: &Path, count: usize, budget: Duration) -> Vec<std::os::fd::OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    use std::os::fd::AsRawFd as _;
    let addr = UnixAddr::new(path).unwrap();
    let deadline = Instant::now() + budget;
    let mut open = Vec::new();
    while open.len() < count && Instant::now() < deadline {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK,
            None,
        )
        .expect("socket");
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => open.push(fd),
            Err(nix::errno::Errno::EAGAIN) => thread::sleep(Duration::from_millis(1)),
            Err(e) => panic!("connect: {e}"),
        }
    }
    open
}

fn raise_own_file_limit(n: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, n.min(hard), hard).unwrap();
}

// 6. No "ok" that does nothing.
#[test]
fn every_ok_takes_effect_and_what_cannot_is_refused_or_explained() {
    require_root();
    let (_lab, daemon, traffic) = lab_with_daemon("g6", CONFIG, |_| {});
    let b = ip("192.0.2.20");

    // Durations past the maximum are refused, naming it; nothing is added.
    for args in [
        &[
            "deny",
            "add",
            "192.0.2.20",
            "--timeout",
            "18446744073709551615s",
        ][..],
        &[
            "block",
            "add",
            "192.0.2.20",
            "--timeout",
            "18446744073709551615s",
        ][..],
        &["deny", "add", "192.0.2.20", "--timeout", "366d"][..],
    ] {
        failed_with(&daemon.cli(args), "maximum, 365d");
    }
    let raw = daemon.raw(r#"{"command":"list_add","list":"deny","prefix":"192.0.2.20/32","ttl_seconds":18446744073709551615}"#);
    assert_eq!(raw["ok"], false, "{raw}");
    assert!(!daemon.ok(&["deny", "list"]).contains("192.0.2.20"));
    assert_eq!(traffic.send(b, 5, Duration::from_millis(100)), 5);

    // An IPv4-mapped address is the IPv4 address: it matches IPv4 traffic.
    let out = daemon.ok(&["deny", "add", "::ffff:192.0.2.20"]);
    assert!(
        out.contains("192.0.2.20/32"),
        "the answer shows what was added: {out}"
    );
    assert!(daemon.ok(&["deny", "list"]).contains("192.0.2.20/32"));
    assert_eq!(
        traffic.send(b, 5, Duration::from_millis(100)),
        0,
        "and it drops"
    );
    daemon.ok(&["deny", "delete", "192.0.2.20"]);

    // An allow inside a deny: taken, and the answer names the deny that wins.
    daemon.ok(&["deny", "add", "192.0.2.16/28"]);
    let out = daemon.cli(&["allow", "add", "192.0.2.20"]);
    assert!(out.status.success());
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(
        note.contains("192.0.2.16/28") && note.contains("wins"),
        "{note}"
    );
    assert_eq!(
        traffic.send(b, 5, Duration::from_millis(100)),
        0,
        "deny wins, as said"
    );
}

// 7. One set of rules for every way in.
#[test]
fn the_cli_and_the_socket_refuse_what_the_config_file_refuses() {
    require_root();
    let (_lab, daemon, traffic) = lab_with_daemon("g7", CONFIG, |_| {});
    let a = ip("192.0.2.10");
    failed_with(
        &daemon.cli(&["deny", "add", "10.9.9.9/8"]),
        "did you mean 10.0.0.0/8?",
    );
    failed_with(
        &daemon.cli(&[
            "class",
            "add",
            "x",
            "--prefix",
            "10.200.3.4/16",
            "--pps",
            "5",
            "--burst",
            "5",
        ]),
        "did you mean 10.200.0.0/16?",
    );
    failed_with(
        &daemon.cli(&[
            "class",
            "add",
            "",
            "--prefix",
            "10.200.0.0/16",
            "--unlimited",
        ]),
        "must not be empty",
    );
    failed_with(
        &daemon.cli(&["limit", "set", "--pps", "0", "--burst", "5"]),
        "--pps/--burst",
    );

    for (what, line) in [
        ("host bits", r#"{"command":"list_add","list":"deny","prefix":"10.9.9.9/8","ttl_seconds":null}"#.to_owned()),
        ("an empty name", r#"{"command":"class_add","name":"","prefixes":["192.0.2.0/28"],"limit":{"packets":null,"bytes":null,"aggregate":null}}"#.to_owned()),
        ("a newline in a name", r#"{"command":"class_add","name":"a\nb","prefixes":["192.0.2.0/28"],"limit":{"packets":null,"bytes":null,"aggregate":null}}"#.to_owned()),
        ("a 60,000-character name", format!(r#"{{"command":"class_add","name":"{}","prefixes":["192.0.2.0/28"],"limit":{{"packets":null,"bytes":null,"aggregate":null}}}}"#, "x".repeat(60_000))),
        ("a rate as a list", r#"{"command":"limit_set","target":"default","packets":{"set":[10,10]}}"#.to_owned()),
        ("a wide deny", r#"{"command":"list_add","list":"deny","prefix":"0.0.0.0/0","ttl_seconds":null}"#.to_owned()),
    ] {
        let answer = daemon.raw(&line);
        assert_eq!(answer["ok"], false, "{what} refused: {answer}");
    }
    let classes: serde_json::Value =
        serde_json::from_str(&daemon.ok(&["class", "list", "--json"])).unwrap();
    assert_eq!(
        classes["items"],
        serde_json::json!([]),
        "no class was added"
    );
    assert!(
        daemon.ok(&["limit", "list"]).contains("1000/s burst 1000"),
        "the default limit is unchanged"
    );

    // A wide deny needs --force; with it, it applies to real traffic.
    failed_with(&daemon.cli(&["deny", "add", "0.0.0.0/0"]), "--force");
    assert_eq!(traffic.send(a, 5, Duration::from_millis(100)), 5);
    daemon.ok(&["deny", "add", "0.0.0.0/0", "--force"]);
    assert_eq!(traffic.send(a, 5, Duration::from_millis(100)), 0);
    daemon.ok(&["deny", "delete", "0.0.0.0/0"]);
    assert_eq!(traffic.send(a, 5, Duration::from_millis(100)), 5);
}

// 8. Expiry does not depend on the disk.
#[test]
fn a_temporary_deny_expires_on_time_with_the_state_disk_full() {
    require_root();
    let mut mount = None;
    let (lab, daemon, traffic) = lab_with_daemon("g8", CONFIG, |d| {
        mount = Some(Tmpfs::mount(&d.state_dir(), "size=256k,mode=0700"));
    });
    let mount = mount.unwrap();
    let b = ip("192.0.2.20");
    daemon.ok(&["deny", "add", "192.0.2.20", "--timeout", "3s"]);
    let added = Instant::now();
    assert_eq!(traffic.send(b, 5, Duration::from_millis(100)), 0, "denied");
    fill(&mount);
    // A change now cannot be saved, so it is refused rather than acknowledged and lost.
    failed_with(&daemon.cli(&["deny", "add", "192.0.2.99"]), "No space left");

    thread::sleep(
        Duration::from_secs(3).saturating_sub(added.elapsed()) + Duration::from_millis(1_500),
    );
    assert_eq!(
        traffic.send(b, 5, Duration::from_millis(200)),
        5,
        "the deny expired on time"
    );
    assert!(!daemon.ok(&["deny", "list"]).contains("192.0.2.20"));
    assert_eq!(
        daemon.status()["state_saved"],
        false,
        "status says the state is not saved"
    );
    assert_eq!(metric(&lab, "limiter_state_saved"), Some(0.0));
    assert!(metric(&lab, "limiter_state_save_failures_total").is_some_and(|n| n >= 1.0));
    assert!(daemon.logs().contains("saving the runtime state failed"));

    std::fs::remove_file(mount.0.join("filler")).unwrap();
    within(Duration::from_secs(5), "the save is retried", || {
        daemon.status()["state_saved"] == true
    });
    let saved = std::fs::read_to_string(daemon.state_dir().join("runtime.json")).unwrap();
    assert!(
        !saved.contains("192.0.2.20"),
        "the expiry reached the disk: {saved}"
    );
}

/// Fills a small filesystem up.
fn fill(mount: &Tmpfs) {
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", mount.0.join("filler").display()))
        .stderr(Stdio::null())
        .status();
    assert!(
        std::fs::write(mount.0.join("probe"), [0u8; 8192]).is_err(),
        "the disk is full"
    );
}

// 9. Reads do not stall changes.
#[test]
fn a_change_is_not_held_up_by_a_walk_of_a_full_table() {
    require_root();
    let (lab, daemon, _traffic) = lab_with_daemon("g9", CONFIG, |_| {});
    fill_sources(&daemon.pin_dir.join("v1").join(&lab.rx_if), 250_000);
    let top_started = Instant::now();
    let top = {
        let socket = daemon.socket();
        thread::spawn(move || {
            let out = Command::new(binary())
                .arg("--socket")
                .arg(socket)
                .args(["top", "-n", "5"])
                .output()
                .unwrap();
            assert!(out.status.success());
            Instant::now()
        })
    };
    thread::sleep(Duration::from_millis(100));
    daemon.ok(&["limit", "set", "--pps", "500", "--burst", "1000"]);
    let changed = Instant::now();
    let top_finished = top.join().unwrap();
    eprintln!(
        "change acknowledged after {:?}, top finished after {:?}",
        changed - top_started,
        top_finished - top_started
    );
    assert!(
        changed < top_finished,
        "the change was acknowledged {:?} after the top started, the top finished after {:?}",
        changed - top_started,
        top_finished - top_started
    );
    assert!(daemon.ok(&["limit", "list"]).contains("500/s burst 1000"));
}

/// Inserts `count` sources into the pinned table, as a spoofed flood would.
fn fill_sources(pin_dir: &Path, count: u32) {
    use aya::maps::{HashMap, Map, MapData};
    use limiter_common::layout::{SourceKey, SourceState};
    let data = MapData::from_pin(pin_dir.join("SOURCES")).expect("the pinned source table");
    let mut map: HashMap<MapData, SourceKey, SourceState> =
        HashMap::try_from(Map::LruHashMap(data)).unwrap();
    for i in 0..count {
        let mut addr = [0u32; 4];
        addr[0] = u32::from_ne_bytes((0x0a00_0000 + i).to_be_bytes());
        let key = SourceKey {
            addr,
            limit_id: 0,
            family: limiter_common::prefix::FAMILY_IPV4,
            prefix_len: 32,
            ..SourceKey::default()
        };
        map.insert(key, SourceState::default(), 0).unwrap();
    }
}

// 10. Permissions.
#[test]
fn the_state_is_private_and_an_admin_outside_the_read_group_can_connect() {
    require_root();
    let (_lab, daemon, _traffic) = lab_with_daemon("g10", CONFIG, |_| {});
    daemon.ok(&["deny", "add", "192.0.2.99"]);
    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(daemon.state_dir()), 0o700, "the state directory");
    assert_eq!(
        mode(daemon.state_dir().join("runtime.json")),
        0o600,
        "the state file"
    );

    // admin_group alone: its members connect and change.
    let config = "[control]\nadmin_group = \"daemon\"\n";
    let (_lab2, admin_daemon, _t) = lab_with_daemon("g10b", config, |_| {});
    let gid = nix::unistd::Group::from_name("daemon")
        .unwrap()
        .unwrap()
        .gid;
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534"])
        .arg(format!("--groups={gid}"))
        .arg(binary())
        .arg("--socket")
        .arg(admin_daemon.socket())
        .args(["mode", "monitor"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "an admin connects: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(admin_daemon.status()["mode"], "monitor");
}

// 11. Pipes.
#[test]
fn a_closed_pipe_ends_the_cli_quietly() {
    require_root();
    let (_lab, daemon, _traffic) = lab_with_daemon("g11", CONFIG, |_| {});
    for args in [
        &["status"][..],
        &["limit", "list"][..],
        &["top"][..],
        &["completions", "bash"][..],
    ] {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        drop(reader);
        let out = Command::new(binary())
            .arg("--socket")
            .arg(daemon.socket())
            .args(args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "limiter {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "quietly: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
