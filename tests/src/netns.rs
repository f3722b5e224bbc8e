//! Network namespaces and veth pairs made for one test, removed when dropped (also when the
//! test fails and unwinds).

use std::{fs::File, process::Command, thread};

use nix::sched::{CloneFlags, setns};

/// Runs `ip` with arguments; panics with its stderr when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A network namespace that is deleted on drop.
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
}

impl Netns {
    /// Creates `name`, replacing a leftover of the same name from a killed run.
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace; panics when it fails.
    pub fn exec(&self, args: &[&str]) {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// Runs `f` on a thread that has entered this namespace, and returns its result.
    /// Sockets and links made there stay in the namespace wherever they are used later.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(&self.name, f)
    }
}

/// Runs `f` on a thread that has entered the namespace `name`, and returns its result.
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        setns(file, CloneFlags::CLONE_NEWNET).expect("setns into the test namespace");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends inside it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// An HTTP GET from inside `ns`; returns (status, content type, body).
pub fn http_get(ns: &Netns, url: &str, accept: Option<&'static str>) -> (u16, String, String) {
    let url = url.to_owned();
    ns.run(move || {
        let mut request = ureq::get(&url).timeout(std::time::Duration::from_secs(10));
        if let Some(accept) = accept {
            request = request.set("Accept", accept);
        }
        let response = match request.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("GET {url}: {e}"),
        };
        let status = response.status();
        let content_type = response
            .header("content-type")
            .unwrap_or_default()
            .to_owned();
        (status, content_type, response.into_string().unwrap())
    })
}

/// Two namespaces joined by a veth pair, each end addressed.
pub struct Lab {
    /// The receiving side, where the program is attached.
    pub rx: Netns,
    /// The sending side.
    pub tx: Netns,
    /// The veth name inside `rx`.
    pub rx_if: String,
    /// The veth name inside `tx`.
    pub tx_if: String,
    rx_addrs: Vec<String>,
    tx_addrs: Vec<String>,
}

impl Lab {
    /// A lab named after `tag` and this process, so parallel runs never collide.
    /// `rx_addrs` and `tx_addrs` are CIDR addresses for each end.
    pub fn new(tag: &str, rx_addrs: &[&str], tx_addrs: &[&str]) -> Self {
        let id = std::process::id() % 100_000;
        let rx = Netns::new(&format!("lim-{tag}-rx-{id}"));
        let tx = Netns::new(&format!("lim-{tag}-tx-{id}"));
        let rx_if = format!("lr{tag}{id}");
        let tx_if = format!("lt{tag}{id}");
        assert!(rx_if.len() <= 15, "interface name {rx_if} too long");
        let lab = Self {
            rx,
            tx,
            rx_if,
            tx_if,
            rx_addrs: rx_addrs.iter().map(|a| (*a).to_owned()).collect(),
            tx_addrs: tx_addrs.iter().map(|a| (*a).to_owned()).collect(),
        };
        lab.create_link();
        lab
    }

    /// Creates the veth pair (new interface indexes each time), addresses it and brings
    /// it up.
    pub fn create_link(&self) {
        ip(&[
            "link",
            "add",
            &self.rx_if,
            "netns",
            &self.rx.name,
            "type",
            "veth",
            "peer",
            "name",
            &self.tx_if,
            "netns",
            &self.tx.name,
        ]);
        for (ns, ifname, addrs) in [
            (&self.rx, &self.rx_if, &self.rx_addrs),
            (&self.tx, &self.tx_if, &self.tx_addrs),
        ] {
            for addr in addrs {
                if addr.contains(':') {
                    ns.exec(&["ip", "-6", "addr", "add", addr, "dev", ifname, "nodad"]);
                } else {
                    ns.exec(&["ip", "-4", "addr", "add", addr, "dev", ifname]);
                }
            }
            ns.exec(&["ip", "link", "set", ifname, "up"]);
        }
    }

    /// Deletes the veth pair (both ends).
    pub fn delete_link(&self) {
        self.rx.exec(&["ip", "link", "del", &self.rx_if]);
    }

    /// The XDP program id the kernel reports on the rx interface, if any.
    pub fn rx_xdp_program(&self) -> Option<u32> {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.rx.name,
                "-j",
                "-d",
                "link",
                "show",
                "dev",
                &self.rx_if,
            ])
            .output()
            .expect("ip link show");
        let text = String::from_utf8_lossy(&out.stdout);
        let links: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        links[0]["xdp"]["prog"]["id"]
            .as_u64()
            .or_else(|| links[0]["xdp"]["attached"][0]["prog"]["id"].as_u64())
            .map(|id| id as u32)
    }
}
