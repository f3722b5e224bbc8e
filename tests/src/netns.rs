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
            // `ip -n` rather than `ip netns exec`: no mount namespace to set up per address.
            for addr in addrs {
                if addr.contains(':') {
                    ip(&[
                        "-n", &ns.name, "-6", "addr", "add", addr, "dev", ifname, "nodad",
                    ]);
                } else {
                    ip(&["-n", &ns.name, "-4", "addr", "add", addr, "dev", ifname]);
                }
            }
            ip(&["-n", &ns.name, "link", "set", ifname, "up"]);
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

/// Sends crafted frames out of an interface with an `AF_PACKET` socket: traffic with any
/// source address (a spoofed flood) from inside a lab namespace.
pub struct RawSender {
    socket: std::os::fd::OwnedFd,
    ifindex: i32,
}

impl RawSender {
    /// A sender on `iface` inside `ns`.
    pub fn new(ns: &Netns, iface: &str) -> Self {
        let iface = iface.to_owned();
        ns.run(move || {
            use std::os::fd::FromRawFd as _;
            let ifindex =
                nix::net::if_::if_nametoindex(iface.as_str()).expect("the interface") as i32;
            // SAFETY: plain socket(2); the descriptor is owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    i32::from((libc::ETH_P_ALL as u16).to_be()),
                )
            };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            Self {
                // SAFETY: a descriptor we just opened and own.
                socket: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
                ifindex,
            }
        })
    }

    /// Sends one frame; false when the kernel refused it (a full queue).
    pub fn send(&self, frame: &[u8]) -> bool {
        use std::os::fd::AsRawFd as _;
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: a valid socket, buffer and address of the stated sizes.
        let sent = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        sent == frame.len() as isize
    }

    /// Sends `count` frames made by `frame(i)`, evenly over `duration` (in batches of a
    /// millisecond); returns how many the kernel took.
    pub fn flood(
        &self,
        count: u32,
        duration: std::time::Duration,
        mut frame: impl FnMut(u32) -> Vec<u8>,
    ) -> u32 {
        let start = std::time::Instant::now();
        let mut sent = 0;
        for i in 0..count {
            let due = start + duration.mul_f64(f64::from(i) / f64::from(count));
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now())
                && wait > std::time::Duration::from_millis(1)
            {
                thread::sleep(wait);
            }
            if self.send(&frame(i)) {
                sent += 1;
            }
        }
        sent
    }
}
