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
        "ReadWritePaths=/sys/fs/bpf/limiter /var/lib/limiter /run/limiter",
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
