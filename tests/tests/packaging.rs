//! The Debian package built by `cargo xtask package` (which `cargo xtask test` runs first):
//! its contents and its metadata.

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use limiter_tests::{netns::Lab, require_root};

fn deb() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}; run `cargo xtask package` first", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    debs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    debs.pop().expect("a .deb in target/debian")
}

fn dpkg_deb(args: &[&str]) -> String {
    let out = Command::new("dpkg-deb")
        .args(args)
        .arg(deb())
        .output()
        .expect("dpkg-deb");
    assert!(
        out.status.success(),
        "dpkg-deb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The package's files, unpacked into a scratch directory that goes when dropped.
struct Unpacked(PathBuf);

impl Unpacked {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("limiter-deb-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb())
            .arg(&dir)
            .output()
            .expect("dpkg-deb -x");
        assert!(out.status.success());
        Self(dir)
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.0.join(relative)
    }
}

impl Drop for Unpacked {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn package_holds_the_binary_unit_config_docs_and_deployment_files() {
    let contents = dpkg_deb(&["-c"]);
    for path in [
        "./usr/bin/limiter",
        "./etc/limiter/limiter.toml",
        "./usr/share/doc/limiter/README.md",
        "./usr/share/doc/limiter/config.md",
        "./usr/share/doc/limiter/metrics.md",
        "./usr/share/doc/limiter/operations.md",
        "./usr/share/doc/limiter/runbook.md",
        "./usr/share/doc/limiter/copyright",
        "./usr/share/doc/limiter/changelog.Debian.gz",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} missing from the package:\n{contents}"
        );
    }
    assert!(
        contents
            .lines()
            .any(|l| l.ends_with("systemd/system/limiter.service")),
        "the systemd unit is missing:\n{contents}"
    );
    let binary = contents
        .lines()
        .find(|l| l.ends_with("./usr/bin/limiter"))
        .unwrap();
    assert!(
        binary.starts_with("-rwxr-xr-x"),
        "the binary is executable: {binary}"
    );
    let control = dpkg_deb(&["-I"]);
    for field in [
        "Package: limiter",
        "Section: net",
        "Priority: optional",
        "conffiles",
    ] {
        assert!(control.contains(field), "{field}: {control}");
    }
    let depends = control
        .lines()
        .find(|l| l.trim_start().starts_with("Depends:"))
        .expect("Depends");
    assert!(
        depends.contains("adduser"),
        "postinst adds a group: {depends}"
    );
    assert!(
        !control.contains("localhost"),
        "a real maintainer address: {control}"
    );

    // Where minimal images keep them: not under /usr/share/doc.
    let unpacked = Unpacked::new("files");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (shipped, source) in [
        (
            "usr/share/limiter/grafana/limiter.json",
            "deploy/grafana/limiter.json",
        ),
        (
            "usr/share/limiter/prometheus/alerts.yml",
            "deploy/prometheus/alerts.yml",
        ),
        (
            "usr/share/limiter/prometheus/alerts_test.yml",
            "deploy/prometheus/alerts_test.yml",
        ),
        (
            "usr/share/limiter/prometheus/prometheus.example.yml",
            "deploy/prometheus/prometheus.example.yml",
        ),
    ] {
        assert_eq!(
            std::fs::read(unpacked.path(shipped)).unwrap_or_else(|e| panic!("{shipped}: {e}")),
            std::fs::read(repo.join(source)).unwrap(),
            "{shipped} is {source}"
        );
    }
    // Stripped; its symbols are in the -dbgsym package beside it.
    let file = Command::new("file")
        .arg(unpacked.path("usr/bin/limiter"))
        .output()
        .unwrap();
    let file = String::from_utf8_lossy(&file.stdout);
    assert!(file.contains(", stripped"), "{file}");
    let dbgsym = deb().with_file_name(
        deb()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replacen("limiter_", "limiter-dbgsym_", 1)
            .replace(".deb", ".ddeb"),
    );
    let symbols = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&dbgsym)
        .output()
        .unwrap();
    let symbols = String::from_utf8_lossy(&symbols.stdout);
    assert!(
        symbols
            .lines()
            .any(|l| l.contains("/usr/lib/debug/.build-id/") && l.ends_with(".debug")),
        "{}: {symbols}",
        dbgsym.display()
    );
}

#[test]
fn every_subcommand_has_a_man_page_and_every_shell_its_completions() {
    let unpacked = Unpacked::new("man");
    // The binary's own list of pages is the reference: one per subcommand, nested ones too.
    let expected = unpacked.path("expected-man");
    std::fs::create_dir_all(&expected).unwrap();
    let out = Command::new(unpacked.path("usr/bin/limiter"))
        .arg("manpage")
        .arg("--dir")
        .arg(&expected)
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut pages: Vec<String> = std::fs::read_dir(&expected)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for needed in [
        "limiter.1",
        "limiter-run.1",
        "limiter-top.1",
        "limiter-limit-set.1",
    ] {
        assert!(pages.iter().any(|p| p == needed), "{needed} in {pages:?}");
    }
    for page in &pages {
        let packaged = unpacked.path(&format!("usr/share/man/man1/{page}.gz"));
        let text = Command::new("gzip")
            .arg("-dc")
            .arg(&packaged)
            .output()
            .unwrap();
        assert!(text.status.success(), "{} is packaged", packaged.display());
        let text = String::from_utf8_lossy(&text.stdout);
        let name = page.trim_end_matches(".1");
        assert!(
            text.contains(&format!(".TH {name} 1")),
            "{page} renders: {text}"
        );
        // man itself formats it without a warning.
        let man = Command::new("man")
            .args(["--warnings", "-l", "-Tutf8"])
            .arg(&packaged)
            .output()
            .unwrap();
        assert!(
            man.status.success() && man.stderr.is_empty(),
            "man -l {page}: {}",
            String::from_utf8_lossy(&man.stderr)
        );
    }
    for (file, marker) in [
        (
            "usr/share/bash-completion/completions/limiter",
            "complete -F",
        ),
        (
            "usr/share/zsh/vendor-completions/_limiter",
            "#compdef limiter",
        ),
        (
            "usr/share/fish/vendor_completions.d/limiter.fish",
            "complete -c limiter",
        ),
    ] {
        let script =
            std::fs::read_to_string(unpacked.path(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(script.contains(marker), "{file}");
        assert!(script.contains("limit"), "{file} knows the subcommands");
    }
    // The bash completion really completes: `limiter li<TAB>` offers `limit`.
    let complete = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(limiter li); COMP_CWORD=1; COMP_LINE='limiter li'; \
             COMP_POINT=10; _limiter limiter li limiter; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            unpacked
                .path("usr/share/bash-completion/completions/limiter")
                .display()
        ))
        .output()
        .unwrap();
    let offered = String::from_utf8_lossy(&complete.stdout);
    assert!(
        offered.lines().any(|l| l.trim() == "limit"),
        "bash offers: {offered}{}",
        String::from_utf8_lossy(&complete.stderr)
    );
}

#[test]
fn the_package_is_lintian_clean() {
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning"])
        .arg(deb())
        .output()
        .expect("lintian (cargo xtask setup installs it)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && !report
                .lines()
                .any(|l| l.starts_with("E:") || l.starts_with("W:")),
        "lintian:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_unit_scores_at_most_3_in_systemd_analyze_security() {
    let unpacked = Unpacked::new("unit");
    let unit = unpacked.path("usr/lib/systemd/system/limiter.service");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze (cargo xtask setup installs systemd)");
    let report = String::from_utf8_lossy(&out.stdout);
    let score: f64 = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for limiter.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no score in:\n{report}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(score <= 3.0, "exposure {score}:\n{report}");
    let text = std::fs::read_to_string(&unit).unwrap();
    // Exactly the three capabilities, and writes only to its own directories.
    for line in [
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        "ProtectSystem=strict",
        "ReadWritePaths=-/sys/fs/bpf/limiter /var/lib/limiter /run/limiter",
        "ReadWritePaths=-/proc/sys/net/ipv4/tcp_syncookies",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("ReadWritePaths="))
            .count(),
        2,
        "{text}"
    );
}

#[test]
fn packaged_unit_keeps_only_the_needed_capabilities() {
    let unpacked = Unpacked::new("caps");
    let dir = &unpacked.0;
    let unit = [
        "lib/systemd/system/limiter.service",
        "usr/lib/systemd/system/limiter.service",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(dir.join(p)).ok())
    .expect("the unit file");
    assert!(
        unit.contains("CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON"),
        "{unit}"
    );
    assert!(
        unit.contains("ExecStart=/usr/bin/limiter run --config /etc/limiter/limiter.toml"),
        "{unit}"
    );
    // Filtering before the network comes up, as nftables does.
    for line in [
        "Before=network-pre.target shutdown.target",
        "Wants=network-pre.target",
        "DefaultDependencies=no",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "LimitNOFILE=4096",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing:\n{unit}");
    }
    assert!(!unit.contains("network-online"), "{unit}");
    let man = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -dc {}/usr/share/man/man1/limiter.1.gz",
            dir.display()
        ))
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(
        page.contains(".TH limiter") && page.contains("run"),
        "the man page renders the CLI: {page}"
    );
    // The packaged config is valid, names no interface and denies nothing; the daemon
    // refuses to start on it, saying why, with the status the unit does not restart on.
    let config = dir.join("etc/limiter/limiter.toml");
    let parsed = limiter_user::config::load_file(&config).expect("the packaged config parses");
    assert!(parsed.interfaces.is_empty(), "{parsed:?}");
    assert!(parsed.policy.deny.is_empty() && parsed.policy.allow.is_empty());
    let out = Command::new(dir.join("usr/bin/limiter"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no interface to attach to"), "{stderr}");
    // The example stays in the docs, for every key.
    assert!(
        dir.join("usr/share/doc/limiter/examples/limiter.example.toml")
            .exists()
    );
}

/// The package, installed for one test and purged afterwards (also when the test fails).
struct Installed;

impl Installed {
    fn new() -> Self {
        let out = Command::new("dpkg")
            .arg("-i")
            .arg(deb())
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dpkg -i: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "limiter"]).output();
    }
}

#[test]
fn removing_the_package_detaches_and_upgrading_does_not() {
    require_root();
    let lab = Lab::new("pk", &["192.0.2.1/24"], &["192.0.2.10/24"]);
    let id = std::process::id();
    let scratch = std::env::temp_dir().join(format!("limiter-pkg-{id}"));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let pins = PathBuf::from(format!("/sys/fs/bpf/limiter-test-pkg-{id}"));
    let socket = scratch.join("limiter.sock");
    let installed = Installed::new();
    std::fs::write(
        "/etc/limiter/limiter.toml",
        format!(
            "interfaces = [\"{}\"]\nattach_mode = \"native\"\npin_dir = \"{}\"\nstate_dir = \"{}\"\n\
             [control]\nsocket = \"{}\"\n",
            lab.rx_if,
            pins.display(),
            scratch.join("state").display(),
            socket.display()
        ),
    )
    .unwrap();
    let mut daemon = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.rx.name))
        .args([
            "/usr/bin/limiter",
            "run",
            "--config",
            "/etc/limiter/limiter.toml",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(scratch.join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    let cli = |args: &[&str]| {
        Command::new("/usr/bin/limiter")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cli(&["status"]).is_ok_and(|o| o.status.success()) {
        assert!(
            Instant::now() < deadline,
            "the installed daemon did not start"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let program = lab.rx_xdp_program().expect("attached");

    // An upgrade's prerm leaves it filtering.
    let upgrade = Command::new("/var/lib/dpkg/info/limiter.prerm")
        .args(["upgrade", "0.1.0"])
        .status()
        .unwrap();
    assert!(upgrade.success());
    assert_eq!(
        lab.rx_xdp_program(),
        Some(program),
        "still filtering after an upgrade's prerm"
    );

    // Removal detaches: through the running daemon, which then exits cleanly.
    let remove = Command::new("dpkg")
        .args(["-r", "limiter"])
        .output()
        .unwrap();
    assert!(
        remove.status.success(),
        "dpkg -r: {}",
        String::from_utf8_lossy(&remove.stderr)
    );
    assert_eq!(
        lab.rx_xdp_program(),
        None,
        "nothing left attached after removal"
    );
    assert!(!Path::new(&pins).join("v1").exists(), "pins removed");
    assert!(!Path::new("/usr/bin/limiter").exists());
    let exited = (0..100).find_map(|_| {
        thread::sleep(Duration::from_millis(50));
        daemon.try_wait().unwrap()
    });
    assert!(
        exited.is_some_and(|s| s.success()),
        "the daemon exited cleanly: {exited:?}"
    );
    drop(installed);
    let _ = daemon.kill();
    let _ = std::fs::remove_dir_all(&pins);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// systemd, booted as PID 1 of a throwaway container (the host's own /usr, a tmpfs for the
/// rest) that shares a lab namespace's network, so the installed unit runs in its real
/// sandbox. Powered off and its pins removed when dropped.
struct Booted {
    nspawn: std::process::Child,
    init: u32,
    pins: PathBuf,
}

impl Booted {
    fn new(netns: &str, etc_limiter: &Path, pins: PathBuf) -> Self {
        let mut nspawn = Command::new("timeout")
            .args(["--kill-after=10", "240", "systemd-nspawn", "--directory=/"])
            .args([
                "--volatile=yes",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--quiet",
            ])
            .arg(format!("--network-namespace-path=/run/netns/{netns}"))
            .arg(format!("--machine=limiter-{}", std::process::id()))
            // What the unit's three capabilities come from, and the syscalls nspawn's own
            // filter would otherwise refuse the daemon.
            .arg("--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN,CAP_SYS_ADMIN")
            .arg("--system-call-filter=bpf perf_event_open")
            // bpffs, which a booted host mounts itself; the `limiter` group the package made.
            .arg("--bind=/sys/fs/bpf")
            // The host's machine id: without one systemd takes the boot for a first boot
            // and enables every installed unit by its preset (etcd, prometheus, ...).
            .arg("--bind-ro=/etc/machine-id")
            .arg("--bind-ro=/etc/group")
            .arg("--bind-ro=/etc/passwd")
            .arg(format!("--bind-ro={}:/etc/limiter", etc_limiter.display()))
            .args(["--", "systemd.firstboot=off"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("systemd-nspawn (cargo xtask setup installs systemd-container)");
        // The container's init: the process whose command line is systemd's.
        let deadline = Instant::now() + Duration::from_secs(30);
        let init = loop {
            let found = std::fs::read_dir("/proc").unwrap().find_map(|e| {
                let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                (cmdline.starts_with(b"/usr/lib/systemd/systemd\0")
                    && cmdline.ends_with(b"systemd.firstboot=off\0"))
                .then_some(pid)
            });
            if let Some(pid) = found {
                break pid;
            }
            assert!(
                Instant::now() < deadline && nspawn.try_wait().unwrap().is_none(),
                "systemd did not boot in the container"
            );
            thread::sleep(Duration::from_millis(100));
        };
        let mut booted = Self { nspawn, init, pins };
        let deadline = Instant::now() + Duration::from_secs(60);
        // Booted: the manager answers, and has finished starting up (a unit of the host's
        // that cannot run in a container leaves it `degraded`, which is fine here).
        loop {
            let (_, state) = booted.sh("systemctl is-system-running");
            if ["running", "degraded"].contains(&state.trim()) {
                break;
            }
            assert!(
                Instant::now() < deadline && booted.nspawn.try_wait().unwrap().is_none(),
                "systemd did not finish booting: {state}"
            );
            thread::sleep(Duration::from_millis(200));
        }
        booted
    }

    /// Runs a shell command line inside the container; its exit status and output.
    fn sh(&self, line: &str) -> (bool, String) {
        let out = Command::new("nsenter")
            .arg("--target")
            .arg(self.init.to_string())
            .args(["--all", "sh", "-c", line])
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        let _ = self.sh("systemctl poweroff");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.nspawn.try_wait().unwrap().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        // Stopping the unit leaves the program pinned, by design; the test's pins go, and the
        // pin directory too when nothing else is in it.
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = std::fs::remove_dir("/sys/fs/bpf/limiter/v1");
        let _ = std::fs::remove_dir("/sys/fs/bpf/limiter");
    }
}

/// The install steps of docs/operations.md, as written, on a booted systemd: the unit's
/// sandbox lets the daemon create its pin directory on a fresh bpffs, load, attach, pin and
/// filter with exactly its three capabilities.
#[test]
fn the_installed_unit_starts_under_systemd_in_its_sandbox_and_filters() {
    require_root();
    let lab = Lab::new("sd", &["192.0.2.1/24"], &["192.0.2.10/24"]);
    let installed = Installed::new();
    let etc = std::env::temp_dir().join(format!("limiter-sd-etc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&etc);
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("limiter.toml"),
        format!(
            "interfaces = [\"{}\"]\nattach_mode = \"native\"\nmode = \"monitor\"\n\n\
             [default_limit]\npackets_per_second = 10\nburst_packets = 5\n",
            lab.rx_if
        ),
    )
    .unwrap();
    let pins = PathBuf::from("/sys/fs/bpf/limiter/v1").join(&lab.rx_if);
    assert!(
        !Path::new("/sys/fs/bpf/limiter").exists(),
        "/sys/fs/bpf/limiter exists before the test: the unit must make it"
    );
    let booted = Booted::new(&lab.rx.name, &etc, pins.clone());

    let (ok, out) = booted.sh("limiter check --config /etc/limiter/limiter.toml");
    assert!(ok, "limiter check: {out}");
    let (ok, out) = booted.sh("systemctl enable --now limiter");
    assert!(ok, "systemctl enable --now limiter: {out}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let (ok, out) = booted.sh("limiter status");
        if ok && out.contains(&lab.rx_if) {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "limiter status never answered: {out}\n{}",
            booted.sh("journalctl -u limiter --no-pager -o cat").1
        );
        thread::sleep(Duration::from_millis(200));
    };
    let attached = status
        .lines()
        .find(|l| l.starts_with(lab.rx_if.as_str()))
        .expect("a row for the interface");
    assert!(
        attached.split_whitespace().nth(1) == Some("yes")
            && attached.split_whitespace().nth(2) == Some("native"),
        "{status}"
    );
    assert!(
        pins.join("link").exists(),
        "pinned under the unit's directory"
    );

    // The daemon keeps exactly its three capabilities (CAP_NET_ADMIN 12, CAP_PERFMON 38,
    // CAP_BPF 39), in a mount namespace of its own where the rest of bpffs is read-only.
    let (_, main_pid) = booted.sh("systemctl show limiter --property MainPID --value");
    let main_pid = main_pid.trim();
    let (_, proc_status) = booted.sh(&format!("cat /proc/{main_pid}/status"));
    let effective = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .expect("CapEff");
    assert_eq!(
        effective,
        (1 << 12) | (1 << 38) | (1 << 39),
        "{proc_status}"
    );
    let (_, mounts) = booted.sh(&format!("cat /proc/{main_pid}/mountinfo"));
    let options = |mount_point: &str| {
        mounts
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(mount_point))
            .map(|l| l.split_whitespace().nth(5).unwrap().to_owned())
    };
    assert!(
        options("/sys/fs/bpf/limiter").is_some_and(|o| o.starts_with("rw")),
        "{mounts}"
    );
    assert!(
        options("/sys/fs/bpf").is_some_and(|o| o.starts_with("ro")),
        "{mounts}"
    );

    // "First days": in monitor mode a flood from one source passes, counted as would-drops,
    // and the commands the guide reads them with name it.
    let sender = limiter_tests::netns::RawSender::new(&lab.tx, &lab.tx_if);
    let frame = limiter_tests::frame::Frame::udp("192.0.2.10", 9_000).build();
    let flood = || {
        for _ in 0..200 {
            sender.send(&frame);
        }
    };
    // The column of `limiter status`'s interface row: 5 passed, 6 dropped, 7 would-drop.
    let counted = |column: usize, at_least: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, out) = booted.sh("limiter status");
            let value: u64 = out
                .lines()
                .find(|l| l.starts_with(lab.rx_if.as_str()))
                .and_then(|row| row.split_whitespace().nth(column)?.parse().ok())
                .unwrap_or(0);
            if value >= at_least {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "column {column} below {at_least}: {out}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    };
    flood();
    let status = counted(7, 150);
    assert!(status.contains("mode Monitor"), "{status}");
    let (ok, top) = booted.sh("limiter top --by drops");
    assert!(
        ok && top.contains("192.0.2.10"),
        "limiter top --by drops: {top}"
    );
    let (ok, explained) = booted.sh("limiter explain 192.0.2.10");
    assert!(
        ok && explained.contains("192.0.2.10"),
        "limiter explain: {explained}"
    );

    // "Choosing limits": the guide's commands, then a tight limit again to see it enforced:
    // the same flood is now cut to its burst and rate.
    for command in [
        "limiter limit set --pps 2000 --burst 4000",
        "limiter mode enforce",
        "limiter limit set --pps 10 --burst 5",
    ] {
        let (ok, out) = booted.sh(command);
        assert!(ok && out.starts_with("ok"), "{command}: {out}");
    }
    flood();
    counted(6, 150);

    // "Logs, health and metrics", as the guide reads them.
    let (ok, journal) = booted.sh("journalctl -u limiter --no-pager");
    assert!(ok && journal.contains("limiter running"), "{journal}");
    let (ok, health) = booted.sh("curl -s 127.0.0.1:9810/healthz");
    assert!(ok && health.starts_with("ok: attached to"), "{health}");
    let (ok, metrics) = booted.sh("curl -s 127.0.0.1:9810/metrics");
    assert!(
        ok && metrics.contains("limiter_map_fill_ratio"),
        "{metrics}"
    );
    let (ok, out) = booted.sh("systemctl is-active limiter");
    assert!(ok, "{out}");
    drop(booted);

    // "Uninstall": remove keeps the config, purge removes it.
    for (command, config_kept) in [("-r", true), ("-P", false)] {
        let out = Command::new("dpkg")
            .arg(command)
            .arg("limiter")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dpkg {command} limiter: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            Path::new("/etc/limiter/limiter.toml").exists(),
            config_kept,
            "dpkg {command}"
        );
    }
    // The group stays, as other packages' groups do, until removed by hand.
    let group = || {
        std::fs::read_to_string("/etc/group")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("limiter:"))
    };
    assert!(group(), "the limiter group stays after a purge");
    let out = Command::new("delgroup").arg("limiter").output().unwrap();
    assert!(out.status.success(), "delgroup limiter: {out:?}");
    assert!(!group());
    drop(installed);
    let _ = std::fs::remove_dir_all(&etc);
}
