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

#[test]
fn package_holds_the_binary_unit_config_and_man_page() {
    let contents = dpkg_deb(&["-c"]);
    for path in [
        "./usr/bin/limiter",
        "./etc/limiter/limiter.toml",
        "./usr/share/man/man1/limiter.1.gz",
        "./usr/share/doc/limiter/README.md",
        "./usr/share/doc/limiter/config.md",
        "./usr/share/doc/limiter/metrics.md",
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
    assert!(control.contains("Package: limiter"), "{control}");
    assert!(
        control.contains("conffiles") || dpkg_deb(&["-e", "/dev/null"]).is_empty(),
        "{control}"
    );
}

#[test]
fn packaged_unit_keeps_only_the_needed_capabilities() {
    let dir = std::env::temp_dir().join(format!("limiter-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb())
        .arg(&dir)
        .output()
        .expect("dpkg-deb -x");
    assert!(out.status.success());
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
    let _ = std::fs::remove_dir_all(&dir);
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
