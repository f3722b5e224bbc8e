//! The demo in its short form: the whole lab, the attacks, the daemon and the CLI, with the
//! demo's own verdict (legitimate clients served, floods dropped) as the assertion.

use std::{path::PathBuf, process::Command};

use limiter_tests::{daemon::binary, require_root};

#[test]
fn demo_defends_the_lab_and_leaves_nothing_behind() {
    require_root();
    let limiter = binary();
    let demo = limiter.with_file_name("limiter-demo");
    assert!(
        demo.exists(),
        "{} is missing: `cargo xtask test` builds it",
        demo.display()
    );
    let out = std::env::temp_dir().join(format!("limiter-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(&demo)
        .arg("--limiter")
        .arg(&limiter)
        .args(["--duration", "2", "--out"])
        .arg(&out)
        .status()
        .expect("run the demo");
    assert!(
        status.success(),
        "the demo's expectations failed ({status}); see its output above"
    );
    for file in ["timeline.png", "results.json"] {
        let path: PathBuf = out.join(file);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1_000, "{} was not written", path.display());
    }
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap())
            .expect("results.json");
    assert!(
        results.as_object().is_some_and(|o| !o.is_empty()),
        "results.json has the raw numbers"
    );

    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !left.contains("lim-demo"),
        "the demo left namespaces behind: {left}"
    );
    assert!(
        !std::path::Path::new("/sys/fs/bpf/lim-demo").exists(),
        "the demo left pins behind"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_fleet_demo_shows_an_attack_on_one_host_blocked_on_the_others() {
    require_root();
    let limiter = binary();
    let demo = limiter.with_file_name("limiter-demo");
    let out = std::env::temp_dir().join(format!("limiter-fleet-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(&demo)
        .arg("--limiter")
        .arg(&limiter)
        .args(["--fleet", "--duration", "10", "--out"])
        .arg(&out)
        .status()
        .expect("run the fleet demo");
    assert!(
        status.success(),
        "the fleet demo's expectations failed ({status}); see its output above"
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("fleet.json")).unwrap())
            .expect("fleet.json");
    // The published deny is the attack's source, with the attack id as its reason.
    let published = &results["published"];
    assert_eq!(published["prefix"], "203.0.113.66/32", "{results}");
    assert!(
        published["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("attack ") && r.contains("source_flood")),
        "{results}"
    );
    assert!(
        published["author"]
            .as_str()
            .is_some_and(|a| a.starts_with("limiter@")),
        "{results}"
    );
    let convergence = results["convergence_ms"].as_array().expect("convergence");
    assert_eq!(convergence.len(), 2, "both other hosts: {results}");
    for row in convergence {
        let ms = row[1].as_f64().unwrap();
        assert!((0.0..1_000.0).contains(&ms), "{results}");
    }
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !left.contains("lim-etcd") && !left.contains("lim-f0-"),
        "the fleet demo left namespaces behind: {left}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
