//! The lab: four network namespaces joined by veth pairs to a bridge, and the processes that
//! run in them. Everything is torn down when the [`Lab`] guard is dropped (on success, on an
//! error and after Ctrl-C), unless `--keep` disarms it; `limiter-demo --cleanup` removes a lab
//! left by `--keep` or by a run that was killed.
//!
//! ```text
//!  lim-demo-client    client0 ─┐ 10.77.1.10-12, fd77:0:0:1::10
//!  lim-demo-attacker  attack0 ─┼─ br0 in lim-demo-net
//!  lim-demo-edge      edge0 ───┘ 10.77.0.1, fd77::1: the API, and the limiter's XDP on edge0
//! ```
//!
//! Only these namespaces are touched: the machine's own interfaces never carry lab traffic.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::netns;

/// The namespace of the edge host: the API service and the limiter.
pub const EDGE_NS: &str = "lim-demo-edge";
/// The namespace of the well-behaved clients.
pub const CLIENT_NS: &str = "lim-demo-client";
/// The namespace of the attacker.
pub const ATTACKER_NS: &str = "lim-demo-attacker";
/// The namespace holding the bridge that joins the other three.
pub const BRIDGE_NS: &str = "lim-demo-net";
/// Every namespace of the lab, in the order they are removed.
pub const NAMESPACES: [&str; 4] = [EDGE_NS, CLIENT_NS, ATTACKER_NS, BRIDGE_NS];

/// The edge's interface, inside [`EDGE_NS`]: the limiter attaches here.
pub const EDGE_IF: &str = "edge0";
/// The clients' interface, inside [`CLIENT_NS`].
pub const CLIENT_IF: &str = "client0";
/// The attacker's interface, inside [`ATTACKER_NS`].
pub const ATTACKER_IF: &str = "attack0";
const BRIDGE: &str = "br0";
/// The edge's veth peer, a port of the bridge.
const EDGE_BRIDGE_PORT: &str = "br-edge";

/// bpffs directory for the lab limiter's pins, apart from a production limiter's.
pub const PIN_DIR: &str = "/sys/fs/bpf/lim-demo";

/// The edge's addresses, where the API listens. The lab uses private ranges only.
pub const EDGE_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const EDGE_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
/// The edge's address in the IPv6 client's /64, its next hop towards the edge.
const EDGE_V6_CLIENT_NET: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 1, 0, 0, 0, 1);
pub const API_PORT: u16 = 8080;
/// The limiter's metrics endpoint, on the edge namespace's own loopback.
pub const METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 9810);

/// The legitimate clients' addresses, all on the client namespace's interface.
pub const RETAIL_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 10);
pub const PARTNER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 11);
pub const MARKET_MAKER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 12);
/// Brand-new clients, one per second of the attack phases, each from an address of its own
/// that the limiter has never seen: 10.77.1.100 and up.
const NEWCOMERS_FIRST: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 100);
const NEWCOMERS: u8 = 150;

/// The brand-new clients' addresses, in the order they connect.
pub fn newcomer_addresses() -> impl Iterator<Item = Ipv4Addr> {
    let [a, b, c, first] = NEWCOMERS_FIRST.octets();
    (0..NEWCOMERS).map(move |i| Ipv4Addr::new(a, b, c, first + i))
}

/// In a /64 of its own: the limiter tracks an IPv6 host by its /64.
pub const RETAIL_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 1, 0, 0, 0, 0x10);

/// The attacker's own addresses: the UDP and HTTP floods come from the IPv4 one, and the edge
/// routes its replies to the spoofed ranges below through them.
pub const ATTACKER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 66);
pub const ATTACKER_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 2, 0x66);
/// The attacker "owns" 10.78.0.0/16 and spoofs random sources from it.
pub const SPOOFED_V4_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 78, 0, 0), 16);
/// The attacker's IPv6 /64, whose sources it rotates through.
/// A botnet's /24, routed to the attacker: the prefix flood sends from each of its addresses.
pub const PREFIX_FLOOD_V4_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 79, 0, 0), 24);
pub const ROTATING_V6_NET: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd77, 0, 0, 2, 0, 0, 0, 0), 64);

/// A process started in the lab, stopped when the lab is torn down.
struct LabProcess {
    name: String,
    child: Child,
}

/// The lab, torn down on drop unless [`Lab::keep`] was called.
pub struct Lab {
    processes: Vec<LabProcess>,
    kept: bool,
    /// The pass-everything XDP program on the edge's bridge port, attached while this lives
    /// (and gone with the namespace).
    _edge_peer_xdp: Option<aya::Ebpf>,
}

impl Lab {
    /// Creates the namespaces, links, addresses and routes. Refuses when any part of a
    /// previous lab is still there.
    pub fn create() -> Result<Self> {
        ensure_absent()?;
        // The guard exists before the first namespace, so a failure half-way removes the rest.
        let mut lab = Self {
            processes: Vec::new(),
            kept: false,
            _edge_peer_xdp: None,
        };
        build_topology()?;
        lab._edge_peer_xdp = Some(attach_edge_peer_xdp()?);
        Ok(lab)
    }

    /// Starts `program` inside the edge namespace with `nsenter --net`, which (unlike
    /// `ip netns exec`) keeps the root mount namespace and so the real /sys/fs/bpf.
    /// Its output goes to `log`. It gets its own process group, so a Ctrl-C typed at the
    /// terminal reaches only the demo, which then stops it in order.
    pub fn spawn_in_edge(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<()> {
        use std::os::unix::process::CommandExt as _;
        let log_file =
            fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let log_err = log_file
            .try_clone()
            .with_context(|| format!("open {} twice", log.display()))?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns::path(EDGE_NS).display()))
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {name} with nsenter"))?;
        self.processes.push(LabProcess {
            name: name.to_owned(),
            child,
        });
        Ok(())
    }

    /// Fails if a process started with [`Lab::spawn_in_edge`] has exited.
    pub fn check_processes(&mut self) -> Result<()> {
        for process in &mut self.processes {
            if let Some(status) = process
                .child
                .try_wait()
                .with_context(|| format!("check on {}", process.name))?
            {
                bail!("{} exited unexpectedly ({status})", process.name);
            }
        }
        Ok(())
    }

    /// Leaves the lab up: nothing is removed when the guard is dropped.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for process in &mut self.processes {
            stop_child(&process.name, &mut process.child);
        }
        if let Err(e) = teardown() {
            eprintln!("limiter-demo: cleanup incomplete: {e:#}");
        }
    }
}

/// How this program was invoked, for messages that tell the user what to run.
pub fn program_name() -> String {
    std::env::args()
        .next()
        .unwrap_or_else(|| "limiter-demo".into())
}

/// Fails, naming what is there and how to remove it, when any part of a lab exists.
pub fn ensure_absent() -> Result<()> {
    let found = leftovers();
    if !found.is_empty() {
        bail!(
            "a previous lab is still present ({}); remove it with: {} --cleanup",
            found.join(", "),
            program_name()
        );
    }
    Ok(())
}

/// The parts of a lab that exist now: namespaces and the pin directory.
pub fn leftovers() -> Vec<String> {
    let mut found: Vec<String> = NAMESPACES
        .iter()
        .filter(|ns| netns::path(ns).exists())
        .map(|ns| format!("namespace {ns}"))
        .collect();
    if Path::new(PIN_DIR).exists() {
        found.push(format!("pins {PIN_DIR}"));
    }
    found
}

/// Removes every part of a lab: stops the processes inside its namespaces, deletes the
/// namespaces (which deletes their links and so detaches the XDP program), and removes the
/// pins. Safe to run when nothing is there.
pub fn teardown() -> Result<()> {
    let own_pid = std::process::id();
    for ns in NAMESPACES {
        if !netns::path(ns).exists() {
            continue;
        }
        // Processes left in the namespace: the API service and the daemon of a kept lab are
        // stopped; anything else (a shell someone opened there) is left alone and named.
        for pid in pids_in(ns).into_iter().filter(|&pid| pid != own_pid) {
            let command = command_line(pid);
            if is_lab_process(&command) {
                stop_pid(pid);
            } else if !command.is_empty() {
                eprintln!(
                    "limiter-demo: not stopping process {pid} ({}) in {ns}; the namespace goes \
                     away when it exits",
                    command.join(" ")
                );
            }
        }
        // `ip netns del` removes the name; the namespace and its links go once nothing holds
        // it any more.
        if let Err(e) = ip(&["netns", "del", ns]) {
            eprintln!("limiter-demo: {e:#}");
        }
    }
    if Path::new(PIN_DIR).exists() {
        fs::remove_dir_all(PIN_DIR).with_context(|| format!("remove {PIN_DIR}"))?;
    }
    let left = leftovers();
    if !left.is_empty() {
        bail!("still present: {}", left.join(", "));
    }
    Ok(())
}

/// The arguments of process `pid`; empty if it is gone.
fn command_line(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a command line is one the demo starts in the lab: the API service
/// (`limiter-demo serve-api`) or the limiter daemon pinning under [`PIN_DIR`].
fn is_lab_process(command: &[String]) -> bool {
    let api = command.iter().any(|arg| arg == "serve-api")
        && command
            .first()
            .is_some_and(|program| program.ends_with("limiter-demo"));
    let daemon = command.iter().any(|arg| arg == "run") && command.iter().any(|arg| arg == PIN_DIR);
    api || daemon
}

fn pids_in(ns: &str) -> Vec<u32> {
    match Command::new("ip").args(["netns", "pids", ns]).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect(),
        _ => Vec::new(),
    }
}

const STOP_GRACE: Duration = Duration::from_secs(5);

/// SIGTERM, then SIGKILL after a grace period, for a child of ours (reaped here).
fn stop_child(name: &str, child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!("limiter-demo: {name} ignored SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERM, then SIGKILL, for a lab process found in a lab namespace (of a kept lab, or of a
/// run that was killed, so not necessarily our child).
fn stop_pid(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    let pid = Pid::from_raw(raw);
    if kill(pid, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + STOP_GRACE;
    // Signal 0 only checks that the process still exists.
    while Instant::now() < deadline && kill(pid, None).is_ok() {
        thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(pid, Signal::SIGKILL);
}

/// Runs `ip` with `args`, failing with its error output.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip -n ns ...`.
fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    ip(&full)
}

fn build_topology() -> Result<()> {
    for ns in NAMESPACES {
        ip(&["netns", "add", ns])?;
        ip_in(ns, &["link", "set", "lo", "up"])?;
    }
    ip_in(BRIDGE_NS, &["link", "add", BRIDGE, "type", "bridge"])?;
    ip_in(BRIDGE_NS, &["link", "set", BRIDGE, "up"])?;
    for (ns, inside, port) in [
        (EDGE_NS, EDGE_IF, EDGE_BRIDGE_PORT),
        (CLIENT_NS, CLIENT_IF, "br-client"),
        (ATTACKER_NS, ATTACKER_IF, "br-attack"),
    ] {
        ip(&[
            "link", "add", inside, "netns", ns, "type", "veth", "peer", "name", port, "netns",
            BRIDGE_NS,
        ])?;
        ip_in(BRIDGE_NS, &["link", "set", port, "master", BRIDGE, "up"])?;
    }

    // The edge: one IPv4 /16 for the lab, and an IPv6 address in the /64 it shares with the
    // attacker's link address and in the IPv6 client's /64.
    add_addr(EDGE_NS, EDGE_IF, &format!("{EDGE_V4}/16"))?;
    add_addr(EDGE_NS, EDGE_IF, &format!("{EDGE_V6}/64"))?;
    add_addr(EDGE_NS, EDGE_IF, &format!("{EDGE_V6_CLIENT_NET}/64"))?;

    for addr in [RETAIL_V4, PARTNER_V4, MARKET_MAKER_V4] {
        add_addr(CLIENT_NS, CLIENT_IF, &format!("{addr}/16"))?;
    }
    add_addr(CLIENT_NS, CLIENT_IF, &format!("{RETAIL_V6}/64"))?;
    // One `ip -batch` for the many newcomer addresses rather than a process each.
    let batch: String = newcomer_addresses()
        .map(|addr| format!("addr add {addr}/16 dev {CLIENT_IF}\n"))
        .collect();
    ip_batch(CLIENT_NS, &batch)?;

    add_addr(ATTACKER_NS, ATTACKER_IF, &format!("{ATTACKER_V4}/16"))?;
    add_addr(ATTACKER_NS, ATTACKER_IF, &format!("{ATTACKER_V6}/64"))?;

    for (ns, dev) in [
        (EDGE_NS, EDGE_IF),
        (CLIENT_NS, CLIENT_IF),
        (ATTACKER_NS, ATTACKER_IF),
    ] {
        ip_in(ns, &["link", "set", dev, "up"])?;
    }

    // The IPv6 client reaches the edge's main address through the edge's address in its /64.
    ip_in(
        CLIENT_NS,
        &[
            "-6",
            "route",
            "add",
            &format!("{EDGE_V6}/128"),
            "via",
            &EDGE_V6_CLIENT_NET.to_string(),
        ],
    )?;
    // Replies to the spoofed sources go back towards the attacker, whose kernel discards
    // them (they are not its addresses and it does not forward), as the internet would.
    ip_in(
        EDGE_NS,
        &[
            "route",
            "add",
            &format!("{}/{}", SPOOFED_V4_NET.0, SPOOFED_V4_NET.1),
            "via",
            &ATTACKER_V4.to_string(),
        ],
    )?;
    ip_in(
        EDGE_NS,
        &[
            "route",
            "add",
            &format!("{}/{}", PREFIX_FLOOD_V4_NET.0, PREFIX_FLOOD_V4_NET.1),
            "via",
            &ATTACKER_V4.to_string(),
        ],
    )?;
    ip_in(
        EDGE_NS,
        &[
            "-6",
            "route",
            "add",
            &format!("{}/{}", ROTATING_V6_NET.0, ROTATING_V6_NET.1),
            "via",
            &ATTACKER_V6.to_string(),
        ],
    )?;

    // The edge must accept the spoofed sources, as a host on the internet does: reverse-path
    // filtering off (it would anyway only act after XDP has had its say).
    netns::run_in(EDGE_NS, || {
        for key in ["all", "default", EDGE_IF] {
            write_sysctl(&format!("net/ipv4/conf/{key}/rp_filter"), "0")?;
        }
        Ok(())
    })?;
    Ok(())
}

/// The challenge answers SYNs with `XDP_TX`, and a veth delivers such frames to its peer only
/// through the peer's XDP ring, which exists while the peer runs an XDP program: a
/// pass-everything one on the edge's bridge port. (A NIC transmits them itself.)
fn attach_edge_peer_xdp() -> Result<aya::Ebpf> {
    netns::run_in(BRIDGE_NS, || {
        let mut baselines = aya::Ebpf::load(limiter_user::BASELINES_OBJECT)
            .context("load the pass-everything XDP program")?;
        let pass: &mut aya::programs::Xdp = baselines
            .program_mut("bare_pass")
            .context("bare_pass is in the baselines object")?
            .try_into()
            .context("bare_pass is an XDP program")?;
        pass.load().context("load bare_pass")?;
        pass.attach(EDGE_BRIDGE_PORT, aya::programs::xdp::XdpMode::Driver)
            .with_context(|| format!("attach bare_pass to {EDGE_BRIDGE_PORT}"))?;
        Ok(baselines)
    })
}

/// Runs the `ip` commands of `batch` inside `ns`, one per line (`ip -n ns -batch -`).
fn ip_batch(ns: &str, batch: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("run ip (iproute2)")?;
    child
        .stdin
        .take()
        .context("ip's standard input")?
        .write_all(batch.as_bytes())
        .context("write to ip -batch")?;
    let out = child.wait_with_output().context("wait for ip -batch")?;
    if !out.status.success() {
        bail!("ip -batch: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Adds an address; IPv6 ones without duplicate address detection, so they are usable at once.
fn add_addr(ns: &str, dev: &str, cidr: &str) -> Result<()> {
    if cidr.contains(':') {
        ip_in(ns, &["-6", "addr", "add", cidr, "dev", dev, "nodad"])
    } else {
        ip_in(ns, &["-4", "addr", "add", cidr, "dev", dev])
    }
}

/// Writes a sysctl of the calling thread's network namespace (/proc/sys/net is per namespace).
fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = PathBuf::from("/proc/sys").join(key);
    fs::write(&path, value).with_context(|| format!("write {value} to {}", path.display()))
}

/// Packet counters of one interface.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkCounters {
    pub tx_packets: u64,
}

/// Reads the counters of `dev` inside `ns` (`ip -s -j link show`).
pub fn link_counters(ns: &str, dev: &str) -> Result<LinkCounters> {
    let out = Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "dev", dev])
        .stdin(Stdio::null())
        .output()
        .context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} -s -j link show dev {dev}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let links: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parse the output of ip -j link")?;
    let tx_packets = links
        .get(0)
        .and_then(|link| link.pointer("/stats64/tx/packets"))
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("no tx packet counter for {dev} in the output of ip -j link"))?;
    Ok(LinkCounters { tx_packets })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn recognizes_only_the_lab_processes() {
        assert!(is_lab_process(&args(
            "/work/target/debug/limiter-demo serve-api --listen 10.77.0.1:8080"
        )));
        assert!(is_lab_process(&args(
            "/work/target/debug/limiter --socket /x/lab/limiter.sock run --iface edge0 --pin-dir /sys/fs/bpf/lim-demo"
        )));
        assert!(!is_lab_process(&args("/bin/bash")));
        assert!(!is_lab_process(&args(
            "/usr/bin/limiter run --pin-dir /sys/fs/bpf/limiter"
        )));
        assert!(!is_lab_process(&[]));
    }
}
