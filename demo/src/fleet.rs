//! `limiter-demo --fleet`: three edge hosts following one etcd cluster. One of them is
//! flooded; it records the attack and publishes a temporary fleet deny of the source
//! (`[fleet] publish_attacks = "on"`); the other two, which never saw the flood, drop the
//! source too. The convergence measured is from the entry's creation on the attacked host
//! to the first frame of the source dropped on each other host.
//!
//! It reuses the fleet tests' lab (`limiter_tests::fleet`): a real three-member etcd
//! cluster in a namespace of its own and real daemons in lab namespaces, all removed at the
//! end, even on failure.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, ensure};
use limiter_tests::{
    fleet::{Etcd, Host, ok, until_connected},
    frame::Frame,
};
use serde::Serialize;

/// The attacking source, in a class held to a low rate on every host.
const ATTACKER: &str = "203.0.113.66";
/// Frames per second of the flood into the attacked host (bounded, and only into its lab).
const FLOOD_PPS: u64 = 2_000;

/// What the demo measured.
#[derive(Serialize)]
struct FleetResults {
    attack: serde_json::Value,
    published: serde_json::Value,
    /// Per host that was not attacked: milliseconds from the entry's creation to the
    /// first frame of the attacker dropped there.
    convergence_ms: Vec<(String, f64)>,
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1_000.0)
}

/// Runs the fleet demo for at most `duration` seconds of flood; whether its expectations
/// held.
pub fn run(duration: u64, out: &Path) -> Result<bool> {
    println!("== the fleet: a three-member etcd cluster and three edge hosts following it");
    let etcd = Etcd::cluster();
    // Every host holds 203.0.113.0/24 to 50 frames per second per source, and records an
    // attack at 300 dropped frames per second for a second; only edge 1 will see one.
    let extra = "[[class]]\nname = \"retail\"\nprefixes = [\"203.0.113.0/24\"]\n[class.limit]\npackets_per_second = 50\nburst_packets = 50\n\n[attacks]\nmin_packets_per_second = 300\nstart_seconds = 1\nend_seconds = 5\n";
    let publish =
        "publish_attacks = \"on\"\npublish_attacks_max = 4\npublish_attacks_seconds = 120\n";
    let hosts: Vec<Host> = (0..3)
        .map(|i| Host::with_fleet(&etcd, i, extra, publish))
        .collect();
    until_connected(&hosts);
    for (i, host) in hosts.iter().enumerate() {
        ensure!(
            !host.probe(ATTACKER),
            "edge {} denies {ATTACKER} before any attack",
            i + 1
        );
    }
    println!(
        "   edges 1-3 connected; each publishes its attack records as fleet denies (publish_attacks = \"on\")"
    );

    println!("== a flood of {FLOOD_PPS} frames/s from {ATTACKER} into edge 1 only");
    let frame = Frame::udp(ATTACKER, 9_000).build();
    let flood_until = Instant::now() + Duration::from_secs(duration.max(4));
    let mut convergence: Vec<Option<f64>> = vec![None; hosts.len()];
    let mut published: Option<serde_json::Value> = None;
    let mut next_send = Instant::now();
    while Instant::now() < flood_until {
        // Bursts of 20 every 10 ms: the rate, bounded.
        if Instant::now() >= next_send {
            for _ in 0..FLOOD_PPS / 100 {
                hosts[0].sender.send(&frame);
            }
            next_send += Duration::from_millis(10);
        }
        if published.is_none() {
            let listed: serde_json::Value =
                serde_json::from_str(&ok(&etcd.limiter(&["deny", "list", "--json"])))
                    .context("fleet deny list")?;
            published = listed["deny"]
                .as_object()
                .and_then(|m| m.values().next().cloned());
        }
        if let Some(entry) = &published {
            let created = entry["created_unix_ms"].as_f64().unwrap_or_default();
            for (i, host) in hosts.iter().enumerate().skip(1) {
                if convergence[i].is_none() && host.probe(ATTACKER) {
                    convergence[i] = Some(now_ms() - created);
                }
            }
            if convergence.iter().skip(1).all(Option::is_some) {
                break;
            }
        }
        thread::sleep(Duration::from_millis(1));
    }

    let attacks = hosts[0].daemon.ok(&["attacks", "--json"]);
    let attacks: serde_json::Value = serde_json::from_str(&attacks).context("limiter attacks")?;
    let attack = attacks
        .get("items")
        .and_then(|i| i.get(0))
        .or_else(|| attacks.get(0))
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    let mut good = true;
    match &published {
        Some(entry) => println!(
            "   edge 1 recorded the attack and published: fleet deny {} by {} ({})",
            entry["prefix"].as_str().unwrap_or("?"),
            entry["author"].as_str().unwrap_or("?"),
            entry["reason"].as_str().unwrap_or("?")
        ),
        None => {
            println!("   FAILED: edge 1 published no fleet deny");
            good = false;
        }
    }
    let mut rows = Vec::new();
    for (i, ms) in convergence.iter().enumerate().skip(1) {
        match ms {
            Some(ms) => {
                println!(
                    "   edge {} never saw the flood and drops {ATTACKER}: {ms:.0} ms after the deny was created on edge 1",
                    i + 1
                );
                rows.push((format!("edge {}", i + 1), *ms));
                if *ms > 1_000.0 {
                    println!("   FAILED: over the 1 s target");
                    good = false;
                }
            }
            None => {
                println!("   FAILED: edge {} does not drop {ATTACKER}", i + 1);
                good = false;
            }
        }
    }
    for (i, host) in hosts.iter().enumerate() {
        let fleet = host.fleet_status();
        println!(
            "   edge {}: fleet revision {}, {} denies applied, publications {}",
            i + 1,
            fleet["revision"],
            fleet["applied"],
            fleet["publications"]
        );
    }
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let results = FleetResults {
        attack,
        published: published.unwrap_or(serde_json::Value::Null),
        convergence_ms: rows,
    };
    let path = out.join("fleet.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)
        .with_context(|| path.display().to_string())?;
    println!("   wrote {}", path.display());
    println!(
        "== {}",
        if good {
            "the block reached every edge host"
        } else {
            "FAILED: see above"
        }
    );
    drop(hosts);
    drop(etcd);
    Ok(good)
}
