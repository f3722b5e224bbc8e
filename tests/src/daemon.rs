//! Running the real `limiter` binary: the daemon inside a lab namespace, and CLI commands
//! against its socket.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    thread,
    time::{Duration, Instant},
};

use crate::netns::Lab;

/// A config for daemon tests: 1,000 packets/s per source, reads for `nogroup`.
pub const TEST_CONFIG: &str = r#"
[default_limit]
packets_per_second = 1000
burst_packets = 1000

[control]
group = "nogroup"
"#;

/// An address, parsed.
pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The `limiter` binary: `$LIMITER_BINARY`, or the one of the same build as this
/// executable, beside it (the bench) or one directory up (a test in
/// `target/<profile>/deps`). `cargo xtask` builds it.
pub fn binary() -> PathBuf {
    // The demo runs the binary its operator named.
    if let Some(path) = std::env::var_os("LIMITER_BINARY") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("executable path");
    let beside = exe.parent().expect("target/<profile>");
    let dir = if beside.ends_with("deps") {
        beside.parent().expect("target/<profile>/deps/..")
    } else {
        beside
    };
    let bin = dir.join("limiter");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p limiter-user` (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// Removes the pin and scratch directories of test runs that were killed before their
/// cleanup could run (a timeout's SIGKILL skips every `Drop`): each is named after its run's
/// process id, and a directory whose process is gone belongs to no one.
fn sweep_dead_runs() {
    for parent in [PathBuf::from("/sys/fs/bpf"), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("limiter-test-")
                .and_then(|rest| rest.rsplit('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// A daemon under test, with its own socket, state and pin directories. Killed on drop;
/// its pins are removed by [`Daemon::cleanup`].
pub struct Daemon {
    /// The process.
    pub child: Option<Child>,
    /// Scratch directory (config, socket, state).
    pub dir: PathBuf,
    /// The pin directory in bpffs.
    pub pin_dir: PathBuf,
    /// The namespace it runs in.
    pub netns: String,
    /// The interface it attaches to.
    pub iface: String,
    /// An open-file limit (soft and hard) to run it under, as a host's unit might set.
    pub nofile: Option<u64>,
    /// Run it with only these capabilities (bounding set, as the packaged unit's
    /// `CapabilityBoundingSet=`), e.g. `["bpf", "net_admin", "perfmon"]`; `None`: all.
    pub capabilities: Option<Vec<&'static str>>,
}

impl Daemon {
    /// Paths for a daemon named `tag`, with `config` written as its config file.
    pub fn new(tag: &str, netns: &str, iface: &str, config: &str) -> Self {
        sweep_dead_runs();
        let id = std::process::id();
        let dir = std::env::temp_dir().join(format!("limiter-test-{tag}-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The socket's directory must be reachable by the unprivileged-user test.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::write(dir.join("limiter.toml"), config).unwrap();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/limiter-test-{tag}-{id}"));
        let _ = std::fs::remove_dir_all(&pin_dir);
        Self {
            child: None,
            dir,
            pin_dir,
            netns: netns.to_owned(),
            iface: iface.to_owned(),
            nofile: None,
            capabilities: None,
        }
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The daemon's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends one raw request line to the socket; returns the parsed response.
    pub fn raw(&self, line: &str) -> serde_json::Value {
        use std::io::{BufRead as _, Write as _};
        let mut stream =
            std::os::unix::net::UnixStream::connect(self.socket()).expect("connect the socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(line.as_bytes()).unwrap();
        stream.write_all(b"\n").unwrap();
        let mut answer = String::new();
        std::io::BufReader::new(stream)
            .read_line(&mut answer)
            .expect("read the response");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    }

    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("limiter.sock")
    }

    /// The config file.
    pub fn config(&self) -> PathBuf {
        self.dir.join("limiter.toml")
    }

    /// `limiter run` for this daemon, inside its namespace: nsenter, not `ip netns exec`,
    /// which remounts /sys and hides bpffs.
    pub fn run_command(&self) -> Command {
        self.run_command_with(
            &self.socket(),
            &self.config(),
            &self.state_dir(),
            &self.pin_dir,
        )
    }

    /// `limiter run` in this daemon's namespace and on its interface, with other paths.
    pub fn run_command_with(
        &self,
        socket: &Path,
        config: &Path,
        state_dir: &Path,
        pin_dir: &Path,
    ) -> Command {
        let mut command = match self.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("nsenter");
                c
            }
            None => Command::new("nsenter"),
        };
        command.arg(format!("--net=/run/netns/{}", self.netns));
        // After nsenter, which itself needs CAP_SYS_ADMIN to enter the namespace.
        if let Some(capabilities) = &self.capabilities {
            let set: Vec<String> = capabilities.iter().map(|c| format!("+{c}")).collect();
            command
                .arg("setpriv")
                .arg(format!("--bounding-set=-all,{}", set.join(",")));
        }
        command
            .arg(binary())
            .arg("--socket")
            .arg(socket)
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(["--iface", &self.iface, "--attach", "native"])
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--pin-dir")
            .arg(pin_dir);
        command
    }

    /// Starts the daemon and waits until it answers `status`.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let log = std::fs::File::create(self.dir.join(format!("daemon-{started}.log"))).unwrap();
        let child = self
            .run_command()
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the daemon");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.cli(&["status"]).status.success() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited with {status}: {}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not answer within 20 s: {}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything the daemon logged so far.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if entry.file_name().to_string_lossy().starts_with("daemon-") {
                all.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        all
    }

    /// Kills the daemon with SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // nsenter execs the daemon, so the child's pid is the daemon's.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the daemon with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "the daemon ignored SIGTERM");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Runs a CLI command against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary())
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("run the CLI")
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "limiter {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status JSON")
    }

    /// Removes the daemon's pins (and so detaches its program).
    pub fn cleanup(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.cleanup();
        if std::env::var_os("LIMITER_KEEP_TEST_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `command` to completion, failing the test (and killing it) past `limit`: a daemon
/// that should refuse to start must not hang the suite by starting.
pub fn output_within(command: &mut Command, limit: Duration) -> Output {
    use std::process::Stdio;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?} (expected it to exit): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A tmpfs mounted for one test (a full or read-only disk on demand); lazily unmounted on
/// drop, since the daemon may still hold a file in it.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs with `options` (such as `ro,size=64k`) at `path`, creating it.
    pub fn mount(path: &Path, options: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs ({options}) at {}", path.display());
        Self(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A UDP socket at `server` in the lab's rx namespace, giving up on a read after 300 ms of
/// quiet.
pub fn bind_receiver(lab: &Lab, server: SocketAddr) -> UdpSocket {
    let receiver = lab
        .rx
        .run(move || UdpSocket::bind(server).expect("bind the receiver"));
    receiver
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    receiver
}

/// Traffic between the lab's namespaces: UDP from chosen sources to a receiver in `rx`.
pub struct Traffic {
    receiver: UdpSocket,
    senders: HashMap<IpAddr, UdpSocket>,
    server: SocketAddr,
}

impl Traffic {
    /// A receiver at `server` in the lab's rx namespace and a socket per source in tx.
    pub fn new(lab: &Lab, server: SocketAddr, sources: &[IpAddr]) -> Self {
        let receiver = bind_receiver(lab, server);
        let list = sources.to_vec();
        let senders = lab.tx.run(move || {
            list.iter()
                .map(|a| {
                    (
                        *a,
                        UdpSocket::bind(SocketAddr::new(*a, 0)).expect("bind a sender"),
                    )
                })
                .collect()
        });
        Self {
            receiver,
            senders,
            server,
        }
    }

    /// Sends `count` datagrams from `source` evenly over `duration`; returns how many
    /// reached the receiver.
    pub fn send(&self, source: IpAddr, count: u32, duration: Duration) -> u32 {
        // Count while sending, so a burst that passes whole never overflows the socket buffer.
        let sending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let counter = {
            let receiver = self.receiver.try_clone().expect("clone the receiver");
            let sending = sending.clone();
            thread::spawn(move || {
                let mut counts: HashMap<IpAddr, u32> = HashMap::new();
                let mut buf = [0u8; 64];
                loop {
                    match receiver.recv_from(&mut buf) {
                        Ok((_, from)) => *counts.entry(from.ip()).or_default() += 1,
                        Err(_) if !sending.load(std::sync::atomic::Ordering::Acquire) => break,
                        Err(_) => {}
                    }
                }
                counts
            })
        };
        let socket = &self.senders[&source];
        let start = Instant::now();
        for i in 0..count {
            let due = start + duration.mul_f64(f64::from(i) / f64::from(count));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            let _ = socket.send_to(&i.to_be_bytes(), self.server);
        }
        sending.store(false, std::sync::atomic::Ordering::Release);
        let counts = counter.join().expect("the counting thread");
        counts.get(&source).copied().unwrap_or(0)
    }

    /// Receives until quiet; counts datagrams per source.
    pub fn drain(&self) -> HashMap<IpAddr, u32> {
        let mut counts = HashMap::new();
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = self.receiver.recv_from(&mut buf) {
            *counts.entry(from.ip()).or_default() += 1;
        }
        counts
    }

    /// A clone of the sender socket for `source`, for a flood on another thread.
    pub fn sender(&self, source: IpAddr) -> (UdpSocket, SocketAddr) {
        (self.senders[&source].try_clone().unwrap(), self.server)
    }
}
