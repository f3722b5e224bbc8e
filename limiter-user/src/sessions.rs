//! What the sock_ops program needs from the host: the cgroup v2 hierarchy to attach to, the
//! cookie of this process's network namespace, and the connections that were already
//! established before it was attached (the backfill).

use std::{
    collections::BTreeSet,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use limiter_common::{
    layout::{FlowKey, ProvenKey},
    prefix::{AddrWords, FAMILY_IPV4, FAMILY_IPV6, apply_mask, mask_words, normalize_mapped},
};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_ESTABLISHED, TCP_LISTEN},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// Why the session hooks cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No cgroup2 file system is mounted.
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo): mount one, set \
         [sessions] cgroup, or set [sessions] enabled = false to judge TCP packet by packet"
    )]
    NoCgroup2,
    /// The configured directory is not in a cgroup v2 hierarchy.
    #[error("[sessions] cgroup {} is not a cgroup v2 directory", .0.display())]
    NotCgroup2(PathBuf),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel's socket dump could not be read.
    #[error("reading established connections (sock_diag): {0}")]
    Dump(String),
}

/// The mount point of the cgroup v2 hierarchy in a `/proc/self/mountinfo` text: the hybrid
/// layout of older systemd puts it at `/sys/fs/cgroup/unified`, most hosts at
/// `/sys/fs/cgroup`.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 25 0:31 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw"
        let (mount, fs) = line.split_once(" - ")?;
        let fs_type = fs.split_whitespace().next()?;
        let mount_point = mount.split_whitespace().nth(4)?;
        (fs_type == "cgroup2").then(|| PathBuf::from(unescape_mount_path(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as three octal digits.
fn unescape_mount_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finds the cgroup v2 hierarchy of this host.
pub fn find_cgroup2() -> Result<PathBuf, SessionError> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| SessionError::Io {
            what: "reading /proc/self/mountinfo",
            source,
        })?;
    cgroup2_mount(&text).ok_or(SessionError::NoCgroup2)
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`), the value
/// `bpf_get_netns_cookie` gives the sock_ops program for its sockets.
pub fn netns_cookie() -> Result<u64, SessionError> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .map_err(|source| SessionError::Io {
            what: "opening a socket to read the namespace cookie",
            source,
        })?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and an out-buffer of the option's size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(SessionError::Io {
            what: "getsockopt(SO_NETNS_COOKIE)",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(cookie)
}

/// One TCP socket of the namespace, as the kernel's dump reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    /// ESTABLISHED or LISTEN (the dump asks for nothing else).
    pub listening: bool,
    /// This host's address and port.
    pub local: (IpAddr, u16),
    /// The peer's address and port.
    pub remote: (IpAddr, u16),
}

/// What the backfill writes: every established flow, and the peers of the established
/// connections this host accepted (on a port it listens on) as proven sources.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backfill {
    /// Flows for `FLOWS`.
    pub flows: Vec<FlowKey>,
    /// Sources for `PROVEN`.
    pub proven: Vec<ProvenKey>,
}

/// Decides the backfill from a socket dump. Pure; `source_prefix_v4/v6` are the lengths
/// sources are tracked at, as the XDP program keys `PROVEN`.
pub fn plan_backfill(
    sockets: &[TcpSocket],
    source_prefix_v4: u8,
    source_prefix_v6: u8,
) -> Backfill {
    let listening: BTreeSet<u16> = sockets
        .iter()
        .filter(|s| s.listening)
        .map(|s| s.local.1)
        .collect();
    let mut proven = BTreeSet::new();
    let mut flows = Vec::new();
    for socket in sockets.iter().filter(|s| !s.listening) {
        let (family, remote) = addr_words(socket.remote.0);
        let (_, local) = addr_words(socket.local.0);
        flows.push(FlowKey {
            remote,
            local,
            remote_port: socket.remote.1,
            local_port: socket.local.1,
            family,
            _pad: [0; 3],
        });
        if listening.contains(&socket.local.1) {
            let len = if family == FAMILY_IPV4 {
                source_prefix_v4
            } else {
                source_prefix_v6
            };
            proven.insert((family, apply_mask(&remote, &mask_words(len))));
        }
    }
    Backfill {
        flows,
        proven: proven
            .into_iter()
            .map(|(family, addr)| ProvenKey {
                addr,
                family,
                _pad: [0; 3],
            })
            .collect(),
    }
}

/// An address as the programs key it: IPv4-mapped IPv6 becomes IPv4.
pub(crate) fn addr_words(addr: IpAddr) -> (u8, AddrWords) {
    match addr {
        IpAddr::V4(v4) => {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            (FAMILY_IPV4, limiter_common::prefix::words_from_bytes(bytes))
        }
        IpAddr::V6(v6) => normalize_mapped(
            FAMILY_IPV6,
            limiter_common::prefix::words_from_bytes(v6.octets()),
        ),
    }
}

/// Every established and listening TCP socket of this process's network namespace.
pub fn tcp_sockets() -> Result<Vec<TcpSocket>, SessionError> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump(family, &mut out)?;
    }
    Ok(out)
}

fn dump(family: u8, out: &mut Vec<TcpSocket>) -> Result<(), SessionError> {
    let io = |what| move |source| SessionError::Io { what, source };
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(io("opening a sock_diag socket"))?;
    socket
        .bind_auto()
        .map_err(io("binding the sock_diag socket"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(io("connecting the sock_diag socket"))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::ESTABLISHED | StateFlags::LISTEN,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket
        .send(&buf, 0)
        .map_err(io("sending the sock_diag request"))?;
    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let size = socket
            .recv(&mut &mut receive[..], 0)
            .map_err(io("reading the sock_diag answer"))?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&receive[offset..size])
                .map_err(|e| SessionError::Dump(e.to_string()))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let h = &response.header;
                    if h.state == TCP_ESTABLISHED || h.state == TCP_LISTEN {
                        out.push(TcpSocket {
                            listening: h.state == TCP_LISTEN,
                            local: (h.socket_id.source_address, h.socket_id.source_port),
                            remote: (
                                h.socket_id.destination_address,
                                h.socket_id.destination_port,
                            ),
                        });
                    }
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => return Err(SessionError::Dump(e.to_string())),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// Whether a source proven (by its last completed handshake) at `proven_ns` has outlived
/// its proof at `now_ns`. A clock reading from before the proof (another boot's pinned
/// value, or a CPU's clock slightly behind) never expires it early.
pub fn proof_expired(proven_ns: u64, now_ns: u64, ttl_ns: u64) -> bool {
    now_ns
        .checked_sub(proven_ns)
        .is_some_and(|age| age > ttl_ns)
}

/// Whether a path is (the root of) a cgroup v2 hierarchy.
pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
37 35 0:32 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,xattr,name=systemd
";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "29 23 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let escaped = "29 23 0:26 / /mnt/my\\040cgroup rw - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount(escaped),
            Some(PathBuf::from("/mnt/my cgroup"))
        );
        assert_eq!(
            cgroup2_mount("37 35 0:32 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
        assert_eq!(cgroup2_mount("garbage\n\n"), None);
    }

    #[test]
    fn proofs_expire_after_their_time_only() {
        let ttl = 10;
        assert!(!proof_expired(100, 105, ttl));
        assert!(!proof_expired(100, 110, ttl), "at the limit: still proven");
        assert!(proof_expired(100, 111, ttl));
        assert!(
            !proof_expired(200, 100, ttl),
            "a proof from the future is kept"
        );
    }

    #[test]
    fn backfill_proves_only_peers_of_accepted_connections() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let sockets = [
            TcpSocket {
                listening: true,
                local: (ip("0.0.0.0"), 443),
                remote: (ip("0.0.0.0"), 0),
            },
            // A client of ours, over a dual-stack listener.
            TcpSocket {
                listening: false,
                local: (ip("::ffff:192.0.2.1"), 443),
                remote: (ip("::ffff:198.51.100.7"), 50000),
            },
            // Our own connection out to a database: a flow, not a proven client.
            TcpSocket {
                listening: false,
                local: (ip("192.0.2.1"), 41000),
                remote: (ip("203.0.113.9"), 5432),
            },
            TcpSocket {
                listening: false,
                local: (ip("2001:db8::1"), 443),
                remote: (ip("2001:db8:1:2:3:4:5:6"), 40000),
            },
        ];
        let plan = plan_backfill(&sockets, 32, 64);
        assert_eq!(plan.flows.len(), 3);
        let mapped = &plan.flows[0];
        assert_eq!(mapped.family, FAMILY_IPV4, "mapped peers are IPv4 to XDP");
        assert_eq!((mapped.remote_port, mapped.local_port), (50000, 443));
        assert_eq!(addr_words(ip("198.51.100.7")).1, mapped.remote);
        let proven: Vec<IpAddr> = plan
            .proven
            .iter()
            .map(|p| {
                limiter_common::layout::SourceKey {
                    addr: p.addr,
                    family: p.family,
                    ..Default::default()
                }
                .ip()
            })
            .collect();
        assert_eq!(proven, [ip("198.51.100.7"), ip("2001:db8:1:2::")]);
    }
}
