//! The Debian package built by `cargo xtask package` (which `cargo xtask test` runs first):
//! its contents and its metadata.

use std::{path::PathBuf, process::Command};

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
    // The packaged config is the documented example, and it is valid.
    let config = dir.join("etc/limiter/limiter.toml");
    limiter_user::config::load_file(&config).expect("the packaged config parses");
    let _ = std::fs::remove_dir_all(&dir);
}
